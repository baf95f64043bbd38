"""The per-case monotone intensity baseline."""

import numpy as np
import pytest

from drdd_med.baselines import monotone_intensity_baseline
from drdd_med.data.demo import generate_head_phantom
from drdd_med.errors import DRDDInputError, GridMismatchError, NonFiniteError


def _monotone(values):
    return 1500.0 * np.tanh(3.0 * (values - 0.4)) ** 3 + 100.0 * values


def test_exact_when_target_is_a_monotone_function_of_discrete_source():
    rng = np.random.default_rng(0)
    source = rng.integers(0, 200, size=(20, 20, 20)).astype(np.float32)
    target = np.floor(source / 10.0) * 50.0 - 1000.0  # a staircase: non-decreasing, not strictly
    mask = np.ones(source.shape, dtype=bool)
    np.testing.assert_allclose(monotone_intensity_baseline(source, target, mask), target, atol=1e-3)


def test_near_exact_when_target_is_a_monotone_function_of_continuous_source():
    rng = np.random.default_rng(1)
    source = rng.random((40, 40, 40))
    target = _monotone(source)
    mask = rng.random(source.shape) < 0.7
    predicted = monotone_intensity_baseline(source, target, mask)
    assert np.abs(predicted - target)[mask].mean() < 0.05
    assert np.abs(predicted - target)[~mask].max() < 1.0  # the curve also applies outside the mask


def test_output_is_non_decreasing_in_the_source():
    rng = np.random.default_rng(2)
    source = rng.normal(size=(30, 30, 30))
    target = np.sin(3 * source) * 500 + rng.normal(0, 50, source.shape)  # not monotone at all
    predicted = monotone_intensity_baseline(source, target, np.ones(source.shape, bool), num_bins=64)
    order = np.argsort(source, axis=None)
    assert np.all(np.diff(predicted.ravel()[order]) >= -1e-3)
    assert predicted.dtype == np.float32 and predicted.shape == source.shape


def test_fails_on_a_head_phantom_because_mr_to_ct_is_not_monotone():
    phantom = generate_head_phantom(0)
    inside = phantom["mask"].astype(bool)
    predicted = monotone_intensity_baseline(phantom["mr"], phantom["ct"], inside)
    masked_mae = np.abs(predicted - phantom["ct"])[inside].mean()
    assert masked_mae > 150.0
    assert predicted[inside].mean() == pytest.approx(phantom["ct"][inside].mean(), abs=5.0)  # least squares


def test_rejects_bad_input():
    volume = np.zeros((4, 4, 4))
    with pytest.raises(GridMismatchError):
        monotone_intensity_baseline(volume, np.zeros((4, 4, 5)), np.ones((4, 4, 4)))
    with pytest.raises(DRDDInputError, match="empty"):
        monotone_intensity_baseline(volume, volume, np.zeros((4, 4, 4)))
    with pytest.raises(NonFiniteError):
        monotone_intensity_baseline(np.full((4, 4, 4), np.nan), volume, np.ones((4, 4, 4)))
