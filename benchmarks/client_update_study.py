"""Does the client's zeroth-order update count? The client-update study of issue #17, resumable.

    python benchmarks/client_update_study.py --seeds 0 1 2 --rounds 60 --threads 1
    python benchmarks/client_update_study.py --task rte --rounds 250 --client_lrs 1e-4 1e-3 3e-3 --threads 1

Deep split (client = blocks 0-19 of the shipped SmolLM2-135M), rounds of 3 clients x 8 examples, the grid's budget
and harness (`benchmarks/grid.py`): every configuration of a seed sees the same shards, client sampling, batches,
LoRA initialisation and split, so its per-round training losses pair with the frozen client's on the same batches.
The paired difference (configuration - frozen client), averaged over rounds 1.. (round 0 is identical for all),
is the client's contribution; SplitLoRA's is the first-order reference.

Each finished run is written at once to the study's file (a stopped study keeps what it finished and the next call runs
the rest): `<out>/client_update_study.json` for the SST-2 pilot of 60 rounds, else
`<out>/client_update_study_<task>_r<rounds>.json`. A run in progress saves a checkpoint every `--checkpoint_every`
rounds (default 25) in its own folder under `--checkpoint_dir`; a stopped run resumes from its last one (bit-identical
to an unstopped run: `HOSFLTrainer` resumes exactly) and the folder is removed once the run is stored. Workers started
side by side (`--threads 1` each, on a CPU or a GPU) share a study: each run is claimed with a file lock and the file
is updated under another. `--client_lrs` runs every configuration but the frozen client at each client learning rate
(`<config>@lr<lr>`; SplitLoRA's client included: the same sweep budget); the first-order reference of the fractions is
SplitLoRA's best learning rate. Runs that `benchmarks/grid.py` already made with the same budget (frozen client,
SplitLoRA, the paper's HO-SFL at the grid's learning rates) are read from `<out>/cells` instead of being run again,
after checking that their first-round loss is the study's. `--cosine` first measures, per configuration, the cosine of
the client's estimate with the true client gradient (`hosfl_hf.diagnostics.client_update_cosine`) on one calibration
batch.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time

import numpy as np
import torch
from filelock import FileLock, Timeout

sys.path.insert(0, os.path.dirname(__file__))
from grid import Budget, cell_name, run_cell, split_for, write_json  # noqa: E402
from report import block_bootstrap_se, mcnemar_exact_p  # noqa: E402

# The pilot's search space: LoRA-B of blocks 0-3 (d = 24,576), per-client seeds (K*P = 6 directions).
LORA_B_PC = dict(client_zo_blocks=[0, 1, 2, 3], client_zo_modules=["lora_B"], client_seeds="per_client")
# The mask alone (adapters frozen, `client_zo_modules=[]`), per-client seeds.
MASK_PC = dict(client_zo_modules=[], client_seeds="per_client")
# name -> (method, HOSFLConfig overrides, mask density or None). Client blocks 0-3 hold ~55% of the LoRA-B energy.
CONFIGS: dict[str, tuple[str, dict, float | None]] = {
    "frozen": ("frozen_client", {}, None),
    # The frozen client run again by this code: equal losses show that the grid's cells pair with this code's runs.
    "frozen_check": ("frozen_client", {}, None),
    "splitlora": ("splitlora", {}, None),
    "paper": ("hosfl", {}, None),
    # The pilot's best lever set: that space with AdamW.
    "lora_b_pc": ("hosfl", dict(LORA_B_PC, client_learning_rate=3e-3), None),
    # ... plus a static mask of the top 0.01% client base weights (~7k) by gradient sensitivity on calibration data.
    "lora_b_mask_pc": ("hosfl", dict(LORA_B_PC, client_learning_rate=1e-3), 1e-4),
    # ... the client learning-rate sweep's lower point.
    "lora_b_mask_pc_lr1e-4": ("hosfl", dict(LORA_B_PC, client_learning_rate=1e-4), 1e-4),
    # The same search space with the normalised step (its step length is the learning rate).
    "lora_b_mask_pc_nsgd": (
        "hosfl",
        dict(LORA_B_PC, client_optimizer="normalized_sgd", client_learning_rate=1e-2),
        1e-4,
    ),
    # The mask alone: d = 7,080 instead of 31,656, without LoRA-B's AdamW random walk.
    "mask_pc": ("hosfl", dict(MASK_PC, client_learning_rate=1e-3), 1e-4),
    # The mask alone learning for the first 60 rounds exactly as in a 60-round run (3 warmup rounds, linear decay to
    # zero at round 60), then holding still while the server keeps training (session 11): at 250 rounds the gain of
    # the mask alone was gone; does the 60-round gain persist, or does the server's learning absorb it?
    "mask_pc_hold60": (
        "hosfl",
        dict(
            MASK_PC,
            client_learning_rate=1e-3,
            client_lr_scheduler_type="warmup_stable_decay",
            client_warmup_steps=3,
            client_lr_scheduler_kwargs=dict(num_stable_steps=0, num_decay_steps=57, decay_type="linear"),
        ),
        1e-4,
    ),
    # More directions per round (P = 8 per client: N = 24; 9 client forwards per round instead of 3).
    "mask_pc_p8": ("hosfl", dict(MASK_PC, client_learning_rate=1e-3, num_perturbations=8), 1e-4),
    # P = 16 (N = 48; 17 client forwards a round): does the contribution keep growing with N?
    "mask_pc_p16": ("hosfl", dict(MASK_PC, client_learning_rate=3e-3, num_perturbations=16), 1e-4),
    # A ten times smaller mask (708 weights): better-aligned directions in a smaller space.
    "mask5_pc": ("hosfl", dict(MASK_PC, client_learning_rate=1e-3), 1e-5),
    # The same mask with directions scaled by each coordinate's calibration gradient RMS (`direction_scales=
    # "gradient_rms"`): a preconditioned estimate that spends the round's few directions where the gradient is large.
    "maskw_pc": ("hosfl", dict(MASK_PC, client_learning_rate=1e-3), 1e-4),
    "maskw_pc_p8": ("hosfl", dict(MASK_PC, client_learning_rate=3e-3, num_perturbations=8), 1e-4),
    # Isotropic and scaled with the normalised step (length = learning rate), where a preconditioned estimate is not
    # undone by AdamW's per-coordinate normalisation.
    "mask_pc_nsgd": ("hosfl", dict(MASK_PC, client_optimizer="normalized_sgd", client_learning_rate=0.05), 1e-4),
    # Guided directions (session 9): the mask holds the mean calibration gradient as a guide and a share of each
    # direction lies along it, so the round's few directions measure the gradient's component there almost exactly.
    "maskg_pc": ("hosfl", dict(MASK_PC, client_learning_rate=1e-3), 1e-4),
    "maskg9_pc": ("hosfl", dict(MASK_PC, client_learning_rate=1e-3), 1e-4),
    "maskw_pc_nsgd": ("hosfl", dict(MASK_PC, client_optimizer="normalized_sgd", client_learning_rate=0.05), 1e-4),
    # Ceilings, not methods (their clients backpropagate): the same masked weights trained by SplitLoRA's first-order
    # client (adapters frozen). What any zeroth-order estimator in that search space could reach at best: if it is
    # far above mask_pc, better directions can close the gap; if not, the search space is the limit.
    "fo_mask": ("splitlora", dict(client_learning_rate=1e-3), 1e-4),
    "fo_mask_lr1e-2": ("splitlora", dict(client_learning_rate=1e-2), 1e-4),
    "fo_mask_1e-3": ("splitlora", dict(client_learning_rate=1e-3), 1e-3),
    "fo_mask5": ("splitlora", dict(client_learning_rate=1e-3), 1e-5),
}
# Configurations whose mask scales its directions (`sensitivity_mask(direction_scales=...)`); the others: isotropic.
DIRECTION_SCALES = {name: "gradient_rms" for name in ("maskw_pc", "maskw_pc_p8", "maskw_pc_nsgd")}
# Configurations whose mask guides its directions (`sensitivity_mask(guide_share=...)`); the others: no guide.
GUIDE_SHARES = {"maskg_pc": 0.5, "maskg9_pc": 0.9}
GRID_CELLS = {"frozen": "frozen_client", "splitlora": "splitlora", "paper": "hosfl"}
CALIBRATION_SEED = 1234  # calibration batches: a fixed sample of the (public) training set


def calibration_batches(
    task, tokenizer, budget: Budget, count: int, data_dir: str | None, seed: int = CALIBRATION_SEED
) -> list[dict]:
    data = task.tokenize(task.load("train", data_dir, limit=count * budget.batch, seed=seed), tokenizer)
    collate = task.trainer_kwargs(tokenizer)["data_collator"]
    return [collate([data[i] for i in range(b * budget.batch, (b + 1) * budget.batch)]) for b in range(count)]


def peft_model(budget: Budget, seed: int):
    """The grid's model for `seed`: the shipped SmolLM2 with its seeded LoRA (q, v) on every block."""
    import transformers
    from peft import LoraConfig, get_peft_model

    from hosfl_hf.models import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer("smollm2")
    transformers.set_seed(seed)
    lora = LoraConfig(
        r=budget.lora_r,
        lora_alpha=budget.lora_alpha,
        target_modules=["q_proj", "v_proj"],
        lora_dropout=0.0,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora), tokenizer


