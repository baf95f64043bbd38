"""Every config combination the READMEs document trains; 2.5D and 3D run end to end through the bundles.

The training commands are read from the READMEs themselves, so a documented combination that stops
parsing or training fails here. Each trains one iteration with tiny networks, in this process;
``configs/multi_gpu_train.json`` needs ``torchrun`` and is run by ``test_multi_gpu.py``.
"""

import ast
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser

ROOT = Path(__file__).resolve().parents[2]
READMES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "bundles").glob("*/docs/README.md"))]
CONFIG_LIST = re.compile(r"""training --config_file "(\[[^"]+\])\"""")
TINY = {"network_preset": "tiny", "patches_per_volume": 2, "num_validation": 2, "max_epochs": 1,
        "train#trainer#epoch_length": 1}


def documented_training_combinations() -> list[tuple[str, ...]]:
    combos = set()
    for readme in READMES:
        for match in CONFIG_LIST.finditer(readme.read_text()):
            files = tuple(ast.literal_eval(match.group(1)))  # the list literal MONAI reads
            if "configs/multi_gpu_train.json" not in files:
                combos.add(files)
    return sorted(combos)


# the CT prior's commands need a trained prior and three bundles' data: tests/bundles/test_ct_prior.py runs them
COMBINATIONS = [files for files in documented_training_combinations() if "ct_prior" not in " ".join(files)]


def test_the_readmes_document_every_fragment_on_both_bundles():
    layered = {(files[0].split("/")[1], fragment) for files in COMBINATIONS for fragment in files[1:]}
    for bundle in ("drdd_mr2ct", "drdd_ldct"):
        for fragment in ("2_5d", "3d", "cpu", "tensorboard", "regression_unet"):
            assert (bundle, f"configs/{fragment}.json") in layered, (bundle, fragment)


@pytest.fixture(scope="module")
def bundle_roots(tmp_path_factory):
    """One scratch bundle root per bundle: the demo data is generated once and shared by its combinations."""
    return {name: tmp_path_factory.mktemp(name) for name in ("drdd_mr2ct", "drdd_ldct")}


@pytest.mark.parametrize("files", COMBINATIONS, ids=lambda files: "+".join([files[0].split("/")[1], *(Path(f).stem for f in files[1:])]))
def test_documented_combination_trains_one_iteration(files, bundle_roots, tmp_path):
    if "configs/tensorboard.json" in files and importlib.util.find_spec("tensorboard") is None:
        pytest.skip("the tracking extra is not installed")
    bundle = files[0].split("/")[1]
    parser = ConfigParser()
    parser.read_config([str(ROOT / f) for f in files])
    parser.update({**TINY, "bundle_root": str(bundle_roots[bundle]), "output_dir": str(tmp_path)})
    for section in ("train", "validate"):  # load only the volumes the one iteration reads, not the cache
        for key, item in parser[section].items():
            if isinstance(item, dict) and item.get("_target_") == "CacheDataset":
                parser[f"{section}#{key}"] = {"_target_": "Dataset", "data": item["data"], "transform": item["transform"]}
    trainer = parser.get_parsed_content("train#trainer")
    trainer.run()
    assert trainer.state.iteration == 1
    losses = trainer.state.output
    assert losses and all(np.isfinite(v) and v > 0 for v in losses.values()), losses
    network = parser.get_parsed_content("network")
    expected_dims = 3 if "configs/3d.json" in files else 2
    assert network.spatial_dims == expected_dims
    assert network.context_slices == (3 if "configs/2_5d.json" in files else 1)


# --- 2.5D and 3D end to end: the bundle READMEs' commands, train -> inference -> NIfTI on the source grid,
# run from another working directory (absolute config paths and --bundle_root, as the READMEs say) ---

TRAIN = ROOT / "bundles/drdd_mr2ct/configs/train.json"
INFER = ROOT / "bundles/drdd_mr2ct/configs/inference.json"


def bundle_run(cwd: Path, *args):
    result = subprocess.run([sys.executable, "-m", "monai.bundle", "run", *args], cwd=cwd, capture_output=True,
                            text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"}, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("fragment, spatial_dims, context_slices", [
    ("configs/2_5d.json", 2, 3),
    ("configs/3d.json", 3, 1),
])
def test_2_5d_and_3d_train_and_translate_through_the_bundle(fragment, spatial_dims, context_slices, tmp_path):
    fragment, elsewhere = ROOT / fragment, tmp_path / "elsewhere"
    elsewhere.mkdir()
    bundle_run(elsewhere, "training", "--config_file", f"['{TRAIN}','{fragment}']", "--bundle_root", str(tmp_path),
               "--network_preset", "tiny", "--num_validation", "2", "--patches_per_volume", "2",
               "--max_epochs", "2", "--val_interval", "2")  # 14 iterations: the EMA (every 10) has followed
    record = torch.load(tmp_path / "models" / "model.pt", weights_only=True)["_extra_state"]
    assert record["architecture"]["spatial_dims"] == spatial_dims
    assert record["architecture"]["context_slices"] == context_slices
    bundle_run(elsewhere, "run", "--config_file", f"['{INFER}','{fragment}']", "--bundle_root", str(tmp_path),
               "--num_validation", "2")
    assert not any(elsewhere.iterdir())  # everything lands under bundle_root
    outputs = sorted((tmp_path / "eval").glob("*/sct.nii.gz"))
    assert len(outputs) == 2
    for sct_path in outputs:
        sct = nib.load(sct_path)
        mr = nib.load(tmp_path / "data" / "demo" / "Task1" / "brain" / sct_path.parent.name / "mr.nii.gz")
        assert sct.shape == mr.shape and sct.get_data_dtype() == np.int16
        np.testing.assert_allclose(sct.affine, mr.affine, atol=1e-4)
        values = np.asarray(sct.dataobj)
        assert values.min() >= -1024 and values.max() <= 3000 and values.std() > 0
