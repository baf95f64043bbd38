"""The DRDD method against the oracle properties and coefficients of the method page; the
conditional-DDIM baseline against the same kind of oracle."""

import pytest
import torch

from drdd_med.diffusion import (
    DDIMSampler,
    DRDDSampler,
    DRDDSchedule,
    NoiseDraws,
    ddim_p_losses,
    ddim_q_sample,
    noise_p_losses,
    noise_q_sample,
    residual_p_losses,
    residual_q_sample,
)

STEPS = [1, 2, 5, 10]


@pytest.fixture(scope="module")
def schedule():
    return DRDDSchedule()


# the method's fixed noise level σ_{T−1} ≈ 1, and two lower ones (σ_200 ≈ 0.59, σ_50 ≈ 0.17)
@pytest.fixture(scope="module", params=[None, 200, 50], ids=["sigma_T-1", "sigma_200", "sigma_50"])
def any_schedule(request):
    return DRDDSchedule(fixed_noise_step=request.param)


def _images(spatial, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.rand((2, 1, *spatial), generator=g, dtype=torch.float64) * 2 - 1
    x_in = torch.rand((2, 1, *spatial), generator=g, dtype=torch.float64) * 2 - 1
    eps = torch.randn((2, 1, *spatial), generator=g, dtype=torch.float64)
    return y, x_in, eps


def noise_oracle(schedule, y):
    """``ε̂ = (x − y)/σ_t``, with ``σ_t`` looked up exactly (τ reaches networks as float32)."""

    def oracle(x, tau):
        t = (schedule.noise_level[None, :] * schedule.num_train_timesteps - tau.double()[:, None]).abs().argmin(1)
        return (x - y) / schedule.noise_level[t].reshape(-1, *[1] * (x.ndim - 1))

    return oracle


def test_coefficients_match_the_method_page(schedule):
    a, s = schedule.residual_weight, schedule.noise_level
    assert a[0].item() == pytest.approx(5.0e-5, abs=1e-6)
    assert a[499].item() == pytest.approx(0.720, abs=5e-4)
    assert a[999].item() == pytest.approx(0.9936, abs=5e-5)
    assert s[0].item() == pytest.approx(0.0100, abs=5e-5)
    assert s[499].item() == pytest.approx(0.960, abs=5e-4)
    assert s[999].item() == pytest.approx(0.99998, abs=5e-6)
    assert schedule.fixed_noise_level == pytest.approx(0.99998, abs=5e-6)


def test_step_grid(schedule):
    assert schedule.step_pairs(2) == [(999, 499), (499, -1)]
    assert schedule.step_pairs(1) == [(999, -1)]
    pairs = schedule.step_pairs(10)
    assert len(pairs) == 10 and pairs[0][0] == 999 and pairs[-1][1] == -1
    assert all(t > t_next for t, t_next in pairs)
    with pytest.raises(ValueError):
        schedule.step_pairs(0)


@pytest.mark.parametrize("spatial", [(8, 8), (4, 6, 5)], ids=["2d", "3d"])
@pytest.mark.parametrize("steps", STEPS)
def test_oracle_residual_phase_ends_at_fixed_noise_target(any_schedule, steps, spatial):
    y, x_in, eps = _images(spatial)
    r = x_in - y
    sampler = DRDDSampler(any_schedule, residual_steps=steps, noise_steps=1)
    start = residual_q_sample(any_schedule, y, r, torch.full((2,), 999), eps)
    end = sampler.residual_phase(start, lambda x, tau: r)
    torch.testing.assert_close(end, y + any_schedule.fixed_noise_level * eps, rtol=0, atol=1e-12)


@pytest.mark.parametrize("spatial", [(8, 8), (4, 6, 5)], ids=["2d", "3d"])
@pytest.mark.parametrize("steps", STEPS)
def test_oracle_noise_phase_ends_at_clean_target(any_schedule, steps, spatial):
    y, _, eps = _images(spatial)
    sampler = DRDDSampler(any_schedule, residual_steps=1, noise_steps=steps)
    y_n = y + any_schedule.fixed_noise_level * eps
    end = sampler.noise_phase(y_n, noise_oracle(any_schedule, y))
    torch.testing.assert_close(end, y, rtol=0, atol=1e-9)


@pytest.mark.parametrize("steps", STEPS)
def test_oracle_full_sampler_from_forward_point(any_schedule, steps):
    """Both phases chained with oracles, started at the forward point, recover ``y`` exactly."""
    y, x_in, eps = _images((6, 6))
    r = x_in - y
    sampler = DRDDSampler(any_schedule, residual_steps=steps, noise_steps=steps)
    x = sampler.residual_phase(residual_q_sample(any_schedule, y, r, torch.full((2,), 999), eps), lambda x, tau: r)
    x = sampler.noise_phase(x, noise_oracle(any_schedule, y))
    torch.testing.assert_close(x, y, rtol=0, atol=1e-9)


def test_residual_phase_only_from_the_source_itself(schedule):
    """``noise_steps`` 0 and ``start_scale`` 0: the oracle residual phase removes ``a_{T−1}`` of ``r`` from ``x_in``."""
    y, x_in, _ = _images((6, 6))
    r = x_in - y
    sampler = DRDDSampler(schedule, residual_steps=2, noise_steps=0, start_scale=0.0)
    calls = []
    out = sampler.sample(x_in, lambda x, tau: r, lambda x, tau: calls.append(tau) or x)
    assert not calls  # the noise network is never run
    torch.testing.assert_close(out, y + (1 - schedule.residual_weight[-1]) * r, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="noise_steps"):
        DRDDSampler(schedule, noise_steps=-1)


@pytest.mark.parametrize("first, steps", [(0, 1), (5, 1), (5, 2), (120, 4)])
def test_oracle_noise_phase_from_a_lower_noise_level(schedule, first, steps):
    y, _, eps = _images((6, 6))
    sampler = DRDDSampler(schedule, noise_steps=steps, noise_start=first)
    assert sampler.noise_pairs[0][0] == first and sampler.noise_pairs[-1][1] == -1
    end = sampler.noise_phase(y + schedule.noise_level[first] * eps, noise_oracle(schedule, y))
    torch.testing.assert_close(end, y, rtol=0, atol=1e-9)
    with pytest.raises(ValueError, match="first timestep"):
        DRDDSampler(schedule, noise_start=1000)
    with pytest.raises(ValueError, match="number of steps"):
        DRDDSampler(schedule, noise_steps=3, noise_start=1)


def test_default_start_is_the_reference_start(schedule):
    _, x_in, _ = _images((5, 5))
    sampler = DRDDSampler(schedule, start_scale=0.25)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    expected = x_in + 0.5 * torch.randn(x_in.shape, generator=g2, dtype=x_in.dtype)
    torch.testing.assert_close(sampler.start(x_in, NoiseDraws(generator=g1)), expected)


def test_eta_gives_different_samples_with_the_same_mean(schedule):
    y, x_in, eps = _images((4, 4))
    r = x_in - y
    start = residual_q_sample(schedule, y, r, torch.full((2,), 999), eps)
    deterministic = DRDDSampler(schedule, residual_steps=5, eta=0.0).residual_phase(start, lambda x, tau: r)
    sampler = DRDDSampler(schedule, residual_steps=5, eta=1.0)
    g = torch.Generator().manual_seed(0)
    draws = NoiseDraws(generator=g)
    samples = torch.stack([sampler.residual_phase(start, lambda x, tau: r, draws) for _ in range(4000)])
    assert not torch.allclose(samples[0], samples[1])
    # the spread is the analytic one: with r̂ fixed, each step with t_next >= 0 adds c·z, so the
    # variance is Σ c² (relative standard error of a 4000-sample variance: sqrt(2/3999) ≈ 2 % per voxel)
    expected_variance = sum(sampler._c(t, t_next) ** 2 for t, t_next in sampler.residual_pairs)
    assert expected_variance > 0.05
    torch.testing.assert_close(samples.var(0).mean().item(), expected_variance, rtol=0.03, atol=0)
    torch.testing.assert_close(samples.mean(0), deterministic, rtol=0, atol=4 * samples.std(0).max().item() / 4000**0.5)


def test_eta_noise_phase_keeps_mean(schedule):
    """With a linear (oracle) denoiser the η > 0 noise phase is unbiased and still ends at ``y``."""
    y, _, eps = _images((4, 4))
    y_n = y + schedule.fixed_noise_level * eps
    sampler = DRDDSampler(schedule, noise_steps=5, eta=0.5)
    out = sampler.noise_phase(y_n, noise_oracle(schedule, y), NoiseDraws(generator=torch.Generator().manual_seed(1)))
    torch.testing.assert_close(out, y, rtol=0, atol=1e-9)


def test_forward_processes(schedule):
    y, x_in, eps = _images((4, 4))
    t = torch.tensor([0, 999])
    y_t = noise_q_sample(schedule, y, t, eps)
    torch.testing.assert_close(y_t[1], y[1] + schedule.noise_level[999] * eps[1])
    x_t = residual_q_sample(schedule, y, x_in - y, t, eps)
    # at t = T−1 the forward point is (nearly) the noisy source
    torch.testing.assert_close(x_t[1], (x_in + eps)[1], rtol=0, atol=0.0065 * 2 + 1e-4)


def test_losses_are_zero_for_oracle_networks_and_positive_otherwise(schedule):
    y, x_in, _ = _images((8, 8))
    y, x_in = y.float(), x_in.float()
    r = x_in - y
    oracle_residual = lambda inp, tau: inp[:, 1:2] - y  # noqa: E731  (channel 1 is the source)
    assert residual_p_losses(schedule, oracle_residual, x_in, y).item() == pytest.approx(0.0, abs=1e-12)
    assert residual_p_losses(schedule, lambda inp, tau: torch.zeros_like(y), x_in, y).item() == pytest.approx(
        r.pow(2).mean().item(), rel=1e-6
    )
    g = torch.Generator().manual_seed(0)
    loss = noise_p_losses(schedule, lambda inp, tau: torch.zeros_like(inp), y, generator=g)
    assert 0.5 < loss.item() < 1.5  # E[ε²] = 1


@pytest.mark.parametrize("eta", [-0.1, 1.01, 4.0])
def test_eta_outside_zero_to_one_is_refused(schedule, eta):
    """Above 1, ``c² > σ²_{t_next}`` on some grids and the DDIM step would take a complex square root."""
    with pytest.raises(ValueError, match=r"eta must be in \[0, 1\]"):
        DRDDSampler(schedule, eta=eta)


@pytest.mark.parametrize("eta, draws", [(0.0, 1), (0.5, 3)])
def test_given_noise_replaces_the_generator_draw_for_draw(schedule, eta, draws):
    """Noise given as tensors gives exactly the sample the generator would, and too few are refused."""
    _, x_in, _ = _images((4, 4))
    sampler = DRDDSampler(schedule, eta=eta)  # 2 + 2 steps: fresh noise in the first step of each phase
    assert sampler.num_noise_draws == draws
    fns = (lambda x, tau: 0.3 * x + tau[:, None, None, None] / 1000, lambda x, tau: -0.2 * x)
    g = torch.Generator().manual_seed(4)
    noise = [torch.randn(x_in.shape, generator=g, dtype=x_in.dtype) for _ in range(draws)]
    from_generator = sampler.sample(x_in, *fns, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(sampler.sample(x_in, *fns, noise=noise), from_generator, rtol=0, atol=0)
    with pytest.raises(ValueError, match="fewer noise tensors"):
        sampler.sample(x_in, *fns, noise=noise[:-1])


def test_a_lower_fixed_noise_level_moves_the_residual_stage_and_the_noise_stage_with_it():
    schedule = DRDDSchedule(fixed_noise_step=200)
    assert schedule.fixed_noise_level == pytest.approx(float(schedule.noise_level[200]))
    assert 0.58 < schedule.fixed_noise_level < 0.59
    y, x_in, eps = _images((4, 4))
    t = torch.full((2,), 999)
    torch.testing.assert_close(residual_q_sample(schedule, y, x_in - y, t, eps),
                               y + schedule.noise_level[200] * eps + schedule.residual_weight[999] * (x_in - y))
    assert DRDDSampler(schedule).noise_pairs[0] == (200, 99)  # the noise phase starts at t_N
    # the noise stage trains on the levels it meets: σ_t T with t ≤ t_N only
    taus = []
    noise_p_losses(schedule, lambda x, tau: taus.append(tau) or torch.zeros_like(x),
                   torch.zeros(4096, 1, 1, 1), generator=torch.Generator().manual_seed(0))
    assert taus[0].max() <= schedule.fixed_noise_level * 1000 + 1e-3
    assert taus[0].max() > 0.95 * schedule.fixed_noise_level * 1000  # and all of them
    with pytest.raises(ValueError, match="fixed_noise_step"):
        DRDDSchedule(fixed_noise_step=1000)
    assert DRDDSampler(schedule).settings()["fixed_noise_step"] == 200


def test_residual_loss_l1_is_the_mean_absolute_residual_error(schedule):
    y, x_in, _ = _images((8, 8))
    y, x_in = y.float(), x_in.float()
    zero = lambda inp, tau: torch.zeros_like(y)  # noqa: E731
    assert residual_p_losses(schedule, zero, x_in, y, loss="l1").item() == pytest.approx(
        (x_in - y).abs().mean().item(), rel=1e-6)
    with pytest.raises(ValueError, match="loss must be one of"):
        residual_p_losses(schedule, zero, x_in, y, loss="huber")


# --- conditional DDIM (the conditional-diffusion baseline) ----------------------------------------


def ddim_oracle(schedule, y):
    """``ε̂ = (x − sqrt(ᾱ_t) y) / sqrt(1 − ᾱ_t)`` at the integer time ``t`` the network is given."""

    def oracle(x, t):
        alpha_bar = schedule.alphas_cumprod[t.long()].reshape(-1, *[1] * (x.ndim - 1))
        return (x - alpha_bar.sqrt() * y) / (1 - alpha_bar).sqrt()

    return oracle


@pytest.mark.parametrize("prediction", ["epsilon", "sample"])
@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("steps", [1, 2, 4, 10])
def test_ddim_oracle_sampler_ends_at_the_clean_target(schedule, steps, eta, prediction):
    y, x_in, _ = _images((6, 5))

    def oracle(target):
        return ddim_oracle(schedule, target) if prediction == "epsilon" else (lambda x, t: target.expand_as(x))

    sampler = DDIMSampler(schedule, steps, eta, prediction=prediction)
    out = sampler.sample(x_in, oracle(y), torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, y, rtol=0, atol=1e-9)
    wrong = sampler.sample(x_in, oracle(0.5 * y))
    assert (wrong - y).abs().mean() > 0.1


@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_ddim_steps_are_the_textbook_update(schedule, eta):
    """Two steps written out (ε̂ from a fixed linear network), on the (999, 499), (499, −1) grid, clip on."""
    y, z, z1 = _images((4, 4))
    net = lambda x, t: 0.3 * x - 1e-4 * t.reshape(-1, 1, 1, 1)  # noqa: E731
    out = DDIMSampler(schedule, steps=2, eta=eta).sample(y, net, noise=[z, z1] if eta else [z])
    ab = schedule.alphas_cumprod
    c = eta * ((1 - ab[499]) / (1 - ab[999]) * (1 - ab[999] / ab[499])).sqrt()
    x = z
    e = net(x, torch.full((2,), 999.0, dtype=torch.float64))
    y_hat = ((x - (1 - ab[999]).sqrt() * e) / ab[999].sqrt()).clamp(-1, 1)
    x = ab[499].sqrt() * y_hat + (1 - ab[499] - c**2).sqrt() * e + c * z1
    e = net(x, torch.full((2,), 499.0, dtype=torch.float64))
    expected = ((x - (1 - ab[499]).sqrt() * e) / ab[499].sqrt()).clamp(-1, 1)
    torch.testing.assert_close(out, expected)
    assert DDIMSampler(schedule, 4).num_noise_draws == 1 and DDIMSampler(schedule, 4, eta=1.0).num_noise_draws == 4
    with pytest.raises(ValueError, match="prediction must be one of"):
        DDIMSampler(schedule, prediction="v")


def test_ddim_with_clean_image_prediction_derives_the_noise_from_it(schedule):
    """prediction="sample": ŷ is the network's output (clipped) and ε̂ = (x − sqrt(ᾱ_t) ŷ) / sqrt(1 − ᾱ_t)."""
    y, z, _ = _images((4, 4))
    net = lambda x, t: 1.5 * torch.tanh(x) + 1e-4 * t.reshape(-1, 1, 1, 1)  # noqa: E731  (outside [−1, 1] too)
    out = DDIMSampler(schedule, steps=2, prediction="sample").sample(y, net, noise=[z])
    ab = schedule.alphas_cumprod
    x = z
    raw = net(x, torch.full((2,), 999.0, dtype=torch.float64))
    e = (x - ab[999].sqrt() * raw) / (1 - ab[999]).sqrt()
    x = ab[499].sqrt() * raw.clamp(-1, 1) + (1 - ab[499]).sqrt() * e
    expected = net(x, torch.full((2,), 499.0, dtype=torch.float64)).clamp(-1, 1)
    torch.testing.assert_close(out, expected)


def test_ddim_loss_feeds_the_noisy_target_with_its_condition_at_time_t(schedule):
    y, x_in, _ = _images((8, 8))
    y, x_in = y.float(), x_in.float()
    seen = []

    def oracle(inp, t):  # recovers ε from the noisy target channel: wrong coefficients or time give a loss
        seen.append((inp, t))
        alpha_bar = schedule.alphas_cumprod[t.long()].float().reshape(-1, 1, 1, 1)
        return (inp[:, :1] - alpha_bar.sqrt() * y) / (1 - alpha_bar).sqrt()

    assert ddim_p_losses(schedule, oracle, x_in, y).item() < 1e-6
    torch.testing.assert_close(seen[0][0][:, 1:], x_in)  # the condition follows the noisy target
    g = torch.Generator().manual_seed(0)
    assert 0.5 < ddim_p_losses(schedule, lambda inp, t: torch.zeros_like(y), x_in, y, g).item() < 1.5
    # predicting the clean image: the target itself is the oracle, zero predicts E[y²]
    assert ddim_p_losses(schedule, lambda inp, t: y, x_in, y, prediction="sample").item() == 0
    assert ddim_p_losses(schedule, lambda inp, t: torch.zeros_like(y), x_in, y, prediction="sample").item() == \
        pytest.approx(y.pow(2).mean().item(), rel=1e-6)
    t = torch.tensor([0, 999])
    eps = torch.randn_like(y)
    torch.testing.assert_close(ddim_q_sample(schedule, y, t, eps)[1],
                               (schedule.alphas_cumprod[999].sqrt() * y[1] + (1 - schedule.alphas_cumprod[999]).sqrt()
                                * eps[1]).float())
