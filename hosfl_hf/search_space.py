"""The client's zeroth-order search space: which client tensors the seeded directions perturb and the update changes.

Two ways to shrink it (the cosine of a `N`-direction estimate with the gradient it estimates is about
`sqrt(N / (N + d))` for `d` coordinates, so a smaller space where the gradient lives learns faster):

* [`ClientSearchSpace`]: keep only the trainable client parameters of some blocks and/or whose names contain one
  of some patterns (e.g. LoRA-B of blocks 0-3: `ClientSearchSpace(blocks=[0, 1, 2, 3], modules=["lora_B"])`).
  The others are frozen (`requires_grad=False`) for the whole run, for every method.
* [`ClientMask`]: a static sparse mask over the client's *base* weights, chosen once at set-up by gradient
  sensitivity on public calibration data ([`sensitivity_mask`]: one backprop per calibration batch, before
  training; clients never backpropagate during training). The mask's indices are part of `hosfl_config.json` and
  of the trajectory, so replay rebuilds the same update. With `direction_scales="gradient_rms"` the mask also
  holds a standard deviation per masked coordinate (its calibration gradient's RMS): the directions there are
  `s * u` instead of `u`, which spends the few directions of a round where the gradient is large (a preconditioned
  estimate; see [`DIRECTION_SCALES`]; measured worse than isotropic directions on SST-2, docs/benchmarks.md).
  With `guide_share` the mask also holds a guide vector (the mean calibration gradient on the masked coordinates):
  a share of each direction lies along it ([`~hosfl_hf.zeroth_order.DirectionGuide`], guided evolution strategies),
  so the round's few directions measure the gradient's component along the guide almost exactly (measured no better
  than a frozen client on SST-2, docs/benchmarks.md).

The targets of the update ([`client_update_targets`]) are, in the pinned order of the RNG specification, the
selected trainable parameters (in `named_parameters` order) followed by the masked base tensors (in the mask's
order); a masked tensor's direction is a Gaussian vector over its masked coordinates only (times the mask's
`scales` there, if it has them).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from .zeroth_order import DirectionGuide

__all__ = [
    "DIRECTION_SCALES",
    "ClientMask",
    "ClientSearchSpace",
    "apply_search_space",
    "client_update_targets",
    "mask_direction_guide",
    "mask_direction_scales",
    "sensitivity_mask",
]


@dataclass(frozen=True)
class ClientSearchSpace:
    """Which trainable client parameters the client update covers.

    Args:
        blocks (`list[int]`, *optional*): client decoder blocks (0-based) whose parameters stay trainable; `None`
            keeps every client block and the embeddings.
        modules (`list[str]`, *optional*): keep a parameter only if its name contains one of these strings (e.g.
            `["lora_B"]`, `["v_proj.lora_B", "q_proj.lora_B"]`); `None` keeps every name.
    """

    blocks: tuple[int, ...] | None = None
    modules: tuple[str, ...] | None = None

    def __post_init__(self):
        if self.blocks is not None:
            object.__setattr__(self, "blocks", tuple(int(b) for b in self.blocks))
        if self.modules is not None:
            object.__setattr__(self, "modules", tuple(str(m) for m in self.modules))

    @property
    def is_full(self) -> bool:
        return self.blocks is None and self.modules is None

    def keeps(self, name: str, block: int | None) -> bool:
        if self.blocks is not None and block not in self.blocks:
            return False
        return self.modules is None or any(pattern in name for pattern in self.modules)

    def to_dict(self) -> dict[str, Any]:
        return {
            "blocks": list(self.blocks) if self.blocks is not None else None,
            "modules": list(self.modules) if self.modules is not None else None,
        }


@dataclass
class ClientMask:
    """A static sparse mask over client base weights: parameter name -> sorted flat indices of the updated
    coordinates.

    Args:
        indices (`dict[str, list[int]]`): for each masked base tensor (full `named_parameters` name), the sorted
            indices into its flattened values.
        density (`float`, *optional*): the fraction of candidate coordinates kept.
        source (`str`, *optional*): how the mask was chosen (recorded, not used).
        scales (`dict[str, list[float]]`, *optional*): for each masked tensor, the standard deviation of the
            directions on each of its masked coordinates (aligned with `indices`; float32 values). `None`: 1 everywhere
            (isotropic directions). Set by [`sensitivity_mask`] with `direction_scales`; replay and every holder use
            them, so they are part of the saved mask.
        guide (`dict[str, list[float]]`, *optional*): a guide vector over the masked coordinates (for each masked
            tensor, aligned with `indices`; any non-zero norm: it is normalised over the whole mask). Set by
            [`sensitivity_mask`] with `guide_share` (the mean calibration gradient).
        guide_share (`float`, *optional*): the share `gamma` in `(0, 1)` of each direction's expected squared norm
            along the guide (see [`~hosfl_hf.zeroth_order.DirectionGuide`]); required with `guide`.
    """

    indices: dict[str, list[int]]
    density: float | None = None
    source: str | None = None
    scales: dict[str, list[float]] | None = None
    guide: dict[str, list[float]] | None = None
    guide_share: float | None = None

    def __post_init__(self):
        for field_name in ("scales", "guide"):
            given = getattr(self, field_name)
            if given is not None and sorted(given) != sorted(self.indices):
                raise ValueError(
                    f"ClientMask {field_name} name the tensors {sorted(given)[:3]} but its indices name "
                    f"{sorted(self.indices)[:3]}: give one list of {field_name} per masked tensor (or "
                    f"{field_name}=None)."
                )
        if (self.guide is None) != (self.guide_share is None):
            raise ValueError("ClientMask needs guide and guide_share together (a guide vector and its share).")
        if self.guide_share is not None and not 0 < self.guide_share < 1:
            raise ValueError(f"ClientMask guide_share={self.guide_share} must be in (0, 1), e.g. 0.5.")
        clean, scales, guide = {}, {}, {}
        for name, idx in self.indices.items():
            values = [int(i) for i in idx]
            if not values or len(set(values)) != len(values) or min(values) < 0:
                raise ValueError(
                    f"ClientMask indices of {name!r} must be distinct non-negative integers ({len(values)} given)."
                )
            order = sorted(range(len(values)), key=values.__getitem__)
            clean[name] = [values[i] for i in order]
            if self.scales is not None:
                given = self.scales[name]
                if len(given) != len(values):
                    raise ValueError(f"ClientMask has {len(given)} scales for the {len(values)} indices of {name!r}.")
                # float32 values, as the directions use them (a JSON round trip of a float32 value is exact).
                column = torch.tensor([float(given[i]) for i in order], dtype=torch.float32)
                if not bool(torch.isfinite(column).all()) or bool((column <= 0).any()):
                    raise ValueError(f"ClientMask scales of {name!r} must be finite and positive.")
                scales[name] = column.tolist()
            if self.guide is not None:
                given = self.guide[name]
                if len(given) != len(values):
                    raise ValueError(
                        f"ClientMask has {len(given)} guide values for the {len(values)} indices of {name!r}."
                    )
                column = torch.tensor([float(given[i]) for i in order], dtype=torch.float32)
                if not bool(torch.isfinite(column).all()):
                    raise ValueError(f"ClientMask guide of {name!r} must be finite.")
                guide[name] = column.tolist()
        if not clean:
            raise ValueError("ClientMask needs at least one masked tensor.")
        if self.guide is not None and not any(v != 0 for values in guide.values() for v in values):
            raise ValueError("ClientMask guide is zero everywhere: it has no direction to guide the perturbations.")
        self.indices = clean
        self.scales = scales if self.scales is not None else None
        self.guide = guide if self.guide is not None else None

    @property
    def size(self) -> int:
        return sum(len(v) for v in self.indices.values())

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        if self.guide is None:  # an unguided mask keeps the dict it had before guides existed (resume compares it)
            del data["guide"], data["guide_share"]
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | ClientMask) -> ClientMask:
        if isinstance(data, ClientMask):
            return data
        keys = ("indices", "density", "source", "scales", "guide", "guide_share")
        return cls(**{k: data[k] for k in keys if k in data})

    def save(self, path: str | os.PathLike) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f)

    @classmethod
    def load(cls, path: str | os.PathLike) -> ClientMask:
        with open(path) as f:
            return cls.from_dict(json.load(f))


def _block_of(split: Any) -> dict[int, int]:
    """id(parameter) -> index of the client block that holds it."""
    return {id(p): i for i in range(split.split_layer) for p in split.layers[i].parameters()}


def apply_search_space(
    split: Any, space: ClientSearchSpace | None, allow_empty: bool = False
) -> list[tuple[str, nn.Parameter]]:
    """Freezes the trainable client parameters outside `space` and returns the selected ones, in pinned order.

    Raises:
        `ValueError`: if `space` selects nothing while the client has trainable parameters, unless `allow_empty`
        (a static mask then holds the whole client update).
    """
    params = split.client_parameters()
    if space is None or space.is_full:
        return params
    blocks = _block_of(split)
    kept = [(n, p) for n, p in params if space.keeps(n, blocks.get(id(p)))]
    if params and not kept and not allow_empty:
        raise ValueError(
            f"The client search space {space.to_dict()} selects none of the {len(params)} trainable client "
            f"parameters (e.g. {params[0][0]!r}): check client_zo_blocks (0-based client blocks) and "
            "client_zo_modules (substrings of parameter names such as 'lora_B')."
        )
    keep = {id(p) for _, p in kept}
    for _, p in params:
        if id(p) not in keep:
            p.requires_grad_(False)
    return kept


def client_update_targets(
    split: Any, space: ClientSearchSpace | None = None, mask: ClientMask | Mapping | None = None
) -> tuple[list[tuple[str, nn.Parameter]], dict[int, torch.Tensor]]:
    """The tensors of the client update in pinned order, and the flat indices of the masked ones.

    Returns:
        `(named, masks)`: `named` lists the selected trainable parameters, then the masked base tensors; `masks`
        maps a position in `named` to its int64 flat indices (the position of a trainable parameter is absent).
    """
    # With a mask, a space that selects no trainable tensor is a mask-only client update (its adapters stay frozen).
    named = apply_search_space(split, space, allow_empty=mask is not None)
    masks: dict[int, torch.Tensor] = {}
    if mask is not None:
        mask = ClientMask.from_dict(mask)
        everything = dict(split.model.named_parameters())
        client = {id(p) for m in split.client_modules() for p in m.parameters(recurse=False)}
        for name, idx in mask.indices.items():
            param = everything.get(name)
            if param is None or id(param) not in client:
                raise ValueError(
                    f"The client mask names {name!r}, which is not a parameter of the client part: compute the mask "
                    "on the same architecture, adapters and split layer."
                )
            if param.requires_grad:
                raise ValueError(f"{name!r} is both trainable and masked; a mask covers frozen base weights only.")
            if idx[-1] >= param.numel():
                raise ValueError(f"Mask index {idx[-1]} out of range for {name!r} ({param.numel()} values).")
            # On the weight's device once: the hot path (every direction) then indexes without a copy.
            masks[len(named)] = torch.tensor(idx, dtype=torch.int64, device=param.device)
            named.append((name, param))
    return named, masks


def mask_direction_scales(
    named: list[tuple[str, nn.Parameter]], masks: dict[int, torch.Tensor], mask: ClientMask | Mapping | None
) -> dict[int, torch.Tensor]:
    """Position in `named` (from [`client_update_targets`]) -> the float32 direction scales of that masked tensor,
    aligned with `masks[position]`; empty when the mask has no `scales` (isotropic directions)."""
    if mask is None:
        return {}
    mask = ClientMask.from_dict(mask)
    if mask.scales is None:
        return {}
    return {
        pos: torch.tensor(mask.scales[named[pos][0]], dtype=torch.float32, device=masks[pos].device) for pos in masks
    }


def mask_direction_guide(
    named: list[tuple[str, nn.Parameter]], masks: dict[int, torch.Tensor], mask: ClientMask | Mapping | None
) -> DirectionGuide | None:
    """The mask's guided directions for the positions of `named` (from [`client_update_targets`]), or `None` when
    the mask has no guide. The guide is normalised over the whole mask in float64 on the CPU (the same bits on
    every holder), then scaled by `sqrt(guide_share * d)` and cast to float32 on each masked tensor's device."""
    if mask is None:
        return None
    mask = ClientMask.from_dict(mask)
    if mask.guide is None:
        return None
    positions = {named[pos][0]: pos for pos in masks}
    column = torch.cat([torch.tensor(mask.guide[name], dtype=torch.float64) for name in mask.indices])
    factor = (mask.guide_share * column.numel()) ** 0.5 / float(column.norm())
    vectors = {
        positions[name]: (torch.tensor(values, dtype=torch.float64) * factor).float().to(masks[positions[name]].device)
        for name, values in mask.guide.items()
    }
    return DirectionGuide(vectors=vectors, noise=(1.0 - mask.guide_share) ** 0.5)


