"""The methods the round runs, as a strategy registry: each is a server rule and a client rule, on a split (or on
the whole model). Adding a method is one entry in `ALGORITHMS` (and, at most, one new rule class that overrides only
what differs, the way a Flower `Strategy` subclass does).

The round ([`~hosfl_hf.protocol.FederatedRun`] over [`~hosfl_hf.protocol.SplitServer`] and
[`~hosfl_hf.protocol.SplitClient`], whatever the transport: the trainer's in-process clients, the protocol's, Flower)
calls the rules at fixed points:

* `ServerRule`: does the server backpropagate (`backprop`), does it train (`trains`: `client_only` keeps it at
  learning rate 0), and, for the zeroth-order baselines, `before_step` writes the server's gradient estimate;
* `ClientRule`: does the client need lambda (`cotangent`), what it answers lambda with (`reply`, a `reply_type`
  message, on the client), how the server turns the finishers' replies into the round's client update (`close`), and
  how every holder applies that update (`apply`).

The rules take the round's objects (a client, a server), never a trainer: the trainer is one backend of the server.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ..zeroth_order import zo_gradients
from .messages import (
    ClientBatch,
    ClientForward,
    ClientGradient,
    ClientUpdate,
    Cotangent,
    GradientUpdate,
    PerturbedCuts,
    ProbeReply,
    RoundPlan,
    WeightsUpdate,
)

if TYPE_CHECKING:  # the rules are called by the round's objects; no import at run time (they import this module)
    from .client import SplitClient
    from .server import SplitServer

__all__ = [
    "ALGORITHMS",
    "Algorithm",
    "BackpropClient",
    "ClientRule",
    "LossDifferenceZO",
    "ProjectedZO",
    "ServerRule",
    "WholeModel",
    "ZerothOrderServer",
    "get_algorithm",
]


# --------------------------------------------------------------------------------------------------- server rules
@dataclass(frozen=True)
class ServerRule:
    """First-order server (the server backpropagates its loss and steps its optimizer).

    Args:
        trains: `False` keeps the server part fixed (its optimizer runs at learning rate 0), but lambda is still
            computed by backprop.
    """

    trains: bool = True
    backprop = True

    def serve(self, server: SplitServer, message: Any) -> Any:
        """On the server: its work on one client's forward message (a cut, a batch). Backprop: the loss of
        `message` through the server's part (the whole model without a split), `loss / K` backpropagated; returns
        lambda (a `Cotangent`) when the client needs it, else `None` (the client finished with its message)."""
        return server.backprop_message(message)

    def before_step(self, server: Any, seeds: list[int], averaged: list[float]) -> None:
        """Called after the round's scalars are averaged, before the server's optimizer step."""


@dataclass(frozen=True)
class ZerothOrderServer(ServerRule):
    """The server's parameters (`scope="server"`, ZO-SFL: after the client's in the RNG order) or every trainable
    parameter (`scope="model"`, MeZO) get the two-point estimate `(1/(P mu)) sum_p vbar_p u_p` as gradient, stepped by
    the server's optimizer. No backprop anywhere; the estimate is not clipped."""

    scope: str = "server"
    backprop = False

    def serve(self, server, message):
        """Two-point loss differences of the round's seeds from the client's message (ZO-SFL: the cuts of the
        perturbed client part; MeZO: the batch, through the whole model), with the server's parameters perturbed by
        the same seeds; returned as the client's reply (a `ProbeReply`): the client needs no second leg."""
        scalars = server.loss_differences(message)
        return ProbeReply(round=message.round, client=message.client, scalars=scalars)

    def before_step(self, server: Any, seeds: list[int], averaged: list[float]) -> None:
        targets, first_index = server.zeroth_order_targets(self.scope)
        # Multiplied by the loss scale (a power of two: exact): a loss scaler unscales every gradient of the
        # server's optimizer before its step.
        scale = server.loss_scale()
        for param, grad in zo_gradients(targets, seeds, averaged, server.settings.zo_eps, first_index):
            param.grad = (grad * scale if scale != 1.0 else grad).to(param.dtype)


