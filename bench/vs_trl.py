"""Our DPO vs TRL's DPOTrainer on CPU: same tiny Llama, pairs, batch, max length and steps.

Reports real (non-padding) tokens/s of both, and the DPO loss of both on one identical fixed
batch (policy = a model after some training, reference = the starting model), which must agree
to 1e-5. TRL is a benchmark-only dependency: it is pip-installed (no deps, pinned) into a
temporary directory put on sys.path for this run; budgetlab never imports it.

    DS_ACCELERATOR=cpu .venv/bin/python bench/vs_trl.py [--pairs 128] [--repeats 2]

Time counted: ours = the reference pass + the step loop; TRL = trainer.train() (TRL runs its
reference model online, its default). Dataset tokenisation is excluded on both sides. Clock:
CPU time of the process with torch on one thread (see sft_packing.py for why); wall-clock
figures are printed too. Each training run is its own process (python bench/vs_trl.py --side
ours|trl ...): TRL/accelerate then see no process group or RANK variables left by our run.
"""

import argparse
import logging
import math
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("ACCELERATE_USE_CPU", "true")
# accelerate raises the thread count to 2 when OMP_NUM_THREADS is unset; pin it for both sides
os.environ.setdefault("OMP_NUM_THREADS", "1")
TRL = "trl==1.16.0"

import torch  # noqa: E402

from budgetlab import dist  # noqa: E402
from budgetlab.stagedir import StageDir  # noqa: E402
from budgetlab.train import data, loop, losses  # noqa: E402
from budgetlab.train.config import TrainConfig  # noqa: E402
from budgetlab.train.tiny import make_llama  # noqa: E402

BATCH, MICRO, EPOCHS, MAX_LEN, LR, BETA = 16, 4, 2, 256, 5e-4, 0.1


def import_trl(tmp: Path):
    try:
        import trl
    except ImportError:
        target = tmp / "trl-pkg"
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                        "--disable-pip-version-check", "--target", str(target), TRL], check=True)
        sys.path.insert(0, str(target))
        import trl
    return trl


def pairs(n: int, seed: int = 0) -> list[dict]:
    """Pairs with skewed lengths: most answers short, some long (as in real preference data)."""
    rng = random.Random(seed)

    def text(k):
        return " ".join(rng.choice(["one", "two", "three", "four", "five"]) for _ in range(k))

    out = []
    for i in range(n):
        k = rng.randint(30, 45) if rng.random() < 0.15 else rng.randint(2, 10)
        out.append({"prompt": f"Q{i}: count with me. A:", "chosen": " " + text(k),
                    "rejected": " " + text(max(1, k + rng.randint(-2, 2)))})
    return out


def ours(model: str, rows, workdir: Path, tag: str) -> dict:
    cfg = TrainConfig.from_spec({"kind": "dpo", "seed": 0, "params": {
        "epochs": EPOCHS, "batch_size": BATCH, "lr": LR, "beta": BETA, "max_length": MAX_LEN,
        "warmup_ratio": 0.1, "lr_scheduler": "cosine"},
        "resources": {"micro_batch_size": MICRO, "zero_stage": 2, "checkpoint_every": 0}})
    stage = StageDir(workdir / tag)
    res = loop.run(stage, cfg, rows, dist.from_environment(), model)
    return {"tokens": res["tokens"], "seconds": res["train_cpu_seconds"] + res["reference_cpu_seconds"],
            "wall": res["train_seconds"] + res["reference_seconds"],
            "steps": res["steps"], "loss": res["metrics"]["loss"], "model": str(stage.model_dir)}


def trl_trainer(trl, model_path: str, rows, out: Path, ref_path: str | None = None):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    from budgetlab import models

    tok = models.load_tokenizer(model_path)
    args = trl.DPOConfig(
        output_dir=str(out), per_device_train_batch_size=MICRO,
        gradient_accumulation_steps=BATCH // MICRO, num_train_epochs=EPOCHS, learning_rate=LR,
        lr_scheduler_type="cosine", beta=BETA,
        warmup_steps=math.ceil(0.1 * EPOCHS * math.ceil(len(rows) / BATCH)),  # = ours max_length=MAX_LEN,
        use_cpu=True, report_to=[], logging_steps=1, save_strategy="no", bf16=False, seed=0,
        dataloader_num_workers=0, disable_tqdm=True, weight_decay=0.0, max_grad_norm=1.0,
        gradient_checkpointing=False)  # TRL defaults to True; ours runs without, so must TRL
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(ref_path or model_path, dtype=torch.float32)
    return trl.DPOTrainer(model=model, ref_model=ref, args=args, processing_class=tok,
                          train_dataset=Dataset.from_list(rows))


def trl_train(trl, model_path, rows, out: Path) -> dict:
    import time

    trainer = trl_trainer(trl, model_path, rows, out)
    c0 = time.process_time()
    metrics = trainer.train().metrics
    return {"seconds": time.process_time() - c0, "wall": metrics["train_runtime"],
            "steps": trainer.state.global_step}


