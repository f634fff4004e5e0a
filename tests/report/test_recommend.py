"""recommend on surfaces whose optimum is known."""

import json
import math

import pytest

from budgetlab.recommend import recommend
from budgetlab.report import build_report


def log_surface(p):
    """Linear in log(total examples) for each split, so interpolation in log-budget is exact
    on it; the optimum moves from SFT only to SFT share 0.5 with DPO where 0.02 x = 0.06 x -
    0.24, at x = 6 (a total of about 403 examples)."""
    total = max(p.n_sft + p.n_pft, 1)
    x = math.log(total)
    if p.n_sft == 0:
        s = 0.01
    elif p.n_pft == 0:
        s = 0.02 * x
    elif p.method == "dpo" and 2 * p.n_sft >= total - 1:  # SFT share 0.5
        s = 0.06 * x - 0.24
    else:
        s = 0.03 * x - 0.09
    return round(s + 0.002 * p.seed, 9)


@pytest.fixture
def log_ledger(tmp_path, surf):
    led, plan = surf.register(tmp_path)
    surf.record(led, plan, log_surface)
    yield led, plan
    led.close()


def answer(rec):
    (a,) = rec["answers"]
    return a


def test_measured_budget_gives_the_known_best(log_ledger):
    led, _ = log_ledger
    rep = build_report(led, "surf")
    a = answer(recommend(rep, 64))
    assert a["kind"] == "measured" and a["warning"] is None
    assert (a["best"]["method"], a["best"]["sft_fraction"]) == ("sft", 1.0)
    # 0.02 x log 64 = 0.083 > 0.06 x log 64 - 0.24 = 0.010
    assert a["best"]["score"] == pytest.approx(0.02 * math.log(64) + 0.001, abs=1e-6)
    big = answer(recommend(rep, 1024))
    assert (big["best"]["method"], big["best"]["sft_fraction"]) == ("dpo", 0.5)
    assert big["best"]["n_sft"] == 512 and big["best"]["n_pft"] == 512


def test_interpolation_between_budgets_is_linear_in_log_budget(log_ledger):
    led, _ = log_ledger
    rep = build_report(led, "surf")
    a = answer(recommend(rep, 512))
    assert a["kind"] == "interpolated" and "linear in log(budget)" in a["method"]
    assert "256" in a["method"] and "1024" in a["method"]
    # The surface is linear in log(total): the estimate at 512 is the value at 512.
    by = {(r["method"], r["sft_fraction"]): r for r in a["ranking"]}
    assert by[("sft", 1.0)]["score"] == pytest.approx(0.02 * math.log(512) + 0.001, abs=1e-6)
    assert by[("dpo", 0.5)]["score"] == pytest.approx(0.06 * math.log(512) - 0.239, abs=1e-6)
    # Measured: SFT only wins at 256, DPO at share 0.5 at 1024; the crossover (about 403)
    # lies below 512, so the estimate at 512 picks the mix and at 300 SFT only.
    best = a["best"]
    assert (best["method"], best["sft_fraction"], best["n_sft"]) == ("dpo", 0.5, 256)
    assert best["sd"] == pytest.approx(0.002 / math.sqrt(2))
    assert a["contenders"] == []
    low = answer(recommend(rep, 300))["best"]
    assert (low["method"], low["sft_fraction"]) == ("sft", 1.0)
    # The first next run replaces the interpolation with a measurement at 512.
    first = a["next_runs"][0]
    assert first["budget"] == 512 and "instead of interpolating" in first["reason"]
    assert (first["method"], first["sft_fraction"], first["n_sft"]) == ("dpo", 0.5, 256)


def test_outside_the_measured_range_warns_and_gives_no_estimate(log_ledger, cli):
    led, _ = log_ledger
    a = answer(recommend(build_report(led, "surf"), 5000))
    assert a["kind"] == "outside" and "outside the measured range [64, 1024]" in a["warning"]
    assert a["at_budget"] == 1024 and a["best"]["n_sft"] == 512  # labelled: measured at 1024
    assert a["next_runs"][0]["budget"] == 5000
    r = cli("recommend", "surf", "--budget", "10")
    assert r.exit_code == 0
    assert "warning: budget 10 is outside the measured range [64, 1024]" in r.stderr
    assert "best split measured at 64 (not at 10)" in r.stdout
    r = cli("recommend", "surf", "--budget", "5000", "--json")
    assert json.loads(r.stdout)["answers"][0]["kind"] == "outside"


def test_close_candidates_and_missing_cells_drive_the_next_runs(tmp_path, surf):
    led, plan = surf.register(tmp_path)

    def close(p):  # at 256, DPO at SFT share 0.5 and 0.1 within each other's seed spread
        if p.n_sft + p.n_pft < 200 or p.n_pft == 0 or p.n_sft == 0:
            return 0.05 + 0.001 * p.seed
        if p.method == "dpo":
            return (0.30 if p.n_sft > 100 else 0.29) + 0.02 * p.seed
        return 0.1

    cells = {(c.method, c.budget, c.sft_fraction, c.seed): c.point_id for c in plan.cells}
    surf.record(led, plan, close, fail={cells[("kto", 256.0, 0.5, 1)]})
    a = answer(recommend(build_report(led, "surf"), 256, top=5))
    assert a["kind"] == "measured"
    assert (a["best"]["method"], a["best"]["sft_fraction"]) == ("dpo", 0.5)
    assert [(r["method"], r["sft_fraction"]) for r in a["contenders"]] == [("dpo", 0.1)]
    reasons = {(n["method"], n["sft_fraction"]): n["reason"] for n in a["next_runs"]}
    assert "1 FAILED" in reasons[("kto", 0.5)]
    assert reasons[("dpo", 0.5)].startswith("another seed")
    assert reasons[("dpo", 0.1)].startswith("another seed")


def test_recommend_text_and_repricing(log_ledger, cli):
    r = cli("recommend", "surf", "--budget", "512")
    assert r.exit_code == 0, r.output
    assert "estimated best split: dpo, SFT share 0.5 (256 SFT examples + 256 preference " \
        "pairs)" in r.stdout
    assert "next runs worth paying for" in r.stdout
    # Re-priced at sft=2: only the measured points are used; the SFT-only cells at the new
    # price are not measured, so the answer comes from the ones that are.
    r = cli("recommend", "surf", "--budget", "256", "--cost", "sft=2,pair=1", "--json")
    a = json.loads(r.stdout)["answers"][0]
    assert json.loads(r.stdout)["repriced"] is True
    assert all(x["method"] != "sft" for x in a["ranking"])
    assert "sft 1" in a["unmeasured"] and len(a["ranking"]) + len(a["unmeasured"]) == 7
