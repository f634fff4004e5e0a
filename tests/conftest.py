"""Shared fixtures: a tiny valid grid spec and a CLI runner."""

import os
import textwrap
from pathlib import Path

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")

# `make test-lanes` runs the suite as lanes side by side (tests/lanes.sh): BUDGETLAB_TEST_LANE
# selects one. "cluster": the tests that use the local SLURM (marked slurm or fault, or
# asking for a cluster fixture) but the fault campaign; "campaign": the fault campaign
# alone, on a second cluster of its own (it kills nodes and restarts slurmctld); "cpu":
# the rest. Unset: every test, one after the other.
LANES = ("cluster", "campaign", "cpu")
_CLUSTER_FIXTURES = {"slurm_cluster", "slurm", "scli", "two_nodes"}


def lane_of(item) -> str:
    if "tests/faults/test_campaign.py" in item.nodeid.replace(os.sep, "/"):
        return "campaign"
    if item.get_closest_marker("slurm") or item.get_closest_marker("fault") or \
            _CLUSTER_FIXTURES & set(getattr(item, "fixturenames", ())):
        return "cluster"
    return "cpu"


def pytest_collection_modifyitems(config, items):
    lane = os.environ.get("BUDGETLAB_TEST_LANE")
    if not lane:
        return
    if lane not in LANES:
        raise pytest.UsageError(f"BUDGETLAB_TEST_LANE={lane!r}: expected one of {LANES}")
    keep = [i for i in items if lane_of(i) == lane]
    config.hook.pytest_deselected(items=[i for i in items if lane_of(i) != lane])
    items[:] = keep

GOOD_SPEC = """
name = "t"
[grid]
tasks = ["arith"]
models = ["builtin:arith-tiny"]
budgets = [64, 256]
sft_fractions = [1.0, 0.5, 0.0]
methods = ["dpo", "kto"]
seeds = [0, 1]
[costs]
unit = "examples"
sft_example = 1.0
preference_pair = 1.0
[train]
max_length = 128
batch_size = 8
[train.sft]
epochs = 1
lr = 1e-3
[train.dpo]
beta = 0.1
[eval]
limit = 20
max_new_tokens = 16
"""


@pytest.fixture
def write_spec(tmp_path):
    """write_spec(text, name) -> path of a TOML file in a temp dir."""
    def write(text: str = GOOD_SPEC, name: str = "grid.toml") -> Path:
        p = tmp_path / name
        p.write_text(textwrap.dedent(text))
        return p
    return write


@pytest.fixture
def cli(tmp_path, monkeypatch):
    """Run the CLI in-process with a private ledger and workdir: cli(*args) -> result."""
    from click.testing import CliRunner

    from budgetlab.cli import main

    monkeypatch.setenv("BUDGETLAB_LEDGER", str(tmp_path / "ledger.db"))
    monkeypatch.setenv("BUDGETLAB_WORKDIR", str(tmp_path / "runs"))
    runner = CliRunner()

    def run(*args, input=None):
        return runner.invoke(main, [str(a) for a in args], input=input, catch_exceptions=False)
    run.ledger_path = tmp_path / "ledger.db"
    run.workdir = tmp_path / "runs"
    return run


def record_attempt(led, stage_id, outcome, *, executor="local", job_id=None, error=None,
                   result=None, resources=None, job_name="t", **fields):
    """Give a stage an attempt that ends in `outcome` through legal transitions (tests set
    up ledgers this way; every write is checked by budgetlab.lifecycle). Returns its id."""
    from budgetlab.lifecycle import Transition

    new = {"executor": executor, "job_name": job_name, "resources": resources or {"time_min": 5},
           **({"submitter": "elsewhere:1:1"} if job_id is None else {})}
    if outcome == "SUBMITTING":
        new.update(fields)
    aid = led.apply(Transition(stage_id, "SUBMITTING", "test submit", new_attempt=new))
    if job_id is not None:
        led.apply(Transition(stage_id, "PENDING", "test job id", attempt_id=aid,
                             fields={"job_id": job_id, **(fields if outcome == "PENDING" else {})}))
    if outcome not in ("SUBMITTING", "PENDING"):
        led.apply(Transition(stage_id, outcome, "test", attempt_id=aid, error=error,
                             result=result, fields=fields))
    return aid


def block(led, stage_id, why="parent stage did not complete"):
    from budgetlab.lifecycle import Transition
    led.apply(Transition(stage_id, "BLOCKED", "test", error=why))


def preemptor_args() -> list[str]:
    """sbatch options of a job in `urgent` that takes every node of the cluster, so it
    preempts a running batch job whichever node that runs on (clusters of 1 or more nodes)."""
    import subprocess
    rows = [line.split() for line in subprocess.run(
        ["sinfo", "-h", "-p", "urgent", "-o", "%D %c"], capture_output=True, text=True,
        check=True).stdout.splitlines() if line.strip()]
    nodes = sum(int(n) for n, _ in rows)
    cpus = min(int(c.rstrip("+")) for _, c in rows)   # every CPU of each node
    return ["-p", "urgent", "-N", str(nodes), "--ntasks-per-node", "1", "-c", str(cpus)]


def drain_slurm_queue(timeout: float = 60, wait: bool = True) -> int:
    """Cancel whatever a test left on the local test cluster and (wait=True) wait until its
    queue is empty, so that the next test starts on idle nodes (a leftover job holding a node
    makes a later test wait for resources and time out for no fault of its own). Returns how
    many jobs were left. The cluster of slurm/cluster.sh serves the suite alone.
    A SLURM test cancels at its end (wait=False) and waits at its start: a job that stays
    COMPLETING for a while (after a slurmctld restart, ~45 s) then ends while the CPU tests
    between two SLURM tests run."""
    import shutil
    import subprocess
    import time

    if not shutil.which("squeue") or not os.environ.get("SLURM_CONF"):
        return 0
    q = subprocess.run(["squeue", "-h", "-o", "%A"], capture_output=True, text=True, timeout=60)
    left = [j for j in q.stdout.split() if j.strip()]
    if not left:
        return 0
    subprocess.run(["scancel", *left], capture_output=True, timeout=60)
    if not wait:
        return len(left)
    end = time.time() + timeout
    while time.time() < end:
        q = subprocess.run(["squeue", "-h", "-o", "%A"], capture_output=True, text=True,
                           timeout=60)
        if not q.stdout.strip():
            break
        time.sleep(1)
    return len(left)
