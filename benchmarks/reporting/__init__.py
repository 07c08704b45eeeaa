"""The benchmark report's code, behind `benchmarks/report.py` (the command, and the module the benchmarks import):

- `layout`: the methods (the algorithm registry's order) and their labels; the tasks, depths and seeds of the grid;
- `stats`: McNemar tests, paired training-loss differences, standard errors over seeds and the moving-block bootstrap;
- `summary`: the cells, memory/timing and cosine files read into the summary dict (`summarize`);
- `studies`: the client-update studies' files as the summary's `client_contribution`;
- `markdown`: `benchmark.md` (`write_markdown`);
- `style`, `plots`, `frontier`: the figures (`write_plots`), one fixed colour and marker per method.

It imports `grid` as a top-level module, like every benchmark: `benchmarks/` must be on `sys.path`.
"""

from .frontier import FRONTIER_MARKERS, FRONTIER_YLIM, LR_COLORS, frontier_points, plot_client_frontier
from .layout import DEPTHS, LABELS, METHODS, REFERENCE, SEEDS, TASKS
from .markdown import fmt_acc, write_markdown
from .plots import plot_accuracy, plot_bytes, plot_memory, plot_paired, write_plots
from .stats import (
    BLOCK_ROUNDS,
    block_bootstrap_se,
    mcnemar_exact_p,
    mcnemar_p,
    mcnemar_tests,
    paired_losses,
    standard_error_over_seeds,
)
from .studies import client_contribution, study_settings
from .style import STYLE, method_legend, method_line, missing_note, panels
from .summary import CLIENT_MEMORY_MODE, HEADLINE_DEPTH, load_cells, summarize

__all__ = [
    "BLOCK_ROUNDS",
    "CLIENT_MEMORY_MODE",
    "DEPTHS",
    "FRONTIER_MARKERS",
    "FRONTIER_YLIM",
    "HEADLINE_DEPTH",
    "LABELS",
    "LR_COLORS",
    "METHODS",
    "REFERENCE",
    "SEEDS",
    "STYLE",
    "TASKS",
    "block_bootstrap_se",
    "client_contribution",
    "fmt_acc",
    "frontier_points",
    "load_cells",
    "mcnemar_exact_p",
    "mcnemar_p",
    "mcnemar_tests",
    "method_legend",
    "method_line",
    "missing_note",
    "paired_losses",
    "panels",
    "plot_accuracy",
    "plot_bytes",
    "plot_client_frontier",
    "plot_memory",
    "plot_paired",
    "standard_error_over_seeds",
    "study_settings",
    "summarize",
    "write_markdown",
    "write_plots",
]
