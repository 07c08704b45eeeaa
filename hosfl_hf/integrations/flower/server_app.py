"""The HO-SFL `ServerApp`: the server side of the round protocol over Flower's Message API.

Per round three exchanges with the sampled clients (all of them at once): `forward` (the plan plus the rounds the
client missed -> its cut), `probe` (lambda from the server's own backprop -> P scalars), `update` (the averaged
scalars -> applied). At the end every client catches up, and its weights' digest must equal the server's record of
the client part (the trajectory replayed on the initial weights). The output folder then holds what
`HOSFLTrainer.save_model` writes: the model (or adapters), `hosfl_trajectory.json`, `hosfl_config.json`, a model card,
plus `flower_summary.json` (bytes actually sent per leg, seconds per round, the clients' digests).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterable
from typing import Any

from flwr.app import Context, Message
from flwr.serverapp import Grid, ServerApp

from ...protocol import CatchUp, ClientForward, ProbeReply, SplitServer, decode, encode
from ...split import split_model
from ...trajectory import replay_trajectory
from .config import build_args, load_model, resolve
from .messages import digest, pack, unpack

__all__ = ["app", "build_server_app", "serve"]

logger = logging.getLogger(__name__)


def _exchange(
    grid: Grid, kind: str, payloads: dict[int, dict], timeout: float, clock: dict[str, float] | None = None
) -> dict[int, Message]:
    """Sends one `query.<kind>` per node (node id -> payload) and returns the replies by node; every node must
    answer in time (the dropout handling of a later release will drop late clients instead). `clock[kind]` adds
    the seconds the exchange took."""
    start = time.perf_counter()
    messages = [Message(pack(**p), dst_node_id=node, message_type=f"query.{kind}") for node, p in payloads.items()]
    replies = {m.metadata.src_node_id: m for m in grid.send_and_receive(messages, timeout=timeout)}
    missing = set(payloads) - set(replies)
    if missing:
        raise TimeoutError(f"Nodes {sorted(missing)} did not answer '{kind}' within {timeout} s.")
    for node, reply in replies.items():
        if reply.has_error():
            raise RuntimeError(f"Node {node} failed on '{kind}': {reply.error.reason}")
    if clock is not None:
        clock[kind] = clock.get(kind, 0.0) + time.perf_counter() - start
    return replies


def _partitions(grid: Grid, num_clients: int, timeout: float) -> dict[int, int]:
    """partition-id -> node id, once `num_clients` nodes are connected (bounded wait)."""
    deadline = time.monotonic() + timeout
    nodes: list[int] = []
    while time.monotonic() < deadline:
        nodes = list(grid.get_node_ids())
        if len(nodes) >= num_clients:
            break
        time.sleep(1.0)
    if len(nodes) < num_clients:
        raise TimeoutError(f"Only {len(nodes)} of {num_clients} SuperNodes connected within {timeout} s.")
    replies = _exchange(grid, "info", {node: {} for node in nodes}, timeout)
    partitions = {int(unpack(reply, "partition")): node for node, reply in replies.items()}
    if sorted(partitions) != list(range(num_clients)):
        raise ValueError(f"SuperNodes hold partitions {sorted(partitions)}; expected 0..{num_clients - 1}, each once.")
    return partitions


def _count(traffic: dict[str, int], leg: str, payloads: Iterable[bytes]) -> None:
    traffic[leg] = traffic.get(leg, 0) + sum(len(p) for p in payloads)


def serve(grid: Grid, run_config: dict[str, Any]) -> dict[str, Any]:
    """Runs the whole federated training; returns (and writes) the summary."""
    config = resolve(run_config)
    settings, args = build_args(config)
    timeout = float(config["reply-timeout"])
    model = load_model(config)
    server = SplitServer(load_model(config), settings, args)
    hidden_size = getattr(model.config, "hidden_size", None)
    p = settings.num_perturbations
    nodes = _partitions(grid, settings.num_clients, timeout)
    applied = {client: -1 for client in nodes}  # the last round each client has applied
    traffic: dict[str, int] = {}
    seconds, clock, history = [], {}, []
    for round_index in range(args.max_steps):
        start = time.perf_counter()
        plan = server.plan(round_index)
        losses: list[float] = []
        plan_bytes = encode(plan)
        catchups = {c: encode(CatchUp(server.history(applied[c]))) for c in plan.clients}
        _count(traffic, "sync_bytes", [plan_bytes] * len(plan.clients) + list(catchups.values()))
        _count(traffic, "catchup_bytes", catchups.values())  # part of sync_bytes: the history stragglers replay
        forwards = _exchange(
            grid,
            "forward",
            {nodes[c]: {"plan": plan_bytes, "catchup": catchups[c]} for c in plan.clients},
            timeout,
            clock,
        )
        lambdas = {}
        for c in plan.clients:  # the server's backward, client after client, in the plan's order
            data = unpack(forwards[nodes[c]], "cut")
            _count(traffic, "activation_bytes", [data])
            cut = decode(data, ClientForward, round=round_index, clients=[c], hidden_size=hidden_size)
            lambdas[c] = encode(server.backward(cut))
            losses.append(server.last_loss)
            # Its forward came after the catch-up: the client now holds every round recorded so far.
            applied[c] = server.trajectory.rounds[-1].round if server.trajectory.rounds else -1
        _count(traffic, "activation_bytes", lambdas.values())
        probes = _exchange(
            grid,
            "probe",
            {nodes[c]: {"plan": plan_bytes, "cotangent": lambdas[c]} for c in plan.clients},
            timeout,
            clock,
        )
        replies = {}
        for c in plan.clients:
            data = unpack(probes[nodes[c]], "scalars")
            _count(traffic, "sync_bytes", [data])
            replies[c] = decode(data, ProbeReply, round=round_index, clients=[c], num_perturbations=p)
        lr = server.lr_scheduler.get_last_lr()[0]
        applied_update = server.step(plan, replies)
        update = encode(applied_update)
        _count(traffic, "sync_bytes", [update] * len(plan.clients))
        _exchange(grid, "update", {nodes[c]: {"update": update} for c in plan.clients}, timeout, clock)
        for c in plan.clients:
            applied[c] = round_index
        seconds.append(time.perf_counter() - start)
        record = {
            "round": round_index,
            "loss": sum(losses) / len(losses),
            "learning_rate": lr,
            "client_learning_rate": applied_update.lr,
            "comm/activation_bytes": traffic["activation_bytes"],
            "comm/sync_bytes": traffic["sync_bytes"],
            "seconds": seconds[-1],
        }
        history.append(record)
        logger.info("HO-SFL round %s", json.dumps(record))

    # Every holder catches up; each must hold exactly the server's record of the client part.
    reference = replay_trajectory(model, server.trajectory)
    expected = digest(split_model(reference, settings.split_layer).client_parameters())
    catchups = {c: encode(CatchUp(server.history(applied[c]))) for c in nodes}
    _count(traffic, "sync_bytes", catchups.values())
    _count(traffic, "catchup_bytes", catchups.values())
    finals = _exchange(grid, "catchup", {nodes[c]: {"catchup": catchups[c]} for c in nodes}, timeout)
    digests = {c: unpack(finals[nodes[c]], "digest") for c in nodes}
    mismatched = [c for c, d in digests.items() if d != expected]
    if mismatched:
        raise RuntimeError(f"Clients {mismatched} hold other client weights than the server's trajectory.")
    summary = {
        "rounds": args.max_steps,
        "history": history,  # per round: mean client loss, learning rates, cumulative bytes (the trainer's names)
        "comm": traffic,
        "seconds_per_round": seconds,
        "exchange_seconds": clock,  # per query kind, summed over rounds (the rest is the server's own work)
        "client_digest": expected,
        "clients_identical": True,
        "num_clients": settings.num_clients,
    }
    _save(reference, server, args, config, summary)
    return summary


def _save(model: Any, server: SplitServer, args: Any, config: dict[str, Any], summary: dict[str, Any]) -> None:
    """The artifacts of `HOSFLTrainer.save_model`, from the server's part and the replayed client part."""
    from ...hub import HOSFLSplitConfig, build_model_card

    trained = dict(server.split.model.named_parameters())
    for name, param in model.named_parameters():
        if name in dict(server.parameters):
            param.data.copy_(trained[name].data)
    out = args.output_dir
    os.makedirs(out, exist_ok=True)
    model.save_pretrained(out)
    server.trajectory.save(os.path.join(out, "hosfl_trajectory.json"))
    split_config = HOSFLSplitConfig.from_training_args(args, split_model(model, args.split_layer), config["model"])
    split_config.save_pretrained(out)
    card = build_model_card(split_config, library_name="transformers", comm=summary["comm"])
    card.save(os.path.join(out, "README.md"))
    with open(os.path.join(out, "flower_summary.json"), "w") as f:
        json.dump(summary, f, indent=1)


def build_server_app(overrides: dict[str, Any] | None = None) -> ServerApp:
    """The `ServerApp`; `overrides` fill run-config keys (the simulation's Python API passes an empty run config)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        serve(grid, {**(overrides or {}), **dict(context.run_config)})

    return app


app = build_server_app()
