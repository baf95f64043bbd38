"""scripts/compare_methods.py: equal wall-clock budgets, every documented field, finite scores, no silent duplicates.

The end-to-end runs train tiny DRDD, conditional-DDIM and regression models for a few seconds each on
tiny demo data (MR→CT pairs; CT volumes for low-dose CT): they check the plumbing and the record,
never image quality.
"""

import importlib.util
import json
import math
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from ignite.engine import Engine, Events

from drdd_med.data.demo import write_demo_dataset
from drdd_med.data.datalists import prepare_datalists
from drdd_med.errors import DRDDInputError
from drdd_med.handlers import TrainingBudget
from drdd_med.metrics.functional import synthrad2023_mae

ROOT = Path(__file__).resolve().parents[1]
SPEC = importlib.util.spec_from_file_location("compare_methods", ROOT / "scripts" / "compare_methods.py")
compare_methods = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(compare_methods)
FIGURE_SPEC = importlib.util.spec_from_file_location("compare_figure", ROOT / "scripts" / "compare_figure.py")
compare_figure = importlib.util.module_from_spec(FIGURE_SPEC)
FIGURE_SPEC.loader.exec_module(compare_figure)

BUDGET = 2.0
FIELDS = {"method", "config", "paired_fraction", "budget_seconds", "train_seconds", "iterations",
          "longest_iteration_seconds", "trained_iterations", "device", "inference_seconds", "cases", "mae_hu",
          "psnr_db", "ssim", "per_case", "task", "dataset", "command", "git_commit", "git_dirty", "date",
          "sampler_used", "metrics"}
SCORES = ("mae_hu", "psnr_db", "ssim")


# --- the budget handler ----------------------------------------------------------------------------


def test_training_budget_stops_after_the_iteration_that_reaches_it_and_counts_steps_only():
    step = 0.02

    def slow_step(engine, batch):
        time.sleep(step)

    engine = Engine(slow_step)
    # epoch-level work (validation, checkpoints) is not training: it must not use up the budget
    engine.add_event_handler(Events.EPOCH_COMPLETED, lambda e: time.sleep(0.1))
    budget = TrainingBudget(0.2)
    budget.attach(engine)
    started = time.perf_counter()
    engine.run(range(3), max_epochs=1000)
    wall = time.perf_counter() - started
    assert budget.seconds <= budget.elapsed < budget.seconds + budget.longest_iteration
    assert budget.iterations == engine.state.iteration and budget.longest_iteration >= step
    assert budget.elapsed - budget.longest_iteration < budget.seconds  # it stopped at the first iteration past it
    assert wall > budget.elapsed + 0.1 * (engine.state.epoch - 1)  # the epoch-level sleeps were not counted
    with pytest.raises(ValueError, match="positive number of seconds"):
        TrainingBudget(0)


# --- the results file ------------------------------------------------------------------------------


def _row(method="drdd", sampler="default", **extra):
    return {"method": method, "config": {"sampler": sampler, "seed": 0}, "paired_fraction": 1.0,
            "budget_seconds": 5.0, **extra}


def test_rows_are_appended_a_duplicate_is_refused_and_replace_replaces_only_it(tmp_path):
    out = tmp_path / "results" / "mr2ct_demo.jsonl"
    compare_methods.append_row(out, _row(mae_hu=100.0))
    compare_methods.append_row(out, _row(sampler="residual_only", mae_hu=90.0))
    assert [json.loads(line)["mae_hu"] for line in out.read_text().splitlines()] == [100.0, 90.0]
    with pytest.raises(compare_methods.OutputExistsError, match="mr2ct_demo.jsonl already holds drdd \\(default\\)"):
        compare_methods.check_duplicates(out, [_row()], replace=False)
    compare_methods.check_duplicates(out, [_row(paired_fraction=0.5)], replace=False)  # another fraction: no duplicate
    compare_methods.check_duplicates(out, [_row()], replace=True)
    compare_methods.append_row(out, _row(mae_hu=80.0))  # --replace: the old row goes, the other stays
    assert [json.loads(line)["mae_hu"] for line in out.read_text().splitlines()] == [90.0, 80.0]
    assert [p.name for p in out.parent.iterdir()] == [out.name]  # no temporary file left beside it


