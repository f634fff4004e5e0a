"""What a job process sets before any stage runs (budgetlab.worker.prepare_process)."""

import json
import os
import subprocess
import sys


def _env_after_prepare(tmp_path, **env) -> dict:
    """TORCHDYNAMO_DISABLE and OMP_NUM_THREADS of a fresh process after prepare_process."""
    stage = tmp_path / "stage"
    stage.mkdir()
    (stage / "spec.json").write_text(json.dumps({"resources": {"cpus_per_task": 1}}))
    code = ("import json, os, sys; from budgetlab.worker import prepare_process; "
            "prepare_process(sys.argv[1:]); "
            "print(json.dumps({k: os.environ.get(k) for k in "
            "('TORCHDYNAMO_DISABLE', 'OMP_NUM_THREADS')}))")
    base = {k: v for k, v in os.environ.items()
            if k not in ("TORCHDYNAMO_DISABLE", "OMP_NUM_THREADS")}
    out = subprocess.run([sys.executable, "-c", code, str(stage)], env={**base, **env},
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out.splitlines()[-1])


def test_a_job_process_runs_without_dynamo(tmp_path):
    assert _env_after_prepare(tmp_path)["TORCHDYNAMO_DISABLE"] == "1"


def test_the_users_settings_stay(tmp_path):
    got = _env_after_prepare(tmp_path, TORCHDYNAMO_DISABLE="0", OMP_NUM_THREADS="3")
    assert got == {"TORCHDYNAMO_DISABLE": "0", "OMP_NUM_THREADS": "3"}
