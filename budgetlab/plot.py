"""The paper's figure for a report: score against budget on a log axis, one line per SFT
fraction, one panel per method (a row of panels per task and model). matplotlib is imported
here only, so reports without --plot never load it."""

from __future__ import annotations

import os

from budgetlab.errors import BadInput
from budgetlab.report import Report


def plot_report(rep: Report, path: str | os.PathLike, dpi: int = 120) -> None:
    """Write a PNG (or any format matplotlib knows from the suffix) of the report."""
    try:
        import matplotlib
    except ImportError:
        raise BadInput("--plot needs matplotlib: pip install 'budgetlab[plot]'") from None
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    rows = list(dict.fromkeys((t, m) for t, m, _ in rep.panels()))
    methods = list(dict.fromkeys(meth for _, _, meth in rep.panels()))
    if not rows:
        raise BadInput(f"grid {rep.grid!r}: no cells to plot")
    fractions = sorted({g["sft_fraction"] for g in rep.groups}, reverse=True)
    colors = plt.get_cmap("viridis")
    fig, axes = plt.subplots(len(rows), len(methods), squeeze=False, sharey="row",
                             figsize=(max(4.2 * len(methods), 5.5) + 1.8, 3.6 * len(rows)))
    for i, (task, model) in enumerate(rows):
        base = next((b for b in rep.baselines if (b["task"], b["model"]) == (task, model)
                     and b["score"] is not None), None)
        for j, method in enumerate(methods):
            ax = axes[i][j]
            for k, frac in enumerate(fractions):
                gs = sorted((g for g in rep.groups if (g["task"], g["model"], g["method"],
                             g["sft_fraction"]) == (task, model, method, frac)
                             and g["score_mean"] is not None), key=lambda g: g["budget"])
                if not gs:
                    continue
                color = colors(k / max(len(fractions) - 1, 1))
                ax.errorbar([g["budget"] for g in gs], [g["score_mean"] for g in gs],
                            yerr=[g["score_std"] or 0.0 for g in gs], color=color,
                            marker="o", ms=4, capsize=3, label=_label(frac))
            if base is not None:
                ax.axhline(base["score"], color="grey", ls="--", lw=1, label="base model")
            ax.set_xscale("log")
            # Ticks at the measured budgets, written out (log-axis minor labels collide).
            budgets = sorted({g["budget"] for g in rep.groups})
            ax.set_xticks(budgets, [f"{b:g}" for b in budgets])
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            ax.set_title(f"{task} · {method}" + (f"\n{model}" if len(rows) > 1 else ""),
                         fontsize=10)
            ax.set_xlabel(f"annotation budget ({rep.unit})")
            if j == 0:
                ax.set_ylabel(rep.metric)
            ax.grid(True, which="both", alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    for ax in axes.flat:  # the union of legend entries across panels, in order
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    fig.legend(handles, labels, loc="center right", title="SFT share", fontsize=8)
    cost = f"sft {rep.costs['sft']:g}, pair {rep.costs['pair']:g}"
    fig.suptitle(f"{rep.grid}: {rep.metric}, mean ± sd over seeds\n(costs {cost}"
                 f"{', re-priced' if rep.repriced else ''})", fontsize=10)
    width = fig.get_size_inches()[0]
    fig.tight_layout(rect=(0, 0, 1 - 1.7 / width, 0.9))
    try:
        fig.savefig(path, dpi=dpi)
    except (OSError, ValueError) as e:
        raise BadInput(f"--plot {path}: cannot write ({e})") from None
    finally:
        plt.close(fig)


def _label(frac: float) -> str:
    if frac == 1.0:
        return "1.0 (SFT only)"
    if frac == 0.0:
        return "0.0 (PFT only)"
    return f"{frac:g}"
