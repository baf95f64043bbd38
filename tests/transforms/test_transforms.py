"""drdd_med.transforms: exact inverses, masks, checks, aligned patch sampling, MONAI pipelines."""

import numpy as np
import pytest
import torch
from monai.data import CacheDataset, DataLoader, MetaTensor
from monai.transforms import Compose, Invertd, RandAffined, RandFlipd

from drdd_med.errors import DRDDInputError, GridMismatchError, NonFiniteError
from drdd_med.transforms import (
    BodyMask,
    BodyMaskd,
    CheckVolumesd,
    NormalizeHU,
    NormalizeHUd,
    RandPairedPatch,
    RandPairedPatchd,
    RobustNormalize,
    RobustNormalized,
)


def _meta(array, spacing=(1.0, 1.0, 2.0)):
    return MetaTensor(torch.as_tensor(array, dtype=torch.float32), affine=torch.diag(torch.tensor([*spacing, 1.0])))


def test_normalize_hu_maps_range_and_inverts_exactly():
    hu = torch.tensor([[[[-1024.0, 0.0, 1000.0, 3000.0]]]])
    norm = NormalizeHU()
    out = norm(hu)
    torch.testing.assert_close(out.as_tensor(), torch.tensor([[[[-1.0, 2048 / 4024 - 1, 4048 / 4024 - 1, 1.0]]]]))
    torch.testing.assert_close(norm.inverse(out).as_tensor(), hu, rtol=0, atol=1e-3)
    # values outside the range are clipped (documented), so only those are not restored
    assert float(norm.inverse(norm(torch.tensor([[[[4000.0]]]]))).max()) == pytest.approx(3000.0)


def test_robust_normalize_uses_mask_and_inverts():
    rng = np.random.default_rng(0)
    img = _meta(rng.normal(500, 100, (1, 10, 10, 10)))
    mask = torch.zeros(1, 10, 10, 10)
    mask[:, 2:8, 2:8, 2:8] = 1
    img[mask == 0] = 0.0  # background must not drive the percentiles
    out = RobustNormalize(0.5, 99.5)(img, mask)
    inside = out[mask > 0]
    lo, hi = torch.quantile(inside, torch.tensor([0.005, 0.995])).tolist()
    assert lo == pytest.approx(-1.0, abs=1e-5) and hi == pytest.approx(1.0, abs=1e-5)
    assert float(out[mask == 0].max()) < -1.0  # background (0) lies below the body's 0.5th percentile
    torch.testing.assert_close(RobustNormalize().inverse(out).as_tensor(), img.as_tensor(), rtol=0, atol=1e-2)


def test_dictionary_inverse_through_invertd_restores_units():
    ct = _meta(np.linspace(-1000, 2000, 1000).reshape(1, 10, 10, 10))
    mr = _meta(np.linspace(0, 900, 1000).reshape(1, 10, 10, 10))
    pipeline = Compose([NormalizeHUd("target"), RobustNormalized("source", mask_key=None)])
    data = pipeline({"target": ct, "source": mr})
    restored = Invertd(["target", "source"], transform=pipeline, orig_keys=["target", "source"])(data)
    torch.testing.assert_close(restored["target"].as_tensor(), ct.as_tensor(), rtol=0, atol=1e-3)
    torch.testing.assert_close(restored["source"].as_tensor(), mr.as_tensor(), rtol=0, atol=1e-3)


def test_body_mask_fills_holes_and_keeps_largest_component():
    vol = np.full((1, 32, 32, 8), -1000.0)
    yy, xx = np.mgrid[:32, :32]
    head = (xx - 16) ** 2 + (yy - 16) ** 2 < 12**2
    vol[0][head] = 40.0
    vol[0][(xx - 16) ** 2 + (yy - 16) ** 2 < 4**2] = -1000.0  # an internal air pocket (sinus) to fill
    vol[0, 1, 1] = 40.0  # a speck of noise outside the body
    mask = BodyMask(threshold=-500)(vol)
    assert mask.dtype == torch.uint8 and mask.shape == (1, 32, 32, 8)
    assert mask[0, 16, 16].all() and not mask[0, 1, 1].any()
    assert int(mask[0, ..., 0].sum()) == int(head.sum())
    d = BodyMaskd("ct", threshold=-500)({"ct": vol})
    assert torch.equal(d["mask"], mask)
    with pytest.raises(DRDDInputError, match="no voxel above"):
        BodyMask(threshold=5000)(vol)


@pytest.mark.parametrize(
    "data, error, message",
    [
        ({"source": np.zeros((1, 4, 4, 4)), "target": np.zeros((1, 4, 4, 5))}, GridMismatchError, "shape"),
        ({"source": np.zeros((1, 4, 4, 4, 2)), "target": np.zeros((1, 4, 4, 4))}, DRDDInputError, "spatial"),
        ({"source": np.full((1, 4, 4, 4), np.nan), "target": np.zeros((1, 4, 4, 4))}, NonFiniteError, "NaN"),
        ({"source": np.zeros((1, 4, 4, 4)), "target": np.full((1, 4, 4, 4), np.inf)}, NonFiniteError, "target"),
    ],
    ids=["shape", "4d", "nan", "inf"],
)
def test_check_volumes_names_case_and_problem(data, error, message):
    with pytest.raises(error, match=message) as info:
        CheckVolumesd(["source", "target"])({**data, "case_id": "1BA007"})
    assert "1BA007" in str(info.value)


