"""Derived CT series writer: the medical.md checklist, exact round trips, dciodvfy, atomic output."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from test_dicom_reader import (
    GE_TILTED,
    TOTALSEG_DICOM,
    pydicom_test_file,
    requires_shared_data,
    write_synthetic_series,
)

from drdd_med.data.dicom import read_dicom_series, scan_dicom_series
from drdd_med.data.dicom_writer import write_derived_ct_series
from drdd_med.errors import GridMismatchError, NonFiniteError

SYNTHETIC_DATA_TAG = "(0x0008,0x001c)"  # SyntheticData: newer than dciodvfy's dictionary


@pytest.fixture(scope="session")
def dciodvfy() -> str:
    """The dciodvfy validator (Debian dicom3tools), installed with apt-get when missing and root."""
    found = shutil.which("dciodvfy")
    if found:
        return found
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip("dciodvfy is missing and dicom3tools cannot be installed (needs root and apt-get)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "--no-install-recommends", "dicom3tools"]
    if subprocess.run(install, env=env, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update"], env=env, capture_output=True)
        subprocess.run(install, env=env, capture_output=True)
    return shutil.which("dciodvfy") or pytest.skip("apt-get could not install dicom3tools (no network?)")


def dciodvfy_errors(validator: str, path: Path) -> list[str]:
    result = subprocess.run([validator, str(path)], capture_output=True, text=True)
    lines = (result.stdout + result.stderr).splitlines()
    return [line for line in lines if line.startswith("Error") and SYNTHETIC_DATA_TAG not in line]


def round_trip(source, out_dir: Path, resample: bool = False):
    info = scan_dicom_series(source, resample=resample)
    volume = read_dicom_series(info)
    files = write_derived_ct_series(volume, info, out_dir, "drdd-unet", "1.2.0")
    return info, volume, files, read_dicom_series(out_dir)


@requires_shared_data
def test_real_jpeg2000_series_round_trips_exactly_and_validates(tmp_path, dciodvfy):
    info, volume, files, again = round_trip(TOTALSEG_DICOM, tmp_path / "sct")

    assert len(files) == 20 and all(f.parent == tmp_path / "sct" for f in files)
    np.testing.assert_array_equal(again.numpy(), volume.numpy())  # the source holds integer HU already
    np.testing.assert_allclose(again.affine.numpy(), volume.affine.numpy(), atol=1e-6)
    for path in (files[0], files[-1]):
        assert dciodvfy_errors(dciodvfy, path) == []


@pytest.mark.parametrize(
    "name", ["CT_small.dcm", "eCT_Supplemental.dcm"], ids=["single-slice", "enhanced-multiframe"]
)
def test_pydicom_data_series_round_trip_exactly_and_validate(tmp_path, dciodvfy, name):
    info, volume, files, again = round_trip(pydicom_test_file(name), tmp_path / "sct")

    assert len(files) == volume.shape[2]
    np.testing.assert_array_equal(again.numpy(), np.rint(volume.numpy()))
    np.testing.assert_allclose(again.affine.numpy(), volume.affine.numpy(), atol=1e-6)
    assert dciodvfy_errors(dciodvfy, files[0]) == []
    first = pydicom.dcmread(files[0])
    if info.slices[0].frame is not None:  # each slice references its frame of the multi-frame source
        assert first.SourceImageSequence[0].ReferencedFrameNumber == info.slices[0].frame


def test_written_series_follows_the_checklist(tmp_path):
    source = write_synthetic_series(tmp_path / "mr", modality="MR", series_number=7)
    source_headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in source]
    info = scan_dicom_series(tmp_path / "mr")
    volume = read_dicom_series(info)
    files = write_derived_ct_series(volume * 3 + 0.4, info, tmp_path / "sct", "drdd-unet", "1.2.0")
    slices = [pydicom.dcmread(f) for f in files]
    first = slices[0]

    assert first.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert first.SOPClassUID == first.file_meta.MediaStorageSOPClassUID == CTImageStorage
    assert first.file_meta.MediaStorageSOPInstanceUID == first.SOPInstanceUID
    assert first.Modality == "CT" and list(first.ImageType) == ["DERIVED", "SECONDARY", "AXIAL"]
    assert first.StudyInstanceUID == source_headers[0].StudyInstanceUID
    assert first.FrameOfReferenceUID == source_headers[0].FrameOfReferenceUID
    assert first.SeriesInstanceUID != source_headers[0].SeriesInstanceUID and first.SeriesNumber == 1007
    assert len({s.SOPInstanceUID for s in slices}) == len(slices)
    assert [s.InstanceNumber for s in slices] == list(range(1, 9))
    positions = np.array([[float(v) for v in s.ImagePositionPatient] for s in slices])
    assert np.all(np.diff(positions[:, 2]) > 0)  # instance numbers follow the position along the normal
    assert all(s.ImageOrientationPatient == first.ImageOrientationPatient for s in slices)
    assert (first.BitsAllocated, first.BitsStored, first.PixelRepresentation) == (16, 16, 1)
    assert first.PhotometricInterpretation == "MONOCHROME2"
    assert (first.RescaleSlope, first.RescaleIntercept, first.RescaleType) == (1, 0, "HU")
    assert {(s.RescaleSlope, s.RescaleIntercept) for s in slices} == {(1, 0)}
    assert first.pixel_array.dtype == np.int16
    assert "WindowCenter" in first and "WindowWidth" in first
    assert "KVP" in first and "AcquisitionNumber" in first and "SliceThickness" in first
    assert "PatientPosition" in first and "PixelSpacing" in first
    # Provenance: the source image of each slice, the source series, the synthesizing equipment.
    for output, header in zip(slices, source_headers):
        (reference,) = output.SourceImageSequence
        assert reference.ReferencedSOPInstanceUID == header.SOPInstanceUID
        assert reference.ReferencedSOPClassUID == header.SOPClassUID
        assert reference.PurposeOfReferenceCodeSequence[0].CodeValue == "121322"
        assert reference.PurposeOfReferenceCodeSequence[0].CodingSchemeDesignator == "DCM"
    (series,) = first.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == source_headers[0].SeriesInstanceUID
    assert len(series.ReferencedInstanceSequence) == 8
    assert "drdd-unet" in first.DerivationDescription and "1.2.0" in first.DerivationDescription
    assert "MR" in first.DerivationDescription
    (equipment,) = first.ContributingEquipmentSequence
    purpose = equipment.PurposeOfReferenceCodeSequence[0]
    assert (purpose.CodeValue, purpose.CodingSchemeDesignator, purpose.CodeMeaning) == (
        "109100",
        "DCM",
        "Synthesizing Equipment",
    )
    assert first.Manufacturer and first.ManufacturerModelName == "drdd-unet" and "1.2.0" in first.SoftwareVersions
    # Marked synthetic redundantly.
    assert first.SyntheticData == "YES" and first.ContentQualification == "RESEARCH"
    assert first.BurnedInAnnotation == "NO" and "SYNTHETIC" in first.SeriesDescription.upper()
    assert first.PatientName == source_headers[0].PatientName
    # Values: rounded explicitly, on the source grid.
    again = read_dicom_series(tmp_path / "sct")
    np.testing.assert_array_equal(again.numpy(), np.rint(volume.numpy() * 3 + 0.4))
    np.testing.assert_allclose(again.affine.numpy(), volume.affine.numpy(), atol=1e-6)


def test_uids_are_deterministic_per_source_model_and_version(tmp_path):
    write_synthetic_series(tmp_path / "ct")
    info = scan_dicom_series(tmp_path / "ct")
    volume = read_dicom_series(info)

    def uids(out: str, version: str) -> list[str]:
        files = write_derived_ct_series(volume, info, tmp_path / out, "drdd-unet", version)
        return [pydicom.dcmread(f).SOPInstanceUID for f in files] + [pydicom.dcmread(files[0]).SeriesInstanceUID]

    first_run = uids("a", "1.0")
    assert uids("b", "1.0") == first_run  # a rerun resends the same objects
    assert set(uids("c", "1.1")).isdisjoint(first_run)


def test_character_set_is_copied_with_the_patient_strings(tmp_path):
    files = write_synthetic_series(tmp_path / "ct")
    for path in files:
        ds = pydicom.dcmread(path)
        ds.SpecificCharacterSet = "ISO_IR 192"
        ds.PatientName = "Γιάννης^Παπαδόπουλος"
        ds.save_as(path)
    info = scan_dicom_series(tmp_path / "ct")
    written = write_derived_ct_series(read_dicom_series(info), info, tmp_path / "sct", "drdd-unet", "1")

    first = pydicom.dcmread(written[0])
    assert first.SpecificCharacterSet == "ISO_IR 192"
    assert str(first.PatientName) == "Γιάννης^Παπαδόπουλος"


@requires_shared_data
def test_resampled_tilted_source_is_written_on_its_regular_grid(tmp_path, dciodvfy):
    info, volume, files, again = round_trip(GE_TILTED, tmp_path / "sct", resample=True)

    assert info.resampled and len(files) == volume.shape[2]
    np.testing.assert_array_equal(again.numpy(), np.rint(volume.numpy()))
    np.testing.assert_allclose(again.affine.numpy(), volume.affine.numpy(), atol=1e-6)
    assert not again.meta["resampled"]  # the written series is regular: it reads without resampling
    # Each output slice references the one or two source slices it was interpolated from.
    assert all(1 <= len(pydicom.dcmread(f).SourceImageSequence) <= 2 for f in files)
    assert dciodvfy_errors(dciodvfy, files[len(files) // 2]) == []


def test_volume_must_lie_on_the_reference_grid(tmp_path):
    write_synthetic_series(tmp_path / "ct")
    info = scan_dicom_series(tmp_path / "ct")
    volume = read_dicom_series(info)

    with pytest.raises(GridMismatchError, match="shape"):
        write_derived_ct_series(volume[:, :, :4], info, tmp_path / "a", "m", "1")
    shifted = volume.clone()
    shifted.affine[0, 3] += 1.0
    with pytest.raises(GridMismatchError, match="affine"):
        write_derived_ct_series(shifted, info, tmp_path / "b", "m", "1")
    broken = volume.clone()
    broken[0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteError):
        write_derived_ct_series(broken, info, tmp_path / "c", "m", "1")
    # Channel-first volumes and plain arrays on the grid are accepted.
    write_derived_ct_series(volume[None], info, tmp_path / "d", "m", "1")
    write_derived_ct_series(volume.numpy(), info, tmp_path / "e", "m", "1")
    assert not any((tmp_path / name).exists() for name in "abc")


def test_failure_midway_leaves_no_partial_series(tmp_path, monkeypatch):
    write_synthetic_series(tmp_path / "ct")
    info = scan_dicom_series(tmp_path / "ct")
    volume = read_dicom_series(info)
    real_write, calls = pydicom.dcmwrite, []

    def failing_write(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise OSError("disk full")
        return real_write(*args, **kwargs)

    monkeypatch.setattr(pydicom, "dcmwrite", failing_write)
    with pytest.raises(OSError, match="disk full"):
        write_derived_ct_series(volume, info, tmp_path / "out" / "sct", "m", "1")
    assert list((tmp_path / "out").iterdir()) == []


def test_overwrite_replaces_a_previous_series(tmp_path):
    write_synthetic_series(tmp_path / "ct")
    info = scan_dicom_series(tmp_path / "ct")
    volume = read_dicom_series(info)
    write_derived_ct_series(volume, info, tmp_path / "sct", "m", "1")

    write_derived_ct_series(volume + 5, info, tmp_path / "sct", "m", "1", overwrite=True)

    np.testing.assert_array_equal(read_dicom_series(tmp_path / "sct").numpy(), volume.numpy() + 5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct", "sct"]  # no staging leftovers
