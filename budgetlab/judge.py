"""From evidence to transitions: what sync concludes about a job, as pure functions.

The evidence is what sync gathered without holding the ledger's lock: the scheduler's runs
of a job (JobRecords), the stage directories' files (result.json, error.json, run records),
whether accounting answered, whether the submitter of an unrecorded submission is alive,
the clock. The answer is a list of budgetlab.lifecycle Transitions plus the jobs to cancel
or release; sync applies them in one transaction. Nothing here reads a file or the ledger,
so every interleaving of evidence can be tried on it (tests/core/test_lifecycle.py).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from budgetlab.datamodel import Attempt, JobRecord
from budgetlab.spec import signal_before_s, slurm_time_min
from budgetlab.lifecycle import (BLOCKED, COMPLETED, LIVE, NEW, PENDING, RUNNING, SUBMITTING,
                                 Transition)

# SLURM job states -> outcome classes (DESIGN section 7).
RAW_OUTCOME = {
    "PENDING": PENDING, "REQUEUED": PENDING, "REQUEUE_HOLD": PENDING,
    "REQUEUE_FED": PENDING, "RESV_DEL_HOLD": PENDING,
    "CONFIGURING": RUNNING, "RUNNING": RUNNING, "COMPLETING": RUNNING,
    "SUSPENDED": RUNNING, "STAGE_OUT": RUNNING, "RESIZING": RUNNING,
    "SIGNALING": RUNNING, "STOPPED": RUNNING,
    "COMPLETED": COMPLETED, "FAILED": "FAILED", "TIMEOUT": "TIMEOUT",
    "OUT_OF_MEMORY": "OUT_OF_MEMORY", "NODE_FAIL": "NODE_FAIL", "BOOT_FAIL": "NODE_FAIL",
    "CANCELLED": "CANCELLED", "REVOKED": "CANCELLED", "DEADLINE": "TIMEOUT",
    "PREEMPTED": "PREEMPTED", "SPECIAL_EXIT": "FAILED",
}
NEVER = "DependencyNeverSatisfied"
# Seconds: a job the scheduler does not list yet, a submitter that went quiet (a site whose
# accounting lags may raise it); a preempted (or NODE_FAIL) run that no requeued run follows
# is taken as not requeued after the second, or at once when the controller lists it as ended
# (JobRecord.final).
MISSING_GRACE_S = float(os.environ.get("BUDGETLAB_MISSING_GRACE_S", 120))
PREEMPT_GRACE_S = float(os.environ.get("BUDGETLAB_PREEMPT_GRACE_S", 60))
REUSED_SLACK_S = 3600    # a record submitted this long before our attempt is another job
_INF = float("inf")


@dataclass
class StageFiles:
    """What a stage directory said when sync read it."""
    result: dict | None = None      # a valid result.json
    bad: str | None = None          # why result.json is unusable
    error: dict | None = None       # error.json
    runs: dict = field(default_factory=dict)   # (job id, restart) -> run record (head only)


@dataclass
class JobEvidence:
    runs: list[JobRecord] | None    # the scheduler's runs of the job, oldest first; None: unknown
    accounting: bool = True         # False: only squeue (finished jobs vanish from it)
    controller_down: bool = False
    now: float = 0.0
    submitter_alive: bool = True    # of attempts with no job id: may their submit still run?
    found_by_name: list[str] = field(default_factory=list)   # untracked jobs of that name


@dataclass
class Verdict:
    transitions: list[Transition] = field(default_factory=list)
    cancel: list[str] = field(default_factory=list)
    outcomes: dict = field(default_factory=dict)   # stage id -> the state it goes to
    reason: str = ""                # why the job is pending, as the scheduler says


def submitter_may_run(a: Attempt, alive: bool | None, now: float) -> bool:
    """A SUBMITTING attempt without a job id: is its submit possibly still at work? Its
    process on this host says so; elsewhere, a heartbeat in the grace period."""
    if alive is not None:
        return alive
    last = max(a.heartbeat_at or 0.0, a.submitted_at or 0.0)
    return now - last <= MISSING_GRACE_S


def judge_job(group: list[Attempt], rows_of: dict[str, list[Attempt]],
              files: dict[str, StageFiles], ev: JobEvidence) -> Verdict:
    """The transitions of one job's attempts (its training stage first, then its evals).

    rows_of[stage] lists every attempt row of the stage in this job (one per run of a
    requeued job), oldest first; the last is the stage's latest attempt."""
    v = Verdict()
    group = sorted(group, key=lambda a: a.attempt_id)
    runs = ev.runs
    if runs:   # runs of a reused job id (submitted long before our attempt) are someone else's
        first = min(a.submitted_at or ev.now for a in group)
        runs = [r for r in runs if r.submit is None or r.submit >= first - REUSED_SLACK_S]
        # A record listed twice (sacct's grouped array line and the task's own) is one run;
        # runs in the order they happened.
        runs = sorted(set(runs), key=lambda r: (r.submit or 0.0, r.start or _INF,
                                                r.end or _INF)) or None
    head_ok = True
    head_wall = 0.0
    for pos, a in enumerate(group):
        is_head = pos == 0
        f = files.get(a.stage_id) or StageFiles()
        rows = rows_of.get(a.stage_id) or [a]
        if runs and len(runs) < len(rows) and f.result is None:
            continue   # a stale record (fewer runs than rows already seen): wait for news
        current = _runs_to_rows(v, a, rows, runs, f, is_head)
        run = runs[-1] if runs else None
        update = _run_fields(run, f, a.job_id, len(runs or ()) - 1, is_head)
        outcome, error = _outcome(current, run, f, ev, is_head, head_ok, v)
        done = current.attempt_id is not None and current.outcome == COMPLETED
        if done and outcome != COMPLETED:
            # COMPLETED is final: its job is followed only for times and compute. What the
            # files say now (a later write over result.json) cannot undo the recorded result.
            outcome, error = COMPLETED, None
        if is_head:
            head_ok = outcome == COMPLETED
        if run is not None and is_head and len(group) > 1:
            for other in group[1:]:   # the evals of this job get their own share
                col, secs = _share(run, files.get(other.stage_id))
                update[col] = max(0.0, (update.get(col) or 0.0) - secs)
                head_wall += secs
        elif run is not None and not is_head:
            col, secs = _share(run, f)
            update[col] = secs
        v.outcomes[a.stage_id] = outcome
        if outcome == SUBMITTING:
            continue   # its submit may still be at work: nothing to say yet
        if outcome == COMPLETED:
            if run is None and a.outcome == COMPLETED:
                update["ended_at"] = update.get("ended_at") or ev.now   # gone: stop following
            t = Transition(a.stage_id, COMPLETED, "result.json", attempt_id=current.attempt_id,
                           fields={**update, "error": None}, result=None if done else f.result)
        else:
            t = Transition(a.stage_id, outcome, _evidence(outcome, run),
                           attempt_id=current.attempt_id, error=error, fields=update)
        if current.attempt_id is None:     # the newest run of a requeued job: a new row
            t.new_attempt, t.attempt_id = _template(a), None
        v.transitions.append(t)
    return v


