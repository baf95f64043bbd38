"""``SimulateLowDose`` / ``SimulateLowDosed``: spacing from the affine, random dose and seed, reproducibility."""

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Compose

from drdd_med.errors import DRDDInputError
from drdd_med.ldct import FanBeamGeometry, simulate_low_dose
from drdd_med.transforms.ldct import (
    DOSE_META_KEY,
    SimulateLowDose,
    SimulateLowDoseD,
    SimulateLowDosed,
    SimulateLowDoseDict,
)

SCANNER = FanBeamGeometry(n_channels=184, detector_pitch_mm=4 * 1.2858, n_views=288)  # small and fast


def ct_image(spacing=(4.0, 5.0, 3.0)):
    """A channel-first body section (1, 48, 40, 2) in HU with an RAS affine of the given spacing."""
    x = (np.arange(48) - 23.5) * spacing[0]
    y = (np.arange(40) - 19.5) * spacing[1]
    body = np.add.outer((x / 80) ** 2, (y / 60) ** 2) < 1
    section = np.where(body, 40.0, -1000.0).astype(np.float32)
    volume = np.repeat(section[None, :, :, None], 2, axis=3)
    affine = torch.diag(torch.tensor([*spacing, 1.0], dtype=torch.float64))
    return MetaTensor(torch.from_numpy(volume), affine=affine, meta={"filename_or_obj": "/data/case3_ct.nii.gz"})


def test_array_transform_uses_the_affine_spacing_and_its_random_dose_and_seed():
    image = ct_image()
    transform = SimulateLowDose((0.1, 0.5), geometry=SCANNER).set_random_state(4)
    output = transform(image)
    assert 0.1 <= transform.dose <= 0.5
    expected = simulate_low_dose(image[0].numpy(), (4.0, 5.0), transform.dose, seed=transform.seed, geometry=SCANNER)
    assert isinstance(output, MetaTensor) and output.shape == image.shape
    np.testing.assert_allclose(output[0].numpy(), expected, atol=1e-4)
    assert torch.equal(output.affine, image.affine)
    assert output.meta[DOSE_META_KEY] == transform.dose
    assert DOSE_META_KEY not in image.meta  # the input is not modified


def test_random_state_makes_pipelines_reproducible_and_calls_differ():
    image = ct_image()
    first = SimulateLowDose((0.1, 0.5), geometry=SCANNER).set_random_state(0)
    second = SimulateLowDose((0.1, 0.5), geometry=SCANNER).set_random_state(0)
    a1, b1 = first(image), second(image)
    assert torch.equal(a1, b1)
    a2 = first(image)
    assert not torch.equal(a1, a2)


def test_fixed_dose_and_plain_arrays_need_spacing():
    image = ct_image()[:, :, :, :1].numpy()
    with pytest.raises(DRDDInputError, match="no pixel spacing"):
        SimulateLowDose(0.25, geometry=SCANNER)(image)
    output = SimulateLowDose(0.25, geometry=SCANNER, spacing_mm=(4.0, 5.0)).set_random_state(1)(image)
    assert isinstance(output, np.ndarray) and output.shape == image.shape
    assert np.abs(output - image).mean() > 0.5


@pytest.mark.parametrize("dose", [0.0, 1.2, (0.5, 0.1), (0.1, 0.2, 0.3)])
def test_bad_dose_is_refused(dose):
    with pytest.raises(DRDDInputError, match="dose_fraction"):
        SimulateLowDose(dose)


def test_non_ct_input_error_names_the_file():
    image = ct_image()
    mr = MetaTensor(image.as_tensor() + 1000, affine=image.affine, meta={"filename_or_obj": "/data/case3_ct.nii.gz"})
    with pytest.raises(DRDDInputError, match="case3_ct.nii.gz: does not look like CT"):
        SimulateLowDose(0.25, geometry=SCANNER)(mr)


def test_dictionary_twin_writes_the_pair_and_shares_dose_and_seed():
    image = ct_image()
    data = {"ct": image, "ct_copy": image.clone(), "case_id": "case3"}
    transform = SimulateLowDosed(["ct", "ct_copy"], (0.2, 0.4), output_key=["low", "low_copy"], geometry=SCANNER)
    out = Compose([transform.set_random_state(2)])(data)
    assert out["ct"] is image and out["case_id"] == "case3"
    assert torch.equal(out["low"], out["low_copy"])  # same image, same dose and seed
    assert 0.2 <= out["low"].meta[DOSE_META_KEY] <= 0.4
    assert not torch.equal(out["low"], image)


def test_dictionary_twin_replaces_in_place_and_tolerates_missing_keys():
    image = ct_image()
    out = SimulateLowDoseD("ct", 0.5, geometry=SCANNER)({"ct": image})
    assert out["ct"].meta[DOSE_META_KEY] == 0.5
    with pytest.raises(KeyError):
        SimulateLowDosed(["ct", "pet"], 0.5, geometry=SCANNER)({"ct": image})
    out = SimulateLowDoseDict(["ct", "pet"], 0.5, allow_missing_keys=True, geometry=SCANNER)({"ct": image})
    assert set(out) == {"ct"}
    with pytest.raises(DRDDInputError, match="output_key"):
        SimulateLowDosed(["ct", "pet"], 0.5, output_key="low")
