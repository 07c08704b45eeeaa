"""The benchmark harness's bookkeeping (no model): cell planning, worker locks, and how the report reads cells."""

import json
import os
import subprocess
import sys

import numpy as np
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


_PROBE = """
import sys
from filelock import FileLock, Timeout
try:
    FileLock(sys.argv[1]).acquire(timeout=0)  # never released: the OS frees it when this process exits
    print("acquired")
except Timeout:
    print("refused")
"""


def test_claim_is_exclusive_and_freed_when_its_worker_stops(tmp_path):
    path = str(tmp_path / "cell.json")

    def other_worker():
        probe = [sys.executable, "-c", _PROBE, path + ".lock"]
        return subprocess.run(probe, capture_output=True, text=True, timeout=120, check=True).stdout.strip()

    lock = grid.claim(path)
    assert lock
    assert other_worker() == "refused"  # held by this (live) worker
    lock.release()
    assert other_worker() == "acquired"  # ... and that worker exited without releasing it
    lock = grid.claim(path)  # the OS freed the stopped worker's lock
    assert lock
    lock.release()
    with open(path, "w") as f:
        f.write("{}")
    assert grid.claim(path) is None  # a finished cell is never claimed again


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
    assert [t["method_only_right"] for t in paired["mcnemar"]] == [1, 0]
    report.write_markdown(summary, str(tmp_path))
    text = (tmp_path / "benchmark.md").read_text()
    assert "no split: same runs at both depths" in text
    # The full grid's cells without a file are listed, those with one are not.
    assert "hosfl_rte_shallow_s2" in summary["missing_cells"] and "hosfl_sst2_deep_s0" not in summary["missing_cells"]
    assert "centralized_sst2_nosplit_s1" in summary["missing_cells"]
    assert "still missing" in text and "hosfl_rte_shallow_s2" in text


def _write(tmp_path, rows, zero_shot=None):
    cells = tmp_path / "cells"
    cells.mkdir(exist_ok=True)
    for r in rows:
        (cells / f"{r['method']}_{r['task']}_{r['depth']}_s{r['seed']}.json").write_text(json.dumps(r))
    for task, accuracy in (zero_shot or {}).items():
        (cells / f"zero_shot_{task}.json").write_text(
            json.dumps({"task": task, "accuracy": accuracy, "curve_accuracy": accuracy})
        )
    return report.summarize(str(tmp_path), "cmd")


def test_standard_errors_treat_seeds_or_blocks_of_rounds_as_the_unit():
    assert report.standard_error_over_seeds([1.0, 2.0, 3.0]) == pytest.approx(1 / np.sqrt(3))
    assert report.standard_error_over_seeds([0.5]) is None
    # Block means of (0, 0, 1, 1) with b=2: 0, 0.5, 1 (population variance 1/6); 2 blocks per resample: var 1/12.
    assert report.block_bootstrap_se([np.array([0.0, 0.0, 1.0, 1.0])], block=2) == pytest.approx(np.sqrt(1 / 12))
    # Two seeds resampled independently: the mean of two such means has variance (1/12 + 1/12) / 4.
    two = [np.array([0.0, 0.0, 1.0, 1.0])] * 2
    assert report.block_bootstrap_se(two, block=2) == pytest.approx(np.sqrt(1 / 24))
    # Blocks of one round are the ordinary bootstrap of the mean: population std / sqrt(T).
    d = np.array([0.3, -1.2, 0.8, 2.0, 0.1, -0.4])
    assert report.block_bootstrap_se([d], block=1) == pytest.approx(np.std(d) / np.sqrt(d.size))
    assert report.block_bootstrap_se([np.array([1.0])]) is None


