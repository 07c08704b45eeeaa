"""What every figure shares: one fixed colour and marker per method (`STYLE`), the figure-level legend built from it,
the note naming the methods a panel lacks, and the (task, depth) panels."""

from __future__ import annotations

import textwrap

from .layout import DEPTHS, LABELS, METHODS, TASKS

# One fixed colour (matplotlib's tab10) and marker per method, used by every figure; never the axes' colour cycle,
# which shifts every later colour when a panel lacks a method. No-split methods are dashed.
STYLE = {
    "hosfl": {"color": "#1f77b4", "marker": "o", "size": 7, "linestyle": "-"},
    "splitlora": {"color": "#ff7f0e", "marker": "s", "size": 6, "linestyle": "-"},
    "zo_sfl": {"color": "#2ca02c", "marker": "^", "size": 7, "linestyle": "-"},
    "fedavg_lora": {"color": "#d62728", "marker": "D", "size": 5, "linestyle": "--"},
    "centralized": {"color": "#9467bd", "marker": "v", "size": 7, "linestyle": "--"},
    "mezo": {"color": "#8c564b", "marker": "P", "size": 7, "linestyle": "--"},
    "frozen_client": {"color": "#7f7f7f", "marker": "X", "size": 6, "linestyle": "-"},
    "client_only": {"color": "#e377c2", "marker": "*", "size": 9, "linestyle": "-"},
}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def method_line(method: str) -> dict:
    """The fixed style of a method, for `ax.plot` (and a legend handle): same colour and marker in every figure."""
    return {
        "color": STYLE[method]["color"],
        "marker": STYLE[method]["marker"],
        "linestyle": STYLE[method]["linestyle"],
    }


def method_legend(fig, methods: list[str], lines: bool = True, **kwargs) -> None:
    """One figure-level legend built from the fixed mapping, over the methods drawn in at least one panel.

    Each panel draws only its own methods, so the legend is true for every panel: a method's colour and marker mean
    the same method wherever they appear. `lines=False` for figures of markers only.
    """
    from matplotlib.lines import Line2D

    handles = [
        Line2D([], [], label=LABELS[m], **(method_line(m) | ({} if lines else {"linestyle": "none"})))
        for m in METHODS
        if m in methods
    ]
    if handles:
        fig.legend(handles=handles, loc="lower center", ncol=4, **kwargs)


def missing_note(ax, missing: list[str], extra: str = "", y: float = -0.13) -> None:
    """A note under the panel naming the methods that have no cells there (drawn as nothing, never as a line).

    The first line names the missing methods (one line, at most the seven other methods); `extra` adds further lines
    (fewer seeds, overlapping curves). The note's gid is `missing-note` when it names missing methods, else `note`.
    """
    lines = ["no cells: " + ", ".join(LABELS[m] for m in missing)] if missing else []  # always the first line
    text = "\n".join(lines + [textwrap.fill(t, 100) for t in extra.split("\n") if t])
    if text:
        ax.text(
            0.5,
            y,
            text,
            transform=ax.transAxes,
            ha="center",
            va="top",
            fontsize=7,
            bbox={"boxstyle": "round", "facecolor": "#fff6e0" if missing else "white", "edgecolor": "0.6"},
            gid="missing-note" if missing else "note",
        )


def panels() -> list[tuple[str, str]]:
    return [(t, d) for t in TASKS for d in DEPTHS]
