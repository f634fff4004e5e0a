"""Orchestration: which stages get a job, with what, waiting for what (DESIGN section 7).

    submit(led, plan, workdir, executor="local")    register a plan, submit its pending stages
    submit_stages(led, stage_ids, workdir, ...)     submit given stages (parents before children)
    resubmit(led, workdir, grid=None, states=...)   failed stages again, escalated, and the
                                                    blocked or never-run stages that can go
    cancel(led, workdir, grid=None, point=None)     stop queued/running work (ledger: CANCELLED)
    wait(led, workdir, grid, ...)                   sync until nothing of the grid is live
    logs(led, workdir, ident)                       path and tail of the latest attempt's log

Backends (budgetlab.backends) only turn units into job ids and report on jobs; sync
(budgetlab.sync) reads the jobs back; every state write is a budgetlab.lifecycle Transition.

A submission claims its stages (SUBMITTING attempts, with who submits them) in one short
transaction, writes their spec.json files outside it, then records each array's job ids
right after its sbatch: no file I/O holds the ledger's lock, and a submit that dies leaves
at most one array that sync has to find by name.
"""

from __future__ import annotations

import re
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from budgetlab import judge, lifecycle
from budgetlab.backends import get_backend
from budgetlab.backends.base import Unit
from budgetlab.datamodel import Stage
from budgetlab.errors import BadInput, RuntimeFailure
from budgetlab.ledger import Ledger
from budgetlab.lifecycle import BLOCKED, COMPLETED, LIVE, NEW, Transition
from budgetlab.provenance import code_version, submitter
from budgetlab.stagedir import StageDir


