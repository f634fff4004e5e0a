"""The SQLite ledger (DESIGN section 5), through sqlite-utils.

One writer: only the CLI process writes, in short BEGIN IMMEDIATE transactions with a busy
timeout; workers never open the database. Journal mode DELETE (safe on NFS). Schema changes
are migrations keyed on meta.schema_version.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import time
from pathlib import Path

import sqlite_utils

from budgetlab.errors import BadInput
from budgetlab.graph import Plan, content_id
from budgetlab.provenance import code_version
from budgetlab.redact import redact

BUSY_TIMEOUT_S = 60.0
# Outcome classes (DESIGN section 7). A stage is NEW until its first attempt.
FINISHED = ("COMPLETED", "TIMEOUT", "OUT_OF_MEMORY", "CUDA_OOM", "NODE_FAIL", "CANCELLED",
            "FAILED", "MISSING", "BLOCKED")
UNFINISHED = ("SUBMITTING", "PENDING", "RUNNING", "PREEMPTED")
FAILED_DEFAULT = ("FAILED", "NODE_FAIL", "MISSING", "TIMEOUT", "OUT_OF_MEMORY", "CUDA_OOM")

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS grids (
    name TEXT PRIMARY KEY, spec_path TEXT, spec_text TEXT, settings TEXT,
    registered_at REAL, updated_at REAL);
CREATE TABLE IF NOT EXISTS cells (
    cell_id TEXT PRIMARY KEY, grid TEXT NOT NULL, task TEXT, model TEXT, budget REAL,
    sft_fraction REAL, method TEXT, seed INTEGER, n_sft INTEGER, n_pft INTEGER,
    annotation_cost REAL, point_id TEXT NOT NULL, active INTEGER NOT NULL DEFAULT 1,
    registered_at REAL);
CREATE INDEX IF NOT EXISTS cells_grid ON cells (grid, active);
CREATE INDEX IF NOT EXISTS cells_point ON cells (point_id);
CREATE TABLE IF NOT EXISTS baselines (
    grid TEXT NOT NULL, task TEXT, model TEXT, point_id TEXT NOT NULL,
    active INTEGER NOT NULL DEFAULT 1, PRIMARY KEY (grid, point_id));
CREATE TABLE IF NOT EXISTS points (
    point_id TEXT PRIMARY KEY, task TEXT, model TEXT, method TEXT, n_sft INTEGER,
    n_pft INTEGER, seed INTEGER, sft_stage_id TEXT, pft_stage_id TEXT, eval_stage_id TEXT,
    created_at REAL);
CREATE TABLE IF NOT EXISTS stages (
    stage_id TEXT PRIMARY KEY, kind TEXT NOT NULL, task TEXT, model TEXT, parent_id TEXT,
    n INTEGER, seed INTEGER, params TEXT, data TEXT, resources TEXT,
    state TEXT NOT NULL DEFAULT 'NEW', tokens INTEGER, wall_seconds REAL, result TEXT,
    error TEXT, created_at REAL, updated_at REAL);
CREATE INDEX IF NOT EXISTS stages_state ON stages (state);
CREATE INDEX IF NOT EXISTS stages_parent ON stages (parent_id);
CREATE TABLE IF NOT EXISTS attempts (
    attempt_id INTEGER PRIMARY KEY AUTOINCREMENT, stage_id TEXT NOT NULL, executor TEXT,
    job_id TEXT, job_name TEXT, submitted_at REAL, started_at REAL, ended_at REAL,
    raw_state TEXT, outcome TEXT, exit_code TEXT, nodes TEXT, gpus INTEGER,
    gpu_seconds REAL, cpu_seconds REAL, tokens INTEGER, error TEXT, log_path TEXT,
    resources TEXT, budgetlab_version TEXT, git_commit TEXT, git_dirty INTEGER,
    resumed_from_step INTEGER);
CREATE INDEX IF NOT EXISTS attempts_stage ON attempts (stage_id);
CREATE INDEX IF NOT EXISTS attempts_outcome ON attempts (outcome);
CREATE INDEX IF NOT EXISTS attempts_job ON attempts (job_id);
CREATE TABLE IF NOT EXISTS metrics (
    stage_id TEXT NOT NULL, name TEXT NOT NULL, value REAL, PRIMARY KEY (stage_id, name));
CREATE VIEW IF NOT EXISTS spend AS
    SELECT grid, task, model, method, budget, sft_fraction, seed, n_sft, n_pft,
           annotation_cost, point_id FROM cells WHERE active = 1;
CREATE VIEW IF NOT EXISTS compute AS
    SELECT s.stage_id, s.kind, s.task, s.model, s.state, COUNT(a.attempt_id) AS attempts,
           COALESCE(SUM(a.gpu_seconds), 0) / 3600.0 AS gpu_hours,
           COALESCE(SUM(a.cpu_seconds), 0) / 3600.0 AS cpu_hours
    FROM stages s LEFT JOIN attempts a ON a.stage_id = s.stage_id GROUP BY s.stage_id;
CREATE VIEW IF NOT EXISTS point_status AS
    SELECT p.point_id, p.task, p.model, p.method, p.n_sft, p.n_pft, p.seed,
           sft.state AS sft_state, pft.state AS pft_state, ev.state AS eval_state
    FROM points p
    LEFT JOIN stages sft ON sft.stage_id = p.sft_stage_id
    LEFT JOIN stages pft ON pft.stage_id = p.pft_stage_id
    LEFT JOIN stages ev ON ev.stage_id = p.eval_stage_id;
"""

