"""Clinical image metrics as plain functions: arrays (numpy or torch) in HU in, a float out.

Sections follow the published definitions they reproduce:

1. Input checks, in one place (shape, finite values, non-empty mask).
2. SynthRAD2023 (Huijben et al. 2024, evaluation code of the ``SynthRAD2023/metrics`` repository):
   masked MAE, PSNR and SSIM.
3. SynthRAD2025 (``SynthRAD2025/evaluation``, ``image_metrics.py``): masked MS-SSIM. Its MAE and PSNR
   are the SynthRAD2023 ones: the 2025 code first sets voxels outside the mask to -1024, but MAE and
   PSNR only read voxels inside the mask, so the results are identical; call
   ``synthrad2023_psnr(..., clip=SYNTHRAD2025_CLIP)`` for the 2025 PSNR.
   ``synthrad_structural_similarity`` gives the 2023 SSIM and the 2025 MS-SSIM together, cheaper.
4. Low-dose CT: PSNR / SSIM / RMSE inside a named HU window.
5. MAE per tissue class of the reference CT.

Every function takes ``(pred, ref, mask)`` in that order; ``mask`` may be ``None`` (all voxels) and
is binarised as ``mask > 0``. Voxel arithmetic is in float32, as in the SynthRAD2023 container (which
cast every volume to float32 before scikit-image); sums and means accumulate in float64. Pass
``case=`` to have error messages name the case.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import numpy as np
from scipy.ndimage import uniform_filter

from drdd_med.errors import DRDDInputError, GridMismatchError, NonFiniteError

__all__ = [
    "HU_WINDOWS",
    "MS_SSIM_WEIGHTS",
    "SYNTHRAD2023_CLIP",
    "SYNTHRAD2025_CLIP",
    "TISSUE_CLASSES",
    "TISSUE_THRESHOLDS",
    "hu_window",
    "synthrad2023_mae",
    "synthrad2023_psnr",
    "synthrad2023_ssim",
    "synthrad2025_ms_ssim",
    "synthrad_structural_similarity",
    "tissue_mae",
    "validate_inputs",
    "windowed_psnr",
    "windowed_rmse",
    "windowed_ssim",
]

SYNTHRAD2023_CLIP = (-1024.0, 3000.0)
# The SynthRAD2025 evaluation container clips to the int16 CT range it distributes; its metrics
# repository still says 3000, hence a parameter everywhere.
SYNTHRAD2025_CLIP = (-1024.0, 3071.0)

# Wang, Simoncelli & Bovik 2003, Eq. 7 / Sec. 3.2: weights of the five scales, finest first.
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
# Each axis is edge-padded to at least this many voxels so that five scales of 2x downsampling
# still leave a 7-voxel SSIM window at the coarsest scale.
MS_SSIM_MIN_SIZE = 97

# (low, high) in HU. The display windows (centre C / width W -> (C - W/2, C + W/2)) are those of the
# LDCT benchmark (Eulig et al. 2024), which applies the DICOM VOI formula, one HU narrower.
HU_WINDOWS: dict[str, tuple[float, float]] = {
    "redcnn": (-160.0, 240.0),  # RED-CNN (Chen et al. 2017) evaluation window
    "corediff": (-1000.0, 1000.0),  # CoreDiff (Gao et al. 2023) evaluation window
    "abdomen": (-150.0, 250.0),  # C 50 / W 400
    "chest": (-1350.0, 150.0),  # C -600 / W 1500
    "neuro": (0.0, 80.0),  # C 40 / W 80
}

# Tissue classes by the reference CT value: air < -200 HU <= soft tissue <= 300 HU < bone.
TISSUE_THRESHOLDS = (-200.0, 300.0)
TISSUE_CLASSES = ("air", "soft_tissue", "bone")

SSIM_K1 = 0.01
SSIM_K2 = 0.03


# --- 1. Input checks -------------------------------------------------------------------------------


def _prefix(case: str | None) -> str:
    return f"{case}: " if case else ""


def _to_numpy(array, name: str, case: str | None) -> np.ndarray:
    if hasattr(array, "detach"):  # torch tensor (MetaTensor included)
        array = array.detach().cpu().numpy()
    array = np.asarray(array)
    if array.dtype == object or not (np.issubdtype(array.dtype, np.number) or array.dtype == bool):
        raise DRDDInputError(f"{_prefix(case)}{name} is not a numeric array (dtype {array.dtype})")
    return array


def validate_inputs(
    pred, ref, mask=None, *, case: str | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Check and convert one prediction / reference / mask triple; the only place metrics check inputs.

    Returns ``pred`` and ``ref`` as C-ordered float32 arrays and ``mask`` as a boolean array
    (``mask > 0``), or ``None`` when no mask is given. Raises ``GridMismatchError`` for differing shapes,
    ``NonFiniteError`` for NaN or infinite voxels anywhere in the arrays (also outside the mask:
    such a volume is broken, not merely imperfect), and ``DRDDInputError`` for an empty mask.
    """
    prefix = _prefix(case)
    pred = _to_numpy(pred, "prediction", case)
    ref = _to_numpy(ref, "reference", case)
    if pred.shape != ref.shape:
        raise GridMismatchError(f"{prefix}prediction shape {pred.shape} differs from reference shape {ref.shape}")
    if pred.size == 0:
        raise DRDDInputError(f"{prefix}prediction and reference are empty arrays")
    for name, array in (("prediction", pred), ("reference", ref)):
        bad = array.size - int(np.count_nonzero(np.isfinite(array)))
        if bad:
            raise NonFiniteError(f"{prefix}{name} has {bad} NaN or infinite voxels")
    if mask is not None:
        mask = _to_numpy(mask, "mask", case)
        if mask.shape != ref.shape:
            raise GridMismatchError(f"{prefix}mask shape {mask.shape} differs from reference shape {ref.shape}")
        if not np.isfinite(mask).all():
            raise NonFiniteError(f"{prefix}mask has NaN or infinite voxels")
        mask = np.ascontiguousarray(mask > 0)
        if not mask.any():
            raise DRDDInputError(f"{prefix}mask is empty (no voxel > 0)")
    # one dtype and one memory layout for all arithmetic: mixing C- and Fortran-ordered operands
    # (readers give either) makes every elementwise step strided and several times slower
    return np.ascontiguousarray(pred, dtype=np.float32), np.ascontiguousarray(ref, dtype=np.float32), mask


