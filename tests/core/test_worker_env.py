"""What a job process sets before any stage runs (budgetlab.worker.prepare_process)."""

import json
import os
import subprocess
import sys

KEYS = ("TORCHDYNAMO_DISABLE", "OMP_NUM_THREADS")


def _env_after_prepare(**env) -> dict:
    """KEYS in a fresh process after prepare_process."""
    code = ("import json, os; from budgetlab.worker import prepare_process; "
            f"prepare_process([]); print(json.dumps({{k: os.environ.get(k) for k in {KEYS}}}))")
    base = {k: v for k, v in os.environ.items() if k not in KEYS}
    out = subprocess.run([sys.executable, "-c", code], env={**base, **env},
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out.splitlines()[-1])


def test_a_job_process_runs_without_dynamo():
    assert _env_after_prepare()["TORCHDYNAMO_DISABLE"] == "1"


def test_the_users_settings_stay():
    got = _env_after_prepare(TORCHDYNAMO_DISABLE="0", OMP_NUM_THREADS="3")
    assert got == {"TORCHDYNAMO_DISABLE": "0", "OMP_NUM_THREADS": "3"}
