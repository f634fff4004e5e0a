"""The generic executor core: which stages share a job, what each job waits for, attempts.

A *unit* is the work of one job: a training stage and the eval stages that evaluate it
(DESIGN section 7: an eval runs in the same job right after its training stage), or a lone
eval stage. A unit waits for the unit of its head's parent, either submitted in the same
call or already queued; a parent that failed leaves the unit BLOCKED instead.

Backends (slurm.py, local.py) only turn a list of units into job ids; the ledger cannot
tell them apart except by the executor name.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from budgetlab.errors import BadInput
from budgetlab.graph import Stage
from budgetlab.ledger import FINISHED, UNFINISHED, Ledger
from budgetlab.stagedir import StageDir

TRAIN_KINDS = ("sft", "dpo", "kto")


@dataclass
class Unit:
    stages: list[dict]                 # ledger stage rows; stages[0] is the head
    resources: dict                    # the job's resources (escalated on resubmit)
    parent_unit: "Unit | None" = None  # a unit of the same submission this one waits for
    after_job: str | None = None       # or a job already queued ("A_i" or a local id)
    job_id: str | None = None          # set by the backend
    attempt_ids: list[int] = field(default_factory=list)
    log_path: str | None = None
    job_name: str | None = None

    @property
    def head(self) -> dict:
        return self.stages[0]

    @property
    def kind(self) -> str:
        return self.head["kind"]

    def stage_dirs(self, workdir: Path) -> list[str]:
        return [str(StageDir.of(workdir, s["stage_id"]).root) for s in self.stages]

    def job_resources(self) -> dict:
        """One allocation for the whole unit: head's shape, summed time, largest memory."""
        r = dict(self.resources)
        r["time_min"] = sum(float(s["resources"]["time_min"]) for s in self.stages[1:]) + \
            float(self.resources["time_min"])
        r["mem_gb"] = max([float(self.resources["mem_gb"])] +
                          [float(s["resources"]["mem_gb"]) for s in self.stages[1:]])
        return r


@dataclass
class SubmitResult:
    executor: str
    units: list[Unit]
    blocked: list[str]        # stage ids left BLOCKED (their parent failed)
    skipped: list[str]        # already complete or already queued/running
    sbatch_calls: int = 0

    @property
    def jobs(self) -> int:
        return len(self.units)

    def as_dict(self) -> dict:
        return {"executor": self.executor, "jobs": len(self.units),
                "stages": sum(len(u.stages) for u in self.units),
                "blocked": len(self.blocked), "skipped": len(self.skipped),
                "submissions": self.sbatch_calls,
                "job_ids": sorted({u.job_id for u in self.units if u.job_id})}


