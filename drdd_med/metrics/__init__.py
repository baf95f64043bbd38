"""Clinical image metrics: plain functions (``functional``) and MONAI metric classes (``metric``).

The Ignite adapters for validation loops are in ``drdd_med.handlers``.
"""

from drdd_med.metrics.functional import (
    HU_WINDOWS,
    MS_SSIM_WEIGHTS,
    SYNTHRAD2023_CLIP,
    SYNTHRAD2025_CLIP,
    TISSUE_CLASSES,
    TISSUE_THRESHOLDS,
    hu_window,
    synthrad2023_mae,
    synthrad2023_psnr,
    synthrad2023_ssim,
    synthrad2025_ms_ssim,
    synthrad_structural_similarity,
    tissue_mae,
    validate_inputs,
    windowed_psnr,
    windowed_rmse,
    windowed_ssim,
)
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
    "HU_WINDOWS",
    "MS_SSIM_WEIGHTS",
    "SYNTHRAD2023_CLIP",
    "SYNTHRAD2025_CLIP",
    "TISSUE_CLASSES",
    "TISSUE_THRESHOLDS",
    "MaskedMAEMetric",
    "MaskedMSSSIMMetric",
    "MaskedPSNRMetric",
    "MaskedSSIMMetric",
    "TissueMAEMetric",
    "WindowedPSNRMetric",
    "WindowedRMSEMetric",
    "WindowedSSIMMetric",
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
