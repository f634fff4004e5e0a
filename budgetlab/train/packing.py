"""Packing self-check: does this model, with this transformers and attention implementation,
keep packed sequences apart?

The trainer packs several sequences into one row and passes position_ids without an attention
mask (data.collate); transformers then masks attention per sequence only if it detects the
packed sequences from the position resets, which depends on its version and the model's
attention implementation. At stage start, probe() forwards a few of the stage's own short
sequences packed into one row and each alone, and compares each one's summed log-probability
(what every loss is built from). If they differ, the stage trains with padding instead
(packing off) and says so once in the log and in result.json. bench/packing_check.py is the
same comparison on 20 examples, with a leaking negative control.
"""

from __future__ import annotations

import torch

PROBE_SEQUENCES = 3


def tolerance(model) -> float:
    """Agreement wanted between packed and separate forwards: fp32 sums agree to ~1e-6; bf16
    or fp16 rounding differs with the row layout, while a leak shifts log-probs by whole nats."""
    dtype = next(model.parameters()).dtype
    return 1e-3 if dtype == torch.float32 else 0.1


def pick(seqs: list, capacity: int, k: int = PROBE_SEQUENCES) -> list:
    """The k shortest sequences that fit in one packed row together (none if < 2 fit)."""
    out, used = [], 0
    for s in sorted(seqs, key=lambda s: len(s[0]))[:k]:
        if used + len(s[0]) > capacity:
            break
        out.append(s)
        used += len(s[0])
    return out if len(out) >= 2 else []


@torch.no_grad()
def probe(model, pad_id: int, capacity: int, seqs: list, device) -> dict:
    """{"ok", "max_diff", "tolerance", "sequences"}; ok None when no two sequences fit a row.

    Every rank runs the same forwards (ZeRO-3 gathers parameters collectively)."""
    from budgetlab.train import data, losses

    seqs = pick(seqs, capacity)
    if not seqs:
        return {"ok": None, "max_diff": None, "tolerance": None, "sequences": 0}
    was_training = model.training
    model.eval()
    try:
        b = data.collate(seqs, pad_id, True, capacity)
        assert b["input_ids"].shape[0] == 1  # one row: the sequences share it
        out = model(input_ids=b["input_ids"].to(device), position_ids=b["position_ids"].to(device),
                    use_cache=False).logits
        packed = losses.sequence_logps(out, b["labels"].to(device), b["segment_ids"].to(device),
                                       len(seqs)).float().cpu()
        alone = []
        for s in seqs:
            ids = torch.tensor([s[0]], device=device)
            logits = model(input_ids=ids, use_cache=False).logits
            alone.append(losses.sequence_logps(logits, torch.tensor([s[1]], device=device)))
        alone = torch.cat(alone).float().cpu()
    finally:
        model.train(was_training)
    diff = float((packed - alone).abs().max())
    tol = tolerance(model)
    return {"ok": diff <= tol, "max_diff": diff, "tolerance": tol, "sequences": len(seqs)}
