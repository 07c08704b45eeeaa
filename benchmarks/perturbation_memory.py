"""Extra memory of the zeroth-order probes for a full-parameter client: swapped vs copied perturbations.

    python benchmarks/perturbation_memory.py --out docs/results

The client is the shipped SmolLM2's embeddings + first `split` blocks with every weight trainable (no LoRA), the
case where saving a copy of each trainable tensor before perturbing doubles the weights. Each mode runs in a fresh
subprocess: after loading, the peak-RSS mark is reset, one client step runs on a fixed batch, and the peak increase
over the loaded weights is read (`VmHWM`); children run with `MALLOC_MMAP_THRESHOLD_=65536` and
trim the heap first, so every new tensor buffer shows in RSS instead of reusing pages freed while loading.
Modes: `inference` (one forward, no autograd), `probe_copy` and
`probe_swap` (anchor forward + P perturbed forwards + scalars + the SGD update rebuilt from the seeds), with the
estimator's two ways of perturbing (`ZerothOrderEstimator(module=None)` / `(module=model)`). Both give the same
scalars, which the script checks. Writes `perturbation_memory.json` and `.md`.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from memory import _rss_kib, _rss_peak_kib  # noqa: E402


def measure(mode: str, split_layer: int, batch: int, length: int, perturbations: int) -> dict:
    from transformers import AutoModelForCausalLM

    from hosfl_hf import split_model
    from hosfl_hf.models import shipped_model_path
    from hosfl_hf.zeroth_order import ZerothOrderEstimator, apply_zo_update, build_client_optimizer

    torch.set_num_threads(2)
    model = AutoModelForCausalLM.from_pretrained(
        shipped_model_path("smollm2"), num_hidden_layers=split_layer + 1, dtype=torch.float32
    )
    parts = split_model(model, split_layer)
    params = parts.client_parameters()
    trainable = sum(p.numel() * p.element_size() for _, p in params)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (batch, length), generator=g)
    cotangent = torch.randn(batch, length, model.config.hidden_size, generator=g)
    optimizer = build_client_optimizer([p for _, p in params], "sgd", 1e-5, 0.0)  # SGD keeps no state
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # return freed heap pages so later allocations show in RSS
    baseline = _rss_kib()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak-RSS mark to the current RSS
    start = time.perf_counter()
    scalars = None
    if mode == "inference":
        parts.client(input_ids=ids)
    else:
        estimator = ZerothOrderEstimator(params, 1e-3, module=model if mode == "probe_swap" else None)
        z = parts.client(input_ids=ids).hidden_states
        seeds = list(range(perturbations))
        scalars = estimator.projected_scalars(lambda: parts.client(input_ids=ids).hidden_states, z, cotangent, seeds)
        assert estimator.swaps == (mode == "probe_swap")
        apply_zo_update(params, optimizer, seeds, scalars, 1e-3, 1e-5)
    seconds = time.perf_counter() - start
    return {
        "mode": mode,
        "split_layer": split_layer,
        "batch": batch,
        "length": length,
        "perturbations": perturbations,
        "trainable_bytes": trainable,
        "loaded_bytes": baseline * 1024,
        "increase_bytes": (_rss_peak_kib() - baseline) * 1024,
        "step_seconds": seconds,
        "scalars": scalars,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="docs/results")
    parser.add_argument("--split", type=int, default=20)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--perturbations", type=int, default=2)
    parser.add_argument("--child", metavar="MODE", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    shape = (args.split, args.batch, args.length, args.perturbations)
    if args.child:
        print(json.dumps(measure(args.child, *shape)))
        return
    rows = []
    for mode in ("inference", "probe_copy", "probe_swap"):
        command = [sys.executable, __file__, "--child", mode, "--split", str(args.split), "--batch", str(args.batch)]
        command += ["--length", str(args.length), "--perturbations", str(args.perturbations)]
        # Every tensor buffer gets its own mapping (no reuse of heap pages freed while loading), so the peak-RSS
        # increase counts each probe buffer; without it small clients under-read (copy mode below its own copies).
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
        result = subprocess.run(command, capture_output=True, text=True, check=True, timeout=1800, env=env)
        rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
        print(rows[-1]["mode"], rows[-1]["increase_bytes"] / 2**20, "MiB", flush=True)
    by_mode = {r["mode"]: r for r in rows}
    if by_mode["probe_copy"]["scalars"] != by_mode["probe_swap"]["scalars"]:
        raise AssertionError("swapped and copied perturbations gave different scalars")
    results = {"command": "python benchmarks/perturbation_memory.py --out " + args.out, "rows": rows}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "perturbation_memory.json"), "w") as f:
        json.dump(results, f, indent=1)
    mib = 2**20
    lines = [
        "# Probe memory of a full-parameter client (SmolLM2, CPU, peak RSS increase over the loaded client)",
        "",
        f"Client: embeddings + {args.split} blocks, every weight trainable "
        f"({rows[0]['trainable_bytes'] / mib:.0f} MiB fp32); batch {args.batch} x {args.length}; "
        f"P = {args.perturbations}; SGD update. Command: `{results['command']}`.",
        "",
        "| mode | peak increase (MiB) | peak RSS (MiB) | peak / inference peak | step (s) |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    inference = by_mode["inference"]
    inference_peak = inference["loaded_bytes"] + inference["increase_bytes"]
    for r in rows:
        peak = r["loaded_bytes"] + r["increase_bytes"]
        lines.append(
            f"| {r['mode']} | {r['increase_bytes'] / mib:.0f} | {peak / mib:.0f} | {peak / inference_peak:.3f} | "
            f"{r['step_seconds']:.2f} |"
        )
    with open(os.path.join(args.out, "perturbation_memory.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
