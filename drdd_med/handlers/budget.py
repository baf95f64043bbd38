"""Stop training at a wall-clock budget, as an Ignite handler: equal-time comparisons of methods, and
the CPU profile's bound on the demo trainings (``max_training_minutes``)."""

from __future__ import annotations

import logging
import time

from ignite.engine import Engine, Events

logger = logging.getLogger(__name__)


class TrainingBudget:
    """Terminate the trainer once its training steps have taken ``seconds`` of wall-clock time.

    Each iteration is timed from fetching its batch to the end of its ``ITERATION_COMPLETED``
    handlers attached before this one (EMA, logging): the data pipeline is part of what a step
    costs. Epoch-level work (validation, periodic checkpoints) and set-up (dataset caching) fall
    outside, so methods are compared on training alone. The run stops after the iteration that
    reaches the budget: ``elapsed`` exceeds ``seconds`` by less than ``longest_iteration``.
    ``iterations`` counts this run's iterations (a resumed trainer's earlier ones are not in it).
    """

    def __init__(self, seconds: float):
        if not seconds > 0:
            raise ValueError(f"the training budget must be a positive number of seconds, got {seconds}")
        self.seconds = float(seconds)
        self.elapsed = 0.0
        self.iterations = 0
        self.longest_iteration = 0.0
        self._iteration_start: float | None = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.GET_BATCH_STARTED, self._start)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._stop)

    def _start(self, engine: Engine) -> None:
        self._iteration_start = time.perf_counter()

    def _stop(self, engine: Engine) -> None:
        seconds = time.perf_counter() - self._iteration_start
        self.elapsed += seconds
        self.longest_iteration = max(self.longest_iteration, seconds)
        self.iterations += 1
        if self.elapsed >= self.seconds:
            logger.info("training stops at its time limit of %.0f s: %d iterations this run, now at epoch %d",
                        self.seconds, self.iterations, engine.state.epoch)
            engine.terminate()
