"""Decoupled Residual Denoising Diffusion (DRDD): schedules, forward processes, losses, sampler.

Sections follow the method page (docs: ``drdd_method.md``):

1. Schedule tables: ``β_t`` linear, ``ᾱ_t``, residual weight ``a_t = 1 − sqrt(ᾱ_t)`` and noise level
   ``σ_t = sqrt(1 − ᾱ_t)``.
2. Noise stage (target images only): ``y_t = y + σ_t ε``; the noise network predicts ``ε`` at time
   ``σ_t T``.
3. Residual stage (pairs) inside the fixed noise level ``σ_N`` (``σ_{T−1}`` in the method):
   ``x_t = y_N + a_t r`` with ``y_N = y + σ_N ε`` and ``r = x_in − y``; the residual network sees ``concat(x_t, x_in)`` at
   time ``a_t T`` and predicts ``r``.
4. Sampler: ``S_r`` deterministic residual steps, then ``S_n`` DDIM-style (variance-exploding)
   noise steps, with ``η`` and a start scale.
5. The conditional-diffusion baseline (not DRDD): a standard variance-preserving DDPM whose network
   sees ``concat(y_t, x_in)`` and predicts ``ε`` or the clean image ``y`` (``prediction``), sampled
   with DDIM from pure noise in as many evaluations as the DRDD sampler takes. It shares the
   schedule's ``β_t``/``ᾱ_t`` tables.

Images are tensors ``(B, C, *spatial)`` for any number of spatial dimensions. Networks enter only as
callables, so the same sampler drives a plain network, a slice-wise 2D model over a volume, or a
sliding window run inside every step (see ``drdd_med.inferers``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# A network as the method sees it: (network input, time τ of shape (B,)) -> prediction.
Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _expand(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Per-batch coefficients ``(B,)`` reshaped to broadcast over ``like`` ``(B, C, *spatial)``."""
    return values.to(like.dtype).reshape(-1, *([1] * (like.ndim - 1)))


# --- 1. Schedule tables ---------------------------------------------------------------------------


class DRDDSchedule:
    """Coefficient tables of DRDD (float64 for exact tests; cast on use).

    ``fixed_noise_step`` t_N sets the *fixed noise level* ``σ_N = σ_{t_N}`` inside which the residual
    stage runs: ``T−1`` (σ ≈ 1) by default, as in the method. A lower t_N leaves the noise stage less
    to invent: the residual stage then ends at ``y + σ_N ε``, the noise stage trains on the levels
    ``σ_0 … σ_N`` it will meet and samples from t_N. Both oracle properties hold for any t_N (method
    page, "Knobs worth measuring").
    """

    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02,
                 fixed_noise_step: int | None = None):
        self.num_train_timesteps = num_train_timesteps
        self.beta_start, self.beta_end = beta_start, beta_end
        self.fixed_noise_step = num_train_timesteps - 1 if fixed_noise_step is None else int(fixed_noise_step)
        if not 0 <= self.fixed_noise_step < num_train_timesteps:
            raise ValueError(f"fixed_noise_step must be in [0, {num_train_timesteps - 1}], got {fixed_noise_step}")
        self.betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float64)
        self.alphas_cumprod = torch.cumprod(1.0 - self.betas, dim=0)
        self.residual_weight = 1.0 - self.alphas_cumprod.sqrt()  # a_t (the reference's alphas_cumsum)
        self.noise_level = (1.0 - self.alphas_cumprod).sqrt()  # σ_t (the reference's betas_cumsum)

    @property
    def fixed_noise_level(self) -> float:
        """σ_N = σ_{t_N}: the noise level inside which the residual stage runs (σ_{T−1} by default)."""
        return float(self.noise_level[self.fixed_noise_step])

    def settings(self) -> dict:
        """The schedule as plain values: a model trained on one must be sampled with the same."""
        return {"num_train_timesteps": self.num_train_timesteps, "beta_start": self.beta_start,
                "beta_end": self.beta_end, "fixed_noise_step": self.fixed_noise_step}

    def a(self, t: torch.Tensor) -> torch.Tensor:
        """Residual weight ``a_t`` for integer ``t`` (any shape); 0 for ``t < 0``."""
        return _lookup(self.residual_weight, t)

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        """Noise level ``σ_t`` for integer ``t`` (any shape); 0 for ``t < 0``."""
        return _lookup(self.noise_level, t)

    def step_pairs(self, num_steps: int, first: int | None = None) -> list[tuple[int, int]]:
        """Sampling grid ``int(linspace(−1, first, S+1))`` reversed, as ``(t, t_next)`` pairs.

        ``first`` is the first timestep, ``T−1`` by default (the method's grid).
        """
        first = self.num_train_timesteps - 1 if first is None else first
        if not 0 <= first < self.num_train_timesteps:
            raise ValueError(f"first timestep must be in [0, {self.num_train_timesteps - 1}], got {first}")
        if num_steps < 1 or num_steps > first + 1:
            raise ValueError(f"number of steps must be in [1, {first + 1}], got {num_steps}")
        times = torch.linspace(-1, first, num_steps + 1, dtype=torch.float64)
        times = [int(t) for t in times.tolist()][::-1]
        return list(zip(times[:-1], times[1:]))

    def sample_timesteps(self, batch_size: int, device, generator: torch.Generator | None = None,
                         last: int | None = None) -> torch.Tensor:
        """Training timesteps, uniform over ``{0, …, last}`` (``last`` = T−1 by default)."""
        last = self.num_train_timesteps - 1 if last is None else last
        return torch.randint(0, last + 1, (batch_size,), device=device, generator=generator)


