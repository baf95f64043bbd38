"""Network factory, presets and checkpoint loading (weights_only, clear errors)."""

import pytest
import torch

from drdd_med.errors import DRDDInputError
from drdd_med.diffusion import DDIMSampler, DRDDSampler, DRDDSchedule
from drdd_med.networks import (
    PRESETS,
    REGRESSION_PRESETS,
    ConditionalDiffusionNetworks,
    DRDDNetworks,
    RegressionNetworks,
    build_drdd_network,
    load_model,
    load_weights,
    network_in_channels,
    seeded_initialisation,
)


def test_in_channels_follow_the_conditioning_rules():
    assert network_in_channels("residual") == 2
    assert network_in_channels("residual", context_channels=2) == 4
    assert network_in_channels("noise") == 1
    assert network_in_channels("noise", conditional=True) == 2
    with pytest.raises(ValueError):
        network_in_channels("other")


def test_networks_map_input_and_float_time_to_image_channels():
    tiny = PRESETS["tiny"]["residual"]
    for spatial_dims, shape in ((2, (2, 2, 8, 8)), (3, (2, 2, 8, 8, 8))):
        net = build_drdd_network("residual", spatial_dims=spatial_dims, **tiny)
        out = net(torch.randn(shape), torch.tensor([12.5, 990.0]))
        assert out.shape == (2, 1, *shape[2:])
    model = DRDDNetworks.from_preset("tiny", context_slices=3, noise_conditional=True)
    assert model.residual(torch.randn(1, 4, 8, 8), torch.tensor([3.0])).shape == (1, 1, 8, 8)
    assert model.noise(torch.randn(1, 2, 8, 8), torch.tensor([3.0])).shape == (1, 1, 8, 8)


def test_factory_refuses_inconsistent_options():
    with pytest.raises(ValueError, match="divisible"):
        build_drdd_network("noise", channels=(10, 20), attention_levels=(False, False), norm_num_groups=4)
    with pytest.raises(ValueError, match="residual network only"):
        build_drdd_network("noise", context_channels=2)
    with pytest.raises(ValueError, match="unknown network preset"):
        DRDDNetworks.from_preset("huge")


def test_load_weights_round_trip(tmp_path):
    model = seeded_initialisation(DRDDNetworks.from_preset("tiny"))
    torch.save(model.state_dict(), tmp_path / "model.pt")
    other = load_weights(DRDDNetworks.from_preset("tiny"), tmp_path / "model.pt")
    for name, a in model.state_dict().items():
        assert name == "_extra_state" or torch.equal(a, other.state_dict()[name]), name
    torch.save({"network_ema": model.state_dict()}, tmp_path / "ckpt.pt")
    load_weights(DRDDNetworks.from_preset("tiny"), tmp_path / "ckpt.pt", key="network_ema")


def test_checkpoint_of_a_different_network_size_is_refused_clearly(tmp_path):
    torch.save(DRDDNetworks.from_preset("tiny").state_dict(), tmp_path / "model.pt")
    with pytest.raises(DRDDInputError, match=r"model\.pt: checkpoint does not match the configured networks"):
        load_weights(DRDDNetworks.from_preset("cpu-demo"), tmp_path / "model.pt")


def test_foreign_files_are_refused_without_executing(tmp_path):
    class Evil:
        def __reduce__(self):
            return (exec, ("raise SystemExit('executed')",))

    import pickle

    (tmp_path / "evil.pt").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(DRDDInputError, match="evil.pt: not a readable weights file"):
        load_weights(DRDDNetworks.from_preset("tiny"), tmp_path / "evil.pt")
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_weights(DRDDNetworks.from_preset("tiny"), tmp_path / "missing.pt")


def _trained_model(record=None, residual=7, noise=0, **kwargs):
    model = DRDDNetworks.from_preset("tiny", record=record, **kwargs)
    model.trained_iterations.update(residual=residual, noise=noise)
    model.validation_sampler = DRDDSampler(DRDDSchedule(), noise_steps=0).settings()
    return model


