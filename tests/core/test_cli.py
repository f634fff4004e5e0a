"""The plan and ledger commands, exit codes, and a CLI that imports no torch."""

import json
import subprocess
import sys
from pathlib import Path

from budgetlab.graph import build_plan
from budgetlab.ledger import Ledger
from budgetlab.spec import load_spec

from tests.conftest import GOOD_SPEC

ROOT = Path(__file__).parents[2]


def test_plan_json_keys(cli, write_spec):
    res = cli("plan", write_spec(), "--json")
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["cells"] == 24
    assert set(out["stages"]) == {"sft", "dpo", "kto", "eval"}
    assert out["stages"]["sft"] == 8 and out["sft_trainings_without_sharing"] > 8
    assert out["annotation_spend"] == sum(  # every cell spends its whole budget here
        b * 2 * 2 * 3 for b in (64, 256))
    # hand-counted: mixed 2 budgets x 2 methods x 2 seeds, SFT-only 2 x 2, PFT-only 2 x 2 x 2
    assert out["points"] == 8 + 4 + 8 and out["baseline_points"] == 1
    # every stage of this grid runs on CPU: zero hours, none unknown
    assert out["gpu_hours_estimate"] == 0.0 and out["gpu_hours_unknown_models"] == []
    assert not cli.ledger_path.exists()  # plan writes nothing


def test_plan_table_and_paper_grid(cli):
    res = cli("plan", ROOT / "jobs" / "paper-gsm8k.toml")
    assert res.exit_code == 0, res.output
    assert "56 shared vs 176 run per point" in res.stdout


def test_bad_spec_exit_2_one_line(cli, write_spec):
    path = write_spec("name = 'x'\n[grid]\ntasks = ['nope']\n")
    res = cli("plan", path)
    assert res.exit_code == 2
    assert res.stderr.strip().count("\n") == 0
    assert f"{path}: grid.tasks:" in res.stderr


def test_ledger_commands(cli, write_spec):
    led = Ledger(cli.ledger_path)
    plan = build_plan(load_spec(write_spec()))
    led.register(plan)
    led.close()
    out = {}
    for sub in ("points", "stages", "attempts", "spend"):
        res = cli("ledger", sub, "--json")
        assert res.exit_code == 0, (sub, res.output)
        out[sub] = json.loads(res.stdout)
        assert cli("ledger", sub).exit_code == 0
    # against the plan the ledger was filled from (a second path), and nothing submitted yet
    assert sorted(r["stage_id"] for r in out["stages"]) == sorted(plan.stages)
    assert {r["state"] for r in out["stages"]} == {"NEW"}  # registered, not submitted
    assert sorted(r["point_id"] for r in out["points"]) == sorted(plan.points)
    assert out["attempts"] == []
    rows = json.loads(cli("ledger", "points", "--grid", "t", "--json").stdout)
    # mixed (budgets x methods x seeds) + sft-only (budgets x seeds) + pft-only + base
    assert len(rows) == 8 + 4 + 8 + 1
    spend = json.loads(cli("ledger", "spend", "--json").stdout)
    assert sum(r["annotation_cost"] for r in spend) == (64 + 256) * 12
    res = cli("ledger", "sql", "SELECT COUNT(*) AS n FROM cells", "--json")
    assert json.loads(res.stdout) == [{"n": 24}]
    before = cli.ledger_path.read_bytes()
    res = cli("ledger", "sql", "DELETE FROM cells")
    assert res.exit_code == 2 and "read-only" in res.stderr
    assert cli.ledger_path.read_bytes() == before
    assert cli("ledger", "stages", "--grid", "nope").exit_code == 2


def test_missing_ledger_is_bad_input(cli):
    res = cli("ledger", "points")
    assert res.exit_code == 2 and "no ledger" in res.stderr


