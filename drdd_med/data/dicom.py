"""Reading DICOM image series into volumes, refusing stacks that do not form one.

Orientation convention (the one MONAI's ``LoadImage`` gives for NIfTI): the array is indexed
``(i, j, k)`` = (column, row, slice) and the affine maps those indices to RAS world coordinates in
mm. Slices are ordered by their position along the slice normal ``n = row cosines x column
cosines``, ascending, as ITK/GDCM order them; ``InstanceNumber`` is never used. A DICOM series and
its NIfTI conversion by SimpleITK therefore load as the same array with the same affine.

The work is split in two steps so that every problem is found before any pixel is decoded:
``scan_dicom_series`` reads headers only (groups, selects, validates geometry and size) and returns
a :class:`SeriesInfo`; ``read_series_array`` decodes the pixels of a scanned series. Messages name
a series by a short label (number, description, modality and a hash of its UID) and a slice by its
file name, never by patient data; logs carry no paths.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from monai.data import ImageReader, MetaTensor
from monai.transforms import LoadImage
from monai.utils import ImageMetaKey, MetaKeys, SpaceKeys, ensure_tuple
from pydicom import uid as dicom_uid
from pydicom.dataset import Dataset
from pydicom.pixels.decoders.base import get_decoder
from scipy import ndimage

from drdd_med.data.readers import check_volume_size
from drdd_med.data.writers import RAS_TO_LPS
from drdd_med.errors import DRDDInputError, GeometryError, SeriesSelectionError

logger = logging.getLogger(__name__)

SINGLE_FRAME_CLASSES = frozenset(
    {dicom_uid.CTImageStorage, dicom_uid.MRImageStorage, dicom_uid.PositronEmissionTomographyImageStorage}
)
MULTI_FRAME_CLASSES = frozenset(
    {
        dicom_uid.EnhancedCTImageStorage,
        dicom_uid.EnhancedMRImageStorage,
        dicom_uid.EnhancedPETImageStorage,
        dicom_uid.LegacyConvertedEnhancedCTImageStorage,
        dicom_uid.LegacyConvertedEnhancedMRImageStorage,
        dicom_uid.LegacyConvertedEnhancedPETImageStorage,
    }
)
UidHash = Callable[[str], str]  # a UID -> the short hash naming its series in labels
PIXEL_DATA_TAG = 0x7FE00010
UNDEFINED_LENGTH = 0xFFFFFFFF
DEFER_SIZE_BYTES = 1024
NATIVE_TRANSFER_SYNTAXES = frozenset(
    {dicom_uid.ImplicitVRLittleEndian, dicom_uid.ExplicitVRLittleEndian, dicom_uid.ExplicitVRBigEndian}
)
# The pip package that decodes each family of compressed transfer syntaxes (python-gdcm decodes all of them).
DECODER_PACKAGES = (
    (dicom_uid.JPEGTransferSyntaxes, "python-gdcm"),
    (dicom_uid.JPEGLSTransferSyntaxes, "pyjpegls"),
    (dicom_uid.JPEG2000TransferSyntaxes, "pylibjpeg-openjpeg"),
    ((dicom_uid.RLELossless,), "pylibjpeg-rle"),
)

DUPLICATE_TOLERANCE_MM = 0.01
# Positions written with two decimals jitter by 0.01 mm per slice; a missing slice doubles the gap.
SPACING_RTOL, SPACING_ATOL_MM = 0.01, 0.02
# In-plane drift of slice positions (fraction of a pixel) still treated as an unsheared stack.
SHEAR_TOLERANCE_PIXELS = 0.1
# A grid plane this close to a slice (fraction of the gap to the next one) takes that slice alone: a
# rounding-level weight must not blend in the other slice, whose edge strip is NaN where it covers nothing.
SLICE_WEIGHT_TOLERANCE = 1e-6


@dataclass(frozen=True)
class SeriesSelection:
    """An explicit rule choosing one series; every field given must match.

    ``description`` is a regular expression searched (case-insensitively) in SeriesDescription;
    ``series_uid`` is a full SeriesInstanceUID or the short ``#hash`` shown in series labels.
    """

    modality: str | None = None
    description: str | None = None
    series_number: int | None = None
    series_uid: str | None = None

    def matches(self, candidate: _Candidate) -> bool:
        if self.modality is not None and candidate.modality.upper() != self.modality.upper():
            return False
        if self.description is not None and not re.search(self.description, candidate.description, re.IGNORECASE):
            return False
        if self.series_number is not None and candidate.series_number != self.series_number:
            return False
        uid = self.series_uid
        if uid is not None and uid.lstrip("#") not in (candidate.series_uid, candidate.key_hash):
            return False
        return True


@dataclass(frozen=True, eq=False)
class SourceSlice:
    """One image plane of a source series: a single-frame file, or one frame of a multi-frame file."""

    file: Path
    frame: int | None  # 1-based frame number in a multi-frame file, None for a single-frame file
    sop_class_uid: str
    sop_instance_uid: str
    position: np.ndarray | None  # ImagePositionPatient, LPS mm
    orientation: np.ndarray | None  # ImageOrientationPatient: row cosines, column cosines
    pixel_spacing: tuple[float, float] | None  # (between rows, between columns), mm
    slice_spacing: float | None  # SpacingBetweenSlices or SliceThickness, for one-slice volumes
    rescale: tuple[float, float] | None  # (slope, intercept) of a single-frame file
    header: Dataset  # the file's header, pixel data not loaded (shared by the frames of one file)

    @property
    def name(self) -> str:
        return self.file.name if self.frame is None else f"{self.file.name} frame {self.frame}"


@dataclass(frozen=True, eq=False)
class SeriesInfo:
    """A scanned, validated series: what ``read_series_array`` decodes and the DICOM writer references.

    ``slices`` are in spatial order. ``shape``/``affine`` describe the volume that will be returned
    (voxel order (i, j, k), affine voxel -> RAS mm); when ``resampled`` they describe the regular
    grid the slices are resampled onto instead of the slices' own grid.
    """

    source: Path
    label: str
    modality: str
    series_uid: str
    header: Dataset
    slices: tuple[SourceSlice, ...]
    shape: tuple[int, int, int]
    affine: np.ndarray
    resampled: bool

    @property
    def affine_lps(self) -> np.ndarray:
        affine = self.affine.copy()
        affine[:3] = RAS_TO_LPS @ affine[:3]
        return affine


@dataclass(frozen=True, eq=False)
class _Candidate:
    series_uid: str
    key_hash: str
    modality: str
    description: str
    series_number: int | None
    label: str
    stacks: list[list[SourceSlice]]  # split by frame of reference, orientation, size, spacing, echo

    @property
    def summary(self) -> str:
        sizes = ", ".join(f"{len(s)} x {s[0].header.Rows}x{s[0].header.Columns}" for s in self.stacks)
        return f"{self.label}: {sizes} images"


@contextlib.contextmanager
def quiet_pydicom() -> Iterator[None]:
    """pydicom's validation warnings and log records quote element values (names, dates): mute them.

    This toggles process-wide settings while reading or writing and restores them afterwards.
    """
    settings, pydicom_logger = pydicom.config.settings, logging.getLogger("pydicom")
    saved = settings.reading_validation_mode, settings.writing_validation_mode, pydicom_logger.disabled
    settings.reading_validation_mode = settings.writing_validation_mode = pydicom.config.IGNORE
    pydicom_logger.disabled = True
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        settings.reading_validation_mode, settings.writing_validation_mode, pydicom_logger.disabled = saved


def _list_files(path: Path) -> list[Path]:
    if path.is_symlink() and not path.exists():
        raise FileNotFoundError(f"{path.name}: broken symbolic link (its target does not exist)")
    if not path.exists():
        raise FileNotFoundError(f"{path.name}: no such file or folder")
    if not path.is_dir():
        return [path]
    return sorted(
        p
        for p in path.rglob("*")
        if not any(part.startswith(".") for part in p.relative_to(path).parts)
        and (p.is_file() or (p.is_symlink() and not p.exists()))  # broken links are reported, not skipped
    )


def _read_header(file: Path) -> Dataset | None:
    """The header of a DICOM file (pixel data located, not read), or None for a file that is not DICOM."""
    try:
        if file.stat().st_size == 0:
            raise DRDDInputError(f"{file.name}: file is empty (0 bytes); an incomplete copy?")
        with open(file, "rb") as handle:
            has_dicom_magic = handle.read(132)[128:] == b"DICM"
    except FileNotFoundError as err:
        raise DRDDInputError(f"{file.name}: cannot be read (broken symbolic link)") from err
    except OSError as err:
        raise DRDDInputError(f"{file.name}: cannot be read ({err.strerror or type(err).__name__})") from err
    try:
        with quiet_pydicom():  # large values (pixel data) are only located, not read
            header = pydicom.dcmread(file, defer_size=DEFER_SIZE_BYTES)
    except Exception as err:  # pydicom raises many types on malformed input
        if has_dicom_magic:
            raise DRDDInputError(f"{file.name}: truncated or corrupt DICOM file") from err
        return None
    if has_dicom_magic and len(header) == 0:  # pydicom gives up silently on a cut-off encapsulated value
        raise DRDDInputError(f"{file.name}: truncated or corrupt DICOM file (no readable data set)")
    return header


def _floats(value, count: int) -> np.ndarray | None:
    if value is None or len(ensure_tuple(value)) != count:
        return None
    return np.array([float(v) for v in ensure_tuple(value)], dtype=np.float64)


def _slice_spacing(item: Dataset) -> float | None:
    for keyword in ("SpacingBetweenSlices", "SliceThickness"):
        value = item.get(keyword)
        if value not in (None, "") and float(value) > 0:
            return float(value)
    return None


def _expected_pixel_bytes(header: Dataset, frames: int) -> int:
    bits = int(header.get("BitsAllocated") or 0)
    return int(header.Rows) * int(header.Columns) * int(header.get("SamplesPerPixel") or 1) * frames * bits // 8


def _check_pixel_data_extent(file: Path, header: Dataset, frames: int) -> None:
    """Find truncated files from the header: where the pixel data ends, and how much it must hold."""
    if PIXEL_DATA_TAG not in header:
        raise DRDDInputError(f"{file.name}: truncated or corrupt DICOM file (no pixel data)")
    pixels = header.get_item(PIXEL_DATA_TAG, keep_deferred=True)
    length, start = getattr(pixels, "length", None), getattr(pixels, "value_tell", None)
    if length is None or start is None or length == UNDEFINED_LENGTH:  # encapsulated: checked when decoding
        return
    size = file.stat().st_size
    if start + length > size:
        raise DRDDInputError(
            f"{file.name}: truncated file ({size} bytes, its pixel data ends at byte {start + length})"
        )
    needed = _expected_pixel_bytes(header, frames)
    if header.file_meta.get("TransferSyntaxUID") in NATIVE_TRANSFER_SYNTAXES and length < needed:
        raise DRDDInputError(f"{file.name}: pixel data holds {length} bytes, its header needs {needed}")


def _slices_of(file: Path, header: Dataset) -> list[SourceSlice] | str:
    """The image planes of one file, or the reason it is skipped (a short category, no values)."""
    meta = getattr(header, "file_meta", Dataset())
    sop_class = str(header.get("SOPClassUID") or meta.get("MediaStorageSOPClassUID") or "")
    sop_instance = str(header.get("SOPInstanceUID") or meta.get("MediaStorageSOPInstanceUID") or "")
    if sop_class == dicom_uid.MediaStorageDirectoryStorage or file.name.upper() == "DICOMDIR":
        return "DICOMDIR"
    if sop_class not in SINGLE_FRAME_CLASSES | MULTI_FRAME_CLASSES:
        return "not a CT, MR or PET image"
    if "Rows" not in header or "Columns" not in header:
        raise DRDDInputError(f"{file.name}: truncated or corrupt DICOM header (no Rows/Columns)")
    frames = int(header.get("NumberOfFrames") or 1)
    _check_pixel_data_extent(file, header, frames)
    if sop_class in SINGLE_FRAME_CLASSES:
        spacing = _floats(header.get("PixelSpacing"), 2)
        return [
            SourceSlice(
                file=file,
                frame=None,
                sop_class_uid=sop_class,
                sop_instance_uid=sop_instance,
                position=_floats(header.get("ImagePositionPatient"), 3),
                orientation=_floats(header.get("ImageOrientationPatient"), 6),
                pixel_spacing=None if spacing is None else (spacing[0], spacing[1]),
                slice_spacing=_slice_spacing(header),
                rescale=(float(header.get("RescaleSlope") or 1.0), float(header.get("RescaleIntercept") or 0.0)),
                header=header,
            )
        ]
    shared = (header.get("SharedFunctionalGroupsSequence") or [Dataset()])[0]
    per_frame = header.get("PerFrameFunctionalGroupsSequence") or []

    def functional(frame_groups: Dataset, sequence: str) -> Dataset:
        for groups in (frame_groups, shared):
            if groups.get(sequence):
                return groups.get(sequence)[0]
        return Dataset()

    slices = []
    for index in range(frames):
        groups = per_frame[index] if index < len(per_frame) else Dataset()
        measures = functional(groups, "PixelMeasuresSequence")
        spacing = _floats(measures.get("PixelSpacing"), 2)
        slices.append(
            SourceSlice(
                file=file,
                frame=index + 1,
                sop_class_uid=sop_class,
                sop_instance_uid=sop_instance,
                position=_floats(functional(groups, "PlanePositionSequence").get("ImagePositionPatient"), 3),
                orientation=_floats(functional(groups, "PlaneOrientationSequence").get("ImageOrientationPatient"), 6),
                pixel_spacing=None if spacing is None else (spacing[0], spacing[1]),
                slice_spacing=_slice_spacing(measures),
                rescale=None,  # highdicom applies each frame's pixel value transformation
                header=header,
            )
        )
    return slices


def _mosaic_images(header: Dataset) -> int | None:
    """How many images a Siemens mosaic tiles into its one frame (0 if unknown), None if it is no mosaic.

    Siemens writes fMRI/DTI volumes as one frame of tiled slices, marked by MOSAIC in ImageType and
    by the private NumberOfImagesInMosaic; its position is not any one slice's.
    """
    try:
        count = header.get_private_item(0x0019, 0x0A, "SIEMENS MR HEADER").value
    except (KeyError, ValueError):
        count = None
    if isinstance(count, bytes):  # read without the private dictionary: US, little endian
        count = int.from_bytes(count[:2], "little")
    if count:
        return int(count)
    return 0 if "MOSAIC" in [str(v).upper() for v in ensure_tuple(header.get("ImageType") or ())] else None


def _series_label(number: int | None, description: str, modality: str, key_hash: str) -> str:
    described = f" '{description}'" if description else ""
    return f"series {number if number is not None else '?'}{described} ({modality or '?'} #{key_hash})"


def _rounded(values) -> tuple | None:
    return None if values is None else tuple(np.round(values, 4))


def _stack_key(item: SourceSlice) -> tuple:
    header = item.header
    return (
        str(header.get("FrameOfReferenceUID") or ""),
        _rounded(item.orientation),
        int(header.Rows),
        int(header.Columns),
        _rounded(item.pixel_spacing),
        str(header.get("EchoNumbers") or ""),
    )


def _series_key_hash(series_uid: str, sop_instance_uids: Sequence[str], uid_hash: UidHash | None = None) -> str:
    identity = series_uid or "|".join(sorted(sop_instance_uids))
    return uid_hash(identity) if uid_hash is not None else hashlib.sha256(identity.encode()).hexdigest()[:8]


def _series_identity(header: Dataset) -> tuple[int | None, str, str]:
    """(SeriesNumber, Modality, SeriesDescription) of a series' first header."""
    number = header.get("SeriesNumber")
    number = int(number) if number not in (None, "") else None
    return number, str(header.get("Modality") or ""), str(header.get("SeriesDescription") or "")


