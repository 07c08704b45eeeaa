"""hosfl_hf: Hybrid-Order Split Federated Learning (HO-SFL) for Hugging Face causal language models."""

from .config import HOSFLConfig
from .hub import HOSFLSplitConfig, merge_for_inference
from .lora import client_4bit_config, split_lora_config
from .search_space import ClientMask, ClientSearchSpace, sensitivity_mask
from .split import SPLIT_REGISTRY, CutActivations, SplitModel, split_model
from .trainer import HOSFLTrainer
from .trajectory import Trajectory, TrajectoryRound, replay_trajectory

__version__ = "0.1.0"

__all__ = [
    "SPLIT_REGISTRY",
    "ClientMask",
    "ClientSearchSpace",
    "CutActivations",
    "HOSFLConfig",
    "HOSFLSplitConfig",
    "HOSFLTrainer",
    "SplitModel",
    "Trajectory",
    "TrajectoryRound",
    "client_4bit_config",
    "merge_for_inference",
    "replay_trajectory",
    "sensitivity_mask",
    "split_lora_config",
    "split_model",
]