def test_check_volumes_refuses_different_affines():
    a = _meta(np.zeros((1, 4, 4, 4)))
    b = _meta(np.zeros((1, 4, 4, 4)), spacing=(1.0, 1.0, 2.5))
    with pytest.raises(GridMismatchError, match="1BA002.*affine"):
        CheckVolumesd(["source", "target"])({"source": a, "target": b, "case_id": "1BA002"})


def _marker_volumes():
    source = torch.zeros(1, 40, 40, 12)
    target = torch.full((1, 40, 40, 12), -1.0)
    mask = torch.zeros(1, 40, 40, 12)
    source[0, 21, 17, 6] = target[0, 21, 17, 6] = mask[0, 21, 17, 6] = 1.0
    for k in range(12):
        source[0, 30, 30, k] = k + 10  # slice index encoded to check context order
    return source, target, mask


def test_paired_patches_are_aligned_and_centred_in_body():
    source, target, mask = _marker_volumes()
    sampler = RandPairedPatch((16, 16), spatial_dims=2, context_slices=3, num_samples=4, body_fraction=1.0)
    sampler.set_random_state(0)
    for src, tgt, msk in sampler([source, target, mask], mask, [True, False, False]):
        assert src.shape == (3, 16, 16) and tgt.shape == msk.shape == (1, 16, 16)
        assert msk[0, 8, 8] == 1 and tgt[0, 8, 8] == 1 and src[0, 8, 8] == 1  # marker at the patch centre
        assert src[1:, 8, 8].eq(0).all()  # neighbouring slices do not hold the marker


def test_context_slices_order_and_edges():
    source, _, mask = _marker_volumes()
    sampler = RandPairedPatch((40, 40), spatial_dims=2, context_slices=5)
    patch = sampler.crop(source, (20, 20, 0), with_context=True)
    # centre slice 0 first, then offsets -2, -1, +1, +2 clamped at the volume's start
    assert patch[:, 30, 30].tolist() == [10, 10, 10, 11, 12]


def test_3d_patches_and_padding():
    source, target, mask = _marker_volumes()
    sampler = RandPairedPatch((8, 8, 16), spatial_dims=3, num_samples=2, body_fraction=1.0)
    for src, tgt, msk in sampler([source, target, mask], mask):
        assert src.shape == (1, 8, 8, 16)
        assert tgt[0, 4, 4, 8] == 1 and msk[0, 4, 4, 8] == 1
        assert float(tgt.min()) == -1.0  # padded beyond the 12 slices with the target's own minimum


def test_aligned_augmentation_keeps_marker_in_all_keys():
    """A marker voxel stays aligned in source, target and mask through the training augmentation."""
    source, target, mask = _marker_volumes()
    keys = ["source", "target", "mask"]
    pipeline = Compose([
        RandPairedPatchd(keys, context_keys=["source"], roi_size=(24, 24), num_samples=6, body_fraction=1.0),
        RandFlipd(keys, prob=1.0, spatial_axis=0),
        RandAffined(keys, prob=1.0, rotate_range=0.3, mode=["nearest"] * 3, padding_mode="zeros"),
    ])
    pipeline.set_random_state(3)
    for item in pipeline({"source": source, "target": target, "mask": mask, "case_id": "c"}):
        hits = [set(map(tuple, torch.nonzero(item[k][0] == 1).tolist())) for k in keys]
        assert hits[0] and hits[0] == hits[1] == hits[2]
        assert item["case_id"] == "c"


def test_patch_sampler_in_cache_dataset_pipeline():
    source, target, mask = _marker_volumes()
    data = [{"source": _meta(source), "target": _meta(target), "mask": _meta(mask), "case_id": f"c{i}"} for i in range(3)]
    transform = Compose([
        CheckVolumesd(["source", "target", "mask"]),
        NormalizeHUd("target"),
        RandPairedPatchd(["source", "target", "mask"], roi_size=(16, 16), num_samples=4),
    ])
    dataset = CacheDataset(data, transform, progress=False)
    batch = next(iter(DataLoader(dataset, batch_size=3)))
    assert batch["source"].shape == (12, 1, 16, 16) and len(batch["case_id"]) == 12


def test_patch_sampler_refuses_mismatched_grids():
    with pytest.raises(GridMismatchError, match="c9"):
        RandPairedPatchd(["source", "target"], roi_size=(4, 4))(
            {"source": torch.zeros(1, 8, 8, 4), "target": torch.zeros(1, 8, 9, 4), "mask": torch.ones(1, 8, 8, 4),
             "case_id": "c9"}
        )
