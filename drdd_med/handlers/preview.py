"""A preview image per validation, for experiment trackers: TensorBoard and MLflow.

MONAI's ``TensorBoardImageHandler`` shows the last case of an evaluator run, scales each image to its
own minimum and maximum and shows source, prediction and reference as separate images; MONAI's
``MLFlowHandler`` logs no images. These handlers log one picture per evaluator run instead: the
middle axial slice of its first case, source | prediction | reference side by side, the CTs in a
fixed HU window (``drdd_med.visualize.translation_preview_image``), at step ``engine.state.epoch``,
which for an evaluator run by MONAI's ``ValidationHandler`` is the trainer's epoch. The picture
carries no case id, name or path.

Both read ``source`` (normalised), ``pred`` (HU) and, when present, ``label`` (HU), each
``(1, C, X, Y, Z)``, from the output dict of ``drdd_med.engines.DRDDEvaluator``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from ignite.engine import Engine, Events
from monai.handlers import MLFlowHandler
from monai.handlers.tensorboard_handlers import TensorBoardHandler

from drdd_med.visualize import CT_WINDOW, translation_preview_image

__all__ = ["MLFlowPreviewHandler", "TensorBoardPreviewHandler", "validation_preview"]


def validation_preview(output: dict, window: Sequence[float] = CT_WINDOW) -> np.ndarray:
    """The preview picture (uint8, H × W·n) of one evaluator output dict."""
    label = output.get("label")
    return translation_preview_image(
        output["source"][0, 0].detach().cpu(), output["pred"][0, 0].detach().cpu(),
        None if label is None else label[0, 0].detach().cpu(), window=tuple(window),
    )


def _first_iteration_of_epoch(engine: Engine, iteration: int) -> bool:
    return (iteration - 1) % engine.state.epoch_length == 0


class TensorBoardPreviewHandler(TensorBoardHandler):
    """Write the validation preview as TensorBoard image ``tag``, once per evaluator run.

    Args:
        summary_writer: a ``SummaryWriter`` shared with other handlers (flushed after each image), or
            ``None`` to create one in ``log_dir``.
        log_dir: where a writer of its own writes.
        tag: the image's TensorBoard tag.
        window: the HU window of prediction and reference.
    """

    def __init__(self, summary_writer=None, log_dir: str = "./runs", tag: str = "preview",
                 window: Sequence[float] = CT_WINDOW):
        super().__init__(summary_writer=summary_writer, log_dir=log_dir)
        self.tag = tag
        self.window = window

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED(event_filter=_first_iteration_of_epoch), self)

    def __call__(self, engine: Engine) -> None:
        image = validation_preview(engine.state.output, self.window)
        self._writer.add_image(self.tag, image, engine.state.epoch, dataformats="HW")
        self._writer.flush()


class MLFlowPreviewHandler(MLFlowHandler):
    """MONAI's ``MLFlowHandler`` that also logs the validation preview, as MLflow image ``preview_key``
    at step ``epoch``, once per engine run, into the run it tracks.

    Attach it to the evaluator in place of an ``MLFlowHandler`` (one handler, so MONAI's tracking
    settings can disable it on ranks other than 0 like any other). The images are MLflow's
    time-stepped images: artifacts ``images/<key>+step+<epoch>+...png``.

    Args:
        preview_key: the image key.
        window: the HU window of prediction and reference.
        kwargs: ``MLFlowHandler``'s arguments.
    """

    def __init__(self, preview_key: str = "preview", window: Sequence[float] = CT_WINDOW, **kwargs):
        super().__init__(**kwargs)
        self.preview_key = preview_key
        self.window = window

    def attach(self, engine: Engine) -> None:
        super().attach(engine)  # opens or finds the run when the engine starts
        engine.add_event_handler(Events.ITERATION_COMPLETED(event_filter=_first_iteration_of_epoch), self.log_preview)

    def log_preview(self, engine: Engine) -> None:
        image = validation_preview(engine.state.output, self.window)
        self.client.log_image(self.cur_run.info.run_id, image, key=self.preview_key, step=engine.state.epoch)
