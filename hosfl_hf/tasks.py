"""Classification tasks as prompt + verbalizer, on any dataset `datasets` can load (a Hub id, a local folder or file);
SST-2 and RTE are presets read from local JSONL files.

A sentence becomes a prompt (e.g. `"Review: <sentence>\\nSentiment:"`); the prediction is the verbalizer token
(`" negative"` / `" positive"`) with the larger next-token logit at the last position, and the loss is the
cross-entropy of that position over the verbalizer tokens only. Batches are left-padded so the last position is
the same for every row, which lets the model compute logits for that position only (`logits_to_keep=1`).
"""

from __future__ import annotations

import os
import string
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import datasets
import numpy as np
import torch
import torch.nn.functional as F
from transformers import PreTrainedTokenizerBase

from .metrics import load_accuracy

__all__ = [
    "TASKS",
    "ClassificationTask",
    "VerbalizerCollator",
    "VerbalizerLoss",
    "default_data_dir",
    "get_task",
    "template_columns",
]


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


def template_columns(template: str) -> list[str]:
    """The dataset columns a prompt template reads: `"Review: {text}\\nSentiment:"` -> `["text"]`."""
    names = []
    for _, field_name, _, _ in string.Formatter().parse(template):
        if field_name:
            name = field_name.split(".")[0].split("[")[0]
            if name not in names:
                names.append(name)
    return names


