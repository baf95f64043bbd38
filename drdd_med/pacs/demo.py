"""Demo DICOM data for trying and testing batch conversion: phantom MR volumes as MR image series.

No patient data is involved: names, ids and dates are whatever the caller passes (fictitious).
"""

from __future__ import annotations

import datetime
import os
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid
from pydicom.valuerep import DSfloat

from drdd_med.data.demo import DEFAULT_SHAPE, DEFAULT_SPACING, generate_head_phantom
from drdd_med.data.dicom import quiet_pydicom
from drdd_med.data.files import atomic_output_dir
from drdd_med.data.writers import RAS_TO_LPS, to_int16_hu

SOP_CLASSES = {"MR": MRImageStorage, "CT": CTImageStorage}


def _ds(value: float) -> DSfloat:
    return DSfloat(float(value), auto_format=True)


def volume_to_dicom_series(
    volume: np.ndarray,
    affine: np.ndarray,
    out_dir: str | os.PathLike,
    *,
    modality: str = "MR",
    patient_name: str = "Demo^Phantom",
    patient_id: str = "DEMO0001",
    patient_birth_date: str = "",
    study_uid: str | None = None,
    series_uid: str | None = None,
    frame_of_reference_uid: str | None = None,
    study_date: str = "",
    series_number: int = 1,
    series_description: str = "",
    overwrite: bool = False,
) -> list[Path]:
    """Write a 3D ``volume`` (voxel order (i, j, k), RAS ``affine``) as an MR or CT image series.

    One Explicit VR Little Endian file per slice k, ``InstanceNumber`` k + 1, geometry from the
    affine, so ``read_dicom_series`` returns the same array and affine when the k axis points
    along row x column cosines (any right-handed affine). Integer-valued volumes are stored
    exactly (rescale 1/0); others are scaled to use int16. Missing UIDs are generated.
    """
    volume = np.asarray(volume)
    if volume.ndim != 3:
        raise ValueError(f"expected a 3D volume, got shape {volume.shape}")
    if modality not in SOP_CLASSES:
        raise ValueError(f"modality must be one of {sorted(SOP_CLASSES)}, got {modality!r}")
    if np.array_equal(volume, np.rint(volume)) and np.abs(volume).max(initial=0) <= 32767:
        slope = 1.0
    else:
        slope = float(np.abs(volume).max(initial=0)) / 32767 or 1.0
    pixels = to_int16_hu(volume / slope)
    lps = RAS_TO_LPS @ np.asarray(affine, dtype=np.float64)[:3]
    spacing = np.linalg.norm(lps[:, :3], axis=0)
    row_cosines, column_cosines = lps[:, 0] / spacing[0], lps[:, 1] / spacing[1]
    now = datetime.datetime.now()

    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = SOP_CLASSES[modality]
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = patient_name, patient_id, patient_birth_date, "O"
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.StudyDate, ds.StudyTime = study_date or now.strftime("%Y%m%d"), "120000"
    ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = "1", "", ""
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.SeriesNumber, ds.SeriesDescription, ds.Modality = series_number, series_description, modality
    ds.FrameOfReferenceUID = frame_of_reference_uid or generate_uid()
    ds.PositionReferenceIndicator, ds.PatientPosition = "", "HFS"
    ds.Manufacturer = "drdd_med demo"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    if modality == "MR":
        ds.ScanningSequence, ds.SequenceVariant, ds.ScanOptions, ds.MRAcquisitionType = "SE", "NONE", "", "2D"
        ds.RepetitionTime, ds.EchoTime, ds.EchoTrainLength = 500, 15, 1
    else:
        ds.KVP, ds.RescaleType = "", "HU"
    ds.AcquisitionNumber = 1
    ds.ImageOrientationPatient = [_ds(v) for v in (*row_cosines, *column_cosines)]
    ds.PixelSpacing = [_ds(spacing[1]), _ds(spacing[0])]
    ds.SliceThickness = _ds(spacing[2])
    ds.Rows, ds.Columns = volume.shape[1], volume.shape[0]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleSlope, ds.RescaleIntercept = _ds(slope), 0

    out_dir = Path(out_dir)
    names = []
    with atomic_output_dir(out_dir, overwrite) as staging:
        for k in range(volume.shape[2]):
            item = ds.copy()
            item.SOPInstanceUID = generate_uid(entropy_srcs=[ds.SeriesInstanceUID, str(k)])
            item.InstanceNumber = k + 1
            item.ImagePositionPatient = [_ds(v) for v in lps[:, 3] + k * lps[:, 2]]
            item.PixelData = np.ascontiguousarray(pixels[:, :, k].T).astype("<i2").tobytes()
            item.file_meta = FileMetaDataset()
            item.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
            item.file_meta.MediaStorageSOPInstanceUID = item.SOPInstanceUID
            item.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
            name = f"{k + 1:04d}.dcm"
            with quiet_pydicom():
                pydicom.dcmwrite(staging / name, item, enforce_file_format=True)
            names.append(name)
    return [out_dir / name for name in names]


def write_demo_mr_series(
    out_dir: str | os.PathLike,
    seed: int,
    shape=DEFAULT_SHAPE,
    spacing=DEFAULT_SPACING,
    **attributes,
) -> tuple[list[Path], dict]:
    """The demo head phantom of ``seed`` as an MR series (values rounded to integers, stored exactly).

    UIDs are derived from the seed unless given in ``attributes`` (keywords of
    ``volume_to_dicom_series``), so the same call writes the same series. Returns the files and
    the phantom (its ``mr`` rounded as stored).
    """
    phantom = generate_head_phantom(seed, shape, spacing)
    phantom["mr"] = np.rint(phantom["mr"]).astype(np.float32)
    identity = [f"drdd demo seed {seed}", *map(str, shape), *map(str, spacing)]
    attributes.setdefault("study_uid", generate_uid(entropy_srcs=[*identity, "study"]))
    attributes.setdefault("series_uid", generate_uid(entropy_srcs=[*identity, "series"]))
    attributes.setdefault("frame_of_reference_uid", generate_uid(entropy_srcs=[*identity, "frame"]))
    attributes.setdefault("patient_id", f"DEMO{seed:04d}")
    attributes.setdefault("series_description", "T1 AX demo phantom")
    files = volume_to_dicom_series(phantom["mr"], phantom["affine"], out_dir, modality="MR", **attributes)
    return files, phantom
