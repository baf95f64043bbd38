"""The models drdd_med trains, each saved with its *model record*, and how they are loaded.

DRDD (``DRDDNetworks``): two networks built from MONAI's ``DiffusionModelUNet`` through one factory.

- residual network ``r_θ``: input ``concat(x_t, source[, context])``, predicts the residual;
- noise network ``ε_φ``: input ``y_t`` (unconditional, the default, so it can learn from unpaired
  target images) or ``concat(y_t, source)`` (conditional option), predicts the noise.

Both take a float time ``τ`` per item, as the method defines it.

Conditional-diffusion baseline (``ConditionalDiffusionNetworks``, method ``"cddim"``): one
``DiffusionModelUNet`` of the residual network's size and inputs, ``concat(y_t, source[, context])``,
predicting the noise or the clean image of a standard DDPM, sampled with DDIM
(``drdd_med.diffusion.DDIMSampler``).

Regression baseline (``RegressionNetworks``): one MONAI ``BasicUNet`` mapping ``source[, context]``
straight to the target, trained with an L1 loss. It is what DRDD has to beat (SynthRAD winners were
regression U-Nets), so it trains, saves and translates through the same engines and inferer.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import torch
from monai.networks.nets import BasicUNet, DiffusionModelUNet

from drdd_med.errors import DRDDInputError

ROLES = ("residual", "noise")

# Network sizes by name. "cpu-demo" trains the demo in minutes on 2 CPU cores; "gpu" is the default
# on a GPU; "reference" rebuilds the sizes of the reference DRDD networks (method page) in MONAI.
PRESETS: dict[str, dict] = {
    "tiny": {  # for smoke tests: seconds per epoch, learns nothing useful
        "residual": {"channels": (8, 16), "attention_levels": (False, True), "num_res_blocks": 1,
                     "num_head_channels": 8, "norm_num_groups": 4},
        "noise": {"channels": (8, 16), "attention_levels": (False, True), "num_res_blocks": 1,
                  "num_head_channels": 8, "norm_num_groups": 4},
    },
    "cpu-demo": {  # four levels for a wide receptive field; narrow, so a step stays cheap on a CPU
        "residual": {"channels": (16, 32, 64, 128), "attention_levels": (False, False, False, True),
                     "num_res_blocks": 1, "num_head_channels": 32, "norm_num_groups": 8},
        "noise": {"channels": (16, 32, 64, 128), "attention_levels": (False, False, False, True),
                  "num_res_blocks": 1, "num_head_channels": 32, "norm_num_groups": 8},
    },
    "cpu-lite": {  # cpu-demo at 3/4 width, attention only in the middle block: 1.5x cheaper training
        # iterations, 2x faster 512² translation; opt-in (README, "A cheaper network")
        "residual": {"channels": (12, 24, 48, 96), "attention_levels": (False, False, False, False),
                     "num_res_blocks": 1, "num_head_channels": 32, "norm_num_groups": 4},
        "noise": {"channels": (12, 24, 48, 96), "attention_levels": (False, False, False, False),
                  "num_res_blocks": 1, "num_head_channels": 32, "norm_num_groups": 4},
    },
    "gpu": {
        "residual": {"channels": (64, 128, 256, 512), "attention_levels": (False, False, True, True),
                     "num_res_blocks": 2, "num_head_channels": 64, "norm_num_groups": 32},
        "noise": {"channels": (64, 128, 256, 512), "attention_levels": (False, False, True, True),
                  "num_res_blocks": 2, "num_head_channels": 64, "norm_num_groups": 32},
    },
    "reference": {
        # residual: 64 channels x (1, 2, 4, 8), attention in the middle (43 M parameters here, the
        # reference's linear-attention U-Net has 36 M); noise: ADM-style 128 x (1, 1, 2, 2, 4, 4),
        # 2 res-blocks, attention at 32/16/8 px of a 256 px input, resblock up/down (132 M, as the reference)
        "residual": {"channels": (64, 128, 256, 512), "attention_levels": (False, False, False, True),
                     "num_res_blocks": 1, "num_head_channels": 64, "norm_num_groups": 32},
        "noise": {"channels": (128, 128, 256, 256, 512, 512),
                  "attention_levels": (False, False, False, True, True, True),
                  "num_res_blocks": 2, "num_head_channels": 64, "norm_num_groups": 32, "resblock_updown": True},
    },
}


def sdpa_available() -> bool:
    """Whether torch has fused scaled-dot-product attention (flash / memory-efficient kernels)."""
    return hasattr(torch.nn.functional, "scaled_dot_product_attention")


def network_in_channels(role: str, image_channels: int = 1, context_channels: int = 0, conditional: bool = False) -> int:
    """Input channels of a DRDD network, from the method's conditioning rules."""
    if role == "residual":
        return 2 * image_channels + context_channels
    if role == "noise":
        return 2 * image_channels if conditional else image_channels
    raise ValueError(f"role must be one of {ROLES}, got {role!r}")


