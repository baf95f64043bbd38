"""Seconds per training iteration of a bundle's training command at several commits, side by side.

For each ``--commit`` the committed tree is exported (``git archive``) to a temporary folder and the
bundle's training command runs there exactly as its README gives it (``python -m monai.bundle run
training --config_file bundles/<bundle>/configs/train.json``), on the built-in demo data, with a
temporary ``--bundle_root``, ``--max_epochs EPOCHS`` and no validation (``--val_interval`` above
``EPOCHS``): training alone is timed. ``--override KEY=VALUE`` adds ``--KEY VALUE`` to every run. Ignite logs each epoch's time; the script takes the median over
epochs 2.. (the first includes warm-up), the iterations per epoch from the loss log's ``Iter: i/N``,
and gives seconds per iteration and each commit's ratio to the first. With ``--rounds R`` the commits
run in turn R times (A B A B ...), so a drift of the machine's speed touches both. ``--variant
KEY=VALUE`` also times every commit with that one entry changed (e.g. ``network_preset=cpu-lite``),
in the same turns. Examples (the figures of docs/results/training_speed_mr2ct.json and
docs/results/training_speed_cpu_lite.json)::

    python scripts/training_speed.py --commit 5612db2 --commit HEAD --epochs 12 \\
        --output docs/results/training_speed_mr2ct.json
    python scripts/training_speed.py --commit HEAD --variant network_preset=cpu-lite --epochs 6 --rounds 3 \\
        --output docs/results/training_speed_cpu_lite.json
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import torch

from drdd_med.benchmark import environment
from drdd_med.provenance import git_state, write_results

ROOT = Path(__file__).resolve().parents[1]
EPOCH_TIME = re.compile(r"Epoch\[(\d+)\] Complete\. Time taken: (\d+):(\d+):(\d+(?:\.\d+)?)")
ITERATIONS = re.compile(r"Iter: \d+/(\d+)")


def export(commit: str, folder: Path) -> str:
    """The tree of ``commit`` written to ``folder``; returns the full commit id."""
    full = subprocess.run(["git", "rev-parse", "--verify", f"{commit}^{{commit}}"], cwd=ROOT, capture_output=True,
                          text=True, check=True).stdout.strip()
    archive = folder.with_suffix(".tar")
    subprocess.run(["git", "archive", "--output", str(archive), full], cwd=ROOT, check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(folder, filter="data")
    archive.unlink()
    return full


def time_training(tree: Path, bundle: str, epochs: int, bundle_root: Path, overrides: list[str]) -> dict:
    """Run the training command in ``tree`` (its own ``drdd_med`` is imported: it is the working folder)."""
    command = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file",
               f"bundles/{bundle}/configs/train.json", "--bundle_root", str(bundle_root),
               "--max_epochs", str(epochs), "--val_interval", str(epochs + 1), *overrides]
    done = subprocess.run(command, cwd=tree, capture_output=True, text=True, check=False)
    log = done.stdout + done.stderr
    if done.returncode != 0:
        raise RuntimeError(f"training failed (exit {done.returncode}):\n{log[-3000:]}")
    seconds = {int(e): int(h) * 3600 + int(m) * 60 + float(s) for e, h, m, s in EPOCH_TIME.findall(log)}
    lengths = set(ITERATIONS.findall(log))
    if len(seconds) != epochs or len(lengths) != 1:
        raise RuntimeError(f"could not read {epochs} epoch times and one epoch length from the log:\n{log[-3000:]}")
    per_epoch = statistics.median(seconds[e] for e in range(2, epochs + 1))
    iterations = int(lengths.pop())
    return {"epoch_seconds": [seconds[e] for e in sorted(seconds)], "median_epoch_seconds": per_epoch,
            "iterations_per_epoch": iterations, "seconds_per_iteration": per_epoch / iterations}


def _flags(items: list[str]) -> list[str]:
    """``KEY=VALUE`` entries as the bundle command's ``--KEY VALUE`` arguments."""
    return [part for item in items for part in (f"--{item.split('=', 1)[0]}", item.split("=", 1)[1])]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--commit", action="append", required=True, help="a commit to time (repeat; the first is the base)")
    parser.add_argument("--bundle", default="drdd_mr2ct")
    parser.add_argument("--epochs", type=int, default=12, help="epochs per run, at least 4 (default 12)")
    parser.add_argument("--rounds", type=int, default=1, help="runs of each commit, in turn (default 1)")
    parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                        help="a bundle config entry for every run (repeat)")
    parser.add_argument("--variant", action="append", default=[], metavar="KEY=VALUE",
                        help="also time each commit with this bundle config entry (repeat: one run each)")
    parser.add_argument("--output", type=Path, required=True, help="JSON results file")
    parser.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    args = parser.parse_args(argv)
    if any("=" not in item for item in args.override + args.variant):
        parser.error("--override and --variant take KEY=VALUE")
    overrides = _flags(args.override)
    if args.epochs < 4 or args.rounds < 1:
        parser.error("--epochs must be at least 4 (the loss log gives the epoch length every 20 iterations) "
                     "and --rounds at least 1")
    if args.output.exists() and not args.overwrite:
        parser.error(f"{args.output} exists; pass --overwrite to replace it")

    measured = git_state(ROOT)
    with tempfile.TemporaryDirectory(prefix="drdd-training-speed-") as tmp:
        trees = {}
        for commit in args.commit:
            try:
                trees[commit] = (export(commit, Path(tmp) / f"tree-{len(trees)}"), Path(tmp) / f"tree-{len(trees)}")
            except subprocess.CalledProcessError:
                parser.error(f"--commit {commit}: not a commit of this repository")
        runs = {(commit, variant): [] for commit in args.commit for variant in [None, *args.variant]}
        for round_ in range(args.rounds):
            for index, (commit, variant) in enumerate(runs):
                run = time_training(trees[commit][1], args.bundle, args.epochs, Path(tmp) / f"root-{index}-{round_}",
                                    overrides + _flags([variant] if variant else []))
                runs[commit, variant].append(run)
                print(json.dumps({"commit": commit, "variant": variant, "round": round_,
                                  "seconds_per_iteration": round(run["seconds_per_iteration"], 4)}), flush=True)
    rows = []
    for (commit, variant), timed in runs.items():
        per_iteration = statistics.median(r["seconds_per_iteration"] for r in timed)
        rows.append({"commit": commit, **({"variant": variant} if variant else {}), "git_commit": trees[commit][0],
                     "runs": timed, "seconds_per_iteration": per_iteration})
    for row in rows:
        row["ratio_to_first"] = rows[0]["seconds_per_iteration"] / row["seconds_per_iteration"]
    result = {"what": f"seconds per training iteration of {args.bundle}'s training command, no validation",
              "bundle": args.bundle, "epochs": args.epochs, "rounds": args.rounds, "overrides": args.override,
              "rows": rows,
              "machine": environment(torch.device("cpu"))}
    write_results(args.output, result, "training_speed.py", argv, measured, overwrite=args.overwrite)
    return 0


if __name__ == "__main__":
    sys.exit(main())
