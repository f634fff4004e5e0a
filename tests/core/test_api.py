"""budgetlab.Lab, the Python API the CLI wraps: the same answers as the commands, the data
model's types, bad input as BadInput; and one real run on the local executor."""

import json
import textwrap
import time

import pytest

from budgetlab import Lab
from budgetlab.datamodel import Attempt, Cell, Grid, Stage
from budgetlab.errors import BadInput, RuntimeFailure
from budgetlab.stagedir import StageDir
from tests.conftest import record_attempt
from tests.report.conftest import paper_surface, record, register


@pytest.fixture
def measured(tmp_path, cli):
    """A registered grid whose points have results (recorded through the Ledger API), the
    Lab on it and the CLI on the same ledger."""
    led, plan = register(tmp_path)
    record(led, plan, paper_surface)
    lab = Lab(ledger=tmp_path / "ledger.db", workdir=tmp_path / "runs")
    return lab, plan, cli


def test_plan_is_the_cli_plan(write_spec, cli):
    path = write_spec()
    lab = Lab(ledger="unused.db", workdir="unused")
    summary = lab.plan(path)
    assert summary == json.loads(cli("plan", path, "--json").output)
    assert summary["points"] > 0 and not (path.parent / "unused.db").exists()


def test_report_and_listings_match_the_cli(measured):
    lab, plan, cli = measured
    rep = lab.report("surf")
    assert rep.to_records() == json.loads(cli("report", "surf", "--json").output)["cells"]
    df = rep.to_pandas()
    assert len(df) == len(plan.cells) and df["score"].notna().all()
    # The data model's types, and the same rows as `ledger ...`.
    assert all(isinstance(g, Grid) for g in lab.grids())
    assert all(isinstance(c, Cell) for c in lab.cells("surf"))
    assert all(isinstance(s, Stage) and s.state == "COMPLETED" for s in lab.stages("surf"))
    assert all(isinstance(a, Attempt) for a in lab.attempts())
    assert lab.points("surf") == json.loads(cli("ledger", "points", "--grid", "surf",
                                                "--json").output)
    assert lab.spend("surf") == json.loads(cli("ledger", "spend", "--grid", "surf",
                                               "--json").output)
    assert lab.sql("SELECT COUNT(*) AS n FROM cells")[0]["n"] == len(plan.cells)
    st = lab.status("surf", sync=False)
    assert st == json.loads(cli("status", "surf", "--no-sync", "--json").output)
    assert st["points_done"] == st["points_total"] and st["running"] == []
    assert st["tracking"] is None


def test_cost_as_text_or_dict_and_recommend(measured):
    lab, _, cli = measured
    a = lab.report("surf", cost="sft=2,pair=1")
    b = lab.report("surf", cost={"sft": 2, "pair": 1})
    assert a.repriced and a.to_records() == b.to_records()
    rec = lab.recommend("surf", budget=256)
    assert rec == json.loads(cli("recommend", "surf", "--budget", "256", "--json").output)


@pytest.mark.parametrize("call, message", [
    (lambda lab: lab.report("nope"), "nope"),
    (lambda lab: lab.report("surf", cost="sft=-1"), "sft must be a positive number"),
    (lambda lab: lab.report("surf", cost={"sft": 1, "pairs": 2}), "unknown key(s) pairs"),
    (lambda lab: lab.resubmit("surf", states=["COMPLETED"]), "not a failure class"),
    (lambda lab: lab.cancel(point="0000"), "unknown point id"),
    (lambda lab: lab.logs("0000"), "neither a stage id nor a point id"),
])
def test_bad_input_raises_badinput(measured, call, message):
    lab, _, _ = measured
    with pytest.raises(BadInput, match=None) as e:
        call(lab)
    assert message in str(e.value)


def test_missing_ledger_is_bad_input(tmp_path):
    with pytest.raises(BadInput):
        Lab(ledger=tmp_path / "absent.db", workdir=tmp_path).status()
    assert not (tmp_path / "absent.db").exists()


