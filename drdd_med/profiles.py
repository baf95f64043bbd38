"""Hardware profiles: the one place where a bundle's CPU and GPU settings are chosen.

A bundle config asks for ``select_profile(@device)`` once and reads every device-dependent value
(network size, precision, patch size, batch, epochs...) from the result, with the bundle's own
overrides per profile, instead of repeating ``$... if cuda else ...`` in every entry.
"""

from __future__ import annotations

import copy

import torch

from drdd_med.engines import computes_bf16

PROFILES: dict[str, dict] = {
    # 2 CPU cores: the demo trains in minutes with small networks, fp32: bf16 autocast (native on
    # AVX512-BF16 / AMX CPUs) is 2.1x faster for 256² training (docs/results/benchmark_cpu_bf16.json)
    # but no faster on the demo's 64² patches. Translation runs in bf16: 1.4x faster sampling (same
    # file), and on a trained model its synthetic CTs differ from fp32 by 5 HU per voxel where another
    # sampling seed differs by 178 (docs/results/translation_precision_mr2ct.json). CPUs without native
    # bf16 compute fp32 either way (engines.autocast_context). Nothing is torch.compile'd: on this CPU
    # compiled 2 + 2 sampling is 0.71x as fast (docs/results/benchmark_cpu_compile.json)
    "cpu": {
        # cpu-lite: 1.5x cheaper per training iteration than cpu-demo and never worse per second of
        # training on the three demos (README, "A cheaper network for the CPU")
        "network_preset": "cpu-lite",
        "precision": "fp32",
        "inference_precision": "bf16",
        "patch_size": [64, 64],
        "patch_size_3d": [32, 32, 16],  # configs/3d.json: training patches and the sliding window
        "volumes_per_batch": 2,
        "num_workers": 0,
        # training ends at max_epochs or after max_training_minutes of training steps, whichever comes
        # first, so the demo trainings end in bounded time on any CPU (280 epochs are 1680 iterations of
        # drdd_mr2ct; a slow 2-core CPU did 639 and 745 in two runs: docs/results/demo_training_mr2ct_cpu.txt)
        "max_epochs": 280,
        "max_training_minutes": 10.0,
        "val_interval": 40,
        "learning_rate": 5e-4,
        "slice_batch_size": 16,
        # translation: at most 4 slices of 128² per network call (one 256² or 512² slice); 2D weights
        # channels-last in training and in fp32 translation, both measured faster on the 2-core CPU
        # (docs/results/conversion_cpu.json, docs/results/benchmark_cpu_channels_last.json); for bf16
        # translation see translation_channels_last
        "max_batch_pixels": 65536,
        "channels_last": True,
    },
    "gpu": {
        "network_preset": "gpu",
        "precision": "bf16",
        "inference_precision": "bf16",
        "patch_size": [128, 128],
        "patch_size_3d": [96, 96, 48],
        "volumes_per_batch": 4,
        "num_workers": 4,
        "max_epochs": 200,
        "max_training_minutes": None,
        "val_interval": 10,
        "learning_rate": 1e-4,
        "slice_batch_size": 64,
        "max_batch_pixels": None,
        "channels_last": False,
    },
}


def profile_name(device: str | torch.device) -> str:
    """``"gpu"`` for a CUDA device, ``"cpu"`` otherwise."""
    return "gpu" if torch.device(device).type == "cuda" else "cpu"


def select_profile(device: str | torch.device, **overrides: dict) -> dict:
    """The settings of ``device``'s profile, updated by ``overrides[profile name]`` (e.g. ``cpu={...}``).

    The result also names the profile (``"name"``) so it can be recorded with the model.
    """
    unknown = set(overrides) - set(PROFILES)
    if unknown:
        raise ValueError(f"unknown profile(s) {sorted(unknown)}; the profiles are {sorted(PROFILES)}")
    name = profile_name(device)
    settings = copy.deepcopy(PROFILES[name])
    bad = set(overrides.get(name, {})) - set(settings)
    if bad:
        raise ValueError(f"unknown {name} profile setting(s) {sorted(bad)}; the settings are {sorted(settings)}")
    settings.update(overrides.get(name, {}))
    return {"name": name, **settings}


def translation_channels_last(profile: dict, precision: str, device: str | torch.device) -> bool:
    """Whether translation stores 2D weights channels-last: the profile's ``channels_last``, except
    where translation computes in native bf16.

    There ``cpu-lite``, the CPU profile's networks, runs faster contiguous: torch's CPU GroupNorm is
    much slower on channels-last bf16 inputs of 12 and 24 channels, its first two levels. Side by side
    on a 2-core AMX CPU (docs/results/conversion_cpu_amx.json): 1.024 s per 512² slice contiguous
    against 1.097 s channels-last, 0.257 against 0.297 s at 256². ``cpu-demo``'s wider networks are
    the exception (1.253 s channels-last against 1.795 s contiguous at 512²): translate those with
    ``--channels_last true``. In fp32 channels-last stays, measured faster for ``cpu-demo``
    (docs/results/benchmark_cpu_channels_last.json).
    """
    return bool(profile["channels_last"]) and not computes_bf16(device, precision)
