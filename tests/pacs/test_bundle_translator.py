"""BundleTranslator: the bundle's own inference objects on a DICOM-read volume, identified by version."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pacs_helpers import ROOT, SHAPE, write_demo_study

from drdd_med.bundle import BundleTranslator, resolve_bundle
from drdd_med.data.dicom import read_dicom_series
from drdd_med.data.writers import to_int16_hu
from drdd_med.networks import DRDDNetworks


def test_bundles_resolve_by_name_or_path_and_refuse_unknown_ones(tmp_path):
    assert resolve_bundle("drdd_mr2ct") == resolve_bundle(ROOT / "bundles" / "drdd_mr2ct")
    with pytest.raises(FileNotFoundError, match="no bundle"):
        resolve_bundle("no_such_bundle")
    with pytest.raises(FileNotFoundError, match="no bundle"):
        resolve_bundle(tmp_path)


def test_dicom_volume_translates_exactly_as_the_bundle_nifti_path(tmp_path, translator, nifti_reference):
    files, _ = write_demo_study(tmp_path, seed=1)
    volume = read_dicom_series(files[0].parent)
    synthetic = translator.translate(volume)
    assert synthetic.shape == SHAPE and synthetic.dtype == np.float32
    assert synthetic.min() >= -1024 and synthetic.max() <= 3000
    np.testing.assert_array_equal(to_int16_hu(synthetic), nifti_reference(1))


def test_model_version_names_bundle_version_and_weights(tmp_path, translator, tiny_model):
    assert translator.model_name == "drdd_mr2ct" and translator.source_modality == "MR"
    assert translator.model_version.startswith("0.1.0+") and len(translator.model_version) <= 64
    torch.manual_seed(1)
    other = tmp_path / "other.pt"
    torch.save(DRDDNetworks.from_preset("tiny").state_dict(), other)
    retrained = BundleTranslator("drdd_mr2ct", device="cpu", preset="tiny", ckpt=other, batch_size=3)
    assert retrained.model_version != translator.model_version  # new weights: new synthetic series UIDs
    assert retrained.inferer.slice_batch_size == 3 and not retrained.inferer.progress


def test_missing_weights_wrong_preset_and_absent_gpu_are_refused(tmp_path, tiny_model):
    with pytest.raises(FileNotFoundError, match="no trained weights"):
        BundleTranslator("drdd_mr2ct", device="cpu", preset="tiny", ckpt=tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="does not match"):
        BundleTranslator("drdd_mr2ct", device="cpu", preset="cpu-demo", ckpt=tiny_model["ckpt"])
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA"):
            BundleTranslator("drdd_mr2ct", device="cuda", preset="tiny", ckpt=tiny_model["ckpt"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_translation_is_close_to_cpu(tmp_path, translator, tiny_model):
    files, _ = write_demo_study(tmp_path, seed=1)
    volume = read_dicom_series(files[0].parent)
    gpu = BundleTranslator("drdd_mr2ct", device="cuda", preset="tiny", ckpt=tiny_model["ckpt"])
    assert gpu.precision == "bf16"  # the bundle's GPU rule
    difference = np.abs(gpu.translate(volume) - translator.translate(volume))
    assert np.median(difference) < 50  # bf16 autocast: close, not equal
