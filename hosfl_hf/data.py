"""Datasets named the way TRL's scripts name them (`dataset_name`, `dataset_config`, `dataset_*_split`): a Hub id, a
local folder or a local file, loaded with `datasets.load_dataset`.

A local folder is read split by split from `<folder>/<split>.<ext>` (`jsonl`, `json`, `csv`, `parquet`, `txt`) when
such a file exists, so that other files in the folder (raw downloads, notes) are never mixed in; otherwise the folder
goes to `load_dataset` as is (its own split detection). A local file is one split, named like the file's stem or
`"train"`.
"""

from __future__ import annotations

import os
from typing import Any

import datasets

__all__ = ["load_split"]

# File extension -> the `datasets` builder that reads it.
FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}


def load_split(
    dataset_name: str, split: str, dataset_config: str | None = None, limit: int | None = None, seed: int = 0
) -> datasets.Dataset:
    """One split of a dataset, as a `datasets.Dataset`.

    Args:
        dataset_name (`str`): a Hub id, a local folder (holding e.g. `train.jsonl` and `test.jsonl`) or a local file.
        split (`str`): the split, e.g. `"train"`, `"test"` or `"validation"`.
        dataset_config (`str`, *optional*): the dataset's configuration (subset) name, e.g. `"sst2"` of `"glue"`.
        limit (`int`, *optional*): keep a fixed random subset of this many examples (shuffled with `seed`).
        seed (`int`, defaults to `0`): seed of that subset.

    Raises:
        `ValueError`: the split does not exist (the error lists the ones that do) or is empty.
    """
    empty = ValueError(f"Split {split!r} of {dataset_name} is empty: point the split argument at a split with data.")
    path = dataset_name
    if os.path.isdir(dataset_name):
        candidates = (os.path.join(dataset_name, f"{split}{ext}") for ext in FILE_BUILDERS)
        found = [candidate for candidate in candidates if os.path.isfile(candidate)]
        path = found[0] if found else None
    if path is not None and os.path.isfile(path):
        if os.path.getsize(path) == 0:  # `datasets` cannot even infer the columns of an empty file
            raise empty
        dataset = datasets.load_dataset(_builder(path), data_files={split: path}, split=split)
    else:
        dataset = _load_named(dataset_name, dataset_config, split)
    if len(dataset) == 0:
        raise empty
    if limit is not None and limit < len(dataset):
        dataset = dataset.shuffle(seed=seed).select(range(limit))
    return dataset


def _builder(path: str) -> str:
    ext = os.path.splitext(path)[1].lower()
    if ext not in FILE_BUILDERS:
        raise ValueError(f"{path}: unknown file type {ext!r}; use one of {sorted(FILE_BUILDERS)}.")
    return FILE_BUILDERS[ext]


def _load_named(dataset_name: str, dataset_config: str | None, split: str) -> Any:
    try:
        return datasets.load_dataset(dataset_name, dataset_config, split=split)
    except ValueError as error:  # `datasets` names an unknown split with a ValueError listing the known ones
        if "split" in str(error).lower():
            raise ValueError(
                f"{dataset_name} has no split {split!r} ({error}); set dataset_train_split / dataset_test_split."
            ) from error
        raise