def test_block_bootstrap_se_is_the_limit_of_resampling_blocks():
    rng = np.random.default_rng(0)
    series = [np.cumsum(rng.normal(size=23)), np.cumsum(rng.normal(size=23))]  # strongly autocorrelated rounds
    block = 5
    means = []
    for _ in range(20000):
        per_seed = []
        for d in series:
            starts = rng.integers(0, d.size - block + 1, size=-(-d.size // block))
            per_seed.append(np.concatenate([d[s : s + block] for s in starts]).mean())
        means.append(np.mean(per_seed))
    assert report.block_bootstrap_se(series, block=block) == pytest.approx(np.std(means), rel=0.03)
    # Treating the rounds as independent would claim a much smaller error for these series.
    naive = np.concatenate(series).std(ddof=1) / np.sqrt(46)
    assert report.block_bootstrap_se(series, block=block) > 1.5 * naive


def test_paired_difference_standard_error_does_not_shrink_with_rounds(tmp_path):
    rounds = 40
    summary = _write(
        tmp_path,
        [
            _cell("hosfl", "sst2", "deep", 0, 0.75, [1.0] * rounds),
            _cell("hosfl", "sst2", "deep", 1, 0.75, [1.0] * rounds),
            _cell("frozen_client", "sst2", "deep", 0, 0.5, [1.1] * rounds),
            _cell("frozen_client", "sst2", "deep", 1, 0.5, [1.3] * rounds),
            _cell("centralized", "sst2", "nosplit", 0, 1.0, [0.6] * rounds),
        ],
    )
    p = summary["vs_frozen_client"]["hosfl_sst2_deep"]
    # Per-seed mean differences -0.1 and -0.3: mean -0.2, SE over seeds std(ddof=1) / sqrt(2) = 0.1.
    assert p["per_seed_mean"] == pytest.approx([-0.1, -0.3])
    assert p["mean_loss_difference"] == pytest.approx(-0.2)
    assert p["standard_error_seeds"] == pytest.approx(0.1)
    assert p["standard_error_block_bootstrap"] == pytest.approx(0.0, abs=1e-12)  # constant within each seed
    # A method without a split pairs with the frozen client of each depth; one seed: no SE over seeds.
    central = summary["vs_frozen_client"]["centralized_sst2_deep"]
    assert central["seeds"] == [0] and central["mean_loss_difference"] == pytest.approx(-0.5)
    assert central["standard_error_seeds"] is None
    assert "frozen_client_sst2_deep" not in summary["vs_frozen_client"]


# The synthetic grid: (method, task, depth it is filed under, seeds). SST-2 shallow lacks HO-SFL and has ZO-SFL (which
# the axes' colour cycle would have drawn in HO-SFL's colour); centralized has no split, so its cells serve both
# depths; RTE has no frozen client (nothing to pair with).
CELLS = [
    ("hosfl", "sst2", "deep", [0, 1]),
    ("splitlora", "sst2", "deep", [0, 1]),
    ("frozen_client", "sst2", "deep", [0, 1]),
    ("centralized", "sst2", "nosplit", [0, 1]),
    ("zo_sfl", "sst2", "shallow", [0]),
    ("frozen_client", "sst2", "shallow", [0, 1]),
    ("hosfl", "rte", "deep", [0, 1]),
    ("centralized", "rte", "nosplit", [0]),
]
PANELS = {
    ("sst2", "deep"): ["hosfl", "splitlora", "centralized", "frozen_client"],
    ("sst2", "shallow"): ["zo_sfl", "centralized", "frozen_client"],
    ("rte", "deep"): ["hosfl", "centralized"],
    ("rte", "shallow"): ["centralized"],
}
ACCURACY = {"hosfl": 0.7, "splitlora": 0.8, "zo_sfl": 0.55, "centralized": 0.9, "frozen_client": 0.6}


def _seeds(method, task, depth):
    (seeds,) = [s for m, t, d, s in CELLS if (m, t, d) == (method, task, grid.cell_depth(method, depth))]
    return seeds


def _synthetic_grid(tmp_path):
    rows = [
        _cell(m, t, d, s, ACCURACY[m] + 0.05 * s, [1.0 - 0.1 * ACCURACY[m] - 0.01 * s, 0.9 - 0.1 * ACCURACY[m]])
        for m, t, d, seeds in CELLS
        for s in seeds
    ]
    return _write(tmp_path, rows, zero_shot={"sst2": 0.5})


def _panel(fig, task, depth):
    (ax,) = [a for a in fig.axes if a.get_title().startswith(f"{task.upper()}, {depth} split")]
    return ax


def _drawn(ax):
    return {line.get_label(): line for line in ax.get_lines() if not line.get_label().startswith("_")}


def _note(ax):
    """The panel note's first line, which names the methods without cells there ("" when none is missing)."""
    notes = [t.get_text() for t in ax.texts if t.get_gid() == "missing-note"]
    assert len(notes) <= 1
    return notes[0].split("\n")[0] if notes else ""


def test_accuracy_figure_draws_each_method_in_its_fixed_style_and_notes_missing_ones(tmp_path):
    from matplotlib.colors import to_hex

    summary = _synthetic_grid(tmp_path)
    fig = report.plot_accuracy(report.load_cells(str(tmp_path)), summary["zero_shot_curve_subset"])
    for (task, depth), methods in PANELS.items():
        ax = _panel(fig, task, depth)
        lines = _drawn(ax)
        assert set(lines) == {report.LABELS[m] for m in methods}, (task, depth)
        for m in methods:
            line = lines[report.LABELS[m]]
            assert to_hex(line.get_color()) == report.STYLE[m]["color"]
            assert line.get_marker() == report.STYLE[m]["marker"]
            # The line carries this method's own numbers: the mean over its seeds, after the zero-shot start.
            seeds = _seeds(m, task, depth)
            assert line.get_ydata()[-1] == pytest.approx(100 * np.mean([ACCURACY[m] + 0.05 * s for s in seeds]))
            if task == "sst2":
                assert line.get_xdata()[0] == 0 and line.get_ydata()[0] == pytest.approx(50.0)
        absent = [report.LABELS[m] for m in report.METHODS if m not in methods]
        assert _note(ax) == "no cells: " + ", ".join(absent)
    assert "ZO-SFL n=1" in "\n".join(t.get_text() for t in _panel(fig, "sst2", "shallow").texts)
    # One figure-level legend over the methods drawn anywhere, in the same fixed styles.
    (legend,) = fig.legends
    drawn = [m for m in report.METHODS if any(m in ms for ms in PANELS.values())]
    assert [t.get_text() for t in legend.get_texts()] == [report.LABELS[m] for m in drawn]
    for m, handle in zip(drawn, legend.legend_handles):
        assert (
            to_hex(handle.get_color()) == report.STYLE[m]["color"] and handle.get_marker() == report.STYLE[m]["marker"]
        )


def test_paired_figure_shows_each_method_against_the_frozen_client_with_error_bars(tmp_path):
    from matplotlib.colors import to_hex

    summary = _synthetic_grid(tmp_path)
    fig = report.plot_paired(summary)
    for (task, depth), methods in PANELS.items():
        ax = _panel(fig, task, depth)
        lines = _drawn(ax)
        paired = [m for m in methods if m != "frozen_client" and "frozen_client" in methods]
        assert set(lines) == {report.LABELS[m] for m in paired}, (task, depth)
        for m in paired:
            p = summary["vs_frozen_client"][f"{m}_{task}_{depth}"]
            line = lines[report.LABELS[m]]
            assert to_hex(line.get_color()) == report.STYLE[m]["color"]
            assert line.get_ydata()[0] == pytest.approx(p["mean_loss_difference"])
            # One seed (ZO-SFL): open marker, block-bootstrap error bar; otherwise filled, SE over seeds.
            assert (to_hex(line.get_markerfacecolor()) == "#ffffff") == (len(p["seeds"]) == 1)
        bars = [c for c in ax.containers if c.has_yerr]
        assert len(bars) == len(paired)
        for m, bar in zip(paired, bars):
            p = summary["vs_frozen_client"][f"{m}_{task}_{depth}"]
            se = (
                p["standard_error_seeds"]
                if p["standard_error_seeds"] is not None
                else p["standard_error_block_bootstrap"]
            )
            (segments,) = [seg.get_segments() for seg in bar.lines[2]]
            assert segments[0][1][1] - segments[0][0][1] == pytest.approx(2 * se)
    assert "Frozen client" in _note(_panel(fig, "rte", "deep")) and "HO-SFL" not in _note(_panel(fig, "rte", "deep"))
    assert "nothing to pair with" in "\n".join(t.get_text() for t in _panel(fig, "rte", "deep").texts)
    absent = [m for m in report.METHODS if m not in PANELS[("sst2", "shallow")]]
    assert _note(_panel(fig, "sst2", "shallow")) == "no cells: " + ", ".join(report.LABELS[m] for m in absent)


def test_write_plots_writes_every_figure(tmp_path):
    summary = _synthetic_grid(tmp_path)
    written = report.write_plots(summary, str(tmp_path))
    names = {os.path.basename(p) for p in written}
    assert {"accuracy_vs_samples.png", "paired_vs_frozen_client.png", "bytes_per_client.png"} <= names
    assert all(os.path.getsize(p) > 1000 for p in written)


def test_client_update_study_summary(tmp_path):
    """The study's client_contribution: paired loss differences vs the frozen client over rounds 1.., SE over seeds,
    SplitLoRA's difference and the fraction, McNemar counts; the report files it under sst2/deep."""
    import client_update_study as study

    labels = [0, 1, 0, 1]

    def run(losses, predictions):
        return {"train_losses": losses, "predictions": predictions, "labels": labels, "accuracy": 0.5, "rounds": 3}

    runs = {
        "frozen/s0": run([1.0, 0.9, 0.8], [0, 0, 0, 0]),
        "frozen/s1": run([1.0, 0.8, 0.7], [0, 0, 0, 0]),
        "splitlora/s0": run([1.0, 0.7, 0.6], [0, 1, 0, 1]),
        "splitlora/s1": run([1.0, 0.6, 0.5], [0, 1, 0, 0]),
        "lora_b_pc/s0": run([1.0, 0.88, 0.78], [0, 1, 0, 0]),
        "lora_b_pc/s1": run([1.0, 0.78, 0.70], [1, 0, 0, 0]),
    }
    summary = study.summarize(runs, [0, 1])
    entry = summary["lora_b_pc"]
    assert entry["loss_diff_vs_frozen"] == pytest.approx(np.mean([-0.02, -0.01]))
    assert entry["loss_diff_se"] == pytest.approx(np.std([-0.02, -0.01], ddof=1) / np.sqrt(2))
    assert entry["fo_loss_diff_vs_frozen"] == pytest.approx(-0.2)
    assert entry["fraction_of_fo"] == pytest.approx(0.015 / 0.2)
    assert entry["mcnemar_vs_frozen"]["only_this_right"] == 1 and entry["mcnemar_vs_frozen"]["only_frozen_right"] == 1
    assert entry["seeds"] == [0, 1]
    with open(tmp_path / "client_update_study.json", "w") as f:
        json.dump({"client_contribution": summary, "cosine": {"lora_b_pc": {"d": 5}}}, f)
    filed = report.client_contribution(str(tmp_path))
    assert filed["sst2"]["deep"]["lora_b_pc"]["cosine"] == {"d": 5}

    # A learning-rate sweep: SplitLoRA's best client learning rate is the first-order reference of every fraction.
    swept = {
        "frozen/s0": runs["frozen/s0"],
        "splitlora@lr0.001/s0": run([1.0, 0.85, 0.75], [0, 1, 0, 1]),  # -0.05
        "splitlora@lr0.01/s0": run([1.0, 0.8, 0.7], [0, 1, 0, 1]),  # -0.1: the best
        "lora_b_pc@lr0.001/s0": run([1.0, 0.89, 0.79], [0, 0, 0, 0]),  # -0.01
    }
    summary = study.summarize(swept, [0])
    assert summary["lora_b_pc@lr0.001"]["fo_reference"] == "splitlora@lr0.01"
    assert summary["lora_b_pc@lr0.001"]["fraction_of_fo"] == pytest.approx(0.1)
    assert summary["lora_b_pc@lr0.001"]["loss_diff_se"] is None  # one seed: no SE

    # A long single-seed study still gets an SE: the moving-block bootstrap over its rounds (never rounds as draws).
    rng = np.random.default_rng(0)
    frozen = np.concatenate([[1.0], 0.8 + 0.05 * rng.standard_normal(30)])
    diff = -0.01 + 0.02 * rng.standard_normal(30)
    long = {
        "frozen/s0": run(list(frozen), [0, 0, 0, 0]),
        "lora_b_pc/s0": run([1.0, *(frozen[1:] + diff)], [0, 1, 0, 0]),
    }
    entry = study.summarize(long, [0])["lora_b_pc"]
    assert entry["loss_diff_se"] is None
    assert entry["loss_diff_block_se"] == pytest.approx(report.block_bootstrap_se([diff]))
    assert entry["loss_diff_block_se"] > 0 and entry["loss_diff_vs_frozen"] == pytest.approx(diff.mean())

    # Learning rates run on different seeds are compared on the seeds they share, and a fraction takes the
    # configuration and the reference on the same seeds.
    uneven = {
        "frozen/s0": runs["frozen/s0"],
        "frozen/s1": runs["frozen/s1"],
        "splitlora/s0": run([1.0, 0.6, 0.5], [0, 1, 0, 1]),  # -0.3
        "splitlora/s1": runs["splitlora/s1"],  # -0.2: mean -0.25
        "splitlora@lr0.01/s1": run([1.0, 0.58, 0.48], [0, 1, 0, 1]),  # -0.22: better on the seed both ran
        "lora_b_pc/s0": runs["lora_b_pc/s0"],  # -0.02
        "lora_b_pc/s1": runs["lora_b_pc/s1"],  # -0.01
    }
    reference, per_seed = study.best_first_order(uneven, [0, 1])
    assert reference == "splitlora@lr0.01" and per_seed == pytest.approx({1: -0.22})
    entry = study.summarize(uneven, [0, 1])["lora_b_pc"]
    assert entry["fo_reference"] == "splitlora@lr0.01" and entry["fo_seeds"] == [1]
    assert entry["loss_diff_vs_frozen"] == pytest.approx(-0.015)  # over both seeds
    assert entry["fraction_of_fo"] == pytest.approx(0.01 / 0.22)  # seed 1 against seed 1
    assert study.plan_runs(["frozen", "paper"], [0, 1], [1e-4, 1e-3]) == [
        ("frozen", 0, None),
        ("paper", 0, 1e-4),
        ("paper", 0, 1e-3),
        ("frozen", 1, None),
        ("paper", 1, 1e-4),
        ("paper", 1, 1e-3),
    ]
    assert study.run_key("paper", 1, 1e-3) == "paper@lr0.001/s1"
    path = study.study_path(str(tmp_path), "rte", 250)
    assert path.endswith("client_update_study_rte_r250.json")
    with open(path, "w") as f:
        json.dump({"task": "rte", "depth": "deep", "budget": {"rounds": 250}, "client_contribution": summary}, f)
    filed = report.client_contribution(str(tmp_path))
    assert set(filed["rte"]["deep"]) == {"splitlora@lr0.001/r250", "splitlora@lr0.01/r250", "lora_b_pc@lr0.001/r250"}
    assert set(filed["sst2"]["deep"]) == set(study.summarize(runs, [0, 1]))  # the pilot's names unchanged


def test_client_update_study_sweeps_resumes_and_skips_claimed_runs(tmp_path, monkeypatch):
    """main() runs each (configuration, seed, client lr) once, files it under its key, skips a run another worker
    holds the lock of, and a second call runs only what is missing."""
    import client_update_study as study
    from filelock import FileLock

    calls = []

    folders = []

    def fake_run_cell(method, task, depth, seed, budget, data_dir, overrides, make_mask=None, **checkpointing):
        calls.append((method, task, seed, overrides.get("client_learning_rate")))
        assert checkpointing["checkpoint_every"] == 25
        folders.append(checkpointing["checkpoint_dir"])
        os.makedirs(os.path.join(folders[-1], "checkpoint-25"))  # what a real run leaves while it trains
        loss = 1.0 - 0.01 * len(calls)
        return {"train_losses": [1.0, loss], "predictions": [0], "labels": [0], "accuracy": 1.0, "rounds": 2}

    monkeypatch.setattr(study, "run_cell", fake_run_cell)
    argv = ["--task", "rte", "--rounds", "2", "--seeds", "0", "--out", str(tmp_path), "--configs", "frozen", "paper"]
    argv += ["--checkpoint_dir", str(tmp_path / "checkpoints")]
    path = study.study_path(str(tmp_path), "rte", 2)
    held = FileLock(f"{path}.paper@lr0.001_s0.lock")
    held.acquire()
    try:
        study.main(argv + ["--client_lrs", "1e-4", "1e-3"])
    finally:
        held.release()
    assert calls == [("frozen_client", "rte", 0, None), ("hosfl", "rte", 0, 1e-4)]
    runs = json.load(open(path))["runs"]
    assert set(runs) == {"frozen/s0", "paper@lr0.0001/s0"}
    study.main(argv + ["--client_lrs", "1e-4", "1e-3"])
    assert calls[2:] == [("hosfl", "rte", 0, 1e-3)]
    saved = json.load(open(path))
    assert saved["task"] == "rte" and set(saved["client_contribution"]) == {"paper@lr0.0001", "paper@lr0.001"}
    # Each run checkpoints into its own folder, removed once the run is stored.
    assert len(set(folders)) == 3 and not any(os.path.exists(f) for f in folders)


def test_client_frontier_figure_draws_each_zeroth_order_configuration_at_its_forwards_and_fraction(tmp_path):
    """The frontier figure: one point per AdamW/isotropic zeroth-order configuration at x = P + 1 client forwards and
    y = its fraction of SplitLoRA's contribution, coloured by client learning rate, ±SE over seeds in the same units,
    open markers for one seed, off-scale values on the edge; step-rule and scaled-direction variants are left out."""
    import client_update_study as study
    from matplotlib.colors import to_hex

    budget = {"hosfl_perturbations": 2, "zo_lr": 1e-4, "fo_lr": 1e-3}
    labels = [0, 1, 0, 1]

    def run(method, losses, overrides=None, density=None, scales="uniform", guide=0.0):
        return {
            "mask_guide_share": guide,
            "method": method,
            "budget": budget,
            "overrides": overrides,
            "mask_density": density,
            "mask_direction_scales": scales,
            "train_losses": losses,
            "predictions": [0, 1, 0, 0],
            "labels": labels,
            "accuracy": 0.75,
            "rounds": 3,
        }

    mask = {"client_zo_modules": [], "client_learning_rate": 3e-3}
    runs = {}
    for s, shift in ((0, 0.0), (1, 0.02)):
        runs[f"frozen/s{s}"] = run("frozen_client", [1.0, 0.9, 0.8 + shift])
        runs[f"splitlora/s{s}"] = run("splitlora", [1.0, 0.7, 0.6 + shift])  # -0.2
        runs[f"paper/s{s}"] = run("hosfl", [1.0, 0.9, 0.8 + shift - 0.01])  # -0.005: 2.5 %
        runs[f"mask_pc_p8/s{s}"] = run("hosfl", [1.0, 0.86 - shift, 0.76], dict(mask, num_perturbations=8), 1e-4)
        runs[f"mask_pc_nsgd/s{s}"] = run("hosfl", [1.0, 0.8, 0.7], dict(mask, client_optimizer="normalized_sgd"), 1e-4)
        runs[f"maskw_pc/s{s}"] = run("hosfl", [1.0, 0.8, 0.7], dict(mask), 1e-4, "gradient_rms")
        runs[f"maskg_pc/s{s}"] = run("hosfl", [1.0, 0.8, 0.7 + shift], dict(mask), 1e-4, guide=0.5)
        hold = dict(mask, client_lr_scheduler_type="warmup_stable_decay")
        runs[f"mask_pc_hold60/s{s}"] = run("hosfl", [1.0, 0.8, 0.7 + shift], hold, 1e-4)
        runs[f"fo_mask/s{s}"] = run("splitlora", [1.0, 0.72, 0.62 + shift], {"client_zo_modules": []}, 1e-4)
    runs["mask_pc_p8@lr0.01/s0"] = run("hosfl", [1.0, 1.9, 1.8], dict(mask, client_learning_rate=1e-2), 1e-4)
    with open(tmp_path / "client_update_study.json", "w") as f:
        json.dump({"runs": runs, "client_contribution": study.summarize(runs, [0, 1])}, f)
    contribution = report.client_contribution(str(tmp_path))
    rows = contribution["sst2"]["deep"]
    assert rows["mask_pc_p8"]["settings"] == {
        "method": "hosfl",
        "num_perturbations": 8,
        "client_learning_rate": 3e-3,
        "client_optimizer": "adamw",
        "mask_density": 1e-4,
        "direction_scales": "uniform",
        "guide_share": 0.0,
        "client_zo_modules": [],
        "client_lr_scheduler_type": None,
    }
    assert rows["maskg_pc"]["settings"]["guide_share"] == 0.5
    assert (
        rows["paper"]["settings"]["num_perturbations"] == 2
        and rows["paper"]["settings"]["client_learning_rate"] == 1e-4
    )

    points = {p["name"]: p for p in report.frontier_points(rows)}
    # Not the step-rule/scaled variants; the guided mask and a client with its own schedule are their own kinds.
    assert set(points) == {"paper", "mask_pc_p8", "mask_pc_p8@lr0.01", "maskg_pc", "mask_pc_hold60"}
    assert points["maskg_pc"]["space"] == "mask 0.0001 alone, guided 0.5"
    assert points["mask_pc_hold60"]["space"] == "mask 0.0001 alone, own schedule (warmup_stable_decay)"
    p8 = points["mask_pc_p8"]
    # Seed 0: -0.04 a round vs the frozen client, seed 1: -0.06; SplitLoRA: -0.2 on both.
    assert rows["mask_pc_p8"]["per_seed_loss_diff"] == pytest.approx([-0.04, -0.06])
    assert p8["x"] == 9 and p8["y"] == pytest.approx(0.25) and p8["yerr"] == pytest.approx(0.05)
    assert points["paper"]["x"] == 3 and points["paper"]["y"] == pytest.approx(0.025)

    fig = report.plot_client_frontier(contribution)
    (ax,) = fig.axes
    drawn = {line.get_gid(): line for line in ax.get_lines() if line.get_gid()}
    assert set(drawn) == set(points)
    assert to_hex(drawn["mask_pc_p8"].get_color()) == report.LR_COLORS[3e-3]
    assert drawn["mask_pc_p8"].get_marker() == "^" and drawn["paper"].get_marker() == "o"
    assert drawn["maskg_pc"].get_marker() == "*" and drawn["mask_pc_hold60"].get_marker() == "X"
    assert drawn["mask_pc_p8"].get_ydata()[0] == pytest.approx(p8["y"])
    # One seed: open marker; diverged (fraction -5): drawn on the lower edge with its value printed.
    diverged = drawn["mask_pc_p8@lr0.01"]
    assert to_hex(diverged.get_markerfacecolor()) == "#ffffff"
    assert diverged.get_ydata()[0] == pytest.approx(report.FRONTIER_YLIM[0] + 0.03)
    texts = [t.get_text() for t in ax.texts]
    assert any("off scale" in t and f"{points['mask_pc_p8@lr0.01']['y']:+.2f}" in t for t in texts)
    bars = [c for c in ax.containers if c.has_yerr]
    assert len(bars) == 4  # paper, mask_pc_p8, maskg_pc and mask_pc_hold60 (two seeds each); none for one seed
    # The first-order ceiling on the mask is drawn where it was measured.
    ceiling = rows["fo_mask"]["fraction_of_fo"]
    assert any(list(line.get_ydata()) == [ceiling, ceiling] for line in ax.get_lines())


def test_train_resumably_continues_a_stopped_run_bit_identically(tmp_path):
    """A study run stopped mid-way (here: killed after round 3) resumes from its last checkpoint (round 2): same
    weights and the same per-round training losses as a run that was never stopped."""
    import torch
    from conftest import counting_dataset, stack_collator, tiny_args, tiny_llama
    from transformers import TrainerCallback

    from hosfl_hf import HOSFLTrainer

    class Killed(RuntimeError):
        pass

    class KillAfterRound3(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3:
                raise Killed

    def trainer(folder, callbacks=()):
        args = tiny_args(folder, max_steps=5, logging_steps=1, save_strategy="steps", save_steps=2)
        return HOSFLTrainer(
            tiny_llama(),
            args,
            split_layer=2,
            train_dataset=counting_dataset(),
            data_collator=stack_collator,
            callbacks=list(callbacks),
        )

    def losses(t):
        return [h["loss"] for h in t.state.log_history if "loss" in h]

    full = trainer(tmp_path / "full")
    assert grid.train_resumably(full, str(tmp_path / "full" / "none")) is None  # nothing to resume: from the start
    folder = str(tmp_path / "stopped" / "out")
    with pytest.raises(Killed):
        grid.train_resumably(trainer(tmp_path / "stopped", [KillAfterRound3()]), folder)
    resumed = trainer(tmp_path / "stopped")
    assert grid.train_resumably(resumed, folder) == 2
    assert losses(resumed) == losses(full) and len(losses(full)) == 5
    expected = dict(full.model.named_parameters())
    for name, value in resumed.model.named_parameters():
        assert torch.equal(value, expected[name]), name
