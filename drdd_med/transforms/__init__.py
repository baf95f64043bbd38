"""MONAI-style transforms: array transforms in ``array.py``, dictionary twins in ``dictionary.py``."""

from drdd_med.transforms.array import (
    CT_HU_RANGE,
    BodyMask,
    CheckVolume,
    NormalizeHU,
    RandPairedPatch,
    RobustNormalize,
)
from drdd_med.transforms.cbct import SimulateCBCT, SimulateCBCTd, SimulateCBCTD, SimulateCBCTDict
from drdd_med.transforms.ldct import SimulateLowDose, SimulateLowDosed, SimulateLowDoseD, SimulateLowDoseDict
from drdd_med.transforms.dictionary import (
    BodyMaskd,
    BodyMaskD,
    BodyMaskDict,
    CheckVolumesd,
    CheckVolumesD,
    CheckVolumesDict,
    NormalizeHUd,
    NormalizeHUD,
    NormalizeHUDict,
    RandPairedPatchd,
    RandPairedPatchD,
    RandPairedPatchDict,
    RobustNormalized,
    RobustNormalizeD,
    RobustNormalizeDict,
)