@dataclass
class ClassificationTask:
    """A text classification task phrased as next-token prediction: a prompt template over the dataset's columns and
    one verbalizer word per class.

    Args:
        name: task name (in logs and the model card); for a preset, also the folder `<data_dir>/<name>`.
        template: prompt with `{column}` placeholders, e.g. `"Review: {sentence}\\nSentiment:"`.
        verbalizers: one word per class (class `i` -> `verbalizers[i]`), each a single token for the tokenizer
            (usually with a leading space). Empty: taken from the label column's `ClassLabel` names (or, for string
            labels, their sorted values), each with a leading space (see [`~ClassificationTask.with_verbalizers_of`]).
        label_column: the column holding the class: an int class id or a string equal to a verbalizer (without its
            leading space).
        dataset_name: a Hub id, a local folder or a local file (`hosfl_hf.data.load_split`); `None` for a preset,
            read from `<data_dir>/<name>/<split>.jsonl`.
        dataset_config: the dataset's configuration name.
        train_split, test_split: the splits trained and evaluated on.
    """

    name: str
    template: str
    verbalizers: tuple[str, ...] = ()
    label_column: str = "label"
    dataset_name: str | None = None
    dataset_config: str | None = None
    train_split: str = "train"
    test_split: str = "validation"

    def load(self, split: str = "train", data_dir: str | None = None, limit: int | None = None, seed: int = 0):
        """The split as a `datasets.Dataset`: from `dataset_name`, or for a preset from
        `<data_dir>/<name>/<split>.jsonl`.

        `limit` keeps a fixed random subset (seeded), e.g. the evaluation subset of a short run.
        """
        from .data import load_split

        if self.dataset_name is not None:
            return load_split(self.dataset_name, split, self.dataset_config, limit, seed)
        path = os.path.join(data_dir or default_data_dir(), self.name, f"{split}.jsonl")
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"{path} not found: pass data_dir (or set HOSFL_DATA_DIR) to the folder holding "
                f"{self.name}/{split}.jsonl."
            )
        return load_split(path, split, limit=limit, seed=seed)

    def with_verbalizers_of(self, dataset: datasets.Dataset) -> ClassificationTask:
        """This task with verbalizers taken from `dataset` when none are set: the names of a `ClassLabel` label
        column, else the sorted distinct string labels, each with a leading space (`"positive"` -> `" positive"`)."""
        if self.verbalizers:
            return self
        self._check_label_column(dataset)
        feature = dataset.features[self.label_column]
        if isinstance(feature, datasets.ClassLabel):
            names = feature.names
        elif _is_string(feature):
            names = sorted(set(dataset[self.label_column]))
        else:
            raise ValueError(
                f"The label column {self.label_column!r} holds class ids without names: pass one verbalizer per class "
                "(--verbalizers ' negative' ' positive', in class order)."
            )
        return replace(self, verbalizers=tuple(n if n[:1].isspace() else f" {n}" for n in names))

    def check(self, dataset: datasets.Dataset, split: str = "dataset") -> None:
        """Raises a `ValueError` naming the problem when the template reads a column `dataset` lacks, the label
        column is missing, or a label is outside the verbalizers' classes."""
        if not self.verbalizers:
            raise ValueError(f"Task {self.name!r} has no verbalizers: pass one word per class (--verbalizers).")
        missing = [c for c in template_columns(self.template) if c not in dataset.column_names]
        if missing:
            raise ValueError(
                f"The prompt template {self.template!r} reads column(s) {missing}, which the {split} split does not "
                f"have; its columns are {dataset.column_names}. Fix --prompt_template."
            )
        self._check_label_column(dataset)
        labels = set(dataset[self.label_column])
        bad = sorted((label for label in labels if self._label_index(label) is None), key=str)
        if bad:
            n = len(self.verbalizers)
            raise ValueError(
                f"The {split} split has labels {bad[:10]} in column {self.label_column!r} outside the {n} classes of "
                f"the verbalizers {list(self.verbalizers)} (class ids 0..{n - 1}, or strings equal to a verbalizer "
                "without its leading space). Pass one verbalizer per class, in class order, or drop unlabeled rows "
                "(GLUE's test splits use -1)."
            )

    def _check_label_column(self, dataset: datasets.Dataset) -> None:
        if self.label_column not in dataset.column_names:
            raise ValueError(
                f"The dataset has no label column {self.label_column!r}; its columns are {dataset.column_names}. "
                "Set --label_column."
            )

    def _label_index(self, label: Any) -> int | None:
        if isinstance(label, str):
            words = [v.strip() for v in self.verbalizers]
            return words.index(label.strip()) if label.strip() in words else None
        if isinstance(label, (bool, np.bool_)) or not isinstance(label, (int, np.integer)):
            return None
        return int(label) if 0 <= label < len(self.verbalizers) else None

    def prompt(self, example: dict[str, Any]) -> str:
        return self.template.format(**{k: v.strip() if isinstance(v, str) else v for k, v in example.items()})

    def verbalizer_ids(self, tokenizer: PreTrainedTokenizerBase) -> list[int]:
        """The token id of each verbalizer. Raises a `ValueError` for a verbalizer that is not one token."""
        ids = []
        for word in self.verbalizers:
            tokens = tokenizer(word, add_special_tokens=False)["input_ids"]
            if len(tokens) != 1:
                hint = ""
                if not word[:1].isspace():
                    spaced = tokenizer(f" {word}", add_special_tokens=False)["input_ids"]
                    ok = "is one token" if len(spaced) == 1 else f"is {len(spaced)} tokens too"
                    hint = f" With a leading space, {' ' + word!r} {ok}: words after a prompt usually need one."
                raise ValueError(
                    f"Verbalizer {word!r} is {len(tokens)} tokens for this tokenizer; each verbalizer must be one "
                    f"token.{hint} Choose single-token words (--verbalizers)."
                )
            if tokenizer.unk_token_id is not None and tokens[0] == tokenizer.unk_token_id:
                raise ValueError(
                    f"Verbalizer {word!r} is the unknown token {tokenizer.unk_token!r} for this tokenizer."
                    + (f" Try {' ' + word!r}, with a leading space." if not word[:1].isspace() else "")
                )
            ids.append(tokens[0])
        if len(set(ids)) != len(ids):
            raise ValueError(f"Verbalizers {list(self.verbalizers)} share a token: each class needs its own token.")
        return ids

    def tokenize(self, dataset: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, max_length: int = 128):
        """Adds `input_ids` (prompt, truncated from the left to `max_length`) and `labels` (class index), after
        [`~ClassificationTask.check`]. The label column is kept under the name `label` (for a Dirichlet
        partition)."""
        label_column = self.label_column
        if label_column not in dataset.column_names and "labels" in dataset.column_names:
            label_column = "labels"  # an already-renamed column
        task = replace(self, label_column=label_column)
        task.check(dataset)

        def encode(example: dict[str, Any]) -> dict[str, Any]:
            ids = tokenizer(task.prompt(example))["input_ids"][-max_length:]
            label = task._label_index(example[label_column])
            return {"input_ids": ids, "labels": label, "label": label}

        return dataset.map(encode, remove_columns=dataset.column_names)

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


def _is_string(feature: Any) -> bool:
    return isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")


def get_task(name: str) -> ClassificationTask:
    """The registered preset `name` (`"sst2"` or `"rte"`)."""
    if name not in TASKS:
        raise ValueError(f"Unknown task {name!r}; available: {sorted(TASKS)}.")
    return TASKS[name]
