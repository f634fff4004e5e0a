"""sync: the scheduler's records and the stage directories into the ledger.

Three steps, so that no file or scheduler I/O holds the ledger's lock:
  1. gather evidence: ONE poll per backend (one sacct call on SLURM; squeue where accounting
     is disabled, said once; the local runner's state files), the stage directories' files,
     jobs of crashed submissions found by name;
  2. in one short write transaction: re-read what is open (a concurrent cancel or resubmit
     wins), judge every job (budgetlab.judge), apply the transitions (budgetlab.lifecycle),
     then the stages that wait on parents: released, blocked, or ready again;
  3. cancel and release jobs on the backends.

A requeued SLURM job has several runs in `sacct -D`: each run is one attempt row of the same
job id, with the step it resumed from (the job's log/run-<job>-<restart>.json).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from budgetlab import judge
from budgetlab.backends import get_backend
from budgetlab.datamodel import Attempt
from budgetlab.judge import JobEvidence, StageFiles
from budgetlab.ledger import Ledger
from budgetlab.lifecycle import BLOCKED, COMPLETED, LIVE, PENDING, Transition
from budgetlab.provenance import submitter_alive
from budgetlab.stagedir import StageDir, StageFileError, read_json


@dataclass
class SyncReport:
    attempts: int = 0              # open attempts looked at
    changed: int = 0
    completed: int = 0
    failed: int = 0
    blocked: int = 0
    released: int = 0              # jobs whose dead dependency was dropped
    ready: int = 0                 # BLOCKED stages whose parents completed (now NEW)
    sacct_calls: int = 0
    squeue_calls: int = 0
    controller_down: bool = False  # slurmctld did not answer `scontrol ping`
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def _say(msg: str, report: SyncReport) -> None:
    report.notes.append(msg)
    print(f"budgetlab: {msg}", file=sys.stderr)


def read_stage_files(stage: StageDir, job_id: str | None, head: bool) -> StageFiles:
    f = StageFiles()
    try:
        f.result = stage.read_result()
    except (StageFileError, OSError) as e:
        f.bad = str(e)
    f.error = stage.read_error()
    if head and job_id:
        for p in stage.log_dir.glob(f"run-{job_id}-*.json"):
            try:
                rec = read_json(p)
                f.runs[(job_id, int(p.stem.rsplit("-", 1)[1]))] = rec
            except (StageFileError, OSError, ValueError):
                continue
    return f


def sync(led: Ledger, workdir: str | Path, backends: dict | None = None,
         now: float | None = None) -> SyncReport:
    """Read every open attempt's scheduler state and stage directory into the ledger.

    backends maps an executor name to a backend object (default: get_backend(name))."""
    workdir = Path(workdir).resolve()
    report = SyncReport()
    atts = led.open_attempts(with_ending=True)
    report.attempts = len(atts)
    blocked = led.blocked_stages()
    if not atts and not blocked:
        return report
    now = time.time() if now is None else now

    def backend(name):
        if backends and name in backends:
            return backends[name]
        return get_backend(name, workdir)

    # 1. Evidence, without the lock.
    jobs: dict[tuple, list[Attempt]] = {}
    for a in atts:
        jobs.setdefault((a.executor or "local", a.job_id or f"?{a.attempt_id}"), []).append(a)
    polls = {}
    for name in sorted({k[0] for k in jobs}):
        ids = sorted({jid for (ex, jid) in jobs if ex == name and not jid.startswith("?")})
        if not ids:
            continue
        polls[name] = p = backend(name).poll(ids)
        report.sacct_calls += p.sacct_calls
        report.squeue_calls += p.squeue_calls
        report.controller_down |= bool(p.controller_down)
        for note in p.notes:
            _say(note, report)
    files = {a.stage_id: read_stage_files(StageDir.of(workdir, a.stage_id), a.job_id,
                                          head=(a is min(group, key=lambda x: x.attempt_id)))
             for group in jobs.values() for a in group}
    runs = {a.attempt_id: ref for group in jobs.values() for a in group   # workdir: resolved
            if (ref := tracking_run(StageDir(workdir / "stages" / a.stage_id), a)) is not None}
    alive = {}
    lost: dict[str, set[str]] = {}
    for (ex, jid), group in jobs.items():
        if jid.startswith("?"):
            a = group[0]
            alive[jid] = judge.submitter_may_run(a, submitter_alive(a.submitter), now)
            if not alive[jid] and a.job_name:
                lost.setdefault(ex, set()).add(a.job_name)
    by_name = {ex: backend(ex).find_by_name(sorted(names)) for ex, names in lost.items()}
    if "slurm" in by_name:
        report.squeue_calls += 1

    # 2. Judge and apply, in one transaction.
    to_cancel: dict[str, set[str]] = {}
    to_release: dict[str, set[str]] = {}
    with led.write():
        # Another command (cancel, resubmit) may have closed or replaced an attempt since we
        # read it: writing our older view over it would revive a dead attempt. Those jobs
        # wait for the next sync.
        current = {a.attempt_id: a.outcome for a in led.open_attempts(with_ending=True)}
        jobs = {k: g for k, g in jobs.items()
                if all(current.get(a.attempt_id) == a.outcome for a in g)}
        queued = []
        rows = led.rows_of_jobs(a.job_id for g in jobs.values() for a in g if a.job_id)
        states = led.stage_states([a.stage_id for g in jobs.values() for a in g])
        for (ex, jid), group in jobs.items():
            poll = polls.get(ex)
            found = []
            if jid.startswith("?") and group[0].job_name:
                known = by_name.get(ex, {}).get(group[0].job_name, [])
                found = sorted(set(known) - led.recorded_job_ids(known))
            ev = JobEvidence(
                runs=(poll.runs.get(jid) if poll else None), now=now,
                accounting=poll.accounting if poll else True,
                controller_down=bool(poll and poll.controller_down),
                submitter_alive=alive.get(jid, True), found_by_name=found)
            rows_of = {a.stage_id: rows.get((a.stage_id, a.job_id)) or [a] for a in group}
            v = judge.judge_job(group, rows_of, files, ev)
            for t in v.transitions:
                _count(states, t, report)
                led.apply(t)
            for a in group:   # the attempt's tracking run (W&B, TensorBoard), once known
                if runs.get(a.attempt_id, a.tracking) != a.tracking:
                    led.apply(Transition(a.stage_id, None, "its tracking run",
                                         attempt_id=a.attempt_id,
                                         fields={"tracking": runs[a.attempt_id]}))
            if v.cancel:
                to_cancel.setdefault(ex, set()).update(v.cancel)
            head = min(group, key=lambda a: a.attempt_id)
            if v.outcomes.get(head.stage_id) == PENDING and not jid.startswith("?"):
                queued.append((ex, jid, group, v.reason))
        # Queued jobs that need more nodes than are up (a requeued job after a NODE_FAIL):
        # said in one line, not left waiting silently.
        for ex, jid, group, reason in queued:
            poll = polls.get(ex)
            if poll is None or poll.nodes_up is None:
                continue
            head = min(group, key=lambda a: a.attempt_id)
            res = head.resources or {}
            why = judge.node_shortage(int(res.get("nodes") or 1),
                                      poll.nodes_up, poll.nodes_down or [],
                                      str(res.get("exclude") or ""))
            if why:
                _say(f"stage {head.stage_id}: job {jid} stays queued: {why}; it runs when a "
                     f"node is back, or `budgetlab cancel` it and resubmit with fewer "
                     f"[resources] nodes", report)
        # Queued jobs whose parent will never give them what they wait for.
        for ex, jid, group, reason in queued:
            head = min(group, key=lambda a: a.attempt_id)
            parent_id = led.stage(head.stage_id).parent_id
            if parent_id is None:
                continue
            parent = led.stage(parent_id)
            last = led.latest_attempt(parent_id)
            ts, action = judge.judge_waiting(parent_id, parent.state if parent else None,
                                             bool(last and last.ended_at), reason,
                                             [led.latest_attempt(a.stage_id) for a in group])
            for t in ts:
                _count(states, t, report)
                led.apply(t)
            if action == "cancel":
                to_cancel.setdefault(ex, set()).add(jid)
            elif action == "release":
                to_release.setdefault(ex, set()).add(jid)
                report.released += 1
        # BLOCKED is "a parent is not complete": re-evaluated every time.
        for st in led.blocked_stages():
            parent = led.stage(st.parent_id) if st.parent_id else None
            t = judge.judge_blocked(st.stage_id, st.parent_id, parent.state if parent else None)
            if t is not None:
                led.apply(t)
                report.ready += 1
                report.changed += 1

    # 3. The backends.
    for name, ids in to_cancel.items():
        backend(name).cancel(sorted(ids))
    for name, ids in to_release.items():
        backend(name).release(sorted(ids))
    return report


def tracking_run(stage: StageDir, att: Attempt) -> str | None:
    """The run this attempt logs to, from the stage's tracking.json (None if it has none, if
    the tracker failed to open, or if the file is an earlier attempt's)."""
    if att.tracking is not None:
        return att.tracking
    from budgetlab.progress import read_tracking, run_ref
    rec = read_tracking(stage)
    if not rec or rec.get("error") or not (rec.get("path") or rec.get("url")):
        return None
    if float(rec.get("time") or 0) < (att.submitted_at or 0):
        return None
    return run_ref(rec)


def _count(states: dict, t, report: SyncReport) -> None:
    """Tally a stage's change of state (states: stage id -> state, kept current)."""
    if not t.latest or t.to is None or states.get(t.stage_id) == t.to:
        return
    states[t.stage_id] = t.to
    report.changed += 1
    report.completed += t.to == COMPLETED
    report.blocked += t.to == BLOCKED
    report.failed += t.to not in (COMPLETED, BLOCKED, *LIVE)


__all__ = ["sync", "SyncReport", "read_stage_files"]
