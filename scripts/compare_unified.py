"""Task-specific vs unified DRDD at equal training compute: one CT prior shared by every task that ends in CT.

For each task (``mr2ct``, ``ldct``, ``cbct2ct``, on their bundles' built-in demo data), two DRDD models
sampled the method's way (2 residual + 2 noise steps, start scale 1, residual stage at σ_{T−1}; the
CT-correction bundles' ``configs/two_stage.json``):

- **task-specific**: both networks trained on the task for ``--budget-seconds`` (the trainer steps
  each network once per iteration, so each has about half of it);
- **unified**: the residual network trained on the task for half the budget, with the noise network
  of one CT prior (``configs/ct_prior.json`` + ``configs/shared_ct_prior.json``), trained first on the
  pooled training CT of all the tasks for ``tasks × budget / 2`` seconds: the noise-stage time of the
  task-specific models together. Both columns spend the same training time in all.

Every row is ``compare_methods.py``'s (same split, held-out cases, metrics and results format), appended
to ``--output``; ``--prior-output`` records the prior (its budget, iterations, pooled CT per bundle,
the digest of its noise network, which every unified row's model carries)::

    python scripts/compare_unified.py --budget-seconds 300 --num-validation 4 --seed 0 \\
        --network-preset cpu-demo --output docs/results/unified_ct_prior.jsonl \\
        --prior-output docs/results/unified_ct_prior.json
    python scripts/results_table.py docs/results/unified_ct_prior.jsonl
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from monai.bundle import ConfigParser

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compare_methods  # the comparison this script runs twice per task

from drdd_med.errors import OutputExistsError
from drdd_med.handlers import TrainingBudget
from drdd_med.prior import weights_digest
from drdd_med.provenance import git_state, write_results

ROOT = compare_methods.ROOT
TASKS = ("mr2ct", "ldct", "cbct2ct")
PRIOR_FRAGMENT = ROOT / "configs" / "ct_prior.json"
SHARED_FRAGMENT = ROOT / "configs" / "shared_ct_prior.json"
PRIOR_BASE = ROOT / "bundles" / "drdd_mr2ct" / "configs" / "train.json"  # any CT bundle: the pool transforms


def two_stage(task: str) -> list[Path]:
    """The fragments that make a task's bundle train and sample DRDD's two stages (drdd_mr2ct does by default)."""
    bundle = ROOT / "bundles" / compare_methods.TASKS[task]["bundle"]
    fragment = bundle / "configs" / "two_stage.json"
    return [fragment] if fragment.is_file() else []


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget-seconds", type=float, required=True, help="training time of each task-specific model")
    parser.add_argument("--task", dest="tasks", action="append", choices=TASKS, help="repeatable (default: all three)")
    parser.add_argument("--num-validation", type=int, default=4, help="held-out cases per task")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--network-preset", help="network size (default: the device profile's)")
    parser.add_argument("--output", type=Path, required=True, help="rows (JSON lines), e.g. docs/results/unified_ct_prior.jsonl")
    parser.add_argument("--prior-output", type=Path, required=True, help="the prior's record (JSON)")
    parser.add_argument("--work-dir", type=Path, help="keep models and outputs here (default: a temporary folder)")
    parser.add_argument("--replace", action="store_true", help="replace rows and the prior record already written")
    args = parser.parse_args(argv)
    args.tasks = args.tasks or list(TASKS)
    if not args.budget_seconds > 0:
        parser.error("--budget-seconds must be positive")
    return args


def comparisons(args: argparse.Namespace, prior_checkpoint: Path) -> list[tuple[str, argparse.Namespace]]:
    """``compare_methods`` arguments of each row pair: (name, args) for task-specific and unified, per task."""
    runs = []
    for task in args.tasks:
        common = ["--task", task, "--method", "drdd", "--num-validation", str(args.num_validation),
                  "--seed", str(args.seed), "--output", str(args.output),
                  *[arg for fragment in two_stage(task) for arg in ("--config", str(fragment))]]
        common += ["--network-preset", args.network_preset] if args.network_preset else []
        common += ["--replace"] if args.replace else []
        runs.append((f"{task}/specific", compare_methods.parse_args([*common, "--budget-seconds", str(args.budget_seconds)])))
        runs.append((f"{task}/unified", compare_methods.parse_args([
            *common, "--budget-seconds", str(args.budget_seconds / 2), "--config", str(SHARED_FRAGMENT),
            "--set", f'noise_prior="{prior_checkpoint}"'])))
    return runs


def train_prior(args: argparse.Namespace, work_dir: Path) -> dict:
    """Train the CT prior on the tasks' pooled training CT (their demo data, their split) until its budget."""
    budget_seconds = len(args.tasks) * args.budget_seconds / 2
    sources = [{"config_file": str(ROOT / "bundles" / compare_methods.TASKS[task]["bundle"] / "configs" / "train.json"),
                "bundle_root": str(work_dir / "sources" / task), "num_validation": args.num_validation, "seed": args.seed}
               for task in args.tasks]
    parser = ConfigParser()
    parser.read_config([str(PRIOR_BASE), str(PRIOR_FRAGMENT)])
    parser.update({"bundle_root": str(work_dir), "ckpt_dir": str(work_dir / "models"), "output_dir": str(work_dir / "runs"),
                   "prior_sources": sources, "seed": args.seed, "max_epochs": compare_methods.NEVER,
                   "max_training_minutes": None})
    if args.network_preset:
        parser.update({"network_preset": args.network_preset})
    parser.get_parsed_content("initialize")
    trainer = parser.get_parsed_content("train#trainer")
    budget = TrainingBudget(budget_seconds)
    budget.attach(trainer)
    logging.getLogger("compare_unified").info("training the CT prior for %.0f s", budget_seconds)
    trainer.run()
    pool = parser.get_parsed_content("datalists")["pool"]
    ema = parser.get_parsed_content("network_ema")
    return {
        "budget_seconds": budget_seconds,
        "train_seconds": round(budget.elapsed, 3),
        "iterations": budget.iterations,
        "pool_ct": {task: sum(item["case_id"].startswith(f"{task}/") for item in pool) for task in args.tasks},
        "noise_weights_sha256": weights_digest(ema.noise),
        "checkpoint": work_dir / "models" / "checkpoint_final.pt",
    }


def run(args: argparse.Namespace, work_dir: Path, command: str, argv: list[str]) -> None:
    measured = git_state(ROOT)
    if args.prior_output.exists() and not args.replace:
        raise OutputExistsError(f"{args.prior_output.name} exists; pass --replace to replace it and the rows")
    planned = comparisons(args, work_dir / "ct_prior" / "models" / "checkpoint_final.pt")
    for _, compare in planned:  # refuse duplicate rows before anything trains
        compare_methods.check_overrides(compare)
        compare_methods.check_duplicates(args.output, compare_methods.planned_rows(compare), args.replace)
    prior = train_prior(args, work_dir / "ct_prior")
    rows = {}
    for name, compare in planned:
        written = compare_methods.run(compare, work_dir / name, command)
        rows[name] = {key: written[0][key] for key in ("mae_hu", "psnr_db", "ssim", "iterations", "trained_iterations")}
    prior["checkpoint"] = prior["checkpoint"].name
    write_results(args.prior_output, {"prior": prior, "rows": str(args.output), "summary": rows},
                  "compare_unified.py", argv, measured, overwrite=args.replace)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    return compare_methods.main(argv, script="compare_unified.py", parse=parse_args,
                                runner=lambda args, work_dir, command: run(args, work_dir, command, argv))


if __name__ == "__main__":
    sys.exit(main())
