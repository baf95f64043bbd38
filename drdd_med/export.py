"""Export a trained model's networks as TorchScript (and ONNX) files that run without drdd_med.

A drdd_med model is one or two networks plus a sampler: DRDD's residual and noise networks, the
conditional DDIM's denoising network, or the regression U-Net. ``export_model`` writes one file per
trained network and format, each checked against the eager network, and a ``manifest.json``:

- ``NAME.ts``: TorchScript. MONAI's ``DiffusionModelUNet`` does not script (its spatial attention
  reshapes with ``*shape[:2]``), so diffusion networks are *traced*. A trace records the export
  device as a constant (the timestep embedding's ``arange``), so a file traced on the CPU runs on
  the CPU; it keeps sizes symbolic, so it accepts any batch and any spatial size that is a multiple
  of the size divisor, and the check runs it at two such shapes. The regression model (``RegressionNetworks``,
  its residual learning included) is *scripted*, so it runs on any device.
- ``NAME.onnx``: ONNX (``torch.onnx.export``, dynamic batch and spatial sizes), checked with ONNX
  Runtime on the CPU; written only when ``onnx``, ``onnxscript`` and ``onnxruntime`` are installed
  (``pip install "drdd-med[export]"``) and the network exports.
- ``manifest.json``: the model record (what ``RecordedModel.get_extra_state`` holds: architecture,
  stages trained, validation sampler, schedule, normalisations; never paths), each file's input
  signature, its sha256 and its measured difference from eager, and the versions that exported it.

The sampler is not exported: it is a few lines of arithmetic per step around the network calls
(``drdd_med.diffusion``), and the manifest holds its settings. A network whose stage was never
trained is left out (it would return its zero initialisation), and the manifest says so.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import logging
import warnings
from pathlib import Path

import torch
from monai.networks.nets import DiffusionModelUNet

from drdd_med import __version__
from drdd_med.data.files import atomic_output_dir
from drdd_med.errors import DRDDInputError
from drdd_med.networks import RecordedModel, load_model

logger = logging.getLogger(__name__)

TOLERANCE = 1e-4
"""Largest accepted ``max |exported − eager|``, in the network's output units (normalised images in
[−1, 1], where 1e-4 is 0.2 HU, or unit-variance noise); fp32 exports differ by about 1e-6."""

MANIFEST_NAME = "manifest.json"
EXPORT_FORMAT = 1
ONNX_PACKAGES = ("onnx", "onnxscript", "onnxruntime")


class ExportCheckError(ValueError):
    """An exported file that fails on a valid input or differs from the eager network by more than the tolerance."""


class OnnxConversionError(Exception):
    """``torch.onnx.export`` cannot convert a network; the export goes on without that ONNX file."""


def network_signatures(model: RecordedModel) -> dict[str, dict]:
    """What each network of ``model`` reads and returns, by network name (a stage of the model).

    Inputs are normalised images, channels first, of any batch and of spatial sizes that are
    multiples of ``size_divisor``; a diffusion network also takes a float32 time per batch item in
    ``time_range`` (``net(x, time)``), the regression model none (``net(x)``).
    """
    common = {"spatial_dims": model.spatial_dims, "size_divisor": model.size_divisor,
              "output_channels": model.image_channels}
    steps = (getattr(model, "schedule", None) or {}).get("num_train_timesteps", 1000)
    if model.method == "drdd":
        residual_time = {"takes_time": True, "time": "tau = a_t * T", "time_range": [0, steps]}
        noise_time = {"takes_time": True, "time": "tau = sigma_t * T", "time_range": [0, steps]}
        noise_input = "concat(y_t, source)" if model.noise_conditional else "y_t"
        return {
            "residual": {**common, "input_channels": model.residual.in_channels,
                         "input": "concat(x_t, source[, context slices])", **residual_time,
                         "output": "the residual r = source - target"},
            "noise": {**common, "input_channels": model.noise.in_channels, "input": noise_input, **noise_time,
                      "output": "the noise epsilon"},
        }
    if model.method == "cddim":
        output = "the noise epsilon" if model.prediction == "epsilon" else "the clean image y"
        return {"denoise": {**common, "input_channels": model.denoise.in_channels,
                            "input": "concat(y_t, source[, context slices])", "takes_time": True,
                            "time": "the DDPM step t", "time_range": [0, steps - 1], "output": output}}
    output = "the target image (source + predicted residual)" if model.residual else "the target image"
    return {"regression": {**common, "input_channels": model.image_channels * model.context_slices,
                           "input": "concat(source[, context slices])", "takes_time": False, "output": output}}


def _network(model: RecordedModel, name: str) -> torch.nn.Module:
    """The module exported as ``name``: the regression model itself (its ``forward`` adds the residual)."""
    return model if model.method == "regression" else getattr(model, name)


def check_inputs(signature: dict, device, seed: int = 0) -> list[tuple[torch.Tensor, ...]]:
    """Two seeded inputs of valid, different shapes: batch 2 at twice the size divisor, batch 1 at 3, 4, 5 times.

    The first is also the example a trace or an ONNX export records (a size of one divisor would be
    taken for a constant by ``torch.export``).
    """
    generator = torch.Generator().manual_seed(seed)
    divisor, dims = signature["size_divisor"], signature["spatial_dims"]
    inputs = []
    for batch, sizes in ((2, [2] * dims), (1, [3, 4, 5][:dims])):
        x = torch.randn(batch, signature["input_channels"], *(divisor * s for s in sizes), generator=generator)
        if signature["takes_time"]:
            low, high = signature["time_range"]
            args = (x, low + (high - low) * torch.rand(batch, generator=generator))
        else:
            args = (x,)
        inputs.append(tuple(a.to(device) for a in args))
    return inputs


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@torch.no_grad()
def check_exported(file_name: str, exported, network: torch.nn.Module, inputs: list[tuple[torch.Tensor, ...]],
                   tolerance: float = TOLERANCE) -> dict:
    """Run ``exported`` (returning tensors or arrays) and ``network`` on each of ``inputs``; the check's record.

    Raises ``ExportCheckError`` when ``exported`` fails on an input, returns another shape, or differs
    from ``network`` by more than ``tolerance`` (``max |exported − network|``).
    """
    worst = 0.0
    for args in inputs:
        shape = list(args[0].shape)
        expected = network(*args).float().cpu()
        try:
            got = torch.as_tensor(exported(*args)).float().cpu()
        except Exception as err:  # e.g. a conversion that froze a size: the error is the runtime's, of any type
            raise ExportCheckError(f"{file_name}: fails on a valid input of shape {shape} "
                                   f"({type(err).__name__}); nothing was written") from err
        if got.shape != expected.shape:
            raise ExportCheckError(f"{file_name}: returns shape {list(got.shape)} for input {shape}, the network "
                                   f"{list(expected.shape)}; nothing was written")
        worst = max(worst, float((got - expected).abs().max()))
    if not worst <= tolerance:  # also refuses NaN
        raise ExportCheckError(f"{file_name}: exported outputs differ from the eager network's by up to "
                               f"{worst:.3g}, more than the tolerance {tolerance:g}; nothing was written")
    logger.info("%s: max |exported - eager| %.2g", file_name, worst)
    return {"checked_shapes": [list(args[0].shape) for args in inputs], "max_abs_difference": worst}


def export_torchscript(network: torch.nn.Module, name: str, signature: dict, folder: Path, device,
                       tolerance: float = TOLERANCE) -> dict:
    """Write ``folder/NAME.ts``, check it as reloaded from disk, and return its manifest entry."""
    inputs = check_inputs(signature, device)
    if isinstance(network, DiffusionModelUNet):
        with warnings.catch_warnings():
            # the Python values a trace freezes (MONAI's input checks) would show in the check at a second shape,
            # which replaces the trace's own check (a rerun at the example shape)
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            converted = torch.jit.trace(network, inputs[0], check_trace=False)
        conversion, runs_on = "trace", str(torch.device(device))
    else:
        converted, conversion, runs_on = torch.jit.script(network), "script", "any"
    path = folder / f"{name}.ts"
    torch.jit.save(converted, str(path))
    check = check_exported(path.name, torch.jit.load(str(path), map_location=device), network, inputs, tolerance)
    return {"file": path.name, "network": name, "format": "torchscript", "conversion": conversion,
            "device": runs_on, **check, "sha256": _sha256(path)}


def missing_onnx_packages() -> list[str]:
    """Those of ``ONNX_PACKAGES`` that cannot be imported (exporting needs the first two, checking the last)."""
    missing = []
    for package in ONNX_PACKAGES:
        try:
            importlib.import_module(package)
        except ImportError:
            missing.append(package)
    return missing


@contextlib.contextmanager
def _quiet_onnx_exporter():
    """Hide the exporter's warnings and its notes (ops of packages drdd_med never uses, each graph rewrite)."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "onnxscript", "onnx_ir")]
    levels = [each.level for each in loggers]
    for each in loggers:
        each.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for each, level in zip(loggers, levels):
            each.setLevel(level)


