"""Scenario 3: slurmctld stopped and restarted while a grid runs. During the outage `sync`
and `status` still work and say clearly that the controller does not answer (states may be
stale, nothing becomes MISSING); a submit fails with a clear error. After the restart sync
recovers and nothing is lost: every stage completes, once."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from faultkit import sync_until_done, wait_until, write_grid

pytestmark = [pytest.mark.fault, pytest.mark.slurm, pytest.mark.slow]


def _ctld_pid() -> int:
    return int((Path(os.environ["BUDGETLAB_SLURM_DIR"]) / "run" / "slurmctld.pid").read_text())


def _ping_up() -> bool:
    p = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=60)
    return p.returncode == 0 and "UP" in p.stdout


def test_slurmctld_restart_while_a_grid_runs(scli, tiny_model, figure):
    cli = scli
    if "BUDGETLAB_SLURM_DIR" not in os.environ:
        pytest.skip("the cluster of slurm/cluster.sh is needed (its slurmctld is restarted)")
    grid = write_grid(cli.root / "g.toml", tiny_model, budgets=(64,), fractions=(1.0, 0.5))
    other = write_grid(cli.root / "g2.toml", tiny_model, name="g2", budgets=(64,),
                       fractions=(1.0, 0.25))        # shares the SFT-only point with grid f
    cli("submit", grid, "--executor", "slurm", check=True)
    wait_until(lambda: cli.rows("SELECT COUNT(*) FROM stages WHERE state = 'RUNNING'")[0][0] or
               (cli("sync").returncode and None), 60, "a running stage", poll=1.0)
    pid = _ctld_pid()
    os.kill(pid, 15)
    t_down = time.time()
    try:
        wait_until(lambda: not Path(f"/proc/{pid}").exists(), 30, "slurmctld to stop", 0.2)
        during = cli("sync", "--json")
        status = cli("status", "f")
        submit = cli("submit", other, "--executor", "slurm", timeout=120)
    finally:
        subprocess.run(["slurmctld", "-f", os.environ["SLURM_CONF"]], check=True, timeout=60)
        t_up = time.time()
    wait_until(_ping_up, 60, "slurmctld to answer again")
    outage_s = t_up - t_down
    # During the outage: reported, not a crash, not a silent stale answer.
    assert during.returncode == 0, during.stderr
    assert "controller does not answer" in during.stderr, during.stderr
    assert '"controller_down": true' in during.stdout
    assert status.returncode == 0 and "controller does not answer" in status.stderr
    assert submit.returncode == 1 and "sbatch failed" in submit.stderr, submit.stderr
    assert len(submit.stderr.strip().splitlines()) <= 2, submit.stderr
    # After: sync answers without the warning, the grid finishes, the failed submission is
    # resubmitted and finishes too.
    first = cli("sync")
    assert first.returncode == 0 and "does not answer" not in first.stderr, first.stderr
    st = sync_until_done(cli, timeout=300)
    recover_s = time.time() - t_up
    assert st["stages_completed"] == st["stages_total"] == 5, st
    cli("resubmit", "g2", check=True)
    st2 = wait_until(lambda: (lambda s: s if s["active"] == 0 else None)(
        cli.json("status", "g2")), 300, "grid g2 to finish", poll=2.0)
    assert st2["stages_completed"] == st2["stages_total"], st2
    # Nothing lost, nothing twice: every stage completed by exactly one attempt, every
    # attempt that got a job id is known to SLURM, nothing left SUBMITTING.
    rows = cli.rows("SELECT s.stage_id, s.state, SUM(a.outcome = 'COMPLETED'), "
                    "SUM(a.outcome IN ('SUBMITTING', 'PENDING', 'RUNNING')) "
                    "FROM stages s JOIN attempts a USING (stage_id) GROUP BY s.stage_id")
    assert rows and all(r[1] == "COMPLETED" and r[2] == 1 and r[3] == 0 for r in rows), rows
    jobs = {j for (j,) in cli.rows("SELECT DISTINCT job_id FROM attempts WHERE job_id IS NOT NULL")}
    p = subprocess.run(["sacct", "-X", "-n", "-P", "-o", "JobID", "-j",
                        ",".join(sorted({j.split("_")[0] for j in jobs}))],
                       capture_output=True, text=True, timeout=60)
    known = set(p.stdout.split())
    assert jobs <= known, jobs - known
    assert cli.rows("PRAGMA integrity_check") == [("ok",)]
    figure("3 slurmctld restart", outage_s=outage_s, recover_s=recover_s,
           stages=len(rows), attempts=cli.rows("SELECT COUNT(*) FROM attempts")[0][0])
