"""Classification tasks as prompt + verbalizer (SST-2, RTE), loaded with `datasets` from local JSONL files.

A sentence becomes a prompt (e.g. `"Review: <sentence>\\nSentiment:"`); the prediction is the verbalizer token
(`" negative"` / `" positive"`) with the larger next-token logit at the last position, and the loss is the
cross-entropy of that position over the verbalizer tokens only. Batches are left-padded so the last position is
the same for every row, which lets the model compute logits for that position only (`logits_to_keep=1`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import datasets
import numpy as np
import torch
import torch.nn.functional as F
from transformers import PreTrainedTokenizerBase

from .metrics import load_accuracy

__all__ = ["TASKS", "ClassificationTask", "VerbalizerCollator", "VerbalizerLoss", "default_data_dir", "get_task"]


def default_data_dir() -> str:
    """Folder holding `<task>/{train,validation}.jsonl`: `$HOSFL_DATA_DIR`, else `../shared/data` from here."""
    if os.environ.get("HOSFL_DATA_DIR"):
        return os.environ["HOSFL_DATA_DIR"]
    for base in (os.getcwd(), os.path.dirname(os.path.dirname(os.path.abspath(__file__)))):
        candidate = os.path.join(os.path.dirname(base), "shared", "data")
        if os.path.isdir(candidate):
            return candidate
    return os.path.join(os.getcwd(), "data")


@dataclass
class VerbalizerLoss:
    """Cross-entropy of the last position's logits restricted to the verbalizer tokens (`compute_loss_func`)."""

    token_ids: list[int]

    def __call__(self, outputs: Any, labels: torch.Tensor, num_items_in_batch: Any = None) -> torch.Tensor:
        logits = outputs.logits[:, -1, self.token_ids].float()
        return F.cross_entropy(logits, labels)


@dataclass
class VerbalizerCollator:
    """Left-pads tokenized prompts and asks the model for the last position's logits only."""

    tokenizer: PreTrainedTokenizerBase

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        labels = torch.tensor([f["labels"] for f in features], dtype=torch.long)
        inputs = [{"input_ids": f["input_ids"]} for f in features]
        batch = self.tokenizer.pad(inputs, padding=True, padding_side="left", return_tensors="pt")
        return {
            "input_ids": batch["input_ids"],
            "attention_mask": batch["attention_mask"],
            "labels": labels,
            "logits_to_keep": 1,
        }


@dataclass
class ClassificationTask:
    """A GLUE-style classification task phrased as next-token prediction.

    Args:
        name: task name, also the data folder name.
        template: prompt with `{column}` placeholders.
        verbalizers: one word per class (class `i` -> `verbalizers[i]`), each a single token with a leading space.
    """

    name: str
    template: str
    verbalizers: tuple[str, ...]

    def load(self, split: str = "train", data_dir: str | None = None, limit: int | None = None, seed: int = 0):
        """The split as a `datasets.Dataset` read from `<data_dir>/<name>/<split>.jsonl`.

        `limit` keeps a fixed random subset (seeded), e.g. the evaluation subset of a short run.
        """
        path = os.path.join(data_dir or default_data_dir(), self.name, f"{split}.jsonl")
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"{path} not found: pass data_dir (or set HOSFL_DATA_DIR) to the folder holding "
                f"{self.name}/{split}.jsonl."
            )
        dataset = datasets.load_dataset("json", data_files={split: path}, split=split)
        if limit is not None and limit < len(dataset):
            dataset = dataset.shuffle(seed=seed).select(range(limit))
        return dataset

    def prompt(self, example: dict[str, Any]) -> str:
        return self.template.format(**{k: v.strip() if isinstance(v, str) else v for k, v in example.items()})

    def verbalizer_ids(self, tokenizer: PreTrainedTokenizerBase) -> list[int]:
        ids = []
        for word in self.verbalizers:
            tokens = tokenizer(word, add_special_tokens=False)["input_ids"]
            if len(tokens) != 1:
                raise ValueError(f"Verbalizer {word!r} is {len(tokens)} tokens for this tokenizer; it must be one.")
            ids.append(tokens[0])
        return ids

    def tokenize(self, dataset: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, max_length: int = 128):
        """Adds `input_ids` (prompt, truncated from the left to `max_length`) and `labels` (class index)."""
        label_column = "label" if "label" in dataset.column_names else "labels"

        def encode(example: dict[str, Any]) -> dict[str, Any]:
            ids = tokenizer(self.prompt(example))["input_ids"][-max_length:]
            return {"input_ids": ids, "labels": int(example[label_column])}

        keep = [c for c in ("label",) if c in dataset.column_names]
        return dataset.map(encode, remove_columns=[c for c in dataset.column_names if c not in keep])

    def trainer_kwargs(self, tokenizer: PreTrainedTokenizerBase) -> dict[str, Callable]:
        """`data_collator`, `compute_loss_func`, `preprocess_logits_for_metrics` and `compute_metrics` for a
        [`HOSFLTrainer`] (or a plain `Trainer` with the same loss)."""
        token_ids = self.verbalizer_ids(tokenizer)
        accuracy = load_accuracy()

        def preprocess_logits_for_metrics(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            return logits[:, -1, token_ids]

        def compute_metrics(eval_pred: Any) -> dict[str, float]:
            logits, labels = eval_pred
            return accuracy.compute(predictions=np.argmax(logits, axis=-1), references=labels)

        return {
            "data_collator": VerbalizerCollator(tokenizer),
            "compute_loss_func": VerbalizerLoss(token_ids),
            "preprocess_logits_for_metrics": preprocess_logits_for_metrics,
            "compute_metrics": compute_metrics,
        }


TASKS: dict[str, ClassificationTask] = {
    "sst2": ClassificationTask("sst2", "Review: {sentence}\nSentiment:", (" negative", " positive")),
    "rte": ClassificationTask(
        "rte", "{sentence1}\nQuestion: {sentence2} True or False?\nAnswer:", (" True", " False")
    ),
}


def get_task(name: str) -> ClassificationTask:
    """The registered task `name` (`"sst2"` or `"rte"`)."""
    if name not in TASKS:
        raise ValueError(f"Unknown task {name!r}; available: {sorted(TASKS)}.")
    return TASKS[name]
