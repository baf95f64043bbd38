"""The drdd_mr2ct bundle end to end: the README's commands on demo data, outputs, reruns, bad input."""

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

from drdd_med.data.demo import write_demo_dataset
from drdd_med.errors import DRDDInputError, GridMismatchError, NonFiniteError
from drdd_med.networks import PRESETS, REGRESSION_PRESETS

ROOT = Path(__file__).resolve().parents[2]
BUNDLE = ROOT / "bundles" / "drdd_mr2ct"
TRAIN = "bundles/drdd_mr2ct/configs/train.json"
INFER = "bundles/drdd_mr2ct/configs/inference.json"
# tiny networks and short runs: these tests check wiring and outputs, not image quality
FAST = ["--network_preset", "tiny", "--num_validation", "2", "--patches_per_volume", "2"]
# inference takes no network flags: the networks are rebuilt from the model record in model.pt
HELD_OUT = ["--num_validation", "2"]


def bundle_run(*args, expect_ok=True):
    result = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", *args], cwd=ROOT, capture_output=True, text=True,
        env={**os.environ, "PYTHONWARNINGS": "ignore"}, timeout=900,
    )
    assert (result.returncode == 0) == expect_ok, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("mr2ct")
    log = bundle_run("training", "--config_file", TRAIN, "--bundle_root", str(root), "--max_epochs", "2",
                     "--val_interval", "1", *FAST)
    return root, log


def test_training_generates_demo_data_and_checkpoints(trained):
    root, log = trained
    assert "dataset_dir holds no data: generated the built-in demo dataset" in log
    assert (root / "data" / "demo" / "Task1" / "brain" / "1BA001" / "mr.nii.gz").is_file()
    for name in ("model.pt", "checkpoint_final.pt"):
        assert (root / "models" / name).is_file(), name
    assert "val_mae" in log


def test_training_again_refuses_to_overwrite_the_model(trained):
    root, _ = trained
    before = (root / "models" / "model.pt").stat().st_mtime_ns
    log = bundle_run("training", "--config_file", TRAIN, "--bundle_root", str(root), "--max_epochs", "1", *FAST,
                     expect_ok=False)
    assert "already holds a trained model" in log
    assert (root / "models" / "model.pt").stat().st_mtime_ns == before


def test_inference_writes_synthetic_ct_on_the_source_grid_and_reruns_skip(trained):
    root, _ = trained
    log = bundle_run("run", "--config_file", INFER, "--bundle_root", str(root), *HELD_OUT)
    cases = sorted(p.name for p in (root / "eval").iterdir())
    assert len(cases) == 2
    for case in cases:
        sct = nib.load(root / "eval" / case / "sct.nii.gz")
        mr = nib.load(root / "data" / "demo" / "Task1" / "brain" / case / "mr.nii.gz")
        assert sct.get_data_dtype() == np.int16
        assert sct.shape == mr.shape
        np.testing.assert_allclose(sct.affine, mr.affine, atol=1e-4)
        values = np.asarray(sct.dataobj)
        assert values.min() >= -1024 and values.max() <= 3000
        assert (root / "eval" / case / "preview.png").stat().st_size > 1000
    stamps = [(root / "eval" / c / "sct.nii.gz").stat().st_mtime_ns for c in cases]
    log = bundle_run("run", "--config_file", INFER, "--bundle_root", str(root), *HELD_OUT)
    assert "2 of 2 cases have a synthetic CT already" in log
    assert stamps == [(root / "eval" / c / "sct.nii.gz").stat().st_mtime_ns for c in cases]


