"""The training loop shared by SFT, DPO and KTO, on deepspeed.initialize. Read top to bottom:

    run()          set up -> encode -> engine -> reference pass -> resume -> steps -> export
    micro_step()   one forward + loss of one micro-batch, per stage kind
    kto_step_kl()  the KTO reference point of one optimizer step (no grad, all ranks)

Batching. An optimizer step holds `batch_size` examples whatever the number of processes:
it is cut into world_size x grad_accum micro-batches (grad_accum = ceil(batch_size /
(micro_batch_size x world_size))). Each micro-batch loss is divided by the size of the whole
step (response tokens for SFT, pairs for DPO, examples for KTO) and multiplied by
grad_accum x world_size, which DeepSpeed divides out again (backward scales by 1/grad_accum,
the gradient all-reduce averages over ranks). The gradient is therefore that of the step's
mean loss, for 1 process or N, and the loss curves agree up to float summation order.
"""

from __future__ import annotations

import json
import logging
import math
import resource
import shutil
import sys
import time

import torch

from budgetlab import dist, models
from budgetlab.train import checkpoint, data, export, losses, reference
from budgetlab.train.config import TrainConfig

log = logging.getLogger(__name__)


class NonFiniteLoss(RuntimeError):
    """The loss became NaN/inf; training stopped without saving over the last good checkpoint."""


class NoExamples(ValueError):
    """Nothing to train on (empty dataset, or every example dropped for length)."""


# ---------------------------------------------------------------- set-up

def deepspeed_config(cfg: TrainConfig, world_size: int, grad_accum: int, bf16: bool) -> dict:
    return {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": cfg.micro_batch_size * grad_accum * world_size,
        "gradient_clipping": cfg.max_grad_norm,
        "zero_optimization": {"stage": cfg.zero_stage},
        "bf16": {"enabled": bf16},
        # our AdamW is torch's (DeepSpeed's fused CPU/GPU ops need compiling); it is exact
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def build_model(init_model: str, cfg: TrainConfig, dtype):
    model = models.load_model(init_model, dtype=dtype)
    model.config.use_cache = False
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    if cfg.finetune == "lora":
        from peft import LoraConfig, get_peft_model

        if cfg.gradient_checkpointing:
            model.enable_input_require_grads()
        model = get_peft_model(model, LoraConfig(
            r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
            target_modules=cfg.lora_targets, task_type="CAUSAL_LM"))
    return model


def build_engine(model, cfg: TrainConfig, env, total_steps: int, grad_accum: int, bf16: bool):
    import deepspeed
    from transformers import get_scheduler

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                  weight_decay=cfg.weight_decay)
    warmup = math.ceil(cfg.warmup_ratio * total_steps)
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer,
        # a callable: built on DeepSpeed's wrapped optimizer, saved in its checkpoints
        lr_scheduler=lambda opt: get_scheduler(cfg.lr_scheduler, opt, num_warmup_steps=warmup,
                                               num_training_steps=total_steps),
        config=deepspeed_config(cfg, env.world_size, grad_accum, bf16))
    return engine, scheduler


def encode(kind: str, tokenizer, rows: list[dict], cfg: TrainConfig, format_prompt=None):
    if kind == "sft":
        ex, stats = data.encode_sft(tokenizer, rows, cfg.max_length, cfg.truncation, format_prompt)
    else:
        ex, stats = data.encode_pairs(tokenizer, rows, cfg.max_length, cfg.truncation, format_prompt)
        if kind == "kto":
            ex = data.kto_examples(ex, cfg.max_length, cfg.seed)
    return ex, stats


# ---------------------------------------------------------------- forward passes

class Scorer:
    """Forwards sequences through a model; packed or padded per the config."""

    def __init__(self, model, pad_id: int, cfg: TrainConfig, device):
        self.model, self.pad_id, self.cfg, self.device = model, pad_id, cfg, device

    def logits(self, seqs):
        b = data.collate(seqs, self.pad_id, self.cfg.packing, self.cfg.max_length)
        b = {k: v.to(self.device) for k, v in b.items()}
        inputs = {k: b[k] for k in ("input_ids", "attention_mask", "position_ids") if k in b}
        return self.model(**inputs, use_cache=False).logits, b

    def seq_logps(self, seqs):
        logits, b = self.logits(seqs)
        return losses.sequence_logps(logits, b["labels"], b["segment_ids"], len(seqs)), b


