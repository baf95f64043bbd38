"""Reference baselines that a learned translation has to beat.

``monotone_intensity_baseline`` is the best any intensity-only map can do on a case: it is fitted on
that very case's target (an oracle), so a model that does not beat it has learned nothing beyond a
look-up table. MR to CT is not monotone — cortical bone and air are both dark in MR but lie at
opposite ends of the HU scale — so this baseline fails exactly where anatomy has to be recognised,
and its error measures how much of the task is more than an intensity curve.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import isotonic_regression

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
