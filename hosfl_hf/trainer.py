"""`HOSFLTrainer`: a `transformers.Trainer` whose optimizer step is one HO-SFL round."""

from __future__ import annotations

import json
import os
import warnings
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers import (
    DataCollatorForLanguageModeling,
    DataCollatorForSeq2Seq,
    PreTrainedModel,
    Trainer,
    TrainerCallback,
)
from transformers.trainer_utils import get_last_checkpoint

from .client_part import CLIENT_INPUTS, ClientPart
from .config import HOSFLConfig
from .federation import FederatedRoundSampler, sample_clients
from .model_card import HOSFL_TAGS
from .protocol.client import SplitClient
from .protocol.rounds import FederatedRun, OpenRound, ReliabilitySettings
from .protocol.settings import RoundSettings
from .protocol.strategies import ALGORITHMS, get_algorithm
from .protocol.transport import SharedPartTransport
from .server_part import ServerPart
from .split import CutActivations, split_model
from .split_config import CLIENT_MASK_VALUES_NAME
from .trainer_server import SCALER_SKIPPED, TrainerServer
from .trajectory import TRAJECTORY_NAME, Trajectory
from .update_norms import UpdateSnapshot

__all__ = ["HOSFLTrainer"]

# Read-only views of the registry (hosfl_hf.algorithms), for the benchmarks: methods without a split, and methods
# where no part is trained by backprop.
NO_SPLIT = frozenset(name for name, a in ALGORITHMS.items() if not a.split)
ZO_EVERYWHERE = frozenset(name for name, a in ALGORITHMS.items() if not a.server.backprop)


CLIENT_STATE_NAME = "hosfl_client_state.pt"
CLIENT_KEY = "hosfl_client"  # the batch field naming the client that sent the batch
CUT_KEY = "cut"  # the input of the server's training step: the client's cut, as the round delivered it
# Settings a resumed run must share with its checkpoint: any change would make the saved trajectory replay wrongly
# or change the shards, the client sampling or the seeds of the remaining rounds.
# Plus every training field of HOSFLRunRecord.
RESUME_FIELDS = ("split_layer", "num_layers", "model_type", "client_mask")


