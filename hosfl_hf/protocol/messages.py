"""The messages of one HO-SFL round: plain data (tensors and small records), one type per leg.

    server -> client   RoundPlan      the round, its sampled clients and the P seeds          ("seeds down")
                       CatchUp        the rounds a client missed (or a checkpoint plus the     ("history down")
                                      rounds after it), before it works again
    client -> server   ClientForward  cut activations, masks/positions and labels            ("cut up")
    server -> client   Cotangent      lambda = dloss_i/dz for that client's batch             ("lambda down")
    client -> server   ProbeReply     the client's P scalars <lambda, z(theta + mu u_p) - z>  ("scalars up")
    server -> holders  ClientUpdate   seeds, averaged scalars and lr of one applied round    ("averaged scalars down")

A first-order client (SplitLoRA) answers lambda with its gradient instead of scalars, and the holders apply the
round's averaged gradient:

    client -> server   ClientGradient   the gradient of lambda_i / K through the client part ("gradient up")
    server -> holders  GradientUpdate   the round's averaged, clipped gradient and lr      ("gradient down")

The methods whose server estimates by loss differences send other forward legs: ZO-SFL's client the cuts of its
perturbed part (`PerturbedCuts`), the methods without a split the batch itself (`ClientBatch`: centralized training
and MeZO pool the data at the server). FedAvg-LoRA's client sends the gradient of its whole model (`ClientGradient`)
and gets the new weights (`WeightsUpdate`).

[`hosfl_hf.protocol.codec`] turns each into bytes and back, exactly, and validates what it decodes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..client_update import ClientUpdate

__all__ = [
    "CatchUp",
    "ClientCheckpoint",
    "ClientForward",
    "ClientBatch",
    "ClientGradient",
    "ClientUpdate",
    "Cotangent",
    "GradientUpdate",
    "PerturbedCuts",
    "WeightsUpdate",
    "MESSAGE_TYPES",
    "ProbeReply",
    "RoundPlan",
]


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
class PerturbedCuts:
    """ZO-SFL's forward leg: for each seed `p` of the round, the cut at `theta + mu u_p` (`hidden_states[2p]`) and at
    `theta - mu u_p` (`hidden_states[2p + 1]`), and the batch's labels."""

    round: int
    client: int
    hidden_states: torch.Tensor
    labels: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None
    position_ids: torch.Tensor | None = None

    def cut(self, index: int) -> ClientForward:
        """The `index`-th cut as a [`ClientForward`]."""
        return ClientForward(
            self.round, self.client, self.hidden_states[index], self.labels, self.attention_mask, self.position_ids
        )


@dataclass
class ClientBatch:
    """The forward leg of a method without a split: the client's batch itself."""

    round: int
    client: int
    input_ids: torch.Tensor
    labels: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None
    position_ids: torch.Tensor | None = None


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
class ClientGradient:
    """A first-order client's reply: the gradient of `<lambda_i / K, z>` with respect to the client part's update
    parameters, flattened in their pinned order (float32)."""

    round: int
    client: int
    gradient: torch.Tensor
    loss: float | None = None  # FedAvg-LoRA: the client's loss on its batch (its gradient is the whole model's)


@dataclass
class WeightsUpdate:
    """FedAvg-LoRA's update: the trainable weights of the whole model after the server's step (flattened in their
    order, float32), which every holder copies."""

    round: int
    weights: torch.Tensor
    lr: float


@dataclass
class GradientUpdate:
    """The round's client update of a first-order client: the finishers' gradients summed in the plan's order,
    clipped (`max_grad_norm`), applied by every holder through its client optimizer at learning rate `lr`."""

    round: int
    gradient: torch.Tensor
    lr: float


@dataclass
class ClientCheckpoint:
    """The client part's state after round `round` (the server's record): trainable weights and the client
    optimizer's state. A straggler too far behind loads it instead of replaying every round before it.

    `optimizer_tensors` holds the optimizer's per-parameter tensors as `"<param index>/<key>"` (e.g. AdamW's
    `"0/exp_avg"`); `optimizer` the rest of its state dict as plain JSON (`param_groups`, non-tensor entries)."""

    round: int
    parameters: dict[str, torch.Tensor]
    optimizer_tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    optimizer: dict = field(default_factory=dict)

    @classmethod
    def from_client_state(cls, round_index: int, state: dict) -> ClientCheckpoint:
        """From `SplitClient.state_dict()`."""
        opt = state["optimizer"]
        tensors, rest = {}, {}
        for index, entries in opt["state"].items():
            for key, value in entries.items():
                if isinstance(value, torch.Tensor):
                    tensors[f"{index}/{key}"] = value.detach().clone()
                else:
                    rest.setdefault(str(index), {})[key] = value
        groups = [{k: list(v) if isinstance(v, tuple) else v for k, v in g.items()} for g in opt["param_groups"]]
        return cls(
            round=round_index,
            parameters={n: p.detach().clone() for n, p in state["parameters"].items()},
            optimizer_tensors=tensors,
            optimizer={"param_groups": groups, "state": rest},
        )

    def to_client_state(self, environment: dict) -> dict:
        """The `SplitClient.load_state_dict` input."""
        state: dict = {int(i): dict(v) for i, v in self.optimizer.get("state", {}).items()}
        for key, value in self.optimizer_tensors.items():
            index, name = key.split("/", 1)
            state.setdefault(int(index), {})[name] = value.clone()
        groups = [{k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in self.optimizer["param_groups"]]
        return {
            "parameters": self.parameters,
            "optimizer": {"state": state, "param_groups": groups},
            "last_round": self.round,
            "environment": environment,
        }

    @property
    def num_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in [*self.parameters.values(), *self.optimizer_tensors.values()])


@dataclass
class CatchUp:
    """What a client must apply before it works again: the applied rounds after round `after`, in order (empty when
    it is up to date), optionally preceded by a `checkpoint` of the client state at round `after` (history
    compaction: a client too far behind loads the checkpoint, then replays only the tail).

    A client that holds fewer rounds than `after` (and gets no checkpoint) cannot use it: it refuses the message,
    and the server sends it its full history next time."""

    rounds: list[ClientUpdate] = field(default_factory=list)
    after: int = -1
    checkpoint: ClientCheckpoint | None = None


MESSAGE_TYPES = {
    "plan": RoundPlan,
    "cut": ClientForward,
    "cotangent": Cotangent,
    "scalars": ProbeReply,
    "update": ClientUpdate,
    "catchup": CatchUp,
    "gradient": ClientGradient,
    "gradient_update": GradientUpdate,
    "perturbed_cuts": PerturbedCuts,
    "batch": ClientBatch,
    "weights_update": WeightsUpdate,
}
"""Message kind (the codec's header) -> type; a [`ClientCheckpoint`] travels only inside a [`CatchUp`]."""
