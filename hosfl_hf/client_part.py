"""`ClientPart`: the client part's computation, shared by every holder of it (the trainer's in-process clients, a
protocol `SplitClient`, a Flower ClientApp, a replay): its precision, its forward without autograd, the probes of
the zeroth-order estimate and the update rebuilt from seeds and scalars. It imports no trainer and no transport."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from .client_update import ClientUpdate
from .named_tensors import copy_named_tensors
from .search_space import (
    ClientMask,
    ClientSearchSpace,
    client_update_targets,
    mask_direction_guide,
    mask_direction_scales,
)
from .zeroth_order import ZerothOrderEstimator, apply_zo_update

__all__ = ["CLIENT_INPUTS", "ClientPart"]

CLIENT_INPUTS = ("input_ids", "attention_mask", "position_ids", "inputs_embeds")
"""The batch entries the client part runs on (the rest, e.g. `labels`, stays with the batch)."""


class ClientPart:
    """The client part's computation over a split model: its precision, its forward, the probes and the shared
    update. [`SplitClient`] runs one on its own copy of the client part; [`HOSFLTrainer`] runs one on the copy that
    its in-process holders share.

    Args:
        split ([`SplitModel`]): the split model (only its client part is used).
        zo_eps, zo_estimator: the perturbation scale and estimator.
        autocast_dtype (`torch.dtype`, *optional*): the client's compute precision (autocast), `None` for the weights'.
        space ([`ClientSearchSpace`], *optional*): the trainable client parameters the update covers (the others
            are frozen); `None` for all of them.
        mask ([`ClientMask`], *optional*): a static sparse mask of client base weights the update also covers.
        defense ([`~hosfl_hf.privacy.CutDefense`], *optional*): clipping and noise on the cut that leaves the client
            (`release`); the probes use the clean cut, so the noise cancels from the scalars.

    Attributes:
        parameters: the tensors the directions perturb, in pinned order (selected trainable parameters, then the
            masked base weights).
        update_parameters: what the client optimizer steps, aligned with `parameters`: a trainable parameter itself,
            or the float32 vector of a masked tensor's masked values (written back into the base weight after each
            update).
        scales: position -> the float32 direction scales of a masked tensor whose mask has `scales` (empty for
            isotropic directions).
        guide: the mask's guided directions ([`~hosfl_hf.zeroth_order.DirectionGuide`]), `None` without a guide.
    """

    def __init__(
        self,
        split: Any,
        zo_eps: float,
        zo_estimator: str,
        autocast_dtype: torch.dtype | None = None,
        space: ClientSearchSpace | None = None,
        mask: ClientMask | None = None,
        defense: Any = None,
    ):
        self.split = split
        self.defense = defense if defense is not None and defense.active else None
        self.parameters, self.masks = client_update_targets(split, space, mask)
        self.scales = mask_direction_scales(self.parameters, self.masks, mask)
        self.guide = mask_direction_guide(self.parameters, self.masks, mask)
        self.zo_eps = zo_eps
        self.autocast_dtype = autocast_dtype
        self.estimator = ZerothOrderEstimator(
            self.parameters,
            zo_eps,
            zo_estimator,
            module=split.model,
            masks=self.masks,
            scales=self.scales,
            guide=self.guide,
        )
        self.mask_values = {
            position: nn.Parameter(self.parameters[position][1].detach().flatten()[idx].float().clone())
            for position, idx in self.masks.items()
        }
        self.forward_passes = 0
        self.update_parameters = [
            (name, self.mask_values.get(position, param)) for position, (name, param) in enumerate(self.parameters)
        ]

    def write_mask_values(self) -> None:
        """Copies the masked values into the base weights (after an update, or after loading them)."""
        with torch.no_grad():
            for position, values in self.mask_values.items():
                param = self.parameters[position][1]
                param.view(-1)[self.masks[position].to(param.device)] = values.to(param.dtype).to(param.device)

    def mask_state(self) -> dict[str, torch.Tensor]:
        """The masked values by base-weight name (what a checkpoint must keep besides the trainable weights)."""
        return {self.parameters[pos][0]: values.detach().clone() for pos, values in self.mask_values.items()}

    def load_mask_state(self, state: dict[str, torch.Tensor]) -> None:
        targets = {self.parameters[pos][0]: values for pos, values in self.mask_values.items()}
        copy_named_tensors(state, targets, "Saved masked values into this client part's mask")
        self.write_mask_values()

    @contextlib.contextmanager
    def precision(self) -> Iterator[None]:
        """One autocast region per forward, with autocast's weight cache off: the cache is keyed by the parameter, so
        a second perturbed forward in the same region would reuse the first perturbation's cast weights."""
        if self.autocast_dtype is None:
            yield
            return
        device = self.parameters[0][1].device.type if self.parameters else "cpu"
        with torch.autocast(device_type=device, dtype=self.autocast_dtype, cache_enabled=False):
            yield

    def forward(self, inputs: dict[str, torch.Tensor], grad: bool = False, count: bool = True) -> Any:
        """The cut ([`CutActivations`]) at the current weights, in the client's precision (`count`: a forward of
        the client's round work, counted in `forward_passes`)."""
        self.forward_passes += count
        with self.precision():
            return self.split.client(**inputs, grad=grad)

    def release(self, hidden: torch.Tensor, round_index: int, client: int) -> torch.Tensor:
        """The cut activations that leave the client: `hidden` through the defense (`hidden` itself without one)."""
        if self.defense is None:
            return hidden
        return self.defense.release(hidden, round_index, client)

    def probe(
        self, inputs: dict[str, torch.Tensor], reference: torch.Tensor, cotangent: torch.Tensor, seeds: list[int]
    ) -> list[float]:
        """The `P` scalars `<lambda, z(theta + mu u_p) - z(theta)>`.

        With a defense, `z` is the clipped clean cut: the reference is recomputed here (the `reference` passed in may
        be the noisy cut that was sent), and the noise, the same realisation in both terms, is never added, so it
        cancels exactly."""
        # The estimator's one-time check of the forward is not round work (not counted in `forward_passes`).
        self.estimator.check_forward(lambda: self.forward(inputs, count=False).hidden_states)
        if self.defense is None:
            return self.estimator.projected_scalars(
                lambda: self.forward(inputs).hidden_states, reference, cotangent, seeds
            )
        clip = self.defense.clip
        clean = clip(self.forward(inputs).hidden_states)
        return self.estimator.projected_scalars(
            lambda: clip(self.forward(inputs).hidden_states), clean, cotangent, seeds
        )

    def apply(self, update: ClientUpdate, optimizer: torch.optim.Optimizer) -> None:
        """Applies one round's update, rebuilt from its seeds and averaged scalars, through `optimizer`."""
        apply_zo_update(
            self.update_parameters,
            optimizer,
            update.seeds,
            update.scalars,
            self.zo_eps,
            update.lr,
            self.scales,
            self.guide,
        )
        self.write_mask_values()