def _group_series(slices: list[SourceSlice], uid_hash: UidHash | None = None) -> list[_Candidate]:
    by_series: dict[str, list[SourceSlice]] = {}
    for item in slices:
        by_series.setdefault(str(item.header.get("SeriesInstanceUID") or ""), []).append(item)
    candidates = []
    for series_uid, members in by_series.items():
        key_hash = _series_key_hash(series_uid, [m.sop_instance_uid for m in members], uid_hash)
        first = members[0].header
        number, modality, description = _series_identity(first)
        stacks: dict[tuple, list[SourceSlice]] = {}
        for item in members:
            stacks.setdefault(_stack_key(item), []).append(item)
        candidates.append(
            _Candidate(
                series_uid=series_uid,
                key_hash=key_hash,
                modality=modality,
                description=description,
                series_number=number,
                label=_series_label(number, description, modality, key_hash),
                stacks=list(stacks.values()),
            )
        )
    return candidates


def _select(candidates: list[_Candidate], selection: SeriesSelection | None, where: str) -> _Candidate:
    how = "choose one with SeriesSelection(modality=..., description=..., series_number=..., series_uid=...)"
    listing = "; ".join(c.summary for c in candidates)
    if selection is None:
        if len(candidates) == 1:
            return candidates[0]
        raise SeriesSelectionError(f"{where}: {len(candidates)} series found, {how}: {listing}")
    matches = [c for c in candidates if selection.matches(c)]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise SeriesSelectionError(f"{where}: no series matches {selection}; found: {listing}")
    listing = "; ".join(c.summary for c in matches)
    raise SeriesSelectionError(f"{where}: {len(matches)} series match {selection}, narrow the selection: {listing}")


