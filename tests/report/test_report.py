"""The report on ledgers whose results come from a known surface (see conftest.py)."""

import csv
import json
import math

import pytest

from budgetlab.alloc import allocate
from budgetlab.errors import BadInput
from budgetlab.report import CELL_KEYS, build_report, findings, parse_costs


def test_scores_best_split_and_spread(surface_ledger):
    led, plan = surface_ledger
    rep = build_report(led, "surf")
    assert rep.metric == "accuracy" and not rep.repriced
    assert len(rep.cells) == 3 * 4 * 2 * 2 and all(c["status"] == "COMPLETED" for c in rep.cells)
    best = {(b["method"], b["budget"]): b for b in rep.best}
    # SFT only wins at small budgets; at 1024 a mix wins for DPO, KTO stays with SFT.
    assert best[("dpo", 64.0)]["sft_fraction"] == 1.0
    assert best[("dpo", 256.0)]["sft_fraction"] == 1.0
    assert best[("dpo", 1024.0)]["sft_fraction"] == 0.5
    assert best[("kto", 1024.0)]["sft_fraction"] == 1.0
    b = best[("dpo", 64.0)]
    # seeds 0 and 1 score 0.10 and 0.11: mean 0.105, sample sd 0.01 / sqrt(2)
    assert b["score_mean"] == pytest.approx(0.105)
    assert b["score_std"] == pytest.approx(0.01 / math.sqrt(2))
    assert b["n_seeds"] == 2
    # compute: every stage had one attempt of 36 GPU-seconds; shared stages count once.
    assert rep.totals["gpu_hours"] == pytest.approx(len(plan.stages) * 36 / 3600)
    sft_only = next(c for c in rep.cells if c["sft_fraction"] == 1.0)
    assert sft_only["gpu_hours"] == pytest.approx(2 * 36 / 3600)  # sft + eval
    assert rep.totals["annotation_spend"] == pytest.approx(sum(c.annotation_cost
                                                               for c in plan.cells))
    text = " ".join(findings(rep))
    assert "SFT only is best at budget 64, 256" in text and "a mix is best at 1024" in text
    assert "cold start" in text


def test_json_shape_exactly(surface_ledger, cli):
    r = cli("report", "surf", "--json")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert list(data) == ["grid", "metric", "cells", "best"]
    assert data["grid"] == "surf" and data["metric"] == "accuracy"
    assert all(list(c) == list(CELL_KEYS) for c in data["cells"])
    assert all(list(b) == ["task", "model", "method", "budget", "sft_fraction", "score_mean",
                           "score_std", "n_seeds"] for b in data["best"])
    assert len(data["cells"]) == 48 and len(data["best"]) == 6


def test_failed_and_missing_cells_are_not_zero(tmp_path, cli, surf):
    led, plan = surf.register(tmp_path)
    paper_surface = surf.paper_surface
    cells = {(c.method, c.budget, c.sft_fraction, c.seed): c.point_id for c in plan.cells}
    failed = {cells[("dpo", 256.0, 0.5, 0)], cells[("dpo", 256.0, 0.5, 1)]}
    missing = {cells[("kto", 1024.0, 0.1, 0)], cells[("kto", 1024.0, 0.1, 1)]}
    partial = {cells[("dpo", 64.0, 0.1, 1)]}
    surf.record(led, plan, paper_surface, fail=failed | partial, skip=missing)
    rep = build_report(led, "surf")
    by = {(c["method"], c["budget"], c["sft_fraction"], c["seed"]): c for c in rep.cells}
    assert by[("dpo", 256.0, 0.5, 0)]["status"] == "FAILED"
    assert by[("dpo", 256.0, 0.5, 0)]["score"] is None
    assert by[("kto", 1024.0, 0.1, 1)]["status"] == "NOT_RUN"
    g = rep.group("arith", "builtin:arith-tiny", "dpo", 64.0, 0.1)
    assert g["n_seeds"] == 1 and g["score_mean"] == pytest.approx(paper_surface(
        plan.points[cells[("dpo", 64.0, 0.1, 0)]])) and g["score_std"] is None
    assert rep.group("arith", "builtin:arith-tiny", "dpo", 256.0, 0.5)["score_mean"] is None

    r = cli("report", "surf")
    assert r.exit_code == 0, r.output
    def row(panel, budget):  # one heatmap row's lines: rows are split by ├, the header ends at ┩
        text = r.stdout.split(f"· {panel}")[1].split("└")[0].split("┩")[1]
        return next(b for b in text.split("├") if b.strip("─┼┤\n│ ").startswith(budget))

    assert "FAILED" in row("dpo", "256") and "0.000" not in row("dpo", "256")
    assert "BLOCKED" not in row("dpo", "256")  # the root cause is shown
    assert "NOT_RUN" in row("kto", "1024")
    assert "1/2" in row("dpo", "64") and "1 FAILED" in row("dpo", "64")
    assert "total: 43/48 cells measured" in r.stdout