def reference_scores(kind: str, scorer: Scorer, examples: list[dict], idx: list[int]) -> dict:
    """Reference log-probs of examples[idx]: DPO {"chosen","rejected"}, KTO {"completion","kl"}."""
    batch = [examples[i] for i in idx]
    if kind == "dpo":
        logps, _ = scorer.seq_logps(data.pair_sequences(batch))
        k = len(batch)
        return {"chosen": logps[:k], "rejected": logps[k:]}
    seqs = data.kto_sequences(batch) + data.kto_sequences(batch, kl=True)
    logps, _ = scorer.seq_logps(seqs)
    k = len(batch)
    return {"completion": logps[:k], "kl": logps[k:]}


REF_KEYS = {"dpo": ("chosen", "rejected"), "kto": ("completion", "kl")}


def micro_step(kind: str, cfg: TrainConfig, scorer: Scorer, examples, idx, ref: dict,
               norm: dict, kl):
    """(objective, stats) of one micro-batch; objective is already divided by the step size."""
    batch = [examples[i] for i in idx]
    if kind == "sft":
        logits, b = scorer.logits(data.sft_sequences(batch))
        total, _ = losses.sft_loss_sum(logits, b["labels"])
        return total / norm["tokens"], {"tokens": int((b["segment_ids"] >= 0).sum())}
    t = torch.tensor(idx)
    if kind == "dpo":
        k = len(batch)
        logps, b = scorer.seq_logps(data.pair_sequences(batch))
        pc, pr = logps[:k], logps[k:]
        rc, rr = (x.to(pc.device) for x in ref_for(ref, t, scorer, examples, idx, kind))
        per_pair, cr, rj = losses.dpo_loss(pc, pr, rc, rr, cfg.beta, cfg.label_smoothing)
        objective = per_pair.sum() / norm["examples"]
        if cfg.nll_weight:
            objective = objective + cfg.nll_weight * -pc.sum() / norm["chosen_tokens"]
        return objective, {
            "tokens": int((b["segment_ids"] >= 0).sum()), "correct": float((cr > rj).sum()),
            "margin": float((cr - rj).sum()), "chosen_reward": float(cr.sum()),
            "rejected_reward": float(rj.sum()), "count": k}
    logps, b = scorer.seq_logps(data.kto_sequences(batch))
    (ref_c,) = ref_for(ref, t, scorer, examples, idx, kind)
    desirable = torch.tensor([e["desirable"] for e in batch], device=logps.device)
    per_ex, rewards = losses.kto_loss(logps, ref_c.to(logps.device), desirable, kl, cfg.beta,
                                      cfg.desirable_weight, cfg.undesirable_weight)
    return per_ex.sum() / norm["examples"], {
        "tokens": int((b["segment_ids"] >= 0).sum()), "count": len(batch),
        "chosen_reward": float(rewards[desirable].sum()),
        "rejected_reward": float(rewards[~desirable].sum()),
        "n_desirable": int(desirable.sum())}


def ref_for(ref, t, scorer, examples, idx, kind):
    """Precomputed reference log-probs, or (reference = "online") a forward of the ref model."""
    if isinstance(ref, dict):
        keys = REF_KEYS[kind] if kind == "dpo" else ("completion",)
        return [ref[k][t] for k in keys]
    with torch.no_grad():
        scores = reference_scores(kind, ref, examples, idx)
    return [scores[k] for k in (REF_KEYS[kind] if kind == "dpo" else ("completion",))]


@torch.no_grad()
def kto_step_kl(scorer: Scorer, examples, my_slots, ref, env) -> torch.Tensor:
    """mean(policy - reference) on the step's mismatched pairs, over all ranks, clamped at 0."""
    total = torch.zeros(2, dtype=torch.float64)
    for idx in my_slots:
        run = idx or [my_slots[0][0] if my_slots[0] else 0]  # every rank runs every forward
        logps, _ = scorer.seq_logps(data.kto_sequences([examples[i] for i in run], kl=True))
        if isinstance(ref, dict):
            ref_kl = ref["kl"][torch.tensor(run)]
        else:
            ref_kl = reference_scores("kto", ref, examples, run)["kl"]
        if idx:
            total += torch.tensor([float((logps.float().cpu() - ref_kl.cpu()).sum()), len(idx)],
                                  dtype=torch.float64)
    total = all_reduce_sum(total, env)
    return losses.kto_kl(total[0:1] / max(total[1].item(), 1), torch.zeros(1)).squeeze()