def mask_maker(
    density: float,
    budget: Budget,
    data_dir: str | None,
    batches: int,
    direction_scales: str = "uniform",
    guide_share: float = 0.0,
):
    """Computes the static mask once per (run) at set-up, on a separate copy of the initial model."""

    def make(split_layer: int, task, tokenizer, seed: int):
        from hosfl_hf import split_model
        from hosfl_hf.search_space import sensitivity_mask

        model, _ = peft_model(budget, seed)
        calibration = calibration_batches(task, tokenizer, budget, batches, data_dir)
        loss = task.trainer_kwargs(tokenizer)["compute_loss_func"]
        for batch in calibration:
            batch.pop("logits_to_keep", None)
        split = split_model(model, split_layer)
        return sensitivity_mask(
            split, calibration, density, loss_func=loss, direction_scales=direction_scales, guide_share=guide_share
        )

    return make


def first_order_on_mask(make):
    """Makes a run's first-order client train exactly the masked base weights of `make(split_layer, task, tokenizer,
    seed)`: the client's adapters are frozen, each masked base tensor is trainable with its gradient zeroed outside
    the mask (with zero weight decay, AdamW leaves a coordinate whose gradient is always zero exactly where it was)."""

    def prepare(model, split_layer: int, task, tokenizer, seed: int) -> None:
        from hosfl_hf import split_model

        mask = make(split_layer, task, tokenizer, seed)
        split = split_model(model, split_layer)  # the mask's names are the split model's
        for _, param in split.client_parameters():
            param.requires_grad_(False)
        params = dict(split.model.named_parameters())
        for name, indices in mask.indices.items():
            keep = torch.zeros(params[name].numel(), dtype=params[name].dtype)
            keep[torch.tensor(indices)] = 1
            keep = keep.view_as(params[name])
            params[name].requires_grad_(True)
            params[name].register_hook(lambda grad, keep=keep: grad * keep)

    return prepare


