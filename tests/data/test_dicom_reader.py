"""DICOM series reader: orientation convention, sorting, selection, multi-frame, resampling.

``write_synthetic_series`` and ``SHARED_DATA`` are also used by the other DICOM test modules.
"""

from __future__ import annotations

import copy
import logging
import warnings
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from monai.data import MetaTensor
from monai.transforms import LoadImage, LoadImaged
from pydicom.data import get_testdata_file
from pydicom.uid import MRImageStorage, generate_uid
from scipy import ndimage

from drdd_med.data.dicom import DicomSeriesReader, SeriesSelection, read_dicom_series, scan_dicom_series
from drdd_med.data.dicom_writer import write_derived_ct_series
from drdd_med.errors import DRDDInputError, GeometryError, SeriesSelectionError

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
TOTALSEG_DICOM = SHARED_DATA / "real_ct" / "totalsegmentator_example_ct_dicom"
GE_TILTED = SHARED_DATA / "real_ct" / "dcm_qa_ct_GE_tilted_head"
requires_shared_data = pytest.mark.skipif(
    not SHARED_DATA.is_dir(),
    reason=f"real test scans not found: expected ../shared/data beside the project ({SHARED_DATA})",
)
PATIENT_NAME = "Doe^Jane"


def pydicom_test_file(name: str) -> Path:
    """A file of pydicom's test set (the larger ones come with the pydicom-data package)."""
    path = get_testdata_file(name)
    if path is None:
        pytest.skip(f"{name} is not available: install pydicom-data")
    return Path(path)


def synthetic_values(size: int = 16, count: int = 8) -> np.ndarray:
    """Stored values (i, j, k) that tell every axis apart."""
    i, j, k = np.meshgrid(np.arange(size), np.arange(size), np.arange(count), indexing="ij")
    return (i + 20 * j + 400 * k).astype(np.int16)


def write_synthetic_series(
    folder: Path,
    values: np.ndarray | None = None,
    *,
    orientation=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
    origin=(-10.0, -20.0, 30.0),
    spacing=(0.7, 0.6),
    step: float = 2.5,
    positions: list | None = None,
    rescale: tuple | list[tuple] = (1.0, -1024.0),
    modality: str = "CT",
    series_uid: str | None = None,
    series_number: int = 5,
    description: str = "SYNTH AX",
    instance_numbers: list[int] | None = None,
) -> list[Path]:
    """Write a small valid series (one file per slice) built on pydicom's CT_small header.

    ``values`` are stored pixel values indexed (i, j, k) = (column, row, slice); slice k lies at
    ``positions[k]`` (default: ``origin + k * step * normal``); ``spacing`` is PixelSpacing
    (between rows, between columns); ``rescale`` is one (slope, intercept) or one per slice.
    """
    values = synthetic_values() if values is None else values
    template = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    del template[0xFFFCFFFC]  # trailing padding
    row_cosines, column_cosines = np.array(orientation[:3]), np.array(orientation[3:])
    normal = np.cross(row_cosines, column_cosines)
    if positions is None:
        positions = [np.asarray(origin) + k * step * normal for k in range(values.shape[2])]
    series_uid = series_uid or generate_uid()
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for k in range(values.shape[2]):
        ds = copy.deepcopy(template)
        if modality == "MR":
            ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
        ds.Modality = modality
        ds.PatientName = PATIENT_NAME
        ds.SeriesInstanceUID = series_uid
        ds.SeriesNumber = series_number
        ds.SeriesDescription = description
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.InstanceNumber = instance_numbers[k] if instance_numbers else k + 1
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in orientation]
        ds.ImagePositionPatient = [f"{v:.6f}" for v in positions[k]]
        ds.PixelSpacing = [f"{v:g}" for v in spacing]
        ds.SliceThickness = f"{step:g}"
        ds.Rows, ds.Columns = values.shape[1], values.shape[0]
        slope, intercept = rescale[k] if isinstance(rescale, list) else rescale
        ds.RescaleSlope, ds.RescaleIntercept = f"{slope:g}", f"{intercept:g}"
        ds.PixelData = np.ascontiguousarray(values[:, :, k].T).astype("<i2").tobytes()
        path = folder / f"slice_{k:02d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return files


