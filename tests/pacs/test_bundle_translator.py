"""BundleTranslator: the bundle's own inference objects on a DICOM-read volume, identified by version."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from model_fixtures import make_real_networks, save_model, with_zero_predictions
from monai.bundle import ConfigParser
from pacs_helpers import BUNDLE_VERSION, ROOT, SHAPE, write_demo_study

import drdd_med.bundle
import drdd_med.engines
from drdd_med.bundle import BundleTranslator, resolve_bundle
from drdd_med.data.dicom import read_dicom_series
from drdd_med.data.writers import to_int16_hu
from drdd_med.errors import DRDDInputError


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
    assert translator.model_version.startswith(f"{BUNDLE_VERSION}+") and len(translator.model_version) <= 64
    retrained = BundleTranslator("drdd_mr2ct", device="cpu", ckpt=save_model(tmp_path / "other.pt", seed=1),
                                 batch_size=3)
    assert retrained.model_version != translator.model_version  # new weights: new synthetic series UIDs
    assert retrained.inferer.slice_batch_size == 3 and not retrained.inferer.progress


def test_missing_weights_untrained_stages_and_absent_gpu_are_refused(tmp_path, tiny_model):
    with pytest.raises(FileNotFoundError, match="no trained weights"):
        BundleTranslator("drdd_mr2ct", device="cpu", ckpt=tmp_path / "missing.pt")
    residual_only = make_real_networks()
    residual_only.trained_iterations.update(residual=5)
    torch.save(residual_only.state_dict(), tmp_path / "residual_only.pt")
    with pytest.raises(ValueError, match="residual_only.pt: the sampler runs the noise stage, which this model never"):
        BundleTranslator("drdd_mr2ct", device="cpu", ckpt=tmp_path / "residual_only.pt")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA"):
            BundleTranslator("drdd_mr2ct", device="cuda", ckpt=tiny_model["ckpt"])


def test_a_model_trained_on_another_profile_needs_no_flag(tmp_path):
    """The networks come from the model record: a cpu-demo model loads although this test pins no preset."""
    model = make_real_networks("cpu-demo")
    model.trained_iterations.update(residual=1, noise=1)
    torch.save(model.state_dict(), tmp_path / "model.pt")
    translator = BundleTranslator("drdd_mr2ct", device="cpu", ckpt=tmp_path / "model.pt")
    assert list(translator.network.residual.block_out_channels) == [16, 32, 64, 128]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_translation_matches_cpu_within_bf16_rounding(tmp_path, translator, tiny_model, contribution_check):
    """The same start noise reaches both devices (drawn on the CPU), so only bf16 rounding may differ.

    bf16 keeps 8 significant bits (relative rounding 2^-9 ≈ 0.2 % per value); through the tens of layers
    of 4 network evaluations this adds up to a few per cent of what the networks contribute, so the
    GPU result must lie within 5 % of that contribution of the CPU (fp32) one.
    """
    files, _ = write_demo_study(tmp_path, seed=1)
    volume = read_dicom_series(files[0].parent)
    gpu = BundleTranslator("drdd_mr2ct", device="cuda", ckpt=tiny_model["ckpt"])
    assert gpu.precision == "bf16"  # the GPU profile
    off = BundleTranslator("drdd_mr2ct", device="cpu", ckpt=tiny_model["ckpt"])
    off.network = with_zero_predictions(off.network)
    reference, networks_off = translator.translate(volume), off.translate(volume)
    contribution_check(torch.as_tensor(gpu.translate(volume)), torch.as_tensor(reference),
                       torch.as_tensor(networks_off), fraction=0.05)


def test_the_cpu_profile_translates_in_bf16_and_trains_in_fp32(tiny_model):
    """bf16 translation is the CPU default (autocast_context keeps CPUs without native bf16 in fp32);
    training stays fp32 (docs/results/translation_precision_mr2ct.json, benchmark_cpu_bf16.json)."""
    assert BundleTranslator("drdd_mr2ct", device="cpu", ckpt=tiny_model["ckpt"]).precision == "bf16"
    for bundle in ("drdd_mr2ct", "drdd_ldct"):
        for config, precision in (("inference.json", "bf16"), ("train.json", "fp32")):
            parser = ConfigParser()
            parser.read_config(str(ROOT / "bundles" / bundle / "configs" / config))
            parser["device"] = "$torch.device('cpu')"
            assert parser.get_parsed_content("precision") == precision, (bundle, config)


@pytest.mark.parametrize("native_bf16", [False, True])
def test_the_cpu_profile_translates_channels_last_only_in_fp32(tiny_model, monkeypatch, native_bf16):
    """Channels-last weights speed up fp32 translation but slow cpu-lite's bf16 translation
    (profiles.translation_channels_last); a config override still decides."""
    monkeypatch.setattr(drdd_med.engines, "cpu_bf16_native", lambda: native_bf16)
    for bundle in ("drdd_mr2ct", "drdd_ldct", "drdd_cbct2ct"):
        parser = ConfigParser()
        parser.read_config(str(ROOT / "bundles" / bundle / "configs" / "inference.json"))
        parser["device"] = "$torch.device('cpu')"
        assert parser.get_parsed_content("channels_last") is (not native_bf16), bundle
    weight = BundleTranslator("drdd_mr2ct", device="cpu", ckpt=tiny_model["ckpt"]).network.residual.conv_in.conv.weight
    assert weight.is_contiguous(memory_format=torch.channels_last) is (not native_bf16)
    assert weight.is_contiguous() is native_bf16


def test_a_pickled_translator_is_rebuilt_once_per_process_from_the_same_weights(tmp_path, tiny_model):
    """How a Ray worker gets the model: the recipe travels, the weights are read there and must match."""
    ckpt = tmp_path / "model.pt"
    ckpt.write_bytes(tiny_model["ckpt"].read_bytes())
    translator = BundleTranslator("drdd_mr2ct", device="cpu", ckpt=ckpt)
    payload = pickle.dumps(translator)
    assert len(payload) < 10_000  # the recipe, not the weights
    first, again = pickle.loads(payload), pickle.loads(payload)
    assert first is again and first.model_version == translator.model_version
    volume = np.random.default_rng(0).normal(100, 30, SHAPE).astype(np.float32)
    np.testing.assert_array_equal(first.translate(volume), translator.translate(volume))

    save_model(ckpt, seed=1)  # other weights at the same path, as on a machine that was not updated
    drdd_med.bundle._TRANSLATORS.clear()  # as in a fresh worker process
    with pytest.raises(DRDDInputError, match=r"drdd_mr2ct here is version .*, not .* as where the run started"):
        pickle.loads(payload)
