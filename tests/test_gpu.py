"""GPU path: bf16 training of the default GPU networks. Skipped without CUDA (bf16 sampling: test_inferers)."""

import pytest
import torch

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
    trainer.add_event_handler("iteration_completed", lambda e: losses.append(e.state.output))
    trainer.run()
    first, last = losses[:4], losses[-4:]
    for key in ("loss_residual", "loss_noise"):
        assert all(torch.isfinite(torch.tensor(x[key])) for x in losses)
        assert sum(x[key] for x in last) < sum(x[key] for x in first)
