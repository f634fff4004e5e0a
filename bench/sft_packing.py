"""SFT tokens/s, packed vs padded, on a length-skewed dataset (most answers short, a few long).

Same tiny random Llama, same data, same steps, same micro-batch; only `packing` differs.
Runs alternate (padded, packed, padded, packed, ...) and the best of each is kept, so that
other load on the machine hits both sides alike. Tokens are real (non-padding) tokens.

    DS_ACCELERATOR=cpu .venv/bin/python bench/sft_packing.py [--repeats 2]
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
    return {"tokens": res["tokens"], "seconds": res["train_seconds"], "loss": res["metrics"]["loss"]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--examples", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    logging.disable(logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = make_llama(tmp / "model", hidden=256, layers=4, heads=4, max_positions=512)
        rows = skewed_rows(args.examples)
        best = {}
        for r in range(args.repeats):
            for packing in (False, True):
                out = run(model, rows, packing, tmp, f"{packing}-{r}")
                tps = out["tokens"] / out["seconds"]
                print(f"{'packed' if packing else 'padded'} run {r}: {out['tokens']} tokens "
                      f"in {out['seconds']:.2f} s = {tps:.0f} tokens/s, final loss {out['loss']:.4f}")
                best[packing] = max(best.get(packing, 0.0), tps)
    ratio = best[True] / best[False]
    print(f"padded {best[False]:.0f} tokens/s, packed {best[True]:.0f} tokens/s, ratio {ratio:.2f} "
          f"(target >= 1.5)")
    print(f"RESULT sft_packing_speedup {ratio:.2f}")


if __name__ == "__main__":
    main()
