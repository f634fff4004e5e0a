"""Run the quickstart grid for real and check the paper's three findings on the CPU toy.

    DS_ACCELERATOR=cpu .venv/bin/python bench/toy_findings.py [jobs/quickstart.toml] \
        [--workdir runs/toy-findings] [--parallel 2]

Stages come from the grid exactly as the CLI builds them (budgetlab.spec + budgetlab.graph);
each job is `python -m budgetlab.worker TRAIN_DIR [EVAL_DIR...]`, parents before children,
`--parallel` jobs at a time with cores/parallel threads each. Then it prints the accuracy table
(mean and per seed), the three findings with the numbers behind them, and
`RESULT toy_findings_hold <0|1>`. Stages whose result.json exists are not run again.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from budgetlab.graph import build_plan
from budgetlab.spec import load_spec
from budgetlab.stagedir import StageDir

ROOT = Path(__file__).resolve().parents[1]


def jobs_of(plan) -> list[list[str]]:
    """[stage ids] per job: a training stage with the evals of its model, or a lone eval."""
    jobs = []
    for sid, st in plan.stages.items():
        if st.kind != "eval":
            jobs.append([sid] + [c.stage_id for c in plan.children(sid) if c.kind == "eval"])
        elif st.parent_id is None:
            jobs.append([sid])
    return jobs


def run_jobs(plan, workdir: Path, parallel: int) -> float:
    start = time.time()
    for sid, st in plan.stages.items():
        parent_kind = plan.stages[st.parent_id].kind if st.parent_id else None
        StageDir.of(workdir, sid).write_spec(st.spec_json(workdir, parent_kind))
    todo = [j for j in jobs_of(plan) if not all(StageDir.of(workdir, s).read_result() for s in j)]
    done = {sid for sid in plan.stages if StageDir.of(workdir, sid).read_result()}
    threads = str(max(1, (os.cpu_count() or 2) // parallel))
    env = dict(os.environ, OMP_NUM_THREADS=threads, DS_ACCELERATOR="cpu")
    running: dict = {}
    while todo or running:
        for job in list(todo):
            parent = plan.stages[job[0]].parent_id
            if len(running) < parallel and (parent is None or parent in done):
                todo.remove(job)
                dirs = [str(StageDir.of(workdir, s).root) for s in job]
                log = open(Path(dirs[0]) / "bench.log", "w")
                running[subprocess.Popen([sys.executable, "-m", "budgetlab.worker", *dirs],
                                         stdout=log, stderr=subprocess.STDOUT, env=env,
                                         cwd=ROOT)] = job
        time.sleep(0.2)
        for proc, job in list(running.items()):
            if proc.poll() is not None:
                del running[proc]
                if proc.returncode != 0:
                    raise SystemExit(f"job {job} failed; see {StageDir.of(workdir, job[0]).root}/bench.log")
                done.update(job)
    return time.time() - start


def table(plan, workdir: Path) -> tuple[dict, float]:
    """{(budget, fraction, method): [score per seed]} and the base model's score."""
    metric = None
    scores: dict = {}
    base = None
    for p in plan.points.values():
        res = StageDir.of(workdir, p.eval_stage_id).read_result()
        metric = res["primary_metric"]
        if p.method == "base":
            base = res["metrics"][metric]
    for c in plan.cells:
        res = StageDir.of(workdir, c.point_id).read_result()
        scores.setdefault((c.budget, c.sft_fraction, c.method), {})[c.seed] = res["metrics"][metric]
    return scores, base


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("grid", nargs="?", default=str(ROOT / "jobs" / "quickstart.toml"))
    ap.add_argument("--workdir", default=str(ROOT / "runs" / "toy-findings"))
    ap.add_argument("--parallel", type=int, default=2)
    args = ap.parse_args()
    spec = load_spec(args.grid)
    plan = build_plan(spec)
    workdir = Path(args.workdir).resolve()
    n_jobs = len(jobs_of(plan))
    print(f"grid {spec.name}: {len(plan.points)} points, {len(plan.stages)} stages, {n_jobs} jobs")
    wall = run_jobs(plan, workdir, args.parallel)
    scores, base = table(plan, workdir)
    seeds = sorted({s for v in scores.values() for s in v})
    mean = {k: statistics.mean(v.values()) for k, v in scores.items()}

    print(f"\nbase model accuracy: {base:.3f}")
    print(f"{'budget':>7} {'sft%':>5} {'method':>6} {'n_sft':>6} {'n_pft':>6} {'mean':>6} "
          + " ".join(f"{'seed' + str(s):>6}" for s in seeds))
    n_of = {(c.budget, c.sft_fraction, c.method): (c.n_sft, c.n_pft) for c in plan.cells}
    for k in sorted(scores, key=lambda k: (k[0], -k[1], k[2])):
        b, f, m = k
        print(f"{b:7.0f} {f * 100:5.0f} {m:>6} {n_of[k][0]:6d} {n_of[k][1]:6d} {mean[k]:6.3f} "
              + " ".join(f"{scores[k][s]:6.3f}" for s in seeds))

    budgets = sorted({k[0] for k in scores})
    methods = sorted({k[2] for k in scores})
    small, large = budgets[0], budgets[-1]
    ok = []
    # 1. At the smallest budget, SFT only (fraction 1.0) is the best split.
    for m in methods:
        best = max((k for k in mean if k[0] == small and k[2] == m), key=mean.get)
        ok.append(best[1] == 1.0)
        print(f"finding 1 ({m}): best split at budget {small:.0f} is {best[1]:.0%} SFT "
              f"({mean[best]:.3f}); SFT only {mean[(small, 1.0, m)]:.3f}")
    # 2. Cold start: preference training on the base model stays near the base model.
    for m in methods:
        cold = [mean[(b, 0.0, m)] for b in budgets if (b, 0.0, m) in mean]
        near = max(cold) <= base + 0.05
        ok.append(near)
        print(f"finding 2 ({m}): {m} on the base model: {', '.join(f'{c:.3f}' for c in cold)} "
              f"vs base {base:.3f} -> {'cold start' if near else 'NO cold start'}")
    # 3. At the largest budget, 10% SFT then PFT clearly beats PFT alone (every seed).
    for m in methods:
        mix, alone = scores[(large, 0.1, m)], scores[(large, 0.0, m)]
        clear = min(mix.values()) > max(alone.values()) and mean[(large, 0.1, m)] - mean[(large, 0.0, m)] >= 0.10
        ok.append(clear)
        print(f"finding 3 ({m}): budget {large:.0f}: 10% SFT + {m} {mean[(large, 0.1, m)]:.3f} "
              f"vs {m} alone {mean[(large, 0.0, m)]:.3f} -> {'holds' if clear else 'does NOT hold'}")
    print(f"wall time {wall:.0f}s for {n_jobs} jobs (--parallel {args.parallel})")
    print(f"RESULT toy_findings_hold {int(all(ok))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
