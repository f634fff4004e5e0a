"""Ledger summaries shared by the CLI and reports."""

from __future__ import annotations

from budgetlab.ledger import Ledger


def spend(led: Ledger, grid: str | None = None) -> list[dict]:
    """Per grid, task and method: cells, annotation cost, and the compute of their stages."""
    grids = [led.grid(grid)] if grid else [led.grid(g["name"]) for g in led.grids()]
    out = []
    for g in grids:
        costs = g["settings"].get("costs", {})
        rows = led._rows(
            "SELECT c.task, c.method, COUNT(*) AS cells, SUM(c.annotation_cost) AS cost "
            "FROM cells c WHERE c.grid = ? AND c.active = 1 GROUP BY c.task, c.method "
            "ORDER BY c.task, c.method", (g["name"],))
        compute = led._rows(
            "WITH pts AS (SELECT DISTINCT c.task, c.method, p.* FROM cells c "
            "  JOIN points p ON p.point_id = c.point_id WHERE c.grid = ? AND c.active = 1), "
            "st AS (SELECT task, method, sft_stage_id AS sid FROM pts UNION "
            "  SELECT task, method, pft_stage_id FROM pts UNION "
            "  SELECT task, method, eval_stage_id FROM pts) "
            "SELECT st.task, st.method, SUM(a.gpu_seconds) / 3600.0 AS gpu_hours, "
            "  SUM(a.cpu_seconds) / 3600.0 AS cpu_hours FROM st "
            "JOIN attempts a ON a.stage_id = st.sid GROUP BY st.task, st.method", (g["name"],))
        by_key = {(r["task"], r["method"]): r for r in compute}
        for r in rows:
            c = by_key.get((r["task"], r["method"]), {})
            gpu_h = c.get("gpu_hours") or 0.0
            out.append({
                "grid": g["name"], "task": r["task"], "method": r["method"], "cells": r["cells"],
                "unit": costs.get("unit", "examples"), "annotation_cost": r["cost"],
                "gpu_hours": gpu_h, "cpu_hours": c.get("cpu_hours") or 0.0,
                "compute_usd": (gpu_h * costs["gpu_hour_usd"] if "gpu_hour_usd" in costs
                                else None),
            })
    return out
