"""Seconds per round of the README main job (SmolLM2-135M on SST-2, the `sst2-smollm2` recipe), measured in one run:

* `trainer`: `HOSFLTrainer` of this checkout (it drives the round's loop, `FederatedRun`);
* `trainer@<ref>`: `HOSFLTrainer` of another commit (default: the last one before the trainer drove the loop), from
  a `git worktree` of it, run with the same settings in a subprocess;
* `protocol`: the same rounds on the protocol in one process (`SplitServer` + one `SplitClient` per client, each with
  its own copy of the client part, `FederatedRun` over `InProcessTransport`).

The versions alternate (A B C A B C ...) so that the machine's drift hits each alike; each measurement skips its first
`--warmup` rounds. Writes docs/results/round_speed.{json,md,png}.

    python benchmarks/round_speed.py --rounds 12 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "results"
BEFORE = "79474ce"  # main before the trainer drove FederatedRun (#28)


def build(rounds: int, output_dir: str):
    """The recipe's model, data, LoRA and settings (hosfl_hf.cli), at `rounds` rounds."""
    from hosfl_hf.cli import parse_recipe_args
    from hosfl_hf.cli.train import build_task, get_peft_config, load_model, load_splits

    script_args, model_args, args = parse_recipe_args(
        "sst2-smollm2", ["--max_steps", str(rounds), "--output_dir", output_dir, "--logging_steps", "1000"]
    )
    task = build_task(script_args)
    if not task.verbalizers:
        task = task.with_verbalizers_of(task.load(task.train_split, script_args.data_dir))
    raw_train, _, _ = load_splits(task, script_args)
    model, tokenizer = load_model(model_args, args)
    train = task.tokenize(raw_train, tokenizer, script_args.max_length)
    return model, tokenizer, train, task.trainer_kwargs(tokenizer), get_peft_config(model_args), args


def measure_trainer(rounds: int, warmup: int) -> list[float]:
    import torch
    from transformers import TrainerCallback

    from hosfl_hf import HOSFLTrainer

    with tempfile.TemporaryDirectory() as tmp:
        model, tokenizer, train, kwargs, peft_config, args = build(rounds, tmp)
        stamps: list[float] = []

        class Clock(TrainerCallback):
            def on_step_end(self, *a, **k):
                stamps.append(time.perf_counter())

        trainer = HOSFLTrainer(
            model, args, train_dataset=train, processing_class=tokenizer, peft_config=peft_config, **kwargs
        )
        trainer.add_callback(Clock())
        torch.manual_seed(0)
        trainer.train()
    return [b - a for a, b in zip(stamps, stamps[1:])][warmup:]


def measure_protocol(rounds: int, warmup: int) -> list[float]:
    import copy

    from hosfl_hf import HOSFLTrainer
    from hosfl_hf.protocol import FederatedRun, InProcessTransport, RoundSettings, SplitClient, SplitServer

    with tempfile.TemporaryDirectory() as tmp:
        model, tokenizer, train, kwargs, peft_config, args = build(rounds, tmp)
        # The trainer only to add the run's LoRA adapters the same way (seeded) and split the model.
        model = HOSFLTrainer(model, args, train_dataset=train, peft_config=peft_config, **kwargs).model
        settings = RoundSettings.from_args(args)
        loss = kwargs.get("compute_loss_func")
        collator = kwargs["data_collator"]
        server = SplitServer(copy.deepcopy(model), settings, args, loss_func=loss)
        clients = {c: SplitClient(copy.deepcopy(model), c, settings, train, collator) for c in range(args.num_clients)}
        run = FederatedRun(server, InProcessTransport(clients))
        seconds = []
        for r in range(rounds):
            start = time.perf_counter()
            run.run_round(r)
            seconds.append(time.perf_counter() - start)
    return seconds[warmup:]


