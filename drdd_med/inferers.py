"""Translation of whole volumes, as a MONAI ``Inferer``: DRDD or DDIM sampling, or one pass of a regression model.

- 2D / 2.5D models: the volume ``(1, C, X, Y, Z)`` is cut into axial slices (last axis), sampled in
  batches of ``slice_batch_size`` and stacked back. 2.5D models get ``k − 1`` neighbouring source
  slices as extra condition channels, exactly as ``RandPairedPatch`` builds them in training.
- 3D models: one noise volume for the whole image, and a sliding window run *inside every
  denoising step* (each step predicts over the whole volume, blended, before ``x`` is updated), so
  patches share one trajectory and no seams appear.

The conditional-diffusion baseline (``ConditionalDiffusionNetworks``) runs its ``DDIMSampler`` the
same way: each model names which of its networks read which condition, and the sampler takes them
in that order. A regression model (``RegressionNetworks``) goes through the same slicing, padding
and 2.5D context building, with one network call in place of the sampler (in 3D: MONAI's sliding
window once), so every bundle runs any method through this one inferer.

Inputs and outputs are normalised to ``[−1, 1]``; mapping to HU is the caller's (see
``drdd_med.engines.prediction_to_hu``). The sampling noise of a whole volume is drawn once per call
on the CPU from ``seed``, so a rerun gives the same volume, on any device and with any slice batch size.

Uncertainty: with ``num_samples`` S > 1 the inferer draws S independent noise sets (one after the
other from one generator seeded by ``seed``: the first is exactly the noise of S = 1), translates
the volume with each, and returns the per-voxel mean; ``mean_and_std`` returns the per-voxel
standard deviation over the samples too. Both are accumulated in float64 one sample at a time
(Welford), so memory holds two accumulators and one sample, never S volumes.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.inferers import Inferer, sliding_window_inference

from drdd_med.diffusion import DDIMSampler, DRDDSampler, DRDDSchedule
from drdd_med.networks import RecordedModel


class DRDDInferer(Inferer):
    """Translate a normalised source volume with a DRDD, conditional-diffusion or regression model.

    Args:
        sampler: the sampler of the model's method: ``DRDDSampler`` (steps, η, start scale; the
            default ``DRDDSampler(DRDDSchedule())``) for DRDD, ``DDIMSampler`` for the conditional
            diffusion baseline. A regression model takes no steps and ignores it.
        slice_batch_size: slices per network call for 2D models.
        max_batch_pixels: cap on the pixels (slices × padded slice area) per network call for 2D
            models, at least one slice (``None``: no cap). On a CPU big batches of big slices run
            slower per slice (their activations leave the caches): the CPU profile caps them.
        roi_size: sliding-window patch size for 3D models (``None``: the whole volume at once).
        sw_batch_size, overlap, mode: sliding-window options (MONAI's), for 3D models.
        seed: seed of the start and η noise (DRDD); ``None`` draws fresh noise each call.
        progress: show a progress bar over slice batches.
        num_samples: samples per volume (default 1). With S > 1, ``__call__`` returns their per-voxel
            mean and ``mean_and_std`` the standard deviation too (Bessel-corrected, over S). A model
            whose output cannot vary (a regression model; a DRDD sampler with ``start_scale`` 0 and no
            step adding η noise) is run once: its mean is that one output and its std exactly 0.
    """

    def __init__(
        self,
        sampler: DRDDSampler | DDIMSampler | None = None,
        slice_batch_size: int = 32,
        max_batch_pixels: int | None = None,
        roi_size: Sequence[int] | None = None,
        sw_batch_size: int = 4,
        overlap: float = 0.25,
        mode: str = "gaussian",
        seed: int | None = 0,
        progress: bool = False,
        num_samples: int = 1,
    ):
        super().__init__()
        if isinstance(num_samples, bool) or not isinstance(num_samples, numbers.Integral) or num_samples < 1:
            raise ValueError(f"num_samples must be an integer of at least 1, got {num_samples!r}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)):
            raise ValueError(f"seed must be an integer or None, got {seed!r}")  # the bundles' sample_seed
        self.sampler = sampler or DRDDSampler(DRDDSchedule())
        self.slice_batch_size = slice_batch_size
        self.max_batch_pixels = max_batch_pixels
        self.roi_size = tuple(roi_size) if roi_size is not None else None
        self.sw_batch_size = sw_batch_size
        self.overlap = overlap
        self.mode = mode
        self.seed = seed
        self.progress = progress
        self.num_samples = int(num_samples)

    def _noise(self, shape: Sequence[int], generator: torch.Generator | None) -> torch.Tensor:
        """One sample's noise, ``(num_noise_draws, *shape)``, drawn on the CPU (device-independent)."""
        return torch.randn((self.sampler.num_noise_draws, *shape), generator=generator)

    def output_varies(self, network: RecordedModel) -> bool:
        """Whether sampling noise reaches ``network``'s output: not for a regression model, nor for a
        DRDD sampler that starts at the source (``start_scale`` 0) and adds no η noise in any step."""
        if network.method == "regression":
            return False
        return not (isinstance(self.sampler, DRDDSampler) and self.sampler.start_scale == 0
                    and self.sampler.num_noise_draws == 1)

    def __call__(self, inputs: torch.Tensor, network: RecordedModel, *args, **kwargs) -> torch.Tensor:
        """The translation of ``inputs`` (normalised); with ``num_samples`` > 1 the per-voxel mean of the samples."""
        return self.mean_and_std(inputs, network)[0]

    def mean_and_std(self, inputs: torch.Tensor, network: RecordedModel) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per-voxel mean and standard deviation over ``num_samples`` translations of ``inputs`` (normalised).

        The std is ``None`` for ``num_samples`` 1 (one sample has none), exactly 0 for a model whose
        output cannot vary (``output_varies``; run once). Otherwise sample ``k`` takes the ``k``-th
        noise set drawn from ``seed``: the same seed gives the same mean and std.
        """
        if inputs.ndim != 5 or inputs.shape[0] != 1:
            raise ValueError(f"expected one source volume (1, C, X, Y, Z), got shape {tuple(inputs.shape)}")
        if network.method != "regression" and self.sampler.method != network.method:
            raise ValueError(f"a {network.method} model needs its own sampler, not the {self.sampler.method} "
                             f"one ({type(self.sampler).__name__})")
        inputs = torch.as_tensor(inputs)  # plain tensor: metadata stays with the caller
        generator = None if self.seed is None else torch.Generator().manual_seed(self.seed)
        if self.num_samples == 1 or not self.output_varies(network):
            out = self._translate(inputs, network, generator)
            return out, None if self.num_samples == 1 else torch.zeros_like(out)
        mean = squares = None  # Welford: running mean and sum of squared deviations, in float64
        for k in range(1, self.num_samples + 1):
            sample = self._translate(inputs, network, generator)
            dtype, sample = sample.dtype, sample.double()
            if mean is None:
                mean, squares = torch.zeros_like(sample), torch.zeros_like(sample)
            delta = sample - mean
            mean += delta / k
            squares += delta * (sample - mean)
        return mean.to(dtype), (squares / (self.num_samples - 1)).sqrt().to(dtype)

    def _translate(self, inputs: torch.Tensor, network: RecordedModel, generator: torch.Generator | None):
        """One translation of ``inputs``, its noise drawn from ``generator``."""
        if network.spatial_dims == 2:
            return self._translate_slices(inputs, network, generator)
        if network.method == "regression":
            return self._regress_volume(inputs, network)
        return self._sample_volume(inputs, network, generator)

    # --- 2D / 2.5D -------------------------------------------------------------------------------

    def _translate_slices(self, volume: torch.Tensor, network: RecordedModel,
                          generator: torch.Generator | None) -> torch.Tensor:
        _, channels, sx, sy, depth = volume.shape
        padded = _pad_to_multiple(volume[0].movedim(-1, 0), network.size_divisor)  # (Z, C, X', Y')
        half = network.context_slices // 2
        offsets = [d for d in range(-half, half + 1) if d != 0]
        translate = self._slice_translator(network, padded.shape, generator)
        batch_size = self.slice_batch_size
        if self.max_batch_pixels is not None:
            batch_size = max(1, min(batch_size, self.max_batch_pixels // (padded.shape[-2] * padded.shape[-1])))
        batches = range(0, depth, batch_size)
        if self.progress:
            from tqdm.auto import tqdm

            batches = tqdm(batches, desc="slices", unit="batch", leave=False)
        out = []
        for start in batches:
            index = torch.arange(start, min(start + batch_size, depth), device=volume.device)
            source = padded[index]
            context = None
            if offsets:  # same order as RandPairedPatch: centre slice, then neighbours in spatial order
                context = torch.cat([padded[(index + d).clamp(0, depth - 1)] for d in offsets], dim=1)
            out.append(translate(source, context, index))
        slices = torch.cat(out)[..., :sx, :sy]  # (Z, C, X, Y)
        return slices.movedim(0, -1)[None]

    def _slice_translator(self, network: RecordedModel, shape: Sequence[int], generator: torch.Generator | None):
        """``translate(source, context, index)`` for one batch of slices ``index`` of a padded volume of ``shape``.

        DRDD samples from the volume's noise (drawn once for all slices, so batching changes
        nothing); a regression model reads ``source`` and its context as the channels it trained on.
        """
        if network.method == "regression":
            def regress(source, context, index):
                return network(source if context is None else torch.cat([source, context], 1))

            return regress
        noise = self._noise(shape, generator)

        def sample(source, context, index):
            draws = [z[index.cpu()].to(source.device, source.dtype) for z in noise]
            return self.sampler.sample(source, *bind_networks(network, source, context), noise=draws)

        return sample

    # --- 3D: a sliding window (for DRDD inside each denoising step) -------------------------------

    def _padded_volume(self, volume: torch.Tensor, network: RecordedModel) -> tuple[torch.Tensor, tuple[int, ...]]:
        """``volume`` padded to the network's multiple, and the window size (a multiple of it too)."""
        padded = _pad_to_multiple(volume, network.size_divisor)
        roi = self.roi_size or tuple(padded.shape[2:])
        if any(r % network.size_divisor for r in roi):
            raise ValueError(f"roi_size {roi} must be a multiple of {network.size_divisor} for this network")
        return padded, roi

    def _sample_volume(self, volume: torch.Tensor, network: RecordedModel,
                       generator: torch.Generator | None) -> torch.Tensor:
        spatial = volume.shape[2:]
        padded, roi = self._padded_volume(volume, network)

        def windowed(net, condition):
            def fn(x, tau):
                inputs = x if condition is None else torch.cat([x, condition], dim=1)
                return sliding_window_inference(
                    inputs, roi, self.sw_batch_size,
                    lambda patch: net(patch, tau[:1].expand(patch.shape[0])),
                    overlap=self.overlap, mode=self.mode,
                )
            return fn

        conditions = _conditions(padded, None)  # 3D models have no context slices
        fns = [windowed(net, conditions[kind]) for net, kind in network.conditioned_networks()]
        noise = [z.to(volume.device, volume.dtype) for z in self._noise(padded.shape, generator)]
        out = self.sampler.sample(padded, *fns, noise=noise)
        return out[(..., *[slice(0, s) for s in spatial])]

    def _regress_volume(self, volume: torch.Tensor, network: RecordedModel) -> torch.Tensor:
        """A 3D regression model: one blended sliding window over the volume (no steps, no noise)."""
        spatial = volume.shape[2:]
        padded, roi = self._padded_volume(volume, network)
        out = sliding_window_inference(padded, roi, self.sw_batch_size, network, overlap=self.overlap, mode=self.mode)
        return out[(..., *[slice(0, s) for s in spatial])]


