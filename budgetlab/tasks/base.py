"""The Task base class: sources, row checks, pools, prompt format and scoring hooks.

A task subclass declares `sources` (default hub dataset per data key), parses one raw row of
each source into canonical rows, and scores a prediction. This class does the rest: reading
local JSONL/Parquet files or hub datasets through `datasets`, checking every row (missing
field, empty text, chosen == rejected) with an error that names file and row, removing
duplicates and evaluation prompts from the training pools.
"""

from __future__ import annotations

import re
from pathlib import Path

from budgetlab.tasks import dedupe, kto_examples
from budgetlab.tasks.errors import TaskDataError

REQUIRED = {
    "sft": ("prompt", "response"),
    "preferences": ("prompt", "chosen", "rejected"),
    "eval": ("prompt",),
}
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+(@[\w.-]+)?$")


class MissingField(KeyError):
    pass


def field(row: dict, name: str):
    """row[name], or MissingField when absent or null (datasets fills absent keys with None)."""
    value = row.get(name)
    if value is None:
        raise MissingField(name)
    return value


def last_message(messages, name: str) -> str:
    """The content of the last message of a chat-format list (the assistant's answer)."""
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"field {name!r} is not a non-empty list of messages")
    last = messages[-1]
    if not isinstance(last, dict) or "content" not in last:
        raise ValueError(f"field {name!r}: last message has no 'content'")
    return last["content"]


class Task:
    name: str = ""
    primary_metric: str = ""
    max_new_tokens: int = 256
    stop_strings: tuple[str, ...] = ()
    system_prompt: str | None = None
    # data key -> (hub id, config name or None, split)
    sources: dict = {}

    def __init__(self, data: dict | None = None, skip_bad_rows: bool = False):
        self.data = dict(data or {})
        self.skip_bad_rows = skip_bad_rows
        self.skipped: dict[str, int] = {}          # data key -> rows skipped as bad
        self.removed_eval_overlap: dict[str, int] = {}
        self._cache: dict[str, list[dict]] = {}
        self.device: str | None = None   # where a scorer model runs (the eval stage sets it)

    # ---- pools ---------------------------------------------------------------------
    def sft_pool(self) -> list[dict]:
        """[{"prompt", "response"}], de-duplicated, without evaluation prompts."""
        return self._training("sft")

    def preference_pool(self) -> list[dict]:
        """[{"prompt", "chosen", "rejected"}], de-duplicated, without evaluation prompts."""
        return self._training("preferences")

    def kto_pool(self, pairs: list[dict] | None = None) -> list[dict]:
        """KTO examples derived from pairs (default: the whole preference pool)."""
        return kto_examples(self.preference_pool() if pairs is None else pairs)

    def eval_set(self) -> list[dict]:
        """[{"prompt", ...what score() needs}], one row per distinct prompt."""
        if "eval" not in self._cache:
            rows, seen = [], set()
            for row in self._rows("eval"):
                if row["prompt"] not in seen:
                    seen.add(row["prompt"])
                    rows.append(row)
            self._cache["eval"] = rows
        return self._cache["eval"]

    def _training(self, key: str) -> list[dict]:
        if key not in self._cache:
            rows = dedupe(self._rows(key))  # read first: a bad file fails before the hub is asked
            held_out = {r["prompt"] for r in self.eval_set()}
            kept = [r for r in rows if r["prompt"] not in held_out]
            self.removed_eval_overlap[key] = len(rows) - len(kept)
            self._cache[key] = kept
        return self._cache[key]

    # ---- reading and checking rows -------------------------------------------------
    def _rows(self, key: str) -> list[dict]:
        where, raw = self._read(key)
        parse = {"sft": self.parse_sft, "preferences": self.parse_preference,
                 "eval": self.parse_eval}[key]
        out, skipped = [], 0
        for i, row in enumerate(raw):
            try:
                parsed = parse(row)
                parsed = parsed if isinstance(parsed, list) else [parsed]
                for p in parsed:
                    self._check(key, p)
            except KeyError as e:  # MissingField, or a parser indexing a nested field
                reason = f"missing field {e.args[0]!r}"
            except (ValueError, TypeError) as e:
                reason = str(e)
            else:
                out.extend(parsed)
                continue
            if not self.skip_bad_rows:
                raise TaskDataError(f"{where}: row {i + 1}: {reason}")
            skipped += 1
        self.skipped[key] = skipped
        return self.finish(key, out)

    @staticmethod
    def _check(key: str, row: dict) -> None:
        for name in REQUIRED[key]:
            value = row.get(name)
            if value is None:
                raise MissingField(name)
            if not isinstance(value, str):
                raise ValueError(f"field {name!r} is {type(value).__name__}, expected text")
            if not value.strip():
                raise ValueError(f"empty {name!r}")
        if key == "preferences" and row["chosen"].strip() == row["rejected"].strip():
            raise ValueError("chosen and rejected are the same text")

    def finish(self, key: str, rows: list[dict]) -> list[dict]:
        """Hook for tasks whose rows combine across the file (HelpSteer pairs)."""
        return rows

    def _read(self, key: str) -> tuple[str, list[dict]]:
        """(description of the source, raw rows) for a data key."""
        source = self.data.get(key)
        if source is None:
            default = self.sources[key]
            if isinstance(default, str) and default.startswith("builtin:"):
                return default, self._load_builtin(key)
            hub_id, config, split = default
            return f"{hub_id} ({split})", load_hub(hub_id, config, split)
        return str(source), load_source(str(source), f"data.{self.name}.{key}")

    def _load_builtin(self, key: str) -> list[dict]:
        raise NotImplementedError

    # ---- per-task hooks ------------------------------------------------------------
    def parse_sft(self, row: dict) -> dict | list[dict]:
        return {"prompt": field(row, "prompt"), "response": field(row, "response")}

    def parse_preference(self, row: dict) -> dict | list[dict]:
        return {k: field(row, k) for k in ("prompt", "chosen", "rejected")}

    def parse_eval(self, row: dict) -> dict:
        raise NotImplementedError

    def format_prompt(self, tokenizer, prompt: str) -> str:
        """The tokenizer's chat template when it has one, else a plain Question/Answer frame."""
        if getattr(tokenizer, "chat_template", None):
            messages = [{"role": "user", "content": prompt}]
            if self.system_prompt:
                messages.insert(0, {"role": "system", "content": self.system_prompt})
            return tokenizer.apply_chat_template(messages, tokenize=False,
                                                 add_generation_prompt=True)
        return f"Question: {prompt}\nAnswer: "

    def score(self, prediction: str, example: dict) -> dict[str, float]:
        raise NotImplementedError

    def score_batch(self, predictions: list[str], examples: list[dict]) -> list[dict]:
        """Per-example scores; tasks with a model-based scorer batch it here."""
        return [self.score(p, e) for p, e in zip(predictions, examples)]

    def aggregate(self, scores: list[dict]) -> dict[str, float]:
        """Mean of each per-example score over the evaluated examples."""
        names = sorted({k for s in scores for k in s})
        return {k: sum(s.get(k, 0.0) for s in scores) / max(len(scores), 1) for k in names}


