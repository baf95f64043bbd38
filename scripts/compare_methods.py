"""Train each method for the same wall-clock budget through a bundle's configs and score the held-out cases.

Every method trains through the bundle's own ``train.json`` (the baselines with their fragment
layered on it, as a user would: ``configs/conditional_ddim.json`` for the conditional DDIM,
``configs/regression_unet.json`` for the regression U-Net), on one split (``--num-validation``
cases held out with ``--seed``), with validation off, until its training steps have taken
``--budget-seconds`` (``TrainingBudget``). The bundle's ``inference.json`` then translates the
held-out cases from the final EMA weights, once per DRDD sampler variant (``--sampler``), and the
project's metric functions score the written outputs inside the body mask: ``--task mr2ct`` the
SynthRAD2023 MAE (HU), PSNR and SSIM; ``--task ldct`` (the drdd_ldct bundle) the MAE in HU and the
PSNR, SSIM and RMSE in the abdomen window, as the low-dose CT literature reports them; ``--task
cbct2ct`` (the drdd_cbct2ct bundle) the SynthRAD2023 metrics. Where the source is itself a CT
(ldct, cbct2ct), ``--method input`` scores the held-out input as it is (the low-dose scan, the
CBCT): no training, so its row's budget is 0.

Each method and sampler appends one JSON object per line to ``--output``, as soon as it is scored
(each append replaces the file atomically). A row whose method, config, paired fraction and budget
are already in the file is refused before anything trains, unless ``--replace`` (which replaces it).

Example, the 25 prepared IBSI pairs, 7 minutes per method::

    python scripts/compare_methods.py --dataset-dir /work/ibsi_prepared/registered --dataset-name ibsi \\
        --budget-seconds 420 --num-validation 5 --seed 0 --network-preset cpu-demo \\
        --method drdd --method regression --sampler default --sampler residual_only \\
        --output docs/results/mr2ct_ibsi.jsonl

Without ``--dataset-dir`` each method trains on the bundle's built-in demo data (the files of
``docs/results/mr2ct_demo.jsonl`` and ``ldct_demo.jsonl``; their commands are in each row). CBCT ->
CT on its demo data, DRDD and the regression U-Net at 300 s each, and the CBCT input::

    python scripts/compare_methods.py --task cbct2ct --budget-seconds 300 --num-validation 4 --seed 0 \\
        --network-preset cpu-demo --method drdd --method regression --method input \\
        --output docs/results/cbct2ct_demo.jsonl
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import shlex
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from monai.bundle import ConfigParser

from drdd_med.benchmark import environment
from drdd_med.data.files import atomic_output
from drdd_med.errors import DRDDInputError, OutputExistsError
from drdd_med.evaluation import check_same_grid, finite_statistics, read_volume
from drdd_med.handlers import TrainingBudget
from drdd_med.metrics.functional import (
    HU_WINDOWS,
    synthrad2023_mae,
    synthrad2023_psnr,
    synthrad2023_ssim,
    windowed_psnr,
    windowed_rmse,
    windowed_ssim,
)
from drdd_med.provenance import git_state, json_ready

ROOT = Path(__file__).resolve().parents[1]
# config fragments layered on the bundle's configs, per method (MONAI's list form of --config_file)
METHODS = {"drdd": [], "cddim": [ROOT / "configs" / "conditional_ddim.json"],
           "regression": [ROOT / "configs" / "regression_unet.json"], "input": []}
INPUT = "input"  # no model: the held-out source scored as it is (tasks whose source is a CT)
# DRDD sampler variants by name; the baselines run their own config's sampler (or none)
SAMPLERS = {
    "default": {},
    "residual_only": {"noise_steps": 0, "start_scale": 0.0},
    "start_scale_0.64": {"start_scale": 0.64},
    # start at the noise level the residual stage was trained in (σ_N², = 1 for the method's σ_{T−1})
    "forward_point": {"start_scale": "$@schedule.fixed_noise_level ** 2"},
}
NEVER = 10**9  # epochs: the budget ends training; an interval past them means no validation, no periodic checkpoint
# per task: its bundle and how its outputs are scored, all inside the body mask, as (pred, ct, mask, case)
LDCT_WINDOW = "abdomen"  # the low-dose CT literature's display window (C 50 / W 400)
SYNTHRAD_METRICS = {"mae_hu": synthrad2023_mae, "psnr_db": synthrad2023_psnr, "ssim": synthrad2023_ssim}
SYNTHRAD_DEFINITION = "SynthRAD2023 MAE (HU), PSNR and SSIM inside the mask, CT clipped to [-1024, 3000] HU"
TASKS = {
    "mr2ct": {
        "bundle": "drdd_mr2ct",
        "metrics": SYNTHRAD_METRICS,
        "definition": SYNTHRAD_DEFINITION,
        "source_is_ct": False,
    },
    "cbct2ct": {
        "bundle": "drdd_cbct2ct",
        "metrics": SYNTHRAD_METRICS,
        "definition": SYNTHRAD_DEFINITION,
        "source_is_ct": True,
    },
    "ldct": {
        "bundle": "drdd_ldct",
        "metrics": {
            "mae_hu": synthrad2023_mae,
            "psnr_db": lambda p, r, m, case: windowed_psnr(p, r, LDCT_WINDOW, m, case=case),
            "ssim": lambda p, r, m, case: windowed_ssim(p, r, LDCT_WINDOW, m, case=case),
            "rmse_hu": lambda p, r, m, case: windowed_rmse(p, r, LDCT_WINDOW, m, case=case),
        },
        "definition": f"MAE (HU, no window) inside the mask; PSNR, SSIM and RMSE inside the mask in the "
                      f"{LDCT_WINDOW} window {list(HU_WINDOWS[LDCT_WINDOW])} HU",
        "source_is_ct": True,
    },
}

logger = logging.getLogger("compare_methods")


# --- command line ---------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset-dir", type=Path,
                        help="the bundle's dataset_dir (mr2ct: a SynthRAD-layout folder of pairs; ldct: CT volumes "
                             "or a Mayo folder; cbct2ct: CT volumes); default: the bundle's built-in demo data, written in each "
                             "method's work folder as the bundle writes it")
    parser.add_argument("--output", type=Path, required=True, help="results file, e.g. docs/results/mr2ct_ibsi.jsonl")
    parser.add_argument("--budget-seconds", type=float, required=True, help="training time per method")
    parser.add_argument("--task", default="mr2ct", choices=sorted(TASKS),
                        help="the task: its bundle and metrics (ldct: PSNR/SSIM/RMSE in the abdomen window; "
                             "mr2ct, cbct2ct: SynthRAD2023)")
    parser.add_argument("--bundle", type=Path, help="the bundle folder (default: the task's bundle)")
    parser.add_argument("--dataset-name", help="dataset name recorded in each row (default: the folder's name)")
    parser.add_argument("--method", action="append", choices=sorted(METHODS),
                        help="repeatable (default: all that apply to the task)")
    parser.add_argument("--sampler", action="append", choices=sorted(SAMPLERS),
                        help="DRDD sampler variant, repeatable (default: default)")
    parser.add_argument("--num-validation", type=int, default=5, help="held-out cases")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split, the initialisation and the sampler")
    parser.add_argument("--network-preset", help="network size (default: the device profile's)")
    parser.add_argument("--paired-fraction", type=float, default=1.0)
    parser.add_argument("--config", dest="fragments", action="append", default=[], type=Path, metavar="FRAGMENT",
                        help="config fragment layered on each config of each method, after the method's own "
                             "(e.g. bundles/drdd_ldct/configs/two_stage.json, configs/shared_ct_prior.json); repeatable")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=JSON",
                        help="bundle config override, e.g. learning_rate=1e-3 or patch_size=[96,96]; applied to "
                             "each config (train, inference) that has the key (for KEY a#b: the item a)")
    parser.add_argument("--work-dir", type=Path, help="keep the trained models and translations here "
                                                       "(default: a temporary folder, removed at the end)")
    parser.add_argument("--replace", action="store_true", help="replace rows already in --output")
    args = parser.parse_args(argv)
    source_is_ct = TASKS[args.task]["source_is_ct"]
    if args.method and INPUT in args.method and not source_is_ct:
        parser.error(f"--method {INPUT}: the {args.task} source is not a CT; only a translation can be scored")
    args.method = args.method or [m for m in sorted(METHODS) if m != INPUT or source_is_ct]
    args.bundle = args.bundle or ROOT / "bundles" / TASKS[args.task]["bundle"]
    args.sampler = args.sampler or ["default"]
    args.overrides = dict(_parse_override(text) for text in args.overrides)
    missing = [str(path) for path in args.fragments if not path.is_file()]
    if missing:
        parser.error(f"--config: no such config fragment: {', '.join(missing)}")
    if not args.budget_seconds > 0:
        parser.error("--budget-seconds must be positive")
    return args


def _parse_override(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise SystemExit(f"error: --set {text!r}: expected KEY=JSON")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        raise SystemExit(f"error: --set {key}: {value!r} is not JSON (quote strings: {key}='\"text\"')") from None


# --- bundle configs --------------------------------------------------------------------------------


def _applies(parser: ConfigParser, key: str) -> bool:
    """Whether ``key`` is an item of this config (for ``a#b``: whether item ``a`` is)."""
    parent = key.rpartition("#")[0]
    return (parent or key) in parser


def bundle_parser(config: str, method: str, bundle: Path, settings: dict, overrides: dict,
                  fragments: list[Path] = ()) -> ConfigParser:
    """The bundle's ``config`` (train/inference) for ``method`` with its fragments, then ``fragments``,
    ``settings`` and the applicable ``overrides``."""
    parser = ConfigParser()
    with warnings.catch_warnings():  # inference.json has no "train" section for a fragment's "+train" to extend
        warnings.filterwarnings("ignore", message=r"Can't merge entry \['\+train'\]")
        parser.read_config([str(bundle / "configs" / f"{config}.json"), *map(str, METHODS[method]), *map(str, fragments)])
    parser.update(settings)
    parser.update({k: v for k, v in overrides.items() if _applies(parser, k)})
    return parser


def _shown(path: Path) -> str:
    """A fragment's path as the README's commands give it: relative to the project, where it lies there."""
    path = Path(path).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def check_overrides(args: argparse.Namespace) -> None:
    """Refuse an override that no config of any method has (a typo would otherwise change nothing)."""
    for key in args.overrides:
        if not any(_applies(bundle_parser(config, method, args.bundle, {}, {}, args.fragments), key)
                   for config in ("train", "inference") for method in args.method):
            raise DRDDInputError(f"--set {key}: no such item in the bundle's train or inference config")


def split_settings(args: argparse.Namespace) -> dict:
    """What every config gets: the data and the held-out split."""
    data = {} if args.dataset_dir is None else {"dataset_dir": str(args.dataset_dir)}
    return {**data, "num_validation": args.num_validation, "seed": args.seed}


def train_settings(args: argparse.Namespace) -> dict:
    """Training settings: the split, the paired fraction, the network size; neither epochs nor the profile's
    time limit end it, the budget does."""
    settings = {**split_settings(args), "paired_fraction": args.paired_fraction, "max_epochs": NEVER,
                "max_training_minutes": None, "val_interval": NEVER + 1}
    if args.network_preset:
        settings["network_preset"] = args.network_preset
    return settings


# --- runs ------------------------------------------------------------------------------------------


def planned_rows(args: argparse.Namespace) -> list[dict]:
    """The rows this run will write, identified by method and config (before any training)."""
    rows = []
    for method in args.method:
        parser = bundle_parser("train", method, args.bundle, train_settings(args), args.overrides, args.fragments)
        config = {"bundle": args.bundle.name, "network_preset": parser.get_parsed_content("network_preset"),
                  "num_validation": args.num_validation, "seed": args.seed, "overrides": args.overrides}
        if args.fragments:  # rows written before --config existed keep their key
            config["fragments"] = [_shown(path) for path in args.fragments]
        variants = args.sampler if method == "drdd" else [None]
        for name in variants:
            sampler = {} if name is None else {"sampler": name, "sampler_settings": SAMPLERS[name]}
            rows.append({"method": method, "config": {**config, **sampler}, "paired_fraction": args.paired_fraction,
                         "budget_seconds": 0.0 if method == INPUT else args.budget_seconds})
    return rows


def train(method: str, args: argparse.Namespace, bundle_root: Path) -> dict:
    """Train ``method`` through the bundle until the budget; its time, iterations and checkpoint."""
    settings = {**train_settings(args), "bundle_root": str(bundle_root)}
    parser = bundle_parser("train", method, args.bundle, settings, args.overrides, args.fragments)
    parser.get_parsed_content("initialize")  # seeds, refuses an existing model, attaches the final checkpoint
    trainer = parser.get_parsed_content("train#trainer")
    budget = TrainingBudget(args.budget_seconds)
    budget.attach(trainer)
    trainer.run()
    return {
        "train_seconds": round(budget.elapsed, 3),
        "iterations": budget.iterations,
        "longest_iteration_seconds": round(budget.longest_iteration, 3),  # bounds how far past the budget it ran
        "trained_iterations": dict(parser.get_parsed_content("network").trained_iterations),
        "device": parser.get_parsed_content("device"),
        "checkpoint": bundle_root / "models" / "checkpoint_final.pt",  # its network_ema is what inference loads
    }


def held_out_input(args: argparse.Namespace, bundle_root: Path) -> dict:
    """What ``--method input`` scores: the held-out cases as the bundle's training config writes them
    (demo data and simulated inputs included), each case's source standing for a translation."""
    settings = {**train_settings(args), "bundle_root": str(bundle_root)}
    parser = bundle_parser("train", INPUT, args.bundle, settings, args.overrides, args.fragments)
    return {"train_seconds": 0.0, "iterations": 0, "longest_iteration_seconds": 0.0, "trained_iterations": {},
            "device": parser.get_parsed_content("device"), "cases": parser.get_parsed_content("datalists")["validation"]}


def link_inputs(cases: list[dict], out_dir: Path) -> list[dict]:
    """``OUT/<case>/sct.nii.gz`` -> each case's source, so that ``score`` reads the input as the output."""
    for item in cases:
        (out_dir / item["case_id"]).mkdir(parents=True, exist_ok=True)
        (out_dir / item["case_id"] / "sct.nii.gz").symlink_to(Path(item["source"]).resolve())
    return cases


def translate(method: str, sampler: dict, args: argparse.Namespace, trained: dict,
              out_dir: Path) -> tuple[list[dict], dict | None]:
    """Write the held-out cases' outputs with the bundle's inference config; those cases, and the
    settings of the sampler that ran (``None`` for a regression model, which takes no steps)."""
    settings = {**split_settings(args), "bundle_root": str(out_dir.parent), "ckpt_path": str(trained["checkpoint"]),
                "output_dir": str(out_dir)}
    parser = bundle_parser("inference", method, args.bundle, settings, args.overrides, args.fragments)
    parser.update({f"sampler#{k}": v for k, v in sampler.items()})  # a named variant means what it says
    parser.get_parsed_content("initialize")
    parser.get_parsed_content("run")
    used = None if method == "regression" else parser.get_parsed_content("sampler").settings()
    return parser.get_parsed_content("datalist"), used


def score(cases: list[dict], out_dir: Path, metrics: dict) -> dict[str, list[float]]:
    """The task's ``metrics`` of each case's written output (``sct.nii.gz``) against its reference CT."""
    scores = {name: [] for name in metrics}
    for item in cases:
        case = item["case_id"]
        ct, ct_affine = read_volume(item["target"], "ct", case)
        mask, _ = read_volume(item["mask"], "mask", case)
        sct, sct_affine = read_volume(out_dir / case / "sct.nii.gz", "synthetic CT", case)
        check_same_grid(case, "synthetic CT", sct.shape, sct_affine, ct.shape, ct_affine)
        for name, metric in metrics.items():
            scores[name].append(float(metric(sct, ct, mask, case=case)))
    return scores


def summarise(scores: dict[str, list[float]]) -> dict:
    """Each metric's mean over the cases where it is finite, and ``non_finite_cases`` (by metric) where some
    are not (``drdd_med.evaluation.finite_statistics``: a case translated exactly has a PSNR of +inf). A
    metric finite nowhere keeps the mean of its values (+inf when every case is perfect)."""
    summary, non_finite = {}, {}
    for name, values in scores.items():
        stats = finite_statistics(values)
        summary[name] = stats.get("mean", float(np.mean(values)))
        if "count_infinite" in stats:
            non_finite[name] = stats["count_infinite"]
    return {**summary, "non_finite_cases": non_finite} if non_finite else summary


# --- results file ----------------------------------------------------------------------------------


def row_key(row: dict) -> str:
    """Rows with the same key measure the same thing: a second one is a duplicate."""
    return json.dumps([row["method"], row["config"], row["paired_fraction"], row["budget_seconds"]], sort_keys=True)


def read_rows(path: Path) -> list[tuple[str, dict]]:
    """The results file's lines with their parsed rows (the text is kept as it was written)."""
    if not path.exists():
        return []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    rows = []
    for number, line in enumerate(lines, 1):
        try:
            rows.append((line, json.loads(line)))
        except json.JSONDecodeError:
            raise DRDDInputError(f"{path.name}: line {number} is not JSON; fix the file before appending") from None
    return rows


def check_duplicates(path: Path, planned: list[dict], replace: bool) -> None:
    """Refuse, before anything trains, rows that ``path`` holds already (unless they are to be replaced)."""
    existing = {row_key(row) for _, row in read_rows(path)}
    duplicates = [row for row in planned if row_key(row) in existing]
    if duplicates and not replace:
        names = ", ".join(f"{r['method']}" + (f" ({r['config']['sampler']})" if "sampler" in r["config"] else "")
                          for r in duplicates)
        raise OutputExistsError(f"{path.name} already holds {names} with this config, paired fraction and budget; "
                                "pass --replace to replace those rows")


def append_row(path: Path, row: dict) -> None:
    """Append ``row`` (replacing a row with its key), rewriting the file atomically: never half a line."""
    kept = [line for line, old in read_rows(path) if row_key(old) != row_key(row)]
    with atomic_output(path, overwrite=True) as tmp:
        tmp.write_text("".join(f"{line}\n" for line in [*kept, json.dumps(json_ready(row), allow_nan=False)]))


# --- provenance ------------------------------------------------------------------------------------


def git_commit() -> dict:
    """The commit measured and whether the code differed from it (``drdd_med.provenance.git_state``)."""
    return git_state(ROOT)


def describe_device(device) -> str:
    env = environment(torch.device(device))
    return f"{env['device_name']} ({env['device']}, {env['threads']} torch threads, {env['cpu_count']} CPUs)"


# --- main ------------------------------------------------------------------------------------------


def run(args: argparse.Namespace, work_dir: Path, command: str) -> list[dict]:
    check_overrides(args)
    planned = planned_rows(args)
    check_duplicates(args.output, planned, args.replace)
    provenance = {"task": args.task, "dataset": args.dataset_name or (args.dataset_dir.name if args.dataset_dir else "demo"), "command": command,
                  **git_commit(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    written = []
    for method in args.method:
        if method == INPUT:
            trained = held_out_input(args, work_dir / method)
        else:
            logger.info("training %s for %.0f s", method, args.budget_seconds)
            trained = train(method, args, work_dir / method)
        for plan in (row for row in planned if row["method"] == method):
            variant = plan["config"].get("sampler", "translation")
            out_dir = work_dir / method / variant
            started = time.perf_counter()
            if method == INPUT:
                cases, sampler_used = link_inputs(trained["cases"], out_dir), None
            else:
                cases, sampler_used = translate(method, SAMPLERS.get(variant, {}), args, trained, out_dir)
            scores = score(cases, out_dir, TASKS[args.task]["metrics"])
            row = {**plan, **{k: trained[k] for k in ("train_seconds", "iterations", "longest_iteration_seconds",
                                                        "trained_iterations")},
                   "device": describe_device(trained["device"]),
                   "inference_seconds": round(time.perf_counter() - started, 3),
                   "sampler_used": sampler_used, "metrics": TASKS[args.task]["definition"],
                   "cases": [item["case_id"] for item in cases],
                   **summarise(scores), "per_case": scores, **provenance}
            append_row(args.output, row)
            logger.info("%s %s: MAE %.1f HU, PSNR %.2f dB, SSIM %.3f", method, variant,
                        row["mae_hu"], row["psnr_db"], row["ssim"])
            written.append(row)
    return written


def _root_cause(err: BaseException) -> BaseException:
    """The error a bundle config wraps (MONAI re-raises what an item raised as ``RuntimeError``)."""
    while err.__cause__ is not None:
        err = err.__cause__
    return err


def main(argv=None, *, script: str = "compare_methods.py", parse=parse_args, runner=run) -> int:
    """Parse ``argv``, run ``runner(args, work_dir, command)`` in ``--work-dir`` or a temporary folder, and
    turn a user error into ``error: ...`` and exit status 2 (``compare_unified.py`` runs through it too)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse(argv)
    command = shlex.join(["python", f"scripts/{script}", *argv])
    try:
        if args.work_dir:
            runner(args, args.work_dir, command)
        else:
            with tempfile.TemporaryDirectory(prefix=f"drdd-{Path(script).stem}-") as tmp:
                runner(args, Path(tmp), command)
    except Exception as err:
        cause = _root_cause(err)
        if not isinstance(cause, (DRDDInputError, OutputExistsError)):
            raise
        print(f"error: {cause}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
