"""`SplitClient`: one federated client. It holds the client part of the model (embeddings and blocks
`0..split_layer-1`; the server's blocks are dropped) and its own shard of the data, and answers the protocol's
messages. It never backpropagates and never sends weights."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..client_part import CLIENT_INPUTS, ClientPart
from ..federation import FederatedRoundSampler
from ..lora import upcast_trainable_adapters
from ..named_tensors import copy_named_tensors
from ..rng import check_environment, environment
from ..split import split_model
from ..zeroth_order import build_client_optimizer
from .messages import CatchUp, ClientCheckpoint, ClientForward, ClientGradient, Cotangent, ProbeReply, RoundPlan
from .settings import RoundSettings
from .strategies import get_algorithm

__all__ = ["ClientPart", "SplitClient", "weights_digest"]


class SplitClient:
    """A client of the federation: its part of the model, its data shard, and the client optimizer's state.

    Args:
        model (`nn.Module`): the full `*ForCausalLM` (plain or peft) at the run's initial weights; its server blocks
            are dropped (the list of decoder blocks is cut after block `split_layer`, which only marks the cut).
        client_id (`int`): this client's id (its shard index, Flower's `partition-id`).
        settings ([`RoundSettings`]): the run's split, federation and zeroth-order settings.
        dataset: the training set every client shards the same way (a `datasets.Dataset` or a list of rows with
            `input_ids`, `labels`); only this client's shard is ever read. `None` for a holder that only applies
            updates (the server's record of the client part).
        collator (`Callable`): turns a list of rows into a batch of tensors.
    """

    def __init__(
        self,
        model: nn.Module | None,
        client_id: int,
        settings: RoundSettings,
        dataset: Any,
        collator: Callable | None,
        part: ClientPart | None = None,
    ):
        self.settings = settings
        self.client_id = client_id
        self.algorithm = get_algorithm(settings.algorithm)
        if part is None:  # its own copy of the client part: what only the server runs is dropped
            split = split_model(model, settings.split_layer)
            upcast_trainable_adapters(split)
            if self.algorithm.split:  # without a split the client holds the whole model
                _drop_server_modules(split)
            part = ClientPart(
                split,
                settings.zo_eps,
                settings.zo_estimator,
                settings.autocast_dtype,
                space=settings.search_space,
                mask=settings.mask,
                defense=settings.defense,
            )
        self.split = part.split
        self.part = part
        # What the optimizer steps (trainable parameters; a masked base tensor's vector of masked values); without a
        # split, every trainable parameter of the whole model.
        self.parameters = self.part.update_parameters
        if not self.algorithm.split:
            self.parameters = [(n, p) for n, p in self.split.model.named_parameters() if p.requires_grad]
        self.client_update_sizes = [p.numel() for _, p in self.parameters]
        self.loss_func: Callable | None = None  # a whole-model client's loss (default: the model's causal-LM loss)
        self.optimizer = build_client_optimizer(
            [p for _, p in self.parameters], settings.client_optimizer, 0.0, settings.client_weight_decay
        )
        self.environment = environment(p for _, p in self.part.parameters)
        self.last_round = -1
        self.sampler = None
        if dataset is not None:
            shards = settings.shards(dataset)
            self.sampler = FederatedRoundSampler(
                shards, settings.clients_per_round, settings.batch_size, seed=settings.federation_seed
            )
        self.dataset, self.collator = dataset, collator
        self._initial: dict[str, Any] | None = None  # the state at construction, for `reset`
        self._reference: tuple[int, int, torch.Tensor] | None = None

    # ----------------------------------------------------------------------------------------------- round
    def batch(self, round_index: int) -> dict[str, torch.Tensor]:
        """This client's batch of round `round_index` (the trainer's sampler draws the same one)."""
        rows = [self.dataset[i] for i in self.sampler.client_batch(round_index, self.client_id)]
        return self.collator(rows)

    def forward(self, plan: RoundPlan) -> Any:
        """The round's forward leg, by the algorithm's client rule: the cut of this round's batch (without
        autograd) and its labels; ZO-SFL's perturbed cuts; the batch itself for a method without a split."""
        if self.client_id not in plan.clients:
            raise ValueError(f"Client {self.client_id} is not sampled in round {plan.round} ({plan.clients}).")
        if plan.round <= self.last_round:
            raise ValueError(f"Round {plan.round} was already applied here (last round {self.last_round}).")
        return self.algorithm.client.forward(self, plan)

    def cut(self, plan: RoundPlan) -> ClientForward:
        """Runs the client part on this round's batch, without autograd: the cut activations and the labels."""
        batch = self.batch(plan.round)
        inputs = {k: batch[k] for k in CLIENT_INPUTS if k in batch}
        # A first-order client keeps the graph of its forward for its backward of lambda.
        hidden = self.part.forward(inputs, grad=self.algorithm.client.graph).hidden_states
        self._reference = (plan.round, self.client_id, hidden)
        return ClientForward(
            round=plan.round,
            client=self.client_id,
            hidden_states=self.part.release(hidden, plan.round, self.client_id).detach(),
            labels=batch.get("labels"),
            attention_mask=inputs.get("attention_mask"),
            position_ids=inputs.get("position_ids"),
        )

    def whole_model_gradient(self, plan: RoundPlan, batch: dict[str, Any]) -> ClientGradient:
        """FedAvg-LoRA's forward leg: the gradient of `loss / K` of this round's batch through the whole model,
        flattened in the order of `parameters` (the `.grad` it finds is left as it was: a holder may share its model
        with the server, whose gradient accumulates meanwhile)."""
        params = [p for _, p in self.parameters]
        saved = [p.grad for p in params]
        for p in params:
            p.grad = None
        try:
            inputs = {k: batch[k] for k in CLIENT_INPUTS if k in batch}
            labels = batch.get("labels")
            lm_labels = None if self.loss_func is not None else labels
            outputs = self.split.model(**inputs, labels=lm_labels, use_cache=False)
            loss = self.loss_func(outputs, labels) if self.loss_func is not None else outputs.loss
            (loss / self.settings.clients_per_round).backward()
            if any(p.grad is None for p in params):
                raise RuntimeError(f"A trainable parameter received no gradient in round {plan.round}.")
            flat = torch.cat([p.grad.detach().float().flatten().cpu() for p in params])
        finally:
            for p, grad in zip(params, saved):
                p.grad = grad
        return ClientGradient(round=plan.round, client=self.client_id, gradient=flat, loss=float(loss.detach()))

    def round_inputs(self, plan: RoundPlan) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """This round's client inputs and the reference cut `z`: the one of `forward` when this object ran it, or
        recomputed (a process per message keeps no tensors)."""
        batch = self.batch(plan.round)
        inputs = {k: batch[k] for k in CLIENT_INPUTS if k in batch}
        if self._reference is not None and self._reference[:2] == (plan.round, self.client_id):
            reference = self._reference[2]
        else:
            reference = self.part.forward(inputs, grad=self.algorithm.client.graph).hidden_states
        self._reference = None
        return inputs, reference

    def reply(self, plan: RoundPlan, cotangent: Cotangent) -> Any:
        """The answer to lambda, by the run's algorithm: HO-SFL's `P` scalars `<lambda, z(theta + mu u_p) - z(theta)>`
        for the round's seeds ([`ProbeReply`]), SplitLoRA's gradient ([`ClientGradient`])."""
        if cotangent.round != plan.round or cotangent.client != self.client_id:
            raise ValueError(
                f"Cotangent for client {cotangent.client}, round {cotangent.round}; this is client {self.client_id}, "
                f"round {plan.round}."
            )
        return self.algorithm.client.reply(self, plan, cotangent)

    def probe(self, plan: RoundPlan, cotangent: Cotangent) -> ProbeReply:
        """HO-SFL's answer to lambda (see [`reply`])."""
        return self.reply(plan, cotangent)

    def apply(self, update: Any) -> None:
        """Applies one round's update (HO-SFL's seeds and averaged scalars, SplitLoRA's averaged gradient), exactly as
        every other holder does.

        Raises:
            `ValueError`: if the round is not after the last applied one (a duplicate or out-of-order update).
        """
        if update.round <= self.last_round:
            raise ValueError(
                f"Update of round {update.round} is not after the last applied round {self.last_round}: a duplicate "
                "or out-of-order update is never applied."
            )
        self.algorithm.client.apply(self, update)
        self.last_round = update.round

    def catch_up(self, history: CatchUp) -> int:
        """Applies what of `history` this client has not applied yet (a straggler's replay): its checkpoint if newer
        than this client's state, then the rounds after its last applied one. Returns how many rounds it replayed
        (a loaded checkpoint not counted).

        Raises:
            `ValueError`: if this client holds fewer rounds than the history starts after, and no checkpoint: it
                lost its state (a restart from nothing) and needs its full history. Nothing is applied then.
        """
        if history.checkpoint is not None and history.checkpoint.round > self.last_round:
            self.load_checkpoint(history.checkpoint)
        elif self.last_round < history.after:
            raise ValueError(
                f"Client {self.client_id} holds rounds up to {self.last_round}, but the catch-up starts after round "
                f"{history.after}: it lost its state and needs its full history (or a checkpoint)."
            )
        applied = 0
        for update in history.rounds:
            if update.round > self.last_round:
                self.apply(update)
                applied += 1
        return applied

    def checkpoint(self) -> ClientCheckpoint:
        """This client's state as a [`ClientCheckpoint`] (what the server sends a straggler)."""
        return ClientCheckpoint.from_client_state(self.last_round, self.state_dict())

    def load_checkpoint(self, checkpoint: ClientCheckpoint) -> None:
        """Loads a [`ClientCheckpoint`]; its tensors must have this client part's names, shapes and dtypes exactly
        (a cast would break bit-identity)."""
        own = dict(self.parameters)
        for name, tensor in checkpoint.parameters.items():
            if name in own and (tensor.shape != own[name].shape or tensor.dtype != own[name].dtype):
                raise ValueError(
                    f"Checkpoint tensor {name!r} is {tuple(tensor.shape)} {tensor.dtype}; this client part holds "
                    f"{tuple(own[name].shape)} {own[name].dtype}."
                )
        self.load_state_dict(checkpoint.to_client_state(dict(self.environment)))

    # ------------------------------------------------------------------------------------------------ state
    def remember_initial_state(self) -> None:
        """Keeps the current state (a copy of the trainable weights and the optimizer's state) for [`reset`]."""
        self._initial = self.state_dict()

    def reset(self) -> None:
        """Back to the state at construction (a client with no saved state, served by a process that served others):
        the run's initial client part, a fresh optimizer, no applied round."""
        if self._initial is None:
            raise RuntimeError("reset() needs remember_initial_state() first (right after construction).")
        self.load_state_dict(self._initial)

    def state_dict(self) -> dict[str, Any]:
        """The client's state: trainable weights, optimizer state, last applied round, environment."""
        return {
            "parameters": {n: p.detach().clone() for n, p in self.parameters},
            "optimizer": self.optimizer.state_dict(),
            "last_round": self.last_round,
            "environment": dict(self.environment),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_environment(state.get("environment"), [p for _, p in self.part.parameters], "load this client state")
        copy_named_tensors(state["parameters"], self.parameters, "The saved client state into this client part")
        self.part.write_mask_values()
        self.optimizer.load_state_dict(state["optimizer"])
        self.last_round = int(state["last_round"])
        self._reference = None  # its weights were written in place: a kept graph is stale (recomputed when needed)

    def save(self, folder: str | os.PathLike) -> None:
        """Writes the state to `folder` (safetensors for the weights; the optimizer state with `torch.save`)."""
        os.makedirs(folder, exist_ok=True)
        state = self.state_dict()
        save_file(state.pop("parameters"), os.path.join(folder, "client_parameters.safetensors"))
        torch.save(state, os.path.join(folder, "client_state.pt"))

    def load(self, folder: str | os.PathLike) -> bool:
        """Loads a state written by `save`; returns False (and changes nothing) if `folder` holds none."""
        path = os.path.join(folder, "client_state.pt")
        if not os.path.isfile(path):
            return False
        state = torch.load(path, weights_only=True)
        state["parameters"] = load_file(os.path.join(folder, "client_parameters.safetensors"))
        self.load_state_dict(state)
        return True


def weights_digest(parameters: Any) -> str:
    """sha256 of `(name, tensor)` pairs in their pinned order: what every holder of the client part must agree on."""
    h = hashlib.sha256()
    for name, param in parameters:
        h.update(name.encode())
        h.update(param.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _drop_server_modules(split: Any) -> None:
    """Frees what only the server runs: the blocks after the cut are removed, and every other parameter that no
    module of the client's forward uses (block `split_layer`, whose pre-hook stops the forward before it runs, the
    final norm, an untied LM head) moves to the `meta` device."""
    del split.layers[split.split_layer + 1 :]
    used = {id(p) for module in split.client_modules() for p in module.parameters(recurse=False)}
    for module in split.model.modules():
        for name, param in list(module._parameters.items()):
            if param is not None and id(param) not in used and param.device.type != "meta":
                meta = torch.empty(param.shape, dtype=param.dtype, device="meta")
                module._parameters[name] = nn.Parameter(meta, requires_grad=param.requires_grad)