def _check_range(value_range: Sequence[float], name: str) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in value_range)
    except (TypeError, ValueError):
        raise DRDDInputError(f"{name} must be a pair (low, high) in HU, got {value_range!r}") from None
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise DRDDInputError(f"{name} must be finite with low < high, got ({low}, {high})")
    return low, high


def hu_window(window: str | Sequence[float]) -> tuple[float, float]:
    """Resolve a window name from ``HU_WINDOWS`` or a ``(low, high)`` pair to ``(low, high)`` in HU."""
    if isinstance(window, str):
        if window not in HU_WINDOWS:
            raise DRDDInputError(f"unknown HU window {window!r}; use one of {sorted(HU_WINDOWS)} or (low, high)")
        return HU_WINDOWS[window]
    return _check_range(window, "window")


# --- shared computations ---------------------------------------------------------------------------


def _mean(values: np.ndarray, mask: np.ndarray | None) -> float:
    """Mean over the mask (or everything), accumulated in float64, without copying masked voxels out."""
    return float(np.mean(values, dtype=np.float64, where=True if mask is None else mask))


def _psnr(pred: np.ndarray, ref: np.ndarray, mask: np.ndarray | None, data_range: float) -> float:
    """PSNR as ``skimage.metrics.peak_signal_noise_ratio`` over mask voxels; identical inputs give ``inf``."""
    mse = _mean(np.square(ref - pred), mask)
    return math.inf if mse == 0.0 else 10.0 * math.log10(data_range**2 / mse)