# -- escalation (DESIGN section 7) -----------------------------------------------------------
def escalate(resources: dict, outcome: str, nodes: str | None = None) -> dict:
    """The resources for the next try after `outcome`."""
    r = dict(resources)
    if outcome == "TIMEOUT":
        r["time_min"] = float(r["time_min"]) * 2
    elif outcome == "OUT_OF_MEMORY":
        r["mem_gb"] = float(r["mem_gb"]) * 2
    elif outcome == "CUDA_OOM":
        # Same effective batch: the trainer derives accumulation from batch_size / micro,
        # so halving the micro batch doubles accumulation; the stage id does not change.
        r["micro_batch_size"] = max(1, int(r["micro_batch_size"]) // 2)
    elif outcome == "NODE_FAIL" and nodes:
        excluded = [x for x in (r.get("exclude") or "").split(",") if x]
        for n in nodes.split(","):
            if n and n not in excluded:
                excluded.append(n)
        r["exclude"] = ",".join(excluded)
    return r


# -- planning units ---------------------------------------------------------------------------
def stage_object(row: dict) -> Stage:
    return Stage(stage_id=row["stage_id"], kind=row["kind"], task=row["task"],
                 model=row["model"], parent_id=row["parent_id"], n=row["n"], seed=row["seed"],
                 params=row["params"] or {}, data=row["data"] or {},
                 resources=row["resources"] or {})


def plan_units(led: Ledger, stage_ids: list[str],
               resources: dict[str, dict] | None = None) -> tuple[list[Unit], list[str], list[str]]:
    """Units for the stages that need a job, in dependency order; plus blocked and skipped ids.

    `resources` overrides a stage's resources (escalation on resubmit)."""
    resources = resources or {}
    rows = {r["stage_id"]: r for r in led.stages(stage_ids=stage_ids)}
    missing = [s for s in stage_ids if s not in rows]
    if missing:
        raise BadInput(f"{led.path}: unknown stage id(s) {', '.join(missing[:5])}")
    for sid, r in resources.items():
        rows[sid]["resources"] = r
    todo = {sid: r for sid, r in rows.items()
            if r["state"] != "COMPLETED" and r["state"] not in UNFINISHED}
    skipped = [sid for sid in stage_ids if sid not in todo]
    parents = {r["parent_id"] for r in todo.values() if r["parent_id"] and r["parent_id"] not in rows}
    outside = {r["stage_id"]: r for r in led.stages(stage_ids=list(parents))} if parents else {}

    units: dict[str, Unit] = {}      # head stage id -> unit
    member: dict[str, Unit] = {}     # any stage id -> its unit
    blocked: list[str] = []
    order = _topological(todo)
    for sid in order:
        row = todo[sid]
        pid = row["parent_id"]
        if row["kind"] == "eval" and pid in member and member[pid].head["stage_id"] == pid:
            member[pid].stages.append(row)      # evaluate right after training, same job
            member[sid] = member[pid]
            continue
        unit = Unit(stages=[row], resources=dict(row["resources"]))
        if pid:
            if pid in member:
                unit.parent_unit = member[pid]
            else:
                parent = rows.get(pid) or outside.get(pid)
                state = parent["state"] if parent else "NEW"
                if state == "COMPLETED":
                    pass
                elif state in UNFINISHED:
                    att = led.latest_attempt(pid)
                    unit.after_job = att["job_id"] if att else None
                    if unit.after_job is None:   # parent still SUBMITTING: wait for it
                        blocked.append(sid)
                        continue
                else:
                    blocked.append(sid)
                    continue
        units[sid] = unit
        member[sid] = unit
    # A child of a blocked stage is blocked too.
    blocked_set = set(blocked)
    out = []
    for u in units.values():
        p = u.parent_unit
        if p is not None and p.head["stage_id"] in blocked_set:
            blocked_set.add(u.head["stage_id"])
            continue
        out.append(u)
    return out, sorted(blocked_set), skipped


def _topological(rows: dict[str, dict]) -> list[str]:
    done: dict[str, None] = {}

    def visit(sid, depth=0):
        if sid in done or sid not in rows:
            return
        visit(rows[sid]["parent_id"], depth + 1)
        done[sid] = None
    for sid in rows:
        visit(sid)
    return list(done)


def write_specs(units: list[Unit], workdir: Path, kinds: dict[str, str]) -> None:
    """spec.json for every stage of every unit (resources as this attempt will run them)."""
    for u in units:
        for s in u.stages:
            st = stage_object(s)
            spec = st.spec_json(workdir, parent_kind=kinds.get(st.parent_id or ""))
            if s is u.head:
                spec["resources"] = u.resources
            StageDir.of(workdir, st.stage_id).write_spec(spec)


def record_blocked(led: Ledger, stage_ids: list[str]) -> None:
    with led.write():
        for sid in stage_ids:
            led.set_stage_state(sid, "BLOCKED", error="parent stage did not complete")


def begin_attempts(led: Ledger, units: list[Unit], executor: str) -> None:
    """Attempt rows (SUBMITTING) before anything is submitted: no job goes untracked."""
    with led.write():
        for u in units:
            job = {k: u.job_resources()[k] for k in ("time_min", "mem_gb")}
            u.attempt_ids = [led.begin_attempt(
                s["stage_id"], executor,
                # The stage's own resources (what resubmit escalates) and the job's limits.
                {**(u.resources if s is u.head else s["resources"]), "job": job},
                job_name=u.job_name) for s in u.stages]


def finish_attempts(led: Ledger, units: list[Unit]) -> list[str]:
    """Job ids (or failure) into the SUBMITTING attempts. Returns the jobs to scancel: those
    whose attempts a concurrent `cancel` closed while sbatch ran (they keep CANCELLED and
    get the job id, instead of coming back to life as PENDING)."""
    to_cancel = []
    with led.write():
        for u in units:
            for sid, aid in zip((s["stage_id"] for s in u.stages), u.attempt_ids):
                now = led._rows("SELECT outcome FROM attempts WHERE attempt_id = ?", (aid,))
                if now and now[0]["outcome"] != "SUBMITTING":
                    if u.job_id is not None:
                        led.update_attempt(aid, job_id=u.job_id, log_path=u.log_path)
                        to_cancel.append(u.job_id)
                    continue
                if u.job_id is None:
                    led.update_attempt(aid, outcome="FAILED", error="submission failed")
                    led.set_stage_state(sid, "FAILED", error="submission failed")
                else:
                    led.update_attempt(aid, job_id=u.job_id, outcome="PENDING",
                                       raw_state="PENDING", log_path=u.log_path)
                    led.set_stage_state(sid, "PENDING")
    return sorted(set(to_cancel))


def stage_kinds(led: Ledger, units: list[Unit]) -> dict[str, str]:
    ids = {s["parent_id"] for u in units for s in u.stages if s["parent_id"]}
    return {r["stage_id"]: r["kind"] for r in led.stages(stage_ids=list(ids))}


def safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "-", text)[:60]


def dumps(obj) -> str:
    return json.dumps(obj, sort_keys=True)


__all__ = ["Unit", "SubmitResult", "escalate", "plan_units", "write_specs", "record_blocked",
           "begin_attempts", "finish_attempts", "FINISHED", "UNFINISHED"]
