"""How fast the DRDD networks train and translate on this machine (``drdd-med benchmark``).

For each configuration — network preset, geometry (2D, 2.5D with 3 context slices, 3D), precision
(fp32, bf16 autocast), ``torch.compile`` off/on, batch size — it measures:

- training items/s for both stages together (one step of each per batch, as ``DRDDTrainer`` does)
  and for each stage alone: forward, backward, gradient clipping and an AdamW step on the real
  losses ``residual_p_losses`` / ``noise_p_losses``;
- sampling items/s with the default 2 + 2 ``DRDDSampler``; on a GPU also replayed from one CUDA graph
  (the fixed 4-evaluation sampler without launch gaps), checked against the eager sample;
- seconds per whole volume through ``DRDDInferer`` (slice by slice, or 3D sliding window inside
  each step);
- FLOPs per item (``FlopCounterMode`` on one forward of each network), the FLOP/s achieved and
  their fraction of a dense matmul rate measured by the same run on the same device;
- peak memory.

The method follows ``performance.md``: warm-up before timing, the device synchronised before every
clock read, medians of repeats, random normal inputs, and networks whose zero-initialised layers
are re-initialised with a fixed seed (MONAI's ``DiffusionModelUNet`` zero-initialises its output
convolution and the last layer of each block, so a fresh network outputs exactly zero and a
benchmark would time a degenerate network).

Items are slices for 2D / 2.5D and patches for 3D. Training FLOPs are counted as 3 forward passes
(forward + backward), sampling FLOPs as ``S_r`` residual plus ``S_n`` noise forward passes.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import monai
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from drdd_med import __version__
from drdd_med.diffusion import DRDDSampler, DRDDSchedule, noise_p_losses, residual_p_losses
from drdd_med.inferers import DRDDInferer, bind_networks
from drdd_med.bundle import resolve_device
from drdd_med.engines import autocast_context, bf16_supported
from drdd_med.networks import PRESETS, DRDDNetworks, seeded_initialisation
from drdd_med.profiles import PROFILES

logger = logging.getLogger(__name__)

SCHEMA = "drdd-med-benchmark/1"
DIMS = {"2d": (2, 1), "2.5d": (2, 3), "3d": (3, 1)}  # name -> (spatial_dims, context_slices)
PRECISIONS = ("fp32", "bf16")
MEASURES = ("train_both", "train_residual", "train_noise", "sample")
TRAIN_FORWARD_MULTIPLE = 3  # forward + backward ≈ 3 forward passes (the convention of performance.md)
GRAD_CLIP = 1.0  # as DRDDTrainer
SEED = 0


@dataclass(frozen=True)
class Sizes:
    """Input sizes and repeat counts of one run (``default_sizes`` picks them by device)."""

    image_size: int  # side of a 2D / 2.5D slice for training and sampling
    patch_size: int  # side of a 3D patch for training and sampling, and the sliding-window ROI
    volumes_2d: tuple[tuple[int, int, int], ...]  # whole volumes converted slice by slice
    volume_3d: tuple[int, int, int]  # whole volume converted by the 3D sliding window
    warmup: int  # untimed calls before each timing
    repeats: int  # timed calls; their median is reported
    volume_repeats: int  # whole volumes are long: fewer repeats
    matmul_size: int  # side of the square matmuls that give the reference FLOP/s


def default_sizes(device: torch.device, quick: bool = False) -> Sizes:
    """The issue's sizes: 256² × 150 on a CPU, 256² × 300 and 512² × 300 on a GPU; ``quick`` is a smoke run."""
    if quick:
        return Sizes(32, 16, ((32, 32, 8),), (32, 32, 16), warmup=1, repeats=3, volume_repeats=1, matmul_size=512)
    if device.type == "cuda":  # steady calls of milliseconds: 5 repeats after 3 warm-ups; one run of a volume
        return Sizes(256, 96, ((256, 256, 300), (512, 512, 300)), (256, 256, 128), warmup=3, repeats=5,
                     volume_repeats=1, matmul_size=8192)
    return Sizes(256, 64, ((256, 256, 150),), (128, 128, 64), warmup=1, repeats=3, volume_repeats=1, matmul_size=2048)