def test_a_damaged_results_file_is_never_rewritten(tmp_path):
    out = tmp_path / "results.jsonl"
    out.write_text(json.dumps(_row()) + "\n{half a line")
    with pytest.raises(DRDDInputError, match="results.jsonl: line 2 is not JSON"):
        compare_methods.append_row(out, _row(sampler="residual_only"))
    assert out.read_text().endswith("{half a line")


def _strict(text):
    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")
    return [json.loads(line, parse_constant=refuse) for line in text.splitlines()]


def test_a_perfect_case_keeps_its_row_its_infinite_psnr_spelled_out_and_out_of_the_mean(tmp_path):
    scores = {"mae_hu": [0.0, 10.0, 20.0], "psnr_db": [float("inf"), 30.0, 20.0], "ssim": [1.0, 0.9, 0.8]}
    summary = compare_methods.summarise(scores)
    assert summary == {"mae_hu": 10.0, "psnr_db": 25.0, "ssim": 0.9, "non_finite_cases": {"psnr_db": 1}}
    assert compare_methods.summarise({"psnr_db": [float("inf")] * 2})["psnr_db"] == float("inf")
    out = tmp_path / "results.jsonl"
    compare_methods.append_row(out, _row(**summary, per_case=scores))  # used to raise after the training
    perfect = {"psnr_db": [float("inf")]}
    compare_methods.append_row(out, _row(sampler="residual_only", **compare_methods.summarise(perfect), per_case=perfect))
    first, second = _strict(out.read_text())  # strict JSON: no Infinity / NaN tokens
    assert first["per_case"]["psnr_db"] == ["inf", 30.0, 20.0] and first["psnr_db"] == 25.0
    assert second["psnr_db"] == "inf" and second["non_finite_cases"] == {"psnr_db": 1}


# --- end to end on tiny demo data ------------------------------------------------------------------


def _args(data, out, *extra):
    return ["--dataset-dir", str(data), "--dataset-name", "demo", "--output", str(out),
            "--budget-seconds", str(BUDGET), "--num-validation", "2", "--network-preset", "tiny",
            "--method", "drdd", "--method", "cddim", "--method", "regression", "--sampler", "default",
            "--sampler", "residual_only",
            # small patches; the EMA every step, so seconds of training leave trained EMA weights to translate
            "--set", "patch_size=[32,32]", "--set", "patches_per_volume=2", "--set", "volumes_per_batch=1",
            "--set", "train#handlers#0#every=1", *extra]


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    write_demo_dataset(root / "data", num_paired=5, num_unpaired=0, shape=(32, 32, 8), spacing=(6, 6, 18))
    out = root / "results" / "mr2ct_demo.jsonl"
    assert compare_methods.main(_args(root / "data", out, "--work-dir", str(root / "work"))) == 0
    return root, out


def test_each_method_and_sampler_gets_one_row_with_every_field_and_finite_scores(compared):
    root, out = compared
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["method"], r["config"].get("sampler")) for r in rows] == [
        ("drdd", "default"), ("drdd", "residual_only"), ("cddim", None), ("regression", None)]
    split = prepare_datalists(root / "data", num_validation=2, seed=0)
    held_out = sorted(item["case_id"] for item in split["validation"])
    for row in rows:
        assert FIELDS <= set(row), FIELDS - set(row)
        assert sorted(row["cases"]) == held_out  # the same split for every method
        for name in SCORES:
            assert math.isfinite(row[name]) and len(row["per_case"][name]) == 2
            assert row[name] == pytest.approx(sum(row["per_case"][name]) / 2)
        assert 0 < row["mae_hu"] < 3000 and 0 < row["ssim"] <= 1
        assert row["config"]["network_preset"] == "tiny" and row["config"]["overrides"]["patches_per_volume"] == 2
        assert row["dataset"] == "demo" and row["task"] == "mr2ct" and "threads" in row["device"]
        assert "--budget-seconds 2.0" in row["command"] and len(row["git_commit"] or "x" * 40) == 40
    drdd, residual_only, cddim, regression = rows
    assert drdd["config"]["sampler_settings"] == {} and residual_only["config"]["sampler_settings"] == {
        "noise_steps": 0, "start_scale": 0.0}
    # what ran is recorded: the bundle's 2 + 2 default, the variant, DDIM in as many evaluations, nothing
    assert (drdd["sampler_used"]["residual_steps"], drdd["sampler_used"]["noise_steps"]) == (2, 2)
    assert (residual_only["sampler_used"]["noise_steps"], residual_only["sampler_used"]["start_scale"]) == (0, 0.0)
    assert cddim["sampler_used"]["sampler"] == "ddim" and cddim["sampler_used"]["steps"] == 4
    assert cddim["trained_iterations"] == {"denoise": cddim["iterations"]} and regression["sampler_used"] is None
    assert "SynthRAD2023" in drdd["metrics"]
    assert drdd["mae_hu"] != residual_only["mae_hu"]  # the variants were really sampled differently
    assert drdd["trained_iterations"] == {"residual": drdd["iterations"], "noise": drdd["iterations"]}
    assert regression["trained_iterations"] == {"regression": regression["iterations"]}