def _uniform_scales(scores: torch.Tensor) -> torch.Tensor | None:
    return None


def _gradient_rms_scales(scores: torch.Tensor) -> torch.Tensor:
    # std proportional to the calibration gradient's RMS, normalised to a mean square of 1: E||s * u||^2 = d as for
    # isotropic directions, so zo_eps and the learning rates keep their scale.
    std = scores.double().sqrt()
    std = std / std.pow(2).mean().sqrt()
    return std.clamp_min(1e-6).float()  # a kept coordinate with no calibration gradient still gets a direction


# How `sensitivity_mask` sets the directions' standard deviation on each masked coordinate, from its summed squared
# calibration gradients. "gradient_rms": variance proportional to the squared gradient, so that the K * P directions
# of a round search mostly where the gradient is large (the estimate is then a preconditioned gradient, diag(s^2) g).
# On SmolLM2-135M's deep-split mask (d = 7,080) that raises a 24-direction estimate's one-step descent ~20x at the
# initial weights under an equal-curvature model, yet trained it is worse than "uniform" (docs/benchmarks.md).
DIRECTION_SCALES: dict[str, Callable[[torch.Tensor], torch.Tensor | None]] = {
    "uniform": _uniform_scales,
    "gradient_rms": _gradient_rms_scales,
}


