"""What a grid measured: scores per cell, mean and spread over seeds, best split per budget,
annotation spend and compute, and re-pricing under other annotation costs.

    from budgetlab.ledger import Ledger
    from budgetlab.report import build_report
    rep = build_report(Ledger("ledger.db", create=False), "quickstart")
    rep.to_json()                       # the shape of DESIGN section 4, exactly
    rep = build_report(led, "quickstart", costs={"sft": 2.0, "pair": 1.0})   # re-priced

A cell's score is its point's eval metric (default: the task's primary metric). A point that
is not COMPLETED keeps the state of the first unfinished stage of its chain (FAILED, BLOCKED,
RUNNING, ...) or NOT_RUN, and has no score: it is never counted as zero. Higher is better.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import importlib
import json
import math
import os
import re
import statistics
import tomllib
from collections import Counter, defaultdict
from pathlib import Path

from budgetlab.alloc import annotation_cost
from budgetlab.errors import BadInput
from budgetlab.ledger import Ledger

COMPLETED = "COMPLETED"
NOT_RUN = "NOT_RUN"        # registered but never submitted, or not in the ledger at all
NO_METRIC = "NO_METRIC"    # evaluated, but the chosen metric was not recorded

CELL_KEYS = ("task", "model", "method", "budget", "sft_fraction", "seed", "n_sft", "n_pft",
             "point_id", "status", "score", "annotation_cost", "gpu_hours")
BEST_KEYS = ("task", "model", "method", "budget", "sft_fraction", "score_mean", "score_std",
             "n_seeds")


@dataclasses.dataclass
class Report:
    grid: str
    metric: str
    unit: str                  # the budget unit: "examples" or "usd"
    costs: dict                # {"sft": c_sft, "pair": c_pair} the cells are priced at
    repriced: bool             # True when costs differ from the grid's own
    cells: list[dict]          # CELL_KEYS, one per (task, model, method, budget, fraction, seed)
    groups: list[dict]         # one per (task, model, method, budget, fraction): over seeds
    best: list[dict]           # BEST_KEYS, per (task, model, method, budget)
    baselines: list[dict]      # the base model per (task, model): status, score
    totals: dict               # spend and compute of the grid, shared stages counted once
    needed: list[dict]         # points the cells need that are not measured yet

    def to_json(self) -> dict:
        """DESIGN section 4: {"grid", "metric", "cells", "best"}, nothing more."""
        return {"grid": self.grid, "metric": self.metric,
                "cells": [{k: c[k] for k in CELL_KEYS} for c in self.cells],
                "best": [{k: b[k] for k in BEST_KEYS} for b in self.best]}

    def to_records(self) -> list[dict]:
        """The cells as `report --json` gives them: one dict per cell (CELL_KEYS)."""
        return self.to_json()["cells"]

    def to_pandas(self):
        """The cells as a pandas DataFrame (pandas is not a dependency: install it)."""
        try:
            import pandas as pd
        except ImportError:
            raise ImportError("Report.to_pandas needs pandas (pip install pandas); "
                              "Report.to_records() gives the same rows as dicts") from None
        return pd.DataFrame.from_records(self.to_records(), columns=list(CELL_KEYS))

    def panels(self) -> list[tuple[str, str, str]]:
        """(task, model, method) in grid order."""
        return list(dict.fromkeys((g["task"], g["model"], g["method"]) for g in self.groups))

    def group(self, task, model, method, budget, fraction) -> dict | None:
        return self._index().get((task, model, method, budget, fraction))

    def _index(self) -> dict:
        if not hasattr(self, "_idx"):
            self._idx = {(g["task"], g["model"], g["method"], g["budget"], g["sft_fraction"]): g
                         for g in self.groups}
        return self._idx


# -- building --------------------------------------------------------------------------------
def build_report(led: Ledger, grid: str, metric: str | None = None,
                 costs: dict | None = None) -> Report:
    """The report of `grid` from the ledger; `costs` ({"sft", "pair"}) re-prices it."""
    g = led.grid(grid)
    own = g.settings.get("costs", {})
    own_costs = {"sft": float(own.get("sft_example", 1.0)),
                 "pair": float(own.get("preference_pair", 1.0))}
    new_costs = {**own_costs, **(costs or {})}
    repriced = new_costs != own_costs

    rows = led.cells(grid)
    if repriced:
        rows, chains = _reprice(led, g, rows, new_costs)
    else:
        chains = {p.point_id: (p.sft_stage_id, p.pft_stage_id, p.eval_stage_id)
                  for p in led.points({c.point_id for c in rows})}
    base_ids = [b["point_id"] for b in led.baselines(grid)]
    for p in led.points(base_ids):
        chains[p.point_id] = (None, None, p.eval_stage_id)

    stage_ids = {s for chain in chains.values() for s in chain if s}
    stages = {s.stage_id: s for s in led.stages(stage_ids=stage_ids)}
    compute = led.compute(stage_ids)
    metric = _choose_metric(led, grid, metric, stages, [chains[p][2] for p in chains])
    metrics = led.metrics([chains[p][2] for p in chains])

    def point_state(pid):
        chain = chains.get(pid)
        if chain is None:
            return NOT_RUN, None
        ev = stages.get(chain[2])
        if ev is None or ev.state != COMPLETED:  # a point is COMPLETED when its eval is
            for sid in chain:  # else: the first unfinished stage of its chain is the cause
                state = stages[sid].state if sid in stages else NOT_RUN
                if sid is not None and state != COMPLETED:
                    return (NOT_RUN if state == "NEW" else state), None
            return NOT_RUN, None
        value = metrics.get(chain[2], {}).get(metric)
        return (COMPLETED, value) if value is not None else (NO_METRIC, None)

    def hours(pid, col):
        return sum(compute.get(s, {}).get(col) or 0.0 for s in chains.get(pid, ()) if s)

    cells = []
    for r in rows:
        status, score = point_state(r.point_id)
        cells.append({
            "task": r.task, "model": r.model, "method": r.method,
            "budget": r.budget, "sft_fraction": r.sft_fraction, "seed": r.seed,
            "n_sft": r.n_sft, "n_pft": r.n_pft, "point_id": r.point_id,
            "status": status, "score": score, "annotation_cost": r.annotation_cost,
            "gpu_hours": hours(r.point_id, "gpu_hours"),
            "cpu_hours": hours(r.point_id, "cpu_hours"),
        })

    baselines = []
    for b in led.baselines(grid):
        status, score = point_state(b["point_id"])
        baselines.append({**b, "status": status, "score": score})

    groups = _groups(cells)
    used = {s for c in cells for s in chains.get(c["point_id"], ()) if s}
    used |= {s for b in baselines for s in chains.get(b["point_id"], ()) if s}
    totals = {
        "cells": len(cells),
        "completed": sum(c["status"] == COMPLETED for c in cells),
        "points": len({c["point_id"] for c in cells}),
        "annotation_spend": sum(c["annotation_cost"] for c in cells),
        # Stages shared by several cells (SFT, SFT-only points) count once here.
        "gpu_hours": sum(compute.get(s, {}).get("gpu_hours") or 0.0 for s in used),
        "cpu_hours": sum(compute.get(s, {}).get("cpu_hours") or 0.0 for s in used),
        "gpu_hour_usd": g.settings.get("costs", {}).get("gpu_hour_usd"),
    }
    needed = _needed(cells, chains, stages)
    # Unique stages still to run: a shared SFT stage needed by several points counts once.
    totals["stages_to_run"] = len({s for c in cells if c["status"] != COMPLETED
                                   for s in chains.get(c["point_id"], ()) if s and
                                   (s not in stages or stages[s].state != COMPLETED)})
    return Report(grid=grid, metric=metric, unit=own.get("unit", "examples"), costs=new_costs,
                  repriced=repriced, cells=cells, groups=groups, best=_best(groups),
                  baselines=baselines, totals=totals, needed=needed)


def _groups(cells: list[dict]) -> list[dict]:
    by: dict[tuple, list[dict]] = defaultdict(list)
    for c in cells:
        by[(c["task"], c["model"], c["method"], c["budget"], c["sft_fraction"])].append(c)
    out = []
    for (task, model, method, budget, frac), cs in by.items():
        scores = [c["score"] for c in cs if c["status"] == COMPLETED]
        states = Counter(c["status"] for c in cs if c["status"] != COMPLETED)
        out.append({
            "task": task, "model": model, "method": method, "budget": budget,
            "sft_fraction": frac, "n_sft": cs[0]["n_sft"], "n_pft": cs[0]["n_pft"],
            "score_mean": statistics.fmean(scores) if scores else None,
            # Sample standard deviation over seeds; undefined for a single seed.
            "score_std": statistics.stdev(scores) if len(scores) > 1 else None,
            "n_seeds": len(scores), "seeds": len(cs), "states": dict(states),
            # the measured points the mean rests on (recommend's band shows them)
            "points": [{"seed": c["seed"], "point_id": c["point_id"], "score": c["score"]}
                       for c in cs if c["status"] == COMPLETED],
            "annotation_cost": statistics.fmean(c["annotation_cost"] for c in cs),
            "gpu_hours": sum(c["gpu_hours"] for c in cs),
            "cpu_hours": sum(c["cpu_hours"] for c in cs),
        })
    return out


def _best(groups: list[dict]) -> list[dict]:
    """The best measured fraction per (task, model, method, budget); none if nothing ran.
    Equal means keep the largest SFT share and list the others in "tied" (not in the JSON)."""
    by: dict[tuple, list[dict]] = defaultdict(list)
    for g in groups:
        if g["score_mean"] is not None:
            by[(g["task"], g["model"], g["method"], g["budget"])].append(g)
    out = []
    for (task, model, method, budget), gs in by.items():
        gs = sorted(gs, key=lambda g: (-g["score_mean"], -g["sft_fraction"]))
        top = gs[0]
        tied = [g["sft_fraction"] for g in gs[1:]
                if math.isclose(g["score_mean"], top["score_mean"], rel_tol=1e-9, abs_tol=1e-12)]
        out.append({"task": task, "model": model, "method": method, "budget": budget,
                    "sft_fraction": top["sft_fraction"], "score_mean": top["score_mean"],
                    "score_std": top["score_std"], "n_seeds": top["n_seeds"], "tied": tied})
    return out


def _needed(cells, chains, stages) -> list[dict]:
    """Points the cells use that have no measurement yet, with the stages still to train."""
    out: dict[str, dict] = {}
    for c in cells:
        if c["status"] == COMPLETED:
            continue
        if c["point_id"] not in out:
            todo = [s for s in chains.get(c["point_id"], ()) if s and
                    (s not in stages or stages[s].state != COMPLETED)]
            out[c["point_id"]] = {**{k: c[k] for k in ("task", "model", "method", "n_sft",
                                                       "n_pft", "seed", "point_id", "status")},
                                  "stages_to_run": len(todo), "budgets": []}
            if not c["n_pft"]:  # an SFT-only point serves every method
                out[c["point_id"]]["method"] = "sft" if c["n_sft"] else "base"
        if c["budget"] not in out[c["point_id"]]["budgets"]:
            out[c["point_id"]]["budgets"].append(c["budget"])
    return list(out.values())


# -- metric -------------------------------------------------------------------------------------
def _choose_metric(led, grid, metric, stages, eval_ids) -> str:
    results = [stages[s].result for s in eval_ids if s in stages]
    results = [r for r in results if isinstance(r, dict)]
    recorded = sorted({n for ms in led.metrics([s for s in eval_ids if s in stages]).values()
                       for n in ms})
    primary = Counter(r.get("primary_metric") for r in results if r.get("primary_metric"))
    default = primary.most_common(1)[0][0] if primary else _task_primary(led, grid)
    if metric is None:
        return default
    if metric in recorded or (not recorded and metric == default):
        return metric
    raise BadInput(f"--metric: unknown metric {metric!r} for grid {grid!r} (recorded: "
                   f"{', '.join(recorded) or 'none yet'})")


def _task_primary(led, grid) -> str:
    """The primary metric the grid's first task declares (before any result exists)."""
    from budgetlab.tasks import _REGISTRY

    task = led.first_task(grid)
    if task not in _REGISTRY:
        return "score"
    module, cls = _REGISTRY[task].split(":")
    return getattr(importlib.import_module(module), cls).primary_metric or "score"


