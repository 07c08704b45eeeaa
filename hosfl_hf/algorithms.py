"""The methods `HOSFLTrainer` runs, as a registry: each is a server rule and a client rule on a split (or on the whole
model). Adding a method is one entry in `ALGORITHMS` (and, at most, one new rule class).

The rules hold what differs between methods; the trainer calls them at fixed points of the round:

* `ServerRule`: does the server backpropagate (`backprop`), does it train (`trains`: `client_only` keeps it at
  learning rate 0), and, for the zeroth-order baselines, `before_step` writes the server's gradient estimate;
* `ClientRule`: does the client need lambda (`cotangent`) or its autograd graph (`graph`), does it keep an optimizer,
  `reply` (what the client does with lambda for one batch, and the traffic), and `close` (the client update of the
  round, applied by every holder after the server's step).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .federation import RoundTraffic, tensor_bytes
from .zeroth_order import zo_gradients

if TYPE_CHECKING:  # the rules call back into the trainer; no import at run time
    from .trainer import HOSFLTrainer, _ClientUpdate

__all__ = ["ALGORITHMS", "Algorithm", "ClientRule", "ServerRule", "get_algorithm"]


# --------------------------------------------------------------------------------------------------- server rules
@dataclass(frozen=True)
class ServerRule:
    """First-order server (the Trainer backpropagates the server's loss and steps its optimizer).

    Args:
        trains: `False` keeps the server part fixed (its optimizer runs at learning rate 0), but lambda is still
            computed by backprop.
    """

    trains: bool = True
    backprop = True

    def before_step(self, trainer: HOSFLTrainer, seeds: list[int], averaged: list[float]) -> None:
        """Called after the round's scalars are averaged, before the server's optimizer step."""


@dataclass(frozen=True)
class ZerothOrderServer(ServerRule):
    """The server's parameters (`scope="server"`, ZO-SFL: after the client's in the RNG order) or every trainable
    parameter (`scope="model"`, MeZO) get the two-point estimate `(1/(P mu)) sum_p vbar_p u_p` as gradient, stepped by
    the Trainer's optimizer. No backprop anywhere; the estimate is not clipped."""

    scope: str = "server"
    backprop = False

    def before_step(self, trainer: HOSFLTrainer, seeds: list[int], averaged: list[float]) -> None:
        if self.scope == "server":
            targets, first_index = trainer.split.server_parameters(), len(trainer.client_update_parameters)
        else:
            targets, first_index = trainer.two_point_estimator.parameters, 0
        # Multiplied by the loss scale (a power of two: exact): the loss scaler unscales every gradient of the
        # Trainer's optimizer before its step.
        scale = trainer._grad_scale()
        for param, grad in zo_gradients(targets, seeds, averaged, trainer.args.zo_eps, first_index):
            param.grad = (grad * scale if scale != 1.0 else grad).to(param.dtype)


# --------------------------------------------------------------------------------------------------- client rules
@dataclass(frozen=True)
class ClientRule:
    """A frozen client: it sends its cut and never changes (split learning with a frozen client)."""

    cotangent = False  # the client needs lambda
    graph = False  # the client forward keeps its autograd graph (it backpropagates lambda)
    optimizer = False  # the client part has an optimizer (every holder applies the same update)
    zeroth_order = False  # the client update is built from the round's averaged scalars
    search_levers = False  # projected scalars per client: per-client seeds and a base-weight mask apply

    def reply(self, trainer: HOSFLTrainer, step: dict[str, Any]) -> None:
        """One client batch after the server's backward: what the client does, and the traffic it costs."""
        trainer._count_traffic(step["cut"].num_bytes() + tensor_bytes(step["labels"]), 0)

    def close(
        self, trainer: HOSFLTrainer, round_index: int, seeds: list[int], averaged: list[float] | None
    ) -> _ClientUpdate | None:
        """The round's client update (applied after the server's step), or `None`."""
        return None


