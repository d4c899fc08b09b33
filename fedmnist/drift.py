"""Client drift, measured: how far and in which directions local training moves the clients' models.

Averaging works when the clients' models stay in one basin of the loss around the shared start. These
pure functions over lists of layer arrays quantify how far they leave it:

* ``update_norms``: ‖w_k − w₀‖ per client (how far each one walked);
* ``update_cosines``: the cosine between every pair of updates w_k − w₀ (whether they walked the same
  way: near 1 for IID clients with little local work, lower as local optima diverge);
* ``segment``: the models along the straight segment between two models, and ``barrier``, how much
  their loss rises above the endpoints (Frankle et al. 2020's linear-mode-connectivity barrier): a large
  barrier means the average of the two lands in a worse region than either, which is where one-shot
  FedAvg loses to the local models.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fedmnist.model import layers_mismatch

Arrays = Sequence[np.ndarray]


def _flat(weights: Arrays) -> np.ndarray:
    return np.concatenate([np.asarray(w, dtype=np.float64).ravel() for w in weights])


def _updates(start: Arrays, clients: Sequence[Arrays]) -> np.ndarray:
    """One row per client: its flattened w_k − w₀."""
    if not clients:
        raise ValueError("no client models to measure")
    base = _flat(start)
    shapes = [np.shape(w) for w in start]
    rows = []
    for k, weights in enumerate(clients):
        problem = layers_mismatch(list(weights), shapes, "the start", numpy_only=False)
        if problem is not None:
            raise ValueError(f"client {k}: {problem}")
        rows.append(_flat(weights) - base)
    return np.stack(rows)


def update_norms(start: Arrays, clients: Sequence[Arrays]) -> list[float]:
    """‖w_k − w₀‖₂ of every client."""
    return [float(v) for v in np.linalg.norm(_updates(start, clients), axis=1)]


def update_cosines(start: Arrays, clients: Sequence[Arrays]) -> list[float]:
    """Cosine similarity of every pair (i < j) of client updates, in pair order (0 for a zero update)."""
    updates = _updates(start, clients)
    norms = np.linalg.norm(updates, axis=1)
    out = []
    for i in range(len(updates)):
        for j in range(i + 1, len(updates)):
            denom = norms[i] * norms[j]
            out.append(float(updates[i] @ updates[j] / denom) if denom > 0 else 0.0)
    return out


def interpolate(a: Arrays, b: Arrays, t: float) -> list[np.ndarray]:
    """(1 − t)·a + t·b, layer by layer, in a's dtype."""
    problem = layers_mismatch(list(b), [np.shape(x) for x in a], "a", numpy_only=False)
    if problem is not None:
        raise ValueError(f"b: {problem}")
    return [((1 - t) * np.asarray(x, np.float64) + t * np.asarray(y, np.float64)).astype(np.asarray(x).dtype)
            for x, y in zip(a, b)]


def segment(a: Arrays, b: Arrays, points: int = 11) -> list[list[np.ndarray]]:
    """``points`` evenly spaced models from ``a`` (t = 0) to ``b`` (t = 1), whose losses ``barrier`` reads."""
    if points < 2:
        raise ValueError(f"a segment needs at least 2 points (got {points})")
    return [interpolate(a, b, t) for t in np.linspace(0.0, 1.0, points)]


def barrier(losses: Sequence[float]) -> float:
    """max over the segment of loss(t) − ((1 − t)·loss(0) + t·loss(1)): 0 when the path is convex-like."""
    values = np.asarray(losses, dtype=np.float64)
    if values.size < 2:
        raise ValueError("a barrier needs at least the two endpoints")
    t = np.linspace(0.0, 1.0, values.size)
    return float(np.max(values - ((1 - t) * values[0] + t * values[-1])))
