"""DRDDInferer: whole volumes slice by slice (2D, 2.5D) and with a sliding window inside each step (3D);
the conditional-DDIM baseline with its own sampler, regression models in one pass, through the same
slicing, padding and context.

Networks here have real outputs (``real_networks``) or are spies that record what the sampler feeds
them; MONAI's untrained networks return 0 and would let a zeroed prediction or a wrong time pass.
"""

import pytest
import torch
import torch.nn.functional as F

from drdd_med.diffusion import DDIMSampler, DRDDSampler, DRDDSchedule
from drdd_med.inferers import DRDDInferer
from drdd_med.networks import ConditionalDiffusionNetworks, DRDDNetworks, RegressionNetworks, seeded_initialisation
from drdd_med.transforms import RandPairedPatch

SCHEDULE = DRDDSchedule()
T = SCHEDULE.num_train_timesteps


class SpyNetworks(torch.nn.Module):
    """Stand-in DRDD model that records each network call's input and time ``τ``.

    Its predictions act voxel by voxel (any window gives the same answer) and depend on every
    input channel and on ``τ``, so a wrong input or time changes the sample.
    """

    def __init__(self, spatial_dims=2, context_slices=1, image_channels=1):
        super().__init__()
        self.spatial_dims, self.context_slices, self.image_channels = spatial_dims, context_slices, image_channels
        self.method, self.noise_conditional, self.size_divisor = "drdd", False, 1
        self.calls = {"residual": [], "noise": []}

        def residual(inp, tau):
            self.calls["residual"].append((inp.clone(), tau.clone()))
            weights = torch.linspace(0.3, -0.2, inp.shape[1], dtype=inp.dtype).reshape(1, -1, *[1] * (inp.ndim - 2))
            return (weights * inp).sum(1, keepdim=True)[:, :1].expand(-1, image_channels, *inp.shape[2:]) \
                + 1e-4 * tau.reshape(-1, *[1] * (inp.ndim - 1))

        def noise(inp, tau):
            self.calls["noise"].append((inp.clone(), tau.clone()))
            return 0.5 * inp + 1e-4 * tau.reshape(-1, *[1] * (inp.ndim - 1))

        self.residual, self.noise = residual, noise

    def conditioned_networks(self):
        return [(self.residual, "source+context"), (self.noise, None)]


def test_2d_sample_is_the_method_computed_by_hand(real_networks):
    """2 + 2 steps with the method's equations and times, written out, against the inferer (real networks)."""
    net = real_networks()
    volume = torch.rand(1, 1, 16, 12, 3) * 2 - 1
    sampler = DRDDSampler(SCHEDULE, start_scale=0.0)  # deterministic: x starts at the source
    with torch.no_grad():
        out = DRDDInferer(sampler, slice_batch_size=2)(volume, net)
        source = volume[0].movedim(-1, 0)  # (Z, 1, X, Y)
        a, s = SCHEDULE.residual_weight, SCHEDULE.noise_level

        def tau(value):
            return torch.full((source.shape[0],), float(value) * T)

        x = source
        x = x - float(a[999] - a[499]) * net.residual(torch.cat([x, source], 1), tau(a[999]))
        x = x - float(a[499]) * net.residual(torch.cat([x, source], 1), tau(a[499]))
        x = x - float(s[999] - s[499]) * net.noise(x, tau(s[999]))
        x = x - float(s[499]) * net.noise(x, tau(s[499]))
    expected = x.movedim(0, -1)[None]
    assert (expected - volume).abs().mean() > 0.05  # the networks do change the image
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_2d_sampling_is_seeded_and_independent_of_slice_batching(real_networks):
    net = real_networks()
    volume = torch.rand(1, 1, 19, 12, 7) * 2 - 1  # 19 is padded to the network's multiple and cropped back
    with torch.no_grad():
        a = DRDDInferer(slice_batch_size=3, seed=5)(volume, net)
        b = DRDDInferer(slice_batch_size=7, seed=5)(volume, net)
        c = DRDDInferer(slice_batch_size=3, seed=6)(volume, net)
    assert a.shape == volume.shape
    # one noise volume per call, whatever the batching: equal up to float rounding of batched convolutions
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    assert (a - c).abs().mean() > 0.1  # another seed, another start noise (σ = 1 in normalised units)


