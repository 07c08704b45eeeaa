"""Client peak memory and round time, measured on the shipped SmolLM2 (CPU: peak RSS; GPU: allocator stats).

    python benchmarks/memory.py --out docs/results

Memory: each (mode, shape, split) runs in a fresh subprocess holding the client part only (embeddings + the client
blocks, LoRA r8 on q,v). After loading, the peak-RSS mark is reset (`/proc/self/clear_refs`), one client step runs,
and the new peak (`VmHWM`) is read: the step's peak and its increase over the loaded weights. Modes, on the same
batch: `inference` (one forward without autograd), `hosfl` (forward, P perturbed forwards, scalars, the ZO update
through AdamW) and `splitlora` (forward with autograd, backward of lambda, AdamW step).

Time: full HO-SFL / SplitLoRA / frozen-client rounds through `HOSFLTrainer` on the same batches, interleaved
(A B C A B C) in one process so that machine noise hits every method alike; the median round time is reported.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

SHAPES = {"train": (8, 64), "paper": (32, 128)}


def _rss_peak_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise RuntimeError("VmHWM not found")


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("VmRSS not found")


def measure(mode: str, batch: int, length: int, split_layer: int, perturbations: int) -> dict:
    """One client step in this process (call it in a fresh subprocess)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from hosfl_hf import split_model
    from hosfl_hf.models import shipped_model_path
    from hosfl_hf.zeroth_order import ZerothOrderEstimator, apply_zo_update, build_client_optimizer

    torch.manual_seed(0)
    path = shipped_model_path("smollm2")
    # The client holds embeddings + split_layer blocks; block split_layer only marks the cut (never run).
    model = AutoModelForCausalLM.from_pretrained(path, num_hidden_layers=split_layer + 1, dtype=torch.float32)
    model = get_peft_model(
        model,
        LoraConfig(
            r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], layers_to_transform=list(range(split_layer))
        ),
    )
    parts = split_model(model, split_layer)
    params = parts.client_parameters()
    optimizer = build_client_optimizer([p for _, p in params], "adamw", 1e-4, 0.0)
    ids = torch.randint(0, model.config.vocab_size, (batch, length))
    mask = torch.ones_like(ids)
    cotangent = torch.randn(batch, length, model.config.hidden_size)
    baseline = _rss_kib()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak-RSS mark to the current RSS
    start = time.perf_counter()
    if mode == "inference":
        parts.client(input_ids=ids, attention_mask=mask)
    elif mode == "hosfl":
        estimator = ZerothOrderEstimator(params, 1e-3)
        z = parts.client(input_ids=ids, attention_mask=mask).hidden_states
        seeds = list(range(perturbations))
        scalars = estimator.projected_scalars(
            lambda: parts.client(input_ids=ids, attention_mask=mask).hidden_states, z, cotangent, seeds
        )
        apply_zo_update(params, optimizer, seeds, scalars, 1e-3, 1e-4)
    elif mode == "splitlora":
        z = parts.client(input_ids=ids, attention_mask=mask, grad=True).hidden_states
        z.backward(cotangent)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    else:
        raise ValueError(mode)
    seconds = time.perf_counter() - start
    peak = _rss_peak_kib()
    return {
        "mode": mode,
        "batch": batch,
        "length": length,
        "split_layer": split_layer,
        "loaded_bytes": baseline * 1024,
        "peak_bytes": peak * 1024,
        "increase_bytes": (peak - baseline) * 1024,
        "step_seconds": seconds,
    }


def time_rounds(split_layer: int, rounds: int, repeats: int, batch: int, length: int) -> dict:
    """Median seconds per round of each method on identical synthetic batches, runs interleaved."""
    import statistics

    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import TrainerCallback

    from hosfl_hf import HOSFLConfig, HOSFLTrainer
    from hosfl_hf.models import load_model_and_tokenizer

    class Clock(TrainerCallback):
        def __init__(self):
            self.stamps: list[float] = []

        def on_step_end(self, args, state, control, **kwargs):
            self.stamps.append(time.perf_counter())

    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": torch.randint(0, 49152, (length,), generator=g).tolist()} for _ in range(400)]
    data = Dataset.from_list([{**r, "labels": r["input_ids"]} for r in rows])

    def collate(features):
        ids = torch.tensor([f["input_ids"] for f in features])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids, "logits_to_keep": 1}

    def loss_func(outputs, labels, num_items_in_batch=None):  # last-position loss, as in the classification tasks
        return torch.nn.functional.cross_entropy(outputs.logits[:, -1].float(), labels[:, -1])

    times: dict[str, list[float]] = {}
    for _ in range(repeats):
        for method in ("hosfl", "splitlora", "frozen_client"):
            model, _ = load_model_and_tokenizer("smollm2")
            model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
            clock = Clock()
            args = HOSFLConfig(
                output_dir="/tmp/hosfl_timing",
                algorithm=method,
                max_steps=rounds + 1,
                per_device_train_batch_size=batch,
                learning_rate=1e-3,
                client_learning_rate=1e-4,
                report_to=[],
                save_strategy="no",
                use_cpu=True,
                disable_tqdm=True,
                logging_steps=1000,
            )
            trainer = HOSFLTrainer(
                model,
                args,
                split_layer=split_layer,
                train_dataset=data,
                data_collator=collate,
                compute_loss_func=loss_func,
                callbacks=[clock],
            )
            trainer.train()
            steps = [b - a for a, b in zip(clock.stamps, clock.stamps[1:])]  # the first round is warm-up
            times.setdefault(method, []).extend(steps)
    return {m: statistics.median(v) for m, v in times.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="docs/results")
    parser.add_argument("--splits", nargs="+", type=int, default=[20, 10])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--perturbations", type=int, default=2)
    parser.add_argument("--timing_rounds", type=int, default=4)
    parser.add_argument("--timing_repeats", type=int, default=2)
    parser.add_argument("--skip_timing", action="store_true")
    parser.add_argument("--timing_only", action="store_true", help="Keep memory.json's memory rows; re-time rounds.")
    parser.add_argument("--child", nargs=5, metavar=("MODE", "BATCH", "LENGTH", "SPLIT", "P"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        mode, batch, length, split, p = args.child
        print(json.dumps(measure(mode, int(batch), int(length), int(split), int(p))))
        return

    results = {"memory": [], "device": "cpu", "threads": torch.get_num_threads()}
    path = os.path.join(args.out, "memory.json")
    if args.timing_only:
        with open(path) as f:
            results = json.load(f)
    for split in args.splits if not args.timing_only else []:
        for shape in args.shapes:
            batch, length = SHAPES[shape]
            for mode in ("inference", "hosfl", "splitlora"):
                out = subprocess.run(
                    [
                        sys.executable,
                        __file__,
                        "--child",
                        mode,
                        str(batch),
                        str(length),
                        str(split),
                        str(args.perturbations),
                    ],
                    capture_output=True,
                    text=True,
                    check=True,
                )
                row = json.loads(out.stdout.strip().splitlines()[-1])
                row["shape"] = shape
                results["memory"].append(row)
                print(
                    f"split {split} {shape} {mode}: peak {row['peak_bytes'] / 2**20:.0f} MiB "
                    f"(+{row['increase_bytes'] / 2**20:.0f} MiB over weights)",
                    flush=True,
                )
    if not args.skip_timing:
        results["round_seconds"] = {
            str(split): time_rounds(split, args.timing_rounds, args.timing_repeats, *SHAPES["train"])
            for split in args.splits
        }
        print("round seconds:", results["round_seconds"], flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(path, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
