"""The drdd_cbct2ct bundle end to end: training on demo CTs whose CBCT is simulated, inference on the
held-out cases and on a SynthRAD Task2 folder, evaluation, the report against the CBCT input."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from config_errors import config_error
from monai.bundle import ConfigParser

from drdd_med.data.datalists import HELDOUT_RECORD, prepare_heldout_case
from drdd_med.data.demo import write_demo_dataset
from drdd_med.errors import DRDDInputError
from drdd_med.metrics.functional import synthrad2023_mae
from drdd_med.transforms import SimulateCBCT

ROOT = Path(__file__).resolve().parents[2]
BUNDLE = ROOT / "bundles" / "drdd_cbct2ct"
CONFIGS = "bundles/drdd_cbct2ct/configs/"
# a cheaper simulated scanner (a quarter of the views, a head-sized field of view: 5x faster), tiny
# networks, small phantoms and short runs: these tests check wiring and outputs, not image quality
SCANNER = {"n_views": 164, "fov_diameter_mm": 250.0}
SCANNER_ARG = ["--cbct_parameters", json.dumps(SCANNER)]
FAST = ["--network_preset", "tiny", "--num_validation", "2", "--patches_per_volume", "2", *SCANNER_ARG]
# 2 training volumes make one iteration per epoch: average every iteration, so that the EMA weights
# saved as model.pt are trained ones
EMA_EVERY_ITERATION = ["--train#handlers#0#every", "1"]
SMALL_DEMO = {"demo_cases": 4, "demo_shape": [64, 64, 8], "demo_spacing": [3.0, 3.0, 12.0]}
DEMO = [arg for key, value in SMALL_DEMO.items() for arg in (f"--{key}", json.dumps(value))]
HELD_OUT = ["--num_validation", "2", *SCANNER_ARG]
REPORT_SPEC = importlib.util.spec_from_file_location("ct_correction_report", ROOT / "scripts" / "ct_correction_report.py")
ct_correction_report = sys.modules["ct_correction_report"] = importlib.util.module_from_spec(REPORT_SPEC)
REPORT_SPEC.loader.exec_module(ct_correction_report)


def bundle_run(*args, expect_ok=True):
    result = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", *args], check=False, cwd=ROOT, capture_output=True, text=True,
        env={**os.environ, "PYTHONWARNINGS": "ignore"}, timeout=900,
    )
    assert (result.returncode == 0) == expect_ok, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


def config(name, **overrides):
    parser = ConfigParser()
    parser.read_config(str(BUNDLE / "configs" / f"{name}.json"))
    parser.update(overrides)
    return parser


def read(path):
    image = nib.load(path)
    return np.asarray(image.dataobj, dtype=np.float32), image.affine


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("cbct2ct")
    log = bundle_run("training", "--config_file", CONFIGS + "train.json", "--bundle_root", str(root),
                     "--max_epochs", "2", "--val_interval", "1", *FAST, *DEMO, *EMA_EVERY_ITERATION)
    return root, log


@pytest.fixture(scope="module")
def inferred(trained):
    root, _ = trained
    log = bundle_run("run", "--config_file", CONFIGS + "inference.json", "--bundle_root", str(root), *HELD_OUT)
    return root, log


def test_training_writes_held_out_cbcts_simulated_once_and_the_model(trained):
    root, log = trained
    assert "dataset_dir holds no data: generated the built-in demo dataset" in log
    assert len(list((root / "data" / "demo" / "ct_pool").glob("*.nii.gz"))) == SMALL_DEMO["demo_cases"]
    cases = sorted(p.name for p in (root / "data" / "heldout").iterdir())
    assert len(cases) == 2
    for case in cases:
        folder = root / "data" / "heldout" / case
        (cbct, affine), (ct, _), (mask, _) = (read(folder / f"{n}.nii.gz") for n in ("cbct", "ct", "mask"))
        # the simulator's CBCT of this CT, with the bundle's scatter and scanner and the recorded seed
        recipe = json.loads((folder / HELDOUT_RECORD).read_text())
        assert {k: v for k, v in recipe.items() if k not in ("target", "seed")} == {"scatter_to_primary": 0.5, **SCANNER}
        expected = SimulateCBCT(0.5, **SCANNER).simulate(ct, np.linalg.norm(affine[:3, :2], axis=0), recipe["seed"])
        np.testing.assert_allclose(cbct, np.clip(np.round(expected), -32768, 32767), atol=1)
        assert np.median((cbct - ct)[mask > 0]) < -10  # miscalibrated and cupped: darker than the CT
    for name in ("model.pt", "checkpoint_final.pt"):
        assert (root / "models" / name).is_file(), name
    assert "val_mae" in log and "val_psnr" in log and "val_ssim" in log
    state = torch.load(root / "models" / "model.pt", weights_only=True)["_extra_state"]
    record, training = state["record"], state["record"]["training"]
    assert record["task"] == "CBCT to CT" and training["stages"] == ["residual"]
    assert training["train_scatter_range"] == [0.3, 0.7] and training["cbct_parameters"] == SCANNER
    assert state["validation_sampler"]["fixed_noise_step"] == 0 and state["validation_sampler"]["noise_steps"] == 0


def test_training_pairs_are_cbcts_simulated_from_the_ct_with_a_random_scatter(trained, tmp_path):
    root, _ = trained
    parser = config("train", bundle_root=str(tmp_path / "bundle"), dataset_dir=str(root / "data" / "demo"),
                    heldout_dir=str(root / "data" / "heldout"), num_validation=2, cbct_parameters=SCANNER,
                    network_preset="tiny")
    volume = parser.get_parsed_content("train#pair_volumes")[0]
    ratio = volume["source"].meta["cbct_scatter_to_primary"]
    assert 0.3 <= ratio <= 0.7 and ratio != 0.5
    source, target, mask = (volume[k].numpy()[0] for k in ("source", "target", "mask"))
    assert np.median((source - target)[mask > 0]) < -10


def test_inference_corrects_the_held_out_cbcts_on_their_grid(inferred):
    root, _ = inferred
    cases = sorted(p.name for p in (root / "eval").iterdir())
    assert cases == sorted(p.name for p in (root / "data" / "heldout").iterdir())
    for case in cases:
        out = nib.load(root / "eval" / case / "sct.nii.gz")
        cbct = nib.load(root / "data" / "heldout" / case / "cbct.nii.gz")
        assert out.get_data_dtype() == np.int16 and out.shape == cbct.shape
        np.testing.assert_allclose(out.affine, cbct.affine, atol=1e-4)
        assert (root / "eval" / case / "preview.png").stat().st_size > 1000


def test_inference_reads_a_synthrad2025_task2_folder(trained, tmp_path):
    """Task2/<region>/<case>/{cbct,ct,mask}.mha: the CBCT is the input, one output per case."""
    root, _ = trained
    held = min((root / "data" / "heldout").iterdir())
    case_dir = tmp_path / "synthrad" / "Task2" / "HN" / "2HNA001"
    case_dir.mkdir(parents=True)
    for name in ("cbct", "ct", "mask"):
        sitk.WriteImage(sitk.ReadImage(str(held / f"{name}.nii.gz")), str(case_dir / f"{name}.mha"))
    parser = config("inference", bundle_root=str(root), input=str(tmp_path / "synthrad"),
                    output_dir=str(tmp_path / "out"))
    assert [item["source"] for item in parser.get_parsed_content("datalist")] == [str(case_dir / "cbct.mha")]
    parser.get_parsed_content("initialize")
    parser.get_parsed_content("run")
    out = nib.load(tmp_path / "out" / "2HNA001" / "sct.nii.gz")
    assert out.shape == nib.load(held / "cbct.nii.gz").shape and out.get_data_dtype() == np.int16


def test_evaluate_scores_the_synthrad_metrics_inside_the_body(inferred):
    root, _ = inferred
    config("evaluate", bundle_root=str(root)).get_parsed_content("run")
    summary = json.loads((root / "eval_metrics" / "summary.json").read_text())
    assert summary["counts"]["evaluated"] == 2 and summary["masks"] == "per case"
    for name in ("mae", "psnr", "ssim", "ms_ssim"):
        assert summary["metrics"][name]["count"] == 2, name


def test_report_scores_drdd_against_the_cbct_input(inferred, capsys):
    root, _ = inferred
    args = ["--bundle_root", str(root), "--task", "cbct2ct", "--override", "num_validation=2",
            "--override", f"cbct_parameters={json.dumps(SCANNER)}"]
    assert ct_correction_report.main(args) == 0
    report = json.loads((root / "report" / "report.json").read_text())
    assert report["task"] == "drdd_cbct2ct" and report["scatter_to_primary"] == 0.5
    assert set(report["metrics"]) == {"drdd", "cbct"} and "SynthRAD" in report["definitions"]["psnr"]
    cases = sorted(p.name for p in (root / "data" / "heldout").iterdir())
    folders = [root / "data" / "heldout" / case for case in cases]
    # the input's row is the held-out CBCT itself, scored against its CT
    mae = [synthrad2023_mae(*(read(f / f"{n}.nii.gz")[0] for n in ("cbct", "ct", "mask"))) for f in folders]
    assert report["metrics"]["cbct"]["mae"]["mean"] == pytest.approx(np.mean(mae), rel=1e-4)
    assert all(report["metrics"][m][k]["count"] == 2 for m in ("drdd", "cbct") for k in ("mae", "psnr", "ssim"))
    assert "CBCT input" in capsys.readouterr().out and (root / "report" / "preview.png").stat().st_size > 1000
    with pytest.raises(SystemExit):  # a folder not named after a bundle needs --task
        ct_correction_report.main(["--bundle_root", str(root)])


# --- the held-out CBCTs and the data a bundle accepts -----------------------------------------------


def test_held_out_cbct_follows_the_simulated_scanner(tmp_path):
    write_demo_dataset(tmp_path / "data", num_paired=0, num_unpaired=1, shape=(48, 48, 4), spacing=(4, 4, 12))
    item = {"case_id": "1BP001", "target": str(tmp_path / "data" / "ct_pool" / "1BP001.nii.gz")}
    first = prepare_heldout_case(item, tmp_path / "a", SimulateCBCT(0.5, **SCANNER))
    stamp = Path(first["source"]).stat().st_mtime_ns
    assert Path(first["source"]).name == "cbct.nii.gz"
    assert prepare_heldout_case(item, tmp_path / "a", SimulateCBCT(0.5, **SCANNER)) == first  # reused
    assert Path(first["source"]).stat().st_mtime_ns == stamp
    before = read(first["source"])[0]
    prepare_heldout_case(item, tmp_path / "a", SimulateCBCT(0.5, **SCANNER, incident_photons=5e3))  # rewritten
    assert not np.array_equal(read(first["source"])[0], before)
    with pytest.raises(DRDDInputError, match="a held-out scan is simulated at one ratio"):
        prepare_heldout_case(item, tmp_path / "b", SimulateCBCT((0.3, 0.7), **SCANNER))


def test_a_user_folder_without_ct_volumes_gets_the_layout_not_demo_data(tmp_path):
    (tmp_path / "empty").mkdir()
    parser = config("train", bundle_root=str(tmp_path / "bundle"), dataset_dir=str(tmp_path / "empty"))
    err = config_error(parser, "datalists")
    assert isinstance(err, DRDDInputError) and "holds no data in a layout drdd_med reads" in str(err)
    assert "CT volumes" in str(err) and "cbct scans are simulated" in str(err)
    assert not any((tmp_path / "empty").iterdir())


def test_a_synthrad_folder_as_training_data_is_refused_with_the_way_to_use_it(tmp_path):
    (tmp_path / "synthrad" / "Task2" / "pelvis" / "2PA001").mkdir(parents=True)
    parser = config("train", bundle_root=str(tmp_path / "bundle"), dataset_dir=str(tmp_path / "synthrad"))
    err = config_error(parser, "datalists")
    assert isinstance(err, DRDDInputError) and "dataset_dir is a SynthRAD folder (Task2/)" in str(err)
    assert "--input" in str(err)