def test_each_method_trains_for_the_budget_and_not_an_iteration_longer(compared):
    _, out = compared
    for row in map(json.loads, out.read_text().splitlines()):
        assert row["iterations"] >= 1
        assert BUDGET <= row["train_seconds"] < BUDGET + row["longest_iteration_seconds"] + 0.01


def test_a_rerun_with_the_same_config_is_refused_before_training(compared, capsys):
    root, out = compared
    before = out.read_bytes()
    started = time.perf_counter()
    assert compare_methods.main(_args(root / "data", out)) == 2
    assert "already holds drdd (default), drdd (residual_only), cddim, regression" in capsys.readouterr().err
    assert out.read_bytes() == before and time.perf_counter() - started < 30  # refused up front, nothing trained


def test_an_override_no_config_has_is_refused(compared, capsys):
    root, out = compared
    assert compare_methods.main(_args(root / "data", out, "--set", "learnig_rate=0.1")) == 2
    assert "--set learnig_rate: no such item in the bundle's train or inference config" in capsys.readouterr().err


def test_low_dose_ct_on_the_bundles_own_demo_data_is_scored_in_the_abdomen_window(tmp_path):
    """--task ldct without --dataset-dir: the drdd_ldct bundle writes its demo data in each method's
    folder, simulates the held-out low-dose inputs, and the rows carry the window's metrics."""
    out = tmp_path / "ldct_demo.jsonl"
    args = ["--task", "ldct", "--output", str(out), "--budget-seconds", str(BUDGET), "--num-validation", "2",
            "--network-preset", "tiny", "--method", "drdd", "--method", "regression", "--work-dir", str(tmp_path / "w"),
            "--set", "demo_cases=5", "--set", "demo_shape=[64,64,8]", "--set", "demo_spacing=[3.0,3.0,12.0]",
            "--set", "patch_size=[32,32]", "--set", "patches_per_volume=2", "--set", "volumes_per_batch=1",
            "--set", "train#handlers#0#every=1"]
    assert compare_methods.main(args) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["method"] for r in rows] == ["drdd", "regression"]
    for row in rows:
        assert row["task"] == "ldct" and row["dataset"] == "demo" and row["config"]["bundle"] == "drdd_ldct"
        assert "abdomen window [-150.0, 250.0]" in row["metrics"] and len(row["cases"]) == 2
        for name in (*SCORES, "rmse_hu"):
            assert math.isfinite(row[name]) and len(row["per_case"][name]) == 2
        assert 0 < row["ssim"] <= 1 and 0 < row["rmse_hu"] <= 400  # RMSE of values clipped to a 400 HU window
    # the bundle's default sampler: the residual stage only, from the low-dose image itself
    assert rows[0]["sampler_used"]["noise_steps"] == 0 and rows[0]["trained_iterations"]["noise"] == 0
    # each method's held-out cases are the same simulated low-dose scans
    heldout = [nib.load(tmp_path / "w" / m / "data" / "heldout" / rows[0]["cases"][0] / "ldct.nii.gz").get_fdata()
               for m in ("drdd", "regression")]
    assert np.array_equal(heldout[0], heldout[1])