def _runs_to_rows(v: Verdict, a: Attempt, rows: list[Attempt], runs, f: StageFiles,
                  is_head: bool) -> Attempt:
    """Close the rows of a requeued job's earlier runs (and make rows for runs no sync saw);
    returns the row of the newest run (attempt_id None: a row to create)."""
    if not runs or len(runs) < 2 or len(runs) < len(rows):
        return rows[-1]
    for i, r in enumerate(runs[:-1]):
        fields = {"raw_state": r.raw_state, "started_at": r.start, "ended_at": r.end,
                  "nodes": r.nodes or None, "exit_code": r.exit_code or None}
        if r.failed_nodes:
            fields["failed_nodes"] = r.failed_nodes
        if is_head:
            fields.update(_compute(r))
            rec = f.runs.get((a.job_id, i)) or {}
            if rec.get("resumed_from_step") is not None:
                fields["resumed_from_step"] = rec["resumed_from_step"]
        outcome = _interrupted_outcome(r, a.resources)
        if i < len(rows):
            if rows[i].outcome in LIVE:
                v.transitions.append(Transition(a.stage_id, outcome, "requeued: a later run",
                                                attempt_id=rows[i].attempt_id, fields=fields,
                                                latest=False))
        else:
            v.transitions.append(Transition(a.stage_id, outcome, "requeued: a later run",
                                            new_attempt=_template(a), fields=fields,
                                            latest=False))
    if len(rows) >= len(runs):
        return rows[len(runs) - 1]
    return Attempt(attempt_id=None, stage_id=a.stage_id, job_id=a.job_id, outcome=PENDING)


