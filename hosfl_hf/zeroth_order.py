"""Zeroth-order estimation for the client part: seeded perturbations, projected scalars and the shared update.

Directions follow [`hosfl_hf.rng`] (the versioned RNG specification): the direction of parameter number `j` (in the
pinned `named_parameters` order of the client's trainable parameters) under perturbation seed `s` is an explicit,
seeded CPU draw, so every holder of the client part rebuilds the same update from seeds and scalars.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .rng import RNG_SPEC, direction, direction_seed, guide_coefficient, round_seeds

__all__ = [
    "CLIENT_STEP_RULES",
    "DirectionGuide",
    "NormalizedSGD",
    "RNG_SPEC",
    "ZerothOrderEstimator",
    "apply_zo_update",
    "build_client_optimizer",
    "zo_gradients",
    "direction",
    "direction_seed",
    "loss_differences",
    "round_seeds",
]


@dataclass(frozen=True)
class DirectionGuide:
    """Guided directions on the masked tensors (guided evolution strategies, Maheswaranathan et al., 2019).

    With a unit guide vector `ghat` over the `d` masked coordinates (e.g. the mean calibration gradient, public like
    the mask) and a share `gamma` in `(0, 1)`, the direction of masked tensor `j` under seed `s` is
    `sqrt(1 - gamma) * u_j(s) + eta(s) * sqrt(gamma * d) * ghat_j`, with `eta(s)` one standard normal draw per seed
    ([`hosfl_hf.rng.guide_coefficient`]). Its covariance is `(1 - gamma) I + gamma d ghat ghat^T` (trace `d`, as for
    isotropic directions, so `zo_eps` and the learning rates keep their scale), so the estimate's mean is
    `(1 - gamma) g + gamma d <g, ghat> ghat`: the few directions of a round measure the gradient's component along
    the guide almost exactly, and the rest of the space as before. Everything is a function of the seed and of the
    mask (which holds the guide), so every holder rebuilds the same update.

    Args:
        vectors (`dict[int, torch.Tensor]`):
            Position in the estimator's parameters -> float32 `sqrt(gamma * d) * ghat_j`, aligned with that masked
            tensor's indices.
        noise (`float`):
            `sqrt(1 - gamma)`, the isotropic part's scale.
    """

    vectors: dict[int, torch.Tensor]
    noise: float

    def shape(self, position: int, u: torch.Tensor, seed: int) -> torch.Tensor:
        """The guided direction of `position` from its isotropic draw `u` (fp32); `u` itself off the guide."""
        vector = self.vectors.get(position)
        if vector is None:
            return u
        return torch.add(u * self.noise, vector.to(u.device), alpha=guide_coefficient(seed))


class ZerothOrderEstimator:
    """Computes the client's projected scalars `v_p = <lambda, z(theta + mu u_p) - z(theta)>`.

    Args:
        parameters (`Sequence[tuple[str, nn.Parameter]]`):
            The client's trainable parameters in their pinned order.
        eps (`float`):
            Perturbation scale `mu`.
        estimator (`str`):
            `"one_sided"` (`z(theta + mu u) - z(theta)`, one extra forward per direction) or `"two_sided"`
            (`(z(theta + mu u) - z(theta - mu u)) / 2`, two extra forwards, lower bias).
        module (`nn.Module`, *optional*):
            The model that holds `parameters`. With it, a perturbed forward needs one extra tensor of memory, not a
            copy of every trainable tensor (see [`perturbed`]).
        masks (`dict[int, torch.Tensor]`, *optional*):
            Position in `parameters` -> int64 flat indices: those tensors are perturbed on these coordinates only,
            by a Gaussian vector of that length (a static sparse mask, [`hosfl_hf.search_space.ClientMask`]).
        scales (`dict[int, torch.Tensor]`, *optional*):
            Position in `parameters` -> float32 standard deviations aligned with `masks[position]`: the direction
            there is `scales * u` (the mask's `scales`).
        guide ([`DirectionGuide`], *optional*):
            Guided directions on the masked tensors (applied before `scales`).
        first_index (`int`, *optional*, defaults to 0):
            The RNG index of the first parameter: the server's parameters follow the client's in the pinned order
            (ZO-SFL perturbs each part on its own holder, with the same directions as one estimator over both).
    """

    def __init__(
        self,
        parameters: Sequence[tuple[str, nn.Parameter]],
        eps: float,
        estimator: str = "one_sided",
        module: nn.Module | None = None,
        masks: dict[int, torch.Tensor] | None = None,
        scales: dict[int, torch.Tensor] | None = None,
        guide: DirectionGuide | None = None,
        first_index: int = 0,
    ):
        if estimator not in ("one_sided", "two_sided"):
            raise ValueError(f"estimator must be 'one_sided' or 'two_sided', got {estimator!r}.")
        self.parameters = list(parameters)
        self.eps = eps
        self.estimator = estimator
        self.masks = dict(masks or {})
        self.scales = dict(scales or {})
        self.guide = guide
        self.first_index = first_index  # RNG index of the first parameter (the server's follow the client's)
        self._owners = _owning_modules(module, self.parameters) if module is not None else None
        self._checked = False

    @property
    def forwards_per_direction(self) -> int:
        return 1 if self.estimator == "one_sided" else 2

    @property
    def swaps(self) -> bool:
        """Whether perturbed forwards swap each tensor in only while the module that owns it runs (one extra tensor
        of memory) rather than perturbing every tensor in place from saved copies (one copy of each)."""
        return self._owners is not None

    @contextlib.contextmanager
    def perturbed(self, seed: int, scale: float) -> Iterator[None]:
        """Within the context, forwards see the parameters at `theta + scale * u(seed)`; after it, exactly `theta`.

        Exact restore matters: floating-point `(x + a) - a` is not always `x`, and a drift would make the holders
        that probed differ from those that did not. Two ways, the same bits:

        * swap (when built with `module`): the stored tensors are never modified; while a module that owns
          trainable tensors runs (forward pre-hook to forward hook), each of its tensors is swapped for
          `theta + scale * u`, built then and freed after. Extra memory: the tensors of one module.
        * copy: each tensor is perturbed in place and copied back from a saved clone. Extra memory: a copy of every
          trainable tensor (small for adapters, the size of the weights for a full-parameter client).
        """
        if self._owners is None:
            with self._copy_perturbed(seed, scale):
                yield
            return

        def inside(index: int, real: torch.Tensor) -> torch.Tensor:
            if index in self.masks:
                return _masked_add(real, self.masks[index], seed, index, scale, self.scales.get(index), self.guide)
            return torch.add(real, direction(real, seed, self.first_index + index), alpha=scale)

        with self._swapped(inside, outside=None):
            yield

    @contextlib.contextmanager
    def _copy_perturbed(self, seed: int, scale: float) -> Iterator[None]:
        saved: list[tuple[nn.Parameter, torch.Tensor]] = []
        try:
            with torch.no_grad():
                for index, (_, param) in enumerate(self.parameters):
                    saved.append((param, param.detach().clone()))
                    if index in self.masks:
                        param.copy_(
                            _masked_add(
                                param, self.masks[index], seed, index, scale, self.scales.get(index), self.guide
                            )
                        )
                    else:
                        param.add_(direction(param, seed, self.first_index + index), alpha=scale)
            yield
        finally:
            with torch.no_grad():
                for param, original in saved:
                    param.copy_(original)

    @contextlib.contextmanager
    def _swapped(
        self,
        inside: Callable[[int, torch.Tensor], torch.Tensor],
        outside: Callable[[torch.Tensor], torch.Tensor] | None,
    ) -> Iterator[None]:
        """Parameter `j` holds `inside(j, theta_j)` while an owning module runs and `outside(theta_j)` (default:
        `theta_j` itself) otherwise; every parameter holds `theta_j` again on exit, whatever happened."""
        real = {id(p): p.data for _, p in self.parameters}
        handles = []

        def enter(module: nn.Module, args: Any) -> None:
            for index, param in self._owners[module]:
                param.data = inside(index, real[id(param)])

        def leave(module: nn.Module, args: Any, output: Any) -> None:
            for _, param in self._owners[module]:
                param.data = real[id(param)] if outside is None else outside(real[id(param)])

        try:
            with torch.no_grad():
                if outside is not None:
                    for _, param in self.parameters:
                        param.data = outside(param.data)
                for module in self._owners:
                    handles.append(module.register_forward_pre_hook(enter))
                    handles.append(module.register_forward_hook(leave))
                yield
        finally:
            for handle in handles:
                handle.remove()
            for _, param in self.parameters:
                param.data = real[id(param)]

    def check_forward(self, forward: Callable[[], torch.Tensor]) -> None:
        """Before the first swapped forward: checks that `forward` reads every trainable tensor only inside the
        forward of a module that owns it (e.g. DoRA reads `lora_A.weight` from another module). Outside the owners
        the tensors are NaN (a zero-stride view: no memory) for one forward; a non-finite output means some read
        happened elsewhere, and this estimator falls back to copies, with a warning."""
        if self._owners is None or self._checked:
            return
        self._checked = True

        def poison(real: torch.Tensor) -> torch.Tensor:
            return torch.full((), float("nan"), dtype=real.dtype, device=real.device).expand(real.shape)

        with self._swapped(lambda index, real: real, outside=poison):
            output = forward()
        if not bool(torch.isfinite(torch.as_tensor(output).float()).all()):
            self._owners = None
            warnings.warn(
                "The model reads some trainable client tensors outside the modules that own them; zeroth-order "
                "perturbations use saved copies of the trainable tensors (extra memory: one copy).",
                stacklevel=3,
            )

    def projected_scalars(
        self,
        forward: Callable[[], torch.Tensor],
        reference: torch.Tensor,
        cotangent: torch.Tensor,
        seeds: Sequence[int],
    ) -> list[float]:
        """One scalar per seed: the inner product (fp32) of `cotangent` with the change of `forward()`'s output.

        Args:
            forward: recomputes the client output `z` with the current (perturbed) weights, without autograd.
            reference: `z` at the unperturbed weights (used by the one-sided estimator).
            cotangent: `lambda = dloss/dz` returned by the server.
            seeds: the round's perturbation seeds.
        """
        self.check_forward(forward)
        cotangent = cotangent.float()
        scalars = []
        for seed in seeds:
            with self.perturbed(seed, self.eps):
                plus = forward()
            if self.estimator == "one_sided":
                delta = plus.float() - reference.float()
            else:
                with self.perturbed(seed, -self.eps):
                    minus = forward()
                delta = (plus.float() - minus.float()) / 2
            scalars.append(float(torch.sum(cotangent * delta, dtype=torch.float32)))
        return scalars


def loss_differences(
    estimator: ZerothOrderEstimator, loss: Callable[[], torch.Tensor], seeds: Sequence[int]
) -> tuple[list[float], float]:
    """Two-point loss differences `(L(theta + mu u_p) - L(theta - mu u_p)) / 2` over all of `estimator`'s parameters
    (ZO-SFL and MeZO, where no backpropagation happens anywhere), and the mean of the evaluated losses."""
    estimator.check_forward(loss)
    values, total = [], 0.0
    for seed in seeds:
        with estimator.perturbed(seed, estimator.eps):
            plus = float(loss())
        with estimator.perturbed(seed, -estimator.eps):
            minus = float(loss())
        values.append((plus - minus) / 2)
        total += plus + minus
    return values, total / (2 * len(seeds))


def _masked_add(
    real: torch.Tensor,
    indices: torch.Tensor,
    seed: int,
    index: int,
    scale: float,
    scales: torch.Tensor | None = None,
    guide: DirectionGuide | None = None,
) -> torch.Tensor:
    """`real` plus `scale * u` on the masked coordinates only (`u`: the direction of a vector of `len(indices)`,
    guided by `guide` and times `scales` if given)."""
    u = masked_direction(indices, seed, index, scales, guide)
    u = u.to(device=real.device, dtype=real.dtype)
    flat = real.detach().flatten().clone()
    flat.index_add_(0, indices.to(real.device), u, alpha=scale)
    return flat.view_as(real)


def masked_direction(
    values: torch.Tensor,
    seed: int,
    index: int,
    scales: torch.Tensor | None = None,
    guide: DirectionGuide | None = None,
) -> torch.Tensor:
    """The fp32 direction of the masked tensor at `index` (a vector shaped like `values`): the isotropic draw, guided
    by `guide` (if it guides `index`), times `scales` (if given)."""
    u = direction(values, seed, index, dtype=torch.float32)
    if guide is not None:
        u = guide.shape(index, u, seed)
    return scale_direction(u, scales)


def scale_direction(u: torch.Tensor, scales: torch.Tensor | None) -> torch.Tensor:
    """`u * scales` in fp32 (an exactly rounded product: the same bits on every device), or `u` itself."""
    return u if scales is None else u * scales.to(u.device)


class NormalizedSGD(torch.optim.SGD):
    """SGD on the normalised gradient `g / ||g||` (the norm over every tensor of the optimizer): a step of length
    `lr` whatever the scale of the estimate, which for a zeroth-order estimate grows like `sqrt(d)`.

    `norm_scale`, when set, replaces `1 / ||g||` (the zeroth-order update computes the norm in a first pass over the
    seeds and then steps one tensor at a time)."""

    def __init__(self, params: Any, lr: float, weight_decay: float = 0.0):
        super().__init__(params, lr=lr, weight_decay=weight_decay, foreach=False)
        self.norm_scale: float | None = None

    @torch.no_grad()
    def step(self, closure: Callable | None = None) -> Any:
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        scale = self.norm_scale
        if scale is None:
            norm = math.sqrt(sum(float(torch.sum(g.float() * g.float())) for g in grads))
            scale = 1.0 / norm if norm > 0 else 0.0
        for g in grads:
            g.mul_(scale)
        return super().step(closure)


def _sgd(params: list, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay, foreach=False)


def _adamw(params: list, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, foreach=False, fused=False)


# The client's step rules (`client_optimizer`): every implementation pinned (no foreach/fused kernels) so that every
# holder computes the same bits.
CLIENT_STEP_RULES: dict[str, Callable[[list, float, float], torch.optim.Optimizer]] = {
    "sgd": _sgd,
    "normalized_sgd": NormalizedSGD,
    "adamw": _adamw,
}


def build_client_optimizer(
    parameters: Sequence[nn.Parameter], name: str, lr: float, weight_decay: float
) -> torch.optim.Optimizer:
    """The client optimizer, by its name in `CLIENT_STEP_RULES` (`"sgd"`: ZO-SGD, `"normalized_sgd"`: a step of
    length `lr` along the estimate, `"adamw"`)."""
    params = list(parameters)
    if not params:
        raise ValueError(
            "The client part has no trainable parameters: there is nothing for the zeroth-order update to train. "
            "Unfreeze client blocks or add client LoRA adapters (e.g. LoraConfig(layers_to_transform=...))."
        )
    if name not in CLIENT_STEP_RULES:
        raise ValueError(f"client_optimizer must be one of {list(CLIENT_STEP_RULES)}, got {name!r}.")
    return CLIENT_STEP_RULES[name](params, lr, weight_decay)


def _check_scalars(seeds: Sequence[int], scalars: Sequence[float]) -> None:
    if len(seeds) != len(scalars) or not seeds:
        raise ValueError(f"Need one scalar per seed, got {len(seeds)} seeds and {len(scalars)} scalars.")
    bad = [i for i, v in enumerate(scalars) if not math.isfinite(v)]
    if bad:
        raise ValueError(
            f"Zeroth-order scalars {[scalars[i] for i in bad]} (perturbations {bad}) are not finite; no update was "
            "applied. The loss or the client activations diverged: lower the learning rates or zo_eps."
        )


def zo_gradients(
    parameters: Sequence[tuple[str, nn.Parameter]],
    seeds: Sequence[int],
    scalars: Sequence[float],
    eps: float,
    first_index: int = 0,
    scales: dict[int, torch.Tensor] | None = None,
    guide: DirectionGuide | None = None,
) -> Iterator[tuple[nn.Parameter, torch.Tensor]]:
    """Yields `(parameter, g)` with `g = (1 / (P eps)) sum_p scalars[p] u_p` (fp32), one tensor at a time.

    `first_index` is the RNG index of the first parameter (when these parameters follow others in the pinned order).
    `scales` (position in `parameters` -> float32 tensor of its shape) multiplies that parameter's directions (a
    mask's direction scales; see [`ZerothOrderEstimator`]); `guide` shapes the guided positions' directions (see
    [`DirectionGuide`]).
    """
    _check_scalars(seeds, scalars)
    coefficients = [float(v) / (len(seeds) * eps) for v in scalars]
    scales = scales or {}
    for offset, (_, param) in enumerate(parameters):
        grad = torch.zeros(param.shape, dtype=torch.float32, device=param.device)
        for seed, c in zip(seeds, coefficients):
            u = direction(param, seed, first_index + offset, dtype=torch.float32)
            grad.add_(guide.shape(offset, u, seed) if guide is not None else u, alpha=c)
        # sum_p c_p (s * u_p) = s * sum_p c_p u_p up to rounding; scaling the sum once is what every holder does.
        yield param, scale_direction(grad, scales.get(offset))


def apply_zo_update(
    parameters: Sequence[tuple[str, nn.Parameter]],
    optimizer: torch.optim.Optimizer,
    seeds: Sequence[int],
    scalars: Sequence[float],
    eps: float,
    lr: float,
    scales: dict[int, torch.Tensor] | None = None,
    guide: DirectionGuide | None = None,
) -> None:
    """Applies `g = (1 / (P eps)) sum_p scalars[p] u_p` through `optimizer`, one parameter tensor at a time.

    With per-client seeds the round carries `K * P` seeds and scalars (each client's own), and `g` is the documented
    `(1 / (K P eps)) sum_m sum_p v_mp u_mp`. A masked tensor is stepped through its vector of masked values (the
    caller writes them back into the base weight); `scales` are the mask's direction scales by position (the
    directions there are `scales * u`) and `guide` its guided directions ([`DirectionGuide`]).

    The gradient of each tensor is rebuilt from the seeds, used for one optimizer step of that tensor and freed, so
    no vector of all client parameters (or gradients) is ever materialized.

    Raises:
        `ValueError`: if a scalar is NaN or infinite (nothing is applied then).
    """
    _check_scalars(seeds, scalars)
    for group in optimizer.param_groups:
        group["lr"] = lr
    normalized = isinstance(optimizer, NormalizedSGD)
    with torch.no_grad():
        if normalized:  # first pass: the norm of the whole estimate, rebuilt tensor by tensor
            estimate = zo_gradients(parameters, seeds, scalars, eps, scales=scales, guide=guide)
            squares = sum(float(torch.sum(g * g)) for _, g in estimate)
            optimizer.norm_scale = 1.0 / math.sqrt(squares) if squares > 0 else 0.0
        try:
            for param, grad in zo_gradients(parameters, seeds, scalars, eps, scales=scales, guide=guide):
                param.grad = grad.to(param.dtype)
                optimizer.step()
                param.grad = None
        finally:
            if normalized:
                optimizer.norm_scale = None


def _owning_modules(
    module: nn.Module, parameters: Sequence[tuple[str, nn.Parameter]]
) -> dict[nn.Module, list[tuple[int, nn.Parameter]]] | None:
    """Module -> `(index, parameter)` of the trainable tensors it registers itself (a tied tensor has two owners);
    `None` if some tensor has no owner in `module`."""
    index = {id(p): i for i, (_, p) in enumerate(parameters)}
    owners: dict[nn.Module, list[tuple[int, nn.Parameter]]] = {}
    for child in module.modules():
        for param in child._parameters.values():
            if param is not None and id(param) in index:
                owners.setdefault(child, []).append((index[id(param)], param))
    owned = {i for entries in owners.values() for i, _ in entries}
    return owners if len(owned) == len(index) else None
