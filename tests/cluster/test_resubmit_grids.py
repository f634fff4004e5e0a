"""resubmit without a grid: each stage goes with a grid that holds it (its settings)."""

from budgetlab.orchestrate import _by_grid
from budgetlab.graph import build_plan
from budgetlab.ledger import Ledger
from budgetlab.spec import load_spec

from tests.conftest import GOOD_SPEC


def test_stages_grouped_by_their_first_grid_parents_first(tmp_path, write_spec):
    led = Ledger(tmp_path / "l.db")
    a = build_plan(load_spec(write_spec(GOOD_SPEC.replace('name = "t"', 'name = "a"'), "a.toml")))
    b = build_plan(load_spec(write_spec(
        GOOD_SPEC.replace('name = "t"', 'name = "b"').replace("budgets = [64, 256]",
                                                               "budgets = [64, 512]"), "b.toml")))
    led.register(a)
    led.register(b)
    ids = list(dict.fromkeys([*a.stages, *b.stages]))
    groups = _by_grid(led, None, ids)
    assert [g for g, _ in groups] == ["a", "b"]
    seen = {}
    for g, members in groups:
        for s in members:
            assert s not in seen
            seen[s] = g
    assert set(seen) == set(ids)
    assert all(seen[s] == "a" for s in a.stages)       # shared stages go with "a"
    only_b = set(b.stages) - set(a.stages)
    assert only_b and all(seen[s] == "b" for s in only_b)
    for s in ids:                                      # a parent is never in a later group
        parent = (a.stages.get(s) or b.stages[s]).parent_id
        if parent:
            assert seen[parent] <= seen[s]
    assert _by_grid(led, "b", ids) == [("b", ids)]
