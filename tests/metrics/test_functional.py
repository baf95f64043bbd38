"""Hand-checked values and published definitions of the clinical metrics (drdd_med.metrics.functional)."""

import math

import numpy as np
import pytest
import torch
from scipy.signal import fftconvolve
from skimage.metrics import peak_signal_noise_ratio, structural_similarity
from skimage.util import crop

from drdd_med.errors import DRDDInputError, GridMismatchError, NonFiniteError
from drdd_med.metrics import functional as F


def phantom(shape=(32, 28, 24), seed=0, noise=60.0):
    """A CT-like volume (air outside, soft tissue, a bone shell), its body mask, and a noisy prediction."""
    rng = np.random.default_rng(seed)
    grid = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    radius = np.sqrt(sum(g**2 for g in grid))
    ct = np.where(radius < 0.8, 40.0, -1000.0)
    ct[(radius > 0.6) & (radius < 0.7)] = 1200.0
    ct = np.clip(ct + rng.normal(0, 15, shape), -1000, 2000)  # inside every clip range
    mask = radius < 0.85
    sct = ct + rng.normal(0, noise, shape)
    return sct.astype(np.float32), ct.astype(np.float32), mask


# --- SynthRAD2023: MAE, PSNR -----------------------------------------------------------------------


def test_constant_offset_gives_exact_mae_and_psnr():
    _, ct, mask = phantom()
    sct = ct + 25.0
    assert F.synthrad2023_mae(sct, ct, mask) == pytest.approx(25.0, abs=1e-4)
    # inside [-1024, 3000] clipping changes nothing: MSE = 25^2, data range 4024
    assert F.synthrad2023_psnr(sct, ct, mask) == pytest.approx(10 * math.log10(4024**2 / 25**2), abs=1e-4)
    assert F.synthrad2023_psnr(sct, ct, mask, clip=F.SYNTHRAD2025_CLIP) == pytest.approx(
        10 * math.log10(4095**2 / 25**2), abs=1e-4
    )


def test_mae_is_not_clipped_but_psnr_is():
    ct = np.full((8, 8, 8), 2900.0)
    sct = ct + 1000.0  # 3900 HU: clipped to 3000 for PSNR
    assert F.synthrad2023_mae(sct, ct) == pytest.approx(1000.0)
    assert F.synthrad2023_psnr(sct, ct) == pytest.approx(10 * math.log10(4024**2 / 100**2))


def test_psnr_matches_skimage_on_mask_voxels():
    sct, ct, mask = phantom()
    expected = peak_signal_noise_ratio(
        np.clip(ct, -1024, 3000)[mask].astype(np.float64), np.clip(sct, -1024, 3000)[mask].astype(np.float64),
        data_range=4024,
    )
    assert F.synthrad2023_psnr(sct, ct, mask) == pytest.approx(expected, rel=1e-6)


def test_identical_volumes():
    _, ct, mask = phantom()
    assert F.synthrad2023_mae(ct, ct, mask) == 0.0
    assert F.synthrad2023_psnr(ct, ct, mask) == math.inf
    assert F.synthrad2023_ssim(ct, ct, mask) == pytest.approx(1.0, abs=1e-6)
    assert F.synthrad2025_ms_ssim(ct, ct, mask) == pytest.approx(1.0, abs=1e-6)


# --- SynthRAD2023: SSIM ----------------------------------------------------------------------------


def shifted(volume, mask, low=-1024.0, high=3000.0):
    """The SynthRAD2023 preprocessing, written out: clip, background to `low`, shift to >= 0."""
    volume = np.clip(volume.astype(np.float64), low, high)
    if mask is not None:
        volume = np.where(mask, volume, low)
    return volume - low


