"""One rank of a training run for the resume tests (launched like torchrun: RANK, WORLD_SIZE,
MASTER_ADDR/PORT in the environment). `python tests/train/resume_driver.py STAGE MODEL KIND
ZERO STOP_AT`: trains the stage (checkpoint every 2 steps); with STOP_AT > 0 every rank sends
itself the preemption signal after step STOP_AT, so the run saves at the next step boundary
and stops (exit code 3), as a job that loses its allocation would."""

from __future__ import annotations

import json
import os
import random
import signal
import sys
from pathlib import Path

from budgetlab import dist
from budgetlab.stagedir import StageDir
from budgetlab.train import checkpoint, loop
from budgetlab.train.config import TrainConfig


def rows(kind: str) -> list[dict]:
    rng = random.Random(0)
    if kind == "sft":   # 40 examples, batch 8, 2 epochs: 10 steps
        return [{"prompt": f"Q: {a}+{b}=", "response": f"{a + b}" + " ok" * rng.randint(0, 12)}
                for a, b in ((rng.randint(0, 50), rng.randint(0, 50)) for _ in range(40))]
    return [{"prompt": f"Q: {a}+{a % 7}=", "chosen": f"{a + a % 7}", "rejected": f"{a - 1} no"}
            for a in range(32)]   # 32 pairs: 8 steps


def main() -> int:
    stage_dir, model, kind, zero, stop_at = sys.argv[1:6]
    cfg = TrainConfig.from_spec({
        "kind": kind, "seed": 0,
        "params": {"epochs": 2, "batch_size": 8, "lr": 1e-3, "max_length": 48,
                   "warmup_ratio": 0.0, **({"beta": 0.5} if kind != "sft" else {})},
        "resources": {"micro_batch_size": 2, "zero_stage": int(zero), "checkpoint_every": 2,
                      "keep_checkpoints": 2}})
    env = dist.from_environment()

    def on_step(step, loss, engine):
        if step == int(stop_at):
            os.kill(os.getpid(), signal.SIGUSR2)   # seen at the next step boundary

    try:
        result = loop.run(StageDir(Path(stage_dir)), cfg, rows(kind), env, model, on_step=on_step)
    except checkpoint.TrainingInterrupted as e:
        print(f"interrupted: {e}", flush=True)
        return 3
    finally:
        dist.cleanup()
    if env.rank == 0:
        Path(stage_dir, "result.json").write_text(json.dumps(result, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
