"""Examples -> token ids -> optimizer steps -> micro-batches.

    encode_*      text to ids; prompt tokens get the IGNORE label; over-long examples are
                  truncated (the response is cut) or dropped, as the spec says
    plan_steps    the examples of every optimizer step: a seed-fixed permutation per epoch,
                  the same on every rank, so a step index is all a resume needs
    split_step    a step's examples -> world_size x grad_accum micro-batches (slots)
    collate       sequences -> one forward's tensors, packed (position ids restart per
                  sequence, no padding between sequences) or padded
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from budgetlab.train.losses import IGNORE


@dataclass
class EncodeStats:
    kept: int = 0
    truncated: int = 0
    dropped: int = 0
    dropped_examples: list = field(default_factory=list)  # indices, for the log

    def as_dict(self) -> dict:
        return {"kept": self.kept, "truncated": self.truncated, "dropped": self.dropped}


def encode_prompt(tokenizer, text: str) -> list[int]:
    # A chat template already writes the BOS token into the text; do not add a second one.
    bos = tokenizer.bos_token
    add = not (bos and text.startswith(bos))
    return tokenizer(text, add_special_tokens=add)["input_ids"]


def encode_completion(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def _fit(prompt: list[int], completion: list[int], max_length: int, truncation: str):
    """(completion that fits, status) with status "ok" | "truncated" | "dropped"."""
    if len(prompt) + len(completion) <= max_length:
        return completion, "ok"
    room = max_length - len(prompt)
    if truncation == "drop" or room < 1:
        return None, "dropped"
    return completion[:room], "truncated"


def encode_sft(tokenizer, rows: list[dict], max_length: int, truncation: str = "truncate",
               format_prompt=None):
    """[{"prompt","response"}] -> ([{"input_ids","labels"}], EncodeStats)."""
    fmt = format_prompt or (lambda tok, p: p)
    out, stats = [], EncodeStats()
    for i, row in enumerate(rows):
        p = encode_prompt(tokenizer, fmt(tokenizer, row["prompt"]))
        r, status = _fit(p, encode_completion(tokenizer, row["response"]), max_length, truncation)
        if r is None:
            stats.dropped += 1
            stats.dropped_examples.append(i)
            continue
        stats.truncated += status == "truncated"
        out.append({"input_ids": p + r, "labels": [IGNORE] * len(p) + r})
    stats.kept = len(out)
    return out, stats


def encode_pairs(tokenizer, rows: list[dict], max_length: int, truncation: str = "truncate",
                 format_prompt=None):
    """[{"prompt","chosen","rejected"}] -> ([{"prompt","chosen","rejected"} as ids], stats).

    A pair is dropped if either side must be dropped, and counted truncated if either side was.
    """
    fmt = format_prompt or (lambda tok, p: p)
    out, stats = [], EncodeStats()
    for i, row in enumerate(rows):
        p = encode_prompt(tokenizer, fmt(tokenizer, row["prompt"]))
        c, s1 = _fit(p, encode_completion(tokenizer, row["chosen"]), max_length, truncation)
        r, s2 = _fit(p, encode_completion(tokenizer, row["rejected"]), max_length, truncation)
        if c is None or r is None:
            stats.dropped += 1
            stats.dropped_examples.append(i)
            continue
        stats.truncated += "truncated" in (s1, s2)
        out.append({"prompt": p, "chosen": c, "rejected": r})
    stats.kept = len(out)
    return out, stats


def kto_examples(pairs: list[dict], max_length: int, seed: int) -> list[dict]:
    """Encoded pairs -> KTO examples: (prompt, chosen, desirable), (prompt, rejected, undesirable).

    Each example also gets a mismatched completion for the KL reference point: the completion of
    another example (seed-fixed), chosen with a different prompt whenever one exists. Building
    these at the dataset level, not inside a micro-batch, keeps the estimate valid with
    micro-batch 1.
    """
    ex = []
    for pr in pairs:
        ex.append({"prompt": pr["prompt"], "completion": pr["chosen"], "desirable": True})
        ex.append({"prompt": pr["prompt"], "completion": pr["rejected"], "desirable": False})
    n = len(ex)
    order = list(range(n))
    random.Random(seed).shuffle(order)
    for k, i in enumerate(order):
        j = order[(k + 1) % n]
        for shift in range(1, n):  # look for a different prompt, bounded by n
            cand = order[(k + shift) % n]
            if ex[cand]["prompt"] != ex[i]["prompt"]:
                j = cand
                break
        room = max(max_length - len(ex[i]["prompt"]), 1)
        ex[i]["kl_completion"] = ex[j]["completion"][:room]
    return ex


def example_length(ex: dict) -> int:
    """Tokens one example puts through the model (both sides of a pair, both KTO sequences)."""
    if "input_ids" in ex:
        return len(ex["input_ids"])
    if "chosen" in ex:
        return 2 * len(ex["prompt"]) + len(ex["chosen"]) + len(ex["rejected"])
    return len(ex["prompt"]) + len(ex["completion"])


def plan_steps(n: int, batch_size: int, epochs: int, seed: int) -> list[list[int]]:
    """Example indices of every optimizer step; the last step of an epoch may be smaller."""
    steps = []
    for epoch in range(epochs):
        order = list(range(n))
        random.Random(f"{seed}-{epoch}").shuffle(order)
        steps += [order[i:i + batch_size] for i in range(0, n, batch_size)]
    return steps


def split_step(indices: list[int], lengths: list[int], n_slots: int, balance: bool) -> list[list[int]]:
    """A step's examples -> n_slots micro-batches (slot = micro_step * world_size + rank).

    balance: longest-first onto the slot with the fewest tokens, so ranks finish together and
    packed rows come out full; otherwise contiguous chunks in step order. A slot may be empty
    when a step has fewer examples than slots; the loop then runs a zero-weight forward so
    every rank takes part in every collective.
    """
    if not balance:
        size = -(-len(indices) // n_slots)
        return [indices[s * size:(s + 1) * size] for s in range(n_slots)]
    slots: list[list[int]] = [[] for _ in range(n_slots)]
    load = [0] * n_slots
    cap = -(-len(indices) // n_slots)  # keep example counts even too (memory per micro-batch)
    for i in sorted(indices, key=lambda i: -lengths[i]):
        s = min((s for s in range(n_slots) if len(slots[s]) < cap), key=lambda s: load[s])
        slots[s].append(i)
        load[s] += lengths[i]
    return slots


def _balance(lengths: list[int], n_bins: int) -> tuple[list[list[int]], list[int]]:
    """Longest first onto the lightest bin: near-equal token loads."""
    bins: list[list[int]] = [[] for _ in range(n_bins)]
    load = [0] * n_bins
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        b = min(range(n_bins), key=lambda b: load[b])
        bins[b].append(i)
        load[b] += lengths[i]
    return bins, load


def _pack_rows(seqs: list[tuple[list[int], list[int]]], capacity: int) -> list[list[int]]:
    """Sequence indices per row: as few rows as fit `capacity`, with near-equal lengths so
    that padding the rows to one width wastes little (a full row + a short one would not)."""
    lengths = [len(s[0]) for s in seqs]
    n_rows = max(1, -(-sum(lengths) // capacity))
    while True:
        rows, load = _balance(lengths, n_rows)
        if max(load) <= capacity or n_rows >= len(seqs):
            return [r for r in rows if r]
        n_rows += 1


def collate(seqs: list[tuple[list[int], list[int]]], pad_id: int, pack: bool, capacity: int):
    """(ids, labels) sequences -> tensors for one forward.

    Returns input_ids, labels, segment_ids (index of the sequence each position belongs to,
    -1 for padding) and either position_ids (packed; transformers then masks attention per
    sequence) or attention_mask (padded). Sequence i's log-prob is the sum over segment i.
    """
    import torch

    rows = _pack_rows(seqs, capacity) if pack else [[i] for i in range(len(seqs))]
    width = max(sum(len(seqs[i][0]) for i in row) for row in rows)
    ids, labels, segs, pos, att = [], [], [], [], []
    for row in rows:
        r_ids, r_lab, r_seg, r_pos = [], [], [], []
        for i in row:
            x, y = seqs[i]
            r_ids += x
            r_lab += y
            r_seg += [i] * len(x)
            r_pos += list(range(len(x)))
        pad = width - len(r_ids)
        att.append([1] * len(r_ids) + [0] * pad)
        ids.append(r_ids + [pad_id] * pad)
        labels.append(r_lab + [IGNORE] * pad)
        segs.append(r_seg + [-1] * pad)
        pos.append(r_pos + list(range(pad)))  # padding is its own segment
    batch = {
        "input_ids": torch.tensor(ids),
        "labels": torch.tensor(labels),
        "segment_ids": torch.tensor(segs),
    }
    if pack:
        batch["position_ids"] = torch.tensor(pos)
    else:
        batch["attention_mask"] = torch.tensor(att)
    return batch


def sft_sequences(examples: list[dict]):
    return [(e["input_ids"], e["labels"]) for e in examples]


def completion_sequence(prompt: list[int], completion: list[int]):
    return prompt + completion, [IGNORE] * len(prompt) + completion


def pair_sequences(pairs: list[dict]):
    """Chosen sequences first, then rejected: one forward scores both sides of every pair."""
    return ([completion_sequence(p["prompt"], p["chosen"]) for p in pairs]
            + [completion_sequence(p["prompt"], p["rejected"]) for p in pairs])


def kto_sequences(examples: list[dict], kl: bool = False):
    key = "kl_completion" if kl else "completion"
    return [completion_sequence(e["prompt"], e[key]) for e in examples]
