"""Shared fixtures: a tiny valid grid spec and a CLI runner."""

import os
import textwrap
from pathlib import Path

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")

GOOD_SPEC = """
name = "t"
[grid]
tasks = ["arith"]
models = ["builtin:arith-tiny"]
budgets = [64, 256]
sft_fractions = [1.0, 0.5, 0.0]
methods = ["dpo", "kto"]
seeds = [0, 1]
[costs]
unit = "examples"
sft_example = 1.0
preference_pair = 1.0
[train]
max_length = 128
batch_size = 8
[train.sft]
epochs = 1
lr = 1e-3
[train.dpo]
beta = 0.1
[eval]
limit = 20
max_new_tokens = 16
"""


@pytest.fixture
def write_spec(tmp_path):
    """write_spec(text, name) -> path of a TOML file in a temp dir."""
    def write(text: str = GOOD_SPEC, name: str = "grid.toml") -> Path:
        p = tmp_path / name
        p.write_text(textwrap.dedent(text))
        return p
    return write


@pytest.fixture
def cli(tmp_path, monkeypatch):
    """Run the CLI in-process with a private ledger and workdir: cli(*args) -> result."""
    from click.testing import CliRunner

    from budgetlab.cli import main

    monkeypatch.setenv("BUDGETLAB_LEDGER", str(tmp_path / "ledger.db"))
    monkeypatch.setenv("BUDGETLAB_WORKDIR", str(tmp_path / "runs"))
    runner = CliRunner()

    def run(*args, input=None):
        return runner.invoke(main, [str(a) for a in args], input=input, catch_exceptions=False)
    run.ledger_path = tmp_path / "ledger.db"
    run.workdir = tmp_path / "runs"
    return run
