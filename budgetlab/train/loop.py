"""The training loop shared by SFT, DPO and KTO, on deepspeed.initialize. Read top to bottom:

    run()          the recipe: setup -> reference_pass -> resume -> train (optimizer_step,
                   log_step, checkpoint) -> export_model -> summarize
    micro_step()   one forward + loss of one micro-batch, per stage kind
    kto_step_kl()  the KTO reference point of one optimizer step (no grad, all ranks)

Batching. An optimizer step holds `batch_size` examples whatever the number of processes
(KTO with batch_unit = "pairs": 2 x batch_size examples, the examples of batch_size pairs,
so that KTO and DPO take the same steps at the same settings): it is cut into world_size x
grad_accum micro-batches (grad_accum = ceil(examples per step / (micro_batch_size x
world_size))). Each micro-batch loss is divided by the size of the whole
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
from dataclasses import dataclass

import torch

from budgetlab import dist, models
from budgetlab.train import checkpoint, data, export, losses, packing, reference
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


def stage_sequences(kind: str, examples: list[dict]):
    """The (ids, labels) sequences a stage forwards (DPO: both sides; KTO: completions)."""
    if kind == "sft":
        return data.sft_sequences(examples)
    if kind == "dpo":
        return data.pair_sequences(examples)
    return data.kto_sequences(examples)


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


# ---------------------------------------------------------------- the recipe
def run(stage, cfg: TrainConfig, rows: list[dict], env, init_model: str, *,
        format_prompt=None, info: dict | None = None, on_step=None, tracker=None) -> dict:
    """Train one stage on `rows` (task records), starting from `init_model`; returns the result.

    on_step(step, loss, engine) is called on every rank after each optimizer step and its
    checkpoint (tests use it to interrupt or break a run). tracker (budgetlab.tracking, rank 0)
    gets each step's row as train/... metrics.
    """
    start = time.time()
    s = setup(stage, cfg, rows, env, init_model, format_prompt)
    probe = packing_check(s)
    ref, ref_reused, state = reference_pass(s)
    resumed = resume(s, state)
    loss, train_seconds, train_cpu = train(s, ref, state, on_step, tracker)
    export_model(s, info)
    release(s)
    return summarize(s, state, resumed, loss, ref_reused, train_seconds, train_cpu, probe,
                     wall_seconds=time.time() - start)


@dataclass
class Setup:
    """Everything the steps of one run share, fixed once set up."""
    stage: object
    cfg: TrainConfig
    env: object
    init_model: str
    device: torch.device
    bf16: bool
    dtype: torch.dtype
    tokenizer: object
    examples: list
    enc: object
    lengths: list[int]
    steps: list[list[int]]
    grad_accum: int
    engine: object = None
    scheduler: object = None
    scorer: Scorer | None = None
    ref_model: object = None

    @property
    def kind(self) -> str:
        return self.cfg.kind

    @property
    def steps_per_epoch(self) -> int:
        return len(self.steps) // self.cfg.epochs

    @property
    def n_slots(self) -> int:
        return self.grad_accum * self.env.world_size


def setup(stage, cfg: TrainConfig, rows: list[dict], env, init_model: str,
          format_prompt) -> Setup:
    """Process group, tokenizer, encoded examples, the step plan, the engine."""
    kind = cfg.kind
    dist.init(env)
    cuda = env.backend == "nccl"
    bf16 = cfg.dtype == "bf16" or (cfg.dtype == "auto" and cuda)
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
    steps = data.plan_steps(len(examples), cfg.examples_per_step, cfg.epochs, cfg.seed)
    s = Setup(stage=stage, cfg=cfg, env=env, init_model=init_model,
              device=torch.device("cuda", env.local_rank) if cuda else torch.device("cpu"),
              bf16=bf16, dtype=torch.bfloat16 if bf16 else torch.float32,
              tokenizer=tokenizer, examples=examples, enc=enc,
              lengths=[data.example_length(e) for e in examples], steps=steps,
              grad_accum=-(-cfg.examples_per_step // (cfg.micro_batch_size * env.world_size)))

    model = build_model(init_model, cfg, s.dtype)
    if kind != "sft" and cfg.reference == "online":
        s.ref_model = build_model(init_model, TrainConfig(kind=kind, finetune="full"), s.dtype)
        s.ref_model.to(s.device).eval().requires_grad_(False)
    s.engine, s.scheduler = build_engine(model, cfg, env, len(steps), s.grad_accum, bf16)
    s.scorer = Scorer(s.engine, tokenizer.pad_token_id, cfg, s.device)
    return s


def packing_check(s: Setup) -> dict | None:
    """Packing self-check on a few of the stage's own sequences: the packed forward must equal
    the separate ones, else the stage trains with padding (said once)."""
    if not s.cfg.packing:
        return None
    probe = packing.probe(s.engine, s.tokenizer.pad_token_id, s.cfg.max_length,
                          stage_sequences(s.kind, s.examples), s.device)
    if probe["ok"] is False:
        s.cfg.packing = False  # Scorer and split_step read it from here on
        if s.env.rank == 0:
            log.warning("%s: packed forward differs from separate forwards by %.3g "
                        "(tolerance %.3g): packing off, training with padding",
                        s.stage.root, probe["max_diff"], probe["tolerance"])
    return probe


def reference_pass(s: Setup):
    """Reference log-probs from the untouched starting weights, once; reused on resume.
    Returns (reference, reused?, the run's state with the pass's cost)."""
    ref, seconds, cpu, reused = None, 0.0, 0.0, None
    if s.kind != "sft":
        if s.ref_model is not None:
            ref = Scorer(s.ref_model, s.tokenizer.pad_token_id, s.cfg, s.device)
        else:
            fp = reference.fingerprint(s.examples, s.init_model)
            ref = reference.load(s.stage.root, fp)
            reused = ref is not None
            if ref is None:
                if s.env.rank == 0:  # a long pass on a big pool: say so in the heartbeat
                    s.stage.write_progress(phase="reference", step=0, total_steps=len(s.steps))
                t0, c0 = time.time(), time.process_time()
                s.engine.eval()
                ref = reference.compute(
                    lambda idx: reference_scores(s.kind, s.scorer, s.examples, idx),
                    len(s.examples), REF_KEYS[s.kind], s.cfg.micro_batch_size, s.lengths,
                    s.env.rank, s.env.world_size)
                if s.env.rank == 0:
                    reference.save(s.stage.root, fp, ref)
                dist.barrier()
                seconds, cpu = time.time() - t0, time.process_time() - c0
    state = {"step": 0, "tokens": 0, "epoch_stats": {}, "ref_seconds": seconds,
             "ref_cpu_seconds": cpu}
    return ref, reused, state


def resume(s: Setup, state: dict):
    """Load the newest checkpoint, if any, into the engine and `state`; (step, state) or None."""
    resumed = checkpoint.load_latest(s.engine, s.stage.checkpoints_dir, s.env, s.cfg.zero_stage)
    if resumed is not None:
        # Only our keys: DeepSpeed hands back its own metadata too (checkpoint_parallel_
        # dimensions, ...), which it then refuses in the next save_checkpoint's client_state.
        state.update({k: v for k, v in resumed[1].items() if k in state})
        log.info("%s: resumed at step %d", s.stage.root, state["step"])
    return resumed


def train(s: Setup, ref, state: dict, on_step, tracker=None):
    """The optimizer steps from state["step"] on: step, log, checkpoint. Returns the last
    step's loss and this attempt's wall and CPU seconds in the loop."""
    flag = checkpoint.StopFlag()
    restore_signals = checkpoint.install_signal_handlers(flag)
    if s.env.rank == 0:
        (s.stage.log_dir / "train.jsonl").parent.mkdir(parents=True, exist_ok=True)
    loss = float("nan")
    s.engine.train()
    t_loop, c_loop = time.time(), time.process_time()
    # the heartbeat's clocks: last beat, last step's end; the ETA runs from this attempt's loop
    clock = {"beat": 0.0, "step": t_loop, "loop": t_loop, "start_step": state["step"]}
    try:
        for step in range(state["step"], len(s.steps)):
            total, kl, want_save, want_stop = optimizer_step(s, ref, step, flag)
            loss = total["loss"]
            state["tokens"] += int(total["tokens"])
            if not math.isfinite(loss):
                good = checkpoint.newest_tag(s.stage.checkpoints_dir)
                raise NonFiniteLoss(
                    f"{s.kind} loss is {loss} at step {step + 1} "
                    f"(lr {s.scheduler.get_last_lr()[0]:.3g}); stopped, last good checkpoint: "
                    f"{good or 'none'}")
            log_step(s, state, step, total, kl, clock, tracker)
            state["step"] = step + 1
            periodic = s.cfg.checkpoint_every and (step + 1) % s.cfg.checkpoint_every == 0
            if (periodic or want_save) and step + 1 < len(s.steps):
                checkpoint.save(s.engine, s.stage.checkpoints_dir, step + 1, state, s.env,
                                s.cfg.zero_stage, s.cfg.keep_checkpoints)
                flag.save = False
                if want_stop:
                    raise checkpoint.TrainingInterrupted(
                        f"stopped on {flag.reason or 'request'} after step {step + 1}; "
                        f"checkpoint {checkpoint.tag(step + 1)} saved, rerun the stage to resume",
                        reason=flag.reason, step=step + 1)
            if on_step is not None:
                on_step(step + 1, loss, s.engine)
    finally:
        restore_signals()
    return loss, time.time() - t_loop, time.process_time() - c_loop


def optimizer_step(s: Setup, ref, step: int, flag):
    """One optimizer step over its micro-batches on every rank; the step's sums over all
    ranks, the KTO reference point, and whether any rank was asked to save or stop."""
    idx = s.steps[step]
    env = s.env
    slots = data.split_step(idx, s.lengths, s.n_slots, balance=s.cfg.packing)
    mine = [slots[m * env.world_size + env.rank] for m in range(s.grad_accum)]
    norm = step_norms(s.kind, s.examples, idx)
    kl = kto_step_kl(s.scorer, s.examples, mine, ref, env) if s.kind == "kto" else None
    sums = {"loss": 0.0, "tokens": 0, "correct": 0.0, "margin": 0.0, "chosen_reward": 0.0,
            "rejected_reward": 0.0, "count": 0, "n_desirable": 0}
    for micro in mine:
        run_idx = micro or [idx[0]]  # empty slot: a zero-weight forward keeps ranks in step
        objective, stats = micro_step(s.kind, s.cfg, s.scorer, s.examples, run_idx, ref, norm,
                                      kl)
        weight = 1.0 if micro else 0.0
        s.engine.backward(objective * (weight * s.grad_accum * env.world_size))
        s.engine.step()
        if micro:
            sums["loss"] += float(objective.detach())
            for k, v in stats.items():
                sums[k] += v
    keys = list(sums)
    vec = torch.tensor([float(sums[k]) for k in keys] + [flag.save, flag.stop],
                       dtype=torch.float64)
    vec = all_reduce_sum(vec, env)
    return dict(zip(keys, vec[:-2].tolist())), kl, vec[-2] > 0, vec[-1] > 0


def log_step(s: Setup, state: dict, step: int, total: dict, kl, clock: dict,
             tracker=None) -> None:
    """Epoch sums for the result; train.jsonl, the progress heartbeat and the tracker
    (rank 0)."""
    epoch = step // s.steps_per_epoch
    es = state["epoch_stats"]
    if es.get("epoch") != epoch:
        es.clear()
        es.update({"epoch": epoch, "steps": 0, "loss": 0.0,
                   **{k: 0.0 for k in total if k != "loss"}})
    es["steps"] += 1
    for k in total:
        es[k] += total[k]
    if s.kind == "kto":
        es["kl"] = float(kl)
    now = time.time()
    row = {"step": step + 1, "epoch": epoch, "loss": total["loss"], "tokens": state["tokens"],
           "lr": s.scheduler.get_last_lr()[0],
           "tokens_per_s": total["tokens"] / max(now - clock["step"], 1e-9)}
    clock["step"] = now
    gn = s.engine.get_global_grad_norm() if hasattr(s.engine, "get_global_grad_norm") else None
    if gn is not None:
        row["grad_norm"] = float(gn)
    if s.kind == "dpo":
        row["reward_accuracy"] = total["correct"] / max(total["count"], 1)
        row["reward_margin"] = total["margin"] / max(total["count"], 1)
    if s.kind == "kto":
        row["kl"] = float(kl)
    if s.env.rank == 0:
        with open(s.stage.log_dir / "train.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        if time.time() - clock["beat"] > 2 or step + 1 == len(s.steps) or \
                step == clock["start_step"]:
            s.stage.write_progress(**row, phase="train", total_steps=len(s.steps),
                                   started_at=clock["loop"], start_step=clock["start_step"])
            clock["beat"] = time.time()
        if tracker is not None:
            tracker.log({f"train/{k}": v for k, v in row.items() if k != "step"}, step=step + 1)


def export_model(s: Setup, info: dict | None) -> None:
    """model/ (merged weights for LoRA) with provenance; then the resume state goes."""
    base_info = dict(info or {})
    base_info.update({"init_model": str(s.init_model), "finetune": s.cfg.finetune,
                      "kind": s.kind})
    if s.cfg.finetune == "lora":
        base_info["lora"] = {"r": s.cfg.lora_r, "alpha": s.cfg.lora_alpha,
                             "targets": s.cfg.lora_targets, "merged": True}
    export.export(s.engine, s.cfg, s.tokenizer, s.stage.model_dir, s.env, base_info,
                  fresh_model=lambda: build_model(s.init_model, s.cfg, s.dtype))
    if s.env.rank == 0:  # model/ is complete: the resume state (optimizer too) is dead weight now
        shutil.rmtree(s.stage.checkpoints_dir, ignore_errors=True)
    dist.barrier()


def release(s: Setup) -> None:
    """Drop the engine and what DeepSpeed keeps outside it (hooks, optimizer buffers), so
    that the worker's collection frees it before the eval of the same job
    (worker.free_training_memory)."""
    s.engine.destroy()
    s.engine = s.scheduler = s.scorer = s.ref_model = None


def summarize(s: Setup, state: dict, resumed, loss: float, ref_reused, train_seconds: float,
              train_cpu: float, probe: dict | None, wall_seconds: float) -> dict:
    """The stage's result: metrics of the last epoch, tokens, timings, the set-up used."""
    kind, cfg = s.kind, s.cfg
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
        "steps": len(s.steps),
        "epochs": cfg.epochs,
        "examples": len(s.examples),
        "examples_truncated": s.enc.truncated,
        "examples_dropped": s.enc.dropped,
        "pad_token_from_eos": bool(getattr(s.tokenizer, "pad_from_eos", False)),
        "wall_seconds": wall_seconds,
        "train_seconds": train_seconds,  # the step loop of this attempt (tokens/s benchmarks)
        # CPU seconds of this process: a fair clock for benchmarks on a shared machine
        "train_cpu_seconds": train_cpu,
        "reference_cpu_seconds": state.get("ref_cpu_seconds", 0.0),
        "tokens_this_attempt": state["tokens"] - (resumed[1]["tokens"] if resumed else 0),
        "reference_seconds": state.get("ref_seconds", 0.0),
        "reference_reused": ref_reused,
        "resumed_from_step": resumed[0] if resumed else None,
        "world_size": s.env.world_size,
        "effective_batch": cfg.batch_size,
        "examples_per_step": cfg.examples_per_step,
        **({"batch_unit": cfg.batch_unit} if kind == "kto" else {}),
        "micro_batch_size": cfg.micro_batch_size,
        "grad_accum": s.grad_accum,
        "zero_stage": cfg.zero_stage,
        "finetune": cfg.finetune,
        "dtype": "bf16" if s.bf16 else "fp32",
        "packing": cfg.packing,
        "packing_probe": probe,
        "peak_memory_bytes": peak_memory_bytes(),
        "versions": versions(),
    }