def same_batch_losses(trl, policy: str, reference: str, rows, out: Path) -> tuple[float, float]:
    """DPO loss of TRL and of ours on one identical batch of 8 pairs."""
    from transformers import AutoModelForCausalLM

    from budgetlab import models

    batch_rows = rows[:8]
    trainer = trl_trainer(trl, policy, batch_rows, out, ref_path=reference)
    trainer.model.eval()
    inputs = trainer.data_collator([trainer.train_dataset[i] for i in range(len(batch_rows))])
    with torch.no_grad():
        theirs = float(trainer.compute_loss(trainer.model, inputs))

    tok = models.load_tokenizer(policy)
    enc, _ = data.encode_pairs(tok, batch_rows, MAX_LEN)
    cfg = TrainConfig(kind="dpo", max_length=MAX_LEN)
    scores = {}
    for name, path in (("policy", policy), ("ref", reference)):
        m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        scorer = loop.Scorer(m, tok.pad_token_id, cfg, torch.device("cpu"))
        with torch.no_grad():
            scores[name] = loop.reference_scores("dpo", scorer, enc, list(range(len(enc))))
    per_pair, _, _ = losses.dpo_loss(scores["policy"]["chosen"], scores["policy"]["rejected"],
                                     scores["ref"]["chosen"], scores["ref"]["rejected"], BETA)
    return theirs, float(per_pair.mean())


def side(args) -> None:
    """One training run in this process; prints its figures as one JSON line."""
    import json

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    rows = pairs(args.pairs)
    if args.side == "ours":
        out = ours(args.model, rows, Path(args.workdir), args.tag)
    else:
        import trl

        out = trl_train(trl, args.model, rows, Path(args.workdir) / args.tag)
    print("SIDE " + json.dumps(out))


def run_side(name: str, args, model: str, workdir: Path, tag: str, pythonpath: str) -> dict:
    import json

    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads),
               PYTHONPATH=os.pathsep.join(p for p in (pythonpath, os.environ.get("PYTHONPATH")) if p))
    proc = subprocess.run([sys.executable, __file__, "--side", name, "--pairs", str(args.pairs),
                           "--model", model, "--workdir", str(workdir), "--tag", tag],
                          env=env, capture_output=True, text=True)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("SIDE ")]
    if proc.returncode or not lines:
        raise SystemExit(f"{name} run failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][5:])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--side", choices=("ours", "trl"))
    ap.add_argument("--model")
    ap.add_argument("--workdir")
    ap.add_argument("--tag")
    args = ap.parse_args()
    logging.disable(logging.WARNING)
    if args.side:
        return side(args)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        trl = import_trl(tmp)
        trl_path = str(Path(trl.__file__).resolve().parent.parent)
        model = make_llama(tmp / "model", hidden=256, layers=4, heads=4, max_positions=512)
        rows = pairs(args.pairs)
        best_ours = best_trl = wall_ours = wall_trl = 0.0
        for r in range(args.repeats):
            a = run_side("ours", args, model, tmp, f"ours-{r}", trl_path)
            b = run_side("trl", args, model, tmp, f"trl-{r}", trl_path)
            assert a["steps"] == b["steps"] == EPOCHS * math.ceil(len(rows) / BATCH), (a, b)
            # same examples and epochs on both sides: the same real tokens
            ta, tb = a["tokens"] / a["seconds"], a["tokens"] / b["seconds"]
            print(f"run {r}: {a['steps']} steps, {a['tokens']} tokens; ours {a['seconds']:.2f} CPU s "
                  f"({ta:.0f} tok/s), TRL {b['seconds']:.2f} CPU s ({tb:.0f} tok/s); wall: ours "
                  f"{a['wall']:.2f} s, TRL {b['wall']:.2f} s", flush=True)
            best_ours, best_trl = max(best_ours, ta), max(best_trl, tb)
            wall_ours = max(wall_ours, a["tokens"] / a["wall"])
            wall_trl = max(wall_trl, a["tokens"] / b["wall"])
        theirs, mine = same_batch_losses(trl, a["model"], model, rows, tmp / "trl-loss")
    diff = abs(theirs - mine)
    print(f"same batch DPO loss: TRL {theirs:.8f}, ours {mine:.8f}, |diff| {diff:.2e} "
          f"({'ok' if diff <= 1e-5 else 'MISMATCH'}, must be <= 1e-5)")
    ratio = best_ours / best_trl
    print(f"wall clock tokens/s: ours {wall_ours:.0f}, TRL {wall_trl:.0f}, ratio {wall_ours / wall_trl:.2f}")
    print(f"CPU time tokens/s: ours {best_ours:.0f}, TRL {TRL} {best_trl:.0f}, ratio {ratio:.2f} "
          f"(target >= 1.3)")
    print(f"RESULT dpo_vs_trl_tokens_per_s_ratio {ratio:.2f}")


if __name__ == "__main__":
    main()
