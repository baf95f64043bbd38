"""Small DRDD models whose outputs are real, for tests (the fixtures in ``conftest.py`` hand them out).

MONAI's ``DiffusionModelUNet`` zero-initialises its output layer (and the last layer of every block),
so an untrained network returns exactly 0 for any input and time: a test comparing such outputs
compares start noise with start noise and cannot fail. Every test that looks at what a network
contributes uses these instead.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from drdd_med.networks import DRDDNetworks, seeded_initialisation


def make_real_networks(preset: str = "tiny", seed: int = 0, **kwargs) -> DRDDNetworks:
    """``preset`` networks with every layer initialised from ``seed`` (none left at zero)."""
    return seeded_initialisation(DRDDNetworks.from_preset(preset, **kwargs), seed).eval()


def with_zero_predictions(model: DRDDNetworks) -> DRDDNetworks:
    """A copy of ``model`` whose output layers are zero again (MONAI's untrained state): predictions are 0."""
    off = copy.deepcopy(model)
    for net in (off.residual, off.noise):
        torch.nn.init.zeros_(net.out[-1].conv.weight)
        torch.nn.init.zeros_(net.out[-1].conv.bias)
    return off


def save_model(path: Path, seed: int = 0) -> Path:
    """Tiny networks with real (seeded, untrained) outputs, saved as training saves ``model.pt``."""
    model = make_real_networks(seed=seed)
    model.trained_iterations.update(residual=1, noise=1)  # both stages "trained": the default sampler runs both
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return path


def assert_within_fraction_of_contribution(fast, reference, networks_off, fraction: float) -> None:
    """``fast`` is within ``fraction`` of what the networks contribute to ``reference`` (mean absolute).

    ``networks_off`` is the same sampling run with the networks' predictions at zero (the start
    noise carried through), so the bound scales with the networks' own effect, never with the
    noise, and a run whose networks contribute nothing fails the first assertion.
    """
    contribution = (reference - networks_off).abs().mean()
    assert contribution > 0.05 * networks_off.abs().mean(), "the networks contribute (almost) nothing"
    error = (fast - reference).abs().mean()
    assert error <= fraction * contribution, f"error {float(error):.4g} vs contribution {float(contribution):.4g}"
