"""Shared fixtures: a tiny random Llama with a byte-level tokenizer, built locally (no hub)."""

import os

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    from budgetlab.train.tiny import make_llama

    return make_llama(tmp_path_factory.mktemp("tiny-llama"))  # hidden 64, 2 layers, no pad
