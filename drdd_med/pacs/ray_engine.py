"""Ray as the conversion engine: each series is one Ray task, the journal stays with the driver.

``drdd-med convert --engine ray`` (``pip install drdd-med[ray]``) hands every series that the
journal says is not done to a Ray task that fetches, translates, writes and delivers it
(``SeriesConversion``) on a worker with ``num_cpus`` CPUs and ``num_gpus`` GPUs. The driver (the
``convert`` process) queries the source, keeps the SQLite journal and the report, and records each
series as its task ends. Exactly once holds as with the local engine: a task whose worker dies is
run again by Ray (``max_retries``), and a redo resends the same instances, because the synthetic
series' UIDs are derived from the source series and the model; a series still unfinished when the
driver dies is redone by the next run.

What a worker needs travels pickled: the endpoints as the addresses that reopen them (a C-MOVE
source cannot travel, its storage SCP listens in the driver: use C-GET), the translator as its
bundle folder and weights path (every machine must see them at the same path; a worker whose
weights differ refuses the series), and the redactor, so that the workers' log lines carry no
patient data either. Scratch files live in a temporary folder of the worker, removed after each
series (a killed worker's leftovers are in the system's temporary folder).

``address``: an existing cluster (``ray://host:10001`` or ``auto``); ``None`` uses ``RAY_ADDRESS``
when it is set, else starts Ray on this machine for the run.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from drdd_med.errors import DRDDInputError
from drdd_med.pacs.convert import Outcome, SeriesConversion
from drdd_med.pacs.endpoints import SeriesRef
from drdd_med.pacs.phi import Redactor, redacted_logging


def _ray():
    try:
        import ray
    except ImportError:
        raise ImportError("the Ray engine needs Ray: pip install 'drdd-med[ray]'") from None
    return ray


def _convert_on_worker(conversion: SeriesConversion, redact: Redactor, ref: SeriesRef, name: str) -> Outcome:
    """One series on a Ray worker, with its warnings logged (to the driver, by Ray) through the redactor."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    with redacted_logging(redact), tempfile.TemporaryDirectory(prefix="drdd-convert-") as scratch:
        return conversion(ref, redact, name, Path(scratch) / "series")


class RayEngine:
    """Convert series as Ray tasks (see the module docstring).

    Args:
        address: the Ray cluster to join (``None``: ``RAY_ADDRESS``, else a Ray started here for the run).
        num_cpus / num_gpus: resources of each task (one series at a time per task).
        max_retries: how many times Ray reruns a task whose worker died before the series is recorded
            as failed (the next run then redoes it).
    """

    description = "ray"

    def __init__(self, address: str | None = None, num_cpus: float = 1, num_gpus: float = 0, max_retries: int = 3):
        if num_cpus <= 0 or num_gpus < 0 or max_retries < 0:
            raise ValueError(f"Ray tasks need num_cpus > 0, num_gpus >= 0 and max_retries >= 0, got "
                             f"{num_cpus}, {num_gpus} and {max_retries}")
        _ray()
        self.address, self.num_cpus, self.num_gpus, self.max_retries = address, num_cpus, num_gpus, max_retries

    def run(self, conversion: SeriesConversion, jobs: list[tuple[SeriesRef, str]], redact: Redactor,
            start: Callable[[SeriesRef], None], work: Path) -> Iterator[tuple[SeriesRef, str, Outcome]]:
        """Submit every job (``start(ref)`` as each is submitted); yield ``(ref, name, outcome)`` as tasks end."""
        ray = _ray()
        started_here = not ray.is_initialized()
        if started_here:
            ray.init(address=self.address, include_dashboard=False, logging_level=logging.WARNING)
        try:
            task = ray.remote(_convert_on_worker).options(
                num_cpus=self.num_cpus, num_gpus=self.num_gpus, max_retries=self.max_retries, retry_exceptions=False
            )
            shared_conversion, shared_redact = ray.put(conversion), ray.put(redact)
            pending = {}
            for ref, name in jobs:
                start(ref)
                pending[task.remote(shared_conversion, shared_redact, ref, name)] = (ref, name)
            while pending:
                (done,), _ = ray.wait(list(pending), num_returns=1)
                ref, name = pending.pop(done)
                try:
                    outcome = ray.get(done)
                except ray.exceptions.RayError as err:  # the worker died every try, or could not set up
                    cause = getattr(err, "cause", None)
                    why = str(cause) if isinstance(cause, DRDDInputError) else type(err).__name__
                    outcome = conversion.abandoned(ref, redact(f"the Ray task failed ({why}) after "
                                                               f"{self.max_retries + 1} tries"))
                yield ref, name, outcome
        finally:
            if started_here:
                ray.shutdown()
