"""Several nodes for real: stages of 2 nodes x 2 ranks on the 2-node local SLURM
(`BUDGETLAB_SLURM_NODES=2 bash slurm/cluster.sh up`) against the same stage in 1 process."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from budgetlab.graph import build_plan
from budgetlab.ledger import Ledger
from budgetlab.orchestrate import submit, wait
from budgetlab.spec import load_spec
from budgetlab.stagedir import StageDir

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

# 4 ranks vs 1 process differ only in float summation order (micro-batches, gloo all-reduce).
TOL = 1e-6


def up_nodes() -> list[str]:
    """Nodes of the cluster that can run jobs now."""
    p = subprocess.run(["sinfo", "-h", "-N", "-t", "idle,mix,alloc", "-o", "%N"],
                       capture_output=True, text=True, timeout=30)
    return sorted(set(p.stdout.split()))


@pytest.fixture
def two_nodes(slurm_cluster):
    nodes = up_nodes()
    if len(nodes) < 2:
        pytest.skip(f"needs a 2-node cluster (BUDGETLAB_SLURM_NODES=2 bash slurm/cluster.sh "
                    f"up); nodes up: {nodes}")
    return nodes


def multinode_grid(path, model, *, name, fractions=(1.0, 0.0), nodes=2, tasks=2, epochs=1,
                   checkpoint_every=50, time_min=10, max_requeues=3, methods=("dpo",),
                   zero: dict | None = None):
    per_kind = "".join(f"[resources.{kind}]\nzero_stage = {z}\n"
                       for kind, z in (zero or {}).items())
    path.write_text(f"""\
name = "{name}"
[grid]
tasks = ["arith"]
models = ["{model}"]
budgets = [16]
sft_fractions = {list(fractions)}
methods = {json.dumps(list(methods))}
seeds = [0]
[train]
epochs = {epochs}
batch_size = 4
max_length = 64
lr = 1e-3
warmup_ratio = 0.0
[eval]
limit = 4
max_new_tokens = 4
batch_size = 4
baseline = false
[resources]
nodes = {nodes}
tasks_per_node = {tasks}
micro_batch_size = 1
cpus_per_task = 1
mem_gb = 1
time_min = {time_min}
checkpoint_every = {checkpoint_every}
max_requeues = {max_requeues}
{per_kind}""")
    return path


def curve(stage: StageDir) -> list[float]:
    return [json.loads(x)["loss"] for x in (stage.log_dir / "train.jsonl").read_text().splitlines()]


_REFERENCES: dict[str, StageDir] = {}


def run_one_process(spec_path, root) -> StageDir:
    """The same stage spec in one process without ZeRO (no SLURM): the reference curve.
    ZeRO settings are not part of a stage's id; one reference serves every ZeRO stage."""
    spec = json.loads(spec_path.read_text())
    if spec["stage_id"] in _REFERENCES:
        return _REFERENCES[spec["stage_id"]]
    stage = StageDir(root)
    spec["resources"] = dict(spec["resources"], nodes=1, tasks_per_node=1, zero_stage=0)
    stage.write_spec(spec)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SUBMITIT_"))
           and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-m", "budgetlab.worker", str(stage.root)], env=env,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    _REFERENCES[spec["stage_id"]] = stage
    return stage


@pytest.mark.parametrize("zero", [{"sft": 3, "dpo": 2, "kto": 3}, {"sft": 2, "dpo": 3, "kto": 2}],
                         ids=["sft3-dpo2-kto3", "sft2-dpo3-kto2"])
def test_two_nodes_two_ranks_match_one_process(tmp_path, tiny_model, two_nodes, zero):
    """SFT, DPO and KTO stages on 2 nodes x 2 ranks, each under ZeRO-2 and ZeRO-3 (the two
    parametrizations): ranks 0-1 on one node, 2-3 on the other, the rendezvous at the first
    host of the node list; each loss curve equals 1 process's without ZeRO within 1e-6, and
    only rank 0 wrote the result."""
    plan = build_plan(load_spec(multinode_grid(tmp_path / "g.toml", tiny_model, name="mn",
                                               methods=("dpo", "kto"), zero=zero)))
    led, wd = Ledger(tmp_path / "ledger.db"), tmp_path / "runs"
    submit(led, plan, wd, executor="slurm")
    wait(led, wd, "mn", poll_s=3, timeout_s=900)
    bad = {s.stage_id: (s.state, s.error) for s in led.stages(grid="mn") if s.state != "COMPLETED"}
    assert not bad, bad
    trained = [s for s in led.stages(grid="mn") if s.kind != "eval"]
    assert sorted(s.kind for s in trained) == ["dpo", "kto", "sft"]
    for s in trained:
        stage = StageDir.of(wd, s.stage_id)
        assert s.result["world_size"] == 4
        assert json.loads(stage.spec_path.read_text())["resources"]["zero_stage"] == zero[s.kind]
        att = led.latest_attempt(s.stage_id)
        assert att.nodes == "n[1-2]", att.nodes          # sacct: the job held both nodes
        # submitit wrote one log per task (2 per node).
        logs = sorted((wd / "submitit").glob(f"{att.job_id}_*_log.out"))
        assert len(logs) == 4, logs
        ref = run_one_process(stage.spec_path, tmp_path / f"ref-{s.kind}")
        assert len(curve(stage)) == len(curve(ref)) > 0
        assert curve(stage) == pytest.approx(curve(ref), abs=TOL), s.kind
        assert s.result["tokens"] == ref.read_result()["tokens"]
