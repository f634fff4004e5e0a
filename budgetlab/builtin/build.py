"""Build a built-in model deterministically: `python -m budgetlab.builtin.build NAME [OUT]`.

arith-tiny: a 4-layer Llama (hidden 128, ~0.8M parameters) with a character-level tokenizer
(built with `tokenizers`, saved as a Hugging Face fast tokenizer), pre-trained on a corpus of
bare equations ("12+7=19") mixed with short stories that use the task's language ("Tom has 12
apples and gets 7 more. 12+7=19, so now Tom has 19 apples."). It never sees the task's
`Q: ... A: ... #### N` answer format, so it scores 0 on `arith` until fine-tuned: the base model
"knows the maths but not the format", like a pre-trained LLM before SFT.
arith-small: the same tokenizer, corpus and recipe with a 6-layer Llama of hidden size 192
(2.68M parameters, 3.1x arith-tiny's 0.87M), pre-trained for 2 epochs instead of 3 (same
number of documents), so that it builds in about twice arith-tiny's time. It is the second
model size of jobs/toy-study.toml.
Why stories and not only equations: a model pre-trained on bare equations alone learned the
word-problem mapping far too slowly in SFT for a small-budget quickstart (see PAPER.md).
"""

from __future__ import annotations

import math
import random
import string
import sys
import time
from pathlib import Path

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
CHARS = [c for c in string.printable if c not in "\t\r\x0b\x0c"]  # 95 printable + "\n"
SEQ_LEN = 128
SEED = 1234


def make_tokenizer():
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + CHARS)}
    # BPE with no merges over a character vocabulary = one token per character.
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.add_special_tokens(SPECIALS)
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>",
                                   model_max_length=512)


def corpus(n_docs: int = 6000, seed: int = SEED) -> list[str]:
    """Pre-training documents: equations and stories, never the Q:/A:/#### answer format.

    40% are runs of bare equations (dense arithmetic practice); the rest are short stories in
    the task's language, most with the equation written out, some asking "How many ...?"
    first, so that the model has read word problems and their sums, but never the format.
    """
    from budgetlab.tasks.arith import make_problem

    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        kind = rng.random()
        lines = []
        for _ in range(rng.randint(10, 16) if kind < 0.4 else rng.randint(2, 4)):
            p = make_problem(rng)
            eq = f"{p['a']}{p['op']}{p['b']}={p['answer']}"
            after = f"{p['name']} has {p['answer']} {p['thing']}"
            if kind < 0.4:
                lines.append(eq + ".")
            elif kind < 0.7:
                lines.append(f"{p['story']} {eq}, so now {after}.")
            elif kind < 0.9:
                ask = rng.choice(("How many?", f"How many {p['thing']} now?"))
                lines.append(f"{p['story']} {ask} {eq}, so {after}.")
            else:
                lines.append(f"{p['story']} Now {after}.")
        docs.append(" ".join(lines))
    return docs


# name -> (architecture, pre-training epochs). Head size 32 in both.
SIZES = {
    "arith-tiny": ({"hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 4,
                    "num_attention_heads": 4, "num_key_value_heads": 4}, 3),
    "arith-small": ({"hidden_size": 192, "intermediate_size": 512, "num_hidden_layers": 6,
                     "num_attention_heads": 6, "num_key_value_heads": 6}, 2),
}


def make_model(tokenizer, name: str = "arith-tiny"):
    from transformers import LlamaConfig, LlamaForCausalLM

    if name not in SIZES:
        raise ValueError(f"unknown built-in model {name!r}; known: {', '.join(SIZES)}")
    config = LlamaConfig(
        vocab_size=len(tokenizer), **SIZES[name][0],
        max_position_embeddings=512, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config)


def pretrain(model, tokenizer, docs, epochs: int = 3, batch_size: int = 16, lr: float = 3e-3,
             log=print):
    """Plain next-token training on packed SEQ_LEN blocks of eos-separated documents."""
    import torch

    ids = []
    for d in docs:
        ids += tokenizer(d, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    n_blocks = len(ids) // SEQ_LEN
    blocks = torch.tensor(ids[: n_blocks * SEQ_LEN]).view(n_blocks, SEQ_LEN)
    steps = epochs * math.ceil(n_blocks / batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warmup, 0.5 * (1 + math.cos(math.pi * s / steps))))
    gen = torch.Generator().manual_seed(SEED)
    model.train()
    step = 0
    for epoch in range(epochs):
        for idx in torch.randperm(n_blocks, generator=gen).split(batch_size):
            batch = blocks[idx]
            loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            if step % 50 == 0 or step == steps:
                log(f"step {step}/{steps} epoch {epoch} loss {loss.item():.3f}")
    model.eval()
    return model


def build(name: str, out: str | Path, n_docs: int | None = None) -> Path:
    """Build model NAME into directory OUT (written to a temp dir, then renamed). n_docs
    shortens the corpus (the determinism test; the shipped weights use the default)."""
    if name not in SIZES:
        raise ValueError(f"unknown built-in model {name!r}; known: {', '.join(SIZES)}")
    import torch

    start = time.time()
    # One thread: bit-for-bit the same result on any CPU count, and no slow-down from
    # oversubscription when other processes share the cores.
    torch.set_num_threads(1)
    torch.manual_seed(SEED)
    torch.use_deterministic_algorithms(True)
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    tokenizer = make_tokenizer()
    model = make_model(tokenizer, name)
    pretrain(model, tokenizer, corpus() if n_docs is None else corpus(n_docs),
             epochs=SIZES[name][1])
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    tmp.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if out.exists():
        import shutil

        shutil.rmtree(out)
    tmp.rename(out)
    print(f"built {name} in {time.time() - start:.0f}s -> {out}")
    return out


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    n_docs = None
    if "--docs" in argv:       # a shorter corpus: `--docs N` (tests)
        i = argv.index("--docs")
        n_docs = int(argv[i + 1])
        argv = argv[:i] + argv[i + 2:]
    if not argv:
        print("usage: python -m budgetlab.builtin.build NAME [OUT_DIR] [--docs N]",
              file=sys.stderr)
        return 2
    name = argv[0]
    out = argv[1] if len(argv) > 1 else Path(__file__).resolve().parent / name
    build(name, out, n_docs=n_docs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
