"""Exponential moving average of network weights, as an Ignite handler."""

from __future__ import annotations

import torch
from ignite.engine import Engine, Events

from drdd_med.networks import RecordedModel


class EMAHandler:
    """Every ``every`` iterations: ``ema ← d · ema + (1 − d) · network`` (parameters and buffers).

    ``d = min(decay, (1 + n) / (10 + n))`` after ``n`` updates: the warm-up lets the average follow
    the network early on, so short runs (minutes on a CPU) validate trained weights rather than an
    average still dominated by the initialisation; long runs use ``decay`` (the reference: 0.995
    every 10 steps). ``ema_network`` is a second instance of the same architecture; it starts as a
    copy of ``network`` when the trainer starts from iteration 0, so a resumed run keeps the EMA
    weights it loaded from its checkpoint (``n`` follows the trainer's iteration, so does the warm-up).
    When training ends between two updates (a time budget, a last short epoch), one more update takes
    in its last iterations before the final checkpoint is saved: a run shorter than ``every`` still
    saves trained weights. Each update also copies the network's model record (the iterations each
    stage was trained), so the saved EMA model says what it was trained from.
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
        # attached with the trainer, so it runs before a checkpoint saver attached afterwards
        engine.add_event_handler(Events.COMPLETED, self._finish)

    def _start(self, engine: Engine) -> None:
        if engine.state.iteration == 0:
            self.ema_network.load_state_dict(self.network.state_dict())

    def current_decay(self, iteration: int) -> float:
        updates = iteration // self.every
        return min(self.decay, (1 + updates) / (10 + updates))

    def _finish(self, engine: Engine) -> None:
        if engine.state.iteration % self.every:
            self.update(engine)

    @torch.no_grad()
    def update(self, engine: Engine) -> None:
        weight = 1 - self.current_decay(engine.state.iteration)
        ema = self.ema_network.state_dict()
        state = self.network.state_dict()
        if isinstance(self.ema_network, RecordedModel):
            self.ema_network.follow_training_record(self.network)
        for name, value in state.items():
            if not torch.is_tensor(value):
                continue
            if value.dtype.is_floating_point:
                ema[name].lerp_(value, weight)
            else:
                ema[name].copy_(value)
