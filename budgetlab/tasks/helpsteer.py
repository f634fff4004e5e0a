"""`helpsteer`: helpfulness, scored by a reward model.

Source: nvidia/HelpSteer2 ({"prompt", "response", "helpfulness", "correctness", "coherence",
"complexity", "verbosity"}; train / validation). SFT takes the most helpful response of each
prompt; pairs are every two responses to the same prompt with different helpfulness ratings
(the higher one chosen). Evaluation prompts come from the validation split. The score is the
mean reward of `reward_model` (default Ray2333/gpt2-large-helpful-reward_model, any local path),
fed the Anthropic-HH frame the model was trained on.
"""

from __future__ import annotations

from itertools import combinations

from budgetlab.tasks.errors import TaskDataError
from budgetlab.tasks.base import Task, field

DEFAULT_REWARD_MODEL = "Ray2333/gpt2-large-helpful-reward_model"


def _rated(row: dict) -> dict:
    rating = field(row, "helpfulness")
    if not isinstance(rating, (int, float)) or isinstance(rating, bool):
        raise ValueError(f"field 'helpfulness' is {rating!r}, expected a number")
    return {"prompt": field(row, "prompt"), "response": field(row, "response"),
            "helpfulness": rating}


def _by_prompt(rows: list[dict]) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r["prompt"], []).append(r)
    return groups


class HelpSteer(Task):
    name = "helpsteer"
    primary_metric = "reward"
    max_new_tokens = 512
    sources = {
        "sft": ("nvidia/HelpSteer2", None, "train"),
        "preferences": ("nvidia/HelpSteer2", None, "train"),
        "eval": ("nvidia/HelpSteer2", None, "validation"),
    }
    model_sources = {"reward_model": (DEFAULT_REWARD_MODEL, None, None)}

    def parse_sft(self, row):
        return super().parse_sft(row) if "helpfulness" not in row else _rated(row)

    def parse_preference(self, row):
        if "chosen" in row and "helpfulness" not in row:
            return super().parse_preference(row)
        # Checked as an SFT-shaped row here; paired up across rows in finish().
        r = _rated(row)
        return {"prompt": r["prompt"], "chosen": r["response"], "rejected": "(unpaired)",
                "helpfulness": r["helpfulness"]}

    def parse_eval(self, row):
        return {"prompt": field(row, "prompt")}

    def finish(self, key, rows):
        if key == "sft" and rows and "helpfulness" in rows[0]:
            return [{"prompt": p, "response": max(g, key=lambda r: r["helpfulness"])["response"]}
                    for p, g in _by_prompt(rows).items()]
        if key == "preferences" and rows and "helpfulness" in rows[0]:
            pairs = []
            for p, group in _by_prompt(rows).items():
                for a, b in combinations(group, 2):
                    if a["helpfulness"] == b["helpfulness"] or a["chosen"] == b["chosen"]:
                        continue
                    hi, lo = (a, b) if a["helpfulness"] > b["helpfulness"] else (b, a)
                    pairs.append({"prompt": p, "chosen": hi["chosen"], "rejected": lo["chosen"]})
            return pairs
        return rows

    def score(self, prediction, example):
        return self.score_batch([prediction], [example])[0]

    def score_batch(self, predictions, examples, batch_size: int = 16):
        """Rewards in batches, on the eval stage's GPU when it has one (Task.device)."""
        import torch

        tokenizer, model = self._reward_model()
        device = self.device or "cpu"
        if next(model.parameters()).device != torch.device(device):
            model.to(device)
        rewards = []
        for i in range(0, len(predictions), batch_size):
            qs = [f"\n\nHuman: {e['prompt']} \n\nAssistant:" for e in examples[i:i + batch_size]]
            enc = tokenizer(qs, predictions[i:i + batch_size], return_tensors="pt", padding=True,
                            truncation=True, max_length=1024).to(device)
            with torch.no_grad():
                rewards += model(**enc).logits[:, 0].float().tolist()
        return [{"reward": r} for r in rewards]

    def _reward_model(self):
        if not hasattr(self, "_rm"):
            from transformers import AutoModelForSequenceClassification, AutoTokenizer

            ref = self.data.get("reward_model") or DEFAULT_REWARD_MODEL
            ref = _reward_model_ref(ref)
            tokenizer = AutoTokenizer.from_pretrained(ref)
            if tokenizer.pad_token is None:
                tokenizer.pad_token = tokenizer.eos_token
            model = AutoModelForSequenceClassification.from_pretrained(ref).eval()
            model.config.pad_token_id = tokenizer.pad_token_id
            self._rm = (tokenizer, model)
        return self._rm


def _reward_model_ref(ref: str) -> str:
    """A local reward model directory that is not there (moved, an unmounted share) is
    named with its spec key, not left to transformers' "Repo id must be ..." error."""
    from budgetlab.models import ModelRefError, resolve

    try:
        return resolve(ref)
    except ModelRefError as e:
        raise TaskDataError(f"data.helpsteer.reward_model: {ref}: {e} (unreachable?)") from None
