"""``drdd-med benchmark``: a tiny run's JSON holds every documented field with positive finite figures,
FLOPs are counted right, an existing output is never replaced silently, bad options exit 2, and no
network is timed while it outputs zeros. Speed itself is never asserted (timings are not tests)."""

import importlib.util
import json
import math
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from drdd_med import benchmark, engines
from drdd_med.benchmark import Sizes, build_networks, format_table, forward_flops, run_benchmark
from drdd_med.cli import main
from drdd_med.networks import DRDDNetworks

# smallest sizes the tiny preset takes; one thread, so a busy 2-core machine does not stall the run
TINY = Sizes(image_size=16, patch_size=8, volumes_2d=((16, 16, 3),), volume_3d=(16, 16, 8),
             warmup=1, repeats=2, volume_repeats=1, matmul_size=64)
PRECISIONS = ["fp32", "bf16"] if benchmark.bf16_supported(torch.device("cpu")) else ["fp32"]

TOP_FIELDS = {"schema", "date", "quick", "environment", "method", "sizes", "notes", "matmul", "results", "not_run"}
ENVIRONMENT_FIELDS = {"device", "device_name", "torch", "cuda", "monai", "drdd_med", "python", "threads",
                      "cpu_count", "load_average"}
MATMUL_FIELDS = {"size", "flop_per_s", "bf16_native", "float32_matmul_precision"}
RESULT_FIELDS = {"preset", "dims", "precision", "compile", "batch_size", "channels_last", "spatial_dims", "context_slices",
                 "item_shape", "parameters", "output_std", "flops_per_item", "items_per_s",
                 "flop_per_s", "matmul_fraction", "volumes", "peak_memory_bytes", "sample_cuda_graph"}
MEASURES = {"train_both", "train_residual", "train_noise", "sample"}
VOLUME_2D_FIELDS = {"shape", "seconds", "slice_batch_size", "peak_memory_bytes"}
VOLUME_3D_FIELDS = {"shape", "seconds", "roi_size", "sw_batch_size", "peak_memory_bytes"}


@pytest.fixture(scope="module")
def report():
    threads = torch.get_num_threads()
    result = run_benchmark("cpu", ["tiny"], ["2d", "2.5d", "3d"], PRECISIONS, [False], [2], threads=1, sizes=TINY)
    assert torch.get_num_threads() == threads, "the run must restore the thread count"
    return result


def _numbers(value):
    """Every number in a nested report section (booleans are flags, not figures)."""
    if isinstance(value, dict):
        for item in value.values():
            yield from _numbers(item)
    elif isinstance(value, list):
        for item in value:
            yield from _numbers(item)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        yield value


def test_report_holds_every_documented_field(report):
    assert set(report) == TOP_FIELDS
    assert set(report["environment"]) == ENVIRONMENT_FIELDS
    assert report["not_run"] == []
    assert set(report["matmul"]) == MATMUL_FIELDS and set(report["matmul"]["flop_per_s"]) == {"fp32", "bf16"}
    assert report["environment"]["threads"] == 1
    assert [(r["dims"], r["precision"]) for r in report["results"]] == [
        (dims, precision) for dims in ("2d", "2.5d", "3d") for precision in PRECISIONS]
    for result in report["results"]:
        assert set(result) == RESULT_FIELDS
        assert result["sample_cuda_graph"] is None  # measured on a GPU only
        assert set(result["flops_per_item"]) == MEASURES | {"residual_forward", "noise_forward"}
        for key in ("items_per_s", "flop_per_s", "matmul_fraction"):
            assert set(result[key]) == MEASURES
        assert set(result["peak_memory_bytes"]) == {"train", "sample"}
        volume_fields = VOLUME_3D_FIELDS if result["dims"] == "3d" else VOLUME_2D_FIELDS
        assert [set(v) for v in result["volumes"]] == [volume_fields]
    assert json.loads(json.dumps(report, allow_nan=False)) == report  # valid JSON, no NaN


