"""The two DRDD networks, built from MONAI's ``DiffusionModelUNet`` through one factory.

- residual network ``r_θ``: input ``concat(x_t, source[, context])``, predicts the residual;
- noise network ``ε_φ``: input ``y_t`` (unconditional, the default, so it can learn from unpaired
  target images) or ``concat(y_t, source)`` (conditional option), predicts the noise.

Both take a float time ``τ`` per item, as the method defines it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.nets import DiffusionModelUNet

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


class DRDDNetworks(torch.nn.Module):
    """The residual and noise networks of one DRDD model, saved and loaded as one state dict.

    ``residual`` and ``noise`` are keyword dicts for ``build_drdd_network`` (sizes, attention...).
    The container has no ``forward``: sampling composes the two through ``drdd_med.inferers``.
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        image_channels: int = 1,
        context_slices: int = 1,
        noise_conditional: bool = False,
        residual: dict | None = None,
        noise: dict | None = None,
    ):
        super().__init__()
        self.spatial_dims = spatial_dims
        self.image_channels = image_channels
        self.context_slices = context_slices
        self.noise_conditional = noise_conditional
        context_channels = image_channels * (context_slices - 1)
        self.residual = build_drdd_network("residual", spatial_dims, image_channels, context_channels, **(residual or {}))
        self.noise = build_drdd_network("noise", spatial_dims, image_channels, conditional=noise_conditional, **(noise or {}))

    @classmethod
    def from_preset(cls, name: str, spatial_dims: int = 2, image_channels: int = 1, context_slices: int = 1,
                    noise_conditional: bool = False) -> "DRDDNetworks":
        """Networks sized by a named preset of ``PRESETS``."""
        if name not in PRESETS:
            raise ValueError(f"unknown network preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(spatial_dims, image_channels, context_slices, noise_conditional, **PRESETS[name])

    @property
    def size_divisor(self) -> int:
        """Spatial sizes must be multiples of this (one halving per level below the first)."""
        return 2 ** max(len(self.residual.block_out_channels), len(self.noise.block_out_channels)) // 2


def load_weights(network: torch.nn.Module, path, key: str | None = None, map_location="cpu") -> torch.nn.Module:
    """Load a state dict (``weights_only=True``: data never executes) with a clear error on mismatch.

    ``key`` picks an entry of a training checkpoint (e.g. ``"network_ema"``); without it the file
    is the state dict itself.
    """
    from pathlib import Path

    from drdd_med.errors import DRDDInputError

    name = Path(path).name
    if not Path(path).is_file():
        raise FileNotFoundError(f"{name}: no checkpoint at this path (train first, or set the checkpoint path)")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # corrupt or foreign files: say which file, not a pickle traceback
        raise DRDDInputError(f"{name}: not a readable weights file ({type(err).__name__}: {err})") from None
    if key is not None:
        if key not in state:
            raise DRDDInputError(f"{name}: checkpoint has no {key!r} entry (it has {sorted(state)})")
        state = state[key]
    own = network.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shape = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    if missing or unexpected or shape:
        detail = (
            f"{shape[0]} is {tuple(state[shape[0]].shape)} in the checkpoint but {tuple(own[shape[0]].shape)} here"
            if shape else f"{len(missing)} missing and {len(unexpected)} unexpected entries"
        )
        raise DRDDInputError(
            f"{name}: checkpoint does not match the configured networks ({detail}); "
            "configure the network sizes it was trained with"
        )
    network.load_state_dict(state)
    return network