def measure_cosine(
    name: str, budget: Budget, data_dir: str | None, directions: list[int], batches: int, task_name: str = "sst2"
) -> dict:
    """The cosine of the configuration's estimate with the true client gradient on one calibration batch, against
    the full client gradient (all client LoRA weights and all client base weights of the blocks)."""
    from hosfl_hf import split_model
    from hosfl_hf.client_part import ClientPart
    from hosfl_hf.diagnostics import client_update_cosine
    from hosfl_hf.rng import client_round_seeds
    from hosfl_hf.search_space import ClientSearchSpace
    from hosfl_hf.tasks import get_task

    method, overrides, density = CONFIGS[name]
    task = get_task(task_name)
    model, tokenizer = peft_model(budget, 0)
    split_layer = split_for("deep", model.config.num_hidden_layers)
    scales, share = DIRECTION_SCALES.get(name, "uniform"), GUIDE_SHARES.get(name, 0.0)
    make = mask_maker(density, budget, data_dir, batches, scales, share) if density else None
    mask = make(split_layer, task, tokenizer, 0) if make else None
    split = split_model(model, split_layer)
    names = set(split.client_parameter_names)
    reference = [(n, p) for n, p in split.model.named_parameters() if n in names and ".layers." in n]
    blocks, modules = overrides.get("client_zo_blocks"), overrides.get("client_zo_modules")
    space = ClientSearchSpace(blocks, modules) if blocks is not None or modules is not None else None
    part = ClientPart(split, budget.zo_eps, "one_sided", space=space, mask=mask)
    # A batch the mask was not chosen on (a mask's share of the energy on its own calibration batches is optimistic).
    batch = calibration_batches(task, tokenizer, budget, 1, data_dir, seed=CALIBRATION_SEED + 1)[0]
    labels = batch.pop("labels")
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    seeds = [s for c in range(max(directions)) for s in client_round_seeds(99, 0, c, 1)]
    loss = task.trainer_kwargs(tokenizer)["compute_loss_func"]
    result = client_update_cosine(part, inputs, labels, seeds, loss, reference=reference, checkpoints=directions)
    per_round = budget.clients_per_round * budget.hosfl_perturbations
    result["directions_per_round"] = per_round if overrides.get("client_seeds") == "per_client" else None
    result["directions_per_round"] = result["directions_per_round"] or budget.hosfl_perturbations
    result["reference"] = "all client LoRA and base weights of blocks 0..split_layer-1"
    result["batch"] = "8 training examples sampled with seed CALIBRATION_SEED + 1 (not a calibration batch)"
    return result


