"""hosfl_hf: Hybrid-Order Split Federated Learning (HO-SFL) for Hugging Face causal language models."""

from .config import HOSFLConfig
from .split import SPLIT_REGISTRY, CutActivations, SplitModel, split_model
from .trainer import HOSFLTrainer
from .trajectory import Trajectory, TrajectoryRound, replay_trajectory

__version__ = "0.1.0"

__all__ = [
    "SPLIT_REGISTRY",
    "CutActivations",
    "HOSFLConfig",
    "HOSFLTrainer",
    "SplitModel",
    "Trajectory",
    "TrajectoryRound",
    "replay_trajectory",
    "split_model",
]
