"""Evaluate a folder of predictions against reference CTs: per-case CSV, summary JSON, figures.

Case matching (the same rules for every folder; ``DIR`` is the folder given for a role):

- SynthRAD layout, one sub-folder per case: ``DIR/<case>/<tag>.<ext>``, e.g.
  ``Task1/brain/1BA001/{ct,mr,mask}.nii.gz`` or ``Task2/AB/2ABA002/{cbct,ct,mask}.mha``.
- Flat layout: ``DIR/<case>.<ext>`` or ``DIR/<case>_<tag>.<ext>``, e.g. ``1BA001.nii.gz``,
  ``1BA001_sct.nii.gz``, ``1BA001_mask.mha``.

Tags per role, in order of preference: prediction ``sct``, ``pred``, ``prediction``; reference
``ct``; mask ``mask``; source ``mr``, ``cbct``, ``ldct``, ``source``. A flat file without a known
tag belongs to the role its folder was given for; so does the only volume of a case sub-folder
when its name is not another role's tag. Other tags (``ct_def``, ...) are ignored. Extensions:
``.nii.gz``, ``.nii`` (read with nibabel), ``.mha``, ``.mhd``, ``.nrrd`` (SimpleITK). Names
starting with ``.`` are ignored. Case ids are the sub-folder names or the file names without tag
and extension.

Masks are looked up in ``mask_dir`` or, when it is not given, among the tagged files beside the
references (``ref_dir``); if then no case has a mask, whole volumes are scored and the summary
says so. Sources (for the figures only) are looked up in ``source_dir`` or beside the references.

Every reference case is evaluated or reported: *skipped* (no prediction, no mask, several
candidate files) or *failed* (unreadable file, grids that differ -- shape, or affine entries by
more than 1e-3 mm --, NaN or infinite voxels, empty mask), each with its reason, in the CSV and the
summary; the run goes on. Predictions without a reference are reported as skipped too. Outputs
(``OUT/metrics.csv``, ``OUT/summary.json``, ``OUT/summary.png``, ``OUT/cases/<case>.png``) are never
overwritten unless ``overwrite``. Logs name case ids, never file paths.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from drdd_med import __version__
from drdd_med.data.files import atomic_output
from drdd_med.data.readers import load_volume
from drdd_med.errors import DRDDInputError, GridMismatchError, OutputExistsError
from drdd_med.metrics import functional
from drdd_med.provenance import json_ready
from drdd_med.visualize import CT_WINDOW, mid_axial, save_panels

logger = logging.getLogger(__name__)

VOLUME_EXTENSIONS = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd")
ROLE_TAGS: dict[str, tuple[str, ...]] = {
    "prediction": ("sct", "pred", "prediction"),
    "reference": ("ct",),
    "mask": ("mask",),
    "source": ("mr", "cbct", "ldct", "source"),
}
ALL_TAGS = frozenset(tag for tags in ROLE_TAGS.values() for tag in tags)
GRID_TOLERANCE_MM = 1e-3
DEFAULT_METRICS = ("mae", "psnr", "ssim", "ms_ssim", "tissue_mae")
WINDOWED_KINDS = ("psnr", "ssim", "rmse")
_HEADLINE = ("mae", "psnr", "ssim", "ms_ssim")  # metrics printed above a case figure
ERROR_MAP_MAX_HU = 500.0  # one fixed scale, so that error maps of different cases compare at a glance
CSV_NAME, SUMMARY_NAME, FIGURE_NAME, CASE_FIGURES = "metrics.csv", "summary.json", "summary.png", "cases"


# --- finding cases ---------------------------------------------------------------------------------


def _split_extension(name: str) -> tuple[str, str] | None:
    lower = name.lower()
    for extension in VOLUME_EXTENSIONS:
        if lower.endswith(extension) and len(name) > len(extension):
            return name[: -len(extension)], extension
    return None


def find_cases(
    directory: str | os.PathLike, role: str, untagged: bool = True
) -> tuple[dict[str, Path], dict[str, str]]:
    """Map case id -> file for ``role`` in ``directory`` (rules in the module docstring).

    ``untagged=False`` takes tagged files only: for masks and sources looked up beside the
    references, whose untagged files are the references themselves. Returns ``(found, ambiguous)``;
    ``ambiguous`` maps case ids with several equally good files to a reason (no names).
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{role} folder does not exist: {directory}")
    preference = {tag: rank for rank, tag in enumerate(ROLE_TAGS[role])}
    untagged_rank = len(preference)
    candidates: dict[str, list[tuple[int, Path]]] = {}

    def offer(case: str, tag: str | None, path: Path) -> None:
        tag = None if tag is None else tag.lower()
        if (tag is None and untagged) or tag in preference:
            candidates.setdefault(case, []).append((untagged_rank if tag is None else preference[tag], path))

    for entry in sorted(directory.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            volumes = [
                (parts[0], child)
                for child in sorted(entry.iterdir())
                if child.is_file() and not child.name.startswith(".") and (parts := _split_extension(child.name))
            ]
            tagged = [(stem, child) for stem, child in volumes if stem.lower() in preference]
            for stem, child in tagged:
                offer(entry.name, stem, child)
            if not tagged and len(volumes) == 1 and volumes[0][0].lower() not in ALL_TAGS:
                offer(entry.name, None, volumes[0][1])
        elif entry.is_file() and (parts := _split_extension(entry.name)):
            stem = parts[0]
            head, _, tail = stem.rpartition("_")
            if head and tail.lower() in ALL_TAGS:
                offer(head, tail, entry)
            else:
                offer(stem, None, entry)

    found, ambiguous = {}, {}
    for case, options in candidates.items():
        best = min(rank for rank, _ in options)
        chosen = [path for rank, path in options if rank == best]
        if len(chosen) == 1:
            found[case] = chosen[0]
        else:
            kinds = sorted("".join(path.suffixes) or path.name for path in chosen)  # file names may identify a patient
            ambiguous[case] = f"{len(chosen)} candidate {role} files ({', '.join(kinds)}); keep one"
    return found, ambiguous


# --- reading ---------------------------------------------------------------------------------------


def read_volume(
    path: str | os.PathLike, role: str = "volume", case: str | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Read a 3D scalar volume as ``(array indexed (i, j, k), RAS affine)`` with ``load_volume``.

    Errors name the case and the role, never the file path (it may carry patient names).
    """
    prefix = f"{case}: " if case else ""
    name = Path(path).name
    try:
        volume = load_volume(path)
    except (DRDDInputError, FileNotFoundError) as err:
        raise type(err)(f"{prefix}{role}: {str(err).replace(name, 'file')}") from None
    except (RuntimeError, OSError, ValueError):
        extension = _split_extension(name)[1] if _split_extension(name) else ""
        raise DRDDInputError(f"{prefix}cannot read the {role} file (not a readable {extension} volume)") from None
    return np.asarray(volume), np.asarray(volume.affine, dtype=np.float64)


def check_same_grid(case: str, role: str, shape, affine, ref_shape, ref_affine) -> None:
    """Raise ``GridMismatchError`` unless shapes are equal and affines agree within 1e-3 mm."""
    if tuple(shape) != tuple(ref_shape):
        raise GridMismatchError(f"{case}: {role} shape {tuple(shape)} differs from reference shape {tuple(ref_shape)}")
    difference = float(np.abs(np.asarray(affine) - np.asarray(ref_affine)).max())
    if difference > GRID_TOLERANCE_MM:
        raise GridMismatchError(
            f"{case}: {role} grid differs from the reference grid (affine entries differ by up to "
            f"{difference:.4g} mm; tolerance {GRID_TOLERANCE_MM} mm)"
        )


# --- metrics by name -------------------------------------------------------------------------------

ScoreFn = Callable[[np.ndarray, np.ndarray, "np.ndarray | None", str], dict[str, float | None]]


def _range_text(value_range) -> str:
    low, high = value_range
    return f"[{low:g}, {high:g}] HU"


def resolve_metrics(
    names: Sequence[str], clip: Sequence[float] | None = None
) -> tuple[dict[str, ScoreFn], dict[str, str]]:
    """Scoring functions and their one-line definitions for metric names.

    Names: ``mae``, ``psnr`` and ``ssim`` (SynthRAD2023; ``clip`` default [-1024, 3000]),
    ``ms_ssim`` (SynthRAD2025; ``clip`` default [-1024, 3071]), ``tissue_mae`` (columns
    ``mae_air``, ``mae_soft_tissue``, ``mae_bone``) and ``<psnr|ssim|rmse>_<window>`` for a window of
    ``HU_WINDOWS``. ``clip``, when given, replaces both challenge defaults.
    """
    clip_2023 = functional.SYNTHRAD2023_CLIP if clip is None else tuple(clip)
    clip_2025 = functional.SYNTHRAD2025_CLIP if clip is None else tuple(clip)
    scorers: dict[str, ScoreFn] = {}
    definitions: dict[str, str] = {}
    for name in dict.fromkeys(names):
        if name == "mae":
            scorers[name] = lambda p, r, m, c: {"mae": functional.synthrad2023_mae(p, r, m, case=c)}
            definitions["mae"] = "SynthRAD2023/2025 MAE in HU inside the mask, no clipping"
        elif name == "psnr":
            scorers[name] = lambda p, r, m, c: {"psnr": functional.synthrad2023_psnr(p, r, m, clip_2023, case=c)}
            definitions["psnr"] = f"SynthRAD PSNR in dB over mask voxels, clipped to {_range_text(clip_2023)}"
        elif name == "ssim":
            if "ms_ssim" in names:  # both from one pass of full-resolution statistics
                scorers[name] = lambda p, r, m, c: functional.synthrad_structural_similarity(
                    p, r, m, clip_2023, clip_2025, case=c
                )
            else:
                scorers[name] = lambda p, r, m, c: {"ssim": functional.synthrad2023_ssim(p, r, m, clip_2023, case=c)}
            definitions["ssim"] = (
                f"SynthRAD2023 masked 3D SSIM, clipped to {_range_text(clip_2023)}, 7-voxel uniform window, "
                "mean inside the mask after cropping a 3-voxel border"
            )
        elif name == "ms_ssim":
            if "ssim" not in names:
                scorers[name] = lambda p, r, m, c: {
                    "ms_ssim": functional.synthrad2025_ms_ssim(p, r, m, clip_2025, case=c)
                }
            definitions["ms_ssim"] = (
                f"SynthRAD2025 masked MS-SSIM, clipped to {_range_text(clip_2025)}, 5 scales "
                f"(weights {', '.join(map(str, functional.MS_SSIM_WEIGHTS))})"
            )
        elif name == "tissue_mae":
            scorers[name] = lambda p, r, m, c: {
                f"mae_{tissue}": value for tissue, value in functional.tissue_mae(p, r, m, case=c).items()
            }
            low, high = functional.TISSUE_THRESHOLDS
            definitions.update(
                mae_air=f"MAE in HU inside the mask where the reference < {low:g} HU",
                mae_soft_tissue=f"MAE in HU inside the mask where {low:g} <= reference <= {high:g} HU",
                mae_bone=f"MAE in HU inside the mask where the reference > {high:g} HU",
            )
        else:
            kind, _, window = name.partition("_")
            if kind not in WINDOWED_KINDS or window not in functional.HU_WINDOWS:
                raise DRDDInputError(
                    f"unknown metric {name!r}; use {', '.join(DEFAULT_METRICS)} or <psnr|ssim|rmse>_<window> "
                    f"with a window in {sorted(functional.HU_WINDOWS)}"
                )
            function = {"psnr": functional.windowed_psnr, "ssim": functional.windowed_ssim,
                        "rmse": functional.windowed_rmse}[kind]
            scorers[name] = lambda p, r, m, c, f=function, w=window, n=name: {n: f(p, r, w, m, case=c)}
            window_range = _range_text(functional.HU_WINDOWS[window])
            definitions[name] = f"{kind.upper()} inside the {window} window {window_range}"
    if not scorers:
        raise DRDDInputError("no metric requested")
    return scorers, definitions


# --- one case --------------------------------------------------------------------------------------


@dataclass
class CaseResult:
    case: str
    status: str  # "ok", "failed" or "skipped"
    reason: str = ""
    values: dict[str, float | None] = field(default_factory=dict)
    slices: dict[str, np.ndarray] = field(default_factory=dict)  # mid axial slices for the figure


def _score_case(pred, ref, mask, scorers: dict[str, ScoreFn], case: str) -> dict[str, float | None]:
    """All metrics of one case, on float32 C-ordered arrays converted once, not by every metric."""
    volumes = [pred, ref] if mask is None else [pred, ref, mask]
    if all(volume.flags.f_contiguous for volume in volumes):
        # both readers give Fortran-ordered (i, j, k) arrays; every metric treats all axes alike,
        # so scoring the (k, j, i) views, contiguous in memory, spares a reordering copy
        volumes = [volume.T for volume in volumes]
    pred, ref = (np.ascontiguousarray(volume, dtype=np.float32) for volume in volumes[:2])
    mask = None if mask is None else np.ascontiguousarray(volumes[2])
    values: dict[str, float | None] = {}
    for scorer in scorers.values():
        values.update(scorer(pred, ref, mask, case))
    return values


def _evaluate_case(case: str, paths: dict[str, Path], scorers: dict[str, ScoreFn], figures: bool) -> CaseResult:
    try:
        ref, ref_affine = read_volume(paths["reference"], "reference", case)
        pred, pred_affine = read_volume(paths["prediction"], "prediction", case)
        check_same_grid(case, "prediction", pred.shape, pred_affine, ref.shape, ref_affine)
        mask = None
        if "mask" in paths:
            mask, mask_affine = read_volume(paths["mask"], "mask", case)
            check_same_grid(case, "mask", mask.shape, mask_affine, ref.shape, ref_affine)
        values = _score_case(pred, ref, mask, scorers, case)
    except DRDDInputError as err:
        return CaseResult(case, "failed", str(err))
    result = CaseResult(case, "ok", values=values)
    if figures:
        result.slices = {"prediction": mid_axial(pred), "reference": mid_axial(ref)}
        if "source" in paths:
            try:
                source, source_affine = read_volume(paths["source"], "source", case)
                check_same_grid(case, "source", source.shape, source_affine, ref.shape, ref_affine)
                result.slices["source"] = mid_axial(source)
            except DRDDInputError as err:
                logger.warning("%s: source left out of the figure: %s", case, str(err).removeprefix(f"{case}: "))
    return result


# --- outputs ---------------------------------------------------------------------------------------


def finite_statistics(values: list[float]) -> dict[str, float | int]:
    """Count, mean, std, quartiles, min and max of the finite ``values``; ``count_infinite`` the others.

    A case translated exactly has a PSNR of +inf: it is counted, and kept out of the mean that would
    otherwise say nothing of the other cases. With no finite value only the counts are given.
    """
    finite = np.asarray([v for v in values if math.isfinite(v)], dtype=np.float64)
    stats: dict[str, float | int] = {"count": int(finite.size)}
    if finite.size:
        q1, median, q3 = np.percentile(finite, [25, 50, 75])
        stats.update(
            mean=float(finite.mean()), std=float(finite.std()), median=float(median),
            q1=float(q1), q3=float(q3), min=float(finite.min()), max=float(finite.max()),
        )
    if len(values) > finite.size:
        stats["count_infinite"] = len(values) - int(finite.size)
    return stats


def _format(value: float | None) -> str:
    return "" if value is None else repr(float(value))


def _write_csv(path: Path, results: list[CaseResult], columns: list[str], overwrite: bool) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["case", "status", *columns, "reason"])
    for result in results:
        writer.writerow([result.case, result.status, *(_format(result.values.get(c)) for c in columns), result.reason])
    with atomic_output(path, overwrite=overwrite) as tmp:
        tmp.write_text(buffer.getvalue(), encoding="utf-8")


def _write_case_figure(path: Path, result: CaseResult, overwrite: bool) -> None:
    slices = result.slices
    ct_range = f"{CT_WINDOW[0]:g} to {CT_WINDOW[1]:g} HU"
    panels = []
    if "source" in slices:  # MR or CBCT intensities: a robust range of the slice itself
        panels.append(("source", slices["source"], tuple(np.percentile(slices["source"], [0.5, 99.5]))))
    panels += [
        (f"prediction ({ct_range})", slices["prediction"], CT_WINDOW),
        (f"reference ({ct_range})", slices["reference"], CT_WINDOW),
        ("|prediction - reference|", np.abs(slices["prediction"] - slices["reference"]), (0.0, ERROR_MAP_MAX_HU)),
    ]
    headline = ", ".join(
        f"{name} {value:.4g}" for name, value in result.values.items() if name in _HEADLINE and value is not None
    )
    save_panels(
        path, panels, title=f"{result.case}: {headline}", colorbar=[False] * (len(panels) - 1) + [True],
        cmaps=["gray"] * (len(panels) - 1) + ["magma"], overwrite=overwrite,
    )


def _unit(column: str) -> str:
    return "HU" if column.startswith(("mae", "rmse")) else "dB" if column.startswith("psnr") else ""


def _write_summary_figure(path: Path, results: list[CaseResult], columns: list[str], overwrite: bool) -> None:
    from matplotlib.figure import Figure  # pyplot-free: safe beside the worker threads

    data = {c: [r.values[c] for r in results if r.values.get(c) is not None and math.isfinite(r.values[c])]
            for c in columns}
    data = {c: v for c, v in data.items() if v}
    if not data:
        return
    fig = Figure(figsize=(2.2 * len(data) + 0.6, 3.4))
    axes = fig.subplots(1, len(data), squeeze=False)[0]
    for ax, (column, values) in zip(axes, data.items()):
        ax.boxplot(values, widths=0.6)
        ax.set_title(f"{column} (n={len(values)})", fontsize=9)
        ax.set_ylabel(_unit(column))
        ax.set_xticks([])
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    with atomic_output(path, overwrite=overwrite) as tmp:
        fig.savefig(tmp, dpi=100, format="png")


# --- the folder run --------------------------------------------------------------------------------


def evaluate_folders(
    pred_dir: str | os.PathLike,
    ref_dir: str | os.PathLike,
    mask_dir: str | os.PathLike | None = None,
    source_dir: str | os.PathLike | None = None,
    out_dir: str | os.PathLike = "evaluation",
    metrics: Sequence[str] = DEFAULT_METRICS,
    clip: Sequence[float] | None = None,
    overwrite: bool = False,
    figures: bool = True,
    workers: int | None = None,
    progress: bool = True,
) -> dict:
    """Evaluate every case of ``ref_dir`` against ``pred_dir``; write CSV, JSON and figures to ``out_dir``.

    ``metrics`` are names for ``resolve_metrics``; ``clip`` overrides the challenge clip ranges.
    ``workers`` cases are evaluated in parallel threads (default: up to 2; the heavy parts release
    the GIL). Returns the summary that is written to ``summary.json``: per metric mean, std
    (population), median, quartiles, min, max and count over evaluated cases, plus the failed and
    skipped cases with their reasons and the metric definitions.
    """
    started = time.perf_counter()
    scorers, definitions = resolve_metrics(metrics, clip)
    out_dir = Path(out_dir)
    predictions, ambiguous_predictions = find_cases(pred_dir, "prediction")
    references, ambiguous_references = find_cases(ref_dir, "reference")
    masks, ambiguous_masks = (
        find_cases(mask_dir, "mask") if mask_dir is not None else find_cases(ref_dir, "mask", untagged=False)
    )
    masks_required = mask_dir is not None or bool(masks)
    sources: dict[str, Path] = {}
    if figures:
        sources, _ = (
            find_cases(source_dir, "source")
            if source_dir is not None
            else find_cases(ref_dir, "source", untagged=False)
        )

    results: dict[str, CaseResult] = {}
    todo: dict[str, dict[str, Path]] = {}
    for case in sorted(set(references) | set(predictions) | set(ambiguous_references) | set(ambiguous_predictions)):
        reason = (
            ambiguous_references.get(case)
            or ambiguous_predictions.get(case)
            or (case not in references and "no reference for this prediction")
            or (case not in predictions and "no prediction for this case")
            or ambiguous_masks.get(case)
            or (masks_required and case not in masks and "no mask for this case")
        )
        if reason:
            results[case] = CaseResult(case, "skipped", reason)
            continue
        paths = {"reference": references[case], "prediction": predictions[case]}
        if case in masks:
            paths["mask"] = masks[case]
        if case in sources:
            paths["source"] = sources[case]
        todo[case] = paths
    if not results and not todo:
        raise DRDDInputError("no cases found: no reference or prediction volumes match the naming rules")

    outputs = [out_dir / CSV_NAME, out_dir / SUMMARY_NAME] + (
        [out_dir / FIGURE_NAME] + [out_dir / CASE_FIGURES / f"{case}.png" for case in todo] if figures else []
    )
    existing = [path for path in outputs if path.exists()]
    if existing and not overwrite:
        raise OutputExistsError(
            f"{out_dir}: {len(existing)} evaluation outputs exist already (e.g. {existing[0].name}); "
            "pass overwrite (--overwrite) to replace them"
        )
    logger.info(
        "evaluating %d cases (%d skipped), metrics: %s%s", len(todo), len(results), ", ".join(scorers),
        "" if masks_required else "; no masks found, scoring whole volumes",
    )

    workers = max(1, min(workers or min(2, os.cpu_count() or 1), len(todo) or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool, tqdm(
        total=len(todo), desc="evaluate", unit="case", disable=not progress
    ) as bar:
        futures = {pool.submit(_evaluate_case, case, paths, scorers, figures): case for case, paths in todo.items()}
        for future in as_completed(futures):
            result = future.result()
            results[result.case] = result
            if result.status == "ok":
                if figures:
                    _write_case_figure(out_dir / CASE_FIGURES / f"{result.case}.png", result, overwrite)
                    result.slices = {}
            else:
                logger.warning("%s", result.reason)
            bar.set_postfix_str(result.case)
            bar.update()

    ordered = [results[case] for case in sorted(results)]
    columns = list(dict.fromkeys(c for r in ordered if r.status == "ok" for c in r.values)) or list(definitions)
    evaluated = [r for r in ordered if r.status == "ok"]
    summary = {
        "drdd_med_version": __version__,
        "counts": {
            "cases": len(ordered),
            "evaluated": len(evaluated),
            "failed": sum(r.status == "failed" for r in ordered),
            "skipped": sum(r.status == "skipped" for r in ordered),
        },
        "masks": "per case" if masks_required else "none found: whole volumes scored",
        "metrics": {c: finite_statistics([r.values[c] for r in evaluated if r.values.get(c) is not None])
                    for c in columns},
        "definitions": {c: definitions[c] for c in columns if c in definitions},
        "failed": [{"case": r.case, "reason": r.reason} for r in ordered if r.status == "failed"],
        "skipped": [{"case": r.case, "reason": r.reason} for r in ordered if r.status == "skipped"],
        "seconds": round(time.perf_counter() - started, 2),
    }
    _write_csv(out_dir / CSV_NAME, ordered, columns, overwrite)
    if figures:
        _write_summary_figure(out_dir / FIGURE_NAME, evaluated, columns, overwrite)
    with atomic_output(out_dir / SUMMARY_NAME, overwrite=overwrite) as tmp:
        tmp.write_text(json.dumps(json_ready(summary), indent=2, allow_nan=False) + "\n", encoding="utf-8")
    logger.info(
        "evaluated %d of %d cases (%d failed, %d skipped) in %.1f s",
        len(evaluated), len(ordered), summary["counts"]["failed"], summary["counts"]["skipped"], summary["seconds"],
    )
    return summary
