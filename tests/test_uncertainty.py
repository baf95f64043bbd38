"""Uncertainty from several DRDD samples: the inferer's mean and std, their HU mapping, the writer's
std map and preview, and the calibration script's measures on data with a known answer.

Networks have real outputs (``real_networks``: every layer seeded); MONAI's untrained networks
return 0 and every sample would then differ by its start noise alone.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
import torch

from drdd_med.diffusion import DRDDSampler, DRDDSchedule
from drdd_med.engines import DRDDEvaluator
from drdd_med.errors import OutputExistsError
from drdd_med.handlers import SyntheticCTWriter
from drdd_med.handlers import writer as writer_module
from drdd_med.inferers import DRDDInferer, bind_networks
from drdd_med.networks import RegressionNetworks, seeded_initialisation
from drdd_med.transforms import CT_HU_RANGE

SCHEDULE = DRDDSchedule()
HU_PER_UNIT = (CT_HU_RANGE[1] - CT_HU_RANGE[0]) / 2  # NormalizeHU maps [-1, 1] linearly onto the CT range
ROOT = Path(__file__).resolve().parents[1]


def recorded_samples(inferer: DRDDInferer, volume, net) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """``inferer.mean_and_std`` and every sample it drew, in order."""
    samples, translate = [], inferer._translate

    def record(*args):
        samples.append(translate(*args))
        return samples[-1]

    inferer._translate = record
    with torch.no_grad():
        mean, std = inferer.mean_and_std(volume, net)
    return mean, std, samples


def test_samples_differ_and_mean_and_std_are_theirs(real_networks):
    net = real_networks()
    volume = torch.rand(1, 1, 19, 12, 5) * 2 - 1  # padded to the network multiple and cropped back
    mean, std, samples = recorded_samples(DRDDInferer(slice_batch_size=2, seed=5, num_samples=4), volume, net)
    assert len(samples) == 4 and mean.shape == std.shape == volume.shape
    for j in range(4):
        for k in range(j):
            assert (samples[j] - samples[k]).abs().mean() > 0.05, (j, k)  # each sample has its own noise
    stacked = torch.stack(samples).double()
    torch.testing.assert_close(mean, stacked.mean(0).float(), rtol=0, atol=1e-6)
    torch.testing.assert_close(std, stacked.std(0, correction=1).float(), rtol=0, atol=1e-6)
    assert float(std.min()) >= 0 and float(std.mean()) > 0.05


def test_3d_samples_share_the_sliding_window_path_and_differ(real_networks):
    net = real_networks(spatial_dims=3)
    volume = torch.rand(1, 1, 12, 10, 9) * 2 - 1
    mean, std, samples = recorded_samples(DRDDInferer(roi_size=(8, 8, 8), sw_batch_size=2, seed=1, num_samples=2),
                                          volume, net)
    with torch.no_grad():
        one = DRDDInferer(roi_size=(8, 8, 8), sw_batch_size=2, seed=1)(volume, net)
    assert torch.equal(samples[0], one) and (samples[1] - samples[0]).abs().mean() > 0.05
    torch.testing.assert_close(std, (samples[1] - samples[0]).abs() / 2**0.5, rtol=0, atol=1e-6)
    torch.testing.assert_close(mean, (samples[0] + samples[1]) / 2, rtol=0, atol=1e-6)


def test_the_same_seed_gives_the_same_mean_and_std_and_another_seed_others(real_networks):
    net = real_networks()
    volume = torch.rand(1, 1, 16, 16, 4) * 2 - 1
    with torch.no_grad():
        mean, std = DRDDInferer(slice_batch_size=4, seed=3, num_samples=3).mean_and_std(volume, net)
        mean2, std2 = DRDDInferer(slice_batch_size=1, seed=3, num_samples=3).mean_and_std(volume, net)
        mean3, std3 = DRDDInferer(slice_batch_size=4, seed=4, num_samples=3).mean_and_std(volume, net)
    torch.testing.assert_close(mean2, mean, rtol=0, atol=1e-5)  # batching changes rounding only
    torch.testing.assert_close(std2, std, rtol=0, atol=1e-5)
    assert (mean3 - mean).abs().mean() > 0.02 and (std3 - std).abs().mean() > 0.02
    with torch.no_grad():
        again = DRDDInferer(slice_batch_size=4, seed=3, num_samples=3).mean_and_std(volume, net)
    assert torch.equal(again[0], mean) and torch.equal(again[1], std)


def test_one_sample_is_the_single_noise_draw_of_the_seed_bit_for_bit(real_networks):
    """S = 1 (and sample 1 of S > 1) is the method's sample from ``randn(draws, Z, C, X, Y)`` of ``seed``."""
    net = real_networks()
    volume = torch.rand(1, 1, 16, 16, 3) * 2 - 1  # a multiple of the network's divisor: no padding
    sampler = DRDDSampler(SCHEDULE, eta=0.5, residual_steps=3)  # start noise and η noise both drawn
    source = volume[0].movedim(-1, 0)
    noise = torch.randn((sampler.num_noise_draws, *source.shape), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        expected = sampler.sample(source, *bind_networks(net, source), noise=list(noise)).movedim(0, -1)[None]
        one = DRDDInferer(sampler, slice_batch_size=3, seed=7)(volume, net)
        mean, std = DRDDInferer(sampler, slice_batch_size=3, seed=7).mean_and_std(volume, net)
    _, _, samples = recorded_samples(DRDDInferer(sampler, slice_batch_size=3, seed=7, num_samples=2), volume, net)
    assert torch.equal(one, expected) and torch.equal(mean, expected) and std is None
    assert torch.equal(samples[0], expected)


def test_a_model_whose_output_cannot_vary_runs_once_and_has_std_exactly_zero(real_networks):
    net = real_networks()
    volume = torch.rand(1, 1, 16, 16, 3) * 2 - 1
    calls = []
    hook = net.residual.register_forward_hook(lambda module, args, out: calls.append(1))
    deterministic = DRDDSampler(SCHEDULE, eta=0.0, start_scale=0.0)
    with torch.no_grad():
        once = DRDDInferer(deterministic, slice_batch_size=3)(volume, net)
        one_pass = len(calls)
        mean, std = DRDDInferer(deterministic, slice_batch_size=3, num_samples=5).mean_and_std(volume, net)
        assert len(calls) == 2 * one_pass  # one more pass, not five
        # η noise alone makes the output vary: then every sample is drawn
        _, eta_std = DRDDInferer(DRDDSampler(SCHEDULE, eta=1.0, start_scale=0.0), slice_batch_size=3,
                                 num_samples=2).mean_and_std(volume, net)
    hook.remove()
    assert torch.equal(mean, once) and torch.equal(std, torch.zeros_like(once))
    assert float(eta_std.mean()) > 1e-3

    regression = seeded_initialisation(RegressionNetworks.from_preset("tiny"), 0).eval()
    regression_calls = []
    regression.register_forward_hook(lambda module, args, out: regression_calls.append(1))
    volume = torch.rand(1, 1, 32, 32, 3) * 2 - 1  # the regression U-Net's smallest level needs 32 px
    with torch.no_grad():
        mean, std = DRDDInferer(slice_batch_size=3, num_samples=4).mean_and_std(volume, regression)
    assert len(regression_calls) == 1 and torch.equal(std, torch.zeros_like(mean))


def test_num_samples_must_be_a_positive_integer():
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match="num_samples must be an integer of at least 1"):
            DRDDInferer(num_samples=bad)


