"""`ClientUpdate`: the one record of an applied round (seeds, aggregated scalars, learning rate). The server sends it
to every holder of the client part, and a [`~hosfl_hf.trajectory.Trajectory`] keeps it; a module of its own so that
the client part, the trajectory and the messages all import it without importing each other."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ClientUpdate"]


@dataclass
class ClientUpdate:
    """One applied round, the one record of it: every holder of the client part applies
    `(1/(P mu)) sum_p scalars[p] u(seeds[p])` with learning rate `lr`. It is the message the server sends to the
    holders ("averaged scalars down") and the round a [`Trajectory`] records."""

    round: int
    seeds: list[int]
    scalars: list[float]
    lr: float
