"""Node failures as pure functions: which node failed, whether the nodes that are up can
meet a job's request, and how sync judges a NODE_FAIL run (requeued or not)."""

from __future__ import annotations

from budgetlab import judge
from budgetlab.backends.slurm import _with_failed_nodes, hostnames, node_is_up
from budgetlab.datamodel import Attempt, JobRecord
from budgetlab.judge import JobEvidence, StageFiles


def test_node_states():
    assert [s for s in ("idle", "mixed", "allocated", "completing") if node_is_up(s)] == \
        ["idle", "mixed", "allocated", "completing"]
    assert not any(node_is_up(s) for s in ("down*", "allocated*", "idle*", "drained",
                                            "draining", "down", "fail", "unknown"))


def test_the_failed_node_is_the_one_that_is_down_not_the_allocation():
    assert hostnames("n[1-2],gpu07") == ["n1", "n2", "gpu07"]
    assert hostnames("None assigned") == []
    rec = JobRecord(job_id="7_0", raw_state="NODE_FAIL", nodes="n[1-3]")
    assert _with_failed_nodes(rec, ["n2", "x9"]).failed_nodes == "n2"
    assert _with_failed_nodes(rec, []).failed_nodes == ""          # it is back already
    ok = JobRecord(job_id="7_0", raw_state="COMPLETED", nodes="n[1-3]")
    assert _with_failed_nodes(ok, ["n2"]).failed_nodes == ""


def test_node_shortage_says_why_in_one_line():
    assert judge.node_shortage(2, ["n1", "n2"], []) is None
    assert judge.node_shortage(2, ["n1"], ["n2"]) == (
        "the remaining nodes cannot meet the request: 2 node(s) needed, 1 usable (n2 down)")
    why = judge.node_shortage(1, ["n1"], ["n2"], exclude="n1,n2")
    assert why.endswith("0 usable (n2 down; n1 excluded)")


def _job(now, runs, error=None):
    a = Attempt(attempt_id=1, stage_id="s", executor="slurm", job_id="7_0", outcome="RUNNING",
                submitted_at=now - 300, resources={"nodes": 2, "time_min": 10})
    files = {"s": StageFiles(error=error)}
    return judge.judge_job([a], {"s": [a]}, files, JobEvidence(runs=runs, now=now))


def test_a_requeued_node_fail_run_is_closed_as_node_fail_with_its_node():
    now = 10_000.0
    lost = JobRecord(job_id="7_0", raw_state="NODE_FAIL", nodes="n[1-2]", submit=now - 300,
                     start=now - 200, end=now - 100, failed_nodes="n2")
    again = JobRecord(job_id="7_0", raw_state="PENDING", reason="BeginTime", submit=now - 300)
    v = _job(now, [lost, again])
    old = next(t for t in v.transitions if not t.latest)
    assert old.to == "NODE_FAIL" and old.fields["failed_nodes"] == "n2"
    assert v.outcomes["s"] == "PENDING"


def test_a_node_fail_run_without_a_requeue_is_final_after_the_grace():
    now = 10_000.0
    err = {"outcome": "FAILED", "message": "RuntimeError: gloo: Connection reset by peer"}
    lost = JobRecord(job_id="7_0", raw_state="NODE_FAIL", nodes="n[1-2]", submit=now - 300,
                     start=now - 200, end=now - 5, failed_nodes="n2")
    # The surviving ranks' error.json does not end the wait: a requeued run may follow.
    assert _job(now, [lost], error=err).outcomes["s"] == "RUNNING"
    late = now + judge.PREEMPT_GRACE_S
    v = _job(late, [lost], error=err)
    t = v.transitions[-1]
    assert t.to == "NODE_FAIL" and t.fields["failed_nodes"] == "n2"
    assert "node n2 of n[1-2] failed" in t.error and "Connection reset" in t.error


def test_an_interrupted_run_the_controller_lists_as_ended_needs_no_grace():
    """SLURM requeues at once (the job is PENDING again); a NODE_FAIL or PREEMPTED run that
    squeue still lists as ended (until MinJobAge) is final: no 60 s wait for a requeue."""
    import dataclasses
    now = 10_000.0
    for raw in ("NODE_FAIL", "PREEMPTED"):
        run = JobRecord(job_id="7_0", raw_state=raw, nodes="n[1-2]", submit=now - 300,
                        start=now - 200, end=now - 5, failed_nodes="n2")
        assert _job(now, [run]).outcomes["s"] == "RUNNING"          # may be requeued
        v = _job(now, [dataclasses.replace(run, final=True)])
        assert v.outcomes["s"] == raw and v.transitions[-1].to == raw, v
