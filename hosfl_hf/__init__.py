"""hosfl_hf: Hybrid-Order Split Federated Learning (HO-SFL) for Hugging Face causal language models."""

from . import _backends  # noqa: F401  (first: quiets optional back-ends before they are imported)
from .config import HOSFLConfig
from .hub import HOSFLRunRecord, load_client_mask_values, merge_for_inference
from .lora import client_4bit_config, split_lora_config
from .search_space import ClientMask, ClientSearchSpace, sensitivity_mask
from .split import SPLIT_REGISTRY, CutActivations, SplitModel, split_model
from .trainer import HOSFLTrainer
from .trajectory import ClientUpdate, Trajectory, replay_trajectory

__version__ = "0.1.0"


def __getattr__(name: str):
    # The SFT trainer needs TRL (the `sft` extra): imported on first use only.
    if name in ("HOSFLSFTConfig", "HOSFLSFTTrainer"):
        from . import sft

        return getattr(sft, name)
    if name == "HOSFLSplitConfig":
        from . import split_config

        return split_config.HOSFLSplitConfig
    if name == "TrajectoryRound":
        from . import trajectory

        return trajectory.TrajectoryRound
    raise AttributeError(f"module 'hosfl_hf' has no attribute {name!r}")


__all__ = [
    "SPLIT_REGISTRY",
    "ClientMask",
    "ClientSearchSpace",
    "ClientUpdate",
    "CutActivations",
    "HOSFLConfig",
    "HOSFLSFTConfig",
    "HOSFLSFTTrainer",
    "HOSFLRunRecord",
    "HOSFLTrainer",
    "SplitModel",
    "Trajectory",
    "client_4bit_config",
    "load_client_mask_values",
    "merge_for_inference",
    "replay_trajectory",
    "sensitivity_mask",
    "split_lora_config",
    "split_model",
]
