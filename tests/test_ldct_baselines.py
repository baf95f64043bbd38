"""The classical low-dose CT denoisers that the drdd_ldct bundle is scored against."""

import numpy as np
import pytest

from drdd_med.baselines import classical_denoise, estimate_noise_sigma
from drdd_med.data.demo import generate_head_phantom
from drdd_med.errors import DRDDInputError, NonFiniteError
from drdd_med.metrics.functional import windowed_rmse


@pytest.fixture(scope="module")
def noisy_phantom():
    phantom = generate_head_phantom(3, shape=(64, 64, 4), spacing=(3.0, 3.0, 6.0))
    clean = phantom["ct"]
    noisy = clean + np.random.default_rng(0).normal(0.0, 60.0, clean.shape).astype(np.float32)
    return clean, noisy, phantom["mask"]


def test_noise_estimate_finds_white_noise_under_smooth_structure():
    x = np.linspace(-1, 1, 128)
    smooth = 300.0 * np.exp(-(x[:, None] ** 2 + x[None, :] ** 2) * 3) - 1000.0
    noise = np.random.default_rng(1).normal(0.0, 25.0, smooth.shape)
    assert estimate_noise_sigma(smooth) < 1.0
    assert estimate_noise_sigma(smooth + noise) == pytest.approx(25.0, rel=0.1)


@pytest.mark.parametrize("method", ["nlm", "tv"])
def test_denoising_reduces_the_error_in_the_abdomen_window(noisy_phantom, method):
    clean, noisy, mask = noisy_phantom
    before = windowed_rmse(noisy, clean, "abdomen", mask)
    after = windowed_rmse(classical_denoise(noisy, method), clean, "abdomen", mask)
    assert after < 0.7 * before, (before, after)


@pytest.mark.parametrize("method", ["nlm", "tv"])
def test_strength_scales_the_smoothing(noisy_phantom, method):
    _, noisy, _ = noisy_phantom
    residual = [np.std(noisy - classical_denoise(noisy, method, strength)) for strength in (0.5, 2.0)]
    assert residual[0] < residual[1]


def test_shape_and_dtype_are_kept_for_volumes_and_slices(noisy_phantom):
    _, noisy, _ = noisy_phantom
    for image in (noisy, noisy[..., 0], noisy.astype(np.float64)):
        out = classical_denoise(image, "nlm")
        assert out.shape == image.shape and out.dtype == np.float32
    np.testing.assert_array_equal(classical_denoise(noisy[..., 1], "tv"), classical_denoise(noisy, "tv")[..., 1])


def test_a_noiseless_constant_slice_is_returned_unchanged():
    image = np.full((32, 32), -1000.0, dtype=np.float32)
    np.testing.assert_array_equal(classical_denoise(image, "nlm"), image)


def test_bad_input(noisy_phantom):
    _, noisy, _ = noisy_phantom
    broken = noisy.copy()
    broken[3, 3, 1] = np.nan
    with pytest.raises(NonFiniteError, match="NaN"):
        classical_denoise(broken)
    with pytest.raises(DRDDInputError, match="Hounsfield"):
        classical_denoise(np.abs(noisy) + 10.0)  # positive intensities only, like MR: not HU
    with pytest.raises(DRDDInputError, match="shape"):
        classical_denoise(noisy[0, 0])
    with pytest.raises(ValueError, match="method"):
        classical_denoise(noisy, "bm3d")
    with pytest.raises(ValueError, match="strength"):
        classical_denoise(noisy, "tv", strength=0)
