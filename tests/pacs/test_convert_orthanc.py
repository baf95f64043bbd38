"""``drdd-med convert`` against a real Orthanc (DIMSE and DICOMweb), crash-restart, and PACS failures."""

from __future__ import annotations

import json
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from pacs_helpers import (
    CLIENT_AET,
    DROPPED_PATIENT_ID,
    PHI_STRINGS,
    REFUSED_PATIENT_ID,
    ROOT,
    StubTranslator,
    check_synthetic_series,
    free_ports,
    model_args,
    write_demo_study,
    write_refused_series,
)

from drdd_med.cli import main
from drdd_med.pacs.convert import BatchConverter
from drdd_med.pacs.dicomweb import DicomwebSource
from drdd_med.pacs.dimse import DimseNode, DimseSource
from drdd_med.pacs.endpoints import FolderSource, SeriesRules, open_destination

pytestmark = pytest.mark.slow


def convert(args: list[str], capsys) -> tuple[int, dict, str]:
    """Run the CLI in-process; returns the exit code, the JSON report (None if none) and everything printed."""
    report = Path(args[args.index("--journal") + 1]).with_name(f"report-{time.monotonic_ns()}")
    code = main(["-v", "convert", *args, "--report", str(report), "--backoff", "0.01", "--no-progress"])
    out = capsys.readouterr()
    report = report.with_name(report.name + ".json")
    return code, json.loads(report.read_text()) if report.exists() else None, out.out + out.err


def upload_studies(orthanc, root: Path, seeds, **attributes) -> dict[int, list[Path]]:
    studies = {seed: write_demo_study(root, seed, **attributes)[0] for seed in seeds}
    for files in studies.values():
        orthanc.upload(files)
    return studies


def synthetic_series_back(orthanc, tmp_path: Path, via: str) -> dict[str, list[Path]]:
    """Query the synthetic CT series back from Orthanc (C-FIND + C-GET, or QIDO-RS + WADO-RS), by source series."""
    if via == "dimse":
        source = DimseSource(DimseNode.parse(orthanc.dimse), calling_aet=CLIENT_AET)
    else:
        source = DicomwebSource(orthanc.dicomweb, auth=orthanc.session.auth)
    found = {}
    for index, ref in enumerate(source.find(SeriesRules(modality="CT"))):
        files = source.fetch(ref, tmp_path / f"back-{via}-{index}")
        found[referenced_series(files[0])] = sorted(files)
    source.close()
    return found


def referenced_series(file: Path) -> str:
    import pydicom

    return str(pydicom.dcmread(file, stop_before_pixels=True).ReferencedSeriesSequence[0].SeriesInstanceUID)


def series_uid(file: Path) -> str:
    import pydicom

    return str(pydicom.dcmread(file, stop_before_pixels=True).SeriesInstanceUID)


def assert_no_phi(text: str, *paths: Path) -> None:
    for secret in (*PHI_STRINGS, *map(str, paths)):
        assert secret not in text, secret


@pytest.mark.parametrize("retrieve", ["get", "move"])
def test_dimse_round_trip_with_rerun(tmp_path, orthanc, tiny_model, nifti_reference, retrieve, capsys, caplog):
    caplog.set_level(logging.DEBUG)
    studies = upload_studies(orthanc, tmp_path / "upload", seeds=(1, 2))
    orthanc.upload(write_refused_series(tmp_path / "upload")["tilt"].iterdir())
    args = [orthanc.dimse, orthanc.dimse, *model_args(tiny_model), "--calling-aet", CLIENT_AET,
            "--retrieve", retrieve, "--move-port", str(orthanc.client_port), "--journal", str(tmp_path / "j.sqlite")]
    code, report, printed = convert(args, capsys)
    assert code == 1 and report["counts"] == {"converted": 2, "skipped": 0, "failed": 1}
    assert "gantry tilt" in next(row["reason"] for row in report["series"] if row["status"] == "failed")

    back = synthetic_series_back(orthanc, tmp_path, "dimse")
    assert len(back) == 2
    for seed, files in studies.items():
        check_synthetic_series(back[series_uid(files[0])], files, nifti_reference(seed))
    import pynetdicom

    assert not pynetdicom._config.LOG_REQUEST_IDENTIFIERS and not pynetdicom._config.LOG_RESPONSE_IDENTIFIERS
    assert_no_phi(printed + caplog.text, tmp_path)

    instances = orthanc.count("instances")
    code, report, _ = convert(args, capsys)
    assert code == 0 and report["counts"] == {"converted": 0, "skipped": 3, "failed": 0}
    assert orthanc.count("instances") == instances  # a rerun adds nothing


