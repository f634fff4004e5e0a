"""DPO time with reference log-probs precomputed once vs a reference model run every step.

Same tiny Llama, pairs, batch, epochs and steps; only TrainConfig.reference differs. The
precomputed side is charged for its reference pass (one no-grad forward per pair, done once);
the online side runs the reference forward inside every step of every epoch and holds a
second copy of the weights. Runs alternate and the best of each side is kept. Also checks
that both give the same loss curve (the cache changes the cost, not the maths). Clock: CPU
time with torch on one thread (see sft_packing.py for why); wall time is printed too.

    DS_ACCELERATOR=cpu .venv/bin/python bench/dpo_reference.py [--epochs 2] [--repeats 2]
"""

import argparse
import json
import logging
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from vs_trl import pairs  # noqa: E402  (the same length-skewed pairs)

from budgetlab import dist  # noqa: E402
from budgetlab.stagedir import StageDir  # noqa: E402
from budgetlab.train import loop  # noqa: E402
from budgetlab.train.config import TrainConfig  # noqa: E402
from budgetlab.train.tiny import make_llama  # noqa: E402


def run(model, rows, mode: str, epochs: int, workdir: Path, tag: str) -> dict:
    cfg = TrainConfig.from_spec({"kind": "dpo", "seed": 0, "params": {
        "epochs": epochs, "batch_size": 16, "lr": 5e-4, "beta": 0.1, "max_length": 256,
        "reference": mode}, "resources": {"micro_batch_size": 4, "zero_stage": 2,
                                           "checkpoint_every": 0}})
    stage = StageDir(workdir / tag)
    res = loop.run(stage, cfg, rows, dist.from_environment(), model)
    curve = [json.loads(x)["loss"] for x in (stage.log_dir / "train.jsonl").read_text().splitlines()]
    return {"seconds": res["train_cpu_seconds"] + res["reference_cpu_seconds"],
            "wall": res["train_seconds"] + res["reference_seconds"],
            "ref_seconds": res["reference_cpu_seconds"], "steps": res["steps"], "curve": curve}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=128)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    logging.disable(logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = make_llama(tmp / "model", hidden=256, layers=4, heads=4, max_positions=512)
        rows = pairs(args.pairs)
        best = {}
        for r in range(args.repeats):
            for mode in ("online", "precomputed"):
                out = run(model, rows, mode, args.epochs, tmp, f"{mode}-{r}")
                print(f"{mode:11s} run {r}: {out['steps']} steps in {out['seconds']:.2f} CPU s "
                      f"(reference pass {out['ref_seconds']:.2f} s; wall {out['wall']:.2f} s)")
                if mode not in best or out["seconds"] < best[mode]["seconds"]:
                    best[mode] = out
    dev = max(abs(a - b) for a, b in zip(best["online"]["curve"], best["precomputed"]["curve"]))
    print(f"loss curves online vs precomputed: max |diff| {dev:.1e}")
    ratio = best["precomputed"]["seconds"] / best["online"]["seconds"]
    print(f"wall clock ratio {best['precomputed']['wall'] / best['online']['wall']:.2f}")
    print(f"{args.epochs} epochs: online {best['online']['seconds']:.2f} CPU s, precomputed "
          f"{best['precomputed']['seconds']:.2f} s (incl. reference pass), ratio {ratio:.2f} "
          f"(target <= 0.80)")
    print(f"RESULT dpo_reference_time_ratio {ratio:.2f}")


if __name__ == "__main__":
    main()
