"""Stage graph: content-hash ids, sharing, and stability across processes."""

import json
import os
import subprocess
import sys

from budgetlab.graph import build_plan
from budgetlab.spec import load_spec

from tests.conftest import GOOD_SPEC


def _plan(write_spec, text=GOOD_SPEC):
    return build_plan(load_spec(write_spec(text)))


def test_sharing(write_spec):
    plan = _plan(write_spec)
    # 2 budgets x 3 fractions x 2 methods x 2 seeds
    assert len(plan.cells) == 24
    sft = [s for s in plan.stages.values() if s.kind == "sft"]
    # one SFT per (budget, fraction > 0, seed), shared by dpo and kto
    assert len(sft) == 2 * 2 * 2
    sft_only = [p for p in plan.points.values() if p.method == "sft"]
    assert len(sft_only) == 2 * 2  # budgets x seeds, the same for both methods
    # every preference stage starts from the SFT stage of its cell (or the base model)
    for s in plan.stages.values():
        if s.kind in ("dpo", "kto") and s.parent_id:
            assert plan.stages[s.parent_id].kind == "sft"
    # parents come before children
    order = list(plan.stages)
    for s in plan.stages.values():
        if s.parent_id:
            assert order.index(s.parent_id) < order.index(s.stage_id)
    # one base-model evaluation per (task, model)
    assert [p.method for p in plan.points.values()].count("base") == 1


def test_ids_ignore_resources_and_change_with_what_changes_output(write_spec):
    base = _plan(write_spec)
    ids = set(base.stages)
    more_gpus = _plan(write_spec, GOOD_SPEC + "\n[resources]\nmicro_batch_size = 2\ntime_min = 9\n")
    assert set(more_gpus.stages) == ids
    for old, new in [("lr = 1e-3", "lr = 2e-3"), ("beta = 0.1", "beta = 0.2"),
                     ("max_length = 128", "max_length = 256"), ("limit = 20", "limit = 21")]:
        changed = _plan(write_spec, GOOD_SPEC.replace(old, new))
        assert set(changed.stages) != ids, old
    lora = _plan(write_spec, GOOD_SPEC.replace("max_length = 128", 'max_length = 128\nfinetune = "lora"'))
    assert not (set(lora.stages) - {s for s in ids if base.stages[s].kind == "eval"
                                    and base.stages[s].parent_id is None}) & ids


def test_changing_n_changes_only_affected_stages(write_spec):
    a = _plan(write_spec)
    b = _plan(write_spec, GOOD_SPEC.replace("budgets = [64, 256]", "budgets = [64, 300]"))
    common = set(a.stages) & set(b.stages)
    assert any(a.stages[s].n == 64 for s in common if a.stages[s].kind == "sft")
    assert not any(a.stages[s].n in (128, 256) for s in common)
    assert any(b.stages[s].n == 150 for s in b.stages)


def _depends_on_sft(plan, sid) -> bool:
    """Does the stage train on SFT data or descend from a stage that does?"""
    while sid:
        if plan.stages[sid].kind == "sft":
            return True
        sid = plan.stages[sid].parent_id
    return False


def test_a_stage_id_hashes_the_data_it_reads(write_spec, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    sft, pref = tmp_path / "sft.jsonl", tmp_path / "pref.jsonl"
    sft.write_text('{"prompt": "Q: 1+1?", "response": "2"}\n')
    pref.write_text('{"prompt": "Q: 1+1?", "chosen": "2", "rejected": "3"}\n')
    text = GOOD_SPEC + '\n[data.arith]\nsft = "sft.jsonl"\npreferences = "pref.jsonl"\n'
    a = _plan(write_spec, text)
    sft.write_text('{"prompt": "Q: 1+2?", "response": "3"}\n')
    b = _plan(write_spec, text)
    # Editing the SFT file changes the SFT stages and everything below them, nothing else.
    assert {s for s in a.stages if _depends_on_sft(a, s)}.isdisjoint(b.stages)
    assert {s for s in a.stages if not _depends_on_sft(a, s)} <= set(b.stages)
    pref.write_text('{"prompt": "Q: 1+1?", "chosen": "2", "rejected": "4"}\n')
    c = _plan(write_spec, text)
    # Editing the preference file retrains no SFT stage (on main it changed every id).
    sfts = {s for s, st in b.stages.items() if st.kind == "sft"}
    assert sfts and sfts <= set(c.stages)
    assert {s for s, st in b.stages.items() if st.kind in ("dpo", "kto")}.isdisjoint(c.stages)
    # Moving a file keeps every id: content counts, not the path.
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    pref.rename(moved / "pref.jsonl")
    d = _plan(write_spec, text.replace('"pref.jsonl"', '"elsewhere/pref.jsonl"'))
    assert set(d.stages) == set(c.stages)


def _fake_hub_cache(root, kind, name, commit):
    """The layout huggingface_hub writes: <cache>/<kind>s--org--name/refs/main = commit."""
    refs = root / f"{kind}s--{name.replace('/', '--')}" / "refs"
    refs.mkdir(parents=True, exist_ok=True)
    (refs / "main").write_text(commit)


def test_a_new_hub_revision_changes_the_ids_that_read_it(write_spec, tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    text = GOOD_SPEC.replace('tasks = ["arith"]', 'tasks = ["gsm8k"]').replace(
        'models = ["builtin:arith-tiny"]', 'models = ["org/base-model"]')
    none = _plan(write_spec, text)
    _fake_hub_cache(cache, "model", "org/base-model", "a" * 40)
    _fake_hub_cache(cache, "dataset", "mohit-raghavendra/gsm8k-gpt4opreferences", "b" * 40)
    first = _plan(write_spec, text)
    assert set(first.stages).isdisjoint(none.stages)   # the model revision is now known
    _fake_hub_cache(cache, "dataset", "mohit-raghavendra/gsm8k-gpt4opreferences", "c" * 40)
    second = _plan(write_spec, text)
    pft = {s for s, st in first.stages.items() if st.kind in ("dpo", "kto")}
    assert pft and pft.isdisjoint(second.stages)               # they read the preferences
    assert {s for s, st in first.stages.items() if st.kind == "sft"} <= set(second.stages)
    # A pinned revision is hashed as written, cached or not.
    pinned = _plan(write_spec, text.replace('"org/base-model"', '"org/base-model@v2"'))
    assert set(pinned.stages).isdisjoint(first.stages)
    assert pinned.spec.model_ids["org/base-model@v2"] == "hub:org/base-model@v2"


def test_ids_identical_across_processes_and_hash_seeds(write_spec):
    path = write_spec()
    code = ("import json,sys; from budgetlab.spec import load_spec; "
            "from budgetlab.graph import build_plan; "
            "print(json.dumps(sorted(build_plan(load_spec(sys.argv[1])).stages)))")
    outs = set()
    for seed in ("0", "1", "12345"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        out = subprocess.run([sys.executable, "-c", code, str(path)], env=env, check=True,
                             capture_output=True, text=True).stdout
        outs.add(out)
    assert len(outs) == 1
    assert json.loads(outs.pop()) == sorted(_plan(write_spec).stages)
