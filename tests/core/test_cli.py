"""The plan and ledger commands, exit codes, and a CLI that imports no torch."""

import json
import subprocess
import sys
from pathlib import Path

from budgetlab.graph import build_plan
from budgetlab.ledger import Ledger
from budgetlab.spec import load_spec

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
    assert "gpu_hours_estimate" in out and "points" in out
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
    led.register(build_plan(load_spec(write_spec())))
    led.close()
    for sub in ("points", "stages", "attempts", "spend"):
        res = cli("ledger", sub, "--json")
        assert res.exit_code == 0, (sub, res.output)
        json.loads(res.stdout)
        assert cli("ledger", sub).exit_code == 0
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
