"""Grid spec validation: every malformed spec gives one `FILE: KEY: reason` line."""

import re
from pathlib import Path

import pytest

from budgetlab.errors import BadInput
from budgetlab.spec import load_spec

from tests.conftest import GOOD_SPEC


def _edit(old: str, new: str) -> str:
    assert old in GOOD_SPEC, old
    return GOOD_SPEC.replace(old, new, 1)


# (spec text, key named in the error, a word of the reason)
MALFORMED = [
    ("foo = 1\n" + GOOD_SPEC, "foo", "unknown key"),
    (_edit("seeds = [0, 1]", "seeds = [0, 1]\nseed = 3"), "grid.seed", "unknown key"),
    (_edit("budgets = [64, 256]", 'budgets = ["64"]'), "grid.budgets", "expected a number"),
    (_edit("sft_fractions = [1.0, 0.5, 0.0]", "sft_fractions = [1.5]"), "grid.sft_fractions", "<= 1"),
    (_edit("sft_fractions = [1.0, 0.5, 0.0]", "sft_fractions = [-0.1]"), "grid.sft_fractions", ">= 0"),
    (_edit("budgets = [64, 256]", "budgets = [0]"), "grid.budgets", "> 0"),
    (_edit("sft_example = 1.0", "sft_example = 0"), "costs.sft_example", "> 0"),
    (_edit("preference_pair = 1.0", "preference_pair = -2"), "costs.preference_pair", "> 0"),
    (_edit("budgets = [64, 256]", "budgets = [64, 64]"), "grid.budgets", "duplicate"),
    (_edit("sft_fractions = [1.0, 0.5, 0.0]", "sft_fractions = [0.01]"), "grid.sft_fractions",
     "buys 0 SFT examples"),
    (_edit("sft_fractions = [1.0, 0.5, 0.0]", "sft_fractions = [0.999]"), "grid.sft_fractions",
     "buys 0 preference pairs"),
    (_edit('tasks = ["arith"]', 'tasks = ["mmlu"]'), "grid.tasks", "must be one of"),
    (_edit('methods = ["dpo", "kto"]', 'methods = ["ppo"]'), "grid.methods", "must be one of"),
    (_edit('models = ["builtin:arith-tiny"]', 'models = ["./no/such/model"]'), "grid.models[0]",
     "does not exist"),
    (_edit('models = ["builtin:arith-tiny"]', 'models = ["builtin:gpt5"]'), "grid.models[0]",
     "unknown built-in"),
    (_edit('models = ["builtin:arith-tiny"]', 'models = ["not a model"]'), "grid.models[0]",
     "neither"),
    (_edit('name = "t"', ""), "name", "missing"),
    (_edit('name = "t"', 'name = "bad name!"'), "name", "expected a name"),
    (_edit("beta = 0.1", "betta = 0.1"), "train.dpo.betta", "unknown key"),
    (_edit("lr = 1e-3", "lr = 1e-3\nbeta = 0.5"), "train.sft.beta", "unknown key"),
    (_edit("lr = 1e-3", 'lr = "fast"'), "train.sft.lr", "expected a number"),
    (_edit("seeds = [0, 1]", "seeds = [-1]"), "grid.seeds", ">= 0"),
    (_edit("seeds = [0, 1]", "seeds = [true]"), "grid.seeds", "expected an integer"),
    (_edit('unit = "examples"', 'unit = "euros"'), "costs.unit", "must be one of"),
    (_edit('tasks = ["arith"]\n', ""), "grid.tasks", "missing"),
    (_edit("seeds = [0, 1]", "seeds = []"), "grid.seeds", "non-empty"),
    (GOOD_SPEC + '\n[data.arith]\nsft = "missing.jsonl"\n', "data.arith.sft", "does not exist"),
    (GOOD_SPEC + '\n[data.gsm8k]\nsft = "x.jsonl"\n', "data.gsm8k", "not in grid.tasks"),
    (GOOD_SPEC + '\n[data.arith]\nrewards = "x.jsonl"\n', "data.arith.rewards", "unknown key"),
    (GOOD_SPEC + "\n[resources.sft]\nmicro_batch_size = 3\n", "resources.sft.micro_batch_size",
     "not a multiple"),
    (GOOD_SPEC + "\n[resources.sft]\ngpus_per_node = 4\ntasks_per_node = 2\n",
     "resources.sft.tasks_per_node", "one rank per GPU"),
    (GOOD_SPEC + "\n[resources.eval]\nzero_stage = 4\n", "resources.eval.zero_stage", "<= 3"),
    (GOOD_SPEC + "\n[slurm]\npartition = 3\n", "slurm.partition", "non-empty string"),
    (GOOD_SPEC + "\n[eval]\nlimit = 5\n", "", "invalid TOML"),  # table defined twice
    ("name = 't'\n[grid\n", "", "invalid TOML"),
    (_edit("max_length = 128", "max_length = 128.5"), "train.max_length", "integer"),
]