def test_every_figure_is_positive_and_finite(report):
    figures = list(_numbers(report["matmul"])) + list(_numbers(report["results"]))
    assert len(figures) > 100
    assert all(math.isfinite(x) and x > 0 for x in figures), [x for x in figures if not (math.isfinite(x) and x > 0)]


def test_flops_of_one_convolution_match_the_formula():
    conv = torch.nn.Conv2d(3, 5, kernel_size=3, padding=1)
    flops, output = forward_flops(lambda x, t: conv(x), torch.randn(2, 3, 10, 12), torch.zeros(2))
    assert output.shape == (2, 5, 10, 12)
    assert flops == 2 * 5 * 3 * 3 * 3 * 10 * 12 * 2  # 2 FLOPs per multiply-add, every output voxel, batch 2


@pytest.mark.parametrize("dims", ["2.5d", "3d"])
def test_flops_per_item_match_a_recount_of_a_batch(report, dims):
    result = next(r for r in report["results"] if r["dims"] == dims)
    networks = build_networks("tiny", dims)
    per_item = {}
    for role in ("residual", "noise"):
        net = getattr(networks, role)
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), counter:
            net(torch.randn(2, net.in_channels, *result["item_shape"]), torch.full((2,), 10.0))
        per_item[role] = counter.get_total_flops() // 2
    flops = result["flops_per_item"]
    assert (flops["residual_forward"], flops["noise_forward"]) == (per_item["residual"], per_item["noise"])
    assert flops["sample"] == 2 * per_item["residual"] + 2 * per_item["noise"]  # the 2 + 2 sampler
    assert flops["train_both"] == 3 * (per_item["residual"] + per_item["noise"]) == \
        flops["train_residual"] + flops["train_noise"]
    for key in MEASURES:
        assert result["flop_per_s"][key] == pytest.approx(flops[key] * result["items_per_s"][key])
        rate = report["matmul"]["flop_per_s"][result["precision"]]
        assert result["matmul_fraction"][key] == pytest.approx(result["flop_per_s"][key] / rate)


def test_networks_are_timed_with_non_zero_outputs(report):
    fresh = DRDDNetworks.from_preset("tiny")
    x, t = torch.randn(2, 2, 16, 16), torch.full((2,), 500.0)
    assert not fresh.residual(x, t).any(), "MONAI zero-initialises the output layer (the premise of this test)"
    rng = torch.random.get_rng_state()
    networks = build_networks("tiny", "2d")
    assert torch.equal(torch.random.get_rng_state(), rng), "building must leave the global RNG alone"
    again = build_networks("tiny", "2d")
    assert all(torch.equal(a, b) for a, b in zip(networks.parameters(), again.parameters()))
    assert networks.residual(x, t).abs().mean() > 0.01
    assert networks.noise(x[:, :1], t).abs().mean() > 0.01
    for result in report["results"]:
        assert min(result["output_std"].values()) > 0.01


@pytest.mark.parametrize("dims", ["2d", "3d"])
def test_channels_last_runs_the_same_networks_on_the_same_inputs(dims):
    """The switch changes the memory layout only: item for item the same outputs as the plain layout."""
    runs = {flag: benchmark._Run(benchmark.Configuration("tiny", dims, "fp32", False, 2, flag), torch.device("cpu"),
                                 TINY) for flag in (False, True)}
    layout = torch.channels_last if dims == "2d" else torch.channels_last_3d
    assert runs[True].networks.residual.conv_in.conv.weight.is_contiguous(memory_format=layout)
    outputs = {}
    for flag, run in runs.items():
        source, target, _ = run.batch(2)
        with torch.no_grad():
            outputs[flag] = run.networks.residual(torch.cat([target, source], 1), torch.full((2,), 300.0))
    assert outputs[False].abs().mean() > 0.01  # real outputs
    torch.testing.assert_close(outputs[True], outputs[False], rtol=1e-4, atol=1e-5)


