"""`ifeval`: verifiable instruction following (Tulu-3 persona data, Google's IFEval prompts).

SFT: allenai/tulu-3-sft-personas-instruction-following ({"id", "prompt", "messages",
"constraints"}). Pairs: allenai/tulu-3-pref-personas-instruction-following ({"id", "prompt",
"constraints", "chosen": [messages], "rejected": [messages], ...}). Evaluation: google/IFEval
({"key", "prompt", "instruction_id_list", "kwargs"}).

The checks are Google's instruction classes as packaged by `if-verifiable` (PyPI, offline);
all 25 IFEval instruction types are covered, and the per-prompt logic is lm-evaluation-harness's
(tasks/ifeval/utils.py: kwargs with falsy values dropped, an empty response follows nothing,
loose = the response or it without its first line, last line or both, each also without '*').
tests/tasks/test_ifeval_harness.py checks agreement with the harness's own code.
One type, length_constraints:number_sentences, needs NLTK's punkt data: where that is not
installed the instruction is counted as not followed (it stays in every denominator) and
reported as "instructions_uncheckable", never silently passed or dropped.
"""

from __future__ import annotations

from budgetlab.tasks.base import Task, field, last_message


def _registry():
    import langdetect

    from if_verifiable.ifeval.instructions_registry import INSTRUCTION_DICT

    langdetect.DetectorFactory.seed = 0  # language checks must not vary between runs
    return INSTRUCTION_DICT


def check_instructions(response: str, example: dict) -> dict[str, float]:
    """Per-prompt counts for IFEval's strict and loose accuracy, as the harness computes them."""
    from if_verifiable.common import get_loose_transformations

    registry = _registry()
    variants = get_loose_transformations(response)
    followed_strict = followed_loose = uncheckable = 0
    for inst_id, kwargs in zip(example["instruction_id_list"], example["kwargs"]):
        checker = registry[inst_id](inst_id)
        checker.build_description(**{k: v for k, v in (kwargs or {}).items() if v})
        args = checker.get_instruction_args()
        if args and "prompt" in args:
            checker.build_description(prompt=example["prompt"])
        try:
            strict = bool(response.strip()) and bool(checker.check_following(response))
            loose = strict or any(v.strip() and checker.check_following(v) for v in variants)
        except LookupError:  # NLTK data missing on this machine: not followed, and said so
            uncheckable += 1
            continue
        followed_strict += strict
        followed_loose += bool(loose)
    n = len(example["instruction_id_list"])
    return {
        "prompt_level_strict_acc": float(followed_strict == n),
        "prompt_level_loose_acc": float(followed_loose == n),
        "instructions": float(n),
        "instructions_followed_strict": float(followed_strict),
        "instructions_followed_loose": float(followed_loose),
        "instructions_uncheckable": float(uncheckable),
    }


class IFEval(Task):
    name = "ifeval"
    primary_metric = "prompt_level_strict_acc"
    max_new_tokens = 1024
    sources = {
        "sft": ("allenai/tulu-3-sft-personas-instruction-following", None, "train"),
        "preferences": ("allenai/tulu-3-pref-personas-instruction-following", None, "train"),
        "eval": ("google/IFEval", None, "train"),
    }

    def parse_sft(self, row):
        if "response" in row:
            return super().parse_sft(row)
        return {"prompt": field(row, "prompt"),
                "response": last_message(field(row, "messages"), "messages")}

    def parse_preference(self, row):
        chosen, rejected = field(row, "chosen"), field(row, "rejected")
        if isinstance(chosen, list):
            chosen = last_message(chosen, "chosen")
        if isinstance(rejected, list):
            rejected = last_message(rejected, "rejected")
        return {"prompt": field(row, "prompt"), "chosen": chosen, "rejected": rejected}

    def parse_eval(self, row):
        ids, kwargs = field(row, "instruction_id_list"), field(row, "kwargs")
        if not isinstance(ids, list) or not ids:
            raise ValueError("field 'instruction_id_list' must be a non-empty list")
        if not isinstance(kwargs, list) or len(kwargs) != len(ids):
            raise ValueError("field 'kwargs' must be a list with one entry per instruction")
        known = _registry()
        unknown = [i for i in ids if i not in known]
        if unknown:
            raise ValueError(f"unknown instruction id(s) {', '.join(unknown)}")
        return {"prompt": field(row, "prompt"), "key": row.get("key"),
                "instruction_id_list": list(ids), "kwargs": [{a: v for a, v in (k or {}).items() if v is not None}
                           for k in kwargs]}

    def score(self, prediction, example):
        return check_instructions(prediction, example)

    def aggregate(self, scores):
        out = super().aggregate(scores)
        total = sum(s["instructions"] for s in scores)
        # Instruction-level accuracy is over all instructions (micro average), as in the harness.
        out["inst_level_strict_acc"] = sum(s["instructions_followed_strict"] for s in scores) / max(total, 1)
        out["inst_level_loose_acc"] = sum(s["instructions_followed_loose"] for s in scores) / max(total, 1)
        # Totals, not means: how many instructions there were and how many could not be checked.
        out["instructions"] = total
        out["instructions_uncheckable"] = sum(s["instructions_uncheckable"] for s in scores)
        return out
