"""Paired-data preparation: geometry, mask, crop, registration, refusals and reruns of ``prepare-pairs``.

The synthetic pairs are one phantom defined in millimetres and sampled on two different grids (the
MR's flipped in x and y like a DICOM-derived NIfTI, the CT's finer and offset by fractions of a
voxel), so where every structure must land after resampling is known exactly.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from drdd_med.cli import main
from drdd_med.data import pairs
from drdd_med.data.datalists import synthrad_datalist
from drdd_med.data.pairs import PairCase, PairSettings, case_dir, find_pair_cases, prepare_pair, prepare_pairs
from drdd_med.data.writers import write_volume

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
IBSI = SHARED_DATA / "real_mr_ct" / "ibsi_sts"  # IBSI validation set, CC BY 3.0 (see its LICENSE to cite)
requires_ibsi = pytest.mark.skipif(
    not IBSI.is_dir(), reason=f"real IBSI MR/CT pairs not found: expected ../shared/data beside the project ({IBSI})"
)

MR_SHAPE, MR_AFFINE = (48, 44, 24), np.array([[-2.0, 0, 0, 47], [0, -2.0, 0, 43], [0, 0, 3.0, -36], [0, 0, 0, 1]])
CT_SHAPE, CT_AFFINE = (72, 68, 32), np.array([[1.5, 0, 0, -53.3], [0, 1.5, 0, -50.1], [0, 0, 2.5, -40.2], [0, 0, 0, 1]])
MARKER_MM = np.array([14.0, 9.0, 6.0])
BODY_RADII_MM = np.array([30.0, 22.0, 21.0])


def _world(shape, affine) -> np.ndarray:
    """World coordinates (mm, RAS) of every voxel centre, shape ``(3, *shape)``."""
    index = np.indices(shape).reshape(3, -1)
    return (affine[:3, :3] @ index + affine[:3, 3:]).reshape(3, *shape)


def _inside_body(x, y, z) -> np.ndarray:
    return (x / BODY_RADII_MM[0]) ** 2 + (y / BODY_RADII_MM[1]) ** 2 + (z / BODY_RADII_MM[2]) ** 2 <= 1


def _phantom(shape, affine, modality: str, shift_mm=(0.0, 0.0, 0.0)) -> np.ndarray:
    """A limb-like phantom: body with a fat rim, a bone, a brighter organ, an air pocket, a couch (CT), a marker (CT).

    ``shift_mm`` moves the anatomy (patient moved between sessions); the couch stays put.
    """
    x, y, z = _world(shape, affine)
    u, v, w = x - shift_mm[0], y - shift_mm[1], z - shift_mm[2]
    ct = modality == "ct"
    image = np.full(shape, -1000.0 if ct else 0.0, dtype=np.float32)
    image[_inside_body(u, v, w)] = -100.0 if ct else 900.0  # fat
    image[_inside_body(u * 1.15, v * 1.15, w * 1.15)] = 40.0 if ct else 300.0  # muscle
    image[(u + 10) ** 2 + (v - 5) ** 2 + (w - 5) ** 2 <= 49] = 60.0 if ct else 550.0  # organ
    image[((u - 10) ** 2 + v**2 <= 36) & _inside_body(u, v, w)] = 1000.0 if ct else 60.0  # bone
    image[(u + 8) ** 2 + (v + 8) ** 2 + (w + 8) ** 2 <= 16] = -1000.0 if ct else 0.0  # air pocket
    if ct:
        image[(y >= -30) & (y <= -27)] = 200.0  # couch: not the patient, must not enter the mask
        image[np.all(np.abs(np.stack([u, v, w]) - MARKER_MM.reshape(3, 1, 1, 1)) <= 2.5, axis=0)] = 2000.0
    return image


def _write_case(folder: Path, ct_shift_mm=(0.0, 0.0, 0.0), ct_affine=CT_AFFINE, ct_shape=CT_SHAPE) -> Path:
    folder.mkdir(parents=True)
    write_volume(_phantom(MR_SHAPE, MR_AFFINE, "mr"), MR_AFFINE, folder / "mr.nii.gz", dtype=np.float32)
    write_volume(_phantom(ct_shape, ct_affine, "ct", ct_shift_mm), ct_affine, folder / "ct.nii.gz", dtype=np.float32)
    return folder


def _read(path: Path) -> tuple[np.ndarray, np.ndarray]:
    image = nib.load(path)
    return np.asarray(image.dataobj), image.affine


@pytest.fixture()
def raw(tmp_path) -> Path:
    _write_case(tmp_path / "raw" / "case_a")
    return tmp_path / "raw"


# --- geometry, crop, mask ---------------------------------------------------------------------------


def test_ct_lands_on_the_mr_grid_at_the_right_place(raw, tmp_path):
    out = tmp_path / "out"
    prepare_pair(find_pair_cases(raw)[0], out, PairSettings(margin_mm=200))  # a margin past the FOV: no crop

    ct, ct_affine = _read(case_dir(out, "case_a") / "ct.nii.gz")
    mr, mr_affine = _read(case_dir(out, "case_a") / "mr.nii.gz")
    np.testing.assert_allclose(ct_affine, MR_AFFINE, atol=1e-4)
    np.testing.assert_allclose(mr_affine, MR_AFFINE, atol=1e-4)
    assert ct.shape == mr.shape == MR_SHAPE and ct.dtype == np.int16
    np.testing.assert_array_equal(mr, _phantom(MR_SHAPE, MR_AFFINE, "mr"))  # the MR is not resampled
    marker = np.argwhere(ct > 1500).mean(axis=0)
    np.testing.assert_allclose(MR_AFFINE[:3, :3] @ marker + MR_AFFINE[:3, 3], MARKER_MM, atol=1.0)
    expected_ct = _phantom(MR_SHAPE, MR_AFFINE, "ct")
    assert np.median(np.abs(ct - expected_ct)) < 1  # same anatomy at the same places, bar partial volume


def test_crop_keeps_the_mask_with_its_margin_inside_the_common_field_of_view(tmp_path):
    # The CT stops at z = 0 mm: the MR's upper half has no CT, so the crop ends there.
    ct_shape = (CT_SHAPE[0], CT_SHAPE[1], 17)
    _write_case(tmp_path / "raw" / "half", ct_shape=ct_shape)
    out = tmp_path / "out"
    record = prepare_pair(find_pair_cases(tmp_path / "raw")[0], out, PairSettings(margin_mm=4))

    mask, affine = _read(case_dir(out, "half") / "mask.nii.gz")
    low = np.argwhere(mask).min(axis=0)
    high = np.array(mask.shape) - 1 - np.argwhere(mask).max(axis=0)
    np.testing.assert_array_equal(low, [2, 2, 2])  # ceil(4 mm / 2, 2, 3 mm) voxels of margin
    np.testing.assert_array_equal(high[:2], [2, 2])
    assert high[2] == 0  # the body is cut by the CT's edge: no margin beyond the common field of view
    ct_top_mm = CT_AFFINE[2, 3] + CT_AFFINE[2, 2] * (ct_shape[2] - 0.5)
    assert affine[2, 3] + affine[2, 2] * (mask.shape[2] - 1) <= ct_top_mm
    assert affine[2, 3] + affine[2, 2] * mask.shape[2] > ct_top_mm
    ct, _ = _read(case_dir(out, "half") / "ct.nii.gz")
    assert ct.min() >= -1024 and (ct[..., -1] > -500).any()  # real CT up to the last slice
    assert 0.4 < record["overlap_fraction"] < 0.6 and record["common_voxels"] < record["reference_voxels"]
    np.testing.assert_allclose(affine[:3, :3], MR_AFFINE[:3, :3])


def test_body_mask_is_the_body_with_holes_filled_and_without_the_couch(raw, tmp_path):
    out = tmp_path / "out"
    prepare_pair(find_pair_cases(raw)[0], out, PairSettings(margin_mm=200))
    mask, affine = _read(case_dir(out, "case_a") / "mask.nii.gz")

    body = _inside_body(*_world(mask.shape, affine))
    dice = 2 * (mask.astype(bool) & body).sum() / (mask.sum() + body.sum())
    assert dice > 0.95
    x, y, z = _world(mask.shape, affine)
    assert not mask[y < -26].any()  # the couch
    assert mask[np.argmin(np.abs(x[:, 0, 0] + 8)), np.argmin(np.abs(y[0, :, 0] + 8)), np.argmin(np.abs(z[0, 0] + 8))]


def test_ct_grid_puts_the_mr_on_the_ct_grid(raw, tmp_path):
    out = tmp_path / "out"
    prepare_pair(find_pair_cases(raw)[0], out, PairSettings(grid="ct", margin_mm=0))
    mr, affine = _read(case_dir(out, "case_a") / "mr.nii.gz")
    mask, _ = _read(case_dir(out, "case_a") / "mask.nii.gz")

    np.testing.assert_allclose(affine[:3, :3], CT_AFFINE[:3, :3], atol=1e-4)
    offset = np.linalg.solve(CT_AFFINE[:3, :3], affine[:3, 3] - CT_AFFINE[:3, 3])
    np.testing.assert_allclose(offset, np.round(offset), atol=1e-4)  # a crop of the CT grid, not a new grid
    expected = _phantom(mr.shape, affine, "mr")  # the MR's anatomy sampled on the CT grid directly
    flat = ndimage.minimum_filter(expected, size=(5, 5, 3)) == ndimage.maximum_filter(expected, size=(5, 5, 3))
    inner = flat & (mask > 0)  # voxels >= 3 mm from any tissue edge, where interpolation must be exact
    assert inner.sum() > 1000 and np.mean(np.abs(mr - expected)[inner] < 1) > 0.99  # bar the box's border


def test_output_is_a_synthrad_dataset_with_a_record(raw, tmp_path):
    out = tmp_path / "out"
    prepare_pairs(find_pair_cases(raw), out, PairSettings(region="leg"))

    items = synthrad_datalist(out)
    assert [item["case_id"] for item in items] == ["case_a"]
    record = json.loads((case_dir(out, "case_a", "leg") / "pair.json").read_text())
    assert record["mask_voxels"] == int(nib.load(items[0]["mask"]).get_fdata().sum())
    assert record["settings"]["region"] == "leg" and "mi_before" not in record


# --- reruns and refusals ----------------------------------------------------------------------------


def test_rerun_skips_finished_cases_and_overwrite_redoes_them(raw, tmp_path):
    out = tmp_path / "out"
    cases = find_pair_cases(raw)
    assert [r["status"] for r in prepare_pairs(cases, out)] == ["prepared"]
    ct_file = case_dir(out, "case_a") / "ct.nii.gz"
    stamp = ct_file.stat().st_mtime_ns

    again = prepare_pairs(cases, out, PairSettings(margin_mm=0))
    assert again[0]["status"] == "skipped" and again[0]["settings"]["margin_mm"] == 10
    assert ct_file.stat().st_mtime_ns == stamp

    redone = prepare_pairs(cases, out, PairSettings(margin_mm=0), overwrite=True)
    assert redone[0]["status"] == "prepared" and redone[0]["settings"]["margin_mm"] == 0
    assert sorted(p.name for p in case_dir(out, "case_a").parent.iterdir()) == ["case_a"]  # no staging left


def test_a_case_interrupted_while_writing_leaves_nothing(raw, tmp_path, monkeypatch):
    def disk_full(volume, affine, path, **kwargs):
        if Path(path).name == "mask.nii.gz":
            raise OSError("no space left on device")
        return write_volume(volume, affine, path, **kwargs)

    monkeypatch.setattr(pairs, "write_volume", disk_full)
    with pytest.raises(OSError, match="no space left"):
        prepare_pairs(find_pair_cases(raw), tmp_path / "out")
    assert list(case_dir(tmp_path / "out", "case_a").parent.iterdir()) == []  # no case folder, no staging folder


def _bad_nan(folder: Path) -> None:
    ct, affine = _read(folder / "ct.nii.gz")
    ct = ct.copy()
    ct[3, 4, 5] = np.nan
    write_volume(ct, affine, folder / "ct.nii.gz", dtype=np.float32, overwrite=True)


def _bad_far(folder: Path) -> None:
    far = CT_AFFINE.copy()
    far[0, 3] += 500  # half a metre to the side: no MR voxel inside the CT
    write_volume(_phantom(CT_SHAPE, far, "ct"), far, folder / "ct.nii.gz", dtype=np.float32, overwrite=True)


@pytest.mark.parametrize(
    ("spoil", "problem"),
    [
        (lambda folder: (folder / "mr.nii.gz").unlink(), "MR file mr.nii.gz is missing"),
        (_bad_nan, "CT: 1 voxel.s. are NaN or infinite"),
        (_bad_far, "MR and CT do not overlap"),
    ],
    ids=["missing", "nan", "no-overlap"],
)
def test_a_bad_case_is_refused_by_name_and_the_others_go_on(raw, tmp_path, capsys, spoil, problem):
    spoil(_write_case(raw / "case_b"))
    out = tmp_path / "out"

    assert main(["prepare-pairs", str(raw), str(out)]) == 1

    printed = capsys.readouterr().out
    assert "1 prepared, 0 skipped, 1 failed" in printed
    assert re.search(f"case case_b: {problem}", printed)
    assert sorted(p.name for p in (out / "Task1" / "body").iterdir()) == ["case_a"]  # nothing of case_b
    report = (out / "prepare_pairs.csv").read_text().splitlines()
    assert report[2].startswith("case_b,failed,case case_b: ")


def test_usage_errors_exit_2(tmp_path, capsys):
    assert main(["prepare-pairs", str(tmp_path / "out")]) == 2
    assert main(["prepare-pairs", str(tmp_path / "out"), "--pair", "a", "m", "c", "--pair", "a", "m", "c"]) == 2
    assert "given more than once: a" in capsys.readouterr().err


# --- registration -----------------------------------------------------------------------------------


def test_registration_recovers_a_known_shift(tmp_path):
    shift = np.array([4.0, -3.0, 4.5])  # mm: 2, 1.5 and 1.5 voxels of the MR grid
    _write_case(tmp_path / "raw" / "moved", ct_shift_mm=shift)
    out = tmp_path / "out"
    record = prepare_pair(find_pair_cases(tmp_path / "raw")[0], out, PairSettings(register=True, margin_mm=200))

    assert record["registration"] == "accepted" and record["mi_after"] > record["mi_before"]
    np.testing.assert_allclose(record["translation_mm"], shift, atol=1.5)  # within a voxel (2, 2, 3 mm)
    assert np.abs(record["rotation_deg"]).max() < 3
    ct, affine = _read(case_dir(out, "moved") / "ct.nii.gz")
    marker = affine[:3, :3] @ np.argwhere(ct > 1500).mean(axis=0) + affine[:3, 3]
    np.testing.assert_allclose(marker, MARKER_MM, atol=1.5)  # the anatomy is back where the MR has it
    again = prepare_pair(find_pair_cases(tmp_path / "raw")[0], out, PairSettings(register=True, margin_mm=200),
                         overwrite=True)
    assert again["translation_mm"] == record["translation_mm"]  # seeded sampling: a rerun gives the same result


def test_a_registration_that_lowers_the_metric_is_rejected(raw, tmp_path, monkeypatch):
    def astray(fixed, moving, seed=0):
        transform = sitk.Euler3DTransform()
        transform.SetTranslation((9.0, 0.0, 0.0))
        return transform

    monkeypatch.setattr(pairs, "register_rigid", astray)
    out = tmp_path / "out"
    record = prepare_pair(find_pair_cases(raw)[0], out, PairSettings(register=True, margin_mm=200))

    assert record["registration"] == "rejected" and record["mi_after"] < record["mi_before"]
    ct, affine = _read(case_dir(out, "case_a") / "ct.nii.gz")
    marker = affine[:3, :3] @ np.argwhere(ct > 1500).mean(axis=0) + affine[:3, 3]
    np.testing.assert_allclose(marker, MARKER_MM, atol=1.0)  # the scanner alignment is kept


# --- real pairs ------------------------------------------------------------------------------------


@requires_ibsi
def test_real_ibsi_pair_is_prepared_and_registration_raises_its_metric(tmp_path):
    case = PairCase("STS_002", IBSI / "STS_002" / "mr.nii.gz", IBSI / "STS_002" / "ct.nii.gz")
    record = prepare_pair(case, tmp_path, PairSettings(register=True, region="limb"))

    assert record["registration"] == "accepted" and record["mi_after"] > record["mi_before"]
    item = synthrad_datalist(tmp_path)[0]
    mr, ct, mask = (nib.load(item[key]) for key in ("source", "target", "mask"))
    source = nib.load(case.mr)
    np.testing.assert_allclose(mr.affine[:3, :3], source.affine[:3, :3], atol=1e-4)
    assert mr.shape == ct.shape == mask.shape and all(a <= b for a, b in zip(mr.shape, source.shape))
    body = np.asarray(mask.dataobj) > 0
    hu = np.asarray(ct.dataobj)[body]
    assert 0.3 < body.mean() and -200 < np.median(hu) < 200  # limb soft tissue, not air