def test_ssim_without_mask_equals_skimage_3d_and_2d():
    sct, ct, _ = phantom()
    expected = structural_similarity(shifted(ct, None), shifted(sct, None), data_range=4024)
    assert F.synthrad2023_ssim(sct, ct) == pytest.approx(expected, abs=1e-6)
    ct2d, sct2d = ct[:, :, 12], sct[:, :, 12]
    expected2d = structural_similarity(shifted(ct2d, None), shifted(sct2d, None), data_range=4024)
    assert F.synthrad2023_ssim(sct2d, ct2d) == pytest.approx(expected2d, abs=1e-6)


def test_masked_ssim_is_the_mask_mean_of_the_skimage_map_after_a_3_voxel_crop():
    sct, ct, mask = phantom()
    _, ssim_map = structural_similarity(shifted(ct, mask), shifted(sct, mask), data_range=4024, full=True)
    expected = crop(ssim_map, 3)[crop(mask, 3)].mean()
    assert F.synthrad2023_ssim(sct, ct, mask) == pytest.approx(expected, abs=1e-6)
    expected_no_crop = ssim_map[mask].mean()
    assert F.synthrad2023_ssim(sct, ct, mask, border=0) == pytest.approx(expected_no_crop, abs=1e-6)


def test_ssim_clip_range_is_applied():
    _, ct, mask = phantom()
    sct = ct.copy()
    bone = ct > 1000
    ct[bone], sct[bone] = 3500.0, 3050.0  # equal once clipped to 3000, different below 3071
    assert F.synthrad2023_ssim(sct, ct, mask) == pytest.approx(1.0, abs=1e-6)
    assert F.synthrad2023_psnr(sct, ct, mask) == math.inf
    assert F.synthrad2023_ssim(sct, ct, mask, clip=(-1024, 3071)) < 1 - 1e-5
    assert F.synthrad2023_mae(sct, ct, mask) > 0  # MAE is never clipped


def test_mask_only_in_the_cropped_border_is_an_error():
    sct, ct, _ = phantom()
    mask = np.zeros(ct.shape, dtype=bool)
    mask[:3] = True
    with pytest.raises(DRDDInputError, match="3-voxel border"):
        F.synthrad2023_ssim(sct, ct, mask, case="1BA001")
    assert F.synthrad2023_ssim(sct, ct, mask, border=0) > 0


def test_mask_excludes_a_corrupted_region_entirely():
    sct, ct, mask = phantom()
    corrupted = sct.copy()
    corrupted[~mask] = np.random.default_rng(1).uniform(-3000, 5000, int((~mask).sum()))
    for metric in (F.synthrad2023_mae, F.synthrad2023_psnr, F.synthrad2023_ssim, F.synthrad2025_ms_ssim):
        assert metric(corrupted, ct, mask) == pytest.approx(metric(sct, ct, mask), abs=1e-6), metric.__name__
    assert F.tissue_mae(corrupted, ct, mask) == pytest.approx(F.tissue_mae(sct, ct, mask))
    assert F.windowed_rmse(corrupted, ct, "corediff", mask) == pytest.approx(F.windowed_rmse(sct, ct, "corediff", mask))


# --- SynthRAD2025: MS-SSIM -------------------------------------------------------------------------


