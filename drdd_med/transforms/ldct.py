"""Low-dose CT pairs on the fly: ``SimulateLowDose`` (array) and ``SimulateLowDosed`` (dictionary).

Each call draws a dose fraction and a noise seed from the transform's random state
(``set_random_state`` makes a pipeline reproducible) and returns the full-dose CT with the noise of
a scan at that dose (``drdd_med.ldct.simulate_low_dose``). Images are channel first
``(C, i, j, k)`` (or ``(C, i, j)``) in HU, axial slices along the last axis. The in-plane pixel
spacing comes from a ``MetaTensor``'s affine, or from ``spacing_mm`` for plain arrays.

The simulation projects whole axial slices: place it before in-plane crops (a crop along ``k``
first saves time, slices are independent). The dose used is recorded in the output's meta
(``ldct_dose_fraction``), e.g. to condition a model on it.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from monai.config import KeysCollection, NdarrayOrTensor
from monai.data import MetaTensor
from monai.transforms import MapTransform, Randomizable, Transform
from monai.utils import convert_to_dst_type, ensure_tuple_rep

from drdd_med.errors import DRDDInputError
from drdd_med.ldct import (
    ELECTRONIC_NOISE_COUNTS,
    INCIDENT_PHOTONS,
    FanBeamGeometry,
    check_dose_fraction,
    simulate_low_dose,
)

DOSE_META_KEY = "ldct_dose_fraction"


def _name_of(img: NdarrayOrTensor, fallback: str) -> str:
    source = img.meta.get("filename_or_obj") if isinstance(img, MetaTensor) else None
    return Path(str(source)).name if source else fallback


def _in_plane_spacing(img: NdarrayOrTensor, spacing_mm: Sequence[float] | None, name: str) -> tuple[float, float]:
    if isinstance(img, MetaTensor):
        affine = img.affine.detach().cpu().numpy()
        return tuple(float(s) for s in np.linalg.norm(affine[:-1, :2], axis=0))
    if spacing_mm is None:
        raise DRDDInputError(f"{name}: no pixel spacing; give a MetaTensor with an affine or spacing_mm")
    return float(spacing_mm[0]), float(spacing_mm[1])


class _SimulatedScan(Randomizable, Transform):
    """What the array simulators share: one CT in, its simulated scan out, channel by channel.

    A subclass has ``spacing_mm``, ``seed`` (drawn by its ``randomize``), ``simulate(volume, spacing,
    seed, name)`` for one channel, and ``recorded()``: the metadata key and value of the parameter
    drawn for this scan.
    """

    def __call__(self, img: NdarrayOrTensor, randomize: bool = True, name: str = "image") -> NdarrayOrTensor:
        """``img`` channel first; each channel is simulated with its own seed (``seed + channel``)."""
        if randomize:
            self.randomize()
        name = _name_of(img, name)
        if img.ndim not in (3, 4):
            raise DRDDInputError(f"{name}: expected a channel-first image (C, i, j[, k]), got shape {tuple(img.shape)}")
        spacing = _in_plane_spacing(img, self.spacing_mm, name)
        data = torch.as_tensor(img.as_tensor() if isinstance(img, MetaTensor) else img)
        channels = [self.simulate(data[c], spacing, self.seed + c, name) for c in range(data.shape[0])]
        out, *_ = convert_to_dst_type(torch.stack(channels), img, dtype=torch.float32)
        if isinstance(out, MetaTensor):
            key, value = self.recorded()
            out.meta[key] = value
        return out


class SimulateLowDose(_SimulatedScan):
    """Full-dose CT in HU -> the same CT with the noise of a scan at a random fraction of the dose.

    Args:
        dose_fraction: a fixed fraction of the full dose in ``(0, 1]``, or a range ``(low, high)``
            drawn uniformly on each call.
        geometry, incident_photons, electronic_noise_counts, window: see ``simulate_low_dose``.
        spacing_mm: in-plane pixel spacing for inputs without an affine (numpy, plain tensors).
        device: where to compute (default: where the image is).
    """

    source_tag = "ldct"  # the simulated scan's file name in a held-out case, and its role tag (drdd_med.evaluation)

    def __init__(
        self,
        dose_fraction: float | Sequence[float] = (0.1, 0.5),
        geometry: FanBeamGeometry | None = None,
        incident_photons: float = INCIDENT_PHOTONS,
        electronic_noise_counts: float = ELECTRONIC_NOISE_COUNTS,
        window: str = "hann",
        spacing_mm: Sequence[float] | None = None,
        device: torch.device | str | None = None,
    ):
        doses = (dose_fraction, dose_fraction) if np.isscalar(dose_fraction) else tuple(dose_fraction)
        if len(doses) != 2 or doses[0] > doses[1]:
            raise DRDDInputError(f"dose_fraction: give a fraction or a range (low, high), got {dose_fraction}")
        self.dose_range = tuple(check_dose_fraction(d) for d in doses)
        self.geometry = geometry
        self.incident_photons = incident_photons
        self.electronic_noise_counts = electronic_noise_counts
        self.window = window
        self.spacing_mm = spacing_mm
        self.device = device
        self.dose = self.dose_range[0]
        self.seed = 0

    def randomize(self, data=None) -> None:
        self.dose = float(self.R.uniform(*self.dose_range))
        self.seed = int(self.R.randint(0, 2**31 - 1))

    def simulate(self, volume_hu: NdarrayOrTensor, spacing_mm: Sequence[float], seed: int,
                 name: str = "volume") -> NdarrayOrTensor:
        """The low-dose scan of one CT ``(i, j[, k])`` at the current dose, with the noise of ``seed``."""
        return simulate_low_dose(
            volume_hu,
            spacing_mm,
            self.dose,
            seed=seed,
            geometry=self.geometry,
            incident_photons=self.incident_photons,
            electronic_noise_counts=self.electronic_noise_counts,
            window=self.window,
            device=self.device,
            name=name,
        )

    def recipe(self) -> dict:
        """What a held-out scan is simulated with (``drdd_med.data.datalists.prepare_heldout_case``): one dose."""
        if self.dose_range[0] != self.dose_range[1]:
            raise DRDDInputError(f"dose_fraction: a held-out scan is simulated at one dose, got the range {self.dose_range}")
        return {"dose_fraction": self.dose_range[0]}

    def recorded(self) -> tuple[str, float]:
        return DOSE_META_KEY, self.dose


class _SimulatedScand(Randomizable, MapTransform):
    """Dictionary twin of a simulator transform: one random draw per call, shared by all ``keys``.

    ``output_key`` (one name, or one per key) keeps the input image and writes the simulated one
    beside it; by default the images are replaced.
    """

    def __init__(self, keys: KeysCollection, simulator: Randomizable, output_key: str | Sequence[str] | None,
                 allow_missing_keys: bool):
        MapTransform.__init__(self, keys, allow_missing_keys)
        if output_key is None:
            self.output_keys = self.keys
        elif isinstance(output_key, str) and len(self.keys) > 1:
            raise DRDDInputError(f"output_key: give one output name per key {list(self.keys)}, got {output_key!r}")
        else:
            self.output_keys = ensure_tuple_rep(output_key, len(self.keys))
        self.simulator = simulator

    def set_random_state(self, seed=None, state=None):
        super().set_random_state(seed, state)
        self.simulator.set_random_state(seed, state)
        return self

    def randomize(self, data=None) -> None:
        self.simulator.randomize()

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict:
        d = dict(data)
        self.randomize()
        for key, output_key in self.key_iterator(d, self.output_keys):
            d[output_key] = self.simulator(d[key], randomize=False, name=str(key))
        return d


class SimulateLowDosed(_SimulatedScand):
    """Dictionary twin of ``SimulateLowDose``: one dose and seed per call, shared by all ``keys``.

    ``output_key`` (one name, or one per key) keeps the full-dose image and writes the low-dose one
    beside it, e.g. ``keys="ct", output_key="ct_low"`` for training pairs; by default the images
    are replaced.
    """

    def __init__(
        self,
        keys: KeysCollection,
        dose_fraction: float | Sequence[float] = (0.1, 0.5),
        output_key: str | Sequence[str] | None = None,
        allow_missing_keys: bool = False,
        **simulator_args,
    ):
        super().__init__(keys, SimulateLowDose(dose_fraction, **simulator_args), output_key, allow_missing_keys)


SimulateLowDoseD = SimulateLowDoseDict = SimulateLowDosed
