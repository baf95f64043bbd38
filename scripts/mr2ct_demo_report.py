"""Score a trained drdd_mr2ct bundle against the monotone-intensity baseline on its held-out cases.

After the README's training and inference commands:

    python scripts/mr2ct_demo_report.py --bundle_root bundles/drdd_mr2ct

writes the baseline's predictions (``REPORT/baseline/<case>/sct.nii.gz``: the per-case isotonic
MR→CT curve, fitted on that case's own CT), evaluates both folders with ``drdd_med.evaluation``
(SynthRAD2023 masked MAE, PSNR, SSIM and per-tissue MAE), prints a table and saves it as
``REPORT/report.json``. Only the cases the bundle's inference wrote (the held-out ones) are scored.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np

from drdd_med.baselines import monotone_intensity_baseline
from drdd_med.data.files import atomic_output_dir
from drdd_med.data.writers import write_volume
from drdd_med.errors import OutputExistsError
from drdd_med.evaluation import evaluate_folders

METRICS = ("mae", "psnr", "ssim", "tissue_mae")


def score(cases: list[str], pred_dir: Path, cases_dir: Path, out: Path) -> dict:
    """Write the baseline's predictions and both methods' metrics into ``out``; return the table."""
    # the reference folder holds exactly the scored cases, so no other case counts as skipped
    references = out / "references"
    for case in cases:
        (references / case).mkdir(parents=True)
        for name in ("ct.nii.gz", "mask.nii.gz", "mr.nii.gz"):
            (references / case / name).symlink_to((cases_dir / case / name).resolve())
        mr, ct, mask = (np.asarray(nib.load(cases_dir / case / f"{n}.nii.gz").dataobj) for n in ("mr", "ct", "mask"))
        baseline = monotone_intensity_baseline(mr, ct, mask > 0)
        write_volume(baseline, nib.load(cases_dir / case / "mr.nii.gz").affine, out / "baseline" / case / "sct.nii.gz")

    table = {}
    for method, folder in (("DRDD", pred_dir), ("monotone baseline (oracle-fitted)", out / "baseline")):
        summary = evaluate_folders(folder, references, out_dir=out / method.split()[0].lower(), metrics=METRICS,
                                   progress=False)
        table[method] = {name: summary["metrics"][name] for name in summary["metrics"]}
    (out / "report.json").write_text(json.dumps({"cases": cases, "metrics": table}, indent=2))
    return table


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle_root", type=Path, default=Path("bundles/drdd_mr2ct"))
    parser.add_argument("--pred_dir", type=Path, help="synthetic CTs to score (default BUNDLE_ROOT/eval)")
    parser.add_argument("--dataset_dir", type=Path, help="SynthRAD folder (default BUNDLE_ROOT/data/demo)")
    parser.add_argument("--out", type=Path, help="report folder (default BUNDLE_ROOT/report)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing report")
    args = parser.parse_args(argv)
    pred_dir = args.pred_dir or args.bundle_root / "eval"
    cases_dir = (args.dataset_dir or args.bundle_root / "data" / "demo") / "Task1" / "brain"
    out = args.out or args.bundle_root / "report"
    cases = sorted(p.name for p in pred_dir.iterdir() if (p / "sct.nii.gz").is_file()) if pred_dir.is_dir() else []
    if not cases:
        print(f"error: no <case>/sct.nii.gz under {pred_dir}; run the bundle's inference first", file=sys.stderr)
        return 2
    try:
        with atomic_output_dir(out, overwrite=args.overwrite) as staging:  # no half report after a crash
            table = score(cases, pred_dir, cases_dir, staging)
    except OutputExistsError:
        print(f"error: {out} exists; pass --overwrite to replace it", file=sys.stderr)
        return 2

    print(f"{len(cases)} held-out cases: {', '.join(cases)}")
    print(f"{'method':36s} {'MAE (HU)':>16s} {'PSNR (dB)':>16s} {'SSIM':>16s}")
    for method, metrics in table.items():
        cells = [f"{metrics[m]['mean']:.3f} ± {metrics[m]['std']:.3f}" if m == "ssim"
                 else f"{metrics[m]['mean']:.1f} ± {metrics[m]['std']:.1f}" for m in ("mae", "psnr", "ssim")]
        print(f"{method:36s} " + " ".join(f"{c:>16s}" for c in cells))
    print(f"report: {out / 'report.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