def build_drdd_network(
    role: str,
    spatial_dims: int = 2,
    image_channels: int = 1,
    context_channels: int = 0,
    conditional: bool = False,
    channels: Sequence[int] = (32, 64, 128),
    attention_levels: Sequence[bool] = (False, False, True),
    num_res_blocks: int | Sequence[int] = 1,
    num_head_channels: int | Sequence[int] = 32,
    norm_num_groups: int = 16,
    resblock_updown: bool = False,
    use_flash_attention: bool | None = None,
) -> DiffusionModelUNet:
    """Build the ``role`` ("residual" or "noise") network of DRDD.

    ``context_channels`` (residual network only) are extra condition channels, e.g. the ``k − 1``
    neighbouring source slices of a 2.5D model. ``conditional`` (noise network only) feeds the source
    to the noise network too. ``use_flash_attention=None`` picks fused attention when torch has it.
    """
    if role != "residual" and context_channels:
        raise ValueError("context channels condition the residual network only")
    if role != "noise" and conditional:
        raise ValueError("'conditional' is an option of the noise network only")
    if len(channels) != len(attention_levels):
        raise ValueError(f"channels {tuple(channels)} and attention_levels {tuple(attention_levels)} differ in length")
    bad = [c for c in channels if c % norm_num_groups]
    if bad:
        raise ValueError(f"channels {bad} are not divisible by norm_num_groups={norm_num_groups}")
    return DiffusionModelUNet(
        spatial_dims=spatial_dims,
        in_channels=network_in_channels(role, image_channels, context_channels, conditional),
        out_channels=image_channels,
        num_res_blocks=num_res_blocks,
        channels=tuple(channels),
        attention_levels=tuple(attention_levels),
        norm_num_groups=norm_num_groups,
        resblock_updown=resblock_updown,
        num_head_channels=num_head_channels,
        use_flash_attention=sdpa_available() if use_flash_attention is None else use_flash_attention,
    )


MODEL_RECORD_FORMAT = 1


def _plain(value):
    """Tuples to lists, recursively: the record is stored as JSON-like plain types (``weights_only``)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def _with_method(architecture: dict) -> dict:
    """``architecture`` naming its method; records written before the regression baseline are DRDD's."""
    return {"method": "drdd", **architecture}


