"""Where a committed result came from: the commit measured, whether the code differed from it, the command."""

from __future__ import annotations

import datetime
import json
import math
import shlex
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path


def git_state(root: str | Path) -> dict:
    """``git_commit`` (HEAD of the repository at ``root``, ``None`` outside one) and ``git_dirty``: whether
    tracked files differ from it, results files and docs aside (rows appended before they are committed
    do not change what was measured)."""
    def git(*command):
        result = subprocess.run(["git", *command], cwd=root, capture_output=True, text=True, check=False)
        return result.stdout.strip() if result.returncode == 0 else None

    status = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)docs", ":(exclude)*.md")
    return {"git_commit": git("rev-parse", "HEAD"), "git_dirty": None if status is None else bool(status)}


def json_ready(value):
    """``value`` with every non-finite float spelled out (``"inf"``, ``"-inf"``, ``"nan"``): JSON has no such
    numbers, and a PSNR of identical images is +inf. Dicts and lists are converted item by item."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    return value


def write_results(path: str | Path, result: dict, script: str, argv: Sequence[str] | None, measured: dict,
                  overwrite: bool = False) -> None:
    """Write a results file under ``docs/results``: ``result``, then the command that made it (``python
    scripts/SCRIPT ARGS``, quoted as a shell reads it), the ``git_state`` measured as the run started,
    and the date; indented JSON (non-finite numbers spelled out by ``json_ready``), written atomically,
    never over an existing file unless ``overwrite``."""
    from drdd_med.data.files import atomic_output

    command = shlex.join(["python", f"scripts/{script}", *(sys.argv[1:] if argv is None else argv)])
    record = {**result, "command": command, **measured,
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    with atomic_output(path, overwrite=overwrite) as out:
        out.write_text(json.dumps(json_ready(record), indent=2, allow_nan=False) + "\n")
    print(f"results: {path}")
