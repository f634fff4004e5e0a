"""Units, arrays, escalation and sync classification, without starting any job."""

from __future__ import annotations

import json
import time

import pytest

from budgetlab.backends.slurm import SlurmBackend, expand_job_id, sbatch_parameters
from budgetlab.errors import BadInput
from budgetlab.graph import build_plan
from budgetlab.ledger import Ledger
from budgetlab.orchestrate import escalate, plan_units
from budgetlab.spec import load_spec
from budgetlab.stagedir import StageDir
from budgetlab.status import status
from budgetlab.sync import sync

from tests.conftest import record_attempt


def _ledger(tmp_path, grid_file, tiny_model, **kw):
    plan = build_plan(load_spec(grid_file(tmp_path / "g.toml", tiny_model, **kw)))
    led = Ledger(tmp_path / "ledger.db")
    led.register(plan)
    return plan, led


def test_units_put_eval_in_its_training_job(tmp_path, grid_file, tiny_model):
    plan, led = _ledger(tmp_path, grid_file, tiny_model, budgets=(16, 32),
                        fractions=(1.0, 0.5), methods=("dpo", "kto"))
    units, blocked, skipped = plan_units(led, list(plan.stages))
    assert not blocked and not skipped
    assert sum(len(u.stages) for u in units) == len(plan.stages)
    for u in units:
        assert all(s.kind == "eval" for s in u.stages[1:])
        for s in u.stages[1:]:
            assert s.parent_id == u.head.stage_id
        if u.head.parent_id:
            assert u.parent_unit is not None and u.parent_unit.head.stage_id == u.head.parent_id
    # No eval waits alone for a training stage of the same submission.
    assert not [u for u in units if u.kind == "eval" and u.parent_unit is not None]


def test_arrays_follow_parent_indices_and_split_siblings(tmp_path, grid_file, tiny_model):
    # budget 16 and 32 at f=0.5 give SFT 8 and 16; f=1.0 at 16 reuses SFT 16 (shared).
    plan, led = _ledger(tmp_path, grid_file, tiny_model, budgets=(16, 32),
                        fractions=(1.0, 0.5), methods=("dpo", "kto"))
    units, _, _ = plan_units(led, list(plan.stages))
    backend = SlurmBackend(tmp_path, {})
    roots = [u for u in units if u.parent_unit is None]
    arrays = backend._arrays(roots, max_size=1001)
    for arr in arrays:
        for u, i in zip(arr.units, arr.indices):
            u.job_id = f"{100 + arrays.index(arr)}_{i}"
    children = [u for u in units if u.parent_unit is not None]
    child_arrays = backend._arrays(children, max_size=1001)
    for arr in child_arrays:
        assert arr.dependency.startswith("aftercorr:")
        base = arr.dependency.split(":")[1]
        assert len(set(arr.indices)) == len(arr.indices)     # one task per index
        for u, i in zip(arr.units, arr.indices):
            assert u.parent_unit.job_id == f"{base}_{i}"      # task i waits for task i
    # Each SFT has a DPO and a KTO child: two child arrays per (kind) instead of one per child.
    assert len(child_arrays) < len(children)
    # A root group larger than MaxArraySize is split.
    assert len(backend._arrays(roots, max_size=1)) == len(roots)


def test_escalation():
    r = {"time_min": 30, "mem_gb": 8, "micro_batch_size": 4, "nodes": 1}
    assert escalate(r, "TIMEOUT")["time_min"] == 60
    assert escalate(r, "OUT_OF_MEMORY")["mem_gb"] == 16
    assert escalate(r, "CUDA_OOM")["micro_batch_size"] == 2
    assert escalate({**r, "micro_batch_size": 1}, "CUDA_OOM")["micro_batch_size"] == 1
    assert escalate({**r, "exclude": "n1"}, "NODE_FAIL", "n2,n1")["exclude"] == "n1,n2"
    assert escalate(r, "FAILED") == r
    # An eval's CUDA OOM halves its generation batch (on main: its micro batch, unused).
    ev = {"time_min": 30, "mem_gb": 8, "micro_batch_size": 4, "batch_size": 32}
    assert escalate(ev, "CUDA_OOM", kind="eval") == {**ev, "batch_size": 16}


def test_expand_job_ids():
    assert expand_job_id("12_[1,3-5%2]") == ["12_1", "12_3", "12_4", "12_5"]
    assert expand_job_id("12_3") == ["12_3"]
    assert expand_job_id("12") == ["12"]


