"""`SplitServer`: the server side of the round. It holds the server part, its optimizer and schedules, plans rounds,
turns each client's cut into lambda by its own backprop, closes the round through the algorithm's strategy and records
the trajectory.

The optimizer, the backward and the loss scale are the server's *backend*: here a plain optimizer; in
[`HOSFLTrainer`] the `transformers.Trainer` (its `accelerator.backward`, loss scaling, optimizer, scheduler, clipping
and DDP reductions), which subclasses this server and overrides only those methods."""

from __future__ import annotations

import contextlib
import math
import os
from collections import defaultdict
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import replace
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
from ..zeroth_order import ZerothOrderEstimator, loss_differences
from .messages import ClientBatch, ClientForward, ClientGradient, ClientUpdate, Cotangent, PerturbedCuts, RoundPlan
from .settings import RoundSettings
from .strategies import get_algorithm

__all__ = ["RejectedCut", "SplitServer"]

SERVER_WEIGHTS = "server_parameters.safetensors"
SERVER_STATE = "server_state.pt"
RETRY_STREAM = 0x7E7  # mixes the retry attempt into the client sampling's seed


class RejectedCut(ValueError):
    """A client's cut the server refuses (a non-finite loss, lambda or gradient): the client is dropped for the
    round, nothing of its cut stays in the server's gradient."""


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
        settings ([`RoundSettings`]): the run's shared settings (`settings.algorithm` picks the strategy).
        args ([`HOSFLConfig`]): the server's optimizer, schedule (`max_steps`, warmup) and clipping settings.
        loss_func (`Callable`, *optional*): `loss_func(outputs, labels)`; by default the model's causal-LM loss.
        split ([`SplitModel`], *optional*): an existing split to serve as is (its client blocks are kept: the
            trainer's server shares the model with the in-process clients); `model` is then ignored.
    """

    def __init__(
        self,
        model: nn.Module | None,
        settings: RoundSettings,
        args: Any,
        loss_func: Callable | None = None,
        split: Any = None,
    ):
        self.settings, self.args, self.loss_func = settings, args, loss_func
        self.algorithm = get_algorithm(settings.algorithm)
        own = split is None
        if own:
            split = split_model(model, settings.split_layer)
            upcast_trainable_adapters(split)
        # The client update's targets (search space, then mask), as every holder of the client part has them.
        client_targets, masks = client_update_targets(split, settings.search_space, settings.mask)
        self.client_targets = client_targets
        self.trajectory = settings.new_trajectory(client_targets)
        # Sizes of what the client optimizer steps (a masked tensor: its masked values), in order.
        self.client_update_sizes = [
            int(masks[i].numel()) if i in masks else p.numel() for i, (_, p) in enumerate(client_targets)
        ]
        if own and self.algorithm.split:
            for block in list(split.layers)[: settings.split_layer]:
                block.to("meta")  # the client's blocks: skipped by the server's forward
        self.split = split
        self.part = ServerPart(split, loss_func)
        self.parameters = self.trainable_parameters()
        self.world_size = 1  # processes that each serve `clients_per_round` clients of a round (the trainer's DDP)
        self.optimizer: Any = None
        self.lr_scheduler: Any = None
        self.client_lr_scheduler: Any = None
        if own:
            self.build_optimizers(args.max_steps)
        self._round_cuts: dict[int, ClientForward] = {}  # this round's accepted cuts, in backward order
        self._round_losses: dict[int, float] = {}
        self._grads_from: list[int] = []  # clients whose gradient is in the parameters' .grad, in order
        self.last_update_norm = 0.0
        self.last_loss = float("nan")
        self.round_metrics: dict[str, list[float]] = defaultdict(list)  # e.g. zo/projected_grad, per closed round
        self._estimators: dict[str, ZerothOrderEstimator] = {}
        self.forward_passes = 0  # forwards of the whole model (MeZO's loss differences)

    def trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """What the server's optimizer steps: the server part's trainable parameters (the whole model's without a
        split)."""
        if not self.algorithm.split:
            return [(n, p) for n, p in self.split.model.named_parameters() if p.requires_grad]
        return self.split.server_parameters()

    # --------------------------------------------------------------------------------------------- backend
    def build_optimizers(self, num_steps: int) -> None:
        """The server's optimizer and schedule, and the client schedule (the server's shape at peak
        `client_learning_rate`, or the client's own), over `num_steps` rounds."""
        args = self.args
        cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args)
        params = [p for _, p in self.parameters]
        self.optimizer = cls([{"params": params, "weight_decay": args.weight_decay}], **kwargs)
        if not self.algorithm.server.trains:  # control (client_only): the server part never changes
            for group in self.optimizer.param_groups:
                group["lr"] = 0.0
        self.lr_scheduler = args.schedule(self.optimizer, num_steps)
        self.build_client_schedule(num_steps)

    def build_client_schedule(self, num_steps: int) -> None:
        """The client learning-rate schedule. It steps no parameter: the schedule object needs an optimizer, so it
        gets one over a placeholder; the learning rate travels in every update, and each holder's client optimizer
        uses it."""
        self._client_lr = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=self.settings.client_learning_rate)
        client_schedule = getattr(self.args, "client_schedule", self.args.schedule)
        self.client_lr_scheduler = client_schedule(self._client_lr, num_steps)

    def backprop(self, loss: torch.Tensor, k: int, cut: ClientForward) -> torch.Tensor:
        """Backpropagates `loss / k` (gradients accumulate over the round's clients); returns what the server logs
        for this client (`loss / k`, detached)."""
        (loss / k).backward()
        return (loss / k).detach()

    def forward_loss(self, cut: Any) -> tuple[torch.Tensor, CutActivations | None]:
        """The loss of one client's forward message: a cut through the server part, or (no split) a batch through
        the whole model."""
        if isinstance(cut, ClientBatch):
            inputs = {"input_ids": cut.input_ids, "attention_mask": cut.attention_mask}
            if cut.position_ids is not None:
                inputs["position_ids"] = cut.position_ids
            lm_labels = None if self.loss_func is not None else cut.labels
            outputs = self.split.model(**inputs, labels=lm_labels, use_cache=False)
            loss = self.loss_func(outputs, cut.labels) if self.loss_func is not None else outputs.loss
            return loss, None
        activations = CutActivations(
            cut.hidden_states, attention_mask=cut.attention_mask, position_ids=cut.position_ids
        )
        loss, _, activations = self.part.loss(activations, cut.labels)
        return loss, activations

    def loss_scale(self) -> float:
        """The loss scale of the backward (a power of two; 1 without fp16 loss scaling)."""
        return 1.0

    def clients_per_process(self) -> int:
        """`K` of lambda = dloss/dz: the clients whose losses this process averages."""
        return self.settings.clients_per_round

    def gather_replies(self, replies: dict[int, Any], round_index: int) -> dict[int, Any]:
        """Every process's replies of the round (one process here)."""
        return replies

    def reduce_mean(self, tensor: torch.Tensor) -> torch.Tensor:
        """The mean of `tensor` over the processes that serve a round's clients (one process here)."""
        return tensor

    def non_finite_client_update(self, round_index: int, what: str) -> None:
        """A round whose client update is not finite: refused (no holder applies anything)."""
        raise ValueError(
            f"{what.capitalize()} in round {round_index}; no update was applied. Lower the learning rates."
        )

    def zeroth_order_targets(self, scope: str) -> tuple[list[tuple[str, nn.Parameter]], int]:
        """The parameters a zeroth-order server estimate covers and the RNG index of the first: the server part's
        (after the client's in the pinned order) or every trainable parameter (`scope="model"`)."""
        if scope == "server":
            return self.split.server_parameters(), len(self.client_targets)
        return self.client_targets + self.split.server_parameters(), 0

    def step(self) -> None:
        """The server's optimizer step on the round's accumulated gradient (clipped to `max_grad_norm`)."""
        if self.args.max_grad_norm and self.args.max_grad_norm > 0 and self.algorithm.server.backprop:
            torch.nn.utils.clip_grad_norm_([p for _, p in self.parameters], self.args.max_grad_norm)
        snapshot = UpdateSnapshot(p for _, p in self.parameters)
        self.optimizer.step()
        self.last_update_norm = snapshot.norm()  # the server's applied update, logged as server_update_norm
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def step_skipped(self) -> str | None:
        """Why the server's last step was not taken (then no client update is applied either), or `None`."""
        return None

    def learning_rate(self) -> float:
        return self.lr_scheduler.get_last_lr()[0]

    def next_client_lr(self) -> float:
        """The client learning rate of the update being committed; advances the client schedule."""
        lr = self.client_lr_scheduler.get_last_lr()[0]
        self._client_lr.step()  # no gradient: only keeps the scheduler's step-order check quiet
        self.client_lr_scheduler.step()
        return lr

    # ----------------------------------------------------------------------------------------------- round
    def plan(self, round_index: int, attempt: int = 0, exclude: Collection[int] = ()) -> RoundPlan:
        """The round's sampled clients and perturbation seeds (pure functions of the seeds and the round). A round
        retried after every sampled client dropped (`attempt > 0`) samples again, with other draws, from the clients
        not in `exclude` (those that already failed it) while enough remain."""
        s = self.settings
        per_round = s.clients_per_round * self.world_size
        seed = s.federation_seed if attempt == 0 else mix(s.federation_seed, RETRY_STREAM, attempt)
        pool = [c for c in range(s.num_clients) if c not in set(exclude)]
        if len(pool) < per_round:
            pool = list(range(s.num_clients))
        clients = [pool[i] for i in sample_clients(seed, round_index, len(pool), per_round)]
        return RoundPlan(
            round=round_index, clients=clients, seeds=round_seeds(s.seed, round_index, s.num_perturbations)
        )

    def _loss(self, cut: ClientForward, k: int) -> tuple[torch.Tensor, torch.Tensor, CutActivations]:
        loss, activations = self.forward_loss(cut)
        if not torch.isfinite(loss.detach()).all():
            raise RejectedCut(f"The server loss of client {cut.client} in round {cut.round} is not finite.")
        logged = self.backprop(loss, k, cut)
        return loss, logged, activations

    def backward(self, message: Any) -> Any:
        """The server's work on one client's forward message, by the algorithm's server rule: backprop of
        `loss_i / K` (gradients accumulate over the round's clients) returning `lambda_i = dloss_i/dz` (`None` when
        the client needs no lambda), or a zeroth-order server's loss differences, returned as the client's reply.

        Raises:
            [`RejectedCut`]: if the loss, lambda or a server gradient is not finite (poisoned activations). The cut
                is then not part of the round: [`close`] rebuilds the gradient from the accepted cuts only.
        """
        result = self.algorithm.server.serve(self, message)
        self._round_cuts[message.client] = message
        self._round_losses[message.client] = self.last_loss
        return result

    def backprop_message(self, message: Any) -> Cotangent | None:
        """Backprop of one client's message (see [`backward`]); a client's own gradient (FedAvg-LoRA) is added to
        the server's, in the plan's order as the Trainer's backward accumulates them."""
        k = self.clients_per_process()
        if isinstance(message, ClientGradient):
            self.accumulate(message.gradient)
            self._grads_from.append(message.client)
            self.last_loss = float(message.loss) if message.loss is not None else math.nan
            self.last_logged_loss = torch.tensor(self.last_loss / k)
            return None
        loss, logged, activations = self._loss(message, k)  # a non-finite loss raises before any gradient is written
        self._grads_from.append(message.client)
        self.last_loss = float(loss.detach())
        self.last_logged_loss = logged
        if not self.algorithm.client.cotangent:
            return None
        cotangent = self.part.cotangent(activations, k, self.loss_scale())
        if not self.gradients_finite(cotangent):
            return self.non_finite_cotangent(message)
        return Cotangent(round=message.round, client=message.client, cotangent=cotangent)

    def accumulate(self, gradient: torch.Tensor) -> None:
        """Adds a client's gradient (flat, in the order of `parameters`) to the parameters' `.grad`."""
        sizes = [p.numel() for _, p in self.parameters]
        for (_, p), g in zip(self.parameters, torch.split(gradient, sizes)):
            g = g.view(p.shape).to(device=p.device, dtype=p.dtype) * self.loss_scale()
            p.grad = g if p.grad is None else p.grad.add_(g)

    def loss_differences(self, message: Any) -> list[float]:
        """Two-point loss differences `(L(theta + mu u_p) - L(theta - mu u_p)) / 2` for the round's seeds: of the
        server part on ZO-SFL's perturbed cuts (its own parameters perturbed by the same seeds), or of the whole
        model on a batch (MeZO)."""
        seeds = round_seeds(self.settings.seed, message.round, self.settings.num_perturbations)
        with self.evaluation():
            if isinstance(message, PerturbedCuts):
                estimator = self._estimator("server")
                if 2 * len(seeds) != message.hidden_states.shape[0]:
                    raise RejectedCut(f"{message.hidden_states.shape[0]} perturbed cuts for {len(seeds)} seeds.")
                estimator.check_forward(lambda: self.evaluate_loss(message.cut(0)))
                values, total = [], 0.0
                for p, seed in enumerate(seeds):
                    with estimator.perturbed(seed, estimator.eps):
                        plus = float(self.evaluate_loss(message.cut(2 * p)))
                    with estimator.perturbed(seed, -estimator.eps):
                        minus = float(self.evaluate_loss(message.cut(2 * p + 1)))
                    values.append((plus - minus) / 2)
                    total += plus + minus
                mean = total / (2 * len(seeds))
            else:
                values, mean = loss_differences(self._estimator("model"), lambda: self.evaluate_loss(message), seeds)
                self.forward_passes += 2 * len(seeds)  # the whole model's (ZO-SFL's client counts its own)
        if not all(math.isfinite(v) for v in values):
            return self.non_finite_differences(message, values, mean)
        self.last_loss = mean
        self.last_logged_loss = torch.tensor(mean / self.clients_per_process())
        return values

    def non_finite_differences(self, message: Any, values: list[float], mean: float) -> list[float]:
        raise RejectedCut(f"The loss differences of client {message.client} in round {message.round} are not finite.")

    def _estimator(self, scope: str) -> ZerothOrderEstimator:
        """The server's two-point estimator: its own parameters (after the client's in the RNG order), or every
        trainable parameter of the whole model (`scope="model"`)."""
        if scope not in self._estimators:
            targets, first_index = self.zeroth_order_targets(scope)
            self._estimators[scope] = ZerothOrderEstimator(
                targets, self.settings.zo_eps, "two_sided", module=self.split.model, first_index=first_index
            )
        return self._estimators[scope]

    @contextlib.contextmanager
    def evaluation(self) -> Iterator[None]:
        """Where the loss differences are evaluated: no autograd, no dropout (the two losses of a pair must see the
        same network)."""
        model = self.split.model
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                yield
        finally:
            model.train(was_training)

    def evaluate_loss(self, message: Any) -> torch.Tensor:
        return self.forward_loss(message)[0]

    def non_finite_cotangent(self, cut: ClientForward) -> Cotangent | None:
        """A cut whose lambda or server gradient is not finite is refused (poisoned activations)."""
        raise RejectedCut(f"The server gradient of client {cut.client}'s cut in round {cut.round} is not finite.")

    def gradients_finite(self, cotangent: torch.Tensor) -> bool:
        grads = [p.grad for _, p in self.parameters if p.grad is not None]
        return bool(torch.isfinite(cotangent).all()) and all(bool(torch.isfinite(g).all()) for g in grads)

    def round_loss(self, clients: list[int]) -> float:
        """The mean server loss of `clients` (those that finished) in the current round."""
        return sum(self._round_losses[c] for c in clients) / len(clients)

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def discard_round(self) -> None:
        """Forgets the current round's gradients and cuts (no client finished it)."""
        self.zero_grad()
        self._round_cuts, self._round_losses, self._grads_from = {}, {}, []

    def close(self, plan: RoundPlan, replies: Mapping[int, Any]) -> Any:
        """Closes the round before the server's step: the algorithm's strategy aggregates the replies of the clients
        that finished into the client update (its `lr` is set at [`commit`]), then the server steps.

        Only the clients that finished count, on both sides: if they are not all `K` sampled clients, the server's
        gradient is rebuilt from their cuts alone (in the plan's order) with `K` = the number of finishers, so the
        step is that of the mean loss over the finishers (the clients' update aggregates the same clients' replies).

        Returns:
            The client update every holder applies after the step (`None`: the client part does not change).
        """
        unknown = set(replies) - set(plan.clients)
        if unknown:
            raise ValueError(f"Replies from clients {sorted(unknown)} that round {plan.round} did not sample.")
        missing = set(replies) - set(self._round_cuts)
        if missing:
            raise ValueError(f"Replies from clients {sorted(missing)} whose cut the server did not accept.")
        finishers = [c for c in self._grads_from if c in replies]
        if (
            self.world_size == 1
            and self.algorithm.server.backprop
            and (finishers != self._grads_from or len(finishers) != self.settings.clients_per_round)
        ):
            self.zero_grad()
            for client in finishers:
                message = self._round_cuts[client]
                if isinstance(message, ClientGradient):  # computed for K clients: rescaled to the finishers
                    self.accumulate(message.gradient * (self.clients_per_process() / len(finishers)))
                else:
                    self._loss(message, len(finishers))
        update = self.algorithm.client.close(self, plan, self.gather_replies(dict(replies), plan.round))
        self.step()
        self._round_cuts, self._round_losses, self._grads_from = {}, {}, []
        return update

    def commit(self, update: Any) -> Any:
        """After the server's step: the update gets the round's client learning rate (the client schedule advances)
        and a zeroth-order update is recorded in the trajectory. Returns the update to send (`None`: nothing to
        apply)."""
        if update is None:
            return None
        update = self.algorithm.client.finalize(self, replace(update, lr=self.next_client_lr()))
        if isinstance(update, ClientUpdate):
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