def child(kind: str, rounds: int, warmup: int) -> None:
    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    seconds = measure_trainer(rounds, warmup) if kind == "trainer" else measure_protocol(rounds, warmup)
    print("SECONDS " + json.dumps(seconds), flush=True)


def run_child(kind: str, rounds: int, warmup: int, path: Path) -> list[float]:
    env = dict(os.environ, PYTHONPATH=str(path), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    shared = ROOT.parent / "shared" / "data"  # the other commit's worktree has no ../shared beside it
    if "HOSFL_DATA_DIR" not in env and shared.is_dir():
        env["HOSFL_DATA_DIR"] = str(shared)
    command = [sys.executable, str(Path(__file__).resolve()), "--child", kind, "--rounds", str(rounds)]
    command += ["--warmup", str(warmup)]
    result = subprocess.run(command, cwd=path, env=env, capture_output=True, text=True, timeout=3600)
    lines = [line for line in result.stdout.splitlines() if line.startswith("SECONDS ")]
    if result.returncode != 0 or not lines:
        raise RuntimeError(f"{kind} in {path} failed:\n{result.stderr[-4000:]}")
    return json.loads(lines[-1].removeprefix("SECONDS "))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--before", default=BEFORE, help="the commit to compare the trainer with")
    parser.add_argument("--child", choices=["trainer", "protocol"])
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.rounds, args.warmup)

    worktree = Path(tempfile.mkdtemp(prefix="hosfl-before-"))
    subprocess.run(["git", "worktree", "add", "--detach", str(worktree), args.before], cwd=ROOT, check=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    runs = {"trainer": [], f"trainer@{args.before}": [], "protocol": []}
    try:
        for repeat in range(args.repeats):
            for name in runs:
                kind, path = ("protocol", ROOT) if name == "protocol" else ("trainer", ROOT)
                if "@" in name:
                    path = worktree
                seconds = run_child(kind, args.rounds, args.warmup, path)
                runs[name].append(seconds)
                print(f"repeat {repeat} {name}: {statistics.median(seconds):.3f} s/round", flush=True)
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(worktree)], cwd=ROOT, check=False)

    median = {name: statistics.median([s for rep in reps for s in rep]) for name, reps in runs.items()}
    before = median[f"trainer@{args.before}"]
    result = {
        "commit": commit.strip(),
        "before": args.before,
        "job": "sst2-smollm2 (README main job), LoRA r8 both parts, K=3 of 10, P=2, batch 8, 2 CPU threads",
        "rounds": args.rounds,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "seconds_per_round": runs,
        "median_seconds_per_round": median,
        "trainer_ratio_to_before": median["trainer"] / before,
        "protocol_ratio_to_trainer": median["protocol"] / median["trainer"],
    }
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "round_speed.json").write_text(json.dumps(result, indent=1) + "\n")
    rows = "\n".join(f"| `{name}` | {value:.3f} |" for name, value in median.items())
    (OUT / "round_speed.md").write_text(
        f"# Seconds per round, README main job ({result['job']})\n\n"
        f"Commit {result['commit']}, against `{args.before}`; {args.repeats} alternating repeats of {args.rounds} "
        f"rounds, first {args.warmup} skipped; medians over all measured rounds.\n\n"
        "| version | median s/round |\n| --- | --- |\n"
        f"{rows}\n\n"
        f"- trainer / trainer before: **{result['trainer_ratio_to_before']:.3f}**\n"
        f"- protocol in one process / trainer: **{result['protocol_ratio_to_trainer']:.3f}**\n"
    )
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3))
    names = list(runs)
    ax.boxplot([[s for rep in runs[n] for s in rep] for n in names], tick_labels=names)
    ax.set_ylabel("seconds per round")
    ax.set_title("README main job: seconds per round")
    fig.tight_layout()
    fig.savefig(OUT / "round_speed.png", dpi=120)
    print(json.dumps({k: result[k] for k in ("median_seconds_per_round", "trainer_ratio_to_before")}, indent=1))


if __name__ == "__main__":
    main()
