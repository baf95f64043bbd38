"""Where source series come from and where synthetic series go: common types and folder endpoints.

A *source* finds the series that match ``SeriesRules`` (``find``) and puts one series' files into
a folder (``fetch``); a *destination* takes the files of one synthetic series (``deliver``). Both
raise ``TransferError`` for transfer failures (network, PACS status; retried unless the PACS said
it is permanent) and nothing else of their own, and have ``description`` (for logs), ``private``
(strings never to log, e.g. folder paths) and ``close()``. A destination also has ``key``, its
identity in the job journal, ``count`` (instances of a series it holds, to verify a delivery) and
``withdraw`` (remove a partial series, where the transport has a way to). ``open_source`` /
``open_destination`` build them from a folder path, a ``dimse://AET@host:port`` address or a
DICOMweb ``http(s)://`` URL.

Withdrawing a partial series, per transport: a folder series is removed (and is written
atomically anyway). DIMSE has no delete: the standard way is an IHE IOCM rejection note (a Key
Object Selection "Rejected for Quality Reasons", 113001) where the PACS supports it, else the PACS
administrator deletes the series. DICOMweb (PS3.18) has no standard delete either (some archives
offer their own "reject" endpoint, Orthanc its REST API); both are left to the administrator. The
journal keeps the partial series' UID and a rerun resends the same instances, completing it.
"""

from __future__ import annotations

import datetime
import hashlib
import logging
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from drdd_med.data.dicom import SeriesSelection, list_dicom_series
from drdd_med.data.files import atomic_output_dir

logger = logging.getLogger(__name__)


class TransferError(RuntimeError):
    """A PACS or network failure: refused association, failure status, dropped connection, HTTP error.

    ``retryable`` is False when the remote side said that trying again will not help (an
    association "Rejected Permanent"): the run does not retry it, a later run still does.
    """

    def __init__(self, message: str, *, retryable: bool = True):
        super().__init__(message)
        self.retryable = retryable


def series_part(series_uid: str, num_parts: int) -> int:
    """The part (0 .. num_parts - 1) a series belongs to: a hash of its UID, the same on every machine."""
    return int.from_bytes(hashlib.sha256(series_uid.encode()).digest()[:8], "big") % num_parts


@dataclass(frozen=True)
class SeriesRef:
    """A source series found by a query; ``files`` only for series already on disk."""

    series_uid: str
    study_uid: str
    modality: str
    description: str
    series_number: int | None
    study_date: str = ""
    num_instances: int | None = None
    files: tuple[Path, ...] = field(default=(), repr=False)


def _check_date(value: str | None, name: str) -> str | None:
    if value:
        try:
            datetime.datetime.strptime(value, "%Y%m%d")
        except ValueError:
            raise ValueError(f"{name} must be a date YYYYMMDD, got {value!r}") from None
    return value or None


@dataclass(frozen=True)
class SeriesRules:
    """Which series to convert: every rule given must hold.

    ``modality`` matches exactly, ``description`` is a regular expression searched in
    SeriesDescription (case-insensitive), ``study_uids``/``series_uids`` are lists of allowed
    UIDs, ``date_from``/``date_to`` bound StudyDate (YYYYMMDD, inclusive). ``num_parts``/``part_id``
    keep only the series of one part (``series_part``), so that N runs, each with its own part and
    journal, convert every series exactly once between them.
    """

    modality: str | None = None
    description: str | None = None
    study_uids: tuple[str, ...] = ()
    series_uids: tuple[str, ...] = ()
    date_from: str | None = None
    date_to: str | None = None
    num_parts: int = 1
    part_id: int = 0

    def __post_init__(self):
        if self.num_parts < 1 or not 0 <= self.part_id < self.num_parts:
            raise ValueError(f"part_id must be 0 .. num_parts - 1 with num_parts >= 1, got {self.part_id} of "
                             f"{self.num_parts}")
        object.__setattr__(self, "date_from", _check_date(self.date_from, "date_from"))
        object.__setattr__(self, "date_to", _check_date(self.date_to, "date_to"))
        object.__setattr__(self, "study_uids", tuple(self.study_uids))
        object.__setattr__(self, "series_uids", tuple(self.series_uids))

    @property
    def study_date_range(self) -> str:
        """The date rule as a DICOM range matching value ("" for none)."""
        if not (self.date_from or self.date_to):
            return ""
        return f"{self.date_from or ''}-{self.date_to or ''}"

    def matches(self, ref: SeriesRef) -> bool:
        if not SeriesSelection(modality=self.modality, description=self.description).matches(ref):
            return False
        if self.study_uids and ref.study_uid not in self.study_uids:
            return False
        if self.series_uids and ref.series_uid not in self.series_uids:
            return False
        if self.num_parts > 1 and series_part(ref.series_uid, self.num_parts) != self.part_id:
            return False
        if (self.date_from or self.date_to) and not ref.study_date:
            return False
        return (not self.date_from or ref.study_date >= self.date_from) and (
            not self.date_to or ref.study_date <= self.date_to
        )


