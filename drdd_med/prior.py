"""One CT prior for every task that ends in CT: a noise network trained once, shared by the bundles.

DRDD's noise stage only ever sees target images, so one noise network trained on the pooled CT of
several tasks can serve them all (the method page's "unified" claim): MR -> CT, CBCT -> CT and
low-dose CT -> CT then differ in their residual networks alone.

- ``pooled_datalists``: the prior's training data, the training CT of each listed bundle (read
  through the bundle's own ``train.json``, so its split, demo data and simulated inputs are exactly
  the bundle's) plus any folder of unpaired CT. Every case a bundle holds out is left out of the pool,
  under every bundle: the demo bundles share case names (the CBCT and low-dose demos simulate from the
  same phantoms), and a prior must never have seen a case a task is scored on.
- ``with_noise_prior``: a DRDD model whose noise network is the prior's, checked to fit (same
  architecture, unconditional, trained, on a schedule that covers the model's noise levels). The
  model record keeps the digest of the shared weights, so any two models can be shown to share one.

``configs/ct_prior.json`` trains the prior; ``configs/shared_ct_prior.json`` trains a bundle's
residual network on it.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from drdd_med.errors import DRDDInputError
from drdd_med.networks import DRDDNetworks, load_model

logger = logging.getLogger(__name__)

def _bundle_datalists(source: str | os.PathLike | dict) -> tuple[str, dict]:
    """A bundle's name and the datalists its training config builds. ``source``: the config file (a
    bundle's ``configs/train.json``), or a dict with ``config_file`` and config values to set, e.g.
    ``{"config_file": ".../train.json", "dataset_dir": "/data/synthrad/Task2"}``."""
    from monai.bundle import ConfigParser

    settings = {"config_file": str(source)} if not isinstance(source, dict) else dict(source)
    config_file = Path(settings.pop("config_file", ""))
    if not config_file.is_file():
        raise DRDDInputError(f"CT prior source {config_file.name or repr(source)}: no such training config file")
    parser = ConfigParser()
    parser.read_config(str(config_file))
    parser.update(settings)
    return Path(parser.get_parsed_content("bundle_root")).name, parser.get_parsed_content("datalists")


def pooled_datalists(sources: Sequence[str | os.PathLike | dict], pool_dir: str | os.PathLike | None = None) -> dict:
    """The datalists of a CT prior (``paired`` and ``validation`` empty; ``pool``: the CT it learns from).

    ``sources``: bundles' training configs (see ``_bundle_datalists``). ``pool`` holds every CT that
    each trains its noise stage on, named ``<bundle>/<case>``, and every image under ``pool_dir``; a
    case any bundle holds out is left out wherever it appears.
    """
    from drdd_med.data.datalists import target_pool

    if not sources and pool_dir is None:
        raise DRDDInputError("a CT prior needs at least one bundle or a pool_dir to learn from")
    per_bundle = [_bundle_datalists(source) for source in sources]
    held_out = {item["case_id"] for _, datalists in per_bundle for item in datalists["validation"]}
    pool, left_out = [], 0
    for name, datalists in per_bundle:
        kept = [item for item in datalists["pool"] if item["case_id"] not in held_out]
        left_out += len(datalists["pool"]) - len(kept)
        pool += [{"case_id": f"{name}/{item['case_id']}", "target": item["target"]} for item in kept]
        logger.info("CT prior: %d CT from %s", len(kept), name)
    if pool_dir is not None:
        extra = [item for item in target_pool(pool_dir) if item["case_id"] not in held_out]
        pool += extra
        logger.info("CT prior: %d CT from the pool folder", len(extra))
    if not pool:
        raise DRDDInputError("the CT prior's pool is empty: every CT of its sources is held out by one of them")
    logger.info("CT prior: %d CT in the pool, %d left out as held out by a bundle", len(pool), left_out)
    return {"paired": [], "pool": pool, "validation": []}


def weights_digest(module: torch.nn.Module) -> str:
    """sha256 of ``module``'s tensors (name, dtype, shape, values): equal digests, equal networks."""
    digest = hashlib.sha256()
    for name, value in sorted(module.state_dict().items()):
        if torch.is_tensor(value):
            tensor = value.detach().cpu()  # the values in their logical order, whatever the memory format
            digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
            digest.update(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _check_schedule(name: str, prior: dict | None, schedule) -> None:
    """The prior's noise network learned the levels up to its fixed noise step: refuse a model that needs more."""
    if schedule is None or prior is None:
        return
    mine = schedule.settings()
    table = {k: v for k, v in prior.items() if k != "fixed_noise_step"}
    if table != {k: v for k, v in mine.items() if k != "fixed_noise_step"}:
        raise DRDDInputError(f"{name}: the prior was trained on another diffusion schedule ({prior}, here {mine})")
    if prior["fixed_noise_step"] < mine["fixed_noise_step"]:
        raise DRDDInputError(f"{name}: the prior's noise network learned noise levels up to step "
                             f"{prior['fixed_noise_step']}, this model's noise stage starts at step "
                             f"{mine['fixed_noise_step']}; train the prior with fixed_noise_step "
                             f"{mine['fixed_noise_step']} or higher")


def with_noise_prior(model, path: str | os.PathLike | None, schedule=None):
    """``model`` with the noise network of the DRDD model saved at ``path`` (``None`` or ``""``: unchanged).

    The prior must be a DRDD model with an unconditional noise network of the same build, trained
    (``trained_iterations["noise"] > 0``), on ``schedule``'s tables up to at least its fixed noise
    step. The noise stage's iteration count comes with the weights; the record gains ``noise_prior``
    (the weights' digest, the prior's iterations and record).
    """
    if path is None or str(path) == "":
        return model
    name = Path(path).name
    if not isinstance(model, DRDDNetworks):
        raise DRDDInputError(f"{name}: a noise prior serves DRDD models only; this is a {model.method} model")
    if model.noise_conditional:
        raise DRDDInputError(f"{name}: this model's noise network sees the source (noise_conditional), so it is "
                             "task-specific and cannot be shared; set noise_conditional to False")
    prior = load_model(path)
    if not isinstance(prior, DRDDNetworks) or prior.noise_conditional:
        raise DRDDInputError(f"{name}: not a CT prior (a DRDD model with an unconditional noise network)")
    built = {k: prior.architecture[k] for k in ("spatial_dims", "image_channels", "noise")}
    wanted = {k: model.architecture[k] for k in ("spatial_dims", "image_channels", "noise")}
    if built != wanted:
        raise DRDDInputError(f"{name}: the prior's noise network was built as {built}, this model's as {wanted}; "
                             "use the same network preset and spatial dimensions")
    if not prior.trained_iterations["noise"]:
        raise DRDDInputError(f"{name}: the prior's noise network was never trained")
    _check_schedule(name, prior.schedule, schedule)
    model.noise.load_state_dict(prior.noise.state_dict())
    model.trained_iterations["noise"] = prior.trained_iterations["noise"]
    model.record = {**model.record, "noise_prior": {
        "noise_weights_sha256": weights_digest(model.noise),
        "trained_iterations": prior.trained_iterations["noise"],
        "record": prior.record,
    }}
    logger.info("noise network from the CT prior %s (%d iterations)", name, prior.trained_iterations["noise"])
    return model