@dataclass
class SubmitResult:
    executor: str
    units: list[Unit]
    blocked: list[str]        # stage ids left BLOCKED (a parent is not complete)
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
def escalate(resources: dict, outcome: str, nodes: str | None = None,
             kind: str | None = None) -> dict:
    """The resources for the next try after `outcome`."""
    r = dict(resources)
    if outcome == "TIMEOUT":
        r["time_min"] = float(r["time_min"]) * 2
    elif outcome == "OUT_OF_MEMORY":
        r["mem_gb"] = float(r["mem_gb"]) * 2
    elif outcome == "CUDA_OOM":
        # Same effective batch: the trainer derives accumulation from batch_size / micro,
        # so halving the micro batch doubles accumulation; an eval halves its generation
        # batch. Neither changes the stage id.
        key = "batch_size" if kind == "eval" else "micro_batch_size"
        r[key] = max(1, int(r[key]) // 2)
    elif outcome == "NODE_FAIL" and nodes:
        excluded = [x for x in (r.get("exclude") or "").split(",") if x]
        for n in nodes.split(","):
            if n and n not in excluded:
                excluded.append(n)
        r["exclude"] = ",".join(excluded)
    return r


# -- planning units ---------------------------------------------------------------------------
def plan_units(led: Ledger, stage_ids: list[str],
               resources: dict[str, dict] | None = None) -> tuple[list[Unit], dict, list[str]]:
    """Units for the stages that need a job, in dependency order; the blocked ones (stage
    id -> why) and the skipped ids. `resources` overrides a stage's resources (escalation
    on resubmit)."""
    resources = resources or {}
    rows = {s.stage_id: s for s in led.stages(stage_ids=stage_ids)}
    missing = [s for s in stage_ids if s not in rows]
    if missing:
        raise BadInput(f"{led.path}: unknown stage id(s) {', '.join(missing[:5])}")
    for sid, r in resources.items():
        if sid in rows:
            rows[sid].resources = r
    todo = {sid: s for sid, s in rows.items() if s.state != COMPLETED and s.state not in LIVE}
    skipped = [sid for sid in stage_ids if sid not in todo]
    outside_ids = {s.parent_id for s in todo.values() if s.parent_id and s.parent_id not in rows}
    outside = {s.stage_id: s for s in led.stages(stage_ids=list(outside_ids))}
    parent_jobs = led.latest_attempts([p for p, s in {**rows, **outside}.items()
                                       if s.state in LIVE])

    units: dict[str, Unit] = {}      # head stage id -> unit
    member: dict[str, Unit] = {}     # any stage id -> its unit
    blocked: dict[str, str] = {}     # stage id -> why
    for sid in _topological(todo):
        st = todo[sid]
        pid = st.parent_id
        if st.kind == "eval" and pid in member and member[pid].head.stage_id == pid:
            member[pid].stages.append(st)      # evaluate right after training, same job
            member[sid] = member[pid]
            continue
        unit = Unit(stages=[st], resources=dict(st.resources))
        if pid:
            if pid in member:
                unit.parent_unit = member[pid]
            elif pid in blocked:
                blocked[sid] = f"its parent {pid} is blocked"
                continue
            else:
                parent = rows.get(pid) or outside.get(pid)
                state = parent.state if parent else NEW
                if state in LIVE:
                    att = parent_jobs.get(pid)
                    unit.after_job = att.job_id if att else None
                    if unit.after_job is None:
                        blocked[sid] = f"its parent {pid} is being submitted by another command"
                        continue
                elif state != COMPLETED:
                    blocked[sid] = f"its parent {pid} is {state}"
                    continue
        units[sid] = unit
        member[sid] = unit
    # A child of a blocked unit is blocked too (units are in dependency order).
    out = []
    for u in units.values():
        p = u.parent_unit
        if p is not None and p.head.stage_id in blocked:
            blocked[u.head.stage_id] = f"its parent {p.head.stage_id} is blocked"
            for s in u.stages[1:]:
                blocked[s.stage_id] = blocked[u.head.stage_id]
            continue
        out.append(u)
    return out, blocked, skipped


def _topological(rows: dict[str, Stage]) -> list[str]:
    done: dict[str, None] = {}

    def visit(sid):
        if sid in done or sid not in rows:
            return
        visit(rows[sid].parent_id)
        done[sid] = None
    for sid in rows:
        visit(sid)
    return list(done)


def write_specs(units: list[Unit], workdir: Path, kinds: dict[str, str],
                tracking: dict[str, dict] | None = None) -> None:
    """spec.json for every stage of every unit (resources as this attempt will run them; the
    head's also carry the job's limits, which the job reads to judge a stop; `tracking`:
    stage id -> the worker's tracking settings, see budgetlab.tracking)."""
    for u in units:
        for s in u.stages:
            spec = s.spec_json(workdir, parent_kind=kinds.get(s.parent_id or ""))
            if tracking and s.stage_id in tracking:
                spec["tracking"] = tracking[s.stage_id]
            if s is u.head:
                job = u.job_resources()
                spec["resources"] = {**u.resources,
                                     "job": {k: job[k] for k in ("time_min", "mem_gb")}}
            StageDir.of(workdir, s.stage_id).write_spec(spec)


def safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "-", text)[:60]


# -- submitting -------------------------------------------------------------------------------
def submit(led: Ledger, plan, workdir: str | Path, executor: str = "local",
           backend=None) -> SubmitResult:
    """Register the plan's cells/points/stages, then submit every stage not yet done or
    queued. Returns at once: the jobs run on their own (see wait / budgetlab.sync)."""
    settings = dict(getattr(plan.spec, executor, {}) or {})
    backend = backend or get_backend(executor, Path(workdir), settings)  # unknown: nothing written
    led.register(plan)
    return submit_stages(led, list(plan.stages), workdir, executor, settings, grid=plan.name,
                         backend=backend)


