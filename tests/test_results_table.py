"""scripts/results_table.py: the README tables come from the results files, row for row."""

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "results_table.py"
spec = importlib.util.spec_from_file_location("results_table", SCRIPT)
results_table = importlib.util.module_from_spec(spec)
spec.loader.exec_module(results_table)


def _row(method, mae, sampler=None, overrides=None):
    return {"method": method, "config": {"sampler": sampler, "overrides": overrides or {}}, "paired_fraction": 0.25,
            "budget_seconds": 420.0, "train_seconds": 420.3, "iterations": 700, "device": "cpu, 2 threads",
            "cases": ["A", "B"], "mae_hu": sum(mae) / 2, "psnr_db": 25.0, "ssim": 0.8,
            "per_case": {"mae_hu": mae, "psnr_db": [24.0, 26.0], "ssim": [0.7, 0.9]}}


def test_table_quotes_every_row_with_its_knobs_and_spread(tmp_path, capsys):
    path = tmp_path / "r.jsonl"
    rows = [_row("drdd", [100.0, 120.0], "default", {"fixed_noise_step": 50}), _row("regression", [90.0, 90.0])]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert results_table.main([str(path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[2] == ("| drdd, sampler default, fixed_noise_step 50 | 25% | 420.0 / 700 | 110.0 ± 14.1 "
                        "| 25.00 ± 1.41 | 0.800 ± 0.141 |")
    assert lines[3].startswith("| regression | 25% |") and "90.0 ± 0.0" in lines[3]
    assert "held-out cases: A, B" in lines[-1]


def test_a_perfect_case_is_counted_apart_from_the_mean_and_spread(tmp_path, capsys):
    row = _row("drdd", [0.0, 20.0])
    row.update(psnr_db=30.0, non_finite_cases={"psnr_db": 1})
    row["per_case"]["psnr_db"] = ["inf", 30.0]  # as compare_methods.py writes a +inf PSNR
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps(row) + "\n")
    assert results_table.main([str(path)]) == 0
    assert "| 10.0 ± 14.1 | 30.00 (1 of 2 cases inf) | 0.800 ± 0.141 |" in capsys.readouterr().out


def test_an_empty_file_is_refused(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(SystemExit):
        results_table.main([str(tmp_path / "empty.jsonl")])


def test_low_dose_rows_add_rmse_and_rows_name_the_sampler_that_ran(tmp_path, capsys):
    drdd = {**_row("drdd", [20.0, 22.0], "default"), "rmse_hu": 16.0, "metrics": "PSNR in the abdomen window",
            "sampler_used": {"residual_steps": 2, "noise_steps": 0, "start_scale": 0.0, "fixed_noise_step": 0}}
    drdd["per_case"]["rmse_hu"] = [15.0, 17.0]
    cddim = {**_row("cddim", [30.0, 30.0], overrides={"network_def": {"residual": {"channels": [8, 16]}}}),
             "rmse_hu": 20.0, "sampler_used": {"sampler": "ddim", "steps": 4, "prediction": "sample"}}
    cddim["per_case"]["rmse_hu"] = [20.0, 20.0]
    path = tmp_path / "ldct.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in (drdd, cddim)))
    assert results_table.main([str(path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].endswith("| SSIM | RMSE (HU) |")
    assert lines[2].startswith("| drdd, sampler default, [2+0 steps, start scale 0, fixed noise step 0] |") and lines[2].endswith(
        "| 16.0 ± 1.4 |")
    assert lines[3].startswith("| cddim, network_def (residual channels 8/16), [DDIM 4 steps, predicts sample] |")
    assert "Metrics: PSNR in the abdomen window." in lines


def test_a_file_of_several_tasks_gives_one_table_each_with_its_fragments_and_shared_stages(tmp_path, capsys):
    specific = {**_row("drdd", [200.0, 220.0], "default"), "task": "mr2ct", "metrics": "SynthRAD2023",
                "trained_iterations": {"residual": 700, "noise": 700}}
    unified = {**_row("drdd", [190.0, 210.0], "default", {"noise_prior": "/tmp/work/ct_prior/models/checkpoint_final.pt"}),
               "task": "mr2ct", "metrics": "SynthRAD2023", "trained_iterations": {"residual": 650, "noise": 2100}}
    unified["config"]["fragments"] = ["configs/shared_ct_prior.json"]
    ldct = {**_row("drdd", [20.0, 22.0], "default"), "task": "ldct", "metrics": "abdomen window", "rmse_hu": 15.0}
    ldct["per_case"]["rmse_hu"] = [15.0, 15.0]
    path = tmp_path / "unified.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in (specific, unified, ldct)))
    assert results_table.main([str(path)]) == 0
    out = capsys.readouterr().out
    mr2ct, ldct_table = out.split("### ldct")
    assert mr2ct.startswith("### mr2ct") and "RMSE" not in mr2ct and "RMSE (HU)" in ldct_table
    lines = mr2ct.splitlines()
    assert lines[4].startswith("| drdd, sampler default | 25% | 420.0 / 700 |")  # equal stages: no breakdown
    assert lines[5].startswith("| drdd, sampler default, + shared_ct_prior, noise_prior checkpoint_final.pt | 25% | "
                               "420.0 / 700 (residual 650, noise 2100) |")
    assert "Metrics: SynthRAD2023." in mr2ct and "Metrics: abdomen window." in ldct_table