# -- re-pricing ---------------------------------------------------------------------------------
_COST = re.compile(r"^\s*(sft|pair)\s*=\s*([^,=\s]+)\s*$")


def parse_costs(text: str) -> dict:
    """'sft=2,pair=1' -> {"sft": 2.0, "pair": 1.0}; BadInput naming what is wrong."""
    out = {}
    for part in text.split(","):
        m = _COST.match(part)
        if not m:
            raise BadInput(f"--cost: expected sft=X,pair=Y (positive numbers), got {text!r}")
        try:
            value = float(m.group(2))
        except ValueError:
            value = float("nan")
        if not math.isfinite(value) or value <= 0:
            raise BadInput(f"--cost: {m.group(1)} must be a positive number, got {m.group(2)!r}")
        if m.group(1) in out:
            raise BadInput(f"--cost: {m.group(1)} given twice in {text!r}")
        out[m.group(1)] = value
    return out


def _reprice(led: Ledger, g, rows: list, costs: dict):
    """Map each cell to the point its budget buys at `costs`.

    The plan is rebuilt from the grid's spec as resolved at registration (paths, content
    hashes, revisions), with the new costs: points are content-addressed, so a point id
    found in the ledger is exactly a measured point. Nothing is read from the filesystem,
    so a data file moved since does not change the answer."""
    from budgetlab.graph import build_plan

    spec = _stored_spec(g)
    spec = dataclasses.replace(spec, costs={**spec.costs, "sft_example": costs["sft"],
                                            "preference_pair": costs["pair"]})
    plan = build_plan(spec)
    by_key = {(c.task, c.model, c.budget, c.sft_fraction, c.method, c.seed): c
              for c in plan.cells}
    out = []
    for r in rows:
        c = by_key.get((r.task, r.model, r.budget, r.sft_fraction, r.method, r.seed))
        if c is None:  # the stored spec no longer matches the registered cells
            raise BadInput(f"grid {g.name!r}: the stored spec does not produce cell "
                           f"{r.task}/{r.method}/budget {r.budget:g}/share {r.sft_fraction:g}"
                           f"; register the grid again")
        # build_plan bought (c.n_sft, c.n_pft) with budgetlab.alloc.allocate at the new costs.
        out.append(dataclasses.replace(
            r, n_sft=c.n_sft, n_pft=c.n_pft, point_id=c.point_id,
            annotation_cost=annotation_cost(c.n_sft, c.n_pft, costs["sft"], costs["pair"])))
    chains = {p.point_id: (p.sft_stage_id, p.pft_stage_id, p.eval_stage_id)
              for p in plan.points.values()}
    return out, chains


