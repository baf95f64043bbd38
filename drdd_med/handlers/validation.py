"""MONAI's ``ValidationHandler``, plus a validation of the weights a run ends with."""

from __future__ import annotations

from ignite.engine import Engine, Events
from monai.handlers import ValidationHandler


class FinalValidationHandler(ValidationHandler):
    """Validate every ``interval`` epochs (or iterations) as MONAI's handler does, and once more when
    training completes on weights no validation has seen: a time limit (``TrainingBudget``) ending it
    mid-epoch, or ``max_epochs`` off the interval. The best-model checkpoint, chosen by the validator's
    key metric, then weighs the last weights too instead of ignoring up to ``interval`` epochs. An
    interval longer than the run (``max_epochs``) still turns validation off altogether: that is how
    time-budgeted comparisons and speed measurements train without it.
    """

    def attach(self, engine: Engine) -> None:
        super().attach(engine)
        self._validated_at: int | None = None
        engine.add_event_handler(Events.COMPLETED, self._validate_last_weights)

    def __call__(self, engine: Engine) -> None:
        super().__call__(engine)
        self._validated_at = engine.state.iteration

    def _validate_last_weights(self, engine: Engine) -> None:
        state = engine.state
        run_length = state.max_epochs if self.epoch_level else state.max_epochs * state.epoch_length
        if self.interval <= run_length and self._validated_at != state.iteration:
            self(engine)