def _single_stack(candidate: _Candidate) -> list[SourceSlice]:
    if len(candidate.stacks) == 1:
        return candidate.stacks[0]
    keys = [_stack_key(stack[0]) for stack in candidate.stacks]
    names = ("frames of reference", "orientations", "row counts", "column counts", "pixel spacings", "echoes")
    differing = [name for position, name in enumerate(names) if len({key[position] for key in keys}) > 1]
    examples = ", ".join(stack[0].name for stack in candidate.stacks)
    raise GeometryError(
        f"{candidate.label}: mixes {' and '.join(differing)} ({len(candidate.stacks)} stacks, first images "
        f"{examples}); it is not one volume"
    )


def _plan_grid(
    slices: list[SourceSlice], label: str, resample: bool
) -> tuple[list[SourceSlice], tuple[int, int, int], np.ndarray, bool]:
    """Sort the slices spatially, validate the stack; return (slices, shape, RAS affine, resampled)."""
    for item in slices:
        mosaic = _mosaic_images(item.header)
        if mosaic is not None:
            tiles = f"{mosaic} images" if mosaic else "images"
            raise GeometryError(
                f"{label}: {item.name}: a Siemens mosaic ({tiles} tiled in one {item.header.Rows}x"
                f"{item.header.Columns} frame), not one slice; unpack it first, e.g. with dcm2niix"
            )
        if item.position is None or item.orientation is None or item.pixel_spacing is None:
            raise GeometryError(
                f"{label}: {item.name} has no complete plane geometry "
                "(ImagePositionPatient, ImageOrientationPatient, PixelSpacing)"
            )
    first = slices[0]
    rows, columns = int(first.header.Rows), int(first.header.Columns)
    row_spacing, column_spacing = first.pixel_spacing
    row_cosines, column_cosines = first.orientation[:3], first.orientation[3:]
    norms = np.linalg.norm(row_cosines), np.linalg.norm(column_cosines)
    if min(norms) < 0.5 or abs(row_cosines @ column_cosines) > 1e-3 * norms[0] * norms[1]:
        raise GeometryError(f"{label}: ImageOrientationPatient of {first.name} is not two orthogonal unit vectors")
    row_cosines, column_cosines = row_cosines / norms[0], column_cosines / norms[1]
    normal = np.cross(row_cosines, column_cosines)
    slices = sorted(slices, key=lambda s: float(s.position @ normal))
    positions = np.stack([s.position for s in slices])
    distances = positions @ normal
    origin = positions[0]
    resampled = False

    if len(slices) == 1:
        slice_step = first.slice_spacing or 1.0
        shape = (columns, rows, 1)
    else:
        gaps = np.diff(distances)
        duplicates = np.flatnonzero(gaps <= DUPLICATE_TOLERANCE_MM)
        if duplicates.size:
            k = duplicates[0]
            raise GeometryError(
                f"{label}: {duplicates.size} duplicate slice position(s), e.g. {slices[k].name} and "
                f"{slices[k + 1].name} at {distances[k]:.2f} mm along the slice normal "
                "(several echoes, phases or acquisitions in one series?)"
            )
        slice_step = float(np.median(gaps))
        deviation = np.abs(gaps - slice_step)
        uneven = deviation.max() > max(SPACING_RTOL * slice_step, SPACING_ATOL_MM)
        in_plane = (positions - origin) - np.outer(distances - distances[0], normal)
        drift = np.linalg.norm(in_plane, axis=1)
        sheared = drift.max() > SHEAR_TOLERANCE_PIXELS * min(row_spacing, column_spacing)
        problems = []
        if sheared:
            k = int(np.argmax(drift))
            tilt = np.degrees(np.arctan2(drift[k], distances[k] - distances[0]))
            problems.append(
                f"sheared slice stack (gantry tilt of about {tilt:.1f} degrees): {slices[k].name} lies "
                f"{drift[k]:.1f} mm off the slice normal through the first slice"
            )
        if uneven:
            k = int(np.argmax(deviation))
            problems.append(
                f"uneven slice spacing ({gaps.min():.2f} to {gaps.max():.2f} mm; missing slices?), e.g. "
                f"{gaps[k]:.2f} mm between {slices[k].name} and {slices[k + 1].name}"
            )
        if problems and not resample:
            raise GeometryError(
                f"{label}: {'; '.join(problems)}; pass resample=True to resample it onto a regular grid"
            )
        if problems:
            resampled = True
            # The regular grid spans every slice's footprint, in the slices' own pixel lattice.
            column_offsets = np.round(in_plane @ row_cosines / column_spacing, 3)
            row_offsets = np.round(in_plane @ column_cosines / row_spacing, 3)
            first_column, first_row = np.floor(column_offsets.min()), np.floor(row_offsets.min())
            columns += int(np.ceil(column_offsets.max()) - first_column)
            rows += int(np.ceil(row_offsets.max()) - first_row)
            origin = origin + first_column * column_spacing * row_cosines + first_row * row_spacing * column_cosines
            shape = (columns, rows, int(np.floor((distances[-1] - distances[0]) / slice_step + 1e-3)) + 1)
        else:
            slice_step = float((distances[-1] - distances[0]) / (len(slices) - 1))
            shape = (columns, rows, len(slices))

    affine = np.eye(4)
    affine[:3, 0] = row_cosines * column_spacing
    affine[:3, 1] = column_cosines * row_spacing
    affine[:3, 2] = normal * slice_step
    affine[:3, 3] = origin
    affine[:3] = RAS_TO_LPS @ affine[:3]
    return slices, shape, affine, resampled


