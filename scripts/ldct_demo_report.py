"""Score a trained drdd_ldct bundle against the low-dose input and classical denoisers on its held-out cases.

After the README's training and inference commands:

    python scripts/ldct_demo_report.py --bundle_root bundles/drdd_ldct

scores four methods on the held-out cases that the inference wrote (``BUNDLE_ROOT/eval/<case>``):
DRDD, the low-dose input itself, and scikit-image's non-local means and total-variation denoisers
(``drdd_med.baselines.classical_denoise``). Each classical filter gets the strength, from a fixed
grid, that scores best (abdomen-window PSNR) on ``--calibration_cases`` *training* cases at the
same dose: a rule that never looks at a held-out case. Metrics (``drdd_med.evaluation``, inside the
body mask): PSNR, SSIM and RMSE in the abdomen window (C 50 / W 400 -> [-150, 250] HU) and PSNR and
SSIM in the RED-CNN window ([-160, 240] HU). Prints a table (mean ± std over cases), saves
``REPORT/report.json`` and a preview (``--preview``, default ``REPORT/preview.png``): the middle
slice of one case, every method in the abdomen window.

The dataset, held-out folder, dose and split come from the bundle's training config (``--config_file``,
with ``bundle_root`` set to ``--bundle_root``); ``--override KEY=VALUE`` changes one of them as on
the bundle's command line.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from monai.bundle import ConfigParser

from drdd_med.baselines import DENOISERS, classical_denoise
from drdd_med.data.datalists import prepare_heldout_case, prepare_ldct_datalists
from drdd_med.data.files import atomic_output_dir
from drdd_med.data.writers import write_volume
from drdd_med.errors import OutputExistsError
from drdd_med.evaluation import evaluate_folders
from drdd_med.metrics.functional import HU_WINDOWS, windowed_psnr
from drdd_med.visualize import mid_axial, save_panels

METRICS = ("psnr_abdomen", "ssim_abdomen", "rmse_abdomen", "psnr_redcnn", "ssim_redcnn")
STRENGTHS = (0.5, 1.0, 2.0, 4.0, 8.0)
TRAIN_CONFIG = Path(__file__).resolve().parents[1] / "bundles" / "drdd_ldct" / "configs" / "train.json"
CONFIG_KEYS = ("dataset_dir", "heldout_dir", "num_validation", "held_out", "dose_fraction", "seed")
LABELS = {"drdd": "DRDD", "low_dose": "low-dose input", "nlm": "non-local means", "tv": "total variation"}


def bundle_settings(config_file: Path, bundle_root: Path, overrides: list[str]) -> dict:
    parser = ConfigParser()
    parser.read_config(str(config_file))
    parser["bundle_root"] = str(bundle_root)
    for override in overrides:
        key, _, value = override.partition("=")
        try:
            parser[key] = json.loads(value)  # numbers, lists, true/false, as on the bundle command line
        except ValueError:
            parser[key] = value
    return {key: parser.get_parsed_content(key) for key in CONFIG_KEYS}


def read(path: Path) -> tuple[np.ndarray, np.ndarray]:
    image = nib.load(path)
    return np.asarray(image.dataobj, dtype=np.float32), image.affine


def calibrate(settings: dict, out: Path, num_cases: int) -> dict[str, float]:
    """The strength of each filter that gives the best mean abdomen PSNR on the first training cases."""
    paired = prepare_ldct_datalists(**{k: settings[k] for k in CONFIG_KEYS})["paired"]
    if not paired:
        raise SystemExit("error: no training case to calibrate the classical filters on")
    scores = {method: np.zeros(len(STRENGTHS)) for method in DENOISERS}
    for item in paired[:num_cases]:
        case = prepare_heldout_case(item, out / "calibration", settings["dose_fraction"], settings["seed"])
        low, _ = read(Path(case["source"]))
        reference, _ = read(Path(case["target"]))
        mask, _ = read(Path(case["mask"]))
        for method in DENOISERS:
            for i, strength in enumerate(STRENGTHS):
                scores[method][i] += windowed_psnr(classical_denoise(low, method, strength), reference, "abdomen", mask)
    shutil.rmtree(out / "calibration")
    return {method: STRENGTHS[int(np.argmax(values))] for method, values in scores.items()}


def score(cases: list[str], pred_dir: Path, settings: dict, calibration_cases: int, out: Path,
          preview: Path) -> tuple[dict, dict]:
    """Write the baselines, every method's metrics and the preview into ``out``; return strengths and table."""
    heldout = Path(settings["heldout_dir"])
    strengths = calibrate(settings, out, calibration_cases)
    # the reference folder holds exactly the scored cases, so no other case counts as skipped
    folders = {"drdd": pred_dir, **{method: out / method for method in ("low_dose", *DENOISERS)}}
    for case in cases:
        (out / "references" / case).mkdir(parents=True)
        for name in ("ct.nii.gz", "mask.nii.gz", "ldct.nii.gz"):
            (out / "references" / case / name).symlink_to((heldout / case / name).resolve())
        (out / "low_dose" / case).mkdir(parents=True)
        (out / "low_dose" / case / "sct.nii.gz").symlink_to((heldout / case / "ldct.nii.gz").resolve())
        low, affine = read(heldout / case / "ldct.nii.gz")
        for method in DENOISERS:
            write_volume(classical_denoise(low, method, strengths[method]), affine, out / method / case / "sct.nii.gz")

    table = {}
    for method, folder in folders.items():
        summary = evaluate_folders(folder, out / "references", out_dir=out / "metrics" / method, metrics=METRICS,
                                   figures=False, progress=False)
        table[method] = summary["metrics"]
    report = {
        "cases": cases,
        "dose_fraction": settings["dose_fraction"],
        "windows_hu": {name: HU_WINDOWS[name] for name in ("abdomen", "redcnn")},
        "filter_strengths": strengths,
        "metrics": table,
    }
    (out / "report.json").write_text(json.dumps(report, indent=2))

    case = cases[0]
    slices = {m: mid_axial(read(folders[m] / case / "sct.nii.gz")[0]) for m in ("low_dose", *DENOISERS, "drdd")}
    reference = read(heldout / case / "ct.nii.gz")[0]
    panels = [(LABELS[m], image, HU_WINDOWS["abdomen"]) for m, image in slices.items()]
    panels.append(("full-dose reference", mid_axial(reference), HU_WINDOWS["abdomen"]))
    save_panels(preview, panels, title=f"held-out case {case}, abdomen window [-150, 250] HU", overwrite=True)
    return strengths, table


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle_root", type=Path, default=Path("bundles/drdd_ldct"))
    parser.add_argument("--config_file", type=Path, default=TRAIN_CONFIG, help="the bundle's training config")
    parser.add_argument("--pred_dir", type=Path, help="DRDD outputs to score (default BUNDLE_ROOT/eval)")
    parser.add_argument("--out", type=Path, help="report folder (default BUNDLE_ROOT/report)")
    parser.add_argument("--calibration_cases", type=int, default=3, help="training cases that set the filter strengths")
    parser.add_argument("--preview", type=Path, help="preview PNG (default REPORT/preview.png)")
    parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                        help=f"a train.json setting ({', '.join(CONFIG_KEYS)}), e.g. dose_fraction=0.02")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing report")
    args = parser.parse_args(argv)
    pred_dir = args.pred_dir or args.bundle_root / "eval"
    out = args.out or args.bundle_root / "report"
    settings = bundle_settings(args.config_file, args.bundle_root, args.override)
    heldout = Path(settings["heldout_dir"])
    cases = sorted(p.name for p in pred_dir.iterdir() if (p / "sct.nii.gz").is_file()) if pred_dir.is_dir() else []
    if not cases:
        print(f"error: no <case>/sct.nii.gz under {pred_dir}; run the bundle's inference first", file=sys.stderr)
        return 2
    missing = [case for case in cases if not (heldout / case / "ldct.nii.gz").is_file()]
    if missing:
        print(f"error: {heldout} has no held-out input for {', '.join(missing)}", file=sys.stderr)
        return 2
    started = time.perf_counter()
    try:
        with atomic_output_dir(out, overwrite=args.overwrite) as staging:  # no half report after a crash
            preview = args.preview or staging / "preview.png"
            strengths, table = score(cases, pred_dir, settings, args.calibration_cases, staging, preview)
    except OutputExistsError:
        print(f"error: {out} exists; pass --overwrite to replace it", file=sys.stderr)
        return 2
    preview = args.preview or out / "preview.png"

    print("filter strengths from training cases: " + ", ".join(f"{m} {s:g}" for m, s in strengths.items()))
    print(f"{len(cases)} held-out cases ({', '.join(cases)}), dose fraction {settings['dose_fraction']:g}, "
          f"inside the body mask; {time.perf_counter() - started:.0f} s")
    header = ["PSNR abd (dB)", "SSIM abd", "RMSE abd (HU)", "PSNR RED-CNN (dB)", "SSIM RED-CNN"]
    print(f"{'method':24s} " + " ".join(f"{h:>18s}" for h in header))
    for method, metrics in table.items():
        cells = [f"{metrics[m]['mean']:.4f} ± {metrics[m]['std']:.4f}" if m.startswith("ssim")
                 else f"{metrics[m]['mean']:.2f} ± {metrics[m]['std']:.2f}" for m in METRICS]
        print(f"{LABELS[method]:24s} " + " ".join(f"{c:>18s}" for c in cells))
    print(f"report: {out / 'report.json'}; preview: {preview}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
