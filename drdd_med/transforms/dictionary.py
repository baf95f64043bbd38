"""Dictionary twins of ``array.py`` (``keys``, ``allow_missing_keys``; aliases ``XD`` and ``XDict``).

Data dictionaries may carry ``case_id`` (see ``drdd_med.data.datalists``); checks name it in their
errors, never a path or patient identifier.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import torch
from monai.config import KeysCollection
from monai.transforms import InvertibleTransform, MapTransform, Randomizable
from monai.utils import convert_to_tensor

from drdd_med.errors import DRDDInputError, GridMismatchError
from drdd_med.transforms.array import (
    CT_HU_RANGE,
    BodyMask,
    CheckVolume,
    NormalizeHU,
    RandPairedPatch,
    RobustNormalize,
)

CASE_KEY = "case_id"


def _case(data: Mapping) -> str:
    return str(data.get(CASE_KEY, "case"))


class NormalizeHUd(MapTransform, InvertibleTransform):
    """Dictionary twin of ``NormalizeHU``."""

    def __init__(self, keys: KeysCollection, hu_range: Sequence[float] = CT_HU_RANGE, clip: bool = True,
                 allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.normalizer = NormalizeHU(hu_range, clip)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.normalizer(d[key])
        return d

    def inverse(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.normalizer.inverse(d[key])
        return d


class RobustNormalized(MapTransform, InvertibleTransform):
    """Dictionary twin of ``RobustNormalize``; percentiles inside ``mask_key`` when present."""

    def __init__(self, keys: KeysCollection, mask_key: str | None = "mask", lower: float = 0.5, upper: float = 99.5,
                 allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.mask_key = mask_key
        self.normalizer = RobustNormalize(lower, upper)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        mask = d.get(self.mask_key) if self.mask_key else None
        for key in self.key_iterator(d):
            try:
                d[key] = self.normalizer(d[key], mask)
            except DRDDInputError as err:
                raise DRDDInputError(f"{_case(d)}/{key}: {err}") from None
        return d

    def inverse(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.normalizer.inverse(d[key])
        return d


class BodyMaskd(MapTransform):
    """Dictionary twin of ``BodyMask``: writes ``mask_key`` from ``keys[0]`` unless a mask is present."""

    def __init__(self, keys: KeysCollection, mask_key: str = "mask", threshold: float | None = None,
                 dilation: int = 0, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.mask_key = mask_key
        self.masker = BodyMask(threshold, dilation)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        if d.get(self.mask_key) is None:
            key = self.first_key(d)
            try:
                d[self.mask_key] = self.masker(d[key])
            except DRDDInputError as err:
                raise DRDDInputError(f"{_case(d)}/{key}: {err}") from None
        return d


class CheckVolumesd(MapTransform):
    """Refuse bad volumes before anything is computed from them.

    Each key must be one channel with ``spatial_dims`` dims and finite values; all keys must share
    one voxel grid (shape, and affine within ``atol_mm`` when they are MetaTensors).
    """

    def __init__(self, keys: KeysCollection, spatial_dims: int = 3, atol_mm: float = 1e-3,
                 allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.checker = CheckVolume(spatial_dims)
        self.atol_mm = atol_mm

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        case = _case(d)
        first = None
        for key in self.key_iterator(d):
            self.checker(d[key], name=f"{case}/{key}")
            if first is None:
                first = key
                continue
            if tuple(d[key].shape[1:]) != tuple(d[first].shape[1:]):
                raise GridMismatchError(
                    f"{case}: {key} has shape {tuple(d[key].shape[1:])} but {first} has {tuple(d[first].shape[1:])};"
                    " they must share one voxel grid (resample one onto the other first)"
                )
            affines = [getattr(d[k], "affine", None) for k in (first, key)]
            if all(a is not None for a in affines):
                diff = float((convert_to_tensor(affines[0]).double() - convert_to_tensor(affines[1]).double()).abs().max())
                if diff > self.atol_mm:
                    raise GridMismatchError(
                        f"{case}: {key} and {first} have different affines (max difference {diff:.4g} mm);"
                        " they must share one voxel grid"
                    )
        return d


class RandPairedPatchd(Randomizable, MapTransform):
    """Dictionary twin of ``RandPairedPatch``: returns ``num_samples`` dictionaries of aligned patches.

    ``keys`` are cropped at the same places; ``context_keys`` (a subset, e.g. the source) also carry
    the 2.5D context slices; ``mask_key`` weights the centres toward the body. Patches replace their
    keys as plain tensors; other non-tensor entries (e.g. ``case_id``) are carried along.
    """

    def __init__(self, keys: KeysCollection, mask_key: str = "mask", context_keys: KeysCollection = (),
                 roi_size: Sequence[int] = (64, 64), spatial_dims: int = 2, context_slices: int = 1,
                 num_samples: int = 1, body_fraction: float = 0.9):
        MapTransform.__init__(self, keys)
        self.mask_key = mask_key
        self.context_keys = set([context_keys] if isinstance(context_keys, str) else context_keys)
        self.sampler = RandPairedPatch(roi_size, spatial_dims, context_slices, num_samples, body_fraction)

    def set_random_state(self, seed=None, state=None):
        super().set_random_state(seed, state)
        self.sampler.set_random_state(seed, state)
        return self

    def randomize(self, data=None) -> None:
        self.sampler.randomize(data)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> list[dict]:
        d = dict(data)
        missing = [k for k in (*self.keys, self.mask_key) if k not in d]
        if missing:
            raise DRDDInputError(f"{_case(d)}: missing {missing} for patch sampling")
        try:
            patches = self.sampler([d[k] for k in self.keys], d[self.mask_key], [k in self.context_keys for k in self.keys])
        except DRDDInputError as err:
            raise GridMismatchError(f"{_case(d)}: {err}") from None
        carried = {k: v for k, v in d.items() if k not in self.keys and not isinstance(v, torch.Tensor)}
        return [{**carried, **dict(zip(self.keys, patch))} for patch in patches]


NormalizeHUD = NormalizeHUDict = NormalizeHUd
RobustNormalizeD = RobustNormalizeDict = RobustNormalized
BodyMaskD = BodyMaskDict = BodyMaskd
CheckVolumesD = CheckVolumesDict = CheckVolumesd
RandPairedPatchD = RandPairedPatchDict = RandPairedPatchd