def _stored_spec(g):
    """The grid's spec as registered: the resolved spec the ledger keeps. Ledgers written
    before it was kept fall back to parsing the stored text here (which reads the files)."""
    from budgetlab.spec import GridSpec, parse_spec

    if g.resolved is not None:
        return GridSpec.from_dict(g.resolved, text=g.spec_text or "")
    text, path = g.spec_text or "", g.spec_path or "<spec>"
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise BadInput(f"grid {g.name!r}: stored spec is not valid TOML ({e})") from None
    tries = [Path.cwd()] + ([Path(path).parent] if path != "<spec>" else [])
    err = None
    for d in tries:
        try:
            with contextlib.chdir(d):
                return parse_spec(raw, path, text)
        except (BadInput, FileNotFoundError) as e:
            err = e
    raise BadInput(f"grid {g.name!r}: cannot rebuild the stored spec to re-price ({err})")


# -- files ---------------------------------------------------------------------------------
def write_csv(rep: Report, path: str | os.PathLike) -> None:
    """One row per cell (per seed), every JSON key plus grid, metric and CPU-hours."""
    keys = ("grid", "metric", *CELL_KEYS, "cpu_hours")
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for c in rep.cells:
            w.writerow({"grid": rep.grid, "metric": rep.metric,
                        **{k: ("" if c[k] is None else c[k]) for k in keys[2:]}})


