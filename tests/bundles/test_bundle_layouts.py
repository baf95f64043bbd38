"""What every bundle must have: MONAI's layout, metadata that verifies offline, the keys users override."""

import subprocess
import sys
from pathlib import Path

import pytest
from config_errors import config_error
from monai.bundle import ConfigParser

ROOT = Path(__file__).resolve().parents[2]
BUNDLES = {
    "drdd_mr2ct": (),
    "drdd_ldct": ("configs/mayo.json", "configs/two_stage.json"),
    "drdd_cbct2ct": ("configs/two_stage.json",),
}
COMMON = ("LICENSE", "large_files.yml", "docs/README.md", "configs/metadata.json", "configs/train.json",
          "configs/inference.json", "configs/evaluate.json", "configs/logging.conf")


@pytest.mark.parametrize("bundle", BUNDLES)
def test_metadata_verifies_offline(bundle):
    schema = ROOT.parent / "shared" / "monai" / "meta_schema_20240725.json"
    schema = schema if schema.exists() else ROOT / "tests" / "meta_schema_20240725.json"
    result = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "verify_metadata", "--meta_file",
         str(ROOT / "bundles" / bundle / "configs" / "metadata.json"), "--filepath", str(schema)],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert result.returncode == 0 and "metadata is verified with no error" in result.stdout + result.stderr


@pytest.mark.parametrize("bundle", BUNDLES)
def test_bundle_layout(bundle):
    root = ROOT / "bundles" / bundle
    for name in (*COMMON, *BUNDLES[bundle]):
        assert (root / name).is_file(), name
    train = ConfigParser.load_config_file(root / "configs" / "train.json")
    for key in ("bundle_root", "dataset_dir", "output_dir", "device", "network_def", "max_epochs", "training", "run"):
        assert key in train, key
    assert "trainer" in train["train"] and "evaluator" in train["validate"]
    assert train["bundle_root"] == f"bundles/{bundle}"


# What the bundles' train.json share: each bundle stays a complete folder (no base file outside it),
# so this keeps a fix in one from being forgotten in the others. Task-specific ids (data, transforms,
# metrics, sampler, model record) are the ones left out.
SHARED_TRAINING_IDS = (
    "imports", "ckpt_dir", "output_dir", "demo_dir", "dataset_dir", "seed", "determinism", "device", "precision",
    "network_preset", "spatial_dims", "context_slices", "roi_size", "patch_size", "patches_per_volume",
    "volumes_per_batch", "num_workers", "max_epochs", "max_training_minutes", "val_interval", "learning_rate", "residual_loss",
    "overwrite", "resume_from", "network_def", "network", "network_ema", "schedule",
    "train#paired_loader", "train#pool_loader", "train#residual_optimizer", "train#noise_optimizer",
    "train#handlers", "train#checkpoint_state", "train#checkpoint_loader", "train#checkpoint_saver", "train#trainer",
    "validate#dataset", "validate#loader", "validate#inferer", "validate#handlers", "initialize", "run", "training",
)


def test_bundles_share_one_training_skeleton():
    configs = []
    for bundle in BUNDLES:
        parser = ConfigParser()
        parser.read_config(str(ROOT / "bundles" / bundle / "configs" / "train.json"))
        configs.append(parser)
    first, *others = BUNDLES
    for bundle, other in zip(others, configs[1:]):
        different = [i for i in SHARED_TRAINING_IDS if configs[0].get(i) != other.get(i)]
        assert not different, f"{bundle}'s and {first}'s train.json differ in {different}: change all"


@pytest.mark.parametrize("bundle", BUNDLES)
def test_the_sampling_noise_has_its_own_seed_and_the_split_keeps_the_training_seed(bundle):
    root = ROOT / "bundles" / bundle

    def parsed(**overrides):
        parser = ConfigParser()
        parser.read_config(root / "configs" / "inference.json")
        parser.update({"bundle_root": str(root), **overrides})
        return parser

    assert parsed(seed=3).get_parsed_content("inferer").seed == 3  # by default the noise follows seed
    other = parsed(seed=3, sample_seed=7)
    assert other.get_parsed_content("inferer").seed == 7
    assert "seed=@seed" in other["datalist"] and "sample_seed" not in other["datalist"]  # the held-out cases stay
    err = config_error(parsed(sample_seed="one"), "inferer")  # --sample_seed one: refused as it is parsed
    assert isinstance(err, ValueError) and "seed must be an integer or None, got 'one'" in str(err)
