"""`HOSFLTrainer`: a `transformers.Trainer` whose optimizer step is one HO-SFL round."""

from __future__ import annotations

import os
import warnings
from collections import defaultdict
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
from torch import nn
from transformers import (
    DataCollatorForLanguageModeling,
    DataCollatorForSeq2Seq,
    PreTrainedModel,
    Trainer,
    get_scheduler,
)

from .aggregation import average_scalars
from .config import HOSFLConfig
from .federation import FederatedRoundSampler, RoundTraffic, partition_dataset, sample_clients
from .split import CutActivations, split_model
from .trajectory import Trajectory, TrajectoryRound
from .zeroth_order import ZerothOrderEstimator, apply_zo_update, build_client_optimizer, round_seeds

__all__ = ["HOSFLTrainer"]

# Inputs that stay on the client; everything else in a batch (besides labels) is forwarded to the server part.
CLIENT_INPUTS = ("input_ids", "attention_mask", "position_ids", "inputs_embeds")
CLIENT_STATE_NAME = "hosfl_client_state.pt"


class HOSFLTrainer(Trainer):
    """Trainer for Hybrid-Order Split Federated Learning (HO-SFL).

    The model is cut after block `split_layer`. Each optimizer step is one round: `clients_per_round` clients are
    sampled from `num_clients` shards of `train_dataset`; each runs its part without autograd on one batch, the
    server backpropagates `loss / K` through its part (the Trainer's optimizer, scheduler and accelerator) and
    returns `lambda = dloss/dz`; each client then sends `P` scalars `<lambda, z(theta + mu u_p) - z(theta)>`, and
    the client part is updated from the averaged scalars and the seeds alone, through its own SGD/AdamW.

    Args:
        model (`PreTrainedModel` or `peft.PeftModel`):
            A `*ForCausalLM` model. Trainable parameters (`requires_grad`) of each part are the ones trained.
        args ([`HOSFLConfig`], *optional*):
            Training and federation settings.
        split_layer (`int`, *optional*):
            Number of client decoder blocks; overrides `args.split_layer`.
        train_dataset, eval_dataset, processing_class, data_collator, compute_metrics, callbacks:
            As in [`~transformers.Trainer`]. `train_dataset` needs an `input_ids` column (and `partition_column` for a
            Dirichlet partition). Without a collator, sequences are padded and `labels` (if absent) are the inputs.
        compute_loss_func (`Callable`, *optional*):
            `compute_loss_func(outputs, labels)` returning the mean loss of one batch (e.g. a verbalizer loss from
            `hosfl_hf.tasks`); by default the model's own causal-LM loss is used.
        kwargs: other [`~transformers.Trainer`] arguments (e.g. `preprocess_logits_for_metrics`).

    Attributes:
        split ([`SplitModel`]): the client and server parts.
        trajectory ([`Trajectory`]): seeds, averaged scalars and client learning rate of every round.
    """

    _tag_names = ["hosfl", "split-federated-learning", "zeroth-order", "hosfl_hf"]
    _name = "HO-SFL"

    def __init__(
        self,
        model: PreTrainedModel | nn.Module,
        args: HOSFLConfig | None = None,
        split_layer: int | None = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: Any = None,
        data_collator: Callable | None = None,
        compute_metrics: Callable | None = None,
        callbacks: list | None = None,
        compute_loss_func: Callable | None = None,
        **kwargs: Any,
    ):
        if args is None:
            args = HOSFLConfig(output_dir="hosfl-output")
        if not isinstance(args, HOSFLConfig):
            raise TypeError(f"HOSFLTrainer needs an HOSFLConfig as args, got {type(args).__name__}.")
        if split_layer is not None and args.split_layer is not None and split_layer != args.split_layer:
            raise ValueError(f"split_layer={split_layer} disagrees with args.split_layer={args.split_layer}; set one.")
        split_layer = split_layer if split_layer is not None else args.split_layer
        if split_layer is None:
            raise ValueError("HO-SFL needs a split point: pass split_layer=k (number of client decoder blocks).")
        self.split = split_model(model, split_layer)
        args.split_layer = split_layer

        if train_dataset is not None:
            self._check_columns(train_dataset, "train_dataset", args, data_collator)
        if eval_dataset is not None and not isinstance(eval_dataset, dict):
            self._check_columns(eval_dataset, "eval_dataset", None, data_collator)
        if data_collator is None and processing_class is not None and train_dataset is not None:
            data_collator = self._default_collator(train_dataset, processing_class)

        self._loss_func = compute_loss_func
        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            compute_metrics=compute_metrics,
            callbacks=callbacks,
            **kwargs,
        )
        # Each client batch returns its own mean loss; the Trainer divides it by K (gradient_accumulation_steps).
        self.model_accepts_loss_kwargs = False
        self.loss_is_scaled_for_ga = False

        self.shards = self._partition(train_dataset) if train_dataset is not None else None
        self.client_parameters = self.split.client_parameters()
        if not self.client_parameters:
            warnings.warn(
                "The client part has no trainable parameters: only the server trains (split learning with a frozen "
                "client). Add client LoRA adapters or unfreeze client blocks for HO-SFL.",
                stacklevel=2,
            )
        self.estimator = ZerothOrderEstimator(self.client_parameters, args.zo_eps, args.zo_estimator)
        self.trajectory = Trajectory(
            split_layer=split_layer,
            parameter_names=[n for n, _ in self.client_parameters],
            zo_eps=args.zo_eps,
            client_optimizer=args.client_optimizer,
            client_weight_decay=args.client_weight_decay,
        )
        self.client_optimizer: torch.optim.Optimizer | None = None
        self.client_lr_scheduler: Any = None
        self.comm = {"activation_bytes": 0, "sync_bytes": 0}
        self.zo_forward_passes = 0
        self._round_scalars: dict[int, list[float]] = {}
        self._micro_step = 0
        self._pending: tuple[dict[str, torch.Tensor], CutActivations, torch.Tensor | None] | None = None
        self._metrics: dict[str, list[float]] = defaultdict(list)

    # --------------------------------------------------------------------------------------------------- data
    @staticmethod
    def _check_columns(dataset: Any, name: str, args: HOSFLConfig | None, data_collator: Callable | None) -> None:
        columns = getattr(dataset, "column_names", None)
        if columns is None:
            return
        if data_collator is None and "input_ids" not in columns:
            raise ValueError(
                f"{name} has columns {columns} but HOSFLTrainer needs tokenized 'input_ids': tokenize it first (e.g. "
                "hosfl_hf.tasks.get_task('sst2').tokenize(dataset, tokenizer)) or pass a data_collator that does."
            )
        if args is not None and args.partition == "dirichlet" and args.partition_column not in columns:
            raise ValueError(
                f"partition='dirichlet' needs the label column partition_column={args.partition_column!r}, but "
                f"{name} has columns {columns}: set partition_column to the label column or use partition='iid'."
            )

    @staticmethod
    def _default_collator(dataset: Any, tokenizer: Any) -> Callable:
        if getattr(tokenizer, "pad_token", "") is None:
            tokenizer.pad_token = tokenizer.eos_token
        if "labels" in (getattr(dataset, "column_names", None) or []):
            return DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100)
        return DataCollatorForLanguageModeling(tokenizer, mlm=False)

    def _partition(self, dataset: Any) -> list[list[int]]:
        args = self.args
        labels = None
        if args.partition == "dirichlet":
            labels = dataset[args.partition_column]
        return partition_dataset(
            labels,
            len(dataset),
            args.num_clients,
            args.partition,
            args.dirichlet_alpha,
            seed=self._federation_seed,
            min_size=args.per_device_train_batch_size,
        )

    @property
    def _federation_seed(self) -> int:
        return self.args.data_seed if self.args.data_seed is not None else self.args.seed

    def _get_train_sampler(self, train_dataset: Any = None) -> FederatedRoundSampler:
        return FederatedRoundSampler(
            self.shards, self.args.clients_per_round, self._train_batch_size, seed=self._federation_seed
        )

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device) -> None:
        # Losses are per-batch means; the server objective of a round is their average over the K clients.
        return None

    # ------------------------------------------------------------------------------------------- optimizers
    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """The Trainer's optimizer, over the server's trainable parameters only."""
        frozen = [p for _, p in self.split.client_parameters()]
        for p in frozen:
            p.requires_grad_(False)
        try:
            return super().create_optimizer(model) if model is not None else super().create_optimizer()
        finally:
            for p in frozen:
                p.requires_grad_(True)

    def create_scheduler(
        self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None
    ) -> torch.optim.lr_scheduler.LRScheduler:
        """The server's scheduler, plus the client optimizer and its scheduler (same schedule shape, peak
        `client_learning_rate`)."""
        scheduler = super().create_scheduler(num_training_steps, optimizer)
        if self.client_parameters and self.client_optimizer is None:
            self.client_optimizer = build_client_optimizer(
                [p for _, p in self.client_parameters],
                self.args.client_optimizer,
                self.args.client_learning_rate,
                self.args.client_weight_decay,
            )
            self.client_lr_scheduler = get_scheduler(
                self.args.lr_scheduler_type,
                self.client_optimizer,
                num_warmup_steps=self.args.get_warmup_steps(num_training_steps),
                num_training_steps=num_training_steps,
                scheduler_specific_kwargs=self.args.lr_scheduler_kwargs,
            )
        return scheduler

    # ----------------------------------------------------------------------------------------------- round
    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        """Client forward (no autograd) -> cut -> server forward; the server's loss for this client batch."""
        inputs = dict(inputs)
        labels = inputs.pop("labels", None)
        client_inputs = {k: inputs.pop(k) for k in CLIENT_INPUTS if k in inputs}
        cut = self.split.client(**client_inputs)
        training = model.training and torch.is_grad_enabled()
        cut = replace(cut, hidden_states=cut.hidden_states.detach().requires_grad_(training))
        if self._loss_func is not None:
            outputs = self.split.server(cut, model=model, **inputs)
            loss = self._loss_func(outputs, labels)
        else:
            outputs = self.split.server(cut, labels=labels, model=model, **inputs)
            loss = outputs.loss
        if loss is None:
            raise ValueError("The server part returned no loss: the batch needs 'labels' (or pass compute_loss_func).")
        if not torch.isfinite(loss.detach()).all():
            raise ValueError(
                f"The server loss is {loss.item()} in round {self.state.global_step}; training stopped before any "
                "update of this round was applied. Lower learning_rate / client_learning_rate, check the labels, or "
                "use bf16/fp32 instead of fp16."
            )
        if training:
            self._pending = (client_inputs, cut, labels)
        return (loss, outputs) if return_outputs else loss

    def training_step(
        self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: torch.Tensor | int | None = None
    ) -> torch.Tensor:
        """One client of the round: server backprop (the stock step), then the client's zeroth-order scalars."""
        self._pending = None
        loss = super().training_step(model, inputs, num_items_in_batch)
        client_inputs, cut, labels = self._pending
        self._pending = None
        round_index = self.state.global_step
        clients = self._round_sampler_clients(round_index)
        client = clients[self._micro_step % len(clients)]

        # lambda = dloss_i/dz: the Trainer backpropagated loss_i / K (times the fp16 loss scale, if any).
        scale = self.current_gradient_accumulation_steps
        if self.accelerator.scaler is not None:
            scale = scale / self.accelerator.scaler.get_scale()
        cotangent = cut.hidden_states.grad * scale
        reference = cut.hidden_states.detach()
        if self.client_parameters:
            seeds = round_seeds(self.args.seed, round_index, self.args.num_perturbations)
            with self.compute_loss_context_manager():
                scalars = self.estimator.projected_scalars(
                    lambda: self.split.client(**client_inputs).hidden_states, reference, cotangent, seeds
                )
            self._round_scalars[client] = scalars
            self.zo_forward_passes += 1 + self.estimator.forwards_per_direction * len(seeds)
        else:
            self.zo_forward_passes += 1
        label_bytes = labels.numel() * labels.element_size() if isinstance(labels, torch.Tensor) else 0
        traffic = RoundTraffic.hybrid_order(
            cut.num_bytes(),
            label_bytes,
            cotangent.numel() * cotangent.element_size(),
            self.args.num_perturbations if self.client_parameters else 0,
        )
        self.comm["activation_bytes"] += traffic.activation_bytes
        self.comm["sync_bytes"] += traffic.sync_bytes
        self._micro_step += 1
        if self.accelerator.sync_gradients:
            self._finish_round(round_index)
        return loss

    def _round_sampler_clients(self, round_index: int) -> list[int]:
        return sample_clients(self._federation_seed, round_index, self.args.num_clients, self.args.clients_per_round)

    def _finish_round(self, round_index: int) -> None:
        """Averages the round's scalars and applies the client update (every holder would apply the same one)."""
        self._micro_step = 0
        scalars_by_client, self._round_scalars = self._round_scalars, {}
        if not self.client_parameters:
            return
        seeds = round_seeds(self.args.seed, round_index, self.args.num_perturbations)
        averaged = average_scalars(scalars_by_client, len(seeds), round_index)
        lr = self.client_lr_scheduler.get_last_lr()[0]
        apply_zo_update(self.client_parameters, self.client_optimizer, seeds, averaged, self.args.zo_eps, lr)
        self.client_lr_scheduler.step()
        self.trajectory.rounds.append(TrajectoryRound(round=round_index, seeds=seeds, scalars=averaged, lr=lr))
        self._metrics["zo/projected_grad"].append(sum(averaged) / (len(averaged) * self.args.zo_eps))
        self._metrics["client_learning_rate"].append(lr)

    # -------------------------------------------------------------------------------------------- logging
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # training logs
            for name, values in self._metrics.items():
                if values:
                    logs[name] = sum(values) / len(values)
            self._metrics.clear()
            logs["comm/activation_bytes"] = self.comm["activation_bytes"]
            logs["comm/sync_bytes"] = self.comm["sync_bytes"]
            logs["zo/forward_passes"] = self.zo_forward_passes
        super().log(logs, start_time)

    # ------------------------------------------------------------------------------------- save and resume
    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        super()._save(output_dir, state_dict)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if self.args.should_save:
            self.trajectory.save(os.path.join(output_dir, "hosfl_trajectory.json"))

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        if self.args.should_save:
            torch.save(
                {
                    "client_optimizer": self.client_optimizer.state_dict() if self.client_optimizer else None,
                    "client_lr_scheduler": self.client_lr_scheduler.state_dict() if self.client_lr_scheduler else None,
                    "comm": dict(self.comm),
                    "zo_forward_passes": self.zo_forward_passes,
                },
                os.path.join(output_dir, CLIENT_STATE_NAME),
            )

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None:
            return
        path = os.path.join(checkpoint, CLIENT_STATE_NAME)
        if not os.path.isfile(path):
            raise ValueError(f"{checkpoint} is not an HO-SFL checkpoint: {CLIENT_STATE_NAME} is missing.")
        state = torch.load(path, weights_only=True)
        if self.client_optimizer is not None:
            self.client_optimizer.load_state_dict(state["client_optimizer"])
            self.client_lr_scheduler.load_state_dict(state["client_lr_scheduler"])
        self.comm = dict(state["comm"])
        self.zo_forward_passes = state["zo_forward_passes"]
        self.trajectory = Trajectory.load(os.path.join(checkpoint, "hosfl_trajectory.json"))
