"""Helpers of the fault suite: the CLI as a process, grids of a tiny model, the cluster."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BUDGETLAB = [sys.executable, "-c", "import sys; from budgetlab.cli import main; sys.argv[0] = 'budgetlab'; main()"]


# -- the CLI as a separate process ------------------------------------------------------------
class CLI:
    """budgetlab as users run it: a fresh process with --ledger/--workdir of a temp dir."""

    def __init__(self, root: Path, env: dict | None = None):
        self.root = root
        self.ledger = root / "ledger.db"
        self.workdir = root / "runs"
        self.env = dict(os.environ, **(env or {}))
        self.env.pop("BUDGETLAB_LEDGER", None)
        self.env.pop("BUDGETLAB_WORKDIR", None)

    def argv(self, *args) -> list[str]:
        return [*BUDGETLAB, "--ledger", str(self.ledger), "--workdir", str(self.workdir),
                *map(str, args)]

    def __call__(self, *args, timeout: float = 300, check: bool = False):
        p = subprocess.run(self.argv(*args), capture_output=True, text=True, env=self.env,
                           timeout=timeout, cwd=self.root)
        if check and p.returncode != 0:
            raise AssertionError(f"budgetlab {' '.join(map(str, args))} -> {p.returncode}\n"
                                 f"{p.stdout}\n{p.stderr}")
        return p

    def json(self, *args, timeout: float = 300):
        p = self(*args, "--json", timeout=timeout, check=True)
        return json.loads(p.stdout)

    def db(self) -> sqlite3.Connection:
        return sqlite3.connect(self.ledger, timeout=60)

    def rows(self, sql: str, params=()) -> list[tuple]:
        with self.db() as c:
            return c.execute(sql, params).fetchall()





GRID = """
name = "{name}"
[grid]
tasks = ["arith"]
models = ["{model}"]
budgets = {budgets}
sft_fractions = {fractions}
methods = {methods}
seeds = {seeds}
[train]
max_length = 64
batch_size = 4
epochs = {epochs}
[train.sft]
lr = 1e-3
[eval]
limit = 4
max_new_tokens = 2
batch_size = 4
baseline = false
[resources]
micro_batch_size = {micro}
zero_stage = 0
checkpoint_every = {every}
keep_checkpoints = 2
time_min = 10
mem_gb = 1
cpus_per_task = 1
{extra}
"""


def write_grid(path: Path, model: str, name: str = "f", budgets=(8,), fractions=(1.0,),
               methods=("dpo",), seeds=(0,), epochs: int = 1, every: int = 50, micro: int = 4,
               extra: str = "") -> Path:
    path.write_text(textwrap.dedent(GRID.format(
        name=name, model=model, budgets=json.dumps(list(budgets)),
        fractions=json.dumps(list(fractions)), methods=json.dumps(list(methods)),
        seeds=json.dumps(list(seeds)), epochs=epochs, every=every, micro=micro,
        extra=textwrap.dedent(extra))))
    return path


# -- the local SLURM cluster ---------------------------------------------------------------
def slurm_env() -> dict | None:
    if not shutil.which("sbatch"):
        return None
    env = {}
    if not os.environ.get("SLURM_CONF"):
        p = subprocess.run(["bash", str(REPO / "slurm" / "cluster.sh"), "env"],
                           capture_output=True, text=True)
        for line in p.stdout.splitlines():
            k, _, v = line.partition("=")
            env[k] = v
    merged = dict(os.environ, **env)
    p = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, env=merged,
                       timeout=60)
    if p.returncode != 0 or not p.stdout.strip():
        return None
    return env



def scontrol_show(job_id: str) -> dict:
    p = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True,
                       text=True, timeout=60)
    out = {}
    for tok in p.stdout.split():
        k, _, v = tok.partition("=")
        out[k] = v
    return out


_held_since: dict[str, float] = {}


def release_if_held(job_id: str, settle: float = 3.0) -> None:
    """SLURM holds a requeued job until BeginTime (about 2 minutes); start it `settle` s after
    the hold was first seen, not at once: a job started within a second of its requeue can
    reach a node still revoking the last run's credential (slurmctld: "Killing non-startable
    batch JobId=N: Job credential revoked"), which ends it FAILED without running. Returns
    None so that `wait_until(lambda: release_if_held(j) or cond(), ...)` keeps polling."""
    info = scontrol_show(job_id)
    if info.get("JobState") == "PENDING" and info.get("Reason") in ("BeginTime", "JobHeldAdmin"):
        first = _held_since.setdefault(job_id, time.time())
        if time.time() - first >= settle:
            subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"],
                           capture_output=True, timeout=60)
            _held_since.pop(job_id, None)
    else:
        _held_since.pop(job_id, None)


def job_pids(job_id: str) -> dict[int, int]:
    """SLURM_PROCID -> pid of a job's python (submitit) processes on this node."""
    raw = scontrol_show(job_id).get("JobId")     # listpids wants the plain job id, not A_i
    p = subprocess.run(["scontrol", "listpids", raw], capture_output=True, text=True,
                       timeout=60)
    out = {}
    for line in p.stdout.splitlines()[1:]:
        pid = line.split()[0]
        if not pid.isdigit():
            continue
        try:
            env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
            cmd = open(f"/proc/{pid}/cmdline", "rb").read()
        except OSError:
            continue
        if b"submitit" not in cmd:
            continue
        for kv in env:
            if kv.startswith(b"SLURM_PROCID="):
                out[int(kv.split(b"=")[1])] = int(pid)
    return out


def wait_until(cond, timeout: float, what: str, poll: float = 0.5, detail=None):
    """Poll cond() until it returns something truthy; fail with `what` after timeout s, and
    with what `detail()` says (the state the wait ended in: what a stall report needs)."""
    end = time.time() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.time() > end:
            extra = ""
            if detail is not None:
                try:
                    extra = f"\n{detail()}"
                except Exception as e:   # the report must not hide the timeout
                    extra = f"\n(no detail: {e!r})"
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}{extra}")
        time.sleep(poll)


def queue_snapshot() -> str:
    """squeue as a user reads it, with each job's reason: for stall reports."""
    return subprocess.run(["squeue", "-h", "-o", "%i %j %T %r %N"], capture_output=True,
                          text=True, timeout=60).stdout


def progress_step(stage_dir: Path) -> int:
    try:
        return int(json.loads((stage_dir / "progress.json").read_text()).get("step", 0))
    except (OSError, ValueError):
        return 0


def sync_until_done(cli: CLI, timeout: float, poll: float = 2.0) -> dict:
    """Sync until nothing is queued or running; returns the last status of grid 'f'."""
    def done():
        st = cli.json("status", "f")
        return st if st["active"] == 0 else None
    return wait_until(done, timeout, "the grid to finish", poll)