@dataclass(frozen=True, eq=False)
class SeriesSummary:
    """One series found in a folder tree, from its headers alone (not validated as a volume).

    It has the attributes a ``SeriesSelection`` matches; ``files`` (any SOP class, image or not)
    go to ``scan_dicom_series`` to validate and read the series.
    """

    series_uid: str
    study_uid: str
    modality: str
    description: str
    series_number: int | None
    study_date: str
    key_hash: str
    label: str
    files: tuple[Path, ...]


def list_dicom_series(path: str | Path) -> list[SeriesSummary]:
    """Every DICOM series under ``path`` (a file or a folder, searched recursively), in label order.

    Files that are not DICOM and DICOMDIRs are skipped; files that cannot be read at all are
    counted in the log and skipped (their series is then refused when read, if a slice is missing).
    Grouping is by SeriesInstanceUID only: stacks, geometry and SOP classes are checked by
    ``scan_dicom_series`` on one series' files.
    """
    skipped: Counter[str] = Counter()
    groups: dict[str, list[tuple[Path, Dataset]]] = {}
    for file in _list_files(Path(path)):
        try:
            header = _read_header(file)
        except DRDDInputError:
            skipped["unreadable"] += 1
            continue
        if header is None:
            skipped["not DICOM"] += 1
            continue
        meta = getattr(header, "file_meta", Dataset())
        sop_class = str(header.get("SOPClassUID") or meta.get("MediaStorageSOPClassUID") or "")
        if sop_class == dicom_uid.MediaStorageDirectoryStorage or file.name.upper() == "DICOMDIR":
            skipped["DICOMDIR"] += 1
            continue
        groups.setdefault(str(header.get("SeriesInstanceUID") or ""), []).append((file, header))
    if skipped:
        logger.info("skipped %s", ", ".join(f"{count} file(s): {why}" for why, count in sorted(skipped.items())))
    summaries = []
    for series_uid, members in groups.items():
        sop_uids = [str(header.get("SOPInstanceUID") or "") for _, header in members]
        key_hash = _series_key_hash(series_uid, sop_uids)
        first = members[0][1]
        number, modality, description = _series_identity(first)
        summaries.append(
            SeriesSummary(
                series_uid=series_uid,
                study_uid=str(first.get("StudyInstanceUID") or ""),
                modality=modality,
                description=description,
                series_number=number,
                study_date=str(first.get("StudyDate") or ""),
                key_hash=key_hash,
                label=_series_label(number, description, modality, key_hash),
                files=tuple(file for file, _ in members),
            )
        )
    return sorted(summaries, key=lambda s: (s.study_uid, s.series_number is None, s.series_number or 0, s.key_hash))


