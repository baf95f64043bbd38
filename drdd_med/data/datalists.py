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
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from monai.data import load_decathlon_datalist

from drdd_med.errors import DRDDInputError

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd")
SYNTHRAD_SOURCES = {"Task1": "mr", "Task2": "cbct"}


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
    generate_demo: bool = True,
    seed: int = 0,
) -> dict[str, list[dict]]:
    """The three datalists a DRDD bundle trains from: ``paired``, ``pool`` and ``validation``.

    ``dataset_dir`` is a SynthRAD layout. When it holds no case and ``generate_demo`` is true, the
    built-in demo dataset is written there first (and the log says so). Validation cases are held
    out before anything else; of the rest, ``paired_fraction`` of the pairs train the residual stage.
    The noise stage's pool is every training target (paired or not) plus every image in ``pool_dir``
    (default ``dataset_dir/ct_pool``).
    """
    dataset_dir = Path(dataset_dir)
    cases = synthrad_datalist(dataset_dir, task, regions)
    if not cases:
        if not generate_demo:
            raise DRDDInputError(
                f"dataset_dir holds no {task} cases in SynthRAD layout ({task}/<region>/<case>/...); "
                "point dataset_dir at your data or enable generate_demo to use the built-in demo data"
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
        return prepare_datalists(dataset_dir, task, num_validation=num_validation, generate_demo=False, seed=seed)[
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
