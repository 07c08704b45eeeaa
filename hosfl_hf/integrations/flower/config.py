"""The run configuration of the Flower app (`[tool.flwr.app.config]`): defaults, and what both apps build from it."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import types
import typing
from collections.abc import Mapping
from dataclasses import fields
from typing import Any

import torch

from ...config import HOSFLConfig
from ...protocol import ReliabilitySettings, RoundSettings
from ...protocol.strategies import ALGORITHMS

__all__ = [
    "APP_CONFIG",
    "DEFAULT_RUN_CONFIG",
    "SETTINGS_FIELDS",
    "build_args",
    "build_reliability",
    "load_dataset",
    "load_model",
    "make_collator",
    "state_folder",
    "toml_value",
    "write_app",
]

# The settings every node must agree on are HOSFLConfig's: each of these fields is the run-config key of its name in
# kebab case (`client_weight_decay` -> `client-weight-decay`), with HOSFLConfig's type and meaning; nothing here
# declares them a second time. `None` is written as "", a list as comma-separated values, a dict as a JSON object.
# `cut_noise_seed` is left out on purpose: the run config is the server operator's, and a server that knows the
# clients' noise seed removes the noise (each ClientApp draws it from OS entropy; docs/privacy.md).
NOT_IN_RUN_CONFIG = ("batch_size", "mixed_precision", "client_mask", "cut_noise_seed")
SETTINGS_FIELDS: tuple[str, ...] = (
    *(f.name for f in fields(RoundSettings) if f.name not in NOT_IN_RUN_CONFIG),
    "learning_rate",
    "weight_decay",
    "lr_scheduler_type",
    "warmup_steps",
    "max_grad_norm",
    "client_lr_scheduler_type",
    "client_warmup_steps",
    "client_lr_scheduler_kwargs",
)
# Where the app's defaults differ from HOSFLConfig's: a run that finishes in seconds on a tiny model.
APP_DEFAULTS: dict[str, Any] = {
    "split_layer": 2,
    "num_clients": 3,
    "clients_per_round": 2,
    "learning_rate": 3e-3,
    "client_learning_rate": 1e-3,
    "lr_scheduler_type": "linear",
    "seed": 7,
}
# Keys of the app itself: what to load and where to write, and the server's fault policy.
APP_CONFIG: dict[str, Any] = {
    "model": "",  # a local folder with a *ForCausalLM (save_pretrained), or a Hub id where the Hub is reachable
    "dataset": "",  # a JSON-lines file of tokenized rows: input_ids, labels (optional: attention_mask)
    "num-rounds": 3,  # HOSFLConfig.max_steps
    "batch-size": 4,  # HOSFLConfig.per_device_train_batch_size
    "client-mask": "",  # a ClientMask JSON file (hosfl_hf.search_space.sensitivity_mask), the same on every node
    "lora-r": 0,  # > 0: LoRA adapters of this rank on every linear layer of both parts (seeded by `seed`)
    "output-dir": "hosfl-flower-output",
    "state-dir": "",  # where each client keeps its state between messages (default: <output-dir>/client-state)
    "reply-timeout": 600.0,  # seconds a node has to answer; a later node is dropped for the round
    "max-round-attempts": 5,  # a round no client finished is retried with a new sample this many times in all
    "min-finishers": 1,  # a round fewer clients finish is skipped and retried (3+ with a robust aggregation)
    "activation-bound": 1e6,  # cuts with a larger entry are rejected (poisoned activations); 0: no bound
    "checkpoint-every": 0,  # > 0: client-state snapshot every N rounds; a straggler behind it gets snapshot + tail
    "deferred-updates": True,  # the update travels with the next round's plan: two exchanges per round, not three
    "checkpoint-dir": "",  # server checkpoint after every round; a run finding one there resumes from it
    # Centralized evaluation on the server's held-out set (the full model: server part + replayed client part).
    "eval-dataset": "",  # JSON-lines: tokenized rows (input_ids, labels) or, with eval-task, the task's raw rows
    "eval-task": "",  # "": loss and perplexity; a classification task of hosfl_hf.tasks (sst2, rte): accuracy
    "eval-every": 0,  # > 0: evaluate after every N rounds (and after the last); 0: only after the last round
    "eval-batch-size": 16,
    "report-to": "none",  # per-round metrics to transformers' integrations (e.g. "tensorboard"), and/or "jsonl"
}
FLOWER_ALGORITHMS = tuple(ALGORITHMS)
"""The algorithms the Flower app runs: every entry of the registry (the round's loop runs them all)."""


def _key(name: str) -> str:
    return name.replace("_", "-")


def _to_run_config(value: Any) -> Any:
    """A setting as a TOML scalar (what a Flower run config holds)."""
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    if isinstance(value, dict):
        return json.dumps(value)
    return value


def _field_types() -> dict[str, Any]:
    # Resolved types, not the annotation strings: transformers' HfArgumentParser rewrites `Field.type` in place.
    return typing.get_type_hints(HOSFLConfig)


def _from_run_config(name: str, value: Any, hint: Any) -> Any:
    """A run-config value back as the HOSFLConfig field `name` (of type `hint`) takes it."""
    args = typing.get_args(hint)
    optional = typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args
    if optional and (value == "" or value is None):
        return None
    kind = next(a for a in args if a is not type(None)) if optional else hint
    if typing.get_origin(kind) is list:
        cast = typing.get_args(kind)[0]
        return [cast(v.strip()) for v in str(value).split(",") if v.strip()] or None
    if kind in (bool, int, float):
        try:
            return kind(value)
        except (TypeError, ValueError):
            raise ValueError(f"Run-config '{_key(name)}' must be a {kind.__name__}, got {value!r}.") from None
    return value


def _settings_defaults() -> dict[str, Any]:
    defaults = HOSFLConfig.__dataclass_fields__
    return {_key(name): _to_run_config(APP_DEFAULTS.get(name, defaults[name].default)) for name in SETTINGS_FIELDS}


# Every key must also be declared in the app's pyproject.toml (`flwr run` refuses undeclared keys): `write_app`.
DEFAULT_RUN_CONFIG: dict[str, Any] = {**APP_CONFIG, **_settings_defaults()}


def resolve(run_config: Mapping[str, Any]) -> dict[str, Any]:
    """The run config over the defaults; unknown keys are refused (they would be silently ignored)."""
    unknown = set(run_config) - set(DEFAULT_RUN_CONFIG)
    if unknown:
        raise ValueError(f"Unknown hosfl_hf run-config keys {sorted(unknown)}; known: {sorted(DEFAULT_RUN_CONFIG)}.")
    config = {**DEFAULT_RUN_CONFIG, **run_config}
    for key in ("model", "dataset"):
        if not config[key]:
            raise ValueError(f"Set run-config '{key}' (e.g. flwr run . --run-config '{key}=\"/path\"').")
    return config


def build_args(config: Mapping[str, Any]) -> tuple[RoundSettings, HOSFLConfig]:
    """The [`HOSFLConfig`] of the run (its settings from the run config's `SETTINGS_FIELDS` keys, the server's
    optimizer, schedule and clipping among them) and the shared [`RoundSettings`]."""
    types = _field_types()
    settings = {name: _from_run_config(name, config[_key(name)], types[name]) for name in SETTINGS_FIELDS}
    args = HOSFLConfig(
        **settings,
        output_dir=str(config["output-dir"]),
        per_device_train_batch_size=int(config["batch-size"]),
        max_steps=int(config["num-rounds"]),
        use_cpu=not torch.cuda.is_available(),
        report_to=[],  # the ServerApp reports itself (reporting.py): the Trainer's loop does not run here
        save_strategy="no",
        disable_tqdm=True,
    )
    mask = None
    if config["client-mask"]:
        from ...search_space import ClientMask

        mask = ClientMask.load(str(config["client-mask"]))
    return RoundSettings.from_args(args, client_mask=mask), args


_MODELS: dict[tuple, torch.nn.Module] = {}


def load_model(config: Mapping[str, Any]) -> torch.nn.Module:
    """A fresh copy of the run's initial model (plus its seeded LoRA adapters): identical on every node."""
    key = (config["model"], int(config["lora-r"]), int(config["seed"]))
    if key not in _MODELS:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(config["model"], dtype=torch.float32)
        if int(config["lora-r"]) > 0:
            from peft import LoraConfig, get_peft_model

            with torch.random.fork_rng():
                torch.manual_seed(int(config["seed"]))
                model = get_peft_model(model, LoraConfig(r=int(config["lora-r"]), target_modules="all-linear"))
        _MODELS[key] = model.eval()
    return copy.deepcopy(_MODELS[key])


def build_reliability(config: Mapping[str, Any]) -> ReliabilitySettings:
    """The server's fault policy from the run config."""
    bound = float(config["activation-bound"])
    return ReliabilitySettings(
        reply_timeout=float(config["reply-timeout"]),
        max_round_attempts=int(config["max-round-attempts"]),
        min_finishers=int(config["min-finishers"]),
        activation_bound=bound if bound > 0 else None,
        checkpoint_every=int(config["checkpoint-every"]),
        deferred_updates=str(config["deferred-updates"]).lower() in ("true", "1"),
    )


def load_dataset(config: Mapping[str, Any]) -> Any:
    import datasets

    return datasets.load_dataset("json", data_files=config["dataset"], split="train")


def make_collator(config: Mapping[str, Any]):
    """Pads with the model folder's tokenizer (`DataCollatorForSeq2Seq`); stacks rows of equal length
    (`default_data_collator`) where the folder holds no tokenizer."""
    from transformers import AutoTokenizer, DataCollatorForSeq2Seq, default_data_collator

    try:
        tokenizer = AutoTokenizer.from_pretrained(config["model"])
    except (OSError, ValueError, TypeError):
        return default_data_collator
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100)


