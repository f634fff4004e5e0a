"""The evaluation stage: generate for the task's evaluation set, score, write predictions.

    run_stage(stage, spec, env) -> {"metrics": {...}, "primary_metric": ..., ...}

Greedy decoding by default, batched with left padding and the KV cache, cut at the task's
stop strings. With several processes each rank takes every world_size-th example and rank 0
gathers. spec params: limit (first N evaluation examples), max_new_tokens (default: the
task's), batch_size, engine ("hf", or "vllm" where vllm is installed), skip_bad_rows, and the
protocol (docs/evaluation.md): chat_template, system_prompt, prompt_template, temperature,
top_p, seed, samples (k completions per prompt; metrics are the mean over the k samples, with
metrics_std and metrics_per_sample beside them).
predictions.jsonl in the stage directory holds one line per example (and sample) with its
scores.
"""

from __future__ import annotations

import json
import os
import time

from budgetlab.stagedir import StageDir

ENGINES = ("hf", "vllm")
# ChatML, the template the paper's authors install before running lm-evaluation-harness
# (balance-budget tuning/evaluation/config.py), without the indentation whitespace that their
# Python string leaves between the Jinja tags.
CHATML_TEMPLATE = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + "
                   "message['content'] + '<|im_end|>\\n' }}{% endfor %}"
                   "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
# lm-evaluation-harness's gsm8k `until` beyond "Question:": the ends of a chat turn.
CHAT_STOPS = ("<|im_end|>", "</s>")


def format_eval_prompt(task, tokenizer, prompt: str, params: dict) -> str:
    """The text the model is given for one evaluation prompt under the spec's protocol.

    chat_template "auto" (default): with no system_prompt/prompt_template set, the task's own
    format (the tokenizer's chat template with the task's system prompt when it has one, else
    a plain frame); with them set, the tokenizer's template when it has one, else the text
    as is. "tokenizer": the tokenizer's template (an error if it has none). "chatml": ChatML.
    "none": the prompt_template text as is. system_prompt: unset = the task's, "" = none.
    """
    mode = params.get("chat_template", "auto")
    custom = "prompt_template" in params or "system_prompt" in params
    if mode == "auto":
        if not custom:
            return task.format_prompt(tokenizer, prompt)
        mode = "tokenizer" if getattr(tokenizer, "chat_template", None) else "none"
    user = params.get("prompt_template", "{prompt}").replace("{prompt}", prompt)
    if mode == "none":
        return user
    if mode == "tokenizer" and not getattr(tokenizer, "chat_template", None):
        raise ValueError("eval.chat_template = 'tokenizer' but the model's tokenizer has no "
                         "chat template")
    system = params.get("system_prompt", task.system_prompt)
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": user}]
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True,
        **({"chat_template": CHATML_TEMPLATE} if mode == "chatml" else {}))


def stop_strings_for(task, params: dict) -> tuple[str, ...]:
    extra = CHAT_STOPS if params.get("chat_template", "auto") == "chatml" else ()
    return tuple(task.stop_strings) + tuple(s for s in extra if s not in task.stop_strings)


def sampling_seed(seed: int, sample: int, rank: int) -> int:
    """The torch seed of one rank's pass for one sample: reproducible for the same world size
    and batch size (batch composition changes the random stream)."""
    return seed + 1000 * sample + rank


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
             stop_strings=(), on_batch=None, temperature: float = 0.0, top_p: float = 1.0,
             seed: int = 0) -> tuple[list[str], int]:
    """Completions of `prompts` (batched, left-padded, KV cache); (texts, new tokens).
    Greedy at temperature 0; else sampled at that temperature with nucleus top_p (no top-k,
    as vLLM and lm-evaluation-harness sample), torch seeded with `seed` first."""
    import torch

    if temperature > 0:
        torch.manual_seed(seed)
        decoding = {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0}
    else:
        decoding = {"do_sample": False}

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
                                 max_new_tokens=max_new_tokens, use_cache=True,
                                 pad_token_id=pad, eos_token_id=tokenizer.eos_token_id,
                                 **decoding, **stop_kwargs)
        for row, i in zip(gen[:, width:].tolist(), chunk):
            row = [t for t in row if t != pad]
            new_tokens += len(row)
            text = tokenizer.decode(row, skip_special_tokens=True)
            out[i] = cut_at_stop(text, stop_strings)
        if on_batch is not None:
            on_batch(min(start + batch_size, len(order)), len(order))
    return out, new_tokens


def pin_rank_gpu(local_rank: int, environ=None) -> str | None:
    """Restrict this process to its rank's GPU before vLLM starts, so that each rank builds its
    engine on its own device (vLLM always takes the first visible GPU). Returns the device
    now visible as cuda:0, or None when there is nothing to pin (no GPUs listed, or already one).
    CUDA must not be initialised yet in this process; the eval stage touches CUDA only later."""
    environ = os.environ if environ is None else environ
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        # Not torch.cuda.device_count(): that initialises CUDA, after which the variable set
        # here would have no effect.
        import subprocess

        try:
            listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True,
                                     timeout=30).stdout
        except (OSError, subprocess.SubprocessError):
            listing = ""
        count = sum(1 for line in listing.splitlines() if line.startswith("GPU "))
        visible = ",".join(str(i) for i in range(count))
    devices = [d for d in visible.split(",") if d.strip()]
    if len(devices) <= 1:
        return devices[0] if devices else None
    if local_rank >= len(devices):
        raise ValueError(f"local rank {local_rank} but only {len(devices)} visible GPU(s) "
                         f"(CUDA_VISIBLE_DEVICES={visible})")
    environ["CUDA_VISIBLE_DEVICES"] = devices[local_rank]
    return devices[local_rank]


