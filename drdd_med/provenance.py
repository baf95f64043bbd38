"""Where a committed result came from: the commit measured, and whether the code differed from it."""

from __future__ import annotations

import subprocess
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
