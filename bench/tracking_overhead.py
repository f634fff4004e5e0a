"""What W&B tracking in offline mode adds to a stage: opening the run (wandb.init, which
starts wandb's service process), logging one row of train/ metrics per optimizer step, the
summary, and finishing (flushing the run file). The worker does exactly these calls through
budgetlab.tracking.open_tracker on rank 0; here they run without the training around them.

    .venv/bin/python bench/tracking_overhead.py [--steps 640] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from budgetlab.tracking import open_tracker, read_offline_run


def one(root: Path, steps: int, i: int) -> tuple[float, float, float]:
    spec = {"stage_id": f"bench{i:011d}", "kind": "sft", "task": "arith", "n": 512, "seed": 0,
            "params": {"lr": 2e-3}, "resources": {},
            "tracking": {"backend": "wandb", "mode": "offline", "project": "bench",
                         "grid": "bench", "dir": str(root), "cells": []}}
    stage = root / "stages" / spec["stage_id"]
    stage.mkdir(parents=True)
    t0 = time.perf_counter()
    tr = open_tracker(spec, stage, rank=0)
    t1 = time.perf_counter()
    for s in range(1, steps + 1):
        tr.log({"train/loss": 1.0 / s, "train/lr": 1e-3, "train/tokens": 100 * s,
                "train/tokens_per_s": 1000.0, "train/grad_norm": 1.0, "train/epoch": 0}, step=s)
    t2 = time.perf_counter()
    tr.summary({"train/loss": 1.0 / steps})
    tr.finish()
    t3 = time.perf_counter()
    run = read_offline_run(next((root / "wandb").glob(f"offline-run-*-bl-{spec['stage_id']}")))
    assert len(run["history"]) == steps, len(run["history"])
    return t1 - t0, (t2 - t1) / steps, t3 - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=640)   # the quickstart's largest SFT stage
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    os.environ.setdefault("WANDB_SILENT", "true")
    with tempfile.TemporaryDirectory() as tmp:
        res = [one(Path(tmp), args.steps, i) for i in range(args.repeats)]
    init = statistics.median(r[0] for r in res)
    per_step = statistics.median(r[1] for r in res)
    total = statistics.median(r[2] for r in res)
    print(f"wandb offline, {args.steps} steps, median of {args.repeats}: open {init:.2f} s, "
          f"log {per_step * 1e6:.0f} us/step, open+log+finish {total:.2f} s")
    print(f"RESULT wandb_offline_us_per_step {per_step * 1e6:.0f}")
    print(f"RESULT wandb_offline_seconds_per_stage {total:.2f}")


if __name__ == "__main__":
    main()
