"""Helpers of the batch conversion tests: demo and refused series, checks of synthetic series."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRSpectroscopyStorage, generate_uid

from drdd_med.data.demo import generate_head_phantom
from drdd_med.data.dicom import read_dicom_series, scan_dicom_series
from drdd_med.pacs.demo import volume_to_dicom_series, write_demo_mr_series

ROOT = Path(__file__).resolve().parents[2]
# the drdd_mr2ct bundle version, as its metadata.json says: the first part of a model version
BUNDLE_VERSION = json.loads((ROOT / "bundles" / "drdd_mr2ct" / "configs" / "metadata.json").read_text())["version"]
SHAPE, SPACING = (32, 32, 8), (6.0, 6.0, 18.0)  # small: under a second per series with the tiny preset
PATIENT = {"patient_name": "Zzyzx^Quuxley", "patient_birth_date": "19230405"}  # easy to spot in a log
ORTHANC_AET, CLIENT_AET = "ORTHANC", "DRDD"  # the test PACS, and our AE title registered there
REFUSED_PATIENT_ID = "REFUSE-CT"  # the test PACS answers a failure status to CT of this patient
DROPPED_PATIENT_ID = "DROP-ONE"  # the test PACS answers success to CT instance 3 of this patient, and drops it
PHI_STRINGS = ("Zzyzx", "Quuxley", "19230405", "ZQ-0")  # name parts, birth date, patient id prefix


def free_ports(count: int) -> list[int]:
    """Ports free on the loopback interface now (held together while choosing, so they differ)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def model_args(tiny_model: dict) -> list[str]:
    return ["--ckpt", str(tiny_model["ckpt"]), "--device", "cpu"]


class StubTranslator:
    """A stand-in model for tests of the batch machinery: synthetic HU = source value - 1000, instantly."""

    source_modality, model_name, model_version = "MR", "stub", "1"
    model_id = "stub 1"

    def translate(self, volume, name: str = "case") -> np.ndarray:
        return np.asarray(volume, dtype=np.float32) - 1000.0


def write_demo_study(root: Path, seed: int, **attributes) -> tuple[list[Path], dict]:
    """The demo MR series of ``seed`` (its own study, patient id ZQ-<seed>) in a folder named after the patient."""
    attributes = {**PATIENT, "patient_id": f"ZQ-{seed:04d}", **attributes}
    folder = root / attributes["patient_name"].replace("^", "_") / f"study-{seed}"
    return write_demo_mr_series(folder, seed, SHAPE, SPACING, **attributes)


def write_refused_series(root: Path) -> dict[str, Path]:
    """Three MR series of the test patient that the reader refuses, each in its own study folder.

    ``tilt``: a sheared stack (gantry tilt of 15 degrees); ``gap``: a slice missing in the middle;
    ``not_image``: an MR Spectroscopy object, no image at all.
    """
    folders = {}
    phantom = generate_head_phantom(5, SHAPE, SPACING)
    tilted = phantom["affine"].copy()
    tilted[1, 2] = SPACING[2] * np.sin(np.radians(15))  # slices shift along y: a sheared stack
    folders["tilt"] = root / "Zzyzx_Quuxley" / "tilt"
    volume_to_dicom_series(np.rint(phantom["mr"]), tilted, folders["tilt"], patient_id="ZQ-0005", **PATIENT)
    folders["gap"] = write_demo_study(root, seed=6)[0][0].parent
    (folders["gap"] / "0004.dcm").unlink()
    folders["not_image"] = root / "Zzyzx_Quuxley" / "spectroscopy"
    folders["not_image"].mkdir(parents=True)
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = MRSpectroscopyStorage, generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = PATIENT["patient_name"], "ZQ-0007", PATIENT["patient_birth_date"]
    ds.Modality, ds.SeriesNumber, ds.StudyDate = "MR", 9, "20240102"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    pydicom.dcmwrite(folders["not_image"] / "mrs.dcm", ds, enforce_file_format=True)
    return folders


def check_synthetic_series(files, source_files, reference_hu: np.ndarray) -> None:
    """``files``: a synthetic CT series of the MR series ``source_files``, whose values are ``reference_hu``.

    Checks SOP class, synthetic markers, study and frame of reference, geometry against the
    source, provenance references, and voxel values.
    """
    source = scan_dicom_series(source_files)
    synthetic = scan_dicom_series(files)
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    source_sops = {s.sop_instance_uid for s in source.slices}
    assert len(headers) == len(source.slices) and len({h.SeriesInstanceUID for h in headers}) == 1
    for ds in headers:
        assert ds.SOPClassUID == CTImageStorage and ds.Modality == "CT"
        assert ds.SyntheticData == "YES" and ds.ContentQualification == "RESEARCH"
        assert list(ds.ImageType)[:2] == ["DERIVED", "SECONDARY"] and "SYNTHETIC" in ds.SeriesDescription.upper()
        assert ds.StudyInstanceUID == source.header.StudyInstanceUID
        assert ds.FrameOfReferenceUID == source.header.FrameOfReferenceUID
        assert ds.SeriesInstanceUID != source.series_uid
        assert ds.ReferencedSeriesSequence[0].SeriesInstanceUID == source.series_uid
        assert {item.ReferencedSOPInstanceUID for item in ds.SourceImageSequence} <= source_sops
        assert ds.ContributingEquipmentSequence[0].PurposeOfReferenceCodeSequence[0].CodeValue == "109100"
    assert synthetic.shape == source.shape
    np.testing.assert_allclose(synthetic.affine, source.affine, atol=1e-4)
    np.testing.assert_array_equal(read_dicom_series(synthetic).numpy(), reference_hu)