def test_sbatch_parameters_from_spec():
    res = {"nodes": 2, "gpus_per_node": 4, "tasks_per_node": 4, "cpus_per_task": 8,
           "mem_gb": 1.5, "time_min": 90.5, "exclude": "bad1"}
    p = sbatch_parameters(res, {"partition": "gpu", "account": "a; rm -rf /", "exclude": "bad0",
                                "extra_sbatch": ["--reservation=r1", "--requeue"]}, "bl-x")
    assert p["nodes"] == 2 and p["ntasks_per_node"] == 4 and p["gpus_per_node"] == 4
    assert p["mem"] == "1536MB" and p["time"] == 90 and p["exclude"] == "bad0,bad1"
    assert p["account"] == "a; rm -rf /"        # a value, quoted by submitit, never a shell word
    assert p["additional_parameters"] == {"reservation": "r1", "requeue": True}
    with pytest.raises(BadInput, match="extra_sbatch"):
        sbatch_parameters(res, {"extra_sbatch": ["reservation r1"]}, "x")
    # The pre-timeout signal: a quarter of the limit within 15-120 s, or signal_before_s.
    assert p["signal_delay_s"] == 120
    assert sbatch_parameters({**res, "time_min": 1}, {}, "x")["signal_delay_s"] == 15
    assert sbatch_parameters({**res, "signal_before_s": 600}, {}, "x")["signal_delay_s"] == 600


# -- sync against local runner state files ----------------------------------------------------
def _attempt(led, unit_stage_ids, job_id, executor="local", age=0.0):
    with led.write():
        return [record_attempt(led, sid, "PENDING", executor=executor, job_id=job_id,
                               submitted_at=time.time() - age) for sid in unit_stage_ids]


def _state(workdir, job_id, **st):
    d = workdir / "local" / "jobs"
    d.mkdir(parents=True, exist_ok=True)
    (d / f"{job_id}.state.json").write_text(json.dumps({"job_id": job_id, **st}))


def _train_and_eval(plan):
    sft = next(s for s in plan.stages.values() if s.kind == "sft" and
               any(c.kind == "eval" for c in plan.children(s.stage_id)))
    ev = next(c for c in plan.children(sft.stage_id) if c.kind == "eval")
    return sft, ev


def test_sync_classifies_from_state_and_stage_dirs(tmp_path, grid_file, tiny_model):
    plan, led = _ledger(tmp_path, grid_file, tiny_model)
    wd = tmp_path / "runs"
    sft, ev = _train_and_eval(plan)
    _attempt(led, [sft.stage_id, ev.stage_id], "L7")
    # A failed training stage: its error record wins; its eval is BLOCKED.
    StageDir.of(wd, sft.stage_id).write_error({"type": "ValueError", "outcome": "FAILED",
                                               "message": "ValueError: bad row 3"})
    _state(wd, "L7", state="FAILED", exit_code="1:0", started_at=time.time() - 5,
           ended_at=time.time(), cpus=1)
    rep = sync(led, wd)
    assert led.stage(sft.stage_id).state == "FAILED"
    assert led.latest_attempt(sft.stage_id).error == "ValueError: bad row 3"
    assert led.latest_attempt(sft.stage_id).raw_state == "FAILED"
    assert led.stage(ev.stage_id).state == "BLOCKED"
    assert rep.failed == 1 and rep.blocked == 1 and not led.open_attempts()


def test_result_wins_and_corrupt_result_fails(tmp_path, grid_file, tiny_model):
    plan, led = _ledger(tmp_path, grid_file, tiny_model)
    wd = tmp_path / "runs"
    sft, ev = _train_and_eval(plan)
    _attempt(led, [sft.stage_id, ev.stage_id], "L8")
    StageDir.of(wd, sft.stage_id).write_result({"stage_id": sft.stage_id, "metrics": {"loss": 1.5},
                                                "tokens": 99, "wall_seconds": 3.0})
    StageDir.of(wd, ev.stage_id).log_dir.mkdir(parents=True)
    StageDir.of(wd, ev.stage_id).result_path.write_text('{"stage_id": "x", "metr')
    _state(wd, "L8", state="RUNNING", started_at=time.time() - 5, cpus=2)
    sync(led, wd)
    assert led.stage(sft.stage_id).state == "COMPLETED"      # the scheduler still says RUNNING
    assert led.metrics([sft.stage_id])[sft.stage_id] == {"loss": 1.5}
    assert led.latest_attempt(sft.stage_id).tokens == 99
    assert led.stage(ev.stage_id).state == "RUNNING"          # not judged while it runs
    _state(wd, "L8", state="COMPLETED", exit_code="0:0", started_at=time.time() - 5,
           ended_at=time.time(), cpus=2)
    sync(led, wd)
    att = led.latest_attempt(ev.stage_id)
    assert att.outcome == "FAILED" and "invalid JSON" in att.error
    st = status(led, "g")
    assert st["stages"]["sft"]["COMPLETED"] == 1 and st["stages"]["eval"]["FAILED"] == 1


