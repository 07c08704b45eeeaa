"""The figures of the grid (accuracy vs samples, paired differences vs the frozen client, bytes per client, client
memory) and `write_plots`, which renders every figure, the client-update frontier included."""

from __future__ import annotations

import math
import os
from collections import defaultdict

import numpy as np
from grid import cell_depth

from .frontier import plot_client_frontier
from .layout import LABELS, METHODS, REFERENCE
from .stats import BLOCK_ROUNDS
from .style import STYLE, _pyplot, method_legend, method_line, missing_note, panels
from .summary import load_cells


def plot_accuracy(cells: list[dict], zero_shot_curve: dict):
    """Validation accuracy (curve subset) vs processed samples, one panel per (task, depth); returns the figure.

    Each panel draws only the methods with cells there, in their fixed style, as the mean over their seeds; the
    methods without cells are named in a note, and methods with fewer seeds than the panel's most are noted too.
    """
    plt = _pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(12, 10))
    drawn: set[str] = set()
    for ax, (task, depth) in zip(axes.flat, panels()):
        zero = zero_shot_curve.get(task)  # same subset as the curve points
        missing, seeds, same = [], {}, defaultdict(list)
        for m in METHODS:
            runs = [c for c in cells if (c["method"], c["task"], c["depth"]) == (m, task, cell_depth(m, depth))]
            if not runs:
                missing.append(m)
                continue
            curve = defaultdict(list)
            for c in runs:
                for point in c["curve"]:
                    curve[point["samples"]].append(point["accuracy"])
            xs = sorted(curve)
            ys = [100 * np.mean(curve[x]) for x in xs]
            if zero is not None:
                xs, ys = [0] + xs, [100 * zero] + ys
            ax.plot(xs, ys, label=LABELS[m], markersize=STYLE[m]["size"], alpha=0.85, **method_line(m))
            drawn.add(m)
            seeds[m] = len({c["seed"] for c in runs})
            same[(tuple(xs), tuple(np.round(ys, 6)))].append(m)
        most = max(seeds.values(), default=0)
        notes = []
        fewer = ", ".join(f"{LABELS[m]} n={n}" for m, n in seeds.items() if n < most)
        if fewer:
            notes.append(f"fewer seeds than n={most}: {fewer}")
        groups = [" = ".join(LABELS[m] for m in group) for group in same.values() if len(group) > 1]
        if groups:
            notes.append("identical curves (drawn on top of each other): " + "; ".join(groups))
        missing_note(ax, missing, "\n".join(notes), y=-0.14)
        ax.set_title(f"{task.upper()}, {depth} split")
        ax.set_xlabel("processed training samples")
        ax.set_ylabel("validation accuracy (%), curve subset")
        ax.grid(alpha=0.3)
    fig.suptitle("Validation accuracy on the curve subset vs processed samples (mean over seeds; 0: zero-shot)")
    method_legend(fig, sorted(drawn))
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    return fig


def plot_paired(summary: dict):
    """Mean paired training-loss difference of each method vs the frozen client with ±1 SE error bars, per panel.

    The bars are the SE over seeds; a method with one seed gets the moving-block bootstrap SE over rounds instead and
    an open marker. The y axis is symmetric-log (linear within ±1e-4) because the differences span four decades.
    """
    plt = _pyplot()
    vs_frozen = summary["vs_frozen_client"]
    fig, axes = plt.subplots(2, 2, figsize=(12, 10))
    drawn: set[str] = set()
    others = [m for m in METHODS if m != REFERENCE]
    # One symmetric y range for every panel, so that the panels compare at a glance.
    reach = [
        abs(p["mean_loss_difference"]) + (p["standard_error_seeds"] or p["standard_error_block_bootstrap"] or 0)
        for p in vs_frozen.values()
    ]
    limit = 10 ** math.ceil(math.log10(max(reach, default=1e-3) * 3))
    for ax, (task, depth) in zip(axes.flat, panels()):
        methods = summary["methods"]
        has_reference = depth in methods[REFERENCE][task]["by_depth"]
        missing, unpaired = [], []
        for x, m in enumerate(others):
            p = vs_frozen.get(f"{m}_{task}_{depth}")
            if p is None:
                (unpaired if depth in methods[m][task]["by_depth"] else missing).append(m)
                continue
            se = p["standard_error_seeds"]
            one_seed = se is None
            if one_seed:
                se = p["standard_error_block_bootstrap"]
            style = method_line(m) | {"linestyle": "none"}
            y = p["mean_loss_difference"]
            ax.errorbar([x], [y], yerr=[se or 0.0], fmt="none", ecolor=style["color"], capsize=4, label="_nolegend_")
            ax.plot(
                [x],
                [y],
                label=LABELS[m],
                markersize=STYLE[m]["size"] + 2,
                markerfacecolor="white" if one_seed else style["color"],
                **style,
            )
            n = len(p["seeds"])
            text = f"{y:+.1e}\n±{se:.0e} (n={n})" if se else f"{y:+.1e} (n={n})"
            ax.annotate(text, (x, y), textcoords="offset points", xytext=(0, 10), ha="center", fontsize=6)
            drawn.add(m)
        if not has_reference:
            missing.append(REFERENCE)
            extra = f"no {LABELS[REFERENCE]} cells: nothing to pair with"
        else:
            extra = (
                ("no seed shared with the frozen client: " + ", ".join(LABELS[m] for m in unpaired))
                if unpaired
                else ""
            )
        missing_note(ax, missing, extra, y=-0.3)
        ax.axhline(0.0, color="0.3", linewidth=0.8)
        ax.set_yscale("symlog", linthresh=1e-4)
        ax.set_ylim(-limit, limit)
        ax.set_xticks(range(len(others)), [LABELS[m] for m in others], rotation=30, ha="right", fontsize=7)
        ax.set_xlim(-0.6, len(others) - 0.4)
        ax.set_title(f"{task.upper()}, {depth} split: training loss − frozen client")
        ax.set_ylabel("mean paired Δ training loss per round")
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle(
        "Paired training-loss difference against the frozen client (same batches per seed; below 0: lower loss)"
    )
    method_legend(fig, sorted(drawn), lines=False, bbox_to_anchor=(0.5, 0.02))
    fig.text(
        0.5,
        0.005,
        "error bars: ±1 SE over seeds (filled markers); open markers: one seed, ±1 SE of a moving-block bootstrap "
        f"over rounds ({BLOCK_ROUNDS}-round blocks)",
        ha="center",
        fontsize=8,
    )
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    return fig


