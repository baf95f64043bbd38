"""``drdd-med convert`` between folders: values, per-series failures, reruns, reports and PHI-free logs."""

from __future__ import annotations

import csv
import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pacs_helpers import (
    BUNDLE_VERSION,
    PATIENT,
    PHI_STRINGS,
    StubTranslator,
    check_synthetic_series,
    model_args,
    write_demo_study,
    write_refused_series,
)

from drdd_med.cli import main
from drdd_med.data.dicom import list_dicom_series, read_dicom_series, scan_dicom_series
from drdd_med.pacs.convert import BatchConverter
from drdd_med.pacs.endpoints import FolderDestination, FolderSource, series_part
from drdd_med.pacs.demo import volume_to_dicom_series


@pytest.fixture
def hospital_folder(tmp_path) -> dict:
    """Two good MR studies, three refused MR series, a CT series (not selected) and a stray text file."""
    root = tmp_path / "incoming"
    good = {seed: write_demo_study(root, seed)[0] for seed in (1, 2)}
    refused = write_refused_series(root)
    volume_to_dicom_series(np.zeros((4, 4, 2)), np.eye(4), root / "Zzyzx_Quuxley" / "ct", modality="CT", **PATIENT)
    (root / "README.txt").write_text("exported by the PACS on request of Zzyzx^Quuxley")
    return {"root": root, "good": good, "refused": refused}


def convert(args: list[str], capsys) -> tuple[int, str]:
    code = main(["-v", "convert", *args])
    out = capsys.readouterr()
    return code, out.out + out.err


def series_uid(file: Path) -> str:
    return str(pydicom.dcmread(file, stop_before_pixels=True).SeriesInstanceUID)


def referenced_series(folder: Path) -> str:
    """The source series a synthetic series folder references."""
    ds = pydicom.dcmread(next(folder.iterdir()), stop_before_pixels=True)
    return str(ds.ReferencedSeriesSequence[0].SeriesInstanceUID)


def read_report(prefix: Path) -> tuple[dict, list[dict]]:
    summary = json.loads(prefix.with_name(prefix.name + ".json").read_text())
    with open(prefix.with_name(prefix.name + ".csv"), newline="") as handle:
        return summary, list(csv.DictReader(handle))


def test_folder_run_converts_good_series_reports_refused_ones_and_logs_no_patient_data(
    tmp_path, hospital_folder, tiny_model, nifti_reference, capsys, caplog
):
    caplog.set_level(logging.DEBUG)
    out, runs = tmp_path / "synthetic", tmp_path / "runs"
    code, printed = convert([str(hospital_folder["root"]), str(out), *model_args(tiny_model),
                             "--journal", str(runs / "journal.sqlite"), "--report", str(runs / "first")], capsys)
    assert code == 1  # some series failed, the batch went on

    summary, rows = read_report(runs / "first")
    assert summary["counts"] == {"converted": 2, "skipped": 0, "failed": 3}
    assert len(rows) == 5 and summary["model"].startswith(f"drdd_mr2ct {BUNDLE_VERSION}+")
    reasons = " | ".join(row["reason"] for row in rows if row["status"] == "failed")
    for expected in ("no CT, MR or PET DICOM images found (1 not a CT, MR or PET image)",
                     "sheared slice stack (gantry tilt", "uneven slice spacing", "missing slices?"):
        assert expected in reasons
    assert all(float(row["duration_s"]) > 0 and row["series"].startswith("series:") for row in rows)

    written = {referenced_series(folder): sorted(folder.iterdir()) for folder in out.iterdir()}
    assert len(written) == 2
    for seed, source_files in hospital_folder["good"].items():
        check_synthetic_series(written[series_uid(source_files[0])], source_files, nifti_reference(seed))

    log = printed + caplog.text + (runs / "first.csv").read_text() + (runs / "first.json").read_text()
    assert "converted in" in log and "job " in log
    for secret in (*PHI_STRINGS, str(hospital_folder["root"]), str(tmp_path)):
        assert secret not in log, secret
    for source_files in hospital_folder["good"].values():  # UIDs appear only as keyed hashes
        assert series_uid(source_files[0]) not in log
    for summary in list_dicom_series(hospital_folder["root"]):  # nor as the reader's unkeyed hash
        assert hashlib.sha256(summary.series_uid.encode()).hexdigest()[:8] not in log, summary.description
    for row in rows:  # the reader names a refused series by the keyed hash of its report row
        if "slice" in row["reason"]:
            assert f"#{row['series'].removeprefix('series:')})" in row["reason"], row["reason"]


