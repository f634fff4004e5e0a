"""The evaluation stage on the toy model: batched == one at a time, predictions and metrics."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from budgetlab.builtin import resolve
from budgetlab.stagedir import StageDir

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def toy():
    from budgetlab.models import load_model, load_tokenizer

    path = resolve("arith-tiny")
    return load_tokenizer(path, padding_side="left"), load_model(path).eval()


def test_builtin_resolves_to_a_hf_directory():
    path = Path(resolve("builtin:arith-tiny"))
    assert (path / "model.safetensors").exists() and (path / "tokenizer.json").exists()
    with pytest.raises(ValueError, match="unknown built-in model 'nope'"):
        resolve("nope")


def test_char_tokenizer_round_trip(toy):
    tok, _ = toy
    text = "Q: Tom has 12 apples and gets 7 more. How many? A: 12+7=19. #### 19"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text) and tok.decode(ids) == text


def test_cut_at_stop():
    from budgetlab.evaluate import cut_at_stop

    assert cut_at_stop("12+7=19. #### 19\nQ: next", ("\n", "Q:")) == "12+7=19. #### 19"
    assert cut_at_stop("abc", ()) == "abc"


def test_batched_equals_one_at_a_time(toy):
    from budgetlab.evaluate import generate
    from budgetlab.tasks import get_task

    tok, model = toy
    task = get_task("arith")
    prompts = [task.format_prompt(tok, e["prompt"]) for e in task.eval_set()[:12]]
    one, _ = generate(model, tok, prompts, 12, 1, task.stop_strings)
    batched, n = generate(model, tok, prompts, 12, 5, task.stop_strings)
    assert one == batched
    assert n > 0 and all("\n" not in t for t in batched)


def _eval_spec(tmp_path, **params):
    stage = StageDir(tmp_path / "stages" / "e1")
    spec = {"schema_version": 1, "stage_id": "e1", "kind": "eval", "task": "arith",
            "model": "builtin:arith-tiny", "seed": 0, "n": None,
            "params": {"limit": 10, "max_new_tokens": 16, "batch_size": 8, "engine": "hf", **params},
            "data": {"sft": None, "preferences": None, "eval": None}, "parent": None,
            "init_model": "builtin:arith-tiny", "resources": {}}
    stage.write_spec(spec)
    return stage, spec


def test_run_stage_writes_predictions(tmp_path):
    from budgetlab.dist import DistEnv
    from budgetlab.evaluate import run_stage

    stage, spec = _eval_spec(tmp_path)
    result = run_stage(stage, spec, DistEnv())
    rows = [json.loads(line) for line in (stage.root / "predictions.jsonl").read_text().splitlines()]
    assert [r["index"] for r in rows] == list(range(10))
    assert result["primary_metric"] == "accuracy" and result["n_examples"] == 10
    mean = sum(r["scores"]["accuracy"] for r in rows) / 10
    assert result["metrics"]["accuracy"] == pytest.approx(mean)
    # the base model never learned the answer format: the paper's starting point
    assert result["metrics"]["accuracy"] == 0.0


def test_bad_engine(tmp_path):
    from budgetlab.dist import DistEnv
    from budgetlab.evaluate import run_stage

    stage, spec = _eval_spec(tmp_path, engine="tgi")
    with pytest.raises(ValueError, match="params.engine must be one of"):
        run_stage(stage, spec, DistEnv())


def test_sampling_is_seeded_and_greedy_is_temperature_zero(toy):
    from budgetlab.evaluate import generate
    from budgetlab.tasks import get_task

    tok, model = toy
    task = get_task("arith")
    prompts = [task.format_prompt(tok, e["prompt"]) for e in task.eval_set()[:4]]
    greedy, _ = generate(model, tok, prompts, 8, 4)
    assert generate(model, tok, prompts, 8, 4, temperature=0.0, seed=9)[0] == greedy
    a, _ = generate(model, tok, prompts, 8, 4, temperature=1.5, top_p=0.9, seed=5)
    b, _ = generate(model, tok, prompts, 8, 4, temperature=1.5, top_p=0.9, seed=5)
    c, _ = generate(model, tok, prompts, 8, 4, temperature=1.5, top_p=0.9, seed=6)
    assert a == b and a != c and a != greedy


def test_prompt_protocol(toy):
    from budgetlab.evaluate import format_eval_prompt, stop_strings_for
    from budgetlab.tasks import get_task

    tok, _ = toy
    gsm8k, arith = get_task("gsm8k"), get_task("arith")
    proto = {"chat_template": "chatml", "system_prompt": "Be brief.",
             "prompt_template": "Question: {prompt}\nAnswer:"}
    assert format_eval_prompt(gsm8k, tok, "What is 2+2?", proto) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nQuestion: What is 2+2?\n"
        "Answer:<|im_end|>\n<|im_start|>assistant\n")
    assert stop_strings_for(gsm8k, proto) == ("Question:", "<|im_end|>", "</s>")
    # No system prompt: no system turn. Defaults: the task's own format, unchanged.
    assert format_eval_prompt(gsm8k, tok, "x", {"chat_template": "chatml", "system_prompt": ""}) \
        == "<|im_start|>user\nx<|im_end|>\n<|im_start|>assistant\n"
    assert format_eval_prompt(arith, tok, "What is 2+2?", {}) == "Q: What is 2+2? A: "
    assert format_eval_prompt(arith, tok, "2+2?", {"chat_template": "none",
                                                   "prompt_template": "Q: {prompt} A:"}) \
        == "Q: 2+2? A:"
    with pytest.raises(ValueError, match="has no chat template"):
        format_eval_prompt(arith, tok, "x", {"chat_template": "tokenizer"})


def test_run_stage_samples_mean_and_spread(tmp_path):
    import statistics

    from budgetlab.dist import DistEnv
    from budgetlab.evaluate import run_stage

    stage, spec = _eval_spec(tmp_path, samples=3, temperature=1.5, top_p=0.9, seed=1, limit=5,
                             max_new_tokens=10)
    result = run_stage(stage, spec, DistEnv())
    rows = [json.loads(line) for line in (stage.root / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 15 and {r["sample"] for r in rows} == {0, 1, 2}
    assert result["samples"] == 3 and result["n_examples"] == 5
    flex = [sum(r["scores"]["accuracy_flexible"] for r in rows if r["sample"] == j) / 5
            for j in range(3)]
    assert [m["accuracy_flexible"] for m in result["metrics_per_sample"]] == pytest.approx(flex)
    assert result["metrics"]["accuracy_flexible"] == pytest.approx(statistics.mean(flex))
    assert result["metrics_std"]["accuracy_flexible"] == pytest.approx(statistics.stdev(flex))
    # the samples differ (sampling at temperature 1.5, a seed of its own each)
    assert len({tuple(r["prediction"] for r in rows if r["sample"] == j) for j in range(3)}) == 3


@pytest.mark.slow
def test_sharded_eval_matches_single(tmp_path):
    """Two ranks (gloo) through the worker CLI give the same predictions as one process."""
    single, _ = _eval_spec(tmp_path / "one")
    sharded, _ = _eval_spec(tmp_path / "two")
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    env = {k: v for k, v in env.items() if k not in ("RANK", "WORLD_SIZE", "SLURM_PROCID")}
    subprocess.run([sys.executable, "-m", "budgetlab.worker", str(single.root)], env=env,
                   check=True, cwd=ROOT, timeout=300)
    procs = [subprocess.Popen([sys.executable, "-m", "budgetlab.worker", str(sharded.root)],
                              cwd=ROOT, env={**env, "RANK": str(r), "WORLD_SIZE": "2",
                                             "LOCAL_RANK": str(r), "MASTER_ADDR": "127.0.0.1",
                                             "MASTER_PORT": "29613"}) for r in (0, 1)]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    a = (single.root / "predictions.jsonl").read_text()
    b = (sharded.root / "predictions.jsonl").read_text()
    assert a == b
    assert sharded.read_result()["world_size"] == 2
    assert sharded.read_result()["metrics"] == single.read_result()["metrics"]


def test_helpsteer_reward_model_from_local_path(tmp_path, toy):
    """The reward-model scorer loads any local path (here a tiny sequence classifier)."""
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from budgetlab.tasks import get_task

    tok, _ = toy
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                      num_hidden_layers=1, num_attention_heads=2, num_labels=1,
                      pad_token_id=tok.pad_token_id)
    rm = tmp_path / "rm"
    LlamaForSequenceClassification(cfg).save_pretrained(rm)
    tok.save_pretrained(rm)
    fix = ROOT / "tests" / "fixtures"
    task = get_task("helpsteer", {"eval": str(fix / "helpsteer_val.jsonl"), "reward_model": str(rm)})
    ev = task.eval_set()
    preds = ["Red.", "A spider has eight legs, like all arachnids."]
    batched = task.score_batch(preds, ev)
    alone = [task.score(p, e) for p, e in zip(preds, ev)]
    assert [s["reward"] for s in batched] == pytest.approx([s["reward"] for s in alone], abs=1e-5)
    assert batched[0]["reward"] != batched[1]["reward"]
    assert task.aggregate(batched)["reward"] == pytest.approx(sum(s["reward"] for s in batched) / 2)


def test_shipped_model_matches_build_script():
    """The committed weights come from build.py: same tokenizer, same architecture."""
    import json as _json

    from budgetlab.builtin import build

    shipped = Path(resolve("arith-tiny"))
    tok = build.make_tokenizer()
    assert _json.loads((shipped / "tokenizer.json").read_text())["model"]["vocab"] == tok.get_vocab()
    cfg = _json.loads((shipped / "config.json").read_text())
    want = build.make_model(tok).config
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "max_position_embeddings"):
        assert cfg[key] == getattr(want, key), key


def test_pretraining_corpus_never_shows_the_answer_format():
    from budgetlab.builtin.build import corpus

    docs = corpus(n_docs=300)
    assert docs == corpus(n_docs=300)  # deterministic
    text = "\n".join(docs)
    assert "####" not in text and "Q:" not in text and "A:" not in text
    assert "=" in text and "How many" in text


def test_each_vllm_rank_is_pinned_to_its_gpu():
    from budgetlab.evaluate import pin_rank_gpu

    env = {"CUDA_VISIBLE_DEVICES": "4,5,6,7"}
    assert pin_rank_gpu(2, env) == "6" and env["CUDA_VISIBLE_DEVICES"] == "6"
    env = {"CUDA_VISIBLE_DEVICES": "3"}          # SLURM gave the rank one GPU already
    assert pin_rank_gpu(0, env) == "3" and env["CUDA_VISIBLE_DEVICES"] == "3"
    assert pin_rank_gpu(0, {"CUDA_VISIBLE_DEVICES": ""}) is None
    with pytest.raises(ValueError, match="local rank 2 but only 2 visible GPU"):
        pin_rank_gpu(2, {"CUDA_VISIBLE_DEVICES": "0,1"})
