"""The ledger: registration is idempotent, edits keep history, one writer, read-only SQL."""

import multiprocessing as mp
import sqlite3

import pytest

from budgetlab.errors import BadInput
from budgetlab.graph import build_plan
from budgetlab.ledger import SCHEMA_VERSION, Ledger, query_readonly
from budgetlab.lifecycle import IllegalTransition, Transition
from budgetlab.spec import load_spec

from tests.conftest import GOOD_SPEC


def _register(path, spec_path):
    led = Ledger(path)
    try:
        return led.register(build_plan(load_spec(spec_path)))
    finally:
        led.close()


def test_register_twice_adds_nothing(tmp_path, write_spec):
    spec = write_spec()
    first = _register(tmp_path / "l.db", spec)
    assert first["cells"] == 24 and first["stages"] > 0
    data = (tmp_path / "l.db").read_bytes()
    again = _register(tmp_path / "l.db", spec)
    assert again == {"cells": 0, "points": 0, "stages": 0, "attempts": 0}
    assert (tmp_path / "l.db").read_bytes() == data


def test_editing_a_grid_adds_cells_and_keeps_earlier_records(tmp_path, write_spec):
    _register(tmp_path / "l.db", write_spec())
    led = Ledger(tmp_path / "l.db")
    before_stages = {s.stage_id for s in led.stages()}
    led.close()
    _register(tmp_path / "l.db", write_spec(GOOD_SPEC.replace("budgets = [64, 256]",
                                                              "budgets = [64, 512]")))
    led = Ledger(tmp_path / "l.db")
    after_stages = {s.stage_id for s in led.stages()}
    assert before_stages < after_stages
    cells = led.cells("t", active_only=False)
    assert {c.budget for c in cells if c.active} == {64, 512}
    assert {c.budget for c in cells if not c.active} == {256}
    assert {c.budget for c in led.cells("t")} == {64, 512}


def test_schema_version_and_journal_mode(tmp_path, write_spec):
    _register(tmp_path / "l.db", write_spec())
    conn = sqlite3.connect(tmp_path / "l.db")
    assert conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0] == str(SCHEMA_VERSION)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
    for table in ("grids", "cells", "points", "stages", "attempts", "metrics"):
        conn.execute(f"SELECT * FROM {table}")


def test_newer_schema_is_refused(tmp_path, write_spec):
    _register(tmp_path / "l.db", write_spec())
    conn = sqlite3.connect(tmp_path / "l.db")
    conn.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    conn.commit()
    conn.close()
    with pytest.raises(BadInput, match="newer"):
        Ledger(tmp_path / "l.db")


def test_not_a_ledger(tmp_path):
    (tmp_path / "junk.db").write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(BadInput, match="not a budgetlab ledger"):
        Ledger(tmp_path / "junk.db")


def _submit(led, sid, **cols):
    return led.apply(Transition(sid, "SUBMITTING", "test submit", new_attempt={
        "executor": "local", "job_name": "x", "resources": {"time_min": 5}, **cols}))


def test_attempts_and_results(tmp_path, write_spec):
    _register(tmp_path / "l.db", write_spec())
    led = Ledger(tmp_path / "l.db")
    sid = next(s.stage_id for s in led.stages() if s.kind == "sft")
    aid = _submit(led, sid, budgetlab_version="0.1.0")
    assert led.stage(sid).state == "SUBMITTING"
    att = led.latest_attempt(sid)
    assert att.outcome == "SUBMITTING" and att.budgetlab_version == "0.1.0"
    assert att.resources == {"time_min": 5}
    led.apply(Transition(sid, "RUNNING", "test", attempt_id=aid, fields={"job_id": "12_3"}))
    assert [a.attempt_id for a in led.attempts(open_only=True)] == [aid]
    result = {"stage_id": sid, "metrics": {"loss": 0.5, "flag": True}, "tokens": 1000}
    led.apply(Transition(sid, "COMPLETED", "result.json", attempt_id=aid, result=result))
    led.apply(Transition(sid, "COMPLETED", "result.json", attempt_id=aid, result=result))
    assert led.metrics([sid]) == {sid: {"loss": 0.5}}   # no duplicate, booleans are no metric
    assert led.stage(sid).state == "COMPLETED" and led.stage(sid).tokens == 1000
    assert led.latest_attempt(sid).tokens == 1000
    assert led.attempts(open_only=True) == []


