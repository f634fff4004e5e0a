"""How a budget buys examples (DESIGN section 1)."""

from __future__ import annotations

import math

# Guards against 0.1 * 1000 / 1.0 = 99.99999999999999 buying 99 instead of 100.
_EPS = 1e-9


def allocate(budget: float, sft_fraction: float, sft_cost: float, pair_cost: float) -> tuple[int, int]:
    """(n_sft, n_pft): SFT demonstrations and preference pairs that the budget buys."""
    n_sft = math.floor(sft_fraction * budget / sft_cost + _EPS)
    n_pft = math.floor((1.0 - sft_fraction) * budget / pair_cost + _EPS)
    return n_sft, n_pft


def annotation_cost(n_sft: int, n_pft: int, sft_cost: float, pair_cost: float) -> float:
    """What the examples actually bought cost (never more than the budget)."""
    return n_sft * sft_cost + n_pft * pair_cost
