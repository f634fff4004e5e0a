"""Scenario 5: truncated or garbage result.json and progress.json, and checkpoint directories
left half written (a crash between write and rename, a truncated meta.json, a checkpoint
whose weights are cut short): detected, reported, and the previous good checkpoint is used.

Real processes: the local executor's runner and the worker (`python -m budgetlab.worker`)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from budgetlab.graph import build_plan
from budgetlab.spec import load_spec
from budgetlab.stagedir import StageDir
from faultkit import CLI, wait_until, write_grid

pytestmark = [pytest.mark.fault, pytest.mark.slow]


def _local_job_done(cli: CLI) -> bool:
    states = list((cli.workdir / "local" / "jobs").glob("*.state.json"))
    return bool(states) and all(json.loads(p.read_text()).get("state") in
                                ("COMPLETED", "FAILED") for p in states)


def test_corrupt_result_and_progress_files_fail_the_attempt_clearly(tmp_path, tiny_model,
                                                                    figure):
    cli = CLI(tmp_path)
    grid = write_grid(tmp_path / "g.toml", tiny_model)        # SFT + eval, one local job
    cli("submit", grid, "--executor", "local", check=True)
    wait_until(lambda: _local_job_done(cli), 240, "the local job", poll=0.5)
    sft, ev = (cli.rows("SELECT stage_id FROM stages WHERE kind = ?", (k,))[0][0]
               for k in ("sft", "eval"))
    sft_dir, ev_dir = (cli.workdir / "stages" / s for s in (sft, ev))
    # Before any sync: the SFT result cut in half, the eval result binary garbage, progress
    # garbage too.
    text = (sft_dir / "result.json").read_text()
    (sft_dir / "result.json").write_text(text[: len(text) // 2])
    (ev_dir / "result.json").write_bytes(b"\x00\xff garbage \x89PNG")
    (sft_dir / "progress.json").write_text('{"step": 3, "loss": ')
    t0 = time.time()
    p = cli("sync")
    assert p.returncode == 0, p.stderr
    rows = dict(cli.rows("SELECT stage_id, state FROM stages"))
    assert rows == {sft: "FAILED", ev: "FAILED"}, rows
    errors = dict(cli.rows("SELECT stage_id, error FROM attempts"))
    assert "result.json" in errors[sft] and "truncated or corrupt" in errors[sft], errors
    assert "result.json" in errors[ev] and "not text" in errors[ev], errors
    assert all("\n" not in e for e in errors.values())
    for args in (("status", "f"), ("ledger", "stages"), ("ledger", "attempts"), ("report", "f")):
        p = cli(*args)
        assert p.returncode == 0 and "Traceback" not in p.stderr, (args, p.stderr)
    assert not cli.rows("SELECT * FROM metrics")     # nothing read from a broken file
    # resubmit reruns both; the broken files are replaced, the metrics recorded once.
    cli("resubmit", "f", check=True)
    wait_until(lambda: cli.json("status", "f")["active"] == 0, 240, "the rerun", poll=1.0)
    assert dict(cli.rows("SELECT stage_id, state FROM stages")) == {sft: "COMPLETED",
                                                                   ev: "COMPLETED"}
    dup = cli.rows("SELECT stage_id, name, COUNT(*) FROM metrics GROUP BY 1, 2 HAVING COUNT(*) > 1")
    assert not dup and cli.rows("SELECT COUNT(*) FROM metrics")[0][0] > 0
    figure("5a corrupt result/progress", detected=2, attempts=len(cli.rows(
        "SELECT * FROM attempts")), recover_s=time.time() - t0)


def _worker(stage_dir, env=None):
    return subprocess.Popen([sys.executable, "-m", "budgetlab.worker", str(stage_dir)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, **(env or {})))


def _checkpoints(stage_dir):
    ck = stage_dir / "checkpoints"
    return sorted(int(p.name[5:]) for p in ck.glob("step-*") if (p / "meta.json").exists()) \
        if ck.exists() else []


def test_half_written_checkpoints_fall_back_to_the_previous_one(tmp_path, tiny_model, figure):
    grid = write_grid(tmp_path / "g.toml", tiny_model, budgets=(64,), epochs=3, every=4)
    plan = build_plan(load_spec(grid))
    sft = next(s for s in plan.stages.values() if s.kind == "sft")
    stage = StageDir.of(tmp_path / "runs", sft.stage_id)
    stage.write_spec(sft.spec_json(tmp_path / "runs"))
    # A first run, stopped by SIGTERM after two checkpoints (it saves one more and stops).
    p = _worker(stage.root)
    wait_until(lambda: len(_checkpoints(stage.root)) >= 2 or p.poll() is not None, 240,
               "two checkpoints", poll=0.05)
    p.send_signal(signal.SIGTERM)
    out, _ = p.communicate(timeout=120)
    assert p.returncode == 1 and "TrainingInterrupted" in out, out[-2000:]
    good = _checkpoints(stage.root)[-1]
    ck = stage.checkpoints_dir
    src = ck / f"step-{good:08d}"
    # Crash leftovers, all newer than the last good checkpoint:
    shutil.copytree(src, ck / f".tmp-step-{good + 1:08d}")           # never renamed
    (ck / f".tmp-step-{good + 1:08d}" / "meta.json").unlink()
    shutil.copytree(src, ck / f"step-{good + 2:08d}")                # meta.json cut short
    (ck / f"step-{good + 2:08d}" / "meta.json").write_text('{"step": ')
    shutil.copytree(src, ck / f"step-{good + 3:08d}")                # weights cut short
    (ck / f"step-{good + 3:08d}" / "meta.json").write_text(
        json.dumps({**json.loads((src / "meta.json").read_text()), "step": good + 3}))
    for f in (ck / f"step-{good + 3:08d}").rglob("*.pt"):
        f.write_bytes(f.read_bytes()[:100])
    t0 = time.time()
    p = _worker(stage.root)
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 0, out[-3000:]
    result = json.loads(stage.result_path.read_text())
    assert result["resumed_from_step"] == good, (result["resumed_from_step"], good, out[-2000:])
    for bad in (good + 2, good + 3):    # each skipped checkpoint is reported, with why
        assert f"step-{bad:08d}" in out, out[-3000:]
    figure("5b half-written checkpoints", skipped=3, resumed_from=good,
           recover_s=time.time() - t0)
