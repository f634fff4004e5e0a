"""Re-pricing the paper's GSM8k grid under other SFT:pair cost ratios, without retraining.

    .venv/bin/python bench/reprice.py [--ratios 2,5,10]

The paper's grid (jobs/paper-gsm8k.toml: 2 models x 8 budgets x 7 SFT shares x DPO/KTO)
is registered in a temporary ledger and every stage is marked measured. Then, per cost
ratio (the follow-up paper's 2, 5, 10), `build_report(..., costs=...)` maps each cell to the
point its budget buys at that price. Side by side:

  ours      stages budgetlab still has to run: re-priced points reuse measured points and
            already-trained SFT stages (content ids)
  baseline  stages of a fresh run of the re-priced grid (no reuse across prices), and the
            authors' per-point script (SFT retrained for every point)

Also times the report itself (plan rebuild + ledger reads) on that ledger.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from budgetlab.graph import build_plan  # noqa: E402
from budgetlab.ledger import Ledger  # noqa: E402
from budgetlab.lifecycle import Transition  # noqa: E402
from budgetlab.report import build_report  # noqa: E402
from budgetlab.spec import load_spec  # noqa: E402


def measured_ledger(path: Path, plan) -> Ledger:
    """Every stage of the plan recorded as complete (a score that is the bench's input)."""
    led = Ledger(path)
    led.register(plan)
    with led.write():
        for sid, st in plan.stages.items():
            result = {"stage_id": sid, "kind": st.kind, "metrics": {}}
            if st.kind == "eval":
                result = {**result, "primary_metric": "strict_match",
                          "metrics": {"strict_match": 0.5}}
            aid = led.apply(Transition(sid, "SUBMITTING", "bench", new_attempt={}))
            led.apply(Transition(sid, "COMPLETED", "bench", attempt_id=aid, result=result))
    return led


def per_point_stages(plan) -> int:
    """The authors' script: every point retrains its own SFT, then PFT, then evaluates."""
    pts = {c.point_id for c in plan.cells}
    return sum(sum(1 for s in (p.sft_stage_id, p.pft_stage_id, p.eval_stage_id) if s)
               for p in plan.points.values() if p.point_id in pts)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ratios", default="2,5,10")
    args = ap.parse_args()
    spec = load_spec(ROOT / "jobs" / "paper-gsm8k.toml")
    plan = build_plan(spec)
    with tempfile.TemporaryDirectory() as tmp:
        led = measured_ledger(Path(tmp) / "ledger.db", plan)
        t0 = time.perf_counter()
        build_report(led, spec.name)
        t_report = time.perf_counter() - t0
        print(f"grid {spec.name}: {len(plan.cells)} cells, {len(plan.stages)} stages measured; "
              f"report in {t_report * 1000:.0f} ms")
        print(f"{'sft:pair':>9} {'reused cells':>13} {'ours: stages to run':>20} "
              f"{'fresh grid':>11} {'per-point script':>17} {'fresh/ours':>11} {'reprice ms':>11}")
        ratios = []
        for r in (float(x) for x in args.ratios.split(",")):
            t0 = time.perf_counter()
            rep = build_report(led, spec.name, costs={"sft": r, "pair": 1.0})
            ms = (time.perf_counter() - t0) * 1000
            fresh = build_plan(dataclasses.replace(
                spec, costs={**spec.costs, "sft_example": r, "preference_pair": 1.0}))
            ours = rep.totals["stages_to_run"]
            reused = sum(c["status"] == "COMPLETED" for c in rep.cells)
            ratio = len(fresh.stages) / max(ours, 1)
            ratios.append(ratio)
            print(f"{r:>7g}:1 {reused:>6}/{len(rep.cells):<6} {ours:>20} {len(fresh.stages):>11} "
                  f"{per_point_stages(fresh):>17} {ratio:>10.2f}x {ms:>11.0f}")
        led.close()
    geo = 1.0
    for x in ratios:
        geo *= x
    print(f"RESULT reprice_stage_saving_geomean {geo ** (1 / len(ratios)):.2f}")


if __name__ == "__main__":
    main()
