"""Ignite workflows (MONAI engines): the stage trainer and the whole-volume evaluator, for every method.

Training reads two data sources: *pairs* (source, target, mask patches) for the residual stage and
the *unpaired pool* (target patches only) for the noise stage. Both stages train in one run with
their own optimizer, or either alone (``stages``). One epoch is one pass over the first configured
source; the other is cycled. The baselines are one more stage each, on the pairs: ``"denoise"``
(conditional DDPM, ``ConditionalDiffusionNetworks``) and ``"regression"`` (``RegressionNetworks``):
same loop, clipping, precision, EMA and checkpoints, so a comparison differs in the method only.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from ignite.engine import Events
from monai.engines import Evaluator, Trainer
from monai.utils import convert_to_tensor

from drdd_med.diffusion import RESIDUAL_LOSSES, DRDDSchedule, ddim_p_losses, noise_p_losses, residual_p_losses
from drdd_med.inferers import DRDDInferer
from drdd_med.networks import RecordedModel
from drdd_med.transforms import CT_HU_RANGE, NormalizeHU

STAGES = ("residual", "noise", "denoise", "regression")
STAGE_DATA = {"residual": "paired", "noise": "pool", "denoise": "paired", "regression": "paired"}  # each stage's loader


class StageBatches:
    """Iterate the paired and target-pool loaders together: ``{"paired": batch, "pool": batch}``.

    The first loader given (paired when present) sets the epoch length; the other restarts when it
    runs out, so a small paired set and a large pool (or the reverse) both train every iteration.
    """

    def __init__(self, paired: Iterable | None = None, pool: Iterable | None = None):
        if paired is None and pool is None:
            raise ValueError("need a paired loader, a target-pool loader, or both")
        self.paired, self.pool = paired, pool

    def __len__(self) -> int:
        return len(self.paired if self.paired is not None else self.pool)

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle each loader's ``DistributedSampler`` for ``epoch`` (every rank draws its own share)."""
        for loader in (self.paired, self.pool):
            sampler = getattr(loader, "sampler", None)
            if isinstance(sampler, torch.utils.data.DistributedSampler):
                sampler.set_epoch(epoch)

    def __iter__(self):
        lead_name, lead, other_name, other = (
            ("paired", self.paired, "pool", self.pool) if self.paired is not None else ("pool", self.pool, "paired", None)
        )
        other_iter = iter(other) if other is not None else None
        for batch in lead:
            item = {lead_name: batch, other_name: None}
            if other is not None:
                try:
                    item[other_name] = next(other_iter)
                except StopIteration:
                    other_iter = iter(other)
                    item[other_name] = next(other_iter)
            yield item