def sitk_nifti_conversion(folder: Path, out: Path) -> MetaTensor:
    """The independent path: SimpleITK (GDCM) reads the series, writes NIfTI, MONAI loads the NIfTI."""
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder)))
    sitk.WriteImage(reader.Execute(), str(out))
    return LoadImage(image_only=True)(out)


@requires_shared_data
def test_real_jpeg2000_series_matches_its_simpleitk_nifti_conversion(tmp_path):
    volume = read_dicom_series(TOTALSEG_DICOM)
    nifti = sitk_nifti_conversion(TOTALSEG_DICOM, tmp_path / "ct.nii.gz")

    assert volume.shape == nifti.shape == (512, 512, 20)
    np.testing.assert_allclose(volume.affine.numpy(), nifti.affine.numpy(), atol=1e-3)
    np.testing.assert_array_equal(volume.numpy(), nifti.numpy())
    # MONAI's convention: RAS affine, k along +z for this axial head-first-supine scan.
    np.testing.assert_allclose(np.diag(volume.affine.numpy())[:3], [-0.9765625, -0.9765625, 2.0])
    assert volume.meta["space"] == "RAS"


def jpeg_lossless_ct(folder: Path, transfer_syntax: str) -> Path:
    """pydicom's JPEG Lossless SV1 CT slice, its transfer syntax relabelled as asked.

    A first-order (SV1) Process 14 stream is a valid Process 14 stream, so relabelling it as
    1.2.840.10008.1.2.4.57 makes a genuine file of that transfer syntax (no encoder exists for it).
    """
    with warnings.catch_warnings():  # its de-identified UIDs and ids are not valid values
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(pydicom_test_file("bad_sequence.dcm"))  # CT, JPEG Lossless SV1, 12 bits stored
        ds.file_meta.TransferSyntaxUID = transfer_syntax
        folder.mkdir(parents=True, exist_ok=True)
        ds.save_as(folder / "ct.dcm")
    return folder / "ct.dcm"


@pytest.mark.parametrize("transfer_syntax", [pydicom.uid.JPEGLossless, pydicom.uid.JPEGLosslessSV1])
def test_jpeg_lossless_ct_matches_simpleitk_decoding(tmp_path, transfer_syntax):
    path = jpeg_lossless_ct(tmp_path, transfer_syntax)
    volume = read_dicom_series(path)
    expected = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))[0].T  # GDCM's decoder, rescale applied

    assert volume.shape == (512, 512, 1)
    assert expected.min() < -1000 and expected.max() > 1000  # real CT values, not a blank plane
    np.testing.assert_array_equal(volume.numpy()[:, :, 0], expected.astype(np.float32))


def test_missing_decoder_is_named_with_the_transfer_syntax_and_package(tmp_path, monkeypatch):
    from pydicom.pixels.decoders.base import get_decoder

    path = jpeg_lossless_ct(tmp_path, pydicom.uid.JPEGLosslessSV1)
    monkeypatch.setattr(get_decoder(pydicom.uid.JPEGLosslessSV1), "_available", {})  # as if not installed

    with pytest.raises(DRDDInputError) as caught:
        read_dicom_series(path)
    message = str(caught.value)
    for expected in ("ct.dcm", "1.2.840.10008.1.2.4.70", "Process 14 [Selection Value 1]", "python-gdcm"):
        assert expected in message, message


