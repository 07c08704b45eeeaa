"""The HO-SFL `ClientApp`: one protocol call per message, the client's state kept in a node-local folder.

A SuperNode may start a new process for every message (deployment), so nothing is kept in memory that the next
message needs: the client's trainable weights, optimizer state and last applied round are saved to its state folder
after every call and loaded before the next (`SplitClient.save`/`load`); the model and shard are rebuilt from the
run config (cached within a process). Queries: `forward` (catch up, then the cut), `probe` (the P scalars),
`update` (apply a round) and `catchup` (replay missed rounds; replies with the weights' digest).
"""

from __future__ import annotations

from typing import Any

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from ...protocol import CatchUp, ClientUpdate, Cotangent, RoundPlan, SplitClient, decode, encode
from .config import build_args, load_dataset, load_model, make_collator, resolve, state_folder
from .messages import digest, pack, unpack

__all__ = ["app", "build_client_app"]

_CLIENTS: dict[tuple, SplitClient] = {}


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
    key = (context.run_id, client_id, folder)
    if key not in _CLIENTS:
        _CLIENTS[key] = SplitClient(
            load_model(config), client_id, settings, load_dataset(config), make_collator(config)
        )
    client = _CLIENTS[key]
    client.load(folder)  # the saved state is the truth (another process may have handled the last message)
    return client, folder


def _decode(message: Message, key: str, expected: type, client: SplitClient, **expect: Any) -> Any:
    return decode(unpack(message, key), expected, num_perturbations=client.settings.num_perturbations, **expect)


def build_client_app(overrides: dict[str, Any] | None = None) -> ClientApp:
    """The `ClientApp`; `overrides` fill run-config keys (the simulation's Python API passes an empty run config)."""
    app = ClientApp()

    @app.query("forward")
    def forward(message: Message, context: Context) -> Message:
        client, folder = _client(context, overrides)
        client.catch_up(_decode(message, "catchup", CatchUp, client))
        plan = _decode(message, "plan", RoundPlan, client)
        cut = client.forward(plan)
        client.save(folder)
        return Message(pack(cut=encode(cut)), reply_to=message)

    @app.query("probe")
    def probe(message: Message, context: Context) -> Message:
        client, _ = _client(context, overrides)
        plan = _decode(message, "plan", RoundPlan, client)
        cotangent = decode(unpack(message, "cotangent"), Cotangent, round=plan.round, clients=[client.client_id])
        return Message(pack(scalars=encode(client.probe(plan, cotangent))), reply_to=message)

    @app.query("update")
    def update(message: Message, context: Context) -> Message:
        client, folder = _client(context, overrides)
        client.apply(_decode(message, "update", ClientUpdate, client))
        client.save(folder)
        return Message(pack(last_round=client.last_round), reply_to=message)

    @app.query("catchup")
    def catchup(message: Message, context: Context) -> Message:
        client, folder = _client(context, overrides)
        client.catch_up(_decode(message, "catchup", CatchUp, client))
        client.save(folder)
        return Message(pack(last_round=client.last_round, digest=digest(client.parameters)), reply_to=message)

    @app.query("info")
    def info(message: Message, context: Context) -> Message:
        return Message(pack(partition=int(context.node_config["partition-id"])), reply_to=message)

    return app


app = build_client_app()