def cpu_bf16_native() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 / AMX); elsewhere bf16 autocast is emulated and slow."""
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return bool(check and check())


def bf16_supported(device: torch.device | str) -> bool:
    """Whether bf16 autocast runs natively on ``device``: any CUDA device, a CPU with AVX512-BF16 / AMX."""
    return torch.device(device).type == "cuda" or cpu_bf16_native()


def computes_bf16(device: torch.device | str, precision: str) -> bool:
    """Whether ``precision`` runs as bf16 on ``device``: asked for, and native there (else fp32)."""
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision must be 'fp32' or 'bf16', got {precision!r}")
    return precision == "bf16" and bf16_supported(device)


def autocast_context(device: torch.device | str, precision: str, cache_enabled: bool = True):
    """bf16 autocast when asked (``precision="bf16"``) and ``device`` computes bf16 natively; fp32 otherwise.

    On a CPU without native bf16, autocast would only emulate it, slower than fp32: such a CPU stays in
    fp32 whatever the profile asks (``docs/results/benchmark_cpu_bf16.json`` measures both on one that has it).
    ``cache_enabled=False`` for code captured in a CUDA graph (torch's rule: cached bf16 weight copies
    would be freed under the graph).
    """
    if computes_bf16(device, precision):
        return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, cache_enabled=cache_enabled)
    return contextlib.nullcontext()


class DRDDTrainer(Trainer):
    """Train each configured stage of a model one step per iteration.

    DRDD: the residual stage on pairs and the noise stage on the target pool. Conditional-diffusion
    baseline: the ``"denoise"`` stage, a DDPM noise-prediction loss conditioned on ``source[, context]``,
    on pairs. Regression baseline: the ``"regression"`` stage, an L1 loss between the U-Net's
    prediction from ``source[, context]`` and the target, on pairs.

    Args:
        network: the model (``DRDDNetworks``, ``ConditionalDiffusionNetworks`` or ``RegressionNetworks``).
        residual_optimizer / noise_optimizer / denoise_optimizer / regression_optimizer: optimizers of the
            network of that stage (``None`` for a stage not trained in this run).
        paired_loader / pool_loader: loaders of patch dictionaries (``source``, ``target``, ``mask``
            / ``target``); the source carries the 2.5D context channels after its image channels.
        stages: which of the model's stages train (default all; DRDD: "residual", "noise" or both).
        grad_clip: max gradient norm per network (the reference's 1.0).
        precision: "bf16" (autocast where the device computes bf16 natively, see ``autocast_context``) or "fp32".
        residual_loss: the residual stage's loss, "l2" (the method) or "l1" (see ``residual_p_losses``).
        distributed: train with ``DistributedDataParallel`` in an initialised process group (``torchrun``):
            each stage's network is wrapped, so gradients are averaged across ranks and every rank
            keeps identical weights; the loaders' ``DistributedSampler`` are reshuffled every epoch.
            ``network`` itself stays unwrapped, so checkpoints and the EMA hold plain weights.
    """

    def __init__(
        self,
        device: torch.device | str,
        max_epochs: int,
        network: RecordedModel,
        residual_optimizer: torch.optim.Optimizer | None = None,
        noise_optimizer: torch.optim.Optimizer | None = None,
        paired_loader: Iterable | None = None,
        pool_loader: Iterable | None = None,
        stages: Sequence[str] | None = None,
        schedule: DRDDSchedule | None = None,
        grad_clip: float | None = 1.0,
        precision: str = "bf16",
        epoch_length: int | None = None,
        train_handlers: Sequence | None = None,
        non_blocking: bool = False,
        regression_optimizer: torch.optim.Optimizer | None = None,
        residual_loss: str = "l2",
        denoise_optimizer: torch.optim.Optimizer | None = None,
        distributed: bool = False,
    ):
        requested = tuple(network.stages if stages is None else stages)
        unknown = set(requested) - set(network.stages)
        if not requested or unknown:
            raise ValueError(f"stages must be a non-empty subset of the {network.method} model's stages "
                             f"{network.stages}, got {requested}")
        stages = tuple(s for s in network.stages if s in requested)  # the model's order: same random draws
        optimizers = {"residual": residual_optimizer, "noise": noise_optimizer, "denoise": denoise_optimizer,
                      "regression": regression_optimizer}
        loaders = {"paired": paired_loader, "pool": pool_loader}
        for stage in stages:
            data = STAGE_DATA[stage]
            if loaders[data] is None or optimizers[stage] is None:
                loader_name = "paired" if data == "paired" else "target-pool"
                raise ValueError(f"the {stage} stage needs a {loader_name} loader and a {stage} optimizer")
        used = {STAGE_DATA[stage] for stage in stages}
        batches = StageBatches(*(loaders[d] if d in used else None for d in ("paired", "pool")))
        autocast_context(device, precision)  # validates the name early
        if residual_loss not in RESIDUAL_LOSSES:
            raise ValueError(f"residual_loss must be one of {sorted(RESIDUAL_LOSSES)}, got {residual_loss!r}")
        super().__init__(
            device=device,
            max_epochs=max_epochs,
            data_loader=batches,
            epoch_length=epoch_length,
            non_blocking=non_blocking,
            handlers=train_handlers,
            decollate=False,
        )
        self.network = network
        self.residual_optimizer = residual_optimizer
        self.noise_optimizer = noise_optimizer
        self.regression_optimizer = regression_optimizer
        self.denoise_optimizer = denoise_optimizer
        self.optimizers = {stage: optimizers[stage] for stage in stages}
        self.stages = stages
        self.schedule = schedule or DRDDSchedule()
        if hasattr(network, "schedule"):  # diffusion: the model record keeps the schedule it is trained with
            network.schedule = self.schedule.settings()
        self.grad_clip = grad_clip
        self.precision = precision
        self.residual_loss = residual_loss
        # what each stage's loss calls: the stage's network (the whole model for the regression baseline,
        # whose forward adds the source back), wrapped for data parallelism when distributed
        self.stage_forward = {stage: network if stage == "regression" else getattr(network, stage) for stage in stages}
        if distributed:
            if not torch.distributed.is_initialized():
                raise RuntimeError("distributed training needs an initialised process group (launch with torchrun)")
            device_ids = [torch.device(device)] if torch.device(device).type == "cuda" else None
            self.stage_forward = {stage: torch.nn.parallel.DistributedDataParallel(module, device_ids=device_ids)
                                  for stage, module in self.stage_forward.items()}
            self.add_event_handler(Events.EPOCH_STARTED, lambda engine: batches.set_epoch(engine.state.epoch))

    def _to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        return convert_to_tensor(tensor, track_meta=False).to(self.state.device, non_blocking=self.non_blocking)

    def _step(self, stage: str, loss_fn) -> float:
        net = getattr(self.network, stage)
        optimizer = self.optimizers[stage]
        net.train()
        optimizer.zero_grad(set_to_none=True)
        with autocast_context(self.state.device, self.precision):
            loss = loss_fn()
        loss.backward()
        if self.grad_clip:
            torch.nn.utils.clip_grad_norm_(net.parameters(), self.grad_clip)
        optimizer.step()
        self.network.trained_iterations[stage] += 1  # the model record: which stages were trained, how long
        return loss.detach()

    def _iteration(self, engine, batchdata: dict) -> dict:
        output = {}
        for stage in self.stages:
            batch = batchdata[STAGE_DATA[stage]]
            loss_fn = getattr(self, f"_{stage}_loss")
            output[f"loss_{stage}"] = self._step(stage, lambda: loss_fn(batch))
        output["loss"] = sum(output.values())
        return {k: float(v) for k, v in output.items()}

    def _source_target(self, paired: dict) -> tuple[torch.Tensor, torch.Tensor]:
        return self._to_device(paired["source"]), self._to_device(paired["target"])

    def _residual_loss(self, paired: dict) -> torch.Tensor:
        channels = self.network.image_channels
        source, target = self._source_target(paired)
        context = source[:, channels:] if source.shape[1] > channels else None
        return residual_p_losses(self.schedule, self.stage_forward["residual"], source[:, :channels], target, context,
                                 loss=self.residual_loss)

    def _noise_loss(self, pool: dict) -> torch.Tensor:
        target = self._to_device(pool["target"])
        condition = None
        if self.network.noise_conditional:
            condition = self._to_device(pool["source"])[:, :self.network.image_channels]
        return noise_p_losses(self.schedule, self.stage_forward["noise"], target, condition)

    def _denoise_loss(self, paired: dict) -> torch.Tensor:
        source, target = self._source_target(paired)  # the condition: the source with its context channels
        return ddim_p_losses(self.schedule, self.stage_forward["denoise"], source, target, prediction=self.network.prediction)

    def _regression_loss(self, paired: dict) -> torch.Tensor:
        source, target = self._source_target(paired)  # the source's context channels are U-Net inputs too
        return F.l1_loss(self.stage_forward["regression"](source), target)


class DRDDEvaluator(Evaluator):
    """Translate whole volumes with the inferer (a diffusion sampler, or one pass of a regression model); output HU.

    Each batch holds one case: ``source`` (normalised, a MetaTensor carrying the source grid), and
    optionally ``target`` (reference CT in HU, not normalised) and ``mask``. The output dict has
    ``pred`` (HU, clipped to the CT range of the normalisation), ``source``, and ``label``/``mask``
    when given, each ``(1, C, X, Y, Z)``; ``case_id`` and the source ``affine`` come along for writers.
    With an inferer of ``num_samples`` > 1, ``pred`` is the mean of the samples and ``pred_std`` their
    per-voxel standard deviation in HU (``prediction_to_hu``).
    """

    def __init__(
        self,
        device: torch.device | str,
        val_data_loader: Iterable,
        network: RecordedModel,
        inferer: DRDDInferer | None = None,
        hu_range: Sequence[float] = CT_HU_RANGE,
        precision: str = "bf16",
        key_val_metric: dict | None = None,
        additional_metrics: dict | None = None,
        val_handlers: Sequence | None = None,
        non_blocking: bool = False,
    ):
        super().__init__(
            device=device,
            val_data_loader=val_data_loader,
            non_blocking=non_blocking,
            key_val_metric=key_val_metric,
            additional_metrics=additional_metrics,
            metric_cmp_fn=lower_is_better,
            val_handlers=val_handlers,
            decollate=False,
        )
        self.network = network
        self.inferer = inferer or DRDDInferer()
        self.to_hu = NormalizeHU(hu_range)
        self.precision = precision
        autocast_context(device, precision)

    def _iteration(self, engine, batchdata: dict) -> dict:
        # the model record keeps the sampler a diffusion model was last validated with (the one to use it with)
        if self.network.method != "regression":
            self.network.validation_sampler = self.inferer.sampler.settings()
        if batchdata["source"].shape[0] != 1:
            raise ValueError("the evaluator reads one whole volume per batch (batch_size=1)")
        device = self.state.device
        source = convert_to_tensor(batchdata["source"], track_meta=False).to(device)
        self.network.eval()
        with torch.no_grad(), autocast_context(device, self.precision):
            mean, std = self.inferer.mean_and_std(source, self.network)
        pred, pred_std = prediction_to_hu(self.to_hu, mean, std)
        output = {"pred": pred, "source": source, "case_id": batchdata.get("case_id", ["case"])[0]}
        if pred_std is not None:
            output["pred_std"] = pred_std
        affine = getattr(batchdata["source"], "affine", None)
        if affine is not None:
            output["affine"] = torch.as_tensor(affine)[0] if torch.as_tensor(affine).ndim == 3 else torch.as_tensor(affine)
        for key, out_key in (("target", "label"), ("mask", "mask")):
            if key in batchdata:
                output[out_key] = convert_to_tensor(batchdata[key], track_meta=False).to(device).float()
        return output


def prediction_to_hu(
    to_hu: NormalizeHU, mean: torch.Tensor, std: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A translation's mean and std (normalised, ``DRDDInferer.mean_and_std``) in HU: the one place they are mapped.

    The mean goes through ``to_hu.to_hu`` and is clamped to its CT range; the std, a spread, scales by
    the slope of that linear map alone (no offset, no clamp). Both come back as float32 tensors.
    """
    pred = torch.as_tensor(to_hu.to_hu(mean.float()).clamp(*to_hu.hu_range))
    if std is None:
        return pred, None
    slope = (to_hu.to_hu(torch.ones(1)) - to_hu.to_hu(torch.zeros(1))).item()
    return pred, torch.as_tensor(std.float() * slope)


def lower_is_better(current: float, prev: float) -> bool:
    """Key-metric comparison for errors such as MAE (MONAI starts ``prev`` at −1)."""
    return prev < 0 or current < prev


def ensure_new_run(ckpt_dir, overwrite: bool = False, resume_from: str = "") -> None:
    """Refuse to train over an existing model unless resuming or ``overwrite`` is set.

    With ``overwrite`` the previous run's checkpoints are removed first, so none outlives its run.
    """
    from pathlib import Path

    from drdd_med.errors import OutputExistsError

    if resume_from:
        return
    existing = sorted(Path(ckpt_dir).glob("*.pt")) if Path(ckpt_dir).is_dir() else []
    if existing and not overwrite:
        raise OutputExistsError(
            f"{ckpt_dir} already holds a trained model ({', '.join(p.name for p in existing)}); "
            "set overwrite true to replace it, or resume_from to continue that run"
        )
    for path in existing:
        path.unlink()
