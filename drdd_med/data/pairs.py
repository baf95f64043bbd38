"""Raw MR/CT pairs -> the SynthRAD2023 layout the bundles read: one grid, a body mask, the common field of view.

Hospital pairs come from separate sessions on separate grids. For each case this module

1. reads both images with ``drdd_med.data.readers`` and refuses NaN/Inf voxels;
2. optionally refines their alignment with a rigid registration (SimpleITK: Mattes mutual
   information, Euler3D, three resolution levels; the MR is fixed). A registration that lowers the
   mutual information is rejected and the scanner alignment kept, and the record says so;
3. resamples the CT onto the MR's grid (linear, −1024 HU outside the CT), or the MR onto the CT's
   grid (linear, 0 outside the MR);
4. computes a body mask (``BodyMask``: CT above −500 HU, largest component, holes filled) inside the
   common field of view, where both images have real data;
5. crops both images and the mask to the mask's bounding box plus a margin, within the common field
   of view, and writes ``OUT/Task1/<region>/<case_id>/{mr,ct,mask}.nii.gz`` with a ``pair.json``
   record (geometry, voxel counts, overlap, mutual information before/after registration).

A case folder appears only when complete (``atomic_output_dir``), so an existing one is a finished
case and a rerun skips it. Case ids are the input case folder names, which ``synthrad_datalist``
accepts as they are (it does not parse SynthRAD's ``1BA001`` pattern). Errors name the case, never
a path or patient data.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from drdd_med.data.datalists import BODY_THRESHOLD_HU
from drdd_med.data.files import atomic_output, atomic_output_dir
from drdd_med.data.readers import load_volume
from drdd_med.data.writers import RAS_TO_LPS, to_sitk, write_volume
from drdd_med.errors import DRDDInputError, OutputExistsError
from drdd_med.transforms.array import BodyMask, CheckVolume

logger = logging.getLogger(__name__)

TASK = "Task1"
CT_FILL_HU = -1024.0
MR_FILL = 0.0
RECORD_NAME = "pair.json"
CASE_FILES = ("mr.nii.gz", "ct.nii.gz", "mask.nii.gz", RECORD_NAME)
REPORT_STEM = "prepare_pairs"
GRIDS = ("mr", "ct")
REGISTRATION_CT_WINDOW_HU = (-300.0, 400.0)
MIN_METRIC_SAMPLES = 20_000
_CASE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")  # a plain folder name: no separators, not hidden
_REPORT_COLUMNS = (
    "case_id", "status", "error", "grid", "shape", "reference_voxels", "common_voxels", "overlap_fraction",
    "mask_voxels", "registration", "mi_before", "mi_after", "translation_mm", "rotation_deg", "seconds",
)


@dataclass(frozen=True)
class PairCase:
    """One MR/CT pair to prepare; ``case_id`` names the output folder and every message about the case."""

    case_id: str
    mr: Path
    ct: Path


@dataclass(frozen=True)
class PairSettings:
    """How pairs are prepared; recorded in every case's ``pair.json`` so a dataset says how it was made."""

    grid: str = "mr"
    register: bool = False
    margin_mm: float = 10.0
    region: str = "body"
    seed: int = 0

    def __post_init__(self):
        if self.grid not in GRIDS:
            raise ValueError(f"grid must be one of {GRIDS}, got {self.grid!r}")
        if self.margin_mm < 0:
            raise ValueError(f"margin_mm must be >= 0, got {self.margin_mm}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        if not _CASE_ID_RE.match(self.region):
            raise ValueError(f"region must be a plain folder name (letters, digits, . _ -), got {self.region!r}")


def find_pair_cases(root: str | os.PathLike, mr_name: str = "mr.nii.gz", ct_name: str = "ct.nii.gz") -> list[PairCase]:
    """Every non-hidden subfolder of ``root`` is a case holding ``mr_name`` and ``ct_name``.

    Missing files are not checked here: ``prepare_pairs`` refuses such a case and goes on with the others.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root.name}: the input folder of cases does not exist")
    cases = [PairCase(p.name, p / mr_name, p / ct_name) for p in sorted(root.iterdir())
             if p.is_dir() and not p.name.startswith(".")]
    if not cases:
        raise DRDDInputError(f"{root.name}: no case folders (expected <case>/{mr_name} and <case>/{ct_name})")
    return cases


def case_dir(out_dir: str | os.PathLike, case_id: str, region: str = "body") -> Path:
    """Where a case goes: the SynthRAD2023 layout that ``synthrad_datalist`` reads."""
    return Path(out_dir) / TASK / region / case_id


# --- geometry ----------------------------------------------------------------------------------------


def _load(path: Path, role: str) -> tuple[sitk.Image, np.ndarray]:
    """Read one image through the project's readers; returns it as a SimpleITK image and its RAS affine."""
    if not path.is_file():
        raise DRDDInputError(f"{role} file {path.name} is missing")
    volume = load_volume(path)
    CheckVolume()(volume[None], name=role)
    affine = np.asarray(volume.affine, dtype=np.float64)
    return to_sitk(np.asarray(volume.numpy(), dtype=np.float32), affine), affine


def _to_array(image: sitk.Image) -> np.ndarray:
    return sitk.GetArrayFromImage(image).transpose(2, 1, 0)  # SimpleITK gives (k, j, i)


def _resample(image: sitk.Image, reference: sitk.Image, transform: sitk.Transform, fill: float) -> np.ndarray:
    return _to_array(sitk.Resample(image, reference, transform, sitk.sitkLinear, fill, sitk.sitkFloat32))


def _field_of_view(image: sitk.Image, reference: sitk.Image, transform: sitk.Transform) -> np.ndarray:
    """Voxels of ``reference`` that map inside ``image``: where it has real data, not fill."""
    inside = sitk.Image(image.GetSize(), sitk.sitkUInt8)
    inside.CopyInformation(image)
    inside += 1
    return _to_array(sitk.Resample(inside, reference, transform, sitk.sitkNearestNeighbor, 0)).astype(bool)


def _bounding_box(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """First and one-past-last index of ``mask``'s true voxels along each axis."""
    where = np.nonzero(mask)
    return np.array([w.min() for w in where]), np.array([w.max() + 1 for w in where])


def crop_box(mask: np.ndarray, common: np.ndarray, spacing: np.ndarray, margin_mm: float) -> tuple[slice, ...]:
    """The mask's bounding box grown by ``margin_mm`` on every side, kept inside the common field of view's box."""
    margin = np.ceil(margin_mm / np.asarray(spacing) - 1e-6).astype(int)
    low, high = _bounding_box(mask)
    fov_low, fov_high = _bounding_box(common)
    low, high = np.maximum(low - margin, fov_low), np.minimum(high + margin, fov_high)
    return tuple(slice(int(a), int(b)) for a, b in zip(low, high))


def _shifted_affine(affine: np.ndarray, box: tuple[slice, ...]) -> np.ndarray:
    """The affine of a crop: same axes and spacing, origin moved to the crop's first voxel."""
    shifted = affine.copy()
    shifted[:3, 3] = affine[:3, :3] @ np.array([s.start for s in box]) + affine[:3, 3]
    return shifted


# --- registration -----------------------------------------------------------------------------------


def registration_views(mr: sitk.Image, ct: sitk.Image) -> tuple[sitk.Image, sitk.Image]:
    """The images the metric sees: MR clipped at its 99.5th percentile, CT to a soft-tissue window.

    Mattes mutual information spreads its histogram bins from an image's minimum to its maximum. In
    raw HU (-1000...3000) fat and muscle fall into neighbouring bins and a few bright MR voxels do the
    same to the MR, so the metric barely sees the anatomy; on the IBSI pairs the clipped views turned
    registrations that ran off by centimetres into consistent ones.
    """
    mr_high = float(np.percentile(sitk.GetArrayViewFromImage(mr), 99.5))
    return (sitk.Clamp(mr, sitk.sitkFloat32, upperBound=mr_high),
            sitk.Clamp(ct, sitk.sitkFloat32, *REGISTRATION_CT_WINDOW_HU))


def _mattes(transform: sitk.Transform | None = None) -> sitk.ImageRegistrationMethod:
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=50)
    method.SetInterpolator(sitk.sitkLinear)
    if transform is not None:
        method.SetInitialTransform(transform)
    return method


def mutual_information(fixed: sitk.Image, moving: sitk.Image, transform: sitk.Transform) -> float:
    """Mattes mutual information (nats, higher is better) of every fixed voxel mapped into ``moving``.

    SimpleITK reports the metric negated, to be minimised; it is turned round here so a report reads
    "before -> after" as an increase. Every voxel is used, so before and after compare exactly.
    """
    return -_mattes(transform).MetricEvaluate(fixed, moving)


def register_rigid(fixed: sitk.Image, moving: sitk.Image, seed: int = 0) -> sitk.Euler3DTransform:
    """Rigid transform from ``fixed`` to ``moving`` physical points maximising Mattes mutual information.

    Starts from the scanner alignment (identity, rotating about the fixed image's centre), because
    hospital pairs share a frame of reference and a centre-of-mass start would undo that. Three
    resolution levels (shrink 4, 2, 1) recover shifts of centimetres. Each iteration samples 5 % of
    the voxels, or ``MIN_METRIC_SAMPLES`` for small images, whose rotation is otherwise left loose;
    the sampling is seeded, so a rerun gives the same transform. A regular-step gradient descent
    (2 mm first step) reached the highest final metric of the optimisers tried on five IBSI pairs,
    in 2-13 s each.
    """
    initial = sitk.Euler3DTransform()
    initial.SetCenter(fixed.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in fixed.GetSize()]))
    method = _mattes()
    method.SetMetricSamplingStrategy(method.RANDOM)
    fraction = min(1.0, max(0.05, MIN_METRIC_SAMPLES / np.prod(fixed.GetSize())))
    method.SetMetricSamplingPercentage(fraction, seed + 1)  # SimpleITK takes seed 0 for "the wall clock"
    method.SetOptimizerAsRegularStepGradientDescent(learningRate=2.0, minStep=1e-3, numberOfIterations=200,
                                                    relaxationFactor=0.5)
    method.SetOptimizerScalesFromPhysicalShift()
    method.SetShrinkFactorsPerLevel([4, 2, 1])
    method.SetSmoothingSigmasPerLevel([2, 1, 0])
    method.SetInitialTransform(initial, inPlace=False)
    try:
        result = method.Execute(fixed, moving)
    except RuntimeError as err:  # ITK's message: too few samples inside the moving image, and the like
        raise DRDDInputError(f"rigid registration failed: {str(err).strip().splitlines()[-1]}") from err
    return sitk.Euler3DTransform(result.GetNthTransform(0))  # Execute wraps it in a composite


