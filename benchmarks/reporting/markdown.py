"""`benchmark.md`: the tables (accuracy, communication/memory/time, paired tests, memory, cosine, client contribution)
and the lists of present and missing cells, from the summary."""

from __future__ import annotations

import os

from grid import NO_SPLIT

from .layout import DEPTHS, LABELS, METHODS, SEEDS
from .stats import BLOCK_ROUNDS


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