def test_unknown_job_becomes_missing_after_grace(tmp_path, grid_file, tiny_model):
    plan, led = _ledger(tmp_path, grid_file, tiny_model)
    wd = tmp_path / "runs"
    sft, ev = _train_and_eval(plan)
    _attempt(led, [sft.stage_id], "L99")
    sync(led, wd)
    assert led.stage(sft.stage_id).state == "PENDING"   # too early to call it lost
    sync(led, wd, now=time.time() + 3600)
    att = led.latest_attempt(sft.stage_id)
    assert att.outcome == "MISSING" and "no longer knows job L99" in att.error


def test_never_satisfied_dependency_is_blocked(tmp_path, grid_file, tiny_model):
    plan, led = _ledger(tmp_path, grid_file, tiny_model)
    wd = tmp_path / "runs"
    dpo = next(s for s in plan.stages.values() if s.kind == "dpo")
    _attempt(led, [dpo.stage_id], "L5")
    _state(wd, "L5", state="PENDING", reason="DependencyNeverSatisfied")
    sync(led, wd)       # its parent (the SFT stage) never ran: the job can never start
    assert led.stage(dpo.stage_id).state == "BLOCKED"
    assert (wd / "local" / "jobs" / "L5.cancel").exists()     # the queued job is cancelled


def test_resubmit_rejects_unknown_state(tmp_path, grid_file, tiny_model):
    from budgetlab.orchestrate import resubmit
    plan, led = _ledger(tmp_path, grid_file, tiny_model)
    with pytest.raises(BadInput, match="--state: RUNNING"):
        resubmit(led, tmp_path / "runs", grid="g", states=("RUNNING",))


def test_interrupted_submission_is_missing_and_its_job_cancelled(tmp_path, grid_file, tiny_model):
    plan, led = _ledger(tmp_path, grid_file, tiny_model)
    wd = tmp_path / "runs"
    sft, _ = _train_and_eval(plan)
    # A submit on another host that died between writing the job file and the job id.
    record_attempt(led, sft.stage_id, "SUBMITTING", job_name="bl-g-sft-abc123",
                   submitted_at=time.time() - 3600, heartbeat_at=time.time() - 3600)
    jobs = wd / "local" / "jobs"
    jobs.mkdir(parents=True)
    (jobs / "L3.job.json").write_text(json.dumps({"job_id": "L3", "name": "bl-g-sft-abc123"}))
    (jobs / "L4.job.json").write_text(json.dumps({"job_id": "L4", "name": "bl-g-sft-abc123"}))
    sync(led, wd)
    att = led.latest_attempt(sft.stage_id)
    # Every job of that name (one submission, several jobs) is found and cancelled.
    assert att.outcome == "MISSING" and "job(s) L3, L4 found by name and cancelled" in att.error
    assert (jobs / "L3.cancel").exists() and (jobs / "L4.cancel").exists()


@pytest.mark.parametrize("outcome,key,factor", [("TIMEOUT", "time_min", 2),
                                                ("OUT_OF_MEMORY", "mem_gb", 2),
                                                ("CUDA_OOM", "micro_batch_size", 0.5)])
def test_resubmit_escalates_from_the_last_attempt(tmp_path, grid_file, tiny_model, outcome, key,
                                                  factor):
    from budgetlab.orchestrate import resubmit
    plan, led = _ledger(tmp_path, grid_file, tiny_model)
    sft, ev = _train_and_eval(plan)
    base = led.stage(sft.stage_id).resources
    for _ in range(2):   # escalation compounds over tries, from the stage's own resources
        res, _ = resubmit(led, tmp_path / "runs", grid="g", stage_ids=[sft.stage_id],
                          dry_run=True)
        prev = res.units[0].resources if _ else base
        record_attempt(led, sft.stage_id, outcome, executor="slurm", job_id="7_0",
                       resources={**prev, "job": {"time_min": 99}})
    res, notes = resubmit(led, tmp_path / "runs", grid="g", dry_run=True)
    head = next(u for u in res.units if u.head.stage_id == sft.stage_id)
    assert head.resources[key] == base[key] * factor ** 2
    assert [s.stage_id for s in head.stages] == [sft.stage_id, ev.stage_id]  # eval follows
    assert notes[0]["changes"][key] == [base[key] * factor, base[key] * factor ** 2]
    assert not led.attempts(stage_id=ev.stage_id)     # a dry run writes nothing


# -- issue 10: paths that stalled a grid --------------------------------------------------------
def test_only_rank_0_touches_the_error_record(tmp_path, monkeypatch):
    """A resubmitted multi-rank stage: every rank used to check and unlink the stale
    error.json, and a rank that lost the race died with FileNotFoundError before the
    rendezvous. Now only rank 0 removes or writes it."""
    from budgetlab import worker

    stage = StageDir(tmp_path / "s")
    stage.write_spec({"stage_id": "s", "kind": "bogus", "task": "arith", "model": "x"})
    stage.write_error({"message": "from an earlier try"})
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(ValueError, match="unknown stage kind"):
        worker.run_stages([str(stage.root)])
    assert stage.read_error() == {"message": "from an earlier try"}
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ValueError, match="unknown stage kind"):
        worker.run_stages([str(stage.root)])
    assert stage.read_error()["type"] == "ValueError"


