"""The built-in models: arith-small beside arith-tiny (same tokenizer, same recipe, more
parameters), both rebuilt deterministically."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from budgetlab.builtin import NAMES, build


def test_both_sizes_are_known_and_small_is_several_times_tiny():
    assert NAMES == ("arith-tiny", "arith-small")
    tok = build.make_tokenizer()
    n = {name: sum(p.numel() for p in build.make_model(tok, name).parameters())
         for name in NAMES}
    assert 3 * n["arith-tiny"] <= n["arith-small"] <= 4 * n["arith-tiny"]
    with pytest.raises(ValueError, match="unknown built-in model"):
        build.make_model(tok, "arith-huge")


@pytest.mark.parametrize("name", NAMES)
def test_shipped_model_matches_build_script(name):
    """The committed weights come from build.py: same tokenizer, same architecture."""
    shipped = Path(build.__file__).resolve().parent / name
    if not (shipped / "model.safetensors").exists():
        pytest.skip(f"{name} is not shipped in this checkout (resolve() would build it)")
    tok = build.make_tokenizer()
    assert json.loads((shipped / "tokenizer.json").read_text())["model"]["vocab"] == tok.get_vocab()
    cfg = json.loads((shipped / "config.json").read_text())
    want = build.make_model(tok, name).config
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "max_position_embeddings"):
        assert cfg[key] == getattr(want, key), key


@pytest.mark.slow
def test_arith_small_rebuilds_bit_identically(tmp_path):
    """Two builds of arith-small on a short corpus give the same bytes (one thread, seeded,
    deterministic kernels): the recipe the shipped weights were built with."""
    env = dict(os.environ, PYTHONPATH=str(Path(build.__file__).resolve().parents[2]))
    digests = []
    for i in range(2):
        out = tmp_path / f"b{i}"
        subprocess.run([sys.executable, "-m", "budgetlab.builtin.build", "arith-small",
                        str(out), "--docs", "40"], check=True, env=env, capture_output=True)
        digests.append(hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest())
    assert digests[0] == digests[1]
