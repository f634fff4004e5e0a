"""`tldr`: Reddit TL;DR summarisation, scored by ROUGE-L F1 against the reference summary.

SFT and evaluation: UCL-DARK/openai-tldr-filtered ({"id", "subreddit", "title", "post",
"summary"}; train / test). Pairs: UCL-DARK/openai-tldr-summarisation-preferences
({"info": {"post", "title", "subreddit", ...}, "summaries": [{"text", "policy", "note"}, x2],
"choice": 0|1, ...}).
"""

from __future__ import annotations

from budgetlab.tasks.base import Task, field


def make_prompt(subreddit: str, title: str, post: str) -> str:
    return (f"Summarize this Reddit post in one or two sentences.\n\n"
            f"SUBREDDIT: r/{subreddit}\nTITLE: {title}\nPOST: {post.strip()}")


def _post_prompt(row: dict) -> str:
    return make_prompt(field(row, "subreddit"), field(row, "title"), field(row, "post"))


class TLDR(Task):
    name = "tldr"
    primary_metric = "rougeL_f1"
    max_new_tokens = 64
    stop_strings = ("\n\n",)
    sources = {
        "sft": ("UCL-DARK/openai-tldr-filtered", None, "train"),
        "preferences": ("UCL-DARK/openai-tldr-summarisation-preferences", None, "train"),
        "eval": ("UCL-DARK/openai-tldr-filtered", None, "test"),
    }

    def parse_sft(self, row):
        if "response" in row and "post" not in row:
            return super().parse_sft(row)
        return {"prompt": _post_prompt(row), "response": field(row, "summary").strip()}

    def parse_preference(self, row):
        if "chosen" in row and "info" not in row:
            return super().parse_preference(row)
        info = field(row, "info")
        if not isinstance(info, dict):
            raise ValueError("field 'info' is not an object")
        summaries = field(row, "summaries")
        choice = field(row, "choice")
        if not isinstance(summaries, list) or len(summaries) != 2:
            raise ValueError("field 'summaries' must hold exactly two summaries")
        if choice not in (0, 1):
            raise ValueError(f"field 'choice' must be 0 or 1, got {choice!r}")
        texts = [field(s, "text").strip() for s in summaries]
        return {"prompt": _post_prompt(info), "chosen": texts[choice],
                "rejected": texts[1 - choice]}

    def parse_eval(self, row):
        if "reference" in row:
            return {"prompt": field(row, "prompt"), "reference": field(row, "reference")}
        return {"prompt": _post_prompt(row), "reference": field(row, "summary").strip()}

    def score(self, prediction, example):
        return {"rougeL_f1": self._scorer().score(example["reference"], prediction)["rougeL"].fmeasure}

    def _scorer(self):
        if not hasattr(self, "_rouge"):
            from rouge_score import rouge_scorer

            self._rouge = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
        return self._rouge
