"""The search strategy on score surfaces the tests choose (the surface is the test's input),
driven through the same run_search the CLI uses; the cells it asks for are checked against
the real plan of a grid spec."""

import json
import math

import pytest

from budgetlab.errors import BadInput
from budgetlab.search import (SFT_ONLY, Space, Strategy, breadth_first, ladder, run_search,
                              spaces_of)

SHARES = [1.0, 0.5, 0.25, 0.1, 0.0]
BUDGETS = [32.0, 64.0, 128.0, 256.0, 512.0]


def space(seeds=(0, 1, 2), methods=("dpo",)):
    cands = [(SFT_ONLY, 1.0)] + [(m, f) for f in SHARES[1:] for m in methods]
    return Space("arith", "m", list(BUDGETS), cands, list(seeds), list(methods))


def moving_peak(budget, share, seed):
    """The best share falls as the budget grows (1.0 at 32, 0.5 at 64 and 128, 0.25 above);
    seed noise of +/- 0.01, far below the gaps between shares."""
    best = 1.0 if budget < 64 else 0.5 if budget < 256 else 0.25
    return 0.8 - abs(math.log2(max(share, 0.05)) - math.log2(best)) * 0.1 + 0.01 * (seed - 1)


def measure_with(surface, log):
    def measure(reqs):
        log.append(list(reqs))
        return {r: surface(r.budget, r.sft_fraction, r.seed) for r in reqs}
    return measure


def truth(sp, surface):
    return {b: max(sp.candidates, key=lambda c: (sum(surface(b, c[1], s) for s in sp.seeds),
                                                 c[1]))
            for b in sp.budgets}


@pytest.mark.parametrize("borrow", [True, False])
def test_finds_the_moving_best_share_with_fewer_cells(borrow):
    sp, log = space(), []
    results, obs, rounds = run_search([sp], measure_with(moving_peak, log),
                                      Strategy(borrow=borrow))
    found = {b: a["best"] for b, a in results[("arith", "m")].items()}
    assert found == truth(sp, moving_peak)
    cells = {r for batch in log for r in batch}
    grid = len(sp.budgets) * len(sp.candidates) * len(sp.seeds)
    assert len(cells) <= 0.6 * grid      # plain: 9 of 15 cells per budget
    # plain halving measures each winner with every seed; the ladder at least the first
    # budget's (where the seed spread is learnt), later ones only while it is not clear
    for b, c in found.items():
        if not borrow or b == BUDGETS[0]:
            assert sorted(obs.of(sp, b, c)) == sp.seeds


def test_all_seeds_measures_every_winner_with_every_seed():
    sp, log = space(), []
    lean = run_search([sp], measure_with(moving_peak, []), Strategy())[1]
    results, obs, _ = run_search([sp], measure_with(moving_peak, log),
                                 Strategy(all_seeds=True))
    for b, a in results[("arith", "m")].items():
        assert sorted(obs.of(sp, b, a["best"])) == sp.seeds
    n = lambda o: sum(len(v) for v in o.scores.values())  # noqa: E731
    assert n(lean) < n(obs)


def test_a_close_runner_up_gets_more_seeds_and_a_clear_one_does_not():
    """Seed noise 0.01 is learnt at the first budget; at 512 the runner-up is 0.005 behind
    (within the noise: measured again) in one surface, 0.2 behind (clear) in the other.
    With epsilon 0 every candidate the noise cannot order counts; with epsilon 0.05 a
    runner-up 0.005 behind the leader's 0.8 cannot push the leader out of its band (0.04
    wide, far beyond the noise), so it is not measured again: the budget is separated."""
    def surface(gap):
        def f(budget, share, seed):
            if budget == 512.0:
                return {0.25: 0.8, 0.5: 0.8 - gap}.get(share, 0.1) + 0.01 * (seed - 1)
            return moving_peak(budget, share, seed)
        return f
    for eps, gap, measured, sep in ((0.0, 0.005, [0, 1, 2], False), (0.0, 0.2, [0], True),
                                    (0.05, 0.005, [0], True), (0.05, 0.2, [0], True)):
        res, obs, _ = run_search([space()], measure_with(surface(gap), []),
                                 Strategy(epsilon=eps))
        assert sorted(obs.of(space(), 512.0, ("dpo", 0.5))) == measured, (eps, gap)
        assert res[("arith", "m")][512.0]["separated"] is sep, (eps, gap)


