"""Server-side aggregation of what clients send back: the projected zeroth-order scalars.

A registry of rules (`AGGREGATORS`): `"mean"` (the method's average, the default), and the robust rules `"median"`
(coordinate-wise: per seed, the median over clients) and `"trimmed_mean"` (per seed, the mean after dropping the
`ceil(trim_fraction * n)` largest and smallest of the `n` values, as long as one value remains). An optional `bound`
clips every client's scalars to `[-bound, bound]` first, so that no single client can move the update by more than
`bound / K` per seed.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Mapping, Sequence

__all__ = ["AGGREGATORS", "aggregate_scalars", "average_scalars"]


def _mean(values: list[float], trim_fraction: float) -> float:
    return sum(values) / len(values)


def _median(values: list[float], trim_fraction: float) -> float:
    return float(statistics.median(values))


def _trimmed_mean(values: list[float], trim_fraction: float) -> float:
    # Rounded up, and at least one value at each end whenever that leaves one: with dropout a round may have fewer
    # finishers than 1 / trim_fraction, and a floor would then trim nothing (the plain mean, one attacker enough).
    cut = min(math.ceil(trim_fraction * len(values)), (len(values) - 1) // 2) if trim_fraction > 0 else 0
    kept = sorted(values)[cut : len(values) - cut]
    return sum(kept) / len(kept)


AGGREGATORS: dict[str, Callable[[list[float], float], float]] = {
    "mean": _mean,
    "median": _median,
    "trimmed_mean": _trimmed_mean,
}


def _check(client_scalars: Mapping[int, Sequence[float]], num_perturbations: int, where: str) -> None:
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


def aggregate_scalars(
    client_scalars: Mapping[int, Sequence[float]],
    num_perturbations: int,
    rule: str = "mean",
    trim_fraction: float = 0.2,
    bound: float | None = None,
    round_index: int | None = None,
) -> list[float]:
    """One aggregate per perturbation seed of the clients' projected scalars.

    Args:
        client_scalars (`Mapping[int, Sequence[float]]`): client id -> its `num_perturbations` scalars.
        num_perturbations (`int`): the number `P` of seeds broadcast this round.
        rule (`str`): a key of `AGGREGATORS`.
        trim_fraction (`float`): for `"trimmed_mean"`, the fraction dropped at each end (in `[0, 0.5)`).
        bound (`float`, *optional*): clip each client's scalars to `[-bound, bound]` before aggregating.
        round_index (`int`, *optional*): only used in error messages.

    Raises:
        `ValueError`: if no client reported, a message has the wrong length, a scalar is NaN/infinite, or the rule is
            unknown. Nothing is aggregated then, so no update can be applied from a corrupted round.
    """
    if rule not in AGGREGATORS:
        raise ValueError(f"Unknown aggregation {rule!r}; use one of {list(AGGREGATORS)}.")
    where = f" in round {round_index}" if round_index is not None else ""
    _check(client_scalars, num_perturbations, where)
    rows = [[float(v) for v in s] for s in client_scalars.values()]
    if bound is not None:
        rows = [[min(max(v, -bound), bound) for v in row] for row in rows]
    combine = AGGREGATORS[rule]
    return [combine([row[p] for row in rows], trim_fraction) for p in range(num_perturbations)]


def average_scalars(
    client_scalars: Mapping[int, Sequence[float]], num_perturbations: int, round_index: int | None = None
) -> list[float]:
    """The per-seed mean over clients (every client of a round carries the same weight, matching the server objective:
    the mean of the client losses, each client backpropagating `loss / K`). See [`aggregate_scalars`]."""
    return aggregate_scalars(client_scalars, num_perturbations, "mean", round_index=round_index)