def test_illegal_transitions_raise_and_write_nothing(tmp_path, write_spec):
    _register(tmp_path / "l.db", write_spec())
    led = Ledger(tmp_path / "l.db")
    sid = next(s.stage_id for s in led.stages() if s.kind == "sft")
    with pytest.raises(IllegalTransition, match="NEW -> RUNNING"):
        led.apply(Transition(sid, "RUNNING", "a record for a stage nobody submitted"))
    aid = _submit(led, sid)
    with pytest.raises(IllegalTransition, match="SUBMITTING -> SUBMITTING"):
        _submit(led, sid)                       # a second submission of a queued stage
    led.apply(Transition(sid, "COMPLETED", "result.json", attempt_id=aid,
                         result={"stage_id": sid, "metrics": {"loss": 1.0}}))
    before = (tmp_path / "l.db").read_bytes()
    for to in ("FAILED", "PENDING", "BLOCKED"):
        with pytest.raises(IllegalTransition, match=f"COMPLETED -> {to}"):
            led.apply(Transition(sid, to, "a late scheduler record", attempt_id=aid))
    assert (tmp_path / "l.db").read_bytes() == before      # rolled back, nothing written
    assert len(led.attempts(stage_id=sid)) == 1


def _writer(path, stage_id, n):
    led = Ledger(path)
    for _ in range(n):   # one legal cycle per round: a try that fails, then the next try
        aid = _submit(led, stage_id)
        led.apply(Transition(stage_id, "FAILED", "test", attempt_id=aid, error="boom"))
    led.close()


def test_concurrent_writers_lose_nothing(tmp_path, write_spec):
    _register(tmp_path / "l.db", write_spec())
    led = Ledger(tmp_path / "l.db")
    sids = [s.stage_id for s in led.stages()[:4]]
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(str(tmp_path / "l.db"), sid, 50)) for sid in sids]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    assert [len(led.attempts(stage_id=sid)) for sid in sids] == [50] * 4
    assert all(a.outcome == "FAILED" for a in led.attempts())
    assert led.conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


@pytest.mark.parametrize("sql", [
    "INSERT INTO meta VALUES ('x', 'y')",
    "UPDATE stages SET state = 'COMPLETED'",
    "DELETE FROM cells",
    "DROP TABLE cells",
    "CREATE TABLE x (a)",
    "ATTACH DATABASE '/tmp/budgetlab-attach-test.db' AS other",
    "PRAGMA writable_schema = 1",
    "PRAGMA journal_mode = WAL",
    "SELECT 1; DELETE FROM cells",
])
def test_sql_is_read_only(tmp_path, write_spec, sql):
    _register(tmp_path / "l.db", write_spec())
    before = (tmp_path / "l.db").read_bytes()
    with pytest.raises(BadInput):
        query_readonly(tmp_path / "l.db", sql)
    assert (tmp_path / "l.db").read_bytes() == before


def test_sql_reads(tmp_path, write_spec):
    _register(tmp_path / "l.db", write_spec())
    cols, rows = query_readonly(tmp_path / "l.db", "SELECT COUNT(*) AS n FROM cells")
    assert cols == ["n"] and rows == [(24,)]
    cols, rows = query_readonly(tmp_path / "l.db", "PRAGMA table_info(cells)")
    assert rows


def test_two_processes_creating_one_ledger_at_once(tmp_path, monkeypatch):
    """Two `submit`s on a new ledger both read schema version 0 before either migrated (the
    fault campaign's overlap run: "duplicate column name: submitter"). The interleaving is
    replayed here: this process reads 0, then finds the other one's migrated file under
    the write lock and leaves it as it is."""
    from budgetlab.ledger.schema import SCHEMA_VERSION
    path = tmp_path / "l.db"
    Ledger(path).close()                      # the other process, first to the lock
    real = Ledger._schema_version
    calls = []

    def stale_first(self):
        calls.append(1)
        return 0 if len(calls) == 1 else real(self)
    monkeypatch.setattr(Ledger, "_schema_version", stale_first)
    led = Ledger(path)
    assert len(calls) == 2 and real(led) == SCHEMA_VERSION
    assert led.conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