def _local_statistics(x: np.ndarray, y: np.ndarray, win_size: int) -> tuple[np.ndarray, ...]:
    """Local means ``ux, uy``, variances ``vx, vy`` and covariance ``vxy`` as scikit-image SSIM computes them.

    scikit-image ``structural_similarity`` defaults, which both SynthRAD evaluations used: uniform
    ``win_size``^d window (``scipy.ndimage.uniform_filter``, reflecting edges) and sample covariance
    (N / (N - 1)). Arithmetic is in place: on a 256x256x150 volume every temporary costs tens of ms.
    """
    n = win_size**x.ndim
    cov_norm = n / (n - 1)
    ux = uniform_filter(x, size=win_size)
    uy = uniform_filter(y, size=win_size)
    product = np.multiply(x, x)
    vx = uniform_filter(product, size=win_size)
    np.multiply(y, y, out=product)
    vy = uniform_filter(product, size=win_size)
    np.multiply(x, y, out=product)
    vxy = uniform_filter(product, size=win_size)
    for second_moment, a, b in ((vx, ux, ux), (vy, uy, uy), (vxy, ux, uy)):  # cov_norm (E[ab] - E[a] E[b])
        np.multiply(a, b, out=product)
        second_moment -= product
        second_moment *= cov_norm
    return ux, uy, vx, vy, vxy


def _ssim_map(statistics: tuple[np.ndarray, ...], data_range: float) -> np.ndarray:
    """SSIM map (Wang et al. 2004) ``l * cs`` from local statistics, which are left unchanged.

        l = (2 ux uy + C1) / (ux^2 + uy^2 + C1),   cs = (2 vxy + C2) / (vx + vy + C2)

    with C1 = (0.01 R)^2, C2 = (0.03 R)^2, R the data range. For images >= 0, l > 0.
    """
    ux, uy, vx, vy, vxy = statistics
    c1 = (SSIM_K1 * data_range) ** 2
    c2 = (SSIM_K2 * data_range) ** 2
    ssim = np.multiply(ux, uy)
    ssim *= 2
    ssim += c1
    scratch = np.square(uy)
    denominator = np.square(ux)
    denominator += scratch
    denominator += c1
    ssim /= denominator  # l
    np.multiply(vxy, 2, out=scratch)
    scratch += c2
    np.add(vx, vy, out=denominator)
    denominator += c2
    scratch /= denominator  # cs
    ssim *= scratch
    return ssim


def _mean_inside(score_map: np.ndarray, mask: np.ndarray | None, border: int, what: str, case: str | None) -> float:
    """Mean of ``score_map`` over ``mask`` after cropping ``border`` voxels from every side."""
    inner = tuple(slice(border, -border or None) for _ in range(score_map.ndim))
    inner_mask = None if mask is None else mask[inner]
    count = score_map[inner].size if inner_mask is None else int(np.count_nonzero(inner_mask))
    if count == 0:
        raise DRDDInputError(
            f"{_prefix(case)}no {'mask ' if mask is not None else ''}voxel is left for {what} "
            f"after cropping the {border}-voxel border"
        )
    return _mean(score_map[inner], inner_mask)


def _background_shifted(volume: np.ndarray, mask: np.ndarray | None, low: float, high: float) -> np.ndarray:
    """Clip to [low, high], set voxels outside the mask to ``low``, shift so that ``low`` becomes 0."""
    volume = np.clip(volume, low, high)
    if mask is not None:
        volume[~mask] = low
    volume -= low
    return volume


def _masked_ssim(pred, ref, mask, low: float, high: float, win_size: int, border: int, case: str | None) -> float:
    if any(size < win_size for size in ref.shape):
        raise DRDDInputError(f"{_prefix(case)}shape {ref.shape} is smaller than the {win_size}-voxel SSIM window")
    x = _background_shifted(ref, mask, low, high)
    y = _background_shifted(pred, mask, low, high)
    return _mean_inside(_ssim_map(_local_statistics(x, y, win_size), high - low), mask, border, "SSIM", case)


# --- 2. SynthRAD2023 -------------------------------------------------------------------------------


