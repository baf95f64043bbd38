"""Score a trained CT-correction bundle (drdd_ldct, drdd_cbct2ct) against its own input on its held-out cases.

After a bundle's training and inference commands:

    python scripts/ct_correction_report.py --bundle_root bundles/drdd_ldct
    python scripts/ct_correction_report.py --bundle_root bundles/drdd_cbct2ct

scores DRDD's outputs (``BUNDLE_ROOT/eval/<case>/sct.nii.gz``) and the held-out input itself (the
low-dose scan, the CBCT) against the reference CT, inside the body mask, with the metrics of
``drdd_med.evaluation``:

- ``--task ldct`` (drdd_ldct): PSNR, SSIM and RMSE in the abdomen window (C 50 / W 400 -> [-150, 250]
  HU) and PSNR and SSIM in the RED-CNN window ([-160, 240] HU). Two more baselines: scikit-image's
  non-local means and total-variation denoisers (``drdd_med.baselines.classical_denoise``), each
  with the strength, from a fixed grid, that scores best (abdomen-window PSNR) on
  ``--calibration_cases`` *training* cases at the held-out dose: a rule that never looks at a
  held-out case.
- ``--task cbct2ct`` (drdd_cbct2ct): the SynthRAD2023 masked MAE (HU), PSNR and SSIM (CT clipped to
  [-1024, 3000] HU).

Prints a table (mean ± std over cases), saves ``REPORT/report.json`` and a preview (``--preview``,
default ``REPORT/preview.png``): the middle slice of one case, every method in the abdomen window.
The task defaults to the one whose bundle folder ``--bundle_root`` is named after.

The dataset, held-out folder, simulated input and split come from the bundle's training config
(``--config_file``, with ``bundle_root`` set to ``--bundle_root``); ``--override KEY=VALUE`` changes
one of them as on the bundle's command line.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from monai.bundle import ConfigParser

from drdd_med.baselines import DENOISERS, classical_denoise
from drdd_med.data.datalists import SourceSimulator, prepare_heldout_case
from drdd_med.data.files import atomic_output_dir
from drdd_med.data.writers import write_volume
from drdd_med.errors import OutputExistsError
from drdd_med.evaluation import evaluate_folders
from drdd_med.metrics.functional import HU_WINDOWS, windowed_psnr
from drdd_med.transforms import SimulateLowDose
from drdd_med.visualize import mid_axial, save_panels

ROOT = Path(__file__).resolve().parents[1]
STRENGTHS = (0.5, 1.0, 2.0, 4.0, 8.0)
PREVIEW_WINDOW = "abdomen"
DENOISER_LABELS = {"nlm": "non-local means", "tv": "total variation"}


@dataclass(frozen=True)
class Task:
    bundle: str
    input_key: str  # the input's name in report.json
    input_label: str
    metrics: dict[str, str]  # evaluate_folders metric -> table header
    simulator: Callable[[ConfigParser], SourceSimulator]  # what made the held-out inputs, from the training config
    recorded: tuple[str, ...]  # training-config settings copied into report.json
    denoisers: tuple[str, ...] = ()  # classical baselines, their strengths calibrated on training cases


TASKS = {
    "ldct": Task(
        bundle="drdd_ldct",
        input_key="low_dose",
        input_label="low-dose input",
        metrics={"psnr_abdomen": "PSNR abd (dB)", "ssim_abdomen": "SSIM abd", "rmse_abdomen": "RMSE abd (HU)",
                 "psnr_redcnn": "PSNR RED-CNN (dB)", "ssim_redcnn": "SSIM RED-CNN"},
        simulator=lambda parser: SimulateLowDose(parser.get_parsed_content("dose_fraction")),
        recorded=("dose_fraction",),
        denoisers=DENOISERS,
    ),
    "cbct2ct": Task(
        bundle="drdd_cbct2ct",
        input_key="cbct",
        input_label="CBCT input",
        metrics={"mae": "MAE (HU)", "psnr": "PSNR (dB)", "ssim": "SSIM"},
        simulator=lambda parser: parser.get_parsed_content("heldout_simulator"),
        recorded=("scatter_to_primary",),
    ),
}


def bundle_parser(config_file: Path, bundle_root: Path, overrides: list[str]) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config(str(config_file))
    parser["bundle_root"] = str(bundle_root)
    for override in overrides:
        key, _, value = override.partition("=")
        try:
            parser[key] = json.loads(value)  # numbers, lists, true/false, as on the bundle command line
        except ValueError:
            parser[key] = value
    return parser


def read(path: Path) -> tuple[np.ndarray, np.ndarray]:
    image = nib.load(path)
    return np.asarray(image.dataobj, dtype=np.float32), image.affine


def calibrate(task: Task, parser: ConfigParser, simulator: SourceSimulator, out: Path,
              num_cases: int) -> dict[str, float]:
    """The strength of each filter that gives the best mean abdomen PSNR on the first training cases."""
    if not task.denoisers:
        return {}
    paired = parser.get_parsed_content("datalists")["paired"]
    if not paired:
        raise SystemExit("error: no training case to calibrate the classical filters on")
    scores = {method: np.zeros(len(STRENGTHS)) for method in task.denoisers}
    for item in paired[:num_cases]:
        case = prepare_heldout_case(item, out / "calibration", simulator, parser.get_parsed_content("seed"))
        low, _ = read(Path(case["source"]))
        reference, _ = read(Path(case["target"]))
        mask, _ = read(Path(case["mask"]))
        for method in task.denoisers:
            for i, strength in enumerate(STRENGTHS):
                scores[method][i] += windowed_psnr(classical_denoise(low, method, strength), reference, "abdomen", mask)
    shutil.rmtree(out / "calibration")
    return {method: STRENGTHS[int(np.argmax(values))] for method, values in scores.items()}


def score(task: Task, parser: ConfigParser, cases: list[str], pred_dir: Path, calibration_cases: int, out: Path,
          preview: Path) -> tuple[dict, dict]:
    """Write the baselines, every method's metrics and the preview into ``out``; return strengths and table."""
    heldout = Path(parser.get_parsed_content("heldout_dir"))
    simulator = task.simulator(parser)
    source = f"{simulator.source_tag}.nii.gz"
    strengths = calibrate(task, parser, simulator, out, calibration_cases)
    # the reference folder holds exactly the scored cases, so no other case counts as skipped
    folders = {"drdd": pred_dir, **{method: out / method for method in (task.input_key, *task.denoisers)}}
    for case in cases:
        (out / "references" / case).mkdir(parents=True)
        for name in ("ct.nii.gz", "mask.nii.gz", source):
            (out / "references" / case / name).symlink_to((heldout / case / name).resolve())
        (out / task.input_key / case).mkdir(parents=True)
        (out / task.input_key / case / "sct.nii.gz").symlink_to((heldout / case / source).resolve())
        scan, affine = read(heldout / case / source)
        for method in task.denoisers:
            write_volume(classical_denoise(scan, method, strengths[method]), affine, out / method / case / "sct.nii.gz")

    table, definitions = {}, {}
    for method, folder in folders.items():
        summary = evaluate_folders(folder, out / "references", out_dir=out / "metrics" / method,
                                   metrics=list(task.metrics), figures=False, progress=False)
        table[method] = summary["metrics"]
        definitions = summary["definitions"]
    report = {
        "task": task.bundle,
        "cases": cases,
        **{key: parser.get_parsed_content(key) for key in task.recorded},
        "definitions": definitions,
        "filter_strengths": strengths,
        "metrics": table,
    }
    (out / "report.json").write_text(json.dumps(report, indent=2))

    case = cases[0]
    window = HU_WINDOWS[PREVIEW_WINDOW]
    panels = [(label(task, m), mid_axial(read(folders[m] / case / "sct.nii.gz")[0]), window)
              for m in (task.input_key, *task.denoisers, "drdd")]
    panels.append(("reference CT", mid_axial(read(heldout / case / "ct.nii.gz")[0]), window))
    save_panels(preview, panels, title=f"held-out case {case}, {PREVIEW_WINDOW} window {list(window)} HU",
                overwrite=True)
    return strengths, table


