"""Model references -> tokenizers and causal LMs (transformers; peft for LoRA adapters).

A reference is one of:
    builtin:NAME     a toy model shipped with budgetlab (budgetlab.builtin.resolve(NAME))
    a local path     a Hugging Face model directory, e.g. a previous stage's model/
    a hub id         "org/name", loaded by transformers (downloaded or from its cache)

Training stages export full (merged) weights to model/, so any stage's model/ is a plain
Hugging Face directory. A directory holding only a LoRA adapter (adapter_config.json) is
also accepted: the base recorded in the adapter config is loaded and the adapter merged.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

_WEIGHT_FILES = ("config.json", "adapter_config.json")


class ModelRefError(ValueError):
    """A model reference that cannot be used (missing path, unknown builtin)."""


def _looks_like_path(ref: str) -> bool:
    # Hub ids are "name" or "org/name"; anything with more segments or a path prefix is local.
    return (ref.startswith(("/", "./", "../", "~")) or ref.count("/") > 1
            or os.sep != "/" and os.sep in ref)


def resolve(ref: str | os.PathLike) -> str:
    """The string transformers should load: a local directory or a hub id.

    A reference that names a local path which does not exist, or exists without a
    config.json / adapter_config.json, raises ModelRefError naming the path.
    """
    ref = str(ref)
    if not ref.strip():
        raise ModelRefError("model reference is empty")
    if ref.startswith("builtin:"):
        from budgetlab import builtin  # written by the tasks engineer; imported only when needed

        path = Path(builtin.resolve(ref[len("builtin:"):]))
        return _check_dir(path, ref)
    path = Path(ref).expanduser()
    if path.exists() or _looks_like_path(ref):
        return _check_dir(path, ref)
    return ref  # a hub id


def _check_dir(path: Path, ref: str) -> str:
    if not path.exists():
        raise ModelRefError(f"model path does not exist: {path} (from reference {ref!r})")
    if not path.is_dir() or not any((path / f).exists() for f in _WEIGHT_FILES):
        raise ModelRefError(f"model path {path} is not a Hugging Face model directory "
                            f"(no config.json or adapter_config.json)")
    return str(path.resolve())


def is_adapter_dir(path: str) -> bool:
    return os.path.isdir(path) and os.path.exists(os.path.join(path, "adapter_config.json")) \
        and not os.path.exists(os.path.join(path, "config.json"))


def load_tokenizer(ref: str | os.PathLike, padding_side: str = "right"):
    """The tokenizer of a model reference; a missing pad token becomes the EOS token (logged).

    The returned tokenizer has `pad_from_eos` set to True when that substitution happened,
    so a stage can record it.
    """
    from transformers import AutoTokenizer

    path = resolve(ref)
    if is_adapter_dir(path) and not _has_tokenizer(path):
        path = _adapter_base(path)
    name, revision = _name_revision(path)
    tok = AutoTokenizer.from_pretrained(name, revision=revision)
    tok.padding_side = padding_side
    tok.pad_from_eos = False
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ModelRefError(f"tokenizer of {ref} has neither a pad token nor an EOS token")
        tok.pad_token = tok.eos_token
        tok.pad_from_eos = True
        log.warning("tokenizer of %s has no pad token: using the EOS token %r for padding",
                    ref, tok.eos_token)
    return tok


def _has_tokenizer(path: str) -> bool:
    return any(os.path.exists(os.path.join(path, f))
               for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json"))


def _adapter_base(path: str) -> str:
    import json

    with open(os.path.join(path, "adapter_config.json")) as f:
        base = json.load(f).get("base_model_name_or_path")
    if not base:
        raise ModelRefError(f"{path}/adapter_config.json records no base_model_name_or_path")
    return resolve(base)


def torch_dtype(name):
    """"bf16"/"bfloat16"/"fp32"/"float32"/"fp16"/"auto" or a torch.dtype -> a torch.dtype or "auto"."""
    import torch

    if name is None or isinstance(name, torch.dtype) or name == "auto":
        return name or "auto"
    table = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
             "float16": torch.float16, "fp32": torch.float32, "float32": torch.float32}
    if name not in table:
        raise ValueError(f"unknown dtype {name!r}; expected one of {sorted(table)} or 'auto'")
    return table[name]


def load_model(ref: str | os.PathLike, dtype="auto", **kwargs):
    """An AutoModelForCausalLM from a reference; a LoRA adapter directory is merged into its base."""
    from transformers import AutoModelForCausalLM

    path = resolve(ref)
    dt = torch_dtype(dtype)
    if is_adapter_dir(path):
        from peft import PeftModel

        name, revision = _name_revision(_adapter_base(path))
        base = AutoModelForCausalLM.from_pretrained(name, revision=revision, dtype=dt, **kwargs)
        return PeftModel.from_pretrained(base, path).merge_and_unload()
    name, revision = _name_revision(path)
    return AutoModelForCausalLM.from_pretrained(name, revision=revision, dtype=dt, **kwargs)


def _name_revision(ref: str) -> tuple[str, str | None]:
    """A hub id pinned as "org/name@rev" -> (name, revision) for from_pretrained; a local
    directory as it is."""
    from budgetlab.hub import split_ref

    if os.path.isdir(ref):
        return ref, None
    return split_ref(ref)