@pytest.mark.parametrize(
    "orientation",
    [(-1, 0, 0, 0, 1, 0), (0, 1, 0, 0, 0, -1), (0.8, 0.6, 0, 0, 0, -1)],
    ids=["flipped-axial", "sagittal", "oblique-coronal"],
)
def test_orientation_convention_matches_simpleitk_nifti_conversion(tmp_path, orientation):
    write_synthetic_series(tmp_path / "series", orientation=orientation)
    volume = read_dicom_series(tmp_path / "series")
    nifti = sitk_nifti_conversion(tmp_path / "series", tmp_path / "series.nii.gz")

    assert volume.shape == nifti.shape == (16, 16, 8)
    np.testing.assert_allclose(volume.affine.numpy(), nifti.affine.numpy(), atol=1e-3)
    np.testing.assert_array_equal(volume.numpy(), nifti.numpy())


def test_slices_are_sorted_by_position_never_by_instance_number(tmp_path):
    values = synthetic_values()
    # Instance numbers run against the positions and file names are shuffled relative to both.
    write_synthetic_series(tmp_path, values, instance_numbers=[8, 3, 5, 1, 7, 2, 6, 4], step=2.5)
    volume = read_dicom_series(tmp_path)

    np.testing.assert_array_equal(volume.numpy(), values.astype(np.float32) - 1024)
    assert volume.affine[2, 2] == pytest.approx(2.5)
    np.testing.assert_allclose(volume.affine[:3, 3].numpy(), [10.0, 20.0, 30.0])  # LPS (-10, -20, 30) in RAS


def test_rescale_is_applied_per_slice_into_float32(tmp_path):
    values = synthetic_values()
    write_synthetic_series(tmp_path, values, rescale=[(1, -1024), (2, -1000), (0.5, 0)] + [(1, -1024)] * 5)
    volume = read_dicom_series(tmp_path)

    assert volume.numpy().dtype == np.float32
    np.testing.assert_array_equal(volume[:, :, 0].numpy(), values[:, :, 0] - 1024.0)
    np.testing.assert_array_equal(volume[:, :, 1].numpy(), values[:, :, 1] * 2.0 - 1000)
    np.testing.assert_array_equal(volume[:, :, 2].numpy(), values[:, :, 2] * 0.5)


def test_monai_load_image_and_load_imaged_use_the_reader(tmp_path):
    write_synthetic_series(tmp_path)
    direct = read_dicom_series(tmp_path)
    loaded = LoadImage(reader=DicomSeriesReader(), image_only=True)(tmp_path)
    sample = LoadImaged(keys="image", reader=DicomSeriesReader(expected_modality="CT"))({"image": tmp_path})

    for result in (loaded, sample["image"]):
        assert isinstance(result, MetaTensor)
        np.testing.assert_array_equal(result.numpy(), direct.numpy())
        np.testing.assert_allclose(result.affine.numpy(), direct.affine.numpy())
    assert DicomSeriesReader().verify_suffix(tmp_path) and not DicomSeriesReader().verify_suffix("ct.nii.gz")


@requires_shared_data
def test_load_image_never_falls_back_to_another_reader_on_a_refused_series():
    # LoadImage swallows read() errors and tries PydicomReader, which would load this tilted series.
    with pytest.raises(GeometryError, match="gantry tilt"):
        LoadImage(reader=DicomSeriesReader(), image_only=True)(GE_TILTED)


def test_series_selection_by_each_rule(tmp_path):
    values = synthetic_values()
    write_synthetic_series(tmp_path / "ct", values, modality="CT", series_number=3, description="CT HEAD")
    write_synthetic_series(tmp_path / "mr", values + 7, modality="MR", series_number=4, description="T1 MPRAGE")
    mr_uid = pydicom.dcmread(next((tmp_path / "mr").iterdir())).SeriesInstanceUID
    expected_mr = values.astype(np.float32) + 7 - 1024

    by_hash = scan_dicom_series(tmp_path, SeriesSelection(modality="MR")).label.split("#")[1].rstrip(")")
    for selection in (
        SeriesSelection(modality="mr"),
        SeriesSelection(description="mprage"),
        SeriesSelection(series_number=4),
        SeriesSelection(series_uid=mr_uid),
        SeriesSelection(series_uid=f"#{by_hash}"),
        {"modality": "MR"},
    ):
        np.testing.assert_array_equal(read_dicom_series(tmp_path, selection).numpy(), expected_mr)

    with pytest.raises(SeriesSelectionError, match="no series matches"):
        read_dicom_series(tmp_path, SeriesSelection(modality="PT"))
    with pytest.raises(SeriesSelectionError, match="2 series match"):
        read_dicom_series(tmp_path, SeriesSelection(description="."))


