"""Live progress of a grid: its running stages (from their progress.json) and its tracking
runs (W&B, TensorBoard), for `status`, `status --watch`, `run` and Lab.status.

    live_progress(led, workdir, grid) -> {
        "running":  [{"stage_id", "kind", "task", "n", "seed", "phase", "step", "total_steps",
                      "loss", "lr", "tokens", "tokens_per_s", "eta_s", "heartbeat_age_s"}],
        "tracking": {"backend", "mode", "runs": [{"stage_id", "run"}], "offline_dirs",
                     "sync_command"} or None}

progress.json is advisory (DESIGN section 6): a stage without one (loading its model, or not
started) is listed with step None. The ETA extrapolates the rate of the current attempt's
loop: (total - step) x seconds per step since `started_at`/`start_step`, which the training
loop writes; without them (the eval stage), since the attempt started.
"""

from __future__ import annotations

import time
from pathlib import Path

from budgetlab.lifecycle import RUNNING
from budgetlab.stagedir import StageDir, StageFileError, read_json

from budgetlab.tracking import TRACKING_FILE  # noqa: E402


def read_tracking(stage: StageDir) -> dict | None:
    """The stage's tracking record ({"backend", "mode", "run_id", "path", "url", ...}) or
    None (absent or unreadable: tracking is advisory too)."""
    p = stage.root / TRACKING_FILE
    if not p.exists():
        return None
    try:
        return read_json(p, required=("backend",))
    except (StageFileError, OSError):
        return None


def run_ref(rec: dict) -> str:
    """What the ledger stores per attempt: the run's URL when it has one (online), else
    `backend:path` (an offline W&B run dir, a TensorBoard log dir)."""
    return rec.get("url") or f"{rec['backend']}:{rec.get('path') or rec.get('run_id')}"


def stage_progress(stage: StageDir, started_at: float | None = None,
                   now: float | None = None) -> dict:
    now = time.time() if now is None else now
    p = stage.read_progress() or {}
    step, total = p.get("step"), p.get("total_steps")
    beat = p.get("heartbeat")
    out = {"phase": p.get("phase"), "step": step, "total_steps": total,
           "loss": p.get("loss"), "lr": p.get("lr"), "tokens": p.get("tokens"),
           "tokens_per_s": p.get("tokens_per_s"), "eta_s": None,
           "heartbeat_age_s": (now - beat) if isinstance(beat, (int, float)) else None}
    t0, s0 = p.get("started_at"), p.get("start_step", 0)
    if t0 is None:
        t0, s0 = started_at, 0
    if (isinstance(step, int) and isinstance(total, int) and isinstance(beat, (int, float))
            and isinstance(t0, (int, float)) and step > (s0 or 0) and beat > t0):
        per_step = (beat - t0) / (step - (s0 or 0))
        # Seconds left from now: the steps to go, less the time since the last heartbeat.
        out["eta_s"] = max(0.0, (total - step) * per_step - max(0.0, now - beat))
    return out


def live_progress(led, workdir: str | Path, grid: str, now: float | None = None) -> dict:
    now = time.time() if now is None else now
    running = led.stages(grid=grid, states={RUNNING})
    latest = led.latest_attempts([s.stage_id for s in running])
    ids = {s.stage_id for s in running}
    rows = []
    for s in running:
        att = latest.get(s.stage_id)
        row = {"stage_id": s.stage_id, "kind": s.kind, "task": s.task, "n": s.n,
               "seed": s.seed, **stage_progress(StageDir.of(workdir, s.stage_id),
                                                att.started_at if att else None, now)}
        if row["phase"] is None and s.parent_id in ids:
            row["phase"] = "after parent"   # an eval in its training stage's job, waiting
        rows.append(row)
    return {"running": rows, "tracking": tracking_summary(led, workdir, grid)}


def tracking_summary(led, workdir: str | Path, grid: str) -> dict | None:
    """The grid's tracking settings and the runs the ledger recorded (one per stage: the
    latest attempt's), with the command that uploads offline W&B runs."""
    settings = (led.grid(grid).settings.get("tracking") or {})
    backend = settings.get("backend", "none")
    if backend == "none":
        return None
    ids = led.grid_stage_ids(grid)
    latest = led.latest_attempts(ids)
    runs = [{"stage_id": sid, "run": a.tracking} for sid, a in latest.items() if a.tracking]
    out = {"backend": backend, "mode": settings.get("mode"), "project": settings.get("project"),
           "runs": runs, "offline_dirs": [], "sync_command": None}
    if backend == "wandb":
        dirs = sorted(r["run"].split(":", 1)[1] for r in runs
                      if r["run"].startswith("wandb:"))
        out["offline_dirs"] = dirs
        if dirs:
            root = Path(workdir).resolve() / "wandb"
            out["sync_command"] = f"wandb sync {root}/offline-run-*"
    elif backend == "tensorboard":
        out["sync_command"] = None
        out["logdir"] = str(Path(workdir).resolve() / "tensorboard")
    return out

