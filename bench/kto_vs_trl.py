"""Our KTO loss vs TRL's KTOTrainer on one identical fixed batch (CPU, tiny Llama).

Policy = the start model with seeded noise on every weight, reference = the start model, so
the log-ratios and the KL reference point are not zero. 8 pairs -> 16 KTO examples, given to
TRL unpaired (prompt, completion, label) in our order; TRL builds its mismatched KL pairs by
rotating completions by +1 within the batch, so ours uses the same pairs for this comparison
(budgetlab's own rule, a seed-fixed mismatch at the dataset level, differs only in which
completion is borrowed). The tokens of every sequence are checked to be identical on both
sides before the losses are compared. TRL is pip-installed (no deps, pinned) into a temporary
directory, as bench/vs_trl.py does; budgetlab never imports it.

    DS_ACCELERATOR=cpu .venv/bin/python bench/kto_vs_trl.py
"""

import logging
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import vs_trl  # noqa: E402  (sets the CPU environment; pairs(), import_trl())

import torch  # noqa: E402

from budgetlab import models  # noqa: E402
from budgetlab.train import data, loop, losses  # noqa: E402
from budgetlab.train.config import TrainConfig  # noqa: E402
from budgetlab.train.tiny import make_llama  # noqa: E402

BETA, MAX_LEN, N_PAIRS = 0.1, 512, 8


def noisy_copy(src: str, dst: Path, scale: float = 0.02) -> str:
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    m.save_pretrained(dst)
    models.load_tokenizer(src).save_pretrained(dst)
    return str(dst)


def trl_loss(trl, policy: str, reference: str, rows: list[dict], out: Path):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    tok = models.load_tokenizer(policy)
    args = trl.KTOConfig(output_dir=str(out), per_device_train_batch_size=len(rows), beta=BETA,
                         max_length=MAX_LEN, use_cpu=True, report_to=[], save_strategy="no",
                         bf16=False, seed=0, dataloader_num_workers=0, disable_tqdm=True,
                         gradient_checkpointing=False, desirable_weight=1.0,
                         undesirable_weight=1.0)
    model = AutoModelForCausalLM.from_pretrained(policy, dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(reference, dtype=torch.float32)
    trainer = trl.KTOTrainer(model=model, ref_model=ref, args=args, processing_class=tok,
                             train_dataset=Dataset.from_list(rows))
    trainer.model.eval()
    items = [trainer.train_dataset[i] for i in range(len(rows))]
    inputs = trainer.data_collator(items)
    with torch.no_grad():
        loss = float(trainer.compute_loss(trainer.model, inputs))
    seqs = [(it["prompt_ids"], it["completion_ids"], it["KL_completion_ids"]) for it in items]
    return loss, seqs


def our_loss(policy: str, reference: str, pairs: list[dict]):
    from transformers import AutoModelForCausalLM

    tok = models.load_tokenizer(policy)
    enc, _ = data.encode_pairs(tok, pairs, MAX_LEN)
    ex = data.kto_examples(enc, MAX_LEN, seed=0)
    for i in range(len(ex)):             # TRL's mismatched pairs: completions rotated by +1
        ex[i]["kl_completion"] = ex[i - 1]["completion"]
    cfg = TrainConfig(kind="kto", max_length=MAX_LEN)
    scores = {}
    for name, path in (("policy", policy), ("ref", reference)):
        m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        scorer = loop.Scorer(m, tok.pad_token_id, cfg, torch.device("cpu"))
        with torch.no_grad():
            scores[name] = loop.reference_scores("kto", scorer, ex, list(range(len(ex))))
    kl = losses.kto_kl(scores["policy"]["kl"], scores["ref"]["kl"])
    desirable = torch.tensor([e["desirable"] for e in ex])
    per_ex, _ = losses.kto_loss(scores["policy"]["completion"], scores["ref"]["completion"],
                                desirable, kl, BETA)
    seqs = [(e["prompt"], e["completion"], e["kl_completion"]) for e in ex]
    return float(per_ex.mean()), float(kl), seqs


def main():
    logging.disable(logging.WARNING)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        trl = vs_trl.import_trl(tmp)
        ref = make_llama(tmp / "ref", hidden=128, layers=2, heads=4, max_positions=MAX_LEN)
        policy = noisy_copy(ref, tmp / "policy")
        pairs = vs_trl.pairs(N_PAIRS)
        rows = [{"prompt": p["prompt"], "completion": c, "label": lab}
                for p in pairs for c, lab in ((p["chosen"], True), (p["rejected"], False))]
        theirs, their_seqs = trl_loss(trl, policy, ref, rows, tmp / "trl")
        mine, kl, my_seqs = our_loss(policy, ref, pairs)
        # compare as lists of ids: (prompt, completion, KL completion) per example
        same = sum([list(x) for x in a] == [list(x) for x in b]
                   for a, b in zip(their_seqs, my_seqs))
        print(f"{len(rows)} KTO examples, identical token sequences on both sides: "
              f"{same}/{len(rows)}; KL reference point (ours) {kl:.6f}")
        print(f"same batch KTO loss: TRL {trl.__version__} {theirs:.8f}, ours {mine:.8f}")
        if same != len(rows):
            raise SystemExit("the two sides tokenised the batch differently: not comparable")
        diff = abs(theirs - mine)
        print(f"RESULT kto_vs_trl_loss_abs_diff {diff:.3g}")


if __name__ == "__main__":
    main()
