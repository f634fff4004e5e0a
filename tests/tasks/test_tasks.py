"""Tasks: fixtures in the hub schemas, nested subsets, scorers, bad input."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from budgetlab.tasks import DATA_KEYS, TASKS, TaskDataError, get_task, kto_examples, subset
from budgetlab.tasks.gsm8k import score_numeric

FIX = Path(__file__).resolve().parents[1] / "fixtures"
DATA = {
    "gsm8k": {"sft": "gsm8k_sft.jsonl", "preferences": "gsm8k_pref.jsonl", "eval": "gsm8k_test.jsonl"},
    "ifeval": {"sft": "ifeval_sft.jsonl", "preferences": "ifeval_pref.jsonl", "eval": "ifeval_eval.jsonl"},
    "tldr": {"sft": "tldr_sft.jsonl", "preferences": "tldr_pref.jsonl", "eval": "tldr_test.jsonl"},
    "helpsteer": {"sft": "helpsteer_train.jsonl", "preferences": "helpsteer_train.jsonl",
                  "eval": "helpsteer_val.jsonl"},
}


def fixture_task(name):
    return get_task(name, {k: str(FIX / v) for k, v in DATA[name].items()})


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_import_is_light():
    code = ("import sys, budgetlab.tasks as t; assert len(t.TASKS) == 5; "
            "heavy = [m for m in ('torch', 'datasets', 'transformers') if m in sys.modules]; "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_registry():
    assert set(TASKS) == {"gsm8k", "ifeval", "tldr", "helpsteer", "arith"}
    assert DATA_KEYS["helpsteer"] == {"sft", "preferences", "eval", "reward_model"}
    assert all({"sft", "preferences", "eval"} <= DATA_KEYS[t] for t in TASKS)


@pytest.mark.parametrize("name", sorted(DATA))
def test_fixture_pools_have_canonical_rows(name):
    task = fixture_task(name)
    for row in task.sft_pool():
        assert set(row) == {"prompt", "response"} and row["response"].strip()
    for row in task.preference_pool():
        assert set(row) == {"prompt", "chosen", "rejected"} and row["chosen"] != row["rejected"]
    held_out = {e["prompt"] for e in task.eval_set()}
    assert not held_out & {r["prompt"] for r in task.sft_pool() + task.preference_pool()}


def test_gsm8k_rows_dedupe_and_eval_exclusion():
    task = fixture_task("gsm8k")
    sft = task.sft_pool()
    # 2 + 1 + 1 correct solutions, the repeated row removed, the evaluation question removed
    assert len(sft) == 4
    assert task.removed_eval_overlap["sft"] == 1
    # every correct x incorrect: 1x2 + 2x1
    assert len(task.preference_pool()) == 4
    ev = task.eval_set()
    assert [e["answer"] for e in ev] == ["18", "3", "70000"]


@pytest.mark.parametrize("text,answer,strict,flexible,numeric", [
    # lm-evaluation-harness's gsm8k: '#### <digits>' strict, the last number flexible,
    # compared as text after dropping ',', '$' and a final '.'; numeric_match is our lenient one.
    ("so 9*2 = 18.\n#### 18", "18", 1, 1, 1),
    ("#### $70,000", "70000", 0, 1, 1),
    ("#### 70,000", "70000", 1, 1, 1),
    ("The answer is 70,000.", "70000", 0, 1, 0),
    ("#### 17\nwait, 18", "18", 0, 1, 0),
    ("#### 18.00", "18", 0, 0, 1),
    ("####18", "18", 0, 1, 1),
    ("#### 1766.00 apples", "1766", 0, 0, 1),
    ("no number here", "3", 0, 0, 0),
    ("#### -4", "-4", 1, 1, 1),
])
def test_gsm8k_scores(text, answer, strict, flexible, numeric):
    assert score_numeric(text, answer) == {"strict_match": strict, "flexible_extract": flexible,
                                           "numeric_match": numeric}
    assert get_task("gsm8k").score(text, {"answer": answer})["strict_match"] == strict


def test_ifeval_scores_instructions():
    task = fixture_task("ifeval")
    lower, forbidden, quoted = task.eval_set()
    assert task.score("the sea is calm and blue", lower)["prompt_level_strict_acc"] == 1.0
    assert task.score("The Sea is calm", lower)["prompt_level_strict_acc"] == 0.0
    s = task.score("apple, cherry and banana are fruits", forbidden)
    assert s["instructions"] == 2 and s["instructions_followed_strict"] == 1
    assert s["prompt_level_strict_acc"] == 0.0
    good = task.score("apple, cherry and grape are fruits", forbidden)
    assert good["prompt_level_strict_acc"] == 1.0
    assert task.score('"Rain falls from clouds."', quoted)["prompt_level_strict_acc"] == 1.0
    agg = task.aggregate([s, good])
    assert agg["inst_level_strict_acc"] == pytest.approx(3 / 4)
    assert agg["prompt_level_strict_acc"] == pytest.approx(1 / 2)


def test_ifeval_uncheckable_instruction_counts_as_not_followed():
    """number_sentences needs NLTK's punkt data: without it the instruction is not followed,
    stays in the denominators and is counted; with it, it is checked."""
    import nltk

    task = get_task("ifeval")
    example = task.parse_eval({"prompt": "Write two sentences.", "instruction_id_list": [
        "length_constraints:number_sentences", "change_case:english_lowercase"],
        "kwargs": [{"relation": "less than", "num_sentences": 3}, {}]})
    s = task.score("the sea is calm. the sky is blue.", example)
    assert s["instructions"] == 2
    try:
        nltk.data.load("nltk:tokenizers/punkt/english.pickle")   # what the check loads
        have_punkt = True
    except LookupError:
        have_punkt = False
    if have_punkt:
        assert s["instructions_uncheckable"] == 0 and s["prompt_level_strict_acc"] == 1.0
    else:
        assert s["instructions_uncheckable"] == 1
        assert s["instructions_followed_strict"] == 1 and s["prompt_level_strict_acc"] == 0.0
    agg = task.aggregate([s])
    assert agg["instructions"] == 2
    assert agg["inst_level_strict_acc"] == (1.0 if have_punkt else 0.5)


def test_ifeval_unknown_instruction_is_an_error(tmp_path):
    bad = write_jsonl(tmp_path / "ev.jsonl", [{"key": 1, "prompt": "x",
                                               "instruction_id_list": ["made:up"], "kwargs": [{}]}])
    with pytest.raises(TaskDataError, match=r"ev.jsonl: row 1: unknown instruction id\(s\) made:up"):
        get_task("ifeval", {"eval": bad}).eval_set()


def test_tldr_prompt_and_rouge():
    task = fixture_task("tldr")
    pref = task.preference_pool()
    assert pref[0]["chosen"].startswith("Roommate keeps eating")   # choice = 1
    assert pref[1]["chosen"].startswith("Money vs commute")        # choice = 0
    ex = task.eval_set()[0]
    assert "SUBREDDIT: r/cats" in ex["prompt"] and "TITLE: Cat won't sleep" in ex["prompt"]
    assert task.score(ex["reference"], ex)["rougeL_f1"] == pytest.approx(1.0)
    assert task.score("bread", ex)["rougeL_f1"] == 0.0


def test_helpsteer_pairs_from_ratings():
    task = fixture_task("helpsteer")
    pairs = task.preference_pool()
    # Q1: 4 vs 1 -> one pair; Q2: ratings 3, 1, 3 -> two pairs (equal ratings are not a pair)
    assert len(pairs) == 3
    assert all(p["rejected"] in ("France.", "Sleep more.") for p in pairs)
    sft = {r["prompt"]: r["response"] for r in task.sft_pool()}
    assert sft["What is the capital of France?"] == "The capital of France is Paris."
    assert len(task.eval_set()) == 2  # distinct validation prompts


def test_parquet_source(tmp_path):
    import datasets

    path = tmp_path / "sft.parquet"
    datasets.Dataset.from_json(str(FIX / "gsm8k_sft.jsonl")).to_parquet(str(path))
    task = get_task("gsm8k", {"sft": str(path), "eval": str(FIX / "gsm8k_test.jsonl")})
    assert len(task.sft_pool()) == 4


def test_canonical_local_schema(tmp_path):
    sft = write_jsonl(tmp_path / "s.jsonl", [{"prompt": "1+1?", "response": "#### 2"}])
    ev = write_jsonl(tmp_path / "e.jsonl", [{"prompt": "2+2?", "answer": "4"}])
    task = get_task("gsm8k", {"sft": sft, "eval": ev})
    assert task.sft_pool() == [{"prompt": "1+1?", "response": "#### 2"}]
    assert task.eval_set() == [{"prompt": "2+2?", "answer": "4"}]


# ---- bad input -------------------------------------------------------------------------

def test_unknown_task():
    with pytest.raises(TaskDataError, match="unknown task 'gsm9k'; known tasks: gsm8k"):
        get_task("gsm9k")


def test_unknown_data_key():
    with pytest.raises(TaskDataError, match="task arith: unknown data key.*reward_model"):
        get_task("arith", {"reward_model": "x"})


def test_missing_file(tmp_path):
    with pytest.raises(TaskDataError, match=r"data.gsm8k.sft: file .*nope.jsonl does not exist"):
        get_task("gsm8k", {"sft": str(tmp_path / "nope.jsonl")}).sft_pool()
    with pytest.raises(TaskDataError, match=r"data.tldr.eval: file .*missing.parquet does not exist"):
        get_task("tldr", {"eval": str(tmp_path / "missing.parquet")}).eval_set()


@pytest.mark.parametrize("rows,message", [
    ([{"prompt": "a", "response": "b"}, {"prompt": "c"}], "row 2: missing field 'response'"),
    ([{"prompt": "a", "response": "  "}], "row 1: empty 'response'"),
    ([{"response": "b"}], "row 1: missing field 'prompt'"),
])
def test_bad_sft_rows(tmp_path, rows, message):
    path = write_jsonl(tmp_path / "sft.jsonl", rows)
    task = get_task("arith", {"sft": path})
    with pytest.raises(TaskDataError, match=f"sft.jsonl: {message}"):
        task.sft_pool()


def test_chosen_equals_rejected(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "a", "chosen": "x", "rejected": "y"},
        {"prompt": "b", "chosen": "same", "rejected": "same"}])
    with pytest.raises(TaskDataError, match="p.jsonl: row 2: chosen and rejected are the same text"):
        get_task("arith", {"preferences": path}).preference_pool()


def test_hub_schema_bad_row_named(tmp_path):
    path = write_jsonl(tmp_path / "g.jsonl", [
        {"prompt": "q", "correct": ["#### 1"], "incorrect": ["#### 2"]},
        {"prompt": "q2", "correct": ["#### 1"], "incorrect": [""]}])
    with pytest.raises(TaskDataError, match="g.jsonl: row 2: empty 'rejected'"):
        get_task("gsm8k", {"preferences": path, "eval": str(FIX / "gsm8k_test.jsonl")}).preference_pool()


def test_skip_bad_rows_counts(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "a", "chosen": "x", "rejected": "y"},
        {"prompt": "b", "chosen": "same", "rejected": "same"},
        {"prompt": "c", "chosen": "z"}])
    task = get_task("arith", {"preferences": path}, skip_bad_rows=True)
    assert task.preference_pool() == [{"prompt": "a", "chosen": "x", "rejected": "y"}]
    assert task.skipped["preferences"] == 2


def test_not_json(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"prompt": "a", "response": "b"}\n{"prompt": \n')
    with pytest.raises(TaskDataError, match="broken.jsonl: cannot read as json"):
        get_task("arith", {"sft": str(path)}).sft_pool()


# ---- subsets ---------------------------------------------------------------------------

@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(0, 30), max_size=60), st.integers(0, 3), st.data())
def test_subset_nested_and_unique(values, seed, data):
    pool = [{"prompt": str(v), "response": "r"} for v in values]
    unique = len({v for v in values})
    n = data.draw(st.integers(0, unique))
    m = data.draw(st.integers(n, unique))
    small, big = subset(pool, n, seed), subset(pool, m, seed)
    assert big[:n] == small
    assert len({r["prompt"] for r in big}) == m
    assert subset(pool, m, seed) == big  # deterministic


def test_subset_seed_changes_order_and_too_large():
    pool = [{"prompt": str(i), "response": "r"} for i in range(50)]
    assert subset(pool, 10, 0) != subset(pool, 10, 1)
    with pytest.raises(TaskDataError, match="asked for 51 examples but the pool has only 50"):
        subset(pool, 51, 0)


def test_kto_examples():
    out = kto_examples([{"prompt": "p", "chosen": "c", "rejected": "r"}])
    assert out == [{"prompt": "p", "completion": "c", "label": True},
                   {"prompt": "p", "completion": "r", "label": False}]
    assert get_task("arith").kto_pool(get_task("arith").preference_pool()[:3])[1]["label"] is False


# ---- arith -----------------------------------------------------------------------------

def test_arith_pools():
    task = get_task("arith")
    sft, pairs, ev = task.sft_pool(), task.preference_pool(), task.eval_set()
    assert len(sft) > 3900 and len(pairs) > 3900 and len(ev) == 200
    assert not {e["prompt"] for e in ev} & {r["prompt"] for r in sft + pairs}
    for r in sft[:50]:
        eq = r["response"].split(".")[0]
        assert eval(eq.split("=")[0]) == int(eq.split("=")[1])
    for p in pairs[:200]:
        assert task.score(p["chosen"], {"answer": p["chosen"].split("#### ")[1]})["accuracy"] == 1
        lhs, rhs = p["rejected"].split(".")[0].split("=")
        assert eval(lhs) != int(rhs) or lhs != p["chosen"].split("=")[0]  # wrong arithmetic
    assert get_task("arith").sft_pool() == sft  # generated deterministically


def test_format_prompt_plain_and_chat():
    class Plain:
        chat_template = None

    class Chat:
        chat_template = "x"

        def apply_chat_template(self, messages, tokenize, add_generation_prompt):
            assert not tokenize and add_generation_prompt
            return "|".join(f"{m['role']}:{m['content']}" for m in messages) + "|assistant:"

    assert fixture_task("tldr").format_prompt(Plain(), "hi") == "Question: hi\nAnswer: "
    assert fixture_task("tldr").format_prompt(Chat(), "hi") == "user:hi|assistant:"
    assert get_task("gsm8k").format_prompt(Chat(), "hi").startswith("system:Solve")
    assert get_task("arith").format_prompt(Chat(), "hi") == "Q: hi A: "
