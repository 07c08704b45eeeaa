"""Federation in one process: client shards of a dataset, seeded client sampling, and what crosses the wire.

One HO-SFL round = `clients_per_round` client batches. [`FederatedRoundSampler`] yields their indices round after
round, so the `Trainer`'s own dataloader produces the round's client batches as consecutive micro-batches. Every
draw is a pure function of `(seed, round)`, which makes a run resumable from any round.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Sampler

from .rng import cpu_generator, mix, numpy_generator

__all__ = ["FederatedRoundSampler", "RoundTraffic", "partition_dataset", "sample_clients", "tensor_bytes"]


def partition_dataset(
    labels: Sequence[int] | None,
    num_examples: int,
    num_clients: int,
    scheme: str = "iid",
    alpha: float = 1.0,
    seed: int = 0,
    min_size: int = 1,
) -> list[list[int]]:
    """Splits example indices into `num_clients` shards.

    Args:
        labels: per-example class labels (needed for `"dirichlet"`).
        num_examples: dataset size.
        num_clients: number of shards `M`.
        scheme: `"iid"` (uniform random shards of equal size) or `"dirichlet"` (per class, the share of each client
            is drawn from `Dirichlet(alpha)`: small `alpha` gives label-skewed clients).
        alpha: Dirichlet concentration.
        seed: seed of the partition.
        min_size: every shard must hold at least this many examples (one batch).

    Raises:
        `ValueError`: if the dataset is too small for `num_clients` shards of `min_size` examples.
    """
    if num_examples < num_clients * min_size:
        raise ValueError(
            f"The training set has {num_examples} examples, too few for {num_clients} clients with a batch of "
            f"{min_size} each: lower num_clients or per_device_train_batch_size."
        )
    if scheme == "iid":
        order = torch.randperm(num_examples, generator=cpu_generator(mix(seed, 0))).tolist()
        return [sorted(order[c::num_clients]) for c in range(num_clients)]
    if scheme != "dirichlet":
        raise ValueError(f"partition must be 'iid' or 'dirichlet', got {scheme!r}.")
    if labels is None:
        raise ValueError("A Dirichlet partition needs the per-example labels of partition_column.")
    labels_arr = np.asarray(labels)
    rng = numpy_generator(seed)
    for _ in range(100):
        shards: list[list[int]] = [[] for _ in range(num_clients)]
        for cls in np.unique(labels_arr):
            idx = np.flatnonzero(labels_arr == cls)
            rng.shuffle(idx)
            shares = rng.dirichlet(np.full(num_clients, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(int)
            for c, part in enumerate(np.split(idx, cuts)):
                shards[c].extend(part.tolist())
        if min(len(s) for s in shards) >= min_size:
            return [sorted(s) for s in shards]
    raise ValueError(
        f"Could not draw a Dirichlet(alpha={alpha}) partition where every one of the {num_clients} clients holds at "
        f"least {min_size} examples: raise dirichlet_alpha or lower num_clients / per_device_train_batch_size."
    )


def sample_clients(seed: int, round_index: int, num_clients: int, clients_per_round: int) -> list[int]:
    """The `K` distinct clients the server samples in round `round_index`."""
    return torch.randperm(num_clients, generator=cpu_generator(mix(seed, 1, round_index)))[:clients_per_round].tolist()


class FederatedRoundSampler(Sampler[int]):
    """Yields, round after round, the indices of the sampled clients' batches (`batch_size` each, consecutive).

    With `DataLoader(batch_size=batch_size, sampler=this)` each batch is one client's batch and each run of
    `clients_per_round` batches is one round. Round `r` of epoch `e` is global round
    `start_round + e * rounds_per_epoch + r`.

    Args:
        shards: example indices of each client.
        clients_per_round: `K`.
        batch_size: examples per client batch.
        seed: seed of the client sampling and of the batches.
        rounds_per_epoch: rounds per pass; defaults to one pass over the data.
        start_round: global id of the first round (a second `train()` continues after the rounds already run).
    """

    def __init__(
        self,
        shards: list[list[int]],
        clients_per_round: int,
        batch_size: int,
        seed: int,
        rounds_per_epoch: int | None = None,
        start_round: int = 0,
    ):
        self.shards = shards
        self.clients_per_round = clients_per_round
        self.batch_size = batch_size
        self.seed = seed
        total = sum(len(s) for s in shards)
        self.rounds_per_epoch = rounds_per_epoch or max(1, total // (clients_per_round * batch_size))
        self.start_round = start_round
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.rounds_per_epoch * self.clients_per_round * self.batch_size

    def clients(self, round_index: int) -> list[int]:
        return sample_clients(self.seed, round_index, len(self.shards), self.clients_per_round)

    def client_batch(self, round_index: int, client: int) -> list[int]:
        shard = self.shards[client]
        generator = cpu_generator(mix(self.seed, 2, round_index, client))
        pick = torch.randperm(len(shard), generator=generator)[: self.batch_size]
        return [shard[i] for i in pick.tolist()]

    def __iter__(self) -> Iterator[int]:
        start = self.start_round + self.epoch * self.rounds_per_epoch
        for round_index in range(start, start + self.rounds_per_epoch):
            for client in self.clients(round_index):
                yield from self.client_batch(round_index, client)


def tensor_bytes(*tensors: Any) -> int:
    """Bytes of the tensors' data (entries that are not tensors, e.g. `None` labels, count 0)."""
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


@dataclass
class RoundTraffic:
    """Bytes one client exchanges with the server in one round, counted from the tensors that would be sent.

    `activation_bytes`: cut activations and labels up, lambda down. `sync_bytes`: model synchronisation, i.e. the
    `P` seeds down, the client's `P` scalars up and the `P` averaged scalars down.
    """

    activation_bytes: int = 0
    sync_bytes: int = 0

    @staticmethod
    def hybrid_order(cut_bytes: int, label_bytes: int, cotangent_bytes: int, num_perturbations: int) -> RoundTraffic:
        seeds = torch.zeros(num_perturbations, dtype=torch.int64)
        scalars = torch.zeros(num_perturbations, dtype=torch.float32)
        sync = seeds.numel() * seeds.element_size() + 2 * scalars.numel() * scalars.element_size()
        return RoundTraffic(activation_bytes=cut_bytes + label_bytes + cotangent_bytes, sync_bytes=sync)
