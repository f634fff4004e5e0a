"""`budgetlab search` on a ledger whose points are already measured (recorded from a surface
the test chooses): nothing is submitted, the search reads its scores through the ledger and
the report, and its answer is the surface's best split. The JSON shape is checked here."""

import json

import pytest

KEYS = ["grid", "epsilon", "metric", "compute_unit", "compute_used", "compute_full_grid",
        "compute_full_grid_how", "stopped", "answers", "strategy", "cells_measured",
        "cells_grid", "stages_used", "stages_grid", "stage_fraction", "stages_reused",
        "gpu_hours", "cpu_hours", "rounds"]
ANSWER_KEYS = ["task", "model", "budget", "band", "best", "stopped", "candidates_measured",
               "candidates", "finalists"]
ENTRY_KEYS = ["method", "sft_fraction", "n_sft", "n_pft", "score_mean", "score_std", "n_seeds"]


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
    assert list(out) == KEYS and all(list(a) == ANSWER_KEYS for a in out["answers"])
    assert all(list(e) == ENTRY_KEYS for a in out["answers"] for e in a["band"] + [a["best"]])
    assert out["epsilon"] == 0.05 and out["compute_used"] == pytest.approx(
        out[out["compute_unit"]])
    # every stage of the grid is recorded here: the full grid's compute is measured, not guessed
    assert out["compute_full_grid"] > out["compute_used"] > 0
    assert " 0 estimated" in out["compute_full_grid_how"], out["compute_full_grid_how"]
    found = {a["budget"]: (a["best"]["method"], a["best"]["sft_fraction"])
             for a in out["answers"]}
    assert found == {64.0: ("sft", 1.0), 256.0: ("dpo", 0.5), 1024.0: ("dpo", 0.5)}
    # every stage it used was complete already: nothing ran, nothing was submitted
    assert out["stages_reused"] == out["stages_used"] < out["stages_grid"]
    assert all(r["submitted"] == 0 for r in out["rounds"])
    assert out["cells_measured"] < out["cells_grid"] == len(plan.cells)
    by = {a["budget"]: a["best"] for a in out["answers"]}
    bands = {a["budget"]: [(e["method"], e["sft_fraction"]) for e in a["band"]]
             for a in out["answers"]}
    # the bands: at 64 only SFT (0.30; the next is 0.20), at 1024 dpo 0.5 alone (0.80 > 0.45)
    assert bands[64.0] == [("sft", 1.0)] and bands[1024.0] == [("dpo", 0.5)]
    assert {a["budget"]: a["stopped"] for a in out["answers"]} == {
        64.0: "separated", 256.0: "separated", 1024.0: "separated"}
    assert out["stopped"].startswith("separated")
    # the first budget measures its winner with both seeds (the seed spread is learnt there);
    # at 256 the gap to every other candidate is far outside that spread: one seed decides
    assert by[64.0]["n_seeds"] == 2 and by[64.0]["score_mean"] == pytest.approx(0.301)
    assert by[256.0]["n_seeds"] == 1 and by[256.0]["score_mean"] == pytest.approx(0.60)
    assert by[256.0]["n_sft"] == 128 and by[256.0]["n_pft"] == 128
    full = json.loads(cli("search", tmp_path / "grid.toml", "--json", "--all-seeds").stdout)
    assert all(a["best"]["n_seeds"] == 2 for a in full["answers"])
    assert out["strategy"]["name"] == "ladder" and out["metric"] == "accuracy"


def test_plain_halving_measures_more_and_agrees(measured, cli, tmp_path):
    plan, led = measured
    lean = json.loads(cli("search", tmp_path / "grid.toml", "--json").stdout)
    plain = json.loads(cli("search", tmp_path / "grid.toml", "--json", "--no-borrow").stdout)
    assert plain["strategy"]["name"] == "successive-halving"
    assert [(a["best"]["method"], a["best"]["sft_fraction"]) for a in plain["answers"]] == \
        [(a["best"]["method"], a["best"]["sft_fraction"]) for a in lean["answers"]]
    assert plain["cells_measured"] > lean["cells_measured"]


def test_search_text_output(measured, cli, tmp_path):
    r = cli("search", tmp_path / "grid.toml")
    assert r.exit_code == 0, r.output
    assert "best split and epsilon-band per budget" in r.stdout and "stopped: separated" in r.stdout
    assert "best split and epsilon-band per budget" in r.stdout and "round 1:" in r.stdout
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


def _two_models(tmp_path, surf, large_surface):
    """A small and a large model's grids, both recorded in one ledger."""
    from budgetlab.graph import build_plan
    from budgetlab.ledger import Ledger
    from budgetlab.spec import load_spec

    led = Ledger(tmp_path / "ledger.db")
    for name, model, fn in (("small", "builtin:arith-tiny", surface),
                            ("large", "builtin:arith-small", large_surface)):
        path = tmp_path / f"{name}.toml"
        path.write_text(surf.SPEC.replace('name = "surf"', f'name = "{name}"')
                        .replace("builtin:arith-tiny", model))
        plan = build_plan(load_spec(path))
        led.register(plan)
        surf.record(led, plan, fn)
    led.close()


