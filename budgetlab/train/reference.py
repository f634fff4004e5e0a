"""Reference log-probs for DPO/KTO, computed once per stage and kept in the stage directory.

The pass runs on the freshly initialised policy, before any training step and before a
checkpoint is loaded, so the reference *is* the starting model and no second copy of the
weights is ever held (for LoRA the fresh adapter is zero, so this is the base model). The
examples are sharded across ranks; the results are gathered, written atomically by rank 0
to reference_logps.pt with a fingerprint of the data, and reused by every epoch and resume.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

FILE = "reference_logps.pt"


def fingerprint(examples: list[dict], init_model: str) -> str:
    h = hashlib.sha256(str(init_model).encode())
    for ex in examples:
        h.update(json.dumps(ex, sort_keys=True).encode())
    return h.hexdigest()[:16]


def load(stage_root: Path, fp: str) -> dict | None:
    path = Path(stage_root) / FILE
    if not path.exists():
        return None
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # a corrupt file is recomputed, not trusted
        return None
    return saved["logps"] if saved.get("fingerprint") == fp else None


def save(stage_root: Path, fp: str, logps: dict) -> None:
    path = Path(stage_root) / FILE
    tmp = path.with_name(f".{FILE}.tmp.{os.getpid()}")
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"fingerprint": fp, "logps": logps}, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


@torch.no_grad()
def compute(score, n: int, keys: tuple[str, ...], micro_batch_size: int, lengths: list[int],
            rank: int, world_size: int) -> dict:
    """Run score(indices) -> {key: tensor[len(indices)]} over this rank's share, gather all.

    Every rank runs the same number of forwards (ZeRO-3 gathers parameters collectively);
    a rank with nothing left scores its first example again and discards it.
    """
    mine = [i for i in range(n) if i % world_size == rank]
    mine.sort(key=lambda i: lengths[i])  # similar lengths together: less padding
    per_rank = -(-n // world_size)
    n_batches = -(-per_rank // micro_batch_size)
    out: dict[int, list[float]] = {}
    for b in range(n_batches):
        idx = mine[b * micro_batch_size:(b + 1) * micro_batch_size]
        scored = score(idx or [0])
        if idx:
            for j, i in enumerate(idx):
                out[i] = [float(scored[k][j]) for k in keys]
    if world_size > 1:
        parts = [None] * world_size
        torch.distributed.all_gather_object(parts, out)
        for part in parts:
            out.update(part)
    if len(out) != n:
        raise RuntimeError(f"reference pass scored {len(out)} of {n} examples")
    table = torch.tensor([out[i] for i in range(n)], dtype=torch.float32)
    return {k: table[:, j].clone() for j, k in enumerate(keys)}
