"""The evaluation stage: generate for the task's evaluation set, score, write predictions.

    run_stage(stage, spec, env) -> {"metrics": {...}, "primary_metric": ..., ...}

Greedy decoding, batched with left padding and the KV cache, cut at the task's stop strings.
With several processes each rank takes every world_size-th example and rank 0 gathers.
spec params: limit (first N evaluation examples), max_new_tokens (default: the task's),
batch_size, engine ("hf", or "vllm" where vllm is installed), skip_bad_rows.
predictions.jsonl in the stage directory holds one line per example with its scores.
"""

from __future__ import annotations

import json
import os
import time

from budgetlab.stagedir import StageDir

ENGINES = ("hf", "vllm")


def encode_prompt(tokenizer, text: str) -> list[int]:
    # Same rule as the trainer (budgetlab/train/data.py): a chat template already wrote BOS.
    bos = tokenizer.bos_token
    return tokenizer(text, add_special_tokens=not (bos and text.startswith(bos)))["input_ids"]


def cut_at_stop(text: str, stop_strings) -> str:
    """The text before the first stop string (generate() keeps the stop string itself)."""
    cut = len(text)
    for s in stop_strings:
        i = text.find(s)
        if i != -1:
            cut = min(cut, i)
    return text[:cut]


def generate(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int = 32,
             stop_strings=()) -> tuple[list[str], int]:
    """Greedy completions of `prompts` (batched, left-padded, KV cache); (texts, new tokens)."""
    import torch

    ids = [encode_prompt(tokenizer, p) for p in prompts]
    # Longest first: batches of similar length waste little padding, and an out-of-memory
    # error, if any, comes at the start.
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    pad = tokenizer.pad_token_id
    stop_kwargs = {"stop_strings": list(stop_strings), "tokenizer": tokenizer} if stop_strings else {}
    device = next(model.parameters()).device
    out: list[str] = [""] * len(prompts)
    new_tokens = 0
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        width = max(len(ids[i]) for i in chunk)
        input_ids = torch.tensor([[pad] * (width - len(ids[i])) + ids[i] for i in chunk])
        mask = torch.tensor([[0] * (width - len(ids[i])) + [1] * len(ids[i]) for i in chunk])
        with torch.no_grad():
            gen = model.generate(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                                 max_new_tokens=max_new_tokens, do_sample=False, use_cache=True,
                                 pad_token_id=pad, eos_token_id=tokenizer.eos_token_id,
                                 **stop_kwargs)
        for row, i in zip(gen[:, width:].tolist(), chunk):
            row = [t for t in row if t != pad]
            new_tokens += len(row)
            text = tokenizer.decode(row, skip_special_tokens=True)
            out[i] = cut_at_stop(text, stop_strings)
    return out, new_tokens


def generate_vllm(model_path: str, tokenizer, prompts, max_new_tokens, stop_strings):
    """The same outputs through vLLM (GPU machines with vllm installed)."""
    from vllm import LLM, SamplingParams

    llm = LLM(model=model_path, tokenizer=model_path)
    params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens, stop=list(stop_strings))
    outs = llm.generate([{"prompt_token_ids": encode_prompt(tokenizer, p)} for p in prompts],
                        params)
    texts = [cut_at_stop(o.outputs[0].text, stop_strings) for o in outs]
    return texts, sum(len(o.outputs[0].token_ids) for o in outs)


def _gather(env, obj):
    """All ranks' objects, on every rank. Evaluation needs only this one collective, so it
    joins a plain torch.distributed group (no DeepSpeed) unless the job already has one."""
    if env.world_size == 1:
        return [obj]
    import torch.distributed as td

    if not td.is_initialized():
        td.init_process_group(env.backend, init_method=f"tcp://{env.master_addr}:{env.master_port}",
                              rank=env.rank, world_size=env.world_size)
    out = [None] * env.world_size
    td.all_gather_object(out, obj)
    return out


def run_stage(stage: StageDir, spec: dict, env) -> dict:
    from budgetlab.models import load_model, load_tokenizer, resolve
    from budgetlab.tasks import get_task

    start = time.time()
    params = dict(spec.get("params") or {})
    engine = params.get("engine", "hf")
    if engine not in ENGINES:
        raise ValueError(f"{stage.spec_path}: params.engine must be one of {ENGINES}, got {engine!r}")
    task = get_task(spec["task"], spec.get("data"), skip_bad_rows=bool(params.get("skip_bad_rows")))
    examples = task.eval_set()
    limit = params.get("limit")
    if limit is not None:
        examples = examples[: int(limit)]
    mine = list(range(env.rank, len(examples), env.world_size))
    max_new = int(params.get("max_new_tokens") or task.max_new_tokens)
    ref = spec.get("init_model") or spec["model"]

    tokenizer = load_tokenizer(ref, padding_side="left")
    prompts = [task.format_prompt(tokenizer, examples[i]["prompt"]) for i in mine]
    if engine == "vllm":
        texts, new_tokens = generate_vllm(resolve(ref), tokenizer, prompts, max_new,
                                          task.stop_strings)
    else:
        import torch

        model = load_model(ref, dtype=params.get("dtype", "auto")).eval()
        if torch.cuda.is_available():
            model.to(f"cuda:{env.local_rank}")
        texts, new_tokens = generate(model, tokenizer, prompts, max_new,
                                     int(params.get("batch_size", 32)), task.stop_strings)
    scores = task.score_batch(texts, [examples[i] for i in mine])
    rows = [{"index": i, "prompt": examples[i]["prompt"], "prediction": t, "scores": s}
            for i, t, s in zip(mine, texts, scores)]

    gathered = _gather(env, (rows, new_tokens))
    if env.rank != 0:
        return {}
    rows = sorted((r for part, _ in gathered for r in part), key=lambda r: r["index"])
    _write_jsonl(stage.root / "predictions.jsonl", rows)
    metrics = task.aggregate([r["scores"] for r in rows])
    return {
        "metrics": metrics,
        "primary_metric": task.primary_metric,
        "n_examples": len(rows),
        "tokens": sum(n for _, n in gathered),
        "engine": engine,
        "wall_seconds": time.time() - start,
        "skipped_rows": task.skipped.get("eval", 0),
    }


def _write_jsonl(path, rows) -> None:
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    with open(tmp, "w") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
