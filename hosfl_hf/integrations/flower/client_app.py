"""The HO-SFL `ClientApp`: one protocol call per message, the client's state kept in a node-local folder.

A SuperNode may start a new process for every message (deployment), so nothing is kept in memory that the next
message needs: the client's trainable weights, optimizer state and last applied round are saved to its state folder
after every call that may change it and loaded before the next (`SplitClient.save`/`load`); the model and shard are
rebuilt from the run config (cached within a process). Queries: those of [`hosfl_hf.protocol.endpoint`] (`forward`,
`probe`, `update`, `catchup`; the same handlers as in one process) and `info` (the node's partition).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from ...protocol import SplitClient
from ...protocol.endpoint import HANDLERS, STATEFUL, handle
from .config import build_args, load_dataset, load_model, make_collator, resolve, state_folder
from .messages import RECORD, pack

__all__ = ["app", "build_client_app"]

# One client part per process and run, whichever client a message is for (a simulation actor answers for many nodes):
# each message loads that client's state from its folder (the truth: another process may have handled its last
# message), or the run's initial state for a client that has none yet. Memory and the cost of a message do not grow
# with the number of clients that exist.
_HOLDERS: dict[int, SplitClient] = {}


def _client(context: Context, overrides: dict[str, Any] | None) -> tuple[SplitClient, str]:
    config = resolve({**(overrides or {}), **dict(context.run_config)})
    settings, _ = build_args(config)
    node = dict(context.node_config)
    client_id = int(node["partition-id"])
    partitions = int(node.get("num-partitions", settings.num_clients))
    if partitions != settings.num_clients or not 0 <= client_id < settings.num_clients:
        raise ValueError(
            f"Node config partition-id={client_id} num-partitions={partitions} does not match run-config "
            f"num-clients={settings.num_clients}: give each SuperNode a distinct partition-id in 0..num-clients-1."
        )
    folder = state_folder(config, node, context.run_id, client_id)
    if context.run_id not in _HOLDERS:
        _HOLDERS.clear()  # a new run: the previous run's client part is not needed any more
        holder = SplitClient(load_model(config), client_id, settings, load_dataset(config), make_collator(config))
        holder.remember_initial_state()
        _HOLDERS[context.run_id] = holder
    client = _HOLDERS[context.run_id]
    client.client_id = client_id
    if not client.load(folder):
        client.reset()  # no state saved yet: the run's initial client part
    return client, folder


def build_client_app(overrides: dict[str, Any] | None = None, mods: list[Callable] | None = None) -> ClientApp:
    """The `ClientApp`; `overrides` fill run-config keys (the simulation's Python API passes an empty run config);
    `mods` are Flower client mods wrapped around every handler (e.g. fault injection in tests)."""
    app = ClientApp(mods=mods)

    def answer(kind: str) -> Callable[[Message, Context], Message]:
        def handler(message: Message, context: Context) -> Message:
            client, folder = _client(context, overrides)
            record = message.content.config_records.get(RECORD)
            reply = handle(client, kind, dict(record) if record is not None else {})
            if kind in STATEFUL:
                client.save(folder)
            return Message(pack(**reply), reply_to=message)

        return handler

    for kind in HANDLERS:
        app.query(kind)(answer(kind))

    @app.query("info")
    def info(message: Message, context: Context) -> Message:
        return Message(pack(partition=int(context.node_config["partition-id"])), reply_to=message)

    return app


app = build_client_app()
