"""Metrics of the classification tasks.

Accuracy is the proportion of correct predictions, as `evaluate.load("accuracy")` computes it; it is defined here with
numpy so that evaluation needs neither the Hub (where `evaluate` fetches its metric scripts) nor `evaluate` and
`scikit-learn` as dependencies.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["Accuracy", "load_accuracy"]


class Accuracy:
    """Proportion of correct predictions, with the interface of an `evaluate` metric (`compute(predictions=...,
    references=...)` -> `{"accuracy": float}`)."""

    name = "accuracy"

    def compute(self, predictions: Sequence[int], references: Sequence[int]) -> dict[str, float]:
        predictions, references = np.asarray(predictions), np.asarray(references)
        if predictions.shape != references.shape:
            raise ValueError(f"{predictions.shape} predictions for {references.shape} references.")
        return {"accuracy": float((predictions == references).mean()) if references.size else float("nan")}


def load_accuracy() -> Accuracy:
    """The accuracy metric."""
    return Accuracy()