def test_an_eval_failing_after_its_training_stage_keeps_the_job_exit_code(tmp_path,
                                                                           monkeypatch):
    """The job's exit code is its training stage's: children waiting with aftercorr start;
    the eval's failure is in its own error.json."""
    from budgetlab import worker

    head, ev = StageDir(tmp_path / "a"), StageDir(tmp_path / "b")
    head.write_spec({"stage_id": "a", "kind": "sft", "task": "arith", "model": "x"})
    head.write_result({"stage_id": "a", "metrics": {"loss": 1.0}})   # trained already
    ev.write_spec({"stage_id": "b", "kind": "bogus", "task": "arith", "model": "x"})
    out = worker.run_stages([str(head.root), str(ev.root)])           # no exception
    assert out[0]["stage_id"] == "a" and out[1] is None
    assert ev.read_error()["outcome"] == "FAILED" and "unknown stage kind" in \
        ev.read_error()["message"]
    with pytest.raises(ValueError):                                   # a failing head raises
        worker.run_stages([str(ev.root), str(head.root)])


def test_eval_batch_size_is_an_execution_setting(tmp_path, grid_file, tiny_model):
    """CUDA_OOM escalation halved resources.micro_batch_size, which eval ignores: an eval OOM
    was never escalated. The eval's batch size now lives in its resources (not its id), and
    escalation halves it into the spec.json the job reads."""
    from budgetlab.evaluate import eval_batch_size
    from budgetlab.orchestrate import resubmit, write_specs

    a = build_plan(load_spec(grid_file(tmp_path / "a.toml", tiny_model)))
    text = (tmp_path / "a.toml").read_text().replace("batch_size = 8\nbaseline", "batch_size = 2\nbaseline")
    (tmp_path / "b.toml").write_text(text)
    b = build_plan(load_spec(tmp_path / "b.toml"))
    assert set(a.stages) == set(b.stages)                    # same ids, other batch size
    ev = next(s for s in a.stages.values() if s.kind == "eval"
              and a.stages[s.parent_id].kind == "sft")
    assert ev.resources["batch_size"] == 8 and b.stages[ev.stage_id].resources["batch_size"] == 2
    assert "batch_size" not in ev.params
    led = Ledger(tmp_path / "ledger.db")
    led.register(a)
    record_attempt(led, ev.parent_id, "COMPLETED", executor="slurm", job_id="3_0",
                   result={"stage_id": ev.parent_id, "metrics": {}})
    record_attempt(led, ev.stage_id, "CUDA_OOM", executor="slurm", job_id="3_0",
                   resources=ev.resources, error="torch.OutOfMemoryError: CUDA out of memory")
    res, notes = resubmit(led, tmp_path / "runs", grid="g", stage_ids=[ev.stage_id],
                          dry_run=True)
    unit = next(u for u in res.units if ev.stage_id in [s.stage_id for s in u.stages])
    assert unit.resources["batch_size"] == 4
    assert notes[0]["changes"] == {"batch_size": [8, 4]}
    write_specs([unit], tmp_path / "runs", {})
    spec = StageDir.of(tmp_path / "runs", ev.stage_id).read_spec()
    assert eval_batch_size(spec) == 4


@pytest.mark.slow
def test_no_file_io_while_the_ledger_is_locked(tmp_path, grid_file, tiny_model):
    """submit used to fsync every spec.json inside its write transaction and sync read stage
    files inside its own: every other command waited on them (on NFS, for long). Watched
    here with an audit hook on every file opened, renamed or removed under the workdir."""
    import sys

    from budgetlab.orchestrate import submit, wait

    plan = build_plan(load_spec(grid_file(tmp_path / "g.toml", tiny_model, budgets=(8,),
                                          fractions=(1.0, 0.5))))
    led = Ledger(tmp_path / "ledger.db")
    wd = (tmp_path / "runs").resolve()
    seen, active = [], [True]

    def hook(event, args):
        if active[0] and event in ("open", "os.rename", "os.replace", "os.remove",
                                   "os.mkdir", "shutil.rmtree") and args and \
                str(wd) in str(args[0]) and led.conn.in_transaction:
            seen.append((event, str(args[0])))
    sys.addaudithook(hook)
    try:
        submit(led, plan, wd, executor="local")
        st = wait(led, wd, "g", poll_s=1, timeout_s=300)
    finally:
        active[0] = False
    assert st["stages_completed"] == st["stages_total"], st
    assert not seen, seen[:5]
