"""Job journal, PHI redaction, selection rules and endpoint addresses (no model, no server)."""

from __future__ import annotations

import sqlite3

import pytest

from drdd_med.pacs.endpoints import SeriesRef, SeriesRules, series_part
from drdd_med.pacs.journal import Journal, JournalLockedError, part_journal_path
from drdd_med.pacs.phi import REDACTED, Redactor

SERIES = "1.2.826.0.1.3680043.8.498.1"


def test_journal_records_each_step_and_survives_reopening(tmp_path):
    path = tmp_path / "journal.sqlite"
    with Journal(path, "model 1", "folder:/out", "job1") as journal:
        key = journal.secret_key()
        assert journal.get(SERIES) is None
        journal.start(SERIES)
        assert journal.get(SERIES).status == "running"  # a crash now leaves it to be redone
        journal.fail(SERIES, "C-STORE: status 0xA700", permanent=False, duration_s=1.0)
        journal.start(SERIES)
        journal.finish(SERIES, "1.2.3.4", duration_s=2.0)
    with Journal(path, "model 1", "folder:/out", "job2") as journal:
        entry = journal.get(SERIES)
        assert (entry.status, entry.attempts, entry.output_series_uid, entry.reason) == ("done", 2, "1.2.3.4", "")
        assert journal.secret_key() == key  # hashes stay comparable across runs
    with Journal(path, "model 2", "folder:/out", "job3") as journal:  # another model: its own work
        assert journal.get(SERIES) is None
    with Journal(path, "model 1", "dimse:PACS@host:104", "job4") as journal:  # another destination too
        assert journal.get(SERIES) is None


def test_journal_keeps_permanent_failures_and_admits_one_run_at_a_time(tmp_path):
    path = tmp_path / "journal.sqlite"
    with Journal(path, "m", "d", "job1") as journal:
        journal.start(SERIES)
        journal.fail(SERIES, "gantry tilt", permanent=True, duration_s=0.5)
        with pytest.raises(JournalLockedError, match="another conversion run"):
            Journal(path, "m", "d", "job2").__enter__()
    rows = sqlite3.connect(path).execute("SELECT status, permanent, reason FROM series").fetchall()
    assert rows == [("failed", 1, "gantry tilt")]


def test_redactor_hashes_uids_with_its_key_and_hides_patient_strings():
    redact, other = Redactor(b"k" * 32), Redactor(b"x" * 32)
    assert redact.uid(SERIES) == redact.uid(SERIES) != other.uid(SERIES)
    assert redact.uid(SERIES, "series").startswith("series:") and SERIES not in redact.uid(SERIES, "series")
    header = {"PatientName": "Zzyzx^Quuxley", "PatientID": "ZQ-0001", "PatientBirthDate": "19230405"}
    redact.hide_header(header)
    redact.hide(["/data/Zzyzx_Quuxley"])
    text = redact(
        f"404 for url http://pacs/studies/{SERIES}/series: Zzyzx^Quuxley ZQ-0001 born 19230405 in "
        "/data/Zzyzx_Quuxley/x.dcm; Quuxley_002.dcm"
    )
    for secret in (SERIES, "Zzyzx", "Quuxley", "ZQ-0001", "19230405", "/data/"):
        assert secret not in text, secret
    assert redact.uid(SERIES, "uid") in text and REDACTED in text
    assert redact("uneven slice spacing, status 0xA700") == "uneven slice spacing, status 0xA700"


def ref(**fields) -> SeriesRef:
    fields = {"series_uid": "1.2.3.1", "study_uid": "1.2.3", "modality": "MR", "description": "T1 AX post",
              "series_number": 3, "study_date": "20240315", **fields}
    return SeriesRef(**fields)


def test_series_rules_match_every_given_rule():
    assert SeriesRules(modality="MR").matches(ref())
    assert not SeriesRules(modality="CT").matches(ref())
    assert SeriesRules(modality="mr", description="^t1").matches(ref())
    assert not SeriesRules(description="flair").matches(ref())
    assert SeriesRules(study_uids=["1.2.3"], series_uids=["1.2.3.1", "9.9"]).matches(ref())
    assert not SeriesRules(series_uids=["9.9"]).matches(ref())
    assert SeriesRules(date_from="20240301", date_to="20240315").matches(ref())
    assert not SeriesRules(date_from="20240316").matches(ref())
    assert not SeriesRules(date_to="20240301").matches(ref(study_date=""))  # unknown date: not in a range
    assert SeriesRules(date_from="20240301").study_date_range == "20240301-"
    with pytest.raises(ValueError, match="YYYYMMDD"):
        SeriesRules(date_from="2024-03-01")


def test_parts_are_fixed_by_the_series_uid_alone_and_each_has_its_own_journal(tmp_path):
    uids = [f"{SERIES[:-1]}{i}" for i in range(8)]
    # pinned: the same on every machine and in every process (Python's own hash() is salted per process)
    assert [series_part(uid, 4) for uid in uids] == [2, 0, 2, 0, 2, 0, 0, 3]
    for part in range(4):
        rules = SeriesRules(modality="MR", num_parts=4, part_id=part)
        assert [rules.matches(ref(series_uid=uid)) for uid in uids] == [series_part(uid, 4) == part for uid in uids]
    assert part_journal_path(tmp_path / "j.sqlite", 4, 3) == tmp_path / "j.part3-of-4.sqlite"
    assert part_journal_path(tmp_path / "j.sqlite", 1, 0) == tmp_path / "j.sqlite"
    for parts, part in ((2, 2), (2, -1), (0, 0)):
        with pytest.raises(ValueError, match="part_id must be"):
            SeriesRules(num_parts=parts, part_id=part)


def test_dimse_addresses_parse_and_refuse_malformed_ones():
    from drdd_med.pacs.dimse import DimseNode

    assert DimseNode.parse("dimse://PACS@10.0.0.5:104") == DimseNode("PACS", "10.0.0.5", 104)
    for bad in ("dimse://10.0.0.5:104", "dimse://PACS@10.0.0.5", "dimse://PACS@:104"):
        with pytest.raises(ValueError, match="AET@host:port"):
            DimseNode.parse(bad)