class RecordedModel(torch.nn.Module):
    """A model whose state dict carries its *model record* (``_extra_state``), written once for every method.

    Plain types only, so ``torch.load(weights_only=True)`` reads it: how the model was built
    (``architecture``, with its ``method``), how many iterations each of its ``stages`` was trained
    (``trained_iterations``, counted by ``DRDDTrainer``), the sampler settings of its last validation
    (``validation_sampler``, DRDD only), what the training config declares in ``record`` (intensity
    normalisation, training settings; never patient data or paths) with its digest, and the library
    versions. ``load_model`` rebuilds a model from that record alone, so inference needs no size flags.
    Subclasses set ``method`` and ``stages`` and pass what else builds them (``options``) to ``__init__``.
    """

    method: str
    stages: tuple[str, ...]

    def __init__(self, spatial_dims: int, image_channels: int, context_slices: int, record: dict | None, **options):
        super().__init__()
        self.spatial_dims = spatial_dims
        self.image_channels = image_channels
        self.context_slices = context_slices
        self.architecture = _plain({"method": self.method, "spatial_dims": spatial_dims,
                                    "image_channels": image_channels, "context_slices": context_slices, **options})
        self.trained_iterations = {stage: 0 for stage in self.stages}
        self.validation_sampler: dict | None = None
        self.record = _plain(record or {})

    def stages_run_by(self, sampler) -> list[str]:
        """The stages whose networks translating with ``sampler`` runs (each must have been trained)."""
        return list(self.stages)

    def get_extra_state(self) -> dict:
        import monai

        from drdd_med import __version__

        return {
            "format": MODEL_RECORD_FORMAT,
            "architecture": self.architecture,
            "trained_iterations": dict(self.trained_iterations),
            "validation_sampler": self.validation_sampler,
            "record": self.record,
            "config_digest": _digest(self.record),
            "versions": {"drdd_med": __version__, "monai": monai.__version__, "torch": torch.__version__.split("+")[0]},
        }

    def set_extra_state(self, state: dict) -> None:
        if not isinstance(state, dict) or state.get("format") != MODEL_RECORD_FORMAT:
            raise DRDDInputError("the checkpoint's model record is not one this drdd_med version reads")
        if _with_method(state["architecture"]) != self.architecture:
            raise DRDDInputError(
                f"the checkpoint's networks were built as {_describe(state['architecture'])}, "
                f"these as {_describe(self.architecture)}"
            )
        self.trained_iterations = {stage: int(state["trained_iterations"].get(stage, 0)) for stage in self.stages}
        self.validation_sampler = state.get("validation_sampler")
        self.record = state.get("record") or {}

    def follow_training_record(self, trained: RecordedModel) -> None:
        """Take ``trained``'s record of how the model was trained, keeping the sampler this one was validated with.

        An EMA copy is the model that is validated and saved, while ``trained`` is the one the trainer steps.
        """
        validation_sampler = self.validation_sampler
        self.set_extra_state(trained.get_extra_state())
        self.validation_sampler = validation_sampler


