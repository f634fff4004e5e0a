"""`budgetlab plan` and `budgetlab ledger ...`."""

from __future__ import annotations

import dataclasses
import json

import click

from budgetlab.cli.common import console, echo_json, json_option, main, pass_state


@main.command()
@click.argument("grid", type=click.Path(dir_okay=False))
@json_option
@pass_state
def plan(state, grid, as_json):
    """Points, unique stages, shared SFT, annotation spend, GPU-hours. Writes nothing."""
    summary = state.lab().plan(grid)
    if as_json:
        echo_json(summary)
        return
    from rich.table import Table

    t = Table(title=f"plan: {summary['grid']}", show_header=False)
    t.add_column(style="bold")
    t.add_column(justify="right")
    st = summary["stages"]
    t.add_row("cells (grid view)", str(summary["cells"]))
    t.add_row("points (unique runs)", str(summary["points"]))
    t.add_row("base-model evaluations", str(summary["baseline_points"]))
    t.add_row("stages", f"{summary['stages_total']}  (sft {st['sft']}, dpo {st['dpo']}, "
                        f"kto {st['kto']}, eval {st['eval']})")
    t.add_row("SFT trainings", f"{st['sft']} shared vs "
                               f"{summary['sft_trainings_without_sharing']} run per point")
    unit = summary["annotation_unit"]
    t.add_row(f"annotation spend, all cells ({unit})", f"{summary['annotation_spend']:,.2f}")
    t.add_row(f"annotation needed, nested pools ({unit})", f"{summary['annotation_needed']:,.2f}")
    gh = f"{summary['gpu_hours_estimate']:,.1f}"
    if summary["gpu_hours_unknown_models"]:
        gh += f" (+ unknown for {', '.join(summary['gpu_hours_unknown_models'])})"
    t.add_row("GPU-hours (rough estimate)", gh)
    if summary["compute_usd_estimate"] is not None:
        t.add_row("compute (USD, estimate)", f"{summary['compute_usd_estimate']:,.2f}")
    console().print(t)


@main.group()
def ledger():
    """Read the ledger: points, stages, attempts, spend, or read-only SQL."""


def _print_rows(rows: list[dict], as_json: bool, title: str, columns: list[str]) -> None:
    if as_json:
        echo_json(rows)
        return
    from rich.table import Table

    t = Table(title=f"{title} ({len(rows)})")
    for c in columns:
        t.add_column(c)
    for r in rows:
        t.add_row(*("" if r.get(c) is None else _fmt(r.get(c)) for c in columns))
    console().print(t)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (dict, list)):
        return json.dumps(v, sort_keys=True)
    return str(v)


@ledger.command("points")
@click.option("--grid", help="Only the points of this grid.")
@json_option
@pass_state
def ledger_points(state, grid, as_json):
    """Points with the state of each of their stages."""
    rows = state.lab().points(grid)
    _print_rows(rows, as_json, "points", ["point_id", "task", "model", "method", "n_sft",
                                          "n_pft", "seed", "sft_state", "pft_state",
                                          "eval_state"])


@ledger.command("stages")
@click.option("--grid", help="Only the stages of this grid.")
@click.option("--state", "states", multiple=True, help="Only stages in this state.")
@json_option
@pass_state
def ledger_stages(state, grid, states, as_json):
    """Stages with their state, size and tokens."""
    rows = [dataclasses.asdict(s) for s in state.lab().stages(grid, states=states or None)]
    if not as_json:
        for r in rows:
            r.pop("result", None)
    _print_rows(rows, as_json, "stages", ["stage_id", "kind", "task", "model", "parent_id",
                                          "n", "seed", "state", "tokens", "error"])


@ledger.command("attempts")
@click.option("--stage", "stage_id", help="Only the attempts of this stage.")
@json_option
@pass_state
def ledger_attempts(state, stage_id, as_json):
    """Every try of every stage: job, times, outcome, GPU-seconds."""
    rows = [a.as_dict() for a in state.lab().attempts(stage_id)]
    _print_rows(rows, as_json, "attempts", ["attempt_id", "stage_id", "executor", "job_id",
                                            "raw_state", "outcome", "exit_code", "nodes",
                                            "gpu_seconds", "cpu_seconds", "tokens", "error"])


@ledger.command("spend")
@click.option("--grid", help="Only this grid.")
@json_option
@pass_state
def ledger_spend(state, grid, as_json):
    """Annotation spend and compute per grid and method."""
    rows = state.lab().spend(grid)
    _print_rows(rows, as_json, "spend", ["grid", "task", "method", "cells", "unit",
                                         "annotation_cost", "gpu_hours", "cpu_hours",
                                         "compute_usd"])


@ledger.command("sql")
@click.argument("query")
@json_option
@pass_state
def ledger_sql(state, query, as_json):
    """Run one read-only SELECT (writes, ATTACH and writable PRAGMAs are refused)."""
    from budgetlab.ledger import query_readonly

    cols, rows = query_readonly(state.ledger_path, query)   # the columns even with no row
    _print_rows([dict(zip(cols, r)) for r in rows], as_json, "rows", cols)


@ledger.command("metadata")
@pass_state
def ledger_metadata(state):
    """Datasette metadata for this ledger's tables and columns (JSON on stdout):
    `budgetlab ledger metadata > meta.json && datasette ledger.db --metadata meta.json`."""
    echo_json(state.lab().metadata())