def test_rerun_adds_nothing_and_refused_input_is_retried_only_on_request(tmp_path, hospital_folder, tiny_model,
                                                                          capsys):
    out, journal = tmp_path / "synthetic", tmp_path / "runs" / "journal.sqlite"
    common = [str(hospital_folder["root"]), str(out), *model_args(tiny_model), "--journal", str(journal)]
    assert convert([*common, "--report", str(tmp_path / "runs" / "first")], capsys)[0] == 1
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*")}

    code, _ = convert([*common, "--report", str(tmp_path / "runs" / "again")], capsys)
    summary, rows = read_report(tmp_path / "runs" / "again")
    assert code == 0 and summary["counts"] == {"converted": 0, "skipped": 5, "failed": 0}
    assert sorted(row["reason"].split(":")[0] for row in rows) == ["converted earlier"] * 2 + ["refused earlier"] * 3
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == stamps  # nothing rewritten, nothing added

    code, _ = convert([*common, "--retry-failed", "--report", str(tmp_path / "runs" / "retry")], capsys)
    summary, rows = read_report(tmp_path / "runs" / "retry")
    assert code == 1 and summary["counts"] == {"converted": 0, "skipped": 2, "failed": 3}
    assert {row["attempts"] for row in rows if row["status"] == "failed"} == {"2"}


def test_selection_rules_and_usage_errors(tmp_path, hospital_folder, tiny_model, capsys):
    out, journal = tmp_path / "synthetic", tmp_path / "journal.sqlite"
    common = [str(hospital_folder["root"]), str(out), *model_args(tiny_model), "--journal", str(journal)]
    code, _ = convert([*common, "--description", "^t1 ax", "--report", str(tmp_path / "t1")], capsys)
    summary, _ = read_report(tmp_path / "t1")  # the demo series, one of them with a slice missing
    assert code == 1 and summary["counts"] == {"converted": 2, "skipped": 0, "failed": 1}
    code, _ = convert([*common, "--date-to", "20240102", "--report", str(tmp_path / "old")], capsys)
    summary, _ = read_report(tmp_path / "old")  # only the spectroscopy object is that old
    assert code == 1 and summary["counts"] == {"converted": 0, "skipped": 0, "failed": 1}

    code, printed = convert([*common, "--date-from", "2024-01-01"], capsys)
    assert code == 2 and "YYYYMMDD" in printed
    code, printed = convert([str(tmp_path / "nowhere"), str(out), *model_args(tiny_model)], capsys)
    assert code == 2 and "source folder does not exist" in printed
    with pytest.raises(SystemExit) as exit_info:
        main(["convert", "--help"])
    assert exit_info.value.code == 0 and "exactly once" in capsys.readouterr().out


class DroppingFolderDestination(FolderDestination):
    """A destination that silently keeps all but the last instance of the first ``drops`` series it is given."""

    def __init__(self, root, drops: int):
        super().__init__(root)
        self.drops = drops

    def deliver(self, files, series_uid: str) -> None:
        self.drops -= 1
        super().deliver(files[:-1] if self.drops >= 0 else files, series_uid)


def test_series_incomplete_at_the_destination_is_withdrawn_failed_and_redone_once(tmp_path):
    for seed in (1, 2):
        write_demo_study(tmp_path / "incoming", seed)
    out, journal = tmp_path / "synthetic", tmp_path / "j.sqlite"

    def run(drops: int):
        return BatchConverter(FolderSource(tmp_path / "incoming"), DroppingFolderDestination(out, drops),
                              StubTranslator(), journal, attempts=1, progress=False).run()

    report = run(drops=1)
    assert report.counts == {"converted": 1, "skipped": 0, "failed": 1}
    failed = next(row for row in report.series if row.status == "failed")
    assert failed.reason == ("incomplete at the destination: it holds 7 of the 8 instances sent; "
                             "the partial series was withdrawn")
    assert [len(list(folder.iterdir())) for folder in out.iterdir()] == [8]  # the partial series is gone

    report = run(drops=0)
    assert report.counts == {"converted": 1, "skipped": 1, "failed": 0}
    redone = next(row for row in report.series if row.status == "converted")
    assert redone.series == failed.series and redone.attempts == 2
    assert sorted(len(list(folder.iterdir())) for folder in out.iterdir()) == [8, 8]


