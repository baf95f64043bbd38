"""``drdd-med benchmark``: training and conversion speed of the DRDD networks on this machine."""

from __future__ import annotations

import argparse
import contextlib
import json
from pathlib import Path

from drdd_med.benchmark import DIMS, PRECISIONS, format_table, run_benchmark
from drdd_med.data.files import atomic_output
from drdd_med.networks import PRESETS
from drdd_med.profiles import PROFILES

CPU_PRESET = PROFILES["cpu"]["network_preset"]

DESCRIPTION = """\
Measure, per configuration (network preset, 2d / 2.5d / 3d, precision, torch.compile, channels-last,
batch size):
training items/s for both stages and each alone, sampling items/s with the default 2 + 2 sampler,
seconds per whole volume (256x256x150 on a CPU; 256x256x300 and 512x512x300 on a GPU; a 3D volume
by sliding window), FLOPs per item, the FLOP/s achieved and their fraction of a dense matmul rate
measured in the same run, and peak memory. Prints a table; --output writes everything as JSON.

Timings depend on what else runs on the machine: compare configurations measured side by side in
one run, not absolute seconds across runs. --quick is a smoke run of about a minute on 2 CPU cores
(small networks and sizes; the JSON says so). On a GPU the sampling is also replayed from one CUDA
graph. A configuration that fails (e.g. out of memory) is recorded with its error, the others still
run, and the exit status is 1."""

SWITCHES = {"off": False, "on": True}


def _names(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def _switches(text: str) -> list[bool]:
    names = _names(text)
    if not names or any(name not in SWITCHES for name in names):
        raise argparse.ArgumentTypeError(f"expected off, on or off,on; got {text!r}")
    return [SWITCHES[name] for name in names]


def _positive_ints(text: str) -> list[int]:
    try:
        values = [int(name) for name in _names(text)]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers such as 8 or 8,16; got {text!r}")
    return values


def _positive_minutes(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number of minutes such as 8 or 2.5; got {text!r}")
    return value


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "benchmark",
        help="measure training and conversion speed, FLOP/s and memory of the DRDD networks",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="a smoke run of about a minute on a 2-core CPU")
    parser.add_argument("--device", default="auto", help="auto (a GPU when there is one), cpu, cuda or cuda:N")
    parser.add_argument("--presets", type=_names, metavar="NAME[,NAME]",
                        help=f"network presets, of {', '.join(PRESETS)} (default: {CPU_PRESET} on a CPU, "
                        f"gpu,reference on a GPU, tiny,{CPU_PRESET} with --quick)")
    parser.add_argument("--dims", type=_names, default=list(DIMS), metavar="D[,D]",
                        help=f"geometries, of {', '.join(DIMS)} (default: all)")
    parser.add_argument("--precision", type=_names, metavar="P[,P]",
                        help=f"of {', '.join(PRECISIONS)} (default: both where the device has bf16, "
                        "fp32 with --quick)")
    parser.add_argument("--compile", type=_switches, default=[False], metavar="off|on|off,on",
                        help="torch.compile the networks (default: off)")
    parser.add_argument("--channels-last", type=_switches, default=[False], metavar="off|on|off,on",
                        help="weights and inputs channels-last, as the CPU profile translates (default: off)")
    parser.add_argument("--batch-size", type=_positive_ints, metavar="N[,N]",
                        help="items per batch (default: 8 slices / 1 patch on a CPU, 32 / 4 on a GPU, "
                        "2 / 1 with --quick)")
    parser.add_argument("--threads", type=int, metavar="N", help="torch CPU threads (default: torch's; 1 with --quick)")
    parser.add_argument("--max-minutes", type=_positive_minutes, metavar="M",
                        help="start no further configuration after M minutes; the JSON lists those not run "
                        "(default: run all)")
    parser.add_argument("--output", type=Path, metavar="FILE", help="write the results as JSON")
    parser.add_argument("--overwrite", action="store_true", help="replace FILE if it exists")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # opened first: an existing FILE is refused before minutes of measuring, and written atomically after
    with atomic_output(args.output, args.overwrite) if args.output else contextlib.nullcontext() as partial:
        report = run_benchmark(
            device=args.device, presets=args.presets, dims=args.dims, precisions=args.precision,
            compile_modes=args.compile, batch_sizes=args.batch_size, threads=args.threads, quick=args.quick,
            memory_formats=args.channels_last, max_minutes=args.max_minutes,
        )
        print(format_table(report))
        if partial:
            partial.write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
    return 1 if any("error" in result for result in report["results"]) else 0
