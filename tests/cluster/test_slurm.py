"""End to end on the real local SLURM (slurm/cluster.sh up): arrays, ranks, failures,
resubmission, blocked children, preemption, time limits, scancel. No fake sbatch/sacct."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from budgetlab.orchestrate import cancel, resubmit, submit, wait
from budgetlab.graph import build_plan
from budgetlab.ledger import Ledger
from budgetlab.spec import load_spec
from budgetlab.stagedir import StageDir
from budgetlab.sync import sync

from tests.conftest import preemptor_args, record_attempt
from tests.faults.faultkit import scontrol_show

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def _setup(tmp_path, grid_file, model, **kw):
    plan = build_plan(load_spec(grid_file(tmp_path / "g.toml", model, **kw)))
    return plan, Ledger(tmp_path / "ledger.db"), tmp_path / "runs"


def _attempts(led, sid):
    return led.attempts(stage_id=sid)


def _wait_for(cond, timeout, what):
    end = time.time() + timeout
    while time.time() < end:
        if cond():
            return
        time.sleep(1)
    raise AssertionError(f"timed out waiting for {what}")


def _until_job_ended(led, wd, sid, timeout=120):
    """A result.json completes a stage before its job ends; sync follows the job to its end
    (final times, the runs of a requeued job)."""
    _wait_for(lambda: sync(led, wd) and led.latest_attempt(sid).ended_at, timeout,
              "the job to end")
    return _attempts(led, sid)


def _progress_step(wd, sid) -> int:
    p = StageDir.of(wd, sid).read_progress() or {}
    return int(p.get("step") or 0)


def test_grid_end_to_end_with_two_ranks(tmp_path, grid_file, tiny_model, slurm_cluster):
    plan, led, wd = _setup(tmp_path, grid_file, tiny_model, name="e2e", budgets=(16, 32),
                           fractions=(1.0, 0.5, 0.0), tasks_per_node=2,
                           extra="[slurm]\nsnapshot_code = true\n")
    assert len(plan.stages) >= 12
    res = submit(led, plan, wd, executor="slurm")
    # sft array, dpo-on-base array, dpo-after-sft array (aftercorr): not one job per stage.
    assert res.sbatch_calls <= 4 and res.jobs < len(plan.stages)
    # One sacct call per sync, whatever the number of jobs.
    rep = sync(led, wd)
    assert rep.attempts == len(plan.stages) and rep.sacct_calls == 1
    st = wait(led, wd, "e2e", poll_s=3, timeout_s=600)
    bad = {s.stage_id: (s.state, s.error) for s in led.stages(grid="e2e")
           if s.state != "COMPLETED"}
    assert not bad, bad
    assert st["points_done"] == st["points_total"] == len(plan.points)
    for s in led.stages(grid="e2e"):
        if s.kind != "eval":
            assert s.result["world_size"] == 2      # two ranks over gloo, one per task
        att = led.latest_attempt(s.stage_id)
        assert att.executor == "slurm" and "_" in att.job_id
        assert att.raw_state.startswith("COMPLETED") or att.raw_state.startswith("RUNNING")
    # The jobs ran a snapshot of the package, not the live tree.
    snap = next((wd / "code").iterdir())
    assert (snap / "budgetlab" / "backends" / "job.py").exists()
    scripts = list((wd / "submitit").glob("*_submission.sh"))
    assert scripts and all(f"export PYTHONPATH={snap}" in p.read_text() for p in scripts)
    heads = [a for a in led.attempts() if a.cpu_seconds]
    assert heads and not any(a.gpu_seconds for a in heads)   # CPU jobs: CPU-seconds only


def test_failure_resubmit_releases_blocked_children(tmp_path, grid_file, tiny_model,
                                                    slurm_cluster):
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    plan, led, wd = _setup(tmp_path, grid_file, str(model), name="fail", budgets=(16,),
                           fractions=(0.5,), extra="gpus_per_node = 1\n")   # a fake GPU each
    sft = next(s for s in plan.stages.values() if s.kind == "sft")
    dpo = next(s for s in plan.stages.values() if s.kind == "dpo")
    (model / "config.json").rename(tmp_path / "config.json")       # the cause
    submit(led, plan, wd, executor="slurm")
    wait(led, wd, "fail", poll_s=2, timeout_s=300)
    row = led.stage(sft.stage_id)
    assert row.state == "FAILED", row
    err = StageDir.of(wd, sft.stage_id).read_error()
    assert err and led.latest_attempt(sft.stage_id).error == err["message"]
    assert "\n" not in err["message"] and err["message"].split(":")[0].endswith(("Error", "Exception"))
    for s in plan.stages.values():
        if s.stage_id != sft.stage_id:
            assert led.stage(s.stage_id).state == "BLOCKED", s.kind
    (tmp_path / "config.json").rename(model / "config.json")       # cause removed
    res, notes = resubmit(led, wd, grid="fail")
    assert {n["stage_id"] for n in notes} >= {sft.stage_id}
    assert sum(len(u.stages) for u in res.units) == len(plan.stages)
    wait(led, wd, "fail", poll_s=2, timeout_s=300)
    assert all(led.stage(s).state == "COMPLETED" for s in plan.stages), \
        [(s.kind, s.state, s.error) for s in led.stages(grid="fail")]
    outcomes = [a.outcome for a in _attempts(led, sft.stage_id)]
    assert outcomes == ["FAILED", "COMPLETED"]
    done = _attempts(led, sft.stage_id)[-1]      # GPU jobs: elapsed x allocated GPUs
    assert done.gpus == 1 and done.gpu_seconds > 0 and not done.cpu_seconds
    assert led.stage(dpo.stage_id).state == "COMPLETED"


def test_preempted_job_resumes_from_checkpoint(tmp_path, grid_file, tiny_model, slurm_cluster,
                                               epochs_for):
    # About 15 s of training: the preemption lands a few seconds after step 2, mid-way
    # whatever the machine's speed.
    plan, led, wd = _setup(tmp_path, grid_file, tiny_model, name="pre", budgets=(16,),
                           fractions=(1.0,), epochs=epochs_for(15),
                           checkpoint_every=1000)
    sft = next(s for s in plan.stages.values() if s.kind == "sft")
    submit(led, plan, wd, executor="slurm")
    _wait_for(lambda: _progress_step(wd, sft.stage_id) >= 2, 240, "training to start")
    urgent = subprocess.run(["sbatch", "--parsable", *preemptor_args(), "-o", "/dev/null",
                             "--wrap", "sleep 3"], capture_output=True, text=True, check=True)
    wait(led, wd, "pre", poll_s=2, timeout_s=400)
    atts = _until_job_ended(led, wd, sft.stage_id)
    assert led.stage(sft.stage_id).state == "COMPLETED", atts
    assert len(atts) >= 2 and atts[0].outcome == "PREEMPTED", atts
    assert atts[-1].outcome == "COMPLETED" and atts[-1].resumed_from_step >= 2
    assert len({a.job_id for a in atts}) == 1                 # the same job, requeued
    assert led.stage(sft.stage_id).result["resumed_from_step"] >= 2
    subprocess.run(["scancel", urgent.stdout.strip()], capture_output=True)


def test_time_limit_checkpoints_requeues_and_completes(tmp_path, grid_file, tiny_model,
                                                        slurm_cluster, epochs_for):
    # A 1-minute limit, the pre-timeout signal 15 s before it: slurmctld checks time limits
    # every 30 s and sends the signal at the first check past limit - 15 s - 30 s, so it
    # lands 15 to 45 s into a run. ~60 s of training outlasts that however the run starts;
    # more only lengthens the second run (below).
    extra = "[resources.sft]\ntime_min = 1\n[resources.eval]\ntime_min = 0.01\n"
    plan, led, wd = _setup(tmp_path, grid_file, tiny_model, name="tle", budgets=(16,),
                           fractions=(1.0,), epochs=epochs_for(60),
                           checkpoint_every=1000, extra=extra)
    sft = next(s for s in plan.stages.values() if s.kind == "sft")
    submit(led, plan, wd, executor="slurm")
    job = led.latest_attempt(sft.stage_id).job_id
    # Once requeued, the job gets a longer limit (as a user extends a job that needs more):
    # the rest then runs once, not as a chain of 1-minute runs each cut at a random
    # moment. The first run is judged on the limit it had (its attempt's resources).
    _wait_for(lambda: scontrol_show(job).get("Restarts", "0") != "0", 240,
              "the time-limit requeue")
    subprocess.run(["scontrol", "update", f"JobId={job}", "TimeLimit=10"], check=True,
                   capture_output=True)
    wait(led, wd, "tle", poll_s=3, timeout_s=540)
    atts = _until_job_ended(led, wd, sft.stage_id)
    assert led.stage(sft.stage_id).state == "COMPLETED", atts
    assert len(atts) >= 2 and atts[0].outcome == "TIMEOUT", atts
    assert atts[-1].resumed_from_step and atts[-1].resumed_from_step > 0


def test_scancel_is_cancelled_and_child_blocked(tmp_path, grid_file, tiny_model, slurm_cluster):
    plan, led, wd = _setup(tmp_path, grid_file, tiny_model, name="can", budgets=(16,),
                           fractions=(0.5,), epochs=200)
    sft = next(s for s in plan.stages.values() if s.kind == "sft")
    dpo = next(s for s in plan.stages.values() if s.kind == "dpo")
    submit(led, plan, wd, executor="slurm")
    job = led.latest_attempt(sft.stage_id).job_id
    _wait_for(lambda: sync(led, wd) and led.stage(sft.stage_id).state == "RUNNING", 120,
              "the job to run")
    subprocess.run(["scancel", job], check=True)
    wait(led, wd, "can", poll_s=2, timeout_s=120)
    att = led.latest_attempt(sft.stage_id)
    assert att.outcome == "CANCELLED" and att.raw_state.startswith("CANCELLED")
    assert led.stage(dpo.stage_id).state == "BLOCKED"
    # budgetlab cancel on work that is queued: ledger keeps it as CANCELLED.
    res, _ = resubmit(led, wd, grid="can", states=("CANCELLED",))
    assert res.jobs == 2
    cancelled = cancel(led, wd, grid="can")
    assert {a.stage_id for a in cancelled} == set(plan.stages)
    assert all(led.stage(s).state == "CANCELLED" for s in plan.stages)
    time.sleep(2)
    out = subprocess.run(["squeue", "-h", "-j", ",".join(
        sorted({a.job_id for a in cancelled}))], capture_output=True, text=True).stdout
    assert "R " not in out and " PD " not in out


def test_without_accounting_squeue_and_stage_dirs(tmp_path, grid_file, tiny_model, slurm_cluster,
                                                  monkeypatch, capsys):
    # The same cluster seen through a slurm.conf whose accounting is off: sacct refuses.
    conf = tmp_path / "etc" / "slurm.conf"
    conf.parent.mkdir()
    src = Path(slurm_cluster)
    conf.write_text("".join(
        "AccountingStorageType=accounting_storage/none\n" if line.startswith("AccountingStorageType")
        else line for line in src.read_text().splitlines(keepends=True)))
    shutil.copy(src.parent / "gres.conf", conf.parent / "gres.conf")
    monkeypatch.setenv("SLURM_CONF", str(conf))
    import budgetlab.backends.slurm as slurm_mod
    monkeypatch.setattr(slurm_mod, "_said_no_accounting", False)
    plan, led, wd = _setup(tmp_path, grid_file, tiny_model, name="noacct", budgets=(16,),
                           fractions=(1.0,))
    submit(led, plan, wd, executor="slurm")
    rep = sync(led, wd)
    assert rep.sacct_calls == 1 and rep.squeue_calls == 1
    assert any("accounting is disabled" in n for n in rep.notes)
    st = wait(led, wd, "noacct", poll_s=2, timeout_s=300)
    assert st["stages_completed"] == len(plan.stages), led.stages(grid="noacct")
    assert capsys.readouterr().err.count("accounting is disabled") == 1   # said once


def test_reused_job_id_is_not_taken_for_an_old_job(tmp_path, grid_file, tiny_model, slurm_cluster,
                                                   monkeypatch):
    import budgetlab.judge as judge_mod
    # A real job that finished; then an attempt that claims its id but was submitted later
    # (as after a job-id wrap-around). Thresholds shortened so the test runs in seconds.
    out = subprocess.run(["sbatch", "--parsable", "--array=0", "-o", "/dev/null", "--wrap", "true"],
                         capture_output=True, text=True, check=True).stdout.strip()
    jid = f"{out}_0"
    _wait_for(lambda: subprocess.run(["sacct", "-n", "-X", "-j", out, "-o", "State"],
                                     capture_output=True, text=True).stdout.strip()
              .startswith("COMPLETED"), 60, "the job to finish")
    monkeypatch.setattr(judge_mod, "REUSED_SLACK_S", 1)
    monkeypatch.setattr(judge_mod, "MISSING_GRACE_S", 1)
    plan, led, wd = _setup(tmp_path, grid_file, tiny_model, name="reuse")
    led.register(plan)
    sft = next(s for s in plan.stages.values() if s.kind == "sft")
    time.sleep(3)
    record_attempt(led, sft.stage_id, "PENDING", executor="slurm", job_id=jid,
                   submitted_at=time.time() - 1.5)
    time.sleep(0.5)
    sync(led, wd)
    att = led.latest_attempt(sft.stage_id)
    assert att.outcome == "MISSING" and att.raw_state is None, att   # not the old COMPLETED


def test_poll_reads_the_live_reason_of_a_job_whose_dependency_failed(slurm_cluster, tmp_path):
    """sacct keeps "Dependency" as the reason of a pending array task after the task it
    waits on (aftercorr) failed; squeue says DependencyNeverSatisfied. poll reports the
    latter, which is what lets sync release a child whose parent stage completed before its
    job was killed (tests/faults/test_no_stall.py)."""
    from budgetlab.backends.slurm import SlurmBackend

    def sbatch(*args):
        return subprocess.run(["sbatch", "--parsable", "-o", "/dev/null", *args],
                              capture_output=True, text=True, check=True).stdout.strip()
    parent = sbatch("--array=0-1", "--wrap", "sleep 2; [ $SLURM_ARRAY_TASK_ID = 0 ]")
    child = sbatch("--array=0-1", f"--dependency=aftercorr:{parent}", "--wrap", "sleep 60")
    try:
        ids = [f"{child}_0", f"{child}_1"]

        polls = []

        # Task 0 may still be pending for a scheduler pass after its parent task ended (a
        # busy machine saw it): the same poll must show it started and task 1 stuck.
        def settled():
            polls.append(SlurmBackend(tmp_path).poll(ids))
            first, last = (polls[-1].runs.get(i) for i in ids)
            return bool(first and last) and last[-1].reason == "DependencyNeverSatisfied" \
                and first[-1].raw_state in ("RUNNING", "COMPLETED")
        _wait_for(settled, 60, "task 0 to run and task 1 to wait for ever")
        poll = polls[-1]
        assert poll.sacct_calls == 1 and poll.squeue_calls == 1
    finally:
        subprocess.run(["scancel", parent, child], capture_output=True)
