"""Plan and register grids of 1k, 10k and 100k cells into fresh ledgers.

    .venv/bin/python bench/plan_scale.py

Prints the time of each (parse + stage graph + ledger registration) and the 100k/1k ratio;
linear scaling gives a ratio near 100. Last line: RESULT plan_register_100k_over_1k <ratio>.
"""

import tempfile
import time
from pathlib import Path

from budgetlab.graph import build_plan
from budgetlab.ledger import Ledger
from budgetlab.spec import load_spec

SPEC = """
name = "scale-{cells}"
[grid]
tasks = ["gsm8k"]
models = [{models}]
budgets = [{budgets}]
sft_fractions = [0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45,
                 0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 1.0]
methods = ["dpo", "kto"]
seeds = [0, 1, 2, 3, 4]
"""


def spec_text(cells: int) -> str:
    # 20 fractions x 2 methods x 5 seeds = 200 cells per (model, budget)
    per_model_budget = 200
    n_models = max(1, cells // (per_model_budget * 50))
    n_budgets = cells // (per_model_budget * n_models)
    models = ", ".join(f'"org/model-{i}"' for i in range(n_models))
    budgets = ", ".join(str(1000 + 100 * i) for i in range(n_budgets))
    return SPEC.format(cells=cells, models=models, budgets=budgets)


def run(cells: int, tmp: Path) -> tuple[float, int]:
    path = tmp / f"grid-{cells}.toml"
    path.write_text(spec_text(cells))
    t0 = time.perf_counter()
    plan = build_plan(load_spec(path))
    led = Ledger(tmp / f"ledger-{cells}.db")
    led.register(plan)
    elapsed = time.perf_counter() - t0
    led.close()
    assert len(plan.cells) == cells, (len(plan.cells), cells)
    return elapsed, len(plan.stages)


def main() -> None:
    times = {}
    with tempfile.TemporaryDirectory() as d:
        for cells in (1_000, 10_000, 100_000):
            t, stages = run(cells, Path(d))
            times[cells] = t
            print(f"{cells:>7} cells  {stages:>7} stages  {t:8.2f} s")
    ratio = times[100_000] / times[1_000]
    print(f"100k cells registered in {times[100_000]:.1f} s (target < 30 s); "
          f"100k/1k ratio {ratio:.0f} (linear ~ 100, target <= 150)")
    print(f"RESULT plan_register_100k_over_1k {ratio:.1f}")


if __name__ == "__main__":
    main()
