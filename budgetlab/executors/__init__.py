"""Executors: turn ledger stages into jobs (DESIGN section 7).

    submit(led, plan, workdir, executor="local")    register a plan, submit its pending stages
    submit_stages(led, stage_ids, workdir, ...)     submit given stages (parents before children)
    resubmit(led, workdir, grid=None, states=...)   failed stages again, with escalation
    cancel(led, workdir, grid=None, point=None)     stop queued/running work (ledger: CANCELLED)
    wait(led, workdir, grid, ...)                   sync until every stage of the grid finished
    logs(led, workdir, ident)                       path and tail of the latest attempt's log

`sync` and `status` live in budgetlab.sync. Backends: slurm.py (submitit, arrays) and
local.py (a detached runner with a concurrency limit); core.py has what they share.
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

from budgetlab.errors import BadInput
from budgetlab.executors.core import (SubmitResult, Unit, begin_attempts, escalate,
                                      finish_attempts, plan_units, record_blocked, safe_name,
                                      stage_kinds, write_specs)
from budgetlab.ledger import FAILED_DEFAULT, FINISHED, UNFINISHED, Ledger

EXECUTORS = ("local", "slurm")


def get_backend(name: str, workdir: Path, settings: dict | None = None):
    if name == "slurm":
        from budgetlab.executors.slurm import SlurmBackend
        return SlurmBackend(workdir, settings or {})
    if name == "local":
        from budgetlab.executors.local import LocalBackend
        return LocalBackend(workdir, settings or {})
    raise BadInput(f"--executor: unknown executor {name!r} (choose from {', '.join(EXECUTORS)})")


def grid_settings(led: Ledger, grid: str | None, executor: str) -> dict:
    """The [slurm] or [local] table of the grid as registered."""
    if grid is None:
        names = [g["name"] for g in led.grids()]
        grid = names[0] if len(names) == 1 else None
    if grid is None:
        return {}
    return dict(led.grid(grid)["settings"].get(executor) or {})


def submit(led: Ledger, plan, workdir: str | Path, executor: str = "local") -> SubmitResult:
    """Register the plan's cells/points/stages, then submit every stage not yet done or
    queued. Returns at once: the jobs run on their own (see wait / budgetlab.sync)."""
    settings = dict(getattr(plan.spec, executor, {}) or {})
    get_backend(executor, Path(workdir), settings)   # an unknown executor writes nothing
    led.register(plan)
    return submit_stages(led, list(plan.stages), workdir, executor, settings, grid=plan.name)


def submit_stages(led: Ledger, stage_ids: list[str], workdir: str | Path,
                  executor: str = "local", settings: dict | None = None,
                  resources: dict[str, dict] | None = None, grid: str | None = None,
                  dry_run: bool = False) -> SubmitResult:
    """Submit these stages (those not complete and not queued): one job per unit, children
    after their parents; a stage whose parent failed is left BLOCKED."""
    workdir = Path(workdir).resolve()
    backend = get_backend(executor, workdir, settings)
    if dry_run:
        return SubmitResult(executor, *plan_units(led, stage_ids, resources))
    # Choose the stages and claim them (SUBMITTING) in ONE transaction: two submits of
    # overlapping grids must not both see a stage as not queued and both submit it.
    with led.write():
        units, blocked, skipped = plan_units(led, stage_ids, resources)
        result = SubmitResult(executor, units, blocked, skipped)
        record_blocked(led, blocked)
        if not units:
            return result
        token = uuid.uuid4().hex[:6]
        for u in units:
            u.job_name = safe_name(f"bl-{grid or 'stages'}-{u.kind}-{token}")
        write_specs(units, workdir, stage_kinds(led, units))
        begin_attempts(led, units, executor)
    try:
        backend.submit(units)
    finally:   # jobs that got an id are recorded even if a later sbatch failed
        result.sbatch_calls = backend.sbatch_calls
        late = finish_attempts(led, units)
        if late:
            backend.cancel(late)
    return result


def _failed_stage_ids(led: Ledger, grid: str | None, states) -> list[str]:
    rows = led.stages(grid=grid) if grid else led.stages()
    return [r["stage_id"] for r in rows if r["state"] in states]


def resubmit(led: Ledger, workdir: str | Path, grid: str | None = None,
             states=FAILED_DEFAULT, executor: str | None = None, stage_ids=None,
             dry_run: bool = False) -> tuple[SubmitResult, list[dict]]:
    """Failed stages of failed points again, with escalated resources, and the BLOCKED
    stages below them (resubmitting a parent releases its children).

    Returns the submission and, per stage, what changed: [{stage_id, outcome, changes}]."""
    states = tuple(s.upper() for s in states)
    bad = [s for s in states if s not in FINISHED or s == "COMPLETED"]
    if bad:
        raise BadInput(f"--state: {', '.join(bad)} is not a failure class (choose from "
                       f"{', '.join(s for s in FINISHED if s != 'COMPLETED')})")
    if grid is not None:
        led.grid(grid)
    chosen = list(stage_ids) if stage_ids else _failed_stage_ids(led, grid, states)
    # Descendants that were blocked or never ran go with them.
    in_grid = {r["stage_id"]: r for r in (led.stages(grid=grid) if grid else led.stages())}
    todo = dict.fromkeys(chosen)
    changed = True
    while changed:
        changed = False
        for sid, r in in_grid.items():
            if sid not in todo and r["parent_id"] in todo and r["state"] in ("BLOCKED", "NEW"):
                todo[sid] = None
                changed = True
    resources, notes = {}, []
    used = None
    for sid in todo:
        att = led.latest_attempt(sid)
        row = in_grid.get(sid) or led.stage(sid)
        if att is None:
            continue
        # Escalate from what the last try ran with (the stage's keys, plus excluded nodes).
        last = json.loads(att["resources"] or "{}")
        base = {**row["resources"], **{k: v for k, v in last.items()
                                       if k in row["resources"] or k == "exclude"}}
        after = escalate(base, row["state"], att.get("nodes"))
        resources[sid] = after
        used = used or att["executor"]
        diff = {k: [base.get(k), after[k]] for k in after if base.get(k) != after[k]}
        notes.append({"stage_id": sid, "kind": row["kind"], "outcome": row["state"],
                      "changes": diff})
    executor = executor or used or "local"
    result = SubmitResult(executor, [], [], [])
    for g, ids in _by_grid(led, grid, list(todo)):
        part = submit_stages(led, ids, workdir, executor, grid_settings(led, g, executor),
                             resources=resources, grid=g, dry_run=dry_run)
        result.units += part.units
        result.blocked += part.blocked
        result.skipped += part.skipped
        result.sbatch_calls += part.sbatch_calls
    return result, notes


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
    for g in sorted(r["name"] for r in led.grids()):
        members = set(led.grid_stage_ids(g))
        ids = [s for s in left if s in members]
        if ids:
            groups.append((g, ids))
            for s in ids:
                del left[s]
    if left:
        groups.append((None, list(left)))
    return groups


def cancel(led: Ledger, workdir: str | Path, grid: str | None = None,
           point: str | None = None) -> list[dict]:
    """scancel (or stop locally) every queued/running stage of a grid or a point; the
    ledger keeps the attempts, marked CANCELLED. Returns the cancelled attempts."""
    from budgetlab.sync import open_attempts

    ids = None
    if point is not None:
        pts = led._rows("SELECT * FROM points WHERE point_id = ?", (point,))
        if not pts:
            raise BadInput(f"cancel: unknown point id {point!r} in {led.path}")
        ids = {pts[0][c] for c in ("sft_stage_id", "pft_stage_id", "eval_stage_id")} - {None}
    elif grid is not None:
        led.grid(grid)
        ids = set(led.grid_stage_ids(grid))
    atts = [a for a in open_attempts(led) if ids is None or a["stage_id"] in ids]
    by_exec: dict[str, list[str]] = {}
    for a in atts:
        if a["job_id"]:
            by_exec.setdefault(a["executor"], []).append(a["job_id"])
    for name, jobs in by_exec.items():
        get_backend(name, Path(workdir)).cancel(sorted(set(jobs)))
    now = time.time()
    with led.write():
        still_open = {a["attempt_id"] for a in open_attempts(led)}   # re-read under the lock
        atts = [a for a in atts if a["attempt_id"] in still_open]
        for a in atts:
            led.update_attempt(a["attempt_id"], outcome="CANCELLED", ended_at=now,
                               error="cancelled by budgetlab cancel")
            led.set_stage_state(a["stage_id"], "CANCELLED", error="cancelled by budgetlab cancel")
    return atts


def wait(led: Ledger, workdir: str | Path, grid: str, poll_s: float = 2.0,
         timeout_s: float | None = None, on_sync=None) -> dict:
    """Sync until no stage of the grid is queued or running; returns the last status.

    on_sync(status_dict) is called after every sync (a progress bar, for instance)."""
    from budgetlab.sync import status, sync

    start = time.time()
    while True:
        sync(led, workdir)
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
        pts = led._rows("SELECT * FROM points WHERE point_id = ?", (ident,))
        if not pts:
            raise BadInput(f"logs: {ident!r} is neither a stage id nor a point id in {led.path}")
        ids = [pts[0][c] for c in ("sft_stage_id", "pft_stage_id", "eval_stage_id") if pts[0][c]]
        with_att = [(led.latest_attempt(s), s) for s in ids]
        with_att = [(a, s) for a, s in with_att if a]
        if not with_att:
            raise BadInput(f"logs: point {ident} has no attempt yet")
        att, sid = max(with_att, key=lambda x: x[0]["attempt_id"])
    else:
        sid, att = ident, led.latest_attempt(ident)
        if att is None:
            raise BadInput(f"logs: stage {ident} has no attempt yet (state {stage['state']})")
    path = att["log_path"]
    tail = ""
    if path and Path(path).exists():
        with open(path, "rb") as f:
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(0, size - 200_000))
            tail = "\n".join(f.read().decode(errors="replace").splitlines()[-lines:])
    return {"stage_id": sid, "attempt_id": att["attempt_id"], "job_id": att["job_id"],
            "outcome": att["outcome"], "path": path, "tail": tail,
            "exists": bool(path and Path(path).exists())}


__all__ = ["submit", "submit_stages", "resubmit", "cancel", "wait", "logs", "get_backend",
           "escalate", "SubmitResult", "EXECUTORS", "UNFINISHED"]
