"""Time the low-dose CT simulator on a synthetic 512 x 512 x 100 body phantom.

The phantom is a water-equivalent elliptical body (380 x 280 mm) with a fat layer, two lungs, a
spine and ribs, on a 0.977 mm grid (500 mm field of view), so the projections see realistic
attenuation. Prints and saves a JSON record: seconds, slices per second, device, torch threads.

    python scripts/benchmark_ldct.py [--slices 100] [--size 512] [--dose 0.25] [--device cpu] [--threads N]
        [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from drdd_med.ldct import FanBeamGeometry, simulate_low_dose


def body_phantom(size: int, n_slices: int, pixel_mm: float) -> np.ndarray:
    """An axial body section in HU, ``(size, size, n_slices)``, with a little slice-to-slice variation."""
    axis = (np.arange(size) - (size - 1) / 2) * pixel_mm
    x, y = np.meshgrid(axis, axis, indexing="ij")

    def ellipse(cx, cy, rx, ry):
        return ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 <= 1

    section = np.full((size, size), -1000.0, dtype=np.float32)
    section[ellipse(0, 0, 190, 140)] = -100  # fat
    section[ellipse(0, 0, 178, 128)] = 40  # soft tissue
    section[ellipse(-70, -10, 55, 75) | ellipse(70, -10, 55, 75)] = -850  # lungs
    section[ellipse(0, 95, 18, 18)] = 700  # vertebral body
    for side in (-1, 1):
        section[ellipse(side * 150, 20, 10, 30)] = 900  # ribs
    rng = np.random.default_rng(0)
    volume = np.repeat(section[:, :, None], n_slices, axis=2)
    return volume + rng.normal(0, 10, volume.shape).astype(np.float32)  # full-dose-like texture


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slices", type=int, default=100)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--pixel-mm", type=float, default=500 / 512)
    parser.add_argument("--dose", type=float, default=0.25)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--json", type=Path, default=Path("benchmark_ldct.json"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    volume = torch.from_numpy(body_phantom(args.size, args.slices, args.pixel_mm)).to(args.device)
    geometry = FanBeamGeometry()
    start = time.perf_counter()
    simulate_low_dose(volume, (args.pixel_mm, args.pixel_mm), args.dose, seed=0, geometry=geometry)
    if volume.is_cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    record = {
        "shape": list(volume.shape),
        "pixel_mm": args.pixel_mm,
        "dose_fraction": args.dose,
        "geometry": {"n_views": geometry.n_views, "n_channels": geometry.n_channels},
        "seconds": round(seconds, 2),
        "slices_per_s": round(args.slices / seconds, 2),
        "device": torch.cuda.get_device_name(volume.device) if volume.is_cuda else platform.processor() or "cpu",
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    print(json.dumps(record, indent=2))
    args.json.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
