"""Real processes: the worker entry point as 2 ranks over gloo (ZeRO-2 and ZeRO-3) gives the
same loss curve as 1 process with the same effective batch; the arith task feeds the data."""

import json
import os
import socket
import subprocess
import sys

import pytest

from budgetlab.stagedir import StageDir

pytestmark = pytest.mark.slow

# 1 vs 2 processes differ only in float summation order (how micro-batches are cut and the
# gloo all-reduce); on this tiny fp32 model that moves the loss by ~1e-7..1e-6.
TOL = 1e-5


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_stage(root, kind, model, zero, n):
    stage = StageDir(root)
    stage.write_spec({
        "schema_version": 1, "stage_id": root.name, "kind": kind, "task": "arith",
        "model": model, "init_model": model, "seed": 0, "n": n,
        "params": {"finetune": "full", "max_length": 64, "epochs": 1, "lr": 1e-3,
                   "batch_size": 8, "warmup_ratio": 0.0, "lr_scheduler": "linear",
                   "packing": True, **({"beta": 0.5} if kind != "sft" else {})},
        "data": {"sft": None, "preferences": None, "eval": None}, "parent": None,
        "resources": {"micro_batch_size": 2, "zero_stage": zero, "checkpoint_every": 0,
                      "keep_checkpoints": 1, "nodes": 1}})
    return stage


def run_worker(stages, world):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    port = str(free_port())
    procs = []
    for rank in range(world):
        e = dict(env)
        if world > 1:
            e.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                     MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "budgetlab.worker", *[str(s.root) for s in stages]],
            env=e, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=300)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]


def curve(stage):
    return [json.loads(x)["loss"] for x in (stage.log_dir / "train.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("kind", ["sft", "dpo", "kto"])
def test_two_ranks_zero2_and_zero3_match_one_process(tiny_llama, tmp_path, kind):
    n = 24
    single = write_stage(tmp_path / f"{kind}-1", kind, tiny_llama, 2, n)
    z2 = write_stage(tmp_path / f"{kind}-z2", kind, tiny_llama, 2, n)
    z3 = write_stage(tmp_path / f"{kind}-z3", kind, tiny_llama, 3, n)
    run_worker([single], 1)
    run_worker([z2, z3], 2)  # one job, two stages in order, as a SLURM task would
    base = curve(single)
    assert len(base) == (6 if kind == "kto" else 3)  # KTO: two examples per pair
    for stage, zero in ((z2, 2), (z3, 3)):
        res = stage.read_result()
        assert res["world_size"] == 2 and res["zero_stage"] == zero and res["grad_accum"] == 2
        if kind == "kto":  # the KL reference point is all-reduced: every rank sees the same
            kl = [json.loads(x)["kl"] for x in (stage.log_dir / "train.jsonl").read_text().splitlines()]
            kl1 = [json.loads(x)["kl"] for x in (single.log_dir / "train.jsonl").read_text().splitlines()]
            assert kl == pytest.approx(kl1, rel=1e-5, abs=TOL)
        assert curve(stage) == pytest.approx(base, abs=TOL), f"ZeRO-{zero}"
        assert res["tokens"] == single.read_result()["tokens"]
        assert (stage.model_dir / "model.safetensors").exists()
        assert not stage.checkpoints_dir.exists()
    if kind != "sft":
        assert (single.root / "reference_logps.pt").exists()
    if kind == "dpo":
        assert curve(single)[0] == pytest.approx(0.6931472, abs=1e-6)
        assert (z3.root / "reference_logps.pt").exists()
