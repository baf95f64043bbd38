"""Dataset layouts -> datalists: SynthRAD, JSON, parallel folders, pool, splits, inference inputs."""

import json

import pytest

from drdd_med.data.datalists import (
    inference_datalist,
    json_datalist,
    parallel_folders_datalist,
    prepare_datalists,
    split_cases,
    split_paired_fraction,
    synthrad_datalist,
    target_pool,
)
from drdd_med.errors import DRDDInputError


def _touch(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    return path


@pytest.fixture()
def synthrad(tmp_path):
    for case in ("1BA001", "1BA002", "1BC003"):
        for name in ("mr", "ct", "mask"):
            _touch(tmp_path / "Task1" / "brain" / case / f"{name}.nii.gz")
    for case in ("1HNA001",):  # SynthRAD2025 layout, .mha
        for name in ("mr", "ct", "mask"):
            _touch(tmp_path / "Task1" / "HN" / case / f"{name}.mha")
    _touch(tmp_path / "ct_pool" / "extra1.nii.gz")
    _touch(tmp_path / "ct_pool" / "sub" / "extra2.mha")
    return tmp_path


def test_synthrad_2023_and_2025_layouts(synthrad):
    items = synthrad_datalist(synthrad)
    assert [it["case_id"] for it in items] == ["1BA001", "1BA002", "1BC003", "1HNA001"]
    assert items[-1]["source"].endswith("HN/1HNA001/mr.mha")
    assert [it["case_id"] for it in synthrad_datalist(synthrad, regions=["HN"])] == ["1HNA001"]
    assert synthrad_datalist(synthrad, task="Task2") == []


def test_synthrad_task2_reads_cbct_as_the_source(synthrad):
    """Task2 (CBCT -> CT): ``Task2/<region>/2PA001/{cbct,ct,mask}``, 2023 (.nii.gz) and 2025 (.mha) alike."""
    for region, case, suffix in (("pelvis", "2PA001", ".nii.gz"), ("pelvis", "2PC002", ".nii.gz"), ("TH", "2THA001", ".mha")):
        for name in ("cbct", "ct", "mask"):
            _touch(synthrad / "Task2" / region / case / f"{name}{suffix}")
    _touch(synthrad / "Task2" / "pelvis" / "2PA001" / "mr.nii.gz")  # another modality beside it is not the source
    items = synthrad_datalist(synthrad, task="Task2")
    assert [it["case_id"] for it in items] == ["2PA001", "2PC002", "2THA001"]
    assert items[0]["source"].endswith("Task2/pelvis/2PA001/cbct.nii.gz")
    assert items[0]["target"].endswith("2PA001/ct.nii.gz") and items[0]["mask"].endswith("2PA001/mask.nii.gz")
    assert items[-1]["source"].endswith("TH/2THA001/cbct.mha")
    assert [it["case_id"] for it in synthrad_datalist(synthrad, task="Task2", regions=["TH"])] == ["2THA001"]
    assert [it["case_id"] for it in synthrad_datalist(synthrad)] == ["1BA001", "1BA002", "1BC003", "1HNA001"]
    (synthrad / "Task2" / "pelvis" / "2PC002" / "cbct.nii.gz").unlink()
    with pytest.raises(DRDDInputError, match="case 2PC002: no cbct image"):
        synthrad_datalist(synthrad, task="Task2")


def test_synthrad_case_missing_an_image_is_named(synthrad):
    (synthrad / "Task1" / "brain" / "1BA002" / "ct.nii.gz").unlink()
    with pytest.raises(DRDDInputError, match="case 1BA002: no ct image"):
        synthrad_datalist(synthrad)


def test_pool_splits_and_paired_fraction(synthrad):
    assert [it["case_id"] for it in target_pool(synthrad / "ct_pool")] == ["extra1", "extra2"]
    items = synthrad_datalist(synthrad)
    train, val = split_cases(items, 1, seed=0)
    assert len(train) == 3 and len(val) == 1 and val[0] not in train
    assert split_cases(items, 1, seed=0) == (train, val)
    paired, pool = split_paired_fraction(train, 0.34, seed=0)
    assert len(paired) == 1 and len(pool) == 2 and set(pool[0]) == {"case_id", "target"}
    with pytest.raises(ValueError):
        split_paired_fraction(train, 0.0)
    with pytest.raises(DRDDInputError):
        split_cases(items, 4)


def test_prepare_datalists_pool_holds_all_training_targets(synthrad):
    lists = prepare_datalists(synthrad, num_validation=1, paired_fraction=0.5)
    assert len(lists["validation"]) == 1
    pool_ids = {it["case_id"] for it in lists["pool"]}
    train_ids = {it["case_id"] for it in synthrad_datalist(synthrad)} - {lists["validation"][0]["case_id"]}
    assert pool_ids == train_ids | {"extra1", "extra2"}
    assert all(it["case_id"] != lists["validation"][0]["case_id"] for it in lists["paired"])


def test_json_and_parallel_folders(tmp_path):
    src, tgt = _touch(tmp_path / "mr" / "a.nii.gz"), _touch(tmp_path / "ct" / "a.nii.gz")
    _touch(tmp_path / "mask" / "a.nii.gz")
    items = parallel_folders_datalist(tmp_path / "mr", tmp_path / "ct", tmp_path / "mask")
    assert items == [{"case_id": "a", "source": str(src), "target": str(tgt), "mask": str(tmp_path / "mask" / "a.nii.gz")}]
    _touch(tmp_path / "mr" / "b.nii.gz")
    with pytest.raises(DRDDInputError, match="source or a target but not both"):
        parallel_folders_datalist(tmp_path / "mr", tmp_path / "ct")
    (tmp_path / "list.json").write_text(json.dumps({"training": [{"source": "mr/a.nii.gz", "target": "ct/a.nii.gz"}],
                                                   "validation": [{"source": "mr/b.nii.gz"}]}))
    assert json_datalist(tmp_path / "list.json")[0]["case_id"] == "a"
    with pytest.raises(DRDDInputError, match="lacks \\['target'\\]"):
        json_datalist(tmp_path / "list.json", "validation")


def test_inference_inputs(synthrad, tmp_path):
    assert [it["case_id"] for it in inference_datalist(synthrad)][:2] == ["1BA001", "1BA002"]
    one = _touch(tmp_path / "in" / "p1.nii.gz")
    assert inference_datalist(one) == [{"case_id": "p1", "source": str(one)}]
    assert inference_datalist(tmp_path / "in") == [{"case_id": "p1", "source": str(one)}]
    held_out = inference_datalist(None, synthrad, num_validation=2)
    assert len(held_out) == 2 and all("target" in it for it in held_out)
    with pytest.raises(FileNotFoundError):
        inference_datalist(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DRDDInputError, match="no image files"):
        inference_datalist(tmp_path / "empty")


def test_demo_data_is_generated_only_at_the_bundles_demo_folder(tmp_path, monkeypatch):
    import drdd_med.data.demo as demo

    written = []
    monkeypatch.setattr(demo, "write_demo_dataset", lambda folder, **kw: written.append(folder) or {})
    (tmp_path / "user").mkdir()
    with pytest.raises(DRDDInputError, match="holds no Task1 cases in a layout drdd_med reads"):
        prepare_datalists(tmp_path / "user", demo_dir=tmp_path / "demo")
    assert not written and not any((tmp_path / "user").iterdir())
    with pytest.raises(DRDDInputError):  # the stub writes nothing, so the demo folder stays empty
        prepare_datalists(tmp_path / "demo" / ".." / "demo", demo_dir=tmp_path / "demo")
    assert written == [tmp_path / "demo" / ".." / "demo"]  # the same folder, however it is spelled


# --- bundles whose source scan is simulated from CT (drdd_ldct, drdd_cbct2ct) --------------------------


class _PlusHundred:
    """A stand-in simulator: the source is the CT + 100 HU (the recipe and the seed are what is checked)."""

    source_tag = "fake"

    def __init__(self, offset=100.0):
        self.offset = offset

    def recipe(self):
        return {"offset": self.offset}

    def simulate(self, volume_hu, spacing_mm, seed, name="volume"):
        return volume_hu + self.offset


def test_simulated_datalists_write_each_held_out_source_with_the_simulator_and_its_recipe(tmp_path):
    import nibabel as nib
    import numpy as np

    from drdd_med.data.datalists import HELDOUT_RECORD, prepare_simulated_datalists
    from drdd_med.data.demo import write_demo_dataset

    write_demo_dataset(tmp_path / "cts", num_paired=0, num_unpaired=4, shape=(24, 24, 2), spacing=(8, 8, 8))
    lists = prepare_simulated_datalists(tmp_path / "cts", tmp_path / "heldout", _PlusHundred(), num_validation=1)
    assert len(lists["paired"]) == 3 and all(set(it) == {"case_id", "target"} for it in lists["paired"])
    assert [it["case_id"] for it in lists["pool"]] == [it["case_id"] for it in lists["paired"]]
    (held,) = lists["validation"]
    assert held["source"].endswith(f"{held['case_id']}/fake.nii.gz")
    source, ct = (np.asarray(nib.load(held[k]).dataobj, np.float32) for k in ("source", "target"))
    np.testing.assert_array_equal(source, ct + 100)
    record = json.loads((tmp_path / "heldout" / held["case_id"] / HELDOUT_RECORD).read_text())
    assert record["offset"] == 100 and "seed" in record
    again = prepare_simulated_datalists(tmp_path / "cts", tmp_path / "heldout", _PlusHundred(50), num_validation=1)
    assert again["validation"] == lists["validation"]  # same case, same files: rewritten with the new recipe
    np.testing.assert_array_equal(np.asarray(nib.load(held["source"]).dataobj, np.float32), ct + 50)


def test_simulated_inference_reads_a_synthrad_task2_folder_and_the_held_out_cases(tmp_path):
    from drdd_med.data.datalists import simulated_inference_datalist

    for name in ("cbct", "ct", "mask"):
        _touch(tmp_path / "synthrad" / "Task2" / "pelvis" / "2PA001" / f"{name}.nii.gz")
    (item,) = simulated_inference_datalist(tmp_path / "synthrad", tmp_path / "cts", tmp_path / "heldout",
                                           _PlusHundred(), task="Task2")
    assert item["case_id"] == "2PA001" and item["source"].endswith("cbct.nii.gz") and item["target"].endswith("ct.nii.gz")
    with pytest.raises(DRDDInputError, match="holds no data in a layout"):  # no input: the held-out cases, none here
        simulated_inference_datalist("", tmp_path / "empty", tmp_path / "heldout", _PlusHundred())