def submit_stages(led: Ledger, stage_ids: list[str], workdir: str | Path,
                  executor: str = "local", settings: dict | None = None,
                  resources: dict[str, dict] | None = None, grid: str | None = None,
                  dry_run: bool = False, backend=None) -> SubmitResult:
    """Submit these stages (those not complete and not queued): one job per unit, children
    after their parents; a stage whose parent is not complete is left BLOCKED."""
    workdir = Path(workdir).resolve()
    backend = backend or get_backend(executor, workdir, settings)
    if dry_run:
        units, blocked, skipped = plan_units(led, stage_ids, resources)
        return SubmitResult(executor, units, list(blocked), skipped)
    code, me, now = code_version(), submitter(), time.time()   # outside the lock (git)
    token = uuid.uuid4().hex[:6]
    # Choose the stages and claim them (SUBMITTING) in ONE transaction: two submits of
    # overlapping grids must not both see a stage as not queued and both submit it.
    with led.write():
        units, blocked, skipped = plan_units(led, stage_ids, resources)
        for sid, why in blocked.items():
            led.apply(Transition(sid, BLOCKED, "a parent is not complete at submit", error=why))
        for u in units:
            u.job_name = safe_name(f"bl-{grid or 'stages'}-{u.kind}-{token}")
            job = u.job_resources()
            for s in u.stages:
                u.attempt_ids.append(led.apply(Transition(
                    s.stage_id, lifecycle.SUBMITTING, "submit claims it", new_attempt={
                        "executor": executor, "job_name": u.job_name, "submitted_at": now,
                        "heartbeat_at": now, "submitter": me,
                        # The stage's own resources (what resubmit escalates) + the job's.
                        "resources": {**(u.resources if s is u.head else s.resources),
                                      "job": {k: job[k] for k in ("time_min", "mem_gb")}},
                        **code})))
    result = SubmitResult(executor, units, list(blocked), skipped)
    if not units:
        return result
    try:
        write_specs(units, workdir, _parent_kinds(led, units),
                    tracking_specs(led, grid, units, workdir))
    except OSError as e:
        _fail_unsubmitted(led, units, f"cannot write spec.json: {e}")
        raise RuntimeFailure(f"submit: cannot write spec.json under {workdir}: {e}") from None
    late: list[str] = []

    def record(batch: list[Unit]) -> None:
        late.extend(_record_job_ids(led, batch, units))
    error = "submission failed"
    try:
        backend.submit(units, on_submitted=record)
    except RuntimeFailure as e:
        error = f"submission failed: {e}"
        raise
    finally:   # jobs that got an id are recorded even if a later sbatch failed
        result.sbatch_calls = backend.sbatch_calls
        late += _record_job_ids(led, [u for u in units if u.job_id], units)
        _fail_unsubmitted(led, [u for u in units if not u.job_id], error)
        if late:
            backend.cancel(sorted(set(late)))
    return result


def tracking_specs(led: Ledger, grid: str | None, units: list[Unit],
                   workdir: Path) -> dict[str, dict]:
    """stage id -> the `tracking` of its spec.json: the grid's [tracking] settings, the grid's
    name, the cells the stage serves and where runs go. Empty when the grid tracks nothing."""
    if grid is None:
        return {}
    settings = dict(led.grid(grid).settings.get("tracking") or {})
    if settings.get("backend", "none") == "none":
        return {}
    ids = {s.stage_id for u in units for s in u.stages}
    by_point: dict[str, list] = {}
    for c in led.cells(grid):
        by_point.setdefault(c.point_id, []).append(
            {"budget": c.budget, "sft_fraction": c.sft_fraction, "method": c.method,
             "seed": c.seed, "n_sft": c.n_sft, "n_pft": c.n_pft})
    cells: dict[str, list] = {}
    for p in led.points(list(by_point)):
        for sid in p.chain:
            if sid in ids:
                cells.setdefault(sid, []).extend(by_point[p.point_id])
    base = {**settings, "grid": grid, "dir": str(Path(workdir).resolve())}
    return {sid: {**base, "cells": cells.get(sid, [])[:50]} for sid in ids}


