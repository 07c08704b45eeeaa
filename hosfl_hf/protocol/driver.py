"""`run_rounds`: the round protocol in one process, every message passed through the codec (the in-process
transport). The Flower app drives the same [`FederatedRun`] over Flower's `Grid`."""

from __future__ import annotations

from collections.abc import MutableMapping

from .client import SplitClient
from .messages import ClientUpdate
from .rounds import FederatedRun, ReliabilitySettings
from .server import SplitServer
from .transport import InProcessTransport

__all__ = ["run_rounds"]


def run_rounds(
    server: SplitServer,
    clients: MutableMapping[int, SplitClient],
    rounds: range,
    traffic: dict[str, int] | None = None,
    reliability: ReliabilitySettings | None = None,
) -> list[ClientUpdate]:
    """Runs `rounds` of HO-SFL between `server` and `clients` (client id -> [`SplitClient`]) in this process.

    Per round: the plan goes to each sampled client together with the rounds it missed (catch-up), the clients
    forward, the server backpropagates each cut and returns lambda, the clients probe; the server steps and the
    clients that finished apply the round's update. Clients that were not sampled catch up when they next are.
    A client that fails is dropped from the round (see [`FederatedRun`]).

    Args:
        traffic: if given, bytes of the encoded messages are added to it: `activation_bytes` (cuts and lambdas),
            `sync_bytes` (plans, catch-up history, scalars, updates) and `catchup_bytes` (the catch-ups alone).
        reliability: the fault policy ([`ReliabilitySettings`]).

    Returns:
        The applied updates, in order.
    """
    run = FederatedRun(server, InProcessTransport(clients), reliability)
    run.next_round = rounds.start
    if server.trajectory.rounds:
        last = server.trajectory.rounds[-1].round
        run.applied = {c: min(client.last_round, last) for c, client in clients.items()}
    updates = [run.run_round(r) for r in rounds]
    if traffic is not None:
        for key, value in run.traffic.items():
            traffic[key] = traffic.get(key, 0) + value
    return updates
