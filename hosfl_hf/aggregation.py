"""Server-side aggregation of what clients send back: the projected zeroth-order scalars."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

__all__ = ["average_scalars"]


def average_scalars(
    client_scalars: Mapping[int, Sequence[float]], num_perturbations: int, round_index: int | None = None
) -> list[float]:
    """Averages the clients' projected scalars, one average per perturbation seed.

    Every client of a round carries the same weight, matching the server objective (the mean of the client losses,
    each client backpropagating `loss / K`).

    Args:
        client_scalars (`Mapping[int, Sequence[float]]`): client id -> its `num_perturbations` scalars.
        num_perturbations (`int`): the number `P` of seeds broadcast this round.
        round_index (`int`, *optional*): only used in error messages.

    Raises:
        `ValueError`: if no client reported, a message has the wrong length, or a scalar is NaN/infinite. Nothing
            is averaged then, so no update can be applied from a corrupted round.
    """
    where = f" in round {round_index}" if round_index is not None else ""
    if not client_scalars:
        raise ValueError(f"No client reported zeroth-order scalars{where}; cannot aggregate an empty round.")
    for client, scalars in client_scalars.items():
        if len(scalars) != num_perturbations:
            raise ValueError(
                f"Client {client} sent {len(scalars)} scalars{where} but {num_perturbations} seeds were broadcast: "
                "the message is malformed (one scalar per seed is expected)."
            )
        if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in scalars):
            raise ValueError(
                f"Client {client} sent non-finite zeroth-order scalars {list(scalars)}{where}; the round is rejected "
                "and no update is applied. The client loss or activations diverged: lower the learning rates or "
                "zo_eps, or use bf16/fp32 clients instead of fp16."
            )
    count = len(client_scalars)
    return [sum(float(s[p]) for s in client_scalars.values()) / count for p in range(num_perturbations)]
