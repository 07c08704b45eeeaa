"""Centralized evaluation of a Flower run: the full model on a held-out set the server holds (run-config
`eval-dataset`), after every `eval-every` rounds and after the last one.

The server holds only the server part; the full model is the run's initial model with the client part replayed from
the server's trajectory (`replay_trajectory`, seeds and scalars only: no forward pass, no client data) and the
server's current weights copied in, exactly what the run saves at the end. So the evaluation needs no client to take
part and costs no traffic. Metrics, named as `Trainer.evaluate` names them:

- `eval-task=""`: rows of `input_ids` and `labels` (the training format): `eval_loss`, the mean next-token
  cross-entropy over the label tokens (`-100` carries no loss), and `eval_perplexity = exp(eval_loss)`.
- `eval-task="sst2"` (any task of `hosfl_hf.tasks.TASKS`): the task's raw rows (e.g. SST-2's `sentence`, `label`),
  prompted and tokenized with the model folder's tokenizer; `eval_accuracy`, the share of rows whose verbalizer
  token has the largest last-position logit, and `eval_loss`, the cross-entropy over the verbalizer tokens.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...named_tensors import copy_named_tensors
from ...split import unwrap_causal_lm
from ...trajectory import replay_trajectory

__all__ = ["CentralEvaluator", "EvalSet", "evaluate_model", "load_eval_set", "with_server_weights"]


class EvalSet:
    """A held-out set ready to evaluate: its rows, the collator that batches them, and (for a classification task)
    the verbalizer token ids; `verbalizer_ids is None` means a language-modelling loss."""

    def __init__(self, rows: Any, collator: Callable, batch_size: int, verbalizer_ids: list[int] | None = None):
        if len(rows) == 0:
            raise ValueError("The evaluation set is empty: give run-config 'eval-dataset' a file with rows.")
        self.rows, self.collator, self.batch_size, self.verbalizer_ids = rows, collator, batch_size, verbalizer_ids

    def batches(self):
        for start in range(0, len(self.rows), self.batch_size):
            yield self.collator([self.rows[i] for i in range(start, min(start + self.batch_size, len(self.rows)))])


def load_eval_set(config: Mapping[str, Any]) -> EvalSet | None:
    """The run config's held-out set (`eval-dataset`, `eval-task`, `eval-batch-size`); `None` without one."""
    path = str(config.get("eval-dataset") or "")
    if not path:
        if int(config.get("eval-every") or 0) > 0 or config.get("eval-task"):
            raise ValueError("Run-config 'eval-every'/'eval-task' need 'eval-dataset' (a JSON-lines file).")
        return None
    import datasets

    from .config import make_collator

    rows = datasets.load_dataset("json", data_files=path, split="train")
    batch_size = int(config["eval-batch-size"])
    name = str(config.get("eval-task") or "")
    if not name:
        missing = {"input_ids", "labels"} - set(rows.column_names)
        if missing:
            raise ValueError(
                f"eval-dataset {path} has no {sorted(missing)} column(s) (it has {rows.column_names}): give tokenized "
                "rows (input_ids, labels) as for training, or set 'eval-task' to a classification task for raw rows."
            )
        rows = rows.select_columns([c for c in ("input_ids", "labels", "attention_mask") if c in rows.column_names])
        return EvalSet(rows, make_collator(config), batch_size)
    from transformers import AutoTokenizer

    from ...tasks import VerbalizerCollator, get_task

    task = get_task(name)
    tokenizer = AutoTokenizer.from_pretrained(config["model"])
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    rows = task.tokenize(rows, tokenizer)
    return EvalSet(rows, VerbalizerCollator(tokenizer), batch_size, task.verbalizer_ids(tokenizer))


@torch.no_grad()
def evaluate_model(model: nn.Module, eval_set: EvalSet) -> dict[str, float]:
    """`eval_loss` and `eval_perplexity` (language modelling) or `eval_accuracy` and `eval_loss` (verbalizers) of
    `model` on `eval_set`, summed over the whole set before dividing (not a mean of batch means)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count, correct = 0.0, 0, 0
    try:
        for batch in eval_set.batches():
            batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            labels = batch.pop("labels")
            logits = model(**batch).logits.float()
            if eval_set.verbalizer_ids is None:
                logits, labels = logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten()
                total += float(F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum"))
                count += int((labels != -100).sum())
            else:
                scores = logits[:, -1, eval_set.verbalizer_ids]
                total += float(F.cross_entropy(scores, labels, reduction="sum"))
                correct += int((scores.argmax(-1) == labels).sum())
                count += len(labels)
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("The evaluation set has no label token (every label is -100).")
    loss = total / count
    if eval_set.verbalizer_ids is None:
        return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 700.0)), "eval_tokens": count}
    return {"eval_accuracy": correct / count, "eval_loss": loss, "eval_examples": count}


def with_server_weights(model: nn.Module, server: Any) -> nn.Module:
    """`model` with the server part's trained weights copied in (the server part's names are the causal LM's:
    `split_model` unwraps peft)."""
    copy_named_tensors(
        server.parameters,
        unwrap_causal_lm(model).named_parameters(),
        "the server's trained weights into the evaluated model",
        partial_target=True,
    )
    return model


class CentralEvaluator:
    """`FederatedRun(on_round=...)` hook: after every `every` rounds, evaluates the full model (the run's initial
    model + the client part replayed from the server's trajectory + the server's weights) on `eval_set` and adds
    the metrics to the round's record (so they reach the progress line, `flower_summary.json` and the reporters).

    Args:
        eval_set ([`EvalSet`]): the server's held-out set.
        base_model (`nn.Module`): the run's initial model (left untouched: each evaluation replays on a copy).
        server: the `SplitServer` (its `trajectory` and `parameters`).
        every (`int`): evaluate after rounds `every, 2 * every, ...` (1-based); 0: only [`final`].
    """

    def __init__(self, eval_set: EvalSet, base_model: nn.Module, server: Any, every: int = 0):
        if every < 0:
            raise ValueError(f"Run-config 'eval-every' must be >= 0 (0: only after the last round), got {every}.")
        self.eval_set, self.base_model, self.server, self.every = eval_set, base_model, server, every
        self.run: Any = None  # the FederatedRun, once built: its record holds the client part of some algorithms

    def full_model(self) -> nn.Module:
        """The full model as of the server's last applied round (what the run would save now)."""
        if self.run is not None:
            model = self.run.client_model(copy.deepcopy(self.base_model))
        else:
            model = replay_trajectory(copy.deepcopy(self.base_model), self.server.trajectory)
        return with_server_weights(model, self.server)

    def __call__(self, record: dict[str, Any]) -> None:
        if self.every > 0 and (record["round"] + 1) % self.every == 0:
            record.update(evaluate_model(self.full_model(), self.eval_set))

    def final(self, model: nn.Module) -> dict[str, float]:
        """The metrics of the trained model the run saves (`model`: the replayed client part; the server's weights
        are copied in here)."""
        return evaluate_model(with_server_weights(model, self.server), self.eval_set)
