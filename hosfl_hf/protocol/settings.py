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
    algorithm: str = "hosfl"
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
    client_zo_blocks: list[int] | None = None
    client_zo_modules: list[str] | None = None
    client_seeds: str = "shared"
    client_mask: dict[str, Any] | None = None
    cut_noise: float = 0.0
    cut_clip_norm: float | None = None
    cut_noise_seed: int | None = None

    def __post_init__(self):
        if self.client_seeds not in ("shared", "per_client"):
            raise ValueError(f"client_seeds={self.client_seeds!r} is invalid: use 'shared' or 'per_client'.")
        if self.client_seeds == "per_client" and self.aggregation != "mean":
            raise ValueError(
                f"client_seeds='per_client' with aggregation={self.aggregation!r}: each seed has one client's scalar, "
                "so there is nothing to take a median or trimmed mean of; use aggregation='mean' (and scalar_bound to "
                "clip each client's scalars), or client_seeds='shared'."
            )

    @property
    def search_space(self) -> Any:
        """The client's [`ClientSearchSpace`] (`None`: every trainable client parameter)."""
        from ..search_space import ClientSearchSpace

        if self.client_zo_blocks is None and self.client_zo_modules is None:
            return None
        return ClientSearchSpace(self.client_zo_blocks, self.client_zo_modules)

    @property
    def defense(self) -> Any:
        """The clients' [`~hosfl_hf.privacy.CutDefense`] on the cut (`cut_noise`, `cut_clip_norm`; the noise seed
        `cut_noise_seed` is meant for simulations: `None` draws every client's noise from OS entropy)."""
        from ..privacy.defense import CutDefense

        return CutDefense(self.cut_noise, self.cut_clip_norm, self.cut_noise_seed)

    @property
    def mask(self) -> Any:
        """The static [`ClientMask`] of client base weights, if any."""
        from ..search_space import ClientMask

        return ClientMask.from_dict(self.client_mask) if self.client_mask is not None else None

    @property
    def scalars_per_update(self) -> int | None:
        """How many seeds and scalars a round's update carries: `P` with shared seeds; with per-client seeds `P` per
        client that replied (`None`: not fixed)."""
        return self.num_perturbations if self.client_seeds == "shared" else None

    def probe_seeds(self, round_index: int, client: int) -> list[int]:
        """The perturbation seeds client `client` probes in round `round_index`: the round's shared seeds, or its
        own (`client_seeds="per_client"`)."""
        from ..rng import client_round_seeds, round_seeds

        if self.client_seeds == "per_client":
            return client_round_seeds(self.seed, round_index, client, self.num_perturbations)
        return round_seeds(self.seed, round_index, self.num_perturbations)

    def update_terms(self, client_scalars: Any, round_index: int) -> tuple[list[int], list[float]]:
        """The seeds and scalars of the round's client update, from every replying client's scalars.

        Shared seeds: the round's `P` seeds and the per-seed aggregate. Per-client seeds: the `K * P` seeds and
        scalars of the clients that replied, in increasing client id (each clipped to `scalar_bound` if set), so
        the update is `(1 / (K P mu)) sum_m sum_p v_mp u_mp`.
        """
        from ..aggregation import aggregate_scalars

        if self.client_seeds == "shared":
            return self.probe_seeds(round_index, 0), self.aggregate(client_scalars, round_index)
        seeds: list[int] = []
        scalars: list[float] = []
        for client in sorted(client_scalars):
            # The checks and the clipping of the aggregation, for one client's scalars.
            scalars += aggregate_scalars(
                {client: client_scalars[client]}, self.num_perturbations, "mean", 0.0, self.scalar_bound, round_index
            )
            seeds += self.probe_seeds(round_index, client)
        return seeds, scalars

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
    def from_args(cls, args: Any, split_layer: int | None = None, client_mask: Any = None) -> RoundSettings:
        """The settings of an [`HOSFLConfig`] (`split_layer` overrides `args.split_layer`; `client_mask`, a
        [`ClientMask`] or its dict, is the static mask chosen at set-up)."""
        values = {f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)}
        if client_mask is not None:
            values["client_mask"] = client_mask if isinstance(client_mask, dict) else client_mask.to_dict()
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

    def new_trajectory(self, client_targets: list[tuple[str, torch.Tensor]]) -> Any:
        """The empty [`Trajectory`] of a run with these settings over the client update's targets (what every
        holder's `ClientPart.parameters` are, in order): the one place a run's trajectory header is built."""
        from ..rng import environment, rng_spec
        from ..trajectory import Trajectory

        space, mask = self.search_space, self.mask
        return Trajectory(
            split_layer=self.split_layer,
            parameter_names=[n for n, _ in client_targets],
            zo_eps=self.zo_eps,
            client_optimizer=self.client_optimizer,
            client_weight_decay=self.client_weight_decay,
            environment=environment(p for _, p in client_targets),
            client_seeds=self.client_seeds,
            search_space=space.to_dict() if space is not None else None,
            client_mask=self.client_mask,
            rng=rng_spec(guided=mask is not None and mask.guide is not None),
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RoundSettings:
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})
