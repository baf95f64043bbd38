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
from drdd_med.handlers.writer import SyntheticCTWriter

__all__ = [
    "EMAHandler",
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
]