def test_band_floor_and_band():
    """(1 - epsilon) of the best for a positive score, epsilon * |best| below a negative one
    (reward-model scores); the band lists the measured candidates above the floor."""
    from budgetlab.search import Observations, band, band_floor
    assert band_floor(0.8, 0.05) == pytest.approx(0.76)
    assert band_floor(-2.0, 0.05) == pytest.approx(-2.1)
    sp, obs = space(seeds=(0,)), Observations()
    for share, v in ((1.0, 0.5), (0.5, 0.8), (0.25, 0.77), (0.1, 0.75)):
        c = (SFT_ONLY, 1.0) if share == 1.0 else ("dpo", share)
        obs.add(sp, sp.request(64.0, c, 0), v)
    assert band(sp, obs, 64.0, ("dpo", 0.5), 0.05) == [("dpo", 0.5), ("dpo", 0.25)]
    assert band(sp, obs, 64.0, ("dpo", 0.5), 0.0) == [("dpo", 0.5)]


@pytest.mark.parametrize("eps", [-0.1, 1.0, float("nan"), True])
def test_bad_epsilon_is_bad_input(eps):
    with pytest.raises(BadInput, match="--epsilon"):
        Strategy(epsilon=eps).check()


def test_transfer_confirms_a_band_that_holds_and_searches_one_that_moved():
    """The prior (a small model's bands) ranks the candidates as moving_peak does at every
    budget but 512, where it says SFT only, then dpo 0.5. Where it holds, the two
    confirmation points per budget (its best and its strongest challenger) are all that is
    measured; at 512 the challenger beats the prior's best by more than epsilon, and the
    ladder searches that budget and finds the true best, dpo 0.25."""
    from budgetlab.search import transfer
    sp = space()

    def ranking(b):
        return sorted(sp.candidates, key=lambda c: -sum(moving_peak(b, c[1], s) for s in sp.seeds))
    prior = {("arith", b): {"ranking": ranking(b), "band": ranking(b)[:1]} for b in BUDGETS}
    prior[("arith", 512.0)] = {"ranking": [(SFT_ONLY, 1.0), ("dpo", 0.5), ("dpo", 0.25),
                                           ("dpo", 0.1), ("dpo", 0.0)], "band": [(SFT_ONLY, 1.0)]}
    log = []
    res, obs, _ = run_search([sp], measure_with(moving_peak, log), Strategy(),
                             driver=transfer(prior))
    ans = res[("arith", "m")]
    assert len(log[0]) == 2 * len(BUDGETS)           # the confirmation round, one seed each
    assert {b for b, a in ans.items() if a["confirmed"]} == set(BUDGETS) - {512.0}
    assert ans[512.0]["confirmed"] is False
    assert {b: a["best"] for b, a in ans.items()} == truth(sp, moving_peak)
    for b in BUDGETS[:-1]:                            # confirmed: nothing else measured
        assert len([c for c in sp.candidates if obs.of(sp, b, c)]) == 2
    assert len([c for c in sp.candidates if obs.of(sp, 512.0, c)]) == len(sp.candidates)


def test_borrowing_measures_fewer_cells_than_plain_halving():
    counts = {}
    for borrow in (True, False):
        log = []
        run_search([space()], measure_with(moving_peak, log), Strategy(borrow=borrow))
        counts[borrow] = len({r for batch in log for r in batch})
    # plain: 5 x 1 seed + 2 x 2 more seeds = 9 per budget; borrowed: 5 at the first budget
    assert counts[False] == 9 * len(BUDGETS)
    assert counts[True] < counts[False]


def test_plain_halving_first_rung_sees_every_candidate_at_every_budget():
    sp, log = space(), []
    run_search([sp], measure_with(moving_peak, log), Strategy(borrow=False), driver=breadth_first)
    first = log[0]
    assert {(r.budget, r.sft_fraction) for r in first} == {(b, f) for b in BUDGETS for f in SHARES}
    assert {r.seed for r in first} == {0}
    assert len(log) == 2          # two rungs: 1 seed, then 3 seeds for the survivors


def test_a_borrowed_pool_can_miss_a_jump_that_plain_halving_finds():
    """Borrowing trades safety for compute: a best share that jumps far from the budget
    below (here to PFT only at the largest budget) is outside the borrowed pool."""
    def jump(budget, share, seed):
        if budget == 512.0:
            return 0.9 if share == 0.0 else 0.1
        return moving_peak(budget, share, seed)
    plain = run_search([space()], measure_with(jump, []), Strategy(borrow=False))[0]
    borrowed = run_search([space()], measure_with(jump, []), Strategy(borrow=True))[0]
    assert plain[("arith", "m")][512.0]["best"] == ("dpo", 0.0)
    assert borrowed[("arith", "m")][512.0]["best"] != ("dpo", 0.0)