def test_max_batch_pixels_caps_the_slices_per_call_and_changes_no_value(real_networks):
    net = real_networks()
    volume = torch.rand(1, 1, 19, 12, 7) * 2 - 1  # padded to 20 x 12 = 240 pixels per slice
    batches = []
    hook = net.residual.register_forward_hook(lambda module, args, out: batches.append(args[0].shape[0]))
    with torch.no_grad():
        capped = DRDDInferer(slice_batch_size=4, max_batch_pixels=500, seed=5)(volume, net)
        assert batches[::2] == [2, 2, 2, 1]  # 500 // 240 = 2 slices per call (the last: the 7th); 2 calls each
        batches.clear()
        DRDDInferer(slice_batch_size=4, max_batch_pixels=100, seed=5)(volume, net)
        assert set(batches) == {1}  # a cap below one slice still translates, one slice per call
        hook.remove()
        plain = DRDDInferer(slice_batch_size=4, seed=5)(volume, net)
    torch.testing.assert_close(capped, plain, rtol=0, atol=1e-5)


def test_sampler_feeds_each_network_its_time_on_the_method_grid():
    """τ = a_t·T for the residual network and σ_t·T for the noise network, at t = 999 then 499."""
    net = SpyNetworks()
    volume = torch.rand(1, 1, 6, 6, 4) * 2 - 1
    DRDDInferer(DRDDSampler(SCHEDULE, residual_steps=2, noise_steps=2), slice_batch_size=4)(volume, net)
    residual_taus = [tau for _, tau in net.calls["residual"]]
    noise_taus = [tau for _, tau in net.calls["noise"]]
    expected_residual = [float(SCHEDULE.residual_weight[t]) * T for t in (999, 499)]
    expected_noise = [float(SCHEDULE.noise_level[t]) * T for t in (999, 499)]
    assert [tau.tolist() for tau in residual_taus] == [[pytest.approx(v)] * 4 for v in expected_residual]
    assert [tau.tolist() for tau in noise_taus] == [[pytest.approx(v)] * 4 for v in expected_noise]


def test_residual_network_sees_the_current_sample_then_the_source():
    net = SpyNetworks()
    volume = torch.rand(1, 1, 6, 6, 3) * 2 - 1
    sampler = DRDDSampler(SCHEDULE, noise_steps=0, start_scale=0.0)
    out = DRDDInferer(sampler, slice_batch_size=3)(volume, net)
    (first, _), (second, _) = net.calls["residual"]
    source = volume[0].movedim(-1, 0)
    torch.testing.assert_close(first, torch.cat([source, source], 1))  # x starts at the source (s = 0)
    assert not torch.equal(second[:, :1], source)  # then x moves,
    torch.testing.assert_close(second[:, 1:], source)  # the condition does not
    assert out.shape == volume.shape


@pytest.mark.parametrize("context_slices", [3, 5])
def test_2_5d_context_matches_training_patches_by_value_and_order(context_slices):
    """Two image channels: the inferer's condition channels for slice z are exactly the training patch's."""
    depth, channels = 5, 2
    # voxel value = 10·channel + slice, so every (channel, slice) plane is recognisable
    values = 10 * torch.arange(channels).reshape(channels, 1) + torch.arange(depth).reshape(1, depth)
    volume = values.reshape(1, channels, 1, 1, depth).expand(1, channels, 4, 4, depth).float().clone()
    net = SpyNetworks(context_slices=context_slices, image_channels=channels)
    DRDDInferer(DRDDSampler(SCHEDULE, noise_steps=0, start_scale=0.0), slice_batch_size=depth)(volume, net)
    condition = net.calls["residual"][0][0][:, channels:, 0, 0]  # (Z, channels × context_slices)
    patches = RandPairedPatch((4, 4), spatial_dims=2, context_slices=context_slices)
    half = context_slices // 2
    for z in range(depth):
        order = [z] + [min(max(z + d, 0), depth - 1) for d in range(-half, half + 1) if d != 0]
        expected = [10 * c + k for k in order for c in range(channels)]  # slice-major: each slice's channels
        assert condition[z].tolist() == expected, z
        patch = patches.crop(volume[0], (2, 2, z), with_context=True)
        assert patch[:, 2, 2].tolist() == expected, z


def test_3d_sliding_window_inside_each_step_has_no_seams():
    """Windows share one trajectory and one noise volume: identical to sampling the whole volume at once."""
    volume = torch.randn(1, 1, 16, 16, 12)
    sampler = DRDDSampler(SCHEDULE, eta=0.5)  # start noise and η noise both exercised
    net = SpyNetworks(3)
    whole = DRDDInferer(sampler, roi_size=None, seed=1)(volume, net)
    windowed = DRDDInferer(sampler, roi_size=(8, 8, 8), overlap=0.5, seed=1)(volume, net)
    torch.testing.assert_close(windowed, whole, rtol=1e-5, atol=1e-5)
    assert any(inp.shape[2:] == (8, 8, 8) for inp, _ in net.calls["residual"])


