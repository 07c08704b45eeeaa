"""`TrainerServer`: the round's server with the `transformers.Trainer` as its backend. It is a
[`~hosfl_hf.protocol.SplitServer`] that overrides only what the Trainer does itself: the backward (the Trainer's
`training_step`: `accelerator.backward`, fp16 loss scaling, DDP's gradient sync, gradient accumulation over the round's
clients), the loss scale, the reductions over processes, and the optimizer step (the Trainer's loop steps, clips and
schedules after the round's last client batch). Plan, lambda, the finite checks, the close of the round through the
algorithm's strategy, the update record and the trajectory are the server's own: written once."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from transformers import Trainer

from .protocol.messages import ClientBatch, ClientForward, Cotangent
from .protocol.server import SplitServer

if TYPE_CHECKING:
    from .trainer import HOSFLTrainer

__all__ = ["SCALER_SKIPPED", "TrainerServer"]

SCALER_SKIPPED = "the loss scaler skipped the server step"


class TrainerServer(SplitServer):
    """The server of [`HOSFLTrainer`]'s rounds, over the trainer's split model (shared with its in-process clients).

    Args:
        trainer ([`HOSFLTrainer`]): the trainer whose optimizer, scheduler and accelerator the server uses.
        settings ([`RoundSettings`]): the run's shared settings.
    """

    def __init__(self, trainer: HOSFLTrainer, settings: Any):
        self.trainer = trainer
        super().__init__(None, settings, trainer.args, trainer._loss_func, split=trainer.split)
        self.world_size = trainer.args.world_size
        self._overflow: str | None = None
        self.round_finishers: list[int] = []  # the last closed round's finishers, over every process

    # ------------------------------------------------------------------------------------------- the Trainer
    def backprop(self, loss: torch.Tensor, k: int, cut: ClientForward) -> torch.Tensor:
        raise RuntimeError("TrainerServer backpropagates through Trainer.training_step (see _loss).")

    def _inputs(self, message: Any) -> dict[str, Any]:
        """The Trainer's inputs for one client's message: the cut (see `HOSFLTrainer.compute_loss`), or a batch's
        tensors, plus what the server's forward takes besides them."""
        extra = self.trainer._server_inputs.get(message.client, {})
        if isinstance(message, ClientBatch):
            fields = ("input_ids", "labels", "attention_mask", "position_ids")
            return {**{k: getattr(message, k) for k in fields if getattr(message, k) is not None}, **extra}
        return {"cut": message, **extra}

    def _loss(self, message: Any, k: int) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """The server's forward and backward of one client's message: the stock `Trainer.training_step` (its
        `compute_loss` runs the server part on the cut, or the whole model on a batch; the Trainer divides by `K`
        and calls `accelerator.backward`)."""
        trainer = self.trainer
        logged = Trainer.training_step(trainer, trainer._model_in_step, self._inputs(message))
        loss, activations = trainer._server_result
        trainer._server_result = None
        return loss, logged, activations

    def _prepare_scaler(self) -> None:
        # No loss is backpropagated by the Trainer here, but the loss scaler's step needs the state that scaling a
        # loss sets up; the gradients are written pre-multiplied by the scale (`loss_scale`).
        if self.trainer.accelerator.scaler is not None:
            self.trainer.accelerator.scaler.scale(torch.ones((), device=self.trainer.args.device))

    def accumulate(self, gradient: torch.Tensor) -> None:
        self._prepare_scaler()
        super().accumulate(gradient)

    @contextlib.contextmanager
    def evaluation(self) -> Iterator[None]:
        """The Trainer's evaluation of the loss differences: its model in eval mode, no autograd, its
        `compute_loss_context_manager` (autocast)."""
        trainer, model = self.trainer, self.trainer._model_in_step
        self._prepare_scaler()
        was_training = model.training
        model.eval()  # the two losses of a pair must see the same network (no dropout)
        try:
            with torch.no_grad(), trainer.compute_loss_context_manager():
                yield
        finally:
            model.train(was_training)

    def evaluate_loss(self, message: Any) -> torch.Tensor:
        trainer = self.trainer
        inputs = trainer._prepare_inputs(self._inputs(message))
        return trainer.compute_loss(trainer._model_in_step, inputs)

    def non_finite_differences(self, message: Any, values: list[float], mean: float) -> list[float]:
        if self.trainer.accelerator.scaler is None:
            return super().non_finite_differences(message, values, mean)
        self._overflow = "non-finite loss differences (fp16 loss-scale overflow)"
        self.last_loss, self.last_logged_loss = mean, torch.tensor(mean / self.clients_per_process())
        return values

    def loss_scale(self) -> float:
        scaler = self.trainer.accelerator.scaler
        return float(scaler.get_scale()) if scaler is not None else 1.0

    def clients_per_process(self) -> int:
        return self.trainer.current_gradient_accumulation_steps

    def non_finite_cotangent(self, cut: ClientForward) -> Cotangent | None:
        if self.trainer.accelerator.scaler is None:
            return super().non_finite_cotangent(cut)
        # An fp16 loss-scale overflow: the scaler will skip the server's step; no probe is worth running, and the
        # round's client update is skipped on every holder alike.
        self._overflow = "non-finite lambda (fp16 loss-scale overflow)"
        return None

    def gather_replies(self, replies: dict[int, Any], round_index: int) -> dict[int, Any]:
        """Every process's replies (each process hosts `clients_per_round` clients of a round), so that every
        process applies the same client update; `round_finishers` lists the round's finishers of every process."""
        accelerator = self.trainer.accelerator
        self.round_finishers = sorted(replies)
        if accelerator.num_processes == 1:
            return replies
        from .protocol.messages import ProbeReply

        k, device = self.trainer.args.clients_per_round, self.trainer.args.device
        ids = sorted(replies) + [-1] * (k - len(replies))  # padded: every process gathers the same shape
        gathered_ids = accelerator.gather(torch.tensor(ids, dtype=torch.long, device=device)).cpu().tolist()
        self.round_finishers = sorted(c for c in gathered_ids if c >= 0)
        if not all(isinstance(r, ProbeReply) for r in replies.values()):
            return replies  # gradients are averaged over processes by reduce_mean instead
        device = self.trainer.args.device
        rows = torch.tensor([[c, *r.scalars] for c, r in replies.items()], dtype=torch.float64, device=device)
        gathered = accelerator.gather(rows).cpu().tolist()
        merged = {int(row[0]): ProbeReply(round=round_index, client=int(row[0]), scalars=row[1:]) for row in gathered}
        if len(merged) != len(gathered):
            raise RuntimeError(
                f"Round {round_index}: {len(gathered)} replies from {len(merged)} distinct clients; a client id was "
                "reported by two processes, so their batches were not the sampler's (check dispatch_batches)."
            )
        return merged

    def reduce_mean(self, tensor: torch.Tensor) -> torch.Tensor:
        accelerator = self.trainer.accelerator
        if accelerator.num_processes == 1:
            return tensor
        return accelerator.reduce(tensor.to(self.trainer.args.device), reduction="mean").cpu()

    def non_finite_client_update(self, round_index: int, what: str) -> None:
        if self.trainer.accelerator.scaler is not None:
            self._overflow = f"{what} (fp16 loss-scale overflow)"
            return None
        return super().non_finite_client_update(round_index, what)

    def close(self, plan: Any, replies: Any) -> Any:
        if self._overflow is not None:
            self._round_cuts, self._round_losses, self._grads_from = {}, {}, []
            return None
        return super().close(plan, replies)

    def step(self) -> None:
        """The Trainer's loop takes the step (clipping, optimizer, scheduler) after the round's last batch."""

    def step_skipped(self) -> str | None:
        reason, self._overflow = self._overflow, None
        if reason is not None:
            return reason
        if self.trainer._server_step_skipped():
            return SCALER_SKIPPED
        return None

    def learning_rate(self) -> float:
        scheduler = self.trainer.lr_scheduler
        return scheduler.get_last_lr()[0] if scheduler is not None else math.nan

    def zero_grad(self) -> None:
        self.trainer.optimizer.zero_grad(set_to_none=True)