def test_a_synthrad2025_folder_of_mha_files_trains_and_translates(trained, tmp_path):
    """SynthRAD2025's layout, ``Task1/HN/<case>/{mr,ct,mask}.mha``, read through SimpleITK (no itk package)."""
    import SimpleITK as sitk

    demo, data = trained[0] / "data" / "demo" / "Task1" / "brain", tmp_path / "synthrad2025"
    cases = sorted(p.name for p in demo.iterdir())[:6]
    for case in cases:
        (data / "Task1" / "HN" / case).mkdir(parents=True)
        for name in ("mr", "ct", "mask"):
            sitk.WriteImage(sitk.ReadImage(str(demo / case / f"{name}.nii.gz")), str(data / "Task1" / "HN" / case / f"{name}.mha"))
    root = tmp_path / "bundle"
    log = bundle_run("training", "--config_file", TRAIN, "--bundle_root", str(root), "--dataset_dir", str(data),
                     "--max_epochs", "1", "--val_interval", "1", "--train#handlers#0#every", "1", *FAST)
    assert "val_mae" in log and (root / "models" / "model.pt").is_file()
    bundle_run("run", "--config_file", INFER, "--bundle_root", str(root), "--dataset_dir", str(data), *HELD_OUT)
    written = sorted(p.name for p in (root / "eval").iterdir())
    assert len(written) == 2 and set(written) <= set(cases)
    for case in written:
        sct, mr = nib.load(root / "eval" / case / "sct.nii.gz"), nib.load(demo / case / "mr.nii.gz")
        assert sct.shape == mr.shape
        np.testing.assert_allclose(sct.affine, mr.affine, atol=1e-4)


def test_the_time_limit_ends_training_and_the_weights_it_ends_on_are_validated(tmp_path):
    """The CPU profile bounds training by minutes as well as epochs: here 6 ms, so one iteration of
    50 epochs, and the validation at epoch 40 never comes; model.pt still holds the trained weights."""
    root = tmp_path / "bundle"
    log = bundle_run("training", "--config_file", TRAIN, "--bundle_root", str(root), "--max_epochs", "50",
                     "--val_interval", "40", "--max_training_minutes", "0.0001", *FAST)
    assert "training stops at its time limit of 0 s: 1 iterations this run, now at epoch 1" in log
    assert "Epoch[1] Metrics -- val_mae" in log
    record = torch.load(root / "models" / "model.pt", weights_only=True)["_extra_state"]
    assert record["trained_iterations"] == {"residual": 1, "noise": 1}
    assert record["record"]["training"]["max_training_minutes"] == 0.0001


def test_the_documented_override_turns_the_time_limit_off(tmp_path):
    """``--max_training_minutes '$None'`` (README): no TrainingBudget among the handlers, recorded as None."""
    handlers = {}
    for value in (10.0, "$None"):
        parser = ConfigParser()
        parser.read_config(str(ROOT / TRAIN))
        parser.update({"bundle_root": str(tmp_path), "max_training_minutes": value})
        handlers[value] = [type(handler).__name__ for handler in parser.get_parsed_content("train#handlers")]
        assert parser.get_parsed_content("model_record")["training"]["max_training_minutes"] == (
            None if value == "$None" else value)
    assert "TrainingBudget" in handlers[10.0] and "TrainingBudget" not in handlers["$None"]


def test_evaluate_scores_the_held_out_cases_against_their_ct(trained):
    root, _ = trained
    bundle_run("run", "--config_file", INFER, "--bundle_root", str(root), *HELD_OUT)  # skips finished cases
    bundle_run("run", "--config_file", "bundles/drdd_mr2ct/configs/evaluate.json", "--bundle_root", str(root))
    summary = json.loads((root / "eval_metrics" / "summary.json").read_text())
    assert summary["counts"]["evaluated"] == 2
    for name in ("mae", "psnr", "ssim", "ms_ssim"):
        assert summary["metrics"][name]["count"] == 2, name
    assert 0 < summary["metrics"]["mae"]["mean"] < 2000