def test_enhanced_multiframe_ct_matches_highdicom_volume():
    path = pydicom_test_file("eCT_Supplemental.dcm")
    volume = read_dicom_series(path)
    reference = hd.imread(path).get_volume(apply_real_world_transform=False)

    # highdicom: (slice, row, column) indices, LPS, slices in its own order. Ours: (column, row, slice), RAS,
    # slices ascending along row x column cosines, which for this file runs against highdicom's order.
    array = reference.array.transpose(2, 1, 0)
    affine = reference.affine[:, [2, 1, 0, 3]]
    normal = np.cross(affine[:3, 0], affine[:3, 1])
    if normal @ affine[:3, 2] < 0:
        array = array[:, :, ::-1]
        affine[:3, 3] += affine[:3, 2] * (array.shape[2] - 1)
        affine[:3, 2] *= -1
    affine[:2] *= -1  # LPS -> RAS
    assert volume.shape == (512, 512, 2)
    np.testing.assert_array_equal(volume.numpy(), array.astype(np.float32))
    np.testing.assert_allclose(volume.affine.numpy(), affine, atol=1e-6)


def test_missing_slice_is_interpolated_linearly_when_resampling_is_asked(tmp_path):
    values = synthetic_values()
    write_synthetic_series(tmp_path, values)
    (tmp_path / "slice_04.dcm").unlink()

    volume = read_dicom_series(tmp_path, resample=True)

    assert volume.shape == (16, 16, 8) and volume.meta["resampled"]
    expected = values.astype(np.float32) - 1024  # the values are linear along k: interpolation is exact
    np.testing.assert_allclose(volume.numpy(), expected, atol=1e-3)
    assert volume.affine[2, 2] == pytest.approx(2.5)


@requires_shared_data
def test_tilted_series_resampling_matches_simpleitk_on_the_sheared_lattice(tmp_path):
    # Slices 1-14 are evenly spaced but sheared by the 18.5 degree tilt: a lattice SimpleITK can hold
    # with a non-orthogonal direction matrix and resample independently of our reader.
    for name in [f"{n:02d}.dcm" for n in range(1, 15)]:
        (tmp_path / name).symlink_to(GE_TILTED / name)
    volume = read_dicom_series(tmp_path, resample=True)

    headers = [pydicom.dcmread(tmp_path / f"{n:02d}.dcm") for n in range(1, 15)]
    stack = np.stack([h.pixel_array.astype(np.float32) for h in headers])  # (k, row, column)
    lattice = sitk.GetImageFromArray(stack)
    first, last = (np.array(h.ImagePositionPatient, dtype=float) for h in (headers[0], headers[-1]))
    step = (last - first) / 13
    orientation = np.array(headers[0].ImageOrientationPatient, dtype=float)
    lattice.SetOrigin(first.tolist())
    lattice.SetSpacing([*map(float, headers[0].PixelSpacing[::-1]), float(np.linalg.norm(step))])
    directions = np.column_stack([orientation[:3], orientation[3:], step / np.linalg.norm(step)])
    lattice.SetDirection(directions.ravel().tolist())
    affine_lps = volume.affine.numpy().copy()
    affine_lps[:2] *= -1
    spacing = np.linalg.norm(affine_lps[:3, :3], axis=0)
    expected = sitk.Resample(
        lattice,
        list(volume.shape),
        sitk.Transform(),
        sitk.sitkLinear,
        affine_lps[:3, 3].tolist(),
        spacing.tolist(),
        (affine_lps[:3, :3] / spacing).ravel().tolist(),
        float("nan"),
    )
    expected = sitk.GetArrayFromImage(expected).transpose(2, 1, 0)

    assert volume.shape[1] > 512  # the grid grew to hold every sheared slice
    normal = np.cross(orientation[:3], orientation[3:])
    np.testing.assert_allclose(spacing, [0.4882812, 0.4882812, abs(step @ normal)], atol=1e-6)
    covered = ndimage.binary_erosion(np.isfinite(expected), iterations=2)
    assert covered.mean() > 0.5
    np.testing.assert_allclose(volume.numpy()[covered], expected[covered], atol=0.1)  # HU, float32 rounding


