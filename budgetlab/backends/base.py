"""What every backend is: a small class that turns units into jobs and reports on them.

    backend.submit(units, on_submitted)   give each unit a job id; on_submitted(units) after
                                          each scheduler call, so ids are recorded at once
    backend.poll(job_ids) -> Poll         every run of these jobs, as JobRecords
    backend.cancel(job_ids)               stop them
    backend.release(job_ids)              drop a dependency that can never be satisfied
                                          (the parent completed, its job did not)
    backend.find_by_name(names)           job ids by job name (a submit that crashed before
                                          recording its ids)

A *unit* is the work of one job: a training stage and the eval stages that evaluate it (an
eval runs in the same job right after its training stage), or a lone eval stage. The ledger
cannot tell backends apart except by their name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from budgetlab.datamodel import JobRecord, Stage
from budgetlab.stagedir import StageDir


@dataclass
class Unit:
    stages: list[Stage]                # stages[0] is the head
    resources: dict                    # the head's resources (escalated on resubmit)
    parent_unit: "Unit | None" = None  # a unit of the same submission this one waits for
    after_job: str | None = None       # or a job already queued ("A_i" or a local id)
    job_id: str | None = None          # set by the backend
    attempt_ids: list[int] = field(default_factory=list)
    log_path: str | None = None
    job_name: str | None = None

    @property
    def head(self) -> Stage:
        return self.stages[0]

    @property
    def kind(self) -> str:
        return self.head.kind

    def stage_dirs(self, workdir: Path) -> list[str]:
        return [str(StageDir.of(workdir, s.stage_id).root) for s in self.stages]

    def job_resources(self) -> dict:
        """One allocation for the whole unit: head's shape, summed time, largest memory."""
        r = dict(self.resources)
        r["time_min"] = sum(float(s.resources["time_min"]) for s in self.stages[1:]) + \
            float(self.resources["time_min"])
        r["mem_gb"] = max([float(self.resources["mem_gb"])] +
                          [float(s.resources["mem_gb"]) for s in self.stages[1:]])
        return r


@dataclass
class Poll:
    """What one poll of a backend learned."""
    runs: dict[str, list[JobRecord]]   # job id -> its runs, oldest first (absent: unknown)
    accounting: bool = True            # False: the scheduler cannot report finished jobs
    controller_down: str | None = None
    notes: list[str] = field(default_factory=list)
    sacct_calls: int = 0
    squeue_calls: int = 0
    nodes_up: list[str] | None = None    # nodes that can run jobs now (None: not known)
    nodes_down: list[str] | None = None  # down, drained, failing or not responding


class Backend:
    name = ""

    def __init__(self, workdir: Path, settings: dict | None = None):
        self.workdir = Path(workdir).resolve()
        self.settings = dict(settings or {})
        self.sbatch_calls = 0

    def submit(self, units: list[Unit],
               on_submitted: Callable[[list[Unit]], None] | None = None) -> None:
        raise NotImplementedError

    def poll(self, job_ids: list[str]) -> Poll:
        raise NotImplementedError

    def cancel(self, job_ids: list[str]) -> None:
        raise NotImplementedError

    def release(self, job_ids: list[str]) -> None:
        raise NotImplementedError

    def find_by_name(self, names: list[str]) -> dict[str, list[str]]:
        raise NotImplementedError
