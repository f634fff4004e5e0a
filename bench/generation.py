"""Batched greedy generation (left padding, KV cache) vs one prompt at a time, on the toy model.

    DS_ACCELERATOR=cpu .venv/bin/python bench/generation.py [--n 64] [--batch-size 64]

Both sides call budgetlab.evaluate.generate on the same prompts; the outputs must be identical.
Last line: RESULT batched_generation_speedup <ratio>.
"""

import argparse
import time

import torch

from budgetlab.evaluate import generate
from budgetlab.models import load_model, load_tokenizer, resolve
from budgetlab.tasks import get_task


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="builtin:arith-tiny")
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=24)
    args = ap.parse_args()

    path = resolve(args.model)
    tok = load_tokenizer(path, padding_side="left")
    model = load_model(path).eval()
    task = get_task("arith")
    prompts = [task.format_prompt(tok, e["prompt"]) for e in task.eval_set()[: args.n]]
    print(f"model {path}  prompts {len(prompts)}  max_new_tokens {args.max_new_tokens}  "
          f"torch threads {torch.get_num_threads()}")

    generate(model, tok, prompts[:4], args.max_new_tokens, 4, task.stop_strings)  # warm-up
    t = time.perf_counter()
    single, n1 = generate(model, tok, prompts, args.max_new_tokens, 1, task.stop_strings)
    t_single = time.perf_counter() - t
    t = time.perf_counter()
    batched, n2 = generate(model, tok, prompts, args.max_new_tokens, args.batch_size,
                           task.stop_strings)
    t_batched = time.perf_counter() - t

    same = sum(a == b for a, b in zip(single, batched))
    print(f"one at a time : {t_single:7.2f} s  ({n1 / t_single:7.0f} new tokens/s)")
    print(f"batched ({args.batch_size:3d}) : {t_batched:7.2f} s  ({n2 / t_batched:7.0f} new tokens/s)")
    print(f"identical outputs: {same}/{len(prompts)}")
    if same != len(prompts):
        raise SystemExit("batched and single outputs differ")
    print(f"RESULT batched_generation_speedup {t_single / t_batched:.1f}")


if __name__ == "__main__":
    main()