def moved(p):
    """The large model: as the small one, except at 1024 where SFT alone wins (0.95; the
    small model's runner-up there, its strongest challenger)."""
    if p.n_sft + p.n_pft == 1024 and p.n_pft == 0:
        return round(0.95 + 0.002 * p.seed, 9)
    return surface(p)


@pytest.mark.parametrize("large, confirmed", [(surface, 3), (moved, 2)])
def test_transfer_from_a_small_grid(tmp_path, surf, cli, large, confirmed):
    """The small model's bands are the prior: two confirmation points per budget (its best
    and its strongest challenger), one seed each. Where the large model's best moved to the
    challenger (at 1024), the prior is not confirmed there and the ladder searches that
    budget; the answers are the large model's own best splits either way."""
    _two_models(tmp_path, surf, large)
    r = cli("search", tmp_path / "large.toml", "--transfer-from", tmp_path / "small.toml",
            "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    tr = out["transfer"]
    assert tr["from"] == "small (builtin:arith-tiny)" and tr["budgets"] == 3
    assert tr["confirmation_points"] == 6 and tr["confirmed"] == confirmed
    found = {a["budget"]: (a["best"]["method"], a["best"]["sft_fraction"])
             for a in out["answers"]}
    want = {64.0: ("sft", 1.0), 256.0: ("dpo", 0.5),
            1024.0: ("dpo", 0.5) if large is surface else ("sft", 1.0)}
    assert found == want
    if large is surface:   # confirmed everywhere: the six confirmation cells and nothing else
        assert out["cells_measured"] == 6 and len(out["rounds"]) == 1
        assert {a["stopped"] for a in out["answers"]} == {"prior confirmed"}
        assert out["stopped"] == "prior confirmed at 3 of 3 budget(s), the others separated"
    else:
        by = {a["budget"]: a["transfer"]["confirmed"] for a in out["answers"]}
        assert by == {64.0: True, 256.0: True, 1024.0: False}
    plain = json.loads(cli("search", tmp_path / "large.toml", "--json").stdout)
    assert out["cells_measured"] < plain["cells_measured"]
    text = cli("search", tmp_path / "large.toml", "--transfer-from", tmp_path / "small.toml")
    assert text.exit_code == 0, text.output
    assert f"transfer from small (builtin:arith-tiny): 6 confirmation point(s) at 3 budget(s); " \
           f"{confirmed} confirmed" in text.stdout, text.stdout


def test_compute_cap_stops_the_search_and_says_so(measured, cli, tmp_path):
    """Each stage of the recorded grid used 36 GPU-seconds: a cap of 0.01 GPU-hours is
    reached by the first round, and nothing more is submitted or read."""
    r = cli("search", tmp_path / "grid.toml", "--json", "--max-gpu-hours", "0.01")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert len(out["rounds"]) == 1 and out["compute_used"] >= 0.01
    assert out["stopped"].startswith("compute cap: 0.01 gpu-hours reached"), out["stopped"]
    full = json.loads(cli("search", tmp_path / "grid.toml", "--json").stdout)
    assert out["cells_measured"] < full["cells_measured"]


@pytest.mark.parametrize("args, word", [
    (["--max-gpu-hours", "-1"], "--max-gpu-hours"), (["--epsilon", "1.5"], "--epsilon"),
    (["--transfer-from", "nosuch.toml"], "--transfer-from nosuch.toml")])
def test_search_bad_input_one_line_exit_2(measured, cli, tmp_path, args, word):
    plan, led = measured
    before = (len(led.attempts()), len(led.grids()))
    r = cli("search", tmp_path / "grid.toml", *args)
    assert r.exit_code == 2 and word in r.output and len(r.output.strip().splitlines()) == 1, \
        r.output
    assert (len(led.attempts()), len(led.grids())) == before


def test_recommend_band_lists_the_points_it_rests_on(surface_ledger):
    """At 1024 DPO 0.5 (0.78 + seed noise) leads; epsilon 0.2 takes in DPO 0.1 (about 0.68)
    but not SFT only (0.20). Each band row carries its measured points (seed, point, score)."""
    from budgetlab.recommend import recommend
    from budgetlab.report import build_report
    led, plan = surface_ledger
    rep = build_report(led, "surf")
    a = recommend(rep, 1024, epsilon=0.2)["answers"][0]
    band = [(r["method"], r["sft_fraction"]) for r in a["band"]]
    assert band[0] == (a["best"]["method"], a["best"]["sft_fraction"])
    floor = a["best"]["score"] * 0.8
    assert all(r["score"] >= floor for r in a["band"])
    assert all(r["score"] < floor for r in a["ranking"] if r not in a["band"])
    for r in a["band"]:
        pts = r["points"]
        assert sorted(p["seed"] for p in pts) == [0, 1]
        assert {p["point_id"] for p in pts} <= set(plan.points)
        assert sum(p["score"] for p in pts) / 2 == pytest.approx(r["score"])
    assert recommend(rep, 1024, epsilon=0.0)["answers"][0]["band"] == a["band"][:1]
