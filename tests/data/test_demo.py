"""The demo head phantoms: anatomy, intensities, variation, the dataset layout and its command."""

import logging

import nibabel as nib
import numpy as np
import pytest
from monai.transforms import LoadImage

from drdd_med.cli import main
from drdd_med.data import demo
from drdd_med.data.demo import generate_head_phantom, has_demo_dataset, write_demo_dataset
from drdd_med.errors import OutputExistsError

SMALL = {"shape": (32, 32, 16), "spacing": (6.0, 6.0, 9.0)}


@pytest.fixture(scope="module")
def phantom():
    return generate_head_phantom(0)


def _median_ct(phantom, *tissues):
    return float(np.median(phantom["ct"][np.isin(phantom["labels"], tissues)]))


def _files(root):
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def test_same_seed_gives_identical_arrays_and_other_seeds_differ(phantom):
    again = generate_head_phantom(0)
    for key in ("mr", "ct", "mask", "affine", "labels"):
        np.testing.assert_array_equal(phantom[key], again[key])
    other = generate_head_phantom(1)
    assert not np.array_equal(phantom["mask"], other["mask"])
    assert np.abs(phantom["ct"] - other["ct"]).mean() > 50


def test_shapes_dtypes_and_centred_ras_affine(phantom):
    assert {key: phantom[key].dtype for key in ("mr", "ct", "mask", "labels")} == {
        "mr": np.float32, "ct": np.float32, "mask": np.uint8, "labels": np.uint8
    }
    assert phantom["mr"].shape == phantom["ct"].shape == phantom["mask"].shape == (96, 96, 48)
    affine = phantom["affine"]
    np.testing.assert_allclose(np.diag(affine)[:3], (2.0, 2.0, 3.0))
    np.testing.assert_allclose(affine @ [47.5, 47.5, 23.5, 1.0], [0, 0, 0, 1], atol=1e-9)
    assert set(np.unique(phantom["mask"])) == {0, 1}
    odd = generate_head_phantom(3, shape=(41, 37, 23), spacing=(4.5, 5.0, 6.5))
    assert odd["ct"].shape == (41, 37, 23) and odd["mask"].any()


def test_ct_in_hounsfield_units_per_tissue(phantom):
    ct = phantom["ct"]
    assert ct.min() >= -1024 and ct.max() <= 3071
    assert np.all(ct[phantom["mask"] == 0] == -1000)
    assert _median_ct(phantom, demo.CORTICAL_BONE, demo.MARROW) > 700
    assert 1100 < _median_ct(phantom, demo.CORTICAL_BONE) < 1900
    assert 20 < _median_ct(phantom, demo.GREY_MATTER, demo.WHITE_MATTER, demo.DEEP_GREY) < 50
    assert -140 < _median_ct(phantom, demo.FAT) < -50
    assert _median_ct(phantom, demo.SINUS_AIR) < -500
    soft = ct[phantom["labels"] == demo.WHITE_MATTER]
    assert 8 < soft.std() < 30  # noise of a CT, not a noiseless label map


def test_mask_covers_the_head_with_a_margin(phantom):
    head = phantom["labels"] > 0
    mask = phantom["mask"].astype(bool)
    assert not np.any(head & ~mask)
    assert mask.sum() > head.sum() * 1.03
    assert 0.2 < mask.mean() < 0.8


def test_mr_is_not_a_monotone_function_of_ct(phantom):
    inside = phantom["mask"].astype(bool)
    mr, ct = phantom["mr"][inside], phantom["ct"][inside]
    darkest = mr <= np.quantile(mr, 0.1)
    assert np.count_nonzero(ct[darkest] < -500) > 1000
    assert np.count_nonzero(ct[darkest] > 700) > 100
    # Bone and air both sit in the dark half of the MR, at opposite ends of the HU scale.
    assert np.median(mr[ct > 700]) < np.median(mr) and np.median(mr[ct < -500]) < np.median(mr)
    assert phantom["mr"][~inside].max() == 0
    assert np.median(mr[phantom["labels"][inside] == demo.WHITE_MATTER]) > np.median(
        mr[phantom["labels"][inside] == demo.GREY_MATTER]
    ) > np.median(mr[phantom["labels"][inside] == demo.CSF])


def test_subjects_differ_in_size_and_pose():
    masks = [generate_head_phantom(seed)["mask"].astype(bool) for seed in range(4)]
    volumes = sorted(int(m.sum()) for m in masks)
    assert volumes[-1] > volumes[0] * 1.1
    boxes = {tuple(np.concatenate([np.argwhere(m).min(0), np.argwhere(m).max(0)])) for m in masks}
    assert len(boxes) == 4


def test_anatomy_is_defined_in_mm_not_voxels():
    coarse = generate_head_phantom(2)
    fine = generate_head_phantom(2, shape=(128, 128, 72), spacing=(1.5, 1.5, 2.0))
    head_ml = [(p["labels"] > 0).sum() * np.prod(np.diag(p["affine"])[:3]) / 1000 for p in (coarse, fine)]
    assert head_ml[1] == pytest.approx(head_ml[0], rel=0.03)