def test_parts_convert_every_series_exactly_once_between_them(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("drdd_med.bundle.BundleTranslator", lambda *args, **kwargs: StubTranslator())
    root, out, journal = tmp_path / "incoming", tmp_path / "synthetic", tmp_path / "runs" / "j.sqlite"
    sources = {series_uid(write_demo_study(root, seed)[0][0]) for seed in range(5, 9)}  # two in each part
    common = [str(root), str(out), "--journal", str(journal), "--num-parts", "2", "--no-progress"]

    converted: dict[int, set[str]] = {}
    for part in (1, 0):  # any order, as a scheduler starts them
        before = set(out.iterdir()) if out.exists() else set()
        code, _ = convert([*common, "--part-id", str(part)], capsys)
        assert code == 0
        converted[part] = {referenced_series(folder) for folder in set(out.iterdir()) - before}
        assert converted[part] == {uid for uid in sources if series_part(uid, 2) == part}
    assert converted[0] and converted[1] and not converted[0] & converted[1]
    assert converted[0] | converted[1] == sources
    assert sorted(p.name for p in journal.parent.glob("*.sqlite")) == ["j.part0-of-2.sqlite", "j.part1-of-2.sqlite"]
    assert all(len(list(folder.iterdir())) == 8 for folder in out.iterdir())

    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    code, _ = convert([*common, "--part-id", "0"], capsys)  # a part rerun (a requeued job) adds nothing
    assert code == 0 and {p: p.stat().st_mtime_ns for p in out.rglob("*")} == stamps

    code, printed = convert([*common, "--part-id", "2"], capsys)
    assert code == 2 and "part_id must be 0 .. num_parts - 1" in printed


class SampledStubTranslator(StubTranslator):
    """The stub model with two samples per volume: mean = source - 1000, std = |source| / 7 + 0.25 HU."""

    num_samples, model_version, model_id = 2, "1.mean2", "stub 1.mean2"

    def translate_with_std(self, volume, name: str = "case") -> tuple[np.ndarray, np.ndarray]:
        volume = np.asarray(volume, dtype=np.float32)
        return self.translate(volume, name), np.abs(volume) / 7 + 0.25


class CrashingFolderDestination(FolderDestination):
    """A destination whose process is killed (``SystemExit``, not caught per series) at the ``crash_at``-th delivery."""

    def __init__(self, root, crash_at: int):
        super().__init__(root)
        self.deliveries, self.crash_at = 0, crash_at

    def deliver(self, files, series_uid: str) -> None:
        self.deliveries += 1
        if self.deliveries == self.crash_at:
            raise SystemExit("killed")
        super().deliver(files, series_uid)


def series_folders(out: Path) -> dict[str, list[Path]]:
    """SeriesDescription -> the folders at the destination that hold a series of that description."""
    found: dict[str, list[Path]] = {}
    for folder in sorted(out.iterdir()):
        found.setdefault(str(pydicom.dcmread(next(folder.iterdir())).SeriesDescription), []).append(folder)
    return found


def test_std_series_is_a_second_derived_series_and_a_crash_between_the_two_leaves_one_of_each(tmp_path):
    source_files, _ = write_demo_study(tmp_path / "incoming", 3)
    out, journal = tmp_path / "synthetic", tmp_path / "j.sqlite"

    def run(destination, std_series=True):
        return BatchConverter(FolderSource(tmp_path / "incoming"), destination, SampledStubTranslator(), journal,
                              attempts=1, progress=False, std_series=std_series).run()

    with pytest.raises(SystemExit):  # killed after the synthetic CT was delivered, before its std map
        run(CrashingFolderDestination(out, crash_at=2))
    assert len(list(out.iterdir())) == 1

    report = run(FolderDestination(out))
    assert report.counts == {"converted": 1, "skipped": 0, "failed": 0}
    found = series_folders(out)
    std_description = "SYNTHETIC CT UNCERTAINTY (std over 2 samples, HU)"
    assert sorted(found) == sorted([std_description, "SYNTHETIC CT stub 1.mean2"])
    assert all(len(folders) == 1 for folders in found.values())  # one of each, the first one not duplicated
    (sct_folder,), (std_folder,) = found["SYNTHETIC CT stub 1.mean2"], found[std_description]
    sct_files, std_files = sorted(sct_folder.iterdir()), sorted(std_folder.iterdir())
    source = read_dicom_series(source_files[0].parent).numpy()
    check_synthetic_series(sct_files, source_files, source - 1000)
    sct_info, std_info = scan_dicom_series(sct_files), scan_dicom_series(std_files)
    assert sct_info.series_uid != std_info.series_uid and std_info.shape == sct_info.shape
    np.testing.assert_array_equal(std_info.affine, sct_info.affine)
    sct_headers, std_headers = ([pydicom.dcmread(f, stop_before_pixels=True) for f in files]
                                for files in (sct_files, std_files))
    assert not {h.SOPInstanceUID for h in sct_headers} & {h.SOPInstanceUID for h in std_headers}
    assert {h.StudyInstanceUID for h in std_headers} == {h.StudyInstanceUID for h in sct_headers}
    assert {h.FrameOfReferenceUID for h in std_headers} == {h.FrameOfReferenceUID for h in sct_headers}
    assert "standard deviation in HU over 2 samples" in std_headers[0].DerivationDescription
    np.testing.assert_allclose(read_dicom_series(std_info).numpy(), np.abs(source) / 7 + 0.25, atol=0.05 + 1e-6)
    row = report.series[0]
    assert row.output_series and row.std_series and row.output_series != row.std_series

    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    report = run(FolderDestination(out))  # a finished series with its std map: nothing to do
    assert report.counts == {"converted": 0, "skipped": 1, "failed": 0} and report.series[0].std_series
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == stamps


def test_a_run_asking_for_std_series_redoes_series_converted_without_one(tmp_path):
    write_demo_study(tmp_path / "incoming", 4)
    out, journal = tmp_path / "synthetic", tmp_path / "j.sqlite"

    def run(std_series):
        return BatchConverter(FolderSource(tmp_path / "incoming"), FolderDestination(out), SampledStubTranslator(),
                              journal, attempts=1, progress=False, std_series=std_series).run()

    assert run(std_series=False).counts["converted"] == 1 and len(list(out.iterdir())) == 1
    assert run(std_series=True).counts["converted"] == 1  # done, but without the std map this run asks for
    assert [len(folders) for folders in series_folders(out).values()] == [1, 1]
    assert run(std_series=False).counts["skipped"] == 1  # the std map is not asked for: done either way


class StubOneSample(SampledStubTranslator):
    """The sampled stub with one sample per volume: no std to write."""

    num_samples = 1


def test_std_series_needs_several_samples(tmp_path, hospital_folder, tiny_model, capsys):
    common = [str(hospital_folder["root"]), str(tmp_path / "out"), *model_args(tiny_model)]
    with pytest.raises(SystemExit) as exit_info:
        main(["convert", *common, "--std-series"])
    assert exit_info.value.code == 2
    assert "--std-series needs --num-samples of at least 2" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["convert", *common, "--num-samples", "0"])
    assert exit_info.value.code == 2 and "expected a positive integer, got '0'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="a std series needs at least 2 samples per volume"):
        BatchConverter(FolderSource(hospital_folder["root"]), FolderDestination(tmp_path / "out"), StubOneSample(),
                       tmp_path / "j.sqlite", std_series=True)


