"""DRDDInferer: whole volumes slice by slice (2D, 2.5D) and with a sliding window inside each step (3D)."""

import pytest
import torch

from drdd_med.diffusion import DRDDSampler, DRDDSchedule
from drdd_med.inferers import DRDDInferer
from drdd_med.networks import DRDDNetworks


class PointwiseNetworks(torch.nn.Module):
    """Stand-in DRDD model whose networks act voxel by voxel, so any window gives the same answer."""

    def __init__(self, spatial_dims, context_slices=1):
        super().__init__()
        self.spatial_dims, self.context_slices, self.noise_conditional, self.size_divisor = spatial_dims, context_slices, False, 1
        self.calls = []

        def residual(inp, tau):
            self.calls.append(tuple(inp.shape))
            return 0.3 * inp[:, :1] - 0.2 * inp[:, 1:2] + 1e-4 * tau.reshape(-1, *[1] * (inp.ndim - 1))

        def noise(inp, tau):
            return 0.5 * inp + 1e-4 * tau.reshape(-1, *[1] * (inp.ndim - 1))

        self.residual, self.noise = residual, noise


def test_2d_whole_volume_shape_determinism_and_batching():
    volume = torch.randn(1, 1, 20, 12, 7)
    net = DRDDNetworks.from_preset("tiny").eval()
    with torch.no_grad():
        a = DRDDInferer(slice_batch_size=3, seed=5)(volume, net)
        b = DRDDInferer(slice_batch_size=3, seed=5)(volume, net)
        c = DRDDInferer(slice_batch_size=3, seed=6)(volume, net)
    assert a.shape == volume.shape  # 20x12 is padded to the network's multiple and cropped back
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_2d_slices_are_independent_of_batching_for_pointwise_networks():
    volume = torch.randn(1, 1, 6, 6, 5)
    net = PointwiseNetworks(2)
    sampler = DRDDSampler(DRDDSchedule(), start_scale=0.0)  # no start noise: batching cannot matter
    whole = DRDDInferer(sampler, slice_batch_size=5)(volume, net)
    pieces = DRDDInferer(sampler, slice_batch_size=2)(volume, net)
    torch.testing.assert_close(whole, pieces)
    assert net.calls[0] == (5, 2, 6, 6)  # x_t and the source slice, concatenated


def test_2_5d_context_channels_reach_the_residual_network():
    volume = torch.arange(4.0).reshape(1, 1, 1, 1, 4).expand(1, 1, 4, 4, 4).clone()
    net = PointwiseNetworks(2, context_slices=3)
    DRDDInferer(DRDDSampler(DRDDSchedule(), start_scale=0.0), slice_batch_size=4)(volume, net)
    assert net.calls[0] == (4, 4, 4, 4)  # x_t + source + 2 neighbours


def test_3d_sliding_window_inside_each_step_has_no_seams():
    """Windows share one trajectory and one noise volume: identical to sampling the whole volume at once."""
    volume = torch.randn(1, 1, 16, 16, 12)
    sampler = DRDDSampler(DRDDSchedule(), eta=0.5)  # start noise and η noise both exercised
    net = PointwiseNetworks(3)
    whole = DRDDInferer(sampler, roi_size=None, seed=1)(volume, net)
    windowed = DRDDInferer(sampler, roi_size=(8, 8, 8), overlap=0.5, seed=1)(volume, net)
    torch.testing.assert_close(windowed, whole, rtol=1e-5, atol=1e-5)
    assert any(shape[2:] == (8, 8, 8) for shape in net.calls)


def test_3d_real_network_runs_and_keeps_shape():
    net = DRDDNetworks.from_preset("tiny", spatial_dims=3).eval()
    volume = torch.randn(1, 1, 12, 10, 9)
    with torch.no_grad():
        out = DRDDInferer(roi_size=(8, 8, 8), sw_batch_size=2)(volume, net)
    assert out.shape == volume.shape and torch.isfinite(out).all()


def test_inferer_refuses_batches():
    with pytest.raises(ValueError, match="one source volume"):
        DRDDInferer()(torch.zeros(2, 1, 4, 4, 4), DRDDNetworks.from_preset("tiny"))