def test_failed_cells_rank_last_and_never_win():
    def failing(budget, share, seed):
        return None if share == 1.0 else moving_peak(budget, share, seed)
    sp = space()
    results, _, _ = run_search([sp], lambda reqs: {r: failing(r.budget, r.sft_fraction, r.seed)
                                                   for r in reqs}, Strategy(borrow=False))
    assert results[("arith", "m")][32.0]["best"] != (SFT_ONLY, 1.0)


def test_search_seed_changes_the_seed_order_not_the_answer():
    sp = space()
    orders = set()
    for seed in range(6):
        log = []
        res, _, _ = run_search([sp], measure_with(moving_peak, log), Strategy(seed=seed))
        orders.add(log[0][0].seed)
        assert {b: a["best"] for b, a in res[("arith", "m")].items()} == truth(sp, moving_peak)
    assert len(orders) > 1


def test_two_methods_share_the_sft_only_candidate():
    sp = space(methods=("dpo", "kto"))
    assert sp.candidates.count((SFT_ONLY, 1.0)) == 1 and len(sp.candidates) == 9
    log = []
    run_search([sp], measure_with(moving_peak, log), Strategy())
    sft_only = {r.method for batch in log for r in batch if r.sft_fraction == 1.0}
    assert sft_only == {"dpo"}     # measured once, as the grid's first method's cell


@pytest.mark.parametrize("eta", [1, 0, -3, 2.5, True])
def test_bad_eta_is_bad_input(eta):
    with pytest.raises(BadInput, match="--eta"):
        Strategy(eta=eta).check()


def test_requests_are_cells_of_the_grid(write_spec):
    from budgetlab.api import load_plan

    plan = load_plan(write_spec())     # tests/conftest.py GOOD_SPEC: dpo and kto, 2 seeds
    cells = {(c.task, c.model, c.budget, c.sft_fraction, c.method, c.seed) for c in plan.cells}
    spaces = spaces_of(plan)
    log = []
    run_search(spaces, measure_with(moving_peak, log), Strategy())
    asked = {(r.task, r.model, r.budget, r.sft_fraction, r.method, r.seed)
             for batch in log for r in batch}
    assert asked and asked <= cells and len(asked) < len(cells)


def test_cli_bad_eta_one_line_exit_2_nothing_written(cli, write_spec):
    r = cli("search", write_spec(), "--eta", "1")
    assert r.exit_code == 2
    assert r.stderr.strip().count("\n") == 0 and "--eta" in r.stderr
    assert not cli.ledger_path.exists()


def test_cli_bad_spec_names_the_key(cli, write_spec):
    from tests.conftest import GOOD_SPEC

    r = cli("search", write_spec(GOOD_SPEC.replace("budgets = [64, 256]", "budgets = [0]")))
    assert r.exit_code == 2 and "grid.budgets" in r.stderr
    assert r.stderr.strip().count("\n") == 0
    assert not cli.ledger_path.exists()


