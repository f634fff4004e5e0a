"""Measure a grid in full and write its table: scores per seed and the CPU-seconds of every stage.

    DS_ACCELERATOR=cpu nice -n 19 .venv/bin/python bench/toy_study.py jobs/toy-study.toml \
        [--workdir runs/toy-study] [--out bench/data/toy_study.json] [--models builtin:arith-tiny]
    .venv/bin/python bench/toy_study.py --markdown bench/data/toy_study.json   # the table

Stages come from the grid exactly as the CLI builds them (budgetlab.spec + budgetlab.graph), so
their ids are the ids a `budgetlab submit` or `budgetlab search` of the same spec gives. One
process per (model, seed) runs that seed's stages parents first through budgetlab.worker's
run_stages (the code a job runs), one stage at a time, and records each stage's CPU-seconds
(getrusage of the process, all threads, around that stage alone; the imports are paid before
the first stage and counted in no stage) and wall seconds into <workdir>/timings/<id>.json.
One process at a time (`--threads` torch threads). Stages whose result.json exists are not
run again, so an interrupted measurement resumes.

The JSON written (the ground truth of bench/search_replay.py):
  {"grid", "spec", "metric", "models", "budgets", "sft_fractions", "methods", "seeds",
   "costs", "base": {model: score}, "stages": {id: {"kind", "n", "parent", "cpu_seconds",
   "wall_seconds"}}, "cells": [{"task", "model", "budget", "sft_fraction", "method", "n_sft",
   "n_pft", "seeds": {seed: {"score", "point_id", "chain": [stage ids, parents first]}}}]}
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def sub_plan(spec, model: str):
    """The plan of the grid restricted to one model: the same stage ids as the whole grid's."""
    from budgetlab.graph import build_plan
    return build_plan(dataclasses.replace(spec, models=[model]))


def ordered(plan, seed) -> list[str]:
    """Stage ids of one seed (or the base-model evals for seed None), parents before children,
    each training stage followed by the evals of its model."""
    out: list[str] = []

    def visit(sid):
        out.append(sid)
        kids = sorted(plan.children(sid), key=lambda s: (s.kind != "eval", s.n or 0))
        for k in kids:
            visit(k.stage_id)

    roots = [s for s in plan.stages.values() if s.parent_id is None]
    if seed is None:
        return [s.stage_id for s in roots if s.kind == "eval"]
    for s in sorted((r for r in roots if r.kind != "eval" and r.seed == seed),
                    key=lambda s: (s.kind, s.n or 0)):
        visit(s.stage_id)
    return out


def execute(dirs: list[str], timings: Path) -> int:
    """In the job process: run each stage alone and record its CPU-seconds."""
    from budgetlab import worker
    import budgetlab.evaluate  # noqa: F401  the imports are paid before the first stage
    import budgetlab.train  # noqa: F401

    worker.prepare_process(dirs)
    failed = 0
    for d in dirs:
        sid = Path(d).name
        if (Path(d) / "result.json").exists():
            continue
        r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.time()
        try:
            worker.run_stages([d])
        except Exception as exc:  # its children fail at once; the rest of the seed goes on
            print(f"stage {sid} failed: {exc}", file=sys.stderr, flush=True)
            failed += 1
            continue
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
        (timings / f"{sid}.json").write_text(json.dumps(
            {"cpu_seconds": round(cpu, 3), "wall_seconds": round(time.time() - t0, 3)}))
        worker.free_training_memory()
        print(f"{time.strftime('%H:%M:%S')} stage {sid} done: {cpu:.1f} CPU-s", flush=True)
    return 1 if failed else 0


def measure(plan, workdir: Path, threads: int, only_seeds=None) -> None:
    from budgetlab.stagedir import StageDir

    for sid, st in plan.stages.items():
        parent_kind = plan.stages[st.parent_id].kind if st.parent_id else None
        sd = StageDir.of(workdir, sid)
        if not sd.spec_path.exists():
            sd.write_spec(st.spec_json(workdir, parent_kind))
    timings = workdir / "timings"
    timings.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), DS_ACCELERATOR="cpu")
    seeds = sorted({s.seed for s in plan.stages.values() if s.kind != "eval"})
    for seed in [None, *seeds]:
        if only_seeds is not None and seed not in only_seeds:
            continue
        ids = ordered(plan, seed)
        todo = [str(StageDir.of(workdir, s).root) for s in ids
                if not (StageDir.of(workdir, s).root / "result.json").exists()]
        if not todo:
            continue
        print(f"{time.strftime('%H:%M:%S')} seed {seed}: {len(todo)} stages", flush=True)
        subprocess.run([sys.executable, __file__, "--exec", str(timings), *todo], env=env,
                       cwd=ROOT, check=False)


