"""The stage lifecycle: states, the transitions allowed between them, and the evidence for each.

Every state write goes through `Ledger.apply(Transition)`, which calls `check` here: an
illegal transition raises IllegalTransition instead of overwriting a state. A stage's state is
NEW, BLOCKED, or the outcome of its latest attempt.

    state        meaning                                          leaves it
    NEW          registered, no job (never submitted, or ready)   submit/resubmit, or BLOCKED
    BLOCKED      a parent is not complete; no job                 resubmit; NEW once every
                                                                  parent is COMPLETED (sync)
    SUBMITTING   claimed by a submit; sbatch in progress          its job id, or the submitter
                                                                  gone (MISSING), cancel
    PENDING      queued                                           scheduler record, result.json
    RUNNING      running                                          scheduler record, result.json
    COMPLETED    a valid result.json                              never (results are immutable)
    FAILED, TIMEOUT, OUT_OF_MEMORY, CUDA_OOM, NODE_FAIL, PREEMPTED, CANCELLED, MISSING
                 the latest attempt ended without a result        resubmit

A requeued job (preemption, time limit) has one attempt row per run: the rows of earlier
runs are closed as PREEMPTED or TIMEOUT while the stage stays live with the newest run.
PREEMPTED as a stage state means the site cancelled a preempted job instead of requeueing it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

NEW, BLOCKED, SUBMITTING, PENDING, RUNNING, COMPLETED = (
    "NEW", "BLOCKED", "SUBMITTING", "PENDING", "RUNNING", "COMPLETED")
FAILURES = ("FAILED", "TIMEOUT", "OUT_OF_MEMORY", "CUDA_OOM", "NODE_FAIL", "PREEMPTED",
            "CANCELLED", "MISSING")
LIVE = (SUBMITTING, PENDING, RUNNING)                 # a job exists or is being made
STATES = (NEW, BLOCKED, *LIVE, COMPLETED, *FAILURES)
# What plain `resubmit` reruns (CANCELLED was the user's choice: only with --state).
RESUBMIT_DEFAULT = ("FAILED", "TIMEOUT", "OUT_OF_MEMORY", "CUDA_OOM", "NODE_FAIL",
                    "PREEMPTED", "MISSING")
ENDED = (COMPLETED, *FAILURES, BLOCKED)               # an attempt row that is closed

# Stage transitions: from -> {to: the evidence that allows it}.
STAGE_TRANSITIONS: dict[str, dict[str, str]] = {
    NEW: {SUBMITTING: "submit claims it", BLOCKED: "a parent is not complete at submit"},
    BLOCKED: {SUBMITTING: "resubmit", BLOCKED: "still blocked (reason updated)",
              NEW: "every parent is COMPLETED again (sync)"},
    SUBMITTING: {PENDING: "the job id is recorded", RUNNING: "scheduler record",
                 COMPLETED: "result.json", "FAILED": "sbatch or the spec write failed",
                 "MISSING": "the submitter is gone and no job id was recorded",
                 "CANCELLED": "budgetlab cancel"},
    PENDING: {PENDING: "scheduler record (a requeued run, a new reason)",
              RUNNING: "scheduler record", COMPLETED: "result.json",
              BLOCKED: "the job waits on a parent that did not complete: cancelled",
              **{f: "scheduler record / error.json / cancel" for f in FAILURES}},
    RUNNING: {RUNNING: "scheduler record", PENDING: "requeued (a new run)",
              COMPLETED: "result.json",
              BLOCKED: "the training stage of its job did not complete",
              **{f: "scheduler record / error.json / cancel" for f in FAILURES}},
    COMPLETED: {COMPLETED: "the same result read again (times, compute)"},
    **{f: {SUBMITTING: "resubmit", BLOCKED: "resubmit: a parent is not complete"}
       for f in FAILURES},
}
# Attempt rows: one try of a stage. A closed row takes no other outcome.
ATTEMPT_TRANSITIONS: dict[str, tuple[str, ...]] = {
    SUBMITTING: (SUBMITTING, PENDING, RUNNING, COMPLETED, "FAILED", "MISSING", "CANCELLED"),
    PENDING: (PENDING, RUNNING, COMPLETED, BLOCKED, *FAILURES),
    RUNNING: (RUNNING, PENDING, COMPLETED, BLOCKED, *FAILURES),
    COMPLETED: (COMPLETED,),
}


class IllegalTransition(RuntimeError):
    """A state write that the lifecycle does not allow (a bug, never a user error)."""


def check_stage(stage_id: str, frm: str, to: str, evidence: str) -> None:
    if to not in STAGE_TRANSITIONS.get(frm, {}):
        raise IllegalTransition(f"stage {stage_id}: {frm} -> {to} is not allowed ({evidence})")


def check_attempt(attempt_id: int, frm: str, to: str, evidence: str) -> None:
    if to not in ATTEMPT_TRANSITIONS.get(frm, ()):
        raise IllegalTransition(f"attempt {attempt_id}: {frm} -> {to} is not allowed "
                                f"({evidence})")


@dataclass
class Transition:
    """One state write: a stage (and its attempt row) to a new state, with the evidence.

    attempt_id None with new_attempt set creates a row (a submission, or a requeued run);
    latest=False closes an older run's row without touching the stage's state;
    to=None writes only the attempt's columns (times, compute)."""
    stage_id: str
    to: str | None
    evidence: str
    attempt_id: int | None = None
    error: str | None = None
    fields: dict = field(default_factory=dict)
    new_attempt: dict | None = None
    latest: bool = True
    result: dict | None = None     # to COMPLETED: the stage's result.json (metrics, tokens)


def table_rows() -> list[tuple[str, str, str]]:
    """(from, to, evidence) for docs and the closing note."""
    return [(f, t, e) for f, tos in STAGE_TRANSITIONS.items() for t, e in tos.items()]