def scan_dicom_series(
    path: str | Path | Sequence[str | Path],
    selection: SeriesSelection | Mapping | None = None,
    *,
    resample: bool = False,
    expected_modality: str | None = None,
    max_voxels: int | None = None,
    max_bytes: int | None = None,
    uid_hash: UidHash | None = None,
) -> SeriesInfo:
    """Scan the headers under ``path`` (a DICOM file or a folder, searched recursively) and validate one series.

    ``path`` may also be a list of files, e.g. the ``files`` of a ``SeriesSummary`` from
    ``list_dicom_series``, so one series of a large folder tree is read without rescanning the tree.

    Files that are not DICOM, DICOMDIRs and objects other than CT/MR/PET images are skipped (and
    counted in the log); empty, truncated or unreadable files are errors. Several series need a
    ``selection``; a series whose slices do not form a regular volume (duplicates, uneven spacing,
    gantry tilt, mixed orientations) raises ``GeometryError`` unless ``resample`` (not possible for
    duplicates or mixed orientations). The size of the volume to be returned is checked against
    ``max_voxels``/``max_bytes`` (float32) here, before any pixel is read.

    Messages and logs name a series by a label with an unkeyed hash of its UID, or with
    ``uid_hash(uid)`` when given: a batch conversion passes its keyed hash (``Redactor.uid``), so
    the label matches its report and cannot be computed from a UID without the journal's key.
    """
    if isinstance(path, (str, os.PathLike)):
        path = Path(path)
        files, where = _list_files(path), path.name
    else:
        files = [Path(p) for p in path]
        if not files:
            raise DRDDInputError("no files given to scan")
        path, where = Path(os.path.commonpath(files)), f"{len(files)} given files"
    if isinstance(selection, Mapping):
        selection = SeriesSelection(**selection)
    skipped: Counter[str] = Counter()
    slices: list[SourceSlice] = []
    for file in files:
        header = _read_header(file)
        try:
            found = "not DICOM" if header is None else _slices_of(file, header)
        except DRDDInputError:
            raise
        except (ValueError, TypeError) as err:  # values that do not convert, e.g. NumberOfFrames "1A"
            raise DRDDInputError(f"{file.name}: DICOM header with invalid values ({type(err).__name__})") from err
        if isinstance(found, str):
            skipped[found] += 1
        else:
            slices.extend(found)
    if skipped:
        logger.info("skipped %s", ", ".join(f"{count} file(s): {why}" for why, count in sorted(skipped.items())))
    if not slices:
        reasons = ", ".join(f"{count} {why}" for why, count in sorted(skipped.items())) or "no files"
        raise DRDDInputError(f"{where}: no CT, MR or PET DICOM images found ({reasons})")

    candidate = _select(_group_series(slices, uid_hash), selection, where)
    if expected_modality is not None and candidate.modality.upper() != expected_modality.upper():
        raise DRDDInputError(
            f"{where}: {candidate.label} has modality {candidate.modality or '(none)'}, "
            f"but {expected_modality} is expected here"
        )
    ordered, shape, affine, resampled = _plan_grid(_single_stack(candidate), candidate.label, resample)
    check_volume_size(shape, candidate.label, max_voxels=max_voxels, max_bytes=max_bytes)
    if resampled:
        first = ordered[0].header
        check_volume_size((int(first.Columns), int(first.Rows), len(ordered)), candidate.label, max_voxels, max_bytes)
    return SeriesInfo(
        source=path,
        label=candidate.label,
        modality=candidate.modality,
        series_uid=candidate.series_uid,
        header=ordered[0].header,
        slices=tuple(ordered),
        shape=shape,
        affine=affine,
        resampled=resampled,
    )


