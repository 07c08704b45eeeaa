"""Runs the whole benchmark with one command and writes everything under `--out` (default `docs/results`).

    python benchmarks/run.py                 # CPU budget: accuracy grid (resumable), memory, timing, cosine, report
    python benchmarks/run.py --smoke         # a tiny budget of every stage, for tests
    python benchmarks/run.py --grid --rounds 8889 --batch 32   # extra flags go to benchmarks/grid.py

Stages: `grid.py` (accuracy cells, one JSON each, skipped when present), `memory.py` (client peak memory per step
in fresh subprocesses, round time interleaved), `perturbation_memory.py` (probe memory of a full-parameter
client, swapped vs copied perturbations), `cosine.py` (ZO estimate vs true client gradient), `report.py`
(benchmark.json, benchmark.md, plots). Stages whose output exists are skipped unless `--force`.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import cosine  # noqa: E402
import grid  # noqa: E402
import memory  # noqa: E402
import perturbation_memory  # noqa: E402
import report  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="docs/results")
    parser.add_argument("--smoke", action="store_true", help="Tiny budget of every stage.")
    parser.add_argument("--force", action="store_true", help="Re-run memory and cosine even if their files exist.")
    args, grid_args = parser.parse_known_args(argv)
    command = "python benchmarks/run.py " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.smoke:
        grid_args = [
            "--methods",
            "hosfl",
            "splitlora",
            "--tasks",
            "sst2",
            "--depths",
            "deep",
            "--seeds",
            "0",
            "--rounds",
            "2",
            "--eval_points",
            "1",
            "--curve_eval_limit",
            "8",
            "--eval_limit",
            "16",
            *grid_args,
        ]
    grid.main(["--out", args.out, *grid_args])
    if args.force or not os.path.isfile(os.path.join(args.out, "memory.json")):
        extra = ["--splits", "20", "--shapes", "train", "--skip_timing"] if args.smoke else []
        memory.main(["--out", args.out, *extra])
    if args.force or not os.path.isfile(os.path.join(args.out, "perturbation_memory.json")):
        extra = ["--split", "2", "--batch", "2", "--length", "8"] if args.smoke else []
        perturbation_memory.main(["--out", args.out, *extra])
    if args.force or not os.path.isfile(os.path.join(args.out, "cosine.json")):
        cosine.main(["--out", args.out, *(["--directions", "2"] if args.smoke else [])])
    report.main(["--out", args.out, "--command", command])


if __name__ == "__main__":
    main()