# schema_version -> SQL that brings version-1 databases up to it. Never drop data.
MIGRATIONS: dict[int, str] = {}
SCHEMA_VERSION = 1 + len(MIGRATIONS)


def _now() -> float:
    return time.time()


class Ledger:
    """The ledger file. Reads anywhere; writes only inside `with ledger.write():`."""

    def __init__(self, path: str | Path, create: bool = True):
        self.path = Path(path)
        if not create and not self.path.exists():
            raise BadInput(f"{self.path}: no ledger here (run `budgetlab submit` first, "
                           f"or pass --ledger)")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(str(self.path), timeout=BUSY_TIMEOUT_S)
        conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
        self.db = sqlite_utils.Database(conn)
        self.conn = conn
        self._migrate()

    def close(self) -> None:
        self.conn.close()

    # -- transactions -------------------------------------------------------------------
    @contextlib.contextmanager
    def write(self):
        """One short write transaction; waits for other writers instead of failing."""
        if self.conn.in_transaction:  # nested: join the outer transaction
            yield self
            return
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        else:
            self.conn.execute("COMMIT")

    def _migrate(self) -> None:
        version = self._schema_version()
        if version == SCHEMA_VERSION:
            return
        if version > SCHEMA_VERSION:
            raise BadInput(f"{self.path}: ledger schema version {version} is newer than this "
                           f"budgetlab ({SCHEMA_VERSION}); upgrade budgetlab")
        if version == 0:  # a new file: DELETE journal, safe on NFS (WAL is not)
            self.conn.execute("PRAGMA journal_mode = DELETE")
        with self.write():
            if version == 0:
                for stmt in SCHEMA.split(";"):
                    if stmt.strip():
                        self.conn.execute(stmt)
                version = 1
            for v in range(version + 1, SCHEMA_VERSION + 1):
                for stmt in MIGRATIONS[v].split(";"):
                    if stmt.strip():
                        self.conn.execute(stmt)
            self.conn.execute("INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)",
                              (str(SCHEMA_VERSION),))

    def _schema_version(self) -> int:
        try:
            row = self.conn.execute(
                "SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        except sqlite3.OperationalError:
            return 0
        except sqlite3.DatabaseError as e:
            raise BadInput(f"{self.path}: not a budgetlab ledger ({e})") from None
        return int(row[0]) if row else 0

    # -- registration -------------------------------------------------------------------
    def register(self, plan: Plan) -> dict:
        """Add the grid's cells, points and stages; re-registering adds nothing.

        Cells of an earlier version of the grid stay, marked inactive."""
        spec, now = plan.spec, _now()
        before = self.counts()
        settings = {"costs": spec.costs, "slurm": spec.slurm, "local": spec.local,
                    "resources": spec.resources, "eval": spec.eval}
        cells = []
        for c in plan.cells:
            cid = content_id({"grid": c.grid, "task": c.task, "model": c.model,
                              "budget": c.budget, "f": c.sft_fraction, "method": c.method,
                              "seed": c.seed, "point": c.point_id})
            cells.append((cid, c.grid, c.task, c.model, c.budget, c.sft_fraction, c.method,
                          c.seed, c.n_sft, c.n_pft, c.annotation_cost, c.point_id, now))
        with self.write():
            self.conn.execute(
                "INSERT INTO grids VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(name) DO UPDATE SET "
                "spec_path = excluded.spec_path, spec_text = excluded.spec_text, "
                "settings = excluded.settings, updated_at = excluded.updated_at "
                "WHERE spec_text IS NOT excluded.spec_text OR settings IS NOT excluded.settings",
                (spec.name, spec.path, spec.text, json.dumps(settings, sort_keys=True), now, now))
            self.conn.execute("CREATE TEMP TABLE IF NOT EXISTS _live (id TEXT PRIMARY KEY)")
            self.conn.execute("DELETE FROM _live")
            self.conn.executemany("INSERT OR IGNORE INTO _live VALUES (?)",
                                  ((c[0],) for c in cells))
            # Only touch rows whose flag changes: re-registering writes nothing at all.
            self.conn.execute("UPDATE cells SET active = (cell_id IN (SELECT id FROM _live)) "
                              "WHERE grid = ? AND active != (cell_id IN (SELECT id FROM _live))",
                              (spec.name,))
            self.conn.executemany(
                "INSERT OR IGNORE INTO cells VALUES (?,?,?,?,?,?,?,?,?,?,?,?,1,?)", cells)
            base = [p.point_id for p in plan.points.values() if p.method == "base"]
            self.conn.execute("DELETE FROM _live")
            self.conn.executemany("INSERT OR IGNORE INTO _live VALUES (?)", ((b,) for b in base))
            self.conn.execute("UPDATE baselines SET active = (point_id IN (SELECT id FROM _live)) "
                              "WHERE grid = ? AND active != (point_id IN (SELECT id FROM _live))",
                              (spec.name,))
            self.conn.executemany(
                "INSERT OR IGNORE INTO baselines VALUES (?, ?, ?, ?, 1)",
                ((spec.name, p.task, p.model, p.point_id) for p in plan.points.values()
                 if p.method == "base"))
            self.conn.executemany(
                "INSERT OR IGNORE INTO points VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                ((p.point_id, p.task, p.model, p.method, p.n_sft, p.n_pft, p.seed,
                  p.sft_stage_id, p.pft_stage_id, p.eval_stage_id, now)
                 for p in plan.points.values()))
            self.conn.executemany(
                "INSERT INTO stages (stage_id, kind, task, model, parent_id, n, seed, params, "
                "data, resources, state, created_at, updated_at) "
                "VALUES (?,?,?,?,?,?,?,?,?,?,'NEW',?,?) ON CONFLICT(stage_id) DO UPDATE SET "
                "resources = excluded.resources WHERE resources IS NOT excluded.resources",
                ((s.stage_id, s.kind, s.task, s.model, s.parent_id, s.n, s.seed,
                  json.dumps(s.params, sort_keys=True), json.dumps(s.data, sort_keys=True),
                  json.dumps(s.resources, sort_keys=True), now, now)
                 for s in plan.stages.values()))
        after = self.counts()
        return {k: after[k] - before[k] for k in after}

    def counts(self) -> dict:
        return {t: self.conn.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0]
                for t in ("cells", "points", "stages", "attempts")}

    # -- reads ----------------------------------------------------------------------------
    def _rows(self, sql: str, params=()) -> list[dict]:
        cur = self.conn.execute(sql, params)
        cols = [d[0] for d in cur.description]
        return [dict(zip(cols, row)) for row in cur.fetchall()]

    def grid(self, name: str) -> dict:
        rows = self._rows("SELECT * FROM grids WHERE name = ?", (name,))
        if not rows:
            known = [r["name"] for r in self._rows("SELECT name FROM grids ORDER BY name")]
            raise BadInput(f"{self.path}: unknown grid {name!r} (known: "
                           f"{', '.join(known) or 'none'})")
        row = rows[0]
        row["settings"] = json.loads(row["settings"] or "{}")
        return row

    def grids(self) -> list[dict]:
        return self._rows("SELECT name, spec_path, registered_at, updated_at FROM grids "
                          "ORDER BY name")

    def cells(self, grid: str, active_only: bool = True) -> list[dict]:
        sql = "SELECT * FROM cells WHERE grid = ?" + (" AND active = 1" if active_only else "")
        return self._rows(sql + " ORDER BY task, model, method, budget, sft_fraction, seed",
                          (grid,))

    def grid_point_ids(self, grid: str) -> list[str]:
        return [r["point_id"] for r in self._rows(
            "SELECT DISTINCT point_id FROM cells WHERE grid = ? AND active = 1 UNION "
            "SELECT point_id FROM baselines WHERE grid = ? AND active = 1", (grid, grid))]

    def grid_stage_ids(self, grid: str) -> list[str]:
        """Every stage that the grid's active points need, parents first."""
        rows = self._rows(
            "WITH p AS (SELECT point_id FROM cells WHERE grid = ?1 AND active = 1 UNION "
            "SELECT point_id FROM baselines WHERE grid = ?1 AND active = 1) "
            "SELECT sft_stage_id, pft_stage_id, eval_stage_id FROM points "
            "WHERE point_id IN (SELECT point_id FROM p)", (grid,))
        ids: dict[str, None] = {}
        for col in ("sft_stage_id", "pft_stage_id", "eval_stage_id"):
            for r in rows:
                if r[col]:
                    ids[r[col]] = None
        return list(ids)

    def points(self, point_ids=None) -> list[dict]:
        if point_ids is None:
            return self._rows("SELECT * FROM point_status ORDER BY task, model, method, n_sft")
        return self._select_in("SELECT * FROM point_status WHERE point_id IN ({})", point_ids)

    def stage(self, stage_id: str) -> dict | None:
        rows = self._rows("SELECT * FROM stages WHERE stage_id = ?", (stage_id,))
        return _decode_stage(rows[0]) if rows else None

    def stages(self, grid: str | None = None, states=None, stage_ids=None) -> list[dict]:
        if grid is not None:
            stage_ids = self.grid_stage_ids(grid)
        sql, params = "SELECT * FROM stages", []
        if stage_ids is not None:
            rows = self._select_in("SELECT * FROM stages WHERE stage_id IN ({})", stage_ids)
        else:
            rows = self._rows(sql + " ORDER BY created_at, stage_id", params)
        if states is not None:
            rows = [r for r in rows if r["state"] in states]
        return [_decode_stage(r) for r in rows]

    def _select_in(self, sql: str, ids) -> list[dict]:
        ids, out = list(ids), []
        for i in range(0, len(ids), 900):  # SQLite's bound-parameter limit
            chunk = ids[i:i + 900]
            out += self._rows(sql.format(",".join("?" * len(chunk))), chunk)
        return out

    def attempts(self, stage_id: str | None = None, open_only: bool = False) -> list[dict]:
        sql, params, where = "SELECT * FROM attempts", [], []
        if stage_id is not None:
            where.append("stage_id = ?")
            params.append(stage_id)
        if open_only:
            where.append(f"outcome IN ({','.join('?' * len(UNFINISHED))})")
            params += UNFINISHED
        if where:
            sql += " WHERE " + " AND ".join(where)
        return self._rows(sql + " ORDER BY attempt_id", params)

    def latest_attempt(self, stage_id: str) -> dict | None:
        rows = self._rows("SELECT * FROM attempts WHERE stage_id = ? ORDER BY attempt_id DESC "
                          "LIMIT 1", (stage_id,))
        return rows[0] if rows else None

    def metrics(self, stage_ids=None) -> dict[str, dict[str, float]]:
        rows = (self._rows("SELECT * FROM metrics") if stage_ids is None else
                self._select_in("SELECT * FROM metrics WHERE stage_id IN ({})", stage_ids))
        out: dict[str, dict[str, float]] = {}
        for r in rows:
            out.setdefault(r["stage_id"], {})[r["name"]] = r["value"]
        return out

    # -- writes (each joins the caller's write() or opens its own) ------------------------
    def begin_attempt(self, stage_id: str, executor: str, resources: dict | None = None,
                      job_name: str | None = None) -> int:
        """Record an attempt before anything is submitted (no orphan jobs)."""
        code = code_version()
        with self.write():
            cur = self.conn.execute(
                "INSERT INTO attempts (stage_id, executor, job_name, submitted_at, outcome, "
                "resources, budgetlab_version, git_commit, git_dirty) "
                "VALUES (?, ?, ?, ?, 'SUBMITTING', ?, ?, ?, ?)",
                (stage_id, executor, job_name, _now(), json.dumps(resources or {}, sort_keys=True),
                 code["budgetlab_version"], code["git_commit"], code["git_dirty"]))
            self.set_stage_state(stage_id, "SUBMITTING")
            return cur.lastrowid

    def update_attempt(self, attempt_id: int, **columns) -> None:
        if not columns:
            return
        for k in ("error", "log_path", "raw_state"):
            if k in columns:
                columns[k] = redact(columns[k])
        if "resources" in columns and not isinstance(columns["resources"], str):
            columns["resources"] = json.dumps(columns["resources"], sort_keys=True)
        sets = ", ".join(f"{k} = ?" for k in columns)
        with self.write():
            self.conn.execute(f"UPDATE attempts SET {sets} WHERE attempt_id = ?",
                              (*columns.values(), attempt_id))

    def set_stage_state(self, stage_id: str, state: str, error: str | None = None) -> None:
        with self.write():
            self.conn.execute("UPDATE stages SET state = ?, error = ?, updated_at = ? "
                              "WHERE stage_id = ?", (state, redact(error), _now(), stage_id))

    def record_result(self, stage_id: str, attempt_id: int | None, result: dict) -> None:
        """A valid result.json: metrics, tokens, COMPLETED. Idempotent (no duplicate rows)."""
        metrics = {k: float(v) for k, v in result.get("metrics", {}).items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}
        with self.write():
            self.conn.executemany(
                "INSERT INTO metrics VALUES (?, ?, ?) ON CONFLICT DO UPDATE SET value = excluded.value",
                ((stage_id, k, v) for k, v in metrics.items()))
            self.conn.execute(
                "UPDATE stages SET state = 'COMPLETED', error = NULL, tokens = ?, "
                "wall_seconds = ?, result = ?, updated_at = ? WHERE stage_id = ?",
                (result.get("tokens"), result.get("wall_seconds"),
                 json.dumps(result, sort_keys=True, default=str), _now(), stage_id))
            if attempt_id is not None:
                self.conn.execute(
                    "UPDATE attempts SET outcome = 'COMPLETED', tokens = ? WHERE attempt_id = ?",
                    (result.get("tokens"), attempt_id))


