"""Volume writers: NIfTI and MetaImage, on exactly the grid they are given.

Orientation convention (the one MONAI's ``LoadImage`` uses): arrays are indexed in voxel order
``(i, j, k)`` and ``affine`` maps voxel indices to RAS world coordinates in mm. MetaImage stores
LPS, so its origin and direction are converted here and nowhere else.
"""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from drdd_med.data.files import atomic_output
from drdd_med.errors import DRDDInputError

RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])
HU_INT16_RANGE = (-32768, 32767)


def to_int16_hu(volume: np.ndarray) -> np.ndarray:
    """Round and clip HU values to int16 explicitly (never wrap around)."""
    return np.clip(np.rint(volume), *HU_INT16_RANGE).astype(np.int16)


def write_volume(
    volume: np.ndarray, affine: np.ndarray, path: str | os.PathLike, dtype=np.int16, overwrite: bool = False
) -> Path:
    """Write a 3D ``volume`` with its RAS ``affine`` to ``path`` (``.nii``, ``.nii.gz``, ``.mha``, ``.mhd``).

    ``dtype=np.int16`` rounds and clips (for HU); other dtypes are cast. The file appears only when
    complete; an existing file raises ``OutputExistsError`` unless ``overwrite``.
    """
    path = Path(path)
    volume = np.asarray(volume)
    affine = np.asarray(affine, dtype=np.float64)
    if volume.ndim != 3:
        raise DRDDInputError(f"{path.name}: expected a 3D volume to write, got shape {volume.shape}")
    data = to_int16_hu(volume) if np.dtype(dtype) == np.int16 else volume.astype(dtype)
    name = path.name.lower()
    with atomic_output(path, overwrite=overwrite) as tmp:
        if name.endswith((".nii", ".nii.gz")):
            image = nib.Nifti1Image(data, affine)
            image.header.set_qform(affine, code=1)
            image.header.set_sform(affine, code=1)
            nib.save(image, tmp)
        elif name.endswith((".mha", ".mhd")):
            if name.endswith(".mhd"):
                raise DRDDInputError(f"{path.name}: write .mha (one file); .mhd needs a separate raw file")
            sitk.WriteImage(to_sitk(data, affine), str(tmp), useCompression=True)
        else:
            raise DRDDInputError(f"{path.name}: unknown output format; use .nii, .nii.gz or .mha")
    return path


def to_sitk(data: np.ndarray, affine: np.ndarray) -> sitk.Image:
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    direction_ras = affine[:3, :3] / spacing
    image = sitk.GetImageFromArray(np.ascontiguousarray(data.transpose(2, 1, 0)))  # sitk wants (k, j, i)
    image.SetSpacing(spacing.tolist())
    image.SetOrigin((RAS_TO_LPS @ affine[:3, 3]).tolist())
    image.SetDirection((RAS_TO_LPS @ direction_ras).ravel().tolist())
    return image