def plot_bytes(summary: dict):
    """Cumulative bytes per client slot, SST-2 at the headline split: one bar pair per method in its fixed colour."""
    plt = _pyplot()
    from matplotlib.patches import Patch

    fig, ax = plt.subplots(figsize=(10, 4.8))
    names, act, syn, colours = [], [], [], []
    for m in METHODS:
        e = summary["methods"][m]["sst2"]
        if e["activation_bytes_per_client_round"] is None:
            continue
        rounds = (e["samples"] or 0) / 24 if e["samples"] else 1
        names.append(LABELS[m])
        colours.append(STYLE[m]["color"])
        act.append(max(e["activation_bytes_per_client_round"] * rounds, 1))
        syn.append(max(e["sync_bytes_per_client_round"] * rounds, 1))
    x = np.arange(len(names))
    ax.bar(x - 0.2, act, 0.4, color=colours, edgecolor="black")
    ax.bar(x + 0.2, syn, 0.4, color=colours, edgecolor="black", hatch="///")
    ax.set_yscale("log")
    ax.set_ylim(0.5, max([*act, *syn, 1]) * 1e3)  # room for the legend above the bars
    ax.set_ylabel("cumulative bytes per client slot (all rounds)")
    ax.set_title("SST-2 communication, headline split (bars at 1 byte: nothing sent)")
    ax.set_xticks(x, names, rotation=20)
    ax.legend(
        loc="upper center",
        ncol=2,
        handles=[
            Patch(facecolor="white", edgecolor="black", label="activations + lambda + labels"),
            Patch(facecolor="white", edgecolor="black", hatch="///", label="model sync (seeds + scalars, or weights)"),
        ],
    )
    fig.tight_layout()
    return fig


def plot_memory(memory: dict):
    """Client peak memory of one step; inference rows in the frozen client's colour (it only runs inference)."""
    plt = _pyplot()
    from matplotlib.patches import Patch

    rows = memory["memory"]
    mode_method = {"inference": REFERENCE, "hosfl": "hosfl", "splitlora": "splitlora"}
    fig, ax = plt.subplots(figsize=(10, 4.8))
    ax.bar(
        range(len(rows)),
        [r["peak_bytes"] / 2**20 for r in rows],
        color=[STYLE[mode_method[r["mode"]]]["color"] for r in rows],
    )
    ax.set_xticks(range(len(rows)), [f"split {r['split_layer']}\n{r['shape']}\n{r['mode']}" for r in rows], fontsize=7)
    ax.set_ylabel("client peak RSS (MiB)")
    ax.set_title("Client peak memory of one step")
    modes = [mode for mode in mode_method if any(r["mode"] == mode for r in rows)]
    ax.legend(
        handles=[
            Patch(
                color=STYLE[mode_method[mode]]["color"], label=f"{mode}: the {LABELS[mode_method[mode]]} client step"
            )
            for mode in modes
        ]
    )
    fig.tight_layout()
    return fig


def write_plots(summary: dict, out: str) -> list[str]:
    """Renders every figure from the cells under `out` and the summary; returns the files written."""
    plt = _pyplot()
    figures = {
        "accuracy_vs_samples.png": plot_accuracy(load_cells(out), summary["zero_shot_curve_subset"]),
        "paired_vs_frozen_client.png": plot_paired(summary),
        "bytes_per_client.png": plot_bytes(summary),
    }
    if summary["memory"]:
        figures["client_memory.png"] = plot_memory(summary["memory"])
    if summary.get("client_contribution"):
        figures["client_update_frontier.png"] = plot_client_frontier(summary["client_contribution"])
    written = []
    for name, fig in figures.items():
        fig.savefig(os.path.join(out, name), dpi=110)
        plt.close(fig)
        written.append(os.path.join(out, name))
    return written