def collect(spec, plans: dict, workdir: Path) -> dict:
    from budgetlab.stagedir import StageDir

    stages, cells, base, metric = {}, {}, {}, None
    for model, plan in plans.items():
        for sid, st in plan.stages.items():
            t = workdir / "timings" / f"{sid}.json"
            t = json.loads(t.read_text()) if t.exists() else {}
            stages[sid] = {"kind": st.kind, "n": st.n, "parent": st.parent_id,
                           "cpu_seconds": t.get("cpu_seconds"),
                           "wall_seconds": t.get("wall_seconds")}
        for p in plan.points.values():
            if p.method == "base":
                res = StageDir.of(workdir, p.eval_stage_id).read_result()
                metric = res["primary_metric"]
                base[model] = res["metrics"][metric]
        for c in plan.cells:
            res = StageDir.of(workdir, c.point_id).read_result()
            metric = metric or (res or {}).get("primary_metric")
            p = plan.points[c.point_id]
            key = (c.task, model, c.budget, c.sft_fraction, c.method)
            cell = cells.setdefault(key, {"task": c.task, "model": model, "budget": c.budget,
                                          "sft_fraction": c.sft_fraction, "method": c.method,
                                          "n_sft": c.n_sft, "n_pft": c.n_pft, "seeds": {}})
            cell["seeds"][str(c.seed)] = {
                "score": res["metrics"][res["primary_metric"]] if res else None,
                "point_id": c.point_id,
                "chain": [s for s in (p.sft_stage_id, p.pft_stage_id, p.eval_stage_id) if s]}
    return {"grid": spec.name, "spec": str(Path(spec.path).relative_to(ROOT))
            if Path(spec.path).resolve().is_relative_to(ROOT) else str(spec.path),
            "metric": metric, "tasks": list(spec.tasks), "models": list(plans), "budgets": list(spec.budgets),
            "sft_fractions": list(spec.sft_fractions), "methods": list(spec.methods),
            "seeds": list(spec.seeds),
            "costs": {"sft": spec.costs["sft_example"], "pair": spec.costs["preference_pair"]},
            "base": base, "stages": stages, "cells": list(cells.values())}


def merge(old: dict, new: dict) -> dict:
    """`new` with what `old` measured where `new` has nothing (same spec: same stage ids)."""
    for sid, st in old["stages"].items():
        if new["stages"].get(sid, {}).get("cpu_seconds") is None:
            new["stages"][sid] = st
    cells = {(c["task"], c["model"], c["budget"], c["sft_fraction"], c["method"]): c
             for c in new["cells"]}
    for c in old["cells"]:
        key = (c["task"], c["model"], c["budget"], c["sft_fraction"], c["method"])
        if key not in cells:
            cells[key] = c
            continue
        for seed, v in c["seeds"].items():
            mine = cells[key]["seeds"].get(seed)
            if mine is None or mine.get("score") is None:
                cells[key]["seeds"][seed] = v
    new["cells"] = list(cells.values())
    new["models"] = list(dict.fromkeys(old["models"] + new["models"]))
    new["base"] = {**old.get("base", {}), **new["base"]}
    return new


