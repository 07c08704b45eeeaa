"""The norm of each round's applied update, per part, and a loud warning when a part that should train stands still.

A part whose update is exactly zero round after round is legal arithmetic (a zero gradient, a zero learning rate)
and so trains a whole run without any error: the weights handed back are the ones handed in. Every holder measures
what it applied (`Δθ = θ_after − θ_before`), logs `server_update_norm` / `client_update_norm`, and a
[`StandingStillGuard`] warns once when a part configured to train has had an exactly-zero update for `patience`
consecutive rounds. Controls that freeze a part on purpose (frozen client, client only) have no guard.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Sequence

import torch

__all__ = ["LIKELY_CAUSES", "StandingStillGuard", "UpdateSnapshot"]

EXACT_LIMIT = 1 << 26
"""Trainable values above which a snapshot keeps a fixed strided sample instead of every value (and the norm is
estimated from it): a full copy of a multi-GB part is not worth a metric."""

LIKELY_CAUSES = {
    "server": (
        "its trainable parameters receive no gradient (a quantized layer whose kernel has no autograd on this "
        "backend, parameters with requires_grad=False, a loss that does not depend on them), or its learning rate "
        "is 0"
    ),
    "client": (
        "every averaged scalar is 0 (lambda is 0 at the cut, or perturbing the client's trainable weights does not "
        "change the cut: they are not used in its forward), or client_learning_rate is 0"
    ),
}
"""Part -> what usually makes its update exactly zero (named in the warning)."""


class UpdateSnapshot:
    """The values of `parameters` before an update; [`norm`] is `||θ_after − θ_before||` after it.

    Exact while the parameters hold at most `EXACT_LIMIT` values; above, every `stride`-th value of each tensor is
    kept and the norm is the sample's, scaled by `sqrt(stride)` (exactly zero iff the sample did not move).
    """

    def __init__(self, parameters: Iterable[torch.Tensor]):
        self.parameters: Sequence[torch.Tensor] = list(parameters)
        total = sum(p.numel() for p in self.parameters)
        self.stride = max(1, math.ceil(total / EXACT_LIMIT))
        with torch.no_grad():
            self.values = [self._view(p).detach().clone() for p in self.parameters]

    def _view(self, param: torch.Tensor) -> torch.Tensor:
        return param.reshape(-1) if self.stride == 1 else param.reshape(-1)[:: self.stride]

    def norm(self) -> float:
        """The norm of the change since the snapshot (float64 accumulation)."""
        with torch.no_grad():
            squares = sum(
                float((self._view(p).double() - before.double()).square().sum())
                for p, before in zip(self.parameters, self.values)
            )
        return math.sqrt(squares * self.stride)


class StandingStillGuard:
    """Warns once when a part configured to train has had an exactly-zero applied update for `patience`
    consecutive rounds (a round without an update, e.g. skipped by the fp16 loss scaler, is not observed).

    Args:
        part (`str`): `"server"` or `"client"` (named in the warning, with its [`LIKELY_CAUSES`]).
        patience (`int`, *optional*, defaults to 3): consecutive zero updates before the warning.
    """

    def __init__(self, part: str, patience: int = 3):
        if patience < 1:
            raise ValueError(f"patience must be >= 1, got {patience}.")
        self.part, self.patience = part, patience
        self.zero_rounds = 0
        self.warned = False

    def observe(self, norm: float, round_index: int) -> None:
        """Records one applied update's norm; warns (once per guard) at the `patience`-th zero in a row."""
        self.zero_rounds = self.zero_rounds + 1 if norm == 0.0 else 0
        if self.zero_rounds >= self.patience and not self.warned:
            self.warned = True
            warnings.warn(
                f"The {self.part} part is configured to train but its applied update has been exactly zero for "
                f"{self.zero_rounds} consecutive rounds (up to round {round_index}): its weights are not learning. "
                f"Likely causes: {LIKELY_CAUSES.get(self.part, 'unknown')}.",
                RuntimeWarning,
                stacklevel=2,
            )