def generate_vllm(model_path: str, tokenizer, prompts, max_new_tokens, stop_strings,
                  samples: int = 1, temperature: float = 0.0, top_p: float = 1.0,
                  seed: int = 0) -> tuple[list[list[str]], int]:
    """The same outputs through vLLM (GPU machines with vllm installed): one list of texts
    per sample, and the number of new tokens."""
    from vllm import LLM, SamplingParams

    llm = LLM(model=model_path, tokenizer=model_path)
    params = SamplingParams(temperature=temperature, top_p=top_p if temperature > 0 else 1.0,
                            n=samples, seed=seed if temperature > 0 else None,
                            max_tokens=max_new_tokens, stop=list(stop_strings))
    outs = llm.generate([{"prompt_token_ids": encode_prompt(tokenizer, p)} for p in prompts],
                        params)
    texts = [[cut_at_stop(o.outputs[j].text, stop_strings) for o in outs]
             for j in range(samples)]
    tokens = sum(len(c.token_ids) for o in outs for c in o.outputs)
    del llm, outs   # release the engine's GPU memory for a scorer model (helpsteer)
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return texts, tokens


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


def eval_batch_size(spec: dict) -> int:
    """Prompts per generate() call: an execution setting ([eval] batch_size, carried in the
    stage's resources so that CUDA_OOM escalation can halve it without a new stage id)."""
    res = spec.get("resources") or {}
    return int(res.get("batch_size") or (spec.get("params") or {}).get("batch_size") or 32)


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

    def beat(done, total):   # rank 0's heartbeat: live progress, and "the eval has started"
        if env.rank == 0:
            stage.write_progress(phase="eval", step=done, total_steps=total)
    samples = int(params.get("samples", 1))
    temperature, top_p = float(params.get("temperature", 0.0)), float(params.get("top_p", 1.0))
    seed = int(params.get("seed", 0))
    stops = stop_strings_for(task, params)
    beat(0, len(mine) * samples)
    tokenizer = load_tokenizer(ref, padding_side="left")
    prompts = [format_eval_prompt(task, tokenizer, examples[i]["prompt"], params) for i in mine]
    if engine == "vllm":
        pin_rank_gpu(env.local_rank)   # this rank's GPU is now the only one, cuda:0
        by_sample, new_tokens = generate_vllm(resolve(ref), tokenizer, prompts, max_new, stops,
                                              samples, temperature, top_p, seed)
        import torch

        task.device = "cuda:0" if torch.cuda.is_available() else None
    else:
        import torch

        model = load_model(ref, dtype=params.get("dtype", "auto")).eval()
        if torch.cuda.is_available():
            task.device = f"cuda:{env.local_rank}"
            model.to(task.device)
        by_sample, new_tokens = [], 0
        for j in range(samples):
            texts, n = generate(model, tokenizer, prompts, max_new, eval_batch_size(spec), stops,
                                on_batch=lambda d, t, j=j: beat(j * t + d, samples * t),
                                temperature=temperature, top_p=top_p,
                                seed=sampling_seed(seed, j, env.rank))
            by_sample.append(texts)
            new_tokens += n
    rows = []
    for j, texts in enumerate(by_sample):
        scores = task.score_batch(texts, [examples[i] for i in mine])
        rows += [{"index": i, **({"sample": j} if samples > 1 else {}),
                  "prompt": examples[i]["prompt"], "prediction": t, "scores": sc}
                 for i, t, sc in zip(mine, texts, scores)]

    gathered = _gather(env, (rows, new_tokens))
    if env.rank != 0:
        return {}
    rows = sorted((r for part, _ in gathered for r in part),
                  key=lambda r: (r.get("sample", 0), r["index"]))
    _write_jsonl(stage.root / "predictions.jsonl", rows)
    per_sample = [task.aggregate([r["scores"] for r in rows if r.get("sample", 0) == j])
                  for j in range(samples)]
    metrics, spread = mean_and_spread(per_sample)
    out = {
        "metrics": metrics,
        "primary_metric": task.primary_metric,
        "n_examples": len(rows) // samples,
        "tokens": sum(n for _, n in gathered),
        "engine": engine,
        "wall_seconds": time.time() - start,
        "skipped_rows": task.skipped.get("eval", 0),
    }
    if samples > 1:
        out.update(samples=samples, metrics_std=spread, metrics_per_sample=per_sample)
    return out


def mean_and_spread(per_sample: list[dict]) -> tuple[dict, dict]:
    """Each metric's mean over the samples, and its sample standard deviation (n - 1; 0 for
    a single sample)."""
    k = len(per_sample)
    names = sorted({m for s in per_sample for m in s})
    mean = {m: sum(s.get(m, 0.0) for s in per_sample) / k for m in names}
    std = {m: (sum((s.get(m, 0.0) - mean[m]) ** 2 for s in per_sample) / (k - 1)) ** 0.5
           if k > 1 else 0.0 for m in names}
    return mean, std


def _write_jsonl(path, rows) -> None:
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    with open(tmp, "w") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