def round_diffs(losses: list[float], frozen: list[float], start: int = 1) -> np.ndarray:
    """The per-round loss difference from round `start` on (round 0 is the same for every method)."""
    return np.array(losses[start:]) - np.array(frozen[start : len(losses)])


def paired(losses: list[float], frozen: list[float], start: int = 1) -> float:
    """Mean over rounds `start`.. of the per-round loss difference."""
    return float(round_diffs(losses, frozen, start).mean())


def base_config(name: str) -> str:
    """`lora_b_pc@lr0.001` -> `lora_b_pc` (a run of the learning-rate sweep)."""
    return name.split("@lr")[0]


def run_key(name: str, seed: int, lr: float | None = None) -> str:
    return f"{name}@lr{lr:g}/s{seed}" if lr is not None else f"{name}/s{seed}"


def best_first_order(runs: dict, seeds: list[int]) -> tuple[str | None, dict[int, float]]:
    """SplitLoRA's run (default or swept learning rate) with the lowest mean paired difference vs the frozen client,
    and its per-seed differences: the first-order reference of every fraction (its best client). The learning rates
    are compared on the seeds they all ran (a rate run on more seeds is not judged on different batches)."""
    variants = {}
    for name in sorted({k.rsplit("/s", 1)[0] for k in runs if base_config(k.rsplit("/s", 1)[0]) == "splitlora"}):
        per_seed = {
            s: paired(runs[f"{name}/s{s}"]["train_losses"], runs[f"frozen/s{s}"]["train_losses"])
            for s in seeds
            if f"{name}/s{s}" in runs and f"frozen/s{s}" in runs
        }
        if per_seed:
            variants[name] = per_seed
    if not variants:
        return None, {}
    shared = set.intersection(*(set(v) for v in variants.values()))

    def score(name: str) -> float:
        on = shared or variants[name]
        return float(np.mean([variants[name][s] for s in on]))

    best = min(variants, key=score)
    return best, variants[best]


