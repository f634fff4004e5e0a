"""Tasks: where each grid point's data comes from and how its outputs are scored.

    from budgetlab.tasks import get_task, subset
    task = get_task("gsm8k", {"sft": "data/gsm8k_sft.jsonl"})   # None = the paper's hub sources
    sft = subset(task.sft_pool(), n=500, seed=0)                 # nested: a prefix of n=1000

Importing this package stays light (no torch, datasets or transformers): grid validation runs
on login nodes. The task modules import their heavy dependencies inside functions.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import random

from budgetlab.tasks.errors import TaskDataError

# name -> "module:Class"
_REGISTRY = {
    "gsm8k": "budgetlab.tasks.gsm8k:GSM8K",
    "ifeval": "budgetlab.tasks.ifeval:IFEval",
    "tldr": "budgetlab.tasks.tldr:TLDR",
    "helpsteer": "budgetlab.tasks.helpsteer:HelpSteer",
    "arith": "budgetlab.tasks.arith:Arith",
}
TASKS = tuple(_REGISTRY)

# The keys a grid's [data.TASK] table may set (local file or hub id per source).
DATA_KEYS = {
    "gsm8k": frozenset({"sft", "preferences", "eval"}),
    "ifeval": frozenset({"sft", "preferences", "eval"}),
    "tldr": frozenset({"sft", "preferences", "eval"}),
    "helpsteer": frozenset({"sft", "preferences", "eval", "reward_model"}),
    "arith": frozenset({"sft", "preferences", "eval"}),
}

__all__ = ["TASKS", "DATA_KEYS", "TaskDataError", "get_task", "subset", "kto_examples"]


def get_task(name: str, data: dict | None = None, skip_bad_rows: bool = False):
    """The task `name` with optional local sources {"sft"|"preferences"|"eval": path}."""
    if name not in _REGISTRY:
        raise TaskDataError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")
    data = {k: v for k, v in (data or {}).items() if v is not None}
    unknown = sorted(set(data) - DATA_KEYS[name])
    if unknown:
        raise TaskDataError(f"task {name}: unknown data key(s) {', '.join(unknown)}; "
                            f"allowed: {', '.join(sorted(DATA_KEYS[name]))}")
    module, cls = _REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), cls)(data, skip_bad_rows=skip_bad_rows)


def _key(row: dict) -> str:
    return json.dumps(row, sort_keys=True, ensure_ascii=False)


def dedupe(rows: list[dict]) -> list[dict]:
    """Drop exact duplicate rows, keeping the first occurrence (order preserved)."""
    seen, out = set(), []
    for row in rows:
        k = _key(row)
        if k not in seen:
            seen.add(k)
            out.append(row)
    return out


def subset(pool: list[dict], n: int, seed: int) -> list[dict]:
    """The first n rows of a seed-fixed permutation of the de-duplicated pool.

    Nested by construction: subset(p, 500, s) == subset(p, 1000, s)[:500].
    """
    if not isinstance(n, int) or n < 0:
        raise TaskDataError(f"subset size must be a non-negative integer, got {n!r}")
    rows = dedupe(pool)
    if n > len(rows):
        raise TaskDataError(f"asked for {n} examples but the pool has only {len(rows)} "
                            f"(after removing duplicates and evaluation prompts)")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    return [rows[i] for i in order[:n]]


def kto_examples(pairs: list[dict]) -> list[dict]:
    """KTO's unpaired examples from preference pairs: chosen is desirable, rejected is not."""
    out = []
    for p in pairs:
        out.append({"prompt": p["prompt"], "completion": p["chosen"], "label": True})
        out.append({"prompt": p["prompt"], "completion": p["rejected"], "label": False})
    return out


def check_local_sources(name: str, data: dict) -> None:
    """Read and check every row of a task's local data files before anything is written
    (submit runs this on the login node; the worker would otherwise find a bad row only
    after the ledger and the queue were filled). TaskDataError names the file and line/row."""
    from pathlib import Path

    task = get_task(name, data)
    for key, source in task.data.items():
        if key not in ("sft", "preferences", "eval") or not Path(str(source)).is_file():
            continue  # hub ids are read on the compute node
        path = Path(str(source))
        if path.suffix == ".jsonl":
            _check_jsonl_lines(path)
        if importlib.util.find_spec("datasets") is not None:
            # Row checks read through `datasets`; a login node with the core install only
            # gets the line checks above, and the worker checks the rows again anyway.
            task._rows(key)


def _check_jsonl_lines(path) -> None:
    """Line-level errors with their line number (the datasets reader does not give one)."""
    raw = path.read_bytes()
    if not raw.strip():
        raise TaskDataError(f"{path}: empty file")
    for i, line in enumerate(raw.split(b"\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError:
            raise TaskDataError(f"{path}: line {i}: not UTF-8 text") from None
        except json.JSONDecodeError as e:
            raise TaskDataError(f"{path}: line {i}: not JSON ({e.msg}, column {e.colno})") from None
        if not isinstance(row, dict):
            raise TaskDataError(f"{path}: line {i}: expected a JSON object, got "
                                f"{type(row).__name__}")


def default_sources(name: str) -> dict:
    """A task's default source per data key: (hub id, config, split) or "builtin:...";
    what a stage id hashes when the grid does not replace the source."""
    module, cls = _REGISTRY[name].split(":")
    task = getattr(importlib.import_module(module), cls)
    return {**task.sources, **getattr(task, "model_sources", {})}