def test_checkpoint_carries_the_model_record_as_plain_types(tmp_path):
    record = {"target_normalisation": {"method": "NormalizeHU", "hu_range": [-1024, 3000]},
              "training": {"patch_size": (64, 64), "stages": ["residual"]}}
    model = _trained_model(record, context_slices=3)
    torch.save(model.state_dict(), tmp_path / "model.pt")
    saved = torch.load(tmp_path / "model.pt", weights_only=True)["_extra_state"]
    assert saved["architecture"]["context_slices"] == 3
    assert saved["architecture"]["residual"]["channels"] == [8, 16]  # the sizes themselves, not a preset name
    assert saved["trained_iterations"] == {"residual": 7, "noise": 0}
    assert saved["validation_sampler"]["noise_steps"] == 0
    assert saved["record"]["training"]["patch_size"] == [64, 64]
    assert set(saved["versions"]) == {"drdd_med", "monai", "torch"} and len(saved["config_digest"]) == 64

    loaded = load_model(tmp_path / "model.pt")
    assert loaded.context_slices == 3 and loaded.trained_iterations == {"residual": 7, "noise": 0}
    assert loaded.record == saved["record"]
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert name == "_extra_state" or torch.equal(a, b), name


def test_config_digest_follows_the_declared_training_settings():
    a = DRDDNetworks.from_preset("tiny", record={"training": {"lr": 1e-4}}).get_extra_state()
    b = DRDDNetworks.from_preset("tiny", record={"training": {"lr": 5e-4}}).get_extra_state()
    assert a["config_digest"] != b["config_digest"]


def test_a_sampler_running_an_untrained_stage_is_refused(tmp_path):
    torch.save(_trained_model().state_dict(), tmp_path / "model.pt")
    residual_only = DRDDSampler(DRDDSchedule(), noise_steps=0)
    assert load_model(tmp_path / "model.pt", sampler=residual_only).trained_iterations["residual"] == 7
    with pytest.raises(DRDDInputError, match="model.pt: the sampler runs the noise stage, which this model never trained"):
        load_model(tmp_path / "model.pt", sampler=DRDDSampler(DRDDSchedule(), noise_steps=2))


def test_a_config_contradicting_the_record_is_refused(tmp_path):
    torch.save(_trained_model().state_dict(), tmp_path / "model.pt")
    assert load_model(tmp_path / "model.pt", spatial_dims=None, context_slices=1).spatial_dims == 2
    with pytest.raises(DRDDInputError, match="spatial_dims is 2 in the model but 3 in the config"):
        load_model(tmp_path / "model.pt", spatial_dims=3)


def test_weights_without_a_record_are_refused_clearly(tmp_path):
    state = DRDDNetworks.from_preset("tiny").state_dict()
    del state["_extra_state"]
    torch.save(state, tmp_path / "old.pt")
    with pytest.raises(DRDDInputError, match="old.pt: no drdd_med model record"):
        load_model(tmp_path / "old.pt")
    with pytest.raises(DRDDInputError, match="old.pt: no drdd_med model record"):
        load_weights(DRDDNetworks.from_preset("tiny"), tmp_path / "old.pt")


def test_training_checkpoints_load_their_ema_networks(tmp_path):
    model = _trained_model()
    torch.save({"network": DRDDNetworks.from_preset("tiny").state_dict(), "network_ema": model.state_dict()},
               tmp_path / "checkpoint_final.pt")
    assert load_model(tmp_path / "checkpoint_final.pt").trained_iterations["residual"] == 7


def test_reinitialised_networks_have_real_outputs_that_depend_on_time():
    model = DRDDNetworks.from_preset("tiny").eval()
    x = torch.randn(2, 2, 16, 16)
    assert torch.count_nonzero(model.residual(x, torch.tensor([5.0, 5.0]))) == 0  # MONAI's zero output layer
    seeded_initialisation(model, seed=3)
    early, late = model.residual(x, torch.tensor([5.0, 5.0])), model.residual(x, torch.tensor([700.0, 700.0]))
    assert early.abs().mean() > 0.01 and (early - late).abs().mean() > 1e-3
    again = seeded_initialisation(DRDDNetworks.from_preset("tiny").eval(), seed=3)
    torch.testing.assert_close(again.residual(x, torch.tensor([5.0, 5.0])), early)  # seeded


# --- the regression baseline: same record, rebuilt by the same load_model ------------------------


def _parameters(module):
    return sum(p.numel() for p in module.parameters())


