"""Shared fixtures: a tiny random Llama with a byte-level tokenizer, built locally (no hub)."""

import os

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")


def make_tiny_llama(path, *, hidden=64, layers=2, heads=4, pad_token=False, seed=0):
    """Write a tiny random Llama + byte-level tokenizer (no pad token by default) to `path`."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(pre_tokenizers.ByteLevel.alphabet())}
    specials = ["<s>", "</s>"] + (["<pad>"] if pad_token else [])
    for s in specials:
        vocab[s] = len(vocab)
    raw = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>",
                                  pad_token="<pad>" if pad_token else None)
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=hidden, intermediate_size=hidden * 2,
                      num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=heads, max_position_embeddings=512,
                      bos_token_id=vocab["<s>"], eos_token_id=vocab["</s>"],
                      pad_token_id=vocab.get("<pad>"), tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))
