"""drdd_med.provenance: every results file says what made it, from which commit, and is never half written."""

import json
import shlex
import subprocess

import pytest

from drdd_med.errors import OutputExistsError
from drdd_med.provenance import git_state, write_results


def test_a_results_file_records_the_result_the_command_as_a_shell_reads_it_and_the_commit(tmp_path):
    path = tmp_path / "results" / "speed.json"
    argv = ["--output", "my results/speed.json", "--shape", "256x256x150"]
    write_results(path, {"rows": [1, 2]}, "benchmark.py", argv, {"git_commit": "abc", "git_dirty": False})
    record = json.loads(path.read_text())
    assert record["rows"] == [1, 2] and record["git_commit"] == "abc" and record["git_dirty"] is False
    assert shlex.split(record["command"]) == ["python", "scripts/benchmark.py", *argv]  # the space survives
    assert record["date"].endswith("+00:00")


def test_an_existing_results_file_is_replaced_only_when_asked(tmp_path):
    path = tmp_path / "speed.json"
    write_results(path, {"run": 1}, "benchmark.py", [], {})
    with pytest.raises(OutputExistsError):
        write_results(path, {"run": 2}, "benchmark.py", [], {})
    assert json.loads(path.read_text())["run"] == 1
    write_results(path, {"run": 2}, "benchmark.py", [], {}, overwrite=True)
    assert json.loads(path.read_text())["run"] == 2
    assert [p.name for p in tmp_path.iterdir()] == ["speed.json"]  # no partial file left behind


def test_git_state_names_the_commit_and_whether_tracked_code_differs(tmp_path):
    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / "code.py").write_text("a = 1\n")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "table.json").write_text("{}\n")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "x")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True, text=True,
                          check=True).stdout.strip()
    assert git_state(tmp_path) == {"git_commit": head, "git_dirty": False}
    (tmp_path / "docs" / "table.json").write_text('{"new": 1}\n')  # results written before their commit
    assert git_state(tmp_path)["git_dirty"] is False
    (tmp_path / "code.py").write_text("a = 2\n")
    assert git_state(tmp_path)["git_dirty"] is True


def test_non_finite_numbers_are_spelled_out_so_the_file_stays_strict_json(tmp_path):
    out = tmp_path / "r.json"
    write_results(out, {"psnr": [float("inf"), 30.0], "worst": float("-inf"), "ratio": float("nan")}, "s.py", [], {})

    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    record = json.loads(out.read_text(), parse_constant=refuse)
    assert record["psnr"] == ["inf", 30.0] and record["worst"] == "-inf" and record["ratio"] == "nan"