def test_channels_last_configurations_run_and_are_tabled():
    result = run_benchmark("cpu", ["tiny"], ["2d"], ["fp32"], [False], [2], threads=1, sizes=TINY,
                           memory_formats=[False, True])
    assert [r["channels_last"] for r in result["results"]] == [False, True]
    lines = format_table(result).splitlines()
    assert "ch-last" in next(line for line in lines if "preset" in line)
    assert sorted(line.split()[4] for line in lines if line.startswith("tiny ")) == ["off", "on"]


def test_table_has_a_row_per_configuration(report):
    table = format_table(report)
    rows = [line for line in table.splitlines() if line.startswith("tiny ")]
    assert len(rows) == len(report["results"])
    assert "dense matmul 64²" in table


def test_cuda_graph_sampling_is_tabled_beside_eager_sampling(report):
    results = [{**r, "sample_cuda_graph": graphed} for r, graphed in
               zip(report["results"], [{"items_per_s": 1234.0, "max_difference": 0.0}, {"error": "RuntimeError: x"}])]
    lines = format_table({**report, "results": results}).splitlines()
    rows = [line for line in lines if line.startswith("tiny ")]
    assert "(1.23e+03)" in rows[0] and "(failed)" in rows[1]
    assert "sample/s (graph)" in lines[-1] and "(graph)" in lines[3]


def _one_failing(monkeypatch, failing_dims):
    measure = benchmark.benchmark_configuration

    def flaky(config, *args):
        if config.dims == failing_dims:
            raise RuntimeError("CUDA out of memory (simulated)")
        return measure(config, *args)

    monkeypatch.setattr(benchmark, "benchmark_configuration", flaky)


def test_a_failing_configuration_is_recorded_and_the_others_still_run(monkeypatch):
    _one_failing(monkeypatch, "2d")
    result = run_benchmark("cpu", ["tiny"], ["2d", "3d"], ["fp32"], [False], [2], threads=1, sizes=TINY)
    failed, measured = result["results"]
    assert failed == {**asdict(benchmark.Configuration("tiny", "2d", "fp32", False, 2)),
                      "error": "RuntimeError: CUDA out of memory (simulated)"}
    assert measured["dims"] == "3d" and measured["items_per_s"]["sample"] > 0
    table = format_table(result)
    assert "tiny    2d    fp32  off      off      2      failed: RuntimeError: CUDA out of memory" in table
    assert len([line for line in table.splitlines() if line.startswith("tiny ")]) == 2


def test_a_failed_configuration_makes_the_command_exit_1(monkeypatch, tmp_path, capsys):
    _one_failing(monkeypatch, "2d")
    out = tmp_path / "bench.json"
    options = ["--device", "cpu", "--presets", "tiny", "--dims", "2d,3d", "--batch-size", "2", "--quick"]
    assert main(["benchmark", *options, "--output", str(out)]) == 1
    assert "failed: RuntimeError" in capsys.readouterr().out
    assert [("error" in r) for r in json.loads(out.read_text())["results"]] == [True, False]  # written all the same


def test_no_configuration_starts_after_max_minutes(monkeypatch):
    clock = iter([0.0, 0.0, 61.0])  # start, before the first configuration, before the second
    monkeypatch.setattr(benchmark, "time", SimpleNamespace(perf_counter=time.perf_counter, monotonic=lambda: next(clock)))
    result = run_benchmark("cpu", ["tiny"], ["2d", "2.5d", "3d"], ["fp32"], [False], [2], threads=1, sizes=TINY,
                           max_minutes=1)
    assert [r["dims"] for r in result["results"]] == ["2d"]
    assert [c["dims"] for c in result["not_run"]] == ["2.5d", "3d"]
    assert "not run, the time budget was spent: 2 configuration(s)" in format_table(result)


def test_existing_output_is_refused_before_measuring(tmp_path, monkeypatch, capsys):
    out = tmp_path / "bench.json"
    out.write_text("earlier results")
    monkeypatch.setattr("drdd_med.commands.benchmark.run_benchmark", _must_not_run)
    assert main(["benchmark", "--quick", "--output", str(out)]) == 2
    assert out.read_text() == "earlier results"
    assert "exists already" in capsys.readouterr().err


