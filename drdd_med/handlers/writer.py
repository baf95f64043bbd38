"""Write each case's synthetic CT (int16 HU, on the source grid) and a preview PNG."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from ignite.engine import Engine, Events

from drdd_med.data.writers import write_volume
from drdd_med.visualize import save_translation_preview

logger = logging.getLogger(__name__)

FORMATS = ("nii.gz", "nii", "mha")


class SyntheticCTWriter:
    """At each evaluator iteration, write ``OUTPUT_DIR/<case_id>/sct.<fmt>`` and ``preview.png``.

    Reads ``pred`` (HU), ``affine``, ``case_id``, ``source`` and optional ``label`` from the
    evaluator's output (``DRDDEvaluator``). Files appear atomically; an existing output raises
    ``OutputExistsError`` unless ``overwrite``, so a finished case is never silently replaced.
    """

    def __init__(self, output_dir: str, output_format: str = "nii.gz", preview: bool = True, overwrite: bool = False):
        if output_format not in FORMATS:
            raise ValueError(f"output_format must be one of {FORMATS}, got {output_format!r}")
        self.output_dir = Path(output_dir)
        self.output_format = output_format
        self.preview = preview
        self.overwrite = overwrite

    def output_path(self, case_id: str) -> Path:
        return self.output_dir / str(case_id) / f"sct.{self.output_format}"

    def pending(self, datalist: list[dict]) -> list[dict]:
        """The cases still to do: all with ``overwrite``, else those without a finished output.

        A rerun after a crash therefore translates each remaining case exactly once.
        """
        if self.overwrite:
            return list(datalist)
        todo = [item for item in datalist if not self.output_path(item["case_id"]).exists()]
        if len(todo) < len(datalist):
            logger.info("%d of %d cases have a synthetic CT already; skipping them (set overwrite to redo)",
                        len(datalist) - len(todo), len(datalist))
        return todo

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        out = engine.state.output
        case_dir = self.output_dir / str(out["case_id"])
        pred = np.asarray(out["pred"][0, 0].detach().cpu())
        # the preview first: the volume's presence marks the case as finished
        if self.preview:
            label = out.get("label")
            save_translation_preview(
                case_dir / "preview.png", out["source"][0, 0].cpu(), pred,
                None if label is None else label[0, 0].cpu(), title=str(out["case_id"]), overwrite=True,
            )
        write_volume(pred, np.asarray(out["affine"].cpu()), self.output_path(out["case_id"]), overwrite=self.overwrite)
        logger.info("wrote synthetic CT for case %s", out["case_id"])