def export_onnx(network: torch.nn.Module, name: str, signature: dict, folder: Path,
                tolerance: float = TOLERANCE) -> dict:
    """Write ``folder/NAME.onnx`` from ``network`` (on the CPU), check it with ONNX Runtime, return its entry.

    Batch and spatial sizes stay dynamic (multiples of the size divisor). Raises ``OnnxConversionError``
    with the exporter's first line when it cannot convert the network.
    """
    import onnx
    import onnxruntime

    inputs = check_inputs(signature, "cpu")
    batch = torch.export.Dim("batch", min=1)
    image = {0: batch, **{2 + i: signature["size_divisor"] * torch.export.Dim(f"n{i}", min=1)
                          for i in range(signature["spatial_dims"])}}
    names = ["x", "time"] if signature["takes_time"] else ["x"]
    dynamic = (image, {0: batch}) if signature["takes_time"] else (image,)
    path = folder / f"{name}.onnx"
    try:
        with _quiet_onnx_exporter():
            torch.onnx.export(network, inputs[0], str(path), input_names=names, output_names=["prediction"],
                              dynamic_shapes=dynamic, dynamo=True, external_data=False, verbose=False)
    except Exception as err:  # the exporter raises many types; each means this network does not convert
        path.unlink(missing_ok=True)
        lines = str(err).strip().splitlines()
        raise OnnxConversionError(f"torch.onnx.export failed: {lines[0] if lines else type(err).__name__}") from err
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    check = check_exported(path.name, lambda *args: session.run(None, {n: a.numpy() for n, a in zip(names, args)})[0],
                           network, inputs, tolerance)
    opset = next(o.version for o in onnx.load(str(path), load_external_data=False).opset_import if o.domain == "")
    return {"file": path.name, "network": name, "format": "onnx", "opset": opset, "input_names": names,
            "device": "any", **check, "sha256": _sha256(path)}


