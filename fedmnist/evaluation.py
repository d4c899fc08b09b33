"""Test-set metrics: accuracy with a 95% Wilson interval, loss, per-class accuracy, confusion matrix."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from fedmnist.data import NUM_CLASSES

Z_95 = 1.959963984540054


@dataclass(frozen=True)
class EvalResult:
    """Metrics of one model on one labelled set."""

    accuracy: float
    loss: float
    ci_low: float
    ci_high: float
    num_examples: int
    per_class_accuracy: list[float]
    confusion: np.ndarray

    def to_dict(self) -> dict:
        """JSON-ready dict (confusion as nested lists)."""
        out = asdict(self)
        out["confusion"] = self.confusion.tolist()
        return out


def wilson_interval(correct: int, total: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (default 95%)."""
    if total <= 0:
        return 0.0, 1.0
    p = correct / total
    denom = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total))
    low = 0.0 if correct == 0 else max(0.0, centre - half)
    high = 1.0 if correct == total else min(1.0, centre + half)
    return low, high


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int = NUM_CLASSES) -> np.ndarray:
    """Counts matrix: rows are true classes, columns predicted classes."""
    y_true, y_pred = np.asarray(y_true, np.int64), np.asarray(y_pred, np.int64)
    for name, values in (("true", y_true), ("predicted", y_pred)):
        if values.size and (values.min() < 0 or values.max() >= num_classes):
            raise ValueError(f"{name} labels must lie in 0..{num_classes - 1}")
    flat = y_true * num_classes + y_pred
    return np.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def summarize(y_true: np.ndarray, y_pred: np.ndarray, loss: float) -> EvalResult:
    """Metrics from true and predicted labels and the mean loss."""
    confusion = confusion_matrix(y_true, y_pred)
    correct = int(np.trace(confusion))
    total = int(confusion.sum())
    support = confusion.sum(axis=1)
    per_class = np.divide(np.diag(confusion), support, out=np.zeros(len(support)), where=support > 0)
    low, high = wilson_interval(correct, total)
    return EvalResult(
        accuracy=correct / total if total else 0.0,
        loss=float(loss),
        ci_low=low,
        ci_high=high,
        num_examples=total,
        per_class_accuracy=[float(v) for v in per_class],
        confusion=confusion,
    )


def evaluate(predictor, weights: list[np.ndarray] | None, x: np.ndarray, y: np.ndarray) -> EvalResult:
    """Evaluate ``weights`` with a ``ClientTrainer`` (or anything with its ``predict``) on (x, y)."""
    loss, predicted = predictor.predict(weights, x, y)
    return summarize(y, predicted, loss)


def intervals_overlap(a: EvalResult, b: EvalResult) -> bool:
    """Whether two accuracies' 95% intervals overlap (their difference is not clearly resolved)."""
    return a.ci_low <= b.ci_high and b.ci_low <= a.ci_high
