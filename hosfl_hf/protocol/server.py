"""`SplitServer`: the server side of the round. It holds the server part (the client's blocks are dropped), its
optimizer and schedule, plans rounds, turns each client's cut into lambda by its own backprop, aggregates the
scalars and records the trajectory."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn
from transformers import Trainer

from ..federation import sample_clients
from ..lora import upcast_trainable_adapters
from ..rng import environment, round_seeds
from ..split import CutActivations, split_model
from ..trajectory import Trajectory
from .messages import ClientForward, ClientUpdate, Cotangent, ProbeReply, RoundPlan
from .settings import RoundSettings

__all__ = ["SplitServer"]


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
        client_trainable = split.client_parameters()
        self.trajectory = Trajectory(
            split_layer=settings.split_layer,
            parameter_names=[n for n, _ in client_trainable],
            zo_eps=settings.zo_eps,
            client_optimizer=settings.client_optimizer,
            client_weight_decay=settings.client_weight_decay,
            environment=environment(p for _, p in client_trainable),
        )
        for block in list(split.layers)[: settings.split_layer]:
            block.to("meta")  # the client's blocks: skipped by the server's forward
        self.split = split
        self.parameters = split.server_parameters()
        cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args)
        params = [p for _, p in self.parameters]
        self.optimizer = cls([{"params": params, "weight_decay": args.weight_decay}], **kwargs)
        steps = args.max_steps
        self.lr_scheduler = args.schedule(self.optimizer, steps)
        # The client schedule: the server's shape at peak client_learning_rate, stepped once per applied round.
        self._client_lr = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=settings.client_learning_rate)
        self.client_lr_scheduler = args.schedule(self._client_lr, steps)

    # ----------------------------------------------------------------------------------------------- round
    def plan(self, round_index: int) -> RoundPlan:
        """The round's sampled clients and perturbation seeds (pure functions of the seeds and the round)."""
        s = self.settings
        clients = sample_clients(s.federation_seed, round_index, s.num_clients, s.clients_per_round)
        return RoundPlan(
            round=round_index, clients=clients, seeds=round_seeds(s.seed, round_index, s.num_perturbations)
        )

    def backward(self, cut: ClientForward) -> Cotangent:
        """Runs the server part on a client's cut, backpropagates `loss_i / K` (gradients accumulate over the round's
        clients) and returns `lambda_i = dloss_i/dz`."""
        k = self.settings.clients_per_round
        z = cut.hidden_states.detach().requires_grad_(True)
        activations = CutActivations(hidden_states=z, attention_mask=cut.attention_mask, position_ids=cut.position_ids)
        labels = None if self.loss_func is not None else cut.labels
        outputs = self.split.server(activations, labels=labels)
        loss = self.loss_func(outputs, cut.labels) if self.loss_func is not None else outputs.loss
        if not torch.isfinite(loss.detach()).all():
            raise ValueError(f"The server loss of client {cut.client} in round {cut.round} is not finite.")
        (loss / k).backward()
        self.last_loss = float(loss.detach())
        # As in HOSFLTrainer: lambda_i = grad(loss_i / K) * K.
        return Cotangent(round=cut.round, client=cut.client, cotangent=z.grad * k)

    def step(self, plan: RoundPlan, replies: Mapping[int, ProbeReply]) -> ClientUpdate:
        """Closes the round: averages the replies of the clients that answered, takes the server's optimizer step,
        and returns (and records) the client update every holder applies."""
        unknown = set(replies) - set(plan.clients)
        if unknown:
            raise ValueError(f"Replies from clients {sorted(unknown)} that round {plan.round} did not sample.")
        averaged = self.settings.aggregate({c: r.scalars for c, r in replies.items()}, plan.round)
        if self.args.max_grad_norm and self.args.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_([p for _, p in self.parameters], self.args.max_grad_norm)
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        update = ClientUpdate(
            round=plan.round, seeds=plan.seeds, scalars=averaged, lr=self.client_lr_scheduler.get_last_lr()[0]
        )
        self._client_lr.step()  # no gradient: only keeps the scheduler's step-order check quiet
        self.client_lr_scheduler.step()
        self.trajectory.rounds.append(update.to_trajectory_round())
        return update

    def history(self, after_round: int) -> list[ClientUpdate]:
        """The applied rounds after `after_round` (what a client that last applied `after_round` must replay)."""
        return [ClientUpdate.from_trajectory_round(r) for r in self.trajectory.rounds if r.round > after_round]