def default_batch_size(device: torch.device, spatial_dims: int, quick: bool = False) -> int:
    """Batches the demo and the GPU anchors of performance.md use: 8 / 32 slices, 1 / 4 patches."""
    if quick:
        return 2 if spatial_dims == 2 else 1
    if device.type == "cuda":
        return 32 if spatial_dims == 2 else 4
    return 8 if spatial_dims == 2 else 1


def default_presets(device: torch.device, quick: bool = False) -> tuple[str, ...]:
    """The project's default networks, beside the reference-sized ones where there is compute for them."""
    cpu = PROFILES["cpu"]["network_preset"]
    if quick:
        return ("tiny", cpu)
    return ("gpu", "reference") if device.type == "cuda" else (cpu,)


# --- measuring ---------------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so a clock read after it covers the work (a no-op on a CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timings(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> list[float]:
    """Wall times of ``repeats`` calls of ``fn()`` after ``warmup`` untimed ones (compilation, caches)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def median_seconds(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> float:
    """The typical time of a call: robust to the odd call slowed by other work on the machine."""
    return statistics.median(timings(fn, device, warmup, repeats))


def forward_flops(net: Callable, inputs: torch.Tensor, tau: torch.Tensor) -> tuple[int, torch.Tensor]:
    """FLOPs of one forward pass of ``net(inputs, tau)``, and its output.

    Attention runs in its math form while counting: fused CPU attention kernels are invisible to
    ``FlopCounterMode``, the math form does the same products as counted matmuls, so the count is
    the same on every device.
    """
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), counter:
        output = net(inputs, tau)
    return counter.get_total_flops(), output


def measure_matmul(device: torch.device, size: int, warmup: int, repeats: int) -> dict:
    """Dense square matmul rate in fp32 and bf16: the ceiling the networks' FLOP/s are compared with.

    A ceiling is the best the device did, so the fastest of the repeats counts, not the median: other
    work on a shared machine only ever slows a call down.
    """
    inner = 20 if device.type == "cuda" else 1  # one GPU matmul is too short to time on its own
    generator = torch.Generator(device=device).manual_seed(SEED)
    rates = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a, b = (torch.randn(size, size, device=device, dtype=dtype, generator=generator) for _ in range(2))

        def run(a=a, b=b):
            for _ in range(inner):
                torch.mm(a, b)

        rates[name] = 2 * size**3 * inner / min(timings(run, device, warmup, repeats))
    return {"size": size, "flop_per_s": rates, "bf16_native": bf16_supported(device),
            "float32_matmul_precision": torch.get_float32_matmul_precision()}


def peak_memory_label(device: torch.device) -> str:
    if device.type == "cuda":
        return "torch.cuda.max_memory_allocated, reset before each phase"
    return ("process peak resident set size so far (getrusage ru_maxrss): includes every earlier phase; "
            "psutil would only give the current size")


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_bytes(device: torch.device) -> int:
    """See ``peak_memory_label``: per phase on CUDA, the process-lifetime peak on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


# --- the networks --------------------------------------------------------------------------------------


def build_networks(preset: str, dims: str, seed: int = SEED) -> DRDDNetworks:
    """A preset's two networks for a geometry, on the CPU, every layer initialised from ``seed``.

    None is left at MONAI's zero initialisation (timing a network that returns 0 measures nothing
    real), every run times the same weights, and the caller's random state is left as it was.
    """
    spatial_dims, context_slices = DIMS[dims]
    with torch.random.fork_rng(devices=[]):  # construction draws an initialisation that is replaced anyway
        networks = DRDDNetworks.from_preset(preset, spatial_dims=spatial_dims, context_slices=context_slices)
    return seeded_initialisation(networks, seed)


