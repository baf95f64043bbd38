"""GPU path: bf16 training of the default GPU networks, and the benchmark's CUDA-graph sampling. Skipped
without CUDA (bf16 sampling: test_inferers)."""

import pytest
import torch
from ignite.engine import Events

from drdd_med.benchmark import Sizes, run_benchmark
from drdd_med.engines import DRDDTrainer
from drdd_med.networks import DRDDNetworks

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def _batches(n, size=128, device="cuda"):
    g = torch.Generator(device=device).manual_seed(0)
    images = torch.rand(n, 8, 1, size, size, device=device, generator=g) * 2 - 1
    return [{"source": -images[i], "target": images[i]} for i in range(n)], [{"target": images[i]} for i in range(n)]


def test_bf16_training_of_the_gpu_preset_lowers_both_losses():
    torch.manual_seed(0)
    model = DRDDNetworks.from_preset("gpu").cuda()
    paired, pool = _batches(4)
    trainer = DRDDTrainer(
        "cuda", 15, model,
        torch.optim.AdamW(model.residual.parameters(), 1e-4), torch.optim.AdamW(model.noise.parameters(), 1e-4),
        paired, pool, precision="bf16",
    )
    losses = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: losses.append(e.state.output))
    trainer.run()
    first, last = losses[:4], losses[-4:]
    for key in ("loss_residual", "loss_noise"):
        assert all(torch.isfinite(torch.tensor(x[key])) for x in losses)
        assert sum(x[key] for x in last) < sum(x[key] for x in first)


def test_benchmark_replays_the_sampler_from_a_cuda_graph_with_the_eager_result():
    sizes = Sizes(image_size=32, patch_size=16, volumes_2d=((32, 32, 5),), volume_3d=(32, 32, 16),
                  warmup=1, repeats=2, volume_repeats=1, matmul_size=256)
    report = run_benchmark("cuda", ["tiny"], ["2d"], ["fp32"], [False], [4], sizes=sizes)
    (result,) = report["results"]
    assert "error" not in result, result.get("error")
    graphed = result["sample_cuda_graph"]
    assert "error" not in graphed, graphed.get("error")
    assert graphed["items_per_s"] > 0
    assert graphed["max_difference"] < 1e-5  # the same kernels on the same inputs and noise
    assert result["output_std"]["residual"] > 0.01  # real networks, not MONAI's zero outputs