def test_evaluator_gives_the_mean_in_hu_and_the_std_scaled_by_the_hu_slope(real_networks):
    net = real_networks()
    source = torch.rand(1, 1, 16, 16, 3) * 2 - 1
    inferer = DRDDInferer(slice_batch_size=3, seed=2, num_samples=3)
    with torch.no_grad():
        mean, std = inferer.mean_and_std(source, net)
    evaluator = DRDDEvaluator("cpu", [{"source": source, "case_id": ["c1"]}], net, inferer, precision="fp32")
    evaluator.run()
    out = evaluator.state.output
    torch.testing.assert_close(out["pred"], ((mean + 1) * HU_PER_UNIT + CT_HU_RANGE[0]).clamp(*CT_HU_RANGE))
    torch.testing.assert_close(out["pred_std"], std * HU_PER_UNIT)  # a spread: the slope alone, no offset
    assert float(out["pred_std"].mean()) > 50

    single = DRDDEvaluator("cpu", [{"source": source, "case_id": ["c1"]}], net, DRDDInferer(slice_batch_size=3),
                           precision="fp32")
    single.run()
    assert "pred_std" not in single.state.output


def writer_output(seed: int = 0, std: bool = True) -> dict:
    generator = torch.Generator().manual_seed(seed)
    shape = (1, 1, 12, 10, 6)
    affine = torch.tensor([[2.0, 0, 0, -10], [0, 2.0, 0, 5], [0, 0, 3.0, 7], [0, 0, 0, 1]], dtype=torch.float64)
    output = {"pred": torch.rand(shape, generator=generator) * 2000 - 1000, "source": torch.rand(shape),
              "case_id": "case1", "affine": affine}
    if std:
        output["pred_std"] = torch.rand(shape, generator=generator) * 80
    return output


