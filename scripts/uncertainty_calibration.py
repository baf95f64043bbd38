"""Is the std of several DRDD samples a useful uncertainty? Calibration on a trained bundle's held-out cases.

Runs the bundle's own inference config (``monai.bundle`` ``ConfigParser``: its network, sampler,
preprocessing and writer) with ``num_samples`` samples per case, into a temporary folder (never the
bundle's ``eval``), then compares, per case, the std map with the error of the mean synthetic CT
(``|mean − reference|`` in HU) inside the reference body mask, over all body voxels and per tissue
class of the reference CT (air / soft tissue / bone, the classes of ``drdd_med.evaluation``'s
per-tissue MAE, ``drdd_med.metrics.functional.TISSUE_THRESHOLDS``):

- Pearson and Spearman correlation between std and |error| (does a larger std flag a larger error?);
- the fraction of voxels with ``|error| ≤ 2·std`` (about 0.954 if the error were Gaussian with that std).

Writes per-case rows, means over cases, the command, machine and git state as JSON and prints a
table. Example (the README's figures)::

    python scripts/uncertainty_calibration.py --bundle_root bundles/drdd_mr2ct --num_samples 8 \\
        --output docs/results/uncertainty_mr2ct.json
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.bundle import ConfigParser
from scipy import stats

from drdd_med.benchmark import environment
from drdd_med.metrics.functional import TISSUE_CLASSES, TISSUE_THRESHOLDS
from drdd_med.provenance import git_state, write_results

ROOT = Path(__file__).resolve().parents[1]
REGIONS = ("body", *TISSUE_CLASSES)
MEASURES = ("pearson", "spearman", "within_2std")


def regions(reference: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
    """The body mask and, inside it, the tissue classes of the reference CT (as ``tissue_mae`` draws them)."""
    inside = mask > 0
    air_below, bone_above = TISSUE_THRESHOLDS
    air, bone = reference < air_below, reference > bone_above
    return {"body": inside, "air": air & inside, "soft_tissue": ~(air | bone) & inside, "bone": bone & inside}


def _correlation(function, x: np.ndarray, y: np.ndarray) -> float | None:
    """A correlation coefficient, ``None`` where it is undefined (fewer than 2 voxels, a constant map)."""
    if x.size < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        value = float(function(x, y)[0])
    return value if np.isfinite(value) else None


def calibration_metrics(mean: np.ndarray, std: np.ndarray, reference: np.ndarray, mask: np.ndarray) -> dict:
    """Per region (``REGIONS``): voxels, Pearson and Spearman correlation of std with |mean − reference|,
    and the fraction of voxels with |mean − reference| ≤ 2·std (all in HU). Empty regions get ``None``s."""
    if not mean.shape == std.shape == reference.shape == mask.shape:
        raise ValueError(f"grids differ: mean {mean.shape}, std {std.shape}, reference {reference.shape}, "
                         f"mask {mask.shape}")
    error = np.abs(mean.astype(np.float64) - reference.astype(np.float64))
    std = std.astype(np.float64)
    rows = {}
    for name, selected in regions(reference, mask).items():
        e, s = error[selected], std[selected]
        rows[name] = {
            "voxels": int(selected.sum()),
            "pearson": _correlation(stats.pearsonr, s, e),
            "spearman": _correlation(stats.spearmanr, s, e),
            "within_2std": float(np.mean(e <= 2 * s)) if e.size else None,
        }
    return rows


def mean_over_cases(rows: list[dict]) -> dict:
    """Per region and measure: the mean over the cases where it is defined, and how many those are."""
    summary = {}
    for region in REGIONS:
        summary[region] = {}
        for measure in MEASURES:
            values = [row["regions"][region][measure] for row in rows if row["regions"][region][measure] is not None]
            summary[region][measure] = {"mean": float(np.mean(values)) if values else None, "cases": len(values)}
    return summary


def translate(bundle_root: Path, num_samples: int, output_dir: Path, num_cases: int | None,
              device: str | None) -> tuple[list[dict], dict]:
    """Run the bundle's inference config on its held-out cases into ``output_dir``; the cases and the settings
    it ran with (device, precision, seed, sampler)."""
    parser = ConfigParser()
    parser.read_config(str(bundle_root / "configs" / "inference.json"))
    parser.update({"bundle_root": str(bundle_root.resolve()), "output_dir": str(output_dir),
                   "num_samples": num_samples, "overwrite": False})
    if device:
        parser["device"] = f"$torch.device('{device}')"
    cases = parser.get_parsed_content("datalist")[:num_cases]
    missing = [item["case_id"] for item in cases if not item.get("target") or not item.get("mask")]
    if missing:
        raise SystemExit(f"error: cases {', '.join(missing)} have no reference CT and mask to calibrate against")
    parser["datalist"] = cases
    parser.get_parsed_content("initialize")
    parser.get_parsed_content("run")
    settings = {key: parser.get_parsed_content(key) for key in ("device", "precision", "seed")}
    return cases, {**settings, "device": str(settings["device"]),
                   "sampler": parser.get_parsed_content("sampler").settings()}


def read(path: Path) -> np.ndarray:
    return np.asarray(nib.load(path).dataobj, dtype=np.float32)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle_root", type=Path, default=Path("bundles/drdd_mr2ct"))
    parser.add_argument("--num_samples", type=int, default=8, help="samples per case (default 8, at least 2)")
    parser.add_argument("--num_cases", type=int, help="only the first N held-out cases (default: all)")
    parser.add_argument("--device", help="torch device (default: the bundle's, a GPU when there is one)")
    parser.add_argument("--output", type=Path, default=Path("docs/results/uncertainty_mr2ct.json"),
                        help="JSON results file (default %(default)s)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    args = parser.parse_args(argv)
    if args.num_samples < 2:
        parser.error("--num_samples must be at least 2: a std needs several samples")
    if args.num_cases is not None and args.num_cases < 1:
        parser.error("--num_cases must be at least 1")
    if args.output.exists() and not args.overwrite:
        parser.error(f"{args.output} exists; pass --overwrite to replace it")
    if not (args.bundle_root / "models" / "model.pt").is_file():
        parser.error(f"{args.bundle_root / 'models' / 'model.pt'} is missing: train the bundle first")

    measured = git_state(ROOT)
    rows = []
    with tempfile.TemporaryDirectory(prefix="drdd-uncertainty-") as tmp:
        cases, settings = translate(args.bundle_root, args.num_samples, Path(tmp), args.num_cases, args.device)
        for item in cases:
            case_dir = Path(tmp) / item["case_id"]
            metrics = calibration_metrics(read(case_dir / "sct.nii.gz"), read(case_dir / "sct_std.nii.gz"),
                                          read(Path(item["target"])), read(Path(item["mask"])))
            rows.append({"case": item["case_id"], "regions": metrics})
    summary = mean_over_cases(rows)
    result = {"what": "per-voxel std of DRDD samples against the error of their mean, inside the body mask",
              "bundle_root": str(args.bundle_root), "num_samples": args.num_samples, **settings,
              "tissue_thresholds_hu": list(TISSUE_THRESHOLDS), "cases": rows, "mean": summary,
              "machine": environment(torch.device(settings["device"]))}
    print(f"{len(rows)} held-out cases, {args.num_samples} samples each: {', '.join(r['case'] for r in rows)}")
    print(f"{'region':12s} {'Pearson':>9s} {'Spearman':>9s} {'|err|<=2std':>12s}")
    for region in REGIONS:
        cells = [summary[region][m]["mean"] for m in MEASURES]
        print(f"{region:12s} " + " ".join(f"{'n/a' if v is None else f'{v:.3f}':>{w}s}"
                                          for v, w in zip(cells, (9, 9, 12))))
    write_results(args.output, result, "uncertainty_calibration.py", argv, measured, overwrite=args.overwrite)
    return 0


if __name__ == "__main__":
    sys.exit(main())
