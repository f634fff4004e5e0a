"""`budgetlab search`: parse, call budgetlab.Lab.search, print."""

from __future__ import annotations

import click

from budgetlab.cli.common import console, echo_json, json_option, main, pass_state


@main.command()
@click.argument("grid", type=click.Path(dir_okay=False))
@click.option("--epsilon", default=0.05, show_default=True, type=float,
              help="The near-optimal band: splits within (1 - epsilon) of the best.")
@click.option("--max-gpu-hours", "max_gpu_hours", type=float, default=None,
              help="Stop submitting once the search has used this much compute (GPU-hours; "
                   "CPU-hours where no GPU was used).")
@click.option("--transfer-from", "transfer_from", type=click.Path(dir_okay=False),
              default=None, help="A small model's grid, measured in this ledger: its bands are "
                                 "the prior, GRID gets only the points that confirm them.")
@click.option("--eta", default=3, show_default=True, type=int,
              help="Keep the best 1/eta of each rung; the next rung has eta times the seeds.")
@click.option("--no-borrow", "no_borrow", is_flag=True,
              help="Plain successive halving: every budget starts from every candidate.")
@click.option("--z", "z", default=0.5, show_default=True, type=float,
              help="The seed noise, in seed sds: a candidate gets more seeds only while its "
                   "mean + z*sd, less epsilon of itself, reaches the leader's mean - z*sd; a "
                   "budget with none left is separated.")
@click.option("--all-seeds", "all_seeds", is_flag=True,
              help="Measure each budget's winner with every seed, even when it is clear.")
@click.option("--seed", "seed", type=int, default=None,
              help="Shuffle the order in which the grid's seeds are used (default: grid order).")
@click.option("--executor", type=click.Choice(["local", "slurm"]), default="local",
              show_default=True, help="Where each round's stages run.")
@click.option("--poll", "poll_s", default=1.0, show_default=True,
              type=click.FloatRange(min=0.1), help="Seconds between syncs while waiting.")
@click.option("--timeout", "timeout_s", type=click.FloatRange(min=0, min_open=True),
              help="Give up after this many seconds (running stages keep running).")
@json_option
@pass_state
def search(state, grid, epsilon, max_gpu_hours, transfer_from, eta, no_borrow, z, all_seeds,
           seed, executor, poll_s, timeout_s, as_json):
    """Find the best split per budget, and its epsilon-band, measuring only part of GRID.

    Successive halving over (method, SFT share) at each budget with seeds as the fidelity;
    budgets smallest first, each starting from the best of the budget below. A budget is
    done when no other candidate could, within the seed noise, beat its leader by more than
    epsilon; the search stops then, when the finalists have every seed, or at
    --max-gpu-hours, and says which. Every cell it measures is an ordinary ledger point:
    `report` and `recommend` show them, and a later `submit` of the same grid reuses them."""
    err = None if as_json else console()

    def progress(r):
        if err is not None:
            err.print(f"round {r['round']}: {r['cells']} cell(s), {r['stages']} stage(s), "
                      f"{r['submitted']} run now" + (f", {r['failed']} failed"
                                                      if r["failed"] else ""))
    out = state.lab().search(grid, eta=eta, borrow=not no_borrow, z=z, all_seeds=all_seeds,
                             seed=seed, epsilon=epsilon, max_gpu_hours=max_gpu_hours,
                             transfer_from=transfer_from,
                             executor=executor, poll=poll_s, timeout=timeout_s,
                             on_round=progress)
    if as_json:
        echo_json(out)
        return
    print_search(out)


def _split(e: dict) -> str:
    return "SFT only" if e["sft_fraction"] == 1.0 else f"{e['method']} {e['sft_fraction']:g}"


def _score(e: dict) -> str:
    if e["score_mean"] is None:
        return "failed"
    sd = "" if e["score_std"] is None else f" ± {e['score_std']:.3f}"
    return f"{e['score_mean']:.3f}{sd} ({e['n_seeds']})"


def print_search(out: dict) -> None:
    from rich.table import Table

    con = console()
    s = out["strategy"]
    con.print(f"[bold]{out['grid']}[/]: {s['name']} (eta {s['eta']}, z {s['z']}, epsilon "
              f"{out['epsilon']:g}, fidelity: seeds{', all seeds for winners' if s['all_seeds'] else ''}), "
              f"{out['metric']} (higher is better)")
    tr = "transfer" in out
    t = Table(title="best split and epsilon-band per budget (mean ± sd (seeds))",
              title_justify="left")
    cols = ["task", "model", "budget", "best", "n_sft+n_pft", out["metric"], "band", "compared",
            "stopped"] + (["prior"] if tr else [])
    for c in cols:
        t.add_column(c)
    for r in out["answers"]:
        b = r["best"]
        others = [e for e in r["band"] if (e["method"], e["sft_fraction"]) !=
                  (b["method"], b["sft_fraction"])]
        row = [r["task"], r["model"], f"{r['budget']:g}", _split(b),
               f"{b['n_sft']}+{b['n_pft']}", _score(b),
               "; ".join(f"{_split(e)} {_score(e)}" for e in others) or "-",
               f"{r['candidates_measured']}/{r['candidates']}", r["stopped"]]
        if tr:
            p = (r.get("transfer") or {})
            row.append("-" if not p.get("prior") else
                       f"{_split({**p['prior'], 'method': p['prior']['method']})}: "
                       + ("confirmed" if p["confirmed"] else "not confirmed, searched")
                       + f" ({p['confirmation_points']} pts)")
        t.add_row(*row)
    con.print(t)
    unit = out["compute_unit"].replace("_", "-")
    con.print(f"measured {out['cells_measured']} of {out['cells_grid']} cells, "
              f"{out['stages_used']} of {out['stages_grid']} stages "
              f"({out['stage_fraction']:.0%}; {out['stages_reused']} already complete), "
              f"{len(out['rounds'])} rounds; {out['compute_used']:.3g} of the full grid's "
              f"~{out['compute_full_grid']:.3g} {unit} ({out['compute_full_grid_how']})")
    if tr:
        x = out["transfer"]
        con.print(f"transfer from {x['from']}: {x['confirmation_points']} confirmation "
                  f"point(s) at {x['budgets']} budget(s); {x['confirmed']} confirmed, "
                  f"{x['not_confirmed']} not (searched), {x['without_prior']} without a prior")
    con.print(f"stopped: {out['stopped']}")
    con.print(f"`budgetlab report {out['grid']}` shows every measured cell; "
              f"`budgetlab recommend {out['grid']} --budget B` gives the band with its points")