def _decode_failure(item: SourceSlice) -> str:
    """Why a plane may not decode: its transfer syntax (name and UID) and the package that decodes it.

    A missing decoder and damaged data raise the same errors in pydicom; which one it was is told
    by whether pydicom has a decoder for the transfer syntax at all.
    """
    syntax = dicom_uid.UID(str(getattr(item.header, "file_meta", Dataset()).get("TransferSyntaxUID") or ""))
    if not syntax.is_transfer_syntax:  # none, or a private one
        return f"unknown transfer syntax {syntax or '(none in the file meta)'}; python-gdcm may decode it"
    named = f"transfer syntax {syntax.name} ({syntax})"
    if not syntax.is_compressed:
        return f"{named}: truncated or corrupt"
    package = next((name for family, name in DECODER_PACKAGES if syntax in family), "python-gdcm")
    try:
        installed = get_decoder(syntax).is_available
    except NotImplementedError:  # pydicom has no decoder of its own for this transfer syntax
        installed = False
    if not installed:
        return f"{named}: no decoder installed, install {package} (pip install {package})"
    return f"{named}: truncated or corrupt, or {package} is too old for it"


class _PlaneReader:
    """Decodes the planes of a series into float32 (rows, columns) arrays of modality values."""

    def __init__(self) -> None:
        self._multi_frame: dict[Path, hd.Image] = {}

    def __call__(self, item: SourceSlice) -> np.ndarray:
        try:
            with quiet_pydicom():
                if item.frame is None:
                    stored = pydicom.dcmread(item.file).pixel_array
                    plane = stored.astype(np.float32) * np.float32(item.rescale[0]) + np.float32(item.rescale[1])
                else:
                    if item.file not in self._multi_frame:
                        self._multi_frame[item.file] = hd.imread(item.file)
                    plane = self._multi_frame[item.file].get_frame(
                        item.frame,
                        dtype=np.float32,
                        apply_real_world_transform=False,  # modality values (HU), as for single frames
                        apply_modality_transform=None,
                        apply_presentation_lut=False,
                        apply_palette_color_lut=False,
                        apply_icc_profile=False,
                    )
        except OSError as err:
            raise DRDDInputError(f"{item.name}: cannot be read ({err.strerror or type(err).__name__})") from err
        except Exception as err:  # decoders raise many types on damaged data
            raise DRDDInputError(f"{item.name}: pixel data cannot be decoded ({_decode_failure(item)})") from err
        expected = (int(item.header.Rows), int(item.header.Columns))
        if plane.shape != expected:
            raise DRDDInputError(f"{item.name}: pixel data has shape {plane.shape}, the header says {expected}")
        return np.asarray(plane, dtype=np.float32)


