"""The ledger's tables (DESIGN section 5) and their migrations, keyed on meta.schema_version.

Schema changes are migrations: each brings the previous version up by one, never dropping
data. The table and column names are a contract (users query them with `ledger sql`,
sqlite-utils or Datasette).
"""

BUSY_TIMEOUT_S = 60.0

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

# version N -> the SQL that brings a version N-1 ledger up to N. Never drop data.
MIGRATIONS: dict[int, str] = {
    # 2: who submitted an attempt and when it last showed life (a submit in progress is
    # never taken for a dead one); the tracking run of an attempt; the grid spec as
    # resolved at registration (re-pricing never re-reads the filesystem).
    2: """
    ALTER TABLE attempts ADD COLUMN submitter TEXT;
    ALTER TABLE attempts ADD COLUMN heartbeat_at REAL;
    ALTER TABLE attempts ADD COLUMN tracking TEXT;
    ALTER TABLE grids ADD COLUMN resolved TEXT;
    """,
    # 3: the node(s) whose failure ended a run (NODE_FAIL), not the whole allocation, so that
    # a retry excludes only those while they are down.
    3: """
    ALTER TABLE attempts ADD COLUMN failed_nodes TEXT;
    """,
}
SCHEMA_VERSION = 1 + len(MIGRATIONS)