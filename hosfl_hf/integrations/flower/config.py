"""The run configuration of the Flower app (`[tool.flwr.app.config]`): defaults, and what both apps build from it."""

from __future__ import annotations

import copy
import hashlib
import os
import tempfile
from collections.abc import Mapping
from typing import Any

import torch

from ...config import HOSFLConfig
from ...protocol import ReliabilitySettings, RoundSettings

__all__ = [
    "DEFAULT_RUN_CONFIG",
    "build_args",
    "build_reliability",
    "load_dataset",
    "load_model",
    "make_collator",
    "state_folder",
    "write_app",
]

# Every key must also be declared in the app's pyproject.toml (`flwr run` refuses undeclared keys).
DEFAULT_RUN_CONFIG: dict[str, Any] = {
    "model": "",  # a local folder with a *ForCausalLM (save_pretrained), or a Hub id where the Hub is reachable
    "dataset": "",  # a JSON-lines file of tokenized rows: input_ids, labels (optional: attention_mask)
    "split-layer": 2,
    "num-rounds": 3,
    "num-clients": 3,
    "clients-per-round": 2,
    "batch-size": 4,
    "num-perturbations": 2,
    "zo-eps": 1e-3,
    "learning-rate": 3e-3,
    "client-learning-rate": 1e-3,
    "client-optimizer": "adamw",
    "client-seeds": "shared",  # or "per_client": each client probes its own seeds (K * P directions per round)
    "client-zo-blocks": "",  # e.g. "0,1,2,3": only these client blocks' trainable parameters are updated
    "client-zo-modules": "",  # e.g. "lora_B": only parameters whose name contains one of these (comma-separated)
    "client-mask": "",  # a ClientMask JSON file (hosfl_hf.search_space.sensitivity_mask), the same on every node
    "lr-scheduler-type": "linear",
    "client-lr-scheduler-type": "",  # the client's own schedule shape; "": the server's (lr-scheduler-type)
    "client-warmup-steps": -1,  # the client schedule's warmup rounds; < 0: the server's
    "client-lr-scheduler-kwargs": "",  # a JSON object of the client schedule's extra arguments; "": none
    "max-grad-norm": 1.0,
    "lora-r": 0,  # > 0: LoRA adapters of this rank on every linear layer of both parts (seeded by `seed`)
    "seed": 7,
    "output-dir": "hosfl-flower-output",
    "state-dir": "",  # where each client keeps its state between messages (default: the temp folder)
    "reply-timeout": 600.0,  # seconds a node has to answer; a later node is dropped for the round
    "max-round-attempts": 5,  # a round no client finished is retried with a new sample this many times in all
    "min-finishers": 1,  # a round fewer clients finish is skipped and retried (3+ with a robust aggregation)
    "activation-bound": 1e6,  # cuts with a larger entry are rejected (poisoned activations); 0: no bound
    "checkpoint-every": 0,  # > 0: client-state snapshot every N rounds; a straggler behind it gets snapshot + tail
    "checkpoint-dir": "",  # server checkpoint after every round; a run finding one there resumes from it
    "cut-noise": 0.0,  # client-side Gaussian noise on the cut, times each token's RMS (docs/privacy.md); 0: none
    "cut-clip-norm": 0.0,  # per-token L2 clipping of the cut before the noise; 0: none
}


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
    """The [`HOSFLConfig`] of the run (server optimizer, schedule, clipping) and the shared [`RoundSettings`]."""
    client_warmup = int(config["client-warmup-steps"])  # < 0: the server's warmup
    args = HOSFLConfig(
        output_dir=str(config["output-dir"]),
        split_layer=int(config["split-layer"]),
        num_clients=int(config["num-clients"]),
        clients_per_round=int(config["clients-per-round"]),
        per_device_train_batch_size=int(config["batch-size"]),
        num_perturbations=int(config["num-perturbations"]),
        zo_eps=float(config["zo-eps"]),
        learning_rate=float(config["learning-rate"]),
        client_learning_rate=float(config["client-learning-rate"]),
        client_optimizer=str(config["client-optimizer"]),
        client_seeds=str(config["client-seeds"]),
        client_zo_blocks=[int(b) for b in str(config["client-zo-blocks"]).split(",") if b.strip()] or None,
        client_zo_modules=[m.strip() for m in str(config["client-zo-modules"]).split(",") if m.strip()] or None,
        lr_scheduler_type=str(config["lr-scheduler-type"]),
        client_lr_scheduler_type=str(config["client-lr-scheduler-type"]) or None,
        client_warmup_steps=client_warmup if client_warmup >= 0 else None,
        client_lr_scheduler_kwargs=str(config["client-lr-scheduler-kwargs"]) or None,
        max_grad_norm=float(config["max-grad-norm"]),
        max_steps=int(config["num-rounds"]),
        seed=int(config["seed"]),
        cut_noise=float(config["cut-noise"]),
        cut_clip_norm=float(config["cut-clip-norm"]) or None,
        use_cpu=not torch.cuda.is_available(),
        report_to=[],
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
    """Where a client keeps its state between messages (a SuperNode may start a new process per message): per run,
    or, with a server `checkpoint-dir`, per checkpoint folder, so that a run resuming from it (a new Flower run id)
    finds its clients' states."""
    base = node_config.get("state-dir") or config["state-dir"] or os.path.join(tempfile.gettempdir(), "hosfl-flower")
    checkpoint = str(config.get("checkpoint-dir") or "")
    name = f"checkpoint-{hashlib.sha256(checkpoint.encode()).hexdigest()[:12]}" if checkpoint else f"run-{run_id}"
    return os.path.join(str(base), name, f"client-{client_id}")


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


def write_app(folder: str | os.PathLike) -> str:
    """Writes the Flower app folder (its `pyproject.toml`: components and the run config's defaults) and returns
    its path; `examples/flower` is this output."""
    os.makedirs(folder, exist_ok=True)
    lines = [f'{k} = "{v}"' if isinstance(v, str) else f"{k} = {v!r}" for k, v in DEFAULT_RUN_CONFIG.items()]
    with open(os.path.join(folder, "pyproject.toml"), "w") as f:
        f.write(APP_PYPROJECT + "\n".join(lines) + "\n")
    return str(folder)
