"""Folder evaluation: case matching, per-case CSV, JSON summary, figures, failures and skips with reasons."""

import argparse
import csv
import json
import logging
import math

import numpy as np
import pytest

from drdd_med.commands import evaluate as evaluate_command
from drdd_med.data.writers import write_volume
from drdd_med.errors import DRDDInputError, OutputExistsError
from drdd_med.evaluation import evaluate_folders, find_cases, read_volume

SHAPE = (20, 18, 12)
AFFINE = np.diag([1.0, 1.0, 2.5, 1.0])


def ct_volume(seed):
    rng = np.random.default_rng(seed)
    grid = np.meshgrid(*[np.linspace(-1, 1, n) for n in SHAPE], indexing="ij")
    body = sum(g**2 for g in grid) < 0.8
    ct = np.where(body, 40.0, -1000.0) + rng.normal(0, 10, SHAPE)
    ct[body & (grid[0] > 0.4)] = 700.0
    return np.rint(ct), body


@pytest.fixture
def synthrad_folders(tmp_path):
    """SynthRAD-layout references (ct, mask, mr) for 1BA001..1BA004 and flat predictions.

    1BA001: prediction = CT + 20 HU. 1BA002: prediction on a shifted grid. 1BA003: no prediction.
    1BA004: a NaN voxel. 1BA099: a prediction without reference.
    """
    ref_dir, pred_dir = tmp_path / "Task1" / "brain", tmp_path / "pred"
    for index, case in enumerate(["1BA001", "1BA002", "1BA003", "1BA004"]):
        ct, body = ct_volume(index)
        write_volume(ct, AFFINE, ref_dir / case / "ct.nii.gz")
        write_volume(body, AFFINE, ref_dir / case / "mask.nii.gz", dtype=np.uint8)
        write_volume(ct / 10 + 100, AFFINE, ref_dir / case / "mr.nii.gz")
        if case == "1BA001":
            write_volume(ct + 20, AFFINE, pred_dir / f"{case}_sct.nii.gz")
        elif case == "1BA002":
            shifted = AFFINE.copy()
            shifted[0, 3] = 0.5
            write_volume(ct, shifted, pred_dir / f"{case}_sct.nii.gz")
        elif case == "1BA004":
            broken = ct.astype(np.float32)
            broken[3, 3, 3] = np.nan
            write_volume(broken, AFFINE, pred_dir / f"{case}_sct.nii.gz", dtype=np.float32)
    write_volume(ct_volume(9)[0], AFFINE, pred_dir / "1BA099_sct.nii.gz")
    return pred_dir, ref_dir, tmp_path / "out"


def test_synthrad_layout_reports_every_case(synthrad_folders, caplog):
    pred_dir, ref_dir, out_dir = synthrad_folders
    with caplog.at_level(logging.INFO):
        summary = evaluate_folders(pred_dir, ref_dir, out_dir=out_dir, progress=False)

    assert summary["counts"] == {"cases": 5, "evaluated": 1, "failed": 2, "skipped": 2}
    failed = {item["case"]: item["reason"] for item in summary["failed"]}
    assert "grid differs from the reference grid" in failed["1BA002"]
    assert "NaN or infinite" in failed["1BA004"]
    skipped = {item["case"]: item["reason"] for item in summary["skipped"]}
    assert skipped == {"1BA003": "no prediction for this case", "1BA099": "no reference for this prediction"}

    mae = summary["metrics"]["mae"]
    assert mae["count"] == 1 and mae["mean"] == pytest.approx(20.0) and mae["std"] == 0.0
    assert set(mae) >= {"mean", "std", "median", "q1", "q3", "count"}
    assert summary["metrics"]["psnr"]["mean"] == pytest.approx(10 * math.log10(4024**2 / 400))
    assert summary["metrics"]["mae_bone"]["mean"] == pytest.approx(20.0)
    assert 0 < summary["metrics"]["ms_ssim"]["mean"] < 1
    assert "3071" in summary["definitions"]["ms_ssim"] and "3000" in summary["definitions"]["ssim"]
    assert json.loads((out_dir / "summary.json").read_text())["counts"] == summary["counts"]

    with open(out_dir / "metrics.csv", newline="") as handle:
        rows = {row["case"]: row for row in csv.DictReader(handle)}
    assert set(rows) == {"1BA001", "1BA002", "1BA003", "1BA004", "1BA099"}
    assert float(rows["1BA001"]["mae"]) == pytest.approx(20.0) and rows["1BA001"]["status"] == "ok"
    assert rows["1BA003"]["status"] == "skipped" and rows["1BA003"]["mae"] == ""
    assert rows["1BA002"]["status"] == "failed" and "grid" in rows["1BA002"]["reason"]

    assert (out_dir / "cases" / "1BA001.png").stat().st_size > 0
    assert (out_dir / "summary.png").stat().st_size > 0
    assert not (out_dir / "cases" / "1BA002.png").exists()
    assert str(pred_dir.parent) not in caplog.text  # case ids only, no paths from the data
    assert "1BA002" in caplog.text


