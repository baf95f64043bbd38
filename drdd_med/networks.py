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