def _ras_parameters(transform: sitk.Euler3DTransform) -> dict:
    """The transform's translation (mm) and Euler angles (degrees) in RAS, the project's convention.

    SimpleITK works in LPS; flipping x and y negates those translations and the angles about those
    axes. The rotation is about the MR's centre; the transform maps MR points to CT points.
    """
    translation = RAS_TO_LPS @ np.asarray(transform.GetTranslation())
    angles = np.degrees([-transform.GetAngleX(), -transform.GetAngleY(), transform.GetAngleZ()])
    return {"translation_mm": [round(float(v), 3) for v in translation],
            "rotation_deg": [round(float(v), 3) for v in angles]}


def _registration(mr: sitk.Image, ct: sitk.Image, case_id: str, seed: int) -> tuple[sitk.Transform, dict]:
    """Register CT to MR, keep the result only if it raises the mutual information, and describe what happened."""
    fixed, moving = registration_views(mr, ct)
    identity = sitk.Euler3DTransform()
    before = mutual_information(fixed, moving, identity)
    transform = register_rigid(fixed, moving, seed)
    after = mutual_information(fixed, moving, transform)
    accepted = after > before
    record = {
        "registration": "accepted" if accepted else "rejected",
        "mi_before": round(before, 5),
        "mi_after": round(after, 5),
        **_ras_parameters(transform),
    }
    if accepted:
        logger.info("case %s: rigid registration raised mutual information %.4f -> %.4f (shift %s mm)",
                    case_id, before, after, record["translation_mm"])
        return transform, record
    logger.warning("case %s: rigid registration rejected, it would lower mutual information %.4f -> %.4f; "
                   "keeping the scanner alignment", case_id, before, after)
    return identity, record