def sensitivity_mask(
    split: Any,
    batches: Iterable[Mapping[str, torch.Tensor]],
    density: float,
    loss_func: Callable[[Any, torch.Tensor], torch.Tensor] | None = None,
    space: ClientSearchSpace | None = None,
    direction_scales: str = "uniform",
    guide_share: float = 0.0,
) -> ClientMask:
    """A static mask of the client base weights with the largest squared gradient on calibration data.

    Backpropagates the full model's loss on each calibration batch (set-up only: this is not part of training and
    needs public calibration data and the pre-trained weights, e.g. on the server), sums the squared gradients of
    every client base weight inside the client blocks (not LoRA adapters; not the embeddings, which are often tied to
    the server's LM head), and keeps the top `density` fraction of all candidate coordinates.

    Args:
        split ([`SplitModel`]): the split model at its initial weights.
        batches: calibration batches with `input_ids` (and `attention_mask`) and `labels`.
        density (`float`): fraction of the candidate coordinates to keep, in `(0, 1]` (e.g. `1e-4`).
        loss_func (`Callable`, *optional*): `loss_func(outputs, labels)`; default: the model's causal-LM loss.
        space ([`ClientSearchSpace`], *optional*): restricts the candidates to these blocks / name patterns.
        direction_scales (`str`, *optional*, defaults to `"uniform"`): the directions' standard deviation on the
            masked coordinates, by name in [`DIRECTION_SCALES`]: `"uniform"` (isotropic, no `scales`) or
            `"gradient_rms"` (proportional to each coordinate's calibration gradient RMS).
        guide_share (`float`, *optional*, defaults to `0.0`): with a value in `(0, 1)`, the mask also holds the mean
            calibration gradient on its coordinates as a guide, and that share of each direction's expected squared
            norm lies along it ([`~hosfl_hf.zeroth_order.DirectionGuide`]); `0` gives isotropic directions.

    Returns:
        [`ClientMask`]
    """
    from dataclasses import replace

    if direction_scales not in DIRECTION_SCALES:
        raise ValueError(f"direction_scales must be one of {list(DIRECTION_SCALES)}, got {direction_scales!r}.")
    if not 0 < density <= 1:
        raise ValueError(f"density={density} must be in (0, 1] (e.g. 1e-4 keeps 0.01% of the client base weights).")
    if not 0 <= guide_share < 1:
        raise ValueError(f"guide_share={guide_share} must be in [0, 1) (0: no guide; e.g. 0.5).")
    space = space or ClientSearchSpace()
    names = {id(p): n for n, p in split.model.named_parameters()}
    candidates: list[tuple[str, nn.Parameter]] = []
    for block in range(split.split_layer):
        if space.blocks is not None and block not in space.blocks:
            continue
        for param in split.layers[block].parameters():
            name = names[id(param)]
            if "lora_" in name or not param.is_floating_point():
                continue
            if space.modules is None or any(pattern in name for pattern in space.modules):
                candidates.append((name, param))
    if not candidates:
        raise ValueError(f"No client base weight matches the search space {space.to_dict()}.")
    trainable = [p for p in split.model.parameters() if p.requires_grad]
    scores = {name: torch.zeros(p.shape, dtype=torch.float32) for name, p in candidates}
    # The guide needs the signed sum too (one more float32 copy of the candidates, only then).
    sums = {name: torch.zeros(p.shape, dtype=torch.float32) for name, p in candidates} if guide_share else None
    try:
        for p in trainable:
            p.requires_grad_(False)
        for _, p in candidates:
            p.requires_grad_(True)
        for batch in batches:
            batch = dict(batch)
            labels = batch.pop("labels")
            inputs = {k: batch[k] for k in ("input_ids", "attention_mask") if k in batch}
            z = split.client(**inputs, grad=True)
            leaf = z.hidden_states
            outputs = split.server(replace(z, hidden_states=leaf), labels=None if loss_func else labels)
            loss = loss_func(outputs, labels) if loss_func is not None else outputs.loss
            loss.backward()
            for name, p in candidates:
                grad = p.grad.detach().float().cpu()
                scores[name] += grad.pow(2)
                if sums is not None:
                    sums[name] += grad
                p.grad = None
    finally:
        for _, p in candidates:
            p.requires_grad_(False)
        for p in trainable:
            p.requires_grad_(True)
    total = sum(s.numel() for s in scores.values())
    keep = max(1, int(round(density * total)))
    # Top-k per tensor, then the global top-k among those: never a vector of every candidate score.
    best = []
    for position, (name, _) in enumerate(candidates):
        flat = scores[name].flatten()
        values, idx = torch.topk(flat, min(keep, flat.numel()))
        best.append((values, idx, torch.full_like(idx, position)))
    values = torch.cat([b[0] for b in best])
    top = torch.topk(values, keep).indices
    flat_idx = torch.cat([b[1] for b in best])[top]
    owner = torch.cat([b[2] for b in best])[top]
    std = DIRECTION_SCALES[direction_scales](values[top])
    indices: dict[str, list[int]] = {}
    scales: dict[str, list[float]] = {}
    guide: dict[str, list[float]] = {}
    for position, (name, _) in enumerate(candidates):
        chosen = owner == position
        if chosen.any():
            indices[name] = flat_idx[chosen].tolist()
            if std is not None:
                scales[name] = std[chosen].tolist()
            if sums is not None:
                guide[name] = sums[name].flatten()[flat_idx[chosen]].tolist()
    source = "gradient sensitivity (sum of squared gradients)"
    if std is not None:
        source += f"; direction scales: {direction_scales}"
    if sums is not None:
        source += f"; guide: mean calibration gradient, share {guide_share}"
    return ClientMask(
        indices=indices,
        density=density,
        source=source,
        scales=scales if std is not None else None,
        guide=guide if sums is not None else None,
        guide_share=guide_share if sums is not None else None,
    )
