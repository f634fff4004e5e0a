"""`ifeval`: verifiable instruction following (Tulu-3 persona data, Google's IFEval prompts).

SFT: allenai/tulu-3-sft-personas-instruction-following ({"id", "prompt", "messages",
"constraints"}). Pairs: allenai/tulu-3-pref-personas-instruction-following ({"id", "prompt",
"constraints", "chosen": [messages], "rejected": [messages], ...}). Evaluation: google/IFEval
({"key", "prompt", "instruction_id_list", "kwargs"}).

The checks are Google's instruction classes as packaged by `if-verifiable` (PyPI, offline);
all 25 IFEval instruction types are covered. One of them, length_constraints:number_sentences,
needs NLTK's punkt data: where that is not installed it is counted as unscored
("instructions_unscored") and left out of the denominators, never silently passed.
"""

from __future__ import annotations

from budgetlab.tasks.base import Task, field, last_message


def _registry():
    import langdetect

    from if_verifiable.ifeval.instructions_registry import INSTRUCTION_DICT

    langdetect.DetectorFactory.seed = 0  # language checks must not vary between runs
    return INSTRUCTION_DICT


def check_instructions(response: str, example: dict) -> dict[str, float]:
    """Per-prompt counts for IFEval's strict and loose accuracy (Google's definitions)."""
    from if_verifiable.common import get_loose_transformations

    registry = _registry()
    variants = [v for v in get_loose_transformations(response) if v.strip()]
    followed_strict = followed_loose = scored = 0
    for inst_id, kwargs in zip(example["instruction_id_list"], example["kwargs"]):
        checker = registry[inst_id](inst_id)
        checker.build_description(**{k: v for k, v in (kwargs or {}).items() if v is not None})
        args = checker.get_instruction_args()
        if args and "prompt" in args:
            checker.build_description(prompt=example["prompt"])
        try:
            strict = bool(response.strip()) and bool(checker.check_following(response))
            loose = strict or any(checker.check_following(v) for v in variants)
        except LookupError:  # NLTK data missing on this machine
            continue
        scored += 1
        followed_strict += strict
        followed_loose += loose
    n = len(example["instruction_id_list"])
    return {
        "prompt_level_strict_acc": float(scored > 0 and followed_strict == scored),
        "prompt_level_loose_acc": float(scored > 0 and followed_loose == scored),
        "instructions": float(scored),
        "instructions_followed_strict": float(followed_strict),
        "instructions_followed_loose": float(followed_loose),
        "instructions_unscored": float(n - scored),
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
        # Instruction-level accuracy is over all instructions (micro average), as in IFEval.
        out["inst_level_strict_acc"] = sum(s["instructions_followed_strict"] for s in scores) / max(total, 1)
        out["inst_level_loose_acc"] = sum(s["instructions_followed_loose"] for s in scores) / max(total, 1)
        out["instructions_unscored"] = sum(s["instructions_unscored"] for s in scores)
        return out