# --- one case -------------------------------------------------------------------------------------


def _on_one_grid(case: PairCase, settings: PairSettings) -> dict:
    """MR, CT and the common field of view on the reference grid, with that grid's affine."""
    mr, mr_affine = _load(case.mr, "MR")
    ct, ct_affine = _load(case.ct, "CT")
    identity = sitk.Euler3DTransform()
    if not _field_of_view(ct, mr, identity).any():
        raise DRDDInputError("MR and CT do not overlap: no MR voxel lies inside the CT's field of view "
                             "(are both in one frame of reference?)")
    transform, record = _registration(mr, ct, case.case_id, settings.seed) if settings.register else (identity, {})
    if settings.grid == "mr":
        ct_array = _resample(ct, mr, transform, CT_FILL_HU)
        common = _field_of_view(ct, mr, transform)
        return {"mr": _to_array(mr), "ct": ct_array, "common": common, "affine": mr_affine, "record": record}
    inverse = transform.GetInverse()
    mr_array = _resample(mr, ct, inverse, MR_FILL)
    common = _field_of_view(mr, ct, inverse)
    return {"mr": mr_array, "ct": _to_array(ct), "common": common, "affine": ct_affine, "record": record}


def _body_mask(ct: np.ndarray, common: np.ndarray) -> np.ndarray:
    """The body in the CT, counted only where the MR has data too (a body voxel without MR is unusable)."""
    inside = np.where(common, ct, CT_FILL_HU)
    return BodyMask(threshold=BODY_THRESHOLD_HU)(inside[None])[0].numpy().astype(bool)