def summarize(runs: dict, seeds: list[int]) -> dict:
    """Per configuration: the paired loss difference vs the frozen client (mean, SE over seeds), SplitLoRA's, the
    fraction, accuracy, and the exact McNemar test vs the frozen client on the full validation set (pooled)."""
    out = {}
    names = sorted({key.rsplit("/s", 1)[0] for key in runs}, key=lambda n: (list(CONFIGS).index(base_config(n)), n))
    fo_reference, fo_by_seed = best_first_order(runs, seeds)
    for name in names:
        if name == "frozen":  # (frozen_check vs frozen: the floor of float noise between code versions/threads)
            continue
        common = [s for s in seeds if f"{name}/s{s}" in runs and f"frozen/s{s}" in runs]
        if not common:
            continue
        # Each seed's per-round difference from round 1 on; its mean is the seed's contribution.
        series = [
            round_diffs(runs[f"{name}/s{s}"]["train_losses"], runs[f"frozen/s{s}"]["train_losses"]) for s in common
        ]
        diffs = [float(d.mean()) for d in series]
        # The fraction compares both on the same seeds (the reference may lack a seed this configuration ran).
        fo_seeds = [s for s in common if s in fo_by_seed]
        fo = [fo_by_seed[s] for s in fo_seeds]
        b = c = 0  # McNemar: this configuration right and the frozen client wrong, and the reverse
        for s in common:
            labels = np.array(runs[f"frozen/s{s}"]["labels"])
            mine = np.array(runs[f"{name}/s{s}"]["predictions"]) == labels
            frozen = np.array(runs[f"frozen/s{s}"]["predictions"]) == labels
            b += int(np.sum(mine & ~frozen))
            c += int(np.sum(~mine & frozen))
        half = len(runs[f"{name}/s{common[0]}"]["train_losses"]) // 2
        late = [float(d[half - 1 :].mean()) for d in series]  # rounds half.. (series[i] is round i + 1)
        mean = float(np.mean(diffs))
        se = float(np.std(diffs, ddof=1) / math.sqrt(len(diffs))) if len(diffs) > 1 else None
        # Also defined for one seed (a long single-seed study): rounds in blocks, never as independent draws.
        block_se = block_bootstrap_se(series)
        fo_mean = float(np.mean(fo)) if fo else None
        by_seed = dict(zip(common, diffs))
        on_fo = float(np.mean([by_seed[s] for s in fo_seeds])) if fo else None
        out[name] = {
            "loss_diff_vs_frozen": mean,
            "loss_diff_se": se,
            "loss_diff_block_se": block_se,
            "fo_loss_diff_vs_frozen": fo_mean,
            "fo_reference": fo_reference,
            "fraction_of_fo": on_fo / fo_mean if fo_mean else None,
            "fo_seeds": fo_seeds,
            "loss_diff_second_half": float(np.mean(late)),
            "per_seed_loss_diff": diffs,
            "accuracy_mean": float(np.mean([runs[f"{name}/s{s}"]["accuracy"] for s in common])),
            "frozen_accuracy_mean": float(np.mean([runs[f"frozen/s{s}"]["accuracy"] for s in common])),
            "mcnemar_vs_frozen": {
                "only_this_right": b,
                "only_frozen_right": c,
                "p_value": mcnemar_exact_p(b, c),
            },
            "seeds": common,
            "rounds": runs[f"{name}/s{common[0]}"]["rounds"],
        }
    return out


def study_path(out: str, task: str, rounds: int) -> str:
    """The SST-2 pilot of 60 rounds keeps its file; every other (task, rounds) study has its own."""
    if (task, rounds) == ("sst2", 60):
        return os.path.join(out, "client_update_study.json")
    return os.path.join(out, f"client_update_study_{task}_r{rounds}.json")


def update_study(path: str, change) -> dict:
    """Read-modify-write of the study file under its lock (workers side by side), written atomically."""
    with FileLock(path + ".lock"):
        study = json.load(open(path)) if os.path.isfile(path) else {}
        study.setdefault("runs", {})
        study.setdefault("cosine", {})
        change(study)
        seeds = sorted({int(k.rsplit("/s", 1)[1]) for k in study["runs"]})
        study["client_contribution"] = summarize(study["runs"], seeds)
        write_json(path, study)
    return study