def write_json(rep: Report, path: str | os.PathLike) -> None:
    Path(path).write_text(json.dumps(rep.to_json(), indent=2))


# -- reading the surface ----------------------------------------------------------------------
def findings(rep: Report) -> list[str]:
    """Plain statements of what the measured means show, per (task, model, method):
    where SFT alone wins, where a mix wins, and PFT from the base model (fraction 0) against
    the smallest SFT share. Statements only about measured groups."""
    out = []
    for task, model, method in rep.panels():
        best = {b["budget"]: b for b in rep.best
                if (b["task"], b["model"], b["method"]) == (task, model, method)}
        if not best:
            continue
        ties = [b for b, x in best.items() if x["tied"]]
        best = {b: x for b, x in best.items() if not x["tied"]}
        sft_wins = [b for b, x in best.items() if x["sft_fraction"] == 1.0]
        mix_wins = [b for b, x in best.items() if 0.0 < x["sft_fraction"] < 1.0]
        pft_wins = [b for b, x in best.items() if x["sft_fraction"] == 0.0]
        head = f"{task} / {model} / {method}:"
        parts = [f"no single best split at {_budgets(ties)} (equal means)"] if ties else []
        if sft_wins:
            parts.append(f"SFT only is best at budget {_budgets(sft_wins)}")
        if mix_wins:
            shares = ", ".join(f"{best[b]['sft_fraction']:g}" for b in sorted(mix_wins))
            parts.append(f"a mix is best at {_budgets(mix_wins)} (SFT share {shares})")
        if pft_wins:
            parts.append(f"preference data only is best at {_budgets(pft_wins)}")
        out.append(f"{head} " + "; ".join(parts) + ".")
        fracs = sorted({g["sft_fraction"] for g in rep.groups
                        if (g["task"], g["model"], g["method"]) == (task, model, method)})
        small = [f for f in fracs if 0.0 < f < 1.0]
        if 0.0 in fracs and small:
            diffs = []
            for budget in sorted({g["budget"] for g in rep.groups}):
                cold = rep.group(task, model, method, budget, 0.0)
                warm = rep.group(task, model, method, budget, small[0])
                if cold and warm and cold["score_mean"] is not None and \
                        warm["score_mean"] is not None:
                    diffs.append(f"{budget:g}: {cold['score_mean']:.3f} vs "
                                 f"{warm['score_mean']:.3f}")
            if diffs:
                out.append(f"{head} cold start, {method} from the base model (SFT share 0) vs "
                           f"SFT share {small[0]:g} first: " + ", ".join(diffs) + ".")
    return out


def _budgets(bs) -> str:
    return ", ".join(f"{b:g}" for b in sorted(bs))
