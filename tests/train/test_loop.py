"""The training loop in one process: export, LoRA, reference caching, resume, KTO, errors."""

import json
import math
import os
import random
import signal

import pytest
import torch

from budgetlab import dist, models
from budgetlab.stagedir import StageDir
from budgetlab.train import checkpoint, loop
from budgetlab.train.config import TrainConfig

ENV = dist.from_environment({})


def sft_rows(n=24, seed=0):
    rng = random.Random(seed)
    return [{"prompt": f"Q: {a}+{b}=", "response": f"{a + b}" + " ok" * rng.randint(0, 12)}
            for a, b in ((rng.randint(0, 50), rng.randint(0, 50)) for _ in range(n))]


def pair_rows(n=16):
    return [{"prompt": f"Q: {a}+{a % 7}=", "chosen": f"{a + a % 7}", "rejected": f"{a - 1} no"}
            for a in range(n)]


def config(kind, **kw):
    params = {"epochs": 2, "batch_size": 8, "lr": 1e-3, "max_length": 48, "warmup_ratio": 0.0}
    res = {"micro_batch_size": 4, "zero_stage": 2, "checkpoint_every": 0}
    for k, v in kw.items():
        (res if k in res else params)[k] = v
    return TrainConfig.from_spec({"kind": kind, "seed": 0, "params": params, "resources": res})


def train(tmp_path, name, kind, rows, model, **kw):
    stage = StageDir(tmp_path / name)
    on_step = kw.pop("on_step", None)
    result = loop.run(stage, config(kind, **kw), rows, ENV, model, on_step=on_step)
    return stage, result


def curve(stage):
    return [json.loads(line)["loss"] for line in (stage.log_dir / "train.jsonl").read_text().splitlines()]


def test_sft_exports_a_loadable_model_and_counts_truncation(tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM

    rows = sft_rows() + [{"prompt": "Q: long", "response": "x" * 100}]
    stage, res = train(tmp_path, "sft", "sft", rows, tiny_llama)
    assert res["examples_truncated"] == 1 and res["examples_dropped"] == 0
    assert res["pad_token_from_eos"] is True
    assert res["steps"] == 2 * math.ceil(25 / 8) and len(curve(stage)) == res["steps"]
    assert curve(stage)[-1] < curve(stage)[0]
    assert res["tokens"] > 0 and res["peak_memory_bytes"] > 0 and "deepspeed" in res["versions"]
    assert stage.read_progress()["step"] == res["steps"]
    m = AutoModelForCausalLM.from_pretrained(stage.model_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama)
    assert not torch.equal(m.model.embed_tokens.weight, base.model.embed_tokens.weight)
    assert models.load_tokenizer(stage.model_dir).eos_token == "</s>"


def test_zero3_export_gathers_the_same_weights_as_zero2(tiny_llama, tmp_path):
    from safetensors.torch import load_file

    s2, _ = train(tmp_path, "z2", "sft", sft_rows(16), tiny_llama, zero_stage=2, epochs=1)
    s3, _ = train(tmp_path, "z3", "sft", sft_rows(16), tiny_llama, zero_stage=3, epochs=1)
    w2, w3 = (load_file(s.model_dir / "model.safetensors") for s in (s2, s3))
    assert w2.keys() == w3.keys() and all(w3[k].numel() > 0 for k in w3)
    # Same training, different partitioning: reductions run in another order, and Adam's
    # normalised update turns a 1e-7 gradient difference on a near-zero gradient into up to
    # lr (5e-5) per step. A missing gather would be off by the weights themselves (~2e-2).
    diff = max((w2[k] - w3[k]).abs().max().item() for k in w2)
    assert diff <= 5e-4, diff


@pytest.mark.parametrize("zero", [2, 3])
def test_lora_exports_merged_weights_equal_to_base_plus_adapter(tiny_llama, tmp_path, zero):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    stage, res = train(tmp_path, "lora", "sft", sft_rows(), tiny_llama, finetune="lora",
                       lora_r=4, lora_alpha=8, lr=1e-2, zero_stage=zero)
    info = json.loads((stage.model_dir / "budgetlab.json").read_text())
    assert info["finetune"] == "lora" and info["lora"]["merged"] is True
    merged = AutoModelForCausalLM.from_pretrained(stage.model_dir).eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_llama)
    with_adapter = PeftModel.from_pretrained(base, stage.model_dir / "adapter").eval()
    x = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        a, b = merged(input_ids=x).logits, with_adapter(input_ids=x).logits
        plain = AutoModelForCausalLM.from_pretrained(tiny_llama)(input_ids=x).logits
    assert torch.allclose(a, b, atol=1e-5) and not torch.allclose(a, plain, atol=1e-3)


