"""Metrics, computed with `evaluate`.

`evaluate.load("accuracy")` fetches its script from the Hub; the same metric is defined here as an
`evaluate.Metric` so that evaluation works offline and never waits on the network.
"""

from __future__ import annotations

import datasets
import evaluate
from sklearn.metrics import accuracy_score

__all__ = ["Accuracy", "load_accuracy"]


class Accuracy(evaluate.Metric):
    """Proportion of correct predictions (the `evaluate-metric/accuracy` metric, bundled for offline use)."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description="Accuracy: the proportion of correct predictions among all predictions.",
            citation="",
            inputs_description="predictions: list of int, references: list of int",
            features=datasets.Features(
                {"predictions": datasets.Value("int32"), "references": datasets.Value("int32")}
            ),
        )

    def _compute(self, predictions, references, normalize=True, sample_weight=None):
        return {
            "accuracy": float(
                accuracy_score(references, predictions, normalize=normalize, sample_weight=sample_weight)
            )
        }


def load_accuracy() -> evaluate.Metric:
    """The accuracy metric (bundled: identical to `evaluate.load("accuracy")`, without a Hub download)."""
    return Accuracy()