def count_parameters(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


# --- one configuration ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Configuration:
    preset: str
    dims: str
    precision: str
    compile: bool
    batch_size: int
    channels_last: bool = False  # weights and inputs channels-last (channels_last_3d for 3D)


class _Run:
    """One configuration's networks, random inputs and measurements on one device."""

    def __init__(self, config: Configuration, device: torch.device, sizes: Sizes, seed: int = SEED):
        self.config, self.device, self.sizes = config, device, sizes
        self.networks = build_networks(config.preset, config.dims, seed)
        self.networks.to(device, memory_format=self.memory_format)
        self.spatial = (sizes.image_size if self.networks.spatial_dims == 2 else sizes.patch_size,) * \
            self.networks.spatial_dims
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.schedule = DRDDSchedule()
        self.sampler = DRDDSampler(self.schedule)

    @property
    def memory_format(self) -> torch.memory_format:
        if not self.config.channels_last:
            return torch.contiguous_format
        return torch.channels_last if self.networks.spatial_dims == 2 else torch.channels_last_3d

    def randn(self, *shape: int) -> torch.Tensor:
        values = torch.randn(shape, device=self.device, generator=self.generator)
        items = len(shape) == self.networks.spatial_dims + 2  # network inputs (a whole 2D volume stays as it is)
        return values.contiguous(memory_format=self.memory_format) if items else values

    def batch(self, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Random source, target and (2.5D) context slices of ``size`` items."""
        channels = self.networks.image_channels
        context = channels * (self.networks.context_slices - 1)
        return (self.randn(size, channels, *self.spatial), self.randn(size, channels, *self.spatial),
                self.randn(size, context, *self.spatial) if context else None)

    def flops(self) -> tuple[dict, dict]:
        """Forward FLOPs per item of each network (batch of one), and the std of its output."""
        flops, spread = {}, {}
        for role in ("residual", "noise"):
            net = getattr(self.networks, role)
            count, output = forward_flops(net, self.randn(1, net.in_channels, *self.spatial),
                                          torch.full((1,), 500.0, device=self.device))
            flops[role], spread[role] = count, float(output.float().std())
        return flops, spread

    def compile(self) -> None:
        """Compile both networks in place (after the FLOP count, which needs the eager modules)."""
        torch.compiler.reset()  # a fresh cache per configuration: no recompile limit reached across them
        self.networks.residual = torch.compile(self.networks.residual)
        self.networks.noise = torch.compile(self.networks.noise)

    def train_seconds(self) -> dict:
        """Median seconds of one training step per stage, and of both stages in sequence."""
        source, target, context = self.batch(self.config.batch_size)
        residual, noise = self.networks.residual, self.networks.noise
        steps = {
            "train_residual": self._step(residual, lambda: residual_p_losses(
                self.schedule, residual, source, target, context, self.generator)),
            "train_noise": self._step(noise, lambda: noise_p_losses(
                self.schedule, noise, target, None, self.generator)),
        }
        steps["train_both"] = lambda: (steps["train_residual"](), steps["train_noise"]())
        self.networks.train()
        return {k: median_seconds(fn, self.device, self.sizes.warmup, self.sizes.repeats) for k, fn in steps.items()}

    def _step(self, net: torch.nn.Module, loss_fn: Callable[[], torch.Tensor]) -> Callable[[], None]:
        """One optimisation step as ``DRDDTrainer._step`` does it, with the configuration's autocast."""
        optimizer = torch.optim.AdamW(net.parameters(), lr=2e-5, betas=(0.9, 0.99), weight_decay=0.0)

        def step():
            optimizer.zero_grad(set_to_none=True)
            with autocast_context(self.device, self.config.precision):
                loss = loss_fn()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), GRAD_CLIP)
            optimizer.step()

        return step

    def sample_seconds(self) -> float:
        """Median seconds of one 2 + 2 sample of a batch."""
        source, _, context = self.batch(self.config.batch_size)
        residual_fn, noise_fn = bind_networks(self.networks, source, context)

        def sample():
            with torch.no_grad(), autocast_context(self.device, self.config.precision):
                self.sampler.sample(source, residual_fn, noise_fn, generator=self.generator)

        self.networks.eval()
        return median_seconds(sample, self.device, self.sizes.warmup, self.sizes.repeats)

    def graphed_sample(self) -> dict:
        """2 + 2 sampling of a batch replayed from one captured CUDA graph, and its difference from eager.

        The noise is given as fixed tensors, so the graph and the eager run compute the same function:
        ``max_difference`` is the largest difference over the largest magnitude of the eager sample.
        """
        source, _, context = self.batch(self.config.batch_size)
        noise = [self.randn(*source.shape) for _ in range(self.sampler.num_noise_draws)]
        residual_fn, noise_fn = bind_networks(self.networks, source, context)

        def sample():
            with torch.no_grad(), autocast_context(self.device, self.config.precision, cache_enabled=False):
                return self.sampler.sample(source, residual_fn, noise_fn, noise=list(noise))

        self.networks.eval()
        eager = sample().float()
        side = torch.cuda.Stream(self.device)  # capture needs its warm-up on a side stream
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(self.sizes.warmup):
                sample()
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = sample()
        seconds = median_seconds(graph.replay, self.device, self.sizes.warmup, self.sizes.repeats)
        difference = (captured.float() - eager).abs().max() / eager.abs().max()
        return {"items_per_s": self.config.batch_size / seconds, "max_difference": float(difference)}

    def volumes(self) -> list[dict]:
        """Seconds per whole volume through ``DRDDInferer``; the networks are warm from ``sample_seconds``."""
        batch = self.config.batch_size
        if self.networks.spatial_dims == 3:
            roi = (self.sizes.patch_size,) * 3
            inferer = DRDDInferer(self.sampler, roi_size=roi, sw_batch_size=batch)
            shapes, extra = [self.sizes.volume_3d], {"roi_size": list(roi), "sw_batch_size": batch}
        else:
            inferer = DRDDInferer(self.sampler, slice_batch_size=batch)
            shapes, extra = list(self.sizes.volumes_2d), {"slice_batch_size": batch}
        results = []
        for shape in shapes:
            volume = self.randn(1, self.networks.image_channels, *shape)

            def convert(volume=volume):
                with torch.no_grad(), autocast_context(self.device, self.config.precision):
                    inferer(volume, self.networks)

            reset_peak_memory(self.device)
            # compiled networks meet new batch shapes here (the last, partial batch): one untimed run
            seconds = median_seconds(convert, self.device, int(self.config.compile), self.sizes.volume_repeats)
            results.append({"shape": list(shape), "seconds": seconds, **extra,
                            "peak_memory_bytes": peak_memory_bytes(self.device)})
        return results


