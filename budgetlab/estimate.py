"""What a plan costs before it runs: counts, sharing, annotation spend, GPU-hours.

The GPU-hour figure is a rough FLOP count, said as such: 6 x parameters x tokens for
training (DPO/KTO: two sequences per example plus one reference forward pass),
TOKENS_PER_EXAMPLE tokens per example, MFU of an H100-class card. Stages that ask for no
GPU count zero GPU-hours.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

from budgetlab.graph import Plan, Stage

PEAK_FLOPS = 989e12          # H100/H200 dense bf16
MFU = 0.35
TOKENS_PER_EXAMPLE = 512
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([bBmM])\b")


def model_parameters(model: str) -> float | None:
    """Parameter count from a local config.json, else from a size in the name (8B, 1.5B)."""
    cfg = Path(model) / "config.json"
    if not model.startswith("builtin:") and cfg.is_file():
        try:
            c = json.loads(cfg.read_text())
            h, layers = c["hidden_size"], c["num_hidden_layers"]
            inter, vocab = c.get("intermediate_size", 4 * h), c.get("vocab_size", 32000)
            return layers * (4 * h * h + 3 * h * inter) + 2 * vocab * h
        except (KeyError, TypeError, ValueError, OSError):
            return None
    m = None
    for m in _SIZE.finditer(model.split("/")[-1]):
        pass
    if m is None:
        return None
    return float(m.group(1)) * (1e9 if m.group(2) in "bB" else 1e6)


def stage_gpu_hours(stage: Stage, eval_limit: int | None = None) -> float | None:
    """Estimated GPU-hours of one stage; 0 for CPU stages, None if the model size is unknown."""
    res = stage.resources
    if not res.get("gpus_per_node"):
        return 0.0
    params = model_parameters(stage.model)
    if params is None:
        return None
    if stage.kind == "eval":
        # k samples per prompt ([eval] samples) decode k times.
        tokens = (stage.params.get("limit") or 0) * (TOKENS_PER_EXAMPLE + stage.params.get(
            "max_new_tokens", 256)) * stage.params.get("samples", 1)
        flops = 2 * params * tokens * 10  # decoding runs far below peak
    else:
        tokens = (stage.n or 0) * stage.params.get("epochs", 1) * TOKENS_PER_EXAMPLE
        flops = 6 * params * tokens
        if stage.kind in ("dpo", "kto"):
            flops = 2 * flops + 2 * params * 2 * (stage.n or 0) * TOKENS_PER_EXAMPLE
    seconds = flops / (PEAK_FLOPS * MFU)
    return seconds / 3600.0


def plan_summary(plan: Plan) -> dict:
    """The numbers `budgetlab plan` prints (and --json emits)."""
    kinds = Counter(s.kind for s in plan.stages.values())
    cell_points = {c.point_id for c in plan.cells}
    points = [p for p in plan.points.values() if p.point_id in cell_points]
    hours, unknown = 0.0, []
    for s in plan.stages.values():
        h = stage_gpu_hours(s)
        if h is None:
            unknown.append(s.model)
        else:
            hours += h
    spend = sum(c.annotation_cost for c in plan.cells)
    # Subsets are nested: what must be annotated is the largest n of each pool, per task
    # (seeds only reorder the same pool).
    costs = plan.spec.costs
    need: dict = {}
    for c in plan.cells:
        s, p = need.get(c.task, (0, 0))
        need[c.task] = (max(s, c.n_sft), max(p, c.n_pft))
    needed = sum(s * costs["sft_example"] + p * costs["preference_pair"]
                 for s, p in need.values())
    return {
        "grid": plan.name,
        "cells": len(plan.cells),
        "points": len(points),
        "baseline_points": len(plan.points) - len(points),
        "stages": {k: kinds.get(k, 0) for k in ("sft", "dpo", "kto", "eval")},
        "stages_total": len(plan.stages),
        "sft_trainings_without_sharing": sum(1 for p in points if p.sft_stage_id),
        "annotation_unit": costs["unit"],
        "annotation_spend": spend,
        "annotation_needed": needed,
        "gpu_hours_estimate": round(hours, 3),
        "gpu_hours_unknown_models": sorted(set(unknown)),
        "compute_usd_estimate": (round(hours * costs["gpu_hour_usd"], 2)
                                 if "gpu_hour_usd" in costs else None),
    }
