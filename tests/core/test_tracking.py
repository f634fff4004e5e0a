"""Tracking ([tracking] in the grid spec, budgetlab.tracking): validated, outside stage ids;
a real run with the real wandb package in offline mode leaves one run per stage under the
workdir, read back from its files; TensorBoard event files; a broken tracker never fails a
stage."""

import json
import textwrap

import pytest

from budgetlab import Lab
from budgetlab.errors import BadInput
from tests.conftest import GOOD_SPEC


def _plan(write_spec, extra: str):
    from budgetlab.api import load_plan
    return load_plan(write_spec(GOOD_SPEC + textwrap.dedent(extra)))


def test_tracking_is_not_part_of_stage_ids(write_spec):
    plain = _plan(write_spec, "")
    tracked = _plan(write_spec, """
        [tracking]
        backend = "wandb"
        project = "p"
        tags = ["a", "b"]
        """)
    assert set(plain.stages) == set(tracked.stages)
    assert tracked.spec.tracking == {"backend": "wandb", "project": "p", "tags": ["a", "b"],
                                     "mode": "offline"}
    assert plain.spec.tracking == {"backend": "none"}


@pytest.mark.parametrize("table, message", [
    ('backend = "mlflow"', "tracking.backend: must be one of"),
    ('backend = "wandb"\nmode = "cloud"', "tracking.mode: must be one of"),
    ('backend = "wandb"\nproject = ""', "tracking.project: expected a non-empty string"),
    ('backend = "wandb"\ntags = "x"', "tracking.tags: expected a list of strings"),
    ('backend = "wandb"\nsweep = 1', "tracking.sweep: unknown key"),
    ('project = "p"', "tracking.project: needs tracking.backend"),
    ('backend = "tensorboard"\nmode = "offline"', "tracking.mode: is a W&B setting"),
])
def test_bad_tracking_tables(write_spec, cli, table, message):
    path = write_spec(GOOD_SPEC + "[tracking]\n" + table + "\n")
    r = cli("plan", path)
    assert r.exit_code == 2 and message in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1
    assert not cli.ledger_path.exists()


def test_a_tracker_that_cannot_open_does_not_fail_the_stage(tmp_path, capsys):
    """The run dir is a file: wandb cannot start. The stage gets the null tracker and the
    reason in tracking.json and on stderr (the job log)."""
    from budgetlab.tracking import NULL, open_tracker

    (tmp_path / "not-a-dir").write_text("x")
    spec = {"stage_id": "s1", "kind": "sft", "task": "arith", "tracking": {
        "backend": "wandb", "mode": "offline", "grid": "g", "dir": str(tmp_path / "not-a-dir")}}
    t = open_tracker(spec, tmp_path, rank=0)
    assert t is NULL
    rec = json.loads((tmp_path / "tracking.json").read_text())
    assert rec["backend"] == "wandb" and "Error" in rec["error"]
    assert "tracking (wandb) is off for this stage" in capsys.readouterr().err
    assert open_tracker(spec, tmp_path, rank=1) is NULL     # only rank 0 tracks


def test_tensorboard_tracker_writes_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from budgetlab.tracking import open_tracker

    spec = {"stage_id": "s2", "kind": "dpo", "task": "arith", "n": 8, "seed": 0,
            "tracking": {"backend": "tensorboard", "grid": "g", "dir": str(tmp_path)}}
    t = open_tracker(spec, tmp_path, rank=0)
    for step in (1, 2, 3):
        t.log({"train/loss": 1.0 / step, "train/epoch": 0}, step=step)
    t.finish()
    rec = json.loads((tmp_path / "tracking.json").read_text())
    assert rec["path"] == str(tmp_path / "tensorboard" / "g" / "dpo-s2")
    acc = EventAccumulator(rec["path"])
    acc.Reload()
    assert [(e.step, round(e.value, 4)) for e in acc.Scalars("train/loss")] == \
        [(1, 1.0), (2, 0.5), (3, 0.3333)]


WANDB_GRID = """
name = "tracked"
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
[tracking]
backend = "wandb"
mode = "offline"
project = "budgetlab-test"
tags = ["ci"]
"""


@pytest.mark.slow
def test_offline_wandb_run_per_stage(tmp_path, monkeypatch):
    """A real run with the real wandb package, offline: one run per stage under
    <workdir>/wandb/, with the per-step training curve, the eval's metrics, group = grid,
    config = the stage and its cells; the ledger has each attempt's run; status and the
    CLI give the `wandb sync` command."""
    from click.testing import CliRunner

    from budgetlab.cli import main
    from budgetlab.tracking import read_offline_run

    monkeypatch.setenv("WANDB_SILENT", "true")
    grid = tmp_path / "grid.toml"
    grid.write_text(textwrap.dedent(WANDB_GRID))
    lab = Lab(ledger=tmp_path / "ledger.db", workdir=tmp_path / "runs")
    rep = lab.run(grid, timeout=300, poll=0.3)
    assert [c["status"] for c in rep.to_records()] == ["COMPLETED", "COMPLETED"]
    stages = {s.stage_id: s for s in lab.stages("tracked")}
    dirs = sorted((tmp_path / "runs" / "wandb").glob("offline-run-*"))
    assert len(dirs) == len(stages) == 4
    runs = {r["run"]["id"]: r for r in map(read_offline_run, dirs)}
    assert set(runs) == {f"bl-{sid}" for sid in stages}
    for sid, st in stages.items():
        run = runs[f"bl-{sid}"]
        assert run["run"]["group"] == "tracked" and run["run"]["job_type"] == st.kind
        assert run["run"]["project"] == "budgetlab-test"
        assert {"ci", st.kind, "arith"} <= set(run["run"]["tags"])
        cfg = run["config"]
        assert (cfg["stage_id"], cfg["kind"], cfg["n"], cfg["grid"]) == \
            (sid, st.kind, st.n, "tracked")
        assert cfg["cells"] and all(c["budget"] == 8.0 for c in cfg["cells"])
        if st.kind == "eval":
            assert run["summary"]["eval/accuracy"] == st.result["metrics"]["accuracy"]
            continue
        steps = [h for h in run["history"] if "train/loss" in h]
        assert [h["_step"] for h in steps] == list(range(1, st.result["steps"] + 1))
        assert steps[-1]["train/loss"] == pytest.approx(st.result["metrics"]["loss"])
        assert all(h["train/tokens_per_s"] > 0 and "train/lr" in h and "train/grad_norm" in h
                   for h in steps)
        if st.kind == "dpo":
            assert all("train/reward_margin" in h for h in steps)
    # The ledger: each attempt's run (offline: its directory).
    refs = {a.stage_id: a.tracking for a in lab.attempts()}
    assert all(refs[sid] == f"wandb:{d}" for d in map(str, dirs)
               for sid in stages if d.endswith(sid))
    tr = lab.status("tracked")["tracking"]
    assert tr["backend"] == "wandb" and tr["mode"] == "offline" and len(tr["runs"]) == 4
    assert tr["sync_command"] == f"wandb sync {tmp_path.resolve()}/runs/wandb/offline-run-*"
    out = CliRunner().invoke(main, ["--ledger", str(tmp_path / "ledger.db"), "--workdir",
                                    str(tmp_path / "runs"), "status", "tracked"],
                             catch_exceptions=False).output
    assert "4 run(s) recorded" in out and "wandb sync" in out
