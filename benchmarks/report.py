"""Aggregates the grid cells, memory/timing and cosine measurements into JSON, Markdown and plots.

    python benchmarks/report.py --out docs/results

Writes `benchmark.json` (machine-readable summary), `benchmark.md` (tables, paired tests, missing cells) and
`accuracy_vs_samples.png`, `paired_vs_frozen_client.png`, `bytes_per_client.png`, `client_memory.png` and, from the
client-update studies, `client_update_frontier.png`. Every method has one colour and marker (`STYLE`) in every
figure; a method without cells in a panel is named in a note there, never drawn. Paired training-loss differences get
standard errors over seeds and from a moving-block bootstrap over rounds, never ones that treat rounds as
independent.
"""

# The code lives in the package `benchmarks/reporting/` (statistics, summary, Markdown tables, figures); this file is
# the command and the module the other benchmarks and the tests import (`import report`), re-exporting the package.

from __future__ import annotations

import argparse
import json
import os

from reporting import *  # noqa: F403 (the report's public names, as `report.<name>`)
from reporting import __all__ as __all__
from reporting import summarize, write_markdown, write_plots


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="docs/results")
    parser.add_argument("--command", default="python benchmarks/run.py")
    args = parser.parse_args(argv)
    summary = summarize(args.out, args.command)
    with open(os.path.join(args.out, "benchmark.json"), "w") as f:
        json.dump(summary, f, indent=1)
    write_markdown(summary, args.out)
    write_plots(summary, args.out)
    print(f"wrote {args.out}/benchmark.json, benchmark.md and plots ({len(summary['cells'])} cells)")


if __name__ == "__main__":
    main()
