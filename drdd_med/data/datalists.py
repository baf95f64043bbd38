"""Dataset layouts -> MONAI datalists.

Every item is a dict ``{"case_id", "source", "target", "mask"}`` of file paths (``mask`` may be
absent where a layout has none; ``BodyMaskd`` then makes one). The noise stage's *unpaired pool* is a
list of ``{"case_id", "target"}``.

Layouts:
- SynthRAD2023: ``ROOT/Task1/brain/1BA001/{mr,ct,mask}.nii.gz`` (Task2: ``cbct``);
- SynthRAD2025: ``ROOT/Task1/HN/1HNA001/{mr,ct,mask}.mha`` (regions HN, TH, AB);
- a Decathlon-style JSON datalist with ``source``/``target``/``mask`` keys (MONAI's loader);
- two parallel folders (+ optional mask folder) matched by file name;
- an unpaired pool: every image file in a folder (recursively).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple, Protocol

import numpy as np
from monai.data import load_decathlon_datalist

from drdd_med.errors import DRDDInputError

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd")
SYNTHRAD_SOURCES = {"Task1": "mr", "Task2": "cbct"}


class SourceSimulator(Protocol):
    """What ``prepare_heldout_case`` needs of a simulator transform (``SimulateLowDose``, ``SimulateCBCT``)."""

    source_tag: str  # the simulated scan's file name, e.g. "ldct", "cbct"

    def recipe(self) -> dict: ...  # its settings, JSON-ready, recorded beside the held-out files

    def simulate(self, volume_hu, spacing_mm, seed: int, name: str = "volume"): ...


def _image_in(folder: Path, stem: str) -> Path | None:
    for suffix in IMAGE_SUFFIXES:
        path = folder / f"{stem}{suffix}"
        if path.is_file():
            return path
    return None


def _strip_suffix(name: str) -> str | None:
    for suffix in IMAGE_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return None


def synthrad_datalist(root: str | os.PathLike, task: str = "Task1", regions: Sequence[str] | None = None,
                      require_mask: bool = True) -> list[dict]:
    """Cases of a SynthRAD2023/2025 folder (``.nii.gz`` or ``.mha`` alike), sorted by case id.

    ``regions`` defaults to every region folder present. A case folder missing its source or target
    image is an error naming the case; a missing mask is an error unless ``require_mask=False``.
    """
    if task not in SYNTHRAD_SOURCES:
        raise ValueError(f"task must be one of {sorted(SYNTHRAD_SOURCES)}, got {task!r}")
    task_dir = Path(root) / task
    if not task_dir.is_dir():
        return []
    region_dirs = sorted(p for p in task_dir.iterdir() if p.is_dir()) if regions is None else [task_dir / r for r in regions]
    items = []
    for region_dir in region_dirs:
        for case_dir in sorted(p for p in region_dir.iterdir() if p.is_dir()) if region_dir.is_dir() else []:
            item = {"case_id": case_dir.name}
            for key, stem in (("source", SYNTHRAD_SOURCES[task]), ("target", "ct"), ("mask", "mask")):
                path = _image_in(case_dir, stem)
                if path is None and (key != "mask" or require_mask):
                    raise DRDDInputError(f"case {case_dir.name}: no {stem} image ({'/'.join(IMAGE_SUFFIXES)})")
                if path is not None:
                    item[key] = str(path)
            items.append(item)
    return sorted(items, key=lambda item: item["case_id"])


def json_datalist(path: str | os.PathLike, section: str = "training") -> list[dict]:
    """A Decathlon-style JSON datalist whose items have ``source``, ``target`` (and optional ``mask``)."""
    items = load_decathlon_datalist(str(path), is_segmentation=False, data_list_key=section)
    for index, item in enumerate(items):
        item.setdefault("case_id", _strip_suffix(Path(str(item.get("target", f"item{index}"))).name) or f"item{index}")
        missing = [k for k in ("source", "target") if k not in item]
        if missing:
            raise DRDDInputError(f"{Path(path).name}: {section} item {index} ({item['case_id']}) lacks {missing}")
        _check_exists(item)
    return items


def parallel_folders_datalist(source_dir: str | os.PathLike, target_dir: str | os.PathLike,
                              mask_dir: str | os.PathLike | None = None) -> list[dict]:
    """Pairs of images with the same file name in ``source_dir`` and ``target_dir`` (and ``mask_dir``)."""
    sources = {_strip_suffix(p.name): p for p in sorted(Path(source_dir).iterdir()) if _strip_suffix(p.name)}
    targets = {_strip_suffix(p.name): p for p in sorted(Path(target_dir).iterdir()) if _strip_suffix(p.name)}
    unmatched = sorted(set(sources) ^ set(targets))
    if unmatched:
        raise DRDDInputError(f"{len(unmatched)} case(s) have a source or a target but not both: {unmatched[:5]}")
    items = []
    for case_id in sorted(sources):
        item = {"case_id": case_id, "source": str(sources[case_id]), "target": str(targets[case_id])}
        if mask_dir is not None:
            mask = _image_in(Path(mask_dir), case_id)
            if mask is None:
                raise DRDDInputError(f"case {case_id}: no mask in the mask folder")
            item["mask"] = str(mask)
        items.append(item)
    return items


def image_files(folder: str | os.PathLike, key: str) -> list[dict]:
    """``{"case_id": <file name without suffix>, key: <path>}`` for every image under ``folder`` (recursively)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    items = []
    for path in sorted(folder.rglob("*")):
        stem = _strip_suffix(path.name)
        if stem and path.is_file() and not path.name.startswith("."):
            items.append({"case_id": stem, key: str(path)})
    return items