def synthrad2023_mae(pred, ref, mask=None, *, case: str | None = None) -> float:
    """Mean absolute error in HU inside the mask, without clipping: ``sum|ct*m - sct*m| / sum m``.

    SynthRAD2023 ``ImageMetrics.mae``; also the SynthRAD2025 MAE.
    """
    pred, ref, mask = validate_inputs(pred, ref, mask, case=case)
    return _mean(np.abs(ref - pred), mask)


def synthrad2023_psnr(pred, ref, mask=None, clip=SYNTHRAD2023_CLIP, *, case: str | None = None) -> float:
    """PSNR in dB: both volumes clipped to ``clip``, voxels inside the mask only, data range ``high - low``.

    SynthRAD2023 ``ImageMetrics.psnr(use_population_range=True)`` (range [-1024, 3000], data range
    4024); with ``clip=SYNTHRAD2025_CLIP`` the SynthRAD2025 PSNR (data range 4095). Identical
    inputs give ``inf``.
    """
    pred, ref, mask = validate_inputs(pred, ref, mask, case=case)
    low, high = _check_range(clip, "clip")
    return _psnr(np.clip(pred, low, high), np.clip(ref, low, high), mask, high - low)


def synthrad2023_ssim(
    pred, ref, mask=None, clip=SYNTHRAD2023_CLIP, window: int = 7, border: int = 3, *, case: str | None = None
) -> float:
    """Masked SSIM as in SynthRAD2023 ``ImageMetrics.ssim``.

    Both volumes are clipped to ``clip``, voxels outside the mask set to ``clip[0]`` (-1024), shifted
    by ``-clip[0]`` so all values are >= 0; the SSIM map is that of scikit-image
    ``structural_similarity(ct, sct, data_range=high - low, full=True)`` (uniform ``window``^d
    window, 7 by default, sample covariance); the result is the mean of the map over mask voxels
    after cropping ``border`` voxels (3) from every side. Works on 2D and 3D arrays (3D for the
    challenge). Without a mask it equals scikit-image's mean SSIM.
    """
    pred, ref, mask = validate_inputs(pred, ref, mask, case=case)
    low, high = _check_range(clip, "clip")
    return _masked_ssim(pred, ref, mask, low, high, window, border, case)


# --- 3. SynthRAD2025 -------------------------------------------------------------------------------