def test_regression_u_net_reads_source_and_context_and_outputs_image_channels():
    model = RegressionNetworks.from_preset("tiny", context_slices=3, image_channels=2)
    assert model(torch.randn(1, 6, 32, 32)).shape == (1, 2, 32, 32)  # 2 channels x 3 slices in
    volume_model = RegressionNetworks.from_preset("tiny", spatial_dims=3)
    assert volume_model(torch.randn(1, 1, 32, 32, 32)).shape == (1, 1, 32, 32, 32)
    # an equal-time comparison is between networks of one size: within 10 % of DRDD's residual network
    for preset in ("cpu-demo", "cpu-lite", "gpu"):
        regression, drdd = RegressionNetworks.from_preset(preset), DRDDNetworks.from_preset(preset)
        ratio = _parameters(regression) / _parameters(drdd.residual)
        assert 0.9 < ratio < 1.15, (preset, ratio)
    assert set(REGRESSION_PRESETS) <= set(PRESETS)
    with pytest.raises(ValueError, match="unknown regression network preset 'huge'"):
        RegressionNetworks.from_preset("huge")


def test_residual_regression_adds_the_u_net_output_to_the_centre_source_slice(tmp_path):
    model = RegressionNetworks.from_preset("tiny", context_slices=3, image_channels=2, residual=True)
    unet_output = torch.randn(2, 2, 32, 32)
    model.regression.forward = lambda inputs: unet_output  # a non-zero U-Net output, known exactly
    inputs = torch.randn(2, 6, 32, 32)  # centre slice (2 channels), then the two context slices
    torch.testing.assert_close(model(inputs), inputs[:, :2] + unet_output)
    assert not torch.equal(model(inputs), (inputs[:, 2:4] + unet_output))  # not a context slice
    # the choice is part of the record: a plain U-Net's checkpoint does not load as a residual one
    model = _trained_regression(residual=True)
    torch.save(model.state_dict(), tmp_path / "model.pt")
    assert load_model(tmp_path / "model.pt").residual
    with pytest.raises(DRDDInputError, match="built as residual-learning regression model.*these as regression model"):
        _trained_regression().load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True))


def _trained_regression(iterations=5, **kwargs):
    model = RegressionNetworks.from_preset("tiny", record={"training": {"stages": ["regression"]}}, **kwargs)
    model.trained_iterations["regression"] = iterations
    return model


def test_regression_checkpoint_carries_the_same_record_and_load_model_rebuilds_it(tmp_path):
    model = _trained_regression(context_slices=3)
    torch.save(model.state_dict(), tmp_path / "model.pt")
    saved = torch.load(tmp_path / "model.pt", weights_only=True)["_extra_state"]
    assert saved["architecture"] == {
        "method": "regression", "spatial_dims": 2, "image_channels": 1, "context_slices": 3,
        "network": {"features": list(REGRESSION_PRESETS["tiny"]["features"])}, "residual": False,
    }
    assert saved["trained_iterations"] == {"regression": 5} and saved["validation_sampler"] is None
    assert saved["record"] == {"training": {"stages": ["regression"]}}
    assert set(saved["versions"]) == {"drdd_med", "monai", "torch"} and len(saved["config_digest"]) == 64

    # the DRDD sampler's stages do not apply: a sampler with noise steps translates a regression model
    loaded = load_model(tmp_path / "model.pt", sampler=DRDDSampler(DRDDSchedule(), noise_steps=2), context_slices=3)
    assert isinstance(loaded, RegressionNetworks) and loaded.trained_iterations == {"regression": 5}
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(loaded(x), model(x))


def test_an_untrained_regression_model_is_refused_for_translation(tmp_path):
    torch.save(_trained_regression(iterations=0).state_dict(), tmp_path / "model.pt")
    with pytest.raises(DRDDInputError, match="model.pt: the sampler runs the regression stage, which this model never"):
        load_model(tmp_path / "model.pt", sampler=DRDDSampler(DRDDSchedule()))


def test_drdd_record_names_its_method_and_records_saved_before_methods_still_load(tmp_path):
    model = _trained_model()
    state = model.state_dict()
    assert state["_extra_state"]["architecture"]["method"] == "drdd"
    del state["_extra_state"]["architecture"]["method"]  # as drdd_med saved it before the regression baseline
    torch.save(state, tmp_path / "old.pt")
    loaded = load_model(tmp_path / "old.pt")
    assert isinstance(loaded, DRDDNetworks) and loaded.trained_iterations == {"residual": 7, "noise": 0}


