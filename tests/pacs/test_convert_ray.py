"""``drdd-med convert --engine ray``: the same series as the local engine, exactly once when a worker dies."""

from __future__ import annotations

import logging
import os
import signal
import sys
from pathlib import Path

import numpy as np
import pacs_helpers
import pydicom
import pytest
from pacs_helpers import PHI_STRINGS, StubTranslator, model_args, write_demo_study

from drdd_med.cli import main
from drdd_med.pacs.convert import BatchConverter
from drdd_med.pacs.endpoints import FolderDestination, FolderSource
from drdd_med.pacs.journal import Journal

ray = pytest.importorskip("ray", reason="the Ray engine's tests need Ray: pip install -e '.[test,ray]'")

# Ray workers import what they unpickle; classes of these test modules travel by value instead
ray.cloudpickle.register_pickle_by_value(pacs_helpers)
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def convert(args: list[str], capfd) -> tuple[int, str]:
    code = main(["convert", "--no-progress", *args])
    out = capfd.readouterr()  # file descriptors: Ray prints its workers' log lines from another thread
    return code, out.out + out.err


def pixels(folder: Path) -> dict[str, np.ndarray]:
    """A delivered series by SOP instance UID (the UIDs are derived, so they match between runs)."""
    datasets = [pydicom.dcmread(file) for file in folder.iterdir()]
    return {str(ds.SOPInstanceUID): ds.pixel_array for ds in datasets}


def test_ray_engine_writes_what_the_local_engine_writes_and_reruns_add_nothing(tmp_path, tiny_model, capfd):
    """The real translator travels as its recipe and is rebuilt on the workers, on a Ray started for the run."""
    root = tmp_path / "incoming"
    for seed in (1, 2, 3):
        write_demo_study(root, seed)
    common = [str(root), *model_args(tiny_model)]
    code, _ = convert([*common, str(tmp_path / "local"), "--journal", str(tmp_path / "local.sqlite")], capfd)
    assert code == 0

    ray_run = [*common, str(tmp_path / "ray"), "--journal", str(tmp_path / "ray.sqlite"), "--engine", "ray"]
    code, printed = convert(ray_run, capfd)
    assert code == 0 and "3 converted, 0 skipped, 0 failed" in printed
    assert not ray.is_initialized()  # the Ray it started is shut down
    local = {folder.name: pixels(folder) for folder in (tmp_path / "local").iterdir()}
    remote = {folder.name: pixels(folder) for folder in (tmp_path / "ray").iterdir()}
    assert sorted(local) == sorted(remote) and len(local) == 3
    for series, instances in local.items():
        assert sorted(instances) == sorted(remote[series])
        # a Ray task runs torch with its num_cpus threads, so sums run in another order: equal up to
        # the rounding to whole HU of values that lie on a rounding boundary
        for uid, values in instances.items():
            difference = np.abs(remote[series][uid].astype(int) - values)
            assert difference.max() <= 1 and (difference > 0).mean() < 0.01, (difference.max(), (difference > 0).mean())
    for secret in (*PHI_STRINGS, str(root)):
        assert secret not in printed, secret

    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "ray").rglob("*")}
    code, printed = convert(ray_run, capfd)
    assert code == 0 and "0 converted, 3 skipped, 0 failed" in printed
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "ray").rglob("*")} == stamps


def test_ray_options_without_the_ray_engine_and_c_move_with_it_are_usage_errors(tmp_path, tiny_model, capfd,
                                                                                 monkeypatch):
    common = [str(tmp_path), str(tmp_path / "out"), *model_args(tiny_model)]
    with monkeypatch.context() as without_ray:
        without_ray.setitem(sys.modules, "ray", None)  # as on a machine without the extra: import fails
        code, printed = convert([*common, "--engine", "ray"], capfd)
    assert code == 2 and "the Ray engine needs Ray: pip install 'drdd-med[ray]'" in printed
    code, printed = convert([*common, "--ray-gpus", "1"], capfd)
    assert code == 2 and "the --ray-* options apply to --engine ray only" in printed
    code, printed = convert(["dimse://PACS@127.0.0.1:1", str(tmp_path / "out"), *model_args(tiny_model), "--engine",
                             "ray", "--retrieve", "move", "--move-port", "11112"], capfd)
    assert code == 2 and "--engine ray needs --retrieve get" in printed
    assert not (tmp_path / "out").exists()