def _must_not_run(*args, **kwargs):
    raise AssertionError("the benchmark ran although it should have been refused")


def test_output_is_written_whole_and_replaced_only_with_overwrite(tmp_path, monkeypatch, report, capsys):
    out = tmp_path / "bench.json"
    monkeypatch.setattr("drdd_med.commands.benchmark.run_benchmark", lambda **kwargs: report)
    assert main(["benchmark", "--output", str(out)]) == 0
    assert json.loads(out.read_text()) == report
    assert "tiny " in capsys.readouterr().out
    out.write_text("{}")
    assert main(["benchmark", "--output", str(out)]) == 2 and out.read_text() == "{}"
    assert main(["benchmark", "--output", str(out), "--overwrite"]) == 0
    assert json.loads(out.read_text()) == report
    assert [p.name for p in tmp_path.iterdir()] == ["bench.json"]  # no partial file left behind


@pytest.mark.parametrize("options, message", [
    (["--dims", "4d"], "dims must be one or more of 2d, 2.5d, 3d"),
    (["--presets", "huge"], "presets must be one or more of"),
    (["--precision", "fp16"], "precision must be one or more of fp32, bf16"),
    (["--threads", "0"], "threads must be a positive integer"),
    (["--device", "tpu"], "device must be auto, cpu, cuda or cuda:N, got 'tpu'"),
    (["--quick", "--presets", "reference", "--dims", "3d"], "preset reference needs 3d inputs in multiples of 32"),
])
def test_bad_options_exit_2_with_a_message(options, message, capsys, monkeypatch):
    monkeypatch.setattr(benchmark, "measure_matmul", _must_not_run)  # refused before any measuring
    assert main(["benchmark", "--device", "cpu", *options]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("options", [["--compile", "maybe"], ["--batch-size", "0"], ["--batch-size", "x"],
                                     ["--max-minutes", "0"], ["--max-minutes", "soon"], ["--max-minutes", "nan"]])
def test_malformed_option_values_exit_2(options):
    with pytest.raises(SystemExit) as exit_info:
        main(["benchmark", *options])
    assert exit_info.value.code == 2


def test_bf16_is_refused_on_a_cpu_without_it(monkeypatch):
    monkeypatch.setattr(engines, "cpu_bf16_native", lambda: False)
    cpu = torch.device("cpu")
    with pytest.raises(ValueError, match="no native bf16"):
        benchmark.configurations(cpu, ["tiny"], ["2d"], ["bf16"], [False], None)
    assert benchmark.configurations(cpu, ["tiny"], ["2d"], ["fp32"], [False], None)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_missing_cuda_is_a_usage_error(capsys):
    assert main(["benchmark", "--device", "cuda"]) == 2
    assert "CUDA is not available" in capsys.readouterr().err


def test_a_terminated_run_leaves_no_partial_output(tmp_path):
    """SIGTERM (timeout, a scheduler) while measuring: exit 143 and nothing left in the output folder."""
    out = tmp_path / "results"
    command = [sys.executable, "-m", "drdd_med", "benchmark", "--device", "cpu", "--presets", "tiny", "--quick",
               "--output", str(out / "bench.json")]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (out.is_dir() and any(out.iterdir())) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert process.poll() is None and [p.name.endswith(".partial.json") for p in out.iterdir()] == [True]
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) == 143
    assert list(out.iterdir()) == []


