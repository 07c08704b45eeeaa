"""How much of the first-order client's progress can a zeroth-order search space give per round? (issue #17)

    python benchmarks/zo_frontier.py --out docs/results --task sst2 --threads 1

The client-update study pairs whole training runs, which on this CPU allows few configurations. This measures the
quantity those runs accumulate, one round at a time: the loss decrease the client's update can buy on a batch with the
best step size. For a batch `b` with exact client gradient `g`:

* first order (SplitLoRA's client): `Delta_FO = L(theta) - min_eta L(theta - eta g_F)`, `F` = LoRA q,v of every
  client block, `L` the loss on evaluation examples the step was not computed from (a step that fits its own 8
  examples is not progress: on its own batch even random directions lower the loss a lot at large steps);
* zeroth order in a search space `S` of dimension `d` with `N` directions per round: the estimate
  `ghat = sum_i <g_S, u_i> u_i` (exactly what the client rebuilds from seeds and scalars, up to the finite-difference
  error the study measured as negligible), `Delta_ZO = L(theta) - min_eta L(theta - eta ghat)`, averaged over
  draws of the directions.

`Delta_ZO / Delta_FO` is the per-round efficiency of `S`. Unlike a ratio of gradient energies it includes curvature:
base weights that multiply the model's massive activations have huge gradients but also a huge curvature, so a
step along them buys little. The standard ZO-SGD analysis (Nesterov and Spokoiny 2017) gives
`Delta_ZO ~ Delta_S N / (N + d + 1)` for a well-conditioned space; the line search measures it without that model.
The issue's target (HO-SFL's client at least half of SplitLoRA's client contribution) needs a ratio near 0.5 per round,
or many more rounds of the zeroth-order client than the first-order one gets.

Setting: the shipped SmolLM2-135M at the deep split (client = blocks 0-19) with the grid's seed-0 LoRA, on the task's
training data: 3 batches of 8 the steps are computed from, 4 other batches of 8 the decrease is measured on, and masks
of client base weights chosen on 4 calibration batches (`sensitivity_mask`'s rule: largest summed squared gradients);
step lengths on a log grid from 1e-4 to 1e2. Writes `<out>/zo_frontier.json` and `zo_frontier.md`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(__file__))
from client_update_study import CALIBRATION_SEED, calibration_batches, peft_model  # noqa: E402
from grid import Budget, split_for  # noqa: E402

from hosfl_hf.rng import cpu_generator, mix  # noqa: E402

MASK_SIZES = [100, 1_000, 7_080, 30_000]  # 7,080 = the study's density 1e-4
STEPS = np.logspace(-4, 2, 13)  # step lengths ||eta v|| tried by the line search


class Step:
    """A sparse step over named tensors: `name -> (flat indices or None for the whole tensor, values)`, applied in
    place and undone exactly (the touched values are saved)."""

    def __init__(
        self, params: dict[str, torch.nn.Parameter], parts: dict[str, tuple[torch.Tensor | None, torch.Tensor]]
    ):
        self.params, self.parts = params, parts
        norm2 = sum(float(v.double().pow(2).sum()) for _, v in parts.values())
        self.norm = norm2**0.5

    def loss_at(self, length: float, loss_fn) -> float:
        if self.norm == 0:
            return loss_fn()
        saved = []
        with torch.no_grad():
            for name, (index, values) in self.parts.items():
                flat = self.params[name].view(-1)
                where = index if index is not None else slice(None)
                saved.append((flat, where, flat[where].clone()))
                flat[where] -= (length / self.norm) * values.to(flat.dtype)
        try:
            return loss_fn()
        finally:
            with torch.no_grad():
                for flat, where, old in saved:
                    flat[where] = old


def best_decrease(step: Step, loss_fn, base_loss: float) -> tuple[float, float]:
    """`(L(theta) - min over step lengths of L(theta - step), the best length)`; 0 when no length lowers the loss."""
    losses = [step.loss_at(float(s), loss_fn) for s in STEPS]
    i = int(np.argmin(losses))
    return max(0.0, base_loss - losses[i]), float(STEPS[i]) if losses[i] < base_loss else 0.0


def gradients(split, batch: dict, names: list[str], params: dict, loss_func) -> tuple[float, dict[str, torch.Tensor]]:
    """The loss and the exact gradient of `names` on one batch (a diagnostic backward; clients never do this)."""
    flags = {n: p.requires_grad for n, p in split.model.named_parameters()}
    try:
        for p in split.model.parameters():
            p.requires_grad_(False)
        for n in names:
            params[n].requires_grad_(True)
        batch = dict(batch)
        labels = batch.pop("labels")
        cut = split.client(**{k: batch[k] for k in ("input_ids", "attention_mask")}, grad=True)
        loss = loss_func(split.server(cut, logits_to_keep=1), labels)
        loss.backward()
        grads = {n: params[n].grad.detach().float().clone() for n in names}
    finally:
        for n, p in split.model.named_parameters():
            p.grad = None
            p.requires_grad_(flags[n])
    return float(loss.detach()), grads


def zo_estimate(space: dict[str, torch.Tensor | None], grads: dict, n: int, seed: int) -> dict:
    """`ghat = sum_i <g_S, u_i> u_i` over the coordinates of `space` (`name -> flat indices or None`), Gaussian u."""
    g = {name: grads[name].view(-1)[idx] if idx is not None else grads[name].view(-1) for name, idx in space.items()}
    out = {name: torch.zeros_like(v) for name, v in g.items()}
    for i in range(n):
        generator = cpu_generator(mix(seed, i))
        u = {name: torch.randn(v.shape, generator=generator) for name, v in g.items()}
        projection = sum(float(torch.dot(g[name], u[name])) for name in g)
        for name in g:
            out[name] += projection * u[name]
    return {name: (space[name], out[name]) for name in g}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="docs/results")
    parser.add_argument("--task", default="sst2", choices=["sst2", "rte"])
    parser.add_argument("--data_dir", default=None)
    parser.add_argument("--batches", type=int, default=3, help="Batches of 8 a step is computed from.")
    parser.add_argument("--draws", type=int, default=2, help="Direction draws per batch and space.")
    parser.add_argument("--eval_batches", type=int, default=4, help="Batches of 8 the decrease is measured on.")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from hosfl_hf import split_model
    from hosfl_hf.tasks import get_task

    budget = Budget()
    task = get_task(args.task)
    model, tokenizer = peft_model(budget, 0)
    model.eval()
    split = split_model(model, split_for("deep", model.config.num_hidden_layers))
    loss_func = task.trainer_kwargs(tokenizer)["compute_loss_func"]
    calibration = calibration_batches(task, tokenizer, budget, args.batches, args.data_dir)
    held_out = calibration_batches(task, tokenizer, budget, args.batches, args.data_dir, seed=CALIBRATION_SEED + 1)
    evaluation = calibration_batches(
        task, tokenizer, budget, args.eval_batches, args.data_dir, seed=CALIBRATION_SEED + 2
    )
    for batch in calibration + held_out + evaluation:
        batch.pop("logits_to_keep", None)

    params = dict(split.model.named_parameters())
    blocks = [n for n in split.client_parameter_names if ".layers." in n]
    lora = [n for n in blocks if "lora_" in n]
    base = [n for n in blocks if "lora_" not in n]
    block_of = {n: int(n.split(".layers.")[1].split(".")[0]) for n in blocks}

    # Masks: the largest summed squared gradients of client base weights on the calibration batches.
    scores = {n: torch.zeros(params[n].numel()) for n in base}
    for batch in calibration:
        _, grads = gradients(split, batch, base, params, loss_func)
        for n in base:
            scores[n] += grads[n].view(-1).pow(2)
    flat = torch.cat([scores[n] for n in base])
    offsets = np.cumsum([0] + [scores[n].numel() for n in base])
    order = torch.argsort(flat, descending=True)
    masks = {}
    for size in MASK_SIZES:
        top = order[:size]
        masks[size] = {
            n: (top[(top >= offsets[i]) & (top < offsets[i + 1])] - int(offsets[i])).sort().values
            for i, n in enumerate(base)
            if ((top >= offsets[i]) & (top < offsets[i + 1])).any()
        }
    spaces: dict[str, tuple[dict, int]] = {
        "paper: LoRA q,v of all client blocks, N=2 (P=2 shared seeds)": ({n: None for n in lora}, 2),
        "paper space, N=6 (per-client seeds)": ({n: None for n in lora}, 6),
        "LoRA-B of blocks 0-3, N=6": ({n: None for n in lora if "lora_B" in n and block_of[n] <= 3}, 6),
    }
    for size in MASK_SIZES:
        spaces[f"mask: top {size:,} client base weights, N=6"] = (masks[size], 6)
    spaces["LoRA-B 0-3 + mask of 7,080, N=6"] = (
        {**{n: None for n in lora if "lora_B" in n and block_of[n] <= 3}, **masks[7_080]},
        6,
    )

    def loss_fn() -> float:  # the loss on examples no step was computed from
        with torch.no_grad():
            total = 0.0
            for batch in evaluation:
                inputs = {k: v for k, v in batch.items() if k != "labels"}
                total += float(loss_func(split.model(**inputs, logits_to_keep=1), batch["labels"]))
            return total / len(evaluation)

    rows: dict[str, dict] = {}
    fo = []
    needed = sorted(set(lora) | {n for space, _ in spaces.values() for n in space})
    for b, batch in enumerate(held_out):
        _, grads = gradients(split, batch, needed, params, loss_func)
        base_loss = loss_fn()
        decrease, length = best_decrease(
            Step(params, {n: (None, grads[n].view(-1)) for n in lora}), loss_fn, base_loss
        )
        fo.append({"batch": b, "loss": base_loss, "decrease": decrease, "step_length": length})
        print(f"batch {b}: loss {base_loss:.4f}, first-order decrease {decrease:.5f} (step {length:.1e})", flush=True)
        for label, (space, n) in spaces.items():
            row = rows.setdefault(
                label,
                {
                    "space": label,
                    "d": sum(params[k].numel() if idx is None else len(idx) for k, idx in space.items()),
                    "directions": n,
                    "decreases": [],
                },
            )
            for draw in range(args.draws):
                step = Step(params, zo_estimate(space, grads, n, seed=mix(b, draw, n, row["d"])))
                row["decreases"].append(best_decrease(step, loss_fn, base_loss)[0] / max(decrease, 1e-12))
            print(f"  {label}: {np.mean(row['decreases'][-args.draws :]):.2e} of first order", flush=True)
    for row in rows.values():
        ratios = np.array(row["decreases"])
        row["ratio_mean"] = float(ratios.mean())
        row["ratio_se"] = float(ratios.std(ddof=1) / np.sqrt(len(ratios))) if len(ratios) > 1 else None
        row["expected_isotropic"] = row["directions"] / (row["directions"] + row["d"] + 1)
    result = {
        "task": args.task,
        "split_layer": split.split_layer,
        "first_order": fo,
        "first_order_space": "LoRA q,v (r=8) of every client block, exact gradient (SplitLoRA's client)",
        "rows": list(rows.values()),
        "steps": STEPS.tolist(),
        "command": "python benchmarks/zo_frontier.py " + " ".join(sys.argv[1:] if argv is None else argv),
    }
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "zo_frontier.json"), "w") as f:
        json.dump(result, f, indent=1)
    lines = [
        f"# Zeroth-order client frontier ({args.task}, deep split, client blocks 0-{split.split_layer - 1})",
        "",
        "Best one-step decrease of the loss on held-out examples by the zeroth-order estimate in each search space, "
        "as a fraction of the first-order client's (exact gradient of LoRA q,v of every client block), mean ± SE over "
        f"{args.batches} batches x {args.draws} draws; `N/(N+d+1)`: the isotropic model's prediction for a space "
        f"holding the whole gradient. First-order decreases per batch: "
        + ", ".join(f"{r['decrease']:.4f}" for r in fo)
        + f". `{result['command']}`",
        "",
        "| search space | d | fraction of first order per round | SE | N/(N+d+1) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in result["rows"]:
        se = f"{r['ratio_se']:.1e}" if r["ratio_se"] is not None else "-"
        lines.append(f"| {r['space']} | {r['d']:,} | {r['ratio_mean']:.2e} | {se} | {r['expected_isotropic']:.1e} |")
    with open(os.path.join(args.out, "zo_frontier.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return result


if __name__ == "__main__":
    main()