# --------------------------------------------------------------------------------------------------- client rules
@dataclass(frozen=True)
class ClientRule:
    """A frozen client: it sends its cut and never changes (split learning with a frozen client)."""

    cotangent = False  # the client needs lambda
    graph = False  # the client backpropagates lambda through its part
    optimizer = False  # the client part has an optimizer (every holder applies the same update)
    zeroth_order = False  # the client update is built from the round's averaged scalars
    search_levers = False  # projected scalars per client: per-client seeds and a base-weight mask apply
    reply_kind: str | None = None  # the exchange in which the client answers lambda (None: it finishes with its cut)

    @property
    def forward_type(self) -> type:
        """The message of the client's forward leg."""
        return ClientForward

    def forward(self, client: SplitClient, plan: RoundPlan) -> Any:
        """On the client: the forward leg of the round (default: the cut of its batch, without autograd)."""
        return client.cut(plan)

    def check_forward(self, server: SplitServer) -> dict[str, Any]:
        """The codec's checks of a forward message beyond the cut's (keyword arguments of `decode`)."""
        return {}

    @property
    def forward_traffic(self) -> str:
        """The traffic counter of the forward leg: cuts are `activation_bytes`."""
        return "activation_bytes"

    def finalize(self, server: SplitServer, update: Any) -> Any:
        """On the server, after its step: the update as it is sent (default: as closed)."""
        return update

    @property
    def reply_type(self) -> type | None:
        """The message of the client's answer to lambda."""
        return None

    @property
    def update_type(self) -> type | None:
        """The message every holder applies (`None`: the client part never changes)."""
        return None

    def reply(self, client: SplitClient, plan: RoundPlan, cotangent: Cotangent) -> Any:
        """On the client: its answer to lambda for this round's batch."""
        raise RuntimeError("This client does not answer lambda.")

    def close(self, server: SplitServer, plan: RoundPlan, replies: dict[int, Any]) -> Any:
        """On the server, before its step: the round's client update from the finishers' replies, or `None`."""
        return None

    def apply(self, client: SplitClient, update: Any) -> None:
        """On every holder of the client part: applies the round's update."""
        raise RuntimeError("This client part never changes.")

    def check_reply(self, message: Any, client: SplitClient | SplitServer) -> dict[str, Any]:
        """The codec's checks of a reply (keyword arguments of `decode`)."""
        return {}


@dataclass(frozen=True)
class ProjectedZO(ClientRule):
    """HO-SFL's client: `P` scalars `<lambda, z(theta + mu u_p) - z(theta)>` per batch; every holder applies
    `(1/(P mu)) sum_p vbar_p u_p` through the client optimizer. Sync: seeds and scalars."""

    cotangent = True
    optimizer = True
    zeroth_order = True
    search_levers = True
    reply_kind: str | None = "probe"

    @property
    def reply_type(self) -> type:
        return ProbeReply

    @property
    def update_type(self) -> type:
        return ClientUpdate

    def reply(self, client, plan, cotangent):
        inputs, reference = client.round_inputs(plan)
        seeds = client.settings.probe_seeds(plan.round, client.client_id)
        scalars = client.part.probe(inputs, reference, cotangent.cotangent, seeds)
        return ProbeReply(round=plan.round, client=client.client_id, scalars=scalars)

    def close(self, server, plan, replies):
        seeds, averaged = _zeroth_order_terms(server, plan, replies)
        return ClientUpdate(round=plan.round, seeds=seeds, scalars=averaged, lr=0.0)

    def apply(self, client, update):
        client.part.apply(update, client.optimizer)

    def check_reply(self, message, client):
        return {"num_perturbations": client.settings.num_perturbations}


@dataclass(frozen=True)
class BackpropClient(ClientRule):
    """SplitLoRA's client: it backpropagates `lambda_i / K` through its part and sends the gradient; every holder
    takes one client-optimizer step on the finishers' summed gradient, clipped to `max_grad_norm`. Sync: the
    gradient up and down (the size of the client's trainable weights, as FedAvg's weights)."""

    cotangent = True
    graph = True
    optimizer = True
    reply_kind: str | None = "probe"

    @property
    def reply_type(self) -> type:
        return ClientGradient

    @property
    def update_type(self) -> type:
        return GradientUpdate

    def reply(self, client, plan, cotangent):
        _, graph = client.round_inputs(plan)  # the cut with its graph (kept from the forward, or recomputed)
        params = [p for _, p in client.parameters]
        for p in params:
            p.grad = None
        # lambda_i / K through the client's part: the K gradients sum to the average.
        graph.backward(cotangent.cotangent.to(graph.device) / client.settings.clients_per_round)
        if any(p.grad is None for p in params):
            raise RuntimeError(f"A client parameter received no gradient in round {plan.round}.")
        flat = torch.cat([p.grad.detach().float().flatten().cpu() for p in params])
        for p in params:
            p.grad = None
        return ClientGradient(round=plan.round, client=client.client_id, gradient=flat)

    def close(self, server, plan, replies):
        total = None
        for c in plan.clients:  # summed in the plan's order, as the Trainer's backward accumulates them
            if c in replies:
                total = replies[c].gradient.clone() if total is None else total.add_(replies[c].gradient)
        total = server.reduce_mean(total)
        grads = list(torch.split(total, server.client_update_sizes))
        if not all(bool(torch.isfinite(g).all()) for g in grads):
            return server.non_finite_client_update(plan.round, "non-finite client gradients")
        norm = server.args.max_grad_norm
        if norm and norm > 0:  # torch.nn.utils.clip_grad_norm_(..., foreach=False) on the client's gradients
            total_norm = torch.nn.utils.get_total_norm(grads, 2.0, False, foreach=False)
            coefficient = torch.clamp(norm / (total_norm + 1e-6), max=1.0)
            for g in grads:
                g.mul_(coefficient)
        return GradientUpdate(round=plan.round, gradient=torch.cat(grads), lr=0.0)

    def apply(self, client, update):
        params = [p for _, p in client.parameters]
        for p, g in zip(params, torch.split(update.gradient, [p.numel() for p in params])):
            p.grad = g.view(p.shape).to(device=p.device, dtype=p.dtype)
        for group in client.optimizer.param_groups:
            group["lr"] = update.lr
        client.optimizer.step()
        client.optimizer.zero_grad(set_to_none=True)
        client.part.write_mask_values()

    def check_reply(self, message, client):
        return {"shape": (sum(client.client_update_sizes),)}


