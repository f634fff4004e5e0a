"""A random-init Llama with a byte-level tokenizer, written to a local directory.

For tests and benchmarks: no hub download, any size from a 64-wide toy to a ~1B config.
"""

from __future__ import annotations


def byte_tokenizer(pad_token: bool = False):
    """256 byte tokens + <s>, </s> (+ <pad>); no pad token by default, like most base models."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(pre_tokenizers.ByteLevel.alphabet())}
    for s in ["<s>", "</s>"] + (["<pad>"] if pad_token else []):
        vocab[s] = len(vocab)
    raw = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>" if pad_token else None)


def make_llama(path, *, hidden=64, layers=2, heads=4, kv_heads=None, intermediate=None,
               vocab_size=None, max_positions=512, pad_token=False, seed=0, dtype=None):
    """Write a random Llama + byte tokenizer to `path`; returns str(path).

    vocab_size larger than the tokenizer's pads the embedding (as real models do); the extra
    rows are never produced by the tokenizer.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = byte_tokenizer(pad_token)
    n_vocab = max(vocab_size or 0, len(tok))
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=n_vocab, hidden_size=hidden,
                      intermediate_size=intermediate or hidden * 2, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads or heads,
                      max_position_embeddings=max_positions, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)