def all_reduce_sum(t: torch.Tensor, env) -> torch.Tensor:
    if env.world_size > 1:
        dev = torch.device("cuda", env.local_rank) if env.backend == "nccl" else t.device
        x = t.to(dev)
        torch.distributed.all_reduce(x)
        return x.to(t.device)
    return t


# ---------------------------------------------------------------- the run

def step_norms(kind: str, examples: list[dict], idx: list[int]) -> dict:
    """Sizes of one optimizer step, known on every rank without communication."""
    if kind == "sft":
        n_tok = sum(sum(1 for y in examples[i]["labels"][1:] if y != losses.IGNORE) for i in idx)
        return {"tokens": max(n_tok, 1)}
    norm = {"examples": len(idx)}
    if kind == "dpo":
        norm["chosen_tokens"] = max(sum(len(examples[i]["chosen"]) for i in idx), 1)
    return norm


def versions() -> dict:
    import importlib.metadata as md

    out = {"python": sys.version.split()[0]}
    for pkg in ("budgetlab", "torch", "transformers", "deepspeed", "peft", "datasets"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def peak_memory_bytes() -> int:
    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def run(stage, cfg: TrainConfig, rows: list[dict], env, init_model: str, *,
        format_prompt=None, info: dict | None = None, on_step=None) -> dict:
    """Train one stage on `rows` (task records), starting from `init_model`; returns the result.

    on_step(step, loss, engine) is called on every rank after each optimizer step and its
    checkpoint (tests use it to interrupt or break a run).
    """
    start = time.time()
    kind = cfg.kind
    dist.init(env)
    cuda = env.backend == "nccl"
    device = torch.device("cuda", env.local_rank) if cuda else torch.device("cpu")
    bf16 = cfg.dtype == "bf16" or (cfg.dtype == "auto" and cuda)
    dtype = torch.bfloat16 if bf16 else torch.float32
    torch.manual_seed(cfg.seed)  # same initial LoRA weights on every rank

    tokenizer = models.load_tokenizer(init_model)
    examples, enc = encode(kind, tokenizer, rows, cfg, format_prompt)
    what = {"sft": "SFT examples", "dpo": "preference pairs", "kto": "preference pairs"}[kind]
    if not rows:
        raise NoExamples(f"{stage.root}: no {what} to train on (empty dataset)")
    if not examples:
        raise NoExamples(f"{stage.root}: all {len(rows)} {what} are longer than max_length="
                         f"{cfg.max_length} and truncation='{cfg.truncation}' dropped them")
    if enc.dropped or enc.truncated:
        log.warning("%s: %d %s truncated, %d dropped (max_length %d)", stage.root,
                    enc.truncated, what, enc.dropped, cfg.max_length)

    lengths = [data.example_length(e) for e in examples]
    steps = data.plan_steps(len(examples), cfg.batch_size, cfg.epochs, cfg.seed)
    steps_per_epoch = len(steps) // cfg.epochs
    grad_accum = -(-cfg.batch_size // (cfg.micro_batch_size * env.world_size))
    n_slots = grad_accum * env.world_size

    model = build_model(init_model, cfg, dtype)
    ref_model = None
    if kind != "sft" and cfg.reference == "online":
        ref_model = build_model(init_model, TrainConfig(kind=kind, finetune="full"), dtype)
        ref_model.to(device).eval().requires_grad_(False)
    engine, scheduler = build_engine(model, cfg, env, len(steps), grad_accum, bf16)
    scorer = Scorer(engine, tokenizer.pad_token_id, cfg, device)

    # Reference log-probs: from the untouched starting weights, once; reused on resume.
    ref, ref_seconds, ref_cpu, ref_reused = None, 0.0, 0.0, None
    if kind != "sft":
        if ref_model is not None:
            ref = Scorer(ref_model, tokenizer.pad_token_id, cfg, device)
        else:
            fp = reference.fingerprint(examples, init_model)
            ref = reference.load(stage.root, fp)
            ref_reused = ref is not None
            if ref is None:
                if env.rank == 0:  # a long pass on a big pool: say so in the heartbeat
                    stage.write_progress(phase="reference", step=0, total_steps=len(steps))
                t0, c0 = time.time(), time.process_time()
                engine.eval()
                ref = reference.compute(
                    lambda idx: reference_scores(kind, scorer, examples, idx),
                    len(examples), REF_KEYS[kind], cfg.micro_batch_size, lengths,
                    env.rank, env.world_size)
                if env.rank == 0:
                    reference.save(stage.root, fp, ref)
                dist.barrier()
                ref_seconds, ref_cpu = time.time() - t0, time.process_time() - c0

    # Resume.
    state = {"step": 0, "tokens": 0, "epoch_stats": {}, "ref_seconds": ref_seconds,
             "ref_cpu_seconds": ref_cpu}
    resumed = checkpoint.load_latest(engine, stage.checkpoints_dir, env, cfg.zero_stage)
    if resumed is not None:
        # Only our keys: DeepSpeed hands back its own metadata too (checkpoint_parallel_
        # dimensions, ...), which it then refuses in the next save_checkpoint's client_state.
        state.update({k: v for k, v in resumed[1].items() if k in state})
        log.info("%s: resumed at step %d", stage.root, state["step"])

    flag = checkpoint.StopFlag()
    restore_signals = checkpoint.install_signal_handlers(flag)
    log_path = stage.log_dir / "train.jsonl"
    if env.rank == 0:
        log_path.parent.mkdir(parents=True, exist_ok=True)
    last_beat = 0.0
    loss = float("nan")
    engine.train()
    t_loop, c_loop = time.time(), time.process_time()
    try:
        for step in range(state["step"], len(steps)):
            idx = steps[step]
            epoch = step // steps_per_epoch
            slots = data.split_step(idx, lengths, n_slots, balance=cfg.packing)
            mine = [slots[m * env.world_size + env.rank] for m in range(grad_accum)]
            norm = step_norms(kind, examples, idx)
            kl = kto_step_kl(scorer, examples, mine, ref, env) if kind == "kto" else None

            sums = {"loss": 0.0, "tokens": 0, "correct": 0.0, "margin": 0.0, "chosen_reward": 0.0,
                    "rejected_reward": 0.0, "count": 0, "n_desirable": 0}
            for micro in mine:
                run_idx = micro or [idx[0]]  # empty slot: a zero-weight forward keeps ranks in step
                objective, stats = micro_step(kind, cfg, scorer, examples, run_idx, ref, norm, kl)
                weight = 1.0 if micro else 0.0
                engine.backward(objective * (weight * grad_accum * env.world_size))
                engine.step()
                if micro:
                    sums["loss"] += float(objective.detach())
                    for k, v in stats.items():
                        sums[k] += v
            keys = list(sums)
            vec = torch.tensor([float(sums[k]) for k in keys] + [flag.save, flag.stop],
                               dtype=torch.float64)
            vec = all_reduce_sum(vec, env)
            total = dict(zip(keys, vec[:-2].tolist()))
            want_save, want_stop = vec[-2] > 0, vec[-1] > 0
            loss = total["loss"]
            state["tokens"] += int(total["tokens"])
            if not math.isfinite(loss):
                good = checkpoint.newest_tag(stage.checkpoints_dir)
                raise NonFiniteLoss(
                    f"{kind} loss is {loss} at step {step + 1} (lr {scheduler.get_last_lr()[0]:.3g});"
                    f" stopped, last good checkpoint: {good or 'none'}")
            es = state["epoch_stats"]
            if es.get("epoch") != epoch:
                es.clear()
                es.update({"epoch": epoch, "steps": 0, "loss": 0.0,
                           **{k: 0.0 for k in keys if k != "loss"}})
            es["steps"] += 1
            for k in keys:
                es[k] += total[k]
            if kind == "kto":
                es["kl"] = float(kl)

            row = {"step": step + 1, "epoch": epoch, "loss": loss, "tokens": state["tokens"],
                   "lr": scheduler.get_last_lr()[0]}
            if kind == "dpo":
                row["reward_accuracy"] = total["correct"] / max(total["count"], 1)
                row["reward_margin"] = total["margin"] / max(total["count"], 1)
            if kind == "kto":
                row["kl"] = float(kl)
            if env.rank == 0:
                with open(log_path, "a") as f:
                    f.write(json.dumps(row) + "\n")
                if time.time() - last_beat > 2 or step + 1 == len(steps):
                    stage.write_progress(**row, phase="train", total_steps=len(steps))
                    last_beat = time.time()
            state["step"] = step + 1
            periodic = cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0
            if (periodic or want_save) and step + 1 < len(steps):
                checkpoint.save(engine, stage.checkpoints_dir, step + 1, state, env,
                                cfg.zero_stage, cfg.keep_checkpoints)
                flag.save = False
                if want_stop:
                    raise checkpoint.TrainingInterrupted(
                        f"stopped on {flag.reason or 'request'} after step {step + 1}; "
                        f"checkpoint {checkpoint.tag(step + 1)} saved, rerun the stage to resume",
                        reason=flag.reason, step=step + 1)
            if on_step is not None:
                on_step(step + 1, loss, engine)
    finally:
        restore_signals()
    train_seconds, train_cpu = time.time() - t_loop, time.process_time() - c_loop

    base_info = dict(info or {})
    base_info.update({"init_model": str(init_model), "finetune": cfg.finetune, "kind": kind})
    if cfg.finetune == "lora":
        base_info["lora"] = {"r": cfg.lora_r, "alpha": cfg.lora_alpha,
                             "targets": cfg.lora_targets, "merged": True}
    export.export(engine, cfg, tokenizer, stage.model_dir, env, base_info,
                  fresh_model=lambda: build_model(init_model, cfg, dtype))
    if env.rank == 0:  # model/ is complete: the resume state (optimizer too) is dead weight now
        shutil.rmtree(stage.checkpoints_dir, ignore_errors=True)
    dist.barrier()

    es = state["epoch_stats"]
    metrics = {"loss": loss, "loss_last_epoch": es["loss"] / max(es["steps"], 1)}
    if kind == "dpo":
        n = max(es["count"], 1)
        metrics.update({"reward_accuracy": es["correct"] / n, "reward_margin": es["margin"] / n,
                        "chosen_reward": es["chosen_reward"] / n,
                        "rejected_reward": es["rejected_reward"] / n})
    if kind == "kto":
        nd = max(es["n_desirable"], 1)
        nu = max(es["count"] - es["n_desirable"], 1)
        metrics.update({"kl": es.get("kl", 0.0), "desirable_reward": es["chosen_reward"] / nd,
                        "undesirable_reward": es["rejected_reward"] / nu})
    return {
        "metrics": metrics,
        "tokens": state["tokens"],
        "steps": len(steps),
        "epochs": cfg.epochs,
        "examples": len(examples),
        "examples_truncated": enc.truncated,
        "examples_dropped": enc.dropped,
        "pad_token_from_eos": bool(getattr(tokenizer, "pad_from_eos", False)),
        "wall_seconds": time.time() - start,
        "train_seconds": train_seconds,  # the step loop of this attempt (tokens/s benchmarks)
        # CPU seconds of this process: a fair clock for benchmarks on a shared machine
        "train_cpu_seconds": train_cpu,
        "reference_cpu_seconds": state.get("ref_cpu_seconds", 0.0),
        "tokens_this_attempt": state["tokens"] - (resumed[1]["tokens"] if resumed else 0),
        "reference_seconds": state.get("ref_seconds", 0.0),
        "reference_reused": ref_reused,
        "resumed_from_step": resumed[0] if resumed else None,
        "world_size": env.world_size,
        "effective_batch": cfg.batch_size,
        "micro_batch_size": cfg.micro_batch_size,
        "grad_accum": grad_accum,
        "zero_stage": cfg.zero_stage,
        "finetune": cfg.finetune,
        "dtype": "bf16" if bf16 else "fp32",
        "peak_memory_bytes": peak_memory_bytes(),
        "versions": versions(),
    }
