"""Ledgers for the report tests: a real plan registered from a spec, with results recorded
through the Ledger API from a surface the test chooses (the data is the test's input)."""

import textwrap
from types import SimpleNamespace

import pytest

SPEC = """
name = "surf"
[grid]
tasks = ["arith"]
models = ["builtin:arith-tiny"]
budgets = [64, 256, 1024]
sft_fractions = [1.0, 0.5, 0.1, 0.0]
methods = ["dpo", "kto"]
seeds = [0, 1]
[costs]
unit = "examples"
sft_example = 1.0
preference_pair = 1.0
[train]
batch_size = 8
[eval]
limit = 20
"""


def register(tmp_path, text=SPEC):
    from budgetlab.graph import build_plan
    from budgetlab.ledger import Ledger
    from budgetlab.spec import load_spec

    path = tmp_path / "grid.toml"
    path.write_text(textwrap.dedent(text))
    plan = build_plan(load_spec(path))
    led = Ledger(tmp_path / "ledger.db")
    led.register(plan)
    return led, plan


from tests.conftest import block, record_attempt  # noqa: E402


def record(led, plan, score, fail=(), skip=(), gpu_seconds=36.0, base_score=0.0):
    """Run every point 'by hand': each stage of its chain gets an attempt and a result.

    score(point) -> metric value; points whose id is in `fail` get their last training stage
    FAILED (the eval BLOCKED), points in `skip` are left NEW (never submitted)."""
    with led.write():  # one transaction: a commit per stage would fsync hundreds of times
        _record(led, plan, score, fail, skip, gpu_seconds, base_score)


def _record(led, plan, score, fail, skip, gpu_seconds, base_score):
    done = set()
    for p in plan.points.values():
        if p.point_id in skip:
            continue
        chain = [s for s in (p.sft_stage_id, p.pft_stage_id, p.eval_stage_id) if s]
        for i, sid in enumerate(chain):
            if sid in done:
                continue
            if p.point_id in fail and i == len(chain) - 2:
                record_attempt(led, sid, "FAILED", error="RuntimeError: boom", cpu_seconds=5.0)
                for later in chain[i + 1:]:
                    block(led, later)
                break
            kind = plan.stages[sid].kind
            result = {"stage_id": sid, "kind": kind, "metrics": {"loss": 0.5}}
            if kind == "eval":
                value = base_score if p.method == "base" else score(p)
                result = {"stage_id": sid, "kind": "eval", "primary_metric": "accuracy",
                          "metrics": {"accuracy": value, "format_rate": 1.0}}
            record_attempt(led, sid, "COMPLETED", result=result, gpu_seconds=gpu_seconds,
                           cpu_seconds=2 * gpu_seconds)
            done.add(sid)


def paper_surface(p):
    """The paper's shape: SFT alone wins at small budgets, a mix at large ones, PFT from the
    base model (n_sft = 0) is poor. Seeds differ by 0.01."""
    total = p.n_sft + p.n_pft
    if p.n_sft == 0:
        s = 0.02
    elif p.n_pft == 0:
        s = 0.1 + 0.05 * (total >= 256) + 0.05 * (total >= 1024)
    else:
        s = 0.06 + 0.00012 * total * (1.2 if p.method == "dpo" else 1.0)
    return round(s + 0.01 * p.seed, 6)


@pytest.fixture
def surf():
    """The helpers above (test modules cannot import conftest under --import-mode=importlib)."""
    return SimpleNamespace(register=register, record=record, paper_surface=paper_surface,
                           SPEC=SPEC)


@pytest.fixture
def surface_ledger(tmp_path):
    led, plan = register(tmp_path)
    record(led, plan, paper_surface)
    yield led, plan
    led.close()
