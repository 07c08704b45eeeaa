"""The accuracy grid: every (method, task, depth, seed) cell in the same harness, resumable.

    python benchmarks/grid.py                       # the default CPU budget, all cells, in priority order
    python benchmarks/grid.py --methods hosfl splitlora frozen_client --tasks sst2 --depths deep --seeds 0 1 2
    python benchmarks/grid.py --rounds 8889 --batch 32 --max_length 128   # the paper's budget (80k samples)

Each cell writes `<out>/cells/<method>_<task>_<depth>_s<seed>.json` when it finishes (depth `nosplit` for FedAvg-LoRA,
centralized and MeZO, which serve both depths); cells whose file exists are skipped, so a stopped run keeps what it
finished and the next run fills in the rest. Workers started side by side (`--threads 1` each) share the grid through
file locks (`filelock`, released by the OS when a worker stops). Every method of a seed sees the
same shards, client sampling and batches (one schedule per seed), the same LoRA initialisation, prompts and split.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import transformers
from filelock import FileLock, Timeout
from peft import LoraConfig, get_peft_model
from transformers.trainer_utils import get_last_checkpoint

from hosfl_hf import HOSFLConfig, HOSFLTrainer
from hosfl_hf.algorithms import ALGORITHMS
from hosfl_hf.models import load_model_and_tokenizer
from hosfl_hf.tasks import get_task
from hosfl_hf.trainer import NO_SPLIT, ZO_EVERYWHERE  # NO_SPLIT methods do not depend on the depth

# Every method, in the algorithm registry's order (one order for the grid and the report). The grid runs them by TIER
# first (the headline comparison, then the other split methods, then the rest), in the registry's order within a tier.
METHODS = list(ALGORITHMS)
TIER = {"hosfl": 0, "splitlora": 0, "frozen_client": 0, "zo_sfl": 1, "client_only": 1}


@dataclass
class Budget:
    rounds: int = 60
    batch: int = 8
    max_length: int = 128
    num_clients: int = 10
    clients_per_round: int = 3
    fo_lr: float = 1e-3  # LoRA learning rate of every part trained by backprop (AdamW)
    zo_lr: float = 1e-4  # LoRA learning rate of every part trained by zeroth-order updates (AdamW)
    zo_eps: float = 1e-3
    hosfl_perturbations: int = 2  # the paper's P for HO-SFL
    zo_perturbations: int = 1  # the paper's P for ZO-SFL (and MeZO)
    lora_r: int = 8
    lora_alpha: int = 16
    eval_points: int = 3
    curve_eval_limit: int = 256
    eval_limit: int = 0  # 0: the full validation set (final accuracy and McNemar tests)


def split_for(depth: str, num_layers: int) -> int:
    return {"shallow": num_layers // 3, "deep": (2 * num_layers) // 3}[depth]


def cell_depth(method: str, depth: str) -> str:
    """The depth a cell is filed under: methods without a split have one cell (`nosplit`) serving both depths."""
    return "nosplit" if method in NO_SPLIT else depth


def cell_name(method: str, task: str, depth: str, seed: int) -> str:
    return f"{method}_{task}_{cell_depth(method, depth)}_s{seed}"


def plan_cells(
    methods: list[str], tasks: list[str], depths: list[str], seeds: list[int]
) -> list[tuple[str, str, str, int]]:
    """The (method, task, depth, seed) cells to run, in priority order, one per cell file.

    Priority: task by task, deep split first, the headline comparison (HO-SFL, SplitLoRA, frozen client) before
    the other methods. Methods without a split appear once per (task, seed).
    """
    cells = sorted(
        ((m, t, d, s) for m in methods for t in tasks for d in depths for s in seeds),
        key=lambda c: (tasks.index(c[1]), depths.index(c[2]), TIER.get(c[0], 2), c[3], METHODS.index(c[0])),
    )
    seen: set[str] = set()
    return [c for c in cells if not (cell_name(*c) in seen or seen.add(cell_name(*c)))]


def claim(path: str) -> FileLock | None:
    """Claims a cell for this process, so several workers can share one grid: a `filelock.FileLock` held while the
    cell runs (`None` if another worker holds it). The OS releases it when its process ends, so the cell of a stopped
    worker is free again."""
    lock = FileLock(path + ".lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        return None
    if os.path.isfile(path):  # another worker finished it meanwhile
        lock.release()
        return None
    return lock


def hosfl_args(
    method: str, split_layer: int, seed: int, budget: Budget, output_dir: str, **overrides: object
) -> HOSFLConfig:
    """The cell's config; `overrides` replace any of its values (the client-update study's levers)."""
    zo_everywhere = method in ZO_EVERYWHERE
    values = dict(
        output_dir=output_dir,
        algorithm=method,
        split_layer=split_layer,
        num_clients=budget.num_clients,
        clients_per_round=budget.clients_per_round,
        per_device_train_batch_size=budget.batch,
        per_device_eval_batch_size=32,
        max_steps=budget.rounds,
        learning_rate=budget.zo_lr if zo_everywhere else budget.fo_lr,
        client_learning_rate=budget.fo_lr if method == "splitlora" else budget.zo_lr,
        num_perturbations=budget.zo_perturbations if zo_everywhere else budget.hosfl_perturbations,
        zo_eps=budget.zo_eps,
        warmup_steps=max(1, budget.rounds // 20),
        logging_steps=1,
        eval_strategy="steps",
        eval_steps=max(1, budget.rounds // budget.eval_points),
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=seed,
        disable_tqdm=False,
    )
    return HOSFLConfig(**{**values, **overrides})


def run_cell(
    method: str,
    task_name: str,
    depth: str,
    seed: int,
    budget: Budget,
    data_dir: str | None,
    overrides: dict | None = None,
    make_mask: object = None,
    prepare_model: object = None,
    checkpoint_dir: str | None = None,
    checkpoint_every: int = 0,
) -> dict:
    """One run. `overrides` (HOSFLConfig values), `make_mask` (`make_mask(split_layer, task, tokenizer, seed)`
    -> a `ClientMask`, called on a separate copy of the initial model) and `prepare_model` (`prepare_model(model,
    split_layer, task, tokenizer, seed)`, called on the run's model before the trainer is built) serve the
    client-update study. With `checkpoint_every > 0` the run saves a checkpoint to `checkpoint_dir` every that many
    rounds and resumes from the last one a stopped run left there (bit-identical to an unstopped run); the caller
    removes the folder once the result is stored."""
    task = get_task(task_name)
    model, tokenizer = load_model_and_tokenizer("smollm2")
    num_layers = model.config.num_hidden_layers
    split_layer = split_for(depth, num_layers)
    transformers.set_seed(seed)  # same LoRA initialisation for every method of this seed
    lora = LoraConfig(
        r=budget.lora_r,
        lora_alpha=budget.lora_alpha,
        target_modules=["q_proj", "v_proj"],
        lora_dropout=0.0,
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora)
    train = task.tokenize(task.load("train", data_dir), tokenizer, budget.max_length)
    validation = task.tokenize(
        task.load("validation", data_dir, budget.eval_limit or None), tokenizer, budget.max_length
    )
    curve_set = validation.shuffle(seed=0).select(range(min(budget.curve_eval_limit, len(validation))))
    output_dir = os.path.join("/tmp", "hosfl_grid", method)
    overrides = dict(overrides or {})
    if checkpoint_every > 0:
        if not checkpoint_dir:
            raise ValueError("run_cell(checkpoint_every > 0) needs a checkpoint_dir for this run alone.")
        output_dir = checkpoint_dir
        overrides.update(save_strategy="steps", save_steps=checkpoint_every, save_total_limit=1)
    args = hosfl_args(method, split_layer, seed, budget, output_dir=output_dir, **overrides)
    mask = make_mask(split_layer, task, tokenizer, seed) if make_mask is not None else None
    if prepare_model is not None:
        prepare_model(model, split_layer, task, tokenizer, seed)
    trainer = HOSFLTrainer(
        model,
        args,
        train_dataset=train,
        eval_dataset=curve_set,
        processing_class=tokenizer,
        client_mask=mask,
        **task.trainer_kwargs(tokenizer),
    )
    start = time.perf_counter()
    resumed_at = None
    if checkpoint_every > 0:
        resumed_at = train_resumably(trainer, checkpoint_dir)
    else:
        trainer.train()
    train_seconds = time.perf_counter() - start
    prediction = trainer.predict(validation)
    predictions = np.argmax(prediction.predictions, axis=-1).tolist()
    labels = prediction.label_ids.tolist()
    per_round = [h["loss"] for h in trainer.state.log_history if "loss" in h and "eval_loss" not in h]
    samples_per_round = budget.clients_per_round * budget.batch
    curve = [
        {"samples": h["step"] * samples_per_round, "accuracy": h["eval_accuracy"]}
        for h in trainer.state.log_history
        if "eval_accuracy" in h
    ]
    client_rounds = budget.rounds * budget.clients_per_round
    return {
        "method": method,
        "task": task_name,
        "depth": cell_depth(method, depth),
        "split_layer": None if method in NO_SPLIT else split_layer,
        "num_layers": num_layers,
        "seed": seed,
        "rounds": budget.rounds,
        "samples": budget.rounds * samples_per_round,
        "budget": budget.__dict__,
        "accuracy": float(np.mean(np.array(predictions) == np.array(labels))),
        "predictions": predictions,
        "labels": labels,
        "train_losses": per_round,
        "curve": curve,
        "curve_eval_examples": len(curve_set),
        "eval_examples": len(validation),
        "activation_bytes_per_client_round": trainer.comm["activation_bytes"] / client_rounds,
        "sync_bytes_per_client_round": trainer.comm["sync_bytes"] / client_rounds,
        # Of the rounds this process ran (all of them unless it resumed a stopped run at `resumed_at_round`).
        "round_seconds": train_seconds / max(1, budget.rounds - (resumed_at or 0)),
        "resumed_at_round": resumed_at,
        "client_trainable_parameters": sum(p.numel() for _, p in trainer.client_update_parameters),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
    }


def train_resumably(trainer: HOSFLTrainer, checkpoint_dir: str) -> int | None:
    """`trainer.train()`, resumed from the last checkpoint a stopped run left in `checkpoint_dir` (if any); returns
    the round it resumed at (`None`: from the start)."""
    last = get_last_checkpoint(checkpoint_dir) if os.path.isdir(checkpoint_dir) else None
    trainer.train(resume_from_checkpoint=last)
    return int(os.path.basename(last).split("-")[1]) if last else None


def write_json(path: str, data: dict) -> None:
    """Writes atomically: a stopped run never leaves a half-written cell behind."""
    with open(path + ".tmp", "w") as f:
        json.dump(data, f)
    os.replace(path + ".tmp", path)


def zero_shot(task_name: str, budget: Budget, data_dir: str | None) -> dict:
    """Accuracy of the untrained model (every method's starting point: LoRA starts as the identity)."""
    task = get_task(task_name)
    model, tokenizer = load_model_and_tokenizer("smollm2")
    validation = task.tokenize(
        task.load("validation", data_dir, budget.eval_limit or None), tokenizer, budget.max_length
    )
    curve_set = validation.shuffle(seed=0).select(range(min(budget.curve_eval_limit, len(validation))))
    args = hosfl_args("frozen_client", split_for("deep", model.config.num_hidden_layers), 0, budget, "/tmp/hosfl_grid")
    trainer = HOSFLTrainer(
        model, args, eval_dataset=curve_set, processing_class=tokenizer, **task.trainer_kwargs(tokenizer)
    )
    full = trainer.predict(validation)
    curve = trainer.evaluate()
    return {
        "task": task_name,
        "accuracy": float(np.mean(np.argmax(full.predictions, axis=-1) == full.label_ids)),
        "curve_accuracy": curve["eval_accuracy"],
        "eval_examples": len(validation),
        "curve_eval_examples": len(curve_set),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    parser.add_argument("--tasks", nargs="+", default=["sst2", "rte"], choices=["sst2", "rte"])
    parser.add_argument("--depths", nargs="+", default=["deep", "shallow"], choices=["deep", "shallow"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--out", default="docs/results")
    parser.add_argument("--data_dir", default=None)
    parser.add_argument("--max_cells", type=int, default=None, help="Stop after this many new cells.")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads (default: torch's). Run one worker per core with --threads 1 to share a grid.",
    )
    for name, value in Budget().__dict__.items():
        parser.add_argument(f"--{name}", type=type(value), default=value)
    args = parser.parse_args(argv)
    budget = Budget(**{k: getattr(args, k) for k in Budget().__dict__})
    if args.threads:
        torch.set_num_threads(args.threads)
    cells_dir = os.path.join(args.out, "cells")
    os.makedirs(cells_dir, exist_ok=True)

    cells = plan_cells(args.methods, args.tasks, args.depths, args.seeds)
    for task in args.tasks:
        path = os.path.join(cells_dir, f"zero_shot_{task}.json")
        if not os.path.isfile(path):
            write_json(path, zero_shot(task, budget, args.data_dir))
    todo = [c for c in cells if not os.path.isfile(os.path.join(cells_dir, cell_name(*c) + ".json"))]
    print(f"{len(cells) - len(todo)} of {len(cells)} cells done; {len(todo)} to run", flush=True)
    durations: list[float] = []
    ran = 0
    for i, cell in enumerate(todo):
        name = cell_name(*cell)
        path = os.path.join(cells_dir, name + ".json")
        if (args.max_cells is not None and ran >= args.max_cells) or os.path.isfile(path):
            continue
        lock = claim(path)
        if lock is None:
            continue
        ran += 1
        eta = f", ETA {np.mean(durations) * (len(todo) - i) / 60:.0f} min" if durations else ""
        print(f"[{i + 1}/{len(todo)}] {name}{eta}", flush=True)
        start = time.perf_counter()
        result = run_cell(*cell, budget=budget, data_dir=args.data_dir)
        result["cell_seconds"] = time.perf_counter() - start
        result["command"] = "python benchmarks/grid.py " + " ".join(sys.argv[1:] if argv is None else argv)
        write_json(path, result)
        lock.release()
        durations.append(result["cell_seconds"])
        print(
            f"  {name}: accuracy {100 * result['accuracy']:.2f}% in {result['cell_seconds'] / 60:.1f} min", flush=True
        )


if __name__ == "__main__":
    main()
