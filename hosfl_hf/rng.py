"""Every seed derivation of HO-SFL, under one versioned specification (`RNG_SPEC`).

Round seeds, client sampling, client batches, dataset shards and the perturbation directions are all pure functions
of integer keys, mixed with SplitMix64 into the seed of an explicit generator; the global RNG is never touched.

Specification (version 2):

* `mix(k_1, ..., k_n)`: `state = 0; for k in keys: state = splitmix64(state ^ splitmix64(k))` (64-bit).
* round seeds: `torch.randint(0, 2**62, (P,), generator=cpu_generator(splitmix64(seed ^ splitmix64(round))))`.
* per-client seeds of client `c` in round `r` (`client_seeds="per_client"`, FedKSeed-style):
  `torch.randint(0, 2**62, (P,), generator=cpu_generator(mix(seed, 3, r, c)))`.
* client sampling of round `r`: `torch.randperm(M, generator=cpu_generator(mix(seed, 1, r)))[:K]`.
* batch of client `c` in round `r`: `torch.randperm(len(shard), generator=cpu_generator(mix(seed, 2, r, c)))[:B]`.
* IID shards: `torch.randperm(N, generator=cpu_generator(mix(seed, 0)))`, dealt round-robin.
* Dirichlet shards: `numpy.random.default_rng(seed)` (`shuffle` + `dirichlet` per class).
* direction of parameter `j` under perturbation seed `s`: `torch.randn(shape, dtype=float32,
  generator=cpu_generator(splitmix64(s ^ splitmix64(j))))`, cast to the parameter's dtype and moved to its device.
* guide coefficient of perturbation seed `s` (a mask's guided directions, [`hosfl_hf.search_space.ClientMask`]):
  `torch.randn((), dtype=float32, generator=cpu_generator(splitmix64(s ^ splitmix64(2**64 - 1))))`, the key that no
  parameter index takes; the directions of unguided runs do not change.

What bit-identity depends on. The integer derivations are exact everywhere. The Gaussian draws come from torch's CPU
normal sampler, whose stream torch does not promise to keep across releases, and the optimizer arithmetic that
applies them runs on the parameters' device in their dtype. So two holders of the client part compute the same bits
when they run the same torch release (the local build tag, e.g. `+cpu` or `+cu126`, does not matter: directions are
always drawn on the CPU), the same device type and the same parameter dtypes. [`environment`] records these three
facts; trajectories carry them and replay/catch-up refuse a mismatch (see `docs/concepts.md`, "The RNG contract").
"""

from __future__ import annotations

import functools
from collections.abc import Iterable

import numpy as np
import torch

__all__ = [
    "RNG_SPEC",
    "check_environment",
    "cpu_generator",
    "direction",
    "direction_seed",
    "environment",
    "guide_coefficient",
    "mix",
    "numpy_generator",
    "rng_spec",
    "client_round_seeds",
    "round_seeds",
    "splitmix64",
]

RNG_SPEC = {
    "version": 2,
    "generator": "torch.Generator('cpu')",
    "distribution": "standard normal, float32, cast to parameter dtype",
    "seed_mixing": "splitmix64(seed ^ splitmix64(parameter_index))",
    "scope": "bit-identical for the same torch release, device type and parameter dtypes",
}
# Version 3: version 2 plus the guide coefficient of a guided mask's directions; recorded only by guided runs, so that
# a hosfl_hf without guides refuses their trajectories instead of replaying them without the guide.
GUIDED_RNG_SPEC = {
    **RNG_SPEC,
    "version": 3,
    "guide": "eta(s) = randn((), float32, generator=cpu_generator(splitmix64(s ^ splitmix64(2**64 - 1))))",
}
# Version 1 drew the same directions; it recorded no environment, so replay cannot check it.
SUPPORTED_VERSIONS = (1, 2, 3)

_MASK64 = (1 << 64) - 1
# The guide coefficient's key in place of a parameter index (no parameter has this index).
GUIDE_INDEX = _MASK64


def rng_spec(guided: bool = False) -> dict[str, object]:
    """The RNG specification a run records: [`RNG_SPEC`] (version 2), or version 3 when its mask guides the
    directions."""
    return dict(GUIDED_RNG_SPEC if guided else RNG_SPEC)


