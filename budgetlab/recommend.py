"""Advise a split for a budget from what a grid measured, and the next runs worth paying for.

    rec = recommend(report, budget=500)     # report: budgetlab.report.build_report(...)

For each (task, model) the candidates are (method, SFT fraction); fraction 1.0 is SFT only,
the same point for every method. At a measured budget the answer is the best measured mean
over seeds. Between two measured budgets it is an estimate: each candidate's mean is
interpolated linearly in log(budget) between its two neighbours, and so is its seed standard
deviation, which is the uncertainty shown. Outside the measured range there is no estimate,
only a warning and the nearest measured budget's result, labelled as such.

"Contenders" are candidates whose mean + sd reaches the best's mean - sd (a single seed
borrows the median sd of the others there, or, where none has two seeds, as after a
`budgetlab search` decided a budget on one seed, the median sd of the same task and model
at the other budgets): the data cannot order them yet. The next runs are
chosen to separate them: measure them at the budget itself, fill their missing or failed
cells, add a seed where the spread is unknown or wide.
"""

from __future__ import annotations

import math
import statistics

from budgetlab.alloc import allocate
from budgetlab.errors import BadInput
from budgetlab.report import COMPLETED, Report

REL_TOL = 1e-9


def recommend(rep: Report, budget: float, top: int = 3, epsilon: float = 0.05) -> dict:
    """{"grid", "metric", "budget", "epsilon", "costs", "answers": [per (task, model)]}.
    Each answer's "band" is the near-optimal region: the candidates whose mean is within
    (1 - epsilon) of the best's, each with the measured points it rests on."""
    if not (isinstance(budget, (int, float)) and math.isfinite(budget) and budget > 0):
        raise BadInput(f"--budget: must be a positive number, got {budget!r}")
    if not (isinstance(epsilon, (int, float)) and math.isfinite(epsilon) and 0 <= epsilon < 1):
        raise BadInput(f"--epsilon: must be a number in [0, 1), got {epsilon!r}")
    pairs = list(dict.fromkeys((g["task"], g["model"]) for g in rep.groups))
    answers = [_answer(rep, task, model, budget, top) for task, model in pairs]
    for a in answers:
        a["band"] = _band(a, epsilon)
    return {"grid": rep.grid, "metric": rep.metric, "budget": budget, "epsilon": epsilon,
            "unit": rep.unit, "costs": rep.costs, "repriced": rep.repriced, "answers": answers}


def _band(answer: dict, epsilon: float) -> list[dict]:
    """The ranking cut at (1 - epsilon) of the best mean (epsilon * |best| below a negative
    best, as budgetlab.search.band_floor)."""
    from budgetlab.search import band_floor
    best = answer.get("best")
    if best is None:
        return []
    floor = band_floor(best["score"], epsilon)
    return [r for r in answer["ranking"] if r["score"] >= floor]


def _candidates(rep: Report, task: str, model: str) -> dict[tuple, dict[float, dict]]:
    """(method, fraction) -> {budget: group}; SFT-only groups merged across methods."""
    out: dict[tuple, dict[float, dict]] = {}
    for g in rep.groups:
        if (g["task"], g["model"]) != (task, model):
            continue
        key = ("sft", 1.0) if g["sft_fraction"] == 1.0 else (g["method"], g["sft_fraction"])
        out.setdefault(key, {}).setdefault(g["budget"], g)
    return out


