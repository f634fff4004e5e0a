"""SFT tokens/s, packed vs padded, on a length-skewed dataset (most answers short, a few long).

Same tiny random Llama, same data, same steps, same micro-batch; only `packing` differs.
Tokens are real (non-padding) tokens. The clock is the process's CPU time of the step loop
with torch on one thread: on a 2-core machine shared with other jobs, wall time swings by 2-5x
from run to run while CPU time of a single-threaded run measures the work itself. Wall-clock
figures are printed too. Runs alternate (padded, packed, ...) and the best of each is kept.

    DS_ACCELERATOR=cpu .venv/bin/python bench/sft_packing.py [--repeats 2] [--threads 1]
"""

import argparse
import logging
import os
import random
import tempfile
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")

from budgetlab import dist  # noqa: E402
from budgetlab.stagedir import StageDir  # noqa: E402
from budgetlab.train import loop  # noqa: E402
from budgetlab.train.config import TrainConfig  # noqa: E402
from budgetlab.train.tiny import make_llama  # noqa: E402


def skewed_rows(n: int, seed: int = 0) -> list[dict]:
    """Response lengths: 85% 8-48 bytes, 15% 200-480 bytes (a long tail, like real SFT data)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        long = rng.random() < 0.15
        length = rng.randint(200, 480) if long else rng.randint(8, 48)
        words = " ".join(rng.choice(["alpha", "beta", "gamma", "delta", "eps"]) for _ in range(length // 5))
        rows.append({"prompt": f"Question {i}: say something.", "response": words[:length]})
    return rows


def run(model: str, rows, packing: bool, workdir: Path, tag: str) -> dict:
    cfg = TrainConfig.from_spec({"kind": "sft", "seed": 0, "params": {
        "epochs": 1, "batch_size": 32, "lr": 1e-4, "max_length": 512, "packing": packing,
        "warmup_ratio": 0.0}, "resources": {"micro_batch_size": 8, "zero_stage": 2,
                                             "checkpoint_every": 0}})
    res = loop.run(StageDir(workdir / tag), cfg, rows, dist.from_environment(), model)
    return {"tokens": res["tokens"], "cpu": res["train_cpu_seconds"], "wall": res["train_seconds"],
            "loss": res["metrics"]["loss"]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--examples", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    logging.disable(logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = make_llama(tmp / "model", hidden=256, layers=4, heads=4, max_positions=512)
        rows = skewed_rows(args.examples)
        best, wall = {}, {}
        for r in range(args.repeats):
            for packing in (False, True):
                out = run(model, rows, packing, tmp, f"{packing}-{r}")
                tps, wps = out["tokens"] / out["cpu"], out["tokens"] / out["wall"]
                print(f"{'packed' if packing else 'padded'} run {r}: {out['tokens']} tokens, "
                      f"{out['cpu']:.2f} CPU s = {tps:.0f} tokens/s ({out['wall']:.2f} wall s = "
                      f"{wps:.0f} tokens/s), final loss {out['loss']:.4f}")
                best[packing] = max(best.get(packing, 0.0), tps)
                wall[packing] = max(wall.get(packing, 0.0), wps)
    ratio = best[True] / best[False]
    print(f"wall clock: padded {wall[False]:.0f}, packed {wall[True]:.0f} tokens/s, "
          f"ratio {wall[True] / wall[False]:.2f}")
    print(f"CPU time: padded {best[False]:.0f} tokens/s, packed {best[True]:.0f} tokens/s, "
          f"ratio {ratio:.2f} (target >= 1.5)")
    print(f"RESULT sft_packing_speedup {ratio:.2f}")


if __name__ == "__main__":
    main()