def test_existing_outputs_are_never_silently_replaced(synthrad_folders):
    pred_dir, ref_dir, out_dir = synthrad_folders
    kwargs = dict(out_dir=out_dir, metrics=["mae"], figures=False, progress=False)
    evaluate_folders(pred_dir, ref_dir, **kwargs)
    before = (out_dir / "metrics.csv").read_text()
    with pytest.raises(OutputExistsError):
        evaluate_folders(pred_dir, ref_dir, **kwargs)
    assert (out_dir / "metrics.csv").read_text() == before
    assert evaluate_folders(pred_dir, ref_dir, overwrite=True, **kwargs)["counts"]["evaluated"] == 1


def test_flat_mha_folders_without_masks_score_whole_volumes(tmp_path):
    ref_dir, pred_dir = tmp_path / "ct", tmp_path / "sct"
    for index, case in enumerate(["L067", "L506"]):
        ct, _ = ct_volume(index)
        write_volume(ct, AFFINE, ref_dir / f"{case}.mha")
        write_volume(ct - 5, AFFINE, pred_dir / f"{case}.mha")
    summary = evaluate_folders(
        pred_dir, ref_dir, out_dir=tmp_path / "out", metrics=["mae", "rmse_abdomen", "psnr_redcnn"], progress=False
    )
    assert summary["counts"]["evaluated"] == 2
    assert summary["masks"].startswith("none found")
    assert summary["metrics"]["mae"]["mean"] == pytest.approx(5.0)
    assert summary["metrics"]["rmse_abdomen"]["mean"] < 5.0  # air clips to the window's floor
    assert "[-160, 240] HU" in summary["definitions"]["psnr_redcnn"]
    assert (tmp_path / "out" / "cases" / "L067.png").exists()


def test_explicit_mask_folder_requires_a_mask_per_case(synthrad_folders, tmp_path):
    pred_dir, ref_dir, out_dir = synthrad_folders
    mask_dir = tmp_path / "masks"
    mask_dir.mkdir()
    summary = evaluate_folders(pred_dir, ref_dir, mask_dir=mask_dir, out_dir=out_dir, metrics=["mae"],
                               figures=False, progress=False)
    assert summary["counts"]["evaluated"] == 0
    assert {"case": "1BA001", "reason": "no mask for this case"} in summary["skipped"]


def test_case_matching_rules(tmp_path):
    write_volume(np.zeros(SHAPE), AFFINE, tmp_path / "2ABA002" / "cbct.mha")
    write_volume(np.zeros(SHAPE), AFFINE, tmp_path / "2ABA002" / "ct.mha")
    write_volume(np.zeros(SHAPE), AFFINE, tmp_path / "2ABA002" / "ct_def.mha")
    write_volume(np.zeros(SHAPE), AFFINE, tmp_path / "case7_ct.nii.gz")
    write_volume(np.zeros(SHAPE), AFFINE, tmp_path / "case7_mask.nii.gz")
    write_volume(np.zeros(SHAPE), AFFINE, tmp_path / "case8.nii.gz")
    write_volume(np.zeros(SHAPE), AFFINE, tmp_path / "case8.mha")
    found, ambiguous = find_cases(tmp_path, "reference")
    assert {case: path.name for case, path in found.items()} == {"2ABA002": "ct.mha", "case7": "case7_ct.nii.gz"}
    assert ambiguous == {"case8": "2 candidate reference files (.mha, .nii.gz); keep one"}
    assert find_cases(tmp_path, "source")[0]["2ABA002"].name == "cbct.mha"
    assert set(find_cases(tmp_path, "mask")[0]) == {"case7"}


def test_read_volume_returns_the_written_grid(tmp_path):
    affine = np.array([[0.9, 0, 0, -10], [0, -1.1, 0, 20], [0, 0, 2.5, 30], [0, 0, 0, 1]])
    volume = np.arange(np.prod(SHAPE)).reshape(SHAPE) % 1000
    for name in ("v.nii.gz", "v.mha"):
        write_volume(volume, affine, tmp_path / name)
        array, read_affine = read_volume(tmp_path / name)
        np.testing.assert_array_equal(array, volume)
        np.testing.assert_allclose(read_affine, affine, atol=1e-5)


def test_unknown_metric_and_empty_folders_are_errors(tmp_path):
    with pytest.raises(DRDDInputError, match="unknown metric"):
        evaluate_folders(tmp_path, tmp_path, out_dir=tmp_path / "out", metrics=["ssim_liver"])
    with pytest.raises(DRDDInputError, match="no cases found"):
        evaluate_folders(tmp_path, tmp_path, out_dir=tmp_path / "out")


def test_command_line(synthrad_folders, capsys):
    pred_dir, ref_dir, out_dir = synthrad_folders
    parser = argparse.ArgumentParser()
    evaluate_command.register(parser.add_subparsers())
    args = parser.parse_args(
        ["evaluate", "--pred", str(pred_dir), "--ref", str(ref_dir), "--out", str(out_dir), "--metrics", "mae", "ssim"]
    )
    assert args.func(args) == 1  # some cases failed or were skipped
    printed = capsys.readouterr().out
    assert "evaluated 1 of 5 cases (2 failed, 2 skipped)" in printed
    assert (out_dir / "summary.json").exists() and (out_dir / "cases" / "1BA001.png").exists()