def test_reprice_maps_budgets_and_reuses_measured_points(surface_ledger, cli):
    led, plan = surface_ledger
    rep = build_report(led, "surf", costs={"sft": 2.0, "pair": 1.0})
    assert rep.repriced and rep.costs == {"sft": 2.0, "pair": 1.0}
    # Measured points, matched independently of content ids: same chain shape and counts.
    measured = {(p["method"], p["n_sft"], p["n_pft"], p["seed"])
                for p in led.point_status() if p["eval_state"] == "COMPLETED"}
    for c in rep.cells:
        n_sft, n_pft = allocate(c["budget"], c["sft_fraction"], 2.0, 1.0)
        assert (c["n_sft"], c["n_pft"]) == (n_sft, n_pft)
        assert c["annotation_cost"] == 2.0 * n_sft + 1.0 * n_pft
        method = c["method"] if n_pft else "sft"
        assert (c["status"] == "COMPLETED") == ((method, n_sft, n_pft, c["seed"]) in measured)
    # PFT-only cells buy the same pairs at any SFT price: all reused, with their scores.
    assert all(c["status"] == "COMPLETED" and c["score"] == pytest.approx(0.02 + 0.01 * c["seed"])
               for c in rep.cells if c["sft_fraction"] == 0.0)
    needed = {(n["method"], n["n_sft"], n["n_pft"], n["seed"]): n for n in rep.needed}
    # 64 at f = 1.0 now buys 32 SFT examples: that SFT stage exists (f = 0.5 trained it),
    # so only the eval stage is new.
    assert needed[("sft", 32, 0, 0)]["stages_to_run"] == 1
    assert needed[("dpo", 16, 32, 0)]["stages_to_run"] == 3
    assert len(rep.needed) == len({c["point_id"] for c in rep.cells
                                   if c["status"] != "COMPLETED"})
    # Stages to run, shared ones once: the re-priced plan's stages that the ledger lacks.
    from budgetlab.graph import build_plan
    import dataclasses
    new = build_plan(dataclasses.replace(plan.spec, costs={**plan.spec.costs, "sft_example": 2.0}))
    done = {s.stage_id for s in led.stages() if s.state == "COMPLETED"}
    assert rep.totals["stages_to_run"] == len(set(new.stages) - done)

    r = cli("report", "surf", "--cost", "sft=2,pair=1")
    assert r.exit_code == 0, r.output
    assert "re-priced" in r.stdout and f"{len(rep.needed)} points still needed" in r.stdout
    same = build_report(led, "surf", costs={"sft": 1.0, "pair": 1.0})
    assert not same.repriced and same.to_json() == build_report(led, "surf").to_json()


