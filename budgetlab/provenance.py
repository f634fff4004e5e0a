"""Which code an attempt was submitted with: version, git commit, dirty tree."""

from __future__ import annotations

import functools
import subprocess
from pathlib import Path

from budgetlab import __version__


@functools.lru_cache(maxsize=1)
def code_version() -> dict:
    """{"budgetlab_version", "git_commit", "git_dirty"}; commit None outside a checkout."""
    root = Path(__file__).resolve().parent.parent
    out = {"budgetlab_version": __version__, "git_commit": None, "git_dirty": None}
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"],
                                capture_output=True, text=True, timeout=10)
        if commit.returncode != 0:
            return out
        status = subprocess.run(["git", "-C", str(root), "status", "--porcelain",
                                 "--untracked-files=no", "--", "budgetlab"],
                                capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return out
    out["git_commit"] = commit.stdout.strip()
    out["git_dirty"] = int(bool(status.stdout.strip()))
    return out
