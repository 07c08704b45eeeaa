"""`SplitServer`: the server side of the round. It holds the server part (the client's blocks are dropped), its
optimizer and schedule, plans rounds, turns each client's cut into lambda by its own backprop, aggregates the
scalars and records the trajectory."""

from __future__ import annotations

import os
from collections.abc import Callable, Collection, Mapping
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import Trainer

from ..federation import sample_clients
from ..lora import upcast_trainable_adapters
from ..named_tensors import copy_named_tensors
from ..rng import mix, round_seeds
from ..search_space import client_update_targets
from ..server_part import ServerPart
from ..split import CutActivations, split_model
from ..trajectory import TRAJECTORY_NAME, Trajectory
from ..update_norms import UpdateSnapshot
from .messages import ClientForward, ClientUpdate, Cotangent, ProbeReply, RoundPlan
from .settings import RoundSettings

__all__ = ["SplitServer"]

SERVER_WEIGHTS = "server_parameters.safetensors"
SERVER_STATE = "server_state.pt"
RETRY_STREAM = 0x7E7  # mixes the retry attempt into the client sampling's seed


class SplitServer:
    """The server of the federation.

    Its optimizer and schedules are the `Trainer`'s: the optimizer class and arguments come from
    `Trainer.get_optimizer_cls_and_kwargs(args)`, the schedules from `get_scheduler(args.lr_scheduler_type, ...)`, and
    `max_grad_norm` clips the server's gradient, as in [`HOSFLTrainer`]. One parameter group (`args.weight_decay`
    for every server parameter; the Trainer exempts biases and norms from decay, which only matters when
    `weight_decay > 0`).

    Args:
        model (`nn.Module`): the full `*ForCausalLM` (plain or peft) at the run's initial weights; the client's
            blocks are dropped (moved to the `meta` device: the server never runs them).
        settings ([`RoundSettings`]): the run's shared settings.
        args ([`HOSFLConfig`]): the server's optimizer, schedule (`max_steps`, warmup) and clipping settings.
        loss_func (`Callable`, *optional*): `loss_func(outputs, labels)`; by default the model's causal-LM loss.
    """

    def __init__(self, model: nn.Module, settings: RoundSettings, args: Any, loss_func: Callable | None = None):
        self.settings, self.args, self.loss_func = settings, args, loss_func
        split = split_model(model, settings.split_layer)
        upcast_trainable_adapters(split)
        # The client update's targets (search space, then mask), as every holder of the client part has them.
        client_targets, _ = client_update_targets(split, settings.search_space, settings.mask)
        self.trajectory = settings.new_trajectory(client_targets)
        for block in list(split.layers)[: settings.split_layer]:
            block.to("meta")  # the client's blocks: skipped by the server's forward
        self.split = split
        self.part = ServerPart(split, loss_func)
        self.parameters = split.server_parameters()
        cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args)
        params = [p for _, p in self.parameters]
        self.optimizer = cls([{"params": params, "weight_decay": args.weight_decay}], **kwargs)
        steps = args.max_steps
        self.lr_scheduler = args.schedule(self.optimizer, steps)
        # The client schedule: the server's shape at peak client_learning_rate, stepped once per applied round.
        self._client_lr = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=settings.client_learning_rate)
        client_schedule = getattr(args, "client_schedule", args.schedule)  # the client's own schedule, if set
        self.client_lr_scheduler = client_schedule(self._client_lr, steps)

        self._round_cuts: dict[int, ClientForward] = {}  # this round's accepted cuts, in backward order
        self._round_losses: dict[int, float] = {}
        self._grads_from: list[int] = []  # clients whose gradient is in the parameters' .grad, in order
        self.last_update_norm = 0.0

    # ----------------------------------------------------------------------------------------------- round
    def plan(self, round_index: int, attempt: int = 0, exclude: Collection[int] = ()) -> RoundPlan:
        """The round's sampled clients and perturbation seeds (pure functions of the seeds and the round). A round
        retried after every sampled client dropped (`attempt > 0`) samples again, with other draws, from the clients
        not in `exclude` (those that already failed it) while enough remain."""
        s = self.settings
        seed = s.federation_seed if attempt == 0 else mix(s.federation_seed, RETRY_STREAM, attempt)
        pool = [c for c in range(s.num_clients) if c not in set(exclude)]
        if len(pool) < s.clients_per_round:
            pool = list(range(s.num_clients))
        clients = [pool[i] for i in sample_clients(seed, round_index, len(pool), s.clients_per_round)]
        return RoundPlan(
            round=round_index, clients=clients, seeds=round_seeds(s.seed, round_index, s.num_perturbations)
        )

    def _loss(self, cut: ClientForward, k: int) -> tuple[torch.Tensor, CutActivations]:
        activations = CutActivations(
            cut.hidden_states, attention_mask=cut.attention_mask, position_ids=cut.position_ids
        )
        loss, _, activations = self.part.loss(activations, cut.labels)
        if not torch.isfinite(loss.detach()).all():
            raise ValueError(f"The server loss of client {cut.client} in round {cut.round} is not finite.")
        (loss / k).backward()
        return loss, activations

    def backward(self, cut: ClientForward) -> Cotangent:
        """Runs the server part on a client's cut, backpropagates `loss_i / K` (gradients accumulate over the round's
        clients) and returns `lambda_i = dloss_i/dz`.

        Raises:
            `ValueError`: if the loss, lambda or a server gradient is not finite (poisoned activations). The cut is
                then not part of the round: [`step`] rebuilds the gradient from the accepted cuts only.
        """
        k = self.settings.clients_per_round
        loss, activations = self._loss(cut, k)  # a non-finite loss raises before any gradient is written
        self._grads_from.append(cut.client)
        grads = [p.grad for _, p in self.parameters if p.grad is not None]
        cotangent = ServerPart.cotangent(activations, k)
        if not torch.isfinite(cotangent).all() or not all(bool(torch.isfinite(g).all()) for g in grads):
            raise ValueError(f"The server gradient of client {cut.client}'s cut in round {cut.round} is not finite.")
        self.last_loss = float(loss.detach())
        self._round_cuts[cut.client] = cut
        self._round_losses[cut.client] = self.last_loss
        return Cotangent(round=cut.round, client=cut.client, cotangent=cotangent)

    def round_loss(self, clients: list[int]) -> float:
        """The mean server loss of `clients` (those that finished) in the current round."""
        return sum(self._round_losses[c] for c in clients) / len(clients)

    def discard_round(self) -> None:
        """Forgets the current round's gradients and cuts (no client finished it)."""
        self.optimizer.zero_grad(set_to_none=True)
        self._round_cuts, self._round_losses, self._grads_from = {}, {}, []

    def step(self, plan: RoundPlan, replies: Mapping[int, ProbeReply]) -> ClientUpdate:
        """Closes the round: averages the replies of the clients that answered, takes the server's optimizer step,
        and returns (and records) the client update every holder applies.

        Only the clients that finished (sent scalars) count, on both sides: if they are not all `K` sampled clients,
        the server's gradient is rebuilt from their cuts alone (in the plan's order) with `K` = the number of
        finishers, so the step is that of the mean loss over the finishers (the clients' update is the aggregate of
        the same clients' scalars)."""
        unknown = set(replies) - set(plan.clients)
        if unknown:
            raise ValueError(f"Replies from clients {sorted(unknown)} that round {plan.round} did not sample.")
        missing = set(replies) - set(self._round_cuts)
        if missing:
            raise ValueError(f"Replies from clients {sorted(missing)} whose cut the server did not accept.")
        # Shared seeds: the plan's seeds and the per-seed aggregate; per-client seeds: every replying client's own.
        seeds, averaged = self.settings.update_terms({c: r.scalars for c, r in replies.items()}, plan.round)
        finishers = [c for c in self._grads_from if c in replies]
        if finishers != self._grads_from or len(finishers) != self.settings.clients_per_round:
            self.optimizer.zero_grad(set_to_none=True)
            for client in finishers:
                self._loss(self._round_cuts[client], len(finishers))
        if self.args.max_grad_norm and self.args.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_([p for _, p in self.parameters], self.args.max_grad_norm)
        snapshot = UpdateSnapshot(p for _, p in self.parameters)
        self.optimizer.step()
        self.last_update_norm = snapshot.norm()  # the server's applied update, logged as server_update_norm
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._round_cuts, self._round_losses, self._grads_from = {}, {}, []
        update = ClientUpdate(
            round=plan.round, seeds=seeds, scalars=averaged, lr=self.client_lr_scheduler.get_last_lr()[0]
        )
        self._client_lr.step()  # no gradient: only keeps the scheduler's step-order check quiet
        self.client_lr_scheduler.step()
        self.trajectory.rounds.append(update)
        return update

    def history(self, after_round: int) -> list[ClientUpdate]:
        """The applied rounds after `after_round` (what a client that last applied `after_round` must replay)."""
        return [r for r in self.trajectory.rounds if r.round > after_round]

    # ------------------------------------------------------------------------------------------------ state
    def save(self, folder: str | os.PathLike) -> None:
        """Writes the server's state: its part's trainable weights (safetensors), the optimizer and both schedules
        (`torch.save` of tensors and plain values, read back with `weights_only=True`) and the trajectory."""
        os.makedirs(folder, exist_ok=True)
        save_file({n: p.detach().cpu().contiguous() for n, p in self.parameters}, os.path.join(folder, SERVER_WEIGHTS))
        state = {
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "client_lr_scheduler": self.client_lr_scheduler.state_dict(),
        }
        torch.save(state, os.path.join(folder, SERVER_STATE))
        self.trajectory.save(os.path.join(folder, TRAJECTORY_NAME))

    def load(self, folder: str | os.PathLike) -> None:
        """Loads a state written by [`save`] (bit for bit)."""
        weights = load_file(os.path.join(folder, SERVER_WEIGHTS))
        copy_named_tensors(weights, self.parameters, f"The server checkpoint in {folder} into this server part")
        state = torch.load(os.path.join(folder, SERVER_STATE), weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        self.client_lr_scheduler.load_state_dict(state["client_lr_scheduler"])
        trajectory = Trajectory.load(os.path.join(folder, TRAJECTORY_NAME))
        if trajectory.parameter_names != self.trajectory.parameter_names:
            raise ValueError(f"The trajectory in {folder} is of another client part.")
        self.trajectory.rounds = trajectory.rounds
        self.discard_round()