@pytest.mark.parametrize("text,key,reason", MALFORMED, ids=[f"{i}:{m[1] or 'toml'}"
                                                            for i, m in enumerate(MALFORMED)])
def test_malformed_spec_names_file_key_and_reason(write_spec, text, key, reason):
    path = write_spec(text)
    with pytest.raises(BadInput) as err:
        load_spec(path)
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith(f"{path}: ")
    if key:
        assert msg.startswith(f"{path}: {key}: "), msg
    assert reason in msg, msg


def test_good_spec_merges_defaults(write_spec):
    spec = load_spec(write_spec())
    assert spec.name == "t" and spec.budgets == (64, 256)
    assert spec.train["sft"]["lr"] == 1e-3 and spec.train["sft"]["epochs"] == 1
    assert spec.train["dpo"]["lr"] == 5e-6 and spec.train["dpo"]["beta"] == 0.1
    assert spec.train["dpo"]["max_length"] == 128  # [train] applies to every kind
    assert spec.resources["sft"]["tasks_per_node"] == 1
    assert spec.eval["limit"] == 20


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(BadInput, match=r"no such grid spec file"):
        load_spec(tmp_path / "nope.toml")
    (tmp_path / "bin.toml").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(BadInput, match=r"not UTF-8"):
        load_spec(tmp_path / "bin.toml")


def test_hub_ids_are_not_resolved_at_plan_time(write_spec):
    spec = load_spec(write_spec(_edit('models = ["builtin:arith-tiny"]',
                                      'models = ["meta-llama/Llama-3.1-8B"]')))
    assert spec.models_resolved["meta-llama/Llama-3.1-8B"] == "meta-llama/Llama-3.1-8B"


def test_local_model_dir_and_data_file_resolve_to_absolute_paths(write_spec, tmp_path, monkeypatch):
    (tmp_path / "m").mkdir()
    (tmp_path / "sft.jsonl").write_text('{"prompt": "a", "response": "b"}\n')
    monkeypatch.chdir(tmp_path)
    spec = load_spec(write_spec(_edit('models = ["builtin:arith-tiny"]', 'models = ["./m"]')
                                + '\n[data.arith]\nsft = "sft.jsonl"\n'))
    assert spec.models_resolved["./m"] == str(tmp_path / "m")
    assert spec.data["arith"]["sft"] == str(tmp_path / "sft.jsonl")
    assert re.fullmatch(r"[0-9a-f]{64}", spec.data_hashes[str(tmp_path / "sft.jsonl")])


def test_paper_grid_is_valid():
    spec = load_spec(Path(__file__).parents[2] / "jobs" / "paper-gsm8k.toml")
    assert spec.models == ("meta-llama/Llama-3.1-8B", "Qwen/Qwen2.5-7B")
    assert spec.budgets == (100, 250, 500, 1000, 2500, 5000, 10000, 20000)
    assert spec.sft_fractions == (1.0, 0.75, 0.5, 0.25, 0.1, 0.01, 0.0)
    assert spec.train["sft"]["finetune"] == "lora" and spec.train["sft"]["lora_r"] == 32
    assert spec.resources["sft"]["gpus_per_node"] == 8
