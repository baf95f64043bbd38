"""DRDDTrainer / DRDDEvaluator: both stages or either, the regression stage, EMA, resume at the same iteration."""

import copy

import pytest
import torch
import torch.nn.functional as F
from ignite.engine import Engine, Events
from monai.engines import Evaluator
from monai.handlers import CheckpointLoader, CheckpointSaver

from drdd_med import engines
from drdd_med.diffusion import DRDDSchedule, ddim_p_losses, residual_p_losses
from drdd_med.engines import DRDDEvaluator, DRDDTrainer, StageBatches, autocast_context, ensure_new_run
from drdd_med.errors import OutputExistsError
from drdd_med.handlers import EMAHandler, FinalValidationHandler, MaskedMAEHandler
from drdd_med.inferers import DRDDInferer
from drdd_med.networks import ConditionalDiffusionNetworks, DRDDNetworks, RegressionNetworks, seeded_initialisation


def _paired(n=3):
    g = torch.Generator().manual_seed(0)
    return [{"source": torch.rand(4, 1, 8, 8, generator=g) * 2 - 1, "target": torch.rand(4, 1, 8, 8, generator=g) * 2 - 1}
            for _ in range(n)]


def _pool(n=5):
    return [{"target": torch.rand(4, 1, 8, 8) * 2 - 1} for _ in range(n)]


def test_stage_batches_cycle_the_shorter_source():
    items = list(StageBatches([1, 2, 3], ["a", "b"]))
    assert [i["paired"] for i in items] == [1, 2, 3] and [i["pool"] for i in items] == ["a", "b", "a"]
    assert [i["pool"] for i in StageBatches(None, ["a", "b"])] == ["a", "b"]
    with pytest.raises(ValueError):
        StageBatches(None, None)


def _trainer(model, stages=("residual", "noise"), max_epochs=2, handlers=()):
    return DRDDTrainer(
        device="cpu", max_epochs=max_epochs, network=model,
        residual_optimizer=torch.optim.Adam(model.residual.parameters(), 1e-3),
        noise_optimizer=torch.optim.Adam(model.noise.parameters(), 1e-3),
        paired_loader=_paired(), pool_loader=_pool(), stages=stages, train_handlers=list(handlers),
    )


@pytest.mark.parametrize("stages", [("residual", "noise"), ("residual",), ("noise",)])
def test_trainer_updates_only_the_configured_stages(stages):
    torch.manual_seed(0)
    model = DRDDNetworks.from_preset("tiny")
    before = copy.deepcopy(model.state_dict())
    trainer = _trainer(model, stages, max_epochs=1)
    trainer.run()
    for role in ("residual", "noise"):
        changed = any(not torch.equal(before[k], v) for k, v in model.state_dict().items() if k.startswith(role))
        assert changed == (role in stages)
    assert set(trainer.state.output) == {"loss"} | {f"loss_{s}" for s in stages}
    assert trainer.state.iteration == (3 if "residual" in stages else 5)
    # the model record counts the iterations each stage was trained
    assert model.trained_iterations == {s: trainer.state.iteration if s in stages else 0 for s in ("residual", "noise")}
    assert model.schedule == DRDDSchedule().settings()  # and the schedule they were trained with


def test_trainer_records_a_lower_fixed_noise_level_in_the_model():
    model = DRDDNetworks.from_preset("tiny")
    DRDDTrainer("cpu", 1, model, torch.optim.Adam(model.residual.parameters()), None, _paired(), None,
                stages=("residual",), schedule=DRDDSchedule(fixed_noise_step=50))
    assert model.schedule["fixed_noise_step"] == 50


@pytest.mark.parametrize("native", [True, False])
def test_bf16_autocast_on_a_cpu_only_where_it_computes_bf16(monkeypatch, native):
    """The CPU profile asks for bf16: a CPU with AVX512-BF16 / AMX gets it, any other stays in fp32."""
    monkeypatch.setattr(engines, "cpu_bf16_native", lambda: native)
    x = torch.ones(4, 4)
    with autocast_context("cpu", "bf16"):
        assert (x @ x).dtype == (torch.bfloat16 if native else torch.float32)
    with autocast_context("cpu", "fp32"):
        assert (x @ x).dtype == torch.float32