def test_cbct_to_ct_scores_drdd_and_the_cbct_input_on_the_same_simulated_cases(tmp_path):
    """--task cbct2ct: the drdd_cbct2ct bundle simulates the held-out CBCTs in each method's folder;
    --method input scores those CBCTs themselves, with no training and a budget of 0."""
    out = tmp_path / "cbct2ct_demo.jsonl"
    args = ["--task", "cbct2ct", "--output", str(out), "--budget-seconds", str(BUDGET), "--num-validation", "2",
            "--network-preset", "tiny", "--method", "drdd", "--method", "input", "--work-dir", str(tmp_path / "w"),
            "--set", "demo_cases=4", "--set", "demo_shape=[64,64,8]", "--set", "demo_spacing=[3.0,3.0,12.0]",
            # a cheaper simulated scanner: the plumbing, not the CBCT, is under test
            "--set", 'cbct_parameters={"n_views": 164, "fov_diameter_mm": 250.0}',
            "--set", "patch_size=[32,32]", "--set", "patches_per_volume=2", "--set", "volumes_per_batch=1",
            "--set", "train#handlers#0#every=1"]
    assert compare_methods.main(args) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["method"] for r in rows] == ["drdd", "input"]
    drdd, cbct = rows
    for row in rows:
        assert row["task"] == "cbct2ct" and row["config"]["bundle"] == "drdd_cbct2ct" and "SynthRAD2023" in row["metrics"]
        assert FIELDS <= set(row) and len(row["cases"]) == 2
        assert all(math.isfinite(row[name]) and len(row["per_case"][name]) == 2 for name in SCORES)
    assert drdd["iterations"] >= 1 and drdd["budget_seconds"] == BUDGET
    assert cbct["iterations"] == 0 and cbct["budget_seconds"] == 0 and cbct["sampler_used"] is None
    assert cbct["cases"] == drdd["cases"]
    # the input row scores the held-out CBCT against its CT, and both methods' CBCTs are the same scans
    case = cbct["cases"][0]
    scans = [{n: nib.load(tmp_path / "w" / m / "data" / "heldout" / case / f"{n}.nii.gz").get_fdata()
              for n in ("cbct", "ct", "mask")} for m in ("drdd", "input")]
    assert np.array_equal(scans[0]["cbct"], scans[1]["cbct"])
    expected = synthrad2023_mae(scans[1]["cbct"], scans[1]["ct"], scans[1]["mask"])
    assert cbct["per_case"]["mae_hu"][0] == pytest.approx(expected)


def test_the_input_of_an_mr_to_ct_task_is_not_a_ct_to_score(tmp_path, capsys):
    with pytest.raises(SystemExit):
        compare_methods.main(["--output", str(tmp_path / "x.jsonl"), "--budget-seconds", "1", "--method", "input"])
    assert "the mr2ct source is not a CT" in capsys.readouterr().err


def test_the_figure_shows_each_kept_output_of_a_held_out_case_and_never_overwrites(compared, capsys):
    root, out = compared
    case = json.loads(out.read_text().splitlines()[0])["cases"][0]
    png = root / "figure.png"
    args = ["--dataset-dir", str(root / "data"), "--case", case, "--output", str(png),
            "--panel", f"DRDD={root / 'work' / 'drdd' / 'default'}",
            "--panel", f"U-Net={root / 'work' / 'regression' / 'translation'}"]
    assert compare_figure.main(args) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    before = png.read_bytes()
    assert compare_figure.main(args) == 2 and "exists" in capsys.readouterr().err
    assert png.read_bytes() == before
    other = ["--dataset-dir", str(root / "data"), "--case", "NOPE", "--output", str(root / "other.png"), *args[6:]]
    assert compare_figure.main(other) == 2
    assert "NOPE: no case folder of this id" in capsys.readouterr().err and not (root / "other.png").exists()


def test_git_dirty_means_code_differs_from_the_commit_not_results_or_docs(tmp_path, monkeypatch):
    import subprocess

    def git(*args):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True,
                       capture_output=True)

    (tmp_path / "docs" / "results").mkdir(parents=True)
    (tmp_path / "docs" / "results" / "r.jsonl").write_text("{}\n")
    (tmp_path / "README.md").write_text("a\n")
    (tmp_path / "code.py").write_text("x = 1\n")
    git("init", "-q")
    git("add", "-A")
    git("commit", "-qm", "c")
    monkeypatch.setattr(compare_methods, "ROOT", tmp_path)
    (tmp_path / "docs" / "results" / "r.jsonl").write_text("{}\n{}\n")  # a row appended, not yet committed
    (tmp_path / "README.md").write_text("b\n")
    assert compare_methods.git_commit()["git_dirty"] is False
    (tmp_path / "code.py").write_text("x = 2\n")
    assert compare_methods.git_commit()["git_dirty"] is True
