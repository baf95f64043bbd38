"""The CT prior (drdd_med.prior): its pooled data leaves every held-out case out, and a DRDD model
takes the prior's noise network only when it fits, keeping it through residual-only training."""

import copy

import pytest
import torch
from model_fixtures import make_real_networks

from drdd_med import prior as prior_module
from drdd_med.diffusion import DRDDSchedule
from drdd_med.engines import DRDDTrainer
from drdd_med.errors import DRDDInputError
from drdd_med.handlers import EMAHandler
from drdd_med.networks import DRDDNetworks, RegressionNetworks
from drdd_med.prior import pooled_datalists, weights_digest, with_noise_prior


def save_prior(path, seed=1, noise_iterations=7, fixed_noise_step=None, **kwargs):
    """A 'trained' prior: tiny networks with real weights, saved as training saves a checkpoint's EMA."""
    model = make_real_networks(seed=seed, **kwargs)
    model.trained_iterations.update(residual=0, noise=noise_iterations)
    model.schedule = DRDDSchedule(fixed_noise_step=fixed_noise_step).settings()
    torch.save({"network_ema": model.state_dict(), "network": model.state_dict()}, path)
    return model


# --- loading a prior --------------------------------------------------------------------------------


def test_the_prior_s_noise_network_is_loaded_and_nothing_else(tmp_path):
    prior = save_prior(tmp_path / "prior.pt")
    model = make_real_networks(seed=2)
    residual_before = copy.deepcopy(model.residual.state_dict())
    assert weights_digest(model.noise) != weights_digest(prior.noise)

    loaded = with_noise_prior(model, tmp_path / "prior.pt", DRDDSchedule())

    assert loaded is model
    for name, value in prior.noise.state_dict().items():
        assert torch.equal(model.noise.state_dict()[name], value), name
    for name, value in residual_before.items():
        assert torch.equal(model.residual.state_dict()[name], value), name
    assert model.trained_iterations == {"residual": 0, "noise": 7}  # the sampler may now run the noise stage
    shared = model.record["noise_prior"]
    assert shared["noise_weights_sha256"] == weights_digest(prior.noise)
    assert shared["trained_iterations"] == 7


def test_no_prior_leaves_the_model_as_it_is(tmp_path):
    model = make_real_networks(seed=2)
    before = weights_digest(model)
    for path in (None, ""):
        assert with_noise_prior(model, path) is model
    assert weights_digest(model) == before and "noise_prior" not in model.record


def test_weights_digest_reads_values_not_memory_layout():
    model = make_real_networks(seed=3)
    digest = weights_digest(model)
    assert weights_digest(copy.deepcopy(model).to(memory_format=torch.channels_last)) == digest
    changed = copy.deepcopy(model)
    with torch.no_grad():
        changed.noise.out[-1].conv.bias[0] += 1e-6
    assert weights_digest(changed) != digest


@pytest.mark.parametrize("case, message", [
    ("untrained", "never trained"),
    ("other_preset", "built as"),
    ("conditional_prior", "not a CT prior"),
    ("lower_noise_levels", "noise levels up to step 0"),
    ("other_schedule", "another diffusion schedule"),
    ("conditional_model", "cannot be shared"),
    ("regression_model", "DRDD models only"),
])
def test_a_prior_that_does_not_fit_is_refused(tmp_path, case, message):
    path = tmp_path / "prior.pt"
    model, schedule = make_real_networks(seed=2), DRDDSchedule()
    if case == "untrained":
        save_prior(path, noise_iterations=0)
    elif case == "other_preset":
        save_prior(path, preset="cpu-demo")
    elif case == "conditional_prior":
        save_prior(path, noise_conditional=True)
    elif case == "lower_noise_levels":
        save_prior(path, fixed_noise_step=0)
    elif case == "other_schedule":
        save_prior(path)
        schedule = DRDDSchedule(beta_end=0.03)
    elif case == "conditional_model":
        save_prior(path)
        model = make_real_networks(seed=2, noise_conditional=True)
    else:
        save_prior(path)
        model = RegressionNetworks.from_preset("tiny")
    before = weights_digest(model)
    with pytest.raises(DRDDInputError, match=message):
        with_noise_prior(model, path, schedule)
    assert weights_digest(model) == before  # refused before anything was loaded