def test_dicomweb_round_trip(tmp_path, orthanc, tiny_model, nifti_reference, capsys, caplog, monkeypatch):
    caplog.set_level(logging.DEBUG)
    studies = upload_studies(orthanc, tmp_path / "upload", seeds=(3,))
    monkeypatch.setenv("DRDD_DICOMWEB_USER", orthanc.session.auth[0])
    monkeypatch.setenv("DRDD_DICOMWEB_PASSWORD", orthanc.session.auth[1])
    args = [orthanc.dicomweb, orthanc.dicomweb, *model_args(tiny_model), "--journal", str(tmp_path / "j.sqlite")]
    code, report, printed = convert(args, capsys)
    assert code == 0 and report["counts"] == {"converted": 1, "skipped": 0, "failed": 0}
    assert report["source"] == report["destination"] == f"DICOMweb {orthanc.dicomweb}"
    back = synthetic_series_back(orthanc, tmp_path, "dicomweb")
    check_synthetic_series(back[series_uid(studies[3][0])], studies[3], nifti_reference(3))
    assert_no_phi(printed + caplog.text, tmp_path)

    monkeypatch.setenv("DRDD_DICOMWEB_PASSWORD", "wrong")
    code, report, printed = convert([*args[:-1], str(tmp_path / "other.sqlite")], capsys)
    assert code == 1 and "QIDO-RS: HTTP 401 Unauthorized" in printed  # checked status, no traceback


def journal_done(path: Path) -> int:
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=0.1) as db:
            return db.execute("SELECT COUNT(*) FROM series WHERE status = 'done'").fetchone()[0]
    except sqlite3.OperationalError:  # not created yet, or locked for a moment
        return 0


def test_run_killed_after_first_series_restarts_without_duplicates(tmp_path, orthanc, tiny_model, capsys):
    upload_studies(orthanc, tmp_path / "upload", seeds=(1, 2, 3, 4))
    journal = tmp_path / "j.sqlite"
    args = [orthanc.dimse, orthanc.dimse, *model_args(tiny_model), "--calling-aet", CLIENT_AET,
            "--journal", str(journal)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "PYTHONWARNINGS": "ignore"}
    with open(tmp_path / "killed.log", "w") as log:
        process = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "pacs_batch_convert.py"), *args,
                                    "--no-progress"], stdout=log, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 300
    while journal_done(journal) < 1:
        assert process.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "no series finished in 300 s"
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    done_at_kill = journal_done(journal)
    assert 1 <= done_at_kill < 4, "the run should have been killed in the middle"
    assert_no_phi((tmp_path / "killed.log").read_text(), tmp_path)

    code, report, _ = convert(args, capsys)
    assert code == 0
    assert report["counts"] == {"converted": 4 - done_at_kill, "skipped": done_at_kill, "failed": 0}
    synthetic = DimseSource(DimseNode.parse(orthanc.dimse), calling_aet=CLIENT_AET).find(SeriesRules(modality="CT"))
    assert len(synthetic) == 4 and {ref.num_instances for ref in synthetic} == {8}  # one whole series per source


