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
    if kind == "kto":
        params["batch_unit"] = "pairs"  # what a grid writes by default
    for k, v in kw.items():
        (res if k in res else params)[k] = v
    return TrainConfig.from_spec({"kind": kind, "seed": 0, "params": params, "resources": res})


def train(tmp_path, name, kind, rows, model, **kw):
    stage = StageDir(tmp_path / name)
    on_step = kw.pop("on_step", None)
    result = loop.run(stage, config(kind, **kw), rows, ENV, model, on_step=on_step)
    return stage, result


def plain_logp(model, prompt, completion):
    """Summed log-prob of `completion` after `prompt`: one unpacked, unpadded forward and a
    log-softmax written out here (a second path to the loop's packed Scorer)."""
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].double()
    logp = logits.log_softmax(-1)
    return sum(float(logp[len(prompt) + t - 1, tok]) for t, tok in enumerate(completion))


def encoded(kind, rows, model, **kw):
    """The examples and optimizer steps the loop trains on (its own encoding: the input)."""
    from budgetlab.train import data

    cfg = config(kind, **kw)
    ex, _ = loop.encode(kind, models.load_tokenizer(model), rows, cfg)
    return ex, data.plan_steps(len(ex), cfg.examples_per_step, cfg.epochs, cfg.seed)


def rows_of(stage):
    return [json.loads(x) for x in (stage.log_dir / "train.jsonl").read_text().splitlines()]


def curve(stage):
    return [json.loads(line)["loss"] for line in (stage.log_dir / "train.jsonl").read_text().splitlines()]


