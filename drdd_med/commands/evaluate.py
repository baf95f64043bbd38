"""``drdd-med evaluate``: score a folder of predictions against reference CTs, case by case."""

from __future__ import annotations

import argparse
from pathlib import Path

from drdd_med.evaluation import DEFAULT_METRICS, evaluate_folders
from drdd_med.metrics.functional import HU_WINDOWS


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        help="score predictions against reference CTs (SynthRAD metrics, HU windows, tissue MAE)",
        description="Match predictions to references by case id -- SynthRAD layout DIR/<case>/{ct,mask,mr}.nii.gz "
        "or .mha, or flat DIR/<case>.nii.gz, DIR/<case>_sct.nii.gz, DIR/<case>_mask.nii.gz -- and write "
        "OUT/metrics.csv (one row per case), OUT/summary.json (mean, std, median, quartiles, count per "
        "metric; failed and skipped cases with reasons), OUT/cases/<case>.png (source | prediction | "
        "reference | absolute error, mid axial slice) and OUT/summary.png (box plots). Masks and sources "
        "are looked up beside the references unless given. Exit code 1 when a case failed or was skipped.",
    )
    parser.add_argument("--pred", required=True, type=Path, metavar="DIR", help="folder of predictions")
    parser.add_argument("--ref", required=True, type=Path, metavar="DIR", help="folder of reference CTs")
    parser.add_argument("--mask", type=Path, metavar="DIR", help="folder of body masks (default: beside references)")
    parser.add_argument("--source", type=Path, metavar="DIR", help="folder of source images for the figures")
    parser.add_argument("--out", type=Path, metavar="DIR", help="output folder (default: <pred>_evaluation)")
    parser.add_argument(
        "--metrics",
        nargs="+",
        default=list(DEFAULT_METRICS),
        metavar="NAME",
        help=f"metrics: mae psnr ssim ms_ssim tissue_mae (the default), or <psnr|ssim|rmse>_<window> with a "
        f"window in {', '.join(HU_WINDOWS)}",
    )
    parser.add_argument(
        "--clip",
        type=float,
        nargs=2,
        metavar=("LOW", "HIGH"),
        help="HU clip range for psnr, ssim and ms_ssim (default: SynthRAD2023 -1024 3000 for psnr/ssim, "
        "SynthRAD2025 -1024 3071 for ms_ssim)",
    )
    parser.add_argument("--no-figures", action="store_true", help="write only the CSV and the JSON summary")
    parser.add_argument("--workers", type=int, metavar="N", help="cases evaluated in parallel (default: up to 2)")
    parser.add_argument("--overwrite", action="store_true", help="replace outputs of an earlier evaluation")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    pred = args.pred.resolve()
    out_dir = args.out if args.out is not None else pred.parent / f"{pred.name}_evaluation"
    summary = evaluate_folders(
        args.pred,
        args.ref,
        mask_dir=args.mask,
        source_dir=args.source,
        out_dir=out_dir,
        metrics=args.metrics,
        clip=args.clip,
        overwrite=args.overwrite,
        figures=not args.no_figures,
        workers=args.workers,
    )
    counts = summary["counts"]
    print(f"evaluated {counts['evaluated']} of {counts['cases']} cases ({counts['failed']} failed, "
          f"{counts['skipped']} skipped); results in {out_dir}")
    for name, stats in summary["metrics"].items():
        if stats["count"]:
            print(
                f"  {name:>16}: {stats['mean']:.4g} ± {stats['std']:.3g} "
                f"(median {stats['median']:.4g}, n={stats['count']})"
            )
    return 0 if counts["failed"] == counts["skipped"] == 0 else 1