def _parent_kinds(led: Ledger, units: list[Unit]) -> dict[str, str]:
    ids = {s.parent_id for u in units for s in u.stages if s.parent_id}
    return {s.stage_id: s.kind for s in led.stages(stage_ids=list(ids))}


def _record_job_ids(led: Ledger, batch: list[Unit], all_units: list[Unit]) -> list[str]:
    """Job ids into the SUBMITTING attempts of `batch`; the submission's other attempts get
    a heartbeat. Returns jobs to scancel: those whose attempts a concurrent `cancel` closed
    while sbatch ran (they keep CANCELLED and get the job id, instead of coming back to
    life as PENDING)."""
    to_cancel = []
    now = time.time()
    with led.write():
        for u in batch:
            for s, aid in zip(u.stages, u.attempt_ids):
                att = led.attempt(aid)
                if att.job_id is not None:
                    continue   # recorded already
                if att.outcome != lifecycle.SUBMITTING:
                    led.apply(Transition(s.stage_id, None, "its job id", attempt_id=aid,
                                         fields={"job_id": u.job_id, "log_path": u.log_path}))
                    to_cancel.append(u.job_id)
                    continue
                led.apply(Transition(s.stage_id, lifecycle.PENDING, "the job id is recorded",
                                     attempt_id=aid, fields={
                                         "job_id": u.job_id, "raw_state": "PENDING",
                                         "log_path": u.log_path, "heartbeat_at": now}))
        # Still waiting for their sbatch: the submitter is alive.
        led.heartbeat([aid for u in all_units if u.job_id is None for aid in u.attempt_ids], now)
    return to_cancel


def _fail_unsubmitted(led: Ledger, units: list[Unit], error: str) -> None:
    with led.write():
        for u in units:
            for s, aid in zip(u.stages, u.attempt_ids):
                if led.attempt(aid).outcome == lifecycle.SUBMITTING:
                    led.apply(Transition(s.stage_id, "FAILED", "sbatch or the spec write failed",
                                         attempt_id=aid, error=error))


# -- resubmitting -------------------------------------------------------------------------------
def resubmit(led: Ledger, workdir: str | Path, grid: str | None = None,
             states=lifecycle.RESUBMIT_DEFAULT, executor: str | None = None, stage_ids=None,
             dry_run: bool = False, backend=None) -> tuple[SubmitResult, list[dict]]:
    """Stages in `states` again, with escalated resources, together with the stages that can
    go now: the BLOCKED and never-run (NEW) ones below them or whose parents are COMPLETED
    or queued. Plain `resubmit` after the cause is fixed is all a grid needs.

    Returns the submission and, per stage, what changed: [{stage_id, outcome, changes}]."""
    states = tuple(s.upper() for s in states)
    bad = [s for s in states if s not in lifecycle.FAILURES]
    if bad:
        raise BadInput(f"--state: {', '.join(bad)} is not a failure class (choose from "
                       f"{', '.join(lifecycle.FAILURES)})")
    if grid is not None:
        led.grid(grid)
    in_grid = {s.stage_id: s for s in (led.stages(grid=grid) if grid else led.stages())}
    chosen = list(stage_ids) if stage_ids else [sid for sid, s in in_grid.items()
                                                if s.state in states]
    todo = dict.fromkeys(chosen)

    def ready(st: Stage) -> bool:
        """A BLOCKED or never-run stage goes when its parent goes too, or (plain resubmit)
        when it has no parent or its parent is COMPLETED or queued."""
        if st.parent_id in todo:
            return True
        if stage_ids:
            return False
        if st.parent_id is None:
            return True
        parent = in_grid.get(st.parent_id) or led.stage(st.parent_id)
        return parent is not None and parent.state in (COMPLETED, *LIVE)
    changed = True
    while changed:
        changed = False
        for sid, st in in_grid.items():
            if sid not in todo and st.state in (BLOCKED, NEW) and ready(st):
                todo[sid] = None
                changed = True
    resources, notes = {}, []
    latest = led.latest_attempts(list(todo))
    for sid in todo:
        att = latest.get(sid)
        row = in_grid.get(sid) or led.stage(sid)
        if att is None:
            continue
        # Escalate from what the last try ran with (the stage's keys, plus excluded nodes).
        last = att.resources or {}
        base = {**row.resources, **{k: v for k, v in last.items()
                                    if k in row.resources or k == "exclude"}}
        # NODE_FAIL: exclude the node(s) that failed, not the whole allocation.
        after = escalate(base, row.state, att.failed_nodes, row.kind)
        resources[sid] = after
        diff = {k: [base.get(k), after[k]] for k in after if base.get(k) != after[k]}
        notes.append({"stage_id": sid, "kind": row.kind, "outcome": row.state,
                      "changes": diff})
    # The executor the grid ran on (not "local" because the chosen stages never ran).
    executor = executor or led.last_executor(list(todo)) or \
        led.last_executor(list(in_grid)) or "local"
    if executor == "slurm" and backend is None:
        for sid in _short_of_nodes(led, grid, todo, resources, in_grid, notes):
            del todo[sid]
    result = SubmitResult(executor, [], [], [])
    for g, ids in _by_grid(led, grid, list(todo)):
        part = submit_stages(led, ids, workdir, executor,
                             grid_settings(led, g, executor), resources=resources, grid=g,
                             dry_run=dry_run, backend=backend)
        result.units += part.units
        result.blocked += part.blocked
        result.skipped += part.skipped
        result.sbatch_calls += part.sbatch_calls
    return result, notes


