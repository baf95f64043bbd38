"""Array transforms of drdd_med (one image, channel first ``(C, *spatial)``, numpy or torch).

Each has a dictionary twin in ``dictionary.py``. Intensity conventions (method page, "Intensities"):

- CT: HU clipped to ``[−1024, 3000]`` and mapped linearly to ``[−1, 1]``; the inverse is exact for
  values inside the range.
- MR / CBCT: per-volume robust normalisation, the 0.5th–99.5th percentiles inside the body mask
  mapped to ``[−1, 1]`` (values beyond are kept, not clipped, so the inverse is exact).

Invertible transforms record their parameters in the image's ``applied_operations`` (MONAI's
mechanism), so ``Invertd`` or an explicit ``inverse`` restores physical units.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from monai.config import NdarrayOrTensor
from monai.data import MetaTensor
from monai.transforms import InvertibleTransform, Randomizable, Transform
from monai.utils import TraceKeys, convert_to_tensor
from scipy import ndimage

from drdd_med.errors import DRDDInputError, NonFiniteError

CT_HU_RANGE = (-1024.0, 3000.0)


def _linear_map(img: torch.Tensor, src: tuple[float, float], dst: tuple[float, float]) -> torch.Tensor:
    scale = (dst[1] - dst[0]) / (src[1] - src[0])
    return (img - src[0]) * scale + dst[0]


class _ParametricInverse(InvertibleTransform):
    """Inverse from the recorded parameters alone, so any instance can undo it (not only the one that ran)."""

    def check_transforms_match(self, transform: dict) -> None:
        if transform.get(TraceKeys.CLASS_NAME) != type(self).__name__:
            raise RuntimeError(f"{type(self).__name__} cannot invert {transform.get(TraceKeys.CLASS_NAME)}")


class NormalizeHU(_ParametricInverse):
    """CT in HU -> ``[−1, 1]``: clip to ``hu_range`` and map linearly. ``inverse`` maps back to HU."""

    def __init__(self, hu_range: Sequence[float] = CT_HU_RANGE, clip: bool = True):
        if hu_range[1] <= hu_range[0]:
            raise ValueError(f"hu_range must be increasing, got {tuple(hu_range)}")
        self.hu_range = (float(hu_range[0]), float(hu_range[1]))
        self.clip = clip

    def __call__(self, img: NdarrayOrTensor) -> torch.Tensor:
        img = convert_to_tensor(img, track_meta=True, dtype=torch.float32)
        out = img.clamp(*self.hu_range) if self.clip else img
        out = _linear_map(out, self.hu_range, (-1.0, 1.0))
        self.push_transform(out, extra_info={"hu_range": self.hu_range})
        return out

    def to_hu(self, img: NdarrayOrTensor) -> torch.Tensor:
        """The exact inverse map, without bookkeeping (for network outputs)."""
        return _linear_map(convert_to_tensor(img, track_meta=True, dtype=torch.float32), (-1.0, 1.0), self.hu_range)

    def inverse(self, data: torch.Tensor) -> torch.Tensor:
        transform = self.pop_transform(data) if isinstance(data, MetaTensor) and data.applied_operations else None
        hu_range = tuple(transform["extra_info"]["hu_range"]) if transform else self.hu_range
        return _linear_map(convert_to_tensor(data, track_meta=True, dtype=torch.float32), (-1.0, 1.0), hu_range)


class RobustNormalize(_ParametricInverse):
    """MR/CBCT -> ``[−1, 1]`` from robust percentiles inside the body mask (exactly invertible).

    The percentiles ``(lower, upper)`` of the voxels where ``mask > 0`` (all voxels when no mask)
    are mapped to ``−1`` and ``1``. The pair of intensities is recorded so ``inverse`` restores units.
    """

    def __init__(self, lower: float = 0.5, upper: float = 99.5):
        if not 0 <= lower < upper <= 100:
            raise ValueError(f"percentiles must satisfy 0 <= lower < upper <= 100, got {lower}, {upper}")
        self.lower, self.upper = lower, upper

    def __call__(self, img: NdarrayOrTensor, mask: NdarrayOrTensor | None = None) -> torch.Tensor:
        img = convert_to_tensor(img, track_meta=True, dtype=torch.float32)
        values = img if mask is None else img[convert_to_tensor(mask).expand_as(img) > 0]
        if values.numel() == 0:
            raise DRDDInputError("robust normalisation: the body mask is empty")
        lo, hi = torch.quantile(values.flatten().float()[:: max(1, values.numel() // 2_000_000)],
                                torch.tensor([self.lower / 100, self.upper / 100])).tolist()
        if hi <= lo:
            raise DRDDInputError(f"robust normalisation: image is constant inside the mask ({lo:g})")
        out = _linear_map(img, (lo, hi), (-1.0, 1.0))
        self.push_transform(out, extra_info={"intensity_range": (lo, hi)})
        return out

    def inverse(self, data: torch.Tensor) -> torch.Tensor:
        transform = self.pop_transform(data)
        lo, hi = transform["extra_info"]["intensity_range"]
        return _linear_map(convert_to_tensor(data, track_meta=True, dtype=torch.float32), (-1.0, 1.0), (lo, hi))


class BodyMask(Transform):
    """Body mask from intensity: threshold, keep the largest component, fill holes (3D and per slice).

    ``threshold=None`` uses Otsu's threshold of the image, which separates air from the body in CT,
    MR and CBCT alike. Output: ``(1, *spatial)`` uint8.
    """

    def __init__(self, threshold: float | None = None, dilation: int = 0):
        self.threshold = threshold
        self.dilation = dilation

    def __call__(self, img: NdarrayOrTensor) -> torch.Tensor:
        volume = np.asarray(convert_to_tensor(img, track_meta=False)[0].float().cpu())
        if self.threshold is None:
            from skimage.filters import threshold_otsu

            threshold = threshold_otsu(volume[:: max(1, volume.shape[0] // 64)])
        else:
            threshold = self.threshold
        mask = volume > threshold
        labels, count = ndimage.label(mask)
        if count == 0:
            raise DRDDInputError(f"body mask: no voxel above the threshold {threshold:g}")
        mask = labels == np.argmax(np.bincount(labels.ravel())[1:]) + 1
        mask = ndimage.binary_fill_holes(mask)
        for k in range(mask.shape[-1]):  # openings to air through the neck or nose leave 3D holes open
            mask[..., k] = ndimage.binary_fill_holes(mask[..., k])
        if self.dilation:
            mask = ndimage.binary_dilation(mask, iterations=self.dilation)
        out = torch.from_numpy(mask[None].astype(np.uint8))
        return MetaTensor(out, meta=img.meta) if isinstance(img, MetaTensor) else out


class CheckVolume(Transform):
    """Refuse an image that is not ``(C, *spatial)`` with ``spatial_dims`` dims, or holds NaN/Inf.

    ``name`` (a case id, never a patient identifier) is put in the message.
    """

    def __init__(self, spatial_dims: int = 3):
        self.spatial_dims = spatial_dims

    def __call__(self, img: NdarrayOrTensor, name: str = "image") -> NdarrayOrTensor:
        shape = tuple(img.shape)
        if len(shape) != self.spatial_dims + 1 or shape[0] != 1:
            raise DRDDInputError(
                f"{name}: expected one channel and {self.spatial_dims} spatial dimensions, got shape {shape[1:]}"
                f" with {shape[0]} channel(s) (e.g. a 4D series where a 3D volume is expected)"
            )
        finite = torch.isfinite(convert_to_tensor(img, track_meta=False))
        if not bool(finite.all()):
            bad = int((~finite).sum())
            raise NonFiniteError(f"{name}: {bad} voxel(s) are NaN or infinite")
        return img


class RandPairedPatch(Randomizable):
    """Sample aligned training patches from images on one grid, weighted toward the body.

    - ``spatial_dims=2``: 2D slices along the last axis, cropped to ``roi_size`` in-plane; images
      flagged ``with_context`` (the source) carry ``context_slices`` neighbouring slices (odd ``k``;
      2.5D) as channels: the centre slice's C channels first, then the C channels of each other
      slice in spatial order (edge slices repeated at the volume's ends), as ``DRDDInferer`` builds them.
    - ``spatial_dims=3``: 3D patches of ``roi_size``.

    A patch centre lies inside the body (``weight_mask > 0``) with probability ``body_fraction``,
    else anywhere, so patches are not wasted on air. Patches reaching past the image are padded
    with each image's own minimum (air).
    """

    def __init__(
        self,
        roi_size: Sequence[int],
        spatial_dims: int = 2,
        context_slices: int = 1,
        num_samples: int = 1,
        body_fraction: float = 0.9,
    ):
        if spatial_dims not in (2, 3) or len(roi_size) != spatial_dims:
            raise ValueError(f"roi_size {tuple(roi_size)} must have spatial_dims={spatial_dims} entries (2 or 3)")
        if context_slices < 1 or context_slices % 2 == 0:
            raise ValueError(f"context_slices must be odd and >= 1, got {context_slices}")
        if spatial_dims == 3 and context_slices != 1:
            raise ValueError("context slices are for 2D (2.5D) models only")
        self.roi_size = tuple(int(r) for r in roi_size)
        self.spatial_dims = spatial_dims
        self.context_slices = context_slices
        self.num_samples = num_samples
        self.body_fraction = body_fraction
        self._centres: list[tuple[int, ...]] = []

    def randomize(self, weight_mask: torch.Tensor) -> None:
        spatial = tuple(weight_mask.shape[1:])
        body = torch.nonzero(convert_to_tensor(weight_mask, track_meta=False)[0] > 0)
        self._centres = []
        for _ in range(self.num_samples):
            if len(body) and self.R.rand() < self.body_fraction:
                self._centres.append(tuple(int(v) for v in body[self.R.randint(len(body))]))
            else:
                self._centres.append(tuple(int(self.R.randint(s)) for s in spatial))

    def crop(self, img: NdarrayOrTensor, centre: tuple[int, ...], with_context: bool = False) -> torch.Tensor:
        """The patch of ``img`` (C, X, Y, Z) around ``centre``, padded with the image minimum."""
        img = convert_to_tensor(img, track_meta=False)
        if self.spatial_dims == 2:
            x, y, z = centre
            half = self.context_slices // 2 if with_context else 0
            order = [0] + [d for d in range(-half, half + 1) if d != 0]
            ks = [min(max(z + d, 0), img.shape[-1] - 1) for d in order]
            # slice-major, (k*C, X, Y): all C channels of the centre slice, then of each neighbour
            planes = img[..., ks].movedim(-1, 0).reshape(-1, *img.shape[1:3])
            return _window(planes, (x, y), self.roi_size)
        return _window(img, centre, self.roi_size)

    def __call__(
        self,
        images: Sequence[NdarrayOrTensor],
        weight_mask: NdarrayOrTensor,
        with_context: Sequence[bool] | None = None,
        randomize: bool = True,
    ) -> list[list[torch.Tensor]]:
        """``num_samples`` lists of patches, one patch per image, all at the same place."""
        shapes = {tuple(img.shape[1:]) for img in images} | {tuple(weight_mask.shape[1:])}
        if len(shapes) != 1:
            raise DRDDInputError(f"patch sampling needs images on one grid, got spatial shapes {sorted(shapes)}")
        if randomize:
            self.randomize(weight_mask)
        with_context = with_context or [False] * len(images)
        return [[self.crop(img, c, ctx) for img, ctx in zip(images, with_context)] for c in self._centres]


def _window(img: torch.Tensor, centre: Sequence[int], roi: Sequence[int]) -> torch.Tensor:
    """Crop ``roi`` around ``centre`` over the trailing dims, padding outside with the image minimum."""
    out = torch.full((img.shape[0], *roi), float(img.min()), dtype=img.dtype)
    src, dst = [slice(None)], [slice(None)]
    for c, r, size in zip(centre, roi, img.shape[1:]):
        start = c - r // 2
        lo, hi = max(start, 0), min(start + r, size)
        src.append(slice(lo, hi))
        dst.append(slice(lo - start, hi - start))
    out[tuple(dst)] = img[tuple(src)]
    return out
