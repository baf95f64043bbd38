"""Writing a synthetic CT as a derived DICOM CT series beside its source series.

Follows the checklist in ``docs/medical.md`` ("Writing a synthetic CT as DICOM"): CT Image Storage,
one Explicit VR Little Endian file per slice, the source's study and frame of reference, UIDs
derived deterministically from the source SOP Instance UIDs, model name and version (a rerun
reproduces the same objects instead of a duplicate series), int16 pixels with one rescale, and the
provenance and "synthetic" markers planning systems and PACS look for. The series appears in its
folder only when every file is written.

The per-voxel standard deviation of several samples (``DRDDInferer`` with ``num_samples`` > 1) is
written the same way as a second derived series (``std_of_samples``): same grid, study and frame of
reference, its own UIDs (derived with "std" added), a SeriesDescription naming it the uncertainty,
and 0.1 HU steps (RescaleSlope 0.1) so that std values of a few HU keep their precision.
"""

from __future__ import annotations

import datetime
import logging
import os
from copy import deepcopy
from pathlib import Path

import numpy as np
import pydicom
import torch
from monai.data import MetaTensor
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pydicom.valuerep import DSfloat

from drdd_med import __version__
from drdd_med.data.dicom import SeriesInfo, SourceSlice, quiet_pydicom
from drdd_med.data.files import atomic_output_dir
from drdd_med.data.writers import to_int16_hu
from drdd_med.errors import DRDDInputError, GridMismatchError, NonFiniteError, OutputExistsError

logger = logging.getLogger(__name__)

MANUFACTURER = "drdd_med"
GRID_TOLERANCE_MM = 1e-3
SOFT_TISSUE_WINDOW = (40, 400)  # centre, width in HU
STD_WINDOW = (50, 100)  # centre, width in HU: std maps from 0 to 100 HU
STD_RESCALE_SLOPE = 0.1  # HU per stored value of a std map: 0.1 HU steps, up to 3276.7 HU
# BodyPartExamined defined terms of unpaired structures: Laterality (Type 2C) must then be absent.
UNPAIRED_BODY_PARTS = frozenset(
    "HEAD BRAIN SKULL NECK HEADNECK CHEST ABDOMEN PELVIS ABDOMENPELVIS CHESTABDOMEN CHESTABDPELVIS SPINE "
    "CSPINE TSPINE LSPINE SSPINE COCCYX WHOLEBODY HEART LIVER PANCREAS PROSTATE BLADDER UTERUS RECTUM COLON "
    "STOMACH ESOPHAGUS SPLEEN AORTA LARYNX MEDIASTINUM".split()
)
PATIENT_AND_STUDY_KEYWORDS = (
    # Patient module
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "PatientBirthDate",
    "PatientSex",
    "OtherPatientIDsSequence",
    "PatientIdentityRemoved",
    "DeidentificationMethod",
    "DeidentificationMethodCodeSequence",
    # General Study and Patient Study modules
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
    "StudyDescription",
    "PatientAge",
    "PatientSize",
    "PatientWeight",
    # Frame of Reference and General Series modules
    "PositionReferenceIndicator",
    "PatientPosition",
    "BodyPartExamined",
)
TYPE_2_KEYWORDS = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
    "PositionReferenceIndicator",
    "PatientPosition",
)


def derived_series_uid(source_series_uid: str, model_name: str, model_version: str, std: bool = False) -> str:
    """The synthetic series' UID (``std``: its std map's), derived from its source series and the model:
    a redo replaces, never duplicates."""
    return generate_uid(entropy_srcs=[source_series_uid, model_name, model_version, *_std_tag(std), "series"])


def _std_tag(std: bool) -> list[str]:
    """What the UIDs of a std map add to the entropy of the synthetic CT's (nothing for the synthetic CT)."""
    return ["std"] if std else []


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def _check_long_string(name: str, value: str) -> None:
    if not value or len(value) > 64 or "\\" in value:
        raise DRDDInputError(f"{name} must be 1 to 64 characters without a backslash, got {value!r}")