class KillingDestination(FolderDestination):
    """Delivers half of a series, then SIGKILLs its own worker process: on the first delivery of the run
    only, or on every delivery of the synthetic series of source series ``always``."""

    def __init__(self, root: Path, marker: Path, always: str = ""):
        super().__init__(root)
        self.marker, self.always = marker, always

    def deliver(self, files, series_uid: str) -> None:
        source = pydicom.dcmread(files[0], stop_before_pixels=True).ReferencedSeriesSequence[0].SeriesInstanceUID
        if source == self.always or (not self.always and self._first_kill()):
            super().deliver(files[: len(files) // 2], series_uid)  # a partial series lands, then the worker dies
            os.kill(os.getpid(), signal.SIGKILL)
        super().deliver(files, series_uid)

    def _first_kill(self) -> bool:
        try:
            os.close(os.open(self.marker, os.O_CREAT | os.O_EXCL))  # atomic: one worker wins
            return True
        except FileExistsError:
            return False


@pytest.fixture(scope="module")
def ray_cluster():
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)  # two tasks at once
    yield
    ray.shutdown()


def _series_folders(out: Path) -> dict[str, int]:
    return {folder.name: len(list(folder.iterdir())) for folder in out.iterdir() if not folder.name.startswith(".")}


def test_a_worker_killed_mid_delivery_is_rerun_and_every_series_lands_exactly_once(tmp_path, ray_cluster):
    from drdd_med.pacs.ray_engine import RayEngine

    root, out = tmp_path / "incoming", tmp_path / "synthetic"
    sources = [write_demo_study(root, seed)[0] for seed in (5, 6, 7, 8)]
    destination = KillingDestination(out, tmp_path / "killed-once")
    report = BatchConverter(FolderSource(root), destination, StubTranslator(), tmp_path / "j.sqlite",
                            progress=False, engine=RayEngine(max_retries=2)).run()
    assert (tmp_path / "killed-once").exists()  # a worker did die mid-series
    assert report.counts == {"converted": 4, "skipped": 0, "failed": 0}
    assert sorted(_series_folders(out).values()) == [len(files) for files in sources]  # 4 whole series, no partial
    assert all(row.attempts == 1 for row in report.series)  # Ray's rerun is inside one journal attempt


def test_a_series_whose_worker_always_dies_fails_and_the_next_run_redoes_it_once(tmp_path, ray_cluster):
    from drdd_med.pacs.ray_engine import RayEngine

    root, out, journal = tmp_path / "incoming", tmp_path / "synthetic", tmp_path / "j.sqlite"
    doomed, other = (str(pydicom.dcmread(write_demo_study(root, seed)[0][0]).SeriesInstanceUID) for seed in (5, 6))
    destination = KillingDestination(out, tmp_path / "unused", always=doomed)
    report = BatchConverter(FolderSource(root), destination, StubTranslator(), journal, progress=False,
                            engine=RayEngine(max_retries=1)).run()
    assert report.counts == {"converted": 1, "skipped": 0, "failed": 1}
    failed = next(row for row in report.series if row.status == "failed")
    assert failed.reason == ("the Ray task failed (WorkerCrashedError) after 2 tries; "
                             "its partial series was withdrawn")
    with Journal(journal, "stub 1", destination.key, "check") as entries:
        assert entries.get(other).status == "done"
        assert entries.get(doomed).status == "failed" and not entries.get(doomed).permanent  # redone next run
    assert sorted(_series_folders(out).values()) == [8]  # the doomed series' partial delivery is gone

    report = BatchConverter(FolderSource(root), FolderDestination(out), StubTranslator(), journal,
                            progress=False).run()  # the local engine finishes the job
    assert report.counts == {"converted": 1, "skipped": 1, "failed": 0}
    assert sorted(_series_folders(out).values()) == [8, 8]


@pytest.mark.slow
@pytest.mark.parametrize("transport", ["dimse", "dicomweb"])
def test_ray_engine_against_the_test_orthanc_converts_each_series_once(tmp_path, orthanc, tiny_model, ray_cluster,
                                                                        transport, capfd, monkeypatch):
    """The endpoints travel to the workers as what reopens them (DIMSE C-GET, DICOMweb with credentials)."""
    from pacs_helpers import CLIENT_AET

    for seed in (1, 2):
        orthanc.upload(write_demo_study(tmp_path / "upload", seed)[0])
    if transport == "dimse":
        node, extra = orthanc.dimse, ["--calling-aet", CLIENT_AET]
    else:
        node, extra = orthanc.dicomweb, []
        monkeypatch.setenv("DRDD_DICOMWEB_USER", orthanc.session.auth[0])
        monkeypatch.setenv("DRDD_DICOMWEB_PASSWORD", orthanc.session.auth[1])
    args = [node, node, *model_args(tiny_model), *extra, "--journal", str(tmp_path / "j.sqlite"), "--engine", "ray"]
    code, printed = convert(args, capfd)
    assert code == 0 and "2 converted, 0 skipped, 0 failed" in printed, printed[-3000:]
    assert orthanc.count("series") == 4 and orthanc.count("instances") == 4 * 8  # 2 MR + 2 synthetic CT
    for secret in (*PHI_STRINGS, str(tmp_path)):
        assert secret not in printed, secret
    code, printed = convert(args, capfd)
    assert code == 0 and "0 converted, 2 skipped, 0 failed" in printed
    assert orthanc.count("instances") == 4 * 8  # a rerun adds nothing