def test_a_checkpoint_of_the_other_method_is_refused_clearly(tmp_path):
    torch.save(_trained_regression().state_dict(), tmp_path / "regression.pt")
    with pytest.raises(DRDDInputError, match=r"regression\.pt: checkpoint does not match the configured networks"):
        load_weights(DRDDNetworks.from_preset("tiny"), tmp_path / "regression.pt")
    record = _trained_regression().get_extra_state()
    with pytest.raises(DRDDInputError, match="built as regression model, 2D.*features 4/4/8/16/32/4, these as drdd"):
        DRDDNetworks.from_preset("tiny").set_extra_state(record)


def test_a_sampler_with_another_fixed_noise_level_than_training_is_refused(tmp_path):
    """The residual network learned one fixed noise level σ_N: sampling it inside another is refused."""
    model = _trained_model(noise=3)
    model.schedule = DRDDSchedule(fixed_noise_step=50).settings()  # as DRDDTrainer records it
    torch.save(model.state_dict(), tmp_path / "model.pt")
    loaded = load_model(tmp_path / "model.pt", sampler=DRDDSampler(DRDDSchedule(fixed_noise_step=50)))
    assert loaded.schedule["fixed_noise_step"] == 50
    with pytest.raises(DRDDInputError, match="trained with fixed_noise_step 50.*sample with fixed_noise_step 50"):
        load_model(tmp_path / "model.pt", sampler=DRDDSampler(DRDDSchedule()))


def test_conditional_ddim_model_is_sized_as_the_residual_network_and_reloads_from_its_record(tmp_path):
    model = ConditionalDiffusionNetworks.from_preset("tiny", context_slices=3)
    residual = DRDDNetworks.from_preset("tiny", context_slices=3).residual
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in residual.parameters())
    model.trained_iterations["denoise"] = 4
    model.schedule = DRDDSchedule().settings()
    torch.save(model.state_dict(), tmp_path / "model.pt")
    loaded = load_model(tmp_path / "model.pt", sampler=DDIMSampler(DRDDSchedule()), context_slices=3)
    assert isinstance(loaded, ConditionalDiffusionNetworks) and loaded.trained_iterations == {"denoise": 4}
    assert loaded.architecture["denoise"]["channels"] == list(PRESETS["tiny"]["residual"]["channels"])
    with pytest.raises(DRDDInputError, match="model.pt: a cddim model cannot be sampled with the drdd sampler"):
        load_model(tmp_path / "model.pt", sampler=DRDDSampler(DRDDSchedule()))
    with pytest.raises(DRDDInputError, match="the model predicts 'epsilon', the sampler reads 'sample'"):
        load_model(tmp_path / "model.pt", sampler=DDIMSampler(DRDDSchedule(), prediction="sample"))
    model.trained_iterations["denoise"] = 0
    torch.save(model.state_dict(), tmp_path / "untrained.pt")
    with pytest.raises(DRDDInputError, match="runs the denoise stage, which this model never trained"):
        load_model(tmp_path / "untrained.pt", sampler=DDIMSampler(DRDDSchedule()))


def test_a_noise_conditional_that_is_not_a_boolean_is_refused():
    with pytest.raises(ValueError, match=r"noise_conditional must be a boolean, got 'true' .*--noise_conditional True"):
        DRDDNetworks.from_preset("tiny", noise_conditional="true")


def test_channels_last_loading_stores_2d_weights_channels_last_with_the_same_outputs(tmp_path):
    model = seeded_initialisation(DRDDNetworks.from_preset("tiny"), 0).eval()
    model.trained_iterations.update(residual=1, noise=1)
    torch.save(model.state_dict(), tmp_path / "model.pt")
    fast = load_model(tmp_path / "model.pt", channels_last=True).eval()
    conv = fast.residual.conv_in.conv.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    x, tau = torch.randn(2, 2, 32, 32), torch.tensor([0.3, 0.9])
    with torch.no_grad():
        reference = model.residual(x, tau)
        assert reference.abs().mean() > 0.01  # real outputs, not an untrained network's zeros
        torch.testing.assert_close(fast.residual(x, tau), reference, rtol=1e-4, atol=1e-5)
    volume_model = seeded_initialisation(DRDDNetworks.from_preset("tiny", spatial_dims=3), 0)
    volume_model.trained_iterations.update(residual=1, noise=1)
    torch.save(volume_model.state_dict(), tmp_path / "volume.pt")
    assert load_model(tmp_path / "volume.pt", channels_last=True).residual.conv_in.conv.weight.is_contiguous()