def test_published_constants():
    assert F.MS_SSIM_WEIGHTS == (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
    assert F.SYNTHRAD2023_CLIP == (-1024.0, 3000.0)
    assert F.SYNTHRAD2025_CLIP == (-1024.0, 3071.0)


@pytest.mark.parametrize("shape", [(8, 9, 10), (97, 5, 6)])
def test_downsampling_is_the_published_fftconvolve_same_then_every_other_voxel(shape):
    volume = np.random.default_rng(0).uniform(0, 4000, shape)
    expected = fftconvolve(volume, np.ones((2, 2, 2)) / 8, mode="same")[::2, ::2, ::2]
    np.testing.assert_allclose(F._downsample(volume), expected, atol=1e-8)


def ms_ssim_as_published(ct, sct, mask, low=-1024.0, high=3071.0):
    """SynthRAD2025 masked MS-SSIM written from its description with scikit-image and scipy."""
    x, y = shifted(ct, mask, low, high), shifted(sct, mask, low, high)
    pad = [((97 - n) // 2, 97 - n - (97 - n) // 2) if n < 97 else (0, 0) for n in ct.shape]
    x, y, m = (np.pad(v, pad, mode="edge") for v in (x, y, mask.astype(float)))
    means = []
    for weight in F.MS_SSIM_WEIGHTS:
        _, ssim_map = structural_similarity(x, y, data_range=high - low, full=True)
        level = np.clip(ssim_map, 0, None) ** weight
        means.append(crop(level, 3)[crop(m, 3).astype(bool)].mean())
        x, y = (fftconvolve(v, np.ones((2, 2, 2)) / 8, mode="same")[::2, ::2, ::2] for v in (x, y))
        m = m[::2, ::2, ::2]
    return np.prod(np.clip(means, 0, 1))


def test_ms_ssim_follows_the_published_procedure():
    sct, ct, mask = phantom(shape=(40, 36, 30), noise=300.0)
    value = F.synthrad2025_ms_ssim(sct, ct, mask)
    assert 0.5 < value < 0.99
    assert value == pytest.approx(ms_ssim_as_published(ct, sct, mask), abs=1e-5)


def test_ms_ssim_clip_range_is_a_parameter():
    _, ct, mask = phantom()
    sct = ct.copy()
    bone = ct > 1000
    ct[bone], sct[bone] = 3060.0, 3010.0
    assert F.synthrad2025_ms_ssim(sct, ct, mask, clip=(-1024, 3000)) == pytest.approx(1.0, abs=1e-6)
    assert F.synthrad2025_ms_ssim(sct, ct, mask) < 1.0


@pytest.mark.parametrize("bone_hu", [1200.0, 3050.0])  # shared full-resolution statistics, then not
def test_ssim_and_ms_ssim_together_equal_the_separate_functions(bone_hu):
    sct, ct, mask = phantom(shape=(97, 98, 97), noise=200.0)
    ct[ct > 1000] = bone_hu
    both = F.synthrad_structural_similarity(sct, ct, mask)
    assert both["ssim"] == pytest.approx(F.synthrad2023_ssim(sct, ct, mask), abs=1e-12)
    assert both["ms_ssim"] == pytest.approx(F.synthrad2025_ms_ssim(sct, ct, mask), abs=1e-12)


def test_axis_order_does_not_matter():  # folder evaluation scores (k, j, i) views of (i, j, k) volumes
    sct, ct, mask = phantom(shape=(30, 26, 22), noise=200.0)
    for metric in (F.synthrad2023_ssim, F.synthrad2025_ms_ssim, F.synthrad2023_psnr):
        assert metric(sct.T, ct.T, mask.T) == pytest.approx(metric(sct, ct, mask), abs=1e-7), metric.__name__


def test_ms_ssim_needs_3d():
    with pytest.raises(DRDDInputError, match="3D"):
        F.synthrad2025_ms_ssim(np.zeros((16, 16)), np.zeros((16, 16)))


# --- low-dose CT windows ---------------------------------------------------------------------------


def test_hu_windows_are_the_published_conventions():
    assert F.HU_WINDOWS["redcnn"] == (-160, 240)
    assert F.HU_WINDOWS["corediff"] == (-1000, 1000)
    assert F.HU_WINDOWS["abdomen"] == (50 - 200, 50 + 200)
    assert F.HU_WINDOWS["chest"] == (-600 - 750, -600 + 750)
    assert F.HU_WINDOWS["neuro"] == (40 - 40, 40 + 40)


def test_windowed_metrics_clip_to_the_window():
    ref = np.full((16, 16), 100.0)
    ref[:8] = -1000.0  # below every soft-tissue window
    pred = ref + 30.0
    # abdomen window [-150, 250]: -1000 and -970 both clip to -150, only the lower half differs by 30
    assert F.windowed_rmse(pred, ref, "abdomen") == pytest.approx(math.sqrt(30**2 / 2))
    assert F.windowed_psnr(pred, ref, "abdomen") == pytest.approx(10 * math.log10(400**2 / (30**2 / 2)))
    assert F.windowed_rmse(pred, ref, (-2000, 2000)) == pytest.approx(30.0)
    assert F.windowed_psnr(pred, ref, "neuro") == math.inf  # 100 and 130 both clip to 80


def test_windowed_psnr_and_ssim_equal_skimage_on_images_mapped_to_0_1():
    sct, ct, _ = phantom()
    low, high = F.HU_WINDOWS["abdomen"]
    unit = [(np.clip(v[:, :, 12].astype(np.float64), low, high) - low) / (high - low) for v in (ct, sct)]
    assert F.windowed_psnr(sct[:, :, 12], ct[:, :, 12], "abdomen") == pytest.approx(
        peak_signal_noise_ratio(*unit, data_range=1.0), rel=1e-6
    )
    assert F.windowed_ssim(sct[:, :, 12], ct[:, :, 12], "abdomen") == pytest.approx(
        structural_similarity(*unit, data_range=1.0), abs=1e-6
    )


def test_unknown_window_is_an_error():
    with pytest.raises(DRDDInputError, match="unknown HU window"):
        F.windowed_psnr(np.zeros((8, 8)), np.zeros((8, 8)), "liver")
    with pytest.raises(DRDDInputError, match="low < high"):
        F.windowed_rmse(np.zeros((8, 8)), np.zeros((8, 8)), (240, -160))


# --- tissue classes --------------------------------------------------------------------------------


def test_tissue_mae_by_reference_class_with_inclusive_soft_tissue_bounds():
    ref = np.array([-1000.0, -201.0, -200.0, 40.0, 300.0, 301.0, 1500.0])
    pred = ref + np.array([10.0, 20.0, 1.0, 2.0, 3.0, 40.0, 50.0])
    assert F.tissue_mae(pred, ref) == pytest.approx({"air": 15.0, "soft_tissue": 2.0, "bone": 45.0})
    mask = ref < 0
    assert F.tissue_mae(pred, ref, mask) == {"air": 15.0, "soft_tissue": 1.0, "bone": None}


# --- input checks ----------------------------------------------------------------------------------


def test_shape_mismatch_names_the_case():
    with pytest.raises(GridMismatchError, match="1BA001: prediction shape"):
        F.synthrad2023_mae(np.zeros((8, 8, 8)), np.zeros((8, 8, 9)), case="1BA001")
    with pytest.raises(GridMismatchError, match="mask shape"):
        F.synthrad2023_ssim(np.zeros((8, 8, 8)), np.zeros((8, 8, 8)), np.ones((8, 8, 7)))


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_values_are_an_error_even_outside_the_mask(bad):
    sct, ct, mask = phantom()
    sct[0, 0, 0] = bad
    assert not mask[0, 0, 0]
    for metric in (F.synthrad2023_mae, F.synthrad2023_psnr, F.synthrad2023_ssim, F.synthrad2025_ms_ssim):
        with pytest.raises(NonFiniteError, match="1BA001: prediction has 1 NaN or infinite"):
            metric(sct, ct, mask, case="1BA001")


def test_empty_mask_is_an_error():
    sct, ct, _ = phantom()
    with pytest.raises(DRDDInputError, match="mask is empty"):
        F.synthrad2023_mae(sct, ct, np.zeros(ct.shape))


def test_torch_tensors_are_accepted():
    sct, ct, mask = phantom()
    assert F.synthrad2023_ssim(torch.from_numpy(sct), torch.from_numpy(ct), torch.from_numpy(mask)) == pytest.approx(
        F.synthrad2023_ssim(sct, ct, mask)
    )