def _decode_stage(row: dict) -> dict:
    for k in ("params", "data", "resources", "result"):
        if row.get(k):
            row[k] = json.loads(row[k])
    return row


# -- read-only SQL for `ledger sql` --------------------------------------------------------
_READ_ACTIONS = {sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, sqlite3.SQLITE_FUNCTION,
                 getattr(sqlite3, "SQLITE_RECURSIVE", 33)}
_READ_PRAGMAS = {"table_info", "table_xinfo", "index_list", "index_info", "foreign_key_list",
                 "integrity_check", "quick_check", "schema_version", "user_version",
                 "page_count", "page_size", "journal_mode", "database_list", "table_list"}
_TABLE_PRAGMAS = {"table_info", "table_xinfo", "index_list", "index_info", "foreign_key_list",
                  "integrity_check", "quick_check"}  # their argument names a table, sets nothing


def _authorize(action, arg1, arg2, dbname, source):
    if action in _READ_ACTIONS:
        return sqlite3.SQLITE_OK
    if action == sqlite3.SQLITE_PRAGMA and arg1:
        name = arg1.lower()
        if name in _READ_PRAGMAS and (arg2 is None or name in _TABLE_PRAGMAS):
            return sqlite3.SQLITE_OK
    return sqlite3.SQLITE_DENY


def query_readonly(path: str | Path, sql: str, params=()) -> tuple[list[str], list[tuple]]:
    """Run one read-only statement. Writes, ATTACH and writable PRAGMAs are refused."""
    path = Path(path)
    if not path.exists():
        raise BadInput(f"{path}: no ledger here")
    conn = sqlite3.connect(f"file:{path.resolve()}?mode=ro", uri=True, timeout=BUSY_TIMEOUT_S)
    try:
        conn.execute("PRAGMA query_only = 1")
        conn.set_authorizer(_authorize)
        try:
            cur = conn.execute(sql, params)
            rows = cur.fetchall()
        except sqlite3.DatabaseError as e:
            msg = str(e)
            if "not authorized" in msg or "readonly" in msg or "read-only" in msg:
                raise BadInput(f"ledger sql: refused: the ledger is read-only here "
                               f"(only SELECT and read-only PRAGMAs) [{msg}]") from None
            raise BadInput(f"ledger sql: {msg}") from None
        except sqlite3.Warning as e:  # e.g. several statements
            raise BadInput(f"ledger sql: {e}") from None
        cols = [d[0] for d in cur.description] if cur.description else []
        return cols, rows
    finally:
        conn.close()
