"""Do the robust aggregation rules change anything without attackers? Paired runs over seeds: the same federation
(data, sampling, seeds) under `mean`, `median` and `trimmed_mean`, plus a run whose clients never move
(`client_learning_rate=0`) to show how much the client update matters at all. Writes `robust_no_attack.json` / `.md`.

    python benchmarks/robust_no_attack.py --out docs/results            # tiny random Llama, ~5 min on 2 cores

Per run: the held-out loss of the trained model, and the mean |aggregated scalar| over rounds (how large the client
step is: the rules differ there first). With `K` scalars per seed the median and the trimmed mean estimate the
centre of the clients' distribution, the mean its average; for a symmetric distribution they agree in expectation,
but the median's variance is larger (about pi/2 times the mean's for Gaussian scalars) and a heavy tail pulls the
mean outward.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from reliability import Federation  # noqa: E402


def one(folder: Path, rule: str, seed: int, rounds: int, optimizer: str, client_lr: float, server_lr: float, pad):
    fed = Federation(
        folder,
        rounds,
        seed=seed,
        num_clients=10,
        clients_per_round=5,
        aggregation=rule,
        client_optimizer=optimizer,
        client_learning_rate=client_lr,
        learning_rate=server_lr,
        pad_token_id=pad,
    )
    initial = fed.eval_loss()
    fed.train()
    scalars = [abs(v) for r in fed.run.server.trajectory.rounds for v in r.scalars]
    return {
        "rule": rule,
        "seed": seed,
        "client_lr": client_lr,
        "eval_loss_initial": initial,
        "eval_loss": fed.eval_loss(),
        "mean_abs_aggregate": statistics.fmean(scalars),
    }


SETTINGS = {
    "sgd, token 0 = zero padding row": ("sgd", 1e-4, 3e-3, 0),
    "sgd": ("sgd", 1e-4, 3e-3, None),
    "adamw": ("adamw", 1e-3, 3e-3, None),
    "adamw, server frozen": ("adamw", 1e-3, 0.0, None),
}
"""name: client optimizer, client lr, server lr (0: only the clients learn, so the rule decides everything), and the
model's `pad_token_id` (0: the embedding of token 0, a real token of the task, is a zero row, as in the tests' tiny
model; None: no padding row)."""


def summarize(rows: list[dict], baseline: str = "mean") -> list[dict]:
    out = []
    by_seed = {(r["rule"], r["seed"]): r for r in rows}
    for rule in dict.fromkeys(r["rule"] for r in rows):
        runs = [r for r in rows if r["rule"] == rule]
        diffs = [r["eval_loss"] - by_seed[(baseline, r["seed"])]["eval_loss"] for r in runs]
        sd = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
        out.append(
            {
                "rule": rule,
                "seeds": len(runs),
                "eval_loss_mean": statistics.fmean(r["eval_loss"] for r in runs),
                "eval_loss_sd": statistics.stdev([r["eval_loss"] for r in runs]) if len(runs) > 1 else 0.0,
                "paired_diff_vs_mean": statistics.fmean(diffs),
                "paired_diff_se": sd / len(diffs) ** 0.5,
                "mean_abs_aggregate": statistics.fmean(r["mean_abs_aggregate"] for r in runs),
            }
        )
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="docs/results")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=40)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    import logging

    logging.getLogger("hosfl_hf").setLevel(logging.ERROR)
    result = {"command": "python benchmarks/robust_no_attack.py " + " ".join(argv or sys.argv[1:]), "settings": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (optimizer, client_lr, server_lr, pad) in SETTINGS.items():
            rows = []
            for seed in range(args.seeds):
                for rule, lr in (
                    ("mean", client_lr),
                    ("median", client_lr),
                    ("trimmed_mean", client_lr),
                    ("frozen", 0),
                ):
                    folder = Path(tmp) / f"{name}-{rule}-{seed}"
                    rule_name = rule.replace("frozen", "mean")
                    rows.append(one(folder, rule_name, seed, args.rounds, optimizer, lr, server_lr, pad))
                    rows[-1]["rule"] = rule
                    print(json.dumps(rows[-1]), flush=True)
            block = {
                "client_optimizer": optimizer,
                "client_lr": client_lr,
                "server_lr": server_lr,
                "pad_token_id": pad,
            }
            result["settings"][name] = {**block, "runs": rows, "summary": summarize(rows)}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    Path(args.out, "robust_no_attack.json").write_text(json.dumps(result, indent=1))
    lines = []
    for name, block in result["settings"].items():
        lines += [
            f"{name}: {block['client_optimizer']} clients (lr {block['client_lr']}), server lr {block['server_lr']}, "
            f"10 clients, 5 per round, {args.rounds} rounds, {args.seeds} seeds:",
            "",
            "| rule | held-out loss (mean +- sd) | paired difference vs mean (+- se) | mean abs aggregated scalar |",
            "|---|---|---|---|",
        ]
        for s in block["summary"]:
            lines.append(
                f"| {s['rule']} | {s['eval_loss_mean']:.4f} +- {s['eval_loss_sd']:.4f} | "
                f"{s['paired_diff_vs_mean']:+.4f} +- {s['paired_diff_se']:.4f} | {s['mean_abs_aggregate']:.3g} |"
            )
        lines.append("")
    Path(args.out, "robust_no_attack.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
