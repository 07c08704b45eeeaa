"""`RoundSettings`: what both sides of the protocol must agree on, taken from an [`HOSFLConfig`]."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

import torch

__all__ = ["RoundSettings"]


@dataclass(frozen=True)
class RoundSettings:
    """The split, federation and zeroth-order settings of a run, shared by the server and every client.

    Build it with `RoundSettings.from_args(hosfl_config)`; `to_dict`/`from_dict` carry it in a Flower run config or a
    JSON file. Field meanings are those of [`HOSFLConfig`]; `batch_size` is `per_device_train_batch_size`.
    """

    split_layer: int
    num_clients: int = 10
    clients_per_round: int = 3
    batch_size: int = 8
    partition: str = "iid"
    dirichlet_alpha: float = 1.0
    partition_column: str = "label"
    num_perturbations: int = 2
    zo_eps: float = 1e-3
    zo_estimator: str = "one_sided"
    client_optimizer: str = "adamw"
    client_learning_rate: float = 1e-5
    client_weight_decay: float = 0.0
    seed: int = 42
    data_seed: int | None = None
    mixed_precision: str = "no"
    aggregation: str = "mean"
    aggregation_trim_fraction: float = 0.2
    scalar_bound: float | None = None

    def aggregate(self, client_scalars: Any, round_index: int | None = None) -> list[float]:
        """The round's per-seed aggregate of the clients' scalars, by this run's rule."""
        from ..aggregation import aggregate_scalars

        return aggregate_scalars(
            client_scalars,
            self.num_perturbations,
            self.aggregation,
            self.aggregation_trim_fraction,
            self.scalar_bound,
            round_index,
        )

    @classmethod
    def from_args(cls, args: Any, split_layer: int | None = None) -> RoundSettings:
        """The settings of an [`HOSFLConfig`] (`split_layer` overrides `args.split_layer`)."""
        values = {f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)}
        values["split_layer"] = split_layer if split_layer is not None else args.split_layer
        values["batch_size"] = args.per_device_train_batch_size
        values["mixed_precision"] = "bf16" if args.bf16 else "fp16" if args.fp16 else "no"
        return cls(**values)

    @property
    def federation_seed(self) -> int:
        """Seed of the shards, the client sampling and the batches (`data_seed`, else `seed`)."""
        return self.data_seed if self.data_seed is not None else self.seed

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """The client's compute precision (the run's mixed precision), `None` for the weights' dtype."""
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.mixed_precision)

    def shards(self, dataset: Any) -> list[list[int]]:
        """The example indices of every client's shard (the same on the server, on every client and in the trainer)."""
        from ..federation import partition_dataset

        labels = dataset[self.partition_column] if self.partition == "dirichlet" else None
        return partition_dataset(
            labels,
            len(dataset),
            self.num_clients,
            self.partition,
            self.dirichlet_alpha,
            seed=self.federation_seed,
            min_size=self.batch_size,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RoundSettings:
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})