def read_series_array(info: SeriesInfo) -> np.ndarray:
    """Decode a scanned series into a float32 array on ``info``'s grid, voxel order (i, j, k)."""
    read_plane = _PlaneReader()
    volume = np.empty(info.shape, dtype=np.float32)
    if not info.resampled:
        for k, item in enumerate(info.slices):
            volume[:, :, k] = read_plane(item).T
        return volume
    _resample_onto_grid(info, read_plane, volume)
    return volume


def _resample_onto_grid(info: SeriesInfo, read_plane: _PlaneReader, volume: np.ndarray) -> None:
    """Fill ``volume`` from the slices' true positions: bilinear in-plane, linear across slices.

    All slices are parallel, so a tilted stack needs only an in-plane shift per slice onto the
    common grid; uneven spacing then needs only linear interpolation along the normal. A grid plane
    on a slice (within ``SLICE_WEIGHT_TOLERANCE``) is that slice alone; grid voxels that the slices
    enclosing them do not both cover get the volume's minimum value.
    """
    affine = info.affine_lps
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    row_cosines, column_cosines, normal = (affine[:3, :3] / spacing).T
    origin = affine[:3, 3]
    columns, rows, depth = info.shape
    distances = np.array([(s.position - origin) @ normal for s in info.slices])
    aligned: dict[int, np.ndarray] = {}

    def aligned_plane(k: int) -> np.ndarray:  # (i, j) on the grid, NaN outside the slice
        if k not in aligned:
            for older in [key for key in aligned if key < k - 1]:  # k only grows: free what is behind
                del aligned[older]
            plane = read_plane(info.slices[k]).T
            offset = info.slices[k].position - origin
            shift = (-(offset @ row_cosines) / spacing[0], -(offset @ column_cosines) / spacing[1])
            aligned[k] = ndimage.affine_transform(
                plane, np.eye(2), offset=shift, output_shape=(columns, rows), order=1, mode="constant", cval=np.nan
            )
        return aligned[k]

    for s in range(depth):
        target = s * spacing[2]
        k = int(np.clip(np.searchsorted(distances, target, side="right") - 1, 0, len(distances) - 2))
        weight = (target - distances[k]) / (distances[k + 1] - distances[k])
        if weight <= SLICE_WEIGHT_TOLERANCE:
            volume[:, :, s] = aligned_plane(k)
        elif weight >= 1.0 - SLICE_WEIGHT_TOLERANCE:
            volume[:, :, s] = aligned_plane(k + 1)
        else:
            volume[:, :, s] = (1.0 - weight) * aligned_plane(k) + weight * aligned_plane(k + 1)
    uncovered = np.isnan(volume)
    if uncovered.any():
        volume[uncovered] = np.nanmin(volume)


