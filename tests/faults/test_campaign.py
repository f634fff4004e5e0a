"""Issue 11: the short fault campaign (one run per fault kind) of bench/fault_campaign.py on
the 2-node cluster: every grid completes after the user's sync/fix/resubmit, no attempt row
is lost, no job runs untracked, no stage restarts from step 0 beside a checkpoint."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

from faultkit import REPO

pytestmark = [pytest.mark.fault, pytest.mark.slurm, pytest.mark.slow]


def _campaign_module():
    spec = importlib.util.spec_from_file_location("fault_campaign",
                                                  REPO / "bench" / "fault_campaign.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod          # its dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.timeout(2400)   # ten real runs of 30-120 s each (the suite's default is 600 s)
def test_one_run_of_each_fault_kind_completes_with_nothing_lost(slurm, tmp_path, figure):
    nodes = subprocess.run(["sinfo", "-h", "-N", "-o", "%N"], capture_output=True,
                           text=True, timeout=60).stdout.split()
    if len(set(nodes)) < 2:
        pytest.skip("needs the 2-node cluster (BUDGETLAB_SLURM_NODES=2 bash slurm/cluster.sh up)")
    fc = _campaign_module()
    results = fc.campaign(runs=len(fc.KINDS), seed=0, deadline_s=300, root=tmp_path,
                          log=lambda line: None)
    assert sorted(r.kind for r in results) == sorted(fc.KINDS)
    rec = sorted(r.recovery_s for r in results if r.recovery_s is not None)
    figure("11 fault campaign, one run per kind", runs=len(results),
           completed=sum(r.completed for r in results),
           recovery_median_s=rec[len(rec) // 2] if rec else -1.0,
           resubmits=sum(r.resubmits for r in results))
    table = fc.table(results) + "\n" + "\n".join(f"{r.kind}: [{r.fault_at}] {r.note}"
                                                 for r in results)
    assert all(r.completed for r in results), table
    assert sum(r.lost for r in results) == 0, table
    assert sum(r.orphans for r in results) == 0, table
    assert sum(r.needless for r in results) == 0, table
