"""Allocation arithmetic (DESIGN section 1), by property."""

import math
from fractions import Fraction

from hypothesis import given
from hypothesis import strategies as st

from budgetlab.alloc import allocate, annotation_cost

budgets = st.floats(min_value=0.01, max_value=1e7, allow_nan=False)
fractions = st.floats(min_value=0.0, max_value=1.0)
costs = st.floats(min_value=1e-4, max_value=1e3)


@given(budgets, fractions, costs, costs)
def test_spend_never_exceeds_budget(budget, f, c_sft, c_pair):
    n_sft, n_pft = allocate(budget, f, c_sft, c_pair)
    # the most whole examples each share buys, in exact rational arithmetic (a second path);
    # allocate may round up only where the exact count is within float error of an integer
    for n, share, cost in ((n_sft, Fraction(f), c_sft), (n_pft, 1 - Fraction(f), c_pair)):
        exact = share * Fraction(budget) / Fraction(cost)
        assert math.floor(exact * (1 - Fraction(1, 10**12))) <= n <= math.floor(
            exact * (1 + Fraction(1, 10**12)) + Fraction(1, 10**9)), (n, float(exact))
    assert annotation_cost(n_sft, n_pft, c_sft, c_pair) <= budget * (1 + 1e-9)


@given(budgets, costs, costs)
def test_fraction_one_buys_no_pairs_and_zero_buys_no_sft(budget, c_sft, c_pair):
    assert allocate(budget, 1.0, c_sft, c_pair)[1] == 0
    assert allocate(budget, 0.0, c_sft, c_pair)[0] == 0


@given(st.integers(1, 100000), st.sampled_from([0.01, 0.1, 0.25, 0.5, 0.75]))
def test_equal_unit_costs_buy_whole_shares(budget, f):
    n_sft, n_pft = allocate(budget, f, 1.0, 1.0)
    assert n_sft == int(f * budget + 1e-6)   # 0.1 * 1000 is 100, not 99
    assert n_sft + n_pft in (budget, budget - 1)


def test_usd_costs():
    # $10 buys SFT at $0.01 and pairs at $0.001: 30% -> 300 demos, 70% -> 7000 pairs.
    assert allocate(10.0, 0.3, 0.01, 0.001) == (300, 7000)
