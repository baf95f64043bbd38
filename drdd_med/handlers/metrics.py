"""Ignite handlers for the clinical metrics: attach to a validation evaluator, read ``engine.state.metrics``.

Each handler wraps the ``CumulativeIterationMetric`` of the same name in ``drdd_med.metrics``.
By default it reads ``pred``, ``label`` and ``mask`` from ``engine.state.output`` -- a dict of
batch-first tensors in HU, or the list of per-item dicts that MONAI's decollation produces::

    MaskedMAEHandler(output_transform=from_engine(["pred", "label", "mask"])).attach(evaluator, "mae")

Pass ``from_engine(["pred", "label"])`` to score whole images without a mask. With
``save_details`` the per-image scores go to ``engine.state.metric_details[name]``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from ignite.metrics.metric import reinit__is_reduced
from monai.handlers import IgniteMetricHandler, from_engine
from monai.utils import MetricReduction

from drdd_med.metrics import functional
from drdd_med.metrics.metric import (
    MaskedMAEMetric,
    MaskedMSSSIMMetric,
    MaskedPSNRMetric,
    MaskedSSIMMetric,
    TissueMAEMetric,
    WindowedPSNRMetric,
    WindowedRMSEMetric,
    WindowedSSIMMetric,
)

__all__ = [
    "MaskedMAEHandler",
    "MaskedMSSSIMHandler",
    "MaskedMetricHandler",
    "MaskedPSNRHandler",
    "MaskedSSIMHandler",
    "TissueMAEHandler",
    "WindowedPSNRHandler",
    "WindowedRMSEHandler",
    "WindowedSSIMHandler",
]

PRED_LABEL_MASK = ("pred", "label", "mask")


class MaskedMetricHandler(IgniteMetricHandler):
    """``IgniteMetricHandler`` whose ``update`` takes ``(y_pred, y)`` or ``(y_pred, y, mask)``.

    MONAI's handler accepts only pairs, and Ignite unrolls lists of decollated items only as pairs,
    so unrolling is left to the metric, which accepts lists of channel-first tensors itself.
    """

    def __init__(
        self,
        metric_fn,
        output_transform: Callable | None = None,
        save_details: bool = True,
    ) -> None:
        super().__init__(
            metric_fn=metric_fn,
            output_transform=output_transform or from_engine(list(PRED_LABEL_MASK)),
            save_details=save_details,
        )
        self._skip_unrolling = True  # ignite.metrics.Metric would split lists into (y_pred, y) pairs

    @reinit__is_reduced
    def update(self, output: Sequence) -> None:
        if len(output) not in (2, 3):
            raise ValueError(f"output must be (y_pred, y) or (y_pred, y, mask), got {len(output)} items")
        self.metric_fn(*output)


class MaskedMAEHandler(MaskedMetricHandler):
    """Masked MAE in HU (SynthRAD2023/2025); the checkpoint-selection metric of drdd_med training."""

    def __init__(
        self,
        output_transform: Callable | None = None,
        save_details: bool = True,
        reduction: MetricReduction | str = MetricReduction.MEAN,
    ) -> None:
        super().__init__(MaskedMAEMetric(reduction=reduction), output_transform, save_details)


class MaskedPSNRHandler(MaskedMetricHandler):
    """Masked PSNR in dB, clipped to ``clip`` (SynthRAD2023 default; ``SYNTHRAD2025_CLIP`` for 2025)."""

    def __init__(
        self,
        clip: Sequence[float] = functional.SYNTHRAD2023_CLIP,
        output_transform: Callable | None = None,
        save_details: bool = True,
        reduction: MetricReduction | str = MetricReduction.MEAN,
    ) -> None:
        super().__init__(MaskedPSNRMetric(clip=clip, reduction=reduction), output_transform, save_details)


class MaskedSSIMHandler(MaskedMetricHandler):
    """SynthRAD2023 masked SSIM."""

    def __init__(
        self,
        clip: Sequence[float] = functional.SYNTHRAD2023_CLIP,
        window: int = 7,
        border: int = 3,
        output_transform: Callable | None = None,
        save_details: bool = True,
        reduction: MetricReduction | str = MetricReduction.MEAN,
    ) -> None:
        metric = MaskedSSIMMetric(clip=clip, window=window, border=border, reduction=reduction)
        super().__init__(metric, output_transform, save_details)


class MaskedMSSSIMHandler(MaskedMetricHandler):
    """SynthRAD2025 masked MS-SSIM of 3D volumes."""

    def __init__(
        self,
        clip: Sequence[float] = functional.SYNTHRAD2025_CLIP,
        output_transform: Callable | None = None,
        save_details: bool = True,
        reduction: MetricReduction | str = MetricReduction.MEAN,
    ) -> None:
        super().__init__(MaskedMSSSIMMetric(clip=clip, reduction=reduction), output_transform, save_details)


class WindowedPSNRHandler(MaskedMetricHandler):
    """PSNR inside an HU window (a ``HU_WINDOWS`` name or (low, high))."""

    def __init__(
        self,
        window: str | Sequence[float] = "abdomen",
        output_transform: Callable | None = None,
        save_details: bool = True,
        reduction: MetricReduction | str = MetricReduction.MEAN,
    ) -> None:
        super().__init__(WindowedPSNRMetric(window=window, reduction=reduction), output_transform, save_details)


class WindowedSSIMHandler(MaskedMetricHandler):
    """SSIM inside an HU window."""

    def __init__(
        self,
        window: str | Sequence[float] = "abdomen",
        output_transform: Callable | None = None,
        save_details: bool = True,
        reduction: MetricReduction | str = MetricReduction.MEAN,
    ) -> None:
        super().__init__(WindowedSSIMMetric(window=window, reduction=reduction), output_transform, save_details)


class WindowedRMSEHandler(MaskedMetricHandler):
    """RMSE in HU inside an HU window."""

    def __init__(
        self,
        window: str | Sequence[float] = "abdomen",
        output_transform: Callable | None = None,
        save_details: bool = True,
        reduction: MetricReduction | str = MetricReduction.MEAN,
    ) -> None:
        super().__init__(WindowedRMSEMetric(window=window, reduction=reduction), output_transform, save_details)


class TissueMAEHandler(MaskedMetricHandler):
    """MAE in HU of one tissue class of the reference (``"air"``, ``"soft_tissue"`` or ``"bone"``).

    Images without that class are skipped; if no image has it the value is NaN.
    """

    def __init__(
        self,
        tissue: str = "bone",
        output_transform: Callable | None = None,
        save_details: bool = True,
    ) -> None:
        metric = TissueMAEMetric(classes=(tissue,), reduction=MetricReduction.MEAN)
        super().__init__(metric, output_transform, save_details)
