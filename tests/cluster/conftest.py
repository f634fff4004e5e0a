"""Fixtures for the cluster tests: a tiny random Llama (built locally, no hub), grid files,
and the local SLURM from slurm/cluster.sh (tests marked `slurm` skip when it is not up)."""

from __future__ import annotations

import os
import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    from budgetlab.train.tiny import make_llama
    return make_llama(tmp_path_factory.mktemp("model") / "tiny", hidden=32, layers=1, heads=2)


def write_grid(path: Path, model: str, *, name="g", budgets=(16,), fractions=(1.0, 0.5),
               methods=("dpo",), seeds=(0,), epochs=1, tasks_per_node=1, time_min=5,
               checkpoint_every=50, extra="") -> Path:
    path.write_text(textwrap.dedent(f"""\
        name = "{name}"
        [grid]
        tasks = ["arith"]
        models = ["{model}"]
        budgets = {list(budgets)}
        sft_fractions = {list(fractions)}
        methods = {list(methods)!r}
        seeds = {list(seeds)}
        [train]
        epochs = {epochs}
        batch_size = 4
        max_length = 64
        [eval]
        limit = 8
        max_new_tokens = 8
        batch_size = 8
        baseline = false
        [resources]
        time_min = {time_min}
        mem_gb = 1
        cpus_per_task = 1
        tasks_per_node = {tasks_per_node}
        micro_batch_size = {4 // tasks_per_node}
        checkpoint_every = {checkpoint_every}
        """).replace("'", '"') + extra)
    return path


@pytest.fixture
def grid_file():
    return write_grid


def _cluster_up() -> bool:
    if not shutil.which("sinfo") or not os.environ.get("SLURM_CONF"):
        return False
    p = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=30)
    return p.returncode == 0 and bool(p.stdout.strip())


@pytest.fixture(scope="session")
def slurm_cluster():
    """The cluster of `bash slurm/cluster.sh up` (make test starts it and exports SLURM_CONF)."""
    if not _cluster_up():
        pytest.skip("no local SLURM: run `bash slurm/cluster.sh up` and "
                    "`eval \"$(bash slurm/cluster.sh env)\"` (make test does both)")
    return os.environ["SLURM_CONF"]


@pytest.fixture(autouse=True)
def _idle_cluster(request):
    """Each SLURM test starts on an idle cluster and cancels what it left."""
    from tests.conftest import drain_slurm_queue

    slurm = "slurm_cluster" in request.fixturenames
    if slurm:
        drain_slurm_queue()
    yield
    if slurm:
        drain_slurm_queue(wait=False)


@pytest.fixture(autouse=True)
def _cpu_env(monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")


@pytest.fixture(scope="session")
def step_seconds(tmp_path_factory, tiny_model) -> float:
    """Seconds per optimizer step of the tiny model on this machine right now (the real
    worker on a 200-step SFT stage), so tests that must still be training when a signal
    lands size their stages in seconds, not steps."""
    import json
    import sys

    from budgetlab.graph import build_plan
    from budgetlab.spec import load_spec
    from budgetlab.stagedir import StageDir

    tmp = tmp_path_factory.mktemp("calibrate")
    plan = build_plan(load_spec(write_grid(tmp / "g.toml", tiny_model, budgets=(16,),
                                           fractions=(1.0,), epochs=50)))
    sft = next(s for s in plan.stages.values() if s.kind == "sft")
    stage = StageDir.of(tmp / "runs", sft.stage_id)
    stage.write_spec(sft.spec_json(tmp / "runs"))
    subprocess.run([sys.executable, "-m", "budgetlab.backends.job", str(stage.root)],
                   check=True, capture_output=True, timeout=600,
                   env={**os.environ, "DS_ACCELERATOR": "cpu"})
    res = json.loads(stage.result_path.read_text())
    # 200 steps, so start-up costs do not inflate the estimate; no high floor: on an idle
    # machine a tiny-model step takes a few ms, and an over-estimate makes stages that
    # must outlast a time limit finish before it.
    return max(0.001, float(res["train_seconds"]) / max(1, int(res["steps"])))


@pytest.fixture(scope="session")
def epochs_for(step_seconds):
    """epochs_for(seconds): epochs of a 16-example stage (4 steps each) lasting that long."""
    return lambda seconds: max(2, int(seconds / step_seconds / 4) + 1)
