"""The Ledger: one SQLite file, the only code that speaks SQL. It stores and hands back the
data model's objects (budgetlab.datamodel) and writes every state through `apply`, which
checks the transition against budgetlab.lifecycle.

One writer: only the CLI process writes, in short BEGIN IMMEDIATE transactions with a busy
timeout; workers never open the database. Journal mode DELETE (safe on NFS).
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import sys
import time
from pathlib import Path

from budgetlab import lifecycle
from budgetlab.datamodel import Attempt, Cell, Grid, Point, Stage, from_row
from budgetlab.errors import BadInput
from budgetlab.graph import content_id
from budgetlab.ledger.schema import BUSY_TIMEOUT_S, MIGRATIONS, SCHEMA, SCHEMA_VERSION
from budgetlab.lifecycle import IllegalTransition, Transition
from budgetlab.redact import redact


def _import_sqlite_utils():
    """sqlite_utils imports pandas and numpy when they are installed (datasets brings both),
    only to map their scalar types to column types: 0.6 of the 0.75 CPU-s its import takes,
    paid by every CLI command. The ledger's tables come from its own SQL (schema.py) and its
    values from JSON and the data model, never from numpy or pandas, so a process that has
    not imported them yet imports sqlite_utils without them; they stay importable after."""
    hidden = [m for m in ("pandas", "numpy") if m not in sys.modules]
    sys.modules.update(dict.fromkeys(hidden))      # None: "import pandas" raises ImportError
    try:
        import sqlite_utils
    finally:
        for m in hidden:
            if sys.modules.get(m, ...) is None:
                del sys.modules[m]
    return sqlite_utils


sqlite_utils = _import_sqlite_utils()

_REDACTED = ("error", "log_path", "raw_state")
_JSON = ("resources",)


def _now() -> float:
    return time.time()


class Ledger:
    """The ledger file. Reads anywhere; writes only inside `with ledger.write():` (each
    write method opens one if the caller has none)."""

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

    @property
    def in_write(self) -> bool:
        return self.conn.in_transaction

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
            # Again under the lock: two processes opening a new ledger at once both read 0
            # above, and the second would replay the first one's migrations.
            version = self._schema_version()
            if version == SCHEMA_VERSION:
                return
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

    def _rows(self, sql: str, params=()) -> list[dict]:
        return list(self.db.query(sql, params))

    def _select_in(self, sql: str, ids) -> list[dict]:
        ids, out = list(ids), []
        for i in range(0, len(ids), 900):  # SQLite's bound-parameter limit
            chunk = ids[i:i + 900]
            out += self._rows(sql.format(",".join("?" * len(chunk))), chunk)
        return out

    # -- registration -------------------------------------------------------------------
    def register(self, plan) -> dict:
        """Add the grid's cells, points and stages; re-registering adds nothing and writes
        nothing. Cells of an earlier version of the grid stay, marked inactive."""
        spec, now = plan.spec, _now()
        before = self.counts()
        settings = {"costs": spec.costs, "slurm": spec.slurm, "local": spec.local,
                    "resources": spec.resources, "eval": spec.eval,
                    "tracking": getattr(spec, "tracking", {})}
        resolved = json.dumps(spec.to_dict(), sort_keys=True)
        cells = [{"cell_id": content_id({"grid": c.grid, "task": c.task, "model": c.model,
                                         "budget": c.budget, "f": c.sft_fraction,
                                         "method": c.method, "seed": c.seed,
                                         "point": c.point_id}),
                  "grid": c.grid, "task": c.task, "model": c.model, "budget": c.budget,
                  "sft_fraction": c.sft_fraction, "method": c.method, "seed": c.seed,
                  "n_sft": c.n_sft, "n_pft": c.n_pft, "annotation_cost": c.annotation_cost,
                  "point_id": c.point_id, "active": 1, "registered_at": now}
                 for c in plan.cells]
        base = [p for p in plan.points.values() if p.method == "base"]
        with self.write():
            self.conn.execute(
                "INSERT INTO grids (name, spec_path, spec_text, settings, registered_at, "
                "updated_at, resolved) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT(name) DO "
                "UPDATE SET spec_path = excluded.spec_path, spec_text = excluded.spec_text, "
                "settings = excluded.settings, resolved = excluded.resolved, "
                "updated_at = excluded.updated_at WHERE spec_text IS NOT excluded.spec_text "
                "OR settings IS NOT excluded.settings OR resolved IS NOT excluded.resolved",
                (spec.name, spec.path, spec.text, json.dumps(settings, sort_keys=True), now,
                 now, resolved))
            self._set_active("cells", "cell_id", spec.name, [c["cell_id"] for c in cells])
            self._set_active("baselines", "point_id", spec.name, [p.point_id for p in base])
            self.db["cells"].insert_all(cells, ignore=True, batch_size=500)
            self.db["baselines"].insert_all(
                ({"grid": spec.name, "task": p.task, "model": p.model, "point_id": p.point_id,
                  "active": 1} for p in base), ignore=True)
            self.db["points"].insert_all(
                ({**_point_row(p), "created_at": now} for p in plan.points.values()),
                ignore=True, batch_size=500)
            # A stage's resources may change between registrations (not its id): update
            # only the rows whose resources differ, so re-registering writes nothing.
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

    def _set_active(self, table: str, key: str, grid: str, live: list[str]) -> None:
        """active = (key in live) for the grid's rows, touching only rows whose flag changes."""
        self.conn.execute("CREATE TEMP TABLE IF NOT EXISTS _live (id TEXT PRIMARY KEY)")
        self.conn.execute("DELETE FROM _live")
        self.conn.executemany("INSERT OR IGNORE INTO _live VALUES (?)", ((i,) for i in live))
        self.conn.execute(f"UPDATE {table} SET active = ({key} IN (SELECT id FROM _live)) "
                          f"WHERE grid = ? AND active != ({key} IN (SELECT id FROM _live))",
                          (grid,))

    def counts(self) -> dict:
        return {t: self.db[t].count for t in ("cells", "points", "stages", "attempts")}

    # -- grids, cells, points -------------------------------------------------------------
    def grid(self, name: str) -> Grid:
        rows = self._rows("SELECT * FROM grids WHERE name = ?", (name,))
        if not rows:
            known = [g.name for g in self.grids()]
            raise BadInput(f"{self.path}: unknown grid {name!r} (known: "
                           f"{', '.join(known) or 'none'})")
        return _grid(rows[0])

    def grids(self) -> list[Grid]:
        return [_grid(r) for r in self.db["grids"].rows_where(order_by="name")]

    def cells(self, grid: str, active_only: bool = True) -> list[Cell]:
        where = "grid = ?" + (" AND active = 1" if active_only else "")
        return [from_row(Cell, {**r, "active": bool(r["active"])}) for r in
                self.db["cells"].rows_where(
                    where, [grid], order_by="task, model, method, budget, sft_fraction, seed")]

    def baselines(self, grid: str) -> list[dict]:
        """The base-model points of a grid: [{"task", "model", "point_id"}]."""
        return self._rows("SELECT task, model, point_id FROM baselines WHERE grid = ? AND "
                          "active = 1 ORDER BY task, model", (grid,))

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

    def point(self, point_id: str) -> Point | None:
        rows = self._rows("SELECT * FROM points WHERE point_id = ?", (point_id,))
        return from_row(Point, rows[0]) if rows else None

    def points(self, point_ids=None) -> list[Point]:
        if point_ids is None:
            rows = self._rows("SELECT * FROM points ORDER BY task, model, method, n_sft")
        else:
            rows = self._select_in("SELECT * FROM points WHERE point_id IN ({})", point_ids)
        return [from_row(Point, r) for r in rows]

    def point_status(self, point_ids=None) -> list[dict]:
        """Points with the state of each of their stages (the point_status view)."""
        if point_ids is None:
            return self._rows("SELECT * FROM point_status ORDER BY task, model, method, n_sft")
        return self._select_in("SELECT * FROM point_status WHERE point_id IN ({})", point_ids)

    # -- stages ---------------------------------------------------------------------------
    def stage(self, stage_id: str) -> Stage | None:
        rows = self._rows("SELECT * FROM stages WHERE stage_id = ?", (stage_id,))
        return from_row(Stage, rows[0]) if rows else None

    def stages(self, grid: str | None = None, states=None, stage_ids=None) -> list[Stage]:
        if grid is not None:
            stage_ids = self.grid_stage_ids(grid)
        if stage_ids is not None:
            rows = self._select_in("SELECT * FROM stages WHERE stage_id IN ({})", stage_ids)
        else:
            rows = self._rows("SELECT * FROM stages ORDER BY created_at, stage_id")
        if states is not None:
            rows = [r for r in rows if r["state"] in states]
        return [from_row(Stage, r) for r in rows]

    def stage_states(self, stage_ids) -> dict[str, str]:
        return {r["stage_id"]: r["state"] for r in
                self._select_in("SELECT stage_id, state FROM stages WHERE stage_id IN ({})",
                                stage_ids)}

    def blocked_stages(self) -> list[Stage]:
        return [from_row(Stage, r) for r in
                self._rows("SELECT * FROM stages WHERE state = 'BLOCKED'")]

    # -- attempts -------------------------------------------------------------------------
    def attempt(self, attempt_id: int) -> Attempt | None:
        rows = self._rows("SELECT * FROM attempts WHERE attempt_id = ?", (attempt_id,))
        return _attempt(rows[0]) if rows else None

    def attempts(self, stage_id: str | None = None, open_only: bool = False) -> list[Attempt]:
        sql, params, where = "SELECT * FROM attempts", [], []
        if stage_id is not None:
            where.append("stage_id = ?")
            params.append(stage_id)
        if open_only:
            where.append(f"outcome IN ({','.join('?' * len(lifecycle.LIVE))})")
            params += lifecycle.LIVE
        if where:
            sql += " WHERE " + " AND ".join(where)
        return [_attempt(r) for r in self._rows(sql + " ORDER BY attempt_id", params)]

    def latest_attempt(self, stage_id: str) -> Attempt | None:
        rows = self._rows("SELECT * FROM attempts WHERE stage_id = ? ORDER BY attempt_id DESC "
                          "LIMIT 1", (stage_id,))
        return _attempt(rows[0]) if rows else None

    def latest_attempts(self, stage_ids) -> dict[str, Attempt]:
        rows = self._select_in(
            "SELECT a.* FROM attempts a JOIN (SELECT stage_id, MAX(attempt_id) AS m FROM "
            "attempts WHERE stage_id IN ({}) GROUP BY stage_id) l ON a.attempt_id = l.m",
            stage_ids)
        return {r["stage_id"]: _attempt(r) for r in rows}

    def open_attempts(self, with_ending: bool = False) -> list[Attempt]:
        """The latest attempt of every stage whose outcome is live; with_ending adds the ones
        completed by their result.json while their job had not ended (sync follows them to
        the end: final times, compute, and the runs of a requeued job)."""
        marks = ",".join("?" * len(lifecycle.LIVE))
        ending = " OR (a.outcome = 'COMPLETED' AND a.ended_at IS NULL AND a.job_id IS NOT NULL)" \
            if with_ending else ""
        return [_attempt(r) for r in self._rows(
            f"SELECT a.* FROM attempts a JOIN (SELECT stage_id, MAX(attempt_id) AS m FROM "
            f"attempts GROUP BY stage_id) l ON a.attempt_id = l.m WHERE a.outcome IN ({marks})"
            f"{ending} ORDER BY a.attempt_id", lifecycle.LIVE)]

    def job_rows(self, stage_id: str, job_id: str) -> list[Attempt]:
        """Every attempt row of one stage in one job (one per run of a requeued job)."""
        return [_attempt(r) for r in self._rows(
            "SELECT * FROM attempts WHERE stage_id = ? AND job_id = ? ORDER BY attempt_id",
            (stage_id, job_id))]

    def rows_of_jobs(self, job_ids) -> dict[tuple[str, str], list[Attempt]]:
        """(stage id, job id) -> every attempt row of that stage in that job, oldest first."""
        out: dict[tuple[str, str], list[Attempt]] = {}
        for r in self._select_in("SELECT * FROM attempts WHERE job_id IN ({}) "
                                 "ORDER BY attempt_id", list(set(job_ids))):
            out.setdefault((r["stage_id"], r["job_id"]), []).append(_attempt(r))
        return out

    def recorded_job_ids(self, job_ids) -> set[str]:
        """Which of these job ids an attempt holds (an array id "N" counts when a task "N_i"
        of it is recorded). Only for the rare crashed submission: one query per id."""
        found = set()
        for jid in set(job_ids):
            if self._rows("SELECT 1 AS x FROM attempts WHERE job_id = ? OR job_id GLOB ? "
                          "LIMIT 1", (jid, f"{jid}_*")):
                found.add(jid)
        return found

    def last_executor(self, stage_ids) -> str | None:
        rows = self._select_in("SELECT executor FROM attempts WHERE stage_id IN ({}) "
                               "ORDER BY attempt_id DESC LIMIT 1", stage_ids)
        return rows[0]["executor"] if rows else None

    # -- measurements -----------------------------------------------------------------------
    def metrics(self, stage_ids=None) -> dict[str, dict[str, float]]:
        rows = (self._rows("SELECT * FROM metrics") if stage_ids is None else
                self._select_in("SELECT * FROM metrics WHERE stage_id IN ({})", stage_ids))
        out: dict[str, dict[str, float]] = {}
        for r in rows:
            out.setdefault(r["stage_id"], {})[r["name"]] = r["value"]
        return out

    def compute(self, stage_ids) -> dict[str, dict]:
        """stage id -> {"gpu_hours", "cpu_hours", "attempts"} (the compute view)."""
        return {r["stage_id"]: r for r in self._select_in(
            "SELECT stage_id, gpu_hours, cpu_hours, attempts FROM compute "
            "WHERE stage_id IN ({})", stage_ids)}

    def first_task(self, grid: str) -> str | None:
        rows = self._rows("SELECT task FROM cells WHERE grid = ? LIMIT 1", (grid,))
        return rows[0]["task"] if rows else None

    _GRID_STAGES = (
        "WITH p AS (SELECT point_id FROM cells WHERE grid = ?1 AND active = 1 UNION "
        "SELECT point_id FROM baselines WHERE grid = ?1 AND active = 1), "
        "s AS (SELECT sft_stage_id AS sid FROM points WHERE point_id IN (SELECT point_id FROM p) "
        "UNION SELECT pft_stage_id FROM points WHERE point_id IN (SELECT point_id FROM p) "
        "UNION SELECT eval_stage_id FROM points WHERE point_id IN (SELECT point_id FROM p)) ")

    def grid_counts(self, grid: str) -> dict:
        """A grid in numbers: stages by kind x state, points done/total, compute, spend."""
        by_kind: dict[str, dict[str, int]] = {}
        for r in self._rows(self._GRID_STAGES + "SELECT st.kind, st.state, COUNT(*) AS n FROM "
                            "stages st WHERE st.stage_id IN (SELECT sid FROM s) "
                            "GROUP BY st.kind, st.state", (grid,)):
            by_kind.setdefault(r["kind"], {})[r["state"]] = r["n"]
        pts = self._rows(
            "WITH p AS (SELECT point_id FROM cells WHERE grid = ?1 AND active = 1 UNION "
            "SELECT point_id FROM baselines WHERE grid = ?1 AND active = 1) "
            "SELECT COUNT(*) AS total, SUM(st.state = 'COMPLETED') AS done FROM points pt "
            "JOIN stages st ON st.stage_id = pt.eval_stage_id "
            "WHERE pt.point_id IN (SELECT point_id FROM p)", (grid,))[0]
        comp = self._rows(self._GRID_STAGES + "SELECT COALESCE(SUM(gpu_seconds), 0) / 3600.0 "
                          "AS gpu_hours, COALESCE(SUM(cpu_seconds), 0) / 3600.0 AS cpu_hours, "
                          "COUNT(*) AS attempts FROM attempts WHERE stage_id IN "
                          "(SELECT sid FROM s)", (grid,))[0]
        spend = self._rows(
            "SELECT COALESCE(SUM(annotation_cost), 0) AS cost, "
            "COALESCE(SUM(CASE WHEN st.state = 'COMPLETED' THEN annotation_cost END), 0) AS done "
            "FROM cells c JOIN points pt ON pt.point_id = c.point_id "
            "JOIN stages st ON st.stage_id = pt.eval_stage_id "
            "WHERE c.grid = ? AND c.active = 1", (grid,))[0]
        return {"stages": by_kind, "points_total": pts["total"] or 0,
                "points_done": pts["done"] or 0, "attempts": comp["attempts"],
                "gpu_hours": comp["gpu_hours"], "cpu_hours": comp["cpu_hours"],
                "annotation_spend": spend["cost"], "annotation_spend_done": spend["done"]}

    def spend(self, grid: str) -> list[dict]:
        """Per task and method of a grid: cells, annotation cost, compute of their stages."""
        rows = self._rows(
            "SELECT c.task, c.method, COUNT(*) AS cells, SUM(c.annotation_cost) AS cost "
            "FROM cells c WHERE c.grid = ? AND c.active = 1 GROUP BY c.task, c.method "
            "ORDER BY c.task, c.method", (grid,))
        compute = self._rows(
            "WITH pts AS (SELECT DISTINCT c.task, c.method, p.* FROM cells c "
            "  JOIN points p ON p.point_id = c.point_id WHERE c.grid = ? AND c.active = 1), "
            "st AS (SELECT task, method, sft_stage_id AS sid FROM pts UNION "
            "  SELECT task, method, pft_stage_id FROM pts UNION "
            "  SELECT task, method, eval_stage_id FROM pts) "
            "SELECT st.task, st.method, SUM(a.gpu_seconds) / 3600.0 AS gpu_hours, "
            "  SUM(a.cpu_seconds) / 3600.0 AS cpu_hours FROM st "
            "JOIN attempts a ON a.stage_id = st.sid GROUP BY st.task, st.method", (grid,))
        by_key = {(r["task"], r["method"]): r for r in compute}
        return [{**r, "gpu_hours": by_key.get((r["task"], r["method"]), {}).get("gpu_hours") or 0.0,
                 "cpu_hours": by_key.get((r["task"], r["method"]), {}).get("cpu_hours") or 0.0}
                for r in rows]

    # -- writes: every state goes through apply ---------------------------------------------
    def apply(self, t: Transition) -> int | None:
        """Write one transition (budgetlab.lifecycle): the attempt row and, for the latest
        attempt, the stage's state. Illegal transitions raise IllegalTransition and write
        nothing. Returns the attempt id (a new row's, for new_attempt)."""
        with self.write():
            rows = self._rows("SELECT state FROM stages WHERE stage_id = ?", (t.stage_id,))
            if not rows:
                raise IllegalTransition(f"stage {t.stage_id}: not in the ledger ({t.evidence})")
            stage_state = rows[0]["state"]
            aid = t.attempt_id
            cols = _columns(t.fields)
            if t.error is not None:
                cols["error"] = redact(t.error)[:2000]
            if t.new_attempt is not None:
                row = {**_columns(t.new_attempt), **cols, "stage_id": t.stage_id,
                       "outcome": t.to or lifecycle.SUBMITTING}
                if row["outcome"] != lifecycle.SUBMITTING:   # a new run of a requeued job
                    lifecycle.check_attempt(0, lifecycle.PENDING, row["outcome"], t.evidence)
                aid = self.db["attempts"].insert(row).last_pk
            elif aid is not None:
                current = self._rows("SELECT outcome FROM attempts WHERE attempt_id = ?",
                                     (aid,))
                if not current:
                    raise IllegalTransition(f"attempt {aid}: not in the ledger ({t.evidence})")
                if t.to is not None:
                    lifecycle.check_attempt(aid, current[0]["outcome"], t.to, t.evidence)
                    cols["outcome"] = t.to
                if cols:
                    self._update("attempts", "attempt_id", aid, cols)
            if t.latest and t.to is not None:
                lifecycle.check_stage(t.stage_id, stage_state, t.to, t.evidence)
                upd = {"state": t.to, "updated_at": _now(),
                       "error": None if t.to == lifecycle.COMPLETED else
                       (redact(t.error)[:2000] if t.error else None)}
                if t.to == lifecycle.COMPLETED and t.result is not None:
                    upd.update(tokens=t.result.get("tokens"),
                               wall_seconds=t.result.get("wall_seconds"),
                               result=json.dumps(t.result, sort_keys=True, default=str))
                self._update("stages", "stage_id", t.stage_id, upd)
            if t.to == lifecycle.COMPLETED and t.result is not None:
                self._record_metrics(t.stage_id, t.result)
                if aid is not None:
                    self._update("attempts", "attempt_id", aid, {"tokens": t.result.get("tokens")})
            return aid

    def _update(self, table: str, key: str, value, cols: dict) -> None:
        # Plain UPDATE: sqlite-utils' update() re-reads the table's schema and the row first,
        # which dominates a sync of hundreds of attempts.
        self.conn.execute(f"UPDATE {table} SET {', '.join(f'{c} = ?' for c in cols)} "
                          f"WHERE {key} = ?", (*cols.values(), value))

    def heartbeat(self, attempt_ids, now: float) -> None:
        """A submitter's sign of life on the attempts it is still submitting (no state)."""
        ids = list(attempt_ids)
        with self.write():
            for i in range(0, len(ids), 900):
                chunk = ids[i:i + 900]
                self.conn.execute(f"UPDATE attempts SET heartbeat_at = ? WHERE attempt_id IN "
                                  f"({','.join('?' * len(chunk))}) AND outcome = 'SUBMITTING'",
                                  (now, *chunk))

    def _record_metrics(self, stage_id: str, result: dict) -> None:
        metrics = [{"stage_id": stage_id, "name": k, "value": float(v)}
                   for k, v in (result.get("metrics") or {}).items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)]
        self.db["metrics"].upsert_all(metrics, pk=("stage_id", "name"))


def _columns(fields: dict) -> dict:
    out = dict(fields)
    for k in _REDACTED:
        if out.get(k) is not None:
            out[k] = redact(out[k])
    for k in _JSON:
        if k in out and not isinstance(out[k], str):
            out[k] = json.dumps(out[k], sort_keys=True)
    return out


def _point_row(p: Point) -> dict:
    return {"point_id": p.point_id, "task": p.task, "model": p.model, "method": p.method,
            "n_sft": p.n_sft, "n_pft": p.n_pft, "seed": p.seed, "sft_stage_id": p.sft_stage_id,
            "pft_stage_id": p.pft_stage_id, "eval_stage_id": p.eval_stage_id}


def _attempt(row: dict) -> Attempt:
    return from_row(Attempt, row)


def _grid(row: dict) -> Grid:
    return Grid(name=row["name"], spec_path=row["spec_path"], spec_text=row["spec_text"],
                settings=json.loads(row["settings"] or "{}"),
                resolved=json.loads(row["resolved"]) if row.get("resolved") else None,
                registered_at=row["registered_at"], updated_at=row["updated_at"])
