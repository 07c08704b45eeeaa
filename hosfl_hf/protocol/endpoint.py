"""The client's side of every exchange, shared by the in-process transport and the Flower `ClientApp`: a message is
a mapping of named payloads (codec bytes, or small ints and strings), and so is the reply.

    forward   plan + catchup      -> cut          (catch up, then the cut of this round's batch), or `behind`
                                                   (its last round) when it holds less than the catch-up assumes
    probe     plan + cotangent    -> reply        (the algorithm's answer to lambda: HO-SFL's scalars,
                                                   SplitLoRA's gradient)
    update    update              -> last_round + update_norm (of what it applied: the same on every holder)
    catchup   catchup             -> last_round + digest (of the client part's trainable weights)

A handler that raises sends no reply: the server drops the client for the round (see [`FederatedRun`]).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from ..update_norms import UpdateSnapshot
from .client import SplitClient, weights_digest
from .codec import decode, encode
from .messages import CatchUp, ClientUpdate, Cotangent, RoundPlan

__all__ = ["HANDLERS", "STATEFUL", "handle"]

Payload = Mapping[str, Any]


def _forward(client: SplitClient, payload: Payload) -> dict[str, Any]:
    p = client.settings.num_perturbations
    history = decode(payload["catchup"], CatchUp, num_perturbations=client.settings.scalars_per_update)
    if history.checkpoint is None and client.last_round < history.after:
        return {"behind": client.last_round}  # it lost rounds (a restart from nothing): no cut, the server resends
    client.catch_up(history)
    plan = decode(payload["plan"], RoundPlan, num_perturbations=p)
    return {"cut": encode(client.forward(plan))}


def _probe(client: SplitClient, payload: Payload) -> dict[str, Any]:
    plan = decode(payload["plan"], RoundPlan, num_perturbations=client.settings.num_perturbations)
    cotangent = decode(payload["cotangent"], Cotangent, round=plan.round, clients=[client.client_id])
    return {"reply": encode(client.reply(plan, cotangent))}


def _update(client: SplitClient, payload: Payload) -> dict[str, Any]:
    rule = client.algorithm.client
    # P scalars per update, or K * P (one set per replying client) with per-client seeds; a gradient of the client
    # part's size.
    expect = {"num_perturbations": client.settings.scalars_per_update}
    if rule.update_type is not ClientUpdate:
        expect = {"shape": (sum(client.client_update_sizes),)}
    update = decode(payload["update"], rule.update_type, **expect)
    snapshot = UpdateSnapshot(p for _, p in client.parameters)
    client.apply(update)
    return {"last_round": client.last_round, "update_norm": snapshot.norm()}


def _catchup(client: SplitClient, payload: Payload) -> dict[str, Any]:
    client.catch_up(decode(payload["catchup"], CatchUp, num_perturbations=client.settings.scalars_per_update))
    return {"last_round": client.last_round, "digest": weights_digest(client.parameters)}


HANDLERS: dict[str, Callable[[SplitClient, Payload], dict[str, Any]]] = {
    "forward": _forward,
    "probe": _probe,
    "update": _update,
    "catchup": _catchup,
}
"""Exchange kind -> the client's handler."""

STATEFUL = frozenset({"forward", "update", "catchup"})
"""Kinds after which a client that keeps its state outside memory must save it (they may apply rounds)."""


def handle(client: SplitClient, kind: str, payload: Payload) -> dict[str, Any]:
    """Answers one exchange of kind `kind` (a key of `HANDLERS`)."""
    if kind not in HANDLERS:
        raise ValueError(f"Unknown exchange {kind!r}; the protocol has {sorted(HANDLERS)}.")
    return HANDLERS[kind](client, payload)