@dataclass(frozen=True)
class LossDifferenceZO(ProjectedZO):
    """ZO-SFL's client: it sends the cuts of its part perturbed by `+-mu u_p` for each of the round's seeds; the
    server, perturbing its own part by the same seeds, turns them into two-point loss differences of the whole split
    model; every holder applies the same update as HO-SFL's client from them."""

    cotangent = False
    search_levers = False  # its scalars are loss differences of the whole split model under the round's seeds
    reply_kind: str | None = None

    @property
    def forward_type(self) -> type:
        return PerturbedCuts

    def forward(self, client, plan):
        from ..client_part import CLIENT_INPUTS

        batch = client.batch(plan.round)
        inputs = {k: batch[k] for k in CLIENT_INPUTS if k in batch}
        part, estimator = client.part, client.part.estimator
        estimator.check_forward(lambda: part.forward(inputs, count=False).hidden_states)
        cuts = []
        for seed in plan.seeds:
            for scale in (estimator.eps, -estimator.eps):
                with estimator.perturbed(seed, scale):
                    cuts.append(part.forward(inputs).hidden_states)
        return PerturbedCuts(
            round=plan.round,
            client=client.client_id,
            hidden_states=torch.stack(cuts),
            labels=batch.get("labels"),
            attention_mask=inputs.get("attention_mask"),
            position_ids=inputs.get("position_ids"),
        )


@dataclass(frozen=True)
class WholeModel(ClientRule):
    """No split. Without `weights_sync` the data is pooled at the server (centralized training, MeZO): a client's
    forward leg is its batch. With `weights_sync` (FedAvg-LoRA), each client holds the whole model: it sends the
    gradient of `loss_i / K` of its batch, the server sums them and steps, and every holder copies the new trainable
    weights (the weights down and the gradient up, each round)."""

    weights_sync: bool = False

    @property
    def forward_type(self) -> type:
        return ClientGradient if self.weights_sync else ClientBatch

    @property
    def update_type(self) -> type | None:
        return WeightsUpdate if self.weights_sync else None

    def forward(self, client, plan):
        batch = client.batch(plan.round)
        fields = {k: batch.get(k) for k in ("labels", "attention_mask", "position_ids")}
        if not self.weights_sync:
            return ClientBatch(round=plan.round, client=client.client_id, input_ids=batch["input_ids"], **fields)
        return client.whole_model_gradient(plan, batch)

    def check_forward(self, server: Any) -> dict[str, Any]:
        return {"shape": (sum(p.numel() for _, p in server.parameters),)} if self.weights_sync else {}

    @property
    def forward_traffic(self) -> str:
        # FedAvg-LoRA's gradient is weight-sized sync; a batch is the data pooled at the server.
        return "sync_bytes" if self.weights_sync else "data_bytes"

    def close(self, server, plan, replies):
        if not server.algorithm.server.backprop:  # MeZO: the replies are the server's own loss differences
            _zeroth_order_terms(server, plan, replies)
        if self.weights_sync:  # the weights are read after the server's step (finalize)
            return WeightsUpdate(round=plan.round, weights=torch.empty(0), lr=0.0)
        return None

    def finalize(self, server, update):
        if update is None or not self.weights_sync:
            return update
        weights = torch.cat([p.detach().float().flatten().cpu() for _, p in server.parameters])
        return type(update)(round=update.round, weights=weights, lr=update.lr)

    def apply(self, client, update):
        with torch.no_grad():
            offset = 0
            for _, p in client.parameters:
                values = update.weights[offset : offset + p.numel()]
                offset += p.numel()
                if p.data_ptr() != values.data_ptr():  # a holder that is the server's own model holds them already
                    p.copy_(values.view(p.shape))


def _zeroth_order_terms(server: SplitServer, plan: RoundPlan, replies: dict[int, Any]) -> tuple[list, list]:
    """The round's seeds and aggregated scalars (shared seeds: the plan's and the per-seed aggregate; per-client
    seeds: every replying client's own), logged as `zo/projected_grad`; a zeroth-order server writes its gradient
    estimate from them."""
    scalars = {c: r.scalars for c, r in replies.items()}
    seeds, averaged = server.settings.update_terms(scalars, plan.round)
    server.round_metrics["zo/projected_grad"].append(sum(averaged) / (len(averaged) * server.settings.zo_eps))
    server.algorithm.server.before_step(server, seeds, averaged)
    return seeds, averaged


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