def test_dpo_reference_precomputed_equals_online_reference(tiny_llama, tmp_path):
    s1, r1 = train(tmp_path, "pre", "dpo", pair_rows(), tiny_llama, beta=0.5, lr=1e-3)
    s2, r2 = train(tmp_path, "online", "dpo", pair_rows(), tiny_llama, beta=0.5, lr=1e-3,
                   reference="online")
    assert (s1.root / "reference_logps.pt").exists() and not (s2.root / "reference_logps.pt").exists()
    assert curve(s1)[0] == pytest.approx(math.log(2), abs=1e-6)  # policy == reference at step 1
    assert curve(s1) == pytest.approx(curve(s2), abs=1e-5)
    assert 0 <= r1["metrics"]["reward_accuracy"] <= 1 and "reward_margin" in r1["metrics"]


@pytest.mark.parametrize("kind,zero", [("sft", 3), ("dpo", 2)])
def test_resume_after_signal_ends_with_the_same_loss(tiny_llama, tmp_path, kind, zero):
    rows = sft_rows(40) if kind == "sft" else pair_rows(32)  # 10 / 8 steps
    full, ref = train(tmp_path, "full", kind, rows, tiny_llama, zero_stage=zero)

    def preempt(step, loss, engine):
        if step == 3:
            os.kill(os.getpid(), signal.SIGUSR2)  # seen at the next step boundary

    with pytest.raises(checkpoint.TrainingInterrupted, match="SIGUSR2 after step 4"):
        train(tmp_path, "cut", kind, rows, tiny_llama, zero_stage=zero, checkpoint_every=2,
              on_step=preempt)
    stage = StageDir(tmp_path / "cut")
    assert [p.name for _, p in checkpoint.complete(stage.checkpoints_dir)] == \
        ["step-00000002", "step-00000004"]
    assert not stage.model_dir.exists()
    # the resumed attempt saves again at step 6 (a resumed run must be able to checkpoint)
    _, res = train(tmp_path, "cut", kind, rows, tiny_llama, zero_stage=zero, checkpoint_every=2)
    assert res["resumed_from_step"] == 4
    if kind == "dpo":
        assert res["reference_reused"] is True  # read back from the stage directory
    # same seed, deterministic CPU kernels, fp32: the resumed run retraces the same steps
    assert res["metrics"]["loss"] == pytest.approx(ref["metrics"]["loss"], abs=1e-6)
    assert curve(stage)[4:] == pytest.approx(curve(full)[4:], abs=1e-6)


def test_sigusr1_saves_a_checkpoint_and_training_goes_on(tiny_llama, tmp_path):
    seen = {}

    def poke(step, loss, engine):
        if step == 1:
            os.kill(os.getpid(), signal.SIGUSR1)
        if step == 3:  # saved after step 2, the boundary after the signal; not stopped
            seen["ckpts"] = [s for s, _ in checkpoint.complete(tmp_path / "usr1" / "checkpoints")]

    _, res = train(tmp_path, "usr1", "sft", sft_rows(), tiny_llama, on_step=poke)
    assert seen["ckpts"] == [2] and res["steps"] == 6


def test_kto_micro_batch_one_matches_micro_batch_four(tiny_llama, tmp_path):
    """The KL reference point is estimated over the whole optimizer step, not the micro-batch."""
    s1, r1 = train(tmp_path, "mb4", "kto", pair_rows(), tiny_llama, micro_batch_size=4, lr=3e-3)
    s2, r2 = train(tmp_path, "mb1", "kto", pair_rows(), tiny_llama, micro_batch_size=1, lr=3e-3)
    assert r2["grad_accum"] == 8 and r1["grad_accum"] == 2
    assert curve(s1) == pytest.approx(curve(s2), abs=1e-5)
    kls = [json.loads(x)["kl"] for x in (s1.log_dir / "train.jsonl").read_text().splitlines()]
    assert all(k >= 0 for k in kls)
    assert set(r1["metrics"]) >= {"kl", "desirable_reward", "undesirable_reward"}


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_checkpoint(tiny_llama, tmp_path):
    def blow_up(step, loss, engine):
        if step == 2:  # after the step-2 checkpoint is decided, poison the weights
            for p in engine.module.parameters():
                p.data.fill_(float("nan"))

    stage = StageDir(tmp_path / "nan")
    cfg = config("sft", checkpoint_every=2)
    with pytest.raises(loop.NonFiniteLoss, match=r"loss is nan at step 3.*step-00000002"):
        loop.run(stage, cfg, sft_rows(), ENV, tiny_llama, on_step=blow_up)
    assert [p.name for _, p in checkpoint.complete(stage.checkpoints_dir)] == ["step-00000002"]
    assert not stage.model_dir.exists()


