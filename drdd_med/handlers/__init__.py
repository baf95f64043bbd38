"""Ignite event handlers for drdd_med workflows."""

from drdd_med.handlers.budget import TrainingBudget
from drdd_med.handlers.ema import EMAHandler
from drdd_med.handlers.metrics import (
    MaskedMAEHandler,
    MaskedMetricHandler,
    MaskedMSSSIMHandler,
    MaskedPSNRHandler,
    MaskedSSIMHandler,
    TissueMAEHandler,
    WindowedPSNRHandler,
    WindowedRMSEHandler,
    WindowedSSIMHandler,
)
from drdd_med.handlers.preview import MLFlowPreviewHandler, TensorBoardPreviewHandler, validation_preview
from drdd_med.handlers.validation import FinalValidationHandler
from drdd_med.handlers.writer import SyntheticCTWriter

__all__ = [
    "EMAHandler",
    "FinalValidationHandler",
    "MLFlowPreviewHandler",
    "TensorBoardPreviewHandler",
    "SyntheticCTWriter",
    "TrainingBudget",
    "MaskedMAEHandler",
    "MaskedMSSSIMHandler",
    "MaskedMetricHandler",
    "MaskedPSNRHandler",
    "MaskedSSIMHandler",
    "TissueMAEHandler",
    "WindowedPSNRHandler",
    "WindowedRMSEHandler",
    "WindowedSSIMHandler",
    "validation_preview",
]