def label(task: Task, method: str) -> str:
    return {"drdd": "DRDD", task.input_key: task.input_label, **DENOISER_LABELS}[method]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle_root", type=Path, required=True)
    parser.add_argument("--task", choices=sorted(TASKS),
                        help="default: the task whose bundle folder --bundle_root is named after")
    parser.add_argument("--config_file", type=Path, help="the bundle's training config (default: the task bundle's)")
    parser.add_argument("--pred_dir", type=Path, help="DRDD outputs to score (default BUNDLE_ROOT/eval)")
    parser.add_argument("--out", type=Path, help="report folder (default BUNDLE_ROOT/report)")
    parser.add_argument("--calibration_cases", type=int, default=3,
                        help="training cases that set the classical filters' strengths (ldct)")
    parser.add_argument("--preview", type=Path, help="preview PNG (default REPORT/preview.png)")
    parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                        help="a train.json setting, e.g. dose_fraction=0.02 or num_validation=2")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing report")
    args = parser.parse_args(argv)
    by_bundle = {task.bundle: name for name, task in TASKS.items()}
    name = args.task or by_bundle.get(args.bundle_root.resolve().name)
    if name is None:
        parser.error(f"--bundle_root {args.bundle_root.name} is none of {sorted(by_bundle)}: give --task")
    task = TASKS[name]
    config_file = args.config_file or ROOT / "bundles" / task.bundle / "configs" / "train.json"
    pred_dir = args.pred_dir or args.bundle_root / "eval"
    out = args.out or args.bundle_root / "report"
    config = bundle_parser(config_file, args.bundle_root, args.override)
    heldout = Path(config.get_parsed_content("heldout_dir"))
    source = f"{task.simulator(config).source_tag}.nii.gz"
    cases = sorted(p.name for p in pred_dir.iterdir() if (p / "sct.nii.gz").is_file()) if pred_dir.is_dir() else []
    if not cases:
        print(f"error: no <case>/sct.nii.gz under {pred_dir}; run the bundle's inference first", file=sys.stderr)
        return 2
    missing = [case for case in cases if not (heldout / case / source).is_file()]
    if missing:
        print(f"error: {heldout} has no held-out {source} for {', '.join(missing)}", file=sys.stderr)
        return 2
    started = time.perf_counter()
    try:
        with atomic_output_dir(out, overwrite=args.overwrite) as staging:  # no half report after a crash
            preview = args.preview or staging / "preview.png"
            strengths, table = score(task, config, cases, pred_dir, args.calibration_cases, staging, preview)
    except OutputExistsError:
        print(f"error: {out} exists; pass --overwrite to replace it", file=sys.stderr)
        return 2
    preview = args.preview or out / "preview.png"

    if strengths:
        print("filter strengths from training cases: " + ", ".join(f"{m} {s:g}" for m, s in strengths.items()))
    settings = ", ".join(f"{key} {config.get_parsed_content(key):g}" for key in task.recorded)
    print(f"{len(cases)} held-out cases ({', '.join(cases)}), {settings}, inside the body mask; "
          f"{time.perf_counter() - started:.0f} s")
    print(f"{'method':24s} " + " ".join(f"{h:>18s}" for h in task.metrics.values()))
    for method, metrics in table.items():
        cells = [f"{metrics[m]['mean']:.4f} ± {metrics[m]['std']:.4f}" if m.startswith("ssim")
                 else f"{metrics[m]['mean']:.2f} ± {metrics[m]['std']:.2f}" for m in task.metrics]
        print(f"{label(task, method):24s} " + " ".join(f"{c:>18s}" for c in cells))
    print(f"report: {out / 'report.json'}; preview: {preview}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