def test_empty_and_all_dropped_datasets_are_clear_errors(tiny_llama, tmp_path):
    with pytest.raises(loop.NoExamples, match="empty dataset"):
        train(tmp_path, "empty", "sft", [], tiny_llama)
    long = [{"prompt": "Q", "chosen": "a" * 80, "rejected": "b"}]
    with pytest.raises(loop.NoExamples, match="all 1 preference pairs are longer than max_length=48"):
        train(tmp_path, "long", "dpo", long, tiny_llama, truncation="drop")


def test_missing_model_path_is_a_clear_error(tmp_path):
    with pytest.raises(models.ModelRefError, match="does not exist"):
        train(tmp_path, "x", "sft", sft_rows(), str(tmp_path / "no-such-model"))


@pytest.mark.parametrize("params,message", [
    ({"lr": -1}, "lr=-1.0 must be > 0"),
    ({"finetune": "qlora"}, "finetune='qlora' must be one of full, lora"),
    ({"epochs": "2"}, "epochs='2' must be an integer"),
    ({"learning_rate": 1e-5}, "unknown training parameter params.learning_rate"),
])
def test_bad_spec_values_name_the_key(params, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        TrainConfig.from_spec({"kind": "sft", "params": params})


def test_resume_refuses_a_checkpoint_from_another_world_size(tmp_path):
    from budgetlab.stagedir import atomic_write_json

    ckpt = tmp_path / "checkpoints"
    atomic_write_json(ckpt / "step-00000004" / "meta.json",
                      {"step": 4, "world_size": 2, "zero_stage": 2})
    with pytest.raises(checkpoint.CheckpointMismatch, match="written by 2 ranks with ZeRO stage 2"):
        checkpoint.load_latest(None, ckpt, ENV, zero_stage=2)
    with pytest.raises(checkpoint.CheckpointMismatch, match="ZeRO stage 2, this run uses stage 3"):
        checkpoint.load_latest(None, ckpt, ENV, zero_stage=3)
    (ckpt / ".tmp-step-00000006").mkdir()  # an interrupted save is never picked
    assert [s for s, _ in checkpoint.complete(ckpt)] == [4]


def test_run_stage_chain_on_the_arith_task_through_the_worker(tiny_llama, tmp_path):
    """SFT then DPO from the SFT model, as the worker runs a job: data from budgetlab.tasks."""
    from budgetlab import worker

    def spec(kind, sid, init, parent=None):
        return {"schema_version": 1, "stage_id": sid, "kind": kind, "task": "arith",
                "model": tiny_llama, "init_model": init, "seed": 1, "n": 12,
                "params": {"finetune": "full", "max_length": 64, "epochs": 1, "lr": 1e-3,
                           "batch_size": 4, **({"beta": 0.5} if kind == "dpo" else {})},
                "data": {"sft": None, "preferences": None, "eval": None}, "parent": parent,
                "resources": {"micro_batch_size": 2, "zero_stage": 2, "checkpoint_every": 0,
                              "keep_checkpoints": 1, "nodes": 1, "time_min": 5}}

    sft, dpo = StageDir(tmp_path / "sft1"), StageDir(tmp_path / "dpo1")
    sft.write_spec(spec("sft", "sft1", tiny_llama))
    dpo.write_spec(spec("dpo", "dpo1", str(sft.model_dir),
                        {"stage_id": "sft1", "kind": "sft", "dir": str(sft.root)}))
    r_sft, r_dpo = worker.run_stages([str(sft.root), str(dpo.root)])
    assert r_sft["stage_id"] == "sft1" and r_sft["steps"] == 3 and r_sft["examples"] == 12
    assert dpo.read_result()["metrics"]["loss"] == r_dpo["metrics"]["loss"]
    assert r_dpo["metrics"]["reward_accuracy"] >= 0 and r_dpo["kind"] == "dpo"
    info = json.loads((dpo.model_dir / "budgetlab.json").read_text())
    assert info["init_model"] == str(sft.model_dir) and info["base_model"] == tiny_llama


def test_run_stage_rejects_n_larger_than_the_pool(tiny_llama, tmp_path):
    from budgetlab.train import run_stage

    stage = StageDir(tmp_path / "big")
    spec = {"stage_id": "big", "kind": "sft", "task": "arith", "model": tiny_llama,
            "init_model": tiny_llama, "seed": 0, "n": 10**7, "params": {}, "resources": {}}
    with pytest.raises(Exception, match="10000000"):
        run_stage(stage, spec, ENV)
