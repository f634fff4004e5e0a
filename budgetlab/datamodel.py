"""The data model, from spec to ledger (DESIGN sections 2 and 9): Cell -> Point -> Stage ->
Attempt, and the scheduler's JobRecord. The graph builds Cells, Points and Stages; the ledger
stores and hands back the same types; executors and sync read and write them.

    Grid      a registered grid spec
    Cell      (grid, task, model, budget, fraction, method, seed) -> point id: the grid's view
    Point     one chain sft? -> pft? -> eval; its id is the eval stage's id
    Stage     one unit of work with one directory; id = content hash of what changes its output
    Attempt   one try of one stage on one executor (one run of a job: a requeued job has several)
    JobRecord one run of one job as the scheduler reports it
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from budgetlab.version import SCHEMA_VERSION


@dataclass
class Grid:
    """A registered grid: its spec as written and as resolved (paths, content hashes)."""
    name: str
    spec_path: str | None
    spec_text: str | None
    settings: dict
    resolved: dict | None = None
    registered_at: float | None = None
    updated_at: float | None = None


@dataclass(frozen=True)
class Cell:
    grid: str
    task: str
    model: str
    budget: float
    sft_fraction: float
    method: str
    seed: int
    n_sft: int
    n_pft: int
    annotation_cost: float
    point_id: str
    active: bool = True


@dataclass(frozen=True)
class Point:
    point_id: str          # = the eval stage's id
    task: str
    model: str
    method: str            # dpo | kto | sft (SFT only) | base (the base model)
    n_sft: int
    n_pft: int
    seed: int | None
    sft_stage_id: str | None
    pft_stage_id: str | None
    eval_stage_id: str

    @property
    def chain(self) -> tuple[str, ...]:
        """The point's stage ids, parents first."""
        return tuple(s for s in (self.sft_stage_id, self.pft_stage_id, self.eval_stage_id) if s)


@dataclass
class Stage:
    stage_id: str
    kind: str                      # sft | dpo | kto | eval
    task: str
    model: str                     # the base model reference (canonical)
    parent_id: str | None
    n: int | None
    seed: int | None
    params: dict = field(default_factory=dict)
    data: dict = field(default_factory=dict)       # the task's local sources (absolute paths)
    resources: dict = field(default_factory=dict)  # execution settings: not part of the id
    # What the ledger knows (defaults for a stage fresh from the graph):
    state: str = "NEW"
    error: str | None = None
    result: dict | None = None
    tokens: int | None = None
    wall_seconds: float | None = None
    created_at: float | None = None
    updated_at: float | None = None

    def spec_json(self, workdir: str | Path, parent_kind: str | None = None) -> dict:
        """What the worker reads from spec.json."""
        stages = Path(workdir).resolve() / "stages"
        parent = None
        init_model = self.model
        if self.parent_id:
            parent = {"stage_id": self.parent_id, "kind": parent_kind,
                      "dir": str(stages / self.parent_id)}
            init_model = str(stages / self.parent_id / "model")
        return {
            "schema_version": SCHEMA_VERSION, "stage_id": self.stage_id, "kind": self.kind,
            "task": self.task, "model": self.model, "seed": self.seed, "n": self.n,
            "params": self.params, "data": self.data, "parent": parent,
            "init_model": init_model, "resources": self.resources,
        }


@dataclass
class Attempt:
    attempt_id: int
    stage_id: str
    executor: str | None = None
    job_id: str | None = None
    job_name: str | None = None
    submitted_at: float | None = None
    started_at: float | None = None
    ended_at: float | None = None
    raw_state: str | None = None
    outcome: str = "SUBMITTING"
    exit_code: str | None = None
    nodes: str | None = None
    gpus: int | None = None
    gpu_seconds: float | None = None
    cpu_seconds: float | None = None
    tokens: int | None = None
    error: str | None = None
    log_path: str | None = None
    resources: dict = field(default_factory=dict)  # the stage's settings for this try + "job"
    budgetlab_version: str | None = None
    git_commit: str | None = None
    git_dirty: int | None = None
    resumed_from_step: int | None = None
    submitter: str | None = None       # "host:pid:start" of the CLI that submitted it
    heartbeat_at: float | None = None  # the submitter's last sign of life
    tracking: str | None = None        # the tracking run's path or URL (W&B ...)
    failed_nodes: str | None = None    # NODE_FAIL: the node(s) that failed ("n2")

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class JobRecord:
    """One run of one job (a requeued job has several, oldest first)."""
    job_id: str
    raw_state: str
    reason: str = ""
    exit_code: str = ""
    submit: float | None = None
    start: float | None = None
    end: float | None = None
    elapsed: float = 0.0
    nodes: str = ""
    gpus: int = 0
    cpus: int = 0
    failed_nodes: str = ""   # NODE_FAIL: the nodes of this run that the scheduler saw go down
    final: bool = False      # PREEMPTED/NODE_FAIL that the controller lists as ended: no requeue


def from_row(cls, row: dict):
    """A dataclass from a ledger row: JSON columns decoded, unknown columns ignored."""
    names = {f.name for f in fields(cls)}
    values = {}
    for k, v in row.items():
        if k not in names:
            continue
        if k in ("params", "data", "resources", "result") and isinstance(v, str):
            v = json.loads(v) if v else ({} if k != "result" else None)
        values[k] = v
    return cls(**values)


__all__ = ["Grid", "Cell", "Point", "Stage", "Attempt", "JobRecord", "from_row"]