def test_trainer_refuses_a_stage_without_its_data():
    model = DRDDNetworks.from_preset("tiny")
    with pytest.raises(ValueError, match="noise stage needs"):
        DRDDTrainer("cpu", 1, model, torch.optim.Adam(model.residual.parameters()), None, _paired(), None)
    with pytest.raises(ValueError, match="precision"):
        DRDDTrainer("cpu", 1, model, torch.optim.Adam(model.parameters()), torch.optim.Adam(model.parameters()),
                    _paired(), _pool(), precision="fp8")


def test_ema_tracks_the_network():
    torch.manual_seed(0)
    model = DRDDNetworks.from_preset("tiny")
    ema = copy.deepcopy(model)
    trainer = _trainer(model, max_epochs=4, handlers=[EMAHandler(model, ema, decay=0.5, every=1)])
    trainer.run()
    key = "residual.conv_in.conv.weight"
    assert not torch.equal(ema.state_dict()[key], model.state_dict()[key])
    assert (ema.state_dict()[key] - model.state_dict()[key]).abs().max() < 0.05
    assert ema.trained_iterations == model.trained_iterations == {"residual": 12, "noise": 12}  # the record follows


def test_a_run_shorter_than_the_ema_interval_saves_trained_weights_and_their_record():
    """A time budget ends training between EMA updates: the last iterations still reach the EMA model."""
    torch.manual_seed(0)
    model = DRDDNetworks.from_preset("tiny")
    ema = copy.deepcopy(model)
    initial = copy.deepcopy(model.state_dict())
    trainer = _trainer(model, max_epochs=1, handlers=[EMAHandler(model, ema, every=10)])
    # validating the EMA model records its sampler there, and the network's record must not erase it
    validated = DRDDInferer().sampler.settings()
    trainer.add_event_handler(Events.ITERATION_COMPLETED(once=1), lambda e: setattr(ema, "validation_sampler", validated))
    trainer.run()
    assert trainer.state.iteration == 3
    key = "residual.conv_in.conv.weight"
    trained = model.state_dict()[key]
    assert not torch.equal(trained, initial[key])
    torch.testing.assert_close(ema.state_dict()[key], 0.1 * initial[key] + 0.9 * trained)  # one warm-up update
    assert ema.trained_iterations == model.trained_iterations == {"residual": 3, "noise": 3}
    assert ema.validation_sampler == validated


@pytest.mark.parametrize(("max_epochs", "interval", "stop_at", "validated_at"), [
    (4, 2, None, [6, 12]),  # ends on an interval: nothing more
    (5, 2, None, [6, 12, 15]),  # max_epochs off the interval: the last weights too
    (5, 2, 7, [6, 7]),  # a time limit mid-epoch: the weights it stopped on
    (5, 2, 6, [6]),  # stopped right after a validation: not twice
    (3, 4, None, []),  # an interval longer than the run: validation off, as before
])
def test_final_validation_sees_the_weights_training_ends_with(max_epochs, interval, stop_at, validated_at):
    """3 iterations per epoch; the trainer iterations at which the validator ran."""
    trainer = Engine(lambda engine, batch: None)
    validator = Evaluator(device="cpu", val_data_loader=[0], iteration_update=lambda engine, batch: None)
    runs = []
    validator.add_event_handler(Events.COMPLETED, lambda _: runs.append(trainer.state.iteration))
    FinalValidationHandler(validator=validator, interval=interval, epoch_level=True).attach(trainer)
    if stop_at:
        trainer.add_event_handler(Events.ITERATION_COMPLETED(once=stop_at), lambda engine: engine.terminate())
    trainer.run(range(3), max_epochs=max_epochs)
    assert runs == validated_at


def test_resumed_run_continues_at_the_same_iteration(tmp_path):
    torch.manual_seed(0)
    model = DRDDNetworks.from_preset("tiny")
    ema = copy.deepcopy(model)
    trainer = _trainer(model, max_epochs=2, handlers=[EMAHandler(model, ema, every=1)])
    state = {"network": model, "network_ema": ema, "residual_optimizer": trainer.residual_optimizer,
             "noise_optimizer": trainer.noise_optimizer, "trainer": trainer}
    CheckpointSaver(str(tmp_path), state, save_final=True, final_filename="final.pt").attach(trainer)
    trainer.run()
    assert trainer.state.iteration == 6

    model2 = DRDDNetworks.from_preset("tiny")
    ema2 = copy.deepcopy(model2)
    trainer2 = _trainer(model2, max_epochs=3, handlers=[EMAHandler(model2, ema2, every=1)])
    state2 = {"network": model2, "network_ema": ema2, "residual_optimizer": trainer2.residual_optimizer,
              "noise_optimizer": trainer2.noise_optimizer, "trainer": trainer2}
    CheckpointLoader(str(tmp_path / "final.pt"), state2).attach(trainer2)
    first = []
    trainer2.add_event_handler(Events.ITERATION_STARTED(once=7), lambda e: first.append(copy.deepcopy(ema2.state_dict())))
    trainer2.run()
    assert trainer2.state.iteration == 9 and trainer2.state.epoch == 3
    assert model2.trained_iterations == ema2.trained_iterations == {"residual": 9, "noise": 9}  # counted on from 6
    # weights and EMA continued from the checkpoint, not from a fresh initialisation
    key = "noise.conv_in.conv.weight"
    assert torch.equal(first[0][key], ema.state_dict()[key])
    assert trainer2.residual_optimizer.state_dict()["state"]  # optimizer moments restored


