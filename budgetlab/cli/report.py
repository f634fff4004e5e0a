"""`budgetlab report`, `budgetlab recommend` and `budgetlab run`: parse, call budgetlab.Lab
(methods of the same names) and budgetlab.plot, print."""

from __future__ import annotations


import click

from budgetlab.cli.common import console, echo_json, json_option, main, pass_state
from budgetlab.errors import BadInput

cost_option = click.option(
    "--cost", "cost", metavar="sft=X,pair=Y",
    help="Re-price: the cost of one SFT example and one preference pair, in the grid's unit.")
metric_option = click.option("--metric", help="The metric to report (default: the task's primary).")


sync_option = click.option("--sync", "do_sync", is_flag=True,
                           help="Sync scheduler states and results into the ledger first.")


@main.command()
@click.argument("grid")
@metric_option
@cost_option
@click.option("--csv", "csv_path", type=click.Path(dir_okay=False), help="Write cells as CSV.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False),
              help="Write a figure (PNG): score vs budget, one line per SFT share.")
@sync_option
@json_option
@pass_state
def report(state, grid, metric, cost, csv_path, plot_path, do_sync, as_json):
    """Heatmaps budget x SFT share per method, best split per budget, spend and compute.

    GRID is the grid's spec file or its name in the ledger. The report reads the ledger as
    it is; --sync first brings in what finished since the last sync."""
    rep = state.lab().report(grid, metric=metric, cost=cost, sync=do_sync)
    if csv_path:
        from budgetlab.report import write_csv
        try:
            write_csv(rep, csv_path)
        except OSError as e:
            raise BadInput(f"--csv {csv_path}: cannot write ({e.strerror})") from None
    if plot_path:
        from budgetlab.plot import plot_report
        plot_report(rep, plot_path)
    if as_json:
        echo_json(rep.to_json())
        return
    print_report(rep)
    for label, path in (("CSV", csv_path), ("plot", plot_path)):
        if path:
            click.echo(f"{label} written to {path}")


@main.command()
@click.argument("grid")
@click.option("--budget", type=float, required=True, help="The annotation budget to advise on.")
@metric_option
@cost_option
@click.option("--epsilon", default=0.05, show_default=True, type=float,
              help="The band: candidates within (1 - epsilon) of the best mean.")
@click.option("--top", default=3, show_default=True, type=click.IntRange(1, 20),
              help="How many next runs to suggest.")
@sync_option
@json_option
@pass_state
def recommend(state, grid, budget, metric, cost, epsilon, top, do_sync, as_json):
    """The best split at a budget from the measured points, and the next runs worth paying for."""
    rec = state.lab().recommend(grid, budget, metric=metric, cost=cost, top=top, sync=do_sync,
                                epsilon=epsilon)
    for a in rec["answers"]:
        if a["warning"]:
            click.echo(f"budgetlab: warning: {a['warning']}", err=True)
    if as_json:
        echo_json(rec)
        return
    print_recommendation(rec)


@main.command()
@click.argument("grid", type=click.Path(dir_okay=False))
@click.option("--timeout", "timeout_s", type=click.FloatRange(min=0, min_open=True),
              help="Stop waiting after this many seconds (the jobs keep running).")
@click.option("--poll", "poll_s", default=1.0, show_default=True,
              type=click.FloatRange(min=0.1), help="Seconds between syncs while waiting.")
@metric_option
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False),
              help="Also write the report's figure (PNG).")
@pass_state
def run(state, grid, timeout_s, poll_s, metric, plot_path):
    """Register GRID, run it on the local executor with a progress bar, print the report.

    Exit code 1 if a stage failed (the report still shows everything that ran)."""
    from budgetlab.errors import RuntimeFailure

    err = console_err()

    def submitted(plan, res):
        err.print(f"{plan.name}: {len(plan.cells)} cells, {len(plan.stages)} stages "
                  f"({sum(len(u.stages) for u in res.units)} to run in {len(res.units)} local "
                  f"jobs); ledger {state.ledger_path}, workdir {state.workdir}")
    failure = None
    name = None
    try:
        with live_progress(err) as update:
            def progress(st):
                nonlocal name
                name = st["grid"]
                update(st)
            try:
                rep = state.lab().run(grid, timeout=timeout_s, poll=poll_s, metric=metric,
                                      on_submit=submitted, on_progress=progress)
            except RuntimeFailure as e:
                if not hasattr(e, "report"):
                    raise
                failure, rep = e, e.report
    except KeyboardInterrupt:
        who = name or grid
        click.echo(f"budgetlab: interrupted: the local jobs keep running; `budgetlab status "
                   f"{who}` follows them, `budgetlab cancel {who}` stops them", err=True)
        raise click.exceptions.Exit(130) from None
    print_report(rep)
    if plot_path:
        from budgetlab.plot import plot_report
        plot_report(rep, plot_path)
        click.echo(f"plot written to {plot_path}")
    st = rep.status
    if st["active"]:
        click.echo(f"stopped waiting after {timeout_s:g} s: {st['active']} stage(s) still "
                   f"queued or running (see `budgetlab status {rep.grid}`)", err=True)
    _print_tracking(st, err=True)
    if failure is not None:
        raise failure