@dataclass(frozen=True)
class ProjectedZO(ClientRule):
    """HO-SFL's client: `P` scalars `<lambda, z(theta + mu u_p) - z(theta)>` per batch; every holder applies
    `(1/(P mu)) sum_p vbar_p u_p` through the client optimizer. Sync: seeds and scalars."""

    cotangent = True
    optimizer = True
    zeroth_order = True
    search_levers = True

    def reply(self, trainer: HOSFLTrainer, step: dict[str, Any]) -> None:
        activation_bytes = step["cut"].num_bytes() + tensor_bytes(step["labels"], step["cotangent"])
        if not trainer.client_update_parameters:
            trainer._count_traffic(activation_bytes, 0)
            return
        seeds = trainer._probe(step)
        sync = _zo_sync_bytes(len(seeds))
        if trainer.round_settings.client_seeds == "per_client":  # the other clients' scalars come down too
            sync += 4 * len(seeds) * (trainer.current_gradient_accumulation_steps - 1)
        trainer._count_traffic(activation_bytes, sync)

    def close(self, trainer, round_index, seeds, averaged):
        if averaged is None or not trainer.client_update_parameters:
            return None
        return trainer._zo_client_update(round_index, seeds, averaged)


@dataclass(frozen=True)
class LossDifferenceZO(ProjectedZO):
    """ZO-SFL's client: the client shares the two-point loss differences of the whole split model (computed in the
    trainer's zeroth-order step), and applies the same update as HO-SFL's client from them."""

    cotangent = False
    search_levers = False  # its scalars are loss differences of the whole split model under the round's seeds

    def reply(self, trainer: HOSFLTrainer, step: dict[str, Any]) -> None:
        raise RuntimeError("ZO-SFL's client replies in the trainer's zeroth-order step.")


@dataclass(frozen=True)
class BackpropClient(ClientRule):
    """SplitLoRA's client: it backpropagates lambda through its part; one client-optimizer step on the averaged,
    clipped gradients of the round. Sync: the client's trainable weights down and up (FedAvg)."""

    cotangent = True
    graph = True
    optimizer = True

    def reply(self, trainer: HOSFLTrainer, step: dict[str, Any]) -> None:
        # lambda_i / K through the client's part: the K gradients sum to the average.
        step["graph"].backward(step["cotangent"] / trainer.current_gradient_accumulation_steps)
        activation_bytes = step["cut"].num_bytes() + tensor_bytes(step["labels"], step["cotangent"])
        trainer._count_traffic(activation_bytes, 2 * tensor_bytes(*(p for _, p in trainer.client_update_parameters)))

    def close(self, trainer, round_index, seeds, averaged):
        return trainer._close_first_order_round(round_index)


@dataclass(frozen=True)
class WholeModel(ClientRule):
    """No split: each sampled client runs the whole model (FedAvg-LoRA, with `weights_sync`: the trainable weights
    down and up each round) or there are no clients at all (centralized, MeZO)."""

    weights_sync: bool = False

    def reply(self, trainer: HOSFLTrainer, step: dict[str, Any]) -> None:
        weights = 2 * tensor_bytes(*(p for _, p in trainer._server_trainable())) if self.weights_sync else 0
        trainer._count_traffic(0, weights)


def _zo_sync_bytes(num_perturbations: int) -> int:
    # P int64 seeds down, P fp32 scalars up, P averaged fp32 scalars down.
    return RoundTraffic.hybrid_order(0, 0, 0, num_perturbations).sync_bytes


# -------------------------------------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class Algorithm:
    """A method: a server rule and a client rule, on a split (`split=True`) or on the whole model."""

    name: str
    split: bool
    server: ServerRule
    client: ClientRule

    @property
    def zeroth_order_round(self) -> bool:
        """The round averages zeroth-order scalars (for the client's update or the server's)."""
        return self.client.zeroth_order or not self.server.backprop


ALGORITHMS: dict[str, Algorithm] = {
    a.name: a
    for a in (
        Algorithm("hosfl", True, ServerRule(), ProjectedZO()),
        Algorithm("splitlora", True, ServerRule(), BackpropClient()),
        Algorithm("zo_sfl", True, ZerothOrderServer(scope="server"), LossDifferenceZO()),
        Algorithm("fedavg_lora", False, ServerRule(), WholeModel(weights_sync=True)),
        Algorithm("centralized", False, ServerRule(), WholeModel()),
        Algorithm("mezo", False, ZerothOrderServer(scope="model"), WholeModel()),
        Algorithm("frozen_client", True, ServerRule(), ClientRule()),
        Algorithm("client_only", True, ServerRule(trains=False), ProjectedZO()),
    )
}


def get_algorithm(name: str) -> Algorithm:
    if name not in ALGORITHMS:
        raise ValueError(f"Unknown algorithm {name!r}; use one of {list(ALGORITHMS)}.")
    return ALGORITHMS[name]
