"""Training stages (SFT, DPO, KTO) on DeepSpeed: the engine every grid point runs.

    run_stage(stage, spec, env) -> result dict     (called by budgetlab.worker)

Modules: config (spec -> TrainConfig), data (tokenise, mask, pack, plan steps), losses,
reference (reference log-probs, once per stage), checkpoint (atomic save/resume, signals),
export (model/ in Hugging Face format), loop (the loop itself).
"""

from __future__ import annotations

from budgetlab.train.checkpoint import TrainingInterrupted

__all__ = ["run_stage", "TrainingInterrupted"]


def load_rows(spec: dict, kind: str) -> tuple[list[dict], object]:
    """The stage's training records from its task: the first n of the seed's permutation."""
    from budgetlab.tasks import get_task, subset

    task = get_task(spec["task"], spec.get("data") or {})
    pool = task.sft_pool() if kind == "sft" else task.preference_pool()
    n = spec.get("n")
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"spec.json: n={n!r} must be a positive integer for a {kind} stage")
    if n > len(pool):
        raise ValueError(f"spec.json: n={n} but task {spec['task']!r} has only {len(pool)} "
                         f"{'SFT examples' if kind == 'sft' else 'preference pairs'}")
    return subset(pool, n, spec.get("seed", 0)), task


def run_stage(stage, spec: dict, env, tracker=None) -> dict:
    """Run one training stage directory as this process's rank; returns the result dict
    (the worker writes result.json on rank 0). tracker: budgetlab.tracking, rank 0."""
    from budgetlab.train import loop
    from budgetlab.train.config import TrainConfig

    cfg = TrainConfig.from_spec(spec)
    rows, task = load_rows(spec, cfg.kind)
    init_model = spec.get("init_model") or spec["model"]
    info = {"stage_id": spec.get("stage_id"), "base_model": spec.get("model"),
            "task": spec.get("task")}
    result = loop.run(stage, cfg, rows, env, init_model,
                      format_prompt=getattr(task, "format_prompt", None), info=info,
                      tracker=tracker)
    result["stage_id"] = spec.get("stage_id")
    result["kind"] = cfg.kind
    return result
