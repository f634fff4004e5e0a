"""Rendering live progress for `run` and `status --watch`: a progress bar of the grid's
stages, a table of the running ones (step / total, loss, tokens/s, ETA), the tracking runs.
No commands here; the data comes from Lab.status (budgetlab.progress)."""

from __future__ import annotations

from budgetlab.lifecycle import ENDED


def _dur(s: float | None) -> str:
    if s is None:
        return "?"
    s = int(round(s))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{sec:02d}s" if m else f"{sec}s"


def running_table(st: dict, limit: int = 20):
    """The running stages of a status dict, or None when nothing runs."""
    from rich.table import Table

    rows = st.get("running") or []
    if not rows:
        return None
    t = Table(title=f"running ({len(rows)})", title_justify="left")
    for c in ("stage", "kind", "n", "phase", "step", "loss", "tokens/s", "ETA", "heartbeat"):
        t.add_column(c, justify="right" if c not in ("stage", "kind", "phase") else "left")
    for r in rows[:limit]:
        step = "" if r["step"] is None else (
            f"{r['step']}/{r['total_steps']}" if r["total_steps"] else str(r["step"]))
        t.add_row(r["stage_id"], r["kind"], "" if r["n"] is None else str(r["n"]),
                  r["phase"] or "starting", step,
                  "" if r["loss"] is None else f"{r['loss']:.4g}",
                  "" if r["tokens_per_s"] is None else f"{r['tokens_per_s']:,.0f}",
                  _dur(r["eta_s"]) if r["step"] is not None else "",
                  "" if r["heartbeat_age_s"] is None else f"{_dur(r['heartbeat_age_s'])} ago")
    if len(rows) > limit:
        t.caption = f"... and {len(rows) - limit} more (status --json lists all)"
    return t


def tracking_lines(st: dict) -> list[str]:
    tr = st.get("tracking")
    if not tr:
        return []
    where = f" project {tr['project']}" if tr.get("project") else ""
    lines = [f"tracking: {tr['backend']}{where} ({tr.get('mode') or 'default mode'}), "
             f"{len(tr['runs'])} run(s) recorded"]
    if tr.get("sync_command"):
        lines.append(f"offline runs: upload them from a machine with network access with "
                     f"`{tr['sync_command']}`")
    if tr.get("logdir"):
        lines.append(f"TensorBoard: `tensorboard --logdir {tr['logdir']}`")
    return lines


class LiveStatus:
    """with LiveStatus(console) as update: update(status_dict) redraws the view."""

    def __init__(self, con):
        self.con = con
        self.live = None

    def __enter__(self):
        from rich.live import Live
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                   TimeElapsedColumn)

        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("stages"), TimeElapsedColumn(), console=self.con)
        self.task = self.bar.add_task("starting", total=None)
        self.live = Live(self.bar, console=self.con, refresh_per_second=4, transient=False)
        self.live.__enter__()
        return self.update

    def update(self, st: dict) -> None:
        from rich.console import Group

        states: dict[str, int] = {}
        for per_kind in st["stages"].values():
            for s, n in per_kind.items():
                states[s] = states.get(s, 0) + n
        done = sum(n for s, n in states.items() if s in ENDED)
        bad = done - states.get("COMPLETED", 0)
        self.bar.update(self.task, total=st["stages_total"], completed=done,
                        description=f"{st['grid']}: {states.get('RUNNING', 0)} running"
                                    + (f", [red]{bad} failed[/]" if bad else ""))
        table = running_table(st, limit=10)
        self.live.update(Group(self.bar, table) if table is not None else self.bar)

    def __exit__(self, *exc):
        self.live.update(self.bar)   # the final view: the bar, not a stale table
        self.live.__exit__(*exc)
        if not self.con.is_interactive and not self.con.is_jupyter:
            self.con.print()   # as rich's Progress does: end the last line
        return False
