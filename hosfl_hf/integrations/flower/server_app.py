"""The HO-SFL `ServerApp`: the server side of the round protocol over Flower's Message API.

Per round three exchanges with the sampled clients (all of them at once): `forward` (the plan plus the rounds the
client missed -> its cut), `probe` (lambda from the server's own backprop -> P scalars), `update` (the averaged
scalars -> applied). The round loop is the protocol's [`FederatedRun`] (the same as in one process): a node that
fails, answers late or sends a rejected message is dropped for the round, and so on. At the end every client
catches up, and its weights' digest must equal the server's record of the client part. The output folder then holds
what `HOSFLTrainer.save_model` writes: the model (or adapters), `hosfl_trajectory.json`, `hosfl_config.json`, a
model card, plus `flower_summary.json` (bytes actually sent per leg, seconds per round, fault counters and events,
the clients' digest, the final evaluation). Run-config `eval-dataset` / `eval-every` evaluate the full model on
the server's held-out set (evaluation.py); `report-to` sends every round's metrics to trackers (reporting.py).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterable, Mapping
from typing import Any

from flwr.app import Context, Message
from flwr.serverapp import Grid, ServerApp

from ...named_tensors import copy_named_tensors
from ...protocol import FederatedRun, SplitServer
from ...split import split_model, unwrap_causal_lm
from ...trajectory import TRAJECTORY_NAME
from .config import build_args, build_reliability, load_model, resolve
from .evaluation import CentralEvaluator, load_eval_set
from .messages import RECORD, pack, unpack
from .progress import RoundPrinter, print_summary
from .reporting import RoundReporter

__all__ = ["FlowerTransport", "app", "build_server_app", "serve"]

logger = logging.getLogger(__name__)


class FlowerTransport:
    """The protocol's [`Transport`] over Flower's `Grid`: one `query.<kind>` message per client's node, all sent at
    once; a node that answers with an error or not within the timeout stands for a failed client. `clock[kind]`
    adds the seconds each kind of exchange took."""

    def __init__(self, grid: Grid, nodes: dict[int, int], default_timeout: float):
        self.grid, self.nodes, self.default_timeout = grid, nodes, default_timeout
        self.clock: dict[str, float] = {}

    def exchange(
        self, kind: str, payloads: Mapping[int, Mapping[str, Any]], timeout: float | None, round_index: int
    ) -> dict[int, dict[str, Any] | Exception]:
        start = time.perf_counter()
        timeout = self.default_timeout if timeout is None else timeout
        messages = [
            Message(pack(**p), dst_node_id=self.nodes[c], message_type=f"query.{kind}") for c, p in payloads.items()
        ]
        by_node = {m.metadata.src_node_id: m for m in _send_and_receive(self.grid, messages, timeout)}
        replies: dict[int, dict[str, Any] | Exception] = {}
        for client in payloads:
            reply = by_node.get(self.nodes[client])
            if reply is None:
                replies[client] = TimeoutError(f"node {self.nodes[client]} did not answer '{kind}' within {timeout} s")
            elif reply.has_error():
                replies[client] = RuntimeError(f"node {self.nodes[client]} failed: {reply.error.reason}")
            else:
                record = reply.content.config_records.get(RECORD)
                replies[client] = dict(record) if record is not None else ValueError("reply without a payload")
        self.clock[kind] = self.clock.get(kind, 0.0) + time.perf_counter() - start
        return replies


def _query(grid: Grid, kind: str, nodes: Iterable[int], timeout: float) -> dict[int, Message]:
    messages = [Message(pack(), dst_node_id=node, message_type=f"query.{kind}") for node in nodes]
    return {m.metadata.src_node_id: m for m in _send_and_receive(grid, messages, timeout)}


def _send_and_receive(grid: Grid, messages: list[Message], timeout: float, poll: float = 0.2) -> list[Message]:
    """`grid.send_and_receive`, but on a deployment (`HttpGrid`) polling every `poll` s instead of Flower's
    hard-coded 3 s between pulls, which added 1.5 s on average to each of a round's three exchanges. Other grids
    (the simulation's polls every 0.1 s, or a wrapper) keep their own `send_and_receive`."""
    from flwr.superlink.grid.http_grid import HttpGrid

    if not isinstance(grid, HttpGrid):
        return list(grid.send_and_receive(messages, timeout=timeout))
    pending = set(grid.push_messages(messages))
    deadline = time.monotonic() + timeout
    replies: list[Message] = []
    while pending:
        arrived = list(grid.pull_messages(pending))
        replies += arrived
        pending -= {m.metadata.reply_to_message_id for m in arrived}
        if not pending or time.monotonic() >= deadline:
            break
        time.sleep(poll)
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
    replies = _query(grid, "info", nodes, timeout)
    if len(replies) < len(nodes):
        raise TimeoutError(f"Only {len(replies)} of {len(nodes)} SuperNodes answered 'info' within {timeout} s.")
    partitions = {int(unpack(reply, "partition")): node for node, reply in replies.items()}
    if sorted(partitions) != list(range(num_clients)):
        raise ValueError(f"SuperNodes hold partitions {sorted(partitions)}; expected 0..{num_clients - 1}, each once.")
    return partitions


def serve(grid: Grid, run_config: dict[str, Any]) -> dict[str, Any]:
    """Runs the whole federated training ([`FederatedRun`] over a [`FlowerTransport`]); returns (and writes) the
    summary. With run-config `checkpoint-dir`, the server checkpoints every round and a later run with the same
    settings and folder resumes from it."""
    config = resolve(run_config)
    settings, args = build_args(config)
    timeout = float(config["reply-timeout"])
    model = load_model(config)
    server = SplitServer(load_model(config), settings, args)
    evaluator, reporter = _evaluation_and_reporting(config, args, model, server)
    nodes = _partitions(grid, settings.num_clients, timeout)
    transport = FlowerTransport(grid, nodes, timeout)
    checkpoint_dir = str(config["checkpoint-dir"]) or None
    hooks = [h for h in (evaluator, RoundPrinter(args.max_steps), reporter) if h is not None]
    kwargs = dict(reliability=build_reliability(config), base_model=model, on_round=_chain(hooks))
    resumed_at = None
    if checkpoint_dir is not None and os.path.isdir(checkpoint_dir):
        run = FederatedRun.resume(checkpoint_dir, server, transport, **kwargs)
        resumed_at = run.next_round
        logger.info("HO-SFL resumed from %s at round %s", checkpoint_dir, resumed_at)
    else:
        run = FederatedRun(server, transport, checkpoint_dir=checkpoint_dir, **kwargs)
    if evaluator is not None:
        evaluator.run = run
    run.run(args.max_steps)

    # Every holder catches up; each must hold exactly the server's record of the client part.
    digests = run.finish(nodes)
    expected = run.record_digest(model)
    unreachable = sorted(c for c, d in digests.items() if not isinstance(d, str))
    mismatched = [c for c, d in digests.items() if isinstance(d, str) and d != expected]
    if mismatched:
        raise RuntimeError(f"Clients {mismatched} hold other client weights than the server's trajectory.")
    summary = {
        "rounds": run.next_round,
        "resumed_at": resumed_at,  # the round a resumed run started at (None: not resumed)
        "history": run.log,  # per round: mean loss of the finishers, learning rates, cumulative bytes, counters
        "comm": run.traffic,
        "counters": run.counters,
        "events": run.events,
        "seconds_per_round": [r["seconds"] for r in run.log],
        "exchange_seconds": transport.clock,  # per query kind, summed over rounds (the rest is the server's work)
        "client_digest": expected,
        "clients_identical": not unreachable,
        "unreachable_clients": unreachable,
        "num_clients": settings.num_clients,
    }
    reference = run.client_model(model)  # the trained client part, as the clients hold it
    summary["eval"] = evaluator.final(reference) if evaluator is not None else None
    summary["eval_dataset"] = str(config["eval-dataset"])
    reporter.close(summary["eval"])
    _save(reference, server, args, config, summary)
    print_summary(summary, os.path.abspath(args.output_dir))
    return summary


def _evaluation_and_reporting(
    config: dict[str, Any], args: Any, model: Any, server: SplitServer
) -> tuple[CentralEvaluator | None, RoundReporter]:
    """The round hooks of run-config `eval-*` (centralized evaluation; `None` without `eval-dataset`) and
    `report-to`. Both are built before round 1, so a bad key fails the run before any training."""
    eval_set = load_eval_set(config)
    evaluator = None
    if eval_set is not None:
        evaluator = CentralEvaluator(eval_set, model, server, every=int(config["eval-every"]))
    return evaluator, RoundReporter(args, str(config["report-to"]))


def _chain(hooks: list) -> Any:
    def on_round(record: dict[str, Any]) -> None:
        for hook in hooks:  # in order: the evaluation adds its metrics to the record the others print and report
            hook(record)

    return on_round


def _save(model: Any, server: SplitServer, args: Any, config: dict[str, Any], summary: dict[str, Any]) -> None:
    """The artifacts of `HOSFLTrainer.save_model`, from the server's part and the replayed client part."""
    from ...hub import HOSFLRunRecord, build_model_card

    # The server part's names are the causal LM's (split_model unwraps peft): copy into the same unwrapped model.
    written = copy_named_tensors(
        server.parameters,
        unwrap_causal_lm(model).named_parameters(),
        "the server's trained weights into the saved model",
        partial_target=True,
    )
    logger.info("HO-SFL output: %s trained server tensors written", written)
    out = args.output_dir
    os.makedirs(out, exist_ok=True)
    model.save_pretrained(out)
    server.trajectory.save(os.path.join(out, TRAJECTORY_NAME))
    split_config = HOSFLRunRecord.from_training_args(args, split_model(model, args.split_layer), config["model"])
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
