"""The benchmark harness's bookkeeping (no model): cell planning, worker locks, and how the report reads cells."""

import json
import os
import subprocess
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))

import grid  # noqa: E402
import report  # noqa: E402


def test_plan_runs_no_split_methods_once_per_task_and_seed():
    cells = grid.plan_cells(["hosfl", "mezo", "centralized"], ["sst2"], ["deep", "shallow"], [0, 1])
    names = [grid.cell_name(*c) for c in cells]
    assert len(names) == len(set(names)) == 2 * 2 + 2 * 2  # hosfl x depth x seed + (mezo, centralized) x seed
    assert "mezo_sst2_nosplit_s0" in names and "hosfl_sst2_shallow_s1" in names
    # Headline methods of the deep split come before the rest, and deep before shallow.
    assert names.index("hosfl_sst2_deep_s1") < names.index("mezo_sst2_nosplit_s0")
    assert names.index("mezo_sst2_nosplit_s1") < names.index("hosfl_sst2_shallow_s0")


def test_claim_is_exclusive_and_takes_over_stale_locks(tmp_path):
    path = str(tmp_path / "cell.json")
    assert grid.claim(path)
    assert not grid.claim(path)  # held by this (live) process
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    with open(path + ".lock", "w") as f:
        f.write(dead.stdout.strip())  # a worker that has exited
    assert grid.claim(path)
    assert open(path + ".lock").read() == str(os.getpid())


def _cell(method, task, depth, seed, accuracy, losses):
    labels = [0, 1, 0, 1]
    right = round(accuracy * 4)
    return {
        "method": method,
        "task": task,
        "depth": depth,
        "split_layer": None if depth == "nosplit" else 20,
        "seed": seed,
        "samples": 48,
        "accuracy": accuracy,
        "predictions": labels[:right] + [1 - y for y in labels[right:]],
        "labels": labels,
        "train_losses": losses,
        "curve": [{"samples": 48, "accuracy": accuracy}],
        "activation_bytes_per_client_round": 100.0,
        "sync_bytes_per_client_round": 32.0,
        "round_seconds": 1.0,
        "versions": {"torch": "x"},
    }


def test_report_shares_no_split_cells_across_depths_and_pairs_by_seed(tmp_path):
    cells = tmp_path / "cells"
    cells.mkdir()
    rows = [
        _cell("hosfl", "sst2", "deep", 0, 0.75, [1.0, 0.5]),
        _cell("hosfl", "sst2", "deep", 1, 0.5, [1.0, 0.7]),
        _cell("frozen_client", "sst2", "deep", 0, 0.5, [1.0, 0.6]),
        _cell("frozen_client", "sst2", "deep", 1, 0.5, [1.0, 0.9]),
        _cell("centralized", "sst2", "nosplit", 0, 1.0, [0.9, 0.4]),
    ]
    for r in rows:
        (cells / f"{r['method']}_{r['task']}_{r['depth']}_s{r['seed']}.json").write_text(json.dumps(r))
    summary = report.summarize(str(tmp_path), "cmd")
    hosfl = summary["methods"]["hosfl"]["sst2"]
    assert hosfl["accuracy_mean"] == pytest.approx(0.625) and hosfl["seeds"] == [0, 1]
    assert hosfl["accuracy_std"] == pytest.approx(0.1767767, rel=1e-6)
    central = summary["methods"]["centralized"]["sst2"]["by_depth"]
    assert central["deep"]["accuracy_mean"] == central["shallow"]["accuracy_mean"] == 1.0
    assert "shallow" not in summary["methods"]["hosfl"]["sst2"]["by_depth"]
    paired = summary["paired"]["hosfl_vs_frozen_client_sst2_deep"]
    # Per-round differences: seed 0 (0, -0.1), seed 1 (0, -0.2): mean -0.075.
    assert paired["mean_loss_difference"] == pytest.approx(-0.075)
    assert paired["seeds"] == [0, 1]
    assert [t["hosfl_only_right"] for t in paired["mcnemar"]] == [1, 0]
    report.write_markdown(summary, str(tmp_path))
    assert "no split: same runs at both depths" in (tmp_path / "benchmark.md").read_text()
