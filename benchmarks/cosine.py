"""How well does the client's zeroth-order update point along the true client gradient?

    python benchmarks/cosine.py --out docs/results

On one SST-2 batch of the shipped SmolLM2 (LoRA, split after block `--split`), the true client gradient g comes
from backpropagating the server's lambda through the client; the HO-SFL estimate with N directions is
ghat = (1/(N mu)) sum_p <lambda, z(theta + mu u_p) - z(theta)> u_p. For Gaussian directions the expected cosine is
about sqrt(N/(N+d)) for d trainable client parameters, so with P=2 directions per round and d ~ 3e5 LoRA weights a
round's client step is nearly orthogonal to the gradient. The script measures the cosine for several N and for a
smaller client adapter, which is what would make the client update matter.
"""

from __future__ import annotations

import argparse
import json
import math
import os

import torch
from peft import LoraConfig, get_peft_model

from hosfl_hf import split_model
from hosfl_hf.models import load_model_and_tokenizer
from hosfl_hf.tasks import get_task
from hosfl_hf.zeroth_order import ZerothOrderEstimator, direction


def measure(split: int, lora: LoraConfig, directions: list[int], batch: int, eps: float) -> dict:
    torch.manual_seed(0)
    model, tokenizer = load_model_and_tokenizer("smollm2")
    model = get_peft_model(model, lora)
    # B = 0 at initialisation would make the A-gradients vanish; start from a trained-like adapter instead.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    parts = split_model(model, split)
    params = parts.client_parameters()
    task = get_task("sst2")
    data = task.tokenize(task.load("train", limit=batch, seed=1), tokenizer)
    kwargs = task.trainer_kwargs(tokenizer)
    inputs = kwargs["data_collator"]([data[i] for i in range(len(data))])
    labels = inputs.pop("labels")
    client_inputs = {k: inputs[k] for k in ("input_ids", "attention_mask")}

    z = parts.client(**client_inputs, grad=True).hidden_states
    leaf = z.detach().requires_grad_(True)
    from dataclasses import replace

    cut = replace(parts.client(**client_inputs), hidden_states=leaf)
    loss = kwargs["compute_loss_func"](parts.server(cut, logits_to_keep=1), labels)
    loss.backward()
    cotangent = leaf.grad
    z.backward(cotangent)
    g = torch.cat([p.grad.flatten() for _, p in params])
    for _, p in params:
        p.grad = None

    estimator = ZerothOrderEstimator(params, eps)
    reference = z.detach()
    estimate = torch.zeros_like(g)
    rows = []
    for n in range(1, max(directions) + 1):
        seed = 1000 + n
        (v,) = estimator.projected_scalars(
            lambda: parts.client(**client_inputs).hidden_states, reference, cotangent, [seed]
        )
        u = torch.cat([direction(p, seed, i).flatten() for i, (_, p) in enumerate(params)])
        estimate += v / eps * u
        if n in directions:
            cos = float(torch.nn.functional.cosine_similarity(estimate, g, dim=0))
            rows.append({"directions": n, "cosine": cos, "expected": math.sqrt(n / (n + g.numel()))})
            print(f"d={g.numel()} N={n}: cosine {cos:.4f} (expected {rows[-1]['expected']:.4f})", flush=True)
    return {"d": g.numel(), "split_layer": split, "rows": rows}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="docs/results")
    parser.add_argument("--split", type=int, default=20)
    parser.add_argument("--directions", nargs="+", type=int, default=[2, 8, 32, 128])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--eps", type=float, default=1e-3)
    args = parser.parse_args(argv)
    paper = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    small = LoraConfig(
        r=1,
        lora_alpha=2,
        target_modules=["v_proj"],
        layers_to_transform=[args.split - 2, args.split - 1] + list(range(args.split, 30)),
    )
    result = measure(args.split, paper, args.directions, args.batch, args.eps)
    result["small_adapter"] = measure(args.split, small, args.directions, args.batch, args.eps)
    result["small_adapter"]["config"] = "LoRA r=1 on v_proj of the last two client blocks"
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "cosine.json"), "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