def test_a_prior_trained_to_the_top_level_serves_a_lower_fixed_noise_level(tmp_path):
    save_prior(tmp_path / "prior.pt")  # learned every level up to T - 1
    model = with_noise_prior(make_real_networks(seed=2), tmp_path / "prior.pt", DRDDSchedule(fixed_noise_step=200))
    assert model.trained_iterations["noise"] == 7


def test_residual_only_training_keeps_the_shared_noise_network_exactly(tmp_path):
    prior = save_prior(tmp_path / "prior.pt")
    model = with_noise_prior(DRDDNetworks.from_preset("tiny"), tmp_path / "prior.pt", DRDDSchedule())
    ema = copy.deepcopy(model)
    g = torch.Generator().manual_seed(0)
    paired = [{"source": torch.rand(2, 1, 8, 8, generator=g) * 2 - 1, "target": torch.rand(2, 1, 8, 8, generator=g) * 2 - 1}
              for _ in range(4)]
    residual_before = weights_digest(model.residual)
    trainer = DRDDTrainer("cpu", 2, model, residual_optimizer=torch.optim.Adam(model.residual.parameters(), 1e-3),
                          paired_loader=paired, stages=("residual",),
                          train_handlers=[EMAHandler(model, ema, decay=0.9, every=1)])
    trainer.run()
    assert weights_digest(model.residual) != residual_before  # it did train
    assert weights_digest(model.noise) == weights_digest(ema.noise) == weights_digest(prior.noise)
    assert ema.record["noise_prior"]["noise_weights_sha256"] == weights_digest(prior.noise)
    assert model.trained_iterations == {"residual": 8, "noise": 7}


# --- the pooled data ---------------------------------------------------------------------------------


def _datalists(pool, validation):
    return {"paired": [], "pool": [{"case_id": c, "target": f"/{c}.nii.gz"} for c in pool],
            "validation": [{"case_id": c} for c in validation]}


def test_the_pool_leaves_out_every_case_any_bundle_holds_out(monkeypatch, tmp_path):
    bundles = {
        "a.json": ("drdd_ldct", _datalists(["1", "2", "3"], ["4"])),
        "b.json": ("drdd_cbct2ct", _datalists(["1", "2", "4"], ["3"])),  # same case names, another split
    }
    monkeypatch.setattr(prior_module, "_bundle_datalists", lambda source: bundles[source])
    (tmp_path / "extra").mkdir()
    for name in ("4", "9"):
        (tmp_path / "extra" / f"{name}.nii.gz").write_bytes(b"")

    pooled = pooled_datalists(["a.json", "b.json"], pool_dir=tmp_path / "extra")

    assert pooled["paired"] == [] and pooled["validation"] == []
    names = [item["case_id"] for item in pooled["pool"]]
    assert names == ["drdd_ldct/1", "drdd_ldct/2", "drdd_cbct2ct/1", "drdd_cbct2ct/2", "9"]
    assert pooled["pool"][0]["target"] == "/1.nii.gz"


def test_an_empty_pool_is_refused(monkeypatch):
    monkeypatch.setattr(prior_module, "_bundle_datalists", lambda source: ("x", _datalists(["1"], ["1"])))
    with pytest.raises(DRDDInputError, match="pool is empty"):
        pooled_datalists(["x.json"])
    with pytest.raises(DRDDInputError, match="at least one bundle"):
        pooled_datalists([])


def test_a_missing_source_config_is_named(tmp_path):
    with pytest.raises(DRDDInputError, match="train.json: no such training config file"):
        pooled_datalists([str(tmp_path / "train.json")])
