"""status: what a grid looks like now, from the ledger (run `sync` first for fresh states).

    status(led, grid) -> {"grid", "stages": {kind: {state: n}}, "stages_total", "active",
                          "stages_completed", "points_total", "points_done", "attempts",
                          "gpu_hours", "cpu_hours", "annotation_unit", "annotation_spend",
                          "annotation_spend_done"}
"""

from __future__ import annotations

from budgetlab.ledger import Ledger
from budgetlab.lifecycle import LIVE


def status(led: Ledger, grid: str) -> dict:
    """A grid at a glance: stages by kind x state, points done/total, compute, spend."""
    g = led.grid(grid)
    c = led.grid_counts(grid)
    by_kind = c["stages"]
    return {
        "grid": grid, "stages": by_kind,
        "stages_total": sum(sum(v.values()) for v in by_kind.values()),
        "active": sum(n for v in by_kind.values() for s, n in v.items() if s in LIVE),
        "stages_completed": sum(v.get("COMPLETED", 0) for v in by_kind.values()),
        "points_total": c["points_total"], "points_done": c["points_done"],
        "attempts": c["attempts"], "gpu_hours": c["gpu_hours"], "cpu_hours": c["cpu_hours"],
        "annotation_unit": g.settings.get("costs", {}).get("unit", "examples"),
        "annotation_spend": c["annotation_spend"],
        "annotation_spend_done": c["annotation_spend_done"],
    }


def spend(led: Ledger, grid: str | None = None) -> list[dict]:
    """Per grid, task and method: cells, annotation cost, and the compute of their stages."""
    rows = []
    for g in ([led.grid(grid)] if grid else led.grids()):
        costs = g.settings.get("costs", {})
        for r in led.spend(g.name):
            rows.append({"grid": g.name, "task": r["task"], "method": r["method"],
                         "cells": r["cells"], "unit": costs.get("unit", "examples"),
                         "annotation_cost": r["cost"], "gpu_hours": r["gpu_hours"],
                         "cpu_hours": r["cpu_hours"],
                         "compute_usd": (r["gpu_hours"] * costs["gpu_hour_usd"]
                                         if "gpu_hour_usd" in costs else None)})
    return rows
