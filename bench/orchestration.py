"""Orchestration on the local SLURM (bash slurm/cluster.sh up; eval "$(bash slurm/cluster.sh env)").

1. Enqueue a grid shaped like jobs/paper-gsm8k.toml: budgetlab's arrays with aftercorr
   dependencies vs a per-point `executor.submit` loop (the submitit script baseline: one job
   per point running its whole chain, no shared SFT). Jobs are submitted held and cancelled
   right after. Prints sbatch calls, wall time, and the ratios.
2. sacct calls per sync: one, whatever the number of jobs.
3. sync + status over a ledger holding 100k attempts (synthetic finished rows plus the real
   queued jobs of step 1). Target: under 2 s.

    .venv/bin/python bench/orchestration.py [--attempts 100000]
"""

from __future__ import annotations

import argparse
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import submitit

from budgetlab.backends.job import StageJob
from budgetlab.orchestrate import submit
from budgetlab.graph import build_plan
from budgetlab.ledger import Ledger
from budgetlab.spec import load_spec
from budgetlab.stagedir import StageDir
from budgetlab.status import status
from budgetlab.sync import sync

REPO = Path(__file__).resolve().parents[1]


def paper_grid(tmp: Path) -> Path:
    """jobs/paper-gsm8k.toml on the local cluster: its partition, CPU-sized jobs, held."""
    text = (REPO / "jobs" / "paper-gsm8k.toml").read_text()
    text = text.replace('partition = "gpu"', 'partition = "batch"\nextra_sbatch = ["--hold"]')
    text = re.sub(r"gpus_per_node = \d+", "gpus_per_node = 0", text)
    text = re.sub(r"cpus_per_task = \d+", "cpus_per_task = 1", text)
    text = re.sub(r"mem_gb = \d+", "mem_gb = 1", text)
    path = tmp / "paper-gsm8k-local.toml"
    path.write_text(text)
    return path


def baseline_enqueue(plan, workdir: Path) -> tuple[int, float, list[str]]:
    """The authors' way, on submitit: one job per point running sft -> pft -> eval."""
    ex = submitit.SlurmExecutor(folder=workdir / "baseline")
    r = plan.spec.resources["sft"]
    ex.update_parameters(partition="batch", time=int(r["time_min"]), nodes=1, ntasks_per_node=1,
                         cpus_per_task=1, mem="1GB", job_name="baseline",
                         additional_parameters={"hold": True})
    t0 = time.perf_counter()
    ids = []
    for p in plan.points.values():
        chain = [s for s in (p.sft_stage_id, p.pft_stage_id, p.eval_stage_id) if s]
        dirs = [str(StageDir.of(workdir, s).root) for s in chain]
        ids.append(ex.submit(StageJob(dirs)).job_id)
    return len(ids), time.perf_counter() - t0, ids


def add_synthetic_attempts(led: Ledger, stage_ids: list[str], n: int) -> None:
    """n finished attempts (old tries of the grid's stages), inserted in one transaction."""
    rng = random.Random(0)
    now = time.time()
    outcomes = ["COMPLETED", "FAILED", "TIMEOUT", "PREEMPTED", "CANCELLED", "NODE_FAIL"]
    rows = ({"stage_id": rng.choice(stage_ids), "executor": "slurm",
             "job_id": f"{1_000_000 + i}_0", "job_name": "old", "submitted_at": now - 86400,
             "started_at": now - 86000, "ended_at": now - 80000, "raw_state": "COMPLETED",
             "outcome": rng.choice(outcomes), "exit_code": "0:0", "nodes": "n1", "gpus": 8,
             "gpu_seconds": 8 * 6000.0, "tokens": 1000, "resources": "{}"} for i in range(n))
    with led.write():   # history rows, written directly: not a state of any stage now
        led.db["attempts"].insert_all(rows, batch_size=1000)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--attempts", type=int, default=100_000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        plan = build_plan(load_spec(paper_grid(tmp)))
        led = Ledger(tmp / "ledger.db")
        led.register(plan)
        add_synthetic_attempts(led, list(plan.stages), args.attempts)
        print(f"grid {plan.name}: {len(plan.cells)} cells, {len(plan.points)} points, "
              f"{len(plan.stages)} stages")

        t0 = time.perf_counter()
        res = submit(led, plan, tmp / "runs", executor="slurm")
        ours_s = time.perf_counter() - t0
        ours_ids = sorted({u.job_id.split("_")[0] for u in res.units})
        print(f"ours:     {res.sbatch_calls:4d} sbatch calls, {ours_s:6.2f} s "
              f"({res.jobs} jobs for {len(plan.stages)} stages)")

        base_calls, base_s, base_ids = baseline_enqueue(plan, tmp / "runs")
        print(f"baseline: {base_calls:4d} sbatch calls, {base_s:6.2f} s (one job per point)")
        subprocess.run(["scancel", *base_ids], capture_output=True)

        t0 = time.perf_counter()
        rep = sync(led, tmp / "runs")
        st = status(led, plan.name)
        sync_s = time.perf_counter() - t0
        n_att = led.conn.execute("SELECT COUNT(*) FROM attempts").fetchone()[0]
        print(f"sync + status: {sync_s:.2f} s over {n_att} attempts "
              f"({rep.attempts} unfinished in {len(ours_ids)} arrays, {rep.sacct_calls} sacct "
              f"call(s)); {st['stages_total']} stages, {st['active']} queued")
        subprocess.run(["scancel", *ours_ids], capture_output=True)

        print(f"RESULT enqueue_sbatch_calls_ours {res.sbatch_calls}")
        print(f"RESULT enqueue_sbatch_calls_baseline {base_calls}")
        print(f"RESULT enqueue_sbatch_ratio {base_calls / max(1, res.sbatch_calls):.1f}")
        print(f"RESULT enqueue_time_ratio {base_s / max(1e-9, ours_s):.2f}")
        print(f"RESULT sacct_calls_per_sync {rep.sacct_calls}")
        print(f"RESULT sync_status_100k_seconds {sync_s:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