def test_rejected_ae_title_and_failure_status_fail_their_series_only(tmp_path, orthanc, tiny_model, capsys, caplog,
                                                                       monkeypatch):
    folder = tmp_path / "incoming"
    write_demo_study(folder, seed=1)
    write_demo_study(folder, seed=2, patient_id=REFUSED_PATIENT_ID)  # the PACS answers 0xA700 to its CT
    common = [str(folder), orthanc.dimse, *model_args(tiny_model)]

    code, report, _ = convert([*common, "--calling-aet", "STRANGER", "--journal", str(tmp_path / "a.sqlite")], capsys)
    assert code == 1 and report["counts"] == {"converted": 0, "skipped": 0, "failed": 2}
    assert all("association rejected" in row["reason"] and "STRANGER" in row["reason"] for row in report["series"])
    assert "Rejected Permanent" in report["series"][0]["reason"] and "delivery failed" not in caplog.text  # no retry
    assert orthanc.count("series") == 0

    code, report, _ = convert([*common, "--calling-aet", CLIENT_AET, "--journal", str(tmp_path / "b.sqlite")], capsys)
    assert code == 1 and report["counts"] == {"converted": 1, "skipped": 0, "failed": 1}
    assert "C-STORE of instance 1 of 8: status 0xA700" in next(
        row["reason"] for row in report["series"] if row["status"] == "failed")

    monkeypatch.setenv("DRDD_DICOMWEB_USER", orthanc.session.auth[0])
    monkeypatch.setenv("DRDD_DICOMWEB_PASSWORD", orthanc.session.auth[1])
    code, report, _ = convert([str(folder), orthanc.dicomweb, *model_args(tiny_model),
                               "--journal", str(tmp_path / "c.sqlite")], capsys)
    assert code == 1 and report["counts"] == {"converted": 1, "skipped": 0, "failed": 1}
    assert "STOW-RS: 0 of 8 instances stored" in next(
        row["reason"] for row in report["series"] if row["status"] == "failed")


class DroppingStoreSCP:
    """A storage SCP that aborts the first ``drops`` associations after receiving two instances.

    It answers image-level C-FIND with the instances it stored, as the converter checks them.
    """

    def __init__(self, port: int, drops: int):
        from pynetdicom import AE, evt
        from pynetdicom.sop_class import CTImageStorage, StudyRootQueryRetrieveInformationModelFind

        self.drops, self.associations, self.stored = drops, 0, {}
        self._received: dict[int, int] = {}
        self._lock = threading.Lock()
        ae = AE(ae_title="FLAKY")
        ae.add_supported_context(CTImageStorage)
        ae.add_supported_context(StudyRootQueryRetrieveInformationModelFind)
        handlers = [(evt.EVT_ACCEPTED, self._accepted), (evt.EVT_C_STORE, self._store), (evt.EVT_C_FIND, self._find)]
        self.server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=handlers)

    def _accepted(self, event) -> None:
        with self._lock:
            self.associations += 1
            self._received[id(event.assoc)] = 0

    def _store(self, event) -> int:
        with self._lock:
            self._received[id(event.assoc)] += 1
            if self.associations <= self.drops and self._received[id(event.assoc)] == 3:
                event.assoc.abort()
                return 0xA700
            self.stored[event.request.AffectedSOPInstanceUID] = event.dataset.SeriesInstanceUID
        return 0x0000

    def _find(self, event):
        from pydicom.dataset import Dataset

        with self._lock:
            matches = [sop for sop, series in self.stored.items() if series == event.identifier.SeriesInstanceUID]
        for sop in matches:
            match = Dataset()
            match.QueryRetrieveLevel, match.SOPInstanceUID = "IMAGE", sop
            yield 0xFF00, match


def test_association_dropped_mid_transfer_is_retried_then_reported(tmp_path, tiny_model, capsys):
    folder = tmp_path / "incoming"
    write_demo_study(folder, seed=1)
    port = free_ports(1)[0]
    flaky = DroppingStoreSCP(port, drops=1)
    try:
        common = [str(folder), f"dimse://FLAKY@127.0.0.1:{port}", *model_args(tiny_model)]
        code, report, _ = convert([*common, "--journal", str(tmp_path / "a.sqlite")], capsys)
        assert code == 0 and report["counts"]["converted"] == 1
        assert flaky.associations == 3  # dropped once, then sent whole on the second, then counted by C-FIND
        assert len(flaky.stored) == 8 and len(set(flaky.stored.values())) == 1

        flaky.drops = 99
        code, report, _ = convert([*common, "--journal", str(tmp_path / "b.sqlite")], capsys)
        assert code == 1 and report["counts"]["failed"] == 1
        assert "no response after 2 of 8 instances" in report["series"][0]["reason"]
        assert len(flaky.stored) == 8  # the same deterministic instances, never a second series
    finally:
        flaky.server.shutdown()



