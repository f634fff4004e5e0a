"""Backends: where jobs run. A backend is a small class (budgetlab.backends.base.Backend)
with submit / poll / cancel / release / find_by_name:

    slurm   SLURM through submitit: arrays, aftercorr dependencies, one sacct per poll
    local   a detached runner on this machine, at most [local] max_parallel jobs at a time

Both run budgetlab.backends.job.StageJob, the same code in the job.
"""

from __future__ import annotations

from pathlib import Path

from budgetlab.errors import BadInput

EXECUTORS = ("local", "slurm")


def get_backend(name: str, workdir: str | Path, settings: dict | None = None):
    if name == "slurm":
        from budgetlab.backends.slurm import SlurmBackend
        return SlurmBackend(Path(workdir), settings or {})
    if name == "local":
        from budgetlab.backends.local import LocalBackend
        return LocalBackend(Path(workdir), settings or {})
    raise BadInput(f"--executor: unknown executor {name!r} (choose from {', '.join(EXECUTORS)})")


__all__ = ["get_backend", "EXECUTORS"]