def live_progress(con):
    """A context manager giving update(status_dict): a rich Live view with the progress bar
    of the grid's stages and a table of the running ones (step / total, loss, tokens/s,
    ETA)."""
    from budgetlab.cli.live import LiveStatus
    return LiveStatus(con)


def _print_tracking(st: dict, err: bool = False) -> None:
    from budgetlab.cli.live import tracking_lines
    for line in tracking_lines(st):
        click.echo(line, err=err)


def console_err():
    from rich.console import Console
    return Console(stderr=True)


# -- printing ----------------------------------------------------------------------------------
# viridis, dark to bright: a low score is dark, a high one bright.
_STOPS = [(68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37)]
_STATE_STYLE = {"NOT_RUN": "dim", "RUNNING": "yellow", "PENDING": "yellow",
                "SUBMITTING": "yellow", "PREEMPTED": "yellow", "BLOCKED": "magenta"}


def _color(x: float) -> str:
    x = min(max(x, 0.0), 1.0) * (len(_STOPS) - 1)
    i = min(int(x), len(_STOPS) - 2)
    t = x - i
    r, g, b = (round(a + (c - a) * t) for a, c in zip(_STOPS[i], _STOPS[i + 1]))
    fg = "black" if 0.299 * r + 0.587 * g + 0.114 * b > 140 else "white"
    return f"{fg} on #{r:02x}{g:02x}{b:02x}"


def _score_text(g: dict, lo: float, hi: float, best: bool):
    from rich.text import Text

    if g["score_mean"] is None:
        states = g["states"]
        word = " ".join(f"{s}" + (f"x{n}" if n > 1 and len(states) > 1 else "")
                        for s, n in states.items())
        return Text(word or "-", style=_STATE_STYLE.get(next(iter(states), ""), "bold red"))
    sd = "" if g["score_std"] is None else f"±{g['score_std']:.3f}"  # one seed: no spread
    text = Text(f"{g['score_mean']:.3f}{sd}", style=_color((g["score_mean"] - lo) /
                                                          ((hi - lo) or 1.0)))
    if best:
        text.append(" *", style="bold")
    if g["n_seeds"] < g["seeds"]:
        text.append(f" {g['n_seeds']}/{g['seeds']}", style="red")
        text.append("\n" + ", ".join(f"{n} {s}" for s, n in g["states"].items()), style="red")
    return text


