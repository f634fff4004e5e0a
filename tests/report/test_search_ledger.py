"""`budgetlab search` on a ledger whose points are already measured (recorded from a surface
the test chooses): nothing is submitted, the search reads its scores through the ledger and
the report, and its answer is the surface's best split. The JSON shape is checked here."""

import json

import pytest

KEYS = ["grid", "metric", "strategy", "best", "cells_measured", "cells_grid", "stages_used",
        "stages_grid", "stage_fraction", "stages_reused", "gpu_hours", "cpu_hours", "rounds"]
BEST_KEYS = ["task", "model", "budget", "method", "sft_fraction", "n_sft", "n_pft",
             "score_mean", "score_std", "n_seeds", "candidates_measured", "candidates",
             "finalists"]


def surface(p):
    """SFT only best at 64, SFT share 0.5 with DPO best at 256 and 1024; seeds 0.002 apart."""
    total = p.n_sft + p.n_pft
    if p.n_sft == 0:
        s = 0.01
    elif p.n_pft == 0:
        s = {64: 0.30, 256: 0.40, 1024: 0.45}[total]
    elif p.method == "dpo" and 2 * p.n_sft == total:
        s = {64: 0.20, 256: 0.60, 1024: 0.80}[total]
    else:
        s = 0.1
    return round(s + 0.002 * p.seed, 9)


@pytest.fixture
def measured(tmp_path, surf, cli):
    from budgetlab.ledger import Ledger

    led, plan = surf.register(tmp_path)   # the ledger at tmp_path/ledger.db, as `cli` uses
    surf.record(led, plan, surface)
    led.close()
    return plan, Ledger(cli.ledger_path, create=False)


def test_search_reads_measured_points_and_finds_the_best(measured, cli, tmp_path):
    plan, led = measured
    r = cli("search", tmp_path / "grid.toml", "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert list(out) == KEYS and all(list(b) == BEST_KEYS for b in out["best"])
    found = {b["budget"]: (b["method"], b["sft_fraction"]) for b in out["best"]}
    assert found == {64.0: ("sft", 1.0), 256.0: ("dpo", 0.5), 1024.0: ("dpo", 0.5)}
    # every stage it used was complete already: nothing ran, nothing was submitted
    assert out["stages_reused"] == out["stages_used"] < out["stages_grid"]
    assert all(r["submitted"] == 0 for r in out["rounds"])
    assert out["cells_measured"] < out["cells_grid"] == len(plan.cells)
    by = {b["budget"]: b for b in out["best"]}
    # the first budget measures its winner with both seeds (the seed spread is learnt there);
    # at 256 the gap to every other candidate is far outside that spread: one seed decides
    assert by[64.0]["n_seeds"] == 2 and by[64.0]["score_mean"] == pytest.approx(0.301)
    assert by[256.0]["n_seeds"] == 1 and by[256.0]["score_mean"] == pytest.approx(0.60)
    assert by[256.0]["n_sft"] == 128 and by[256.0]["n_pft"] == 128
    full = json.loads(cli("search", tmp_path / "grid.toml", "--json", "--all-seeds").stdout)
    assert all(b["n_seeds"] == 2 for b in full["best"])
    assert out["strategy"]["name"] == "ladder" and out["metric"] == "accuracy"


def test_plain_halving_measures_more_and_agrees(measured, cli, tmp_path):
    plan, led = measured
    lean = json.loads(cli("search", tmp_path / "grid.toml", "--json").stdout)
    plain = json.loads(cli("search", tmp_path / "grid.toml", "--json", "--no-borrow").stdout)
    assert plain["strategy"]["name"] == "successive-halving"
    assert [(b["method"], b["sft_fraction"]) for b in plain["best"]] == \
        [(b["method"], b["sft_fraction"]) for b in lean["best"]]
    assert plain["cells_measured"] > lean["cells_measured"]


def test_search_text_output(measured, cli, tmp_path):
    r = cli("search", tmp_path / "grid.toml")
    assert r.exit_code == 0, r.output
    assert "best split found per budget" in r.stdout and "round 1:" in r.stdout
    assert "budgetlab report surf" in r.stdout


def test_recommend_after_a_search_borrows_the_spread_of_other_budgets(tmp_path, surf):
    """A ledger holding only what the search measured: at 256 one seed per candidate, two
    seeds only at 64. recommend borrows the seed sd of 64 there and separates the winner
    (without it, no sd at 256 means nothing can be told apart)."""
    from budgetlab.recommend import recommend
    from budgetlab.report import build_report
    from budgetlab.search import Strategy, run_search, spaces_of

    led, plan = surf.register(tmp_path)
    cell_of = {(c.task, c.model, c.budget, c.sft_fraction, c.method, c.seed): c
               for c in plan.cells}

    def measure(reqs):
        cs = {r: cell_of[(r.task, r.model, r.budget, r.sft_fraction, r.method, r.seed)]
              for r in reqs}
        return {r: surface(plan.points[c.point_id]) for r, c in cs.items()}
    log = []
    run_search(spaces_of(plan), lambda reqs: (log.extend(reqs), measure(reqs))[1], Strategy())
    used = {cell_of[(r.task, r.model, r.budget, r.sft_fraction, r.method, r.seed)].point_id
            for r in log}
    surf.record(led, plan, surface, skip=set(plan.points) - used)
    rep = build_report(led, "surf")
    at256 = [g for g in rep.groups if g["budget"] == 256.0 and g["n_seeds"]]
    assert at256 and all(g["n_seeds"] == 1 for g in at256)
    a = recommend(rep, 256)["answers"][0]
    assert (a["best"]["method"], a["best"]["sft_fraction"]) == ("dpo", 0.5)
    assert a["contenders"] == []     # every other candidate is far outside the band
