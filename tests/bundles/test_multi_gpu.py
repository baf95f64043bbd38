"""configs/multi_gpu_train.json under torchrun: 2 CPU processes (gloo) train one model in lockstep.

The README's multi-GPU command with ``--nproc_per_node=2`` on the CPU: both ranks must end with
identical weights (gradients averaged by DDP, not just the same seed: each rank reads its own
shard of the data), only rank 0 writes checkpoints, and a resumed run continues on both ranks.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
TRAIN = "bundles/drdd_mr2ct/configs/train.json"
MULTI = "configs/multi_gpu_train.json"
FAST = ["--network_preset", "tiny", "--num_validation", "2", "--patches_per_volume", "2", "--val_interval", "1"]


def torchrun(fragment: Path, root: Path, *args: str) -> str:
    config = f"['{TRAIN}','{MULTI}','{fragment}']"
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "-m", "monai.bundle", "run", "training",
         "--config_file", config, "--bundle_root", str(root), *FAST, *args],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
        env={**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


def rank_weights(folder: Path) -> list[dict]:
    return [torch.load(folder / f"rank{rank}.pt", weights_only=True) for rank in (0, 1)]


def assert_identical(a: dict, b: dict) -> None:
    tensors = [k for k in a if torch.is_tensor(a[k])]
    assert tensors and set(tensors) == {k for k in b if torch.is_tensor(b[k])}
    for key in tensors:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.slow
def test_two_gloo_ranks_train_identical_weights_and_resume(tmp_path):
    root, ranks = tmp_path / "bundle", tmp_path / "ranks"
    ranks.mkdir()
    # test-only: every rank saves the weights it ends with (the bundle itself writes on rank 0 only)
    fragment = tmp_path / "save_each_rank.json"
    fragment.write_text(json.dumps({"+finalize": [
        f"$torch.save(@network.state_dict(), '{ranks}/rank' + os.environ['RANK'] + '.pt')"]}))

    log = torchrun(fragment, root, "--max_epochs", "2")
    assert "val_mae" in log
    first = rank_weights(ranks)
    assert_identical(*first)
    assert sorted(p.name for p in (root / "models").iterdir()) == [
        "checkpoint_epoch=2.pt", "checkpoint_final.pt", "model.pt"]
    final = torch.load(root / "models" / "checkpoint_final.pt", weights_only=True)
    # 14 paired demo cases, 7 per rank, 2 volumes per batch, drop_last: 3 iterations per epoch
    assert final["trainer"]["epoch_length"] == 3 and final["trainer"]["iteration"] == 2 * 3

    torchrun(fragment, root, "--max_epochs", "3", "--resume_from", str(root / "models" / "checkpoint_final.pt"))
    resumed = rank_weights(ranks)
    assert_identical(*resumed)
    assert not all(torch.equal(first[0][k], resumed[0][k]) for k in first[0] if torch.is_tensor(first[0][k]))
    final = torch.load(root / "models" / "checkpoint_final.pt", weights_only=True)
    assert final["trainer"]["max_epochs"] == 3 and final["trainer"]["iteration"] == 3 * 3
