"""Fixtures shared by the whole suite: small DRDD networks whose outputs are real (``model_fixtures``)."""

import pytest
from model_fixtures import assert_within_fraction_of_contribution, make_real_networks, with_zero_predictions


@pytest.fixture(scope="session")
def real_networks():
    """``real_networks(preset="tiny", seed=0, spatial_dims=..., context_slices=..., ...)``."""
    return make_real_networks


@pytest.fixture(scope="session")
def zero_predictions():
    """``zero_predictions(model)``: a copy whose networks predict 0 (the sampler carries only its noise)."""
    return with_zero_predictions


@pytest.fixture(scope="session")
def contribution_check():
    """``contribution_check(fast, reference, networks_off, fraction)``."""
    return assert_within_fraction_of_contribution
