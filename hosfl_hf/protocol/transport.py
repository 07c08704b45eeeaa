"""How the server reaches its clients: one exchange sends a payload to each of several clients and collects what
came back in time. [`InProcessTransport`] calls [`SplitClient`]s in this process (every payload as bytes, as over a
network); the Flower `ServerApp` implements the same method over Flower's `Grid`."""

from __future__ import annotations

import time
from collections.abc import Mapping, MutableMapping
from typing import Any, Protocol

from .client import SplitClient
from .endpoint import handle

__all__ = ["ClientFault", "InProcessTransport", "SharedPartTransport", "Transport"]

Payload = Mapping[str, Any]


class ClientFault(Exception):
    """A client did not complete an exchange: it failed, did not answer in time, or sent a message that was
    rejected. It is dropped from the round; nothing it sent is used.

    Args:
        client: the client id.
        round: the round.
        leg: the exchange (`"forward"`, `"probe"`, `"update"`, `"catchup"`).
        reason: what happened (for a rejected message, the codec's error naming the field).
        kind: `"error"` (the client raised), `"timeout"` or `"rejected"` (its message failed validation).
    """

    def __init__(self, client: int, round: int, leg: str, reason: str, kind: str = "error"):
        super().__init__(f"Client {client}, round {round}, {leg}: {reason}")
        self.client, self.round, self.leg, self.reason, self.kind = client, round, leg, reason, kind


class Transport(Protocol):
    def exchange(
        self, kind: str, payloads: Mapping[int, Payload], timeout: float | None, round_index: int
    ) -> dict[int, dict[str, Any] | Exception]:
        """Sends `payloads[c]` to each client `c` as a `kind` exchange; returns per client its reply or the exception
        that stands for it (an error raised by the client, a `TimeoutError` for no answer within `timeout` s)."""
        ...


class InProcessTransport:
    """Calls clients of this process. A reply that took longer than `timeout` seconds is discarded as late.

    Args:
        clients: client id -> [`SplitClient`]; replace an entry to model a client restarted from nothing.
    """

    def __init__(self, clients: MutableMapping[int, SplitClient]):
        self.clients = clients

    def call(self, kind: str, client: int, payload: Payload, round_index: int) -> dict[str, Any]:
        """One client's answer (raises what the client raises)."""
        return handle(self.clients[client], kind, payload)

    def exchange(
        self, kind: str, payloads: Mapping[int, Payload], timeout: float | None, round_index: int
    ) -> dict[int, dict[str, Any] | Exception]:
        replies: dict[int, dict[str, Any] | Exception] = {}
        for client, payload in payloads.items():
            start = time.monotonic()
            try:
                reply = self.call(kind, client, payload, round_index)
            except Exception as error:  # the client's failure is its reply; the server goes on
                replies[client] = error
                continue
            elapsed = time.monotonic() - start
            if timeout is not None and elapsed > timeout:
                replies[client] = TimeoutError(f"no answer to '{kind}' within {timeout} s (took {elapsed:.2f} s)")
            else:
                replies[client] = reply
        return replies


class SharedPartTransport(InProcessTransport):
    """In-process clients that share one copy of the client part (the trainer's: its model is the client part of
    every client it hosts). Each client's batch comes from `batches` (the trainer's dataloader puts it there); an
    update or catch-up is applied to the shared part once, and every client it was sent to acknowledges it.

    Args:
        holder ([`SplitClient`]): the shared client part (its `client_id` is set to the client being served).
    """

    shared = True

    def __init__(self, holder: SplitClient):
        super().__init__({})
        self.holder = holder
        self.batches: dict[int, Any] = {}
        holder.batch = self._batch  # the batch of the client being served, not a shard of its own

    def _batch(self, round_index: int) -> Any:
        return self.batches[self.holder.client_id]

    def call(self, kind: str, client: int, payload: Payload, round_index: int) -> dict[str, Any]:
        self.holder.client_id = client
        return handle(self.holder, kind, payload)

    def exchange(
        self, kind: str, payloads: Mapping[int, Payload], timeout: float | None, round_index: int
    ) -> dict[int, dict[str, Any] | Exception]:
        if kind not in ("update", "catchup") or not payloads:
            return super().exchange(kind, payloads, timeout, round_index)
        first = next(iter(payloads))  # one holder: applied once, acknowledged for every client
        reply = super().exchange(kind, {first: payloads[first]}, timeout, round_index)[first]
        return dict.fromkeys(payloads, reply)