class _RoundCallback(TrainerCallback):
    """Applies the round's client update right after the server's optimizer step, and only if that step was taken."""

    def __init__(self, trainer: HOSFLTrainer):
        self.trainer = trainer

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.trainer._apply_client_update()


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
        client_mask ([`~hosfl_hf.search_space.ClientMask`], `dict` or path, *optional*):
            A static sparse mask of client base weights the zeroth-order update also covers (chosen at set-up, e.g.
            by [`~hosfl_hf.search_space.sensitivity_mask`]); recorded in `hosfl_config.json` and the trajectory.
        peft_config (`peft.PeftConfig` or `tuple[LoraConfig | None, LoraConfig | None]`, *optional*):
            Adapters to add before the split: one config for the whole model (each adapter belongs to the part that
            runs it), or `(client_config, server_config)` to set each part apart (merged by
            [`~hosfl_hf.lora.split_lora_config`] into one adapter). Not with a model that is already a `PeftModel`.
            Trainable adapter weights are kept in float32 (a half-precision trainable client weight raises).
        kwargs: other [`~transformers.Trainer`] arguments (e.g. `preprocess_logits_for_metrics`).

    Attributes:
        split ([`SplitModel`]): the client and server parts.
        trajectory ([`Trajectory`]): seeds, averaged scalars and client learning rate of every round.
    """

    _tag_names = list(HOSFL_TAGS)
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
        peft_config: Any = None,
        client_mask: Any = None,
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
        from .lora import get_split_peft_model, upcast_trainable_adapters

        if args.n_gpu > 1:
            raise ValueError(
                f"HOSFLTrainer found {args.n_gpu} GPUs in one process, where the Trainer would use nn.DataParallel: "
                "its replicas get slices of a batch while the cut activations stay whole. Run one process per GPU "
                "with `accelerate launch --num_processes N your_script.py`, or expose one GPU "
                "(CUDA_VISIBLE_DEVICES=0)."
            )
        if peft_config is not None:
            # peft draws the adapters' initial weights from torch's global RNG: seed them from args.seed, in a forked
            # RNG so that the caller's global RNG state is left as it was.
            devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(args.seed)
                model = get_split_peft_model(model, peft_config, split_layer)
        self.split = split_model(model, split_layer)
        if args.gradient_checkpointing or any(getattr(b, "gradient_checkpointing", False) for b in self.split.layers):
            _check_gradient_checkpointing(self.split)
        # Zeroth-order steps (~client_learning_rate) round away on half-precision weights: adapters go to float32.
        upcast_trainable_adapters(self.split)
        args.split_layer = split_layer

        if args.clients_per_round * args.world_size > args.num_clients:
            raise ValueError(
                f"{args.world_size} processes x clients_per_round={args.clients_per_round} exceeds "
                f"num_clients={args.num_clients}: each process hosts clients_per_round clients of a round, so raise "
                "num_clients or lower clients_per_round."
            )
        if train_dataset is not None:
            self._check_columns(train_dataset, "train_dataset", args, data_collator)
        if eval_dataset is not None and not isinstance(eval_dataset, dict):
            self._check_columns(eval_dataset, "eval_dataset", None, data_collator)
        if data_collator is None and processing_class is not None and train_dataset is not None:
            data_collator = self._default_collator(train_dataset, processing_class)

        self._loss_func = compute_loss_func
        self.server_part = ServerPart(self.split, compute_loss_func)
        self.algorithm = get_algorithm(args.algorithm)
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
        self.add_callback(_RoundCallback(self))

        # What every holder of the client part agrees on (shards, aggregation rule, ...): the protocol's settings.
        if isinstance(client_mask, (str, os.PathLike)):
            from .search_space import ClientMask

            client_mask = ClientMask.load(client_mask)
        if client_mask is not None and not self.algorithm.client.search_levers:
            levers = [name for name, a in ALGORITHMS.items() if a.client.search_levers]
            raise ValueError(
                f"client_mask is for methods whose client probes projected scalars ({levers}), not "
                f"algorithm={args.algorithm!r}."
            )
        self.round_settings = RoundSettings.from_args(args, split_layer, client_mask)
        self.shards = self._partition(train_dataset) if train_dataset is not None else None
        # The client part's computation (search space, precision, forward, probes, update): the protocol's ClientPart,
        # here over the one copy of the client part that the in-process holders share.
        dtype = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else None
        settings = self.round_settings
        self.client_part = ClientPart(
            self.split,
            args.zo_eps,
            args.zo_estimator,
            dtype,
            space=settings.search_space,
            mask=settings.mask,
            defense=settings.defense,  # noise on the cut that leaves the client (docs/privacy.md)
        )
        self.estimator = self.client_part.estimator
        # What the client optimizer steps (a masked base tensor: its vector of masked values).
        self.client_update_parameters = self.client_part.update_parameters
        if not self.client_update_parameters:
            warnings.warn(
                "The client part has no trainable parameters: only the server trains (split learning with a frozen "
                "client). Add client LoRA adapters or unfreeze client blocks for HO-SFL.",
                stacklevel=2,
            )
        # The round: the protocol's server (with this Trainer as its backend), one client holder that the in-process
        # clients share, and the protocol's loop over them (faults, validation, aggregation, traffic, update norms).
        self.holder = SplitClient(None, -1, settings, None, None, part=self.client_part)
        self.holder.loss_func = compute_loss_func  # FedAvg-LoRA's clients compute their loss on the whole model
        self.transport = SharedPartTransport(self.holder)
        self.server = TrainerServer(self, settings)
        # The trainer's clients are its own data: no activation bound (a diverging run must show its numbers).
        self.run = FederatedRun(self.server, self.transport, ReliabilitySettings(activation_bound=None))
        self.trajectory = self.server.trajectory
        # Totals over all processes (reduced at the end of every round): logs, checkpoints and the model card.
        self.comm = {"activation_bytes": 0, "sync_bytes": 0}
        self.zo_forward_passes = 0
        self.skipped_rounds = 0
        self._counted = {"activation_bytes": 0, "sync_bytes": 0, "forwards": 0}  # the loop's counts already added
        self._open_round: OpenRound | None = None  # the round whose client batches are being served
        self._closed_round: OpenRound | None = None  # closed, committed after the server's optimizer step
        self._model_in_step: nn.Module | None = None
        self._server_inputs: dict[int, dict[str, Any]] = {}
        self._server_result: tuple[torch.Tensor, CutActivations] | None = None
        self._scale_before_step = 1.0
        self._micro_step = 0
        # Round ids stay monotonic over several train() calls: round = _round_base + global_step.
        self._round_base = 0
        self._rounds_done = 0
        self._round_metrics: dict[str, list[float]] = defaultdict(list)
        # Each round's applied update is measured per part; a part configured to train that stands still warns.
        self._server_snapshot: UpdateSnapshot | None = None
        self._server_guard = self.run.guards["server"]
        self.run.guards["server"] = None  # the trainer measures the server's step itself (the Trainer takes it)

    @property
    def client_optimizer(self) -> torch.optim.Optimizer | None:
        """The client optimizer (of the in-process holders' shared client part), `None` when the algorithm's client
        keeps none."""
        if self.algorithm.client.optimizer and self.client_update_parameters:
            return self.holder.optimizer
        return None

    @property
    def client_lr_scheduler(self) -> Any:
        """The client learning-rate schedule (the server's: the learning rate travels in every update)."""
        return self.server.client_lr_scheduler if self.client_optimizer is not None else None

    @property
    def client_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """Deprecated name of `client_update_parameters` (easily confused with `split.client_parameters()`)."""
        warnings.warn(
            "HOSFLTrainer.client_parameters is deprecated: use client_update_parameters (what the client optimizer "
            "steps) or split.client_parameters() (the trainable client parameters).",
            FutureWarning,
            stacklevel=2,
        )
        return self.client_update_parameters

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
        return self.round_settings.shards(dataset)

    @property
    def _federation_seed(self) -> int:
        return self.round_settings.federation_seed

    def _get_train_sampler(self, train_dataset: Any = None) -> FederatedRoundSampler:
        return FederatedRoundSampler(
            self.shards,
            self._clients_per_round_total,
            self._train_batch_size,
            seed=self._federation_seed,
            start_round=self._round_base,
        )

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device) -> None:
        # Losses are per-batch means; the server objective of a round is their average over the K clients.
        return None

    # ------------------------------------------------------------------------------------------- optimizers
    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """The Trainer's optimizer, over the server's trainable parameters only (all of them without a split)."""
        frozen = [] if not self.algorithm.split else [p for _, p in self.split.client_parameters()]
        for p in frozen:
            p.requires_grad_(False)
        try:
            optimizer = super().create_optimizer(model) if model is not None else super().create_optimizer()
        finally:
            for p in frozen:
                p.requires_grad_(True)
        if not self.algorithm.server.trains:  # control (client_only): the server part never changes
            for group in optimizer.param_groups:
                group["lr"] = 0.0
        return optimizer

    def create_scheduler(
        self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None
    ) -> torch.optim.lr_scheduler.LRScheduler:
        """The server's scheduler, plus the client's schedule (same schedule shape, peak `client_learning_rate`; the
        round's server keeps it, and the learning rate travels in every update). The client optimizer's state is kept
        over several train() calls; the schedules are rebuilt for each call (the Trainer resets its scheduler)."""
        scheduler = super().create_scheduler(num_training_steps, optimizer)
        self.server.build_client_schedule(num_training_steps)
        return scheduler

    # ----------------------------------------------------------------------------------------------- round
    def train(self, resume_from_checkpoint: str | bool | None = None, trial: Any = None, **kwargs: Any) -> Any:
        """As [`~transformers.Trainer.train`]. A resumed run must use the checkpoint's split, federation and
        zeroth-order settings (checked before anything is loaded); a second call without a checkpoint continues the
        round ids (and so the seeds and the client sampling) after the rounds already run, keeps the optimizers'
        state and restarts both learning-rate schedules."""
        checkpoint = resume_from_checkpoint
        if checkpoint is True:
            checkpoint = get_last_checkpoint(self.args.output_dir)
        if isinstance(checkpoint, str):
            self._check_resume_settings(checkpoint)
            self._round_base = int(self._read_client_state(checkpoint).get("round_base", 0))
        elif not checkpoint:
            self._round_base = self._rounds_done
        if any(getattr(block, "gradient_checkpointing", False) for block in self.split.layers):
            _check_gradient_checkpointing(self.split)
        return super().train(resume_from_checkpoint=resume_from_checkpoint, trial=trial, **kwargs)

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        """The server's loss of one client batch: in a training round, from the cut the round delivered (the
        client's `forward` through the in-process transport, see [`TrainerServer`]); in evaluation (and for the
        methods whose server estimates by loss differences), after the client part's forward on the batch."""
        inputs = dict(inputs)
        received = inputs.pop(CUT_KEY, None)
        if received is not None:
            return self._server_loss(model, received, inputs, return_outputs)
        labels = inputs.pop("labels", None)
        client_inputs = {k: inputs.pop(k) for k in CLIENT_INPUTS if k in inputs}
        training = model.training and torch.is_grad_enabled()
        if not self.algorithm.split:
            lm_labels = None if self._loss_func is not None else labels
            outputs = model(**client_inputs, **inputs, labels=lm_labels, use_cache=False)
            loss = self._loss_func(outputs, labels) if self._loss_func is not None else outputs.loss
            if loss is None:
                raise ValueError("The model returned no loss: the batch needs 'labels' (or pass compute_loss_func).")
        else:  # evaluation
            cut = self.client_part.forward(client_inputs, count=False)
            loss, outputs, cut = self.server_part.loss(cut, labels, grad=training, model=model, **inputs)
        self._check_finite_loss(loss)
        if training:  # the server's step on a batch (a method without a split)
            self._server_result = (loss, None)
        return (loss, outputs) if return_outputs else loss

    def _server_loss(self, model: nn.Module, received: Any, inputs: dict[str, Any], return_outputs: bool) -> Any:
        """The server part's forward on a received cut (a `ClientForward`), through the Trainer's wrapped model."""
        device = self.args.device

        def on_device(tensor: torch.Tensor | None) -> torch.Tensor | None:
            return tensor.to(device) if tensor is not None else None

        cut = CutActivations(
            hidden_states=received.hidden_states.to(device),
            attention_mask=on_device(received.attention_mask),
            position_ids=on_device(received.position_ids),
        )
        loss, outputs, cut = self.server_part.loss(cut, on_device(received.labels), model=model, **inputs)
        self._check_finite_loss(loss)
        self._server_result = (loss, cut)  # the loss and the cut leaf whose .grad gives lambda
        return (loss, outputs) if return_outputs else loss

    def _check_finite_loss(self, loss: torch.Tensor) -> None:
        """Raises on a non-finite loss, on every process at once (one process raising alone would leave the others
        waiting in the next collective)."""
        bad = not bool(torch.isfinite(loss.detach()).all())
        ranks = [self.accelerator.process_index] if bad else []
        if self.accelerator.num_processes > 1:
            flags = self.accelerator.gather(torch.tensor([float(bad)], device=self.args.device)).cpu().tolist()
            ranks = [rank for rank, flag in enumerate(flags) if flag]
        if ranks:
            raise ValueError(
                f"The server loss is not finite (process {ranks}) in round "
                f"{self._round_base + self.state.global_step}; training stopped before any update of this round was "
                "applied. Lower learning_rate / client_learning_rate, check the labels, or use bf16/fp32 instead of "
                "fp16."
            )

    def training_step(
        self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: torch.Tensor | int | None = None
    ) -> torch.Tensor:
        """One client batch of the round, served by the round's loop ([`FederatedRun.serve`]): the client's forward,
        the server's step (stock backprop, see [`TrainerServer`]) and the client's reply to lambda.

        The last client batch closes the round (aggregation); the client update is committed and applied after the
        server's optimizer step (`_apply_client_update`)."""
        round_index = self._round_base + self.state.global_step
        client = self._batch_client(inputs, round_index)
        if self._open_round is None:
            self._open_round = self.run.open_round(self.server.plan(round_index))
        state = self._open_round
        self._model_in_step = model
        self.transport.batches = {client: inputs}
        # What the server's forward takes besides the cut (kept for the round: a close may re-run the backward).
        self._server_inputs[client] = {
            k: v for k, v in inputs.items() if k not in CLIENT_INPUTS and k not in ("labels", CLIENT_KEY)
        }
        served = len(state.losses)
        try:
            self.run.serve(state, [client])
        finally:
            self.transport.batches = {}
        loss = state.losses[-1] if len(state.losses) > served else torch.zeros((), device=self.args.device)
        self._micro_step += 1
        if self.accelerator.sync_gradients:
            self._close_round(round_index)
        return loss

    def _grad_scale(self) -> float:
        """The fp16 loss scale the Trainer's backward used (1 without a GradScaler). Always a power of two."""
        return self.server.loss_scale()

    def _flush_traffic(self) -> None:
        """Adds the round's traffic of every process to the totals (the same totals on every process): the bytes
        the round's loop encoded, and the client's forwards."""
        forwards = self.client_part.forward_passes + self.server.forward_passes
        counts = [
            self.run.traffic["activation_bytes"] - self._counted["activation_bytes"],
            self.run.traffic["sync_bytes"] - self._counted["sync_bytes"],
            forwards - self._counted["forwards"],
        ]
        self._counted = {
            "activation_bytes": self.run.traffic["activation_bytes"],
            "sync_bytes": self.run.traffic["sync_bytes"],
            "forwards": forwards,
        }
        if self.accelerator.num_processes > 1:
            local = torch.tensor(counts, dtype=torch.float64, device=self.args.device)
            counts = [int(v) for v in self.accelerator.reduce(local, reduction="sum").cpu().tolist()]
        self.comm["activation_bytes"] += counts[0]
        self.comm["sync_bytes"] += counts[1]
        self.zo_forward_passes += counts[2]

    def _batch_client(self, inputs: dict[str, Any], round_index: int) -> int:
        """The client a training batch belongs to, read from the batch (every example carries the id of the shard
        that holds it) and checked against the round's sampled clients."""
        ids = inputs.pop(CLIENT_KEY, None)
        if ids is None:
            raise RuntimeError(
                f"A training batch has no '{CLIENT_KEY}': it did not come from HOSFLTrainer's train dataloader."
            )
        ids = set(torch.as_tensor(ids).tolist())
        sampled = sample_clients(
            self._federation_seed, round_index, self.args.num_clients, self._clients_per_round_total
        )
        if len(ids) != 1 or not ids <= set(sampled):
            raise RuntimeError(
                f"Round {round_index}: a batch holds examples of clients {sorted(ids)}, but one batch must come from "
                f"one of the round's sampled clients {sampled} (are the batches re-split across processes?)."
            )
        return ids.pop()

    # --------------------------------------------------------------------------------------------- dataloader
    def get_train_dataloader(self) -> Any:
        """The stock training dataloader, over the train set with every example tagged with the id of the client
        whose shard holds it, so that each client batch names its client."""
        owners = [0] * len(self.train_dataset)
        for client, shard in enumerate(self.shards):
            for index in shard:
                owners[index] = client
        stock = self.train_dataset, self.data_collator
        self.train_dataset = _ClientTagged(self.train_dataset, owners)
        self.data_collator = _ClientTagCollator(self.data_collator)
        try:
            return super().get_train_dataloader()
        finally:
            self.train_dataset, self.data_collator = stock

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        if CLIENT_KEY not in self._signature_columns:  # the client tag survives remove_unused_columns
            self._signature_columns.append(CLIENT_KEY)

    @property
    def _clients_per_round_total(self) -> int:
        return self.args.clients_per_round * self.args.world_size

    def _close_round(self, round_index: int) -> None:
        """Closes the round before the server's optimizer step (the round's loop: aggregation through the
        algorithm's strategy; ZO-SFL / MeZO also get their server gradient here). The client update is committed
        and applied after the step, by `_apply_client_update`."""
        self._micro_step = 0
        self._rounds_done = round_index + 1
        self._scale_before_step = self._grad_scale()
        self._server_snapshot = UpdateSnapshot(p for _, p in self.server.parameters)
        state, self._open_round = self._open_round, None
        try:
            closed = self.run.close_round(state)
        finally:
            self._server_inputs, self._model_in_step = {}, None
        if not closed:
            # The trainer's clients are its own code and data: a round none of them finishes is a divergence or a
            # bug, not a network fault (the protocol would retry it with other clients; the dataloader cannot).
            reasons = "; ".join(e["reason"] for e in self.run.events if e["round"] == round_index)
            raise ValueError(
                f"Round {round_index}: no client finished it ({reasons}); nothing of the round was applied. Lower "
                "the learning rates, or check the data."
            )
        # A process served only its own clients: the others' finishers caught up in their forward, too.
        for c in self.server.round_finishers:
            self.run.applied[c] = max(self.run.applied[c], state.latest)
        self._closed_round = state

    def _skip(self, round_index: int, reason: str) -> None:
        self.skipped_rounds += 1
        from transformers.utils import logging

        logging.get_logger(__name__).warning(
            f"Round {round_index}: no client update ({reason}); nothing was recorded and the client schedule "
            "did not advance."
        )

    def _apply_client_update(self) -> None:
        """After the server's optimizer step: commit the round (the update gets its learning rate, is recorded and
        applied by the in-process holders), or skip it (on every holder alike) when the loss scaler skipped the
        server step or the round overflowed."""
        state, self._closed_round = self._closed_round, None
        server_step_skipped = self._server_step_skipped()
        if self._server_snapshot is not None and not server_step_skipped:
            norm = self._server_snapshot.norm()
            self.server.last_update_norm = norm
            self._round_metrics["server_update_norm"].append(norm)
            if self._server_guard is not None:
                self._server_guard.observe(norm, self._rounds_done - 1)
        self._server_snapshot = None
        if state is None:
            self._flush_traffic()
            return
        if self.run.commit_round(state) is not None:  # every process's finishers applied it
            for c in self.server.round_finishers:
                self.run.applied[c] = state.plan.round
        record = self.run.log[-1]
        self._flush_traffic()
        skipped = record.get("skipped")
        # A skipped step skips the client update of a method that has one (an overflow always concerns one).
        if skipped is not None and (state.update is not None or skipped != SCALER_SKIPPED):
            self._skip(state.plan.round, skipped)
        for name in ("client_learning_rate", "client_update_norm", "zo/projected_grad"):
            if record.get(name) is not None:
                self._round_metrics[name].append(record[name])

    def _server_step_skipped(self) -> bool:
        # A fused optimizer (adamw_torch_fused, the default where available) skips an overflowing step inside its
        # kernel, which accelerate's `optimizer_step_was_skipped` does not see; the scaler backs its scale off exactly
        # when it found an overflow, so a smaller scale after the step says the step was skipped.
        return self.accelerator.optimizer_step_was_skipped or self._grad_scale() < self._scale_before_step

    def _clip_grad_norm(self, model: nn.Module) -> Any:
        # Zeroth-order estimates are not clipped (see HOSFLConfig, "Precision and clipping"): only the norm is read.
        if not self.algorithm.server.backprop:
            return self.accelerator.clip_grad_norm_(model.parameters(), float("inf"))
        return super()._clip_grad_norm(model)

    # -------------------------------------------------------------------------------------------- logging
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # training logs
            for name, values in self._round_metrics.items():
                if values:
                    logs[name] = sum(values) / len(values)
            self._round_metrics.clear()
            logs["comm/activation_bytes"] = self.comm["activation_bytes"]
            logs["comm/sync_bytes"] = self.comm["sync_bytes"]
            logs["zo/forward_passes"] = self.zo_forward_passes
            logs["fed/skipped_rounds"] = self.skipped_rounds
        super().log(logs, start_time)

    # ------------------------------------------------------------------------------------- save and resume
    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        super()._save(output_dir, state_dict)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if self.args.should_save:
            self.trajectory.save(os.path.join(output_dir, TRAJECTORY_NAME))
            if self.client_part.mask_values:  # masked base weights: not in a peft adapter's files
                from safetensors.torch import save_file

                save_file(self.client_part.mask_state(), os.path.join(output_dir, CLIENT_MASK_VALUES_NAME))
            self.hosfl_split_config().save_pretrained(output_dir)
            self.create_model_card(output_dir=output_dir)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        if self.args.should_save:
            torch.save(
                {
                    "client_optimizer": self.client_optimizer.state_dict() if self.client_optimizer else None,
                    "client_lr_scheduler": self.client_lr_scheduler.state_dict() if self.client_lr_scheduler else None,
                    "comm": dict(self.comm),
                    "zo_forward_passes": self.zo_forward_passes,
                    "skipped_rounds": self.skipped_rounds,
                    "round_base": self._round_base,
                    "run": json.dumps(self.run.state_dict()),  # the round loop's bookkeeping (as FederatedRun.save)
                    "client_mask_values": self.client_part.mask_state(),
                },
                os.path.join(output_dir, CLIENT_STATE_NAME),
            )

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None:
            return
        state = self._read_client_state(checkpoint)
        if self.client_optimizer is not None:
            self.client_optimizer.load_state_dict(state["client_optimizer"])
            self.client_lr_scheduler.load_state_dict(state["client_lr_scheduler"])
        if state.get("client_mask_values"):
            self.client_part.load_mask_state(state["client_mask_values"])
        self.comm = dict(state["comm"])
        self.zo_forward_passes = state["zo_forward_passes"]
        self.skipped_rounds = state.get("skipped_rounds", 0)
        self._round_base = state.get("round_base", 0)
        self._rounds_done = self._round_base + self.state.global_step
        self._load_trajectory(checkpoint)
        if "run" in state:
            self.run.load_state_dict(json.loads(state["run"]))
        # The loop's counts so far are in `comm` already (restored above): only later rounds add to it.
        self._counted = {
            "activation_bytes": self.run.traffic["activation_bytes"],
            "sync_bytes": self.run.traffic["sync_bytes"],
            "forwards": self.client_part.forward_passes + self.server.forward_passes,
        }

    def _load_trajectory(self, checkpoint: str) -> None:
        """The checkpoint's trajectory becomes the run's (the server's record) and the in-process holders hold its
        last round (their weights were loaded with the checkpoint)."""
        self.trajectory.rounds = Trajectory.load(os.path.join(checkpoint, TRAJECTORY_NAME)).rounds
        last = self.trajectory.rounds[-1].round if self.trajectory.rounds else -1
        self.holder.last_round = last
        self.run.applied = dict.fromkeys(self.run.applied, last)
        self.run.next_round = self._rounds_done

    @staticmethod
    def _read_client_state(checkpoint: str) -> dict[str, Any]:
        path = os.path.join(checkpoint, CLIENT_STATE_NAME)
        if not os.path.isfile(path):
            raise ValueError(f"{checkpoint} is not an HO-SFL checkpoint: {CLIENT_STATE_NAME} is missing.")
        return torch.load(path, weights_only=True)

    def _check_resume_settings(self, checkpoint: str) -> None:
        """Refuses a checkpoint whose split, federation or zeroth-order settings differ from this run's: the saved
        trajectory would be continued (and replayed) with other values than the ones it was recorded with."""
        from .hub import HOSFL_CONFIG_NAME, HOSFLRunRecord

        if not os.path.isfile(os.path.join(checkpoint, HOSFL_CONFIG_NAME)):
            raise ValueError(f"{checkpoint} is not an HO-SFL checkpoint: {HOSFL_CONFIG_NAME} is missing.")
        saved = HOSFLRunRecord.from_pretrained(checkpoint).to_dict()
        current = self.hosfl_split_config().to_dict()
        changed = [
            f"{name}: checkpoint {saved.get(name)!r}, now {current[name]!r}"
            for name in RESUME_FIELDS + HOSFLRunRecord._TRAINING_FIELDS
            if saved.get(name) != current[name]
        ]
        if saved.get("rng", {}).get("version") != current["rng"]["version"]:
            changed.append(f"rng version: checkpoint {saved.get('rng')}, now {current['rng']}")
        trajectory = Trajectory.load(os.path.join(checkpoint, TRAJECTORY_NAME))
        if trajectory.parameter_names != self.trajectory.parameter_names:
            changed.append("the client's trainable parameters (adapters or frozen blocks differ)")
        if changed:
            raise ValueError(
                f"Cannot resume from {checkpoint}: these settings differ from the checkpoint's: "
                + "; ".join(changed)
                + ". Resume with the checkpoint's settings (HOSFLRunRecord.from_pretrained(checkpoint)"
                ".training_kwargs()), or start a new run in another output_dir."
            )

    def _load_best_model(self) -> None:
        # The weights go back to the best checkpoint: so do the trajectory and the client optimizer, so that the
        # saved trajectory replays to the saved weights (and a later train() continues from a consistent state).
        super()._load_best_model()
        best = self.state.best_model_checkpoint
        if best is None or not os.path.isfile(os.path.join(best, TRAJECTORY_NAME)):
            return
        self._load_trajectory(best)
        if self.client_optimizer is not None and os.path.isfile(os.path.join(best, CLIENT_STATE_NAME)):
            state = self._read_client_state(best)
            self.client_optimizer.load_state_dict(state["client_optimizer"])
            if state.get("client_mask_values"):  # masked base weights are not in a peft adapter's files
                self.client_part.load_mask_state(state["client_mask_values"])

    # ------------------------------------------------------------------------------------------ hub artifacts
    def hosfl_split_config(self) -> Any:
        """The split and training settings of this run ([`~hosfl_hf.hub.HOSFLRunRecord`], `hosfl_config.json`)."""
        from .hub import HOSFLRunRecord

        config = HOSFLRunRecord.from_training_args(self.args, self.split, self._base_model_name())
        config.client_mask = self.round_settings.client_mask
        config.rng = dict(self.trajectory.rng)
        return config

    def _base_model_name(self) -> str | None:
        model = self.accelerator.unwrap_model(self.model)
        peft_config = getattr(model, "peft_config", None)
        if isinstance(peft_config, dict) and peft_config:
            name = next(iter(peft_config.values())).base_model_name_or_path
        else:
            name = getattr(self.split.model.config, "_name_or_path", None)
        return name or None

    def create_model_card(
        self,
        model_name: str | None = None,
        dataset_name: str | None = None,
        tags: str | list[str] | None = None,
        language: str | None = None,
        license: str | None = None,
        finetuned_from: str | None = None,
        tasks: str | list[str] | None = None,
        dataset_tags: str | list[str] | None = None,
        dataset: str | list[str] | None = None,
        dataset_args: str | list[str] | None = None,
        output_dir: str | None = None,
    ) -> None:
        """Writes the model card (`README.md`): base model, HO-SFL tags, citation, split layer, final metrics from
        `state.log_history`, and the run's communication (`self.comm`) and weight-memory figures.

        Args:
            model_name (`str`, *optional*): title of the card.
            dataset_name (`str`, *optional*): the training dataset (same as `dataset`).
            tags (`str` or `list[str]`, *optional*): extra tags.
            language, license: card metadata.
            finetuned_from (`str`, *optional*): the base model, if the model config does not name it.
            tasks, dataset_tags, dataset_args: accepted for compatibility with `Trainer.create_model_card`; unused.
            dataset (`str` or `list[str]`, *optional*): the training dataset(s).
            output_dir (`str`, *optional*): where to write it; defaults to `args.output_dir`.
        """
        if not self.is_world_process_zero():
            return
        from .hub import build_model_card, final_metrics, parameter_memory

        config = self.hosfl_split_config()
        if finetuned_from is not None:
            config.base_model_name_or_path = finetuned_from
        model = self.accelerator.unwrap_model(self.model)
        peft_config = getattr(model, "peft_config", None)
        adapter = None
        if isinstance(peft_config, dict) and peft_config:
            adapter = peft_config[getattr(model, "active_adapter", None) or next(iter(peft_config))].to_dict()
        comm = {**self.comm, "zo_forward_passes": self.zo_forward_passes}
        memory = parameter_memory(self.split)
        for entry in self.state.log_history:  # measured figures, if a callback logged any as `memory/...`
            memory.update({k: v for k, v in entry.items() if k.startswith("memory/")})
        card = build_model_card(
            config,
            model_name=model_name,
            hub_model_id=self.hub_model_id or self.args.hub_model_id,
            library_name="peft" if adapter is not None else "transformers",
            adapter=adapter,
            metrics=final_metrics(self.state.log_history),
            comm=comm,
            memory=memory,
            tags=[tags] if isinstance(tags, str) else tags,
            dataset=dataset or dataset_name,
            license=license,
            language=language,
        )
        card.save(os.path.join(output_dir if output_dir is not None else self.args.output_dir, "README.md"))

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        # The stock method copies only weight/config files of the checkpoint into output_dir before uploading it;
        # the HO-SFL files must follow, or the Hub would get stale (or no) split config, trajectory and card.
        if self.is_world_process_zero() and self.args.hub_strategy != "end":
            import shutil

            from .hub import HOSFL_CONFIG_NAME

            os.makedirs(self.args.output_dir, exist_ok=True)
            for name in (HOSFL_CONFIG_NAME, TRAJECTORY_NAME, "README.md"):
                source = os.path.join(checkpoint_folder, name)
                if os.path.isfile(source):
                    shutil.copy(source, os.path.join(self.args.output_dir, name))
        super()._push_from_checkpoint(checkpoint_folder)


def _check_gradient_checkpointing(split: Any) -> None:
    """Gradient checkpointing recomputes a block in the backward pass. The cut is injected by a forward pre-hook of
    the first server block, so the recompute sees it only where transformers checkpoints the block's `forward` and
    leaves its hooks outside (`GradientCheckpointingLayer` in transformers 5); anywhere else the first server block
    would be recomputed on the placeholder, giving wrong gradients with no error."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    block = split.layers[split.split_layer]
    wraps_forward = "__call__" not in vars(GradientCheckpointingLayer) and hasattr(type(block).forward, "__wrapped__")
    if not (isinstance(block, GradientCheckpointingLayer) and wraps_forward):
        import transformers

        raise ValueError(
            f"Gradient checkpointing of {type(block).__name__} (transformers {transformers.__version__}) would "
            "recompute the first server block without the injected cut activations. Upgrade transformers to a "
            "release whose GradientCheckpointingLayer checkpoints `forward` (5.x), or turn gradient_checkpointing off."
        )


class _ClientTagged(torch.utils.data.Dataset):
    """A train set whose examples also carry the id of the client that holds them."""

    def __init__(self, dataset: Any, owners: list[int]):
        self.dataset, self.owners = dataset, owners

    def __len__(self) -> int:
        return len(self.owners)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {**self.dataset[index], CLIENT_KEY: self.owners[index]}

    def __getitems__(self, indices: list[int]) -> list[dict[str, Any]]:
        # The DataLoader fetches a batch in one call where the dataset can (datasets.Dataset can).
        fetch = getattr(self.dataset, "__getitems__", None)
        rows = fetch(indices) if fetch is not None else [self.dataset[i] for i in indices]
        return [{**row, CLIENT_KEY: self.owners[i]} for row, i in zip(rows, indices)]


class _ClientTagCollator:
    """Collates with the user's collator and adds the batch's client ids (a tensor) under `CLIENT_KEY`."""

    def __init__(self, collator: Callable):
        self.collator = collator

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        if not features or CLIENT_KEY not in features[0]:
            return self.collator(features)
        ids = [feature[CLIENT_KEY] for feature in features]
        batch = self.collator([{k: v for k, v in f.items() if k != CLIENT_KEY} for f in features])
        batch[CLIENT_KEY] = torch.tensor(ids)
        return batch
