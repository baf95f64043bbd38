"""What every bundle must have: MONAI's layout, metadata that verifies offline, the keys users override."""

import subprocess
import sys
from pathlib import Path

import pytest
from monai.bundle import ConfigParser

ROOT = Path(__file__).resolve().parents[2]
BUNDLES = {
    "drdd_mr2ct": (),
    "drdd_ldct": ("configs/mayo.json", "configs/two_stage.json"),
}
COMMON = ("LICENSE", "docs/README.md", "configs/metadata.json", "configs/train.json", "configs/inference.json",
          "configs/evaluate.json", "configs/logging.conf")


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