def _volume_on_reference_grid(volume_hu, reference: SeriesInfo) -> np.ndarray:
    affine = volume_hu.affine.numpy() if isinstance(volume_hu, MetaTensor) else None
    if isinstance(volume_hu, torch.Tensor):
        volume_hu = volume_hu.detach().cpu().numpy()
    volume = np.asarray(volume_hu)
    if volume.ndim == 4 and volume.shape[0] == 1:  # channel-first
        volume = volume[0]
    if volume.shape != tuple(reference.shape):
        raise GridMismatchError(
            f"synthetic volume has shape {volume.shape}, the grid of {reference.label} is {tuple(reference.shape)}"
        )
    if affine is not None and not np.allclose(affine, reference.affine, rtol=0, atol=GRID_TOLERANCE_MM):
        raise GridMismatchError(f"synthetic volume's affine differs from the grid of {reference.label}")
    if not np.isfinite(volume).all():
        raise NonFiniteError(f"synthetic volume for {reference.label} has NaN or infinite voxels")
    return volume


def _sources_of_slices(reference: SeriesInfo) -> list[list[SourceSlice]]:
    """The source planes each output slice derives from: itself, or the two it was resampled between."""
    if not reference.resampled:
        return [[item] for item in reference.slices]
    affine = reference.affine_lps
    normal = affine[:3, 2] / np.linalg.norm(affine[:3, 2])
    distances = np.array([(item.position - affine[:3, 3]) @ normal for item in reference.slices])
    step = np.linalg.norm(affine[:3, 2])
    sources = []
    for k in range(reference.shape[2]):
        upper = int(np.clip(np.searchsorted(distances, k * step, side="left"), 0, len(distances) - 1))
        exact = abs(distances[upper] - k * step) <= 1e-3
        lower = upper if exact or upper == 0 else upper - 1
        sources.append(list(reference.slices[lower : upper + 1]))
    return sources


def _instance_reference(sop_class_uid: str, sop_instance_uid: str, frame: int | None = None) -> Dataset:
    reference = Dataset()
    reference.ReferencedSOPClassUID = sop_class_uid
    reference.ReferencedSOPInstanceUID = sop_instance_uid
    if frame is not None:
        reference.ReferencedFrameNumber = frame
    return reference


def _source_image_sequence(sources: list[SourceSlice]) -> Sequence:
    items = []
    for item in sources:
        if item.sop_instance_uid:
            reference = _instance_reference(item.sop_class_uid, item.sop_instance_uid, item.frame)
            reference.PurposeOfReferenceCodeSequence = Sequence(
                [_code("121322", "DCM", "Source image for image processing operation")]
            )
            items.append(reference)
    return Sequence(items)


def _ds(value: float) -> DSfloat:
    return DSfloat(float(value), auto_format=True)  # at most 16 characters, as much precision as fits