def test_replay_pays_a_shared_stage_once():
    """bench/search_replay.py's meter: two cells whose points share an SFT stage."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "bench" / "search_replay.py"
    spec = importlib.util.spec_from_file_location("search_replay", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    data = {"tasks": ["arith"], "models": ["m"], "budgets": [8, 16], "sft_fractions": [1.0, 0.5],
            "methods": ["dpo"], "seeds": [0],
            "stages": {"s8": {"cpu_seconds": 10.0}, "e8": {"cpu_seconds": 1.0},
                       "d8": {"cpu_seconds": 5.0}, "e16": {"cpu_seconds": 1.0},
                       "s4": {"cpu_seconds": 4.0}, "d4": {"cpu_seconds": 2.0},
                       "e4": {"cpu_seconds": 1.0}, "s16": {"cpu_seconds": 20.0},
                       "f16": {"cpu_seconds": 1.0}},
            "cells": [
                {"task": "arith", "model": "m", "budget": 8, "sft_fraction": 1.0,
                 "method": "dpo", "seeds": {"0": {"score": 0.5, "chain": ["s8", "e8"]}}},
                {"task": "arith", "model": "m", "budget": 16, "sft_fraction": 0.5,
                 "method": "dpo", "seeds": {"0": {"score": 0.7, "chain": ["s8", "d8", "e16"]}}},
                {"task": "arith", "model": "m", "budget": 8, "sft_fraction": 0.5,
                 "method": "dpo", "seeds": {"0": {"score": 0.2, "chain": ["s4", "d4", "e4"]}}},
                {"task": "arith", "model": "m", "budget": 16, "sft_fraction": 1.0,
                 "method": "dpo", "seeds": {"0": {"score": 0.6, "chain": ["s16", "f16"]}}}]}
    table = mod.Table(json.loads(json.dumps(data)))
    assert table.full_cost == 45.0
    meter = mod.Meter(table)
    sp = table.spaces()[0]
    meter([sp.request(8.0, (SFT_ONLY, 1.0), 0)])
    assert meter.cost == 11.0
    meter([sp.request(16.0, ("dpo", 0.5), 0)])
    assert meter.cost == 17.0             # s8 was paid already
    capped = mod.Meter(table, cap=12.0)
    got = capped([sp.request(8.0, (SFT_ONLY, 1.0), 0), sp.request(16.0, (SFT_ONLY, 1.0), 0)])
    assert len(got) == 1 and capped.cost == 11.0


def test_transfer_measures_only_the_prior_best_between_two_budgets_with_the_same_prior():
    """The same prior at every budget (dpo 0.5, then SFT only): the first and the last budget
    get both confirmation points, the three between them only the prior's best, confirmed by
    their neighbours. Where the first budget's challenger wins clearly (SFT only at 32), its
    neighbour 64 gets its challenger measured in a second round, and 32 is searched."""
    from budgetlab.search import transfer
    sp = space(seeds=(0, 1, 2))
    order = [("dpo", 0.5), (SFT_ONLY, 1.0), ("dpo", 0.25), ("dpo", 0.1), ("dpo", 0.0)]
    prior = {("arith", b): {"ranking": order, "band": order[:1], "sd": 0.01} for b in BUDGETS}

    def flat(budget, share, seed):
        return {0.5: 0.8, 1.0: 0.5}.get(share, 0.2) + 0.01 * (seed - 1)
    log = []
    res, _, _ = run_search([sp], measure_with(flat, log), Strategy(), driver=transfer(prior))
    ans = res[("arith", "m")]
    assert len(log) == 1 and len(log[0]) == 2 + 1 + 1 + 1 + 2
    assert {b: a["confirmed_by"] for b, a in ans.items()} == {
        32.0: "points", 64.0: "neighbours", 128.0: "neighbours", 256.0: "neighbours",
        512.0: "points"}
    assert all(a["best"] == ("dpo", 0.5) for a in ans.values())

    def sft_at_32(budget, share, seed):
        return 0.95 if budget == 32.0 and share == 1.0 else flat(budget, share, seed)
    log = []
    res, _, _ = run_search([sp], measure_with(sft_at_32, log), Strategy(), driver=transfer(prior))
    ans = res[("arith", "m")]
    assert log[1] == [sp.request(b, (SFT_ONLY, 1.0), 0) for b in (64.0, 128.0, 256.0)]
    assert ans[32.0]["confirmed"] is False and ans[32.0]["best"] == (SFT_ONLY, 1.0)
    assert all(ans[b]["confirmed"] and ans[b]["confirmed_by"] == "points"
               for b in (64.0, 128.0, 256.0))


def test_transfer_from_a_searched_small_grid_with_one_candidate_at_a_budget():
    """A small grid measured by search can hold one candidate at a budget: the confirmation
    then tests it against another candidate of the grid (the first in grid order, SFT only).
    At 32 that challenger wins and the budget is searched; at 256 and 512, where the best
    moved to dpo 0.25, the challenger does not beat dpo 0.5 and the prior stands: the
    transfer's limit, an optimum that moves to a split the prior does not test."""
    from budgetlab.search import confirmation_points, transfer
    sp = space()
    one = {"ranking": [("dpo", 0.5)], "band": [("dpo", 0.5)]}
    assert confirmation_points(sp.candidates, one) == [("dpo", 0.5), (SFT_ONLY, 1.0)]
    prior = {("arith", b): dict(one) for b in BUDGETS}
    res, _, _ = run_search([sp], measure_with(moving_peak, []), Strategy(),
                           driver=transfer(prior))
    ans = res[("arith", "m")]
    assert ans[32.0]["confirmed"] is False and ans[32.0]["best"] == (SFT_ONLY, 1.0)
    assert all(ans[b]["best"] == ("dpo", 0.5) for b in (64.0, 128.0, 256.0, 512.0))
    assert truth(sp, moving_peak)[256.0] == ("dpo", 0.25)    # the miss, stated