def test_3d_real_network_keeps_shape_and_changes_the_image(real_networks, zero_predictions):
    net = real_networks(spatial_dims=3)
    volume = torch.rand(1, 1, 12, 10, 9) * 2 - 1
    inferer = DRDDInferer(roi_size=(8, 8, 8), sw_batch_size=2)
    with torch.no_grad():
        out = inferer(volume, net)
        start_only = inferer(volume, zero_predictions(net))
    assert out.shape == volume.shape and torch.isfinite(out).all()
    assert (out - start_only).abs().mean() > 0.05


def _sharpest_plane(volume: torch.Tensor) -> float:
    """The largest jump between neighbouring planes (mean |difference| over the plane), along any axis,
    relative to the median jump of the planes around it: a seam stands out of its neighbourhood."""
    worst = 0.0
    for axis in range(3):
        jumps = volume.diff(dim=2 + axis).abs().mean(dim=[d for d in (2, 3, 4) if d != 2 + axis])[0, 0]
        for p in range(3, len(jumps) - 3):
            around = torch.cat([jumps[p - 3:p - 1], jumps[p + 2:p + 4]])
            worst = max(worst, float(jumps[p] / around.median()))
    return worst


def test_3d_real_network_windows_leave_no_seams(real_networks):
    """A volume larger than the window, a network whose output is not zero (the residual stage alone,
    no start noise, so the output is as smooth as the network makes it): no plane of the windowed
    output jumps more, against its neighbourhood, than the sharpest plane of the same network's
    whole-volume run; hard tiles (no overlap, no blending) do, so the measure sees seams."""
    net = real_networks(spatial_dims=3)
    sampler = DRDDSampler(DRDDSchedule(fixed_noise_step=0), noise_steps=0, start_scale=0.0)
    coarse = torch.rand(1, 1, 5, 5, 4, generator=torch.Generator().manual_seed(0)) * 2 - 1
    volume = F.interpolate(coarse, size=(40, 40, 32), mode="trilinear", align_corners=True)  # smooth anatomy
    with torch.no_grad():
        whole = DRDDInferer(sampler, roi_size=None)(volume, net)
        windowed = DRDDInferer(sampler, roi_size=(16, 16, 16), overlap=0.25, mode="gaussian")(volume, net)
        tiled = DRDDInferer(sampler, roi_size=(16, 16, 16), overlap=0.0, mode="constant")(volume, net)
    assert (whole - volume).abs().mean() > 0.05  # the network changes the image
    bound = 1.1 * _sharpest_plane(whole)
    assert _sharpest_plane(windowed) <= bound
    assert _sharpest_plane(tiled) > bound


@pytest.mark.parametrize("device", [
    "cpu",
    pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]),
])
def test_bf16_sampling_matches_fp32_within_bf16_rounding(device, real_networks, zero_predictions, contribution_check):
    """bf16 autocast against fp32 with the same start noise (the GPU runs the GPU preset).

    bf16 keeps 8 significant bits (relative rounding 2^-9 ≈ 0.2 % per value); through the tens of
    layers of 4 network evaluations this adds up to a few per cent of what the networks contribute,
    so the bf16 sample must lie within 5 % of that contribution of the fp32 one.
    """
    model = real_networks("gpu" if device == "cuda" else "tiny").to(device)
    volume = (torch.rand(1, 1, 64, 64, 6, generator=torch.Generator().manual_seed(0)) * 2 - 1).to(device)
    inferer = DRDDInferer(seed=0)
    with torch.no_grad():
        reference = inferer(volume, model)
        networks_off = inferer(volume, zero_predictions(model))
        with torch.autocast(device, dtype=torch.bfloat16):
            fast = inferer(volume, model)
    contribution_check(fast.float(), reference, networks_off, fraction=0.05)


def test_inferer_refuses_batches():
    with pytest.raises(ValueError, match="one source volume"):
        DRDDInferer()(torch.zeros(2, 1, 4, 4, 4), DRDDNetworks.from_preset("tiny"))


# --- regression models: same slicing, padding and context; one pass, no noise --------------------


class SpyRegression(torch.nn.Module):
    """Stand-in regression model that records its inputs and predicts a channel-weighted sum of them."""

    method, spatial_dims, image_channels, size_divisor = "regression", 2, 1, 1

    def __init__(self, context_slices=1):
        super().__init__()
        self.context_slices = context_slices
        self.calls = []

    def forward(self, inputs):
        self.calls.append(inputs.clone())
        weights = torch.linspace(1.0, 0.1, inputs.shape[1]).reshape(1, -1, 1, 1)
        return (weights * inputs).sum(1, keepdim=True)


