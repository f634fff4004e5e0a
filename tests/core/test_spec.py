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
    (GOOD_SPEC + "[train.kto]\nbatch_unit = 'tokens'\n", "train.kto.batch_unit", "one of"),
    (GOOD_SPEC.replace("[train]\n", "[train]\nbatch_unit = 'pairs'\n"), "train.batch_unit",
     "unknown key"),
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
    (GOOD_SPEC + "\n[resources.sft]\ntime_min = 1\nsignal_before_s = 60\n",
     "resources.sft.signal_before_s", "less than the time limit (60 s)"),
    (GOOD_SPEC + "\n[slurm]\npartition = 3\n", "slurm.partition", "non-empty string"),
    (GOOD_SPEC + "\n[eval]\nlimit = 5\n", "", "invalid TOML"),  # table defined twice
    ("name = 't'\n[grid\n", "", "invalid TOML"),
    (_edit("max_length = 128", "max_length = 128.5"), "train.max_length", "integer"),
    # the evaluation protocol
    (_edit("limit = 20", 'limit = 20\nchat_template = "llama"'), "eval.chat_template",
     "must be one of"),
    (_edit("limit = 20", 'limit = 20\nprompt_template = "Q:"'), "eval.prompt_template",
     "{prompt}"),
    (_edit("limit = 20", "limit = 20\nsystem_prompt = 3"), "eval.system_prompt", "string"),
    (_edit("limit = 20", "limit = 20\ntemperature = -0.5"), "eval.temperature", ">= 0"),
    (_edit("limit = 20", "limit = 20\ntemperature = 0.5\ntop_p = 0"), "eval.top_p", "> 0"),
    (_edit("limit = 20", "limit = 20\ntemperature = 0.5\ntop_p = 1.5"), "eval.top_p", "<= 1"),
    (_edit("limit = 20", "limit = 20\ntemperature = 0.5\nseed = -1"), "eval.seed", ">= 0"),
    (_edit("limit = 20", "limit = 20\ntemperature = 0.5\nsamples = 0"), "eval.samples", ">= 1"),
    (_edit("limit = 20", "limit = 20\nsamples = 4"), "eval.samples", "temperature > 0"),
    (_edit("limit = 20", "limit = 20\ntop_p = 0.9"), "eval.top_p", "temperature > 0"),
    (_edit("limit = 20", "limit = 20\nseed = 3"), "eval.seed", "temperature > 0"),
    (_edit("limit = 20", 'limit = 20\nchat_template = "none"\nsystem_prompt = "Be brief."'),
     "eval.system_prompt", "needs a chat template"),
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


def _eval_ids(write_spec, extra: str) -> set:
    from budgetlab.graph import build_plan

    plan = build_plan(load_spec(write_spec(_edit("limit = 20", "limit = 20\n" + extra))))
    return {sid for sid, st in plan.stages.items() if st.kind == "eval"}


def test_eval_protocol_is_part_of_the_eval_stage_id(write_spec):
    unset = _eval_ids(write_spec, "")
    # Defaults written out are the same stages as defaults left unset (and as before the keys).
    assert _eval_ids(write_spec, 'chat_template = "auto"\nprompt_template = "{prompt}"\n'
                     "temperature = 0\ntop_p = 1\nseed = 0\nsamples = 1") == unset
    sampled = _eval_ids(write_spec, "temperature = 0.5\ntop_p = 0.9")
    assert len(sampled) == len(unset) and not sampled & unset
    for extra in ("top_p = 0.9\nseed = 1", "top_p = 0.9\nsamples = 3", "top_p = 0.95"):
        other = _eval_ids(write_spec, "temperature = 0.5\n" + extra)
        assert not other & sampled, extra
    for extra in ('chat_template = "chatml"', 'system_prompt = "Be brief."',
                  'prompt_template = "Question: {prompt}\\nAnswer:"'):
        assert not _eval_ids(write_spec, extra) & unset, extra
    # The training stages do not change with the evaluation protocol.
    from budgetlab.graph import build_plan

    a = build_plan(load_spec(write_spec()))
    b = build_plan(load_spec(write_spec(_edit("limit = 20", "limit = 20\ntemperature = 0.5"))))
    assert ({k for k, s in a.stages.items() if s.kind != "eval"}
            == {k for k, s in b.stages.items() if s.kind != "eval"})


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
    # the authors' evaluation protocol (0-shot, ChatML with their system prompt, sampled)
    assert spec.eval["chat_template"] == "chatml"
    assert spec.eval["temperature"] == 0.5 and spec.eval["top_p"] == 0.9
    assert spec.eval["system_prompt"].endswith("#### <Final numerical answer>")


def test_estimate_counts_every_sample():
    """k samples per prompt decode k times: k times the eval's GPU-hours (hand-computed)."""
    from budgetlab.datamodel import Stage
    from budgetlab.estimate import MFU, PEAK_FLOPS, TOKENS_PER_EXAMPLE, stage_gpu_hours

    def hours(**params):
        st = Stage("e", "eval", "gsm8k", "org/Model-7B", None, None, None,
                   params={"limit": 100, "max_new_tokens": 256, **params},
                   resources={"gpus_per_node": 1})
        return stage_gpu_hours(st)

    one = 2 * 7e9 * 100 * (TOKENS_PER_EXAMPLE + 256) * 10 / (PEAK_FLOPS * MFU) / 3600
    assert hours() == pytest.approx(one)
    assert hours(samples=4, temperature=0.5) == pytest.approx(4 * one)


# KTO stage ids of GOOD_SPEC as main computed them before [train.kto] batch_unit existed
# (budgetlab 07134ec), when KTO's batch_size counted examples.
KTO_IDS_BEFORE_BATCH_UNIT = {
    "353df5f345dd2869", "694b3471e4ae6e69", "7d24bdc57edf37a3", "860b60b92fd03410",
    "bde95846621b4342", "c635fe1636ffcbea", "dac358ccf66f7c47", "f73e4bdc22c926b8"}


def test_kto_batch_unit_pairs_by_default_and_examples_keeps_the_old_ids(write_spec):
    from budgetlab.graph import build_plan

    def kto(text):
        plan = build_plan(load_spec(write_spec(text)))
        return {s.stage_id: s.params for s in plan.stages.values() if s.kind == "kto"}

    default = kto(GOOD_SPEC)
    assert {p["batch_unit"] for p in default.values()} == {"pairs"}
    assert not set(default) & KTO_IDS_BEFORE_BATCH_UNIT  # a new meaning gets new ids
    old = kto(GOOD_SPEC + "[train.kto]\nbatch_unit = 'examples'\n")
    assert set(old) == KTO_IDS_BEFORE_BATCH_UNIT and all("batch_unit" not in p for p in old.values())
    assert kto(GOOD_SPEC + "[train.kto]\nbatch_unit = 'pairs'\n") == default
