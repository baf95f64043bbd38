"""Batch conversion: every selected source series into one synthetic CT series at the destination, once.

Each series crosses the layers once: source (fetch) -> reader (``scan_dicom_series``,
``read_dicom_series``) -> translator (``BundleTranslator``) -> writer (``write_derived_ct_series``)
-> destination (deliver). The journal (``Journal``) makes the run restartable: finished series are
skipped, a series interrupted by a crash is redone, and the synthetic series' UIDs are derived
from the source and model so a redo replaces rather than duplicates. Transfer failures are retried
``attempts`` times with exponential backoff, unless the PACS said retrying is useless (association
"Rejected Permanent"); input the reader refuses is not retried. Either way the series is recorded
as failed, with its reason, and the run goes on with the next one.

With ``std_series`` (a translator of ``num_samples`` > 1) each source series also gives a second
derived series, the per-voxel std of the samples in HU; it is delivered after the synthetic CT and
the journal marks the source series done only when both are held in full (``Journal.finish`` records
both UIDs), so a crash between the two redoes both, resending the same objects: one of each.

After each delivery the destination is asked how many instances of the synthetic series it holds
(a PACS may answer success for an instance it then drops): fewer or more than were sent make the
series failed as incomplete, its partial series withdrawn where the transport allows (a folder)
and its UID kept in the journal; the next run redoes it, resending the same instances.

Where the series are converted is the engine's business: ``LocalEngine`` (one after the other, in
this process) or ``drdd_med.pacs.ray_engine.RayEngine`` (one Ray task per series). Either way the
journal and the report stay with ``BatchConverter``; ``SeriesConversion`` is the per-series work.
"""

from __future__ import annotations

import contextlib
import csv
import datetime
import io
import json
import logging
import os
import shutil
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TypeVar

import pydicom
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from drdd_med.bundle import BundleTranslator
from drdd_med.data.dicom import SeriesSelection, quiet_pydicom, read_dicom_series, scan_dicom_series
from drdd_med.data.dicom_writer import derived_series_uid, write_derived_ct_series
from drdd_med.data.files import atomic_output
from drdd_med.errors import DRDDInputError
from drdd_med.pacs.endpoints import SeriesRef, SeriesRules, TransferError
from drdd_med.pacs.journal import Journal
from drdd_med.pacs.phi import Redactor, redacted_logging

logger = logging.getLogger(__name__)

T = TypeVar("T")
STATUSES = ("converted", "skipped", "failed")


@dataclass
class SeriesResult:
    """One row of the report; series and studies are named by keyed hashes of their UIDs."""

    series: str
    study: str
    modality: str
    series_number: int | None
    status: str
    reason: str = ""
    attempts: int = 0
    duration_s: float = 0.0
    output_series: str = ""
    std_series: str = ""


@dataclass
class Report:
    job_id: str
    model: str
    source: str
    destination: str
    started: str
    duration_s: float = 0.0
    series: list[SeriesResult] = field(default_factory=list)

    @property
    def counts(self) -> dict[str, int]:
        counts = Counter(result.status for result in self.series)
        return {status: counts.get(status, 0) for status in STATUSES}

    @property
    def series_per_minute(self) -> float:
        """Series converted per minute of the run (queries, transfers and skipped series included)."""
        return round(60.0 * self.counts["converted"] / self.duration_s, 2) if self.duration_s else 0.0

    def write(self, prefix: str | os.PathLike) -> tuple[Path, Path]:
        """Write ``PREFIX.json`` (summary and rows) and ``PREFIX.csv`` (rows); returns both paths."""
        prefix = Path(prefix)
        summary = {k: v for k, v in asdict(self).items() if k != "series"}
        summary.update(counts=self.counts, series_per_minute=self.series_per_minute)
        rows = [asdict(result) for result in self.series]
        json_path, csv_path = prefix.with_name(prefix.name + ".json"), prefix.with_name(prefix.name + ".csv")
        with atomic_output(json_path, overwrite=True) as tmp:
            tmp.write_text(json.dumps({**summary, "series": rows}, indent=2) + "\n")
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=list(SeriesResult.__dataclass_fields__))
        writer.writeheader()
        writer.writerows(rows)
        with atomic_output(csv_path, overwrite=True) as tmp:
            tmp.write_text(text.getvalue())
        return csv_path, json_path


class IncompleteSeriesError(TransferError):
    """The destination holds another number of instances of a delivered series than were sent."""

    def __init__(self, message: str, series_uid: str):
        super().__init__(message)
        self.series_uid = series_uid


