"""Series per minute of ``drdd-med convert`` on this machine, with the translation settings before and after
the CPU tuning of the profiles (``drdd_med.profiles``).

For each series shape a phantom MR DICOM series is written (the demo head, ``write_demo_mr_series``),
and converted folder to folder by ``BatchConverter`` — reading, translating with the bundle's
inference config, writing the derived CT series, delivering and counting it — with ``cpu-demo``
networks whose every layer is seeded (an untrained MONAI diffusion U-Net outputs zeros: never time
on those). Settings:

- ``before``: what the CPU profile did before the tuning: 16 slices per network call whatever their
  size, contiguous weights, fp32;
- ``tuned_fp32``: at most 65,536 pixels per call (one 256² or 512² slice), 2D weights channels-last
  (``load_model(channels_last=True)``), fp32;
- ``tuned``: the CPU profile now: the same in its ``inference_precision``, bf16 autocast where the CPU
  computes bf16 natively (``engines.autocast_context``; elsewhere it equals ``tuned_fp32``), with the
  weights' layout of ``profiles.translation_channels_last`` (contiguous in native bf16);
- ``tuned_lite``: ``tuned`` with ``cpu-lite`` networks (``--lite-preset``) instead of ``--preset``'s: a
  model trained with the smaller preset. Its output is another network's, so it gets no difference to
  ``before``; its quality is what ``scripts/compare_methods.py --network-preset`` measures;
- a setting with ``+cl`` appended (``tuned+cl``, ``tuned_lite+cl``): the same with channels-last weights
  whatever the precision (what the profile did before ``translation_channels_last``).

Each setting writes its own destination; the script records the seconds, series per minute, seconds
per slice, and how far each output lies from the ``before`` output (HU, over every voxel), and
appends the machine, command and commit. Example (the figures in the README)::

    python scripts/benchmark_conversion.py --shape 256x256x150 --shape 512x512x120 \\
        --output docs/results/conversion_cpu.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import pydicom
import torch

from drdd_med.benchmark import build_networks, environment
from drdd_med.bundle import BundleTranslator
from drdd_med.pacs.convert import BatchConverter
from drdd_med.pacs.demo import write_demo_mr_series
from drdd_med.pacs.endpoints import FolderDestination, FolderSource
from drdd_med.provenance import git_state, write_results

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = ("before", "tuned_fp32", "tuned", "tuned_lite")
CHANNELS_LAST = "+cl"  # a setting with this suffix stores its weights channels-last


def _shape(text: str) -> tuple[int, int, int]:
    try:
        shape = tuple(int(v) for v in text.lower().split("x"))
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: a series shape is ROWSxCOLUMNSxSLICES, e.g. 512x512x120")
    return shape


def _model(path: Path, preset: str) -> Path:
    model = build_networks(preset, "2d")  # the benchmark's networks: every layer seeded
    model.trained_iterations.update(residual=1, noise=1)
    torch.save(model.state_dict(), path)
    return path


def _translator(bundle: str, ckpt: Path, setting: str) -> BundleTranslator:
    translator = BundleTranslator(bundle, device="cpu", ckpt=ckpt)
    base = setting.removesuffix(CHANNELS_LAST)
    if base == "before":
        translator.inferer.slice_batch_size, translator.inferer.max_batch_pixels = 16, None
        translator.network.to(memory_format=torch.contiguous_format)
    if base == "tuned_fp32" or setting.endswith(CHANNELS_LAST):
        translator.network.to(memory_format=torch.channels_last)
    if base not in ("tuned", "tuned_lite"):
        translator.precision = "fp32"
    return translator


def _values(folder: Path) -> dict[str, np.ndarray]:
    datasets = (pydicom.dcmread(file) for file in sorted(folder.rglob("*.dcm")))
    return {str(ds.SOPInstanceUID): ds.pixel_array.astype(np.int32) for ds in datasets}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", type=_shape, action="append", required=True, metavar="RxCxS",
                        help="series shape, rows x columns x slices (repeat)")
    parser.add_argument("--settings", default=",".join(SETTINGS),
                        help=f"comma-separated, of {', '.join(SETTINGS)}, each optionally with {CHANNELS_LAST}")
    parser.add_argument("--bundle", default="drdd_mr2ct")
    parser.add_argument("--preset", default="cpu-demo", help="network preset of the seeded model")
    parser.add_argument("--lite-preset", default="cpu-lite", help="network preset of the tuned_lite setting")
    parser.add_argument("--output", type=Path, required=True, help="JSON results file")
    parser.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    args = parser.parse_args(argv)
    settings = args.settings.split(",")
    if not {setting.removesuffix(CHANNELS_LAST) for setting in settings} <= set(SETTINGS):
        parser.error(f"--settings: choose from {', '.join(SETTINGS)}, each optionally with {CHANNELS_LAST}")
    if args.output.exists() and not args.overwrite:
        parser.error(f"{args.output} exists; pass --overwrite to replace it")

    torch.manual_seed(0)
    measured = git_state(ROOT)  # the code as the run starts: what is imported and timed
    rows = []
    with tempfile.TemporaryDirectory(prefix="drdd-bench-convert-") as tmp:
        work = Path(tmp)
        presets = {setting: args.lite_preset if setting.startswith("tuned_lite") else args.preset for setting in settings}
        ckpts = {preset: _model(work / f"model-{preset}.pt", preset) for preset in set(presets.values())}
        for shape in args.shape:
            name = "x".join(map(str, shape))
            source = work / f"series-{name}"
            write_demo_mr_series(source, 1, shape, (240.0 / shape[0], 240.0 / shape[1], 1.5))
            outputs = {}
            for setting in settings:
                destination = work / f"out-{name}-{setting}"
                translator = _translator(args.bundle, ckpts[presets[setting]], setting)
                report = BatchConverter(FolderSource(source), FolderDestination(destination), translator,
                                        work / f"{name}-{setting}.sqlite", progress=False).run()
                if report.counts["converted"] != 1:
                    print(f"error: the {name} series was not converted: {report.series[0].reason}", file=sys.stderr)
                    return 1
                seconds = report.series[0].duration_s
                outputs[setting] = _values(destination)
                row = {"shape": list(shape), "setting": setting, "preset": presets[setting], "series_seconds": seconds,
                       "seconds_per_slice": round(seconds / shape[2], 3),
                       "series_per_minute": round(60.0 / seconds, 3)}
                if setting != settings[0] and presets[setting] == presets[settings[0]]:
                    first = outputs[settings[0]]
                    difference = np.concatenate([np.abs(outputs[setting][uid] - first[uid]).ravel() for uid in first])
                    row[f"hu_difference_to_{settings[0]}"] = {"mean": float(difference.mean()),
                                                                "max": int(difference.max())}
                rows.append(row)
                print(json.dumps(row), flush=True)
    result = {"what": "drdd-med convert, folder to folder, one series", "bundle": args.bundle,
              "preset": args.preset, "rows": rows, "machine": environment(torch.device("cpu"))}
    write_results(args.output, result, "benchmark_conversion.py", argv, measured, overwrite=args.overwrite)
    return 0


if __name__ == "__main__":
    sys.exit(main())