def state_folder(config: Mapping[str, Any], node_config: Mapping[str, Any], run_id: int, client_id: int) -> str:
    """Where a client keeps its state between messages (a SuperNode may start a new process per message): the node
    config's `state-dir`, else the run config's, else `<output-dir>/client-state` (absolute, on the node); per run,
    or, with a server `checkpoint-dir`, per checkpoint folder, so that a run resuming from it (a new Flower run id)
    finds its clients' states."""
    # Default under the run's output folder (removed with it), never an uncleaned folder of the system temp dir.
    base = (
        node_config.get("state-dir") or config["state-dir"] or os.path.join(str(config["output-dir"]), "client-state")
    )
    checkpoint = str(config.get("checkpoint-dir") or "")
    name = f"checkpoint-{hashlib.sha256(checkpoint.encode()).hexdigest()[:12]}" if checkpoint else f"run-{run_id}"
    return os.path.join(os.path.abspath(str(base)), name, f"client-{client_id}")


APP_PYPROJECT = """# The HO-SFL Flower app: `flwr run <this folder> <connection>` (see docs/federated.md).
# The ServerApp and ClientApp live in the installed hosfl_hf package (pip install "hosfl-hf[flower]");
# this folder only carries the run configuration.
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "hosfl-flower"
version = "0.1.0"
description = "HO-SFL (hybrid-order split federated learning) of a causal LM over Flower"
license = "Apache-2.0"
dependencies = ["hosfl-hf[flower]"]

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "hosfl-hf"

[tool.flwr.app.components]
serverapp = "hosfl_hf.integrations.flower.server_app:app"
clientapp = "hosfl_hf.integrations.flower.client_app:app"

# Every key of hosfl_hf.integrations.flower.DEFAULT_RUN_CONFIG, with the same defaults.
[tool.flwr.app.config]
"""


def toml_value(value: Any) -> str:
    """A run-config value in TOML (what `--run-config` and `pyproject.toml` parse)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return f'"{value}"' if isinstance(value, str) else repr(value)


def write_app(folder: str | os.PathLike) -> str:
    """Writes the Flower app folder (its `pyproject.toml`: components and the run config's defaults) and returns
    its path; `examples/flower` is this output."""
    os.makedirs(folder, exist_ok=True)
    lines = [f"{k} = {toml_value(v)}" for k, v in DEFAULT_RUN_CONFIG.items()]
    with open(os.path.join(folder, "pyproject.toml"), "w") as f:
        f.write(APP_PYPROJECT + "\n".join(lines) + "\n")
    return str(folder)
