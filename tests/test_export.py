"""``drdd_med.export`` and ``drdd-med export``: exported networks reproduce eager ones; the folder is safe to write.

The models are tiny networks re-initialised from a seed (``model_fixtures``): an untrained MONAI
diffusion U-Net outputs exactly 0, and an export of it would match eager whatever it did.
"""

import hashlib
import json
import sys

import numpy as np
import pytest
import torch
from model_fixtures import make_real_networks

from drdd_med.cli import main
from drdd_med.errors import OutputExistsError
from drdd_med.export import MANIFEST_NAME, TOLERANCE, export_model
from drdd_med.networks import ConditionalDiffusionNetworks, RegressionNetworks, load_model, seeded_initialisation

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")  # TorchScript is what is asked for


def _save(model, path, untrained=()):
    """``model`` saved as training saves ``model.pt``, every stage trained except ``untrained``."""
    model.trained_iterations.update({stage: 0 if stage in untrained else 10 for stage in model.stages})
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture
def residual_only(tmp_path):
    """A tiny DRDD ``model.pt`` whose noise stage was never trained: one network to export, the cheapest run."""
    return _save(make_real_networks(), tmp_path / "model.pt", untrained=("noise",))


def _inputs(signature, batch, multiples, seed):
    """Seeded inputs of ``signature``'s shape: spatial sizes ``size_divisor × multiples``."""
    generator = torch.Generator().manual_seed(seed)
    shape = (batch, signature["input_channels"], *(signature["size_divisor"] * m for m in multiples))
    x = torch.randn(shape, generator=generator)
    return (x, torch.rand(batch, generator=generator) * signature["time_range"][1]) if signature["takes_time"] else (x,)


def _eager(model, name):
    return model if model.method == "regression" else getattr(model, name)


# Two shapes each, other than the ones the export checks itself (batch 2 at 2 divisors, batch 1 at 3, 4, 5).
MODELS = {
    "drdd-2d": (make_real_networks, [(3, (4, 1)), (1, (3, 6))]),
    "drdd-3d": (lambda: make_real_networks(spatial_dims=3), [(1, (2, 3, 4)), (2, (4, 2, 1))]),
    "cddim": (lambda: seeded_initialisation(ConditionalDiffusionNetworks.from_preset("tiny", prediction="sample")),
              [(3, (4, 1)), (1, (3, 6))]),
    "regression": (lambda: seeded_initialisation(RegressionNetworks.from_preset("tiny", residual=True)),
                   [(3, (1, 4)), (1, (3, 2))]),
}


@pytest.mark.parametrize("kind", MODELS)
def test_torchscript_files_match_eager_at_two_sizes(tmp_path, kind):
    build, shapes = MODELS[kind]
    model = build().eval()
    path = _save(model, tmp_path / "model.pt")
    manifest = export_model(path, tmp_path / "export", onnx=False)

    assert [f["file"] for f in manifest["files"]] == [f"{stage}.ts" for stage in model.stages]
    for name, signature in manifest["signatures"].items():
        exported = torch.jit.load(str(tmp_path / "export" / f"{name}.ts"))
        for seed, (batch, multiples) in enumerate(shapes):
            args = _inputs(signature, batch, multiples, seed)
            with torch.no_grad():
                expected, got = _eager(model, name)(*args), exported(*args)
            assert expected.abs().mean() > 1e-2, "the eager network returns (almost) nothing"
            assert got.shape == expected.shape
            assert (got - expected).abs().max() <= TOLERANCE, (name, args[0].shape)


def test_onnx_files_match_eager_at_two_sizes_and_untrained_stages_are_left_out(tmp_path, residual_only):
    for package in ("onnx", "onnxscript", "onnxruntime"):
        pytest.importorskip(package)
    import onnxruntime

    model = load_model(residual_only)
    manifest = export_model(residual_only, tmp_path / "export")

    assert sorted(f["file"] for f in manifest["files"]) == ["residual.onnx", "residual.ts"]
    assert manifest["skipped"][0]["what"] == "noise network" and "never trained" in manifest["skipped"][0]["why"]
    session = onnxruntime.InferenceSession(str(tmp_path / "export" / "residual.onnx"))
    for seed, (batch, multiples) in enumerate([(3, (4, 1)), (1, (3, 6))]):
        x, time = _inputs(manifest["signatures"]["residual"], batch, multiples, seed)
        with torch.no_grad():
            expected = model.residual(x, time).numpy()
        got = session.run(None, {"x": x.numpy(), "time": time.numpy()})[0]
        assert np.abs(expected).mean() > 1e-2
        assert np.abs(got - expected).max() <= TOLERANCE


