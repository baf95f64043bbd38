"""What translating in bf16 instead of fp32 does to a trained bundle's synthetic CTs.

Runs the bundle's inference config once per ``--runs`` entry (``PRECISION`` or ``PRECISION@SEED``,
default seed 0) on the same held-out cases, into a temporary folder (never the bundle's ``eval``),
with the same weights and sampler, and reports per run the SynthRAD2023 scores against the reference
CTs (``drdd_med.evaluation``: masked MAE, PSNR, SSIM, per-tissue MAE), and for every run after the
first how far its synthetic CTs lie from the first's (absolute HU difference over every voxel inside
the body mask: mean, 99th percentile, max). The default runs put bf16's difference beside the one
another sampling seed makes in fp32: the scale of the sampler's own randomness.
bf16 runs natively only on CPUs with AVX512-BF16 or AMX (``drdd_med.engines.autocast_context``);
elsewhere the CPU computes fp32 and the rows come out equal. This measures quality, not speed: see
``scripts/benchmark_conversion.py`` and ``drdd-med benchmark`` for that. Example (the README's
figures)::

    python scripts/translation_precision.py --bundle_root bundles/drdd_mr2ct \\
        --output docs/results/translation_precision_mr2ct.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from drdd_med.benchmark import environment
from drdd_med.engines import cpu_bf16_native
from drdd_med.evaluation import evaluate_folders
from drdd_med.provenance import git_state, write_results

ROOT = Path(__file__).resolve().parents[1]
PRECISIONS = ("fp32", "bf16")
RUNS = "fp32,bf16,fp32@1"
METRICS = ("mae", "psnr", "ssim", "tissue_mae")


def translate(config_file: Path, bundle_root: Path, precision: str, seed: int, output_dir: Path) -> None:
    """The bundle's own inference command, with only the precision, sampling seed and output folder changed
    (the config's ``seed`` also picks the held-out split: the sampler's is ``inferer#seed``)."""
    command = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(config_file),
               "--bundle_root", str(bundle_root),
               "--output_dir", str(output_dir), "--precision", precision, "--inferer#seed", str(seed),
               "--device", "$torch.device('cpu')"]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)


def difference(first: Path, other: Path, references: Path) -> dict:
    """|other − first| in HU over the body-mask voxels of every case ``other`` holds."""
    values = []
    for case_dir in sorted(p for p in other.iterdir() if p.is_dir()):
        a, b = (np.asarray(nib.load(d / case_dir.name / "sct.nii.gz").dataobj, dtype=np.float64) for d in (first, other))
        mask = np.asarray(nib.load(references / case_dir.name / "mask.nii.gz").dataobj) > 0
        values.append(np.abs(b - a)[mask])
    values = np.concatenate(values)
    return {"mean": float(values.mean()), "p99": float(np.percentile(values, 99)), "max": float(values.max())}


def _run(text: str) -> tuple[str, int]:
    precision, _, seed = text.partition("@")
    if precision not in PRECISIONS or not (seed or "0").isdigit():
        raise argparse.ArgumentTypeError(f"{text!r}: a run is PRECISION or PRECISION@SEED, PRECISION one of "
                                         f"{', '.join(PRECISIONS)}")
    return precision, int(seed or 0)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle_root", type=Path, default=Path("bundles/drdd_mr2ct"))
    parser.add_argument("--config_file", type=Path,
                        help="the bundle's inference config (default BUNDLE_ROOT/configs/inference.json)")
    parser.add_argument("--references", type=Path,
                        help="folder of the reference cases (default BUNDLE_ROOT/data/demo/Task1/brain)")
    parser.add_argument("--runs", default=RUNS, help=f"comma-separated PRECISION[@SEED] (default {RUNS})")
    parser.add_argument("--output", type=Path, required=True, help="JSON results file")
    parser.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    args = parser.parse_args(argv)
    try:
        runs = [_run(text) for text in args.runs.split(",")]
    except argparse.ArgumentTypeError as error:
        parser.error(f"--runs: {error}")
    if args.output.exists() and not args.overwrite:
        parser.error(f"{args.output} exists; pass --overwrite to replace it")
    config_file = args.config_file or args.bundle_root / "configs" / "inference.json"
    if not config_file.is_file():
        parser.error(f"{config_file} is missing: pass the bundle's inference config as --config_file")
    references = args.references or args.bundle_root / "data" / "demo" / "Task1" / "brain"
    if not (args.bundle_root / "models" / "model.pt").is_file():
        parser.error(f"{args.bundle_root / 'models' / 'model.pt'} is missing: train the bundle first")

    measured = git_state(ROOT)
    rows = []
    with tempfile.TemporaryDirectory(prefix="drdd-precision-") as tmp:
        first = None
        for precision, seed in runs:
            name = f"{precision}@{seed}"
            output = Path(tmp) / name
            translate(config_file, args.bundle_root, precision, seed, output)
            summary = evaluate_folders(output, references, out_dir=Path(tmp) / f"scores-{name}",
                                       metrics=METRICS, figures=False, progress=False)
            row = {"precision": precision, "seed": seed, "cases": summary["metrics"]["mae"]["count"],
                   "metrics": summary["metrics"]}
            if first is None:
                first = (name, output)
            else:
                row[f"hu_difference_to_{first[0]}"] = difference(first[1], output, references)
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "metrics"}
                             | {"mae": row["metrics"]["mae"]["mean"], "psnr": row["metrics"]["psnr"]["mean"],
                                "ssim": row["metrics"]["ssim"]["mean"]}), flush=True)
    result = {"what": "the bundle's inference in each precision, same weights, seed and cases",
              "bundle_root": str(args.bundle_root), "cpu_bf16_native": cpu_bf16_native(), "rows": rows,
              "machine": environment(torch.device("cpu"))}
    write_results(args.output, result, "translation_precision.py", argv, measured, overwrite=args.overwrite)
    return 0


if __name__ == "__main__":
    sys.exit(main())
