"""Secrets from the environment never reach what budgetlab writes."""

import io
import json
import subprocess
import sys

from budgetlab.redact import RedactingStream, redact, safe_environ, secret_values


def test_redact_masks_every_secret_kind(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_abcdefgh123")
    monkeypatch.setenv("WANDB_API_KEY", "wandbkey999")
    monkeypatch.setenv("DB_PASSWORD", "hunter22")
    monkeypatch.setenv("MY_SECRET_THING", "s3cr3tvalue")
    monkeypatch.setenv("PATH_LIKE", "hf_abcdefgh123-not-secret-name")
    text = "tok hf_abcdefgh123 key wandbkey999 pw hunter22 x s3cr3tvalue"
    assert redact(text) == "tok *** key *** pw *** x ***"
    assert "HF_TOKEN" not in safe_environ() and "PATH_LIKE" in safe_environ()
    assert redact(None) is None and redact(3) == 3


def test_short_values_are_not_secrets():
    assert secret_values({"SOME_KEY": "1", "OTHER_TOKEN": "abcdef"}) == ["abcdef"]


def test_stream_masks_across_partial_writes(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_zyxwvut987")
    out = io.StringIO()
    s = RedactingStream(out)
    s.write("a hf_zyx")
    s.write("wvut987 b\nnext ")
    s.write("line")
    s.flush()
    assert out.getvalue() == "a *** b\nnext line"


def test_worker_error_record_and_log_are_redacted(tmp_path):
    stage = tmp_path / "stages" / "abc"
    stage.mkdir(parents=True)
    secret = "hf_SECRETVALUE_42"
    # a stage kind that carries the token: the worker's error names it, and must mask it
    (stage / "spec.json").write_text(json.dumps({
        "stage_id": "abc", "kind": secret, "task": "arith", "model": "m"}))
    env = {"HF_TOKEN": secret, "PATH": "/usr/bin:/bin"}
    res = subprocess.run([sys.executable, "-m", "budgetlab.worker", str(stage)], env=env,
                         capture_output=True, text=True)
    assert res.returncode == 1
    err = json.loads((stage / "error.json").read_text())
    assert "unknown stage kind '***'" in err["message"]
    assert "unknown stage kind '***'" in res.stderr
    assert secret not in res.stdout + res.stderr + json.dumps(err)
