"""What the report covers: the methods (in the algorithm registry's order, via `grid.METHODS`) and their labels, the
tasks, depths and seeds of the full grid, and the control every method's paired difference is taken against."""

from __future__ import annotations

from grid import METHODS  # one order of the methods, the registry's

__all__ = ["DEPTHS", "LABELS", "METHODS", "REFERENCE", "SEEDS", "TASKS"]

LABELS = {
    "hosfl": "HO-SFL",
    "splitlora": "SplitLoRA (FO-SFL)",
    "zo_sfl": "ZO-SFL",
    "fedavg_lora": "FedAvg-LoRA",
    "centralized": "Centralized FO",
    "mezo": "MeZO",
    "frozen_client": "Frozen client",
    "client_only": "Client only",
}
TASKS = ("sst2", "rte")
DEPTHS = ("deep", "shallow")
SEEDS = (0, 1, 2)  # the full grid's seeds (grid.py's default)
REFERENCE = "frozen_client"  # the control every method's paired training-loss difference is taken against
