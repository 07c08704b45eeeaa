"""The cost of the cut noise (issue #30): SST-2 accuracy of a short HO-SFL fine-tune of SmolLM2-135M at each noise
scale, with paired seeds.

    python benchmarks/privacy_accuracy.py --noises 0 1 2 --seeds 0 1 --rounds 30 --threads 2
    python benchmarks/privacy_accuracy.py --inference_only --noises 0 0.25 0.5 1 2 --seeds 0 1   # minutes

`--inference_only` measures the pretrained model (no fine-tune) through the noisy cut at each noise scale: the cost
the server's blocks pay for noisy input, with `--seeds` as noise secrets on the same sentences (paired).

Every run of a seed shares the shards, client sampling, batches, LoRA initialisation and split (the grid's harness,
`benchmarks/grid.py`: split 10, 10 clients, 3 per round, batch 8, P = 2, LoRA r8 on q/v in both parts): only the
client's noise (`cut_noise`, secret seed = the run seed) differs. Accuracy is measured on `--eval_limit` SST-2
validation sentences twice: clean (the fine-tuned model used without noise) and noisy (inference through the same
noisy cut). Each finished run is written at once to `<out>/privacy_accuracy.json` and `.md`; a stopped run keeps what
it finished and the next call runs the rest. `--plot` draws `<out>/privacy_accuracy.png`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace

import numpy as np
import torch
import transformers

sys.path.insert(0, os.path.dirname(__file__))
from grid import Budget, hosfl_args  # noqa: E402

from hosfl_hf import HOSFLTrainer  # noqa: E402
from hosfl_hf.models import load_model_and_tokenizer  # noqa: E402
from hosfl_hf.privacy import CutDefense  # noqa: E402
from hosfl_hf.tasks import VerbalizerCollator, get_task  # noqa: E402

SPLIT_LAYER = 10


@torch.no_grad()
def accuracy(trainer: HOSFLTrainer, dataset, tokenizer, verbalizers: list[int], defense: CutDefense | None) -> float:
    """Accuracy of the trained model on `dataset`, through `defense`'s noisy cut when given."""
    collate = VerbalizerCollator(tokenizer)
    split = trainer.split
    split.model.eval()
    correct = 0
    for start in range(0, len(dataset), 32):
        batch = collate([dataset[i] for i in range(start, min(start + 32, len(dataset)))])
        cut = split.client(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        if defense is not None:
            cut = replace(cut, hidden_states=defense.release(cut.hidden_states, round_index=-1 - start, client=0))
        logits = split.server(cut, logits_to_keep=1).logits[:, -1, verbalizers]
        correct += int((logits.argmax(-1) == batch["labels"]).sum())
    return correct / len(dataset)


@torch.no_grad()
def inference_only(noises: list[float], seeds: list[int], eval_limit: int, data_dir: str | None) -> list[dict]:
    """Zero-shot accuracy of the pretrained model through the noisy cut at split 10: one row per (noise, secret)."""
    from hosfl_hf.split import split_model

    task = get_task("sst2")
    model, tokenizer = load_model_and_tokenizer("smollm2")
    model.eval()
    validation = task.tokenize(task.load("validation", data_dir, eval_limit), tokenizer, 128)
    verbalizers = task.verbalizer_ids(tokenizer)
    holder = type("Holder", (), {"split": split_model(model, SPLIT_LAYER)})()
    rows = []
    for noise in noises:
        for seed in seeds if noise > 0 else seeds[:1]:
            defense = CutDefense(noise=noise, secret=seed) if noise > 0 else None
            start = time.perf_counter()
            acc = accuracy(holder, validation, tokenizer, verbalizers, defense)
            rows.append({"noise": noise, "seed": seed, "accuracy": acc, "eval_examples": len(validation)})
            print(
                f"inference noise {noise:g} secret {seed}: {acc:.4f} ({time.perf_counter() - start:.0f} s)", flush=True
            )
    return rows


def run(noise: float, seed: int, rounds: int, eval_limit: int, data_dir: str | None) -> dict:
    from peft import LoraConfig, get_peft_model

    budget = Budget(rounds=rounds, eval_points=1, curve_eval_limit=32)
    task = get_task("sst2")
    model, tokenizer = load_model_and_tokenizer("smollm2")
    transformers.set_seed(seed)
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    train = task.tokenize(task.load("train", data_dir), tokenizer, budget.max_length)
    validation = task.tokenize(task.load("validation", data_dir, eval_limit), tokenizer, budget.max_length)
    args = hosfl_args(
        "hosfl",
        SPLIT_LAYER,
        seed,
        budget,
        output_dir=os.path.join("/tmp", "hosfl_privacy_accuracy"),
        cut_noise=noise,
        cut_noise_seed=seed,
        eval_strategy="no",
        disable_tqdm=True,
    )
    trainer = HOSFLTrainer(
        model, args, train_dataset=train, processing_class=tokenizer, **task.trainer_kwargs(tokenizer)
    )
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    verbalizers = task.verbalizer_ids(tokenizer)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    defense = CutDefense(noise=noise, secret=seed + 1000) if noise > 0 else None
    return {
        "noise": noise,
        "seed": seed,
        "rounds": rounds,
        "split_layer": SPLIT_LAYER,
        "eval_examples": len(validation),
        "accuracy_clean": accuracy(trainer, validation, tokenizer, verbalizers, None),
        "accuracy_noisy": accuracy(trainer, validation, tokenizer, verbalizers, defense),
        "train_losses": losses,
        "mean_train_loss": float(np.mean(losses)) if losses else None,
        "round_seconds": seconds / rounds,
    }


def write(out: str, results: list[dict], inference: list[dict] | None = None) -> None:
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "privacy_accuracy.json")
    inference = inference if inference is not None else load(out).get("inference", [])
    with open(path + ".tmp", "w") as f:
        json.dump({"results": results, "inference": inference}, f, indent=1)
    os.replace(path + ".tmp", path)
    by_seed = {(r["noise"], r["seed"]): r for r in results}
    lines = [
        "# Cut noise vs SST-2 accuracy: SmolLM2-135M-Instruct, HO-SFL, split 10",
        "",
        "Paired seeds: every run of a seed shares data, sampling, batches and LoRA initialisation; only the noise "
        "differs. Accuracy on a fixed subset of the SST-2 validation set, clean (the fine-tuned model without noise) "
        "and noisy (inference through the noisy cut). `delta` is the paired difference from noise 0 (clean "
        "accuracy). Generated by `benchmarks/privacy_accuracy.py`.",
        "",
        "| noise | seed | rounds | eval | accuracy (clean) | accuracy (noisy cut) | delta vs noise 0 "
        "| mean train loss | s/round |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in sorted(results, key=lambda r: (r["noise"], r["seed"])):
        base = by_seed.get((0.0, r["seed"]))
        delta = "-" if base is None else f"{100 * (r['accuracy_clean'] - base['accuracy_clean']):+.1f} pt"
        lines.append(
            f"| {r['noise']:g} | {r['seed']} | {r['rounds']} | {r['eval_examples']} "
            f"| {100 * r['accuracy_clean']:.1f} % | {100 * r['accuracy_noisy']:.1f} % | {delta} "
            f"| {r['mean_train_loss']:.4f} | {r['round_seconds']:.1f} |"
        )
    if not results:
        lines[-2:] = ["No fine-tuned run stored yet (run without `--inference_only`)."]
    if inference:
        lines += [
            "",
            "## Inference through the noisy cut (pretrained model, no fine-tune)",
            "",
            f"SmolLM2-135M-Instruct, split {SPLIT_LAYER}, the `Review: ...\\nSentiment:` prompt, accuracy on the same "
            f"{inference[0]['eval_examples']} SST-2 validation sentences for every row; `secret` is the noise seed.",
            "",
            "| noise | secret | accuracy |",
            "| --- | --- | --- |",
        ]
        lines += [f"| {r['noise']:g} | {r['seed']} | {100 * r['accuracy']:.1f} % |" for r in inference]
    with open(os.path.join(out, "privacy_accuracy.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def load(out: str) -> dict:
    path = os.path.join(out, "privacy_accuracy.json")
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


def plot(out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = load(out)
    results, inference = data.get("results", []), data.get("inference", [])
    fig, ax = plt.subplots(figsize=(5, 4))
    if inference:
        noises = sorted({r["noise"] for r in inference})
        means = [100 * np.mean([r["accuracy"] for r in inference if r["noise"] == n]) for n in noises]
        ax.plot(noises, means, "s--", label="pretrained, noisy-cut inference")
    noises = sorted({r["noise"] for r in results})
    curves = (("accuracy_clean", "fine-tuned, clean inference"), ("accuracy_noisy", "fine-tuned, noisy cut"))
    for key, label in curves if results else ():
        means = [100 * np.mean([r[key] for r in results if r["noise"] == n]) for n in noises]
        ax.plot(noises, means, "o-", label=label)
        for r in results:
            ax.plot(r["noise"], 100 * r[key], ".", color="gray", alpha=0.5)
    ax.set(xlabel="noise sigma (x token RMS)", ylabel="SST-2 accuracy (%)", title="cost of the cut noise (split 10)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out, "privacy_accuracy.png"), dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--noises", type=float, nargs="*", default=[0.0, 1.0, 2.0])
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--eval_limit", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data_dir", default=None)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "docs", "results"))
    parser.add_argument("--plot", action="store_true", help="only draw the plot from the written file")
    parser.add_argument("--inference_only", action="store_true", help="the pretrained model through the noisy cut")
    args = parser.parse_args()
    if args.plot:
        data = load(args.out)
        write(args.out, data.get("results", []), data.get("inference", []))
        plot(args.out)
        return
    torch.set_num_threads(args.threads)
    results = [r for r in load(args.out).get("results", []) if r["rounds"] == args.rounds]
    if args.inference_only:
        write(args.out, results, inference_only(args.noises, args.seeds, args.eval_limit, args.data_dir))
        plot(args.out)
        return
    done = {(r["noise"], r["seed"]) for r in results}
    for seed in args.seeds:
        for noise in args.noises:
            if (noise, seed) in done:
                continue
            result = run(noise, seed, args.rounds, args.eval_limit, args.data_dir)
            results.append(result)
            write(args.out, results)
            print(
                f"noise {noise:g} seed {seed}: clean {result['accuracy_clean']:.4f} "
                f"noisy {result['accuracy_noisy']:.4f} ({result['round_seconds']:.1f} s/round)",
                flush=True,
            )
    plot(args.out)


if __name__ == "__main__":
    main()