def _series_template(
    reference: SeriesInfo, model_name: str, model_version: str, series_description: str, series_number: int | None,
    std_of_samples: int | None = None,
) -> Dataset:
    """The attributes every slice of the derived series shares (of a std map over ``std_of_samples`` samples)."""
    std = std_of_samples is not None
    source = reference.header
    source_key = reference.series_uid or reference.slices[0].sop_instance_uid
    now = datetime.datetime.now()
    software = [model_version, f"{MANUFACTURER} {__version__}"]
    ds = Dataset()
    if "SpecificCharacterSet" in source:  # the patient and study strings are copied in this encoding
        ds.SpecificCharacterSet = deepcopy(source.SpecificCharacterSet)
    for keyword in PATIENT_AND_STUDY_KEYWORDS:
        if source.get(keyword) not in (None, ""):  # an empty optional value would be invalid, not empty
            ds.add(deepcopy(source[keyword]))  # the element as read, without re-validating its value
    if ds.get("PatientIdentityRemoved") == "YES" and not ds.get("DeidentificationMethodCodeSequence"):
        ds.DeidentificationMethod = ds.get("DeidentificationMethod") or "not stated in the source series"
    for keyword in TYPE_2_KEYWORDS:
        if keyword not in ds:
            setattr(ds, keyword, "")
    if "Laterality" in source:
        ds.add(deepcopy(source["Laterality"]))
    elif str(ds.get("BodyPartExamined", "")).upper() not in UNPAIRED_BODY_PARTS:
        ds.Laterality = ""  # unknown, which a paired or unrecognised body part requires saying
    if source.get("StudyInstanceUID"):
        ds.StudyInstanceUID = source.StudyInstanceUID
    else:
        logger.warning("%s has no StudyInstanceUID; the synthetic series gets a new study", reference.label)
        ds.StudyInstanceUID = generate_uid(entropy_srcs=[source_key, "study"])
    if source.get("FrameOfReferenceUID"):
        ds.FrameOfReferenceUID = source.FrameOfReferenceUID
    else:
        logger.warning("%s has no FrameOfReferenceUID; the synthetic series gets a new one", reference.label)
        ds.FrameOfReferenceUID = generate_uid(entropy_srcs=[source_key, "frame of reference"])

    ds.SOPClassUID = CTImageStorage
    ds.Modality = "CT"
    ds.SeriesInstanceUID = derived_series_uid(source_key, model_name, model_version, std=std)
    if series_number is None and source.get("SeriesNumber") not in (None, ""):
        series_number = int(source.SeriesNumber) + (2000 if std else 1000)
    ds.SeriesNumber = series_number if series_number is not None else ""
    ds.SeriesDescription = series_description
    ds.SeriesDate = ds.ContentDate = ds.InstanceCreationDate = now.strftime("%Y%m%d")
    ds.SeriesTime = ds.ContentTime = ds.InstanceCreationTime = now.strftime("%H%M%S")

    ds.Manufacturer = MANUFACTURER
    ds.ManufacturerModelName = model_name
    ds.SoftwareVersions = software
    equipment = Dataset()
    equipment.Manufacturer = MANUFACTURER
    equipment.ManufacturerModelName = model_name
    equipment.SoftwareVersions = software
    equipment.PurposeOfReferenceCodeSequence = Sequence([_code("109100", "DCM", "Synthesizing Equipment")])
    what = f"Per-voxel standard deviation in HU over {std_of_samples} samples of the synthetic CT" if std \
        else "Synthetic CT"
    equipment.ContributionDescription = f"{what} predicted by {model_name} {model_version}"
    ds.ContributingEquipmentSequence = Sequence([equipment])

    ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
    resampled = "; the source was resampled to a regular grid first" if reference.resampled else ""
    ds.DerivationDescription = (
        f"{what} predicted from the {reference.modality or 'source'} series by model {model_name} "
        f"version {model_version} ({MANUFACTURER} {__version__}){resampled}"
    )
    ds.SyntheticData = "YES"
    ds.ContentQualification = "RESEARCH"
    ds.BurnedInAnnotation = "NO"
    ds.KVP = ""
    ds.AcquisitionNumber = ""
    if reference.series_uid:
        referenced_series = Dataset()
        referenced_series.SeriesInstanceUID = reference.series_uid
        instances = dict.fromkeys(  # one item per instance, also when a multi-frame file gave many slices
            (s.sop_class_uid, s.sop_instance_uid) for s in reference.slices if s.sop_instance_uid
        )
        referenced_series.ReferencedInstanceSequence = Sequence([_instance_reference(*key) for key in instances])
        ds.ReferencedSeriesSequence = Sequence([referenced_series])
    else:
        logger.warning("%s has no SeriesInstanceUID; the synthetic series cannot reference it", reference.label)

    affine = reference.affine_lps
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    directions = affine[:3, :3] / spacing
    ds.ImageOrientationPatient = [_ds(v) for v in np.concatenate([directions[:, 0], directions[:, 1]])]
    ds.PixelSpacing = [_ds(spacing[1]), _ds(spacing[0])]  # (between rows, between columns)
    ds.SliceThickness = _ds(spacing[2])
    ds.Rows, ds.Columns = int(reference.shape[1]), int(reference.shape[0])
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = 0, _ds(STD_RESCALE_SLOPE) if std else 1, "HU"
    ds.WindowCenter, ds.WindowWidth = STD_WINDOW if std else SOFT_TISSUE_WINDOW
    ds.WindowCenterWidthExplanation = "STD 0 TO 100 HU" if std else "SOFT TISSUE"
    return ds


