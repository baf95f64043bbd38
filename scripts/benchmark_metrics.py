"""Time ``drdd-med evaluate`` on a folder of synthetic cases; print the result and save it as JSON.

Writes N synthetic CT / MR / body-mask volumes in the SynthRAD layout plus predictions
(``<case>_sct``) to a temporary folder (not timed), then times ``evaluate_folders`` with the default
metrics (MAE, PSNR, SSIM, MS-SSIM, tissue MAE), per-case figures and the summary figure. The
files were just written, so they are read from the page cache: the time is compute plus
decompression, not disk. CPU seconds and the load average are recorded too, because on a shared
machine the wall time depends on what else runs.

    python scripts/benchmark_metrics.py --cases 20 --shape 256 256 150 --json benchmark_metrics.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import scipy
import skimage

from drdd_med.data.files import atomic_output
from drdd_med.data.writers import write_volume
from drdd_med.evaluation import DEFAULT_METRICS, evaluate_folders


def synthetic_case(seed: int, shape: tuple[int, int, int]) -> dict[str, np.ndarray]:
    """A body-like CT in HU (air, soft tissue, fat, bone ring), its mask, an MR-like source, a prediction."""
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, n, dtype=np.float32) for n in shape], indexing="ij", sparse=True)
    semi_x, semi_y = 0.8 + 0.1 * rng.random(), 0.6 + 0.1 * rng.random()
    radius = np.sqrt((x / semi_x) ** 2 + (y / semi_y) ** 2) * (1 + 0.1 * z**2)
    ct = np.full(shape, -1000.0, dtype=np.float32)
    ct[radius < 1.0] = 40.0
    ct[(radius > 0.85) & (radius < 1.0)] = -90.0  # subcutaneous fat
    ct[(radius > 0.55) & (radius < 0.62)] = 900.0  # bone ring
    ct[np.sqrt((x - 0.2) ** 2 + (y + 0.1) ** 2 + z**2) < 0.15] = -800.0  # an air pocket
    ct += rng.normal(0, 12, shape).astype(np.float32)
    mask = radius < 1.05
    mr = np.where(mask, 300 + 0.2 * np.abs(ct + 200), 0).astype(np.float32)
    prediction = ct + rng.normal(0, 60, shape).astype(np.float32) + 20 * np.sin(6 * x) * np.cos(4 * y)
    return {"ct": ct, "mask": mask, "mr": mr, "sct": prediction}


def write_dataset(root: Path, cases: int, shape: tuple[int, int, int], extension: str) -> tuple[Path, Path]:
    affine = np.diag([1.0, 1.0, 2.5, 1.0])
    ref_dir, pred_dir = root / "Task1" / "pelvis", root / "predictions"
    for index in range(cases):
        case = f"1PA{index + 1:03d}"
        volumes = synthetic_case(index, shape)
        write_volume(volumes["ct"], affine, ref_dir / case / f"ct{extension}")
        write_volume(volumes["mask"], affine, ref_dir / case / f"mask{extension}", dtype=np.uint8)
        write_volume(volumes["mr"], affine, ref_dir / case / f"mr{extension}")
        write_volume(volumes["sct"], affine, pred_dir / f"{case}_sct{extension}")
    return pred_dir, ref_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=20)
    parser.add_argument("--shape", type=int, nargs=3, default=[256, 256, 150], metavar=("X", "Y", "Z"))
    parser.add_argument("--format", choices=[".nii.gz", ".mha"], default=".nii.gz")
    parser.add_argument("--workers", type=int, help="cases in parallel (default: evaluate_folders' default)")
    parser.add_argument("--no-figures", action="store_true")
    parser.add_argument("--repeats", type=int, default=1, help="time the evaluation N times, report the median")
    parser.add_argument("--json", type=Path, default=Path("benchmark_metrics.json"), help="where to save the result")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing result file")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="drdd_benchmark_") as tmp:
        root = Path(tmp)
        started = time.perf_counter()
        pred_dir, ref_dir = write_dataset(root, args.cases, tuple(args.shape), args.format)
        generation_seconds = time.perf_counter() - started

        timings = []
        for repeat in range(args.repeats):
            started, cpu_started = time.perf_counter(), time.process_time()
            summary = evaluate_folders(
                pred_dir, ref_dir, out_dir=root / f"evaluation_{repeat}", figures=not args.no_figures,
                workers=args.workers, progress=False,
            )
            timings.append((time.perf_counter() - started, time.process_time() - cpu_started, os.getloadavg()[0]))
    seconds, cpu_seconds, load_average = sorted(timings)[len(timings) // 2]  # the median run

    result = {
        "benchmark": "drdd_med.evaluation.evaluate_folders",
        "cases": args.cases,
        "evaluated": summary["counts"]["evaluated"],
        "shape": args.shape,
        "format": args.format,
        "metrics": list(DEFAULT_METRICS),
        "figures": not args.no_figures,
        "workers": args.workers or "default (up to 2)",
        "seconds": round(seconds, 2),
        "seconds_all_repeats": [round(t[0], 2) for t in timings],
        "seconds_per_case": round(seconds / args.cases, 3),
        "cpu_seconds": round(cpu_seconds, 1),  # all threads of this process
        "load_average_1min_after": round(load_average, 2),  # > cpu_count: other work shared the CPU
        "generation_seconds": round(generation_seconds, 1),
        "mean_mae_hu": round(summary["metrics"]["mae"]["mean"], 3),
        "mean_ms_ssim": round(summary["metrics"]["ms_ssim"]["mean"], 5),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "scikit_image": skimage.__version__,
    }
    text = json.dumps(result, indent=2)
    print(text)
    with atomic_output(args.json, overwrite=args.overwrite) as tmp_json:
        tmp_json.write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
