"""NIfTI, MetaImage and NRRD loading: one orientation convention, exact round trips."""

from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from monai.data import MetaTensor
from monai.transforms import LoadImage, LoadImaged
from pydicom.data import get_testdata_file
from test_dicom_reader import SHARED_DATA, requires_shared_data, write_synthetic_series

from drdd_med.data.dicom import read_dicom_series
from drdd_med.data.readers import SimpleITKReader, load_volume
from drdd_med.data.writers import write_volume

TOTALSEG_NIFTI = SHARED_DATA / "real_ct" / "totalsegmentator_example_ct.nii.gz"


def oblique_affine() -> np.ndarray:
    angle = np.radians(20)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([-0.8, 0.9, 2.5])  # a flipped, anisotropic, rotated grid
    affine[:3, 3] = [12.5, -40.0, 7.25]
    return affine


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".mha"])
def test_volume_round_trips_exactly(tmp_path, suffix):
    data = np.random.default_rng(0).integers(-1024, 3000, size=(9, 7, 5)).astype(np.float32)
    path = write_volume(data, oblique_affine(), tmp_path / f"ct{suffix}")

    volume = load_volume(path)

    assert isinstance(volume, MetaTensor) and volume.shape == (9, 7, 5)
    np.testing.assert_array_equal(volume.numpy(), data)
    np.testing.assert_allclose(volume.affine.numpy(), oblique_affine(), atol=1e-6)
    assert volume.meta["space"] == "RAS"


@requires_shared_data
@pytest.mark.parametrize("suffix", [".mha", ".nrrd"])
def test_real_nifti_and_its_simpleitk_conversion_load_identically(tmp_path, suffix):
    # SimpleITK converts through ITK's own NIfTI reader: an independent path to the same grid.
    sitk.WriteImage(sitk.ReadImage(str(TOTALSEG_NIFTI)), str(tmp_path / f"ct{suffix}"))

    reference = load_volume(TOTALSEG_NIFTI)
    converted = load_volume(tmp_path / f"ct{suffix}")

    assert converted.shape == reference.shape == (122, 101, 112)
    np.testing.assert_array_equal(converted.numpy(), reference.numpy())
    np.testing.assert_allclose(converted.affine.numpy(), reference.affine.numpy(), atol=1e-3)
    np.testing.assert_allclose(reference.affine.numpy(), nib.load(TOTALSEG_NIFTI).affine, atol=1e-6)


def test_simpleitk_reader_serves_monai_load_image(tmp_path):
    data = np.arange(60, dtype=np.float32).reshape(5, 4, 3)
    write_volume(data, oblique_affine(), tmp_path / "a.mha", dtype=np.float32)
    write_volume(data + 1, oblique_affine(), tmp_path / "b.mha", dtype=np.float32)

    single = LoadImage(reader=SimpleITKReader(), image_only=True)(tmp_path / "a.mha")
    stacked = LoadImaged("image", reader=SimpleITKReader(), ensure_channel_first=True)(
        {"image": [tmp_path / "a.mha", tmp_path / "b.mha"]}
    )["image"]

    np.testing.assert_array_equal(single.numpy(), data)
    assert stacked.shape == (2, 5, 4, 3)
    np.testing.assert_array_equal(stacked[1].numpy(), data + 1)
    np.testing.assert_allclose(stacked.affine.numpy(), oblique_affine(), atol=1e-6)
    assert SimpleITKReader().verify_suffix("x.nrrd") and not SimpleITKReader().verify_suffix("x.nii.gz")


def test_load_volume_reads_dicom_folders_and_files(tmp_path):
    write_synthetic_series(tmp_path / "series")
    shutil.copy(get_testdata_file("CT_small.dcm"), tmp_path / "IM0001")  # no suffix: found by its DICM magic

    from_folder = load_volume(tmp_path / "series")
    np.testing.assert_array_equal(from_folder.numpy(), read_dicom_series(tmp_path / "series").numpy())
    single = load_volume(tmp_path / "IM0001", expected_modality="CT")
    assert single.shape == (128, 128, 1)
    np.testing.assert_array_equal(single.numpy(), load_volume(Path(get_testdata_file("CT_small.dcm"))).numpy())


def test_trailing_singleton_axis_counts_as_3d(tmp_path):
    data = np.arange(24, dtype=np.int16).reshape(4, 3, 2, 1)
    nib.save(nib.Nifti1Image(data, oblique_affine()), tmp_path / "x.nii.gz")

    volume = load_volume(tmp_path / "x.nii.gz")

    assert volume.shape == (4, 3, 2)
    np.testing.assert_array_equal(volume.numpy(), data[..., 0])