class FolderSource:
    """DICOM files in a folder tree, any layout; series are found by reading every header once."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"{self.root.name}: the source folder does not exist")
        self.description = "folder"
        self.private = (str(self.root.resolve()),)  # paths often name patients: never in logs

    def find(self, rules: SeriesRules) -> list[SeriesRef]:
        refs = [
            SeriesRef(s.series_uid, s.study_uid, s.modality, s.description, s.series_number, s.study_date,
                      len(s.files), s.files)
            for s in list_dicom_series(self.root)
        ]
        unnamed = sum(not ref.series_uid for ref in refs)
        if unnamed:  # the journal needs a key
            logger.warning("skipped %d file group(s) without SeriesInstanceUID", unnamed)
        return [ref for ref in refs if ref.series_uid and rules.matches(ref)]

    def fetch(self, ref: SeriesRef, folder: Path) -> Sequence[Path]:
        return ref.files

    def close(self) -> None:
        pass


class FolderDestination:
    """Each synthetic series in its own folder ``ROOT/<SeriesInstanceUID>/``, replaced whole on a redo."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.key = f"folder:{self.root.resolve()}"
        self.description = "folder"
        self.private = (str(self.root.resolve()),)

    def deliver(self, files: Sequence[Path], series_uid: str) -> None:
        for stale in self.root.glob(f".{series_uid}.*.partial"):  # left by a run killed while copying
            shutil.rmtree(stale, ignore_errors=True)
        with atomic_output_dir(self.root / series_uid, overwrite=True) as staging:
            for file in files:
                shutil.copyfile(file, staging / file.name)

    def count(self, study_uid: str, series_uid: str) -> int:
        folder = self.root / series_uid
        return sum(1 for file in folder.iterdir() if file.is_file()) if folder.is_dir() else 0

    def withdraw(self, series_uid: str) -> bool:
        shutil.rmtree(self.root / series_uid, ignore_errors=True)
        return True

    def close(self) -> None:
        pass


def open_source(
    spec: str,
    *,
    calling_aet: str = "DRDD",
    retrieve: str = "get",
    move_port: int | None = None,
    move_host: str = "",
    auth: tuple[str, str] | None = None,
    timeout: float = 30.0,
):
    """A source from a folder path, a ``dimse://AET@host:port`` address or a DICOMweb ``http(s)://`` URL.

    DIMSE options: our ``calling_aet``, ``retrieve`` by "get" or "move" (to our storage SCP on
    ``move_host``:``move_port``); DICOMweb: ``auth`` (user, password). ``timeout`` in seconds.
    """
    if spec.startswith("dimse://"):
        from drdd_med.pacs.dimse import DimseNode, DimseSource

        return DimseSource(DimseNode.parse(spec), calling_aet, retrieve, move_port, move_host, timeout)
    if spec.startswith(("http://", "https://")):
        from drdd_med.pacs.dicomweb import DicomwebSource

        return DicomwebSource(spec, auth, timeout)
    return FolderSource(spec)


def open_destination(spec: str, *, calling_aet: str = "DRDD", auth: tuple[str, str] | None = None,
                     timeout: float = 30.0):
    """A destination from a folder path, a ``dimse://AET@host:port`` address or a DICOMweb URL."""
    if spec.startswith("dimse://"):
        from drdd_med.pacs.dimse import DimseDestination, DimseNode

        return DimseDestination(DimseNode.parse(spec), calling_aet, timeout)
    if spec.startswith(("http://", "https://")):
        from drdd_med.pacs.dicomweb import DicomwebDestination

        return DicomwebDestination(spec, auth, timeout)
    return FolderDestination(spec)