def _prepared_case(case: PairCase, settings: PairSettings) -> tuple[dict, dict]:
    """The cropped volumes of one case and its record, all in memory (nothing written yet)."""
    start = time.perf_counter()
    grid = _on_one_grid(case, settings)
    common = grid["common"]
    mask = _body_mask(grid["ct"], common)
    spacing = np.linalg.norm(grid["affine"][:3, :3], axis=0)
    box = crop_box(mask, common, spacing, settings.margin_mm)
    volumes = {"mr": grid["mr"][box], "ct": grid["ct"][box], "mask": mask[box],
               "affine": _shifted_affine(grid["affine"], box)}
    record = {
        "case_id": case.case_id,
        "grid": settings.grid,
        "shape": list(volumes["mask"].shape),
        "crop_start": [s.start for s in box],
        "spacing_mm": [round(float(s), 4) for s in spacing],
        "reference_voxels": int(common.size),
        "common_voxels": int(common.sum()),
        "overlap_fraction": round(float(common.mean()), 4),
        "mask_voxels": int(mask.sum()),
        **grid["record"],
        "settings": asdict(settings),
        "seconds": round(time.perf_counter() - start, 2),
    }
    return volumes, record


def _only_our_files(folder: Path) -> None:
    """Refuse to replace a case folder holding files this module did not write."""
    foreign = [p for p in folder.iterdir() if p.name not in CASE_FILES]
    if foreign:
        raise OutputExistsError(
            f"{folder.name}: holds {len(foreign)} file(s) prepare-pairs did not write; not replacing it")


