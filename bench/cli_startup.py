"""CPU of one `budgetlab status` on a registered grid (the quickstart's), the command a user
and a sweep's watcher run most.

Ours: the CLI as it is (the ledger imports sqlite_utils without pandas and numpy).
Baseline: the same command in a process that has imported pandas and numpy first, so that
sqlite_utils picks them up, as it did before (datasets installs both).
Runs alternate (ours, baseline, ours, ...) so machine noise hits both alike.

    .venv/bin/python bench/cli_startup.py --runs 10
"""

from __future__ import annotations

import argparse
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MAIN = "import sys; from budgetlab.cli import main; sys.argv[0] = 'budgetlab'; sys.exit(main())"
PRELOAD = "import pandas, numpy; " + MAIN


def cpu_of(argv: list[str]) -> float:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run(argv, check=True, capture_output=True, timeout=120)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=10, help="runs of each (default 10)")
    args = ap.parse_args()
    from budgetlab.api import load_plan
    from budgetlab.ledger import Ledger
    with tempfile.TemporaryDirectory() as tmp:
        ledger = Path(tmp) / "ledger.db"
        Ledger(ledger).register(load_plan(REPO / "jobs" / "quickstart.toml"))
        cmd = ["--ledger", str(ledger), "--workdir", str(Path(tmp) / "runs"), "status",
               "quickstart"]
        runs = {"ours": [sys.executable, "-c", MAIN, *cmd],
                "baseline": [sys.executable, "-c", PRELOAD, *cmd]}
        cpu_of(runs["ours"])                     # warm the page cache for both
        got = {name: [] for name in runs}
        for _ in range(args.runs):
            for name, argv in runs.items():
                got[name].append(cpu_of(argv))
    med = {name: statistics.median(v) for name, v in got.items()}
    print(f"{'':10} {'CPU s (median)':>15}")
    for name, v in med.items():
        print(f"{name:10} {v:15.3f}")
    print(f"RESULT cli_status_cpu_baseline_over_ours {med['baseline'] / med['ours']:.2f}")


if __name__ == "__main__":
    main()
