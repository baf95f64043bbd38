"""The job journal: which source series were converted by which model to which destination.

One SQLite row per (source series, model id, destination). A series is marked ``running`` before
its work starts and ``done`` only after the destination accepted every instance of every series
made from it (the synthetic CT, and its std map when asked for: ``std_series_uid``) and reports
holding them all, each change in its own committed transaction, so a run killed at any point (even
``kill -9``) leaves rows that say exactly what is finished. A restarted run redoes ``running`` rows; because the synthetic
series' UIDs are derived from the source and the model, redoing resends the same objects and the
destination still holds one series (one of each). A ``done`` row without a std map does not
count as done for a run that asks for one. One run at a time may use a journal (a lock on a file beside
it, released by the system when the process dies).
"""

from __future__ import annotations

import datetime
import fcntl
import os
import secrets
import sqlite3
from dataclasses import dataclass
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS settings (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS series (
    source_series_uid TEXT NOT NULL,
    model_id TEXT NOT NULL,
    destination TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('running', 'done', 'failed')),
    permanent INTEGER NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0,
    reason TEXT NOT NULL DEFAULT '',
    output_series_uid TEXT NOT NULL DEFAULT '',
    std_series_uid TEXT NOT NULL DEFAULT '',
    job_id TEXT NOT NULL,
    duration_s REAL,
    updated TEXT NOT NULL,
    PRIMARY KEY (source_series_uid, model_id, destination)
);
"""


def part_journal_path(path: str | os.PathLike, num_parts: int, part_id: int) -> Path:
    """The journal of one part of a split run, ``NAME.partI-of-N.SUFFIX`` beside ``path`` (``path`` if one part).

    Each part runs on its own machine and at its own pace; with a journal of its own, no part waits
    for another's lock, and a shared folder (NFS) never sees two writers on one SQLite file.
    """
    path = Path(path)
    return path if num_parts == 1 else path.with_name(f"{path.stem}.part{part_id}-of-{num_parts}{path.suffix}")


class JournalLockedError(RuntimeError):
    """Another run is using the journal."""


@dataclass(frozen=True)
class Entry:
    status: str
    permanent: bool
    attempts: int
    reason: str
    output_series_uid: str
    std_series_uid: str  # the std map's series, delivered with the synthetic CT ('' when none was asked for)

    def finished(self, std_series: bool = False) -> bool:
        """Whether the series is done with every output a run asks for (``std_series``: its std map too)."""
        return self.status == "done" and (bool(self.std_series_uid) or not std_series)


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


class Journal:
    """The SQLite journal of one destination's conversions; use as a context manager.

    ``model_id`` and ``destination`` fix the part of the key that stays the same in one run.
    """

    def __init__(self, path: str | os.PathLike, model_id: str, destination: str, job_id: str):
        self.path = Path(path)
        self.model_id, self.destination, self.job_id = model_id, destination, job_id
        self._db: sqlite3.Connection | None = None
        self._lock = None

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = open(self.path.with_name(self.path.name + ".lock"), "w")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            raise JournalLockedError(f"{self.path.name}: another conversion run is using this journal") from None
        self._db = sqlite3.connect(self.path, isolation_level=None)  # autocommit: every change is durable at once
        self._db.execute("PRAGMA synchronous = FULL")
        self._db.executescript(SCHEMA)
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(series)")}
        if "std_series_uid" not in columns:  # a journal from before std maps
            self._db.execute("ALTER TABLE series ADD COLUMN std_series_uid TEXT NOT NULL DEFAULT ''")
        return self

    def __exit__(self, *exc) -> None:
        self._db.close()
        self._lock.close()

    def secret_key(self) -> bytes:
        """The key of this journal's UID hashes (made once, kept in the journal)."""
        self._db.execute(
            "INSERT OR IGNORE INTO settings VALUES ('uid_hash_key', ?)", (secrets.token_hex(32),)
        )
        (value,) = self._db.execute("SELECT value FROM settings WHERE name = 'uid_hash_key'").fetchone()
        return bytes.fromhex(value)

    def get(self, series_uid: str) -> Entry | None:
        row = self._db.execute(
            "SELECT status, permanent, attempts, reason, output_series_uid, std_series_uid FROM series "
            "WHERE source_series_uid = ? AND model_id = ? AND destination = ?",
            (series_uid, self.model_id, self.destination),
        ).fetchone()
        return None if row is None else Entry(row[0], bool(row[1]), row[2], row[3], row[4], row[5])

    def start(self, series_uid: str) -> None:
        """Mark a series as being converted (one more attempt)."""
        self._db.execute(
            "INSERT INTO series (source_series_uid, model_id, destination, status, attempts, job_id, updated) "
            "VALUES (?, ?, ?, 'running', 1, ?, ?) "
            "ON CONFLICT (source_series_uid, model_id, destination) DO UPDATE SET status = 'running', permanent = 0, attempts = attempts + 1, reason = '', "
            "job_id = excluded.job_id, updated = excluded.updated",
            (series_uid, self.model_id, self.destination, self.job_id, _now()),
        )

    def finish(self, series_uid: str, output_series_uid: str, duration_s: float, std_series_uid: str = "") -> None:
        """Record a series delivered in full: its synthetic CT and, when one was made, its std map."""
        self._set(series_uid, "done", False, "", output_series_uid, duration_s, std_series_uid)

    def fail(self, series_uid: str, reason: str, permanent: bool, duration_s: float,
             output_series_uid: str = "") -> None:
        """Record a failure; ``permanent`` ones (refused input) are not retried by later runs by default.

        ``output_series_uid`` names a synthetic series the destination holds only partly, to withdraw.
        """
        self._set(series_uid, "failed", permanent, reason, output_series_uid, duration_s, "")

    def _set(self, series_uid, status, permanent, reason, output_series_uid, duration_s, std_series_uid) -> None:
        self._db.execute(
            "UPDATE series SET status = ?, permanent = ?, reason = ?, output_series_uid = ?, std_series_uid = ?, "
            "duration_s = ?, job_id = ?, updated = ? WHERE source_series_uid = ? AND model_id = ? AND destination = ?",
            (status, int(permanent), reason, output_series_uid, std_series_uid, duration_s, self.job_id, _now(),
             series_uid, self.model_id, self.destination),
        )