def target_pool(folder: str | os.PathLike) -> list[dict]:
    """Every target-domain image under ``folder`` (recursively), for the noise stage's unpaired pool."""
    return image_files(folder, "target")


def split_cases(items: list[dict], num_validation: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Hold out ``num_validation`` cases (seeded), returning ``(training, validation)``."""
    if not 0 <= num_validation < len(items):
        raise DRDDInputError(f"cannot hold out {num_validation} of {len(items)} cases for validation")
    order = np.random.default_rng(seed).permutation(len(items))
    held = set(order[:num_validation].tolist())
    return [it for i, it in enumerate(items) if i not in held], [it for i, it in enumerate(items) if i in held]


def split_paired_fraction(items: list[dict], paired_fraction: float, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Keep ``paired_fraction`` of the pairs for the residual stage; the others give their targets to the pool.

    Returns ``(paired, pool)`` where ``pool`` holds ``{"case_id", "target"}`` of the unused pairs. At
    least one pair is kept when ``paired_fraction > 0``.
    """
    if not 0 < paired_fraction <= 1:
        raise ValueError(f"paired_fraction must be in (0, 1], got {paired_fraction}")
    count = max(1, round(paired_fraction * len(items))) if items else 0
    order = np.random.default_rng(seed).permutation(len(items))
    kept = set(order[:count].tolist())
    paired = [it for i, it in enumerate(items) if i in kept]
    pool = [{"case_id": it["case_id"], "target": it["target"]} for i, it in enumerate(items) if i not in kept]
    return paired, pool


def _check_exists(item: dict) -> None:
    for key in ("source", "target", "mask"):
        if key in item and not Path(item[key]).exists():
            raise DRDDInputError(f"case {item['case_id']}: the {key} file does not exist")


def prepare_datalists(
    dataset_dir: str | os.PathLike,
    task: str = "Task1",
    regions: Sequence[str] | None = None,
    pool_dir: str | os.PathLike | None = None,
    num_validation: int = 4,
    paired_fraction: float = 1.0,
    demo_dir: str | os.PathLike | None = None,
    seed: int = 0,
) -> dict[str, list[dict]]:
    """The three datalists a DRDD bundle trains from: ``paired``, ``pool`` and ``validation``.

    ``dataset_dir`` is a SynthRAD layout. When it is the bundle's ``demo_dir`` and holds no case,
    the built-in demo dataset is written there first (and the log says so); any other folder
    without cases is an error naming the layouts read, so demo data never lands in a user's
    folder. Validation cases are held
    out before anything else; of the rest, ``paired_fraction`` of the pairs train the residual stage.
    The noise stage's pool is every training target (paired or not) plus every image in ``pool_dir``
    (default ``dataset_dir/ct_pool``).
    """
    dataset_dir = Path(dataset_dir)
    cases = synthrad_datalist(dataset_dir, task, regions)
    if not cases:
        if not _is_demo_dir(dataset_dir, demo_dir):
            source = SYNTHRAD_SOURCES[task]
            raise DRDDInputError(
                f"dataset_dir holds no {task} cases in a layout drdd_med reads: SynthRAD2023 "
                f"({task}/<region>/<case>/{{{source},ct,mask}}.nii.gz) or SynthRAD2025 (the same with .mha); "
                "point dataset_dir at such a folder (drdd-med prepare-pairs writes one from raw pairs), "
                "or leave it at the bundle's default to train on the built-in demo data"
            )
        from drdd_med.data.demo import write_demo_dataset

        summary = write_demo_dataset(dataset_dir, seed=seed)
        logger.info("dataset_dir holds no data: generated the built-in demo dataset there (%s)", _counts(summary))
        cases = synthrad_datalist(dataset_dir, task, regions)
    training, validation = split_cases(cases, num_validation, seed)
    paired, unused = split_paired_fraction(training, paired_fraction, seed)
    pool = [{"case_id": it["case_id"], "target": it["target"]} for it in paired] + unused
    pool += target_pool(pool_dir if pool_dir is not None else dataset_dir / "ct_pool")
    logger.info("datalists: %d paired, %d in the target pool, %d validation cases", len(paired), len(pool), len(validation))
    return {"paired": paired, "pool": pool, "validation": validation}


def _is_demo_dir(dataset_dir: str | os.PathLike, demo_dir: str | os.PathLike | None) -> bool:
    return demo_dir is not None and Path(dataset_dir).resolve() == Path(demo_dir).resolve()


def _counts(summary: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in summary.items() if isinstance(v, int))


def inference_datalist(
    input_path: str | os.PathLike | None = None,
    dataset_dir: str | os.PathLike | None = None,
    task: str = "Task1",
    num_validation: int = 4,
    seed: int = 0,
) -> list[dict]:
    """Cases to translate: from ``input_path``, or else the held-out cases of ``dataset_dir``.

    ``input_path`` may be a SynthRAD folder (references and masks are used when present), a JSON
    datalist (its ``validation`` section, else ``training``), a folder of source images (case id =
    file name), or one image file. Without it, the validation split that ``prepare_datalists``
    holds out of ``dataset_dir`` (same ``num_validation`` and ``seed``) is used.
    """
    if input_path is None or str(input_path) == "":
        if dataset_dir is None:
            raise ValueError("give an input (file, folder or datalist) or the dataset_dir whose held-out cases to use")
        return prepare_datalists(dataset_dir, task, num_validation=num_validation, seed=seed)[
            "validation"
        ]
    path = Path(input_path)
    if not path.exists():
        raise FileNotFoundError(f"{path.name}: the inference input does not exist")
    if path.is_file() and path.suffix == ".json":
        import json

        sections = json.loads(path.read_text())
        return [_source_only(it) for it in json_datalist(path, "validation" if "validation" in sections else "training")]
    if path.is_file():
        stem = _strip_suffix(path.name)
        if stem is None:
            raise DRDDInputError(f"{path.name}: not an image file ({'/'.join(IMAGE_SUFFIXES)})")
        return [{"case_id": stem, "source": str(path)}]
    if (path / task).is_dir():
        return synthrad_datalist(path, task, require_mask=False)
    items = image_files(path, "source")
    if not items:
        raise DRDDInputError(f"{path.name}: no image files to translate in this folder")
    return items


def _source_only(item: dict) -> dict:
    return {k: v for k, v in item.items() if k in ("case_id", "source", "target", "mask")}


# --- Low-dose CT -----------------------------------------------------------------------------------
# AAPM/Mayo 2016 Low Dose CT Grand Challenge: ten patients, each a quarter-dose and a full-dose DICOM
# series of the same slices; customarily nine train and L506 is held out for testing.
MAYO_SOURCE_FOLDER, MAYO_TARGET_FOLDER = "quarter_1mm", "full_1mm"
MAYO_TEST_PATIENTS = ("L506",)
HELDOUT_RECORD = ".drdd-heldout.json"  # hidden: evaluate_folders ignores names starting with "."
BODY_THRESHOLD_HU = -500.0


def mayo_datalist(
    root: str | os.PathLike, source_folder: str = MAYO_SOURCE_FOLDER, target_folder: str = MAYO_TARGET_FOLDER
) -> list[dict]:
    """Patients of an AAPM/Mayo 2016 folder as ``{"case_id", "source", "target"}`` (DICOM folders), sorted.

    Layouts: ``ROOT/L067/{quarter_1mm,full_1mm}/*.IMA`` (the customary one) or
    ``ROOT/{quarter_1mm,full_1mm}/L067/...``. Another reconstruction (e.g. ``quarter_3mm``) is
    picked with ``source_folder``/``target_folder``. A patient with only one of the two folders is an
    error naming the patient; a root with neither layout gives ``[]``.
    """
    root = Path(root)
    if not root.is_dir():
        return []
    if (root / source_folder).is_dir() or (root / target_folder).is_dir():  # dose folder first
        patients = {p.name for folder in (source_folder, target_folder) if (root / folder).is_dir()
                    for p in (root / folder).iterdir() if p.is_dir()}
        paths = {name: (root / source_folder / name, root / target_folder / name) for name in patients}
    else:
        patients = {p.name for p in root.iterdir() if p.is_dir() and ((p / source_folder).is_dir() or (p / target_folder).is_dir())}
        paths = {name: (root / name / source_folder, root / name / target_folder) for name in patients}
    items = []
    for name in sorted(paths):
        source, target = paths[name]
        for path, folder in ((source, source_folder), (target, target_folder)):
            if not path.is_dir():
                raise DRDDInputError(f"patient {name}: no {folder} folder; each patient needs {source_folder} and {target_folder}")
        items.append({"case_id": name, "source": str(source), "target": str(target)})
    return items


def _case_seed(case_id: str, seed: int) -> int:
    """A per-case noise seed independent of list order, so a held-out input never depends on the split."""
    import zlib

    return int(np.random.SeedSequence([int(seed), zlib.crc32(case_id.encode())]).generate_state(1)[0])


def _file_stamp(path: str | os.PathLike) -> dict:
    path = Path(path).resolve()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return {"path": str(path), "files": len(files), "bytes": sum(p.stat().st_size for p in files),
            "mtime_ns": max((p.stat().st_mtime_ns for p in files), default=0)}


def prepare_heldout_case(item: dict, heldout_dir: str | os.PathLike, simulator: SourceSimulator, seed: int = 0) -> dict:
    """Write one held-out case as ``HELDOUT/<case>/{<tag>,ct,mask}.nii.gz`` and return its datalist item.

    ``simulator`` is the array transform that makes the bundle's source scan from a CT
    (``SimulateLowDose``, tag ``ldct``; ``SimulateCBCT``, tag ``cbct``), set to one value of each
    setting (its ``recipe()``, e.g. one dose). ``item`` has ``case_id``, ``target`` (the CT: image
    file or DICOM folder) and optionally ``source`` (a real scan of the same slices, e.g. a Mayo
    quarter-dose series). Without a source it is simulated with a noise seed drawn from ``seed`` and
    the case id, so the input of a case is the same whatever the split or the order. ``mask`` is the
    body of the CT (> -500 HU). Both scans must be CT in HU on one grid (errors name the case). A
    hidden record of what the files were made from lets a rerun reuse them, and rewrite them when
    the simulator's settings, the seed or an input file changed.
    """
    import json

    from drdd_med.data.readers import load_volume
    from drdd_med.data.writers import write_volume
    from drdd_med.errors import GridMismatchError
    from drdd_med.ldct import check_hounsfield
    from drdd_med.transforms.array import BodyMask

    case_id = item["case_id"]
    case_dir = Path(heldout_dir) / case_id
    paths = {"source": case_dir / f"{simulator.source_tag}.nii.gz", "target": case_dir / "ct.nii.gz",
             "mask": case_dir / "mask.nii.gz"}
    recipe = {"target": _file_stamp(item["target"])}
    if "source" in item:
        recipe["source"] = _file_stamp(item["source"])
    else:
        recipe.update(simulator.recipe(), seed=_case_seed(case_id, seed))
    record = case_dir / HELDOUT_RECORD
    if record.is_file() and all(p.is_file() for p in paths.values()):
        try:
            if json.loads(record.read_text()) == recipe:
                return {"case_id": case_id, **{k: str(p) for k, p in paths.items()}}
        except ValueError:
            pass  # an unreadable record: write the case again

    target = load_volume(item["target"], expected_modality="CT")
    check_hounsfield(target, f"{case_id}/target")
    affine = np.asarray(target.affine, dtype=np.float64)
    if "source" in item:
        source = load_volume(item["source"], expected_modality="CT")
        check_hounsfield(source, f"{case_id}/source")
        if tuple(source.shape) != tuple(target.shape) or not np.allclose(source.affine, affine, atol=1e-3):
            raise GridMismatchError(f"{case_id}: the source and target scans are not on one voxel grid "
                                    f"(shapes {tuple(source.shape)} and {tuple(target.shape)})")
        source = source.numpy()
    else:
        spacing = np.linalg.norm(affine[:3, :2], axis=0)
        source = simulator.simulate(target.numpy(), spacing, recipe["seed"], name=f"{case_id}/target")
    mask = BodyMask(threshold=BODY_THRESHOLD_HU)(target[None])[0].numpy()
    record.unlink(missing_ok=True)  # the files below no longer match the old record
    write_volume(source, affine, paths["source"], overwrite=True)
    write_volume(target.numpy(), affine, paths["target"], overwrite=True)
    write_volume(mask, affine, paths["mask"], dtype=np.uint8, overwrite=True)
    record.write_text(json.dumps(recipe, indent=1))
    return {"case_id": case_id, **{k: str(p) for k, p in paths.items()}}


class RealPairLayout(NamedTuple):
    """A layout of real source/target pairs beside CT volumes: how to read it, and its name for errors."""

    read: Callable[[Path], list[dict]]
    description: str


MAYO_LAYOUT = RealPairLayout(
    mayo_datalist,
    f"AAPM/Mayo 2016 patient folders (<patient>/{MAYO_SOURCE_FOLDER}, <patient>/{MAYO_TARGET_FOLDER})",
)


def prepare_simulated_datalists(
    dataset_dir: str | os.PathLike,
    heldout_dir: str | os.PathLike,
    simulator: SourceSimulator,
    num_validation: int = 4,
    demo_dir: str | os.PathLike | None = None,
    demo_cases: int = 16,
    demo_shape: Sequence[int] = (128, 128, 48),
    demo_spacing: Sequence[float] = (1.5, 1.5, 3.0),
    seed: int = 0,
    real_pairs: RealPairLayout | None = None,
    held_out: Sequence[str] = (),
) -> dict[str, list[dict]]:
    """The datalists of a bundle whose source scan is simulated from CT: ``paired``, ``pool``, ``validation``.

    ``dataset_dir`` is either

    - a ``real_pairs`` layout (e.g. ``MAYO_LAYOUT``): ``paired`` items hold the real ``source`` and
      ``target`` scans; the cases in ``held_out`` are the validation cases; or
    - a folder of CT volumes (searched recursively; ``target_pool``): ``paired`` items hold only the
      ``target``, the training pipeline simulates the ``source``; ``num_validation`` cases are held
      out with ``seed``. When the folder is the bundle's ``demo_dir`` and holds no volume,
      ``demo_cases`` CT-only demo head phantoms of ``demo_shape`` voxels at ``demo_spacing`` mm are
      written there first; any other empty folder is an error naming the layouts read.

    Held-out cases are written to ``heldout_dir`` by ``prepare_heldout_case`` (the real source, or
    one made by ``simulator``, an array transform set to one value of each setting), so that
    validation, inference and scoring all read the same input files. ``pool`` is the CT of every
    training case, for the noise stage.
    """
    recipe = simulator.recipe()  # a range for the held-out inputs is refused before anything is written
    dataset_dir, heldout_dir = Path(dataset_dir).resolve(), Path(heldout_dir).resolve()
    if heldout_dir == dataset_dir or dataset_dir in heldout_dir.parents:
        raise ValueError(f"heldout_dir must lie outside dataset_dir ({dataset_dir}); its files would count as cases")
    cases = real_pairs.read(dataset_dir) if real_pairs is not None else []
    if cases:
        ids = [item["case_id"] for item in cases]
        missing = sorted(set(held_out) - set(ids))
        if missing or len(set(held_out)) >= len(ids):
            raise DRDDInputError(f"held-out patients {missing or list(held_out)} must be some, not all, of the "
                                 f"patients found ({', '.join(ids)})")
        training = [item for item in cases if item["case_id"] not in held_out]
        validation = [item for item in cases if item["case_id"] in held_out]
    else:
        synthrad = [task for task in SYNTHRAD_SOURCES if (dataset_dir / task).is_dir()]
        if synthrad:
            raise DRDDInputError(
                f"dataset_dir is a SynthRAD folder ({synthrad[0]}/): this bundle trains on CT volumes whose "
                f"{simulator.source_tag} scans it simulates, and would take the folder's source and mask images "
                "for CTs; give it a folder of CT volumes (translate SynthRAD cases with the inference's --input)"
            )
        cases = target_pool(dataset_dir)
        if not cases:
            if not _is_demo_dir(dataset_dir, demo_dir):
                layouts = [real_pairs.description] if real_pairs is not None else []
                layouts.append(f"CT volumes ({', '.join(IMAGE_SUFFIXES)}, any depth) whose {simulator.source_tag} "
                               "scans are simulated")
                raise DRDDInputError(
                    f"dataset_dir holds no data in a layout drdd_med reads: {' or '.join(layouts)}; point "
                    "dataset_dir at such a folder, or leave it at the bundle's default to train on the built-in "
                    "demo data"
                )
            from drdd_med.data.demo import write_demo_dataset

            summary = write_demo_dataset(dataset_dir, num_paired=0, num_unpaired=demo_cases, shape=demo_shape,
                                         spacing=demo_spacing, seed=seed)
            logger.info("dataset_dir holds no data: generated the built-in demo dataset there (%s)", _counts(summary))
            cases = target_pool(dataset_dir)
        training, validation = split_cases(cases, num_validation, seed)
    validation = [prepare_heldout_case(item, heldout_dir, simulator, seed) for item in validation]
    pool = [{"case_id": item["case_id"], "target": item["target"]} for item in training]
    logger.info("datalists: %d paired (%s %s), %d CTs for the noise stage, %d held-out cases (%s)",
                len(training), "real" if training and "source" in training[0] else "simulated",
                simulator.source_tag, len(pool), len(validation), recipe)
    return {"paired": training, "pool": pool, "validation": validation}


def prepare_ldct_datalists(
    dataset_dir: str | os.PathLike,
    heldout_dir: str | os.PathLike,
    num_validation: int = 4,
    held_out: Sequence[str] = MAYO_TEST_PATIENTS,
    dose_fraction: float = 0.25,
    demo_dir: str | os.PathLike | None = None,
    demo_cases: int = 16,
    demo_shape: Sequence[int] = (128, 128, 48),
    demo_spacing: Sequence[float] = (1.5, 1.5, 3.0),
    seed: int = 0,
) -> dict[str, list[dict]]:
    """``prepare_simulated_datalists`` for low-dose CT: the AAPM/Mayo 2016 layout (patients in
    ``held_out``, default L506, validate) or full-dose CT volumes whose held-out low-dose scans are
    simulated at ``dose_fraction``.
    """
    from drdd_med.transforms.ldct import SimulateLowDose

    return prepare_simulated_datalists(dataset_dir, heldout_dir, SimulateLowDose(dose_fraction), num_validation,
                                       demo_dir, demo_cases, demo_shape, demo_spacing, seed, real_pairs=MAYO_LAYOUT,
                                       held_out=held_out)


def simulated_inference_datalist(
    input_path: str | os.PathLike | None,
    dataset_dir: str | os.PathLike,
    heldout_dir: str | os.PathLike,
    simulator: SourceSimulator,
    task: str = "Task1",
    real_pairs: RealPairLayout | None = None,
    **split: object,
) -> list[dict]:
    """Source scans to translate: from ``input_path``, or else the held-out cases of ``dataset_dir``.

    ``input_path`` may be a ``real_pairs`` folder (every case's source, with its reference), a DICOM
    series (folder or file), or anything ``inference_datalist`` takes (a SynthRAD ``task`` folder,
    image file, folder of images, JSON datalist). Without it, ``prepare_simulated_datalists(dataset_dir,
    heldout_dir, simulator, real_pairs=real_pairs, **split)`` gives the held-out cases (no demo data
    is generated here).
    """
    from drdd_med.data.readers import DICOM_SUFFIXES

    if input_path is None or str(input_path) == "":
        return prepare_simulated_datalists(dataset_dir, heldout_dir, simulator, real_pairs=real_pairs,
                                           **split)["validation"]
    path = Path(input_path)
    if not path.exists():
        raise FileNotFoundError(f"{path.name}: the inference input does not exist")
    cases = real_pairs.read(path) if real_pairs is not None else []
    if cases:
        return cases
    if path.is_dir() and not target_pool(path) or path.name.lower().endswith(DICOM_SUFFIXES):
        return [{"case_id": path.stem if path.is_file() else path.name, "source": str(path)}]
    return inference_datalist(path, task=task)


def ldct_inference_datalist(
    input_path: str | os.PathLike | None,
    dataset_dir: str | os.PathLike,
    heldout_dir: str | os.PathLike,
    dose_fraction: float = 0.25,
    **split: object,
) -> list[dict]:
    """``simulated_inference_datalist`` for low-dose CT: a Mayo folder gives every patient's
    quarter-dose series; held-out low-dose scans are simulated at ``dose_fraction``."""
    from drdd_med.transforms.ldct import SimulateLowDose

    return simulated_inference_datalist(input_path, dataset_dir, heldout_dir, SimulateLowDose(dose_fraction),
                                        real_pairs=MAYO_LAYOUT, **split)
