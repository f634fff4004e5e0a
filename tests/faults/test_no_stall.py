"""Issue 10: no path that stalls a grid, on the real local SLURM. Each test injects a real
event (a file moved away, a signal, a preempting job, a killed job, a stopped or killed
submitter) through the `budgetlab` CLI as users run it, and checks that sync, status and
plain `resubmit` bring the grid to the end. Each of them stalled, looped or lost track on
the code before the lifecycle rewrite (commit 6aeb7c8)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from faultkit import (CLI, job_pids, queue_snapshot, release_if_held, scontrol_show, wait_until,
                      write_grid)
from tests.conftest import preemptor_args

pytestmark = [pytest.mark.fault, pytest.mark.slurm, pytest.mark.slow]

FAST = {"BUDGETLAB_MISSING_GRACE_S": "5", "BUDGETLAB_PREEMPT_GRACE_S": "5"}
LONG = 500   # epochs of 16 examples: 2,000 steps of the tiny model, tens of seconds


def _stages(cli: CLI, kind: str | None = None) -> list[dict]:
    rows = cli.json("ledger", "stages")
    return [r for r in rows if kind is None or r["kind"] == kind]


def _attempts(cli: CLI, sid: str) -> list[dict]:
    return cli.json("ledger", "attempts", "--stage", sid)


def _done(cli: CLI, grid: str, timeout: float) -> dict:
    return wait_until(lambda: (lambda st: st if st["active"] == 0 else None)(
        cli.json("status", grid)), timeout, f"grid {grid} to settle", poll=2,
        detail=lambda: f"{cli('status', grid).stdout}\n{json.dumps(_stages(cli))}\n"
                       f"{queue_snapshot()}")


def _squeue(*args) -> str:
    return subprocess.run(["squeue", "-h", *args], capture_output=True, text=True,
                          timeout=60).stdout


def _long_eval(text: str) -> str:
    """An eval of a few tens of seconds: a window to act in while it runs."""
    return text.replace("limit = 4", "limit = 400").replace("max_new_tokens = 2",
                                                            "max_new_tokens = 96")


def _helpsteer(root: Path) -> dict:
    """HelpSteer-format rows (rated responses per prompt) and a tiny reward model."""
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from budgetlab.train.tiny import byte_tokenizer

    train = root / "hs_train.jsonl"
    val = root / "hs_val.jsonl"
    with open(train, "w") as f:
        for i in range(12):
            for h, resp in ((4, f"A full answer to question {i}."), (1, "No.")):
                f.write(json.dumps({"prompt": f"Question number {i}?", "response": resp,
                                    "helpfulness": h, "correctness": h, "coherence": 4,
                                    "complexity": 1, "verbosity": 1}) + "\n")
    with open(val, "w") as f:
        for i in range(2):
            f.write(json.dumps({"prompt": f"Held-out question {i}?", "response": "Yes.",
                                "helpfulness": 3, "correctness": 3, "coherence": 4,
                                "complexity": 1, "verbosity": 1}) + "\n")
    tok = byte_tokenizer(pad_token=True)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                      num_hidden_layers=1, num_attention_heads=2, num_labels=1,
                      pad_token_id=tok.pad_token_id)
    rm = root / "rm"
    LlamaForSequenceClassification(cfg).save_pretrained(rm)
    tok.save_pretrained(rm)
    return {"train": train, "val": val, "rm": rm}


def test_eval_failure_in_a_parent_job_does_not_stall_its_children(scli, tiny_model, figure):
    """The issue's report: SFT on 4 examples is an SFT-only point (its eval runs in the SFT's
    job) and the parent of a DPO stage. The eval fails (the reward model directory is
    unreachable). Before: the DPO array task sat PENDING (DependencyNeverSatisfied) for good
    and no resubmit got it out. Now the job's exit code is the SFT stage's, so the DPO runs;
    the eval's error names the spec key and the path; after the fix, one plain resubmit
    finishes the grid on SLURM."""
    cli, root = scli, scli.root
    hs = _helpsteer(root)
    grid = write_grid(root / "g.toml", tiny_model, name="f", budgets=(4, 8),
                      fractions=(1.0, 0.5), extra=f"""
        [data.helpsteer]
        sft = "{hs['train']}"
        preferences = "{hs['train']}"
        eval = "{hs['val']}"
        reward_model = "{hs['rm']}"
        """)
    grid.write_text(grid.read_text().replace('tasks = ["arith"]', 'tasks = ["helpsteer"]'))
    cli("plan", grid, check=True)
    t0 = time.time()
    cli("submit", grid, "--executor", "slurm", check=True)
    moved = root / "rm-away"
    hs["rm"].rename(moved)            # the share is unreachable for a moment (jobs queued)
    st = _done(cli, "f", 400)
    by_kind = st["stages"]
    # SFT on 4, 2 and 8 examples; DPO after SFT 4 and after SFT 2; every eval failed.
    assert by_kind["sft"] == {"COMPLETED": 3} and by_kind["dpo"] == {"COMPLETED": 2}, st
    assert by_kind["eval"] == {"FAILED": 4}, st
    err = next(s["error"] for s in _stages(cli, "eval"))
    assert "data.helpsteer.reward_model" in err and str(hs["rm"]) in err, err
    moved.rename(hs["rm"])                     # the cause is fixed
    r = cli("resubmit", "f", check=True)
    assert "on slurm" in r.stdout and "submitted 4 stage(s)" in r.stdout, r.stdout
    st = _done(cli, "f", 300)
    assert st["points_done"] == st["points_total"] == 4, st
    assert all(len(_attempts(cli, s["stage_id"])) == 1 for s in _stages(cli, "dpo"))
    figure("10 eval fails in a parent job", resubmits=1, seconds=time.time() - t0)


def test_parent_job_killed_after_its_result_releases_the_child(scli, tiny_model, figure):
    """The SFT stage writes result.json, then its job is killed (SIGKILL during its eval):
    the job FAILED, so SLURM will never start the DPO child waiting on it (aftercorr), yet
    the SFT stage is COMPLETED. sync releases the child's dependency instead of leaving it
    PENDING for ever."""
    cli, root = scli, scli.root
    # SFT on 8 examples: an SFT-only point (its eval, long here, runs in its job) and the
    # parent of the DPO stage of budget 16.
    grid = write_grid(root / "g.toml", tiny_model, name="f", budgets=(8, 16),
                      fractions=(1.0, 0.5))
    grid.write_text(_long_eval(grid.read_text()))
    cli("submit", grid, "--executor", "slurm", check=True)
    sft = next(s["stage_id"] for s in _stages(cli, "sft") if s["n"] == 8)
    job = _attempts(cli, sft)[0]["job_id"]
    wait_until(lambda: (cli.workdir / "stages" / sft / "result.json").exists(), 300,
               "the SFT result", poll=0.05)
    os.kill(job_pids(job)[0], signal.SIGKILL)       # the OOM killer, say, during the eval
    t_kill = time.time()
    st = _done(cli, "f", 300)
    dpo = next(s for s in _stages(cli, "dpo") if s["parent_id"] == sft)
    assert dpo["state"] == "COMPLETED", st
    sacct = subprocess.run(["sacct", "-n", "-X", "-P", "-j", job.split("_")[0], "-o",
                            "JobID,State"], capture_output=True, text=True).stdout
    assert f"{job}|FAILED" in sacct, sacct
    cli("resubmit", "f", check=True)           # the SFT-only point's eval, killed with its job
    st = _done(cli, "f", 300)
    assert st["stages_completed"] == st["stages_total"], st
    figure("10 parent killed after result", released=1, seconds=time.time() - t_kill)


def test_requeues_without_progress_end_as_timeout(scli, tiny_model, figure):
    """An eval never checkpoints: interrupted again and again (here by the preemption/timeout
    signal, sent by hand), it used to requeue for ever. With max_requeues = 1 the second
    interruption without progress ends it as TIMEOUT with a message saying why."""
    cli, root = scli, scli.root
    grid = write_grid(root / "g.toml", tiny_model, name="f", budgets=(4,), fractions=(1.0,),
                      extra="max_requeues = 1\n")
    grid.write_text(_long_eval(grid.read_text()).replace("baseline = false", "baseline = true"))
    cli("submit", grid, "--executor", "slurm", check=True)
    base = next(s["stage_id"] for s in _stages(cli, "eval") if not s["parent_id"])
    job = _attempts(cli, base)[0]["job_id"]
    sd = cli.workdir / "stages" / base

    def in_eval(restart):
        rec = sd / "log" / f"run-{job}-{restart}.json"
        prog = sd / "progress.json"
        if not rec.exists() or not prog.exists():
            return False
        started = json.loads(rec.read_text())["started_at"]
        return json.loads(prog.read_text()).get("heartbeat", 0) > started
    for restart in (0, 1):
        # The requeued job may be held until BeginTime at any moment of its pending spell:
        # release it on every poll, not once (CI waited out the hold and timed out).
        wait_until(lambda: release_if_held(job) or in_eval(restart), 300,
                   f"run {restart} to be evaluating", poll=0.2)
        subprocess.run(["scancel", "--signal=USR2", job], check=True)
        if restart == 0:
            wait_until(lambda: scontrol_show(job).get("Restarts", "0") != "0", 120,
                       "the requeue")
    st = _done(cli, "f", 300)
    row = next(s for s in _stages(cli, "eval") if s["stage_id"] == base)
    assert row["state"] == "TIMEOUT", row
    assert "2 times in a row without checkpoint progress" in row["error"], row["error"]
    runs = sorted(p.name for p in (sd / "log").glob(f"run-{job}-*.json"))
    assert runs == [f"run-{job}-0.json", f"run-{job}-1.json"], runs   # requeued once only
    atts = _attempts(cli, base)
    assert [a["outcome"] for a in atts][-1] == "TIMEOUT" and len(atts) == 2, atts
    figure("10 requeue cap", attempts=len(atts), stages=st["stages_total"])


def test_preempted_job_the_site_does_not_requeue_is_resubmitted(scli, tiny_model, figure):
    """A site that cancels preempted jobs (here: --no-requeue). Before: PREEMPTED counted as
    unfinished (wait never returned) and `resubmit --state PREEMPTED` was refused. Now the
    failed requeue ends the run with a record; plain resubmit resumes from the checkpoint."""
    cli, root = CLI(scli.root, env=FAST), scli.root
    grid = write_grid(root / "g.toml", tiny_model, name="f", budgets=(16,), fractions=(1.0,),
                      epochs=LONG, every=1000,
                      extra='[slurm]\nextra_sbatch = ["--no-requeue"]\n')
    cli("submit", grid, "--executor", "slurm", check=True)
    sft = _stages(cli, "sft")[0]["stage_id"]
    sd = cli.workdir / "stages" / sft
    wait_until(lambda: json.loads((sd / "progress.json").read_text()).get("step", 0) >= 2
               if (sd / "progress.json").exists() else False, 240, "training", poll=0.2)
    urgent = subprocess.run(["sbatch", "--parsable", *preemptor_args(), "-o",
                             "/dev/null", "--wrap", "sleep 5"], capture_output=True, text=True,
                            check=True).stdout.strip()
    try:
        st = _done(cli, "f", 300)
        row = _stages(cli, "sft")[0]
        assert row["state"] == "PREEMPTED", (row, st)
        assert "resubmit" in row["error"], row["error"]
        r = cli("resubmit", "f", check=True)       # PREEMPTED is in the default classes
        assert "submitted 2 stage(s)" in r.stdout, r.stdout
        st = _done(cli, "f", 300)
    finally:
        subprocess.run(["scancel", urgent], capture_output=True)
    assert st["stages_completed"] == st["stages_total"], st
    atts = _attempts(cli, sft)
    assert atts[0]["outcome"] == "PREEMPTED" and atts[-1]["outcome"] == "COMPLETED"
    assert atts[-1]["resumed_from_step"] >= 2, atts
    figure("10 preempted, not requeued", resumed_from=atts[-1]["resumed_from_step"])


def test_killed_job_without_accounting_becomes_missing(scli, tiny_model, figure, tmp_path):
    """A site without accounting: a job killed by a signal (OOM killer, SIGKILL, a lost node)
    leaves squeue with neither result.json nor error.json. It used to stay RUNNING for ever;
    after the grace period it is MISSING, and resubmit reruns it."""
    conf = tmp_path / "etc" / "slurm.conf"
    conf.parent.mkdir()
    src = Path(os.environ["SLURM_CONF"])
    conf.write_text("".join(
        "AccountingStorageType=accounting_storage/none\n"
        if line.startswith("AccountingStorageType") else line
        for line in src.read_text().splitlines(keepends=True)))
    shutil.copy(src.parent / "gres.conf", conf.parent / "gres.conf")
    cli = CLI(scli.root, env={**FAST, "SLURM_CONF": str(conf)})
    # Killed at its first step: a few seconds of training are enough (the resubmit reruns
    # them all).
    grid = write_grid(scli.root / "g.toml", tiny_model, name="f", budgets=(16,),
                      fractions=(1.0,), epochs=LONG // 4, every=1000)
    cli("submit", grid, "--executor", "slurm", check=True)
    sft = _stages(cli, "sft")[0]["stage_id"]
    job = _attempts(cli, sft)[0]["job_id"]
    wait_until(lambda: (cli.workdir / "stages" / sft / "progress.json").exists(), 240,
               "training", poll=0.2)
    os.kill(wait_until(lambda: job_pids(job).get(0), 60, "the job's process"), signal.SIGKILL)
    t_kill = time.time()
    # No sync meanwhile: by the time anyone looks, slurmctld has forgotten the job.
    wait_until(lambda: job.split("_")[0] not in _squeue("-t", "all", "-o", "%F"), 180,
               "the job to leave squeue", poll=2)
    cli("sync", check=True)
    att = _attempts(cli, sft)[-1]
    assert att["outcome"] == "MISSING" and "left the queue" in att["error"], att
    assert cli.json("status", "f")["active"] == 0
    cli("resubmit", "f", check=True)
    st = _done(cli, "f", 300)
    assert st["stages_completed"] == st["stages_total"], st
    figure("10 killed, no accounting", missing_after_s=time.time() - t_kill)


def _held_grid(root: Path, model: str, name: str) -> Path:
    """A grid whose submit takes several sbatch calls (roots and aftercorr waves), held."""
    return write_grid(root / f"{name}.toml", model, name=name, budgets=(8, 16, 32),
                      fractions=(1.0, 0.5, 0.0), methods=("dpo", "kto"), seeds=(0, 1),
                      extra='[slurm]\nextra_sbatch = ["--hold"]\n')


def _stop_mid_submit(cli: CLI, grid: Path, name: str, sig: int):
    """Start `submit`, stop it with `sig` right after its first sbatch; returns the process."""
    p = subprocess.Popen(cli.argv("submit", grid, "--executor", "slurm"), env=cli.env,
                         cwd=cli.root, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    wait_until(lambda: f"bl-{name}-" in _squeue("-o", "%j") or p.poll() is not None, 120,
               "the first array", poll=0.01)
    # send_signal: nothing to signal if the submit already finished (the caller retries).
    p.send_signal(sig)
    # A submitter stopped inside its short write transaction would hold the ledger's lock:
    # let it leave the transaction first (a real stop can land anywhere; the lock is not
    # what this test is about).
    for _ in range(50):
        if sig != signal.SIGSTOP or _lockable(cli):
            break
        p.send_signal(signal.SIGCONT)
        time.sleep(0.02)
        p.send_signal(signal.SIGSTOP)
    return p


def _lockable(cli: CLI) -> bool:
    import sqlite3
    c = sqlite3.connect(cli.ledger, timeout=0.2)
    try:
        c.execute("BEGIN IMMEDIATE")
        c.execute("ROLLBACK")
        return True
    except sqlite3.OperationalError:
        return False
    finally:
        c.close()


def _unrecorded(cli: CLI) -> int:
    return cli.rows("SELECT COUNT(*) FROM attempts WHERE outcome = 'SUBMITTING' AND "
                    "job_id IS NULL")[0][0]


def test_a_sync_never_cancels_a_submit_in_progress(scli, tiny_model, figure):
    """`status --watch` in another terminal syncs while a long submit runs. The submit's
    attempts are older than the grace period (backdated here, as a slow controller makes
    them), yet the submitter is alive (stopped, not dead): nothing is cancelled or lost."""
    cli, root = scli, scli.root
    for attempt in range(3):
        name = f"s{attempt}"
        p = _stop_mid_submit(cli, _held_grid(root, tiny_model, name), name, signal.SIGSTOP)
        if _unrecorded(cli):
            break
        p.send_signal(signal.SIGCONT)
        p.wait(120)
    else:
        pytest.skip("the submit finished before it could be stopped, three times")
    try:
        # -r: one line per array task (a grouped "N_[0-2,4-6]" line splits as tasks change)
        queued = set(_squeue("-r", "-o", "%i", "-n", ",".join(
            r[0] for r in cli.rows("SELECT DISTINCT job_name FROM attempts"))).split())
        with cli.db() as c:   # as if the sbatch calls had taken 10 minutes so far
            c.execute("UPDATE attempts SET submitted_at = submitted_at - 600, "
                      "heartbeat_at = heartbeat_at - 600")
        cli("sync", check=True)
        assert not cli.rows("SELECT COUNT(*) FROM attempts WHERE outcome = 'MISSING'")[0][0]
        still = set(_squeue("-r", "-o", "%i", "-t", "PD").split())
        assert queued <= still, queued - still      # no job of the submit was cancelled
    finally:
        p.send_signal(signal.SIGCONT)
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    assert _unrecorded(cli) == 0
    jobs = {r[0] for r in cli.rows("SELECT job_id FROM attempts WHERE job_id IS NOT NULL")}
    names = ",".join(r[0] for r in cli.rows("SELECT DISTINCT job_name FROM attempts"))
    in_slurm = set(_squeue("-r", "-o", "%i", "-n", names).split())
    assert in_slurm == jobs, in_slurm ^ jobs      # every job tracked, every row has its job
    figure("10 sync during a submit", jobs=len(jobs))


def test_a_killed_submit_leaves_no_untracked_job(scli, tiny_model, figure):
    """kill -9 of `submit` after its first arrays: every array of that submission (one job
    name, several arrays) is found and cancelled, the unrecorded attempts become MISSING,
    and a plain resubmit queues the whole grid again, every job tracked."""
    cli, root = scli, scli.root
    for attempt in range(3):
        name = f"k{attempt}"
        p = _stop_mid_submit(cli, _held_grid(root, tiny_model, name), name, signal.SIGKILL)
        p.wait(60)
        if _unrecorded(cli):
            break
    else:
        pytest.skip("the submit finished before it could be killed, three times")
    names = ",".join(r[0] for r in cli.rows("SELECT DISTINCT job_name FROM attempts"))
    cli("sync", check=True)       # the submitter's process is gone: no grace to wait for
    assert _unrecorded(cli) == 0
    missing = cli.rows("SELECT COUNT(*) FROM attempts WHERE outcome = 'MISSING'")[0][0]
    assert missing > 0
    tracked = {r[0] for r in cli.rows("SELECT job_id FROM attempts WHERE outcome IN "
                                      "('PENDING', 'RUNNING')")}
    wait_until(lambda: set(_squeue("-r", "-o", "%i", "-t", "PD,R", "-n", names).split())
               == tracked, 60, "the untracked arrays to be cancelled")
    r = cli("resubmit", name, check=True)
    assert "on slurm" in r.stdout
    st = cli.json("status", name)
    assert st["stages"] and all(s in ("PENDING", "COMPLETED") for v in st["stages"].values()
                                for s in v), st
    tracked = {r[0] for r in cli.rows("SELECT job_id FROM attempts WHERE outcome = 'PENDING'")}
    names = ",".join(r[0] for r in cli.rows("SELECT DISTINCT job_name FROM attempts"))
    assert set(_squeue("-r", "-o", "%i", "-t", "PD", "-n", names).split()) == tracked
    figure("10 submit killed mid-way", missing=missing, jobs=len(tracked))
