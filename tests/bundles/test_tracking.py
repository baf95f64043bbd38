"""Experiment tracking of a bundle training, read back: TensorBoard (``configs/tensorboard.json`` layered
on train.json) and MLflow (``--tracking configs/mlflow.json``, MONAI's tracking settings), in one run.

Needs the ``tracking`` extra; skipped without it.
"""

import io
import json
from pathlib import Path

import numpy as np
import pytest
from test_drdd_mr2ct import FAST, TRAIN, bundle_run

from drdd_med.data.datalists import prepare_datalists
from drdd_med.visualize import CT_WINDOW, mid_axial

TENSORBOARD = "configs/tensorboard.json"
MLFLOW = "configs/mlflow.json"
EPOCHS = 2
TRAIN_LOSSES = {"train_loss", "train_loss_residual", "train_loss_noise"}


def needs_tracking_extra():
    for module in ("tensorboard", "mlflow", "sqlalchemy", "alembic"):
        pytest.importorskip(module, reason="the tracking extra is not installed (pip install -e '.[tracking]')")


def train(root, *args):
    """A tiny training of the mr2ct bundle into ``root``, tracked by ``args``, on a local MLflow store only."""
    with pytest.MonkeyPatch.context() as env:
        env.delenv("MLFLOW_TRACKING_URI", raising=False)  # it would take precedence over the bundle's store
        bundle_run("training", "--bundle_root", str(root), "--val_interval", "1", *FAST, *args)


def mlflow_run(root, experiment):
    """The one MLflow run of ``experiment`` in the bundle's store, and the client that reads it."""
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{root / 'runs' / 'mlruns.db'}")
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    return client, runs[0]


def artifacts(client, run_id, path=None):
    """Every artifact file of the run, recursively."""
    files = []
    for item in client.list_artifacts(run_id, path):
        files.extend(artifacts(client, run_id, item.path) if item.is_dir else [item.path])
    return files


def read_png(path_or_bytes):
    from PIL import Image

    image = Image.open(io.BytesIO(path_or_bytes) if isinstance(path_or_bytes, bytes) else path_or_bytes)
    return np.asarray(image.convert("L"))


def datalists(root):
    """The bundle's datalists, as its training drew them (the demo data is already there)."""
    demo = root / "data" / "demo"
    return prepare_datalists(demo, num_validation=2, demo_dir=demo, seed=0)


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    """One run tracked both ways: the TensorBoard fragment and the MLflow settings file."""
    needs_tracking_extra()
    root = tmp_path_factory.mktemp("tracked")
    train(root, "--config_file", f"['{TRAIN}','{TENSORBOARD}']", "--tracking", MLFLOW, "--max_epochs", str(EPOCHS))
    return root


@pytest.fixture(scope="module")
def tensorboard_events(tracked):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (run_dir,) = (tracked / "runs" / "tensorboard").iterdir()  # one timestamped folder per training
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    return events


def assert_first_case_preview(root, preview):
    """``preview`` shows source | synthetic CT | reference CT of the first validation case, mid axial
    slice, the reference in the fixed HU window."""
    import nibabel as nib

    first_case = datalists(root)["validation"][0]
    reference = mid_axial(nib.load(first_case["target"]).get_fdata())
    height, width = reference.shape
    assert preview.shape == (height, 3 * width)
    low, high = CT_WINDOW
    expected = np.round(np.clip((reference - low) / (high - low), 0, 1) * 255)
    np.testing.assert_allclose(preview[:, 2 * width:], expected, atol=1)


def test_tensorboard_holds_every_loss_the_validation_metric_and_a_preview_per_validation(tracked, tensorboard_events):
    events = tensorboard_events
    assert set(events.Tags()["scalars"]) == TRAIN_LOSSES | {"val_mae"}
    iterations = [e.step for e in events.Scalars("train_loss")]
    assert iterations == list(range(1, len(iterations) + 1)) and len(iterations) >= EPOCHS
    for name in TRAIN_LOSSES:
        assert [e.step for e in events.Scalars(name)] == iterations, name
    total = [e.value for e in events.Scalars("train_loss")]
    residual, noise = ([e.value for e in events.Scalars(f"train_loss_{stage}")] for stage in ("residual", "noise"))
    np.testing.assert_allclose(total, np.add(residual, noise), rtol=1e-5)
    assert [e.step for e in events.Scalars("val_mae")] == list(range(1, EPOCHS + 1))
    assert all(0 < e.value < 3000 for e in events.Scalars("val_mae"))
    previews = events.Images("preview")
    assert [image.step for image in previews] == list(range(1, EPOCHS + 1))
    assert_first_case_preview(tracked, read_png(previews[-1].encoded_image_string))


def test_mlflow_run_holds_every_loss_the_validation_metric_previews_and_the_config(tracked):
    client, run = mlflow_run(tracked, "drdd_med")
    assert set(run.data.metrics) == TRAIN_LOSSES | {"val_mae"}
    iterations = list(range(1, EPOCHS * int(run.data.params["epoch_length"]) + 1))
    for name in TRAIN_LOSSES:
        assert sorted(m.step for m in client.get_metric_history(run.info.run_id, name)) == iterations, name
    val_mae = sorted(client.get_metric_history(run.info.run_id, "val_mae"), key=lambda m: m.step)
    assert [m.step for m in val_mae] == list(range(1, EPOCHS + 1)) and all(0 < m.value < 3000 for m in val_mae)
    files = artifacts(client, run.info.run_id)
    download = str(tracked / "download")
    for epoch in range(1, EPOCHS + 1):
        (preview,) = [f for f in files if f.startswith(f"images/preview+step+{epoch}+") and f.endswith(".png")]
    assert_first_case_preview(tracked, read_png(client.download_artifacts(run.info.run_id, preview, download)))
    (config,) = [f for f in files if f.startswith("config_") and f.endswith(".json")]
    executed = json.loads(Path(client.download_artifacts(run.info.run_id, config, download)).read_text())
    assert executed["network_preset"] == "tiny" and executed["bundle_root"] == str(tracked)


def test_nothing_from_the_data_reaches_the_trackers(tracked, tensorboard_events):
    """No case id nor path from the datalists in MLflow's params, tags, metric names, dataset inputs and
    artifacts (their names, and the text of the executed config), nor in TensorBoard's tags."""
    client, run = mlflow_run(tracked, "drdd_med")
    data = {value for entries in datalists(tracked).values() for entry in entries for value in entry.values()}
    assert "1BA001" in data and any(value.endswith("mr.nii.gz") for value in data)
    assert not run.inputs.dataset_inputs
    files = artifacts(client, run.info.run_id)
    logged = [*run.data.params, *run.data.params.values(), *run.data.tags, *run.data.tags.values(),
              *run.data.metrics, *files, *tensorboard_events.Tags()["scalars"], *tensorboard_events.Tags()["images"]]
    logged += [Path(client.download_artifacts(run.info.run_id, f, str(tracked / "download"))).read_text()
               for f in files if f.endswith(".json")]
    leaked = sorted({value for value in data for text in logged if value in text})
    assert not leaked, leaked