def test_sft_exports_a_loadable_model_and_counts_truncation(tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM

    rows = sft_rows() + [{"prompt": "Q: long", "response": "x" * 100}]
    stage, res = train(tmp_path, "sft", "sft", rows, tiny_llama)
    assert res["examples_truncated"] == 1 and res["examples_dropped"] == 0
    assert res["packing"] is True and res["packing_probe"]["ok"] is True
    assert res["packing_probe"]["sequences"] == 3 and res["packing_probe"]["max_diff"] < 1e-4
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
    from transformers import AutoModelForCausalLM

    # Step 2's rewards, recomputed from the weights after step 1 with plain forwards.
    ex, steps = encoded("dpo", pair_rows(), tiny_llama)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    want = {}

    def after_step(step, loss, engine):
        if step == 1:
            m = engine.module.eval()
            cr = [0.5 * (plain_logp(m, ex[i]["prompt"], ex[i]["chosen"])
                         - plain_logp(base, ex[i]["prompt"], ex[i]["chosen"])) for i in steps[1]]
            rj = [0.5 * (plain_logp(m, ex[i]["prompt"], ex[i]["rejected"])
                         - plain_logp(base, ex[i]["prompt"], ex[i]["rejected"])) for i in steps[1]]
            engine.module.train()
            want["acc"] = sum(c > r for c, r in zip(cr, rj)) / len(cr)
            want["margin"] = sum(c - r for c, r in zip(cr, rj)) / len(cr)
            want["gap"] = min(abs(c - r) for c, r in zip(cr, rj))

    s1, r1 = train(tmp_path, "pre", "dpo", pair_rows(), tiny_llama, beta=0.5, lr=1e-3,
                   on_step=after_step)
    s2, r2 = train(tmp_path, "online", "dpo", pair_rows(), tiny_llama, beta=0.5, lr=1e-3,
                   reference="online")
    assert (s1.root / "reference_logps.pt").exists() and not (s2.root / "reference_logps.pt").exists()
    assert curve(s1)[0] == pytest.approx(math.log(2), abs=1e-6)  # policy == reference at step 1
    assert curve(s1) == pytest.approx(curve(s2), abs=1e-5)
    log = rows_of(s1)
    assert log[0]["reward_margin"] == pytest.approx(0, abs=1e-5)  # policy == reference
    assert want["gap"] > 1e-4  # no near-tie that float order could flip
    assert log[1]["reward_accuracy"] == want["acc"]
    assert log[1]["reward_margin"] == pytest.approx(want["margin"], abs=1e-5)
    # the result's metrics: the last epoch's steps (2 x 8 pairs), averaged
    last = [r for r in log if r["epoch"] == 1]
    assert r1["metrics"]["reward_accuracy"] == pytest.approx(
        sum(r["reward_accuracy"] for r in last) / len(last), abs=1e-12)
    assert r1["metrics"]["reward_margin"] == pytest.approx(
        r1["metrics"]["chosen_reward"] - r1["metrics"]["rejected_reward"], abs=1e-6)


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
    from transformers import AutoModelForCausalLM

    # Step 2's KL point, recomputed from the weights after step 1 with plain forwards:
    # mean over the step's examples of log pi(y'|x) - log ref(y'|x), y' a mismatched completion.
    ex, steps = encoded("kto", pair_rows(), tiny_llama)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    want = {}

    def after_step(step, loss, engine):
        if step < len(steps):
            m = engine.module.eval()
            d = [plain_logp(m, ex[i]["prompt"], ex[i]["kl_completion"])
                 - plain_logp(base, ex[i]["prompt"], ex[i]["kl_completion"]) for i in steps[step]]
            engine.module.train()
            want[step + 1] = sum(d) / len(d)

    s1, r1 = train(tmp_path, "mb4", "kto", pair_rows(), tiny_llama, micro_batch_size=4, lr=3e-3,
                   on_step=after_step)
    s2, r2 = train(tmp_path, "mb1", "kto", pair_rows(), tiny_llama, micro_batch_size=1, lr=3e-3)
    # 8 pairs a step = 16 KTO examples: 16 micro-batches of 1, 4 of 4; 32 examples, 2 epochs
    assert r2["grad_accum"] == 16 and r1["grad_accum"] == 4 and r1["steps"] == 4
    assert curve(s1) == pytest.approx(curve(s2), abs=1e-5)
    kls = [r["kl"] for r in rows_of(s1)]
    assert kls[0] == pytest.approx(0, abs=1e-5)  # policy == reference at step 1
    # here the policy moves away from mismatched completions: every point is clamped at 0,
    # far from it unclamped (an unclamped or wrongly signed estimate fails)
    assert max(want.values()) < -0.1
    assert kls[1:] == [0.0] * (len(kls) - 1)
    assert set(r1["metrics"]) >= {"kl", "desirable_reward", "undesirable_reward"}


def test_dpo_and_kto_take_the_same_steps_at_equal_settings(tiny_llama, tmp_path):
    """batch_size = 4 on 16 pairs, 1 epoch: 4 steps of 4 pairs for DPO and for KTO (8 KTO
    examples a step); KTO's old unit (examples) takes 8 steps of 4 examples."""
    kw = dict(epochs=1, batch_size=4, micro_batch_size=2)
    s_dpo, r_dpo = train(tmp_path, "dpo", "dpo", pair_rows(), tiny_llama, **kw)
    s_kto, r_kto = train(tmp_path, "kto", "kto", pair_rows(), tiny_llama, **kw)
    s_old, r_old = train(tmp_path, "old", "kto", pair_rows(), tiny_llama, batch_unit="examples",
                         **kw)
    assert (r_dpo["steps"], r_kto["steps"], r_old["steps"]) == (4, 4, 8)
    assert [len(curve(s)) for s in (s_dpo, s_kto, s_old)] == [4, 4, 8]
    assert (r_dpo["grad_accum"], r_kto["grad_accum"], r_old["grad_accum"]) == (2, 4, 2)
    assert r_kto["examples_per_step"] == 8 and r_kto["batch_unit"] == "pairs"
    assert r_kto["examples"] == 32 and r_dpo["examples"] == 16


def test_kto_step_kl_against_plain_forwards(tiny_llama):
    """The unclamped side of the KL point: a reference below the policy by known offsets."""
    from transformers import AutoModelForCausalLM

    ex, steps = encoded("kto", pair_rows(), tiny_llama)
    m = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    plain = [plain_logp(m, e["prompt"], e["kl_completion"]) for e in ex]
    offset = [0.05 * (i % 7) + 0.01 for i in range(len(ex))]
    ref = {"kl": torch.tensor([p - o for p, o in zip(plain, offset)])}
    scorer = loop.Scorer(m, models.load_tokenizer(tiny_llama).pad_token_id, config("kto"),
                         torch.device("cpu"))
    idx = steps[1]
    slots = [idx[:3], [], idx[3:]]  # uneven micro-batches, one empty
    kl = loop.kto_step_kl(scorer, ex, slots, ref, ENV)
    assert float(kl) == pytest.approx(sum(offset[i] for i in idx) / len(idx), abs=1e-5)


def leaking_forward(monkeypatch):
    """Llama forwards that ignore position_ids: packed rows become one causal sequence each,
    i.e. attention leaks across packed examples (padded batches pass no position_ids)."""
    from transformers import LlamaForCausalLM

    forward = LlamaForCausalLM.forward

    def leaky(self, *args, position_ids=None, **kw):
        return forward(self, *args, **kw)
    monkeypatch.setattr(LlamaForCausalLM, "forward", leaky)


def test_packing_probe_passes_and_catches_a_leak(tiny_llama, monkeypatch):
    from transformers import AutoModelForCausalLM

    from budgetlab.train import packing

    m = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    ex, _ = encoded("sft", sft_rows(), tiny_llama)
    seqs = loop.stage_sequences("sft", ex)
    good = packing.probe(m, 0, 48, seqs, torch.device("cpu"))
    assert good["ok"] is True and good["max_diff"] < 1e-4 and good["sequences"] == 3
    leaking_forward(monkeypatch)
    bad = packing.probe(m, 0, 48, seqs, torch.device("cpu"))
    assert bad["ok"] is False and bad["max_diff"] > bad["tolerance"] == 1e-3


def test_leaking_packing_falls_back_to_padding_once(tiny_llama, tmp_path, monkeypatch, caplog):
    import logging

    padded, r_pad = train(tmp_path, "padded", "sft", sft_rows(), tiny_llama, packing=False,
                          epochs=1)
    assert r_pad["packing"] is False and r_pad["packing_probe"] is None
    leaking_forward(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="budgetlab.train.loop"):
        stage, res = train(tmp_path, "leak", "sft", sft_rows(), tiny_llama, epochs=1)
    assert res["packing"] is False and res["packing_probe"]["ok"] is False
    said = [r.getMessage() for r in caplog.records if "packing off" in r.getMessage()]
    assert len(said) == 1 and "training with padding" in said[0]
    assert curve(stage) == pytest.approx(curve(padded), abs=1e-6)  # trained exactly as padded


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


def test_resume_refuses_a_checkpoint_of_another_zero_stage(tmp_path):
    # (another world size resumes: tests/train/test_resume_world_size.py)
    from budgetlab.stagedir import atomic_write_json

    ckpt = tmp_path / "checkpoints"
    atomic_write_json(ckpt / "step-00000004" / "meta.json",
                      {"step": 4, "world_size": 2, "zero_stage": 2})
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
    assert r_dpo["kind"] == "dpo" and r_dpo["steps"] == 3
    rows = rows_of(dpo)  # 3 steps of 4 pairs: the epoch's accuracy is the mean of the steps'
    assert r_dpo["metrics"]["reward_accuracy"] == pytest.approx(
        sum(r["reward_accuracy"] for r in rows) / 3, abs=1e-12)
    info = json.loads((dpo.model_dir / "budgetlab.json").read_text())
    assert info["init_model"] == str(sft.model_dir) and info["base_model"] == tiny_llama


def test_run_stage_rejects_n_larger_than_the_pool(tiny_llama, tmp_path):
    from budgetlab.train import run_stage

    stage = StageDir(tmp_path / "big")
    spec = {"stage_id": "big", "kind": "sft", "task": "arith", "model": tiny_llama,
            "init_model": tiny_llama, "seed": 0, "n": 10**7, "params": {}, "resources": {}}
    with pytest.raises(Exception, match="10000000"):
        run_stage(stage, spec, ENV)


def test_worker_frees_the_training_engine_before_the_eval_of_the_same_job(
        tiny_llama, tmp_path, monkeypatch):
    import gc
    import weakref

    from budgetlab import evaluate, worker

    refs, seen = [], {}
    build = loop.build_engine

    def recording_build(*a, **kw):
        engine, scheduler = build(*a, **kw)
        refs.append(weakref.ref(engine))
        refs.append(weakref.ref(engine.optimizer))
        return engine, scheduler

    run_eval = evaluate.run_stage

    def eval_stage(stage, spec, env):
        seen["alive_at_eval_start"] = [r() is not None for r in refs]
        return run_eval(stage, spec, env)

    monkeypatch.setattr(loop, "build_engine", recording_build)
    monkeypatch.setattr(evaluate, "run_stage", eval_stage)
    sft, ev = StageDir(tmp_path / "sft1"), StageDir(tmp_path / "ev1")
    sft.write_spec({"schema_version": 1, "stage_id": "sft1", "kind": "sft", "task": "arith",
                    "model": tiny_llama, "init_model": tiny_llama, "seed": 1, "n": 8,
                    "params": {"max_length": 64, "epochs": 1, "batch_size": 4, "lr": 1e-3},
                    "data": {}, "parent": None,
                    "resources": {"micro_batch_size": 2, "checkpoint_every": 0}})
    ev.write_spec({"schema_version": 1, "stage_id": "ev1", "kind": "eval", "task": "arith",
                   "model": tiny_llama, "init_model": str(sft.model_dir), "seed": 0, "n": None,
                   "params": {"limit": 2, "max_new_tokens": 4, "batch_size": 2, "engine": "hf"},
                   "data": {}, "parent": None, "resources": {}})
    gc.disable()  # only the worker's own collection may free a cycle here
    try:
        r_sft, r_ev = worker.run_stages([str(sft.root), str(ev.root)])
    finally:
        gc.enable()
    assert r_sft["steps"] == 2 and r_ev["kind"] == "eval"
    assert len(refs) == 2 and seen["alive_at_eval_start"] == [False, False]