def test_console_script_and_no_torch_on_import(tmp_path):
    exe = Path(sys.executable).parent / "budgetlab"
    res = subprocess.run([str(exe), "--ledger", str(tmp_path / "l.db"), "plan",
                          str(tmp_path / "missing.toml")], capture_output=True, text=True)
    assert res.returncode == 2 and "no such grid spec file" in res.stderr
    code = ("import sys, budgetlab.cli; heavy = [m for m in ('torch', 'transformers', "
            "'deepspeed', 'datasets', 'peft') if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_ledger_commands_import_neither_pandas_nor_numpy(tmp_path):
    """sqlite_utils would import both (0.6 CPU-s of every `budgetlab status`); the ledger
    works without them, and a later `import numpy, pandas` in the same process still works."""
    code = f"""
import sys
from budgetlab.api import Lab, load_plan
from budgetlab.ledger import Ledger
Ledger({str(tmp_path / 'l.db')!r}).register(load_plan({str(ROOT / 'jobs' / 'quickstart.toml')!r}))
lab = Lab(ledger={str(tmp_path / 'l.db')!r}, workdir={str(tmp_path / 'runs')!r})
print(sorted(m for m in ('pandas', 'numpy') if m in sys.modules))
import numpy, pandas
print(len(lab.stages()) > 0, numpy.__name__, pandas.__name__)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:2] == ["[]", "True numpy pandas"], out.stdout


def test_plan_with_local_data_needs_no_datasets_package(tmp_path):
    """A login node with the core install only (no `datasets`) can still plan a grid whose
    data are local files: the line checks run, the row checks wait for the worker."""
    spec = tmp_path / "g.toml"
    spec.write_text(f"""
name = "core"
[grid]
tasks = ["gsm8k"]
models = ["Qwen/Qwen2.5-7B"]
budgets = [4]
sft_fractions = [0.5]
methods = ["dpo"]
seeds = [0]
[data.gsm8k]
sft = "{ROOT / 'tests' / 'fixtures' / 'gsm8k_sft.jsonl'}"
""")
    code = ("import sys; sys.modules['datasets'] = None; from budgetlab.cli import main; "
            "main(['plan', sys.argv[1], '--json'])")
    res = subprocess.run([sys.executable, "-c", code, str(spec)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["cells"] == 1
    (tmp_path / "bad.jsonl").write_text('{"question": "q"\n')
    spec.write_text(spec.read_text().replace(
        str(ROOT / 'tests' / 'fixtures' / 'gsm8k_sft.jsonl'), str(tmp_path / "bad.jsonl")))
    res = subprocess.run([sys.executable, "-c", code, str(spec)], capture_output=True, text=True)
    assert res.returncode == 2 and "line 1" in res.stderr


def test_status_of_every_grid(cli, write_spec):
    """`status` without a grid lists every registered grid (JSON: one object per grid)."""
    from budgetlab.graph import build_plan
    from budgetlab.ledger import Ledger
    from budgetlab.spec import load_spec

    led = Ledger(cli.ledger_path)
    for name in ("a", "b"):
        led.register(build_plan(load_spec(write_spec(GOOD_SPEC.replace('name = "t"',
                                                                       f'name = "{name}"'),
                                                     f"{name}.toml"))))
    r = cli("status", "--no-sync", "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert [s["grid"] for s in out] == ["a", "b"]
    assert all(s["stages_total"] == len(build_plan(load_spec(write_spec(GOOD_SPEC))).stages)
               and s["active"] == 0 for s in out)


def test_budget_larger_than_a_known_pool_is_refused_before_anything_runs(cli, write_spec):
    """arith's generated pools have a known size: plan and submit refuse, ledger unchanged."""
    from budgetlab.tasks import get_task

    n_pool = len(get_task("arith").sft_pool())  # the worker's own path to the pool
    big = write_spec(GOOD_SPEC.replace("budgets = [64, 256]", "budgets = [64, 100000]"), "big.toml")
    res = cli("plan", big)
    assert res.exit_code == 2 and res.stderr.strip().count("\n") == 0, res.output
    assert n_pool == 3921 and (
        f"cell task=arith model=builtin:arith-tiny budget=100000 sft_fraction=1 method=dpo seed=0"
        f" needs 100000 SFT examples but the arith sft pool holds {n_pool}") in res.stderr
    led = Ledger(cli.ledger_path)
    led.register(build_plan(load_spec(write_spec())))
    led.close()
    before = cli.ledger_path.read_bytes()
    res = cli("submit", big)
    assert res.exit_code == 2 and "holds 3921" in res.stderr
    assert cli.ledger_path.read_bytes() == before and not cli.workdir.exists()
    # preference pairs too: all of the budget on pairs
    pft = write_spec(GOOD_SPEC.replace("budgets = [64, 256]", "budgets = [5000]")
                     .replace("[1.0, 0.5, 0.0]", "[0.0]"), "pft.toml")
    n_pairs = len(get_task("arith").preference_pool())
    res = cli("plan", pft)
    assert res.exit_code == 2 and f"needs 5000 preference pairs but the arith preferences pool " \
        f"holds {n_pairs}" in res.stderr


def test_pool_sizes_of_local_files_count_after_deduplication(cli, write_spec, tmp_path,
                                                             monkeypatch):
    rows = [{"prompt": f"Q{i}", "response": f"A{i}"} for i in range(4)]
    rows += rows[:2]  # two exact duplicates: 4 distinct rows
    sft = tmp_path / "sft.jsonl"
    sft.write_text("".join(json.dumps(r) + "\n" for r in rows))
    text = (GOOD_SPEC.replace("[1.0, 0.5, 0.0]", "[1.0]").replace("[64, 256]", "{budgets}")
            + f'\n[data.arith]\nsft = "{sft}"\n')
    ok = cli("plan", write_spec(text.format(budgets="[2, 4]"), "ok.toml"), "--json")
    assert ok.exit_code == 0, ok.output  # exactly the pool: served
    res = cli("plan", write_spec(text.format(budgets="[4, 5]"), "five.toml"))
    assert res.exit_code == 2 and "budget=5 " in res.stderr
    assert "needs 5 SFT examples but the arith sft pool holds 4 (duplicates and evaluation " \
        "prompts removed)" in res.stderr
    # a hub evaluation set: nothing is downloaded (offline), the de-duplicated count bounds n
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    gsm = tmp_path / "gsm.jsonl"
    gsm.write_text("".join(json.dumps({"prompt": f"q{i}", "response": f"{i} #### {i}"}) + "\n"
                           for i in (1, 2, 3, 3)))
    spec = (GOOD_SPEC.replace('tasks = ["arith"]', 'tasks = ["gsm8k"]')
            .replace("[1.0, 0.5, 0.0]", "[1.0]").replace("[64, 256]", "{budgets}")
            + f'\n[data.gsm8k]\nsft = "{gsm}"\n')
    assert cli("plan", write_spec(spec.format(budgets="[3]"), "g3.toml")).exit_code == 0
    res = cli("plan", write_spec(spec.format(budgets="[4]"), "g4.toml"))
    assert res.exit_code == 2 and "gsm8k sft pool holds 3 (duplicates removed)" in res.stderr
