"""The messages of one HO-SFL round: plain data (tensors and small records), one type per leg.

    server -> client   RoundPlan      the round, its sampled clients and the P seeds          ("seeds down")
                       CatchUp        the rounds a client missed, before it works again       ("history down")
    client -> server   ClientForward  cut activations, masks/positions and labels            ("cut up")
    server -> client   Cotangent      lambda = dloss_i/dz for that client's batch             ("lambda down")
    client -> server   ProbeReply     the client's P scalars <lambda, z(theta + mu u_p) - z>  ("scalars up")
    server -> holders  ClientUpdate   seeds, averaged scalars and lr of one applied round    ("averaged scalars down")

[`hosfl_hf.protocol.codec`] turns each into bytes and back, exactly, and validates what it decodes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..trajectory import TrajectoryRound

__all__ = ["CatchUp", "ClientForward", "ClientUpdate", "Cotangent", "MESSAGE_TYPES", "ProbeReply", "RoundPlan"]


@dataclass
class RoundPlan:
    """Round `round`: the sampled `clients` and the perturbation `seeds` the server broadcasts."""

    round: int
    clients: list[int]
    seeds: list[int]


@dataclass
class ClientForward:
    """What a client sends after its forward pass: the cut and the labels of its batch."""

    round: int
    client: int
    hidden_states: torch.Tensor
    labels: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None
    position_ids: torch.Tensor | None = None

    @property
    def num_examples(self) -> int:
        return int(self.hidden_states.shape[0])


@dataclass
class Cotangent:
    """lambda = dloss_i/dz for client `client`'s batch of round `round` (the shape of its `hidden_states`)."""

    round: int
    client: int
    cotangent: torch.Tensor


@dataclass
class ProbeReply:
    """The client's `P` projected scalars, one per seed of the round's plan."""

    round: int
    client: int
    scalars: list[float]


@dataclass
class ClientUpdate:
    """One applied round: every holder of the client part applies `(1/(P mu)) sum_p scalars[p] u(seeds[p])` with
    learning rate `lr`. The same record as a [`TrajectoryRound`]."""

    round: int
    seeds: list[int]
    scalars: list[float]
    lr: float

    def to_trajectory_round(self) -> TrajectoryRound:
        return TrajectoryRound(round=self.round, seeds=list(self.seeds), scalars=list(self.scalars), lr=self.lr)

    @classmethod
    def from_trajectory_round(cls, record: TrajectoryRound) -> ClientUpdate:
        return cls(round=record.round, seeds=list(record.seeds), scalars=list(record.scalars), lr=record.lr)


@dataclass
class CatchUp:
    """The applied rounds a client has not seen yet, in order (empty when it is up to date)."""

    rounds: list[ClientUpdate] = field(default_factory=list)


MESSAGE_TYPES = {
    "plan": RoundPlan,
    "cut": ClientForward,
    "cotangent": Cotangent,
    "scalars": ProbeReply,
    "update": ClientUpdate,
    "catchup": CatchUp,
}
