"""Start-up cost of a stage process: the real job entry (budgetlab.backends.job) on a tiny
SFT stage of a few steps, so import and set-up dominate, as they do for the suite's and the
campaign's short stages and for every rank of a real job before its first step.

Ours: the worker as it is (it turns TorchDynamo off: nothing in our recipes compiles).
Baseline: the same process with TORCHDYNAMO_DISABLE=0, where DeepSpeed's ZeRO optimizer check
imports its Muon kernels and their torch.compile decorators load inductor.
Runs alternate (ours, baseline, ours, ...) so machine noise hits both alike.

    DS_ACCELERATOR=cpu .venv/bin/python bench/stage_startup.py --runs 5
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def make_stage(root: Path) -> Path:
    from budgetlab.graph import build_plan
    from budgetlab.spec import load_spec
    from budgetlab.stagedir import StageDir
    from budgetlab.train.tiny import make_llama
    from tests.cluster.conftest import write_grid

    model = make_llama(root / "tiny", hidden=32, layers=1, heads=2)
    plan = build_plan(load_spec(write_grid(root / "g.toml", model, budgets=(16,),
                                           fractions=(1.0,), epochs=1)))
    sft = next(s for s in plan.stages.values() if s.kind == "sft")
    stage = StageDir.of(root / "runs", sft.stage_id)
    stage.write_spec(sft.spec_json(root / "runs"))
    return stage.root


def run_once(stage: Path, env: dict) -> tuple[float, float]:
    """(wall s, CPU s) of one job process on a fresh copy of the stage."""
    for p in stage.iterdir():
        if p.name != "spec.json":
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "budgetlab.backends.job", str(stage)], env=env,
                   check=True, capture_output=True, timeout=600)
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if not (stage / "result.json").exists():
        raise SystemExit(f"{stage}: the stage wrote no result.json")
    return wall, cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5, help="runs of each (default 5)")
    args = ap.parse_args()
    base = {k: v for k, v in os.environ.items() if k != "TORCHDYNAMO_DISABLE"}
    base.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    envs = {"ours": base, "baseline": {**base, "TORCHDYNAMO_DISABLE": "0"}}
    with tempfile.TemporaryDirectory() as tmp:
        stage = make_stage(Path(tmp))
        run_once(stage, envs["ours"])          # warm the page cache for both
        got = {name: [] for name in envs}
        for _ in range(args.runs):
            for name, env in envs.items():
                got[name].append(run_once(stage, env))
    print(f"{'':10} {'wall s (median)':>16} {'CPU s (median)':>15}")
    med = {}
    for name, rows in got.items():
        med[name] = (statistics.median(w for w, _ in rows), statistics.median(c for _, c in rows))
        print(f"{name:10} {med[name][0]:16.2f} {med[name][1]:15.2f}")
    print(f"RESULT stage_startup_cpu_baseline_over_ours {med['baseline'][1] / med['ours'][1]:.2f}")


if __name__ == "__main__":
    main()
