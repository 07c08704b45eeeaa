"""`FederatedRun`: the server's round loop over any [`Transport`], with the faults a federation meets.

Per round: the plan and each sampled client's catch-up go out (`forward`), every cut is validated and backpropagated
in the plan's order, the lambdas go out (`probe`), the scalars come back, the server steps and the finishers apply
the update (`update`).

* A client that raises, does not answer within `reply_timeout`, or sends a message that fails validation is
  dropped for the round ([`ClientFault`]: counted, logged, kept in `events`). Nothing it sent is used: the server's
  step is that of the mean loss over the clients that finished (`K` = finishers) and the update aggregates their
  scalars only. If no client (or fewer than `min_finishers`) finishes, the round is skipped and retried with a new
  sample, drawn from the clients that have not failed it yet (`max_round_attempts`).
* A client that holds fewer rounds than the server assumed (restarted from nothing) answers `behind` with its last
  round instead of a cut; it is dropped for that round and rebuilt next time from its own round (from the base
  model, or the snapshot). A client that failed otherwise kept its state: it gets the rounds after the last one it
  acknowledged and skips what it already holds.
* History compaction (`checkpoint_every = N > 0`): the server keeps its own copy of the client part (the record),
  snapshots it every `N` applied rounds, and a client behind the last snapshot gets the snapshot plus the rounds
  after it, so a catch-up is at most one client state plus `N` updates.
* Server checkpoint (`checkpoint_dir`): after each round's step and before its update is sent (the commit point),
  the whole server state is written; [`FederatedRun.resume`] continues from it over the same transport and ends
  bit-identical to an uninterrupted run. A client that applied the update of the round in progress skips it on
  replay (updates of rounds it holds are never applied twice).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

from ..update_norms import StandingStillGuard
from .client import SplitClient, weights_digest
from .codec import MessageError, decode, encode
from .messages import CatchUp, ClientUpdate, Cotangent, RoundPlan
from .server import RejectedCut, SplitServer
from .transport import ClientFault, Transport

__all__ = ["COUNTERS", "FederatedRun", "ReliabilitySettings"]

logger = logging.getLogger(__name__)

COUNTERS = (
    "fed/dropped_clients",  # sampled clients dropped from a round (error, timeout or rejected message)
    "fed/timeouts",
    "fed/rejected_messages",  # messages that failed validation (a subset of the drops)
    "fed/skipped_rounds",  # attempts in which no client finished (retried with a new sample)
    "fed/missed_updates",  # finishers that did not acknowledge the update (they catch up later)
    "fed/behind",  # clients that held fewer rounds than the server assumed (restarted): rebuilt from their round
)
RUN_STATE = "federated_run.json"


@dataclass
class OpenRound:
    """An attempt of a round in progress: its plan, what the clients answered, and, once closed, its update."""

    plan: RoundPlan
    attempt: int
    plan_bytes: bytes
    start: float
    latest: int  # the last round in the trajectory when the attempt opened (what a catch-up brings a client to)
    replies: dict[int, Any] = field(default_factory=dict)  # finishers' replies (None: finished with its cut)
    losses: list[Any] = field(default_factory=list)  # what the server logged per accepted cut
    finishers: list[int] = field(default_factory=list)
    loss: float = float("nan")
    learning_rate: float = float("nan")
    update: Any = None


@dataclass
class ReliabilitySettings:
    """The server's fault policy.

    Args:
        reply_timeout (`float`, *optional*): seconds a client has to answer an exchange; a later answer is dropped.
        max_round_attempts (`int`): attempts of a round (each with a new sample) before the run stops.
        activation_bound (`float`, *optional*): a cut with an entry of magnitude above this is rejected (poisoned
            activations). The default 1e6 leaves room for LLMs' "massive activations" (SmolLM2-135M's residual
            stream reaches 2.3e4 after block 12) while rejecting a cut scaled by 1e6 or more; set it from your
            model's clean cuts. Non-finite cuts, losses and server gradients are always rejected.
        checkpoint_every (`int`): snapshot the client part every N applied rounds for catch-up (0: replay only).
        deferred_updates (`bool`): no `update` exchange: the round's update reaches its finishers with their next
            catch-up (the plan of the next round they are sampled in, or the final catch-up), so a round is two
            exchanges instead of three (what a deployment, where every exchange costs a ClientApp process, wants).
            The clients' update norms are then not reported per round.
        min_finishers (`int`): a round that fewer clients finish is skipped and retried, like one nobody finishes.
            With a robust aggregation set it to 3 or more: the median of two values is their mean, so with dropout
            a round left with one attacker and one honest client is not protected (see docs/reliability.md).
    """

    reply_timeout: float | None = None
    max_round_attempts: int = 5
    activation_bound: float | None = 1e6
    checkpoint_every: int = 0
    min_finishers: int = 1
    deferred_updates: bool = False

    def __post_init__(self):
        if self.max_round_attempts < 1:
            raise ValueError(f"max_round_attempts must be >= 1, got {self.max_round_attempts}.")
        if self.min_finishers < 1:
            raise ValueError(f"min_finishers must be >= 1, got {self.min_finishers}.")
        if self.checkpoint_every < 0:
            raise ValueError(f"checkpoint_every must be >= 0, got {self.checkpoint_every}.")
        for name in ("reply_timeout", "activation_bound"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be > 0 (or None), got {value}.")


class FederatedRun:
    """Runs rounds between a [`SplitServer`] and clients reached through a [`Transport`].

    Args:
        server: the server (its settings fix the federation).
        transport: how the clients are reached.
        reliability: the fault policy.
        base_model (`nn.Module`, *optional*): the run's initial model; needed for history compaction (the server's
            record of the client part is built from it).
        on_round (`Callable`, *optional*): called with each applied round's record (the entry of `log`), e.g. to
            print progress.
        checkpoint_dir (`str`, *optional*): where the server checkpoint is written after every round.
        num_labels (`int`, *optional*): labels of a cut must lie in `[0, num_labels)` (or be -100); by default the
            model's vocabulary size (causal LM) when the server has no custom loss.
    """

    def __init__(
        self,
        server: SplitServer,
        transport: Transport,
        reliability: ReliabilitySettings | None = None,
        base_model: nn.Module | None = None,
        checkpoint_dir: str | os.PathLike | None = None,
        num_labels: int | None = None,
        on_round: Callable[[dict[str, Any]], None] | None = None,
    ):
        self.server, self.transport = server, transport
        self.on_round = on_round
        self.reliability = reliability or ReliabilitySettings()
        self.settings = server.settings
        self.checkpoint_dir = None if checkpoint_dir is None else str(checkpoint_dir)
        config = server.split.model.config
        self.hidden_size = getattr(config, "hidden_size", None)
        if num_labels is None and server.loss_func is None:
            num_labels = getattr(config, "vocab_size", None)
        self.num_labels = num_labels
        self.applied = dict.fromkeys(range(self.settings.num_clients), -1)  # last round each client acknowledged
        self.counters = dict.fromkeys(COUNTERS, 0)
        # activation: cuts and lambdas; sync: seeds, scalars, updates, catch-ups; data: the batches that a method
        # without a split pools at the server (centralized training, MeZO)
        self.traffic = {"activation_bytes": 0, "sync_bytes": 0, "catchup_bytes": 0, "data_bytes": 0}
        self.events: list[dict[str, Any]] = []  # every drop: round, attempt, client, leg, kind, reason
        self.log: list[dict[str, Any]] = []  # per applied round: loss, learning rates, finishers, bytes
        self.next_round = 0
        self._finished: set[int] = set()
        self.record: SplitClient | None = None
        # A part configured to train whose applied update is exactly zero round after round warns (update_norms).
        algorithm = server.algorithm
        self.guards = {
            "server": StandingStillGuard("server") if algorithm.server.trains and server.parameters else None,
            "client": StandingStillGuard("client")
            if algorithm.client.optimizer and sum(server.client_update_sizes)
            else None,
        }
        self.snapshot = None  # the record's state at its last snapshot round (a ClientCheckpoint)
        # A client update that is not seeds and scalars (SplitLoRA's gradient) cannot be replayed from the trajectory:
        # a client that missed rounds gets the record's state instead (the weights down, as in FedAvg), so the record
        # is snapshotted every round. In-process clients that share one client part never miss a round.
        replayable = algorithm.client.update_type in (None, ClientUpdate) or getattr(transport, "shared", False)
        self.snapshot_every = self.reliability.checkpoint_every or (0 if replayable else 1)
        if self.snapshot_every:
            if base_model is None:
                raise ValueError(
                    "History compaction (checkpoint_every > 0) needs base_model: the run's initial model"
                    + ("" if replayable else f" (algorithm {algorithm.name!r} catches clients up from its record)")
                    + "."
                )
            self.record = SplitClient(copy.deepcopy(base_model), -1, self.settings, None, None)

    # ----------------------------------------------------------------------------------------------- rounds
    def run(self, num_rounds: int) -> list[Any]:
        """Runs rounds until `num_rounds` rounds are applied (continuing a resumed run); returns the new updates
        (`None` for a round that changed no client part)."""
        updates = []
        while self.next_round < num_rounds:
            updates.append(self.run_round(self.next_round))
        return updates

    def run_round(self, round_index: int) -> Any:
        """One round, retried with a new sample while no client finishes it. Returns its client update (`None`
        when the algorithm's client part does not change)."""
        failed: set[int] = set()
        for attempt in range(self.reliability.max_round_attempts):
            plan = self.server.plan(round_index, attempt, exclude=failed)
            state = self.open_round(plan, attempt)
            self.serve(state, plan.clients)
            if self.close_round(state):
                update = self.commit_round(state)
                self.next_round = round_index + 1
                return update
            failed.update(c for c in plan.clients if c not in self._finished)
            self.counters["fed/skipped_rounds"] += 1
            logger.warning(
                "HO-SFL round %s attempt %s: no client finished; retrying with a new sample.", round_index, attempt
            )
        raise RuntimeError(
            f"Round {round_index}: no sampled client finished in {self.reliability.max_round_attempts} attempts "
            f"(see FederatedRun.events). Check that clients are reachable, or raise reply_timeout."
        )

    def _exchange(self, leg: str, payloads: Mapping[int, Mapping[str, Any]], round_index: int):
        return self.transport.exchange(leg, payloads, self.reliability.reply_timeout, round_index)

    def _drop(self, fault: ClientFault, attempt: int) -> None:
        if fault.leg != "update":
            self.counters["fed/dropped_clients"] += 1
        self.counters["fed/timeouts"] += fault.kind == "timeout"
        self.counters["fed/rejected_messages"] += fault.kind == "rejected"
        self.events.append(
            {
                "round": fault.round,
                "attempt": attempt,
                "client": fault.client,
                "leg": fault.leg,
                "kind": fault.kind,
                "reason": fault.reason[-500:],
            }
        )
        logger.warning("HO-SFL dropped: %s", fault)

    def _fault(self, reply: Any, client: int, round_index: int, leg: str) -> ClientFault | None:
        if isinstance(reply, ClientFault):
            return reply
        if isinstance(reply, TimeoutError):
            return ClientFault(client, round_index, leg, str(reply), kind="timeout")
        if isinstance(reply, Exception):
            return ClientFault(client, round_index, leg, f"{type(reply).__name__}: {reply}", kind="error")
        return None

    def _count(self, leg: str, payloads: Iterable[bytes]) -> None:
        self.traffic[leg] += sum(len(p) for p in payloads)

    def catchup(self, client: int) -> CatchUp:
        """What `client` must apply before it works again: the rounds after the last one it acknowledged, or, when
        that is before the last snapshot, the snapshot plus the rounds after it."""
        after = self.applied[client]
        snapshot = self.snapshot
        if snapshot is not None and after < snapshot.round:
            return CatchUp(self.server.history(snapshot.round), after=snapshot.round, checkpoint=snapshot)
        return CatchUp(self.server.history(after), after=after)

    def _encode_catchup(self, client: int) -> bytes:
        data = encode(self.catchup(client))
        self._count("sync_bytes", [data])
        self._count("catchup_bytes", [data])
        return data

    def _validate_cut(self, data: Any, client: int, round_index: int) -> Any:
        """Decodes and checks a client's forward message (the algorithm's: a cut, perturbed cuts, a batch)."""
        if not isinstance(data, bytes):
            raise MessageError(f"Field 'cut': expected codec bytes, got {type(data).__name__}.")
        message = decode(
            data,
            self.server.algorithm.client.forward_type,
            round=round_index,
            clients=[client],
            hidden_size=self.hidden_size,
            num_labels=self.num_labels,
            **self.server.algorithm.client.check_forward(self.server),
        )
        bound = self.reliability.activation_bound
        hidden = getattr(message, "hidden_states", None)
        if bound is not None and hidden is not None:
            peak = float(hidden.detach().abs().max())
            if peak > bound:
                raise MessageError(
                    f"Field 'hidden_states' of the cut message of client {client}, round {round_index}: magnitude "
                    f"{peak:.3g} above activation_bound={bound:g} (poisoned or diverged activations)."
                )
        return message

    # The phases of one attempt. `run_round` runs them over all the sampled clients at once; the trainer runs `serve`
    # once per client batch (the Trainer's gradient accumulation) and `commit_round` after the Trainer's step.
    def open_round(self, plan: RoundPlan, attempt: int = 0) -> OpenRound:
        """Opens an attempt of a round: the plan goes out with each sampled client's catch-up at `serve`."""
        plan_bytes = encode(plan)
        latest = self.server.trajectory.rounds[-1].round if self.server.trajectory.rounds else -1
        if self.snapshot is not None:
            latest = max(latest, self.snapshot.round)
        return OpenRound(plan, attempt, plan_bytes, time.perf_counter(), latest)

    def serve(self, state: OpenRound, clients: list[int]) -> None:
        """The `forward` exchange with `clients` (plan and catch-up down, cut up), the server's backward of each cut
        in the plan's order, and, where the algorithm's client answers lambda, the `probe` exchange (lambda down,
        the client's reply up). A client that fails any of it is dropped for the round."""
        r, attempt = state.plan.round, state.attempt
        rule = self.server.algorithm.client
        self._count("sync_bytes", [state.plan_bytes] * len(clients))
        payloads = {c: {"plan": state.plan_bytes, "catchup": self._encode_catchup(c)} for c in clients}
        forwards = self._exchange("forward", payloads, r)
        lambdas: dict[int, bytes] = {}
        for c in clients:  # the server's backward, client after client, in the plan's order
            reply = forwards.get(c, TimeoutError("no reply"))
            fault = self._fault(reply, c, r, "forward")
            behind = reply.get("behind") if fault is None and isinstance(reply, Mapping) else None
            if isinstance(behind, int) and -1 <= behind < self.applied[c]:
                self.applied[c] = behind
                self.counters["fed/behind"] += 1
                reason = f"holds rounds up to {behind} only (lost its state): rebuilt next time"
                fault = ClientFault(c, r, "forward", reason, kind="behind")
            elif fault is None:
                data = reply.get("cut") if isinstance(reply, Mapping) else None
                self._count(rule.forward_traffic, [data] if isinstance(data, bytes) else [])
                try:
                    cut = self._validate_cut(data, c, r)
                    result = self.server.backward(cut)
                    state.losses.append(self.server.last_logged_loss)
                    self.applied[c] = state.latest  # it caught up before its forward
                    if isinstance(result, Cotangent):
                        lambdas[c] = encode(result)
                    else:  # finished with its forward (None), or its reply came from the server (ZO)
                        state.replies[c] = result
                except (MessageError, RejectedCut) as error:
                    fault = ClientFault(c, r, "forward", str(error), kind="rejected")
            if fault is not None:
                self._drop(fault, attempt)
        if not lambdas:
            return
        self._count("activation_bytes", lambdas.values())
        probes = self._exchange("probe", {c: {"plan": state.plan_bytes, "cotangent": lambdas[c]} for c in lambdas}, r)
        for c in lambdas:
            reply = probes.get(c, TimeoutError("no reply"))
            fault = self._fault(reply, c, r, "probe")
            if fault is None:
                data = reply.get("reply") if isinstance(reply, Mapping) else None
                try:
                    if not isinstance(data, bytes):
                        raise MessageError(f"Field 'reply': expected codec bytes, got {type(data).__name__}.")
                    self._count("sync_bytes", [data])
                    expect = rule.check_reply(data, self.server)
                    state.replies[c] = decode(data, rule.reply_type, round=r, clients=[c], **expect)
                except MessageError as error:
                    fault = ClientFault(c, r, "probe", str(error), kind="rejected")
            if fault is not None:
                self._drop(fault, attempt)

    def close_round(self, state: OpenRound) -> bool:
        """Closes the attempt when enough clients finished: the strategy aggregates their replies into the client
        update and the server steps. Returns `False` (the round's gradients discarded) when too few finished."""
        replies = state.replies
        self._finished = set(replies)  # a retry keeps them in the pool
        if len(replies) < self.reliability.min_finishers:
            if replies:
                logger.warning(
                    "HO-SFL round %s: %s finishers < min_finishers; skipped.", state.plan.round, len(replies)
                )
            self.server.discard_round()
            return False
        state.finishers = [c for c in state.plan.clients if c in replies]
        state.loss = self.server.round_loss(state.finishers)
        state.learning_rate = self.server.learning_rate()
        state.update = self.server.close(state.plan, replies)
        return True

    def commit_round(self, state: OpenRound) -> Any:
        """After the server's step (the commit point): the update gets its learning rate and is recorded, the server
        checkpoint is written, the finishers apply it (`update` exchange) and the round is logged. Returns the
        update (`None`: the client part does not change this round)."""
        r, finishers = state.plan.round, state.finishers
        skipped = self.server.step_skipped()
        update = self.server.commit(state.update if skipped is None else None)
        metrics = {k: sum(v) / len(v) for k, v in self.server.round_metrics.items() if v}
        self.server.round_metrics.clear()
        update_bytes = encode(update) if update is not None else None
        if update_bytes is not None and not self.reliability.deferred_updates:  # deferred: counted in catch-ups
            self._count("sync_bytes", [update_bytes] * len(finishers))
        record = {  # logged at the commit point (a resumed run has it); a missed update counts in the next round
            "round": r,
            "attempt": state.attempt,
            "clients": state.plan.clients,
            "finishers": finishers,
            "loss": state.loss,
            "learning_rate": state.learning_rate,
            "client_learning_rate": update.lr if update is not None else None,
            "comm/activation_bytes": self.traffic["activation_bytes"],
            "comm/sync_bytes": self.traffic["sync_bytes"],
            "comm/catchup_bytes": self.traffic["catchup_bytes"],
            **self.counters,
            **metrics,
            "seconds": time.perf_counter() - state.start,
        }
        if skipped is not None:
            record["skipped"] = skipped
        self.log.append(record)
        logger.info("HO-SFL round %s", json.dumps(record))
        self._commit(r, update)
        norms = []
        if update_bytes is not None and not self.reliability.deferred_updates:
            acks = self._exchange("update", {c: {"update": update_bytes} for c in finishers}, r)
            for c in finishers:
                ack = acks.get(c, TimeoutError("no reply"))
                fault = self._fault(ack, c, r, "update")
                if fault is None:
                    self.applied[c] = r
                    if isinstance(ack, Mapping) and isinstance(ack.get("update_norm"), float):
                        norms.append(ack["update_norm"])
                else:
                    self.counters["fed/missed_updates"] += 1
                    self._drop(fault, state.attempt)
        self._observe_updates(record, norms, skipped)
        if self.on_round is not None:
            self.on_round(record)
        return update

    def _observe_updates(self, record: dict[str, Any], client_norms: list[float], skipped: str | None) -> None:
        """Logs each part's applied-update norm in the round's record and feeds the guards (a part configured to
        train that stands still warns). Every holder applies the same update, so the clients' norms agree."""
        if skipped is not None:  # a step the loss scaler skipped: nothing was applied, nothing to observe
            return
        record["server_update_norm"] = self.server.last_update_norm
        if self.guards["server"] is not None:
            self.guards["server"].observe(self.server.last_update_norm, record["round"])
        if client_norms:
            if len(set(client_norms)) > 1:
                logger.warning(
                    "HO-SFL round %s: the clients applied updates of different norms %s; holders have diverged.",
                    record["round"],
                    sorted(set(client_norms)),
                )
            record["client_update_norm"] = client_norms[0]
            if self.guards["client"] is not None:
                self.guards["client"].observe(client_norms[0], record["round"])

    def _commit(self, round_index: int, update: Any) -> None:
        """After the server's step, before anyone applies the update: the record and the server checkpoint."""
        if self.record is not None:
            if update is not None:
                self.record.apply(update)
            if (round_index + 1) % self.snapshot_every == 0:
                self.record.last_round = round_index
                self.snapshot = self.record.checkpoint()
        self.next_round = round_index + 1
        if self.checkpoint_dir is not None:
            self.save(self.checkpoint_dir)

    # ------------------------------------------------------------------------------------------------ end
    def finish(self, clients: Iterable[int] | None = None) -> dict[int, str | ClientFault]:
        """Every client catches up; returns each one's weights digest (or its fault). Compare them with
        [`record_digest`]."""
        clients = list(range(self.settings.num_clients)) if clients is None else list(clients)
        last = self.next_round - 1
        replies = self._exchange("catchup", {c: {"catchup": self._encode_catchup(c)} for c in clients}, last)
        digests: dict[int, str | ClientFault] = {}
        for c in clients:
            reply = replies.get(c, TimeoutError("no reply"))
            fault = self._fault(reply, c, last, "catchup")
            if fault is None and isinstance(reply, Mapping) and isinstance(reply.get("digest"), str):
                self.applied[c] = int(reply["last_round"])
                digests[c] = reply["digest"]
            else:
                fault = fault or ClientFault(c, last, "catchup", "no digest in the reply", kind="rejected")
                self._drop(fault, 0)
                digests[c] = fault
        return digests

    def client_model(self, base_model: nn.Module) -> nn.Module:
        """`base_model` (the run's initial model, changed in place) with the trained client part: the record's
        tensors (history compaction, or an algorithm whose update is not seeds and scalars), else the trajectory
        replayed."""
        if self.record is None:
            from ..trajectory import replay_trajectory

            return replay_trajectory(base_model, self.server.trajectory)
        from ..named_tensors import copy_named_tensors
        from ..split import unwrap_causal_lm

        copy_named_tensors(  # the targets' real tensors: a mask's values are written into its base weights
            self.record.part.parameters,
            unwrap_causal_lm(base_model).named_parameters(),
            "the record's client part into the model",
            partial_target=True,
        )
        return base_model

    def record_digest(self, base_model: nn.Module | None = None) -> str:
        """The digest of the server's record of the client part: its own copy (history compaction) or the
        trajectory replayed on `base_model`."""
        if self.record is not None:
            return weights_digest(self.record.parameters)
        if base_model is None:
            raise ValueError("Pass base_model (the run's initial model) to replay the trajectory.")
        from ..trajectory import replay_trajectory

        replayed = replay_trajectory(copy.deepcopy(base_model), self.server.trajectory)
        # What a client holds, as the clients list it (the client part's, or the whole model's without a split).
        return weights_digest(SplitClient(replayed, -1, self.settings, None, None).parameters)

    def summary(self) -> dict[str, Any]:
        return {
            "rounds": self.next_round,
            "counters": dict(self.counters),
            "comm": dict(self.traffic),
            "events": list(self.events),
            "reliability": asdict(self.reliability),
        }

    # ---------------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """The loop's bookkeeping (plain JSON values): the next round, the last round each client holds (what its
        catch-up sends), the counters, the traffic, the fault events and the round log. The server checkpoint
        ([`save`]) and `HOSFLTrainer`'s checkpoints keep it."""
        return {
            "next_round": self.next_round,
            "applied": {str(c): r for c, r in self.applied.items()},
            "counters": dict(self.counters),
            "traffic": dict(self.traffic),
            "events": list(self.events),
            "log": list(self.log),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.next_round = int(state["next_round"])
        self.applied = {int(c): int(r) for c, r in state["applied"].items()}
        self.counters.update(state["counters"])
        self.traffic.update(state["traffic"])
        self.events, self.log = list(state["events"]), list(state["log"])

    def save(self, folder: str | os.PathLike) -> None:
        """Writes the server checkpoint (server state, record, snapshot, the run's bookkeeping) to `folder`,
        atomically: a crash while writing leaves the previous checkpoint."""
        folder = str(folder)
        tmp = folder + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        self.server.save(os.path.join(tmp, "server"))
        if self.record is not None:
            self.record.save(os.path.join(tmp, "record"))
        if self.snapshot is not None:
            with open(os.path.join(tmp, "snapshot.bin"), "wb") as f:
                f.write(encode(CatchUp(after=self.snapshot.round, checkpoint=self.snapshot)))
        state = {**self.state_dict(), "settings": self.settings.to_dict()}
        with open(os.path.join(tmp, RUN_STATE), "w") as f:
            json.dump(state, f)
        old = folder + ".old"
        shutil.rmtree(old, ignore_errors=True)
        if os.path.isdir(folder):
            os.replace(folder, old)
        os.replace(tmp, folder)
        shutil.rmtree(old, ignore_errors=True)

    def load(self, folder: str | os.PathLike) -> None:
        """Loads a checkpoint written by [`save`] (the run continues at its `next_round`)."""
        folder = str(folder)
        if not os.path.isfile(os.path.join(folder, RUN_STATE)) and os.path.isdir(folder + ".old"):
            folder += ".old"  # the crash came while the next checkpoint was being renamed into place
        with open(os.path.join(folder, RUN_STATE)) as f:
            state = json.load(f)
        if state["settings"] != self.settings.to_dict():
            raise ValueError(f"The checkpoint in {folder} is of a run with other settings; resume with the same ones.")
        self.server.load(os.path.join(folder, "server"))
        if self.record is not None and not self.record.load(os.path.join(folder, "record")):
            raise ValueError(
                f"The checkpoint in {folder} has no client record; resume with the same checkpoint_every."
            )
        path = os.path.join(folder, "snapshot.bin")
        if os.path.isfile(path):
            with open(path, "rb") as f:
                per_update = self.settings.scalars_per_update
                self.snapshot = decode(f.read(), CatchUp, num_perturbations=per_update).checkpoint
        self.load_state_dict(state)

    @classmethod
    def resume(
        cls, folder: str | os.PathLike, server: SplitServer, transport: Transport, **kwargs: Any
    ) -> FederatedRun:
        """A run continued from the checkpoint in `folder` (which it keeps writing to), over `transport`. `server`
        is a fresh [`SplitServer`] of the same run; `kwargs` are the other arguments of the run."""
        run = cls(server, transport, checkpoint_dir=folder, **kwargs)
        run.load(folder)
        return run
