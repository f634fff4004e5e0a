"""W&B tracking (offline) in real SLURM jobs with two ranks per stage: rank 0 alone opens a
run, one per stage, under the workdir; the ledger records each attempt's run."""

from __future__ import annotations

import pytest

from budgetlab import Lab

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

TRACKING = """
[tracking]
backend = "wandb"
mode = "offline"
project = "budgetlab-slurm-test"
"""


def test_offline_runs_from_slurm_jobs_with_two_ranks(tmp_path, grid_file, tiny_model,
                                                      slurm_cluster, monkeypatch):
    from budgetlab.tracking import read_offline_run

    monkeypatch.setenv("WANDB_SILENT", "true")
    grid = grid_file(tmp_path / "g.toml", tiny_model, name="trk", fractions=(1.0, 0.0),
                     tasks_per_node=2, extra=TRACKING)
    lab = Lab(ledger=tmp_path / "ledger.db", workdir=tmp_path / "runs")
    assert lab.submit(grid, executor="slurm").as_dict()["stages"] == 4
    st = lab.wait("trk", poll=1, timeout=300)
    assert st["stages_completed"] == 4, st
    stages = {s.stage_id: s for s in lab.stages("trk")}
    dirs = sorted((tmp_path / "runs" / "wandb").glob("offline-run-*"))
    runs = [read_offline_run(d) for d in dirs]
    # one run per stage: the second rank of each training stage opened none
    assert sorted(r["run"]["id"] for r in runs) == sorted(f"bl-{s}" for s in stages)
    for r in runs:
        s = stages[r["run"]["id"].removeprefix("bl-")]
        assert r["config"]["resources"]["tasks_per_node"] == 2
        if s.kind != "eval":
            assert [h["_step"] for h in r["history"]] == list(range(1, s.result["steps"] + 1))
            assert s.result["world_size"] == 2
    atts = lab.attempts()
    assert all(a.executor == "slurm" and a.tracking and a.tracking.startswith("wandb:")
               for a in atts)
    assert lab.status("trk")["tracking"]["sync_command"].startswith("wandb sync ")