@dataclass
class Outcome:
    """How converting one series ended, in plain values (it crosses processes under the Ray engine)."""

    output_uid: str = ""  # the synthetic series' UID, when converted
    std_uid: str = ""  # its std map's series UID, when converted with one
    reason: str = ""  # why it failed, redacted; empty when converted
    permanent: bool = False  # the input was refused: redoing it would fail the same way
    partial_uid: str = ""  # a series the destination holds only partly
    duration_s: float = 0.0


class SeriesConversion:
    """Fetch, read, translate, write and deliver one series: the part of a run that a worker does.

    It holds the source, the destination and the translator, and pickles as what reopens them (each
    endpoint reconnects, the translator reloads its bundle once per process), so the Ray engine runs
    it on other processes and machines. Transfer steps are tried ``attempts`` times with backoff.
    With ``std_series`` the std map of the translator's samples is written and delivered as a second
    series, after the synthetic CT.
    """

    def __init__(self, source, destination, translator: BundleTranslator, *, attempts: int = 3,
                 backoff_s: float = 2.0, job_id: str = "-", std_series: bool = False):
        if attempts < 1:
            raise ValueError(f"attempts must be at least 1, got {attempts}")
        if std_series and translator.num_samples < 2:
            raise ValueError(f"a std series needs at least 2 samples per volume, the translator takes "
                             f"{translator.num_samples}")
        self.source, self.destination, self.translator = source, destination, translator
        self.attempts, self.backoff_s, self.job_id = attempts, backoff_s, job_id
        self.std_series = std_series

    def __call__(self, ref: SeriesRef, redact: Redactor, name: str, scratch: Path) -> Outcome:
        """Convert ``ref``; any failure becomes the ``Outcome``'s redacted reason, never an exception."""
        started = time.monotonic()
        try:
            output_uid, std_uid = self._convert_series(ref, scratch, redact, name)
        except Exception as err:  # noqa: BLE001 - one series never stops the batch
            known = isinstance(err, (DRDDInputError, TransferError))
            return Outcome(
                reason=redact(str(err) if known else f"{type(err).__name__}: {err}"),
                permanent=isinstance(err, DRDDInputError),
                partial_uid=err.series_uid if isinstance(err, IncompleteSeriesError) else "",
                duration_s=round(time.monotonic() - started, 3),
            )
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        return Outcome(output_uid=output_uid, std_uid=std_uid, duration_s=round(time.monotonic() - started, 3))

    def abandoned(self, ref: SeriesRef, reason: str) -> Outcome:
        """The outcome of a series whose worker was lost: a partial delivery of it (the synthetic CT, its
        std map) is withdrawn where the transport allows (the UIDs are derived, so known without the worker)."""
        held_uids, kept_uids = [], []
        for std in (False, True) if self.std_series else (False,):
            uid = derived_series_uid(ref.series_uid, self.translator.model_name, self.translator.model_version, std)
            try:
                held = self.destination.count(ref.study_uid, uid)
            except TransferError:
                held = None
            if held == 0:
                continue
            held_uids.append(uid)
            if not (held and self.destination.withdraw(uid)):
                kept_uids.append(uid)
        if not held_uids:
            return Outcome(reason=reason)
        if not kept_uids:
            return Outcome(reason=f"{reason}; its partial series was withdrawn", partial_uid=held_uids[0])
        return Outcome(reason=f"{reason}; a partial series may stay at the destination until a rerun completes it",
                       partial_uid=kept_uids[0])

    def retry(self, step: Callable[[int], T], what: str, redact: Redactor, name: str = "-") -> T:
        """``step(attempt)``, tried again after a ``TransferError`` until ``attempts`` tries failed."""
        attempt = 1
        while True:
            try:
                return step(attempt)
            except TransferError as err:
                if attempt >= self.attempts or not err.retryable:
                    raise
                wait = self.backoff_s * 2 ** (attempt - 1)
                attempt += 1
                logger.warning("job %s %s: %s failed (%s); try %d of %d in %.1f s", self.job_id, name, what,
                               redact(str(err)), attempt, self.attempts, wait)
                time.sleep(wait)

    def _convert_series(self, ref: SeriesRef, scratch: Path, redact: Redactor, name: str) -> tuple[str, str]:
        """Fetch, read, translate, write and deliver one series; returns the synthetic series' UID and
        its std map's ('' without ``std_series``)."""
        files = self.retry(lambda attempt: self.source.fetch(ref, scratch / f"source-{attempt}"), "fetch", redact,
                           name)
        # know the patient's name before any message could quote a file named after it; an
        # unreadable file is reported by the reader just below
        with quiet_pydicom(), contextlib.suppress(Exception):
            redact.hide_header(pydicom.dcmread(files[0], stop_before_pixels=True))
        info = scan_dicom_series(
            files, SeriesSelection(series_uid=ref.series_uid), expected_modality=self.translator.source_modality,
            uid_hash=redact.uid,
        )
        volume = read_dicom_series(info)
        if self.std_series:
            synthetic_hu, std_hu = self.translator.translate_with_std(volume, name)
        else:
            synthetic_hu, std_hu = self.translator.translate(volume, name), None
        model = (self.translator.model_name, self.translator.model_version)
        series = [write_derived_ct_series(synthetic_hu, info, scratch / "synthetic", *model)]
        if std_hu is not None:
            series.append(write_derived_ct_series(std_hu, info, scratch / "std", *model,
                                                  std_of_samples=self.translator.num_samples))
        # the synthetic CT first, then its std map: the journal says done only when both are held
        uids = [self._deliver_series(written, redact, name) for written in series]
        return uids[0], uids[1] if std_hu is not None else ""

    def _deliver_series(self, written: list[Path], redact: Redactor, name: str) -> str:
        """Deliver one written series, retried; returns its UID."""
        with quiet_pydicom():
            header = pydicom.dcmread(written[0], stop_before_pixels=True)
        output_uid, study_uid = str(header.SeriesInstanceUID), str(header.StudyInstanceUID)
        self.retry(lambda attempt: self._deliver(written, study_uid, output_uid), "delivery", redact, name)
        return output_uid

    def _deliver(self, files: list[Path], study_uid: str, series_uid: str) -> None:
        """Deliver a series and check that the destination holds all of it (``IncompleteSeriesError`` if not)."""
        self.destination.deliver(files, series_uid)
        stored = self.destination.count(study_uid, series_uid)
        if stored != len(files):
            withdrawn = self.destination.withdraw(series_uid)
            raise IncompleteSeriesError(
                f"incomplete at the destination: it holds {stored} of the {len(files)} instances sent; "
                + ("the partial series was withdrawn" if withdrawn else
                   "the partial series stays there until a rerun completes it (or its administrator withdraws it)"),
                series_uid,
            )


