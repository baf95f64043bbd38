"""One CT prior shared across the bundles, through the commands the README gives: the prior trains on
the pooled training CT of all three bundles (``configs/ct_prior.json``), each bundle trains its
residual network on it (``configs/shared_ct_prior.json``), and every model carries the same noise
network, which the bundles' inference accepts for DRDD's two-stage sampler."""

from pathlib import Path

import pytest
from config_errors import config_error
from monai.bundle import ConfigParser
from test_config_fragments import documented_training_combinations

from drdd_med.errors import DRDDInputError
from drdd_med.networks import load_model
from drdd_med.prior import weights_digest

ROOT = Path(__file__).resolve().parents[2]
PRIOR_COMMAND = ("bundles/drdd_mr2ct/configs/train.json", "configs/ct_prior.json")
SHARED_COMMANDS = {
    "drdd_mr2ct": ("bundles/drdd_mr2ct/configs/train.json", "configs/shared_ct_prior.json"),
    "drdd_ldct": ("bundles/drdd_ldct/configs/train.json", "bundles/drdd_ldct/configs/two_stage.json",
                  "configs/shared_ct_prior.json"),
    "drdd_cbct2ct": ("bundles/drdd_cbct2ct/configs/train.json", "bundles/drdd_cbct2ct/configs/two_stage.json",
                     "configs/shared_ct_prior.json"),
}
# tiny networks, a few iterations, EMA every iteration (so the saved EMA weights are trained ones)
TINY = {"network_preset": "tiny", "patches_per_volume": 2, "max_epochs": 1, "train#trainer#epoch_length": 3,
        "train#handlers#0#every": 1, "val_interval": 10**9}
# small demo data and a cheaper simulated CBCT scanner, per bundle (drdd_mr2ct's demo is small already)
DATA = {
    "drdd_mr2ct": {"num_validation": 2},
    "drdd_ldct": {"num_validation": 2, "demo_cases": 5, "demo_shape": [64, 64, 8], "demo_spacing": [3.0, 3.0, 12.0]},
    "drdd_cbct2ct": {"num_validation": 2, "demo_cases": 4, "demo_shape": [64, 64, 8], "demo_spacing": [3.0, 3.0, 12.0],
                     "cbct_parameters": {"n_views": 164, "fov_diameter_mm": 250.0}},
}


def train(files, settings):
    parser = ConfigParser()
    parser.read_config([str(ROOT / f) for f in files])
    parser.update(settings)
    parser.get_parsed_content("initialize")
    parser.get_parsed_content("train#trainer").run()
    return parser


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """The prior, trained on the three bundles' pooled CT, and each bundle's model trained on it."""
    tmp = tmp_path_factory.mktemp("ct_prior")
    roots = {bundle: tmp / bundle for bundle in DATA}
    sources = [{"config_file": str(ROOT / SHARED_COMMANDS[b][0]), "bundle_root": str(roots[b]), **DATA[b]} for b in DATA]
    prior = train(PRIOR_COMMAND, {**TINY, "bundle_root": str(tmp / "prior"), "ckpt_dir": str(tmp / "prior" / "models"),
                                  "prior_sources": sources})
    prior_path = tmp / "prior" / "models" / "checkpoint_final.pt"
    models = {}
    for bundle, files in SHARED_COMMANDS.items():
        parser = train(files, {**TINY, **DATA[bundle], "bundle_root": str(roots[bundle]), "noise_prior": str(prior_path)})
        models[bundle] = {"parser": parser, "checkpoint": roots[bundle] / "models" / "checkpoint_final.pt"}
    return {"prior": prior, "prior_path": prior_path, "roots": roots, "models": models}


def test_the_readmes_give_these_commands():
    documented = {files for files in documented_training_combinations() if "ct_prior" in " ".join(files)}
    assert documented == {PRIOR_COMMAND, *SHARED_COMMANDS.values()}


def test_the_prior_learns_the_noise_stage_from_every_bundle_s_training_ct_only(shared):
    parser = shared["prior"]
    pool = parser.get_parsed_content("datalists")["pool"]
    by_bundle = {b: {item["case_id"].split("/", 1)[1] for item in pool if item["case_id"].startswith(f"{b}/")}
                 for b in DATA}
    assert all(by_bundle.values()), by_bundle
    for bundle in DATA:  # no case a bundle is scored on, under any bundle's name
        held_out = {item["case_id"] for item in shared["models"][bundle]["parser"].get_parsed_content("datalists")["validation"]}
        assert held_out and not held_out & set().union(*by_bundle.values()), (bundle, held_out)
    model = load_model(shared["prior_path"])
    assert model.trained_iterations == {"residual": 0, "noise": 3}


def test_every_bundle_s_model_carries_the_one_shared_noise_network(shared):
    prior = load_model(shared["prior_path"])
    digest = weights_digest(prior.noise)
    for bundle, trained in shared["models"].items():
        model = load_model(trained["checkpoint"])  # the EMA weights, as inference reads them
        assert weights_digest(model.noise) == digest, bundle
        assert model.record["noise_prior"]["noise_weights_sha256"] == digest
        assert model.trained_iterations == {"residual": 3, "noise": 3}, bundle
        assert weights_digest(model.residual) != weights_digest(prior.residual)  # its own residual network


@pytest.mark.parametrize("bundle", sorted(SHARED_COMMANDS))
def test_the_bundle_s_two_stage_inference_accepts_the_shared_model(shared, bundle):
    files = ["inference.json"] + (["two_stage.json"] if bundle != "drdd_mr2ct" else [])
    parser = ConfigParser()
    parser.read_config([str(ROOT / "bundles" / bundle / "configs" / f) for f in files])
    parser.update({**DATA[bundle], "bundle_root": str(shared["roots"][bundle]),
                   "ckpt_path": str(shared["models"][bundle]["checkpoint"])})
    sampler = parser.get_parsed_content("sampler")
    assert sampler.noise_steps == 2
    network = parser.get_parsed_content("network")  # checks the sampler against the stages the model trained
    assert weights_digest(network.noise) == weights_digest(load_model(shared["prior_path"]).noise)


def test_a_bundle_refuses_a_prior_of_another_network_size(shared, tmp_path):
    root = shared["roots"]["drdd_mr2ct"]
    parser = ConfigParser()
    parser.read_config([str(ROOT / f) for f in SHARED_COMMANDS["drdd_mr2ct"]])
    parser.update({**TINY, **DATA["drdd_mr2ct"], "network_preset": "cpu-demo", "bundle_root": str(root),
                   "ckpt_dir": str(tmp_path), "noise_prior": str(shared["prior_path"])})
    cause = config_error(parser, "network")
    assert isinstance(cause, DRDDInputError) and "built as" in str(cause)
