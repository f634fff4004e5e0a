"""Scenario 6: the disk fills up while a checkpoint is being saved (the workdir on a small
tmpfs). Expected: a clear error naming the disk-full condition, the previous checkpoint
intact, no half-written checkpoint left taking the space, the ledger consistent; once space
is freed, resubmit resumes from that checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import time

import pytest

from faultkit import CLI, wait_until, write_grid

pytestmark = [pytest.mark.fault, pytest.mark.slow]


@pytest.fixture
def small_disk(tmp_path):
    mnt = tmp_path / "disk"
    mnt.mkdir()
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if p.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {p.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def _complete_checkpoints(stage_dir):
    ck = stage_dir / "checkpoints"
    return sorted(p for p in ck.glob("step-*") if (p / "meta.json").exists()) \
        if ck.exists() else []


def test_disk_full_while_saving_a_checkpoint(tmp_path, small_disk, tiny_model, figure):
    cli = CLI(tmp_path)
    cli.workdir = small_disk / "runs"
    grid = write_grid(tmp_path / "g.toml", tiny_model, budgets=(192,), epochs=4, every=8)
    cli("submit", grid, "--executor", "local", check=True)
    sft = cli.rows("SELECT stage_id FROM stages WHERE kind = 'sft'")[0][0]
    sd = cli.workdir / "stages" / sft
    wait_until(lambda: _complete_checkpoints(sd), 240, "a first checkpoint", poll=0.05)
    # Fill the disk, leaving less than one checkpoint's worth.
    # (the job keeps writing meanwhile: fill to the brim, then give back 96 KB)
    filler = small_disk / "filler"
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * (256 * 1024))
        except OSError:
            pass
        f.truncate(max(0, f.tell() - 96 * 1024))
    t_full = time.time()
    wait_until(lambda: cli.json("status", "f")["active"] == 0, 240, "the job to stop",
               poll=1.0)
    stop_s = time.time() - t_full
    state, error = cli.rows("SELECT state, error FROM stages WHERE stage_id = ?", (sft,))[0]
    assert state == "FAILED", (state, error)
    assert "No space left on device" in error and "checkpoint" in error, error
    assert len(error.splitlines()) == 1
    ckpts = _complete_checkpoints(sd)
    assert ckpts, "the previous checkpoint was lost"
    meta = json.loads((ckpts[-1] / "meta.json").read_text())
    assert not list((sd / "checkpoints").glob(".tmp-*")), "a half-written checkpoint was left"
    assert cli.rows("PRAGMA integrity_check") == [("ok",)]
    assert cli.rows("SELECT state FROM stages WHERE kind = 'eval'")[0][0] in ("BLOCKED",
                                                                            "FAILED")
    # Space back: resubmit resumes from that checkpoint and finishes.
    filler.unlink()
    t_free = time.time()
    cli("resubmit", "f", check=True)
    wait_until(lambda: cli.json("status", "f")["active"] == 0, 300, "the resubmitted job",
               poll=1.0)
    assert {s for (s,) in cli.rows("SELECT state FROM stages")} == {"COMPLETED"}
    result = json.loads((sd / "result.json").read_text())
    assert result["resumed_from_step"] == meta["step"], (result["resumed_from_step"], meta)
    figure("6 disk full at checkpoint", fail_s=stop_s, resumed_from=meta["step"],
           recover_s=time.time() - t_free,
           attempts=cli.rows("SELECT COUNT(*) FROM attempts WHERE stage_id = ?", (sft,))[0][0])