class ScheduledModel(RecordedModel):
    """A diffusion model: its record also keeps the schedule it was trained with (``schedule``, set by
    ``DRDDTrainer``), since sampling must use the same one; and it names which of its networks see
    which condition (``conditioned_networks``), so the inferer can bind them in 2D and 3D alike.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.schedule: dict | None = None

    def get_extra_state(self) -> dict:
        return {**super().get_extra_state(), "schedule": self.schedule}

    def set_extra_state(self, state: dict) -> None:
        super().set_extra_state(state)
        self.schedule = state.get("schedule")

    def conditioned_networks(self) -> list[tuple[torch.nn.Module, str | None]]:
        """``(network, condition)`` in the order the sampler takes them; condition ``"source+context"``,
        ``"source"`` (the image channels only) or ``None``; each network reads ``concat(x, condition)``."""
        raise NotImplementedError


class DRDDNetworks(ScheduledModel):
    """The residual and noise networks of one DRDD model, saved and loaded as one state dict.

    ``residual`` and ``noise`` are keyword dicts for ``build_drdd_network`` (sizes, attention...).
    The container has no ``forward``: sampling composes the two through ``drdd_med.inferers``.
    The state dict carries the model record (``RecordedModel``), method ``"drdd"``, and the diffusion
    schedule the networks were trained with (``schedule``, set by ``DRDDTrainer``): the residual
    network learned one fixed noise level, so it must be sampled with the same one.
    """

    method = "drdd"
    stages = ROLES

    def __init__(
        self,
        spatial_dims: int = 2,
        image_channels: int = 1,
        context_slices: int = 1,
        noise_conditional: bool = False,
        residual: dict | None = None,
        noise: dict | None = None,
        record: dict | None = None,
    ):
        if not isinstance(noise_conditional, bool):  # the bundle CLI reads "true" as a string, "True" as a bool
            raise ValueError(f"noise_conditional must be a boolean, got {noise_conditional!r} "
                             "(on a bundle command line: --noise_conditional True)")
        super().__init__(spatial_dims, image_channels, context_slices, record,
                         noise_conditional=noise_conditional, residual=residual or {}, noise=noise or {})
        self.noise_conditional = noise_conditional
        context_channels = image_channels * (context_slices - 1)
        self.residual = build_drdd_network("residual", spatial_dims, image_channels, context_channels, **(residual or {}))
        self.noise = build_drdd_network("noise", spatial_dims, image_channels, conditional=noise_conditional, **(noise or {}))

    @classmethod
    def from_preset(cls, name: str, spatial_dims: int = 2, image_channels: int = 1, context_slices: int = 1,
                    noise_conditional: bool = False, record: dict | None = None) -> "DRDDNetworks":
        """Networks sized by a named preset of ``PRESETS``."""
        if name not in PRESETS:
            raise ValueError(f"unknown network preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(spatial_dims, image_channels, context_slices, noise_conditional, **PRESETS[name], record=record)

    @property
    def size_divisor(self) -> int:
        """Spatial sizes must be multiples of this (one halving per level below the first)."""
        return 2 ** max(len(self.residual.block_out_channels), len(self.noise.block_out_channels)) // 2

    def stages_run_by(self, sampler) -> list[str]:
        """The residual stage always; the noise stage when the sampler takes noise steps."""
        return ["residual"] + (["noise"] if sampler.noise_steps else [])

    def conditioned_networks(self) -> list[tuple[torch.nn.Module, str | None]]:
        return [(self.residual, "source+context"), (self.noise, "source" if self.noise_conditional else None)]


class ConditionalDiffusionNetworks(ScheduledModel):
    """The conditional-diffusion baseline: one ``DiffusionModelUNet`` predicting a DDPM's noise
    (``prediction="epsilon"``) or clean image (``"sample"``) from ``concat(y_t, source[, context])``,
    trained on pairs as the stage ``"denoise"``; sampled by a ``DDIMSampler`` of the same ``prediction``.

    ``denoise`` holds ``build_drdd_network`` keyword arguments; presets give it the DRDD residual
    network's size, so the two methods compare networks of one size and cost per evaluation.
    """

    method = "cddim"
    stages = ("denoise",)

    def __init__(self, spatial_dims: int = 2, image_channels: int = 1, context_slices: int = 1,
                 prediction: str = "epsilon", denoise: dict | None = None, record: dict | None = None):
        super().__init__(spatial_dims, image_channels, context_slices, record, prediction=prediction,
                         denoise=denoise or {})
        self.prediction = prediction
        context_channels = image_channels * (context_slices - 1)
        # the residual network's inputs: the noisy image, then the source and its context
        self.denoise = build_drdd_network("residual", spatial_dims, image_channels, context_channels, **(denoise or {}))

    @classmethod
    def from_preset(cls, name: str, spatial_dims: int = 2, image_channels: int = 1, context_slices: int = 1,
                    prediction: str = "epsilon", record: dict | None = None) -> "ConditionalDiffusionNetworks":
        """The denoising network, sized as the DRDD residual network of the named preset of ``PRESETS``."""
        if name not in PRESETS:
            raise ValueError(f"unknown network preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(spatial_dims, image_channels, context_slices, prediction, dict(PRESETS[name]["residual"]),
                   record=record)

    @property
    def size_divisor(self) -> int:
        return 2 ** len(self.denoise.block_out_channels) // 2

    def conditioned_networks(self) -> list[tuple[torch.nn.Module, str | None]]:
        return [(self.denoise, "source+context")]


# Regression U-Net sizes by the names of ``PRESETS``: ``cpu-demo`` (2.8 M parameters, 0.87 GFLOP per
# 64² slice) and ``gpu`` (70 M) match the DRDD residual network of the same preset (2.7 M, 1.0 GFLOP;
# 63 M), so an equal-time comparison is between networks of one size. ``features`` are BasicUNet's.
REGRESSION_PRESETS: dict[str, dict] = {
    "tiny": {"features": (4, 4, 8, 16, 32, 4)},
    "cpu-demo": {"features": (38, 38, 76, 152, 304, 38)},
    "cpu-lite": {"features": (28, 28, 56, 112, 224, 28)},  # 1.5 M, DRDD's cpu-lite residual network 1.4 M
    "gpu": {"features": (96, 192, 384, 768, 1536, 96)},
}


class RegressionNetworks(RecordedModel):
    """The regression baseline: one MONAI ``BasicUNet`` from ``source[, context]`` to the target.

    Input channels are ``image_channels × context_slices`` (the centre slice, then its 2.5D
    neighbours, as ``RandPairedPatch`` stacks them); output channels are ``image_channels``. It trains
    as the single stage ``"regression"`` (L1 loss, ``DRDDTrainer``) and translates in one forward pass
    (``DRDDInferer``). ``network`` holds ``BasicUNet`` keyword arguments (``features``, ``norm``...).
    ``residual`` (RED-CNN-style residual learning, for tasks whose source and target share one
    intensity scale, such as low-dose CT): the U-Net predicts ``target − source`` and the model
    returns ``source + U-Net(source[, context])``.
    The state dict carries the model record (``RecordedModel``), method ``"regression"``.
    """

    method = "regression"
    stages = ("regression",)

    def __init__(
        self,
        spatial_dims: int = 2,
        image_channels: int = 1,
        context_slices: int = 1,
        network: dict | None = None,
        residual: bool = False,
        record: dict | None = None,
    ):
        super().__init__(spatial_dims, image_channels, context_slices, record, network=network or {}, residual=residual)
        self.residual = residual
        self.regression = BasicUNet(spatial_dims, image_channels * context_slices, image_channels, **(network or {}))

    @classmethod
    def from_preset(cls, name: str, spatial_dims: int = 2, image_channels: int = 1, context_slices: int = 1,
                    residual: bool = False, record: dict | None = None) -> "RegressionNetworks":
        """A U-Net sized by a named preset of ``REGRESSION_PRESETS`` (the same names as ``PRESETS``)."""
        if name not in REGRESSION_PRESETS:
            raise ValueError(f"unknown regression network preset {name!r}; choose one of {sorted(REGRESSION_PRESETS)}")
        return cls(spatial_dims, image_channels, context_slices, dict(REGRESSION_PRESETS[name]), residual, record=record)

    @property
    def size_divisor(self) -> int:
        """BasicUNet halves the image four times; padding to a multiple of 16 keeps its levels aligned."""
        return 16

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """The translated image from ``source[, context]`` channels (the source: the first ``image_channels``)."""
        output = self.regression(inputs)
        return output + inputs[:, : self.image_channels] if self.residual else output


MODEL_CLASSES: dict[str, type[RecordedModel]] = {
    "drdd": DRDDNetworks, "cddim": ConditionalDiffusionNetworks, "regression": RegressionNetworks,
}


def _describe(architecture: dict) -> str:
    architecture = _with_method(architecture)
    method = architecture["method"]
    if architecture["method"] == "drdd":
        name, values = "residual channels", architecture["residual"].get("channels", [])
    elif architecture["method"] == "cddim":
        name, values = "denoising network channels", architecture["denoise"].get("channels", [])
    else:
        name, values = "features", architecture.get("network", {}).get("features", [])
        method = "residual-learning regression" if architecture.get("residual") else method
    sizes = f"{name} {'/'.join(str(v) for v in values) or 'default'}"
    return (f"{method} model, {architecture['spatial_dims']}D, {architecture['context_slices']} "
            f"context slice(s), {architecture['image_channels']} image channel(s), {sizes}")


def seeded_initialisation(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Re-initialise every layer from ``seed`` with PyTorch's defaults, the zero-initialised ones included.

    MONAI's ``DiffusionModelUNet`` zero-initialises its output layer and the last layer of every
    residual and attention block, so an untrained network returns exactly 0 whatever its input or
    time. Tests and benchmarks that must see real outputs (a zeroed prediction, a wrong time ``τ``)
    use this instead; the same seed gives the same network, and the global random state is left as
    it was.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for layer in module.modules():
            if hasattr(layer, "reset_parameters") and isinstance(layer, (torch.nn.Conv2d, torch.nn.Conv3d,
                                                                          torch.nn.Linear, torch.nn.GroupNorm)):
                layer.reset_parameters()
    return module


def _read_state(path, key: str | None, map_location) -> dict:
    """The network state dict in ``path`` (``weights_only=True``: data never executes).

    ``key`` picks an entry of a training checkpoint (e.g. ``"network_ema"``); without it the file is
    the state dict itself (``model.pt``) or, for a training checkpoint, its ``network_ema`` entry.
    """
    name = Path(path).name
    if not Path(path).is_file():
        raise FileNotFoundError(f"{name}: no checkpoint at this path (train first, or set the checkpoint path)")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # corrupt or foreign files: say which file, not a pickle traceback
        raise DRDDInputError(f"{name}: not a readable weights file ({type(err).__name__}: {err})") from None
    if not isinstance(state, dict):
        raise DRDDInputError(f"{name}: not a state dict")
    if key is None and "network_ema" in state and RECORD_KEY not in state:
        key = "network_ema"
    if key is not None:
        if key not in state:
            raise DRDDInputError(f"{name}: checkpoint has no {key!r} entry (it has {sorted(state)})")
        state = state[key]
    return state


RECORD_KEY = "_extra_state"  # where torch keeps ``get_extra_state`` in a state dict


def load_weights(network: torch.nn.Module, path, key: str | None = None, map_location="cpu") -> torch.nn.Module:
    """Load the weights in ``path`` into ``network``, with a clear error when they do not fit it."""
    name = Path(path).name
    state = _read_state(path, key, map_location)
    own = network.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shape = [k for k in own if k in state and isinstance(own[k], torch.Tensor) and tuple(own[k].shape) != tuple(state[k].shape)]
    if missing == [RECORD_KEY] and not unexpected and not shape:
        raise DRDDInputError(f"{name}: no drdd_med model record in this checkpoint (saved by drdd_med before 0.2, "
                             "or not by drdd_med); retrain it with this version")
    if missing or unexpected or shape:
        detail = (
            f"{shape[0]} is {tuple(state[shape[0]].shape)} in the checkpoint but {tuple(own[shape[0]].shape)} here"
            if shape else f"{len(missing)} missing and {len(unexpected)} unexpected entries"
        )
        raise DRDDInputError(
            f"{name}: checkpoint does not match the configured networks ({detail}); "
            "configure the network sizes it was trained with"
        )
    try:
        network.load_state_dict(state)
    except DRDDInputError as err:
        raise DRDDInputError(f"{name}: {err}") from None
    return network


def load_model(path, map_location="cpu", key: str | None = None, sampler=None, *, channels_last: bool = False,
               **expected) -> RecordedModel:
    """The model saved in ``path`` (DRDD or regression), built from its own model record (no size flags needed).

    ``sampler`` (``DRDDSampler`` or ``DDIMSampler``) is checked against the stages the model was trained for: a
    sampler that runs a stage never trained is refused, since that network would return its
    initialisation (for the noise stage: an output still carrying σ ≈ 1 of noise). A regression
    model takes no sampler steps, so only its one stage is checked. ``expected`` holds config values
    that must agree with the record (``spatial_dims=2``, ``context_slices=3``,
    ``noise_conditional=False``...; ``None`` means "whatever the model has"). ``channels_last``: see
    ``place_model``.
    """
    name = Path(path).name
    state = _read_state(path, key, map_location)
    record = state.get(RECORD_KEY)
    if not isinstance(record, dict) or record.get("format") != MODEL_RECORD_FORMAT:
        raise DRDDInputError(
            f"{name}: no drdd_med model record in this checkpoint (saved by drdd_med before 0.2, or not by "
            "drdd_med): retrain it with this version, which records how the model was built and trained"
        )
    architecture = _with_method(record["architecture"])
    conflicts = [f"{k} is {architecture.get(k)!r} in the model but {v!r} in the config"
                 for k, v in expected.items() if v is not None and architecture.get(k) != v]
    if conflicts:
        raise DRDDInputError(f"{name}: the config does not match the model: {'; '.join(conflicts)}")
    method = architecture.pop("method")
    if method not in MODEL_CLASSES:
        raise DRDDInputError(f"{name}: a {method!r} model, which this drdd_med version does not know "
                             f"(it reads {sorted(MODEL_CLASSES)})")
    model = MODEL_CLASSES[method](**architecture)
    load_weights(model, path, key, map_location)
    if sampler is not None:
        check_sampler(model, sampler, name)
    return place_model(model, channels_last=channels_last)


def place_model(model: RecordedModel, device=None, channels_last: bool = False) -> RecordedModel:
    """``model`` on ``device``, a 2D model's weights channels-last if asked (the CPU profile's layout:
    oneDNN convolves it faster, for training and translation; same values). 3D models stay as they are."""
    model.to(device)
    if channels_last and model.spatial_dims == 2:
        model.to(memory_format=torch.channels_last)
    return model


def check_sampler(model: RecordedModel, sampler, name: str = "model") -> None:
    """Refuse to translate with ``sampler`` when it is another method's, or runs a stage ``model`` never trained."""
    if model.method != "regression" and sampler.method != model.method:
        raise DRDDInputError(f"{name}: a {model.method} model cannot be sampled with the {sampler.method} "
                             f"sampler ({type(sampler).__name__}); configure the sampler of its method")
    if getattr(model, "prediction", None) not in (None, getattr(sampler, "prediction", None)):
        raise DRDDInputError(f"{name}: the model predicts {model.prediction!r}, the sampler reads {sampler.prediction!r}; "
                             f"set the sampler's prediction to {model.prediction!r}")
    untrained = [stage for stage in model.stages_run_by(sampler) if not model.trained_iterations[stage]]
    if untrained:
        trained = ", ".join(f"{s} {n} iterations" for s, n in model.trained_iterations.items() if n) or "none"
        hint = " (set the sampler's noise_steps to 0)" if untrained == ["noise"] else ""
        raise DRDDInputError(
            f"{name}: the sampler runs the {' and '.join(untrained)} stage, which this model never trained "
            f"(trained: {trained}){hint}"
        )
    trained_with = getattr(model, "schedule", None)
    if trained_with is not None and trained_with != sampler.schedule.settings():
        raise DRDDInputError(
            f"{name}: the model was trained with fixed_noise_step {trained_with['fixed_noise_step']} "
            f"(schedule {trained_with}), the sampler's schedule is {sampler.schedule.settings()}; "
            f"sample with fixed_noise_step {trained_with['fixed_noise_step']}"
        )
