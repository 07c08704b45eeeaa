"""Many clients in a Flower simulation on 2 CPU cores: seconds per round, peak memory and catch-up bytes for M clients
of which K are sampled per round, with history compaction.

    python benchmarks/many_clients.py --clients 20 100 1000 --per-round 10 --rounds 6

Each M runs `tests/flower_simulation.py` (the app's Python simulation) in its own process group, with a small random
Llama; the peak memory is the largest summed RSS of that process tree (the driver, Ray and its workers), sampled
every 0.5 s. Writes docs/results/many_clients.{json,md}. What must hold: seconds per round and peak memory follow K,
not M, and catch-up bytes stay bounded by compaction (`checkpoint-every`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import torch

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "results"


def inputs(folder: Path, clients: int, batch: int) -> dict:
    from hosfl_hf.testing import tiny_llama

    small = dict(vocab_size=64, hidden_size=64, intermediate_size=128)  # the Llama of benchmarks/flower_rounds.py
    tiny_llama(0, **small).save_pretrained(folder / "model")
    g = torch.Generator().manual_seed(0)
    with open(folder / "train.jsonl", "w") as f:
        for _ in range(clients * batch * 2):  # two batches per client's shard
            start = int(torch.randint(0, 64, (1,), generator=g))
            row = [(start + j) % 64 for j in range(16)]
            f.write(json.dumps({"input_ids": row, "labels": row}) + "\n")
    return {"model": str(folder / "model"), "dataset": str(folder / "train.jsonl")}


def tree_rss(pid: int) -> int:
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def run(clients: int, per_round: int, rounds: int, every: int) -> dict:
    from hosfl_hf.integrations.flower.local import stop_process

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        config = {
            **inputs(folder, clients, 4),
            "num-clients": clients,
            "clients-per-round": per_round,
            "num-rounds": rounds,
            "batch-size": 4,
            "checkpoint-every": every,
            "output-dir": str(folder / "out"),
            "state-dir": str(folder / "state"),
            "reply-timeout": 1200.0,
        }
        (folder / "config.json").write_text(json.dumps(config))
        env = dict(os.environ, RAY_DEDUP_LOGS="0", FLWR_HOME=str(folder / "flwr"), HF_HUB_OFFLINE="1")
        script = ROOT / "tests" / "flower_simulation.py"
        start = time.perf_counter()
        process = subprocess.Popen(
            [sys.executable, str(script), str(folder / "config.json"), str(clients)],
            cwd=folder,
            env=env,
            start_new_session=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        peak = [0]
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], tree_rss(process.pid))
                time.sleep(0.5)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            output, _ = process.communicate(timeout=3600)
        finally:
            done.set()
            stop_process(process)
        wall = time.perf_counter() - start
        path = folder / "out" / "flower_summary.json"
        if not path.is_file():
            raise RuntimeError(f"{clients} clients: no summary\n{output[-4000:]}")
        summary = json.loads(path.read_text())
    seconds = summary["seconds_per_round"]
    return {
        "clients": clients,
        "per_round": per_round,
        "rounds": rounds,
        "checkpoint_every": every,
        "median_seconds_per_round": sorted(seconds)[len(seconds) // 2],
        "seconds_per_round": seconds,
        "peak_rss_bytes": peak[0],
        "catchup_bytes": summary["comm"]["catchup_bytes"],
        "catchup_bytes_in_rounds": summary["history"][-1]["comm/catchup_bytes"],
        "clients_identical": summary["clients_identical"],
        "wall_seconds": wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, nargs="+", default=[20, 100])
    parser.add_argument("--per-round", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--checkpoint-every", type=int, default=2)
    args = parser.parse_args()
    results = []
    OUT.mkdir(parents=True, exist_ok=True)
    for m in args.clients:
        results.append(run(m, args.per_round, args.rounds, args.checkpoint_every))
        print(json.dumps(results[-1]), flush=True)
        (OUT / "many_clients.json").write_text(json.dumps(results, indent=1) + "\n")  # partial results as it goes
    lines = [
        "# Many clients in a Flower simulation (2 CPU cores)",
        "",
        f"Random Llama (hidden 64, 4 blocks, split after 2), K = {args.per_round} clients per round, {args.rounds} "
        f"rounds, batch 4 x 16, `checkpoint-every={args.checkpoint_every}`, deferred updates. Command: "
        f"`python benchmarks/many_clients.py --clients {' '.join(map(str, args.clients))}`.",
        "",
        "| clients M | median s / round | peak RSS (MiB, process tree) | catch-up bytes in rounds | "
        "catch-up bytes incl. final | wall s | all identical |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in results:
        lines.append(
            f"| {r['clients']} | {r['median_seconds_per_round']:.3f} | {r['peak_rss_bytes'] / 2**20:,.0f} | "
            f"{r['catchup_bytes_in_rounds']:,} | {r['catchup_bytes']:,} | {r['wall_seconds']:.0f} | "
            f"{r['clients_identical']} |"
        )
    (OUT / "many_clients.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