def _template(a: Attempt) -> dict:
    """The columns a requeued run's new row takes from the job's first row."""
    return {"executor": a.executor, "job_id": a.job_id, "job_name": a.job_name,
            "submitted_at": a.submitted_at, "resources": a.resources, "log_path": a.log_path,
            "budgetlab_version": a.budgetlab_version, "git_commit": a.git_commit,
            "git_dirty": a.git_dirty, "submitter": a.submitter}


def _run_fields(run, f: StageFiles, job_id, restart: int, is_head: bool) -> dict:
    if run is None:
        return {}
    pending = RAW_OUTCOME.get(run.raw_state) == PENDING   # reasons of others are stale
    out = {"raw_state": run.raw_state + (f" ({run.reason})" if pending and run.reason
                                         and run.reason != "None" else ""),
           "started_at": run.start, "ended_at": run.end, "nodes": run.nodes or None,
           "exit_code": run.exit_code or None}
    if run.failed_nodes:
        out["failed_nodes"] = run.failed_nodes
    if is_head:
        out.update(_compute(run))
        rec = f.runs.get((job_id, restart)) or {}
        if rec.get("resumed_from_step") is not None:
            out["resumed_from_step"] = rec["resumed_from_step"]
    return out


def _outcome(a: Attempt, run, f: StageFiles, ev: JobEvidence, is_head: bool, head_ok: bool,
             v: Verdict) -> tuple[str, str | None]:
    live = run is not None and RAW_OUTCOME.get(run.raw_state) in (PENDING, RUNNING)
    if f.result is not None:
        return COMPLETED, None
    if f.bad is not None and not live:
        return "FAILED", f.bad
    keep = a.outcome if a.outcome in LIVE else RUNNING
    if run is None:
        age = ev.now - (a.submitted_at or ev.now)
        if a.job_id is None:
            if ev.submitter_alive:
                return a.outcome, None
            msg = "the submission was interrupted before its job id was recorded"
            if ev.found_by_name:
                msg += f"; its job(s) {', '.join(ev.found_by_name)} found by name and cancelled"
                v.cancel += ev.found_by_name
            return "MISSING", msg
        if ev.controller_down or age <= MISSING_GRACE_S:
            return keep, None
        if f.error is not None:
            return f.error.get("outcome") or "FAILED", f.error.get("message")
        if ev.accounting:
            return "MISSING", f"the scheduler no longer knows job {a.job_id} and the stage " \
                              f"left no result"
        return "MISSING", f"job {a.job_id} left the queue without result.json or error.json " \
                          f"(killed: out of memory, SIGKILL or a lost node; accounting is off, " \
                          f"so the scheduler cannot say which)"
    raw = RAW_OUTCOME.get(run.raw_state, "FAILED")
    if raw == PENDING and is_head:
        v.reason = run.reason or ""
    if raw in (PENDING, RUNNING):
        return raw, None
    if raw == "PREEMPTED" and f.error is None:
        if not run.final and ev.now - (run.end or ev.now) < PREEMPT_GRACE_S:
            return keep, None      # a requeued run may still appear
        return "PREEMPTED", f"job {a.job_id} was preempted and the site did not requeue it; " \
                            f"resubmit resumes from its newest checkpoint"
    if raw == "NODE_FAIL" and not run.final and ev.now - (run.end or ev.now) < PREEMPT_GRACE_S:
        # SLURM requeues a job that lost a node: its next run may not be in accounting yet.
        # (Not only without error.json: the ranks that survive write one when their peers
        # vanish; every stage of the job waits the same grace.)
        return keep, None
    return _ended_outcome(run, f, is_head, head_ok)


def _ended_outcome(run, f: StageFiles, is_head: bool, head_ok: bool) -> tuple[str, str | None]:
    """Outcome and error of a stage whose job ended without a valid result."""
    raw = RAW_OUTCOME.get(run.raw_state, "FAILED")
    if not is_head and not head_ok and raw in ("FAILED", COMPLETED):
        return BLOCKED, "the training stage it evaluates did not complete"
    err = f.error
    if raw in ("FAILED", COMPLETED, "PREEMPTED") and err:
        return err.get("outcome") or "FAILED", err.get("message")
    if raw == COMPLETED:
        return "FAILED", "the job ended without writing result.json"
    msg = f"job {run.job_id} ended {run.raw_state}"
    if raw == "NODE_FAIL":
        msg += (f": node {run.failed_nodes} of {run.nodes} failed" if run.failed_nodes else
                f": a node of {run.nodes} failed (none of them is down now)")
    if run.exit_code and run.exit_code != "0:0":
        msg += f" (exit code {run.exit_code})"
    if err and err.get("message"):
        msg += f"; last error: {err['message']}"
    return raw, msg