def test_script_is_the_same_command():
    script = Path(__file__).parents[1] / "scripts" / "benchmark.py"
    done = subprocess.run([sys.executable, str(script), "--device", "cpu", "--dims", "4d"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert "drdd-med benchmark: error: dims must be" in done.stderr


def test_conversion_benchmark_times_both_settings_and_compares_their_outputs(tmp_path):
    script = Path(__file__).resolve().parents[1] / "scripts" / "benchmark_conversion.py"
    out = tmp_path / "conversion.json"
    command = [sys.executable, str(script), "--shape", "48x40x3", "--preset", "tiny", "--output", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    written = json.loads(out.read_text())
    before, tuned_fp32, tuned, lite = written["rows"]
    assert [row["setting"] for row in written["rows"]] == ["before", "tuned_fp32", "tuned", "tuned_lite"]
    assert [row["preset"] for row in written["rows"]] == ["tiny", "tiny", "tiny", "cpu-lite"]
    assert before["shape"] == [48, 40, 3]
    for row in written["rows"]:
        assert row["series_seconds"] > 0 and row["seconds_per_slice"] == pytest.approx(row["series_seconds"] / 3, abs=1e-3)
    # the same model, batched and laid out two ways in fp32: equal up to the rounding to whole HU
    assert tuned_fp32["hu_difference_to_before"]["max"] <= 1
    # the CPU profile translates in bf16, which moves values by its rounding where the CPU computes
    # bf16; without it the CPU stays in fp32
    assert (tuned["hu_difference_to_before"]["max"] > 1) == engines.cpu_bf16_native()
    assert "hu_difference_to_before" not in lite  # another network: its quality is compare_methods' to measure
    assert len(written["git_commit"] or "x" * 40) == 40 and written["machine"]["cpu_count"] >= 1
    again = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert again.returncode == 2 and "pass --overwrite" in again.stderr


def test_conversion_benchmark_settings_with_channels_last_weights(tmp_path):
    """'+cl' changes the weights' layout only: in fp32 the output equals the plain setting's."""
    script = Path(__file__).resolve().parents[1] / "scripts" / "benchmark_conversion.py"
    out = tmp_path / "conversion.json"
    command = [sys.executable, str(script), "--shape", "32x32x2", "--preset", "tiny", "--output", str(out),
               "--settings", "before,before+cl,tuned_lite+cl"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(row["setting"], row["preset"]) for row in rows] == [
        ("before", "tiny"), ("before+cl", "tiny"), ("tuned_lite+cl", "cpu-lite")]
    assert rows[1]["hu_difference_to_before"]["max"] <= 1
    bad = subprocess.run([*command[:-1], "tuned+xl"], capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2 and "each optionally with +cl" in bad.stderr
    spec = importlib.util.spec_from_file_location("benchmark_conversion", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    ckpt = module._model(tmp_path / "model.pt", "tiny")
    for setting, channels_last in (("before", False), ("before+cl", True), ("tuned+cl", True), ("tuned_fp32", True)):
        weight = module._translator("drdd_mr2ct", ckpt, setting).network.residual.conv_in.conv.weight
        assert weight.is_contiguous(memory_format=torch.channels_last) is channels_last, setting


def test_training_speed_times_the_bundle_command_at_each_commit(tmp_path):
    """scripts/training_speed.py: per-epoch times from the training log, per commit, ratios to the first."""
    script = Path(__file__).resolve().parents[1] / "scripts" / "training_speed.py"
    out = tmp_path / "speed.json"
    command = [sys.executable, str(script), "--commit", "HEAD", "--commit", "HEAD~1", "--epochs", "4",
               "--override", "network_preset=tiny", "--override", "patches_per_volume=2",
               "--variant", "volumes_per_batch=1", "--output", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    written = json.loads(out.read_text())
    head, head_variant, parent, parent_variant = written["rows"]
    assert (head["commit"], parent["commit"]) == ("HEAD", "HEAD~1") and head["git_commit"] != parent["git_commit"]
    assert "variant" not in head and head_variant["variant"] == parent_variant["variant"] == "volumes_per_batch=1"
    for row in written["rows"]:
        run = row["runs"][0]
        per_epoch = 12 if "variant" in row else 6  # 12 training volumes, 2 per batch (the variant: 1)
        assert len(run["epoch_seconds"]) == 4 and run["iterations_per_epoch"] == per_epoch
        assert row["seconds_per_iteration"] == pytest.approx(run["median_epoch_seconds"] / per_epoch)
    assert head["ratio_to_first"] == 1.0 and parent["ratio_to_first"] > 0
    bad = subprocess.run([*command[:2], "--commit", "no-such-commit", "--output", str(tmp_path / "x.json")],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "not a commit of this repository" in bad.stderr
