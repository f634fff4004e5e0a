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

_STRICT = re.compile(r"####\s*\$?\s*(-?[0-9][0-9.,]*)")
_NUMBER = re.compile(r"-?\$?[0-9][0-9.,]*")


def normalize_number(text: str) -> str:
    """'$1,234.00.' -> '1234'; strings that are not numbers come back stripped."""
    s = text.strip().replace(",", "").replace("$", "").rstrip(".")
    try:
        value = float(s)
    except ValueError:
        return s
    return str(int(value)) if value == int(value) else repr(value)


def score_numeric(prediction: str, answer: str) -> dict[str, float]:
    """Exact match of the number after '####' (strict) and of the last number (flexible)."""
    target = normalize_number(answer)
    strict = _STRICT.search(prediction)
    numbers = _NUMBER.findall(prediction)
    return {
        "exact_match_strict": float(bool(strict) and normalize_number(strict.group(1)) == target),
        "exact_match_flexible": float(bool(numbers) and normalize_number(numbers[-1]) == target),
    }


def _text_list(row: dict, name: str) -> list[str]:
    value = field(row, name)
    if not isinstance(value, list):
        raise ValueError(f"field {name!r} is not a list")
    return value


class GSM8K(Task):
    name = "gsm8k"
    primary_metric = "exact_match_strict"
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
