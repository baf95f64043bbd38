"""scripts/compare_unified.py: one CT prior, then per task a task-specific and a unified row at equal training time.

Tiny networks for seconds on the demo data: this checks the plumbing and the record, never image quality.
"""

import importlib.util
import json
from pathlib import Path

from drdd_med.networks import load_model
from drdd_med.prior import weights_digest

ROOT = Path(__file__).resolve().parents[1]
SPEC = importlib.util.spec_from_file_location("compare_unified", ROOT / "scripts" / "compare_unified.py")
compare_unified = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(compare_unified)


def test_rows_at_equal_training_time_and_the_prior_the_unified_model_shares(tmp_path):
    rows_path, prior_path, work = tmp_path / "rows.jsonl", tmp_path / "prior.json", tmp_path / "work"
    argv = ["--budget-seconds", "24", "--task", "mr2ct", "--num-validation", "2", "--network-preset", "tiny",
            "--output", str(rows_path), "--prior-output", str(prior_path), "--work-dir", str(work)]
    assert compare_unified.main(argv) == 0

    specific, unified = (json.loads(line) for line in rows_path.read_text().splitlines())
    record = json.loads(prior_path.read_text())
    prior = record["prior"]
    # equal time: the task-specific model trains both networks for the budget; the unified one its
    # residual network for half of it, on a prior trained for (tasks x budget / 2)
    assert (specific["budget_seconds"], unified["budget_seconds"], prior["budget_seconds"]) == (24.0, 12.0, 12.0)
    assert "fragments" not in specific["config"]
    assert unified["config"]["fragments"] == ["configs/shared_ct_prior.json"]
    assert prior["pool_ct"]["mr2ct"] > 0 and prior["iterations"] > 0
    # the unified model carries the prior's noise network; the task-specific one trained its own
    shared = load_model(work / "mr2ct" / "unified" / "drdd" / "models" / "checkpoint_final.pt")
    own = load_model(work / "mr2ct" / "specific" / "drdd" / "models" / "checkpoint_final.pt")
    assert weights_digest(shared.noise) == prior["noise_weights_sha256"] != weights_digest(own.noise)
    assert unified["trained_iterations"]["noise"] == shared.trained_iterations["noise"] > 0
    assert unified["sampler_used"]["noise_steps"] == specific["sampler_used"]["noise_steps"] == 2
    assert specific["command"] == unified["command"] == record["command"]
    assert record["command"].startswith("python scripts/compare_unified.py --budget-seconds 24")

    # a second run is refused before anything trains, and the files stay as they were
    before = (rows_path.read_text(), prior_path.read_text())
    assert compare_unified.main(argv) == 2
    assert (rows_path.read_text(), prior_path.read_text()) == before
