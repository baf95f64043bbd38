"""The MONAI metric classes and their Ignite handlers score batches exactly as the plain functions do."""

import math

import numpy as np
import pytest
import torch
from ignite.engine import Engine

from drdd_med.errors import GridMismatchError, NonFiniteError
from drdd_med.handlers import MaskedMAEHandler, MaskedPSNRHandler, TissueMAEHandler, WindowedSSIMHandler
from drdd_med.metrics import (
    MaskedMAEMetric,
    MaskedMSSSIMMetric,
    MaskedPSNRMetric,
    MaskedSSIMMetric,
    TissueMAEMetric,
    WindowedPSNRMetric,
    WindowedRMSEMetric,
    WindowedSSIMMetric,
)
from drdd_med.metrics import functional as F


def batch(size=2, shape=(12, 12, 10), seed=0):
    """(B, 1, X, Y, Z) prediction, reference and mask tensors in HU."""
    rng = np.random.default_rng(seed)
    ref = rng.uniform(-1000, 1500, (size, 1, *shape)).astype(np.float32)
    pred = ref + rng.normal(0, 50, ref.shape).astype(np.float32)
    mask = np.zeros(ref.shape, dtype=np.float32)
    mask[..., 2:-2, 2:-2, 2:-2] = 1
    return torch.from_numpy(pred), torch.from_numpy(ref), torch.from_numpy(mask)


@pytest.mark.parametrize(
    "metric, function",
    [
        (MaskedMAEMetric(), F.synthrad2023_mae),
        (MaskedPSNRMetric(clip=F.SYNTHRAD2025_CLIP), lambda p, r, m: F.synthrad2023_psnr(p, r, m, F.SYNTHRAD2025_CLIP)),
        (MaskedSSIMMetric(), F.synthrad2023_ssim),
        (MaskedMSSSIMMetric(), F.synthrad2025_ms_ssim),
        (WindowedPSNRMetric("redcnn"), lambda p, r, m: F.windowed_psnr(p, r, "redcnn", m)),
        (WindowedRMSEMetric((-1000, 1000)), lambda p, r, m: F.windowed_rmse(p, r, (-1000, 1000), m)),
        (WindowedSSIMMetric("chest"), lambda p, r, m: F.windowed_ssim(p, r, "chest", m)),
    ],
)
def test_batch_scores_equal_the_functions_and_aggregate_to_their_mean(metric, function):
    pred, ref, mask = batch()
    scores = metric(pred, ref, mask)
    expected = [function(pred[i, 0], ref[i, 0], mask[i, 0]) for i in range(2)]
    assert scores.shape == (2, 1)
    np.testing.assert_allclose(scores[:, 0].numpy(), expected, rtol=1e-9)
    assert float(metric.aggregate()) == pytest.approx(np.mean(expected), rel=1e-6)
    assert metric.aggregate("none").shape == (2, 1)
    metric.reset()


def test_decollated_lists_and_batches_accumulate_alike():
    pred, ref, mask = batch(size=3)
    metric = MaskedMAEMetric()
    metric(pred[:1], ref[:1], mask[:1])
    metric(list(pred[1:]), list(ref[1:]), list(mask[1:]))
    expected = [F.synthrad2023_mae(pred[i, 0], ref[i, 0], mask[i, 0]) for i in range(3)]
    np.testing.assert_allclose(metric.get_buffer()[:, 0].numpy(), expected)
    assert float(metric.aggregate()) == pytest.approx(np.mean(expected), rel=1e-6)


def test_2d_slices_are_scored_by_ssim():
    pred, ref, mask = (t[..., 5] for t in batch())  # (B, 1, H, W)
    scores = MaskedSSIMMetric()(pred, ref, mask)
    assert scores[0, 0] == pytest.approx(F.synthrad2023_ssim(pred[0, 0], ref[0, 0], mask[0, 0]))


def test_errors_name_the_batch_item():
    pred, ref, mask = batch()
    pred[1, 0, 0, 0, 0] = math.nan
    with pytest.raises(NonFiniteError, match="batch item 1: prediction"):
        MaskedMAEMetric()(pred, ref, mask)
    with pytest.raises(GridMismatchError):
        MaskedMAEMetric()(pred[:, :, :-1], ref, mask)
    with pytest.raises(GridMismatchError, match="mask batch shape"):
        MaskedMAEMetric()(ref, ref, mask[:1])


def test_tissue_mae_columns_skip_absent_classes():
    ref = torch.full((2, 1, 8, 8, 8), 40.0)
    ref[1, :, :4] = 1000.0  # only the second item has bone
    metric = TissueMAEMetric()
    metric(ref + 10.0, ref)
    np.testing.assert_allclose(metric.get_buffer().numpy(), [[math.nan, 10, math.nan], [math.nan, 10, 10]])
    value = metric.aggregate()  # mean per class over items that have it; air nowhere -> NaN, never 0
    assert math.isnan(value[0]) and value[1:].tolist() == [10.0, 10.0]


def run_engine(handlers, outputs):
    engine = Engine(lambda engine, batch_output: batch_output)
    for name, handler in handlers.items():
        handler.attach(engine, name)
    engine.run(outputs)
    return engine


def test_handlers_read_pred_label_mask_from_the_evaluator_output():
    first, second = batch(seed=0), batch(seed=1)
    outputs = [dict(zip(("pred", "label", "mask"), b)) for b in (first, second)]
    handlers = {"mae": MaskedMAEHandler(), "psnr": MaskedPSNRHandler(), "bone": TissueMAEHandler("bone")}
    engine = run_engine(handlers, outputs)
    maes = [F.synthrad2023_mae(p[i, 0], r[i, 0], m[i, 0]) for p, r, m in (first, second) for i in range(2)]
    assert engine.state.metrics["mae"] == pytest.approx(np.mean(maes), rel=1e-6)
    assert engine.state.metric_details["mae"].shape == (4, 1)
    psnrs = [F.synthrad2023_psnr(p[i, 0], r[i, 0], m[i, 0]) for p, r, m in (first, second) for i in range(2)]
    assert engine.state.metrics["psnr"] == pytest.approx(np.mean(psnrs), rel=1e-6)
    bone = [F.tissue_mae(p[i, 0], r[i, 0], m[i, 0])["bone"] for p, r, m in (first, second) for i in range(2)]
    assert engine.state.metrics["bone"] == pytest.approx(np.mean(bone), rel=1e-6)


def test_handlers_accept_decollated_outputs_and_no_mask():
    pred, ref, mask = batch()
    decollated = [[{"pred": pred[i], "label": ref[i], "mask": mask[i]} for i in range(2)]]
    engine = run_engine({"mae": MaskedMAEHandler(), "ssim": WindowedSSIMHandler("abdomen")}, decollated)
    expected = np.mean([F.synthrad2023_mae(pred[i, 0], ref[i, 0], mask[i, 0]) for i in range(2)])
    assert engine.state.metrics["mae"] == pytest.approx(expected, rel=1e-6)
    assert 0 < engine.state.metrics["ssim"] < 1

    from monai.handlers import from_engine

    unmasked = MaskedMAEHandler(output_transform=from_engine(["pred", "label"]))
    engine = run_engine({"mae": unmasked}, [{"pred": pred, "label": ref}])
    expected = np.mean([F.synthrad2023_mae(pred[i, 0], ref[i, 0]) for i in range(2)])
    assert engine.state.metrics["mae"] == pytest.approx(expected, rel=1e-6)
