"""Scenario 8: `ledger sql` cannot write; shell metacharacters and newlines in spec values reach
no shell and no sbatch directive unquoted; environment secrets never reach the ledger, a
spec.json or a log that budgetlab writes."""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from budgetlab.cli import main
from budgetlab.graph import build_plan
from budgetlab.ledger import Ledger
from budgetlab.spec import load_spec

from faultkit import CLI, sync_until_done, write_grid

WRITES = [
    "INSERT INTO meta VALUES ('x', 'y')",
    "UPDATE stages SET state = 'COMPLETED'",
    "DELETE FROM cells",
    "REPLACE INTO meta VALUES ('schema_version', '9')",
    "WITH x AS (SELECT 1) DELETE FROM points",
    "INSERT INTO meta SELECT * FROM meta RETURNING *",
    "DROP TABLE attempts",
    "CREATE TABLE evil (x)",
    "CREATE TEMP TABLE evil (x)",
    "ATTACH DATABASE 'evil.db' AS evil",
    "PRAGMA writable_schema = 1",
    "PRAGMA main.writable_schema = ON",
    "PRAGMA writable_schema",
    "PRAGMA journal_mode = WAL",
    "PRAGMA user_version = 7",
    "PRAGMA query_only = 0",
    "VACUUM INTO 'copy.db'",
    "VACUUM",
    "REINDEX",
    "ANALYZE",
    "BEGIN IMMEDIATE",
    "SELECT 1; DELETE FROM meta",
    "SELECT load_extension('/tmp/evil.so')",
]
READS = ["SELECT COUNT(*) FROM stages", "PRAGMA table_info(stages)", "PRAGMA integrity_check"]

SECRETS = {"HF_TOKEN": "hf_SeCrEt0token0value0123", "WANDB_API_KEY": "wandbKEY-987654321xyz",
           "MY_DB_PASSWORD": "pw-Hunter2-correct-horse", "AWS_SECRET_ACCESS_KEY": "awsSECRETabc/+42"}


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.fault
def test_ledger_sql_refuses_every_write(tmp_path, tiny_model, figure):
    grid = write_grid(tmp_path / "g.toml", tiny_model, fractions=(1.0, 0.5))
    led = Ledger(tmp_path / "ledger.db")
    led.register(build_plan(load_spec(grid)))
    led.close()
    before, files = _digest(tmp_path / "ledger.db"), sorted(os.listdir(tmp_path))
    runner = CliRunner()
    for sql in WRITES:
        res = runner.invoke(main, ["--ledger", str(tmp_path / "ledger.db"), "ledger", "sql", sql])
        assert res.exit_code == 2, (sql, res.output)
        assert len(res.stderr.strip().splitlines()) == 1 and "ledger sql" in res.stderr, res.stderr
    for sql in READS:   # reads still work (else the refusals above prove nothing)
        res = runner.invoke(main, ["--ledger", str(tmp_path / "ledger.db"), "ledger", "sql", sql,
                                   "--json"])
        assert res.exit_code == 0, (sql, res.output)
    cli = CLI(tmp_path)   # and as a real process
    p = cli("ledger", "sql", "DELETE FROM stages")
    assert p.returncode == 2 and "refused" in p.stderr, p.stderr
    assert _digest(tmp_path / "ledger.db") == before
    assert sorted(os.listdir(tmp_path)) == files   # no evil.db, no copy.db, no journal left
    figure("8 read-only ledger sql", refused=len(WRITES) + 1, reads_ok=len(READS))


def _scan(root: Path, needles: list[str]) -> list[str]:
    hits = []
    for p in root.rglob("*"):
        if p.is_file() and not p.is_symlink():
            data = p.read_bytes()
            hits += [f"{p}: {n[:6]}..." for n in needles if n.encode() in data]
    return hits


@pytest.mark.fault
@pytest.mark.slurm
@pytest.mark.slow
def test_metacharacters_reach_no_shell_and_secrets_no_file(tmp_path, tiny_model, slurm, figure):
    """A real grid on SLURM whose model path, workdir and sbatch comment hold shell
    metacharacters (and the model path a newline), run with secrets in the environment."""
    t0 = time.time()
    evil = "$(touch PWNED1); `touch PWNED2` && touch PWNED3 | 'q\" #x"
    model = tmp_path / f"model {evil}\nline2"
    shutil.copytree(tiny_model, model)
    root = tmp_path / f"root {evil}"
    root.mkdir()
    cli = CLI(root, env=SECRETS)
    cli.workdir = root / f"runs {evil}"
    grid = write_grid(root / "g.toml", str(model).replace("\\", "\\\\").replace('"', '\\"')
                      .replace("\n", "\\n"), fractions=(1.0, 0.5), extra=f"""
        [slurm]
        partition = "batch"
        extra_sbatch = ["--comment=c{evil.replace('"', '')}"]
        [train.dpo]
        max_length = 8
        truncation = "drop"
        """)   # the DPO stage fails (every pair too long): error records and tracebacks too
    sub = cli("submit", grid, "--executor", "slurm", check=True)
    st = sync_until_done(cli, timeout=240)
    assert st["stages_completed"] == 3 and st["stages_total"] == 5, \
        (st, cli("ledger", "attempts").stdout)
    (err,) = cli.rows("SELECT error FROM stages WHERE kind = 'dpo'")[0]
    assert "longer than max_length" in err, err
    # The job really ran from those paths: the model it trained and evaluated exists.
    sft = cli.rows("SELECT stage_id FROM stages WHERE kind = 'sft' AND n = 8")[0][0]
    assert (cli.workdir / "stages" / sft / "model" / "config.json").exists()
    # No shell ran any of it: no PWNED file anywhere the job or the CLI could have written.
    for d in (tmp_path, root, cli.workdir, Path.home(), Path("/tmp")):
        assert not any((d / f"PWNED{i}").exists() for i in (1, 2, 3)), d
    # Every sbatch directive submitit wrote is one quoted line.
    scripts = list((cli.workdir / "submitit").rglob("*submission.sh"))
    assert scripts
    for s in scripts:
        for line in s.read_text().splitlines():
            if line.startswith("#SBATCH") and "PWNED" in line:
                assert "'" in line, line
    # A value that sbatch refuses is a clear error, and still no shell.
    bad = write_grid(root / "bad.toml", tiny_model, name="bad", extra="""
        [slurm]
        partition = "batch;touch PWNED1"
        """)
    p = cli("submit", bad, "--executor", "slurm")
    assert p.returncode == 1 and "sbatch failed" in p.stderr, p.stderr
    assert not (root / "PWNED1").exists()
    dpo = cli.rows("SELECT stage_id FROM stages WHERE kind = 'dpo'")[0][0]
    assert (cli.workdir / "stages" / dpo / "error.json").exists()
    # Secrets: not in the ledger, not in spec.json, not in any log or file under the workdir,
    # nor in what the CLI prints.
    outputs = [sub.stdout + sub.stderr]
    for args in (("ledger", "attempts", "--json"), ("ledger", "stages", "--json"),
                 ("logs", sft), ("logs", dpo), ("status", "f", "--json")):
        p = cli(*args)
        outputs.append(p.stdout + p.stderr)
    needles = list(SECRETS.values())
    hits = _scan(root, needles) + [f"output: {n[:6]}" for o in outputs for n in needles if n in o]
    assert not hits, hits
    n_files = sum(1 for p in root.rglob("*") if p.is_file())
    figure("8 metacharacters + secrets", files_scanned=n_files, seconds=time.time() - t0)
