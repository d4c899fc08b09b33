"""Test-set metrics: accuracy with a 95% Wilson interval, loss, per-class accuracy, confusion matrix.

Also how each client fares under one global model (``client_accuracies``): the federations split one
MNIST pool by label only, so a client's data distribution is its label proportions times the pool's
images of each class, and its expected accuracy is the test set's per-class accuracy re-weighted by
those proportions.
"""

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


def per_class_accuracy(predictor, weights: list[np.ndarray] | None, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Accuracy of ``weights`` on the images of each class of (x, y): shape (10,), one predict pass.

    A class with no image in ``y`` gets NaN (its accuracy is unknown, not zero).
    """
    _, predicted = predictor.predict(weights, x, y)
    confusion = confusion_matrix(y, predicted)
    support = confusion.sum(axis=1)
    return np.divide(np.diag(confusion), support, out=np.full(NUM_CLASSES, np.nan), where=support > 0)


def client_accuracies(class_accuracy: np.ndarray, label_counts: np.ndarray) -> np.ndarray:
    """Each client's expected accuracy on fresh data of its own distribution: Σ_c p_k(c)·acc_c.

    ``class_accuracy`` (10,) is a model's accuracy on the common test images of each class and
    ``label_counts`` (clients, 10) how many training images of each class every client holds, so
    p_k(c) is row k normalised. This is the exact expectation over the client's distribution (its
    "own held-out data": the test images re-weighted by its label proportions), with no sampling
    noise beyond the test set's; it is valid because the partitions skew only the labels, every
    client drawing the images of a class from the same pool.

    Raises:
        ValueError: mismatched shapes, a client with no image, negative counts, or a client holding a
            class whose accuracy is unknown (NaN: no test image of that class).
    """
    accuracy = np.asarray(class_accuracy, dtype=np.float64)
    counts = np.asarray(label_counts, dtype=np.float64)
    if accuracy.ndim != 1 or counts.ndim != 2 or counts.shape[1] != accuracy.size:
        raise ValueError(f"need class accuracies (C,) and label counts (clients, C); got {accuracy.shape} "
                         f"and {counts.shape}")
    if (counts < 0).any():
        raise ValueError("label counts must be >= 0")
    totals = counts.sum(axis=1)
    if (totals <= 0).any():
        raise ValueError(f"clients {np.flatnonzero(totals <= 0).tolist()} (0-based rows) hold no image")
    unknown = ~np.isfinite(accuracy)
    if (counts[:, unknown] > 0).any():
        raise ValueError(f"a client holds classes {np.flatnonzero(unknown).tolist()}, whose accuracy is "
                         "unknown (no test image of them)")
    return (counts / totals[:, None]) @ np.where(unknown, 0.0, accuracy)


def client_summary(accuracies: np.ndarray) -> dict[str, float]:
    """The mean, 10th percentile and minimum (``worst``) of the clients' accuracies.

    The percentile is numpy's default, linear interpolation between the closest ranks (with 10
    clients: the lowest plus 0.9 of the way to the second lowest).
    """
    values = np.asarray(accuracies, dtype=np.float64)
    if values.ndim != 1 or values.size == 0:
        raise ValueError("need one accuracy per client (at least one)")
    return {"mean": float(values.mean()), "p10": float(np.percentile(values, 10)), "worst": float(values.min())}