def _n(x: float) -> str:
    """Compact counts for narrow cells: 750, 7.5k, 20k, 1.2M."""
    for div, suffix in ((1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.3g}{suffix}"
    return f"{x:g}"


def print_report(rep) -> None:
    from rich.table import Table
    from rich.text import Text

    con = console()
    gpu = rep.totals["gpu_hours"] > 0
    hcol = "gpu_hours" if gpu else "cpu_hours"
    hname = "GPU-h" if gpu else "CPU-h"
    costs = f"sft example {rep.costs['sft']:g}, preference pair {rep.costs['pair']:g} {rep.unit}"
    con.print(f"[bold]{rep.grid}[/]: {rep.metric} (higher is better), mean ± sd over seeds; "
              f"* = best split at that budget; costs: {costs}"
              + ("  [bold yellow](re-priced)[/]" if rep.repriced else ""))
    for b in rep.baselines:
        score = f"{b['score']:.3f}" if b["score"] is not None else b["status"]
        con.print(f"base model {b['task']} / {b['model']}: {rep.metric} {score}")
    best = {(b["task"], b["model"], b["method"], b["budget"]): {b["sft_fraction"], *b["tied"]}
            for b in rep.best}
    for task, model, method in rep.panels():
        gs = [g for g in rep.groups
              if (g["task"], g["model"], g["method"]) == (task, model, method)]
        # One colour scale per task and model, so the methods' panels compare by eye.
        means = [g["score_mean"] for g in rep.groups if (g["task"], g["model"]) == (task, model)
                 and g["score_mean"] is not None]
        lo, hi = (min(means), max(means)) if means else (0.0, 1.0)
        fracs = sorted({g["sft_fraction"] for g in gs}, reverse=True)
        budgets = sorted({g["budget"] for g in gs})
        t = Table(title=f"{task} · {model} · {method}  (budget in {rep.unit})",
                  title_justify="left", show_lines=True)
        t.add_column("budget", justify="right")
        for f in fracs:
            t.add_column(f"SFT {f:g}" + ("\nSFT only" if f == 1.0 else
                                           "\nPFT only" if f == 0.0 else ""), justify="center")
        t.add_column("spend", justify="right")
        t.add_column(f"{hname} (row)", justify="right")
        for b in budgets:
            row = [f"{b:g}"]
            row_gs = [g for g in gs if g["budget"] == b]
            for f in fracs:
                g = next((x for x in row_gs if x["sft_fraction"] == f), None)
                if g is None:
                    row.append(Text("-"))
                    continue
                cell = _score_text(g, lo, hi, f in best.get((task, model, method, b), ()))
                cell.append(f"\n{_n(g['n_sft'])}+{_n(g['n_pft'])}\n{g[hcol]:.2g}h", style="dim")
                row.append(cell)
            spends = sorted({round(g["annotation_cost"], 6) for g in row_gs})
            row.append(_n(spends[0]) if len(spends) == 1 else f"{_n(spends[0])}-{_n(spends[-1])}")
            row.append(f"{sum(g[hcol] for g in row_gs):.3g}")
            t.add_row(*row)
        con.print(t)
    con.print(Text("cell: score (± seed sd; k/N when only k of N seeds are measured); then "
                   f"SFT examples + preference pairs bought, and the {hname} of the point's "
                   "stages (a shared SFT stage counts in every cell that uses it)", style="dim"))
    _print_best(con, rep)
    from budgetlab.report import findings
    for line in findings(rep):
        con.print(f"- {line}")
    tot = rep.totals
    usd = (f" (~{tot['gpu_hours'] * tot['gpu_hour_usd']:,.2f} USD)"
           if tot["gpu_hour_usd"] and gpu else "")
    con.print(f"total: {tot['completed']}/{tot['cells']} cells measured, {tot['points']} "
              f"points; annotation spend {tot['annotation_spend']:,.10g} {rep.unit}; "
              f"{tot['gpu_hours']:.3g} GPU-hours{usd}, {tot['cpu_hours']:.3g} CPU-hours "
              f"(shared stages counted once)")
    active = sum(c["status"] in ("RUNNING", "PENDING", "SUBMITTING", "PREEMPTED")
                 for c in rep.cells)
    if active:
        con.print(f"{active} cell(s) queued or running as of the last sync "
                  f"(`budgetlab sync` or `report --sync` to refresh)", style="yellow")
    if rep.repriced:
        _print_needed(con, rep)


def _print_best(con, rep) -> None:
    """Across methods: the best measured split at each budget, per task and model."""
    from rich.table import Table

    t = Table(title="best split per budget (all methods)", title_justify="left")
    for c in ("task", "model", "budget", "method", "SFT share", "n_sft+n_pft", rep.metric,
              "tied with"):
        t.add_column(c)
    by: dict = {}
    for g in rep.groups:
        if g["score_mean"] is not None:
            by.setdefault((g["task"], g["model"], g["budget"]), []).append(g)

    def name(g):  # an SFT-only point is the same for every method
        return "sft" if g["n_pft"] == 0 else g["method"]

    for (task, model, budget), gs in sorted(by.items(), key=lambda kv: kv[0]):
        gs.sort(key=lambda g: (-g["score_mean"], -g["sft_fraction"]))
        top = gs[0]
        tied = {f"{name(g)} {g['sft_fraction']:g}" for g in gs[1:] if g["score_mean"] ==
                top["score_mean"] and (name(g), g["sft_fraction"]) != (name(top),
                                                                      top["sft_fraction"])}
        sd = "" if top["score_std"] is None else f" ± {top['score_std']:.3f}"
        t.add_row(task, model, f"{budget:g}", name(top),
                  f"{top['sft_fraction']:g}", f"{top['n_sft']}+{top['n_pft']}",
                  f"{top['score_mean']:.3f}{sd}", ", ".join(sorted(tied)))
    if by:
        con.print(t)


def _print_needed(con, rep, limit: int = 30) -> None:
    from rich.table import Table

    reused = sum(c["status"] == "COMPLETED" for c in rep.cells)
    con.print(f"re-priced: {reused} of {len(rep.cells)} cells reuse measured points; "
              f"{len(rep.needed)} points still needed "
              f"({rep.totals['stages_to_run']} stages to run, shared ones once)")
    if not rep.needed:
        return
    t = Table(title="points still needed", title_justify="left")
    for c in ("task", "model", "method", "n_sft", "n_pft", "seed", "budgets", "stages to run",
              "point_id", "status"):
        t.add_column(c)
    for n in rep.needed[:limit]:
        t.add_row(n["task"], n["model"], n["method"], str(n["n_sft"]), str(n["n_pft"]),
                  str(n["seed"]), ", ".join(f"{b:g}" for b in n["budgets"]),
                  str(n["stages_to_run"]), n["point_id"], n["status"])
    con.print(t)
    if len(rep.needed) > limit:
        con.print(f"... and {len(rep.needed) - limit} more (--json or --csv for all)")


def print_recommendation(rec: dict) -> None:
    from rich.table import Table

    con = console()
    unit = rec["unit"]
    con.print(f"[bold]{rec['grid']}[/]: advice for a budget of {rec['budget']:g} {unit} "
              f"({rec['metric']}, higher is better; costs sft {rec['costs']['sft']:g}, "
              f"pair {rec['costs']['pair']:g}{', re-priced' if rec['repriced'] else ''})")
    for a in rec["answers"]:
        con.print(f"\n[bold]{a['task']} / {a['model']}[/]  (measured budgets: "
                  f"{', '.join(f'{b:g}' for b in a['measured_budgets']) or 'none'})")
        con.print(f"method: {a['method']}")
        if a["warning"]:
            con.print(f"[bold yellow]warning:[/] {a['warning']}")
        best = a["best"]
        if best is None:
            continue
        word = {"measured": "best measured split", "interpolated": "estimated best split",
                "outside": f"best split measured at {a['at_budget']:g} (not at "
                           f"{rec['budget']:g})"}[a["kind"]]
        con.print(f"{word}: {_split(best)}  {rec['metric']} {_pm(best)}")
        if a["unmeasured"]:
            con.print(f"[yellow]compared {len(a['ranking'])} of "
                      f"{len(a['ranking']) + len(a['unmeasured'])} candidates;[/] not measured "
                      f"here: {', '.join(a['unmeasured'])} (any of them could be better)")
        con.print(f"band (within {rec['epsilon']:.0%} of the best, the points it rests on):")
        for r in a["band"]:
            pts = ", ".join(f"seed {p['seed']}"
                            + (f" @{p['budget']:g}" if p["budget"] != a["at_budget"] else "")
                            + f" {p['score']:.3f} [{p['point_id']}]" for p in r["points"])
            con.print(f"  {_split(r)}  {_pm(r)}: {pts or 'no measured point'}")
        if a["contenders"]:
            con.print("not separable from it by the seed spread: "
                      + "; ".join(f"{_split(r)} {_pm(r)}" for r in a["contenders"]))
        else:
            con.print("no other candidate overlaps it within the seed spread")
        t = Table(title="all candidates", title_justify="left")
        for c in ("method", "SFT share", "n_sft+n_pft", rec["metric"], "seeds"):
            t.add_column(c)
        for r in a["ranking"]:
            t.add_row(r["method"], f"{r['sft_fraction']:g}", f"{r['n_sft']}+{r['n_pft']}",
                      _pm(r), f"{r['n_seeds']}/{r['seeds']}")
        con.print(t)
        if a["next_runs"]:
            con.print("next runs worth paying for:")
            for i, n in enumerate(a["next_runs"], 1):
                con.print(f"  {i}. {n['method']} at SFT share {n['sft_fraction']:g}, budget "
                          f"{n['budget']:g} ({n['n_sft']} SFT + {n['n_pft']} pairs): "
                          f"{n['reason']}")


def _split(r: dict) -> str:
    return (f"{r['method']}, SFT share {r['sft_fraction']:g} "
            f"({r['n_sft']} SFT examples + {r['n_pft']} preference pairs)")


def _pm(r: dict) -> str:
    return f"{r['score']:.3f}" + (" ± ?" if r["sd"] is None else f" ± {r['sd']:.3f}")
