"""Which code an attempt was submitted with: version, git commit, dirty tree."""

from __future__ import annotations

import functools
import subprocess
from pathlib import Path

from budgetlab.version import __version__


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


def _start_ticks(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (/proc/PID/stat field 22): with
    the pid, it names one process even after the pid is reused."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rpartition(")")[2].split()[19]


@functools.lru_cache(maxsize=1)
def submitter() -> str:
    """"host:pid:start" of this process, recorded with the attempts it submits."""
    import os
    import socket

    return f"{socket.gethostname()}:{os.getpid()}:{_start_ticks(os.getpid()) or 0}"


def submitter_alive(who: str | None) -> bool | None:
    """True/False when `who` ran on this host (its process is alive or not); None when it
    ran elsewhere (then only its heartbeat tells)."""
    import socket

    if not who or who.count(":") < 2:
        return None
    host, pid, start = who.rsplit(":", 2)
    if host != socket.gethostname():
        return None
    if not pid.isdigit():
        return False
    return _start_ticks(int(pid)) == start
