"""Network factory, presets and checkpoint loading (weights_only, clear errors)."""

import pytest
import torch

from drdd_med.errors import DRDDInputError
from drdd_med.networks import PRESETS, DRDDNetworks, build_drdd_network, load_weights, network_in_channels


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
    model = DRDDNetworks.from_preset("tiny")
    torch.save(model.state_dict(), tmp_path / "model.pt")
    other = load_weights(DRDDNetworks.from_preset("tiny"), tmp_path / "model.pt")
    for a, b in zip(model.state_dict().values(), other.state_dict().values()):
        assert torch.equal(a, b)
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