def _short_of_nodes(led: Ledger, grid: str | None, todo: dict, resources: dict,
                    in_grid: dict, notes: list[dict]) -> list[str]:
    """On SLURM: drop excluded nodes that are up again (a node is avoided while it is down),
    and return the stages that need more nodes than remain up, each with a note saying so
    (submitting them would leave a job waiting silently)."""
    from budgetlab.backends.slurm import node_is_up, node_states

    states = node_states()
    if states is None:
        return []
    up = sorted(n for n, s in states.items() if node_is_up(s))
    down = sorted(n for n, s in states.items() if not node_is_up(s))
    short = []
    for sid in todo:
        row = in_grid.get(sid) or led.stage(sid)
        r = resources.get(sid) or dict(row.resources)
        note = next((n for n in notes if n["stage_id"] == sid), None)
        if r.get("exclude"):
            r["exclude"] = ",".join(n for n in r["exclude"].split(",") if n in down)
            resources[sid] = r
            change = (note or {}).get("changes", {}).get("exclude")
            if change is not None:
                if change[0] == r["exclude"] or not (change[0] or r["exclude"]):
                    del note["changes"]["exclude"]
                else:
                    change[1] = r["exclude"]
        why = judge.node_shortage(int(r.get("nodes") or 1), up, down, r.get("exclude") or "")
        if why:
            short.append(sid)
            if note is None:
                note = {"stage_id": sid, "kind": row.kind, "outcome": row.state, "changes": {}}
                notes.append(note)
            note["refused"] = f"not submitted: {why}"
    return short


def grid_settings(led: Ledger, grid: str | None, executor: str) -> dict:
    """The [slurm] or [local] table of the grid as registered."""
    if grid is None:
        names = [g.name for g in led.grids()]
        grid = names[0] if len(names) == 1 else None
    if grid is None:
        return {}
    return dict(led.grid(grid).settings.get(executor) or {})


def _by_grid(led: Ledger, grid: str | None, stage_ids: list[str]) -> list[tuple]:
    """[(grid, stage ids)]: each stage goes with the first grid (by name) that holds it, so
    it is submitted with that grid's [slurm]/[local] settings. A parent belongs to every
    grid its children belong to, so it lands in the same or an earlier group and is
    submitted first."""
    if not stage_ids:
        return []
    if grid is not None:
        return [(grid, stage_ids)]
    left, groups = dict.fromkeys(stage_ids), []
    for g in sorted(g.name for g in led.grids()):
        members = set(led.grid_stage_ids(g))
        ids = [s for s in left if s in members]
        if ids:
            groups.append((g, ids))
            for s in ids:
                del left[s]
    if left:
        groups.append((None, list(left)))
    return groups