def benchmark_configuration(config: Configuration, device: torch.device, sizes: Sizes, matmul: dict) -> dict:
    """Every measure of one configuration, as one JSON-ready dict."""
    run = _Run(config, device, sizes)
    forward, spread = run.flops()
    steps = run.sampler.residual_steps, run.sampler.noise_steps
    flops_per_item = {
        "residual_forward": forward["residual"],
        "noise_forward": forward["noise"],
        "train_both": TRAIN_FORWARD_MULTIPLE * (forward["residual"] + forward["noise"]),
        "train_residual": TRAIN_FORWARD_MULTIPLE * forward["residual"],
        "train_noise": TRAIN_FORWARD_MULTIPLE * forward["noise"],
        "sample": steps[0] * forward["residual"] + steps[1] * forward["noise"],
    }
    if config.compile:
        run.compile()
    reset_peak_memory(device)
    seconds = run.train_seconds()
    train_peak = peak_memory_bytes(device)
    reset_peak_memory(device)
    seconds["sample"] = run.sample_seconds()
    sample_peak = peak_memory_bytes(device)
    volumes = run.volumes()
    graphed = _graphed_sample(run) if device.type == "cuda" else None
    items_per_s = {k: config.batch_size / seconds[k] for k in MEASURES}
    flop_per_s = {k: flops_per_item[k] * items_per_s[k] for k in MEASURES}
    matmul_rate = matmul["flop_per_s"][config.precision]
    return {
        **asdict(config),
        "spatial_dims": run.networks.spatial_dims,
        "context_slices": run.networks.context_slices,
        "item_shape": list(run.spatial),
        "parameters": {role: count_parameters(getattr(run.networks, role)) for role in ("residual", "noise")},
        "output_std": spread,
        "flops_per_item": flops_per_item,
        "items_per_s": items_per_s,
        "flop_per_s": flop_per_s,
        "matmul_fraction": {k: flop_per_s[k] / matmul_rate for k in MEASURES},
        "volumes": volumes,
        "peak_memory_bytes": {"train": train_peak, "sample": sample_peak},
        "sample_cuda_graph": graphed,
    }


def _graphed_sample(run: _Run) -> dict:
    """``_Run.graphed_sample``, or why it could not be captured (the eager figures stand either way)."""
    try:
        return run.graphed_sample()
    except Exception as error:  # e.g. a kernel that synchronises with the host cannot be captured
        logger.warning("benchmark: CUDA graph sampling of %s failed: %s", run.config, error)
        return {"error": f"{type(error).__name__}: {error}"}


