"""`budgetlab search`: parse, call budgetlab.Lab.search, print."""

from __future__ import annotations

import click

from budgetlab.cli.common import console, echo_json, json_option, main, pass_state


@main.command()
@click.argument("grid", type=click.Path(dir_okay=False))
@click.option("--eta", default=3, show_default=True, type=int,
              help="Keep the best 1/eta of each rung; the next rung has eta times the seeds.")
@click.option("--no-borrow", "no_borrow", is_flag=True,
              help="Plain successive halving: every budget starts from every candidate.")
@click.option("--z", "z", default=1.0, show_default=True, type=float,
              help="Band half-width in seed sds: promote only candidates whose mean + z*sd "
                   "reaches the leader's mean - z*sd (1: recommend's band); a budget with "
                   "none left is decided.")
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
def search(state, grid, eta, no_borrow, z, all_seeds, seed, executor, poll_s, timeout_s,
           as_json):
    """Find the best split per budget measuring only part of GRID.

    Successive halving over (method, SFT share) at each budget with seeds as the fidelity;
    budgets smallest first, each starting from the best of the budget below and stopping
    once no candidate is within the seed noise of the leader. Every cell it
    measures is an ordinary ledger point: `report` and `recommend` show them, and a later
    `submit` of the same grid reuses them."""
    err = None if as_json else console()

    def progress(r):
        if err is not None:
            err.print(f"round {r['round']}: {r['cells']} cell(s), {r['stages']} stage(s), "
                      f"{r['submitted']} run now" + (f", {r['failed']} failed"
                                                      if r["failed"] else ""))
    out = state.lab().search(grid, eta=eta, borrow=not no_borrow, z=z, all_seeds=all_seeds,
                             seed=seed,
                             executor=executor, poll=poll_s, timeout=timeout_s,
                             on_round=progress)
    if as_json:
        echo_json(out)
        return
    print_search(out)


def print_search(out: dict) -> None:
    from rich.table import Table

    con = console()
    s = out["strategy"]
    con.print(f"[bold]{out['grid']}[/]: {s['name']} (eta {s['eta']}, z {s['z']}, "
              f"fidelity: seeds{', all seeds for winners' if s['all_seeds'] else ''}), "
              f"{out['metric']} (higher is better)")
    t = Table(title="best split found per budget", title_justify="left")
    for c in ("task", "model", "budget", "method", "SFT share", "n_sft+n_pft", out["metric"],
              "seeds", "compared", "runner-up"):
        t.add_column(c)
    for r in out["best"]:
        sd = "" if r["score_std"] is None else f" ± {r['score_std']:.3f}"
        score = "failed" if r["score_mean"] is None else f"{r['score_mean']:.3f}{sd}"
        ups = [f for f in r["finalists"] if (f["method"], f["sft_fraction"]) !=
               (r["method"], r["sft_fraction"])]
        up = (f"{ups[0]['method']} {ups[0]['sft_fraction']:g}: "
              f"{ups[0]['score_mean']:.3f} ({ups[0]['n_seeds']} seeds)"
              if ups and ups[0]["score_mean"] is not None else "")
        t.add_row(r["task"], r["model"], f"{r['budget']:g}", r["method"],
                  f"{r['sft_fraction']:g}", f"{r['n_sft']}+{r['n_pft']}", score,
                  str(r["n_seeds"]), f"{r['candidates_measured']}/{r['candidates']}", up)
    con.print(t)
    con.print(f"measured {out['cells_measured']} of {out['cells_grid']} cells, "
              f"{out['stages_used']} of {out['stages_grid']} stages "
              f"({out['stage_fraction']:.0%}; {out['stages_reused']} already complete), "
              f"{len(out['rounds'])} rounds; {out['cpu_hours']:.3g} CPU-hours, "
              f"{out['gpu_hours']:.3g} GPU-hours")
    con.print(f"`budgetlab report {out['grid']}` shows every measured cell; "
              f"`budgetlab recommend {out['grid']} --budget B` advises from them")
