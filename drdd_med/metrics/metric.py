"""The clinical metrics as MONAI ``CumulativeIterationMetric`` classes, for validation loops and bundles.

Each class scores every image of a batch with the function of the same definition in
``drdd_med.metrics.functional`` and keeps the scores until ``aggregate()``. Call as
``metric(y_pred, y, mask)`` with batch-first tensors in HU, shape (B, C, X, Y, Z) (or (B, C, H, W)
where the definition allows 2D), or with lists of channel-first tensors as MONAI's
``decollate_batch`` produces. ``mask`` is optional, (B, 1, ...) or (B, C, ...), binarised as
``mask > 0``. Inputs are checked as the functions check them, with errors naming the batch item.

``aggregate()`` applies the MONAI ``reduction`` (default ``"mean"``) to the buffer of shape
(N, C): as everywhere in MONAI, NaN entries are skipped and counted by ``get_not_nans``. Only
``TissueMAEMetric`` writes NaN, for a tissue class absent from an image; a class absent from every
image aggregates to NaN (where MONAI would report 0, which would read as a perfect score).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from monai.metrics import CumulativeIterationMetric
from monai.metrics.utils import do_metric_reduction
from monai.utils import MetricReduction

from drdd_med.errors import DRDDInputError, GridMismatchError
from drdd_med.metrics import functional

__all__ = [
    "MaskedMAEMetric",
    "MaskedMSSSIMMetric",
    "MaskedPSNRMetric",
    "MaskedSSIMMetric",
    "TissueMAEMetric",
    "WindowedPSNRMetric",
    "WindowedRMSEMetric",
    "WindowedSSIMMetric",
]


class _PerImageMetric(CumulativeIterationMetric):
    """Scores each (item, channel) image with ``_score`` and reduces the scores the MONAI way."""

    def __init__(self, reduction: MetricReduction | str = MetricReduction.MEAN, get_not_nans: bool = False) -> None:
        super().__init__()
        self.reduction = reduction
        self.get_not_nans = get_not_nans

    def _score(self, pred: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor | None, case: str) -> list[float]:
        raise NotImplementedError

    def __call__(self, y_pred, y, mask=None) -> torch.Tensor:  # type: ignore[override]
        """Score a batch (tensors) or decollated items (lists); returns and buffers the (B, C) scores."""
        if isinstance(y_pred, (list, tuple)) or isinstance(y, (list, tuple)):
            masks = [None] * len(y_pred) if mask is None else mask
            if not len(y_pred) == len(y) == len(masks):
                raise DRDDInputError(
                    f"{len(y_pred)} predictions, {len(y)} references and {len(masks)} masks: counts must match"
                )
            scores = torch.cat(
                [
                    self._compute_tensor(p.unsqueeze(0), t.unsqueeze(0), None if m is None else m.unsqueeze(0))
                    for p, t, m in zip(y_pred, y, masks)
                ]
            )
        else:
            scores = self._compute_tensor(y_pred, y, mask)
        self.extend(scores)
        return scores

    def _compute_tensor(self, y_pred, y, mask=None) -> torch.Tensor:  # type: ignore[override]
        y_pred, y = torch.as_tensor(y_pred), torch.as_tensor(y)
        if y_pred.shape != y.shape:
            raise GridMismatchError(
                f"prediction batch shape {tuple(y_pred.shape)} differs from reference {tuple(y.shape)}"
            )
        if y_pred.ndim < 3:
            raise DRDDInputError(f"expected batch-first tensors (B, C, spatial...), got shape {tuple(y_pred.shape)}")
        if mask is not None:
            mask = torch.as_tensor(mask)
            if mask.ndim != y.ndim or mask.shape[0] != y.shape[0] or mask.shape[1] not in (1, y.shape[1]):
                raise GridMismatchError(
                    f"mask batch shape {tuple(mask.shape)} does not fit reference {tuple(y.shape)} "
                    "(expected (B, 1, ...) or (B, C, ...))"
                )
        rows = []
        for item in range(y.shape[0]):
            row: list[float] = []
            for channel in range(y.shape[1]):
                item_mask = None if mask is None else mask[item, channel if mask.shape[1] > 1 else 0]
                case = f"batch item {item}" + (f", channel {channel}" if y.shape[1] > 1 else "")
                row.extend(self._score(y_pred[item, channel], y[item, channel], item_mask, case))
            rows.append(row)
        return torch.tensor(rows, dtype=torch.float64)

    def aggregate(self, reduction: MetricReduction | str | None = None):
        """Reduce the buffered (N, C) scores; returns ``(value, not_nans)`` when ``get_not_nans``."""
        data = self.get_buffer()
        if not isinstance(data, torch.Tensor):
            raise ValueError(f"{type(self).__name__}: nothing to aggregate; call the metric on a batch first")
        value, not_nans = do_metric_reduction(data.clone(), reduction or self.reduction)
        if isinstance(value, torch.Tensor) and value.shape == not_nans.shape:
            # MONAI reports 0 where every entry was NaN; for an error metric 0 would read as perfect
            value = torch.where(not_nans > 0, value, torch.full_like(value, math.nan))
        return (value, not_nans) if self.get_not_nans else value


class MaskedMAEMetric(_PerImageMetric):
    """SynthRAD2023/2025 masked MAE in HU (``functional.synthrad2023_mae``)."""

    def _score(self, pred, ref, mask, case):
        return [functional.synthrad2023_mae(pred, ref, mask, case=case)]


class MaskedPSNRMetric(_PerImageMetric):
    """SynthRAD masked PSNR in dB (``functional.synthrad2023_psnr``); ``clip=SYNTHRAD2025_CLIP`` for 2025."""

    def __init__(self, clip: Sequence[float] = functional.SYNTHRAD2023_CLIP, **kwargs) -> None:
        super().__init__(**kwargs)
        self.clip = tuple(clip)

    def _score(self, pred, ref, mask, case):
        return [functional.synthrad2023_psnr(pred, ref, mask, self.clip, case=case)]


class MaskedSSIMMetric(_PerImageMetric):
    """SynthRAD2023 masked SSIM (``functional.synthrad2023_ssim``), 3D volumes or 2D slices."""

    def __init__(
        self, clip: Sequence[float] = functional.SYNTHRAD2023_CLIP, window: int = 7, border: int = 3, **kwargs
    ) -> None:
        super().__init__(**kwargs)
        self.clip, self.window, self.border = tuple(clip), window, border

    def _score(self, pred, ref, mask, case):
        return [functional.synthrad2023_ssim(pred, ref, mask, self.clip, self.window, self.border, case=case)]


class MaskedMSSSIMMetric(_PerImageMetric):
    """SynthRAD2025 masked MS-SSIM of 3D volumes (``functional.synthrad2025_ms_ssim``)."""

    def __init__(
        self,
        clip: Sequence[float] = functional.SYNTHRAD2025_CLIP,
        weights: Sequence[float] = functional.MS_SSIM_WEIGHTS,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.clip, self.weights = tuple(clip), tuple(weights)

    def _score(self, pred, ref, mask, case):
        return [functional.synthrad2025_ms_ssim(pred, ref, mask, self.clip, weights=self.weights, case=case)]


class _WindowedMetric(_PerImageMetric):
    def __init__(self, window: str | Sequence[float] = "abdomen", **kwargs) -> None:
        super().__init__(**kwargs)
        functional.hu_window(window)  # reject an unknown window now, not at the first batch
        self.window = window if isinstance(window, str) else tuple(window)


class WindowedPSNRMetric(_WindowedMetric):
    """PSNR inside an HU window (``functional.windowed_psnr``); ``window`` a ``HU_WINDOWS`` name or (low, high)."""

    def _score(self, pred, ref, mask, case):
        return [functional.windowed_psnr(pred, ref, self.window, mask, case=case)]


class WindowedRMSEMetric(_WindowedMetric):
    """RMSE in HU inside an HU window (``functional.windowed_rmse``)."""

    def _score(self, pred, ref, mask, case):
        return [functional.windowed_rmse(pred, ref, self.window, mask, case=case)]


class WindowedSSIMMetric(_WindowedMetric):
    """SSIM inside an HU window (``functional.windowed_ssim``); 2D slices give the per-slice SSIM of LDCT papers."""

    def __init__(self, window: str | Sequence[float] = "abdomen", win_size: int = 7, border: int = 3, **kwargs) -> None:
        super().__init__(window, **kwargs)
        self.win_size, self.border = win_size, border

    def _score(self, pred, ref, mask, case):
        return [functional.windowed_ssim(pred, ref, self.window, mask, self.win_size, self.border, case=case)]


class TissueMAEMetric(_PerImageMetric):
    """MAE per tissue class of the reference (``functional.tissue_mae``): one buffer column per class.

    ``classes`` selects and orders the columns (default air, soft tissue, bone). A class absent from
    an image is NaN in the buffer and skipped by the reduction (MONAI's ``not_nans``). The default
    reduction ``"mean_batch"`` returns one mean per class.
    """

    def __init__(
        self,
        classes: Sequence[str] = functional.TISSUE_CLASSES,
        reduction: MetricReduction | str = MetricReduction.MEAN_BATCH,
        get_not_nans: bool = False,
    ) -> None:
        super().__init__(reduction=reduction, get_not_nans=get_not_nans)
        unknown = set(classes) - set(functional.TISSUE_CLASSES)
        if unknown or not classes:
            raise DRDDInputError(f"tissue classes must be among {functional.TISSUE_CLASSES}, got {list(classes)}")
        self.classes = tuple(classes)

    def _score(self, pred, ref, mask, case):
        per_class = functional.tissue_mae(pred, ref, mask, case=case)
        return [math.nan if per_class[name] is None else per_class[name] for name in self.classes]
