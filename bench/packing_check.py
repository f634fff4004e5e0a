"""Packed forwards vs one forward per example: does packing leak attention across examples?

The trainer packs several sequences into one row and passes position_ids without an attention
mask (budgetlab/train/data.py collate), relying on transformers to detect the packed
sequences from the position resets; whether it does depends on its version and the model's
attention implementation. This check forwards 20 examples of varied lengths packed (rows of
max_length 256) and each alone (no padding at all), and compares every example's summed
response log-probability (the quantity every loss is built from); an example is correct when
the two agree within 1e-4 (fp32). It runs for each attention implementation available, with
a negative control (the packed rows forwarded as plain causal rows, i.e. leaking) to show
that the comparison catches a leak.

    DS_ACCELERATOR=cpu .venv/bin/python bench/packing_check.py
"""

import random
import tempfile
from pathlib import Path

import torch
import transformers

from budgetlab import models
from budgetlab.train import data, loop
from budgetlab.train.config import TrainConfig
from budgetlab.train.tiny import make_llama

N, MAX_LEN, TOL = 20, 256, 1e-4


def sequences(tok, n: int, seed: int = 0):
    rng = random.Random(seed)
    words = ["one", "two", "three", "four", "five", "apple", "sea", "blue"]
    out = []
    for i in range(n):
        prompt = f"Q{i}: " + " ".join(rng.choice(words) for _ in range(rng.randint(1, 8))) + " A:"
        answer = " " + " ".join(rng.choice(words) for _ in range(rng.randint(1, 25)))
        out.append(data.completion_sequence(data.encode_prompt(tok, prompt),
                                            data.encode_completion(tok, answer)))
    return out


def check(path: str, attn: str) -> tuple[int, float, int]:
    from transformers import AutoModelForCausalLM

    tok = models.load_tokenizer(path)
    seqs = sequences(tok, N)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                 attn_implementation=attn).eval()
    packed_cfg = TrainConfig(kind="sft", max_length=MAX_LEN, packing=True)
    alone_cfg = TrainConfig(kind="sft", max_length=MAX_LEN, packing=False)
    with torch.no_grad():
        packed, batch = loop.Scorer(model, tok.pad_token_id, packed_cfg,
                                    torch.device("cpu")).seq_logps(seqs)
        alone = torch.cat([loop.Scorer(model, tok.pad_token_id, alone_cfg, torch.device("cpu"))
                           .seq_logps([s])[0] for s in seqs])
        # Negative control: the same packed rows as one causal sequence each (no position
        # resets), i.e. what a leak looks like; only the first example of a row can pass.
        from budgetlab.train import losses

        leak_logits = model(input_ids=batch["input_ids"], use_cache=False).logits
        leaked = losses.sequence_logps(leak_logits, batch["labels"], batch["segment_ids"], N)
    diff = (packed - alone).abs()
    control = int(((leaked - alone).abs() <= TOL).sum())
    return int((diff <= TOL).sum()), float(diff.max()), int(batch["input_ids"].shape[0]), control


def main():
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        path = make_llama(Path(tmp) / "m", hidden=128, layers=2, heads=4, max_positions=512)
        results = {}
        for attn in ("eager", "sdpa"):
            try:
                correct, worst, rows, control = check(path, attn)
            except (ValueError, ImportError) as e:   # implementation not available here
                print(f"{attn}: not available ({str(e).splitlines()[0]})")
                continue
            results[attn] = correct
            print(f"transformers {transformers.__version__}, attn {attn}: {N} examples packed "
                  f"into {rows} rows; correct {correct}/{N}, max |packed - alone| {worst:.2e}; "
                  f"negative control (attention across the row): {control}/{N} would pass")
        print(f"RESULT packing_check_correct {min(results.values())}/{N}")


if __name__ == "__main__":
    main()
