"""The drdd_ldct bundle end to end: the README's commands on demo data, outputs, reruns, Mayo layout, bad input."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from config_errors import config_error
from monai.bundle import ConfigParser

from drdd_med.data.datalists import mayo_datalist, prepare_heldout_case, prepare_ldct_datalists
from drdd_med.data.demo import write_demo_dataset
from drdd_med.errors import DRDDInputError, NonFiniteError
from drdd_med.transforms import SimulateLowDose

ROOT = Path(__file__).resolve().parents[2]
BUNDLE = ROOT / "bundles" / "drdd_ldct"
CONFIGS = "bundles/drdd_ldct/configs/"
# tiny networks, small phantoms and short runs: these tests check wiring and outputs, not image quality
FAST = ["--network_preset", "tiny", "--num_validation", "2", "--patches_per_volume", "2"]
# 3 small training volumes make one iteration per epoch: average every iteration, so that the EMA
# weights saved as model.pt are trained ones (the model record would rightly call them untrained)
EMA_EVERY_ITERATION = ["--train#handlers#0#every", "1"]
SMALL_DEMO = {"demo_cases": 5, "demo_shape": [64, 64, 8], "demo_spacing": [3.0, 3.0, 12.0]}
DEMO = [arg for key, value in SMALL_DEMO.items() for arg in (f"--{key}", json.dumps(value))]
# inference takes no network flags: the networks are rebuilt from the model record in model.pt
HELD_OUT = ["--num_validation", "2"]


def run(*args, expect_ok=True):
    result = subprocess.run(
        [sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
        env={**os.environ, "PYTHONWARNINGS": "ignore"}, timeout=900,
    )
    assert (result.returncode == 0) == expect_ok, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


def bundle_run(*args, expect_ok=True):
    return run("-m", "monai.bundle", "run", *args, expect_ok=expect_ok)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("ldct")
    log = bundle_run("training", "--config_file", CONFIGS + "train.json", "--bundle_root", str(root),
                     "--max_epochs", "2", "--val_interval", "1", *FAST, *DEMO, *EMA_EVERY_ITERATION)
    return root, log


@pytest.fixture(scope="module")
def inferred(trained):
    root, _ = trained
    log = bundle_run("run", "--config_file", CONFIGS + "inference.json", "--bundle_root", str(root), *HELD_OUT)
    return root, log


@pytest.fixture(scope="module")
def two_stage(trained):
    """Both stages at the method's fixed noise level (two_stage.json), on the same bundle's data."""
    root, _ = trained
    other = root.parent / f"{root.name}_two_stage"
    bundle_run("training", "--config_file", f"['{CONFIGS}train.json','{CONFIGS}two_stage.json']",
               "--bundle_root", str(other), "--dataset_dir", str(root / "data" / "demo"),
               "--heldout_dir", str(root / "data" / "heldout"), "--max_epochs", "1", "--val_interval", "1",
               *FAST, *EMA_EVERY_ITERATION)
    return other / "models"


def test_training_generates_demo_data_held_out_inputs_and_checkpoints(trained):
    root, log = trained
    assert "dataset_dir holds no data: generated the built-in demo dataset" in log
    assert len(list((root / "data" / "demo" / "ct_pool").glob("*.nii.gz"))) == SMALL_DEMO["demo_cases"]
    cases = sorted(p.name for p in (root / "data" / "heldout").iterdir())
    assert len(cases) == 2
    for case in cases:
        low, full, mask = (nib.load(root / "data" / "heldout" / case / f"{n}.nii.gz") for n in ("ldct", "ct", "mask"))
        assert low.shape == full.shape == mask.shape
        noise = np.asarray(low.dataobj, np.float32) - np.asarray(full.dataobj, np.float32)
        assert 5 < noise[np.asarray(mask.dataobj) > 0].std() < 200  # simulated low-dose noise, in HU
    for name in ("model.pt", "checkpoint_final.pt"):
        assert (root / "models" / name).is_file(), name
    assert "val_rmse_abdomen" in log and "val_psnr_abdomen" in log and "val_ssim_abdomen" in log


def test_training_again_refuses_to_overwrite_the_model(trained):
    root, _ = trained
    before = (root / "models" / "model.pt").stat().st_mtime_ns
    log = bundle_run("training", "--config_file", CONFIGS + "train.json", "--bundle_root", str(root),
                     "--max_epochs", "1", *FAST, expect_ok=False)
    assert "already holds a trained model" in log
    assert (root / "models" / "model.pt").stat().st_mtime_ns == before


def test_inference_denoises_the_held_out_inputs_on_their_grid_and_reruns_skip(inferred):
    root, _ = inferred
    cases = sorted(p.name for p in (root / "eval").iterdir())
    assert cases == sorted(p.name for p in (root / "data" / "heldout").iterdir())
    for case in cases:
        out = nib.load(root / "eval" / case / "sct.nii.gz")
        low = nib.load(root / "data" / "heldout" / case / "ldct.nii.gz")
        assert out.get_data_dtype() == np.int16 and out.shape == low.shape
        np.testing.assert_allclose(out.affine, low.affine, atol=1e-4)
        assert (root / "eval" / case / "preview.png").stat().st_size > 1000
    log = bundle_run("run", "--config_file", CONFIGS + "inference.json", "--bundle_root", str(root), *HELD_OUT)
    assert "2 of 2 cases have a synthetic CT already" in log


def test_residual_learning_u_net_baseline_trains_and_denoises_through_the_bundle(trained):
    """configs/regression_unet.json with --regression_residual True: the RED-CNN-style baseline."""
    root, _ = trained
    other = root.parent / f"{root.name}_red"
    data = ["--dataset_dir", str(root / "data" / "demo"), "--heldout_dir", str(root / "data" / "heldout")]
    configs = "['{0}train.json','configs/regression_unet.json']".format(CONFIGS)
    bundle_run("training", "--config_file", configs, "--bundle_root", str(other), "--regression_residual", "True",
               "--max_epochs", "1", "--val_interval", "1", *data, *FAST, *EMA_EVERY_ITERATION)
    record = torch.load(other / "models" / "model.pt", weights_only=True)["_extra_state"]
    assert record["architecture"]["method"] == "regression" and record["architecture"]["residual"] is True
    configs = "['{0}inference.json','configs/regression_unet.json']".format(CONFIGS)
    bundle_run("run", "--config_file", configs, "--bundle_root", str(other), *data, *HELD_OUT)
    assert len(list((other / "eval").glob("*/sct.nii.gz"))) == 2


def test_two_stage_sampling_of_a_residual_only_model_is_refused(trained):
    """two_stage.json samples the noise stage; this model never trained it (it would return σ ≈ 1 noise)."""
    root, _ = trained
    configs = f"['{CONFIGS}inference.json','{CONFIGS}two_stage.json']"
    log = bundle_run("run", "--config_file", configs, "--bundle_root", str(root), "--output_dir", str(root / "other"),
                     *HELD_OUT, expect_ok=False)
    assert "model.pt: the sampler runs the noise stage, which this model never trained" in log
    assert "set the sampler's noise_steps to 0" in log
    assert not (root / "other").exists()


def test_evaluate_scores_the_windowed_metrics_inside_the_body(inferred):
    root, _ = inferred
    bundle_run("run", "--config_file", CONFIGS + "evaluate.json", "--bundle_root", str(root))
    summary = json.loads((root / "eval_metrics" / "summary.json").read_text())
    assert summary["counts"]["evaluated"] == 2 and summary["masks"] == "per case"
    for name in ("psnr_abdomen", "ssim_abdomen", "rmse_abdomen", "psnr_redcnn", "ssim_redcnn"):
        assert summary["metrics"][name]["count"] == 2, name
    assert "[-150, 250]" in summary["definitions"]["psnr_abdomen"]


def test_report_scores_drdd_against_the_low_dose_input_and_classical_denoisers(inferred):
    root, _ = inferred
    log = run("scripts/ct_correction_report.py", "--bundle_root", str(root), "--task", "ldct",
              "--override", "num_validation=2", "--calibration_cases", "2")
    report = json.loads((root / "report" / "report.json").read_text())
    assert set(report["metrics"]) == {"drdd", "low_dose", "nlm", "tv"}
    assert report["dose_fraction"] == 0.01 and set(report["filter_strengths"]) == {"nlm", "tv"}
    metrics = report["metrics"]
    assert all(metrics[m]["psnr_abdomen"]["count"] == 2 for m in metrics)
    assert metrics["nlm"]["psnr_abdomen"]["mean"] > metrics["low_dose"]["psnr_abdomen"]["mean"]
    assert "non-local means" in log and (root / "report" / "preview.png").stat().st_size > 1000
    assert not (root / "report" / "calibration").exists()  # training cases never end up among the scored ones
    again = run("scripts/ct_correction_report.py", "--bundle_root", str(root), "--task", "ldct", expect_ok=False)
    assert "pass --overwrite" in again


def test_noise_stage_study_scores_the_three_samplers(trained, two_stage):
    root, _ = trained
    study = ("scripts/ldct_noise_stage_study.py", "--bundle_root", str(root))
    # the bundle's default residual network (fixed level σ_0) is not the method's: refused, with the fix
    log = run(*study, "--noise_ckpt", str(two_stage / "checkpoint_final.pt"), expect_ok=False)
    assert "model.pt: trained at fixed_noise_step 0; the study needs the method's level" in log
    assert "--fixed_noise_step None" in log
    residual = ("--residual_ckpt", str(two_stage / "model.pt"))
    log = run(*study, *residual, "--noise_ckpt", str(root / "models" / "checkpoint_final.pt"), expect_ok=False)
    assert "the sampler runs the noise stage, which this model never trained" in log
    args = (*study, *residual, "--noise_ckpt", str(two_stage / "checkpoint_final.pt"))
    log = run(*args)
    results = json.loads((root / "noise_stage_study.json").read_text())
    assert set(results["metrics"]) == {"residual only", "two-stage (method default)", "noise refinement at sigma_0"}
    assert len(results["cases"]) == 2 and "two-stage (method default)" in log
    assert all(0 < m["ssim_abdomen"]["mean"] <= 1 for m in results["metrics"].values())
    assert "pass --overwrite" in run(*args, expect_ok=False)


# --- the held-out inputs -----------------------------------------------------------------------------


@pytest.fixture()
def demo_cts(tmp_path):
    write_demo_dataset(tmp_path / "data", num_paired=0, num_unpaired=3, shape=(48, 48, 4), spacing=(4, 4, 12))
    return tmp_path / "data"


def test_held_out_input_is_reproducible_and_follows_the_dose(demo_cts, tmp_path):
    item = {"case_id": "1BP001", "target": str(demo_cts / "ct_pool" / "1BP001.nii.gz")}
    first = prepare_heldout_case(item, tmp_path / "a", SimulateLowDose(0.01))
    again = prepare_heldout_case(item, tmp_path / "b", SimulateLowDose(0.01))
    stamp = Path(first["source"]).stat().st_mtime_ns
    assert prepare_heldout_case(item, tmp_path / "a", SimulateLowDose(0.01)) == first  # reused, not rewritten
    assert Path(first["source"]).stat().st_mtime_ns == stamp
    read = lambda path: np.asarray(nib.load(path).dataobj, dtype=np.float32)  # noqa: E731
    np.testing.assert_array_equal(read(first["source"]), read(again["source"]))
    noise_low = np.std(read(first["source"]) - read(first["target"]))
    prepare_heldout_case(item, tmp_path / "a", SimulateLowDose(0.04))  # another dose: the input is rewritten
    assert np.std(read(first["source"]) - read(first["target"])) < 0.75 * noise_low


# --- the AAPM/Mayo 2016 layout ------------------------------------------------------------------------


def _dicom_series_writer():
    """The synthetic-series writer of the DICOM reader tests (one file per slice, CT_small header)."""
    spec = importlib.util.spec_from_file_location("dicom_series_helpers", ROOT / "tests" / "data" / "test_dicom_reader.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.write_synthetic_series


@pytest.fixture(scope="module")
def mayo_root(tmp_path_factory):
    write_series = _dicom_series_writer()
    root = tmp_path_factory.mktemp("mayo")
    i, j = np.meshgrid(np.arange(32), np.arange(32), indexing="ij")
    body = (i - 15.5) ** 2 + (j - 15.5) ** 2 < 12**2
    for n, patient in enumerate(("L067", "L096", "L506")):
        full = np.where(body, 1064 + 10 * n, 24)[:, :, None].repeat(4, axis=2).astype(np.int16)  # 40 HU in air
        noise = np.random.default_rng(n).normal(0, 30, full.shape).round().astype(np.int16)
        write_series(root / patient / "full_1mm", full, spacing=(0.7, 0.7), step=1.0)
        write_series(root / patient / "quarter_1mm", full + noise * body[:, :, None], spacing=(0.7, 0.7), step=1.0)
    return root


def test_mayo_layout_is_found_patient_first_or_dose_first(tmp_path):
    for patient in ("L067", "L506"):
        for dose in ("quarter_1mm", "full_1mm"):
            (tmp_path / "a" / patient / dose).mkdir(parents=True)
            (tmp_path / "b" / dose / patient).mkdir(parents=True)
    for layout in ("a", "b"):
        items = mayo_datalist(tmp_path / layout)
        assert [it["case_id"] for it in items] == ["L067", "L506"]
        assert all(Path(it["source"]).name in ("quarter_1mm", "L067", "L506") for it in items)
        assert "quarter_1mm" in items[0]["source"] and "full_1mm" in items[0]["target"]
    (tmp_path / "a" / "L096" / "full_1mm").mkdir(parents=True)
    with pytest.raises(DRDDInputError, match="patient L096: no quarter_1mm folder"):
        mayo_datalist(tmp_path / "a")
    assert mayo_datalist(tmp_path / "empty") == []


def test_mayo_training_reads_real_pairs_and_holds_out_l506(mayo_root, tmp_path):
    parser = ConfigParser()
    parser.read_config([str(BUNDLE / "configs" / "train.json"), str(BUNDLE / "configs" / "mayo.json")])
    parser.update({"bundle_root": str(tmp_path / "bundle"), "dataset_dir": str(mayo_root), "network_preset": "tiny",
                   "patch_size": [16, 16], "patches_per_volume": 1})
    datalists = parser.get_parsed_content("datalists")
    assert [it["case_id"] for it in datalists["paired"]] == ["L067", "L096"]
    assert [it["case_id"] for it in datalists["validation"]] == ["L506"]
    held = datalists["validation"][0]
    low, full = (np.asarray(nib.load(held[k]).dataobj) for k in ("source", "target"))
    assert full.shape == (32, 32, 4) and full.max() == 60 and full.min() == -1000  # DICOM rescale applied
    assert 10 < np.std(low - full) < 40  # the real quarter-dose series, not a simulation
    volume = parser.get_parsed_content("train#pair_volumes")[0]
    assert "ldct_dose_fraction" not in volume["source"].meta
    assert float((volume["source"] - volume["target"]).std()) > 10
    patch = parser.get_parsed_content("train#paired_dataset")[0][0]
    assert set(patch) >= {"source", "target", "mask"} and tuple(patch["source"].shape) == (1, 16, 16)


# --- bad input through the bundle: clear errors naming the case, nothing trained ----------------------


def _train_parser(dataset_dir, **overrides):
    parser = ConfigParser()
    parser.read_config(str(BUNDLE / "configs" / "train.json"))
    parser.update({"bundle_root": str(dataset_dir.parent / "bundle"), "dataset_dir": str(dataset_dir),
                   "num_validation": 1, "network_preset": "tiny", **overrides})
    return parser


def _rewrite(path, change):
    image = nib.load(path)
    data = np.asarray(image.dataobj, dtype=np.float32).copy()
    nib.save(nib.Nifti1Image(change(data), image.affine), path)


def test_dose_outside_zero_to_one(demo_cts):
    err = config_error(_train_parser(demo_cts, dose_fraction=1.5), "datalists")
    assert isinstance(err, DRDDInputError) and "dose_fraction: must be in (0, 1]" in str(err)
    assert not (demo_cts.parent / "bundle").exists()
    err = config_error(_train_parser(demo_cts, train_dose_range=[0.0, 0.1]), "train#pair_volumes")
    assert isinstance(err, DRDDInputError) and "dose_fraction" in str(err)


def test_nan_voxels_in_a_training_ct(demo_cts):
    _rewrite(demo_cts / "ct_pool" / "1BP002.nii.gz", lambda v: np.where(np.arange(v.size).reshape(v.shape) == 77, np.nan, v))
    err = config_error(_train_parser(demo_cts, num_validation=0), "train#paired_dataset")
    assert isinstance(err, NonFiniteError) and "1BP002" in str(err) and "NaN" in str(err)


def test_nan_voxels_in_a_held_out_ct(demo_cts, tmp_path):
    for case in ("1BP001", "1BP002", "1BP003"):
        _rewrite(demo_cts / "ct_pool" / f"{case}.nii.gz", lambda v: np.where(v > 1000, np.nan, v))
    err = config_error(_train_parser(demo_cts), "datalists")
    assert isinstance(err, NonFiniteError) and "/target" in str(err) and "NaN" in str(err)


def test_a_training_volume_not_in_hounsfield_units(demo_cts):
    _rewrite(demo_cts / "ct_pool" / "1BP003.nii.gz", lambda v: v + 1024.0)  # stored values without rescale
    err = config_error(_train_parser(demo_cts, num_validation=0), "train#paired_dataset")
    assert isinstance(err, DRDDInputError) and "1BP003" in str(err) and "Hounsfield" in str(err)


def test_a_user_folder_without_data_gets_the_layouts_not_demo_data(tmp_path):
    (tmp_path / "empty").mkdir()
    err = config_error(_train_parser(tmp_path / "empty"), "datalists")
    assert isinstance(err, DRDDInputError) and "holds no data in a layout drdd_med reads" in str(err)
    assert "AAPM/Mayo 2016" in str(err) and "CT volumes" in str(err)
    assert not any((tmp_path / "empty").iterdir())  # nothing generated there


def test_held_out_folder_inside_the_dataset_is_refused(demo_cts):
    with pytest.raises(ValueError, match="outside dataset_dir"):
        prepare_ldct_datalists(demo_cts, demo_cts / "heldout", num_validation=1)
