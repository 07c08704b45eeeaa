"""`HOSFLConfig`: `TrainingArguments` plus the federation and zeroth-order settings of HO-SFL."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from transformers import TrainingArguments

from .aggregation import AGGREGATORS
from .protocol.strategies import ALGORITHMS as _REGISTRY
from .zeroth_order import CLIENT_STEP_RULES

__all__ = ["ALGORITHMS", "HOSFLConfig"]

ALGORITHMS = tuple(_REGISTRY)  # the method names, from the registry of rules (hosfl_hf.algorithms)
# Methods whose client probes with projected scalars (the per-client seeds and the base-weight mask apply to them).
_PER_CLIENT_ALGORITHMS = tuple(name for name, a in _REGISTRY.items() if a.client.search_levers)


@dataclass
class HOSFLConfig(TrainingArguments):
    r"""
    Configuration class for the [`HOSFLTrainer`].

    This class includes only the parameters that are specific to HO-SFL training. For a full list of training
    arguments, please refer to the [`~transformers.TrainingArguments`] documentation. Defaults are the paper's.
    `learning_rate`, `lr_scheduler_type` and the warmup settings drive the server part; the client part follows the
    same schedule shape scaled to `client_learning_rate`.

    Parameters that control the method:

        algorithm (`str`, *optional*, defaults to `"hosfl"`):
            `"hosfl"` (server first-order, client zeroth-order), or a baseline run by the same trainer on the same
            split, shards, client sampling and batches: `"splitlora"` (first-order split FL: clients backpropagate
            lambda, one shared client-optimizer step on their averaged gradients), `"zo_sfl"` (both parts
            zeroth-order from a shared two-point loss difference), `"fedavg_lora"` (no split: each sampled client
            backpropagates the whole model, one step on the averaged gradients), `"centralized"` (first-order on the
            same batches, no federation), `"mezo"` (MeZO's two-point estimate of the whole model's gradient, applied
            by the `Trainer`'s optimizer: AdamW by default, MeZO's ZO-SGD with `optim="sgd"`), `"frozen_client"`
            (only the server trains) and `"client_only"` (the server never changes; only the client update acts). See
            `docs/benchmarks.md`.

    Parameters that control the split:

        split_layer (`int` or `None`, *optional*, defaults to `None`):
            Number of decoder blocks held by the clients (`1..num_layers-1`). `None` lets the trainer argument
            `split_layer` decide.

    Parameters that control the federation:

        num_clients (`int`, *optional*, defaults to `10`):
            Number `M` of clients; each owns one shard of `train_dataset`.
        clients_per_round (`int`, *optional*, defaults to `3`):
            Number `K` of clients sampled per round. Each contributes one batch of `per_device_train_batch_size`
            examples. One optimizer step of the `Trainer` is one round: `gradient_accumulation_steps` is set to `K`
            (each client batch is one accumulation micro-step, so the server backpropagates `loss / K`).
        partition (`str`, *optional*, defaults to `"iid"`):
            How `train_dataset` is split into client shards: `"iid"` or `"dirichlet"` (label skew).
        dirichlet_alpha (`float`, *optional*, defaults to `1.0`):
            Concentration of the Dirichlet partition; smaller is more skewed.
        partition_column (`str`, *optional*, defaults to `"label"`):
            Dataset column holding the class label used by the Dirichlet partition.

    Parameters that control the zeroth-order client update:

        num_perturbations (`int`, *optional*, defaults to `2`):
            Number `P` of random directions (seeds) per round.
        zo_eps (`float`, *optional*, defaults to `1e-3`):
            Perturbation scale `mu`.
        zo_estimator (`str`, *optional*, defaults to `"one_sided"`):
            `"one_sided"` (one extra client forward per direction) or `"two_sided"` (two, lower bias).
        client_optimizer (`str`, *optional*, defaults to `"adamw"`):
            The client's step rule, applied to the zeroth-order gradient on every holder of the client part:
            `"adamw"`, `"sgd"` (ZO-SGD) or `"normalized_sgd"` (a step of length `client_learning_rate` along the
            estimate, whatever its norm).
        client_learning_rate (`float`, *optional*, defaults to `1e-5`):
            Peak learning rate of the client optimizer.
        client_weight_decay (`float`, *optional*, defaults to `0.0`):
            Weight decay of the client optimizer.
        client_lr_scheduler_type (`str`, *optional*, defaults to `None`):
            The client's own schedule shape (any `lr_scheduler_type`); `None` follows the server's.
        client_warmup_steps (`int`, *optional*, defaults to `None`):
            The client schedule's warmup rounds; `None` follows the server's warmup.
        client_lr_scheduler_kwargs (`dict` or `str`, *optional*, defaults to `None`):
            Extra arguments of the client's schedule (like `lr_scheduler_kwargs`; a JSON string from the command
            line), e.g. `{"num_stable_steps": 0, "num_decay_steps": 57, "decay_type": "linear"}` with
            `client_lr_scheduler_type="warmup_stable_decay"` for a client that learns in the first 60 rounds and then
            holds still. `None`: the server's `lr_scheduler_kwargs` when the client follows the server's shape, none
            otherwise.
        client_zo_blocks (`list[int]`, *optional*, defaults to `None`):
            The client's search space by block: only the trainable parameters of these client blocks (0-based) are
            perturbed and updated; the others are frozen. `None`: every client block (the paper).
        client_zo_modules (`list[str]`, *optional*, defaults to `None`):
            The client's search space by name: only trainable client parameters whose name contains one of these
            strings (e.g. `["lora_B"]`) are perturbed and updated. `None`: every name (the paper). `[]`: none of
            them (with a `client_mask`: the masked base weights alone are the client update).
        client_seeds (`str`, *optional*, defaults to `"shared"`):
            `"shared"`: every client probes the round's `P` seeds (the paper). `"per_client"`: each client probes
            its own `P` seeds (FedKSeed-style), so a round has `K * P` distinct directions for the same forwards; the
            server relays the `K * P` scalars and every holder applies `(1/(K P mu)) sum_m sum_p v_mp u_mp`.
            Needs `aggregation="mean"`.

        A static sparse mask over client base weights (the other search-space lever) is chosen at set-up by
        [`~hosfl_hf.search_space.sensitivity_mask`] and passed to the trainer as `client_mask`; see
        `docs/concepts.md`.
        aggregation (`str`, *optional*, defaults to `"mean"`):
            How the server combines the clients' scalars, per seed: `"mean"` (the method), or the robust
            `"median"` / `"trimmed_mean"` (see `hosfl_hf.aggregation`), which bound what one client can do to the
            update.
        aggregation_trim_fraction (`float`, *optional*, defaults to `0.2`):
            For `"trimmed_mean"`: the fraction of clients dropped at each end, per seed.
        scalar_bound (`float` or `None`, *optional*, defaults to `None`):
            Clip each client's scalars to `[-scalar_bound, scalar_bound]` before aggregating.
        cut_noise (`float`, *optional*, defaults to `0.0`):
            Client-side Gaussian noise on the cut activations sent to the server, `sigma` of
            [`~hosfl_hf.privacy.CutDefense`]: times each token's RMS, or times `cut_clip_norm / sqrt(hidden_size)`
            with clipping. The probes use the clean cut, so the noise cancels from the scalars. See
            `docs/privacy.md`.
        cut_clip_norm (`float` or `None`, *optional*, defaults to `None`):
            Per-token L2 clipping of the cut before the noise (`None`: none).
        cut_noise_seed (`int` or `None`, *optional*, defaults to `None`):
            The clients' secret noise seed, for reproducible simulations only (a server that knows it removes the
            noise); `None` draws the noise from OS entropy.

    Precision and clipping (one rule for every method):

        - The client computes in the run's mixed precision: with `bf16=True` (`fp16=True`) the anchor forward and
          every perturbed forward of the client run under `torch.autocast` in bfloat16 (float16), with or without
          peft; otherwise in the weights' dtype. Trainable client weights stay float32.
        - `max_grad_norm` clips every gradient obtained by backpropagation: the server's (by the `Trainer`), the whole
          model's without a split, and the SplitLoRA client's averaged gradient (by its own optimizer, on its own
          norm). Zeroth-order estimates (the HO-SFL client update, ZO-SFL and MeZO) are never clipped: their norm is
          about `sqrt(d)` times the projected derivative, so a norm clip would only rescale them by a factor that
          depends on the number of parameters.
        - With `fp16=True`, a round whose server step the loss scaler skips (overflow) applies no client update on any
          holder: nothing is recorded in the trajectory, the client scheduler does not advance, and
          `fed/skipped_rounds` counts it.

    Not supported (rejected with an error): `fsdp`, `deepspeed`, `torch_compile`, LOMO optimizers,
    `accelerator_config.dispatch_batches` / `split_batches`, and one process driving several GPUs (`nn.DataParallel`):
    use `accelerate launch` (DDP, one process per device).

    Changed defaults: `learning_rate` defaults to `1e-5` (the paper) instead of `5e-5`; `logging_steps` to `10`
    instead of `500`.
    """

    learning_rate: float = field(default=1e-5, metadata={"help": "Learning rate of the server part (AdamW)."})
    logging_steps: float = field(default=10, metadata={"help": "Log every X rounds (optimizer steps)."})

    algorithm: str = field(
        default="hosfl",
        metadata={"help": "Method: 'hosfl' or a baseline.", "choices": list(ALGORITHMS)},
    )
    split_layer: int | None = field(
        default=None, metadata={"help": "Number of decoder blocks held by the clients (1..num_layers-1)."}
    )
    num_clients: int = field(default=10, metadata={"help": "Number M of clients (dataset shards)."})
    clients_per_round: int = field(default=3, metadata={"help": "Number K of clients sampled per round."})
    partition: str = field(
        default="iid",
        metadata={"help": "Client shards: 'iid' or 'dirichlet' (label skew).", "choices": ["iid", "dirichlet"]},
    )
    dirichlet_alpha: float = field(default=1.0, metadata={"help": "Concentration of the Dirichlet partition."})
    partition_column: str = field(default="label", metadata={"help": "Label column used by the Dirichlet partition."})
    num_perturbations: int = field(default=2, metadata={"help": "Number P of random directions per round."})
    zo_eps: float = field(default=1e-3, metadata={"help": "Perturbation scale mu of the zeroth-order estimate."})
    zo_estimator: str = field(
        default="one_sided",
        metadata={
            "help": "Zeroth-order estimator: 'one_sided' or 'two_sided'.",
            "choices": ["one_sided", "two_sided"],
        },
    )
    client_optimizer: str = field(
        default="adamw",
        metadata={
            "help": "Client step rule: 'adamw', 'sgd' or 'normalized_sgd'.",
            "choices": list(CLIENT_STEP_RULES),
        },
    )
    client_learning_rate: float = field(default=1e-5, metadata={"help": "Peak learning rate of the client optimizer."})
    client_weight_decay: float = field(default=0.0, metadata={"help": "Weight decay of the client optimizer."})
    client_lr_scheduler_type: str | None = field(
        default=None, metadata={"help": "Schedule shape of the client learning rate (default: the server's)."}
    )
    client_warmup_steps: int | None = field(
        default=None, metadata={"help": "Warmup rounds of the client schedule (default: the server's warmup)."}
    )
    client_lr_scheduler_kwargs: dict | str | None = field(
        default=None,
        metadata={"help": "Extra arguments of the client schedule, as a dict or JSON string (default: the server's)."},
    )
    client_zo_blocks: list[int] | None = field(
        default=None, metadata={"help": "Client blocks (0-based) whose trainable parameters the client update covers."}
    )
    client_zo_modules: list[str] | None = field(
        default=None, metadata={"help": "Name patterns (e.g. lora_B) of the client parameters the update covers."}
    )
    client_seeds: str = field(
        default="shared",
        metadata={"help": "Perturbation seeds: 'shared' or 'per_client'.", "choices": ["shared", "per_client"]},
    )
    aggregation: str = field(
        default="mean",
        metadata={"help": "Scalar aggregation: 'mean', 'median' or 'trimmed_mean'.", "choices": list(AGGREGATORS)},
    )
    aggregation_trim_fraction: float = field(
        default=0.2, metadata={"help": "Fraction trimmed at each end by aggregation='trimmed_mean'."}
    )
    scalar_bound: float | None = field(
        default=None, metadata={"help": "Clip each client's scalars to [-bound, bound] before aggregating."}
    )
    cut_noise: float = field(
        default=0.0,
        metadata={"help": "Client-side Gaussian noise on the cut, times each token's RMS (docs/privacy.md); 0: none."},
    )
    cut_clip_norm: float | None = field(
        default=None, metadata={"help": "Per-token L2 clipping of the cut before the noise; None: none."}
    )
    cut_noise_seed: int | None = field(
        default=None, metadata={"help": "Secret seed of the cut noise (simulations only); None: OS entropy."}
    )

    def __post_init__(self):
        def fail(name: str, value: object, expected: str) -> None:
            raise ValueError(f"HOSFLConfig.{name}={value!r} is invalid: {expected}.")

        if self.algorithm not in _REGISTRY:
            fail("algorithm", self.algorithm, f"use one of {list(_REGISTRY)}")
        if self.split_layer is not None and (not isinstance(self.split_layer, int) or self.split_layer < 1):
            fail("split_layer", self.split_layer, "use a positive number of client blocks, or None")
        if not isinstance(self.num_clients, int) or self.num_clients < 1:
            fail("num_clients", self.num_clients, "it must be an integer >= 1")
        if not isinstance(self.clients_per_round, int) or not 1 <= self.clients_per_round <= self.num_clients:
            fail(
                "clients_per_round",
                self.clients_per_round,
                f"it must be an integer in 1..num_clients={self.num_clients}",
            )
        if self.partition not in ("iid", "dirichlet"):
            fail("partition", self.partition, "use 'iid' or 'dirichlet'")
        if not (
            isinstance(self.dirichlet_alpha, (int, float))
            and math.isfinite(self.dirichlet_alpha)
            and self.dirichlet_alpha > 0
        ):
            fail("dirichlet_alpha", self.dirichlet_alpha, "it must be a finite number > 0")
        if not isinstance(self.num_perturbations, int) or self.num_perturbations < 1:
            fail("num_perturbations", self.num_perturbations, "it must be an integer >= 1")
        if not (isinstance(self.zo_eps, (int, float)) and math.isfinite(self.zo_eps) and self.zo_eps > 0):
            fail("zo_eps", self.zo_eps, "it must be a finite number > 0 (the paper uses 1e-3)")
        if self.zo_estimator not in ("one_sided", "two_sided"):
            fail("zo_estimator", self.zo_estimator, "use 'one_sided' or 'two_sided'")
        if self.client_optimizer not in CLIENT_STEP_RULES:
            fail("client_optimizer", self.client_optimizer, f"use one of {list(CLIENT_STEP_RULES)}")
        if self.client_seeds not in ("shared", "per_client"):
            fail("client_seeds", self.client_seeds, "use 'shared' or 'per_client'")
        if self.client_seeds == "per_client" and self.aggregation != "mean":
            fail(
                "client_seeds",
                self.client_seeds,
                f"per-client seeds give each seed one client's scalar, so aggregation={self.aggregation!r} has "
                "nothing to combine; use aggregation='mean' (scalar_bound still clips each client's scalars)",
            )
        if self.client_seeds == "per_client" and self.algorithm not in _PER_CLIENT_ALGORITHMS:
            fail("client_seeds", self.client_seeds, f"per-client seeds apply to {list(_PER_CLIENT_ALGORITHMS)}")
        if self.client_zo_blocks is not None and (
            not self.client_zo_blocks or not all(isinstance(b, int) and b >= 0 for b in self.client_zo_blocks)
        ):
            fail("client_zo_blocks", self.client_zo_blocks, "use a non-empty list of 0-based client block indices")
        if self.client_zo_modules is not None and not all(isinstance(m, str) and m for m in self.client_zo_modules):
            fail("client_zo_modules", self.client_zo_modules, "use a list of non-empty parameter-name substrings")
        if self.client_warmup_steps is not None and (
            not isinstance(self.client_warmup_steps, int) or self.client_warmup_steps < 0
        ):
            fail("client_warmup_steps", self.client_warmup_steps, "it must be an integer >= 0, or None")
        if isinstance(self.client_lr_scheduler_kwargs, str):  # from the command line, as `lr_scheduler_kwargs`
            try:
                self.client_lr_scheduler_kwargs = json.loads(self.client_lr_scheduler_kwargs)
            except json.JSONDecodeError as error:
                fail("client_lr_scheduler_kwargs", self.client_lr_scheduler_kwargs, f"it is not valid JSON ({error})")
        if self.client_lr_scheduler_kwargs is not None and not isinstance(self.client_lr_scheduler_kwargs, dict):
            fail("client_lr_scheduler_kwargs", self.client_lr_scheduler_kwargs, "use a dict (a JSON object), or None")
        for name in ("client_learning_rate", "client_weight_decay"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                fail(name, value, "it must be a finite number >= 0")
        if self.aggregation not in AGGREGATORS:
            fail("aggregation", self.aggregation, f"use one of {list(AGGREGATORS)}")
        if not (
            isinstance(self.aggregation_trim_fraction, (int, float)) and 0 <= self.aggregation_trim_fraction < 0.5
        ):
            fail("aggregation_trim_fraction", self.aggregation_trim_fraction, "it must be in [0, 0.5)")
        if self.scalar_bound is not None and not (
            isinstance(self.scalar_bound, (int, float)) and math.isfinite(self.scalar_bound) and self.scalar_bound > 0
        ):
            fail("scalar_bound", self.scalar_bound, "it must be a finite number > 0, or None")
        from .privacy.defense import CutDefense

        CutDefense(self.cut_noise, self.cut_clip_norm, self.cut_noise_seed)  # raises on an invalid value
        if self.gradient_accumulation_steps not in (1, self.clients_per_round):
            fail(
                "gradient_accumulation_steps",
                self.gradient_accumulation_steps,
                f"HO-SFL accumulates the server gradient over the K={self.clients_per_round} client batches of a "
                "round; leave it at 1 (it is set to clients_per_round) and raise per_device_train_batch_size for "
                "larger client batches",
            )
        self.gradient_accumulation_steps = self.clients_per_round
        self._reject_unsupported_backends()
        # Under DDP the client's parameters get no gradient from the server's backward.
        if self.ddp_find_unused_parameters is None:
            self.ddp_find_unused_parameters = True
        super().__post_init__()
        accelerator_config = self.accelerator_config
        for name in ("dispatch_batches", "split_batches"):
            if getattr(accelerator_config, name, None):
                fail(
                    f"accelerator_config.{name}",
                    True,
                    "a client batch must reach one process whole (the sampler yields whole client batches and each "
                    "process hosts its own clients); leave it off",
                )

    def _reject_unsupported_backends(self) -> None:
        """Back-ends that shard or wrap the model, or scale the loss, where the split and the probes cannot follow."""
        reasons = {
            "fsdp": "the clients perturb and update unsharded client weights; use `accelerate launch` (DDP)",
            "deepspeed": "DeepSpeed scales the loss inside its engine, so lambda would carry an unknown scale, and "
            "ZeRO shards the client weights the probes perturb; use `accelerate launch` (DDP)",
            "torch_compile": "the split patches block forwards and hooks at run time, which compiled graphs do not "
            "follow; leave torch_compile off",
        }
        for name, reason in reasons.items():
            if getattr(self, name, None):
                raise ValueError(f"HOSFLConfig.{name}={getattr(self, name)!r} is not supported: {reason}.")
        if "lomo" in str(self.optim).lower():
            raise ValueError(
                f"HOSFLConfig.optim={self.optim!r} is not supported: LOMO fuses the server's update into its "
                "backward, so the server step could not be skipped together with the clients' update; use "
                "adamw_torch or sgd."
            )

    def schedule(self, optimizer: Any, num_training_steps: int) -> Any:
        """The learning-rate schedule of this config (`lr_scheduler_type`, warmup, `lr_scheduler_kwargs`) on
        `optimizer`: the server's, and the client's at peak `client_learning_rate`."""
        from transformers import get_scheduler

        return get_scheduler(
            self.lr_scheduler_type,
            optimizer,
            num_warmup_steps=self.get_warmup_steps(num_training_steps),
            num_training_steps=num_training_steps,
            scheduler_specific_kwargs=self.lr_scheduler_kwargs,
        )

    def client_schedule(self, optimizer: Any, num_training_steps: int) -> Any:
        """The client's learning-rate schedule on `optimizer` (peak `client_learning_rate`): the server's
        (`schedule`) unless `client_lr_scheduler_type`, `client_warmup_steps` or `client_lr_scheduler_kwargs` give
        the client its own."""
        own = (self.client_lr_scheduler_type, self.client_warmup_steps, self.client_lr_scheduler_kwargs)
        if all(value is None for value in own):
            return self.schedule(optimizer, num_training_steps)
        from transformers import get_scheduler

        kwargs = self.client_lr_scheduler_kwargs
        if kwargs is None:  # the server's extra arguments fit only the server's shape
            kwargs = self.lr_scheduler_kwargs if self.client_lr_scheduler_type is None else {}
        return get_scheduler(
            self.client_lr_scheduler_type or self.lr_scheduler_type,
            optimizer,
            num_warmup_steps=(
                self.client_warmup_steps
                if self.client_warmup_steps is not None
                else self.get_warmup_steps(num_training_steps)
            ),
            num_training_steps=num_training_steps,
            scheduler_specific_kwargs=kwargs,
        )
