"""`run_rounds`: the round protocol in one process, every message passed through the codec (the in-process
transport). The Flower app drives the same objects, in the same order, across processes."""

from __future__ import annotations

from collections.abc import Mapping

from .client import SplitClient
from .codec import decode, encode
from .messages import CatchUp, ClientForward, ClientUpdate, Cotangent, ProbeReply, RoundPlan
from .server import SplitServer

__all__ = ["run_rounds"]


def run_rounds(
    server: SplitServer, clients: Mapping[int, SplitClient], rounds: range, traffic: dict[str, int] | None = None
) -> list[ClientUpdate]:
    """Runs `rounds` of HO-SFL between `server` and `clients` (client id -> [`SplitClient`]).

    Per round: the plan goes to each sampled client together with the rounds it missed (catch-up), the client
    forwards, the server backpropagates and returns lambda, the client probes; after the last client the server steps
    and the sampled clients apply the round's update. Clients that were not sampled catch up when they next are.

    Args:
        traffic: if given, bytes of the encoded messages are added to it: `activation_bytes` (cuts and lambdas) and
            `sync_bytes` (plans, catch-up history, scalars, updates).

    Returns:
        The applied updates, in order.
    """
    traffic = traffic if traffic is not None else {}
    traffic.setdefault("activation_bytes", 0)
    traffic.setdefault("sync_bytes", 0)
    settings = server.settings
    hidden_size = getattr(server.split.model.config, "hidden_size", None)

    def send(message, expected, leg: str, **expect):
        data = encode(message)
        traffic[leg] += len(data)
        return decode(data, expected, **expect)

    updates = []
    for round_index in rounds:
        plan = server.plan(round_index)
        replies: dict[int, ProbeReply] = {}
        for client_id in plan.clients:
            client = clients[client_id]
            p = settings.num_perturbations
            client.catch_up(
                send(CatchUp(server.history(client.last_round)), CatchUp, "sync_bytes", num_perturbations=p)
            )
            received = send(plan, RoundPlan, "sync_bytes", num_perturbations=p)
            cut = send(
                client.forward(received),
                ClientForward,
                "activation_bytes",
                round=round_index,
                clients=plan.clients,
                hidden_size=hidden_size,
            )
            lam = server.backward(cut)
            lam = send(
                lam,
                Cotangent,
                "activation_bytes",
                round=round_index,
                clients=[client_id],
                shape=tuple(cut.hidden_states.shape),
            )
            reply = send(
                client.probe(received, lam),
                ProbeReply,
                "sync_bytes",
                round=round_index,
                clients=[client_id],
                num_perturbations=p,
            )
            if reply.client in replies:
                raise ValueError(f"Client {reply.client} replied twice in round {round_index}.")
            replies[reply.client] = reply
        update = server.step(plan, replies)
        for client_id in plan.clients:
            clients[client_id].apply(send(update, ClientUpdate, "sync_bytes", num_perturbations=p))
        updates.append(update)
    return updates
