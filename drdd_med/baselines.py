"""Reference baselines that a learned translation has to beat.

``monotone_intensity_baseline`` is the best any intensity-only map can do on a case: it is fitted on
that very case's target (an oracle), so a model that does not beat it has learned nothing beyond a
look-up table. MR to CT is not monotone — cortical bone and air are both dark in MR but lie at
opposite ends of the HU scale — so this baseline fails exactly where anatomy has to be recognised,
and its error measures how much of the task is more than an intensity curve.

``classical_denoise`` is the classical answer to low-dose CT: non-local means or total-variation
denoising of each axial slice (scikit-image), with the strength set from the noise level estimated
on that slice, never from a reference image.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import isotonic_regression
from skimage.restoration import denoise_nl_means, denoise_tv_chambolle

from drdd_med.errors import DRDDInputError, GridMismatchError, NonFiniteError


def monotone_intensity_baseline(source, target, mask, num_bins: int = 2048) -> np.ndarray:
    """Map ``source`` to ``target`` intensities with the case's best non-decreasing curve.

    The curve is the least-squares isotonic regression of target on source over the ``mask`` voxels,
    fitted on up to ``num_bins`` equal-count bins of the source values (exact when the masked source
    has no more distinct values than that), and applied to every voxel by linear interpolation
    between the bins, constant beyond the fitted range. Returns float32 with the shape of ``source``.
    """
    source, target = np.asarray(source), np.asarray(target)
    mask = np.asarray(mask).astype(bool)
    if source.shape != target.shape or source.shape != mask.shape:
        raise GridMismatchError(
            f"source {source.shape}, target {target.shape} and mask {mask.shape} must have the same shape"
        )
    if not mask.any():
        raise DRDDInputError("the mask is empty: no voxels to fit the intensity curve on")
    x = source[mask].astype(np.float64)
    y = target[mask].astype(np.float64)
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise NonFiniteError("source or target has NaN or infinite voxels inside the mask")

    knots, bin_index = np.unique(x, return_inverse=True)
    if knots.size > num_bins:
        # Equal-count bins; repeated edges (many equal values) just leave empty bins, dropped below.
        edges = np.quantile(x, np.linspace(0.0, 1.0, num_bins + 1)[1:-1])
        bin_index = np.searchsorted(edges, x, side="right")
    counts = np.bincount(bin_index)
    filled = counts > 0
    counts = counts[filled]
    knots = np.bincount(bin_index, weights=x)[filled] / counts
    means = np.bincount(bin_index, weights=y)[filled] / counts
    curve = isotonic_regression(means, weights=counts).x
    return np.interp(source.astype(np.float64), knots, curve).astype(np.float32)


DENOISERS = ("nlm", "tv")
# Strength per unit of estimated noise: h = 0.8 sigma is scikit-image's recommendation for fast
# non-local means with a given sigma (5-pixel patches searched within 6 pixels). The TV weight (the
# ROF model's 1/lambda, in HU like sigma) uses the same 1.0 sigma on every case; neither constant
# is fitted to any evaluation case.
NLM_H_PER_SIGMA = 0.8
NLM_PATCH_SIZE, NLM_PATCH_DISTANCE = 5, 6
TV_WEIGHT_PER_SIGMA = 1.0
MAD_TO_SIGMA = 0.6745  # median |N(0, 1)|


def estimate_noise_sigma(image) -> float:
    """Noise standard deviation of a 2D image: Donoho's wavelet MAD estimate, ``median(|HH|) / 0.6745``.

    ``HH`` are the finest diagonal Haar detail coefficients ``(a − b − c + d) / 2`` of the 2 × 2
    blocks: image structure barely reaches them, white noise of deviation ``σ`` gives them deviation
    ``σ`` (what ``skimage.restoration.estimate_sigma`` does with a Daubechies wavelet, without
    needing PyWavelets).
    """
    image = np.asarray(image, dtype=np.float64)
    rows, cols = (image.shape[0] // 2) * 2, (image.shape[1] // 2) * 2
    blocks = image[:rows, :cols]
    diagonal = (blocks[0::2, 0::2] - blocks[0::2, 1::2] - blocks[1::2, 0::2] + blocks[1::2, 1::2]) / 2
    return float(np.median(np.abs(diagonal)) / MAD_TO_SIGMA)


def classical_denoise(volume_hu, method: str = "nlm", strength: float = 1.0) -> np.ndarray:
    """Denoise a CT in HU slice by slice (axial slices along the last axis) with a classical filter.

    ``method``: ``"nlm"`` (non-local means, ``denoise_nl_means`` fast mode, ``h = 0.8 σ``) or
    ``"tv"`` (total variation, ``denoise_tv_chambolle``, ``weight = σ``), where ``σ`` is the noise
    standard deviation that ``estimate_noise_sigma`` (wavelet median absolute deviation) finds in
    each slice. ``strength`` scales ``h`` or ``weight``. A 2D array is one slice. Returns float32 HU
    with the input's shape; the input must be finite CT in HU.
    """
    from drdd_med.ldct import check_hounsfield

    if method not in DENOISERS:
        raise ValueError(f"method must be one of {DENOISERS}, got {method!r}")
    if not (np.isfinite(strength) and strength > 0):
        raise ValueError(f"strength must be a positive number, got {strength}")
    volume = np.asarray(volume_hu, dtype=np.float32)
    if volume.ndim not in (2, 3) or min(volume.shape[:2]) < 8:
        raise DRDDInputError(f"expected axial slices (i, j) or a volume (i, j, k) of at least 8 x 8 pixels, "
                             f"got shape {volume.shape}")
    check_hounsfield(volume, "classical_denoise input")
    slices = volume if volume.ndim == 3 else volume[..., None]
    out = np.empty_like(slices)
    for k in range(slices.shape[-1]):
        image = slices[..., k].astype(np.float64)
        sigma = estimate_noise_sigma(image)
        if sigma == 0:  # a noiseless (e.g. constant) slice: nothing to remove
            out[..., k] = image
        elif method == "nlm":
            out[..., k] = denoise_nl_means(image, patch_size=NLM_PATCH_SIZE, patch_distance=NLM_PATCH_DISTANCE,
                                           h=strength * NLM_H_PER_SIGMA * sigma, sigma=sigma, fast_mode=True)
        else:
            out[..., k] = denoise_tv_chambolle(image, weight=strength * TV_WEIGHT_PER_SIGMA * sigma)
    return out.reshape(volume.shape)
