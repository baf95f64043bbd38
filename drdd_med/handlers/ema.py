"""Exponential moving average of network weights, as an Ignite handler."""

from __future__ import annotations

import torch
from ignite.engine import Engine, Events


class EMAHandler:
    """Every ``every`` iterations: ``ema ← decay · ema + (1 − decay) · network`` (parameters and buffers).

    ``ema_network`` is a second instance of the same architecture (e.g. ``copy.deepcopy(network)``);
    it starts as a copy of ``network`` when the trainer starts from iteration 0, so a resumed run
    keeps the EMA weights it loaded from its checkpoint. The reference uses decay 0.995 every 10 steps.
    """

    def __init__(self, network: torch.nn.Module, ema_network: torch.nn.Module, decay: float = 0.995, every: int = 10):
        if not 0 <= decay < 1:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        self.network, self.ema_network = network, ema_network
        self.decay, self.every = decay, every
        self.ema_network.requires_grad_(False)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._start)
        engine.add_event_handler(Events.ITERATION_COMPLETED(every=self.every), self.update)

    def _start(self, engine: Engine) -> None:
        if engine.state.iteration == 0:
            self.ema_network.load_state_dict(self.network.state_dict())

    @torch.no_grad()
    def update(self, engine: Engine | None = None) -> None:
        ema = self.ema_network.state_dict()
        for name, value in self.network.state_dict().items():
            if value.dtype.is_floating_point:
                ema[name].lerp_(value, 1 - self.decay)
            else:
                ema[name].copy_(value)