def write(writer: SyntheticCTWriter, output: dict) -> None:
    writer(SimpleNamespace(state=SimpleNamespace(output=output)))


def test_writer_writes_the_std_map_and_its_preview_before_the_synthetic_ct(tmp_path, monkeypatch):
    order = []
    for name in ("write_volume", "save_std_preview", "save_translation_preview"):
        original = getattr(writer_module, name)

        def recorder(*args, _original=original, _name=name, **kwargs):
            order.append(Path(args[2] if _name == "write_volume" else args[0]).name)  # the file it writes
            return _original(*args, **kwargs)

        monkeypatch.setattr(writer_module, name, recorder)
    output = writer_output()
    write(SyntheticCTWriter(str(tmp_path)), output)
    case = tmp_path / "case1"
    assert order[-1] == "sct.nii.gz" and set(order) == {"preview.png", "std_preview.png", "sct_std.nii.gz",
                                                          "sct.nii.gz"}
    std, sct = nib.load(case / "sct_std.nii.gz"), nib.load(case / "sct.nii.gz")
    assert std.get_data_dtype() == np.float32 and sct.get_data_dtype() == np.int16
    np.testing.assert_array_equal(std.affine, output["affine"].numpy())
    np.testing.assert_array_equal(std.affine, sct.affine)
    np.testing.assert_array_equal(np.asarray(std.dataobj), output["pred_std"][0, 0].numpy())
    assert (case / "std_preview.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_writer_refuses_a_finished_case_and_redoes_a_crashed_one_once(tmp_path, monkeypatch):
    writer = SyntheticCTWriter(str(tmp_path))
    case = tmp_path / "case1"
    original = writer_module.write_volume

    def crash_on_sct(volume, affine, path, **kwargs):
        if Path(path).name == "sct.nii.gz":
            raise RuntimeError("killed")
        return original(volume, affine, path, **kwargs)

    monkeypatch.setattr(writer_module, "write_volume", crash_on_sct)
    with pytest.raises(RuntimeError, match="killed"):
        write(writer, writer_output(seed=0))
    assert (case / "sct_std.nii.gz").exists() and not (case / "sct.nii.gz").exists()
    assert writer.pending([{"case_id": "case1"}]) == [{"case_id": "case1"}]  # not finished: redone

    monkeypatch.setattr(writer_module, "write_volume", original)
    rerun = writer_output(seed=1)
    write(writer, rerun)  # the crashed case's std map is replaced, the case finished
    np.testing.assert_array_equal(np.asarray(nib.load(case / "sct_std.nii.gz").dataobj), rerun["pred_std"][0, 0])
    assert writer.pending([{"case_id": "case1"}]) == []

    stamps = {p.name: p.stat().st_mtime_ns for p in case.iterdir()}
    with pytest.raises(OutputExistsError, match="case case1: a synthetic CT exists already"):
        write(writer, writer_output(seed=2))
    assert {p.name: p.stat().st_mtime_ns for p in case.iterdir()} == stamps  # nothing of it touched

    write(SyntheticCTWriter(str(tmp_path), overwrite=True), writer_output(seed=3, std=False))
    assert sorted(p.name for p in case.iterdir()) == ["preview.png", "sct.nii.gz"]  # no std of another run stays


def load_calibration_script():
    spec = importlib.util.spec_from_file_location("uncertainty_calibration", ROOT / "scripts" /
                                                  "uncertainty_calibration.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_calibration_measures_of_gaussian_errors_with_their_true_std():
    """Errors drawn from N(0, σ²) with the std map σ: 95.45 % within 2σ, and the Pearson correlation of
    σ with |error| that σ ~ U(a, b) gives in closed form; with σ halved, 68.3 % within 2·(σ/2)."""
    calibration = load_calibration_script()
    rng = np.random.default_rng(0)
    shape = (60, 60, 30)
    reference = np.full(shape, 40.0)
    reference[:20] = -800.0  # air
    reference[40:] = 1000.0  # bone
    mask = np.ones(shape)
    mask[:, :, :2] = 0  # outside the body
    low, high = 5.0, 60.0
    sigma = rng.uniform(low, high, shape)
    mean = reference + sigma * rng.standard_normal(shape)

    rows = calibration.calibration_metrics(mean, sigma, reference, mask)
    assert rows["body"]["voxels"] == int(mask.sum()) == sum(rows[t]["voxels"] for t in ("air", "soft_tissue", "bone"))
    e_sigma, var_sigma = (low + high) / 2, (high - low) ** 2 / 12
    abs_z = math.sqrt(2 / math.pi)  # E|z|
    pearson = abs_z * var_sigma / math.sqrt(var_sigma * (var_sigma + e_sigma**2 - abs_z**2 * e_sigma**2))
    for region in ("body", "air", "soft_tissue", "bone"):
        assert rows[region]["within_2std"] == pytest.approx(0.9545, abs=0.006), region
        assert rows[region]["pearson"] == pytest.approx(pearson, abs=0.02), region
        assert 0.2 < rows[region]["spearman"] < 0.6, region
    halved = calibration.calibration_metrics(mean, sigma / 2, reference, mask)
    assert halved["body"]["within_2std"] == pytest.approx(0.6827, abs=0.006)

    flat = calibration.calibration_metrics(mean, np.full(shape, 10.0), reference, mask)
    assert flat["body"]["pearson"] is None and flat["body"]["spearman"] is None  # a constant map: undefined
    no_bone = calibration.calibration_metrics(mean, sigma, np.minimum(reference, 100.0), mask)
    assert no_bone["bone"] == {"voxels": 0, "pearson": None, "spearman": None, "within_2std": None}
    means = calibration.mean_over_cases([{"regions": rows}, {"regions": no_bone}])
    assert means["bone"]["within_2std"]["cases"] == 1
    assert means["body"]["within_2std"]["mean"] == pytest.approx(
        (rows["body"]["within_2std"] + no_bone["body"]["within_2std"]) / 2)


def test_bundle_inference_with_num_samples_writes_the_mean_and_the_std_map(tmp_path):
    from model_fixtures import save_model
    from monai.bundle import ConfigParser

    from drdd_med.data.demo import generate_head_phantom
    from drdd_med.data.writers import write_volume

    phantom = generate_head_phantom(1, (32, 32, 6), (6.0, 6.0, 18.0))
    write_volume(np.rint(phantom["mr"]), phantom["affine"], tmp_path / "mr" / "case1.nii.gz", dtype=np.float32)
    outputs = {}
    for num_samples in (1, 2):
        parser = ConfigParser()
        parser.read_config(str(ROOT / "bundles" / "drdd_mr2ct" / "configs" / "inference.json"))
        parser.update({"bundle_root": str(ROOT / "bundles" / "drdd_mr2ct"),
                       "ckpt_path": str(save_model(tmp_path / "model.pt")), "device": "$torch.device('cpu')",
                       "input": str(tmp_path / "mr"), "output_dir": str(tmp_path / f"eval{num_samples}"),
                       "num_samples": num_samples})
        parser.get_parsed_content("run")
        outputs[num_samples] = sorted(p.name for p in (tmp_path / f"eval{num_samples}" / "case1").iterdir())
    assert outputs == {1: ["preview.png", "sct.nii.gz"],
                       2: ["preview.png", "sct.nii.gz", "sct_std.nii.gz", "std_preview.png"]}
    std = nib.load(tmp_path / "eval2" / "case1" / "sct_std.nii.gz")
    np.testing.assert_array_equal(std.affine, nib.load(tmp_path / "eval2" / "case1" / "sct.nii.gz").affine)
    assert std.get_data_dtype() == np.float32 and float(np.asarray(std.dataobj).mean()) > 1
