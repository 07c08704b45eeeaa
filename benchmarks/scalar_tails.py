"""How heavy-tailed are the clients' zeroth-order scalars on the shipped SmolLM2? Where they are, the mean and the
robust rules (median, trimmed mean) aggregate to different values even without attackers; where they are not, the
rules agree up to noise. Writes `scalar_tails.json` / `.md`.

    python benchmarks/scalar_tails.py --out docs/results     # SmolLM2-135M + LoRA, SST-2, ~5 min on 2 CPU cores

Setting of the README's main job (split after block 10, LoRA r8/a16 on q,v in both parts, batch 8, P=2, mu=1e-3):
at the initial weights, every one of 10 clients computes its scalars for the same seeds on its own batch, for
several rounds and LoRA seeds. Then, for every group of K=5 clients, the three rules aggregate the same scalars.
No training step is taken: this isolates the aggregation.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hosfl_hf import HOSFLConfig  # noqa: E402
from hosfl_hf.aggregation import aggregate_scalars  # noqa: E402
from hosfl_hf.models import load_model_and_tokenizer  # noqa: E402
from hosfl_hf.protocol import RoundPlan, RoundSettings, SplitClient, SplitServer  # noqa: E402
from hosfl_hf.rng import cpu_generator, round_seeds  # noqa: E402
from hosfl_hf.tasks import VerbalizerCollator, VerbalizerLoss, get_task  # noqa: E402


def scalars_of(seed: int, rounds: int, num_clients: int, train_limit: int) -> list[list[list[float]]]:
    """scalars[round][client] = the P scalars of that client's batch (initial weights, LoRA seeded by `seed`)."""
    from peft import LoraConfig, get_peft_model

    model, tokenizer = load_model_and_tokenizer("smollm2")
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
        model = get_peft_model(model, config)
    task = get_task("sst2")
    data = task.tokenize(task.load("train", limit=train_limit, seed=seed), tokenizer, max_length=128)
    args = HOSFLConfig(
        output_dir="/tmp/scalar-tails",
        split_layer=10,
        num_clients=num_clients,
        clients_per_round=num_clients,
        per_device_train_batch_size=8,
        num_perturbations=2,
        zo_eps=1e-3,
        max_steps=rounds,
        seed=seed,
        use_cpu=True,
        report_to=[],
    )
    settings = RoundSettings.from_args(args)
    loss = VerbalizerLoss(task.verbalizer_ids(tokenizer))
    server = SplitServer(copy.deepcopy(model), settings, args, loss_func=loss)
    # At the initial weights every client holds the same part: one object answers for each id in turn (its id picks
    # its shard and batch).
    client = SplitClient(model, 0, settings, data, VerbalizerCollator(tokenizer))
    out = []
    for r in range(rounds):
        plan = RoundPlan(round=r, clients=list(range(num_clients)), seeds=round_seeds(seed, r, 2))
        per_client = []
        for c in range(num_clients):
            client.client_id = c
            cotangent = server.backward(client.forward(plan))
            per_client.append(client.probe(plan, cotangent).scalars)
        server.discard_round()
        out.append(per_client)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="docs/results")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--groups", type=int, default=200, help="random groups of K=5 clients per round")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    start = time.perf_counter()
    rows = []
    for seed in range(args.seeds):
        scalars = scalars_of(seed, args.rounds, 10, 2000)
        values = [abs(v) for rnd in scalars for client in rnd for v in client]
        g = cpu_generator(seed)
        diffs = {"median": [], "trimmed_mean": []}
        for rnd in scalars:
            for _ in range(args.groups):
                group = torch.randperm(10, generator=g)[:5].tolist()
                replies = {c: rnd[c] for c in group}
                mean = aggregate_scalars(replies, 2, "mean")
                for rule in diffs:
                    other = aggregate_scalars(replies, 2, rule, 0.2)
                    diffs[rule] += [abs(o - m) / (abs(m) + 1e-30) for o, m in zip(other, mean)]
        row = {
            "seed": seed,
            "scalars": scalars,
            "median_abs": statistics.median(values),
            "mean_abs": statistics.fmean(values),
            "max_over_median": max(values) / statistics.median(values),
            "mean_over_median": statistics.fmean(values) / statistics.median(values),
            **{f"{rule}_vs_mean_relative_difference_median": statistics.median(d) for rule, d in diffs.items()},
        }
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "scalars"}), flush=True)
        write(args.out, rows, time.perf_counter() - start, argv)  # after every seed: a stopped run keeps its seeds


def write(out: str, rows: list[dict], seconds: float, argv=None) -> None:
    result = {"command": "python benchmarks/scalar_tails.py " + " ".join(argv or sys.argv[1:]), "seconds": seconds}
    result["rows"] = rows
    Path(out).mkdir(parents=True, exist_ok=True)
    Path(out, "scalar_tails.json").write_text(json.dumps(result, indent=1))
    header = "| LoRA seed | median abs scalar | mean abs / median abs | max abs / median abs | "
    header += "median / mean rel. diff | trimmed / mean rel. diff |"
    lines = [header, "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['seed']} | {r['median_abs']:.3g} | {r['mean_over_median']:.2f} | {r['max_over_median']:.1f} | "
            f"{r['median_vs_mean_relative_difference_median']:.2f} | "
            f"{r['trimmed_mean_vs_mean_relative_difference_median']:.2f} |"
        )
    Path(out, "scalar_tails.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
