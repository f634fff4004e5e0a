"""`gsm8k`: grade-school maths with GPT-4o solutions (the paper's main task).

SFT rows: mohit-raghavendra/gsm8k-gpt4ogenerations, one row per correct solution
({"prompt", "correct": [...], "reference_answer", ...}). Pairs: mohit-raghavendra/
gsm8k-gpt4opreferences, every correct x incorrect solution of a prompt. Evaluation: openai/gsm8k
test ({"question", "answer": "... #### 72"}). Local files may use those schemas or the canonical
{"prompt", "response"} / {"prompt", "chosen", "rejected"} / {"prompt", "answer"}.
"""

from __future__ import annotations

import re

from budgetlab.tasks.base import Task, field

# lm-evaluation-harness, tasks/gsm8k/gsm8k.yaml (0.4.x): the two filters and the exact_match
# normalisation, reproduced here so that evaluation needs no lm-eval at run time
# (tests/tasks/test_gsm8k_harness.py checks per-item agreement with the harness's own code).
STRICT_PATTERN = r"#### (\-?[0-9\.\,]+)"                  # "strict-match", take_first
FLEXIBLE_PATTERN = r"(-?[$0-9.,]{2,})|(-?[0-9]+)"          # "flexible-extract", group_select -1
REGEXES_TO_IGNORE = (",", "\\$", "(?s).*#### ", "\\.$")     # exact_match, ignore_case
FALLBACK = "[invalid]"
_STRICT = re.compile(STRICT_PATTERN)
_FLEXIBLE = re.compile(FLEXIBLE_PATTERN)
_IGNORE = tuple(re.compile(r) for r in REGEXES_TO_IGNORE)


def extract(pattern: re.Pattern, text: str, group_select: int) -> str:
    """The harness's RegexFilter on one response: the group_select-th match; of a match with
    several groups, the first non-empty one; stripped; FALLBACK when nothing matches."""
    matches = pattern.findall(text)
    if not matches:
        return FALLBACK
    match = matches[group_select]
    if isinstance(match, tuple):
        match = next((m for m in match if m), FALLBACK)
    return match.strip()


def harness_normalize(text: str) -> str:
    """exact_match's normalisation with gsm8k's regexes_to_ignore and ignore_case."""
    for r in _IGNORE:
        text = r.sub("", text)
    return text.lower()


def normalize_number(text: str) -> str:
    """'$1,234.00.' -> '1234'; strings that are not numbers come back stripped."""
    s = text.strip().replace(",", "").replace("$", "").rstrip(".")
    try:
        value = float(s)
    except ValueError:
        return s
    return str(int(value)) if value == int(value) else repr(value)


def score_numeric(prediction: str, answer: str) -> dict[str, float]:
    """GSM8k as lm-evaluation-harness scores it, plus a lenient numeric metric:

    strict_match      the first '#### <number>' equals the answer after the harness's
                      normalisation (drop ',', '$', a trailing '.'; case-insensitive)
    flexible_extract  the last number-like span (harness 'flexible-extract') likewise
    numeric_match     the number after '####' (spaces and '$' allowed) equals the answer as a
                      number ('#### 18.00' counts for 18); budgetlab's own, not the harness's
    """
    target = harness_normalize(answer)
    lenient = re.search(r"####\s*\$?\s*(-?[0-9][0-9.,]*)", prediction)
    return {
        "strict_match": float(harness_normalize(extract(_STRICT, prediction, 0)) == target),
        "flexible_extract": float(harness_normalize(extract(_FLEXIBLE, prediction, -1)) == target),
        "numeric_match": float(bool(lenient) and normalize_number(lenient.group(1))
                               == normalize_number(answer)),
    }


def _text_list(row: dict, name: str) -> list[str]:
    value = field(row, name)
    if not isinstance(value, list):
        raise ValueError(f"field {name!r} is not a list")
    return value


class GSM8K(Task):
    name = "gsm8k"
    primary_metric = "strict_match"
    max_new_tokens = 512
    stop_strings = ("Question:",)
    system_prompt = ("Solve the maths problem step by step. End with the final numeric answer "
                     "on its own line as '#### <number>'.")
    sources = {
        "sft": ("mohit-raghavendra/gsm8k-gpt4ogenerations", None, "train"),
        "preferences": ("mohit-raghavendra/gsm8k-gpt4opreferences", None, "train"),
        "eval": ("openai/gsm8k", "main", "test"),
    }

    def parse_sft(self, row):
        if "response" in row and "correct" not in row:
            return super().parse_sft(row)
        prompt = field(row, "prompt")
        return [{"prompt": prompt, "response": c} for c in _text_list(row, "correct")]

    def parse_preference(self, row):
        if "chosen" in row and "correct" not in row:
            return super().parse_preference(row)
        prompt = field(row, "prompt")
        correct, incorrect = _text_list(row, "correct"), _text_list(row, "incorrect")
        return [{"prompt": prompt, "chosen": c, "rejected": r} for c in correct for r in incorrect]

    def parse_eval(self, row):
        if "question" in row or "prompt" not in row:
            answer = field(row, "answer")
            if "####" not in answer:
                raise ValueError("field 'answer' has no '#### <number>' final answer")
            return {"prompt": field(row, "question"), "answer": answer.split("####")[-1].strip()}
        return {"prompt": field(row, "prompt"), "answer": str(field(row, "answer"))}

    def score(self, prediction, example):
        return score_numeric(prediction, example["answer"])