def test_regression_2d_sees_each_slice_once_with_the_training_patches_context():
    depth = 5
    volume = torch.arange(depth, dtype=torch.float32).reshape(1, 1, 1, 1, depth).expand(1, 1, 4, 4, depth).clone()
    net = SpyRegression(context_slices=3)
    out = DRDDInferer(slice_batch_size=2)(volume, net)
    inputs = torch.cat(net.calls)  # (Z, 3, 4, 4): one call per batch of slices, no sampler steps
    assert inputs.shape == (depth, 3, 4, 4)
    patches = RandPairedPatch((4, 4), spatial_dims=2, context_slices=3)
    for z in range(depth):
        assert inputs[z, :, 2, 2].tolist() == patches.crop(volume[0], (2, 2, z), with_context=True)[:, 2, 2].tolist(), z
    torch.testing.assert_close(out[0, 0, 2, 2], inputs[:, :, 2, 2] @ torch.linspace(1.0, 0.1, 3))


def test_regression_2d_pads_to_the_network_multiple_and_ignores_seed_and_batching():
    net = RegressionNetworks.from_preset("tiny").eval()
    volume = torch.rand(1, 1, 19, 24, 5) * 2 - 1
    with torch.no_grad():
        out = DRDDInferer(slice_batch_size=2, seed=1)(volume, net)
        again = DRDDInferer(slice_batch_size=5, seed=2)(volume, net)
        slices = F.pad(volume[0].movedim(-1, 0), (0, 8, 0, 13), mode="replicate")  # 19 x 24 -> 32 x 32
        expected = net(slices)[..., :19, :24].movedim(0, -1)[None]
    assert out.shape == volume.shape and (out - volume).abs().mean() > 0.05  # the network changes the image
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(again, out, rtol=0, atol=1e-5)  # no noise: nothing to seed


def test_regression_3d_uses_one_sliding_window_pass():
    net = RegressionNetworks.from_preset("tiny", spatial_dims=3).eval()
    volume = torch.rand(1, 1, 40, 36, 20) * 2 - 1
    with torch.no_grad():
        whole = DRDDInferer(roi_size=None)(volume, net)
        expected = net(F.pad(volume, (0, 12, 0, 12, 0, 8), mode="replicate"))[..., :40, :36, :20]
        windowed = DRDDInferer(roi_size=(32, 32, 32), overlap=0.25)(volume, net)
    torch.testing.assert_close(whole, expected, rtol=0, atol=1e-5)
    assert windowed.shape == volume.shape and torch.isfinite(windowed).all()
    assert (windowed - whole).abs().mean() < (whole - volume).abs().mean()  # windows approximate the whole pass
    with pytest.raises(ValueError, match="multiple of 16"):
        DRDDInferer(roi_size=(24, 24, 24))(volume, net)


# --- the conditional-DDIM baseline through the same inferer ---------------------------------------


def _real_cddim(context_slices=1):
    return seeded_initialisation(ConditionalDiffusionNetworks.from_preset("tiny", context_slices=context_slices), 3).eval()


def test_conditional_ddim_sample_is_ddim_on_each_slice_with_source_and_context():
    """2.5D, real networks: the inferer equals DDIMSampler run by hand on each slice's [x, source, context]."""
    net = _real_cddim(context_slices=3)
    volume = torch.rand(1, 1, 16, 12, 4) * 2 - 1
    sampler = DDIMSampler(SCHEDULE, steps=4)
    with torch.no_grad():
        out = DRDDInferer(sampler, slice_batch_size=3, seed=2)(volume, net)
        start = torch.randn((1, 4, 1, 16, 12), generator=torch.Generator().manual_seed(2))[0]  # (Z, C, X, Y)
        source = volume[0].movedim(-1, 0)
        depth = source.shape[0]
        context = torch.cat([source[(torch.arange(depth) + d).clamp(0, depth - 1)] for d in (-1, 1)], 1)
        condition = torch.cat([source, context], 1)
        expected = sampler.sample(source, lambda x, t: net.denoise(torch.cat([x, condition], 1), t), noise=[start])
    expected = expected.movedim(0, -1)[None]
    assert (expected - start.movedim(0, -1)[None]).abs().mean() > 0.05
    # batched convolutions round differently; the first step divides by sqrt(ᾱ_999) ≈ 0.0064, 156× over
    torch.testing.assert_close(out, expected, rtol=0, atol=5e-4)
    with torch.no_grad():
        blind = sampler.sample(source, lambda x, t: net.denoise(torch.cat([x, 0 * condition], 1), t), noise=[start])
    assert (blind.movedim(0, -1)[None] - out).abs().mean() > 1e-3  # the condition reaches the network


def test_a_model_is_refused_with_another_methods_sampler():
    volume = torch.rand(1, 1, 8, 8, 2)
    with pytest.raises(ValueError, match="a cddim model needs its own sampler, not the drdd one"):
        DRDDInferer(DRDDSampler(SCHEDULE))(volume, _real_cddim())
    with pytest.raises(ValueError, match="a drdd model needs its own sampler, not the cddim one"):
        DRDDInferer(DDIMSampler(SCHEDULE))(volume, DRDDNetworks.from_preset("tiny"))
