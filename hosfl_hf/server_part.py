"""`ServerPart`: the server part's computation on a received cut, shared by every server of a round (the trainer's,
whose backward is the Trainer's, and the protocol's `SplitServer`): the forward from the cut to the loss, and
lambda = dloss_i/dz from the gradient its backward left on the cut. It imports no trainer and no transport."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch

from .split import CutActivations

__all__ = ["ServerPart"]


class ServerPart:
    """The server part of a split model.

    Args:
        split ([`SplitModel`]): the split model (only its server part is run).
        loss_func (`Callable`, *optional*): `loss_func(outputs, labels)` returning a client batch's mean loss; by
            default the model's own causal-LM loss (the labels go into the model).
    """

    def __init__(self, split: Any, loss_func: Callable | None = None):
        self.split, self.loss_func = split, loss_func

    def loss(
        self, cut: CutActivations, labels: torch.Tensor | None, grad: bool = True, **kwargs: Any
    ) -> tuple[torch.Tensor, Any, CutActivations]:
        """One client batch's loss from its cut. The cut's hidden states become a leaf (`requires_grad=grad`) whose
        `.grad` the backward fills: lambda is read from it ([`cotangent`]).

        Args:
            cut ([`CutActivations`]): what the client sent.
            labels (`torch.Tensor`, *optional*): the batch's labels.
            grad (`bool`): whether a backward follows.
            kwargs: passed to `SplitModel.server` (e.g. `model=` the Trainer's wrapped model, extra model inputs).

        Returns:
            `(loss, outputs, cut)`: the loss, the model's outputs and the cut with its leaf hidden states.

        Raises:
            `ValueError`: if the server part returned no loss.
        """
        cut = replace(cut, hidden_states=cut.hidden_states.detach().requires_grad_(grad))
        lm_labels = None if self.loss_func is not None else labels
        outputs = self.split.server(cut, labels=lm_labels, **kwargs)
        loss = self.loss_func(outputs, labels) if self.loss_func is not None else outputs.loss
        if loss is None:
            raise ValueError("The server part returned no loss: the batch needs 'labels' (or pass compute_loss_func).")
        return loss, outputs, cut

    @staticmethod
    def cotangent(cut: CutActivations, clients_per_round: int, loss_scale: float = 1.0) -> torch.Tensor:
        """lambda_i = dloss_i/dz of a client whose backward was of `loss_i / K` (times a loss scale, a power of two):
        `grad / loss_scale * K`, exact in floating point."""
        return cut.hidden_states.grad / loss_scale * clients_per_round
