"""Scenarios 1 and 2 on the real cluster: `scontrol requeue` of a running SFT stage resumes
from its newest checkpoint; `kill -9` of one rank of a 2-rank job ends the job (no hang),
the attempt is classified, and `budgetlab resubmit` resumes from the checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest

from faultkit import CLI, job_pids, release_if_held, scontrol_show, sync_until_done, wait_until, write_grid

pytestmark = [pytest.mark.fault, pytest.mark.slurm, pytest.mark.slow]


def _newest_checkpoint(stage_dir) -> int:
    ck = stage_dir / "checkpoints"
    steps = [int(p.name[5:]) for p in ck.glob("step-*") if (p / "meta.json").exists()] \
        if ck.exists() else []
    return max(steps, default=0)


def _stage(cli: CLI, kind: str) -> str:
    return cli.rows("SELECT stage_id FROM stages WHERE kind = ?", (kind,))[0][0]


def _check_no_duplicates(cli: CLI, sid: str, result: dict) -> int:
    rows = cli.rows("SELECT name, COUNT(*) FROM metrics WHERE stage_id = ? GROUP BY name", (sid,))
    assert rows and all(n == 1 for _, n in rows), rows
    assert {k for k, _ in rows} == {k for k, v in result["metrics"].items()
                                    if isinstance(v, (int, float))}
    assert cli.rows("SELECT COUNT(*) FROM stages WHERE stage_id = ?", (sid,))[0][0] == 1
    return len(rows)


def test_scontrol_requeue_resumes_from_the_newest_checkpoint(scli, tiny_model, figure):
    cli, tmp_path = scli, scli.root
    grid = write_grid(tmp_path / "g.toml", tiny_model, budgets=(192,), epochs=4, every=8)
    cli("submit", grid, "--executor", "slurm", check=True)
    sft = _stage(cli, "sft")
    sd = cli.workdir / "stages" / sft
    job = cli.rows("SELECT job_id FROM attempts WHERE stage_id = ?", (sft,))[0][0]
    saved = wait_until(lambda: _newest_checkpoint(sd), 180, "a first checkpoint", poll=0.1)
    t_requeue = time.time()
    p = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    # The job comes back (PENDING, then RUNNING again) and finishes.
    wait_until(lambda: scontrol_show(job).get("Restarts", "0") != "0", 60, "the requeue")
    wait_until(lambda: release_if_held(job) or (sd / "result.json").exists(), 240,
               "the requeued job to finish", poll=1.0)
    recover_s = time.time() - t_requeue
    st = sync_until_done(cli, timeout=120)
    assert st["stages_completed"] == st["stages_total"] == 2, st
    result = json.loads((sd / "result.json").read_text())
    assert result["resumed_from_step"] is not None and result["resumed_from_step"] >= saved, \
        (result["resumed_from_step"], saved)
    assert result["steps"] > result["resumed_from_step"]   # it did not start over at 0
    atts = cli.json("ledger", "attempts", "--stage", sft)
    assert len(atts) >= 2, atts
    assert [a["job_id"] for a in atts] == [job] * len(atts)     # one job, several runs
    assert atts[-1]["outcome"] == "COMPLETED" and atts[0]["outcome"] in ("PREEMPTED", "TIMEOUT")
    assert atts[-1]["resumed_from_step"] == result["resumed_from_step"]
    n = _check_no_duplicates(cli, sft, result)
    # The training log holds each step at most once after the resume point.
    steps = [json.loads(line)["step"] for line in (sd / "log" / "train.jsonl").open()]
    assert steps[-1] == result["steps"]
    assert sorted(set(steps)) == list(range(1, result["steps"] + 1))
    figure("1 scontrol requeue -> resume", attempts=len(atts),
           resumed_from=result["resumed_from_step"], recover_s=recover_s, rows_checked=n + len(atts))


def test_kill_one_rank_ends_the_job_and_resubmit_resumes(scli, tiny_model, figure):
    cli, tmp_path = scli, scli.root
    grid = write_grid(tmp_path / "g.toml", tiny_model, budgets=(192,), epochs=4, every=8,
                      micro=2, extra="tasks_per_node = 2\n")
    cli("submit", grid, "--executor", "slurm", check=True)
    sft = _stage(cli, "sft")
    sd = cli.workdir / "stages" / sft
    job = cli.rows("SELECT job_id FROM attempts WHERE stage_id = ?", (sft,))[0][0]
    saved = wait_until(lambda: _newest_checkpoint(sd), 180, "a first checkpoint", poll=0.1)
    pids = wait_until(lambda: (lambda r: r if len(r) == 2 else None)(job_pids(job)), 30,
                      "two ranks")
    os.kill(pids[1], signal.SIGKILL)
    t_kill = time.time()
    # The surviving rank must not hang in a collective: the job ends, bounded.
    def end_state():
        state = scontrol_show(job).get("JobState")
        return state if state not in ("RUNNING", "COMPLETING", None, "") else None
    ended = wait_until(end_state, 120, "the job to end after kill -9")
    stop_s = time.time() - t_kill
    assert not (sd / "result.json").exists()
    atts = wait_until(lambda: (lambda a: a if a[-1]["outcome"] not in
                               ("RUNNING", "PENDING") else None)(
        cli.json("ledger", "attempts", "--stage", sft)) if cli("sync").returncode == 0 else None,
        60, "sync to classify the attempt", poll=1.0)
    first = atts[-1]
    assert first["outcome"] in ("FAILED", "NODE_FAIL", "CANCELLED"), first
    assert first["error"], first
    # resubmit: a new attempt, resumed from the checkpoint the killed run left.
    p = cli("resubmit", "f", "--state", first["outcome"], check=True)
    st = sync_until_done(cli, timeout=240)
    assert st["stages_completed"] == st["stages_total"] == 2, (st, p.stdout)
    result = json.loads((sd / "result.json").read_text())
    assert result["resumed_from_step"] is not None and result["resumed_from_step"] >= saved
    assert result["world_size"] == 2
    atts = cli.json("ledger", "attempts", "--stage", sft)
    assert len(atts) >= 2 and atts[-1]["outcome"] == "COMPLETED"
    n = _check_no_duplicates(cli, sft, result)
    figure("2 kill -9 one rank -> resubmit", attempts=len(atts), job_end_s=stop_s,
           first_outcome=first["outcome"], state=ended, resumed_from=result["resumed_from_step"],
           rows_checked=n + len(atts))