def bind_networks(network, source: torch.Tensor, context: torch.Tensor | None = None) -> list:
    """A diffusion model's networks as its sampler takes them, ``fn(x, τ)``, each reading its condition
    (``ScheduledModel.conditioned_networks``) of this batch of 2D slices or whole inputs."""
    conditions = _conditions(source, context)
    return [_conditioned(net, conditions[kind]) for net, kind in network.conditioned_networks()]


def _conditions(source: torch.Tensor, context: torch.Tensor | None) -> dict:
    """What each kind of condition of ``ScheduledModel.conditioned_networks`` is, for one batch."""
    return {"source+context": source if context is None else torch.cat([source, context], dim=1),
            "source": source, None: None}


def _conditioned(net, condition: torch.Tensor | None):
    """``net`` as the samplers call it, ``fn(x, τ)``, reading ``concat(x, condition)``."""
    def fn(x, tau):
        return net(x if condition is None else torch.cat([x, condition], dim=1), tau)

    return fn


def _pad_to_multiple(x: torch.Tensor, divisor: int) -> torch.Tensor:
    """Replicate-pad the trailing spatial dims of ``x`` (N, C, ...) up to multiples of ``divisor``."""
    pads = []
    for size in reversed(x.shape[2:]):
        pads += [0, (-size) % divisor]
    return F.pad(x, pads, mode="replicate") if any(pads) else x
