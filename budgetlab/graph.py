"""Cells -> points -> stages, with content-hash ids (DESIGN section 2).

A stage id hashes everything that changes the stage's output and nothing else (not resources,
not paths), so equal work gets one id: an SFT stage is shared by every point that needs it,
and an SFT-only point is shared by every method.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from budgetlab import SCHEMA_VERSION
from budgetlab.alloc import allocate, annotation_cost
from budgetlab.spec import GridSpec

SFT_ONLY = "sft"   # method name of points with no preference stage
BASELINE = "base"  # method name of the base-model evaluation points


def content_id(obj: dict) -> str:
    """sha256 of canonical JSON, first 16 hex digits."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Stage:
    stage_id: str
    kind: str
    task: str
    model: str
    parent_id: str | None
    n: int | None
    seed: int | None
    params: dict = field(hash=False)
    data: dict = field(hash=False)        # the task's local data overrides (absolute paths)
    resources: dict = field(hash=False)   # execution settings: not part of the id

    def spec_json(self, workdir: str | Path, parent_kind: str | None = None) -> dict:
        """What the worker reads from spec.json."""
        stages = Path(workdir).resolve() / "stages"
        parent = None
        init_model = self.model
        if self.parent_id:
            parent = {"stage_id": self.parent_id, "kind": parent_kind,
                      "dir": str(stages / self.parent_id)}
            init_model = str(stages / self.parent_id / "model")
        return {
            "schema_version": SCHEMA_VERSION, "stage_id": self.stage_id, "kind": self.kind,
            "task": self.task, "model": self.model, "seed": self.seed, "n": self.n,
            "params": self.params, "data": self.data, "parent": parent,
            "init_model": init_model, "resources": self.resources,
        }


@dataclass(frozen=True)
class Point:
    point_id: str          # = the eval stage's id
    task: str
    model: str
    method: str            # dpo | kto | sft (SFT only) | base (the base model)
    n_sft: int
    n_pft: int
    seed: int | None
    sft_stage_id: str | None
    pft_stage_id: str | None
    eval_stage_id: str


@dataclass(frozen=True)
class Cell:
    grid: str
    task: str
    model: str
    budget: float
    sft_fraction: float
    method: str
    seed: int
    n_sft: int
    n_pft: int
    annotation_cost: float
    point_id: str


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
        data = spec.data.get(task, {})
        identity = {
            "schema": SCHEMA_VERSION, "kind": kind, "task": task,
            "model": spec.models_resolved[model], "parent": parent_id, "n": n, "seed": seed,
            "params": params,
            # Content hashes, not paths: moving a file keeps the id, editing it changes it.
            # All of the task's sources count: training pools exclude the eval prompts.
            "data": {k: spec.data_hashes[p] for k, p in sorted(data.items())},
        }
        sid = content_id(identity)
        if sid not in self.stages:
            self.stages[sid] = Stage(
                stage_id=sid, kind=kind, task=task, model=spec.models_resolved[model],
                parent_id=parent_id, n=n, seed=seed, params=params, data=dict(data),
                resources=spec.resources[kind])
        return sid


def eval_params(spec: GridSpec) -> dict:
    return {k: v for k, v in spec.eval.items() if k != "baseline"}


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
