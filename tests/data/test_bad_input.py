"""Bad input at the DICOM and file level: each refused with a specific error naming the file and the problem.

Reading writes nothing, so "no partial output" concerns the writer's cases; NaN voxels and
mismatched grids are the transforms' business and tested there.
"""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pydicom
import pytest
from test_dicom_reader import (
    GE_TILTED,
    PATIENT_NAME,
    TOTALSEG_DICOM,
    requires_shared_data,
    write_synthetic_series,
)

from drdd_med.data import dicom
from drdd_med.data.dicom import read_dicom_series, scan_dicom_series
from drdd_med.data.dicom_writer import write_derived_ct_series
from drdd_med.data.readers import load_volume
from drdd_med.data.writers import write_volume
from drdd_med.errors import (
    DRDDInputError,
    GeometryError,
    OutputExistsError,
    SeriesSelectionError,
    VolumeTooLargeError,
)


def test_truncated_pixel_data_is_refused_from_the_header(tmp_path):
    files = write_synthetic_series(tmp_path)
    data = files[3].read_bytes()
    files[3].write_bytes(data[:-200])

    with pytest.raises(DRDDInputError, match=r"slice_03\.dcm: truncated file"):
        read_dicom_series(tmp_path)


def test_truncated_header_is_refused(tmp_path):
    files = write_synthetic_series(tmp_path)
    files[5].write_bytes(files[5].read_bytes()[:400])

    with pytest.raises(DRDDInputError, match=r"slice_05\.dcm: truncated or corrupt"):
        read_dicom_series(tmp_path)


@requires_shared_data
def test_truncated_compressed_file_is_refused(tmp_path):
    source = sorted(TOTALSEG_DICOM.iterdir())[0]
    (tmp_path / "CT.0001").write_bytes(source.read_bytes()[:60000])  # inside the JPEG 2000 fragments

    with pytest.raises(DRDDInputError, match=r"CT\.0001: truncated or corrupt DICOM file"):
        read_dicom_series(tmp_path)


@requires_shared_data
def test_corrupt_compressed_pixel_data_is_refused_when_decoding(tmp_path):
    source = sorted(TOTALSEG_DICOM.iterdir())[0]
    data = bytearray(source.read_bytes())
    start = pydicom.dcmread(source, defer_size=1024).get_item(0x7FE00010, keep_deferred=True).value_tell
    data[start + 40 : start + 60] = bytes(20)  # inside the JPEG 2000 main header: lengths stay intact
    (tmp_path / "CT.0001").write_bytes(bytes(data))

    with pytest.raises(DRDDInputError, match=r"CT\.0001: pixel data cannot be decoded"):
        read_dicom_series(tmp_path)


def write_non_image_object(path, sop_class_uid: str) -> None:
    ds = pydicom.Dataset()
    ds.SOPClassUID = sop_class_uid
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class_uid
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True)


def test_non_dicom_and_non_image_files_are_skipped_not_fatal(tmp_path, caplog):
    write_synthetic_series(tmp_path / "series" / "SE0001")  # nested folders are searched
    (tmp_path / "series" / "README.txt").write_text("exported by a PACS")
    (tmp_path / "series" / "thumbnail.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(300))
    (tmp_path / "series" / ".DS_Store").write_bytes(bytes(10))
    write_non_image_object(tmp_path / "series" / "DICOMDIR", pydicom.uid.MediaStorageDirectoryStorage)
    write_non_image_object(tmp_path / "series" / "report.dcm", pydicom.uid.BasicTextSRStorage)

    with caplog.at_level("INFO"):
        volume = read_dicom_series(tmp_path / "series")

    assert volume.shape == (16, 16, 8)
    logged = " ".join(record.getMessage() for record in caplog.records)
    assert "2 file(s): not DICOM" in logged and "1 file(s): DICOMDIR" in logged
    assert "1 file(s): not a CT, MR or PET image" in logged


def test_two_series_need_a_selection_listed_without_patient_data(tmp_path):
    write_synthetic_series(tmp_path / "a", series_number=3, description="AX SOFT")
    write_synthetic_series(tmp_path / "b", series_number=4, description="AX BONE")

    with pytest.raises(SeriesSelectionError) as caught:
        read_dicom_series(tmp_path)
    message = str(caught.value)
    assert "2 series found" in message and "series 3 'AX SOFT'" in message and "series 4 'AX BONE'" in message
    assert PATIENT_NAME.split("^")[0] not in message


def test_duplicate_slice_is_refused(tmp_path):
    files = write_synthetic_series(tmp_path)
    ds = pydicom.dcmread(files[2])
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    ds.save_as(tmp_path / "slice_02_copy.dcm")

    for resample in (False, True):  # duplicates cannot be resolved by resampling
        with pytest.raises(GeometryError, match=r"series 5 'SYNTH AX'.*duplicate slice position.*slice_02"):
            read_dicom_series(tmp_path, resample=resample)


def test_missing_slice_is_refused(tmp_path):
    write_synthetic_series(tmp_path)
    (tmp_path / "slice_04.dcm").unlink()

    with pytest.raises(GeometryError, match=r"uneven slice spacing.*between slice_03\.dcm and slice_05\.dcm"):
        read_dicom_series(tmp_path)


def test_mixed_orientations_are_refused(tmp_path):
    files = write_synthetic_series(tmp_path)
    ds = pydicom.dcmread(files[7])
    ds.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
    ds.save_as(files[7])

    with pytest.raises(GeometryError, match=r"series 5 'SYNTH AX'.*mixes orientations"):
        read_dicom_series(tmp_path, resample=True)


@requires_shared_data
def test_real_gantry_tilt_is_refused_by_default_and_resampled_on_request():
    with pytest.raises(GeometryError, match=r"series 2 .*gantry tilt of about 18\.5 degrees.*\d+\.dcm"):
        read_dicom_series(GE_TILTED)

    volume = read_dicom_series(GE_TILTED, resample=True)
    directions = volume.affine.numpy()[:3, :3] / np.linalg.norm(volume.affine.numpy()[:3, :3], axis=0)
    np.testing.assert_allclose(directions.T @ directions, np.eye(3), atol=1e-6)  # a regular, orthogonal grid
    assert volume.meta["resampled"] and volume.shape[2] > 28 and volume.numpy().max() > 1000  # bone survived


@requires_shared_data
def test_real_series_with_empty_sop_class_uid_still_loads():
    header = pydicom.dcmread(next(TOTALSEG_DICOM.iterdir()), stop_before_pixels=True)
    assert "SOPClassUID" in header and header.SOPClassUID == ""

    volume = read_dicom_series(TOTALSEG_DICOM, expected_modality="CT")

    assert volume.shape == (512, 512, 20)
    assert volume.numpy().min() == -1024 and 1000 < volume.numpy().max() < 3072


def test_wrong_modality_for_the_task_is_refused(tmp_path):
    write_synthetic_series(tmp_path / "scan", modality="CT")

    expected = r"scan: series 5 'SYNTH AX' \(CT #\w+\) has modality CT, but MR is expected"
    with pytest.raises(DRDDInputError, match=expected):
        load_volume(tmp_path / "scan", expected_modality="MR")


def test_4d_nifti_is_refused_where_3d_is_expected(tmp_path):
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4, 3), np.float32), np.eye(4)), tmp_path / "dwi.nii.gz")

    with pytest.raises(DRDDInputError, match=r"dwi\.nii\.gz: expected a 3D volume, got shape \(4, 4, 4, 3\)"):
        load_volume(tmp_path / "dwi.nii.gz")
    assert load_volume(tmp_path / "dwi.nii.gz", require_3d=False).shape == (4, 4, 4, 3)