def _failed(config: Configuration, error: Exception, device: torch.device) -> dict:
    """The record of a configuration that could not be measured (out of memory, a compile error...)."""
    logger.warning("benchmark: %s failed: %s: %s", config, type(error).__name__, error)
    if device.type == "cuda":
        torch.cuda.empty_cache()  # what the failed configuration held must not shrink the next
    return {**asdict(config), "error": f"{type(error).__name__}: {error}"}


# --- a whole run -------------------------------------------------------------------------------------


def _check_names(kind: str, names: Sequence[str], allowed: Sequence[str]) -> tuple[str, ...]:
    names = tuple(names)
    unknown = [n for n in names if n not in allowed]
    if not names or unknown:
        raise ValueError(f"{kind} must be one or more of {', '.join(allowed)}; got {', '.join(names) or 'none'}")
    return names


def configurations(
    device: torch.device,
    presets: Sequence[str],
    dims: Sequence[str],
    precisions: Sequence[str],
    compile_modes: Sequence[bool],
    batch_sizes: Sequence[int] | None,
    quick: bool = False,
    memory_formats: Sequence[bool] = (False,),
) -> list[Configuration]:
    """Every combination asked for, checked before anything runs (a bad option fails at once, not after minutes)."""
    presets = _check_names("presets", presets, list(PRESETS))
    dims = _check_names("dims", dims, list(DIMS))
    precisions = _check_names("precision", precisions, PRECISIONS)
    if "bf16" in precisions and not bf16_supported(device):
        raise ValueError("bf16: this CPU has no native bf16 (AVX512-BF16 or AMX), autocast would only emulate it; "
                         "use --precision fp32")
    if not compile_modes:
        raise ValueError("compile: give off, on or both")
    if not memory_formats:
        raise ValueError("channels-last: give off, on or both")
    if batch_sizes is not None and (not batch_sizes or min(batch_sizes) < 1):
        raise ValueError(f"batch sizes must be positive integers, got {list(batch_sizes)}")
    return [
        Configuration(preset, dim, precision, compiled, batch, channels_last)
        for preset in presets for dim in dims for precision in precisions for compiled in compile_modes
        for batch in (batch_sizes or (default_batch_size(device, DIMS[dim][0], quick),))
        for channels_last in memory_formats
    ]


def check_sizes(todo: Sequence[Configuration], sizes: Sizes) -> None:
    """Refuse, before measuring, slices or patches a preset cannot halve down to its lowest level."""
    for config in todo:
        divisor = 2 ** (max(len(PRESETS[config.preset][role]["channels"]) for role in ("residual", "noise")) - 1)
        side = sizes.patch_size if DIMS[config.dims][0] == 3 else sizes.image_size
        if side % divisor:
            raise ValueError(f"preset {config.preset} needs {config.dims} inputs in multiples of {divisor} pixels, "
                             f"this run uses {side}; choose other presets (or drop --quick)")


def environment(device: torch.device) -> dict:
    """What the figures depend on: hardware, versions, threads, and how busy the machine was."""
    return {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "monai": monai.__version__,
        "drdd_med": __version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_average": list(os.getloadavg()),
    }


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def run_benchmark(
    device: str = "auto",
    presets: Sequence[str] | None = None,
    dims: Sequence[str] = tuple(DIMS),
    precisions: Sequence[str] | None = None,
    compile_modes: Sequence[bool] = (False,),
    batch_sizes: Sequence[int] | None = None,
    threads: int | None = None,
    quick: bool = False,
    sizes: Sizes | None = None,
    memory_formats: Sequence[bool] = (False,),
    max_minutes: float | None = None,
) -> dict:
    """Benchmark every configuration asked for and return the report (the JSON ``drdd-med benchmark`` writes).

    ``None`` picks the defaults of the device (``default_presets``, fp32 plus bf16 where the device
    has it, ``default_batch_size``, ``default_sizes``, torch's thread count). ``quick`` is a
    one-minute smoke run on a CPU: small networks, inputs and volumes, fp32, one thread unless
    ``threads`` is given (the report says so in ``notes``). The thread count is restored afterwards.

    A configuration that fails (out of memory at a batch size, a compile error) is recorded with its
    ``error`` and the others still run. After ``max_minutes`` no further configuration is started;
    those left are listed in ``not_run``.
    """
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be a positive integer, got {threads}")
    if max_minutes is not None and not max_minutes > 0:
        raise ValueError(f"max minutes must be positive, got {max_minutes}")
    threads_before = torch.get_num_threads()
    # quick: one thread unless asked, because two threads on two busy cores wait on each other (6x
    # slower, measured) and a smoke run should take a minute whatever else runs
    torch.set_num_threads(threads or (1 if quick else threads_before))
    try:
        return _run(resolve_device(device), presets, dims, precisions, compile_modes, batch_sizes, quick, sizes,
                    memory_formats, max_minutes)
    finally:
        torch.set_num_threads(threads_before)  # a library call leaves the process as it found it


