"""Seconds and bytes per HO-SFL round: in-process trainer, in-process protocol, Flower simulation, loopback
deployment; same model, data and config, one run.

    python benchmarks/flower_rounds.py --out docs/results

The model is a small random Llama (hidden 64, 4 blocks, split after 2) built from a seed, so the numbers measure the
round's machinery (messages, processes, codec) rather than the model. Every client part must end identical across
runs (checked). Writes `flower_rounds.json` and `.md`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

CONFIG = {"num-rounds": 3, "num-clients": 3, "clients-per-round": 2, "batch-size": 4, "seed": 7}


def build(folder: Path) -> dict:
    """The model folder and the JSON-lines data every run reads."""
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.random.fork_rng():
        torch.manual_seed(0)
        config = LlamaConfig(
            vocab_size=64,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
        LlamaForCausalLM(config).save_pretrained(folder / "model")
    g = torch.Generator().manual_seed(0)
    with open(folder / "train.jsonl", "w") as f:
        for _ in range(240):
            start = int(torch.randint(0, 64, (1,), generator=g))
            row = [(start + j) % 64 for j in range(32)]
            f.write(json.dumps({"input_ids": row, "labels": row}) + "\n")
    return {**CONFIG, "model": str(folder / "model"), "dataset": str(folder / "train.jsonl")}


def in_process(config: dict, folder: Path) -> dict:
    """HOSFLTrainer and the protocol driver, one process."""
    from transformers import AutoModelForCausalLM, TrainerCallback

    from hosfl_hf import HOSFLTrainer
    from hosfl_hf.integrations.flower.config import build_args, load_dataset, load_model, make_collator, resolve
    from hosfl_hf.protocol import SplitClient, SplitServer, run_rounds

    config = resolve({**config, "output-dir": str(folder / "trainer")})
    settings, args = build_args(config)

    class Clock(TrainerCallback):
        stamps: list[float] = []

        def on_step_begin(self, *a, **k):
            self.stamps.append(time.perf_counter())

        def on_step_end(self, *a, **k):
            self.stamps.append(time.perf_counter())

    clock = Clock()
    dataset, collator = load_dataset(config), make_collator(config)
    trainer = HOSFLTrainer(
        AutoModelForCausalLM.from_pretrained(config["model"]),
        args,
        train_dataset=dataset,
        data_collator=collator,
        callbacks=[clock],
    )
    trainer.train()
    trainer_seconds = [b - a for a, b in zip(clock.stamps[::2], clock.stamps[1::2])]
    server = SplitServer(load_model(config), settings, args)
    clients = {c: SplitClient(load_model(config), c, settings, dataset, collator) for c in range(settings.num_clients)}
    traffic, seconds = {}, []
    for r in range(args.max_steps):
        start = time.perf_counter()
        run_rounds(server, clients, range(r, r + 1), traffic)
        seconds.append(time.perf_counter() - start)
    assert server.trajectory.rounds == trainer.trajectory.rounds
    return {
        "trainer": {"seconds_per_round": trainer_seconds, "comm": dict(trainer.comm)},
        "protocol": {"seconds_per_round": seconds, "comm": traffic},
        "trajectory": [r.scalars for r in trainer.trajectory.rounds],
    }


def simulation(config: dict, folder: Path) -> dict:
    config = {**config, "output-dir": str(folder / "sim-out"), "state-dir": str(folder / "sim-state")}
    (folder / "sim.json").write_text(json.dumps(config))
    script = Path(__file__).resolve().parent.parent / "tests" / "flower_simulation.py"
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, str(script), str(folder / "sim.json"), str(config["num-clients"])],
        check=True,
        timeout=1200,
        capture_output=True,
        start_new_session=True,
    )
    summary = json.loads((folder / "sim-out" / "flower_summary.json").read_text())
    return {**summary, "wall_seconds": time.perf_counter() - start}


def deployment(config: dict, folder: Path) -> dict:
    from hosfl_hf.integrations.flower.local import LocalDeployment

    config = {**config, "output-dir": str(folder / "dep-out")}
    start = time.perf_counter()
    with LocalDeployment(config["num-clients"], state_dir=folder / "dep-state", workdir=folder / "dep") as d:
        code, output = d.run(config, timeout=1800)
    path = folder / "dep-out" / "flower_summary.json"
    if not path.is_file():
        raise RuntimeError(f"The deployment wrote no summary (flwr exit {code}):\n{output[-4000:]}")
    return {**json.loads(path.read_text()), "wall_seconds": time.perf_counter() - start}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="docs/results")
    parser.add_argument("--skip_deployment", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        config = build(folder)
        results = {"command": "python benchmarks/flower_rounds.py --out " + args.out, "config": CONFIG}
        results.update(in_process(config, folder))
        results["simulation"] = simulation(config, folder)
        if not args.skip_deployment:
            results["deployment"] = deployment(config, folder)
    digests = {results[k]["client_digest"] for k in ("simulation", "deployment") if k in results}
    assert len(digests) == 1, "the Flower runs ended with different client parts"
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "flower_rounds.json"), "w") as f:
        json.dump(results, f, indent=1)
    rounds = CONFIG["num-rounds"]
    lines = [
        "# Seconds and bytes per round: in-process vs Flower (CPU, 2 cores)",
        "",
        f"Random Llama (hidden 64, 4 blocks, split after 2), {CONFIG['num-clients']} clients, "
        f"{CONFIG['clients-per-round']} per round, batch {CONFIG['batch-size']} x 32 tokens, {rounds} rounds, "
        f"P = 2. Command: `{results['command']}`. Bytes per round are totals over the round's clients.",
        "",
        "| run | median s / round | activation bytes / round | sync bytes / round |",
        "| --- | ---: | ---: | ---: |",
    ]
    for name in ("trainer", "protocol", "simulation", "deployment"):
        if name not in results:
            continue
        r = results[name]
        median = sorted(r["seconds_per_round"])[len(r["seconds_per_round"]) // 2]
        lines.append(
            f"| {name} | {median:.3f} | {r['comm']['activation_bytes'] / rounds:,.0f} | "
            f"{r['comm']['sync_bytes'] / rounds:,.0f} |"
        )
    for name in ("simulation", "deployment"):
        if name in results:
            spent = ", ".join(f"{k} {v / rounds:.2f} s" for k, v in results[name]["exchange_seconds"].items())
            lines.append(
                f"\n{name}: per round, exchanges took {spent}; whole run {results[name]['wall_seconds']:.0f} s."
            )
    with open(os.path.join(args.out, "flower_rounds.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