def test_convert_with_the_bundle_writes_the_mean_and_the_std_series(tmp_path, tiny_model, capsys):
    write_demo_study(tmp_path / "incoming", 1)
    out = tmp_path / "synthetic"
    code, _ = convert([str(tmp_path / "incoming"), str(out), *model_args(tiny_model), "--num-samples", "2",
                       "--std-series", "--journal", str(tmp_path / "j.sqlite"), "--no-progress"], capsys)
    assert code == 0
    found = series_folders(out)
    std_description = "SYNTHETIC CT UNCERTAINTY (std over 2 samples, HU)"
    assert std_description in found and len(found) == 2
    (sct_description,) = set(found) - {std_description}
    assert sct_description.endswith(".mean2")  # a mean of samples is another model output than one sample
    std = read_dicom_series(scan_dicom_series(sorted(found[std_description][0].iterdir()))).numpy()
    assert std.min() >= 0 and std.mean() > 1  # the tiny model's samples differ by their start noise


def test_a_journal_from_before_std_maps_is_read_and_extended(tmp_path):
    import sqlite3

    from drdd_med.pacs.journal import Journal

    path = tmp_path / "old.sqlite"
    with sqlite3.connect(path) as db:  # the schema before std_series_uid, with one finished series
        db.executescript("""
            CREATE TABLE settings (name TEXT PRIMARY KEY, value TEXT NOT NULL);
            CREATE TABLE series (source_series_uid TEXT NOT NULL, model_id TEXT NOT NULL, destination TEXT NOT NULL,
                status TEXT NOT NULL, permanent INTEGER NOT NULL DEFAULT 0, attempts INTEGER NOT NULL DEFAULT 0,
                reason TEXT NOT NULL DEFAULT '', output_series_uid TEXT NOT NULL DEFAULT '', job_id TEXT NOT NULL,
                duration_s REAL, updated TEXT NOT NULL, PRIMARY KEY (source_series_uid, model_id, destination));
            INSERT INTO series VALUES ('1.2.3', 'stub 1', 'dest', 'done', 0, 1, '', '1.2.3.9', 'old', 1.0, 'then');
        """)
    with Journal(path, "stub 1", "dest", "new") as journal:
        entry = journal.get("1.2.3")
        assert entry.finished() and not entry.finished(std_series=True) and entry.std_series_uid == ""
        journal.start("1.2.3")
        journal.finish("1.2.3", "1.2.3.9", 1.0, std_series_uid="1.2.3.10")
        assert journal.get("1.2.3").finished(std_series=True)