def _versions(onnx_used: bool) -> dict:
    import monai

    packages = {"drdd_med": __version__, "torch": torch.__version__, "monai": monai.__version__}
    if onnx_used:
        packages.update({p: importlib.import_module(p).__version__ for p in ONNX_PACKAGES})
    return packages


def _only_an_export(folder: Path) -> None:
    """Refuse to replace anything but an earlier export (``--overwrite`` must not remove an unrelated folder)."""
    try:
        manifest = json.loads((folder / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        manifest = None
    if not isinstance(manifest, dict) or "export_format" not in manifest:
        raise DRDDInputError(f"{folder.name}: exists and is not a drdd-med export (no {MANIFEST_NAME}); "
                             "not replacing it, choose another output folder")


def export_model(model_path, out_dir, *, overwrite: bool = False, onnx: bool = True, device="cpu",
                 tolerance: float = TOLERANCE) -> dict:
    """Export the trained networks of the model in ``model_path`` to the new folder ``out_dir``; return its manifest.

    ``model_path``: a ``model.pt`` or training checkpoint, read by ``load_model`` (``weights_only``).
    ``onnx``: also write ONNX files where the packages are installed and the network exports.
    ``device``: where TorchScript traces run (and so where traced files run). The folder appears
    complete or not at all; an existing one is replaced only with ``overwrite``, and only if it is an
    earlier export. Raises ``ExportCheckError`` when a file differs from eager by more than ``tolerance``.
    """
    model = load_model(model_path, map_location=device).eval()
    signatures = network_signatures(model)
    skipped = [{"what": f"{name} network", "why": "its stage was never trained (0 iterations): it would return "
                "its initialisation"} for name in signatures if not model.trained_iterations[name]]
    names = [name for name in signatures if model.trained_iterations[name]]
    if not names:
        raise DRDDInputError(f"{Path(model_path).name}: none of its networks was trained; nothing to export")
    missing = missing_onnx_packages() if onnx else []
    if not onnx:
        skipped.append({"what": "ONNX files", "why": "not asked for"})
    elif missing:
        skipped.append({"what": "ONNX files", "why": f"{', '.join(missing)} not installed "
                        "(pip install \"drdd-med[export]\")"})
    files = []
    with atomic_output_dir(out_dir, overwrite, check_replaceable=_only_an_export) as staging:
        for name in names:
            files.append(export_torchscript(_network(model, name), name, signatures[name], staging, device, tolerance))
        if onnx and not missing:
            model.cpu()
            for name in names:
                try:
                    files.append(export_onnx(_network(model, name), name, signatures[name], staging, tolerance))
                except OnnxConversionError as err:
                    skipped.append({"what": f"{name}.onnx", "why": str(err)})
        manifest = {
            "export_format": EXPORT_FORMAT,
            "method": model.method,
            "model": model.get_extra_state(),
            "source_sha256": _sha256(Path(model_path)),
            "signatures": {name: signatures[name] for name in names},
            "files": files,
            "skipped": skipped,
            "tolerance": tolerance,
            "exported_with": _versions(any(f["format"] == "onnx" for f in files)),
        }
        (staging / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest
