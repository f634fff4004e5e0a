"""sync: scheduler states and stage results into the ledger; status: what a grid looks like.

One sync makes ONE sacct call for every unfinished SLURM attempt (squeue plus the stage
directories where accounting is disabled, said once) and reads the local runner's state
files. The raw scheduler state is kept beside the classified outcome. A valid result.json
wins over the scheduler; a corrupt one is a failed attempt with the reason.

A SLURM job that was requeued (preemption, time limit) has several runs in `sacct -D`:
each run is one attempt row of the same job id, with the step it resumed from (the job
wrapper's log/run-<job>-<restart>.json).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from budgetlab.ledger import UNFINISHED, Ledger
from budgetlab.stagedir import StageDir, StageFileError, read_json

# SLURM job states -> outcome classes (DESIGN section 7).
RAW_OUTCOME = {
    "PENDING": "PENDING", "REQUEUED": "PENDING", "REQUEUE_HOLD": "PENDING",
    "REQUEUE_FED": "PENDING", "RESV_DEL_HOLD": "PENDING",
    "CONFIGURING": "RUNNING", "RUNNING": "RUNNING", "COMPLETING": "RUNNING",
    "SUSPENDED": "RUNNING", "STAGE_OUT": "RUNNING", "RESIZING": "RUNNING",
    "SIGNALING": "RUNNING", "STOPPED": "RUNNING",
    "COMPLETED": "COMPLETED", "FAILED": "FAILED", "TIMEOUT": "TIMEOUT",
    "OUT_OF_MEMORY": "OUT_OF_MEMORY", "NODE_FAIL": "NODE_FAIL", "BOOT_FAIL": "NODE_FAIL",
    "CANCELLED": "CANCELLED", "REVOKED": "CANCELLED", "DEADLINE": "TIMEOUT",
    "PREEMPTED": "PREEMPTED", "SPECIAL_EXIT": "FAILED",
}
NEVER = "DependencyNeverSatisfied"
MISSING_GRACE_S = 120      # sacct may not list a job in the first moments after sbatch
REUSED_SLACK_S = 3600      # a record submitted this long before our attempt is another job

_said_no_accounting = False


@dataclass
class SyncReport:
    attempts: int = 0              # unfinished attempts looked at
    changed: int = 0
    completed: int = 0
    failed: int = 0
    blocked: int = 0
    sacct_calls: int = 0
    squeue_calls: int = 0
    controller_down: bool = False  # slurmctld did not answer `scontrol ping`
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def open_attempts(led: Ledger, with_ending: bool = False) -> list[dict]:
    """The latest attempt of every stage whose outcome is not final; with_ending adds the
    ones completed by their result.json while their job had not ended yet (sync follows them
    to the end: final times, compute, and the runs of a requeued job)."""
    marks = ",".join("?" * len(UNFINISHED))
    ending = " OR (a.outcome = 'COMPLETED' AND a.ended_at IS NULL AND a.job_id IS NOT NULL)" \
        if with_ending else ""
    return led._rows(
        f"SELECT a.* FROM attempts a JOIN (SELECT stage_id, MAX(attempt_id) AS m FROM attempts "
        f"GROUP BY stage_id) l ON a.attempt_id = l.m WHERE a.outcome IN ({marks}){ending} "
        f"ORDER BY a.attempt_id", UNFINISHED)


def _say(msg: str, report: SyncReport) -> None:
    report.notes.append(msg)
    print(f"budgetlab: {msg}", file=sys.stderr)


# -- reading the executors ------------------------------------------------------------------
def _slurm_runs(job_ids: list[str], report: SyncReport) -> tuple[dict, bool]:
    """job id -> list of runs, and whether accounting answered."""
    global _said_no_accounting
    from budgetlab.executors import slurm

    down = slurm.controller_down()
    if down:
        # sacct still answers (slurmdbd), but what it says about running jobs is frozen and
        # jobs cannot end or start: say so, and mark nothing MISSING until it is back.
        report.controller_down = True
        _say(f"warning: the SLURM controller does not answer ({down}); scheduler states are "
             f"from accounting and may be stale, nothing is marked MISSING until it is back",
             report)
    try:
        report.sacct_calls += 1
        return slurm.sacct(job_ids), not down
    except slurm.AccountingDisabled as e:
        if not _said_no_accounting:
            _say(f"SLURM accounting is disabled ({e}): using squeue and the stage "
                 f"directories; finished jobs are judged by result.json/error.json only", report)
            _said_no_accounting = True
        report.squeue_calls += 1
        return slurm.squeue(job_ids), False


def _local_runs(workdir: Path, job_ids: list[str]) -> dict:
    from budgetlab.executors.local import ensure_runner, read_states
    from budgetlab.executors.slurm import JobRecord

    states = read_states(workdir, job_ids)
    out = {}
    for jid, st in states.items():
        out[jid] = [JobRecord(job_id=jid, raw_state=st.get("state", "PENDING"),
                              reason=st.get("reason", ""), exit_code=st.get("exit_code", ""),
                              start=st.get("started_at"), end=st.get("ended_at"),
                              elapsed=((st.get("ended_at") or time.time()) -
                                       st["started_at"]) if st.get("started_at") else 0.0,
                              nodes=st.get("nodes", ""), cpus=int(st.get("cpus") or 1))]
    if any(r[0].raw_state in ("PENDING", "RUNNING") for r in out.values()):
        ensure_runner(workdir)   # a runner that died or exited early is replaced
    return out


# -- classification -------------------------------------------------------------------------
def _stage_result(stage: StageDir) -> tuple[dict | None, str | None]:
    """(valid result, None) or (None, why it is unusable) or (None, None) if absent."""
    try:
        return stage.read_result(), None
    except (StageFileError, OSError) as e:
        return None, str(e)


def _run_record(stage: StageDir, job_id: str, restart: int) -> dict:
    p = stage.log_dir / f"run-{job_id}-{restart}.json"
    try:
        return read_json(p) if p.exists() else {}
    except (StageFileError, OSError):
        return {}


def _interrupted_outcome(run, resources: dict) -> str:
    """A run that was requeued: PREEMPTED, or TIMEOUT when it ended near its time limit."""
    if run.raw_state == "PREEMPTED":
        return "PREEMPTED"
    limit = float((resources.get("job") or resources).get("time_min") or 0) * 60
    if run.start and run.end and limit and run.end - run.start >= limit - min(120, max(15, limit * 0.25)) - 30:
        return "TIMEOUT"
    return "PREEMPTED"


def _ended_outcome(run, stage: StageDir, is_head: bool, head_ok: bool) -> tuple[str, str | None]:
    """Outcome and error of a stage whose job ended without a valid result."""
    raw = RAW_OUTCOME.get(run.raw_state, "FAILED")
    if not is_head and not head_ok and raw in ("FAILED", "COMPLETED"):
        return "BLOCKED", "the training stage it evaluates did not complete"
    err = stage.read_error()
    if raw in ("FAILED", "COMPLETED") and err:
        return err.get("outcome") or "FAILED", err.get("message")
    if raw == "COMPLETED":
        return "FAILED", "the job ended without writing result.json"
    msg = f"job {run.job_id} ended {run.raw_state}"
    if run.exit_code and run.exit_code != "0:0":
        msg += f" (exit code {run.exit_code})"
    if err and err.get("message"):
        msg += f"; last error: {err['message']}"
    return raw, msg


def _compute(run, gpus_fallback: int) -> dict:
    gpus = run.gpus or 0
    elapsed = float(run.elapsed or 0)
    if gpus:
        return {"gpus": gpus, "gpu_seconds": elapsed * gpus, "cpu_seconds": None}
    return {"gpus": 0, "gpu_seconds": 0.0, "cpu_seconds": elapsed * max(1, run.cpus or 1)}


# -- sync -------------------------------------------------------------------------------------
def sync(led: Ledger, workdir: str | Path) -> SyncReport:
    """Read every unfinished attempt's scheduler state and stage directory into the ledger."""
    workdir = Path(workdir).resolve()
    report = SyncReport()
    atts = open_attempts(led, with_ending=True)
    report.attempts = len(atts)
    if not atts:
        return report
    by_exec: dict[str, list[dict]] = {}
    for a in atts:
        by_exec.setdefault(a["executor"] or "local", []).append(a)
    runs: dict[tuple[str, str], list] = {}
    accounting = {}
    for name, group in by_exec.items():
        ids = sorted({a["job_id"] for a in group if a["job_id"]})
        if name == "slurm":
            found, accounting[name] = _slurm_runs(ids, report) if ids else ({}, True)
        else:
            found, accounting[name] = _local_runs(workdir, ids), True
        for jid, rs in found.items():
            runs[(name, jid)] = rs
    to_cancel: dict[str, set[str]] = {}
    now = time.time()
    orphans = _orphan_jobs(workdir, atts, now, report)
    for executor, jid in orphans.values():
        to_cancel.setdefault(executor, set()).add(jid)
    # Attempts of one job (a training stage and its eval) are judged together, head first.
    jobs: dict[tuple[str, str | None], list[dict]] = {}
    for a in atts:
        jobs.setdefault((a["executor"], a["job_id"] or f"?{a['attempt_id']}"), []).append(a)
    with led.write():
        # Another command (cancel, resubmit) may have closed or replaced an attempt since we
        # read it: writing our older view over it would revive a dead attempt. Those jobs
        # wait for the next sync.
        current = {a["attempt_id"]: a["outcome"] for a in open_attempts(led, with_ending=True)}
        jobs = {k: g for k, g in jobs.items()
                if all(current.get(a["attempt_id"]) == a["outcome"] for a in g)}
        for (executor, jid), group in jobs.items():
            _sync_job(led, workdir, executor, jid, group, runs.get((executor, jid)),
                      accounting.get(executor, True), now, report, to_cancel, orphans)
        _block_orphans(led, jobs, report, to_cancel)
    for name, ids in to_cancel.items():
        from budgetlab.executors import get_backend
        get_backend(name, workdir).cancel(sorted(ids))
    return report


def _sync_job(led, workdir, executor, jid, group, job_runs, accounting, now, report, to_cancel,
              orphans):
    group.sort(key=lambda a: a["attempt_id"])
    stage_rows = {a["stage_id"]: led.stage(a["stage_id"]) for a in group}
    # Runs of a reused job id (submitted long before our attempt) are someone else's.
    first_submit = min(a["submitted_at"] or now for a in group)
    if job_runs:
        job_runs = [r for r in job_runs if r.submit is None or r.submit >= first_submit - REUSED_SLACK_S]
    head_ok = True
    for pos, a in enumerate(group):
        sid = a["stage_id"]
        stage = StageDir.of(workdir, sid)
        result, bad = _stage_result(stage)
        is_head = pos == 0
        update: dict = {}
        rows = [a]
        if job_runs and len(job_runs) > 1:
            rows = _attempt_rows_for_runs(led, a, job_runs)
        run = job_runs[-1] if job_runs else None
        # Earlier runs of a requeued job: close their rows.
        for row, r in zip(rows[:-1], job_runs or []):
            resources = json.loads(row["resources"] or "{}")
            rec = _run_record(stage, jid, job_runs.index(r)) if is_head else {}
            fields = dict(raw_state=r.raw_state, outcome=_interrupted_outcome(r, resources),
                          started_at=r.start, ended_at=r.end, nodes=r.nodes,
                          exit_code=r.exit_code)
            if is_head:
                fields.update(_compute(r, 0))
                if "resumed_from_step" in rec:
                    fields["resumed_from_step"] = rec["resumed_from_step"]
            led.update_attempt(row["attempt_id"], **fields)
        a = rows[-1]
        if run is not None:
            pending = RAW_OUTCOME.get(run.raw_state) == "PENDING"   # reasons of others are stale
            update.update(raw_state=run.raw_state + (f" ({run.reason})" if pending and run.reason
                                                     and run.reason != "None" else ""),
                          started_at=run.start, ended_at=run.end, nodes=run.nodes or None,
                          exit_code=run.exit_code or None)
            if is_head:
                update.update(_compute(run, 0))
                rec = _run_record(stage, jid, len(job_runs) - 1)
                if rec.get("resumed_from_step") is not None:
                    update["resumed_from_step"] = rec["resumed_from_step"]
        outcome, error = a["outcome"], None
        if result is not None:
            outcome = "COMPLETED"
        elif bad is not None and (run is None or RAW_OUTCOME.get(run.raw_state) not in ("PENDING", "RUNNING")):
            outcome, error = "FAILED", bad
        elif run is None:
            if a["job_id"] is None and (now - (a["submitted_at"] or now)) > MISSING_GRACE_S:
                outcome, error = "MISSING", "the submission was interrupted before its job " \
                    "id was recorded"
                if a["job_name"] in orphans:
                    error += f"; its job {orphans[a['job_name']][1]} was found by name and cancelled"
            elif a["job_id"] is not None and accounting and \
                    now - (a["submitted_at"] or now) > MISSING_GRACE_S:
                err = stage.read_error()
                if err is not None:
                    outcome, error = err.get("outcome") or "FAILED", err.get("message")
                else:
                    outcome, error = "MISSING", f"the scheduler no longer knows job {jid} " \
                                                f"and the stage left no result"
            elif a["job_id"] is not None and not accounting:
                err = stage.read_error()
                if err is not None:
                    outcome, error = err.get("outcome") or "FAILED", err.get("message")
        else:
            raw = RAW_OUTCOME.get(run.raw_state, "FAILED")
            if raw == "PENDING" and run.reason == NEVER:
                outcome, error = "BLOCKED", "its parent stage did not complete"
                to_cancel.setdefault(executor, set()).add(jid)
            elif raw in ("PENDING", "RUNNING"):
                outcome = raw
            elif raw == "PREEMPTED":
                outcome = "PREEMPTED"   # requeued by SLURM: a new run will appear
            else:
                outcome, error = _ended_outcome(run, stage, is_head, head_ok)
        if is_head and outcome != "COMPLETED":
            head_ok = False
        if run is not None and is_head and len(group) > 1:
            for other in group[1:]:   # the evals of this job get their own share
                col, secs = _share(run, StageDir.of(workdir, other["stage_id"]))
                update[col] = max(0.0, (update.get(col) or 0.0) - secs)
        elif run is not None and not is_head:
            col, secs = _share(run, stage)
            update[col] = secs
        if outcome == "COMPLETED":
            if run is None and a["outcome"] == "COMPLETED":
                update["ended_at"] = update.get("ended_at") or now   # gone: stop following
            led.update_attempt(a["attempt_id"], error=None, **update)
            if a["outcome"] != "COMPLETED" or stage_rows[sid]["state"] != "COMPLETED":
                report.changed += 1
                report.completed += 1
            led.record_result(sid, a["attempt_id"], result)
            continue
        update["outcome"] = outcome
        if error is not None:
            update["error"] = error[:2000]
        led.update_attempt(a["attempt_id"], **update)
        if stage_rows[sid]["state"] != outcome:
            report.changed += 1
            report.failed += outcome in ("FAILED", "TIMEOUT", "OUT_OF_MEMORY", "CUDA_OOM",
                                         "NODE_FAIL", "MISSING")
            report.blocked += outcome == "BLOCKED"
        led.set_stage_state(sid, outcome, error=error)


def _orphan_jobs(workdir: Path, atts: list[dict], now: float, report) -> dict:
    """Jobs submitted by a `submit` that crashed before recording their ids: found by job
    name (one squeue call; the local runner's job files) so that they can be cancelled.
    Returns job name -> (executor, job id)."""
    lost = [a for a in atts if a["job_id"] is None and a["job_name"] and
            now - (a["submitted_at"] or now) > MISSING_GRACE_S]
    out: dict[str, tuple[str, str]] = {}
    names = {a["executor"]: set() for a in lost}
    for a in lost:
        names[a["executor"]].add(a["job_name"])
    if names.get("slurm"):
        from budgetlab.executors.slurm import jobs_by_name
        report.squeue_calls += 1
        for name, jid in jobs_by_name(sorted(names["slurm"])).items():
            out[name] = ("slurm", jid)
    if names.get("local"):
        for p in (workdir / "local" / "jobs").glob("*.job.json"):
            try:
                job = json.loads(p.read_text())
            except (OSError, ValueError):
                continue
            if job.get("name") in names["local"]:
                out[job["name"]] = ("local", job["job_id"])
    return out


def _block_orphans(led, jobs, report, to_cancel) -> None:
    """A queued job whose head's parent ended without completing will never run (SLURM says
    DependencyNeverSatisfied in squeue only; sacct keeps "Dependency"): BLOCKED, cancelled."""
    from budgetlab.ledger import FINISHED

    for (executor, jid), group in jobs.items():
        head = min(group, key=lambda a: a["attempt_id"])
        if led.latest_attempt(head["stage_id"])["outcome"] != "PENDING":
            continue
        parent_id = led.stage(head["stage_id"])["parent_id"]
        parent = led.stage(parent_id) if parent_id else None
        if parent is None or parent["state"] not in FINISHED or parent["state"] == "COMPLETED":
            continue
        msg = f"parent stage {parent_id} ended {parent['state']}"
        for a in group:
            latest = led.latest_attempt(a["stage_id"])
            led.update_attempt(latest["attempt_id"], outcome="BLOCKED", error=msg)
            led.set_stage_state(a["stage_id"], "BLOCKED", error=msg)
            report.blocked += 1
            report.changed += 1
        if not jid.startswith("?"):
            to_cancel.setdefault(executor, set()).add(jid)


def _share(run, stage: StageDir) -> tuple[str, float]:
    """The compute of a stage that ran after the training stage in the same job: its own
    wall time x the job's GPUs (or CPUs)."""
    res, _ = _stage_result(stage)
    wall = float((res or {}).get("wall_seconds") or 0.0)
    wall = min(wall, float(run.elapsed or 0))
    if run.gpus:
        return "gpu_seconds", wall * run.gpus
    return "cpu_seconds", wall * max(1, run.cpus or 1)


def _attempt_rows_for_runs(led: Ledger, a: dict, job_runs: list) -> list[dict]:
    """One attempt row per run of a requeued job (creates the missing ones)."""
    rows = led._rows("SELECT * FROM attempts WHERE stage_id = ? AND job_id = ? "
                     "ORDER BY attempt_id", (a["stage_id"], a["job_id"]))
    for r in job_runs[len(rows):]:
        cur = led.conn.execute(
            "INSERT INTO attempts (stage_id, executor, job_id, job_name, submitted_at, outcome, "
            "resources, log_path, budgetlab_version, git_commit, git_dirty) "
            "VALUES (?, ?, ?, ?, ?, 'PENDING', ?, ?, ?, ?, ?)",
            (a["stage_id"], a["executor"], a["job_id"], a["job_name"], r.submit or time.time(),
             a["resources"], a["log_path"], a["budgetlab_version"], a["git_commit"],
             a["git_dirty"]))
        rows.append({**a, "attempt_id": cur.lastrowid, "outcome": "PENDING"})
    return rows


# -- status -----------------------------------------------------------------------------------
def status(led: Ledger, grid: str) -> dict:
    """A grid at a glance: stages by kind x outcome, points done/total, compute, spend."""
    g = led.grid(grid)
    rows = led._rows(
        "WITH p AS (SELECT point_id FROM cells WHERE grid = ?1 AND active = 1 UNION "
        "SELECT point_id FROM baselines WHERE grid = ?1 AND active = 1), "
        "s AS (SELECT sft_stage_id AS sid FROM points WHERE point_id IN (SELECT point_id FROM p) "
        "UNION SELECT pft_stage_id FROM points WHERE point_id IN (SELECT point_id FROM p) "
        "UNION SELECT eval_stage_id FROM points WHERE point_id IN (SELECT point_id FROM p)) "
        "SELECT st.kind, st.state, COUNT(*) AS n FROM stages st "
        "WHERE st.stage_id IN (SELECT sid FROM s) GROUP BY st.kind, st.state", (grid,))
    by_kind: dict[str, dict[str, int]] = {}
    for r in rows:
        by_kind.setdefault(r["kind"], {})[r["state"]] = r["n"]
    pts = led._rows(
        "WITH p AS (SELECT point_id FROM cells WHERE grid = ?1 AND active = 1 UNION "
        "SELECT point_id FROM baselines WHERE grid = ?1 AND active = 1) "
        "SELECT COUNT(*) AS total, SUM(st.state = 'COMPLETED') AS done FROM points pt "
        "JOIN stages st ON st.stage_id = pt.eval_stage_id WHERE pt.point_id IN (SELECT point_id FROM p)",
        (grid,))[0]
    comp = led._rows(
        "WITH p AS (SELECT point_id FROM cells WHERE grid = ?1 AND active = 1 UNION "
        "SELECT point_id FROM baselines WHERE grid = ?1 AND active = 1), "
        "s AS (SELECT sft_stage_id AS sid FROM points WHERE point_id IN (SELECT point_id FROM p) "
        "UNION SELECT pft_stage_id FROM points WHERE point_id IN (SELECT point_id FROM p) "
        "UNION SELECT eval_stage_id FROM points WHERE point_id IN (SELECT point_id FROM p)) "
        "SELECT COALESCE(SUM(gpu_seconds), 0) / 3600.0 AS gpu_hours, "
        "COALESCE(SUM(cpu_seconds), 0) / 3600.0 AS cpu_hours, COUNT(*) AS attempts "
        "FROM attempts WHERE stage_id IN (SELECT sid FROM s)", (grid,))[0]
    spend = led._rows("SELECT COALESCE(SUM(annotation_cost), 0) AS cost, "
                      "COALESCE(SUM(CASE WHEN st.state = 'COMPLETED' THEN annotation_cost END), 0) "
                      "AS done FROM cells c JOIN points pt ON pt.point_id = c.point_id "
                      "JOIN stages st ON st.stage_id = pt.eval_stage_id "
                      "WHERE c.grid = ? AND c.active = 1", (grid,))[0]
    total = sum(sum(v.values()) for v in by_kind.values())
    active = sum(n for v in by_kind.values() for s, n in v.items() if s in UNFINISHED)
    return {
        "grid": grid, "stages": by_kind, "stages_total": total, "active": active,
        "stages_completed": sum(v.get("COMPLETED", 0) for v in by_kind.values()),
        "points_total": pts["total"] or 0, "points_done": pts["done"] or 0,
        "attempts": comp["attempts"], "gpu_hours": comp["gpu_hours"],
        "cpu_hours": comp["cpu_hours"],
        "annotation_unit": g["settings"].get("costs", {}).get("unit", "examples"),
        "annotation_spend": spend["cost"], "annotation_spend_done": spend["done"],
    }