def series_meta(info: SeriesInfo) -> dict:
    """MONAI metadata for a volume read from ``info`` (collatable values only, no patient data)."""
    return {
        MetaKeys.AFFINE: info.affine.copy(),
        MetaKeys.ORIGINAL_AFFINE: info.affine.copy(),
        MetaKeys.SPATIAL_SHAPE: np.asarray(info.shape),
        MetaKeys.SPACE: SpaceKeys.RAS,
        MetaKeys.ORIGINAL_CHANNEL_DIM: float("nan"),
        "modality": info.modality,
        "series_label": info.label,
        "resampled": info.resampled,
    }


class DicomSeriesReader(ImageReader):
    """MONAI image reader for one DICOM series (a folder, searched recursively, or a single file).

    Use as ``LoadImage(reader=DicomSeriesReader(...))`` or ``LoadImaged(keys, reader=...)``.
    ``LoadImage`` swallows exceptions raised by ``read()`` and then tries its other readers (MONAI's
    PydicomReader would load a refused series sorted by InstanceNumber), so ``read()`` only records
    the path and every check runs in ``get_data()``, whose exceptions reach the caller.
    """

    def __init__(
        self,
        selection: SeriesSelection | Mapping | None = None,
        *,
        resample: bool = False,
        expected_modality: str | None = None,
        max_voxels: int | None = None,
        max_bytes: int | None = None,
    ) -> None:
        super().__init__()
        self.selection = SeriesSelection(**selection) if isinstance(selection, Mapping) else selection
        self.resample = resample
        self.expected_modality = expected_modality
        self.max_voxels = max_voxels
        self.max_bytes = max_bytes

    def verify_suffix(self, filename: Sequence[str | Path] | str | Path) -> bool:
        names = ensure_tuple(filename)
        return len(names) == 1 and (Path(names[0]).is_dir() or Path(names[0]).suffix.lower() in {".dcm", ".ima"})

    def scan(self, path: str | Path) -> SeriesInfo:
        """Headers only: the validated series this reader would load from ``path``."""
        return scan_dicom_series(
            path,
            self.selection,
            resample=self.resample,
            expected_modality=self.expected_modality,
            max_voxels=self.max_voxels,
            max_bytes=self.max_bytes,
        )

    def read(self, data: Sequence[str | Path] | str | Path, **kwargs) -> Path:
        names = ensure_tuple(data)
        if len(names) != 1:
            raise ValueError(f"DicomSeriesReader reads one series per image, got {len(names)} paths")
        return Path(names[0])

    def get_data(self, img: Path | SeriesInfo) -> tuple[np.ndarray, dict]:
        info = img if isinstance(img, SeriesInfo) else self.scan(img)
        array = read_series_array(info)
        size = "x".join(map(str, info.shape))
        logger.info("read %s: %s voxels%s", info.label, size, " (resampled)" if info.resampled else "")
        return array, series_meta(info)


def read_dicom_series(
    source: str | Path | SeriesInfo,
    selection: SeriesSelection | Mapping | None = None,
    *,
    resample: bool = False,
    expected_modality: str | None = None,
    max_voxels: int | None = None,
    max_bytes: int | None = None,
) -> MetaTensor:
    """Read one DICOM series as a float32 ``MetaTensor`` (i, j, k) with its RAS affine.

    ``source`` is a file, a folder, or a ``SeriesInfo`` from ``scan_dicom_series`` (whose selection
    and checks are then already applied). See ``scan_dicom_series`` for what is refused.
    """
    reader = DicomSeriesReader(
        selection, resample=resample, expected_modality=expected_modality, max_voxels=max_voxels, max_bytes=max_bytes
    )
    if isinstance(source, SeriesInfo):
        array, meta = reader.get_data(source)
        meta[ImageMetaKey.FILENAME_OR_OBJ] = str(source.source)
        return MetaTensor.ensure_torch_and_prune_meta(array, meta)
    return LoadImage(image_only=True)(source, reader=reader)
