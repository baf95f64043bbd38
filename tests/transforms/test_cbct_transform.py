"""``SimulateCBCT`` / ``SimulateCBCTd``: equal to ``simulate_cbct``, spacing from the affine, random scatter and seed."""

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Compose

from drdd_med.cbct import simulate_cbct
from drdd_med.errors import DRDDInputError
from drdd_med.transforms.cbct import (
    SCATTER_META_KEY,
    SimulateCBCT,
    SimulateCBCTD,
    SimulateCBCTd,
    SimulateCBCTDict,
)

FAST = {"n_views": 164, "detector_pitch_mm": 4 * 0.776}  # a quarter of the default views and channels


def ct_image(spacing=(4.0, 5.0, 3.0)):
    """A channel-first body section (1, 48, 40, 2) in HU with an RAS affine of the given spacing."""
    x = (np.arange(48) - 23.5) * spacing[0]
    y = (np.arange(40) - 19.5) * spacing[1]
    body = np.add.outer((x / 80) ** 2, (y / 60) ** 2) < 1
    section = np.where(body, 40.0, -1000.0).astype(np.float32)
    volume = np.repeat(section[None, :, :, None], 2, axis=3)
    affine = torch.diag(torch.tensor([*spacing, 1.0], dtype=torch.float64))
    return MetaTensor(torch.from_numpy(volume), affine=affine, meta={"filename_or_obj": "/data/case3_ct.nii.gz"})


def test_array_transform_equals_the_function_with_its_random_scatter_and_seed():
    image = ct_image()
    transform = SimulateCBCT((0.2, 0.8), fov_diameter_mm=300, **FAST).set_random_state(4)
    output = transform(image)
    assert 0.2 <= transform.scatter_to_primary <= 0.8
    expected = simulate_cbct(
        image[0].numpy(),
        (4.0, 5.0),
        seed=transform.seed,
        scatter_to_primary=transform.scatter_to_primary,
        fov_diameter_mm=300,
        **FAST,
    )
    assert isinstance(output, MetaTensor) and output.shape == image.shape
    np.testing.assert_allclose(output[0].numpy(), expected, atol=1e-4)
    assert torch.equal(output.affine, image.affine)
    assert output.meta[SCATTER_META_KEY] == transform.scatter_to_primary
    assert SCATTER_META_KEY not in image.meta  # the input is not modified


def test_random_state_makes_pipelines_reproducible_and_calls_differ():
    image = ct_image()
    first = SimulateCBCT((0.2, 0.8), **FAST).set_random_state(0)
    second = SimulateCBCT((0.2, 0.8), **FAST).set_random_state(0)
    a1, b1 = first(image), second(image)
    assert torch.equal(a1, b1)
    a2 = first(image)
    assert not torch.equal(a1, a2)


def test_fixed_scatter_and_plain_arrays_need_spacing():
    image = ct_image()[:, :, :, :1].numpy()
    with pytest.raises(DRDDInputError, match="no pixel spacing"):
        SimulateCBCT(0.5, **FAST)(image)
    transform = SimulateCBCT(0.5, spacing_mm=(4.0, 5.0), **FAST).set_random_state(1)
    output = transform(image)
    assert isinstance(output, np.ndarray) and output.shape == image.shape
    expected = simulate_cbct(image[0], (4.0, 5.0), seed=transform.seed, scatter_to_primary=0.5, **FAST)
    np.testing.assert_allclose(output[0], expected, atol=1e-4)


@pytest.mark.parametrize("ratio", [-0.1, (0.8, 0.2), (0.1, 0.2, 0.3)])
def test_bad_scatter_is_refused(ratio):
    with pytest.raises(DRDDInputError, match="scatter_to_primary"):
        SimulateCBCT(ratio)


def test_non_ct_input_error_names_the_file():
    image = ct_image()
    mr = MetaTensor(image.as_tensor() + 1000, affine=image.affine, meta={"filename_or_obj": "/data/case3_ct.nii.gz"})
    with pytest.raises(DRDDInputError, match="case3_ct.nii.gz: does not look like CT"):
        SimulateCBCT(0.5, **FAST)(mr)


def test_dictionary_twin_equals_the_array_transform_and_writes_the_pair():
    image = ct_image()
    data = {"ct": image, "ct_copy": image.clone(), "case_id": "case3"}
    transform = SimulateCBCTd(["ct", "ct_copy"], (0.2, 0.8), output_key=["cbct", "cbct_copy"], **FAST)
    out = transform.set_random_state(2)(data)
    assert out["ct"] is image and out["case_id"] == "case3"
    assert torch.equal(out["cbct"], out["cbct_copy"])  # same image, same scatter and seed
    array = SimulateCBCT((0.2, 0.8), **FAST).set_random_state(2)
    assert torch.equal(out["cbct"], array(image))
    assert out["cbct"].meta[SCATTER_META_KEY] == array.scatter_to_primary
    composed = Compose([SimulateCBCTd("ct", (0.2, 0.8), output_key="cbct", **FAST)]).set_random_state(5)(data)
    assert set(composed) == {"ct", "ct_copy", "case_id", "cbct"} and not torch.equal(composed["cbct"], image)


def test_dictionary_twin_replaces_in_place_and_tolerates_missing_keys():
    image = ct_image()
    out = SimulateCBCTD("ct", 0.5, **FAST)({"ct": image})
    assert out["ct"].meta[SCATTER_META_KEY] == 0.5
    with pytest.raises(KeyError):
        SimulateCBCTd(["ct", "cbct"], 0.5, **FAST)({"ct": image})
    out = SimulateCBCTDict(["ct", "cbct"], 0.5, allow_missing_keys=True, **FAST)({"ct": image})
    assert set(out) == {"ct"}
    with pytest.raises(DRDDInputError, match="output_key"):
        SimulateCBCTd(["ct", "cbct"], 0.5, output_key="out")
