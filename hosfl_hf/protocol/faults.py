"""Fault injection for the in-process transport: clients that fail, answer late, lie, crash, or a server that
crashes. Used by the fault-injection tests and `benchmarks/reliability.py`; nothing here runs in a real deployment.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any

import torch

from .client import SplitClient
from .codec import decode, encode
from .messages import MESSAGE_TYPES
from .transport import InProcessTransport

__all__ = ["Fault", "FaultyTransport", "ServerCrash", "edit_message", "scale"]


class ServerCrash(BaseException):
    """The server process dies (a `BaseException`: no `except Exception` of the round loop survives it)."""


def edit_message(data: bytes, **changes: Any) -> bytes:
    """Re-encodes a message with some fields changed (a value, or a function of the old value)."""
    kind = next(k for k, cls in MESSAGE_TYPES.items() if _is(data, k))
    message = decode(data, MESSAGE_TYPES[kind])
    for name, change in changes.items():
        value = getattr(message, name)
        setattr(message, name, change(value) if callable(change) else change)
    return encode(message)


def _is(data: bytes, kind: str) -> bool:
    from .codec import message_header

    return message_header(data).get("kind") == kind


@dataclass
class Fault:
    """One injected fault.

    Args:
        action: `"error"` (the client raises), `"slow"` (it answers after `delay` s), `"edit"` (its reply's message
            `field` is changed by `edit`), `"restart"` (it restarts from nothing before answering), `"server_crash"`
            (the server dies when it sends this exchange; `after` clients get it first).
        leg: the exchange: `"forward"`, `"probe"`, `"update"`, `"catchup"`.
        round: the round (None: every round).
        client: the client (None: every client; with `"server_crash"`, ignored).
    """

    action: str
    leg: str
    round: int | None = None
    client: int | None = None
    delay: float = 0.0
    field: str = ""
    edit: Any = None
    after: int = 0
    times: int = 1  # how many times it fires (0: always)
    fired: int = 0

    def matches(self, leg: str, round_index: int, client: int | None) -> bool:
        return (
            self.leg == leg
            and self.round in (None, round_index)
            and (self.client is None or client is None or self.client == client)
            and (self.times == 0 or self.fired < self.times)
        )


class FaultyTransport(InProcessTransport):
    """An [`InProcessTransport`] that injects `faults`, plus random dropout.

    Args:
        clients: client id -> [`SplitClient`].
        faults: the faults to inject.
        restart (`Callable[[int], SplitClient]`, *optional*): builds a client from nothing (for `"restart"`).
        dropout (`float`): probability that a client fails an exchange, drawn from `random.Random(seed)`.
        dropout_legs: the exchanges random dropout applies to.
    """

    def __init__(
        self,
        clients: MutableMapping[int, SplitClient],
        faults: list[Fault] | None = None,
        restart: Callable[[int], SplitClient] | None = None,
        dropout: float = 0.0,
        seed: int = 0,
        dropout_legs: tuple[str, ...] = ("forward", "probe", "update"),
    ):
        super().__init__(clients)
        self.faults = list(faults or [])
        self.restart = restart
        self.dropout, self.dropout_legs = dropout, dropout_legs
        self.rng = random.Random(seed)
        self.injected: dict[str, int] = {}

    def _fire(self, fault: Fault) -> None:
        fault.fired += 1
        self.injected[fault.action] = self.injected.get(fault.action, 0) + 1

    def exchange(self, kind: str, payloads: Mapping[int, Any], timeout: float | None, round_index: int):
        for fault in self.faults:
            if fault.action == "server_crash" and fault.matches(kind, round_index, None):
                self._fire(fault)
                delivered = dict(list(payloads.items())[: fault.after])
                super().exchange(kind, delivered, timeout, round_index)
                raise ServerCrash(f"injected server crash in round {round_index}, '{kind}'")
        return super().exchange(kind, payloads, timeout, round_index)

    def call(self, kind: str, client: int, payload: Any, round_index: int) -> dict[str, Any]:
        if self.dropout and kind in self.dropout_legs and self.rng.random() < self.dropout:
            self.injected["dropout"] = self.injected.get("dropout", 0) + 1
            raise ConnectionError(f"injected dropout of client {client}")
        edits = []
        for fault in self.faults:
            if fault.action == "server_crash" or not fault.matches(kind, round_index, client):
                continue
            self._fire(fault)
            if fault.action == "error":
                raise RuntimeError(f"injected failure of client {client}")
            if fault.action == "slow":
                time.sleep(fault.delay)
            elif fault.action == "restart":
                self.clients[client] = self.restart(client)
            elif fault.action == "edit":
                edits.append(fault)
        reply = super().call(kind, client, payload, round_index)
        for fault in edits:
            key = next(iter(reply))
            reply = {**reply, key: edit_message(reply[key], **{fault.field: fault.edit})}
        return reply


def scale(factor: float) -> Callable[[Any], Any]:
    """An edit that multiplies a tensor or every scalar of a list by `factor`."""

    def change(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return value * factor
        return [v * factor for v in value]

    return change
