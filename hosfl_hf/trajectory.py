"""The client trajectory: per round the seeds, the averaged scalars and the client learning rate.

It is all a holder of the client part needs to follow training (model sync costs `P` seeds + `P` scalars per round,
whatever the model size), and all a straggler needs to catch up: [`replay_trajectory`].
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

from .client_update import ClientUpdate
from .rng import RNG_SPEC, SUPPORTED_VERSIONS, check_environment
from .split import split_model
from .zeroth_order import build_client_optimizer

__all__ = ["TRAJECTORY_NAME", "ClientUpdate", "Trajectory", "replay_trajectory"]

TRAJECTORY_NAME = "hosfl_trajectory.json"


def __getattr__(name: str):
    if name == "TrajectoryRound":  # the trajectory's round was a second class of the same record
        import warnings

        warnings.warn("TrajectoryRound is deprecated: use ClientUpdate.", FutureWarning, stacklevel=2)
        return ClientUpdate
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass
class Trajectory:
    """Everything needed to reproduce the client part's training bit for bit from its initial weights.

    Args:
        split_layer: number of client decoder blocks.
        parameter_names: the client's trainable parameters, in the pinned order of the RNG specification.
        zo_eps: perturbation scale `mu`.
        client_optimizer: `"sgd"` or `"adamw"`.
        client_weight_decay: weight decay of the client optimizer.
        rng: the RNG specification of the directions ([`hosfl_hf.rng.RNG_SPEC`]).
        environment: what bit-identity depends on ([`hosfl_hf.rng.environment`]: torch release, device type and
            dtypes of the client's trainable parameters); `None` in version-1 trajectories.
        rounds: the recorded rounds, in order. Round ids increase strictly; a round whose server step was skipped
            (fp16 overflow) is absent.
        client_seeds: `"shared"` or `"per_client"` (then a round holds the `K * P` seeds and scalars of the clients
            that replied; the update divides by their number all the same).
        search_space: the client's [`~hosfl_hf.search_space.ClientSearchSpace`] as a dict (`None`: every trainable
            client parameter).
        client_mask: the static [`~hosfl_hf.search_space.ClientMask`] of client base weights as a dict, if any; the
            masked base tensors follow the trainable parameters in `parameter_names`.
    """

    split_layer: int
    parameter_names: list[str]
    zo_eps: float
    client_optimizer: str
    client_weight_decay: float = 0.0
    rng: dict[str, Any] = field(default_factory=lambda: dict(RNG_SPEC))
    environment: dict[str, Any] | None = None
    rounds: list[ClientUpdate] = field(default_factory=list)
    client_seeds: str = "shared"
    search_space: dict[str, Any] | None = None
    client_mask: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Trajectory:
        data = dict(data)
        data["rounds"] = [ClientUpdate(**r) for r in data.get("rounds", [])]
        return cls(**data)

    def save(self, path: str | os.PathLike) -> None:
        """Writes the trajectory as JSON (floats round-trip exactly through Python's `repr`)."""
        if os.path.isdir(path):
            path = os.path.join(path, TRAJECTORY_NAME)
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=1)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Trajectory:
        if os.path.isdir(path):
            path = os.path.join(path, TRAJECTORY_NAME)
        with open(path) as f:
            return cls.from_dict(json.load(f))


def replay_trajectory(
    model: nn.Module,
    trajectory: Trajectory | dict | str | os.PathLike,
    start_round: int = 0,
    check_environment_match: bool = True,
) -> nn.Module:
    """Applies recorded client updates to the client part of `model`, round by round (straggler catch-up).

    `model` must hold the client weights the trajectory started from (the initial weights for `start_round=0`);
    with them, the result is bit-identical to the trained client part, for SGD and AdamW, in the environment the
    trajectory records (same torch release, device type and dtypes; see [`hosfl_hf.rng`]). Trainable adapter weights
    are cast to float32 first, as the trainer does. Only the client's trainable parameters change; no forward pass
    is run.

    Args:
        model: the same architecture (plain or peft) as the trained model.
        trajectory: a [`Trajectory`], its dict, or a path to `hosfl_trajectory.json` (or its folder).
        start_round: first round to apply. An AdamW state cannot be rebuilt mid-way, so with AdamW replays must
            start at 0.
        check_environment_match: refuse to replay in an environment other than the recorded one (default). Turn
            off only where you have checked that your torch build draws the same directions.

    Returns:
        The same `model`, updated in place.
    """
    if not isinstance(trajectory, Trajectory):
        trajectory = Trajectory.from_dict(trajectory) if isinstance(trajectory, dict) else Trajectory.load(trajectory)
    if trajectory.rng.get("version") not in SUPPORTED_VERSIONS:
        raise ValueError(
            f"Trajectory RNG spec {trajectory.rng} is not supported (this hosfl_hf reads versions "
            f"{list(SUPPORTED_VERSIONS)}, current {RNG_SPEC['version']}): upgrade hosfl_hf."
        )
    if start_round and trajectory.client_optimizer != "sgd":
        raise ValueError("Only SGD trajectories can be replayed from a mid-run round; replay AdamW from round 0.")
    from .client_part import ClientPart
    from .lora import upcast_trainable_adapters
    from .search_space import ClientSearchSpace

    parts = split_model(model, trajectory.split_layer)
    upcast_trainable_adapters(parts)  # the trainer applied every update to float32 adapters
    space = ClientSearchSpace(**trajectory.search_space) if trajectory.search_space else None
    params = dict(parts.client_parameters())
    missing = [n for n in trajectory.parameter_names if n not in params]
    everything = space is None and trajectory.client_mask is None
    if everything and (missing or len(params) != len(trajectory.parameter_names)):
        raise ValueError(
            f"The model's trainable client parameters do not match the trajectory (missing: {missing[:5]}, "
            f"model has {len(params)}, trajectory {len(trajectory.parameter_names)}). Load the same architecture, "
            "adapters and split layer as the trained model."
        )
    # The same targets, in the same order, as the trainer's client part (search space, then mask).
    part = ClientPart(parts, trajectory.zo_eps, "one_sided", space=space, mask=trajectory.client_mask)
    names = [n for n, _ in part.parameters]
    if names != list(trajectory.parameter_names):
        raise ValueError(
            f"The model's client update targets do not match the trajectory (model: {len(names)} tensors, e.g. "
            f"{names[:2]}; trajectory: {len(trajectory.parameter_names)}, e.g. {trajectory.parameter_names[:2]}). "
            "Load the same architecture, adapters and split layer as the trained model."
        )
    if check_environment_match:
        check_environment(trajectory.environment, [p for _, p in part.parameters], "replay this trajectory")
    optimizer = build_client_optimizer(
        [p for _, p in part.update_parameters],
        trajectory.client_optimizer,
        lr=0.0,
        weight_decay=trajectory.client_weight_decay,
    )
    for record in trajectory.rounds[start_round:]:
        part.apply(record, optimizer)
    return model