def markdown(data: dict) -> str:
    """The table of bench/RESULTS.md: per model, budget and share, mean and per-seed scores,
    the CPU-seconds of the cell's stages (per seed, summed) and the best share per budget."""
    out = []
    cost = {s: v["cpu_seconds"] or 0.0 for s, v in data["stages"].items()}
    # (a stage not measured yet counts 0 CPU-seconds in the sums below)
    for model in data["models"]:
        cells = [c for c in data["cells"] if c["model"] == model]
        base = data["base"].get(model)
        out.append(f"\n{model} (base model {'-' if base is None else f'{base:.3f}'})\n")
        out.append("| budget | SFT share | n_sft+n_pairs | mean | " +
                   " | ".join(f"seed {s}" for s in data["seeds"]) + " | CPU-s (seeds run) |")
        out.append("|---:|---:|---:|---:|" + "---:|" * len(data["seeds"]) + "---:|")
        for b in data["budgets"]:
            row = sorted((c for c in cells if c["budget"] == b), key=lambda c: -c["sft_fraction"])
            # mean over the seeds measured in every cell of the model (a --partial table)
            full = [s for s in data["seeds"] if all(c["seeds"][str(s)]["score"] is not None
                                                    for c in cells)]
            means = {c["sft_fraction"]: (sum(c["seeds"][str(s)]["score"] for s in full) /
                                         len(full) if full else float("nan")) for c in row}
            top = max(means.values())
            for c in row:
                m = means[c["sft_fraction"]]
                cpu = sum(cost[s] or 0.0 for v in c["seeds"].values() for s in v["chain"])
                mark = f"**{m:.3f}**" if abs(m - top) < 1e-9 else f"{m:.3f}"
                out.append(f"| {b:g} | {c['sft_fraction']:g} | {c['n_sft']}+{c['n_pft']} | "
                           f"{mark} | " + " | ".join(
                               "-" if c["seeds"][str(s)]["score"] is None else
                               f"{c['seeds'][str(s)]['score']:.3f}" for s in data["seeds"])
                           + f" | {cpu:.0f} |")
    per = {m: {s for c in data["cells"] if c["model"] == m for v in c["seeds"].values()
               for s in v["chain"]} for m in data["models"]}
    out.append("\nCPU-seconds of every stage of the cells (shared stages once): " + ", ".join(
        f"{m} {sum(cost[s] for s in ids):.0f} ({len(ids)} stages)" for m, ids in per.items()))
    return "\n".join(out)


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--markdown":
        print(markdown(json.loads(Path(sys.argv[2]).read_text())))
        return 0
    if len(sys.argv) > 1 and sys.argv[1] == "--exec":
        return execute(sys.argv[3:], Path(sys.argv[2]))
    ap = argparse.ArgumentParser()
    ap.add_argument("grid", nargs="?", default=str(ROOT / "jobs" / "toy-study.toml"))
    ap.add_argument("--workdir", default=str(ROOT / "runs" / "toy-study"))
    ap.add_argument("--out", default=str(ROOT / "bench" / "data" / "toy_study.json"))
    ap.add_argument("--models", nargs="*", help="Measure only these (default: all).")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--collect-only", action="store_true")
    ap.add_argument("--seeds", nargs="*", type=int,
                    help="Measure only these seeds (the base-model evals too) and merge into "
                         "--out: what it already holds for other stages is kept.")
    ap.add_argument("--partial", action="store_true",
                    help="Also write models measured in part (missing scores are null).")
    args = ap.parse_args()
    from budgetlab.spec import load_spec

    spec = load_spec(args.grid)
    workdir = Path(args.workdir).resolve()
    plans = {m: sub_plan(spec, m) for m in spec.models}
    start = time.time()
    if not args.collect_only:
        for m in args.models or spec.models:
            t0 = time.time()
            print(f"{time.strftime('%H:%M:%S')} {m}: {len(plans[m].stages)} stages", flush=True)
            measure(plans[m], workdir, args.threads,
                    None if args.seeds is None else {None, *args.seeds})
            print(f"{time.strftime('%H:%M:%S')} {m}: measured in {time.time() - t0:.0f}s wall",
                  flush=True)
    done = [m for m in plans if all((workdir / "stages" / s / "result.json").exists()
                                    for s in plans[m].stages)]
    if args.partial:
        done = [m for m in plans if m in done or any(
            (workdir / "stages" / s / "result.json").exists() for s in plans[m].stages)]
    if args.seeds is not None:   # a model is done when the old table and this run cover it
        done = [m for m in plans if m in done or any(
            (workdir / "stages" / s / "result.json").exists() for s in plans[m].stages)]
    out = collect(spec, {m: plans[m] for m in done}, workdir)
    if args.seeds is not None and Path(args.out).exists():
        out = merge(json.loads(Path(args.out).read_text()), out)
    out["wall_seconds_this_run"] = round(time.time() - start)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}: models {', '.join(done) or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