def _run(target: torch.device, presets, dims, precisions, compile_modes, batch_sizes, quick: bool,
         sizes: Sizes | None, memory_formats: Sequence[bool], max_minutes: float | None) -> dict:
    """``run_benchmark`` with the thread count set: options checked first, then the matmul, then each configuration."""
    precisions = precisions or (("fp32", "bf16") if bf16_supported(target) and not quick else ("fp32",))
    todo = configurations(target, presets or default_presets(target, quick), dims, precisions, compile_modes,
                          batch_sizes, quick, memory_formats)
    sizes = sizes or default_sizes(target, quick)
    check_sizes(todo, sizes)
    report = {
        "schema": SCHEMA,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "quick": quick,
        "environment": environment(target),
        "method": method(target),
        "sizes": {name: _as_lists(value) for name, value in asdict(sizes).items()},
        "notes": notes(target, sizes, quick),
    }
    logger.info("benchmark: dense matmul rate on %s", report["environment"]["device_name"])
    start = time.monotonic()
    report["matmul"] = measure_matmul(target, sizes.matmul_size, sizes.warmup, 3 * sizes.repeats)
    report["results"], report["not_run"] = [], []
    for index, config in enumerate(todo, 1):
        if max_minutes is not None and time.monotonic() - start > 60 * max_minutes:
            report["not_run"] = [asdict(c) for c in todo[index - 1:]]
            logger.warning("benchmark: %d configuration(s) not run, the %g minutes are spent",
                           len(report["not_run"]), max_minutes)
            break
        logger.info("benchmark %d/%d: %s", index, len(todo), config)
        try:
            report["results"].append(benchmark_configuration(config, target, sizes, report["matmul"]))
        except Exception as error:  # noqa: BLE001 -- one configuration's failure must not lose the others
            report["results"].append(_failed(config, error, target))
    return report


def _as_lists(value):
    """Tuples as lists, so the report equals its JSON text read back."""
    return [_as_lists(v) for v in value] if isinstance(value, (tuple, list)) else value


def method(device: torch.device) -> dict:
    """How the figures were obtained, so a reader of the JSON alone can interpret them."""
    sampler = DRDDSampler(DRDDSchedule())
    return {
        "timing": "median of repeats after warm-up; device synchronised before every clock read",
        "items": "slices for 2d / 2.5d, patches for 3d",
        "train": "forward + backward + gradient clip + AdamW step on residual_p_losses / noise_p_losses; "
                 "train_both is one step of each stage per batch",
        "sampler": {"residual_steps": sampler.residual_steps, "noise_steps": sampler.noise_steps, "eta": sampler.eta},
        "flops": "FlopCounterMode on one forward per network (batch 1, math attention); training = "
                 f"{TRAIN_FORWARD_MULTIPLE} x forward, sampling = residual_steps x residual + noise_steps x noise",
        "matmul_fraction": "achieved FLOP/s over the dense matmul rate (fastest of its repeats) of the "
                           "configuration's precision, same run",
        "inputs": f"random normal; all-zero conv/linear layers re-initialised with seed {SEED}",
        "peak_memory": peak_memory_label(device),
    }


def notes(device: torch.device, sizes: Sizes, quick: bool) -> list[str]:
    """What a reader must know before comparing these figures with others."""
    found = []
    if quick:
        volumes = [*sizes.volumes_2d, sizes.volume_3d]
        found.append(f"quick run, a smoke check: {sizes.image_size}² slices, {sizes.patch_size}³ patches, volumes "
                     + ", ".join("x".join(map(str, s)) for s in volumes) + " instead of the default "
                     + ", ".join("x".join(map(str, s)) for s in default_sizes(device).volumes_2d)
                     + "; fp32, one thread unless asked")
    if device.type == "cpu":
        found.append("CPU peak memory is the process peak so far, not per configuration")
    return found


