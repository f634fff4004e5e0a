"""Cells -> points -> stages, with content-hash ids (DESIGN section 2).

A stage id hashes everything that changes the stage's output and nothing else (not resources,
not paths), so equal work gets one id: an SFT stage is shared by every point that needs it,
and an SFT-only point is shared by every method. The data a stage hashes is the data it
reads: an SFT stage its SFT pool (and the evaluation set its pool leaves out), a preference
stage its pairs (and the evaluation set), an eval stage its evaluation set (and its scorer's
model). Editing the preference file retrains no SFT stage.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from budgetlab.version import SCHEMA_VERSION
from budgetlab.alloc import allocate, annotation_cost
from budgetlab.datamodel import Cell, Point, Stage
from budgetlab.spec import GridSpec

SFT_ONLY = "sft"   # method name of points with no preference stage
BASELINE = "base"  # method name of the base-model evaluation points
# Which sources each stage kind reads (training pools exclude the evaluation prompts).
READS = {"sft": ("sft", "eval"), "dpo": ("preferences", "eval"),
         "kto": ("preferences", "eval"), "eval": ("eval", "reward_model")}
# [eval] keys that are execution settings, not part of the eval stage's id: the generation
# batch size (CUDA_OOM escalation halves it) and whether to evaluate the base model at all.
EVAL_EXECUTION = ("batch_size", "baseline")


def content_id(obj: dict) -> str:
    """sha256 of canonical JSON, first 16 hex digits."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass
class Plan:
    spec: GridSpec
    cells: list[Cell]
    points: dict[str, Point]
    stages: dict[str, Stage]   # parents before children

    @property
    def name(self) -> str:
        return self.spec.name

    def children(self, stage_id: str) -> list[Stage]:
        return [s for s in self.stages.values() if s.parent_id == stage_id]


class _Builder:
    def __init__(self, spec: GridSpec):
        self.spec = spec
        self.stages: dict[str, Stage] = {}

    def stage(self, kind, task, model, parent_id, n, seed, params) -> str:
        spec = self.spec
        sources = spec.source_ids.get(task, {})
        identity = {
            "schema": SCHEMA_VERSION, "kind": kind, "task": task,
            "model": spec.model_ids.get(model, spec.models_resolved[model]),
            "parent": parent_id, "n": n, "seed": seed, "params": params,
            # Content hashes (local files) or hub revisions, not paths: moving a file keeps
            # the id, editing it changes it.
            "data": {k: sources[k] for k in READS[kind] if k in sources},
        }
        sid = content_id(identity)
        if sid not in self.stages:
            resources = dict(spec.resources[kind])
            if kind == "eval":
                resources["batch_size"] = spec.eval["batch_size"]
            self.stages[sid] = Stage(
                stage_id=sid, kind=kind, task=task, model=spec.models_resolved[model],
                parent_id=parent_id, n=n, seed=seed, params=params,
                data=dict(spec.data.get(task, {})), resources=resources)
        return sid


def eval_params(spec: GridSpec) -> dict:
    return {k: v for k, v in spec.eval.items() if k not in EVAL_EXECUTION}


def build_plan(spec: GridSpec) -> Plan:
    b = _Builder(spec)
    points: dict[str, Point] = {}
    cells: list[Cell] = []
    ev = eval_params(spec)
    c_sft, c_pair = spec.costs["sft_example"], spec.costs["preference_pair"]
    for task in spec.tasks:
        for model in spec.models:
            if spec.eval["baseline"]:
                eid = b.stage("eval", task, model, None, None, None, ev)
                points.setdefault(eid, Point(eid, task, spec.models_resolved[model], BASELINE,
                                             0, 0, None, None, None, eid))
            for budget in spec.budgets:
                for frac in spec.sft_fractions:
                    n_sft, n_pft = allocate(budget, frac, c_sft, c_pair)
                    for method in spec.methods:
                        for seed in spec.seeds:
                            sft_id = pft_id = None
                            if n_sft > 0:
                                sft_id = b.stage("sft", task, model, None, n_sft, seed,
                                                 spec.train["sft"])
                            if n_pft > 0:
                                pft_id = b.stage(method, task, model, sft_id, n_pft, seed,
                                                 spec.train[method])
                            eid = b.stage("eval", task, model, pft_id or sft_id, None, None, ev)
                            points.setdefault(eid, Point(
                                eid, task, spec.models_resolved[model],
                                method if pft_id else SFT_ONLY, n_sft, n_pft, seed,
                                sft_id, pft_id, eid))
                            cells.append(Cell(
                                spec.name, task, model, float(budget), float(frac), method,
                                seed, n_sft, n_pft, annotation_cost(n_sft, n_pft, c_sft, c_pair),
                                eid))
    return Plan(spec=spec, cells=cells, points=points, stages=b.stages)


# ---------------------------------------------------------------- pools the data can serve

class PoolTooSmall(ValueError):
    """A cell asks for more examples than its task's pool holds (known before anything runs)."""


_POOL_WHAT = {"sft": "SFT examples", "preferences": "preference pairs"}


def _known_locally(task, key: str) -> bool:
    """Whether a source is read without the network: the task's built-in generator, or a
    local file. Hub datasets are not (their size is unknown until a compute node loads them)."""
    from pathlib import Path

    source = task.data.get(key)
    if source is None:
        default = task.sources.get(key)
        return isinstance(default, str) and default.startswith("builtin:")
    return Path(str(source)).expanduser().is_file()


def known_pool_sizes(task_name: str, data: dict) -> dict:
    """{"sft"|"preferences": (rows, exact)} for the pools whose size is known here: rows after
    de-duplication, and after removing the evaluation prompts when the evaluation set is local
    too (exact=True); with a hub evaluation set the de-duplicated count is an upper bound
    (exact=False). Pools read from the hub are left out: nothing is downloaded."""
    import importlib.util

    from budgetlab.tasks import dedupe, get_task

    task = get_task(task_name, data)
    out = {}
    for key in ("sft", "preferences"):
        if not _known_locally(task, key):
            continue
        if task.data.get(key) is not None and importlib.util.find_spec("datasets") is None:
            continue  # local files read through `datasets`; the worker checks n again
        if _known_locally(task, "eval"):
            out[key] = (len(task._training(key)), True)
        else:
            out[key] = (len(dedupe(task._rows(key))), False)
    return out


def check_pool_sizes(plan: Plan) -> None:
    """PoolTooSmall naming the first cell whose n_sft or n_pft exceeds a pool of known size."""
    spec = plan.spec
    sizes = {t: known_pool_sizes(t, spec.data.get(t, {})) for t in spec.tasks}
    for c in plan.cells:
        for key, n in (("sft", c.n_sft), ("preferences", c.n_pft)):
            known = sizes[c.task].get(key)
            if known is None or n <= known[0]:
                continue
            rows, exact = known
            after = ("duplicates and evaluation prompts removed" if exact
                     else "duplicates removed")
            raise PoolTooSmall(
                f"cell task={c.task} model={c.model} budget={c.budget:g} "
                f"sft_fraction={c.sft_fraction:g} method={c.method} seed={c.seed} needs "
                f"{n} {_POOL_WHAT[key]} but the {c.task} {key} pool holds {rows} ({after})")


__all__ = ["Plan", "Cell", "Point", "Stage", "build_plan", "content_id", "eval_params",
           "SFT_ONLY", "BASELINE", "PoolTooSmall", "check_pool_sizes", "known_pool_sizes"]