def load_source(source: str, what: str) -> list[dict]:
    """Rows of a local JSONL/JSON/Parquet file, or of a hub dataset id ("owner/name")."""
    path = Path(source).expanduser()
    if path.exists():
        if path.is_dir():
            raise TaskDataError(f"{what}: {source} is a directory, expected a .jsonl or "
                                f".parquet file")
        builder = "parquet" if path.suffix == ".parquet" else "json"
        import datasets
        from datasets import load_dataset

        datasets.disable_progress_bars()
        try:
            ds = load_dataset(builder, data_files=str(path.resolve()), split="train")
        except Exception as e:  # datasets wraps parse errors in several types
            cause = e.__cause__ or e
            raise TaskDataError(f"{source}: cannot read as {builder}: "
                                f"{str(cause).splitlines()[0] if str(cause) else type(cause).__name__}"
                                ) from None
        return ds.to_list()
    if path.suffix in (".jsonl", ".json", ".parquet") or not _HUB_ID.match(source):
        raise TaskDataError(f"{what}: file {source} does not exist")
    return load_hub(source, None, "train")


def load_hub(hub_id: str, config: str | None, split: str) -> list[dict]:
    """A hub dataset's split; "org/name@rev" loads that revision (stage ids hash it)."""
    from datasets import load_dataset

    from budgetlab.hub import split_ref

    name, revision = split_ref(hub_id)
    return load_dataset(name, config, split=split, revision=revision).to_list()