def test_report_scores_drdd_against_the_monotone_baseline_and_never_half_writes(trained):
    root, _ = trained
    bundle_run("run", "--config_file", INFER, "--bundle_root", str(root), *HELD_OUT)  # skips finished cases
    script = [sys.executable, "scripts/mr2ct_demo_report.py", "--bundle_root", str(root)]
    result = subprocess.run(script, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((root / "report" / "report.json").read_text())
    assert set(report["metrics"]) == {"DRDD", "monotone baseline (oracle-fitted)"}
    assert all(m["mae"]["count"] == 2 for m in report["metrics"].values())
    assert not [p.name for p in root.iterdir() if p.name.endswith(".partial")]  # no staging folder left behind
    again = subprocess.run(script, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert again.returncode == 2 and "pass --overwrite" in again.stderr
    assert json.loads((root / "report" / "report.json").read_text()) == report


def test_precision_report_puts_bf16_beside_another_sampling_seed(trained, tmp_path):
    """scripts/translation_precision.py: the bundle's inference per run, scored, and differences to the first."""
    root, _ = trained
    out = tmp_path / "precision.json"
    eval_before = sorted((root / "eval").rglob("*")) if (root / "eval").exists() else []
    script = [sys.executable, "scripts/translation_precision.py", "--bundle_root", str(root), "--config_file", INFER,
              "--output", str(out)]
    result = subprocess.run(script, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    written = json.loads(out.read_text())
    fp32, bf16, reseeded = written["rows"]
    assert [(r["precision"], r["seed"]) for r in written["rows"]] == [("fp32", 0), ("bf16", 0), ("fp32", 1)]
    assert all(r["cases"] == 4 and 0 < r["metrics"]["mae"]["mean"] < 2000 for r in written["rows"])
    assert "hu_difference_to_fp32@0" not in fp32
    # bf16 moves values only where the CPU computes it; another seed draws other start noise
    assert (bf16["hu_difference_to_fp32@0"]["max"] > 0) == written["cpu_bf16_native"]
    assert reseeded["hu_difference_to_fp32@0"]["mean"] > 0
    # the runs went to a temporary folder, not the bundle's eval
    assert (sorted((root / "eval").rglob("*")) if (root / "eval").exists() else []) == eval_before
    bad = subprocess.run([*script[:-2], "--runs", "fp16", "--output", str(tmp_path / "x.json")], cwd=ROOT,
                         capture_output=True, text=True, timeout=120, check=False)
    assert bad.returncode == 2 and "a run is PRECISION or PRECISION@SEED" in bad.stderr


def test_model_records_how_it_was_built_and_trained(trained):
    root, _ = trained
    record = torch.load(root / "models" / "model.pt", weights_only=True)["_extra_state"]
    assert record["architecture"]["residual"]["channels"] == list(PRESETS["tiny"]["residual"]["channels"])
    assert record["architecture"]["context_slices"] == 1 and record["architecture"]["spatial_dims"] == 2
    assert record["trained_iterations"]["residual"] > 0 and record["trained_iterations"]["noise"] > 0
    assert record["validation_sampler"] == {"residual_steps": 2, "noise_steps": 2, "eta": 0.0, "start_scale": 1.0,
                                            "noise_start": None, "num_train_timesteps": 1000, "beta_start": 1e-4,
                                            "beta_end": 0.02, "fixed_noise_step": 999}
    training = record["record"]["training"]
    assert training["profile"] == "cpu" and training["network_preset"] == "tiny" and training["patches_per_volume"] == 2
    assert record["record"]["target_normalisation"]["hu_range"] == [-1024, 3000]
    assert str(root) not in json.dumps(record)  # no paths (nor anything else from the data)


def test_inference_refuses_a_config_that_contradicts_the_model(trained):
    root, _ = trained
    log = bundle_run("run", "--config_file", INFER, "--bundle_root", str(root), "--context_slices", "3",
                     "--output_dir", str(root / "other"), *HELD_OUT, expect_ok=False)
    assert "model.pt: the config does not match the model: context_slices is 1 in the model but 3 in the config" in log
    assert not (root / "other").exists()


# --- the regression U-Net baseline: the same bundle with configs/regression_unet.json layered on ---

REGRESSION = "configs/regression_unet.json"


@pytest.fixture(scope="module")
def trained_regression(tmp_path_factory):
    root = tmp_path_factory.mktemp("mr2ct_regression")
    # validation after the last epoch only: the EMA (every 10 iterations) has then followed the training
    bundle_run("training", "--config_file", f"['{TRAIN}','{REGRESSION}']", "--bundle_root", str(root),
               "--max_epochs", "2", "--val_interval", "2", *FAST)
    return root


def test_regression_fragment_trains_a_u_net_with_the_bundles_trainer(trained_regression):
    root = trained_regression
    for name in ("model.pt", "checkpoint_final.pt"):
        assert (root / "models" / name).is_file(), name
    record = torch.load(root / "models" / "model.pt", weights_only=True)["_extra_state"]
    assert record["architecture"]["method"] == "regression"
    assert record["architecture"]["network"]["features"] == list(REGRESSION_PRESETS["tiny"]["features"])
    assert set(record["trained_iterations"]) == {"regression"} and record["trained_iterations"]["regression"] > 0
    assert record["validation_sampler"] is None and record["record"]["training"]["stages"] == ["regression"]
    checkpoint = torch.load(root / "models" / "checkpoint_final.pt", weights_only=True)
    assert {"network", "network_ema", "regression_optimizer", "trainer"} <= set(checkpoint)


def test_regression_fragment_inference_writes_synthetic_ct(trained_regression):
    root = trained_regression
    bundle_run("run", "--config_file", f"['{INFER}','{REGRESSION}']", "--bundle_root", str(root), *HELD_OUT)
    cases = sorted(p.name for p in (root / "eval").iterdir())
    assert len(cases) == 2
    for case in cases:
        sct = nib.load(root / "eval" / case / "sct.nii.gz")
        mr = nib.load(root / "data" / "demo" / "Task1" / "brain" / case / "mr.nii.gz")
        assert sct.get_data_dtype() == np.int16 and sct.shape == mr.shape
        values = np.asarray(sct.dataobj)
        assert values.min() >= -1024 and values.max() <= 3000 and values.std() > 0


def test_a_conditional_noise_stage_trains_on_pairs_and_translates(tmp_path):
    """--noise_conditional True (the reference code's choice): the noise network reads [y_t, MR], so it
    trains on the pairs (the target-only pool has no MR) and inference gives it the MR."""
    bundle_run("training", "--config_file", TRAIN, "--bundle_root", str(tmp_path), "--noise_conditional", "True",
               "--max_epochs", "2", "--val_interval", "2", *FAST)
    record = torch.load(tmp_path / "models" / "model.pt", weights_only=True)["_extra_state"]
    assert record["architecture"]["noise_conditional"] is True and record["trained_iterations"]["noise"] > 0
    bundle_run("run", "--config_file", INFER, "--bundle_root", str(tmp_path), *HELD_OUT)
    assert len(list((tmp_path / "eval").glob("*/sct.nii.gz"))) == 2


# --- the conditional-DDIM baseline: configs/conditional_ddim.json layered on the same bundle --------

CDDIM = "configs/conditional_ddim.json"


def test_conditional_ddim_fragment_trains_and_translates_through_the_bundle(tmp_path):
    # two epochs: enough iterations for the EMA (every 10) to follow the training, as model.pt holds it
    bundle_run("training", "--config_file", f"['{TRAIN}','{CDDIM}']", "--bundle_root", str(tmp_path),
               "--max_epochs", "2", "--val_interval", "2", *FAST)
    record = torch.load(tmp_path / "models" / "model.pt", weights_only=True)["_extra_state"]
    assert record["architecture"]["method"] == "cddim" and record["trained_iterations"]["denoise"] > 0
    assert record["validation_sampler"]["sampler"] == "ddim" and record["validation_sampler"]["steps"] == 4
    assert record["architecture"]["prediction"] == record["validation_sampler"]["prediction"] == "sample"
    assert {"denoise_optimizer", "network_ema"} <= set(torch.load(tmp_path / "models" / "checkpoint_final.pt",
                                                                   weights_only=True))
    bundle_run("run", "--config_file", f"['{INFER}','{CDDIM}']", "--bundle_root", str(tmp_path), *HELD_OUT)
    cases = sorted(p.name for p in (tmp_path / "eval").iterdir())
    assert len(cases) == 2
    sct = nib.load(tmp_path / "eval" / cases[0] / "sct.nii.gz")
    assert sct.get_data_dtype() == np.int16 and np.asarray(sct.dataobj).std() > 0
    # the DRDD inference config alone refuses the model instead of sampling it with the wrong method
    log = bundle_run("run", "--config_file", INFER, "--bundle_root", str(tmp_path), "--output_dir",
                     str(tmp_path / "other"), *HELD_OUT, expect_ok=False)
    assert "model.pt: a cddim model cannot be sampled with the drdd sampler" in log
    assert not (tmp_path / "other").exists()


# --- bad input through the training pipeline: clear errors naming the case, nothing written -------


def _train_parser(dataset_dir, **overrides):
    parser = ConfigParser()
    parser.read_config(str(BUNDLE / "configs" / "train.json"))
    parser.update({"bundle_root": str(dataset_dir.parent / "bundle"), "dataset_dir": str(dataset_dir),
                   "num_validation": 1, "network_preset": "tiny", **overrides})
    return parser


@pytest.fixture()
def demo_copy(tmp_path):
    write_demo_dataset(tmp_path / "data", num_paired=3, num_unpaired=0, shape=(32, 32, 8), spacing=(6, 6, 18))
    return tmp_path / "data"


def test_a_user_folder_without_cases_gets_the_layouts_not_demo_data(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not a dataset")
    err = config_error(_train_parser(tmp_path / "empty"), "datalists")
    assert isinstance(err, DRDDInputError) and "holds no Task1 cases in a layout drdd_med reads" in str(err)
    assert "SynthRAD2023" in str(err) and "SynthRAD2025" in str(err)
    assert [p.name for p in (tmp_path / "empty").iterdir()] == ["notes.txt"]  # nothing generated there


def test_source_and_target_on_different_grids(demo_copy):
    case = demo_copy / "Task1" / "brain" / "1BA002"
    ct = nib.load(case / "ct.nii.gz")
    nib.save(nib.Nifti1Image(np.asarray(ct.dataobj)[:, :, :-1], ct.affine), case / "ct.nii.gz")
    err = config_error(_train_parser(demo_copy, num_validation=0), "train#paired_dataset")
    assert isinstance(err, GridMismatchError) and "1BA002" in str(err) and "shape" in str(err)


def test_nan_voxels(demo_copy):
    case = demo_copy / "Task1" / "brain" / "1BA001"
    mr = nib.load(case / "mr.nii.gz")
    data = np.asarray(mr.dataobj).copy()
    data[5, 5, 5] = np.nan
    nib.save(nib.Nifti1Image(data, mr.affine), case / "mr.nii.gz")
    err = config_error(_train_parser(demo_copy, num_validation=0), "train#paired_dataset")
    assert isinstance(err, NonFiniteError) and "1BA001/source" in str(err) and "NaN" in str(err)


def test_missing_image_of_a_case(demo_copy):
    (demo_copy / "Task1" / "brain" / "1BA003" / "mr.nii.gz").unlink()
    err = config_error(_train_parser(demo_copy), "datalists")
    assert isinstance(err, DRDDInputError) and "1BA003" in str(err) and "no mr image" in str(err)
    assert not (demo_copy.parent / "bundle").exists()