def _lookup(table: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(t)
    values = table.to(t.device)[t.clamp(min=0).long()]
    return torch.where(t < 0, torch.zeros_like(values), values)


# --- 2. Noise stage (target images only) ----------------------------------------------------------


def noise_q_sample(schedule: DRDDSchedule, y: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Forward process of the noise stage: ``y_t = y + σ_t ε`` (no scaling of ``y``)."""
    return y + _expand(schedule.sigma(t), y) * noise


def noise_time(schedule: DRDDSchedule, t: torch.Tensor) -> torch.Tensor:
    """Time input of the noise network: ``τ = σ_t T`` (a float)."""
    return (schedule.sigma(t) * schedule.num_train_timesteps).float()


def noise_p_losses(
    schedule: DRDDSchedule,
    noise_net: Denoiser,
    y: torch.Tensor,
    condition: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``E ‖ε_φ(y_t, σ_t T) − ε‖²``, ``t`` uniform up to t_N; ``condition`` (source) only for the conditional option."""
    t = schedule.sample_timesteps(y.shape[0], y.device, generator, last=schedule.fixed_noise_step)
    noise = torch.randn(y.shape, device=y.device, dtype=y.dtype, generator=generator)
    y_t = noise_q_sample(schedule, y, t, noise)
    net_input = y_t if condition is None else torch.cat([y_t, condition], dim=1)
    return F.mse_loss(noise_net(net_input, noise_time(schedule, t)).float(), noise.float())


# --- 3. Residual stage inside the fixed noise level (pairs) ----------------------------------------


def residual_q_sample(
    schedule: DRDDSchedule, y: torch.Tensor, residual: torch.Tensor, t: torch.Tensor, noise: torch.Tensor
) -> torch.Tensor:
    """Forward process of the residual stage: ``x_t = y + σ_N ε + a_t r``."""
    return y + schedule.fixed_noise_level * noise + _expand(schedule.a(t), y) * residual


def residual_time(schedule: DRDDSchedule, t: torch.Tensor) -> torch.Tensor:
    """Time input of the residual network: ``τ = a_t T`` (a float)."""
    return (schedule.a(t) * schedule.num_train_timesteps).float()


def residual_p_losses(
    schedule: DRDDSchedule,
    residual_net: Denoiser,
    source: torch.Tensor,
    target: torch.Tensor,
    context: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    loss: str = "l2",
) -> torch.Tensor:
    """``E ‖r_θ(concat(x_t, x_in), a_t T) − r‖²`` with ``r = x_in − y`` (the method's ``loss="l2"``).

    ``source`` and ``target`` have the image channels; ``context`` holds extra condition channels
    (neighbouring source slices for 2.5D) appended after the source. ``loss="l1"`` takes the mean
    absolute error instead, a knob measured against the method (the regression baseline's loss).
    """
    if loss not in RESIDUAL_LOSSES:
        raise ValueError(f"loss must be one of {sorted(RESIDUAL_LOSSES)}, got {loss!r}")
    residual = source - target
    t = schedule.sample_timesteps(target.shape[0], target.device, generator)
    noise = torch.randn(target.shape, device=target.device, dtype=target.dtype, generator=generator)
    x_t = residual_q_sample(schedule, target, residual, t, noise)
    condition = source if context is None else torch.cat([source, context], dim=1)
    prediction = residual_net(torch.cat([x_t, condition], dim=1), residual_time(schedule, t))
    return RESIDUAL_LOSSES[loss](prediction.float(), residual.float())


RESIDUAL_LOSSES = {"l2": F.mse_loss, "l1": F.l1_loss}


# --- 4. Sampler ------------------------------------------------------------------------------------


class NoiseDraws:
    """The Gaussian noise of one sampling run, in the order the sampler uses it.

    The start noise comes first, then one draw for each step that adds fresh noise (``c > 0``;
    ``DRDDSampler.num_noise_draws`` counts them). ``given`` tensors are used as they are, so a caller
    can fix the noise of a run across devices, precisions or batchings; without them each draw comes
    from ``generator``.
    """

    def __init__(self, given: Sequence[torch.Tensor] | None = None, generator: torch.Generator | None = None):
        self.given = list(given) if given is not None else None
        self.generator = generator

    def __call__(self, like: torch.Tensor) -> torch.Tensor:
        if self.given is None:
            return torch.randn(like.shape, device=like.device, dtype=like.dtype, generator=self.generator)
        if not self.given:
            raise ValueError("fewer noise tensors were given than the sampler draws (see DRDDSampler.num_noise_draws)")
        z = self.given.pop(0)
        if tuple(z.shape) != tuple(like.shape):
            raise ValueError(f"a given noise tensor has shape {tuple(z.shape)}, the sample {tuple(like.shape)}")
        return z.to(like.device, like.dtype)


@dataclass
class DRDDSampler:
    """The DRDD sampler: ``S_r`` residual steps then ``S_n`` noise steps (``S_r + S_n`` evaluations).

    ``eta`` in [0, 1]: 0 is deterministic given the start noise (DDIM); 1 adds the most fresh noise
    in each step that keeps ``c² ≤ σ²_{t_next}``, with ``c² = η (σ²_t − σ²_{t_next}) σ²_{t_next} / σ²_t``.
    ``start_scale`` s sets the start ``x = x_in + sqrt(s) ε`` (the reference behaviour, kept as the
    method page says).

    ``noise_steps`` = 0 leaves the noise phase out: with ``start_scale`` 0 the residual phase
    alone maps ``x_in`` to ``x_in − a_{T−1} r̂``, a deterministic estimate of the clean target, for
    tasks where the noise stage would recreate from σ ≈ 1 contrasts that must be kept (low-dose CT).
    ``noise_start`` is the timestep the noise phase starts from: the schedule's fixed noise step t_N
    by default (``T−1`` in the method; with a lower t_N, pair it with ``start_scale`` σ_N²);
    a lower ``t`` treats what is left after the residual phase as noise of level ``σ_t`` (pair it
    with ``start_scale`` ``σ_t²`` or 0), for studies of the noise stage at low noise levels.
    """

    method = "drdd"  # the models it samples (``RecordedModel.method``)
    schedule: DRDDSchedule
    residual_steps: int = 2
    noise_steps: int = 2
    eta: float = 0.0
    start_scale: float = 1.0
    noise_start: int | None = None

    def __post_init__(self):
        if not 0 <= self.eta <= 1:
            raise ValueError(f"eta must be in [0, 1], got {self.eta}")
        if self.start_scale < 0:
            raise ValueError(f"start_scale must be >= 0, got {self.start_scale}")
        if self.noise_steps < 0:
            raise ValueError(f"noise_steps must be >= 0, got {self.noise_steps}")
        self.residual_pairs = self.schedule.step_pairs(self.residual_steps)
        first = self.schedule.fixed_noise_step if self.noise_start is None else self.noise_start
        self.noise_pairs = self.schedule.step_pairs(self.noise_steps, first) if self.noise_steps else []

    def settings(self) -> dict:
        """The sampler's settings and schedule as plain values (for a model record or a results file)."""
        return {"residual_steps": self.residual_steps, "noise_steps": self.noise_steps, "eta": self.eta,
                "start_scale": self.start_scale, "noise_start": self.noise_start, **self.schedule.settings()}

    @property
    def num_noise_draws(self) -> int:
        """Noise tensors one run uses: the start noise, then one per step with ``c > 0``."""
        return 1 + sum(self._c(t, t_next) > 0 for t, t_next in self.residual_pairs + self.noise_pairs)

    def _c(self, t: int, t_next: int) -> float:
        """Standard deviation of the fresh noise added when stepping ``t -> t_next``."""
        if self.eta == 0 or t_next < 0:
            return 0.0
        s_t, s_next = float(self.schedule.noise_level[t]), float(self.schedule.noise_level[t_next])
        return (self.eta * (s_t**2 - s_next**2) * s_next**2 / s_t**2) ** 0.5

    def start(self, source: torch.Tensor, noise: NoiseDraws | None = None) -> torch.Tensor:
        """``x = x_in + sqrt(s) ε``."""
        return source + self.start_scale**0.5 * (noise or NoiseDraws())(source)

    def residual_step(self, x: torch.Tensor, residual_hat: torch.Tensor, t: int, t_next: int, z=None) -> torch.Tensor:
        """One residual step; the result after the last is an estimate of ``y_N``."""
        if t_next < 0:
            return x - float(self.schedule.residual_weight[t]) * residual_hat
        a_t, a_next = float(self.schedule.residual_weight[t]), float(self.schedule.residual_weight[t_next])
        x = x - (a_t - a_next) * residual_hat
        c = self._c(t, t_next)
        return x + c * z if c > 0 else x

    def noise_step(self, x: torch.Tensor, noise_hat: torch.Tensor, t: int, t_next: int, z=None) -> torch.Tensor:
        """One noise step (DDIM, variance-exploding form)."""
        s_t = float(self.schedule.noise_level[t])
        if t_next < 0:
            return x - s_t * noise_hat
        s_next = float(self.schedule.noise_level[t_next])
        c = self._c(t, t_next)
        x = x - (s_t - (s_next**2 - c**2) ** 0.5) * noise_hat
        return x + c * z if c > 0 else x

    def residual_phase(
        self, x: torch.Tensor, residual_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        noise: NoiseDraws | None = None,
    ) -> torch.Tensor:
        """Run the residual steps; ``residual_fn(x, τ)`` returns ``r̂`` (the condition is bound in it)."""
        noise = noise or NoiseDraws()
        for t, t_next in self.residual_pairs:
            tau = torch.full((x.shape[0],), float(self.schedule.residual_weight[t]) * self.schedule.num_train_timesteps,
                             device=x.device)
            residual_hat = residual_fn(x, tau).to(x.dtype)
            x = self.residual_step(x, residual_hat, t, t_next, z=noise(x) if self._c(t, t_next) else None)
        return x

    def noise_phase(
        self, x: torch.Tensor, noise_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        noise: NoiseDraws | None = None,
    ) -> torch.Tensor:
        """Run the noise steps; ``noise_fn(x, τ)`` returns ``ε̂``."""
        noise = noise or NoiseDraws()
        for t, t_next in self.noise_pairs:
            tau = torch.full((x.shape[0],), float(self.schedule.noise_level[t]) * self.schedule.num_train_timesteps,
                             device=x.device)
            noise_hat = noise_fn(x, tau).to(x.dtype)
            x = self.noise_step(x, noise_hat, t, t_next, z=noise(x) if self._c(t, t_next) else None)
        return x

    def sample(
        self,
        source: torch.Tensor,
        residual_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        noise_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        generator: torch.Generator | None = None,
        noise: Sequence[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Translate ``source`` (normalised to [−1, 1]) to the target domain (normalised).

        The noise comes from ``generator``, or is given: ``noise`` holds ``num_noise_draws`` tensors
        shaped like ``source`` (see ``NoiseDraws``).
        """
        draws = NoiseDraws(noise, generator)
        x = self.start(source, draws)
        x = self.residual_phase(x, residual_fn, draws)
        return self.noise_phase(x, noise_fn, draws)


# --- 5. Conditional DDIM (the conditional-diffusion baseline) -------------------------------------


def ddim_q_sample(schedule: DRDDSchedule, y: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Variance-preserving forward process: ``y_t = sqrt(ᾱ_t) y + sqrt(1 − ᾱ_t) ε``."""
    alpha_bar = _expand(_lookup(schedule.alphas_cumprod, t), y)
    return alpha_bar.sqrt() * y + (1 - alpha_bar).sqrt() * noise


DDIM_PREDICTIONS = ("epsilon", "sample")  # what the network predicts: the noise ε or the clean image y


def _check_prediction(prediction: str) -> None:
    if prediction not in DDIM_PREDICTIONS:
        raise ValueError(f"prediction must be one of {DDIM_PREDICTIONS}, got {prediction!r}")


def ddim_p_losses(
    schedule: DRDDSchedule,
    denoiser: Denoiser,
    condition: torch.Tensor,
    y: torch.Tensor,
    generator: torch.Generator | None = None,
    prediction: str = "epsilon",
) -> torch.Tensor:
    """``E ‖f(concat(y_t, condition), t) − ε‖²`` (or ``− y`` for ``prediction="sample"``), ``t`` uniform
    over ``{0, …, T−1}`` (time input: ``t``)."""
    _check_prediction(prediction)
    t = schedule.sample_timesteps(y.shape[0], y.device, generator)
    noise = torch.randn(y.shape, device=y.device, dtype=y.dtype, generator=generator)
    output = denoiser(torch.cat([ddim_q_sample(schedule, y, t, noise), condition], dim=1), t.float())
    return F.mse_loss(output.float(), (noise if prediction == "epsilon" else y).float())


@dataclass
class DDIMSampler:
    """DDIM (Song et al. 2021) for the conditional baseline: ``steps`` evaluations from pure noise.

    On the grid of ``DRDDSchedule.step_pairs(steps)``, each step estimates the clean image
    ``ŷ = (x − sqrt(1 − ᾱ_t) ε̂) / sqrt(ᾱ_t)`` from a network predicting ``ε̂`` (``prediction="epsilon"``)
    or takes the network's ``ŷ`` (``"sample"``, then ``ε̂ = (x − sqrt(ᾱ_t) ŷ) / sqrt(1 − ᾱ_t)``),
    clipped to the normalised range [−1, 1] (``clip``), then moves to
    ``x = sqrt(ᾱ_next) ŷ + sqrt(1 − ᾱ_next − c²) ε̂ + c z`` with
    ``c = η sqrt((1 − ᾱ_next)/(1 − ᾱ_t)) sqrt(1 − ᾱ_t/ᾱ_next)``; the last step outputs ``ŷ``.
    With few steps from pure noise, ``ε`` prediction divides the network's error by ``sqrt(ᾱ_T−1)``
    ≈ 0.006 in the first step; predicting ``y`` does not. The ``source`` only gives the shape of the
    start noise: the condition is bound into ``denoise_fn``.
    """

    method = "cddim"  # the models it samples (``RecordedModel.method``)
    schedule: DRDDSchedule
    steps: int = 4
    eta: float = 0.0
    clip: bool = True
    prediction: str = "epsilon"

    def __post_init__(self):
        if not 0 <= self.eta <= 1:
            raise ValueError(f"eta must be in [0, 1], got {self.eta}")
        _check_prediction(self.prediction)
        self.pairs = self.schedule.step_pairs(self.steps)

    def settings(self) -> dict:
        """The sampler's settings and schedule as plain values (for a model record or a results file)."""
        return {"sampler": "ddim", "steps": self.steps, "eta": self.eta, "clip": self.clip,
                "prediction": self.prediction, **self.schedule.settings()}

    @property
    def num_noise_draws(self) -> int:
        """Noise tensors one run uses: the start noise, then one per step with ``c > 0``."""
        return 1 + sum(self._c(t, t_next) > 0 for t, t_next in self.pairs)

    def _alpha_bar(self, t: int) -> float:
        return float(self.schedule.alphas_cumprod[t])

    def _c(self, t: int, t_next: int) -> float:
        if self.eta == 0 or t_next < 0:
            return 0.0
        a_t, a_next = self._alpha_bar(t), self._alpha_bar(t_next)
        return self.eta * ((1 - a_next) / (1 - a_t) * (1 - a_t / a_next)) ** 0.5

    def sample(
        self,
        source: torch.Tensor,
        denoise_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        generator: torch.Generator | None = None,
        noise: Sequence[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """A target-domain image for ``source`` (normalised); ``denoise_fn(x, t)`` returns ``ε̂`` or ``ŷ``."""
        draws = NoiseDraws(noise, generator)
        x = draws(source)
        for t, t_next in self.pairs:
            a_t = self._alpha_bar(t)
            output = denoise_fn(x, torch.full((x.shape[0],), float(t), device=x.device)).to(x.dtype)
            if self.prediction == "epsilon":
                noise_hat, y_hat = output, (x - (1 - a_t) ** 0.5 * output) / a_t**0.5
            else:
                noise_hat, y_hat = (x - a_t**0.5 * output) / (1 - a_t) ** 0.5, output
            if self.clip:
                y_hat = y_hat.clamp(-1, 1)
            if t_next >= 0:  # the grid's last step (t_next = −1) ends at ŷ
                a_next, c = self._alpha_bar(t_next), self._c(t, t_next)
                x = a_next**0.5 * y_hat + (1 - a_next - c**2) ** 0.5 * noise_hat
                if c > 0:
                    x = x + c * draws(x)
        return y_hat