def test_dataset_layout_and_files_readable_with_monai(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="drdd_med.data.demo"):
        summary = write_demo_dataset(tmp_path, num_paired=2, num_unpaired=2, seed=5, **SMALL)
    assert len([r for r in caplog.records if r.name == "drdd_med.data.demo"]) == 1
    assert _files(tmp_path) == [
        demo.MANIFEST_NAME,
        "Task1/brain/1BA001/ct.nii.gz",
        "Task1/brain/1BA001/mask.nii.gz",
        "Task1/brain/1BA001/mr.nii.gz",
        "Task1/brain/1BA002/ct.nii.gz",
        "Task1/brain/1BA002/mask.nii.gz",
        "Task1/brain/1BA002/mr.nii.gz",
        "ct_pool/1BP001.nii.gz",
        "ct_pool/1BP002.nii.gz",
    ]
    assert summary["num_paired"] == 2 and summary["num_unpaired"] == 2
    assert summary["paired"][1] == {
        "id": "1BA002",
        "mr": "Task1/brain/1BA002/mr.nii.gz",
        "ct": "Task1/brain/1BA002/ct.nii.gz",
        "mask": "Task1/brain/1BA002/mask.nii.gz",
    }
    assert summary["unpaired"][0] == {"id": "1BP001", "ct": "ct_pool/1BP001.nii.gz"}
    assert has_demo_dataset(tmp_path)

    case = tmp_path / "Task1/brain/1BA001"
    stored = {name: nib.load(case / f"{name}.nii.gz").get_data_dtype() for name in ("mr", "ct", "mask")}
    assert stored == {"mr": np.float32, "ct": np.int16, "mask": np.uint8}
    expected_affine = demo.demo_affine(**SMALL)
    ct = LoadImage(image_only=True)(str(case / "ct.nii.gz"))
    np.testing.assert_allclose(ct.affine.numpy(), expected_affine, atol=1e-5)
    assert tuple(ct.shape) == SMALL["shape"]
    mask = np.asarray(LoadImage(image_only=True)(str(case / "mask.nii.gz")))
    assert np.all(np.asarray(ct)[mask == 0] == -1000)
    pool_ct = np.asarray(LoadImage(image_only=True)(str(tmp_path / "ct_pool/1BP001.nii.gz")))
    assert not np.array_equal(pool_ct, np.asarray(ct))  # the pool holds other subjects


def test_same_seed_writes_identical_voxels(tmp_path):
    for name in ("a", "b"):
        write_demo_dataset(tmp_path / name, num_paired=1, num_unpaired=1, seed=3, **SMALL)
    for relative in _files(tmp_path / "a"):
        if relative.endswith(".nii.gz"):
            np.testing.assert_array_equal(
                np.asanyarray(nib.load(tmp_path / "a" / relative).dataobj),
                np.asanyarray(nib.load(tmp_path / "b" / relative).dataobj),
            )


def test_refuses_an_existing_dataset_unless_overwrite(tmp_path):
    write_demo_dataset(tmp_path, num_paired=3, num_unpaired=2, **SMALL)
    with pytest.raises(OutputExistsError, match=str(tmp_path)):
        write_demo_dataset(tmp_path, num_paired=3, num_unpaired=2, **SMALL)
    write_demo_dataset(tmp_path, num_paired=1, num_unpaired=1, overwrite=True, **SMALL)
    assert _files(tmp_path) == [
        demo.MANIFEST_NAME,
        "Task1/brain/1BA001/ct.nii.gz",
        "Task1/brain/1BA001/mask.nii.gz",
        "Task1/brain/1BA001/mr.nii.gz",
        "ct_pool/1BP001.nii.gz",
    ]


def test_rerun_after_an_interrupted_run(tmp_path, monkeypatch):
    real_write = demo.write_volume
    calls = []

    def crash_on_fifth_file(*args, **kwargs):
        calls.append(args[2])
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real_write(*args, **kwargs)

    monkeypatch.setattr(demo, "write_volume", crash_on_fifth_file)
    with pytest.raises(KeyboardInterrupt):
        write_demo_dataset(tmp_path, num_paired=2, num_unpaired=1, **SMALL)
    monkeypatch.setattr(demo, "write_volume", real_write)
    (tmp_path / "Task1/brain/1BA002/.mr.nii.gz.abc.partial.nii.gz").write_bytes(b"killed mid-write")
    assert not has_demo_dataset(tmp_path)
    with pytest.raises(OutputExistsError, match="partially written.*--overwrite"):
        write_demo_dataset(tmp_path, num_paired=2, num_unpaired=1, **SMALL)
    write_demo_dataset(tmp_path, num_paired=2, num_unpaired=1, overwrite=True, **SMALL)
    assert has_demo_dataset(tmp_path)
    assert len(_files(tmp_path)) == 1 + 6 + 1


def test_never_overwrites_data_it_did_not_write(tmp_path):
    foreign = tmp_path / "Task1/brain/1BA001/ct.nii.gz"
    foreign.parent.mkdir(parents=True)
    foreign.write_bytes(b"a real patient")
    for overwrite in (False, True):
        with pytest.raises(OutputExistsError, match="did not write"):
            write_demo_dataset(tmp_path, num_paired=1, num_unpaired=0, overwrite=overwrite, **SMALL)
    assert foreign.read_bytes() == b"a real patient"


@pytest.mark.parametrize(
    "kwargs", [{"num_paired": -1}, {"num_paired": 0, "num_unpaired": 0}, {"shape": (32, 32)}, {"spacing": (1, 0, 1)}]
)
def test_rejects_invalid_arguments(tmp_path, kwargs):
    with pytest.raises(ValueError):
        write_demo_dataset(tmp_path, **{**SMALL, **kwargs})


def test_command_writes_then_refuses(tmp_path, capsys):
    argv = ["demo-data", str(tmp_path), "--paired", "1", "--unpaired", "1", "--shape", "32", "32", "16"]
    argv += ["--spacing", "6", "6", "9", "--seed", "2"]
    assert main(argv) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "1 paired and 1 unpaired" in out[0] and "32x32x16" in out[0]
    assert has_demo_dataset(tmp_path)
    assert main(argv) == 2
    assert "already" in capsys.readouterr().err
    assert main([*argv, "--overwrite"]) == 0


def test_command_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["demo-data", "--help"])
    assert exit_info.value.code == 0
    assert "SynthRAD2023 layout" in capsys.readouterr().out