@pytest.mark.parametrize("marked_by", ["ImageType", "Siemens private NumberOfImagesInMosaic"])
def test_lone_siemens_mosaic_is_refused(tmp_path, marked_by):
    files = write_synthetic_series(tmp_path, synthetic_values(count=1), modality="MR")
    ds = pydicom.dcmread(files[0])
    if marked_by == "ImageType":
        ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND", "MOSAIC"]
    else:
        ds.private_block(0x0019, "SIEMENS MR HEADER", create=True).add_new(0x0A, "US", 16)
    ds.save_as(files[0])

    for resample in (False, True):
        with pytest.raises(GeometryError, match=r"series 5 'SYNTH AX'.*slice_00\.dcm: a Siemens mosaic") as caught:
            read_dicom_series(tmp_path, resample=resample)
        assert "dcm2niix" in str(caught.value)  # says how to unpack it


def resampling_reference(files: list[Path], volume: MetaTensor) -> np.ndarray:
    """Independent resampling of a parallel-slice series onto ``volume``'s grid (NaN where no slice covers).

    scipy's ``RegularGridInterpolator`` samples every slice bilinearly at the orthogonal projection of
    the grid voxels; along the normal the two enclosing slices are blended linearly, and a grid plane
    within 1 µm of a slice takes that slice alone.
    """
    from scipy.interpolate import RegularGridInterpolator

    headers = [pydicom.dcmread(f) for f in files]
    affine = volume.affine.numpy().copy()
    affine[:2] *= -1  # RAS -> LPS, as the positions are
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    row_cosines, column_cosines, normal = (affine[:3, :3] / spacing).T
    positions = np.array([h.ImagePositionPatient for h in headers], dtype=float)
    order = np.argsort(positions @ normal)
    headers, positions = [headers[k] for k in order], positions[order]
    distances = (positions - affine[:3, 3]) @ normal
    columns, rows, depth = volume.shape
    i, j = np.meshgrid(np.arange(columns), np.arange(rows), indexing="ij")

    def sample(k: int, s: int) -> np.ndarray:
        world = affine[:3, 3] + np.stack([i, j, np.full_like(i, s)], -1) @ affine[:3, :3].T
        offset = world - positions[k]
        plane = headers[k].pixel_array * float(headers[k].RescaleSlope) + float(headers[k].RescaleIntercept)
        row_spacing, column_spacing = map(float, headers[k].PixelSpacing)
        interpolate = RegularGridInterpolator(
            (np.arange(plane.shape[0]), np.arange(plane.shape[1])), plane, bounds_error=False, fill_value=np.nan
        )
        return interpolate(np.stack([offset @ column_cosines / row_spacing, offset @ row_cosines / column_spacing], -1))

    reference = np.empty(volume.shape)
    for s in range(depth):
        target = s * spacing[2]
        on_slice = np.flatnonzero(np.abs(distances - target) < 1e-3)
        if on_slice.size:
            reference[:, :, s] = sample(on_slice[0], s)
        else:
            above = int(np.searchsorted(distances, target))
            weight = (target - distances[above - 1]) / (distances[above] - distances[above - 1])
            reference[:, :, s] = (1 - weight) * sample(above - 1, s) + weight * sample(above, s)
    return reference