def _answer(rep: Report, task: str, model: str, budget: float, top: int) -> dict:
    cands = _candidates(rep, task, model)
    measured = sorted({b for by in cands.values() for b, g in by.items()
                       if g["score_mean"] is not None})
    base = {"task": task, "model": model, "measured_budgets": measured}
    if not measured:
        return {**base, "kind": "none", "best": None, "contenders": [], "next_runs": [],
                "method": "no measured cell yet", "warning": "nothing measured for this "
                "task and model yet: no recommendation"}

    exact = [b for b in measured if math.isclose(b, budget, rel_tol=REL_TOL)]
    if exact:
        b = exact[0]
        rows = [_measured_row(rep, key, by[b]) for key, by in cands.items()
                if b in by and by[b]["score_mean"] is not None]
        rests_on = [b]
        kind, how, warning, at = "measured", (
            f"measured at budget {b:g}: mean over seeds, +/- the seed standard deviation"), None, b
    elif measured[0] < budget < measured[-1]:
        lo = max(b for b in measured if b < budget)
        hi = min(b for b in measured if b > budget)
        w = (math.log(budget) - math.log(lo)) / (math.log(hi) - math.log(lo))
        rows = []
        for key, by in cands.items():
            g_lo, g_hi = by.get(lo), by.get(hi)
            if not (g_lo and g_hi and g_lo["score_mean"] is not None
                    and g_hi["score_mean"] is not None):
                continue
            sd = (None if g_lo["score_std"] is None or g_hi["score_std"] is None
                  else (1 - w) * g_lo["score_std"] + w * g_hi["score_std"])
            mean = (1 - w) * g_lo["score_mean"] + w * g_hi["score_mean"]
            rows.append(_row(rep, key, budget, mean, sd, min(g_lo["n_seeds"], g_hi["n_seeds"]),
                             max(g_lo["seeds"], g_hi["seeds"]), _points(g_lo, g_hi)))
        kind, at, rests_on = "interpolated", budget, [lo, hi]
        how = (f"estimate: linear in log(budget) between the measured budgets {lo:g} and "
               f"{hi:g} (weight {w:.2f} on {hi:g}), per candidate; +/- the seed standard "
               f"deviation interpolated the same way")
        warning = None
    else:
        at = measured[0] if budget < measured[0] else measured[-1]
        rows = [_measured_row(rep, key, by[at]) for key, by in cands.items()
                if at in by and by[at]["score_mean"] is not None]
        kind, rests_on = "outside", [at]
        how = f"no estimate: the nearest measured budget is {at:g}; its best split is shown"
        warning = (f"budget {budget:g} is outside the measured range "
                   f"[{measured[0]:g}, {measured[-1]:g}] for {task} / {model}; the result at "
                   f"{at:g} is not an estimate for {budget:g} (run cells at {budget:g} to know)")

    rows.sort(key=lambda r: -r["score"])
    # Candidates left out (not measured at the budgets the answer rests on) could be better.
    unmeasured = [f"{m} {f:g}" for (m, f), by in cands.items()
                  if not all(by.get(b) and by[b]["score_mean"] is not None for b in rests_on)]
    best = rows[0] if rows else None
    known = [r["sd"] for r in rows if r["sd"] is not None]
    if not known:  # nothing here has two seeds (a searched grid): the spread at other budgets
        known = [g["score_std"] for by in cands.values() for g in by.values()
                 if g["score_std"] is not None]
    typical = statistics.median(known) if known else None
    contenders = [r for r in rows[1:] if best and _overlaps(r, best, typical)]
    return {**base, "kind": kind, "method": how, "warning": warning, "at_budget": at,
            "best": best, "contenders": contenders, "ranking": rows, "unmeasured": unmeasured,
            "next_runs": _next_runs(rep, task, model, budget, kind, rests_on, cands, best,
                                    contenders, top)}


def _measured_row(rep, key, g) -> dict:
    return _row(rep, key, g["budget"], g["score_mean"], g["score_std"], g["n_seeds"], g["seeds"],
                _points(g))


def _points(*groups) -> list[dict]:
    """The measured points a row rests on: budget, seed, point id, score."""
    return [{"budget": g["budget"], **p} for g in groups for p in g.get("points", [])]


def _row(rep, key, budget, score, sd, n_seeds, seeds, points=()) -> dict:
    method, frac = key
    n_sft, n_pft = allocate(budget, frac, rep.costs["sft"], rep.costs["pair"])
    return {"method": method, "sft_fraction": frac, "n_sft": n_sft, "n_pft": n_pft,
            "score": score, "sd": sd, "n_seeds": n_seeds, "seeds": seeds,
            "points": list(points)}


def _overlaps(r: dict, best: dict, typical: float | None) -> bool:
    """The ranges mean +/- sd meet. A single seed has no sd of its own: it borrows the
    median sd of the other candidates; with no sd anywhere nothing can be told apart."""
    sd_r = r["sd"] if r["sd"] is not None else typical
    sd_b = best["sd"] if best["sd"] is not None else typical
    if sd_r is None or sd_b is None:
        return True
    return r["score"] + sd_r >= best["score"] - sd_b


def _next_runs(rep, task, model, budget, kind, rests_on, cands, best, contenders, top):
    """A short list of cells, most informative first, each with the reason."""
    if best is None:
        return []
    lead = [best] + contenders
    out: list[dict] = []

    def add(method, frac, b, reason):
        if any((o["method"], o["sft_fraction"], o["budget"]) == (method, frac, b) for o in out):
            return
        n_sft, n_pft = allocate(b, frac, rep.costs["sft"], rep.costs["pair"])
        out.append({"task": task, "model": model, "method": method, "sft_fraction": frac,
                    "budget": b, "n_sft": n_sft, "n_pft": n_pft, "reason": reason})

    # 1. A measurement at the budget itself replaces an interpolation or a guess beyond the
    #    data: for the leaders first.
    if kind != "measured":
        for r in lead[:2]:
            add(r["method"], r["sft_fraction"], budget, "measure at the budget itself instead "
                + ("of interpolating" if kind == "interpolated" else "of guessing beyond the data"))
    # 2. Cells of the comparison that are missing or failed at the budgets it rests on.
    for key, by in cands.items():
        for b in rests_on:
            g = by.get(b)
            if g and g["n_seeds"] < g["seeds"]:
                bad = ", ".join(f"{n} {s}" for s, n in g["states"].items())
                add(key[0], key[1], b, f"missing from the comparison: {g['n_seeds']} of "
                    f"{g['seeds']} seeds measured ({bad})")
    # 3. Leaders the seeds cannot order yet: another seed where the spread is unknown or widest.
    if kind == "measured" and len(lead) > 1:
        for r in sorted(lead, key=lambda r: -(r["sd"] if r["sd"] is not None else math.inf)):
            add(r["method"], r["sft_fraction"], rests_on[0],
                "another seed: one seed gives no spread" if r["sd"] is None else
                f"another seed: its range overlaps the best's (sd {r['sd']:.3g})")
    return out[:top]
