#!/usr/bin/env bash
# SFT and DPO throughput on one GPU: a ~1.1B Llama config (random init, bf16), sequences of
# 2048 tokens, ZeRO-2, through budgetlab's own training loop. Prints tokens/s and
# MFU = 6 x parameters x tokens/s / 989e12 (dense bf16 peak of an H100/H200 SXM).
# Target: SFT MFU >= 45%. Budget: under 8 minutes including start-up.
#
#   bash bench/gpu.sh                 # on the GPU machine, from the repository root
#   BENCH_SMOKE=1 bash bench/gpu.sh   # the same code path on CPU with a toy config (checks the script)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
if [ -n "${BENCH_SMOKE:-}" ]; then export DS_ACCELERATOR=cpu; fi
export TOKENIZERS_PARALLELISM=false
exec timeout 470 "$PY" - <<'PYEOF'
import json, logging, os, random, tempfile, time
from pathlib import Path

import torch

from budgetlab import dist
from budgetlab.stagedir import StageDir
from budgetlab.train import loop
from budgetlab.train.config import TrainConfig
from budgetlab.train.tiny import make_llama

SMOKE = bool(os.environ.get("BENCH_SMOKE"))
PEAK = 989e12
logging.disable(logging.WARNING)
t_start = time.time()
if SMOKE:
    shape = dict(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab_size=512)
    seq, sft_mb, sft_batch, sft_steps, dpo_mb, dpo_batch, dpo_steps = 256, 2, 4, 4, 1, 2, 3
else:
    # ~1.1B: Llama-3.2-1B-like widths, 16 layers, GQA 32/8 heads, 32k vocabulary (untied)
    shape = dict(hidden=2048, layers=16, heads=32, kv_heads=8, intermediate=8192, vocab_size=32000)
    seq, sft_mb, sft_batch, sft_steps, dpo_mb, dpo_batch, dpo_steps = 2048, 8, 32, 24, 4, 16, 12
    assert torch.cuda.is_available(), "bench/gpu.sh needs a CUDA GPU (BENCH_SMOKE=1 for a CPU check)"
    print(torch.cuda.get_device_name(0), "torch", torch.__version__, flush=True)

rng = random.Random(0)
def text(n):  # byte-level tokenizer: one character = one token
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz     ") for _ in range(n))

def measure(kind, rows, mb, batch, steps, tmp, extra=None):
    params = {"epochs": 1, "batch_size": batch, "lr": 1e-5, "max_length": seq, "warmup_ratio": 0.0,
              "lr_scheduler": "constant", **(extra or {})}
    cfg = TrainConfig.from_spec({"kind": kind, "seed": 0, "params": params, "resources": {
        "micro_batch_size": mb, "zero_stage": 2, "checkpoint_every": 0}})
    stage = StageDir(tmp / kind)
    times = {}
    res = loop.run(stage, cfg, rows, env, model_dir,
                   on_step=lambda step, loss, engine: times.__setitem__(step, time.time()))
    toks = {json.loads(l)["step"]: json.loads(l)["tokens"]
            for l in (stage.log_dir / "train.jsonl").read_text().splitlines()}
    first = 3 if steps > 5 else 1  # skip warm-up steps (allocator, kernels)
    tps = (toks[steps] - toks[first]) / (times[steps] - times[first])
    return tps, res

with tempfile.TemporaryDirectory() as tmp:
    tmp = Path(tmp)
    with torch.device("cpu" if SMOKE else "cuda"):  # random init of 1.1B params is slow on CPU
        model_dir = make_llama(tmp / "model", max_positions=seq, dtype=torch.bfloat16, **shape)
    from transformers import AutoConfig, AutoModelForCausalLM
    with torch.device("meta"):
        n_params = sum(p.numel() for p in AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir)).parameters())
    print(f"model: {n_params / 1e9:.2f}B parameters, sequence {seq}, built in {time.time() - t_start:.0f} s", flush=True)
    env = dist.from_environment()

    def sft_row():  # 1000-2046 tokens: packing fills most of each 2048-token row
        p = rng.randint(seq // 64, seq // 16)
        return {"prompt": text(p), "response": text(rng.randint(seq // 2, seq - p - 2))}
    sft_rows = [sft_row() for _ in range(sft_batch * sft_steps)]
    sft_tps, res = measure("sft", sft_rows, sft_mb, sft_batch, sft_steps, tmp)
    sft_mfu = 6 * n_params * sft_tps / PEAK
    print(f"SFT: {sft_tps:,.0f} tokens/s, MFU {sft_mfu:.1%}, peak memory "
          f"{res['peak_memory_bytes'] / 2**30:.1f} GiB, micro-batch {sft_mb}, batch {sft_batch}", flush=True)

    half = seq // 2
    dpo_rows = [{"prompt": text(rng.randint(half // 2, half - 10)), "chosen": text(rng.randint(half // 2, half - 10)),
                 "rejected": text(rng.randint(half // 2, half - 10))} for _ in range(dpo_batch * dpo_steps)]
    dpo_tps, res = measure("dpo", dpo_rows, dpo_mb, dpo_batch, dpo_steps, tmp, {"beta": 0.1})
    dpo_mfu = 6 * n_params * dpo_tps / PEAK
    print(f"DPO: {dpo_tps:,.0f} tokens/s (chosen + rejected), MFU {dpo_mfu:.1%}, reference pass "
          f"{res['reference_seconds']:.1f} s, peak memory {res['peak_memory_bytes'] / 2**30:.1f} GiB", flush=True)
print(f"total {time.time() - t_start:.0f} s")
print(f"RESULT gpu_dpo_tokens_per_s {dpo_tps:.0f}")
print(f"RESULT gpu_sft_mfu {sft_mfu:.3f}")
PYEOF