def assert_matches_resampling_reference(volume: MetaTensor, reference: np.ndarray, atol: float) -> None:
    """Every voxel a slice covers has the reference's value; only uncovered ones get the fill (the minimum)."""
    covered = np.isfinite(reference)
    result = volume.numpy()
    error = np.abs(result[covered] - reference[covered])
    assert not (error > atol).any(), f"{(error > atol).sum()} covered voxels off by up to {error.max()}"
    np.testing.assert_array_equal(result[~covered], np.float32(reference[covered].min()))


def test_sheared_uneven_stack_keeps_every_slice_edge_when_resampling(tmp_path):
    # Slices 0.7 mm apart along z (one missing), each shifted one row further in y: a sheared, uneven
    # stack. The last grid plane lies on the last slice (weight 1) and others within rounding of a
    # slice; the rows only one slice covers must keep that slice's values. Values are linear in world
    # position (i + 20 * y + 400 * z / 0.7), so the interpolation is exact wherever a slice covers.
    heights = [0, 1, 2, 4, 5, 6]  # in units of 0.7 mm
    i, j = np.meshgrid(np.arange(16), np.arange(16), indexing="ij")
    values = np.stack([i + 20 * (j + m) + 400 * m for m in heights], -1).astype(np.int16)
    files = write_synthetic_series(
        tmp_path, values, spacing=(1.0, 1.0), step=0.7, rescale=(1.0, 0.0),
        positions=[(0.0, float(m), round(0.7 * m, 6)) for m in heights],
    )
    volume = read_dicom_series(tmp_path, resample=True)

    assert volume.shape == (16, 16 + 6, 7)
    reference = resampling_reference(files, volume)
    assert np.isfinite(reference[:, :, -1]).sum() == 16 * 16  # the last plane: all of the last slice
    assert_matches_resampling_reference(volume, reference, atol=1e-3)
    y = np.arange(22)[None, :, None]  # the grid's rows are world y in mm
    exact = (np.arange(16)[:, None, None] + 20 * y + 400 * np.arange(7)[None, None, :]).astype(np.float32)
    covered = np.isfinite(reference)
    np.testing.assert_allclose(volume.numpy()[covered], exact[np.broadcast_to(covered, exact.shape)], atol=1e-3)


@requires_shared_data
def test_real_tilted_uneven_series_resampling_matches_an_independent_reference_to_the_edge():
    files = sorted(GE_TILTED.glob("*.dcm"))
    volume = read_dicom_series(GE_TILTED, resample=True)

    reference = resampling_reference(files, volume)
    assert 0.4 < np.isfinite(reference).mean() < 1.0  # the grid holds the sheared slices and their edges
    assert_matches_resampling_reference(volume, reference, atol=1e-3)  # HU; float32 rounding and 1e-6 weights


def test_logs_and_warnings_carry_no_paths_or_patient_data(tmp_path, caplog, monkeypatch):
    folder = tmp_path / "Doe_Jane_1970"
    files = write_synthetic_series(folder)
    (folder / "notes.txt").write_text("not a DICOM file")
    ds = pydicom.dcmread(files[0])
    monkeypatch.setattr(pydicom.config.settings, "writing_validation_mode", pydicom.config.IGNORE)
    ds.PatientBirthDate = "1970010x"  # an invalid DA, which pydicom's warnings would quote
    ds.save_as(files[0])
    monkeypatch.undo()

    caplog.clear()
    with caplog.at_level(logging.DEBUG), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        info = scan_dicom_series(folder)
        volume = read_dicom_series(info)
        write_derived_ct_series(volume, info, tmp_path / "Doe_Jane_sct", "model", "1")

    assert any("not DICOM" in record.getMessage() for record in caplog.records)
    texts = [record.getMessage() for record in caplog.records] + [str(w.message) for w in caught]
    for text in texts:
        assert str(tmp_path) not in text and "Doe" not in text and "1970" not in text
    written = pydicom.dcmread(tmp_path / "Doe_Jane_sct" / "0001.dcm")
    assert written.PatientName == PATIENT_NAME  # copied into the file, just never logged