def test_zero_length_files_are_refused(tmp_path):
    (tmp_path / "ct.nii.gz").touch()
    write_synthetic_series(tmp_path / "series")
    (tmp_path / "series" / "slice_08.dcm").touch()

    with pytest.raises(DRDDInputError, match=r"ct\.nii\.gz: file is empty"):
        load_volume(tmp_path / "ct.nii.gz")
    with pytest.raises(DRDDInputError, match=r"slice_08\.dcm: file is empty"):
        read_dicom_series(tmp_path / "series")


def test_unreadable_files_are_refused(tmp_path):
    (tmp_path / "ct.nii.gz").mkdir()  # tests run as root, so permissions cannot make a file unreadable
    (tmp_path / "mr.mha").symlink_to(tmp_path / "gone.mha")
    write_synthetic_series(tmp_path / "series")
    (tmp_path / "series" / "slice_08.dcm").symlink_to(tmp_path / "gone.dcm")

    with pytest.raises(DRDDInputError, match=r"ct\.nii\.gz: is a folder, not an image file"):
        load_volume(tmp_path / "ct.nii.gz")
    with pytest.raises(FileNotFoundError, match=r"mr\.mha: broken symbolic link"):
        load_volume(tmp_path / "mr.mha")
    with pytest.raises(DRDDInputError, match=r"slice_08\.dcm: cannot be read \(broken symbolic link\)"):
        read_dicom_series(tmp_path / "series")


def test_damaged_nifti_is_refused(tmp_path):
    path = write_volume(np.zeros((8, 8, 8)), np.eye(4), tmp_path / "ct.nii")
    path.write_bytes(path.read_bytes()[:600])

    with pytest.raises(DRDDInputError, match=r"ct\.nii: cannot be read as nifti"):
        load_volume(path)


def test_too_large_volumes_are_refused_from_headers_before_reading_pixels(tmp_path, monkeypatch):
    write_synthetic_series(tmp_path / "series")
    nifti = write_volume(np.zeros((8, 8, 8)), np.eye(4), tmp_path / "ct.nii")
    nifti.write_bytes(nifti.read_bytes()[:600])  # voxels missing: reading them would fail differently

    def no_pixels(*args, **kwargs):
        raise AssertionError("pixels were read before the size check")

    monkeypatch.setattr(dicom._PlaneReader, "__call__", no_pixels)
    expected = r"series 5 'SYNTH AX'.*16x16x8 = 2048 voxels exceed.*max_voxels=2000"
    with pytest.raises(VolumeTooLargeError, match=expected):
        read_dicom_series(tmp_path / "series", max_voxels=2000)
    with pytest.raises(VolumeTooLargeError, match=r"ct\.nii: 8x8x8 voxels need 2048 bytes.*max_bytes=1000"):
        load_volume(nifti, max_bytes=1000)


def test_existing_output_is_not_overwritten(tmp_path):
    write_synthetic_series(tmp_path / "ct")
    info = scan_dicom_series(tmp_path / "ct")
    volume = read_dicom_series(info)
    (tmp_path / "sct").mkdir()
    (tmp_path / "sct" / "0001.dcm").write_bytes(b"earlier result")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "report.txt").write_text("keep me")

    with pytest.raises(OutputExistsError, match=r"sct: output exists already"):
        write_derived_ct_series(volume, info, tmp_path / "sct", "m", "1")
    with pytest.raises(OutputExistsError, match=r"notes: holds other things than \.dcm files"):
        write_derived_ct_series(volume, info, tmp_path / "notes", "m", "1", overwrite=True)
    assert (tmp_path / "sct" / "0001.dcm").read_bytes() == b"earlier result"
    assert (tmp_path / "notes" / "report.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct", "notes", "sct"]