def test_evaluator_reports_masked_mae_in_hu_on_whole_volumes():
    model = DRDDNetworks.from_preset("tiny")
    source = torch.rand(1, 1, 8, 8, 5) * 2 - 1
    target = torch.full((1, 1, 8, 8, 5), 40.0)
    mask = torch.ones(1, 1, 8, 8, 5)
    evaluator = DRDDEvaluator("cpu", [{"source": source, "target": target, "mask": mask, "case_id": ["c1"]}], model,
                              DRDDInferer(slice_batch_size=2), key_val_metric={"val_mae": MaskedMAEHandler()})
    evaluator.run()
    pred = evaluator.state.output["pred"]
    assert pred.shape == source.shape and float(pred.min()) >= -1024 and float(pred.max()) <= 3000
    expected = (pred - target).abs().mean().item()
    assert evaluator.state.metrics["val_mae"] == pytest.approx(expected, rel=1e-5)
    assert evaluator.state.output["case_id"] == "c1"
    assert model.validation_sampler == evaluator.inferer.sampler.settings()  # recorded with the model


def test_ensure_new_run_protects_a_trained_model(tmp_path):
    ensure_new_run(tmp_path)  # empty: fine
    (tmp_path / "model.pt").write_bytes(b"x")
    with pytest.raises(OutputExistsError, match="model.pt"):
        ensure_new_run(tmp_path)
    ensure_new_run(tmp_path, resume_from=str(tmp_path / "model.pt"))
    assert (tmp_path / "model.pt").exists()
    ensure_new_run(tmp_path, overwrite=True)
    assert not (tmp_path / "model.pt").exists()


# --- the regression baseline through the same trainer and evaluator -------------------------------


def _paired_with_context(n=3):
    """2.5D pairs: the source carries the centre slice, then its two neighbours (as RandPairedPatch stacks them)."""
    g = torch.Generator().manual_seed(1)
    return [{"source": torch.rand(2, 3, 32, 32, generator=g) * 2 - 1,
             "target": torch.rand(2, 1, 32, 32, generator=g) * 2 - 1} for _ in range(n)]


def test_trainer_trains_the_regression_u_net_with_l1_on_source_and_context():
    torch.manual_seed(0)
    model = RegressionNetworks.from_preset("tiny", context_slices=3)
    ema = copy.deepcopy(model)
    initial = copy.deepcopy(model)
    paired = _paired_with_context()
    trainer = DRDDTrainer("cpu", 2, model, paired_loader=paired, stages=["regression"], precision="fp32",
                          regression_optimizer=torch.optim.Adam(model.parameters(), 1e-3),
                          train_handlers=[EMAHandler(model, ema, decay=0.5, every=1)])
    first = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED(once=1), lambda e: first.append(e.state.output))
    trainer.run()
    # the loss of the first step is the L1 distance of the initial U-Net's prediction from all source channels
    expected = F.l1_loss(initial(paired[0]["source"]), paired[0]["target"])
    assert first[0]["loss_regression"] == pytest.approx(float(expected), rel=1e-5)
    assert set(trainer.state.output) == {"loss", "loss_regression"}
    assert any(not torch.equal(initial.state_dict()[k], v) for k, v in model.state_dict().items() if torch.is_tensor(v))
    assert model.trained_iterations == ema.trained_iterations == {"regression": 6}  # counted; the EMA's record follows


