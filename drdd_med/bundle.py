"""Translate one volume with a MONAI bundle, running exactly the objects of its inference config.

The bundle's ``configs/inference.json`` is parsed once; its ``network``, ``inferer`` and the
``preprocessing`` transforms after ``LoadImaged`` are used as they are, and HU come out as
``DRDDEvaluator`` makes them (``drdd_med.engines.prediction_to_hu``: the mean clamped to the CT range,
the std of several samples scaled alone). A volume read from DICOM therefore goes through the same
model code as a NIfTI file run by ``monai.bundle run``.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch
from monai.bundle import ConfigParser
from monai.data import MetaTensor
from monai.transforms import Compose, LoadImaged
from monai.utils import convert_to_tensor

from drdd_med.engines import autocast_context, prediction_to_hu
from drdd_med.errors import DRDDInputError
from drdd_med.transforms import NormalizeHU
from drdd_med.transforms.dictionary import CASE_KEY

INFERENCE_CONFIG = Path("configs") / "inference.json"
METADATA = Path("configs") / "metadata.json"
# Bundles found by name: ./bundles/NAME, then the bundles shipped beside the package source.
BUNDLE_SEARCH_PATH = (Path("bundles"), Path(__file__).resolve().parents[1] / "bundles")


def resolve_bundle(bundle: str | os.PathLike) -> Path:
    """A bundle folder given by path, or by name (a folder under ``./bundles`` or the project's ``bundles``)."""
    path = Path(bundle)
    candidates = [path] if path.is_dir() or len(path.parts) > 1 else [root / path for root in BUNDLE_SEARCH_PATH]
    for candidate in candidates:
        if (candidate / INFERENCE_CONFIG).is_file():
            return candidate.resolve()
    raise FileNotFoundError(f"{bundle}: no bundle with {INFERENCE_CONFIG} (give a bundle folder or a name under bundles/)")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None``/``"auto"``: the first GPU when there is one, else the CPU; a name torch does not
    know, a device other than CPU/CUDA, or a CUDA device that is not there is a usage error."""
    if device is None or str(device) == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:  # not a device name torch knows
        resolved = None
    if resolved is None or resolved.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {str(device)!r}")
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {resolved} requested, but torch sees no CUDA GPU "
                         "(CUDA is not available on this machine)")
    return resolved


def _parsed(parser: ConfigParser, key: str):
    """A config item, with a user error (bad weights, bad value) raised as itself, not in MONAI's RuntimeError."""
    try:
        return parser.get_parsed_content(key)
    except RuntimeError as err:
        cause = err
        while cause.__cause__ is not None:
            cause = cause.__cause__
        if isinstance(cause, (ValueError, FileNotFoundError)):
            raise cause from None
        raise


def _file_digest(*paths: Path) -> str:
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


_TRANSLATORS: dict[tuple, "BundleTranslator"] = {}  # rebuilt translators, one per recipe in this process


def _rebuilt_translator(recipe: tuple, model_version: str) -> "BundleTranslator":
    """An unpickled ``BundleTranslator``: built once per process from its recipe, with the same weights."""
    if recipe not in _TRANSLATORS:
        bundle, device, ckpt, batch_size, num_samples = recipe
        _TRANSLATORS[recipe] = BundleTranslator(bundle, device=device, ckpt=ckpt, batch_size=batch_size,
                                                num_samples=num_samples)
    translator = _TRANSLATORS[recipe]
    if translator.model_version != model_version:
        raise DRDDInputError(f"the bundle {translator.model_name} here is version {translator.model_version}, not "
                             f"{model_version} as where the run started: give every machine the same weights and "
                             "inference config at the same path")
    return translator


class BundleTranslator:
    """Translate source volumes (e.g. MR) into synthetic CT in HU with a bundle's inference config.

    Args:
        bundle: bundle folder, or the name of one under ``bundles/``.
        device: ``"auto"`` (default: GPU when available), ``"cpu"``, ``"cuda:1"``...
        ckpt: weights file (default: the bundle's ``models/model.pt``); the networks are built from
            the model record it carries, so a model trained on any device runs on any other.
        batch_size: slices per network call (default: the config's ``slice_batch_size``, within its
            ``max_batch_pixels``).
        num_samples: samples per volume (default: the config's ``num_samples``); with more than one
            the synthetic CT is their mean, and ``translate_with_std`` gives their std too.

    ``model_name`` (the bundle folder's name) and ``model_version`` (the bundle's version and a
    digest of the weights and inference config, then ``.meanS`` for a mean of S > 1 samples)
    identify the model in the synthetic series and the job journal; other weights, sampler settings
    or numbers of samples give another version (and other series UIDs).

    A translator pickles as what builds it (bundle folder, weights path, device, batch size, samples) and
    its ``model_version``: another process (a Ray worker) rebuilds it once, on its own device, from
    the same paths, and refuses weights that differ there.
    """

    def __init__(
        self,
        bundle: str | os.PathLike = "drdd_mr2ct",
        *,
        device: str | torch.device | None = "auto",
        ckpt: str | os.PathLike | None = None,
        batch_size: int | None = None,
        num_samples: int | None = None,
    ):
        self.bundle_root = resolve_bundle(bundle)
        requested_device = str(device or "auto")
        self.device = resolve_device(device)
        parser = ConfigParser()
        parser.read_config(str(self.bundle_root / INFERENCE_CONFIG))
        parser["bundle_root"] = str(self.bundle_root)
        parser["device"] = f"$torch.device('{self.device}')"
        if ckpt is not None:
            parser["ckpt_path"] = str(Path(ckpt).resolve())
        if num_samples is not None:
            parser["num_samples"] = num_samples  # the config's inferer reads it (and checks it)
        weights = Path(_parsed(parser, "ckpt_path"))
        if not weights.is_file():
            raise FileNotFoundError(f"{weights.name}: the bundle has no trained weights here (train it or pass ckpt)")

        self.network = _parsed(parser, "network")
        self.network.eval()
        self.inferer = _parsed(parser, "inferer")
        self.inferer.progress = False  # batch conversions show one bar per run, not one per volume
        if batch_size is not None:
            if batch_size < 1:
                raise ValueError(f"batch_size must be at least 1, got {batch_size}")
            self.inferer.slice_batch_size = batch_size
            self.inferer.max_batch_pixels = None  # the batch asked for, whatever the slice size
        if num_samples is not None and self.inferer.num_samples != num_samples:
            raise ValueError(f"{INFERENCE_CONFIG} of {self.bundle_root.name} does not pass num_samples to its inferer")
        self.precision = _parsed(parser, "precision")
        preprocessing = _parsed(parser, "preprocessing")
        self.preprocessing = Compose([t for t in preprocessing.transforms if not isinstance(t, LoadImaged)])
        self.to_hu = NormalizeHU()  # the evaluator's HU mapping and range

        metadata = json.loads((self.bundle_root / METADATA).read_text())
        inputs = metadata.get("network_data_format", {}).get("inputs", {})
        self.source_modality = next(iter(inputs.values()), {}).get("modality")
        self.model_name = self.bundle_root.name
        digest = _file_digest(weights, self.bundle_root / INFERENCE_CONFIG)
        self.model_version = f"{metadata.get('version', '0')}+{digest[:12]}"
        if self.num_samples > 1:  # a mean of samples is another output than one sample
            self.model_version += f".mean{self.num_samples}"
        self._recipe = (str(self.bundle_root), requested_device, str(weights.resolve()), batch_size, num_samples)

    def __reduce__(self):
        return _rebuilt_translator, (self._recipe, self.model_version)

    @property
    def num_samples(self) -> int:
        """Samples per volume: more than one gives a mean synthetic CT and its per-voxel std."""
        return self.inferer.num_samples

    @property
    def model_id(self) -> str:
        return f"{self.model_name} {self.model_version}"

    def translate(self, volume: MetaTensor | torch.Tensor | np.ndarray, name: str = "case") -> np.ndarray:
        """Synthetic CT in HU (float32, ``volume``'s (i, j, k) grid) for a 3D source volume.

        ``name`` (a case label, never patient data) appears in the messages of refused volumes.
        """
        return self.translate_with_std(volume, name)[0]

    def translate_with_std(
        self, volume: MetaTensor | torch.Tensor | np.ndarray, name: str = "case"
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """``translate``'s synthetic CT and, with ``num_samples`` > 1, the per-voxel std over the samples
        in HU (float32, same grid; ``None`` for one sample)."""
        volume = volume if isinstance(volume, torch.Tensor) else torch.as_tensor(np.asarray(volume))
        data = self.preprocessing({"source": volume[None], CASE_KEY: name})
        source = convert_to_tensor(data["source"], track_meta=False)[None].to(self.device)  # (1, C, X, Y, Z)
        with torch.no_grad(), autocast_context(self.device, self.precision):
            mean, std = self.inferer.mean_and_std(source, self.network)
        hu, std_hu = prediction_to_hu(self.to_hu, mean, std)
        return hu[0, 0].cpu().numpy(), None if std_hu is None else std_hu[0, 0].cpu().numpy()
