"""The CBCT simulator, measured on synthetic phantoms against published CBCT characteristics (``docs/cbct.md``).

Water cylinders of 200 and 300 mm (head- and pelvis-sized) and a pelvis-like ellipse with two
femoral heads, on 128 x 128 grids with the default CBCT geometry.
"""

import numpy as np
import pytest
import torch

from drdd_med.cbct import OUTSIDE_FOV_HU, cbct_geometry, scatter_intensity, simulate_cbct
from drdd_med.errors import DRDDInputError, NonFiniteError
from drdd_med.ldct import forward_project, hu_to_mu, low_dose_noise

N = 128
NOISE_FREE = {"incident_photons": 1e9, "electronic_noise_counts": 0.0}
COARSE = {"n_views": 164, "detector_pitch_mm": 4 * 0.776}  # for the mechanics: a quarter of the views and channels
CALIBRATED = {"hu_scale": 1.0, "hu_offset": 0.0}


def coordinates(spacing):
    x = (np.arange(N) - (N - 1) / 2) * spacing
    return np.meshgrid(x, x, indexing="ij")


def water_cylinder(diameter_mm, spacing=2.5):
    """A water cylinder in air, one slice ``(N, N, 1)``, and the pixels' distance from its axis."""
    x, y = coordinates(spacing)
    radius = np.hypot(x, y)
    return np.where(radius < diameter_mm / 2, 0.0, -1000.0).astype(np.float32)[:, :, None], radius


def pelvis(spacing=3.0, femoral_heads=True):
    """A 360 x 240 mm ellipse of soft tissue in a fat rim, with two 50 mm bone disks 180 mm apart."""
    x, y = coordinates(spacing)
    image = np.full((N, N), -1000.0, dtype=np.float32)
    image[(x / 180) ** 2 + (y / 120) ** 2 < 1] = -100
    image[(x / 170) ** 2 + (y / 110) ** 2 < 1] = 40
    if femoral_heads:
        for centre in (-90, 90):
            image[(x - centre) ** 2 + y**2 < 25**2] = 1000
    return image[:, :, None], x, y


def central_spr(diameter_mm, spacing=2.5):
    """SPR on the central channel behind a water cylinder, from the simulator's own projections."""
    volume, _ = water_cylinder(diameter_mm, spacing)
    geometry = cbct_geometry()
    p = forward_project(hu_to_mu(torch.from_numpy(volume)), (spacing, spacing), geometry)
    scatter = scatter_intensity(p, geometry)
    centre = geometry.n_channels // 2
    return (scatter[:, centre, 0] / torch.exp(-p[:, centre, 0])).mean().item()


def cupping_hu(diameter_mm, **kwargs):
    """Periphery (80-90 % of the radius) minus centre (inner 20 mm) mean HU of a simulated water cylinder."""
    volume, radius = water_cylinder(diameter_mm)
    cbct = simulate_cbct(volume, (2.5, 2.5), **NOISE_FREE, **CALIBRATED, **kwargs)
    periphery = (radius > 0.8 * diameter_mm / 2) & (radius < 0.9 * diameter_mm / 2)
    return cbct[periphery].mean() - cbct[radius < 20].mean()


# --- Published characteristics -------------------------------------------------------------------


def test_scatter_to_primary_ratio_grows_with_object_size_within_published_range():
    """Siewerdsen & Jaffray 2001: SPR grows with object size, from ~0.1 to above 1 for large fields."""
    head, pelvis_size = central_spr(200), central_spr(300)
    assert 0.3 < head < 1.0, head
    assert 1.0 < pelvis_size < 3.0, pelvis_size
    assert pelvis_size > 2 * head


def test_scatter_behind_a_uniform_200_mm_of_water_is_the_reference_ratio():
    p = torch.full((1, cbct_geometry().n_channels, 1), 200 * 0.0193)
    scatter = scatter_intensity(p, cbct_geometry(), scatter_to_primary=0.7, scatter_kernel_mm=50)
    centre = p.shape[1] // 2
    assert (scatter[0, centre, 0] / torch.exp(-p[0, centre, 0])).item() == pytest.approx(0.7, rel=1e-3)


def test_scatter_cups_a_water_cylinder_more_the_larger_it_is():
    """Uncorrected CBCT: the centre darker than the periphery, by 100-300 HU for a pelvis-sized cylinder."""
    head, pelvis_size = cupping_hu(200), cupping_hu(300)
    assert 50 < head < pelvis_size, (head, pelvis_size)
    assert 100 < pelvis_size < 300, pelvis_size
    assert abs(cupping_hu(300, scatter_to_primary=0.0, **COARSE)) < 10  # the cupping is the scatter's


def test_scatter_darkens_the_tissue_between_dense_objects():
    """Dark streaks between the femoral heads: what the bones add, along the line joining them and beside it."""
    with_bone, x, y = pelvis()
    without_bone, _, _ = pelvis(femoral_heads=False)

    def bone_effect(**kwargs):
        kwargs = {**NOISE_FREE, **CALIBRATED, **kwargs}
        effect = simulate_cbct(with_bone, (3.0, 3.0), **kwargs) - simulate_cbct(without_bone, (3.0, 3.0), **kwargs)
        between = (np.abs(y) < 8) & (np.abs(x) < 50)
        beside = (np.abs(x) < 8) & (np.abs(y) > 30) & (np.abs(y) < 80)
        return effect[:, :, 0][between].mean(), effect[:, :, 0][beside].mean()

    between, beside = bone_effect()
    assert between < -30 and abs(beside) < 15, (between, beside)
    between, beside = bone_effect(scatter_to_primary=0.0, **COARSE)
    assert abs(between) < 5 and abs(beside) < 5, (between, beside)


def test_noise_exceeds_that_of_diagnostic_full_dose_ct():
    """Fewer photons per ray: noise in water above that of the same cylinder through the low-dose simulator at full dose."""
    volume, radius = water_cylinder(300)
    centre = radius < 50
    first = simulate_cbct(volume, (2.5, 2.5), seed=1)
    second = simulate_cbct(volume, (2.5, 2.5), seed=2)
    cbct_noise = (first - second)[centre].std() / np.sqrt(2)  # the seeds' difference: noise without cupping
    ct_noise = low_dose_noise(volume, (2.5, 2.5), 1.0, seed=1)[centre].std()
    assert cbct_noise > 1.5 * ct_noise, (cbct_noise, ct_noise)


def test_truncated_field_of_view():
    """A 250 mm field of view on a 360 mm pelvis: -1000 HU outside the circle, a bright rim inside its edge."""
    volume, x, y = pelvis()
    radius = np.hypot(x, y)
    truncated = simulate_cbct(volume, (3.0, 3.0), fov_diameter_mm=250, **NOISE_FREE, **COARSE)[:, :, 0]
    whole = simulate_cbct(volume, (3.0, 3.0), fov_diameter_mm=450, **NOISE_FREE, **COARSE)[:, :, 0]
    outside = radius > cbct_geometry(250, **COARSE).scan_fov_radius_mm  # 250 mm, rounded up to whole channels
    assert np.all(truncated[outside] == OUTSIDE_FOV_HU)
    assert np.all(whole[outside & (volume[:, :, 0] == 40)] > -300)  # the body is there in the whole field
    rim = (radius > 105) & (radius < 120) & (volume[:, :, 0] == 40)
    assert (truncated - whole)[rim].mean() > 100


def test_hu_scale_and_offset_are_applied_inside_the_field_of_view():
    volume, x, y = pelvis()
    inside = np.hypot(x, y) <= cbct_geometry(**COARSE).scan_fov_radius_mm  # 450 mm; the grid's corners are outside
    calibrated = simulate_cbct(volume, (3.0, 3.0), seed=3, **CALIBRATED, **COARSE)
    shifted = simulate_cbct(volume, (3.0, 3.0), seed=3, hu_scale=0.9, hu_offset=50.0, **COARSE)
    np.testing.assert_allclose(shifted[inside], 0.9 * calibrated[inside] + 50, atol=1e-3)
    np.testing.assert_array_equal(shifted[~inside], OUTSIDE_FOV_HU)


# --- Determinism, types, refused input ------------------------------------------------------------


def test_same_seed_same_output_other_seed_other_noise():
    volume = np.repeat(pelvis()[0], 2, axis=2)
    first = simulate_cbct(volume, (3.0, 3.0, 2.0), seed=7, **COARSE)
    again = simulate_cbct(volume, (3.0, 3.0, 2.0), seed=7, **COARSE)
    other = simulate_cbct(volume, (3.0, 3.0, 2.0), seed=8, **COARSE)
    assert isinstance(first, np.ndarray) and first.dtype == np.float32 and first.shape == volume.shape
    np.testing.assert_array_equal(first, again)
    assert np.abs(first - other).mean() > 1


def test_torch_input_gives_torch_output_and_a_single_slice_works():
    volume, _, _ = pelvis()
    output = simulate_cbct(torch.from_numpy(volume), (3.0, 3.0), seed=1, **COARSE)
    assert isinstance(output, torch.Tensor) and output.dtype == torch.float32 and output.shape == volume.shape
    one_slice = simulate_cbct(volume[:, :, 0], (3.0, 3.0), seed=1, **COARSE)
    np.testing.assert_allclose(one_slice, output[:, :, 0].numpy(), atol=1e-3)


@pytest.mark.parametrize(
    "parameter, value",
    [
        ("fov_diameter_mm", 0.0),
        ("fov_diameter_mm", 2500.0),
        ("scatter_to_primary", -0.1),
        ("scatter_kernel_mm", 0.0),
        ("incident_photons", float("nan")),
        ("electronic_noise_counts", -1.0),
        ("hu_scale", 0.0),
        ("hu_offset", float("inf")),
    ],
)
def test_bad_parameters_are_refused_by_name(parameter, value):
    volume, _, _ = pelvis()
    with pytest.raises(DRDDInputError, match=parameter):
        simulate_cbct(volume, (3.0, 3.0), **{parameter: value})


def test_bad_volumes_are_refused_naming_the_volume():
    volume, _, _ = pelvis()
    with pytest.raises(DRDDInputError, match="mr.nii: does not look like CT in Hounsfield units"):
        simulate_cbct(volume + 1000, (3.0, 3.0), name="mr.nii")
    with pytest.raises(DRDDInputError, match="case2: expected axial slices"):
        simulate_cbct(volume[None], (3.0, 3.0), name="case2")
    with pytest.raises(DRDDInputError, match="spacing_mm"):
        simulate_cbct(volume, (0.0, 3.0))
    with pytest.raises(DRDDInputError, match="case2: the image reaches the CBCT source orbit"):
        simulate_cbct(volume, (20.0, 20.0), name="case2")
    broken = volume.copy()
    broken[3, 3, 0] = np.nan
    with pytest.raises(NonFiniteError, match="case2: 1 voxels are NaN"):
        simulate_cbct(broken, (3.0, 3.0), name="case2")


# --- Command line: drdd-med simulate-cbct -------------------------------------------------------------


def run_simulate_cbct(*argv):
    import argparse

    from drdd_med.commands import simulate_cbct as command

    parser = argparse.ArgumentParser()
    command.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["simulate-cbct", *map(str, argv)])
    return args.func(args)


@pytest.fixture
def nifti_ct(tmp_path):
    import nibabel as nib

    volume = np.repeat(pelvis()[0][::2, ::2], 2, axis=2).astype(np.int16)  # 64 x 64 pixels of 6 mm
    affine = np.array([[-6.0, 0, 0, 190], [0, 6.0, 0, -190], [0, 0, 2.5, 30], [0, 0, 0, 1]])
    path = tmp_path / "case1_ct.nii.gz"
    nib.save(nib.Nifti1Image(volume, affine), path)
    return path, volume, affine


def test_cli_round_trip_writes_int16_hu_on_the_input_grid(tmp_path, nifti_ct):
    import nibabel as nib

    from drdd_med.data.readers import load_volume

    source, volume, affine = nifti_ct
    output = tmp_path / "cbct.nii.gz"
    assert run_simulate_cbct(source, output, "--seed", "4", "--fov-mm", "300", "--hu-offset", "20") == 0
    cbct = load_volume(output)
    np.testing.assert_allclose(cbct.affine.numpy(), affine, atol=1e-5)
    expected = simulate_cbct(volume.astype(np.float32), (6.0, 6.0), seed=4, fov_diameter_mm=300, hu_offset=20)
    np.testing.assert_array_equal(cbct.numpy(), np.rint(expected))
    assert nib.load(output).get_data_dtype() == np.int16


def test_cli_refuses_to_overwrite_and_bad_input(tmp_path, nifti_ct):
    import nibabel as nib

    source, volume, affine = nifti_ct
    output = tmp_path / "cbct.nii.gz"
    output.write_bytes(b"keep")
    with pytest.raises(FileExistsError, match="--overwrite"):
        run_simulate_cbct(source, output)
    assert output.read_bytes() == b"keep"
    with pytest.raises(DRDDInputError, match="must end in"):
        run_simulate_cbct(source, tmp_path / "cbct.png")
    with pytest.raises(DRDDInputError, match="scatter_to_primary"):
        run_simulate_cbct(source, tmp_path / "other.nii.gz", "--scatter-to-primary", "-1")
    mr = tmp_path / "case1_mr.nii.gz"
    nib.save(nib.Nifti1Image((volume + 1000).astype(np.int16), affine), mr)
    with pytest.raises(DRDDInputError, match="case1_mr.nii.gz: does not look like CT"):
        run_simulate_cbct(mr, tmp_path / "other.nii.gz")
    assert not (tmp_path / "other.nii.gz").exists()


def test_cli_dicom_series_in_derived_dicom_series_out(tmp_path):
    import copy

    import pydicom
    from pydicom.data import get_testdata_file
    from pydicom.uid import generate_uid

    from drdd_med.data.dicom import read_dicom_series

    source = tmp_path / "series"
    source.mkdir()
    template = pydicom.dcmread(get_testdata_file("CT_small.dcm"))  # a real 128 x 128 CT slice
    series_uid = generate_uid()
    for k in range(2):
        ds = copy.deepcopy(template)
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [-158.135803, -179.035797, -75.699997 + 5 * k]
        ds.save_as(source / f"{k}.dcm", enforce_file_format=True)
    output = tmp_path / "cbct_series"
    assert run_simulate_cbct(source, output) == 0
    ct, cbct = read_dicom_series(source), read_dicom_series(output)
    assert cbct.shape == ct.shape
    np.testing.assert_allclose(cbct.affine.numpy(), ct.affine.numpy(), atol=1e-4)
    assert 5 < float((cbct - ct).std()) < 300
    header = pydicom.dcmread(min(output.glob("*.dcm")), stop_before_pixels=True)
    assert "SYNTHETIC CBCT" in header.SeriesDescription