def _evidence(outcome: str, run) -> str:
    return f"scheduler record {run.raw_state}" if run is not None else f"stage files ({outcome})"


def _interrupted_outcome(run, resources: dict) -> str:
    """A run that was requeued: NODE_FAIL (SLURM requeues a job that lost a node), PREEMPTED,
    or TIMEOUT when it ended near its time limit."""
    if RAW_OUTCOME.get(run.raw_state) == "NODE_FAIL":
        return "NODE_FAIL"
    if run.raw_state == "PREEMPTED":
        return "PREEMPTED"
    job = resources.get("job") or resources
    if not job.get("time_min"):
        return "PREEMPTED"
    limit = slurm_time_min(job) * 60
    if run.start and run.end and run.end - run.start >= limit - signal_before_s(job) - 30:
        return "TIMEOUT"
    return "PREEMPTED"


def _compute(run) -> dict:
    elapsed = float(run.elapsed or 0)
    if run.gpus:
        return {"gpus": run.gpus, "gpu_seconds": elapsed * run.gpus, "cpu_seconds": None}
    return {"gpus": 0, "gpu_seconds": 0.0, "cpu_seconds": elapsed * max(1, run.cpus or 1)}


def _share(run, f: StageFiles | None) -> tuple[str, float]:
    """The compute of a stage that ran after the training stage in the same job: its own
    wall time x the job's GPUs (or CPUs)."""
    wall = float(((f.result if f else None) or {}).get("wall_seconds") or 0.0)
    wall = min(wall, float(run.elapsed or 0))
    if run.gpus:
        return "gpu_seconds", wall * run.gpus
    return "cpu_seconds", wall * max(1, run.cpus or 1)


# -- nodes ----------------------------------------------------------------------------------------
def node_shortage(needed: int, up: list[str], down: list[str], exclude: str = "") -> str | None:
    """Why a job of `needed` nodes cannot run on what is up now (None: it can), in one line.
    `exclude` lists nodes the job may not use."""
    banned = {x for x in exclude.split(",") if x}
    usable = [n for n in up if n not in banned]
    if needed <= len(usable):
        return None
    why = [f"{', '.join(down)} down"] if down else []
    if banned & set(up):
        why.append(f"{', '.join(sorted(banned & set(up)))} excluded")
    return (f"the remaining nodes cannot meet the request: {needed} node(s) needed, "
            f"{len(usable)} usable ({'; '.join(why) or 'no node is up'})")


# -- stages that wait on parents ----------------------------------------------------------------
def judge_waiting(parent_id: str | None, parent_state: str | None, parent_ended: bool,
                  reason: str, group: list[Attempt]) -> tuple[list[Transition], str]:
    """A queued job whose training stage has a parent. ([], "") while the parent may still
    complete; ([], "release") when the parent COMPLETED but the job still waits on its
    dependency after the parent's job ended (SLURM: DependencyNeverSatisfied, since that
    job did not end well); (BLOCKED transitions, "cancel") when the parent ended without
    completing: the job would never run."""
    if parent_id is None or parent_state is None or parent_state in LIVE:
        return [], ""
    if parent_state == COMPLETED:
        waits = reason == NEVER or reason.startswith("Dependency") and parent_ended
        return [], "release" if waits else ""
    msg = f"parent stage {parent_id} ended {parent_state}"
    return [Transition(a.stage_id, BLOCKED, "its job waits on a parent that did not complete",
                       attempt_id=a.attempt_id, error=msg) for a in group], "cancel"


def judge_blocked(stage_id: str, parent_id: str | None, parent_state: str | None) \
        -> Transition | None:
    """BLOCKED means "a parent is not complete": once it is, the stage is ready (NEW), and
    plain `resubmit` (or the next `submit`) gives it a job."""
    if parent_state == COMPLETED or parent_id is None:
        return Transition(stage_id, NEW, "every parent is COMPLETED again",
                          error="ready: its parent completed; `budgetlab resubmit` submits it")
    return None