class LocalEngine:
    """Convert the series one after the other in this process (the default engine)."""

    description = "local"

    def run(self, conversion: SeriesConversion, jobs: list[tuple[SeriesRef, str]], redact: Redactor,
            start: Callable[[SeriesRef], None], work: Path) -> Iterator[tuple[SeriesRef, str, Outcome]]:
        """Yield ``(ref, name, outcome)`` per job; ``start(ref)`` is called just before each one runs."""
        for ref, name in jobs:
            start(ref)
            yield ref, name, conversion(ref, redact, name, work / name.replace(":", "-"))


class BatchConverter:
    """Convert the series of ``source`` that match ``rules`` into synthetic CT series at ``destination``.

    Args:
        source / destination: endpoints (``drdd_med.pacs.endpoints.open_source`` / ``open_destination``).
        translator: the model (``BundleTranslator``).
        journal_path: the SQLite job journal; its folder also holds the run's scratch space
            (``JOURNAL.work``, emptied at the start of every run: a killed run leaves data only there).
        rules: which series to convert (default: the model's source modality).
        attempts: tries per transfer step (fetch, deliver) before the series is recorded as failed.
        backoff_s: wait before the second try; doubled before each further one.
        retry_failed: also redo series whose input was refused in an earlier run.
        progress: show a progress bar (on stderr, when it is a terminal).
        engine: where the series are converted: ``LocalEngine()`` (default, one after the other here)
            or ``drdd_med.pacs.ray_engine.RayEngine`` (Ray tasks on a cluster). The journal stays with
            this process either way.
        std_series: also deliver, per series, the std map of the translator's samples (its
            ``num_samples`` must be more than 1) as a second derived series. A series journalled done
            without one is redone (its synthetic CT resent unchanged) by a run that asks for it.
    """

    def __init__(
        self,
        source,
        destination,
        translator: BundleTranslator,
        journal_path: str | os.PathLike,
        *,
        rules: SeriesRules | None = None,
        attempts: int = 3,
        backoff_s: float = 2.0,
        retry_failed: bool = False,
        progress: bool = True,
        engine=None,
        std_series: bool = False,
    ):
        self.job_id = uuid.uuid4().hex[:8]
        self.conversion = SeriesConversion(source, destination, translator, attempts=attempts, backoff_s=backoff_s,
                                           job_id=self.job_id, std_series=std_series)
        self.source, self.destination, self.translator = source, destination, translator
        self.journal_path = Path(journal_path)
        self.rules = rules or SeriesRules(modality=translator.source_modality)
        self.retry_failed, self.progress = retry_failed, progress
        self.engine = engine or LocalEngine()

    def run(self) -> Report:
        """Convert every matching series not converted yet; ``TransferError`` if the source cannot be queried."""
        started = time.monotonic()
        report = Report(
            job_id=self.job_id,
            model=self.translator.model_id,
            source=self.source.description,
            destination=self.destination.description,
            started=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        )
        journal = Journal(self.journal_path, self.translator.model_id, self.destination.key, self.job_id)
        # log lines go above the progress bar, and every one of them through the redactor
        with journal, logging_redirect_tqdm():
            redact = Redactor(journal.secret_key())
            redact.hide([str(self.journal_path.resolve().parent), *self.source.private, *self.destination.private])
            work = self.journal_path.with_name(self.journal_path.name + ".work")
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir(parents=True)
            try:
                with redacted_logging(redact):
                    logger.info("job %s: model %s, source %s, destination %s, engine %s", self.job_id, report.model,
                                report.source, report.destination, self.engine.description)
                    try:
                        refs = self.conversion.retry(lambda attempt: self.source.find(self.rules), "query", redact)
                    except TransferError as err:
                        raise TransferError(redact(str(err))) from None
                    logger.info("job %s: %d series match the selection", self.job_id, len(refs))
                    self._convert_all(refs, journal, redact, work, report)
            finally:
                shutil.rmtree(work, ignore_errors=True)
        report.duration_s = round(time.monotonic() - started, 3)
        counts = report.counts
        logger.info(
            "job %s: %d converted, %d skipped, %d failed in %.1f s (%.2f series/min)",
            self.job_id, counts["converted"], counts["skipped"], counts["failed"], report.duration_s,
            report.series_per_minute,
        )
        return report

    def _convert_all(self, refs: list[SeriesRef], journal: Journal, redact: Redactor, work: Path,
                     report: Report) -> None:
        """Skip what the journal says is done (or refused), convert the rest with the engine, journal each end."""
        bar = tqdm(total=len(refs), desc=f"job {self.job_id}", unit="series", disable=None if self.progress else True)
        results, jobs, counts = {}, [], Counter()
        for ref in refs:
            name = redact.uid(ref.series_uid, "series")
            result = SeriesResult(name, redact.uid(ref.study_uid, "study"), ref.modality, ref.series_number, "skipped")
            results[ref.series_uid] = result
            entry = journal.get(ref.series_uid)
            if entry is not None and entry.finished(self.conversion.std_series):
                result.reason, result.output_series = "converted earlier", redact.uid(entry.output_series_uid, "series")
                result.std_series = redact.uid(entry.std_series_uid, "series") if entry.std_series_uid else ""
                logger.info("job %s %s: skipped, converted earlier", self.job_id, name)
            elif entry is not None and entry.status == "failed" and entry.permanent and not self.retry_failed:
                result.reason = f"refused earlier: {entry.reason}"
                logger.info("job %s %s: skipped, its input was refused earlier", self.job_id, name)
            else:
                result.attempts = (entry.attempts if entry else 0) + 1
                jobs.append((ref, name))
                continue
            counts["skipped"] += 1
            bar.update()
        for ref, name, outcome in self.engine.run(self.conversion, jobs, redact,
                                                  lambda ref: journal.start(ref.series_uid), work):
            self._record(results[ref.series_uid], ref, outcome, journal, redact)
            counts[results[ref.series_uid].status] += 1
            bar.update()
            bar.set_postfix(counts, refresh=False)
        bar.close()
        report.series.extend(results[ref.series_uid] for ref in refs)

    def _record(self, result: SeriesResult, ref: SeriesRef, outcome: Outcome, journal: Journal,
                redact: Redactor) -> None:
        """Put how a series ended in its report row and the journal, and log it."""
        result.duration_s = outcome.duration_s
        if outcome.output_uid:
            result.status, result.output_series = "converted", redact.uid(outcome.output_uid, "series")
            result.std_series = redact.uid(outcome.std_uid, "series") if outcome.std_uid else ""
            journal.finish(ref.series_uid, outcome.output_uid, outcome.duration_s, std_series_uid=outcome.std_uid)
            logger.info("job %s %s: converted in %.1f s", self.job_id, result.series, outcome.duration_s)
            return
        result.status, result.reason = "failed", outcome.reason
        result.output_series = redact.uid(outcome.partial_uid, "series") if outcome.partial_uid else ""
        journal.fail(ref.series_uid, outcome.reason, outcome.permanent, outcome.duration_s,
                     output_series_uid=outcome.partial_uid)
        logger.error("job %s %s: failed (%s): %s", self.job_id, result.series,
                     "input refused" if outcome.permanent else "error", outcome.reason)