# -- cancel, wait, logs -----------------------------------------------------------------------
def cancel(led: Ledger, workdir: str | Path, grid: str | None = None,
           point: str | None = None, backend=None) -> list:
    """scancel (or stop locally) every queued/running stage of a grid or a point; the
    ledger keeps the attempts, marked CANCELLED. Returns the cancelled attempts."""
    ids = None
    if point is not None:
        p = led.point(point)
        if p is None:
            raise BadInput(f"cancel: unknown point id {point!r} in {led.path}")
        ids = set(p.chain)
    elif grid is not None:
        led.grid(grid)
        ids = set(led.grid_stage_ids(grid))
    atts = [a for a in led.open_attempts() if ids is None or a.stage_id in ids]
    by_exec: dict[str, list[str]] = {}
    for a in atts:
        if a.job_id:
            by_exec.setdefault(a.executor, []).append(a.job_id)
    for name, jobs in by_exec.items():
        (backend or get_backend(name, Path(workdir))).cancel(sorted(set(jobs)))
    msg = "cancelled by budgetlab cancel"
    with led.write():
        still_open = {a.attempt_id for a in led.open_attempts()}   # re-read under the lock
        atts = [a for a in atts if a.attempt_id in still_open]
        for a in atts:
            led.apply(Transition(a.stage_id, "CANCELLED", "budgetlab cancel",
                                 attempt_id=a.attempt_id, error=msg,
                                 fields={"ended_at": time.time()}))
    return atts


def wait(led: Ledger, workdir: str | Path, grid: str, poll_s: float = 2.0,
         timeout_s: float | None = None, on_sync=None, backends=None) -> dict:
    """Sync until no stage of the grid is queued or running; returns the last status.

    on_sync(status_dict) is called after every sync (a progress bar, for instance)."""
    from budgetlab.status import status
    from budgetlab.sync import sync

    start = time.time()
    while True:
        sync(led, workdir, backends=backends)
        st = status(led, grid)
        if on_sync is not None:
            on_sync(st)
        if st["active"] == 0:
            return st
        if timeout_s is not None and time.time() - start > timeout_s:
            return st
        time.sleep(poll_s)


def logs(led: Ledger, workdir: str | Path, ident: str, lines: int = 40) -> dict:
    """The latest attempt's log of a stage or a point (a point shows its newest stage
    attempt): {"stage_id", "attempt_id", "job_id", "path", "tail"}."""
    stage = led.stage(ident)
    if stage is None:
        p = led.point(ident)
        if p is None:
            raise BadInput(f"logs: {ident!r} is neither a stage id nor a point id in {led.path}")
        found = [a for a in led.latest_attempts(p.chain).values()]
        if not found:
            raise BadInput(f"logs: point {ident} has no attempt yet")
        att = max(found, key=lambda a: a.attempt_id)
        sid = att.stage_id
    else:
        sid, att = ident, led.latest_attempt(ident)
        if att is None:
            raise BadInput(f"logs: stage {ident} has no attempt yet (state {stage.state})")
    path = att.log_path
    tail = ""
    if path and Path(path).exists():
        with open(path, "rb") as f:
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(0, size - 200_000))
            tail = "\n".join(f.read().decode(errors="replace").splitlines()[-lines:])
    return {"stage_id": sid, "attempt_id": att.attempt_id, "job_id": att.job_id,
            "outcome": att.outcome, "path": path, "tail": tail,
            "exists": bool(path and Path(path).exists())}


__all__ = ["submit", "submit_stages", "resubmit", "cancel", "wait", "logs", "escalate",
           "plan_units", "SubmitResult", "Unit"]
