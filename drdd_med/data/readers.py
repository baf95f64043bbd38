"""Loading volumes from NIfTI, MetaImage/NRRD and DICOM with one orientation convention.

Every reader here returns what MONAI's ``LoadImage`` gives for NIfTI: an array in voxel order
``(i, j, k)`` and an ``affine`` mapping voxel indices to RAS world coordinates in mm
(``drdd_med.data.writers`` writes the same convention). MetaImage, NRRD and DICOM store LPS; the
conversion happens in the reader and nowhere else.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import nibabel as nib
import numpy as np
import SimpleITK as sitk
from monai.data import ImageReader, MetaTensor, NibabelReader
from monai.data.utils import is_supported_format
from monai.transforms import LoadImage, LoadImaged
from monai.utils import MetaKeys, SpaceKeys, ensure_tuple

from drdd_med.data.writers import RAS_TO_LPS
from drdd_med.errors import DRDDInputError, GridMismatchError, VolumeTooLargeError

if TYPE_CHECKING:
    from drdd_med.data.dicom import SeriesSelection


NIFTI_SUFFIXES = (".nii", ".nii.gz")
SIMPLEITK_SUFFIXES = (".mha", ".mhd", ".nrrd", ".nhdr")
DICOM_SUFFIXES = (".dcm", ".ima")


def check_volume_size(
    shape: Sequence[int], what: str, max_voxels: int | None = None, max_bytes: int | None = None, itemsize: int = 4
) -> None:
    """Raise ``VolumeTooLargeError`` if a volume of ``shape`` (``itemsize`` bytes a voxel) exceeds a limit."""
    voxels = math.prod(int(n) for n in shape)
    size = "x".join(str(int(n)) for n in shape)
    if max_voxels is not None and voxels > max_voxels:
        raise VolumeTooLargeError(f"{what}: {size} = {voxels} voxels exceed the limit max_voxels={max_voxels}")
    if max_bytes is not None and voxels * itemsize > max_bytes:
        raise VolumeTooLargeError(
            f"{what}: {size} voxels need {voxels * itemsize} bytes in memory, more than max_bytes={max_bytes}"
        )


def _sitk_array_and_meta(image: sitk.Image) -> tuple[np.ndarray, dict]:
    dimension = image.GetDimension()
    spatial = min(dimension, 3)
    array = sitk.GetArrayFromImage(image)  # (..., k, j, i) then components, if any
    components = array.ndim - dimension
    array = array.transpose(*range(dimension - 1, -1, -1), *range(dimension, array.ndim))
    extra = tuple(n for n in array.shape[spatial:dimension] if n != 1)  # e.g. a 4D image's time axis
    array = array.reshape(array.shape[:spatial] + extra + array.shape[dimension:])
    direction = np.asarray(image.GetDirection()).reshape(dimension, dimension)[:spatial, :spatial]
    affine = np.eye(4)
    affine[:spatial, :spatial] = direction * np.asarray(image.GetSpacing()[:spatial])
    affine[:spatial, 3] = image.GetOrigin()[:spatial]
    affine[:3] = RAS_TO_LPS @ affine[:3]
    meta = {
        MetaKeys.AFFINE: affine,
        MetaKeys.ORIGINAL_AFFINE: affine.copy(),
        MetaKeys.SPATIAL_SHAPE: np.asarray(array.shape[:spatial]),
        MetaKeys.SPACE: SpaceKeys.RAS,
        MetaKeys.ORIGINAL_CHANNEL_DIM: -1 if extra or components else float("nan"),
    }
    return array, meta


class SimpleITKReader(ImageReader):
    """MONAI image reader for MetaImage (``.mha``/``.mhd``) and NRRD through SimpleITK.

    Arrays come in voxel order (i, j, k) with an RAS affine, exactly as ``NibabelReader`` gives
    NIfTI (MONAI's own ``ITKReader`` needs the ``itk`` package, which drdd_med does not require).
    Several files must share one grid; they are stacked on a new first (channel) axis, or joined
    along their own last (channel) axis when they have one (vector pixels, a fourth axis).
    """

    def verify_suffix(self, filename: Sequence[str | Path] | str | Path) -> bool:
        return is_supported_format(filename, [s.lstrip(".") for s in SIMPLEITK_SUFFIXES])

    def read(self, data: Sequence[str | Path] | str | Path, **kwargs) -> sitk.Image | list[sitk.Image]:
        images = [sitk.ReadImage(str(name)) for name in ensure_tuple(data)]
        return images if len(images) > 1 else images[0]

    def get_data(self, img: sitk.Image | Sequence[sitk.Image]) -> tuple[np.ndarray, dict]:
        images = [img] if isinstance(img, sitk.Image) else list(img)  # an Image iterates over its pixels
        loaded = [_sitk_array_and_meta(image) for image in images]
        array, meta = loaded[0]
        if len(loaded) == 1:
            return array, meta
        for other, other_meta in loaded[1:]:
            if other.shape != array.shape or not np.allclose(other_meta[MetaKeys.AFFINE], meta[MetaKeys.AFFINE]):
                raise GridMismatchError("images stacked as channels must share one grid (shape and affine)")
        if meta[MetaKeys.ORIGINAL_CHANNEL_DIM] == -1:  # images with channels already: join those
            return np.concatenate([a for a, _ in loaded], axis=-1), meta
        meta[MetaKeys.ORIGINAL_CHANNEL_DIM] = 0
        return np.stack([a for a, _ in loaded]), meta


class LoadVolumed(LoadImaged):
    """MONAI's ``LoadImaged`` that also reads MetaImage and NRRD (SynthRAD2025's ``.mha``) through
    ``SimpleITKReader``, picked by file suffix like MONAI's own readers; MONAI's ``ITKReader`` would
    need the ``itk`` package, which drdd_med does not require. With an explicit ``reader`` it is
    ``LoadImaged`` as it is. The bundles load every image with it."""

    def __init__(self, keys, reader=None, *args, **kwargs):
        super().__init__(keys, reader, *args, **kwargs)
        if reader is None:
            self.register(SimpleITKReader())


def _format_of(path: Path) -> str:
    name = path.name.lower()
    if path.is_dir():
        if name.endswith(NIFTI_SUFFIXES + SIMPLEITK_SUFFIXES):
            raise DRDDInputError(f"{path.name}: is a folder, not an image file")
        return "dicom"
    if name.endswith(NIFTI_SUFFIXES):
        return "nifti"
    if name.endswith(SIMPLEITK_SUFFIXES):
        return "simpleitk"
    if name.endswith(DICOM_SUFFIXES):
        return "dicom"
    with open(path, "rb") as handle:
        if handle.read(132)[128:] == b"DICM":  # DICOM files often have no or odd suffixes
            return "dicom"
    raise DRDDInputError(
        f"{path.name}: unknown image format; expected .nii, .nii.gz, .mha, .mhd, .nrrd, or a DICOM file or folder"
    )


def _header_shape(path: Path, image_format: str) -> tuple[int, ...]:
    if image_format == "nifti":
        return tuple(int(n) for n in nib.load(path).header.get_data_shape())
    info = sitk.ImageFileReader()
    info.SetFileName(str(path))
    info.ReadImageInformation()
    components = info.GetNumberOfComponents()
    return tuple(info.GetSize()) + ((components,) if components > 1 else ())


def load_volume(
    path: str | Path,
    *,
    require_3d: bool = True,
    max_voxels: int | None = None,
    max_bytes: int | None = None,
    selection: SeriesSelection | Mapping | None = None,
    resample: bool = False,
    expected_modality: str | None = None,
) -> MetaTensor:
    """Load one volume as a float32 ``MetaTensor`` (i, j, k) with its RAS affine, reader chosen by format.

    NIfTI goes through MONAI's ``NibabelReader``, MetaImage/NRRD through ``SimpleITKReader``, a
    folder or DICOM file through ``DicomSeriesReader`` (``selection``, ``resample`` and
    ``expected_modality`` apply to DICOM only; other formats record no modality). Shape and size
    limits are checked from the header before the voxels are read; trailing singleton axes
    (``x, y, z, 1``) count as 3D.
    """
    # dicom.py uses this module's size check, so it is imported where it is needed.
    from drdd_med.data.dicom import DicomSeriesReader

    path = Path(path)
    if path.is_symlink() and not path.exists():
        raise FileNotFoundError(f"{path.name}: broken symbolic link (its target does not exist)")
    if not path.exists():
        raise FileNotFoundError(f"{path.name}: no such file or folder")
    if path.is_file() and path.stat().st_size == 0:
        raise DRDDInputError(f"{path.name}: file is empty (0 bytes); an incomplete copy?")
    image_format = _format_of(path)
    if image_format == "dicom":
        reader: ImageReader = DicomSeriesReader(
            selection,
            resample=resample,
            expected_modality=expected_modality,
            max_voxels=max_voxels,
            max_bytes=max_bytes,
        )
        return LoadImage(image_only=True)(path, reader=reader)

    try:
        shape = _header_shape(path, image_format)
    except (OSError, EOFError, ValueError, RuntimeError, zlib.error) as err:
        raise DRDDInputError(f"{path.name}: cannot be read as {image_format} (damaged or not an image)") from err
    spatial = shape[:3] + tuple(n for n in shape[3:] if n != 1)
    if require_3d and len(spatial) != 3:
        raise DRDDInputError(f"{path.name}: expected a 3D volume, got shape {shape}")
    check_volume_size(spatial, path.name, max_voxels=max_voxels, max_bytes=max_bytes)
    reader = NibabelReader(squeeze_non_spatial_dims=True) if image_format == "nifti" else SimpleITKReader()
    try:
        return LoadImage(image_only=True)(path, reader=reader)
    except DRDDInputError:
        raise
    except (OSError, EOFError, ValueError, RuntimeError, zlib.error) as err:
        raise DRDDInputError(f"{path.name}: cannot be read as {image_format} (damaged or truncated)") from err