def _edge_pad_to(volume: np.ndarray, size: int) -> np.ndarray:
    """Edge-pad every axis shorter than ``size`` to ``size``, the extra voxel going after."""
    pad = [((size - n) // 2, size - n - (size - n) // 2) if n < size else (0, 0) for n in volume.shape]
    return np.pad(volume, pad, mode="edge")


def _downsample(volume: np.ndarray) -> np.ndarray:
    """Halve every axis as the SynthRAD2025 evaluation does.

    It computes ``fftconvolve(v, np.ones((2, 2, 2)) / 8, mode="same")[::2, ::2, ::2]``: output voxel
    ``i`` averages input voxels ``2i - 1`` and ``2i`` along each axis, with zeros before the first
    voxel. Done here exactly (no FFT): a zero slab in front, then the mean of the 2^d voxels of each
    block, summed as strided views.
    """
    padded = np.pad(volume, [(1, 0)] * volume.ndim)
    halves = [(n + 1) // 2 for n in volume.shape]
    blocks = np.zeros(halves, dtype=volume.dtype)
    for offsets in itertools.product((0, 1), repeat=volume.ndim):
        blocks += padded[tuple(slice(offset, offset + 2 * half, 2) for offset, half in zip(offsets, halves))]
    blocks /= 2**volume.ndim
    return blocks


def _ms_ssim(x, y, mask, data_range: float, weights, case, full_resolution_statistics=None) -> float:
    """Masked MS-SSIM of background-shifted volumes (see ``synthrad2025_ms_ssim``)."""
    x, y = _edge_pad_to(x, MS_SSIM_MIN_SIZE), _edge_pad_to(y, MS_SSIM_MIN_SIZE)
    m = _edge_pad_to(np.ones(x.shape, dtype=bool) if mask is None else mask, MS_SSIM_MIN_SIZE)
    scale_means = []
    for scale, weight in enumerate(weights):
        if scale:
            x, y, m = _downsample(x), _downsample(y), m[::2, ::2, ::2]
        statistics = full_resolution_statistics if scale == 0 else None
        if statistics is None:
            statistics = _local_statistics(x, y, win_size=7)
        scale_map = _ssim_map(statistics, data_range)
        np.maximum(scale_map, 0, out=scale_map)  # cs clipped at 0 (l > 0)
        scale_map **= weight
        scale_means.append(_mean_inside(scale_map, m, 3, f"MS-SSIM scale {scale}", case))
    return float(np.prod(np.clip(scale_means, 0.0, 1.0)))


def synthrad2025_ms_ssim(
    pred,
    ref,
    mask=None,
    clip=SYNTHRAD2025_CLIP,
    *,
    weights: Sequence[float] = MS_SSIM_WEIGHTS,
    case: str | None = None,
) -> float:
    """Masked multi-scale SSIM of 3D volumes as in SynthRAD2025 ``ImageMetrics.ms_ssim`` (mask variant).

    Both volumes are clipped to ``clip`` ([-1024, 3071] in the final evaluation container), voxels
    outside the mask set to ``clip[0]``, shifted to >= 0, then every axis (and the mask) is
    edge-padded to at least 97 voxels. At each of the five scales (weights ``w_s`` = 0.0448, 0.2856,
    0.3001, 0.2363, 0.1333, finest first) the map ``(l * cs) ** w_s`` is computed with l and cs
    clipped at 0 (the published code raises luminance, contrast and structure each to ``w_s`` at
    every scale; l * c * s = l * cs) and averaged over mask voxels after cropping a 3-voxel
    border; between scales the volumes are 2x2x2-mean downsampled (see ``_downsample``) and the mask
    subsampled by taking every other voxel. The result is the product of the five scale means, each
    clipped to [0, 1]. SSIM statistics as in ``synthrad2023_ssim`` (7-voxel uniform window, data
    range ``high - low``).
    """
    pred, ref, mask = validate_inputs(pred, ref, mask, case=case)
    if ref.ndim != 3:
        raise DRDDInputError(f"{_prefix(case)}MS-SSIM needs 3D volumes, got shape {ref.shape}")
    low, high = _check_range(clip, "clip")
    x, y = _background_shifted(ref, mask, low, high), _background_shifted(pred, mask, low, high)
    return _ms_ssim(x, y, mask, high - low, weights, case)


def synthrad_structural_similarity(
    pred,
    ref,
    mask=None,
    ssim_clip=SYNTHRAD2023_CLIP,
    ms_ssim_clip=SYNTHRAD2025_CLIP,
    *,
    case: str | None = None,
) -> dict[str, float]:
    """``{"ssim": synthrad2023_ssim(...), "ms_ssim": synthrad2025_ms_ssim(...)}`` of 3D volumes, sharing work.

    Both scores start from the same local statistics at full resolution whenever the two clip
    ranges leave the same voxel values (the same lower bound and no voxel above the lower upper
    bound, the usual case) and no padding is needed: a third less computation for a folder
    evaluation. The values are those of the two functions.
    """
    pred, ref, mask = validate_inputs(pred, ref, mask, case=case)
    if ref.ndim != 3:
        raise DRDDInputError(f"{_prefix(case)}MS-SSIM needs 3D volumes, got shape {ref.shape}")
    ssim_low, ssim_high = _check_range(ssim_clip, "ssim_clip")
    ms_low, ms_high = _check_range(ms_ssim_clip, "ms_ssim_clip")
    if any(size < 7 for size in ref.shape):
        raise DRDDInputError(f"{_prefix(case)}shape {ref.shape} is smaller than the 7-voxel SSIM window")
    x, y = _background_shifted(ref, mask, ssim_low, ssim_high), _background_shifted(pred, mask, ssim_low, ssim_high)
    statistics = _local_statistics(x, y, win_size=7)
    ssim = _mean_inside(_ssim_map(statistics, ssim_high - ssim_low), mask, 3, "SSIM", case)
    ms_x, ms_y = _background_shifted(ref, mask, ms_low, ms_high), _background_shifted(pred, mask, ms_low, ms_high)
    shared = (
        min(ref.shape) >= MS_SSIM_MIN_SIZE
        and ssim_low == ms_low
        and np.array_equal(x, ms_x)
        and np.array_equal(y, ms_y)
    )
    ms_ssim = _ms_ssim(ms_x, ms_y, mask, ms_high - ms_low, MS_SSIM_WEIGHTS, case, statistics if shared else None)
    return {"ssim": ssim, "ms_ssim": ms_ssim}


# --- 4. Low-dose CT, inside an HU window -----------------------------------------------------------


def _windowed(pred, ref, mask, window, case):
    pred, ref, mask = validate_inputs(pred, ref, mask, case=case)
    low, high = hu_window(window)
    return np.clip(pred, low, high), np.clip(ref, low, high), mask, low, high


def windowed_psnr(pred, ref, window: str | Sequence[float] = "abdomen", mask=None, *, case: str | None = None) -> float:
    """PSNR in dB after clipping both images to an HU window; data range = window width.

    ``window`` is a name from ``HU_WINDOWS`` or ``(low, high)``; report it with the number, PSNR
    depends on it more than on the method. Mapping the window to [0, 1] first (as the LDCT
    benchmark does) gives the same value. Over mask voxels when a mask is given.
    """
    pred, ref, mask, low, high = _windowed(pred, ref, mask, window, case)
    return _psnr(pred, ref, mask, high - low)


def windowed_rmse(pred, ref, window: str | Sequence[float] = "abdomen", mask=None, *, case: str | None = None) -> float:
    """Root mean squared error in HU after clipping both images to an HU window (over mask voxels if given)."""
    pred, ref, mask, _, _ = _windowed(pred, ref, mask, window, case)
    return math.sqrt(_mean(np.square(ref - pred), mask))


def windowed_ssim(
    pred,
    ref,
    window: str | Sequence[float] = "abdomen",
    mask=None,
    win_size: int = 7,
    border: int = 3,
    *,
    case: str | None = None,
) -> float:
    """SSIM after clipping both images to an HU window, computed like ``synthrad2023_ssim`` with ``clip=window``.

    The images are shifted so the window starts at 0, the data range is the window width, and the
    statistics are scikit-image's defaults (7-pixel uniform window, sample covariance, mean over the
    map after cropping 3 pixels) -- the convention of the LDCT benchmark (Eulig et al. 2024). SSIM
    is computed in the arrays' own dimensionality: pass 2D slices for the per-slice SSIM of the
    low-dose CT literature, 3D volumes for volumetric SSIM.
    """
    pred, ref, mask = validate_inputs(pred, ref, mask, case=case)
    low, high = hu_window(window)
    return _masked_ssim(pred, ref, mask, low, high, win_size, border, case)


# --- 5. Tissue classes -----------------------------------------------------------------------------


def tissue_mae(pred, ref, mask=None, *, case: str | None = None) -> dict[str, float | None]:
    """MAE in HU per tissue class of the reference CT, inside the mask.

    Classes (``TISSUE_CLASSES``, thresholds ``TISSUE_THRESHOLDS``) by the reference value: air
    < -200 HU, soft tissue -200...300 HU inclusive, bone > 300 HU. A class with no voxel in the mask
    gets ``None`` (not applicable, as opposed to a number).
    """
    pred, ref, mask = validate_inputs(pred, ref, mask, case=case)
    inside = np.ones(ref.shape, dtype=bool) if mask is None else mask
    difference = np.abs(ref - pred)
    air_below, bone_above = TISSUE_THRESHOLDS
    air, bone = ref < air_below, ref > bone_above
    selections = {"air": air & inside, "soft_tissue": ~(air | bone) & inside, "bone": bone & inside}
    return {name: _mean(difference, selected) if selected.any() else None for name, selected in selections.items()}
