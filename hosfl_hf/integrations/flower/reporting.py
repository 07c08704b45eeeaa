"""Per-round metrics of a Flower run to the experiment trackers a `Trainer` reports to (run-config `report-to`).

The ServerApp runs the protocol's round loop, not the `Trainer`'s, so it drives transformers' own integration
callbacks itself (`transformers.integrations.get_reporting_integration_callbacks`: `tensorboard`, `trackio`,
`wandb`, `mlflow`, ...): `on_train_begin` before round 1, `on_log` with each round's metrics at step `round`, and
`on_train_end`. Each tracker is configured as for the Trainer (e.g. TensorBoard writes under
`<output-dir>/runs/`, or `$TENSORBOARD_LOGGING_DIR`). `jsonl` is this package's own, dependency-free reporter: one
JSON object per round appended to `<output-dir>/flower_metrics.jsonl` as the run goes (`tail -f` it).
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

__all__ = ["JSONL_NAME", "RoundReporter", "round_metrics"]

JSONL_NAME = "flower_metrics.jsonl"


def round_metrics(record: dict[str, Any]) -> dict[str, float]:
    """The numbers of one applied round's record, under the names a `Trainer` logs (`loss`, `learning_rate`, ...)."""
    metrics = {
        "loss": record["loss"],
        "learning_rate": record["learning_rate"],
        "client_learning_rate": record["client_learning_rate"],
        "finishers": len(record["finishers"]),
        "seconds": record["seconds"],
    }
    for key, value in record.items():
        if key.startswith(("eval_", "comm/", "fed/")) or key.endswith("_update_norm"):
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                metrics[key] = value
    return metrics


def _names(report_to: str | list[str]) -> list[str]:
    names = report_to.split(",") if isinstance(report_to, str) else list(report_to)
    return [n.strip() for n in names if n.strip() and n.strip() != "none"]


class RoundReporter:
    """`FederatedRun(on_round=...)` hook that sends each round's [`round_metrics`] to the configured trackers.

    Args:
        args (`HOSFLConfig`): the run's arguments (the trackers read `output_dir`, `run_name`, ...).
        report_to (`str` or `list[str]`): comma-separated names: `"none"`, `"all"` (every installed tracker
            transformers knows), any of transformers' integrations, and/or `"jsonl"`.
        callbacks (`list[TrainerCallback]`, *optional*): more callbacks to drive (e.g. your own).
    """

    def __init__(self, args: Any, report_to: str | list[str] = "none", callbacks: list | None = None):
        from transformers import TrainerControl, TrainerState
        from transformers.integrations import get_available_reporting_integrations, get_reporting_integration_callbacks

        names = _names(report_to)
        if "all" in names:
            names = [n for n in names if n != "all"] + get_available_reporting_integrations() + ["jsonl"]
        self.jsonl = os.path.join(args.output_dir, JSONL_NAME) if "jsonl" in names else None
        self.callbacks = list(callbacks or [])
        for cls in get_reporting_integration_callbacks([n for n in dict.fromkeys(names) if n != "jsonl"]):
            try:
                self.callbacks.append(cls())
            except (RuntimeError, ImportError) as error:  # the tracker's package is missing
                raise ValueError(
                    f"Run-config report-to={report_to!r}: {cls.__name__} cannot start ({error}). Install the "
                    "tracker's package on the server or remove it from 'report-to'."
                ) from error
        self.args, self.state, self.control = args, TrainerState(), TrainerControl()
        self.started = False

    def _begin(self) -> None:
        self.started = True
        if self.jsonl is not None:
            os.makedirs(os.path.dirname(self.jsonl) or ".", exist_ok=True)
            open(self.jsonl, "w").close()  # one run per file
        for callback in self.callbacks:
            callback.on_train_begin(self.args, self.state, self.control)

    def log(self, metrics: dict[str, float], step: int) -> None:
        """Sends `metrics` at `step` (1-based round) to every tracker."""
        if not self.started:
            self._begin()
        self.state.global_step = step
        self.state.log_history.append({**metrics, "step": step})
        if self.jsonl is not None:
            with open(self.jsonl, "a") as f:
                f.write(json.dumps({"round": step, **metrics}) + "\n")
        for callback in self.callbacks:
            callback.on_log(self.args, self.state, self.control, logs=dict(metrics))

    def __call__(self, record: dict[str, Any]) -> None:
        self.log(round_metrics(record), record["round"] + 1)

    def close(self, final: dict[str, float] | None = None) -> None:
        """Logs the final evaluation (`final`, at the last step) and ends every tracker's run."""
        if final:
            self.log(dict(final), self.state.global_step)
        if self.started:
            for callback in self.callbacks:
                callback.on_train_end(self.args, self.state, self.control)
