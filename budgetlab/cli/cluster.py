"""`budgetlab submit | sync | status | resubmit | cancel | logs`: thin wrappers over
budgetlab.Lab (methods of the same names); they parse and print."""

from __future__ import annotations

import time

import click

from budgetlab.cli.common import console, echo_json, json_option, main, pass_state

WATCH_MIN_S = 10.0   # --watch never asks SLURM more often than this


def _executor_option(default):
    return click.option("--executor", type=click.Choice(["local", "slurm"]), default=default,
                        show_default=bool(default),
                        help="Where jobs run: slurm (submitit arrays) or local subprocesses.")


def _print_submit(res, as_json: bool) -> None:
    d = res.as_dict()
    if as_json:
        echo_json(d)
        return
    ids = d["job_ids"]
    shown = ", ".join(ids[:6]) + (" ..." if len(ids) > 6 else "")
    click.echo(f"submitted {d['stages']} stage(s) in {d['jobs']} job(s) on {d['executor']} "
               f"({d['submissions']} submission(s)); {d['skipped']} already done or queued; "
               f"{d['blocked']} blocked" + (f"\njobs: {shown}" if ids else ""))


@main.command()
@click.argument("grid", type=click.Path(dir_okay=False))
@_executor_option("local")
@json_option
@pass_state
def submit(state, grid, executor, as_json):
    """Register GRID's cells/points/stages and submit every pending stage; returns at once."""
    _print_submit(state.lab().submit(grid, executor=executor), as_json)


@main.command()
@json_option
@pass_state
def sync(state, as_json):
    """Read scheduler states and stage results into the ledger."""
    rep = state.lab().sync()
    if as_json:
        echo_json(rep.as_dict())
        return
    click.echo(f"synced {rep.attempts} open attempt(s): {rep.changed} changed "
               f"({rep.completed} completed, {rep.failed} failed, {rep.blocked} blocked, "
               f"{rep.ready} ready again, {rep.released} released); "
               f"sacct calls: {rep.sacct_calls}")


def _status_table(st: dict):
    from rich.console import Group
    from rich.progress_bar import ProgressBar
    from rich.table import Table

    states = sorted({s for v in st["stages"].values() for s in v},
                    key=lambda s: (s != "COMPLETED", s))
    t = Table(title=f"grid {st['grid']}: stages by kind and state")
    t.add_column("kind")
    for s in states:
        t.add_column(s, justify="right")
    t.add_column("total", justify="right")
    for kind in ("sft", "dpo", "kto", "eval"):
        if kind in st["stages"]:
            v = st["stages"][kind]
            t.add_row(kind, *(str(v.get(s, "")) for s in states), str(sum(v.values())))
    s = Table(show_header=False, box=None)
    s.add_column(style="bold")
    s.add_column()
    s.add_row("points done", f"{st['points_done']} / {st['points_total']}")
    s.add_row("stages done", f"{st['stages_completed']} / {st['stages_total']} "
                             f"({st['active']} queued or running)")
    s.add_row("GPU-hours", f"{st['gpu_hours']:.3f}  (CPU-hours {st['cpu_hours']:.3f})")
    s.add_row(f"annotation spend ({st['annotation_unit']})",
              f"{st['annotation_spend_done']:,.2f} done of {st['annotation_spend']:,.2f}")
    bar = Table.grid(padding=(0, 1))
    bar.add_row(ProgressBar(total=max(1, st["stages_total"]), completed=st["stages_completed"],
                            width=50),
                f"{100 * st['stages_completed'] / max(1, st['stages_total']):.0f}% of stages")
    from budgetlab.cli.live import running_table, tracking_lines

    parts = [t, s, bar]
    running = running_table(st)
    if running is not None:
        parts.append(running)
    parts += tracking_lines(st)
    return Group(*parts)


@main.command()
@click.argument("grid", required=False)
@click.option("--watch", is_flag=True, help="Refresh (at most every 10 s) until nothing runs.")
@click.option("--interval", type=float, default=WATCH_MIN_S, show_default=True,
              help="Seconds between refreshes with --watch (10 at least).")
@click.option("--no-sync", is_flag=True, help="Show the ledger as it is, without asking SLURM.")
@json_option
@pass_state
def status(state, grid, watch, interval, no_sync, as_json):
    """Sync, then stages by kind and state, points done, GPU-hours, spend, per grid."""
    lab = state.lab()

    def snapshot():
        sts = lab.status(grid, sync=not no_sync)
        return [sts] if grid else sts

    if not watch:
        sts = snapshot()
        if as_json:
            echo_json(sts[0] if grid else sts)
        else:
            for st in sts:
                console().print(_status_table(st))
        return
    from rich.console import Group
    from rich.live import Live

    interval = max(WATCH_MIN_S, interval)
    with Live(Group(*(_status_table(s) for s in snapshot())), console=console(),
              refresh_per_second=1) as live:
        while True:
            sts = snapshot()
            live.update(Group(*(_status_table(s) for s in sts)))
            if all(s["active"] == 0 for s in sts):
                break
            time.sleep(interval)


@main.command()
@click.argument("grid", required=False)
@click.option("--state", "states", multiple=True,
              help="Outcome classes to resubmit (default FAILED NODE_FAIL MISSING TIMEOUT "
                   "OUT_OF_MEMORY CUDA_OOM); repeat or separate with commas.")
@_executor_option(None)
@click.option("--dry-run", is_flag=True, help="Show what would be resubmitted, submit nothing.")
@json_option
@pass_state
def resubmit(state, grid, states, executor, dry_run, as_json):
    """Failed stages again (with escalation) and the blocked stages below them."""
    res, notes = state.lab().resubmit(grid, states=states, executor=executor, dry_run=dry_run)
    if as_json:
        echo_json({"dry_run": dry_run, **res.as_dict(), "changes": notes})
        return
    for n in notes:
        ch = ", ".join(f"{k} {a} -> {b}" for k, (a, b) in n["changes"].items()) or "as before"
        if n.get("refused"):
            ch = n["refused"]
        click.echo(f"{n['stage_id']} {n['kind']:4} {n['outcome']:13} {ch}")
    if dry_run:
        click.echo(f"dry run: {sum(len(u.stages) for u in res.units)} stage(s) in "
                   f"{len(res.units)} job(s) would be submitted; {len(res.blocked)} stay blocked")
    else:
        _print_submit(res, False)


@main.command()
@click.argument("grid", required=False)
@click.option("--point", help="Only this point's stages.")
@json_option
@pass_state
def cancel(state, grid, point, as_json):
    """scancel queued/running work of a grid (or one point); the ledger keeps the record."""
    atts = state.lab().cancel(grid, point=point)
    if as_json:
        echo_json([{"stage_id": a.stage_id, "job_id": a.job_id} for a in atts])
        return
    click.echo(f"cancelled {len(atts)} attempt(s) in "
               f"{len({a.job_id for a in atts if a.job_id})} job(s)")


@main.command()
@click.argument("ident")
@click.option("-n", "--lines", type=int, default=40, show_default=True)
@json_option
@pass_state
def logs(state, ident, lines, as_json):
    """The log path and tail of a stage's or a point's latest attempt."""
    out = state.lab().logs(ident, lines=lines)
    if as_json:
        echo_json(out)
        return
    click.echo(f"# stage {out['stage_id']} attempt {out['attempt_id']} job {out['job_id']} "
               f"({out['outcome']}): {out['path']}" + ("" if out["exists"] else " (not written yet)"))
    if out["tail"]:
        click.echo(out["tail"])
