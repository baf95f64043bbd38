"""Listing the series of a folder tree, the folder endpoints, and redaction of every log record of a run."""

from __future__ import annotations

import logging

import numpy as np
from pacs_helpers import PATIENT, write_demo_study, write_refused_series

from drdd_med.data.dicom import list_dicom_series, scan_dicom_series
from drdd_med.pacs.endpoints import FolderDestination, FolderSource, SeriesRules
from drdd_med.pacs.phi import Redactor, redacted_logging


def test_list_dicom_series_groups_a_tree_and_scans_one_series_from_its_files(tmp_path):
    files, _ = write_demo_study(tmp_path, seed=1)
    write_demo_study(tmp_path, seed=2)
    write_refused_series(tmp_path)
    (tmp_path / "notes.txt").write_text("not DICOM")
    (tmp_path / "DICOMDIR").write_bytes(b"\0" * 128 + b"DICM")  # unreadable: counted, skipped
    summaries = list_dicom_series(tmp_path)
    assert len(summaries) == 5 and all(s.modality == "MR" for s in summaries)
    summary = next(s for s in summaries if s.series_uid and set(s.files) == set(files))
    assert summary.description == "T1 AX demo phantom" and summary.series_number == 1
    assert summary.label.startswith("series 1 'T1 AX demo phantom' (MR #")
    from_files, from_folder = scan_dicom_series(summary.files), scan_dicom_series(files[0].parent)
    assert from_files.series_uid == from_folder.series_uid and from_files.shape == from_folder.shape
    np.testing.assert_array_equal(from_files.affine, from_folder.affine)


def test_folder_source_selects_by_rules(tmp_path):
    write_demo_study(tmp_path, seed=1)
    write_refused_series(tmp_path)
    source = FolderSource(tmp_path)
    assert len(source.find(SeriesRules(modality="MR"))) == 4
    assert len(source.find(SeriesRules(modality="MR", description="demo"))) == 2  # seed 1 and the gap series
    assert source.find(SeriesRules(modality="CT")) == []
    assert source.private == (str(tmp_path.resolve()),)


def test_folder_destination_replaces_a_series_whole_and_clears_a_killed_copy(tmp_path):
    files, _ = write_demo_study(tmp_path / "in", seed=1)
    destination = FolderDestination(tmp_path / "out")
    (tmp_path / "out" / ".1.2.3.abc.partial").mkdir(parents=True)  # a copy interrupted by kill -9
    destination.deliver(files, "1.2.3")
    destination.deliver(files[:3], "1.2.3")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["1.2.3"]
    assert sorted(p.name for p in (tmp_path / "out" / "1.2.3").iterdir()) == ["0001.dcm", "0002.dcm", "0003.dcm"]


def test_every_log_record_of_a_run_is_redacted(caplog):
    redact = Redactor(b"k" * 32)
    redact.hide_header({"PatientName": PATIENT["patient_name"], "PatientID": "ZQ-0001"})
    caplog.set_level(logging.INFO)
    with redacted_logging(redact):
        logging.getLogger("drdd_med.data.dicom").info("read series 3 'T1 %s' of %s", "Quuxley", "1.2.840.1.2.3")
    logging.getLogger("drdd_med.data.dicom").info("after the run: %s", "Quuxley")
    first, second = caplog.records[-2].getMessage(), caplog.records[-1].getMessage()
    assert "Quuxley" not in first and "1.2.840.1.2.3" not in first and redact.uid("1.2.840.1.2.3") in first
    assert second == "after the run: Quuxley"  # the filter is gone with the run
