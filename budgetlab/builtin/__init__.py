"""Built-in base models, usable offline at once: `builtin:NAME` model references.

    from budgetlab.builtin import resolve
    path = resolve("arith-tiny")      # a local Hugging Face model + tokenizer directory
    path = resolve("arith-small")     # the same tokenizer and recipe, 3.1x the parameters

The weights ship in the package (budgetlab/builtin/<NAME>/). If they are missing (a trimmed
install), they are rebuilt deterministically into ~/.cache/budgetlab/builtin/<NAME> by
`python -m budgetlab.builtin.build NAME` (arith-tiny: 9-11 minutes on 2 busy CPU cores, one
thread; arith-small: see bench/RESULTS.md; bit-identical to the shipped weights).
"""

from __future__ import annotations

import os
from pathlib import Path

NAMES = ("arith-tiny", "arith-small")
_HERE = Path(__file__).resolve().parent


def _complete(path: Path) -> bool:
    return (path / "model.safetensors").exists() and (path / "tokenizer.json").exists()


def cache_dir(name: str) -> Path:
    root = os.environ.get("BUDGETLAB_CACHE") or Path.home() / ".cache" / "budgetlab"
    return Path(root) / "builtin" / name


def resolve(name: str) -> str:
    """Local directory of built-in model NAME (accepts "builtin:NAME" too)."""
    name = name.removeprefix("builtin:")
    if name not in NAMES:
        raise ValueError(f"unknown built-in model {name!r}; known: {', '.join(NAMES)}")
    shipped = _HERE / name
    if _complete(shipped):
        return str(shipped)
    cached = cache_dir(name)
    if not _complete(cached):
        from budgetlab.builtin.build import build

        build(name, cached)
    return str(cached)