def plan_runs(
    configs: list[str], seeds: list[int], client_lrs: list[float] | None
) -> list[tuple[str, int, float | None]]:
    """(configuration, seed, client learning rate or None for the configuration's own), seed by seed so that a
    stopped study has complete seeds; the frozen client has no client learning rate."""
    todo = []
    for seed in seeds:
        for name in configs:
            lrs = [None] if not client_lrs or CONFIGS[name][0] == "frozen_client" else client_lrs
            todo += [(name, seed, lr) for lr in lrs]
    return todo


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--task", default="sst2", choices=["sst2", "rte"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--client_lrs", nargs="+", type=float, default=None, help="Client learning-rate sweep.")
    parser.add_argument("--out", default="docs/results")
    parser.add_argument("--data_dir", default=None)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--calibration_batches", type=int, default=4)
    parser.add_argument(
        "--checkpoint_every",
        type=int,
        default=25,
        help="Rounds between a run's checkpoints (0: none); a stopped run resumes from its last one.",
    )
    parser.add_argument("--checkpoint_dir", default=os.path.join(tempfile.gettempdir(), "hosfl_study_checkpoints"))
    parser.add_argument("--cosine", nargs="*", type=int, default=None, help="Directions N to report the cosine at.")
    parser.add_argument("--no_runs", action="store_true", help="Only the cosine measurements (and the summary).")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    # The grid's budget, curves off (the study compares training losses and the final full-validation accuracy).
    budget = Budget(rounds=args.rounds)
    path = study_path(args.out, args.task, args.rounds)
    command = "python benchmarks/client_update_study.py " + " ".join(sys.argv[1:] if argv is None else argv)

    def header(study: dict) -> None:
        study.update(task=args.task, depth="deep", budget=budget.__dict__, command=command)

    update_study(path, header)
    if args.cosine is not None:
        done = json.load(open(path))["cosine"]
        for name in args.configs:
            if name in done or CONFIGS[name][0] != "hosfl":
                continue
            start = time.perf_counter()
            row = measure_cosine(
                name, budget, args.data_dir, args.cosine or [2, 6, 64], args.calibration_batches, args.task
            )
            print(f"cosine {name}: {row['rows']} ({time.perf_counter() - start:.0f} s)", flush=True)
            update_study(path, lambda study, name=name, row=row: study["cosine"].__setitem__(name, row))
    if args.no_runs:
        return

    cells = os.path.join(args.out, "cells")
    for name, seed, lr in plan_runs(args.configs, args.seeds, args.client_lrs):
        key = run_key(name, seed, lr)
        if key in json.load(open(path))["runs"]:
            continue
        claim = FileLock(f"{path}.{key.replace('/', '_')}.lock")
        try:
            claim.acquire(timeout=0)
        except Timeout:
            continue  # another worker runs it
        try:
            if key in json.load(open(path))["runs"]:  # finished meanwhile
                continue
            method, overrides, density = CONFIGS[name]
            cell = os.path.join(cells, cell_name(GRID_CELLS.get(name, "-"), args.task, "deep", seed) + ".json")
            if name in GRID_CELLS and lr is None and os.path.isfile(cell):
                result = json.load(open(cell))
                if result["budget"]["rounds"] == budget.rounds:
                    result["source"] = f"benchmarks/grid.py cell {os.path.basename(cell)}"
                    update_study(path, lambda study, key=key, result=result: study["runs"].__setitem__(key, result))
                    print(f"{key}: from {cell}", flush=True)
                    continue
            overrides = {**overrides, "eval_strategy": "no"}
            if lr is not None:
                overrides["client_learning_rate"] = lr
            print(f"{key}: running {method} {overrides} mask={density}", flush=True)
            start = time.perf_counter()
            scales, share = DIRECTION_SCALES.get(name, "uniform"), GUIDE_SHARES.get(name, 0.0)
            make_mask = None
            if density:
                make_mask = mask_maker(density, budget, args.data_dir, args.calibration_batches, scales, share)
            prepare = None
            if make_mask is not None and method == "splitlora":  # a first-order ceiling of the masked search space
                make_mask, prepare = None, first_order_on_mask(make_mask)
            # One folder per run, so a stopped run (this session's end, a killed worker) resumes where it stopped.
            checkpoints = os.path.join(args.checkpoint_dir, os.path.basename(path), key.replace("/", "_"))
            result = run_cell(
                method,
                args.task,
                "deep",
                seed,
                budget,
                args.data_dir,
                overrides,
                make_mask,
                prepare_model=prepare,
                checkpoint_dir=checkpoints,
                checkpoint_every=args.checkpoint_every,
            )
            result.update(config=name, overrides=overrides, mask_density=density, client_lr_swept=lr)
            result["mask_direction_scales"] = scales
            result["mask_guide_share"] = share
            result["run_seconds"] = time.perf_counter() - start
            # Pairing needs the same batches: round 0 (before any update) must give every configuration the same
            # loss.
            frozen = json.load(open(path))["runs"].get(f"frozen/s{seed}")
            if frozen is not None and abs(frozen["train_losses"][0] - result["train_losses"][0]) > 1e-4:
                raise RuntimeError(
                    f"{key}: round-0 loss {result['train_losses'][0]} differs from the frozen client's "
                    f"{frozen['train_losses'][0]}: the runs do not share batches, so they cannot be paired."
                )
            update_study(path, lambda study, key=key, result=result: study["runs"].__setitem__(key, result))
            shutil.rmtree(checkpoints, ignore_errors=True)
            print(
                f"{key}: accuracy {100 * result['accuracy']:.2f}% in {result['run_seconds'] / 60:.1f} min", flush=True
            )
        finally:
            claim.release()


if __name__ == "__main__":
    main()