def test_trainer_refuses_stages_the_model_does_not_have():
    model = RegressionNetworks.from_preset("tiny")
    optimizer = torch.optim.Adam(model.parameters())
    with pytest.raises(ValueError, match=r"subset of the regression model's stages \('regression',\)"):
        DRDDTrainer("cpu", 1, model, optimizer, paired_loader=_paired(), stages=["residual"])
    with pytest.raises(ValueError, match="the regression stage needs a paired loader and a regression optimizer"):
        DRDDTrainer("cpu", 1, model, paired_loader=_paired())
    with pytest.raises(ValueError, match="the regression stage needs a paired loader"):
        DRDDTrainer("cpu", 1, model, pool_loader=_pool(), regression_optimizer=optimizer)
    drdd = DRDDNetworks.from_preset("tiny")
    with pytest.raises(ValueError, match="the drdd model's stages"):
        DRDDTrainer("cpu", 1, drdd, torch.optim.Adam(drdd.parameters()), paired_loader=_paired(), stages=["regression"])


def test_evaluator_translates_with_a_regression_model_and_records_no_sampler():
    model = RegressionNetworks.from_preset("tiny").eval()
    source = torch.rand(1, 1, 32, 32, 3) * 2 - 1
    evaluator = DRDDEvaluator("cpu", [{"source": source, "case_id": ["c1"]}], model, DRDDInferer(slice_batch_size=2),
                              precision="fp32")
    evaluator.run()
    pred = evaluator.state.output["pred"]
    with torch.no_grad():
        expected = model(source[0].movedim(-1, 0)).movedim(0, -1)[None]
    # in HU (about 2000 HU per normalised unit): equal up to float rounding of batched convolutions
    expected_hu = evaluator.to_hu.to_hu(expected).clamp(*evaluator.to_hu.hu_range)
    torch.testing.assert_close(pred, expected_hu, rtol=0, atol=0.01)
    assert model.validation_sampler is None  # a sampler never ran: the record must not claim one


def test_trainer_trains_the_conditional_ddim_denoiser_on_source_and_context():
    model = seeded_initialisation(ConditionalDiffusionNetworks.from_preset("tiny", context_slices=3, prediction="sample"), 1)
    initial = copy.deepcopy(model)
    paired = _paired_with_context()
    trainer = DRDDTrainer("cpu", 2, model, paired_loader=paired, stages=["denoise"], precision="fp32",
                          denoise_optimizer=torch.optim.Adam(model.parameters(), 1e-3))
    first = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED(once=1), lambda e: first.append(e.state.output))
    torch.manual_seed(7)
    trainer.run()
    torch.manual_seed(7)  # the same draws of t and ε: the first loss is the DDPM loss of the initial network
    expected = ddim_p_losses(trainer.schedule, initial.denoise, paired[0]["source"], paired[0]["target"],
                             prediction="sample")
    assert first[0]["loss_denoise"] == pytest.approx(float(expected), rel=1e-5)
    assert set(trainer.state.output) == {"loss", "loss_denoise"}
    assert any(not torch.equal(initial.state_dict()[k], v) for k, v in model.state_dict().items() if torch.is_tensor(v))
    assert model.trained_iterations == {"denoise": 6} and model.schedule == DRDDSchedule().settings()


def test_trainer_trains_the_residual_stage_with_the_chosen_loss():
    model = seeded_initialisation(DRDDNetworks.from_preset("tiny"), 1)
    paired = [{k: F.interpolate(v, size=(32, 32)) for k, v in batch.items()} for batch in _paired(1)]
    schedule = DRDDSchedule()
    for loss, precision in (("l2", "fp32"), ("l1", "fp32"), ("l2", "bf16")):
        trainer = DRDDTrainer("cpu", 1, copy.deepcopy(model), paired_loader=paired, stages=["residual"],
                              residual_optimizer=torch.optim.SGD(model.parameters(), 0.0), residual_loss=loss,
                              precision=precision)
        torch.manual_seed(3)
        trainer.run()
        torch.manual_seed(3)
        with autocast_context("cpu", precision):  # bf16 (a CPU that has it) differs from fp32 by ~3e-4
            expected = residual_p_losses(schedule, model.residual, paired[0]["source"], paired[0]["target"], loss=loss)
        assert trainer.state.output["loss_residual"] == pytest.approx(float(expected), rel=1e-5), (loss, precision)
    with pytest.raises(ValueError, match="residual_loss must be one of"):
        DRDDTrainer("cpu", 1, model, paired_loader=paired, stages=["residual"],
                    residual_optimizer=torch.optim.SGD(model.parameters(), 0.0), residual_loss="l3")