def test_cli_manifest_describes_the_files_without_paths(tmp_path, capsys):
    record = {"source_normalisation": {"method": "RobustNormalize", "percentiles": [0.5, 99.5]}}
    model_path = _save(make_real_networks(record=record), tmp_path / "bundle" / "models" / "model.pt")
    out = tmp_path / "export"
    assert main(["export", str(model_path), str(out), "--no-onnx"]) == 0

    printed = capsys.readouterr().out
    assert "TorchScript residual.ts, noise.ts" in printed and "not written: ONNX files: not asked for" in printed
    text = (out / MANIFEST_NAME).read_text()
    manifest = json.loads(text)
    assert manifest["model"] == json.loads(json.dumps(load_model(model_path).get_extra_state()))
    assert manifest["model"]["record"] == record and manifest["model"]["architecture"]["method"] == "drdd"
    assert manifest["signatures"]["residual"] == {
        "spatial_dims": 2, "size_divisor": 2, "input_channels": 2, "output_channels": 1, "takes_time": True,
        "input": "concat(x_t, source[, context slices])", "time": "tau = a_t * T", "time_range": [0, 1000],
        "output": "the residual r = source - target"}
    assert manifest["signatures"]["noise"]["input_channels"] == 1
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST_NAME, "noise.ts", "residual.ts"]
    for entry in manifest["files"]:
        channels = manifest["signatures"][entry["network"]]["input_channels"]
        assert entry["checked_shapes"] == [[2, channels, 4, 4], [1, channels, 6, 8]]
        assert entry["sha256"] == hashlib.sha256((out / entry["file"]).read_bytes()).hexdigest()
        assert entry["max_abs_difference"] <= manifest["tolerance"] == TOLERANCE
    assert manifest["source_sha256"] == hashlib.sha256(model_path.read_bytes()).hexdigest()
    assert {"torch", "monai", "drdd_med"} <= set(manifest["exported_with"])
    assert str(tmp_path) not in text and "bundle" not in text and "model.pt" not in text


def test_cli_says_why_no_onnx_file_was_written(tmp_path, residual_only, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnx", None)  # as if not installed
    assert main(["export", str(residual_only), str(tmp_path / "export")]) == 0

    printed = capsys.readouterr().out
    assert "not written: ONNX files: onnx" in printed and 'pip install "drdd-med[export]"' in printed
    assert not list((tmp_path / "export").glob("*.onnx"))


def test_a_network_onnx_cannot_convert_is_reported_and_torchscript_still_written(tmp_path, residual_only, monkeypatch):
    for package in ("onnx", "onnxscript", "onnxruntime"):
        pytest.importorskip(package)

    def refuse(*args, **kwargs):
        raise RuntimeError("Failed to export the model with torch.export.\ndetails")

    monkeypatch.setattr(torch.onnx, "export", refuse)
    manifest = export_model(residual_only, tmp_path / "export")

    assert [f["file"] for f in manifest["files"]] == ["residual.ts"]
    assert {"what": "residual.onnx", "why": "torch.onnx.export failed: Failed to export the model with torch.export."} \
        in manifest["skipped"]
    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == [MANIFEST_NAME, "residual.ts"]


def test_cli_refuses_to_overwrite_unless_asked_and_only_an_export(tmp_path, residual_only, capsys):
    model_path, out = residual_only, tmp_path / "export"
    assert main(["export", str(model_path), str(out), "--no-onnx"]) == 0
    first = (out / MANIFEST_NAME).read_bytes()

    assert main(["export", str(model_path), str(out), "--no-onnx"]) == 2
    assert "export: output exists already; pass --overwrite" in capsys.readouterr().err
    with pytest.raises(OutputExistsError):
        export_model(model_path, out, onnx=False)
    assert (out / MANIFEST_NAME).read_bytes() == first

    (out / "residual.ts").write_bytes(b"stale")
    assert main(["export", str(model_path), str(out), "--no-onnx", "--overwrite"]) == 0
    assert (out / "residual.ts").read_bytes() != b"stale"

    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    assert main(["export", str(model_path), str(other), "--no-onnx", "--overwrite"]) == 2
    assert "notes: exists and is not a drdd-med export" in capsys.readouterr().err
    assert [p.name for p in other.iterdir()] == ["keep.txt"]


@pytest.mark.parametrize("content, message", [
    (None, "missing.pt: no checkpoint at this path"),
    ({"weight": torch.ones(2)}, "missing.pt: no drdd_med model record"),
    (b"not a checkpoint", "missing.pt: not a readable weights file"),
])
def test_cli_bad_model_file_is_a_clear_error(tmp_path, capsys, content, message):
    path = tmp_path / "missing.pt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        torch.save(content, path)

    assert main(["export", str(path), str(tmp_path / "export")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "export").exists()


def test_cli_fails_and_writes_nothing_when_an_exported_file_differs(tmp_path, residual_only, capsys, monkeypatch):
    load = torch.jit.load

    def load_perturbed(*args, **kwargs):  # the file on disk computes something else than the network
        module = load(*args, **kwargs)
        with torch.no_grad():
            dict(module.named_parameters())["out.2.conv.bias"].add_(1e-3)  # the output layer's bias
        return module

    monkeypatch.setattr(torch.jit, "load", load_perturbed)
    assert main(["export", str(residual_only), str(tmp_path / "export"), "--no-onnx"]) == 2

    assert "residual.ts: exported outputs differ from the eager network's by up to 0.001" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]  # no output, no staging folder left