def test_metric_choice_csv_and_plot(surface_ledger, cli, tmp_path):
    r = cli("report", "surf", "--metric", "format_rate", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["metric"] == "format_rate"
    assert all(c["score"] == 1.0 for c in json.loads(r.stdout)["cells"])
    out_csv, out_png = tmp_path / "cells.csv", tmp_path / "fig.png"
    r = cli("report", "surf", "--csv", out_csv, "--plot", out_png)
    assert r.exit_code == 0, r.output
    rows = list(csv.DictReader(out_csv.open()))
    assert len(rows) == 48 and set(CELL_KEYS) <= set(rows[0])
    assert {r["metric"] for r in rows} == {"accuracy"}
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out_png.stat().st_size > 10_000


@pytest.mark.parametrize("args, message", [
    (["report", "nope"], "unknown grid 'nope'"),
    (["report", "surf", "--metric", "bleu"], "--metric: unknown metric 'bleu'"),
    (["report", "surf", "--cost", "sft=2;pair=1"], "--cost: expected sft=X,pair=Y"),
    (["report", "surf", "--cost", "sft=0"], "--cost: sft must be a positive number"),
    (["report", "surf", "--cost", "pair=abc"], "--cost: pair must be a positive number"),
    (["report", "surf", "--cost", "gpu=3"], "--cost: expected sft=X,pair=Y"),
    (["report", "missing.toml"], "missing.toml: no such grid spec file"),
    (["recommend", "surf", "--budget", "-5"], "--budget: must be a positive number"),
])
def test_bad_input_is_one_line_exit_2(surface_ledger, cli, args, message):
    r = cli(*args)
    assert r.exit_code == 2, r.output
    assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_no_ledger_is_bad_input(cli):
    r = cli("report", "surf")
    assert r.exit_code == 2 and "no ledger here" in r.stderr


def test_parse_costs():
    assert parse_costs("sft=2, pair=0.5") == {"sft": 2.0, "pair": 0.5}
    assert parse_costs("pair=3") == {"pair": 3.0}
    for bad in ("", "sft", "sft=1,sft=2", "sft=inf", "sft=nan", "sft=1,,pair=2"):
        with pytest.raises(BadInput):
            parse_costs(bad)


def test_a_grid_with_nothing_run_yet(tmp_path, cli, surf):
    led, plan = surf.register(tmp_path)
    rep = build_report(led, "surf")
    assert rep.metric == "accuracy"  # the task's primary metric, before any result
    assert {c["status"] for c in rep.cells} == {"NOT_RUN"} and rep.best == []
    r = cli("report", "surf")
    assert r.exit_code == 0 and "total: 0/48 cells measured" in r.stdout
    r = cli("recommend", "surf", "--budget", "100")
    assert r.exit_code == 0 and "nothing measured" in r.stderr


def test_reprice_arithmetic_at_any_costs(tmp_path, surf):
    """For random prices: each cell buys allocate(budget, share, costs), and it is reused
    exactly when a point with that (method, n_sft, n_pft, seed) was measured."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    led, plan = surf.register(tmp_path)
    surf.record(led, plan, surf.paper_surface)
    measured = {(p["method"], p["n_sft"], p["n_pft"], p["seed"])
                for p in led.point_status() if p["eval_state"] == "COMPLETED"}
    price = st.sampled_from([0.25, 0.5, 1.0, 1.5, 2.0, 4.0, 10.0, 100.0])

    @settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
    @given(price, price)
    def check(c_sft, c_pair):
        rep = build_report(led, "surf", costs={"sft": c_sft, "pair": c_pair})
        for c in rep.cells:
            n_sft, n_pft = allocate(c["budget"], c["sft_fraction"], c_sft, c_pair)
            assert (c["n_sft"], c["n_pft"]) == (n_sft, n_pft)
            assert c["annotation_cost"] == pytest.approx(n_sft * c_sft + n_pft * c_pair)
            assert c["annotation_cost"] <= c["budget"] + 1e-9
            method = c["method"] if n_pft else "sft" if n_sft else "base"
            seed = None if method == "base" else c["seed"]
            assert (c["status"] == "COMPLETED") == ((method, n_sft, n_pft, seed) in measured)
    check()


def test_reprice_after_a_data_file_moved(tmp_path, surf, monkeypatch):
    """Re-pricing rebuilds the plan from the spec as resolved at registration (content
    hashes), not by parsing the stored text against today's files: a data file moved (or
    deleted) since changes nothing. Before, every re-priced cell became NOT_RUN or the
    report refused to rebuild the spec."""
    monkeypatch.chdir(tmp_path)
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(f'{{"prompt": "Q: {i}+1?", "response": "A: {i}+1={i + 1}. '
                            f'#### {i + 1}"}}\n' for i in range(2000)))
    led, plan = surf.register(tmp_path, surf.SPEC + '\n[data.arith]\nsft = "sft.jsonl"\n')
    surf.record(led, plan, surf.paper_surface)
    before = build_report(led, "surf", costs={"sft": 2.0, "pair": 1.0})
    reused = sum(c["status"] == "COMPLETED" for c in before.cells)
    assert reused > 0
    data.rename(tmp_path / "moved.jsonl")
    after = build_report(led, "surf", costs={"sft": 2.0, "pair": 1.0})
    assert after.to_json() == before.to_json()
