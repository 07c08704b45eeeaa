"""How well the client's zeroth-order update points along the true client gradient, for any client configuration.

[`client_update_cosine`] backpropagates one batch through the whole split model (a diagnostic: clients never do this
in training) to get the true gradient `g_S` over the client's search space `S` (the trainable client parameters it
keeps, and the masked coordinates of base weights), and compares it with the HO-SFL estimate from `N` seeded
directions, `ghat = (1 / (N mu)) sum_p <lambda, z(theta + mu u_p) - z(theta)> u_p` (exactly what the client part
computes). For Gaussian directions `cos(ghat, g_S)` is about `sqrt(N / (N + d))` with `d = dim S`; measured against
the gradient over a larger reference space `R` (e.g. all client LoRA weights, or all client base weights) it is
`sqrt(phi) cos(ghat, g_S)` where `phi = ||g_S||^2 / ||g_R||^2` is the share of the gradient energy `S` holds.
With a mask's direction scales `s` (directions `s * u`) the estimate's mean is the preconditioned `diag(s^2) g_S`: its
cosine with `g_S` rises faster with `N` than the isotropic `expected` but stays below `cos(diag(s^2) g_S, g_S)`;
with a mask's guide the mean is `(1 - gamma) g_S + gamma d <g_S, ghat> ghat` (`DirectionGuide`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from .zeroth_order import direction, masked_direction

__all__ = ["client_update_cosine"]


def client_update_cosine(
    part: Any,
    inputs: dict[str, torch.Tensor],
    labels: torch.Tensor,
    seeds: Sequence[int],
    loss_func: Callable[[Any, torch.Tensor], torch.Tensor] | None = None,
    reference: Sequence[tuple[str, nn.Parameter]] | None = None,
    checkpoints: Sequence[int] | None = None,
) -> dict[str, Any]:
    """The cosine of the client part's zeroth-order estimate with the true client gradient on one batch.

    Args:
        part ([`~hosfl_hf.protocol.ClientPart`]): the client part of a run (its search space, mask, `zo_eps`).
        inputs: the client inputs of the batch (`input_ids`, `attention_mask`).
        labels: the batch's labels.
        seeds: the `N` perturbation seeds of the estimate (e.g. `K * P` of them for per-client seeds).
        loss_func: `loss_func(outputs, labels)`; default: the model's causal-LM loss.
        reference: tensors spanning the reference space `R` (whole tensors); default: the tensors of the search
            space (whole tensors, so a mask's `phi` is its share of its own tensors' gradient energy).
        checkpoints: numbers of directions at which to report the running estimate's cosine (default: `len(seeds)`).

    Returns:
        `dict` with `d`, `phi`, `gradient_norm`, and `rows`: per checkpoint `directions` (N), `cosine` (with `g_S`),
        `cosine_reference` (with `g_R`), `expected` (`sqrt(N / (N + d))`) and `expected_reference`
        (`sqrt(phi N / (N + d))`).
    """
    split = part.split
    targets = list(part.parameters)
    reference = list(reference) if reference is not None else targets
    tensors = {id(p): p for _, p in targets + reference}
    flags = {key: p.requires_grad for key, p in tensors.items()}
    trainable = [p for p in split.model.parameters() if p.requires_grad]
    try:
        for p in trainable:
            p.requires_grad_(False)
        for p in tensors.values():
            p.requires_grad_(True)
            p.grad = None
        cut = split.client(**inputs, grad=True)
        leaf = cut.hidden_states.detach().requires_grad_(True)
        outputs = split.server(replace(cut, hidden_states=leaf), labels=None if loss_func else labels)
        loss = loss_func(outputs, labels) if loss_func is not None else outputs.loss
        cotangent = torch.autograd.grad(loss, leaf)[0]
        cut.hidden_states.backward(cotangent)
        with torch.no_grad():
            g_ref_sq = sum(float(p.grad.float().pow(2).sum()) for _, p in _unique(reference))
            g_s = []
            for position, (_, p) in enumerate(targets):
                grad = p.grad.float().flatten()
                g_s.append(grad[part.masks[position]] if position in part.masks else grad)
            g = torch.cat(g_s)
    finally:
        for key, p in tensors.items():
            p.grad = None
            p.requires_grad_(flags[key])
        for p in trainable:
            p.requires_grad_(True)
    reference_z = part.forward(inputs).hidden_states.detach()
    scalars = part.probe(inputs, reference_z, cotangent, list(seeds))
    checkpoints = sorted(set(checkpoints or [len(seeds)]))
    d = g.numel()
    phi = float(g.pow(2).sum()) / g_ref_sq if g_ref_sq > 0 else float("nan")
    estimate = torch.zeros_like(g)
    rows = []
    for n, (seed, v) in enumerate(zip(seeds, scalars), start=1):
        u = torch.cat(
            [
                (
                    masked_direction(values, seed, i, part.scales.get(i), part.guide)
                    if i in part.masks
                    else direction(values, seed, i, dtype=torch.float32)
                ).flatten()
                for i, (_, values) in enumerate(part.update_parameters[: len(targets)])
            ]
        )
        estimate += (v / part.zo_eps) * u
        if n in checkpoints:
            cosine = float(torch.nn.functional.cosine_similarity(estimate, g, dim=0))
            rows.append(
                {
                    "directions": n,
                    "cosine": cosine,
                    "cosine_reference": cosine * math.sqrt(phi),
                    "expected": math.sqrt(n / (n + d)),
                    "expected_reference": math.sqrt(phi * n / (n + d)),
                }
            )
    return {"d": d, "phi": phi, "gradient_norm": float(g.norm()), "rows": rows}


def _unique(named: Sequence[tuple[str, nn.Parameter]]) -> list[tuple[str, nn.Parameter]]:
    seen: set[int] = set()
    return [(n, p) for n, p in named if not (id(p) in seen or seen.add(id(p)))]
