"""Replay `budgetlab search` and `search --transfer-from` against a grid measured in full,
and against baselines at equal compute.

    .venv/bin/python bench/search_replay.py [bench/data/toy_study.json] [--seeds 24] [--eta 3]
        [--z 0.5] [--epsilon 0.05] [--models M ...] [--transfer SMALL LARGE]

The table (bench/toy_study.py) holds every cell's score per seed and every stage's
CPU-seconds. Each search "measures" a cell by looking its score up, and pays the CPU-seconds
of the stages of the cell's point that it has not paid yet (a stage shared by several cells,
an SFT stage across budgets for instance, is paid once), exactly what a real run would cost.
The truth at each (task, model, budget) is the full grid's epsilon-band: the candidates
(method, SFT share) whose mean over all seeds is within (1 - epsilon) of the best's. A search
agrees there when the split it returns lies in the band; "exact best" counts returning the
best mean itself, regret = best true mean - true mean of the split returned.

Strategies, each run with search seeds 0..N-1 (the seed shuffles the order in which the
grid's seeds are used, and breaks ties at random):
  ladder           budgetlab search's default (successive halving per budget, seeds as the
                   fidelity, pools and seed noise borrowed from the budget below)
  sh               plain successive halving (every budget from every candidate; rungs of all
                   budgets together), capped at the ladder's compute of the same search seed
                   (a cell that no longer fits is skipped, a cheaper later one still measured)
  random           random cells (candidate, budget, seed) until the ladder's compute is spent
  ladder-all       the ladder with --all-seeds (its own compute, for reference)
  sh-full          plain successive halving run to its end (its own compute, for reference)
  transfer         the larger model (--transfer's LARGE, default the table's second model)
                   searched with the smaller one's full-table bands as the prior; compute is
                   the large model's, against the large model's full grid
  transfer-random  random cells of the large model at the transfer's compute
RESULT lines come last: search_compute_fraction, search_agreement, transfer_compute_fraction
and transfer_agreement after the baselines'.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
from pathlib import Path

from budgetlab.search import (SFT_ONLY, Observations, Request, Space, Strategy, band_floor,
                              breadth_first, ladder, priors_from, run_search, transfer)

ROOT = Path(__file__).resolve().parents[1]


class Table:
    def __init__(self, data: dict):
        self.data = data
        self.stage_cost = {s: (v["cpu_seconds"] or 0.0) for s, v in data["stages"].items()}
        self.cells = {}
        for c in data["cells"]:
            for seed, v in c["seeds"].items():
                self.cells[(c.get("task", data["tasks"][0] if "tasks" in data else "arith"),
                            c["model"], float(c["budget"]), c["method"],
                            float(c["sft_fraction"]), int(seed))] = v
        self.full_cost = self.cost_of(self.spaces())

    def cost_of(self, spaces) -> float:
        """The full grid of these (task, model) pairs and their seeds, shared stages once."""
        keep = {(sp.task, sp.model, s) for sp in spaces for s in sp.seeds}
        return sum(self.stage_cost[s] for s in
                   {s for k, v in self.cells.items() if (k[0], k[1], k[5]) in keep
                    for s in v["chain"]})

    def spaces(self) -> list[Space]:
        d = self.data
        cands = []
        for f in sorted(d["sft_fractions"], reverse=True):
            cands += [(SFT_ONLY, 1.0)] if f == 1.0 else [(m, float(f)) for m in d["methods"]]
        tasks = sorted({k[0] for k in self.cells})
        out = []
        for t in tasks:
            for m in d["models"]:
                # a seed with a cell not measured (a table written with --partial) is left out
                seeds = [s for s in d["seeds"] if all(
                    v["score"] is not None for k, v in self.cells.items()
                    if k[:2] == (t, m) and k[5] == s)]
                if seeds:
                    out.append(Space(t, m, sorted(float(b) for b in d["budgets"]), cands,
                                     seeds, list(d["methods"])))
        return out

    def cell(self, r: Request) -> dict:
        return self.cells[(r.task, r.model, r.budget, r.method, r.sft_fraction, r.seed)]

    def truth(self, sp: Space, budget, cand) -> float:
        method = sp.methods[0] if cand[0] == SFT_ONLY else cand[0]
        return statistics.fmean(self.cells[(sp.task, sp.model, budget, method, cand[1], s)]
                                ["score"] for s in sp.seeds)


class Meter:
    """measure() for run_search: scores from the table, CPU-seconds of new stages paid;
    with a cap, requests that no longer fit are refused (skip=True: try the next ones)."""

    def __init__(self, table: Table, cap: float | None = None, skip: bool = False):
        self.t, self.cap, self.skip = table, cap, skip
        self.paid: set[str] = set()
        self.cost = 0.0
        self.stopped = False

    def price(self, r) -> float:
        return sum(self.t.stage_cost[s] for s in set(self.t.cell(r)["chain"]) - self.paid)

    def __call__(self, reqs):
        got = {}
        for r in reqs:
            if self.stopped:
                break
            extra = self.price(r)
            if self.cap is not None and self.cost + extra > self.cap + 1e-9:
                if not self.skip:
                    self.stopped = True
                continue
            self.cost += extra
            self.paid |= set(self.t.cell(r)["chain"])
            got[r] = self.t.cell(r)["score"]
        return got


def full_band(table: Table, sp: Space, budget, epsilon: float) -> list:
    """The full grid's epsilon-band at a budget: candidates within (1 - epsilon) of the best
    mean over every seed."""
    truths = {c: table.truth(sp, budget, c) for c in sp.candidates}
    floor = band_floor(max(truths.values()), epsilon)
    return [c for c, v in truths.items() if v >= floor]


def score_answers(table: Table, spaces, picks: dict, epsilon: float) -> dict:
    """Of picks {(task, model, budget): candidate or None}: "agree" (answers whose pick lies in
    the full grid's epsilon-band), "right" (the exact best mean, ties count), "total",
    "regret" (mean of best - picked true mean). No pick scores the mean candidate."""
    agree, right, regrets = 0, 0, []
    for sp in spaces:
        for b in sp.budgets:
            truths = {c: table.truth(sp, b, c) for c in sp.candidates}
            best = max(truths.values())
            pick = picks.get((sp.task, sp.model, b))
            got = truths[pick] if pick is not None else statistics.fmean(truths.values())
            right += abs(got - best) <= 1e-9
            agree += pick is not None and pick in full_band(table, sp, b, epsilon)
            regrets.append(best - got)
    return {"agree": agree, "right": right, "total": len(regrets),
            "regret": statistics.fmean(regrets)}


def run_strategy(table, spaces, strategy, driver, cap=None):
    meter = Meter(table, cap, skip=True)   # a capped run fills the cap with what still fits
    results, obs, rounds = run_search(spaces, meter, strategy, driver=driver)
    picks = {}
    for sp in spaces:
        for b, a in results[(sp.task, sp.model)].items():
            picks[(sp.task, sp.model, b)] = a["best"] if obs.of(sp, b, a["best"]) else None
    return picks, meter.cost, rounds, obs


def random_search(table, spaces, seed, cap):
    rng = random.Random(seed)
    reqs = [sp.request(b, c, s) for sp in spaces for b in sp.budgets for c in sp.candidates
            for s in sp.seeds]
    rng.shuffle(reqs)
    meter = Meter(table, cap, skip=True)
    got = meter(reqs)
    obs = Observations()
    by = {(sp.task, sp.model): sp for sp in spaces}
    for r, v in got.items():
        obs.add(by[(r.task, r.model)], r, v)
    picks = {}
    for sp in spaces:
        for b in sp.budgets:
            seen = [c for c in sp.candidates if obs.of(sp, b, c)]
            rng.shuffle(seen)   # random tie-break among equal means
            picks[(sp.task, sp.model, b)] = (max(seen, key=lambda c: obs.mean(sp, b, c))
                                             if seen else None)
    return picks, meter.cost


def transfer_priors(table: Table, small: Space, epsilon: float) -> dict:
    """The small model's bands measured in full: the prior of a transfer search, built by
    budgetlab.search.priors_from (what `search --transfer-from` uses) from the table's cells
    shaped as report groups."""
    rows = []
    for b in small.budgets:
        for c in small.candidates:
            method = small.methods[0] if c[0] == SFT_ONLY else c[0]
            vals = [table.cells[(small.task, small.model, b, method, c[1], s)]["score"]
                    for s in small.seeds]
            rows.append({"task": small.task, "budget": b, "method": method,
                         "sft_fraction": c[1], "score_mean": statistics.fmean(vals),
                         "score_std": statistics.stdev(vals) if len(vals) > 1 else None,
                         "n_seeds": len(vals)})
    return priors_from(rows, epsilon)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("table", nargs="?", default=str(ROOT / "bench" / "data" / "toy_study.json"))
    ap.add_argument("--seeds", type=int, default=24, help="search seeds (>= 20)")
    ap.add_argument("--eta", type=int, default=3)
    ap.add_argument("--models", nargs="*", help="replay only these models (default: all)")
    ap.add_argument("--z", type=float, default=Strategy.z, help="the search's noise width (Strategy.z)")
    ap.add_argument("--epsilon", type=float, default=0.05, help="the near-optimal band")
    ap.add_argument("--transfer", nargs=2, metavar=("SMALL", "LARGE"),
                    help="models of the transfer replay (default: the table's first two)")
    args = ap.parse_args()
    eps = args.epsilon
    table = Table(json.loads(Path(args.table).read_text()))
    every = table.spaces()
    spaces = [sp for sp in every if not args.models or sp.model in args.models]
    table.full_cost = table.cost_of(spaces)
    n_cells = sum(len(sp.budgets) * len(sp.candidates) * len(sp.seeds) for sp in spaces)
    print(f"table {args.table}: " + ", ".join(f"{sp.model} ({len(sp.seeds)} seeds)"
                                             for sp in spaces)
          + f"; {len(spaces[0].budgets)} budgets x {len(spaces[0].candidates)} candidates: "
          f"{n_cells} cells (SFT only is one candidate), full grid {table.full_cost:.0f} CPU-s;"
          f" epsilon {eps:g}")
    for sp in spaces:
        for b in sp.budgets:
            truths = {c: table.truth(sp, b, c) for c in sp.candidates}
            best = max(truths.values())
            wins = [f"{c[0]} {c[1]:g}" for c, v in truths.items() if abs(v - best) <= 1e-9]
            inband = [f"{c[0]} {c[1]:g}" for c in full_band(table, sp, b, eps)]
            print(f"truth {sp.model} budget {b:g}: best {', '.join(wins)} ({best:.3f}); "
                  f"band {', '.join(inband)}")

    by_model = {sp.model: sp for sp in every}
    pair = args.transfer or ([m for m in table.data["models"] if m in by_model][:2]
                             if len(by_model) >= 2 else None)
    if pair and not all(m in by_model for m in pair):
        raise SystemExit(f"--transfer {' '.join(pair)}: models with complete seeds in the "
                         f"table are {', '.join(by_model)}")
    keys = ("ladder", "sh", "random", "ladder-all", "sh-full") + (
        ("transfer", "transfer-random") if pair else ())
    stats = {k: {"agree": [], "right": [], "regret": [], "cost": []} for k in keys}
    large_cost = table.cost_of([by_model[pair[1]]]) if pair else None
    for seed in range(args.seeds):
        strat = Strategy(eta=args.eta, borrow=True, seed=seed, z=args.z, epsilon=eps)
        picks, cost, rounds, _ = run_strategy(table, spaces, strat, ladder)
        plain = Strategy(eta=args.eta, borrow=False, seed=seed, epsilon=eps)
        runs = {"ladder": (picks, cost, spaces, table.full_cost),
                "sh": (*run_strategy(table, spaces, plain, breadth_first, cap=cost)[:2],
                       spaces, table.full_cost),
                "random": (*random_search(table, spaces, seed, cost), spaces, table.full_cost),
                "ladder-all": (*run_strategy(table, spaces, Strategy(
                    eta=args.eta, borrow=True, seed=seed, z=args.z, epsilon=eps,
                    all_seeds=True), ladder)[:2], spaces, table.full_cost),
                "sh-full": (*run_strategy(table, spaces, plain, breadth_first)[:2], spaces,
                            table.full_cost)}
        if pair:
            large = [by_model[pair[1]]]
            priors = transfer_priors(table, by_model[pair[0]], eps)
            tp, tc = run_strategy(table, large, strat, transfer(priors))[:2]
            runs["transfer"] = (tp, tc, large, large_cost)
            runs["transfer-random"] = (*random_search(table, large, seed, tc), large,
                                       large_cost)
        line = []
        for k, (p, c, sps, full) in runs.items():
            sc = score_answers(table, sps, p, eps)
            stats[k]["agree"].append(sc["agree"] / sc["total"])
            stats[k]["right"].append(sc["right"] / sc["total"])
            stats[k]["regret"].append(sc["regret"])
            stats[k]["cost"].append(c / full)
            line.append(f"{k} {sc['agree']}/{sc['total']} ({c / full:.0%})")
        print(f"search seed {seed:2d}: " + "; ".join(line))
    print()
    what = {"ladder": "budgetlab search", "sh": "successive halving, at search's compute",
            "random": "random cells, at search's compute",
            "ladder-all": "search, every seed for winners", "sh-full": "successive halving, run out",
            "transfer": f"search --transfer-from ({pair[0]} -> {pair[1]})" if pair else "",
            "transfer-random": "random cells of the large model, at transfer's compute"}
    for k, s in stats.items():
        print(f"{k:15s} agreement {statistics.fmean(s['agree']):.3f} (min "
              f"{min(s['agree']):.3f}) exact best {statistics.fmean(s['right']):.3f} regret "
              f"{statistics.fmean(s['regret']):.4f} compute {statistics.fmean(s['cost']):.3f} "
              f"(max {max(s['cost']):.3f}) of the full grid  [{what[k]}]")
    names = {"ladder": "search", "sh": "halving_equal_compute", "random": "random_equal_compute",
             "ladder-all": "search_all_seeds", "sh-full": "halving_full",
             "transfer": "transfer", "transfer-random": "transfer_random_equal_compute"}
    for k, s in stats.items():
        if k in ("ladder", "transfer"):
            continue
        print(f"RESULT {names[k]}_agreement {statistics.fmean(s['agree']):.3f}")
        print(f"RESULT {names[k]}_compute_fraction {statistics.fmean(s['cost']):.4f}")
    print(f"RESULT search_seeds {args.seeds}")
    for k in ("ladder", "transfer"):
        if k in stats:
            print(f"RESULT {names[k]}_compute_fraction {statistics.fmean(stats[k]['cost']):.4f}")
            print(f"RESULT {names[k]}_agreement {statistics.fmean(stats[k]['agree']):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
