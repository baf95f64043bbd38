"""CT -> CBCT pairs on the fly: ``SimulateCBCT`` (array) and ``SimulateCBCTd`` (dictionary).

Each call draws a scatter-to-primary ratio and a noise seed from the transform's random state
(``set_random_state`` makes a pipeline reproducible) and returns the simulated CBCT of the CT
(``drdd_med.cbct.simulate_cbct``: scatter, noise, truncated field of view, miscalibrated HU).
Images are channel first ``(C, i, j, k)`` (or ``(C, i, j)``) in HU, axial slices along the last
axis, centred on the isocentre. The in-plane pixel spacing comes from a ``MetaTensor``'s affine, or
from ``spacing_mm`` for plain arrays.

The simulation projects whole axial slices: place it before in-plane crops. The scatter used is
recorded in the output's meta (``cbct_scatter_to_primary``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from monai.config import KeysCollection, NdarrayOrTensor

from drdd_med.cbct import SCATTER_TO_PRIMARY, simulate_cbct
from drdd_med.errors import DRDDInputError
from drdd_med.transforms.ldct import _SimulatedScan, _SimulatedScand

SCATTER_META_KEY = "cbct_scatter_to_primary"


class SimulateCBCT(_SimulatedScan):
    """CT in HU -> the simulated CBCT of the same anatomy, with a random amount of scatter.

    Args:
        scatter_to_primary: a fixed SPR behind 200 mm of water (at least 0), or a range
            ``(low, high)`` drawn uniformly on each call.
        spacing_mm: in-plane pixel spacing for inputs without an affine (numpy, plain tensors).
        device: where to compute (default: where the image is).
        simulator_args: the other physical parameters of ``simulate_cbct`` (``fov_diameter_mm``,
            ``incident_photons``, ``hu_scale``, ...).
    """

    source_tag = "cbct"  # the simulated scan's file name in a held-out case, and its role tag (drdd_med.evaluation)

    def __init__(
        self,
        scatter_to_primary: float | Sequence[float] = SCATTER_TO_PRIMARY,
        spacing_mm: Sequence[float] | None = None,
        device: torch.device | str | None = None,
        **simulator_args,
    ):
        ratios = (scatter_to_primary,) * 2 if np.isscalar(scatter_to_primary) else tuple(scatter_to_primary)
        if len(ratios) != 2 or not 0 <= ratios[0] <= ratios[1]:
            raise DRDDInputError(
                f"scatter_to_primary: give a ratio >= 0 or a range (low, high), got {scatter_to_primary}"
            )
        self.scatter_range = tuple(float(r) for r in ratios)
        self.spacing_mm = spacing_mm
        self.device = device
        self.simulator_args = simulator_args
        self.scatter_to_primary = self.scatter_range[0]
        self.seed = 0

    def randomize(self, data=None) -> None:
        self.scatter_to_primary = float(self.R.uniform(*self.scatter_range))
        self.seed = int(self.R.randint(0, 2**31 - 1))

    def simulate(self, volume_hu: NdarrayOrTensor, spacing_mm: Sequence[float], seed: int,
                 name: str = "volume") -> NdarrayOrTensor:
        """The CBCT of one CT ``(i, j[, k])`` at the current scatter ratio, with the noise of ``seed``."""
        return simulate_cbct(volume_hu, spacing_mm, seed=seed, scatter_to_primary=self.scatter_to_primary,
                             device=self.device, name=name, **self.simulator_args)

    def recipe(self) -> dict:
        """What a held-out scan is simulated with (``drdd_med.data.datalists.prepare_heldout_case``): one
        scatter ratio and the other parameters given (the others are ``simulate_cbct``'s defaults)."""
        if self.scatter_range[0] != self.scatter_range[1]:
            raise DRDDInputError(
                f"scatter_to_primary: a held-out scan is simulated at one ratio, got the range {self.scatter_range}"
            )
        return {"scatter_to_primary": self.scatter_range[0], **self.simulator_args}

    def recorded(self) -> tuple[str, float]:
        return SCATTER_META_KEY, self.scatter_to_primary


class SimulateCBCTd(_SimulatedScand):
    """Dictionary twin of ``SimulateCBCT``: one scatter ratio and seed per call, shared by all ``keys``.

    ``output_key`` (one name, or one per key) keeps the CT and writes the CBCT beside it, e.g.
    ``keys="ct", output_key="cbct"`` for CBCT -> CT training pairs; by default the images are replaced.
    """

    def __init__(
        self,
        keys: KeysCollection,
        scatter_to_primary: float | Sequence[float] = SCATTER_TO_PRIMARY,
        output_key: str | Sequence[str] | None = None,
        allow_missing_keys: bool = False,
        **simulator_args,
    ):
        super().__init__(keys, SimulateCBCT(scatter_to_primary, **simulator_args), output_key, allow_missing_keys)


SimulateCBCTD = SimulateCBCTDict = SimulateCBCTd