def splitmix64(x: int) -> int:
    """One SplitMix64 step: a 64-bit mixing function (Steele, Lea and Flood, 2014)."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def mix(*keys: int) -> int:
    """Mixes integer keys into one 64-bit seed (order matters)."""
    state = 0
    for key in keys:
        state = splitmix64(state ^ splitmix64(key & _MASK64))
    return state


def cpu_generator(seed: int) -> torch.Generator:
    """A fresh CPU `torch.Generator` seeded with `seed`."""
    return torch.Generator("cpu").manual_seed(seed & _MASK64)


def numpy_generator(seed: int) -> np.random.Generator:
    """A numpy `Generator` (for the Dirichlet shards: torch has no seeded Dirichlet sampler)."""
    return np.random.default_rng(seed)


def direction_seed(seed: int, index: int) -> int:
    """Seed of the generator for parameter `index` under perturbation seed `seed` (SplitMix64 mixing)."""
    return splitmix64((seed & _MASK64) ^ splitmix64(index))


def direction(param: torch.Tensor, seed: int, index: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The Gaussian direction `u` for one parameter tensor: an fp32 draw on the CPU, cast to `dtype` (default: the
    parameter's dtype) and moved to the parameter's device."""
    u = torch.randn(param.shape, generator=cpu_generator(direction_seed(seed, index)), dtype=torch.float32)
    return u.to(device=param.device, dtype=dtype or param.dtype)


@functools.lru_cache(maxsize=4096)  # one draw per seed, asked for by every masked tensor that the seed perturbs
def guide_coefficient(seed: int) -> float:
    """The standard normal coefficient `eta(seed)` of the guide vector in the directions of perturbation seed `seed`
    (one draw per seed, shared by every masked tensor; see [`hosfl_hf.zeroth_order.DirectionGuide`])."""
    draw = torch.randn((), generator=cpu_generator(direction_seed(seed, GUIDE_INDEX)), dtype=torch.float32)
    return float(draw)


def round_seeds(base_seed: int, round_index: int, num_perturbations: int) -> list[int]:
    """The `num_perturbations` perturbation seeds the server broadcasts in round `round_index`."""
    generator = cpu_generator(splitmix64((base_seed & _MASK64) ^ splitmix64(round_index)))
    return torch.randint(0, 2**62, (num_perturbations,), generator=generator).tolist()


def client_round_seeds(base_seed: int, round_index: int, client: int, num_perturbations: int) -> list[int]:
    """The `num_perturbations` perturbation seeds of client `client` in round `round_index` when every client probes
    its own directions (`client_seeds="per_client"`): the round then has `K * P` distinct directions."""
    generator = cpu_generator(mix(base_seed, 3, round_index, client))
    return torch.randint(0, 2**62, (num_perturbations,), generator=generator).tolist()


def _release(version: str) -> str:
    return version.split("+")[0]


def environment(parameters: Iterable[torch.Tensor]) -> dict[str, object]:
    """What the bit-identity of a client trajectory depends on, read off the client's trainable parameters."""
    params = list(parameters)
    return {
        "torch": _release(torch.__version__),
        "device_type": sorted({p.device.type for p in params}),
        "dtypes": sorted({str(p.dtype).removeprefix("torch.") for p in params}),
    }


def check_environment(recorded: dict[str, object] | None, parameters: Iterable[torch.Tensor], what: str) -> None:
    """Raises if `parameters` would not reproduce a trajectory recorded in environment `recorded`.

    Args:
        recorded: the trajectory's `environment` record (`None` for version-1 trajectories, which are not checked).
        parameters: the trainable client parameters that will apply the trajectory.
        what: names the operation in the error message.

    Raises:
        `ValueError`: naming each fact that differs and how to fix it.
    """
    if recorded is None:
        return
    current = environment(parameters)
    fixes = {
        "torch": "install the same torch release as the trainer",
        "device_type": "move the model to the same device type as the trainer",
        "dtypes": "load the model (or its adapters) in the trainer's dtype",
    }
    problems = [
        f"{key}: recorded {recorded.get(key)!r}, here {current[key]!r} ({fixes[key]})"
        for key in fixes
        if key in recorded and recorded[key] != current[key]
    ]
    if problems:
        raise ValueError(
            f"Cannot {what} bit-identically: the trajectory was recorded in another environment; "
            + "; ".join(problems)
            + ". Directions come from torch's CPU normal sampler and the update runs on the parameters' device in "
            "their dtype (RNG_SPEC['scope'])."
        )