# --- presenting ------------------------------------------------------------------------------------------


def _si(value: float) -> str:
    """Compact engineering notation: 1.2G, 350M, 12.3."""
    for scale, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{suffix}"
    return f"{value:.3g}"


TABLE_COLUMNS = (
    ("preset", lambda r: r["preset"]),
    ("dims", lambda r: r["dims"]),
    ("prec", lambda r: r["precision"]),
    ("compile", lambda r: "on" if r["compile"] else "off"),
    ("ch-last", lambda r: "on" if r.get("channels_last") else "off"),
    ("batch", lambda r: str(r["batch_size"])),
    ("train/s both|res|noise", lambda r: "|".join(f"{r['items_per_s'][k]:.3g}" for k in MEASURES[:3])),
    ("sample/s (graph)", lambda r: f"{r['items_per_s']['sample']:.3g}" + _graphed_cell(r.get("sample_cuda_graph"))),
    ("s/volume", lambda r: " ".join(f"{v['seconds']:.3g}" for v in r["volumes"])),
    ("FLOP/item res|noise", lambda r: f"{_si(r['flops_per_item']['residual_forward'])}|"
                                      f"{_si(r['flops_per_item']['noise_forward'])}"),
    ("train FLOP/s (mm %)", lambda r: f"{_si(r['flop_per_s']['train_both'])} "
                                      f"({100 * r['matmul_fraction']['train_both']:.1f})"),
    ("sample FLOP/s (mm %)", lambda r: f"{_si(r['flop_per_s']['sample'])} "
                                       f"({100 * r['matmul_fraction']['sample']:.1f})"),
    ("peak mem train|sample", lambda r: f"{_si(r['peak_memory_bytes']['train'])}B|"
                                        f"{_si(r['peak_memory_bytes']['sample'])}B"),
)


CONFIGURATION_COLUMNS = 6  # the columns that name a configuration; a failed one shows its error after them


def _graphed_cell(graphed: dict | None) -> str:
    if graphed is None:
        return ""
    return " (failed)" if "error" in graphed else f" ({graphed['items_per_s']:.3g})"


def format_table(report: dict) -> str:
    """A plain-text table of the results, with the header lines a reader needs to judge them."""
    env, mm = report["environment"], report["matmul"]
    lines = [
        f"drdd-med benchmark {report['date']}: {env['device_name']} ({env['device']}), {env['threads']} threads, "
        f"torch {env['torch']}, monai {env['monai']}, load average {env['load_average'][0]:.2f}",
        f"dense matmul {mm['size']}²: fp32 {_si(mm['flop_per_s']['fp32'])}FLOP/s, "
        f"bf16 {_si(mm['flop_per_s']['bf16'])}FLOP/s{'' if mm['bf16_native'] else ' (emulated)'}",
        *[f"note: {n}" for n in report["notes"]],
    ]
    measured = [r for r in report["results"] if "error" not in r]
    rows = [[name for name, _ in TABLE_COLUMNS]]
    rows += [[cell(result) for _, cell in TABLE_COLUMNS] for result in measured]
    widths = [max(len(row[i]) for row in rows) for i in range(len(TABLE_COLUMNS))]
    lines += ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    for result in report["results"]:
        if "error" in result:
            named = [cell(result).ljust(width) for (_, cell), width in
                     zip(TABLE_COLUMNS[:CONFIGURATION_COLUMNS], widths)]
            lines.append("  ".join(named) + f"  failed: {result['error']}")
    volumes = {tuple(v["shape"]) for r in measured for v in r["volumes"]}
    lines.append("items: slices (2d, 2.5d) or patches (3d); volumes: "
                 + ", ".join("x".join(map(str, s)) for s in sorted(volumes)))
    if any(r.get("sample_cuda_graph") for r in measured):
        lines.append("sample/s (graph): the same 2 + 2 sampling replayed from one CUDA graph")
    if report.get("not_run"):
        lines.append(f"not run, the time budget was spent: {len(report['not_run'])} configuration(s): "
                     + "; ".join(" ".join(str(v) for v in c.values()) for c in report["not_run"]))
    return "\n".join(lines)
