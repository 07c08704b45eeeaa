"""The scale benchmark (`benchmarks/gpu_scale.py`, run on a GPU) at the tiny shape on the CPU: it builds the split,
runs every measurement and writes its JSON and Markdown (the allocator rows are CUDA-only and `null` here)."""

import json
import math
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks"))

import gpu_scale  # noqa: E402


def test_gpu_scale_tiny_on_cpu_writes_every_measurement(tmp_path):
    result = gpu_scale.main(
        ["--shape", "tiny", "--device", "cpu", "--dtype", "float32", "--out", str(tmp_path), "--repeats", "1"]
    )
    shape = gpu_scale.SHAPES["tiny"]
    hidden, ffn = shape["hidden_size"], shape["ffn_dim"]
    assert result["split_layer"] == 1  # a fifth of the 4 blocks, at least one
    rows = {row["kind"]: row for row in result["clients"]}
    # LoRA r8 on q,v of the one client block; every weight of that block (attention with biases, MLP, 2 norms).
    assert rows["lora"]["trainable_parameters"] == 2 * (hidden * 8 + 8 * hidden)
    block = 4 * (hidden * hidden + hidden) + (hidden * ffn + ffn) + (ffn * hidden + hidden) + 2 * 2 * hidden
    assert rows["full"]["trainable_parameters"] == block
    for row in rows.values():
        assert row["client_optimizer"] == gpu_scale.CLIENT_OPTIMIZER[row["kind"]]
        assert row["inference_peak_bytes"] is None and row["memory_ratio"] is None  # CPU: no allocator stats
        for key in (
            "forward_seconds",
            "perturbed_forward_seconds",
            "direction_cpu_seconds",
            "direction_device_seconds",
        ):
            assert row[key] > 0 and math.isfinite(row[key]), key
    rounds = result["rounds"]
    assert rounds["hosfl_round_seconds"] > 0 and rounds["splitlora_round_seconds"] > 0
    assert rounds["round_time_ratio"] == rounds["hosfl_round_seconds"] / rounds["splitlora_round_seconds"]
    assert json.loads((tmp_path / "gpu.json").read_text()) == json.loads(json.dumps(result))
    table = (tmp_path / "gpu.md").read_text()
    assert "| lora (adamw) | 2,048 |" in table and "Round time: HO-SFL" in table