def _check_replaceable(out_dir: Path) -> None:
    """Overwriting removes the old folder: only ever remove a folder that holds nothing but DICOM files."""
    if not out_dir.is_dir() or out_dir.is_symlink():
        raise OutputExistsError(f"{out_dir.name}: exists and is not a folder; not replacing it")
    others = [p for p in out_dir.iterdir() if p.is_symlink() or not p.is_file() or p.suffix.lower() != ".dcm"]
    if others:
        raise OutputExistsError(
            f"{out_dir.name}: holds other things than .dcm files (e.g. {others[0].name}); not replacing it"
        )


def write_derived_ct_series(
    volume_hu: np.ndarray | torch.Tensor,
    reference: SeriesInfo,
    out_dir: str | os.PathLike,
    model_name: str,
    model_version: str,
    *,
    series_description: str | None = None,
    series_number: int | None = None,
    overwrite: bool = False,
    std_of_samples: int | None = None,
) -> list[Path]:
    """Write ``volume_hu`` (HU, on ``reference``'s grid) as a derived CT series into ``out_dir``.

    ``reference`` is the ``SeriesInfo`` of the source series (``scan_dicom_series``), whose grid
    the volume must share: same shape (i, j, k) and, for a ``MetaTensor``, the same affine (a
    leading channel axis of 1 is dropped). Voxels are rounded and clipped to int16 (rescale 1/0).
    The series description is prefixed with "SYNTHETIC" unless it says so already; the series
    number defaults to the source's plus 1000. Returns the written files in InstanceNumber order.

    ``std_of_samples`` N (at least 2): ``volume_hu`` is the per-voxel std in HU over N samples of the
    synthetic CT; the series gets the std map's own UIDs, the description "SYNTHETIC CT UNCERTAINTY
    (std over N samples, HU)", the source's series number plus 2000, and rescale slope 0.1.
    """
    out_dir = Path(out_dir)
    _check_long_string("model_name", model_name)
    _check_long_string("model_version", model_version)
    if std_of_samples is not None and std_of_samples < 2:
        raise ValueError(f"a std map needs at least 2 samples, got std_of_samples={std_of_samples}")
    std = std_of_samples is not None
    default = (f"SYNTHETIC CT UNCERTAINTY (std over {std_of_samples} samples, HU)" if std
               else f"SYNTHETIC CT {model_name} {model_version}")
    description = series_description or default
    if "synth" not in description.lower():
        description = f"SYNTHETIC {description}"
    _check_long_string("series_description", description)
    volume = _volume_on_reference_grid(volume_hu, reference)
    pixels = to_int16_hu(volume / STD_RESCALE_SLOPE if std else volume)
    with quiet_pydicom():
        template = _series_template(reference, model_name, model_version, description, series_number,
                                    std_of_samples)
    origin, step = reference.affine_lps[:3, 3], reference.affine_lps[:3, 2]
    source_key = reference.series_uid or reference.slices[0].sop_instance_uid
    width = max(4, len(str(pixels.shape[2])))
    names = []
    with atomic_output_dir(out_dir, overwrite, check_replaceable=_check_replaceable) as staging:
        for k, sources in enumerate(_sources_of_slices(reference)):
            if reference.resampled or not sources[0].sop_instance_uid:
                entropy = [source_key, model_name, model_version, *_std_tag(std), f"slice {k}"]
            else:
                frame = [] if sources[0].frame is None else [f"frame {sources[0].frame}"]
                entropy = [sources[0].sop_instance_uid, *frame, model_name, model_version, *_std_tag(std)]
            ds = template.copy()  # shallow: the shared elements are not modified per slice
            ds.SOPInstanceUID = generate_uid(entropy_srcs=entropy)
            ds.InstanceNumber = k + 1
            ds.ImagePositionPatient = [_ds(v) for v in origin + k * step]
            source_images = _source_image_sequence(sources)
            if source_images:
                ds.SourceImageSequence = source_images
            ds.PixelData = np.ascontiguousarray(pixels[:, :, k].T).astype("<i2").tobytes()
            ds.file_meta = FileMetaDataset()
            ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
            name = f"{k + 1:0{width}d}.dcm"
            with quiet_pydicom():
                pydicom.dcmwrite(staging / name, ds, enforce_file_format=True)
            names.append(name)
    logger.info("wrote a %d-slice synthetic CT %sseries derived from %s", len(names), "std " if std else "",
                reference.label)
    return [out_dir / name for name in names]