def prepare_pair(case: PairCase, out_dir: str | os.PathLike, settings: PairSettings = PairSettings(),
                 overwrite: bool = False) -> dict:
    """Prepare one case into ``out_dir`` and return its record; raises ``DRDDInputError`` (no prefix) on bad input.

    An existing case folder raises ``OutputExistsError`` unless ``overwrite``.
    """
    if not _CASE_ID_RE.match(case.case_id):
        raise DRDDInputError("not usable as a case id (use letters, digits, '.', '_', '-'; not starting with '.')")
    volumes, record = _prepared_case(case, settings)
    with atomic_output_dir(case_dir(out_dir, case.case_id, settings.region), overwrite, _only_our_files) as staging:
        write_volume(volumes["mr"], volumes["affine"], staging / "mr.nii.gz", dtype=np.float32)
        write_volume(volumes["ct"], volumes["affine"], staging / "ct.nii.gz")  # int16 HU, as SynthRAD
        write_volume(volumes["mask"], volumes["affine"], staging / "mask.nii.gz", dtype=np.uint8)
        (staging / RECORD_NAME).write_text(json.dumps(record, indent=1) + "\n")
    return record


def _finished_record(folder: Path) -> dict:
    try:
        return json.loads((folder / RECORD_NAME).read_text())
    except (OSError, ValueError):
        return {}  # a folder someone else made: skipped all the same, never replaced without overwrite


def prepare_pairs(cases: list[PairCase], out_dir: str | os.PathLike, settings: PairSettings = PairSettings(),
                  overwrite: bool = False) -> list[dict]:
    """Prepare every case, going on past refused ones; returns one record per case with its ``status``.

    ``status`` is ``prepared``, ``skipped`` (its folder exists and ``overwrite`` is false) or
    ``failed`` (with ``error``: the case id and the problem; nothing is written for that case).
    """
    records = []
    for case in cases:
        folder = case_dir(out_dir, case.case_id, settings.region) if _CASE_ID_RE.match(case.case_id) else None
        if folder is not None and folder.exists() and not overwrite:
            logger.info("case %s: already prepared, skipped (pass overwrite to redo it)", case.case_id)
            records.append({**_finished_record(folder), "case_id": case.case_id, "status": "skipped"})
            continue
        try:
            record = prepare_pair(case, out_dir, settings, overwrite)
        except (DRDDInputError, FileNotFoundError, FileExistsError) as err:
            message = f"case {case.case_id}: {err}"
            logger.error("%s", message)
            records.append({"case_id": case.case_id, "status": "failed", "error": message})
            continue
        logger.info("case %s: prepared %s voxels on the %s grid (overlap %.0f %%, body %d voxels) in %.1f s",
                    case.case_id, "x".join(map(str, record["shape"])), settings.grid,
                    100 * record["overlap_fraction"], record["mask_voxels"], record["seconds"])
        records.append({**record, "status": "prepared"})
    return records


def write_report(records: list[dict], out_dir: str | os.PathLike) -> tuple[Path, Path]:
    """``OUT/prepare_pairs.{csv,json}``: this run's records, one row per case, replacing the last run's."""
    out_dir = Path(out_dir)
    json_path, csv_path = out_dir / f"{REPORT_STEM}.json", out_dir / f"{REPORT_STEM}.csv"
    with atomic_output(json_path, overwrite=True) as tmp:
        tmp.write_text(json.dumps({"cases": records}, indent=1) + "\n")
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=_REPORT_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    for record in records:
        writer.writerow({k: json.dumps(v) if isinstance(v, list) else v for k, v in record.items()})
    with atomic_output(csv_path, overwrite=True) as tmp:
        tmp.write_text(table.getvalue())
    return csv_path, json_path