def test_progress_of_a_running_stage(tmp_path):
    """step / total, loss, tokens/s and an ETA from the progress.json a training loop
    writes (here written by the test: it is the input)."""
    led, plan = register(tmp_path)
    lab = Lab(ledger=tmp_path / "ledger.db", workdir=tmp_path / "runs")
    sft = next(s for s in plan.stages.values() if s.kind == "sft")
    record_attempt(led, sft.stage_id, "RUNNING", job_id="j1")
    now = time.time()
    StageDir.of(lab.workdir, sft.stage_id).write_progress(
        phase="train", step=30, total_steps=100, loss=0.5, lr=1e-4, tokens=3000,
        tokens_per_s=150.0, started_at=now - 20, start_step=10, heartbeat=now)
    st = lab.status("surf", sync=False)
    (row,) = st["running"]
    assert (row["stage_id"], row["step"], row["total_steps"], row["loss"]) == \
        (sft.stage_id, 30, 100, 0.5)
    # 20 steps in 20 s since this attempt's loop started at step 10: 70 steps to go.
    assert row["eta_s"] == pytest.approx(70.0, abs=1.0)
    assert row["tokens_per_s"] == 150.0
    out = cli_status_text(tmp_path)
    assert "running (1)" in out and "30/100" in out


def cli_status_text(tmp_path) -> str:
    from click.testing import CliRunner

    from budgetlab.cli import main
    r = CliRunner().invoke(main, ["--ledger", str(tmp_path / "ledger.db"), "--workdir",
                                  str(tmp_path / "runs"), "status", "surf", "--no-sync"],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return r.output


TINY = """
name = "api"
[grid]
tasks = ["arith"]
models = ["builtin:arith-tiny"]
budgets = [8]
sft_fractions = [1.0, 0.0]
methods = ["dpo"]
seeds = [0]
[train]
max_length = 64
batch_size = 4
epochs = 1
[eval]
limit = 4
max_new_tokens = 4
batch_size = 4
baseline = false
[resources]
micro_batch_size = 4
"""


@pytest.mark.slow
def test_run_a_tiny_grid_through_the_api(tmp_path):
    """Lab.run on the local executor: real training and evaluation, then the same answers
    from the CLI on the ledger it wrote."""
    from click.testing import CliRunner

    from budgetlab.cli import main

    grid = tmp_path / "grid.toml"
    grid.write_text(textwrap.dedent(TINY))
    lab = Lab(ledger=tmp_path / "ledger.db", workdir=tmp_path / "runs")
    seen, submitted = [], []
    rep = lab.run(grid, timeout=300, poll=0.3, on_progress=seen.append,
                  on_submit=lambda plan, res: submitted.append(res.as_dict()))
    assert submitted and submitted[0]["stages"] == 4
    assert [c["status"] for c in rep.to_records()] == ["COMPLETED", "COMPLETED"]
    assert seen and seen[-1]["active"] == 0 and seen[-1]["running"] == []
    assert rep.status["stages_completed"] == 4
    runner = CliRunner()
    base = ["--ledger", str(tmp_path / "ledger.db"), "--workdir", str(tmp_path / "runs")]
    out = runner.invoke(main, base + ["report", "api", "--json"], catch_exceptions=False)
    assert json.loads(out.output)["cells"] == rep.to_records()
    # Every attempt is the data model's, with the job that ran it.
    atts = lab.attempts()
    assert len(atts) == 4 and all(a.outcome == "COMPLETED" and a.job_id for a in atts)
    # The training loop's heartbeat carries what the ETA needs: this attempt's loop start.
    from budgetlab.progress import stage_progress
    for s in lab.stages("api"):
        if s.kind == "eval":
            continue
        p = StageDir.of(lab.workdir, s.stage_id).read_progress()
        assert p["phase"] == "train" and p["step"] == p["total_steps"] == s.result["steps"]
        assert p["start_step"] == 0 and p["started_at"] <= p["heartbeat"]
        assert p["tokens_per_s"] > 0 and p["tokens"] == s.result["tokens"]
        assert stage_progress(StageDir.of(lab.workdir, s.stage_id))["eta_s"] == 0.0
    # Nothing to resubmit; a second run submits nothing and returns the same report.
    res, notes = lab.resubmit("api")
    assert res.as_dict()["stages"] == 0 and notes == []
    again = lab.run(grid, timeout=60, poll=0.3)
    assert again.to_records() == rep.to_records()


@pytest.mark.slow
def test_run_raises_on_a_failed_stage_with_the_report(tmp_path):
    """A model directory without its config.json: the SFT stage fails, its eval is
    blocked; run raises RuntimeFailure after the wait, with the report on it."""
    import shutil

    from budgetlab.builtin import resolve

    model = tmp_path / "model"
    shutil.copytree(resolve("arith-tiny"), model)
    (model / "config.json").unlink()
    grid = tmp_path / "grid.toml"
    grid.write_text(textwrap.dedent(TINY).replace('"builtin:arith-tiny"', f'"{model}"')
                    .replace("sft_fractions = [1.0, 0.0]", "sft_fractions = [1.0]"))
    lab = Lab(ledger=tmp_path / "ledger.db", workdir=tmp_path / "runs")
    with pytest.raises(RuntimeFailure, match="1 stage\\(s\\) BLOCKED, 1 stage\\(s\\) FAILED") as e:
        lab.run(grid, timeout=300, poll=0.3)
    assert [c["status"] for c in e.value.report.to_records()] == ["FAILED"]
    assert e.value.report.status["stages"] == {"sft": {"FAILED": 1}, "eval": {"BLOCKED": 1}}


@pytest.mark.slow
def test_live_progress_of_a_real_stage_then_cancel(tmp_path):
    """A longer SFT stage on the local executor: Lab.status shows it running with step /
    total, loss and an ETA from the loop's own heartbeat; Lab.cancel stops it."""
    grid = tmp_path / "grid.toml"
    grid.write_text(textwrap.dedent(TINY).replace("budgets = [8]", "budgets = [64]")
                    .replace("sft_fractions = [1.0, 0.0]", "sft_fractions = [1.0]")
                    .replace("epochs = 1", "epochs = 50"))
    lab = Lab(ledger=tmp_path / "ledger.db", workdir=tmp_path / "runs")
    lab.submit(grid)
    deadline, row = time.time() + 240, None
    while time.time() < deadline:
        rows = [r for r in lab.status("api")["running"] if r["kind"] == "sft"]
        if rows and rows[0]["step"] is not None and rows[0]["step"] >= 2:
            row = rows[0]
            break
        time.sleep(0.5)
    assert row is not None, "the SFT stage never reported progress"
    assert row["phase"] == "train" and row["total_steps"] == 16 * 50
    assert 2 <= row["step"] < row["total_steps"] and row["loss"] > 0
    assert row["eta_s"] > 0 and row["tokens_per_s"] > 0 and row["heartbeat_age_s"] < 60
    cancelled = lab.cancel("api")
    assert {a.stage_id for a in cancelled} >= {row["stage_id"]}
    st = lab.status("api")
    assert st["active"] == 0 and st["running"] == []


def test_datasette_metadata_describes_every_table_and_column(measured):
    """Every table, view and column of a real ledger has a description, keyed by the
    database name Datasette gives the file (its stem)."""
    lab, _, cli = measured
    meta = json.loads(cli("ledger", "metadata").output)
    assert meta == lab.metadata()
    tables = meta["databases"]["ledger"]["tables"]
    names = [r["name"] for r in lab.sql(
        "SELECT name FROM sqlite_master WHERE type IN ('table', 'view') "
        "AND name NOT LIKE 'sqlite_%'")]
    assert set(names) == set(tables)
    import sqlite3
    conn = sqlite3.connect(lab.ledger_path)
    for t in names:
        cols = [r[1] for r in conn.execute(f"PRAGMA table_info('{t}')")]
        assert set(cols) == set(tables[t]["columns"]), t
        assert all(tables[t]["columns"].values()) and tables[t]["description"]
