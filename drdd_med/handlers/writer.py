"""Write each case's synthetic CT (int16 HU, on the source grid), a preview PNG and, for several samples, the std map."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from ignite.engine import Engine, Events

from drdd_med.data.writers import write_volume
from drdd_med.errors import OutputExistsError
from drdd_med.visualize import save_std_preview, save_translation_preview

logger = logging.getLogger(__name__)

FORMATS = ("nii.gz", "nii", "mha")


class SyntheticCTWriter:
    """At each evaluator iteration, write ``OUTPUT_DIR/<case_id>/sct.<fmt>`` and ``preview.png``.

    Reads ``pred`` (HU), ``affine``, ``case_id``, ``source`` and optional ``label`` from the
    evaluator's output (``DRDDEvaluator``). When the output carries ``pred_std`` (several samples:
    ``pred`` is their mean), ``sct_std.<fmt>`` (float32, std in HU, same grid and affine) and
    ``std_preview.png`` are written too.

    Files appear atomically, and ``sct.<fmt>`` is always the last: its presence marks the case
    finished (``pending``). A finished case raises ``OutputExistsError`` before anything of it is
    touched, unless ``overwrite``; the other files of an unfinished case (left by a crash) are
    replaced, so a rerun redoes that case exactly once, and a std map no longer matching (a rerun
    with one sample) is removed.
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

    def std_path(self, case_id: str) -> Path:
        return self.output_dir / str(case_id) / f"sct_std.{self.output_format}"

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
        case_id = out["case_id"]
        sct_path, std_path = self.output_path(case_id), self.std_path(case_id)
        if sct_path.exists() and not self.overwrite:
            raise OutputExistsError(f"case {case_id}: a synthetic CT exists already; set overwrite to replace it")
        case_dir = sct_path.parent
        pred = np.asarray(out["pred"][0, 0].detach().cpu())
        affine = np.asarray(out["affine"].cpu())
        std = out.get("pred_std")
        std = None if std is None else np.asarray(std[0, 0].detach().cpu(), dtype=np.float32)
        # everything else first: the volume's presence marks the case as finished
        if self.preview:
            label = out.get("label")
            save_translation_preview(
                case_dir / "preview.png", out["source"][0, 0].cpu(), pred,
                None if label is None else label[0, 0].cpu(), title=str(case_id), overwrite=True,
            )
        if std is None:  # no std of this run: none of an earlier one may stay beside its synthetic CT
            std_path.unlink(missing_ok=True)
            (case_dir / "std_preview.png").unlink(missing_ok=True)
        else:
            if self.preview:
                save_std_preview(case_dir / "std_preview.png", std, pred, title=str(case_id), overwrite=True)
            write_volume(std, affine, std_path, dtype=np.float32, overwrite=True)
        write_volume(pred, affine, sct_path, overwrite=self.overwrite)
        logger.info("wrote synthetic CT%s for case %s", "" if std is None else " and its std map", case_id)