def stub_run(folder: Path, destination: str, journal: Path, attempts: int = 1, **options):
    """A batch run with the stub model (these tests check transfers, not images); returns the report."""
    converter = BatchConverter(FolderSource(folder), open_destination(destination, **options), StubTranslator(),
                               journal, attempts=attempts, backoff_s=5.0, progress=False)
    try:
        return converter.run()
    finally:
        converter.destination.close()


def test_permanent_rejection_is_not_retried_and_names_the_rejected_ae_title(tmp_path, orthanc, caplog):
    write_demo_study(tmp_path / "incoming", seed=1)
    node = DimseNode.parse(orthanc.dimse)
    cases = {  # destination, our AE title, the hint expected
        "called": (f"dimse://NOT-ORTHANC@127.0.0.1:{node.port}", CLIENT_AET,
                   "is NOT-ORTHANC the PACS's own AE title (the called AE title)?"),
        "calling": (orthanc.dimse, "STRANGER", "is our AE title STRANGER registered there?"),
    }
    for case, (destination, calling_aet, hint) in cases.items():
        caplog.clear()
        started = time.monotonic()
        report = stub_run(tmp_path / "incoming", destination, tmp_path / f"{case}.sqlite", attempts=3,
                          calling_aet=calling_aet)
        assert time.monotonic() - started < 5.0, "retried after a permanent rejection (5 s backoff)"
        (row,) = report.series
        assert row.status == "failed" and "Rejected Permanent" in row.reason and hint in row.reason, row.reason
        assert ("called AE title" in row.reason) == (case == "called"), row.reason
        assert "delivery failed" not in caplog.text
    assert orthanc.count("series") == 0

    report = stub_run(tmp_path / "incoming", orthanc.dimse, tmp_path / "calling.sqlite", calling_aet=CLIENT_AET)
    assert report.counts["converted"] == 1  # the AE title fixed, the next run converts it


@pytest.mark.parametrize("transport", ["dimse", "dicomweb"])
def test_instance_dropped_by_the_pacs_marks_the_series_incomplete_and_a_rerun_redoes_it_once(
    tmp_path, orthanc, transport
):
    write_demo_study(tmp_path / "incoming", seed=1, patient_id=DROPPED_PATIENT_ID)  # instance 3 of its CT dropped
    write_demo_study(tmp_path / "incoming", seed=2)
    destination = orthanc.dimse if transport == "dimse" else orthanc.dicomweb
    options = {"calling_aet": CLIENT_AET} if transport == "dimse" else {"auth": orthanc.session.auth}
    journal = tmp_path / "j.sqlite"

    report = stub_run(tmp_path / "incoming", destination, journal, **options)
    assert report.counts == {"converted": 1, "skipped": 0, "failed": 1}
    failed = next(row for row in report.series if row.status == "failed")
    assert "incomplete at the destination: it holds 7 of the 8 instances sent" in failed.reason, failed.reason
    assert failed.output_series.startswith("series:")  # the partial series, by the keyed hash of its UID
    assert orthanc.count("series") == 2 and orthanc.count("instances") == 8 + 7
    with sqlite3.connect(journal) as db:  # the journal keeps the partial series' UID, to withdraw or redo
        (partial,) = db.execute("SELECT output_series_uid FROM series WHERE status = 'failed'").fetchone()
    assert partial and not any(partial in text for text in (failed.reason, failed.output_series))

    orthanc.drop_instance("")  # the PACS keeps everything again
    report = stub_run(tmp_path / "incoming", destination, journal, **options)
    assert report.counts == {"converted": 1, "skipped": 1, "failed": 0}
    redone = next(row for row in report.series if row.status == "converted")
    assert redone.attempts == 2 and redone.series == failed.series
    assert orthanc.count("series") == 2 and orthanc.count("instances") == 8 + 8  # completed, nothing twice
