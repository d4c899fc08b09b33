"""Hyper-parameters chosen on a validation split carved from the training data, never on the test set.

``validation_split`` holds out a seeded random sample of MNIST's training images: the tuning runs split
the rest among the clients and are scored on the held-out images, which play the test set's role. A
grid (``Grid``) lists each method's candidate settings; ``tuning_score`` turns a tuning run's curve of
validation accuracy into one number and ``best`` picks the candidate with the highest, the first of equals.
The final runs then use the whole training set and the test set, which no choice has seen.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from fedmnist.config import check_int
from fedmnist.errors import ConfigError

VALIDATION_STREAM = 7
"""Stream number (see ``fedmnist.seeds``) of the draw of the held-out images."""

Grid = Mapping[str, Mapping[str, Sequence[float]]]
"""Method -> flat simulation setting -> candidate values; the candidates are the product of the values."""


def validation_split(mnist, size: int, seed: int):
    """``mnist`` with ``size`` training images (a seeded draw) moved out of training and into the test set.

    The test images are dropped, so nothing tuned on the result has seen them.
    """
    from fedmnist.data import Mnist

    n = int(mnist.y_train.size)
    check_int(size, "the validation split's number of training images", 1, n - 1, numpy=True)
    held = np.sort(np.random.default_rng([seed, VALIDATION_STREAM]).choice(n, size=int(size), replace=False))
    keep = np.setdiff1d(np.arange(n), held, assume_unique=True)
    return Mnist(mnist.x_train[keep], mnist.y_train[keep], mnist.x_train[held], mnist.y_train[held])


def candidates(grid: Mapping[str, Sequence[float]]) -> list[dict[str, float]]:
    """Every combination of ``grid``'s values, in order (one empty candidate for an empty grid)."""
    names = list(grid)
    for name in names:
        if not grid[name]:
            raise ConfigError(f"the tuning grid gives no value for {name}")
    return [dict(zip(names, values)) for values in itertools.product(*(grid[n] for n in names))]


def candidate_label(settings: Mapping[str, float]) -> str:
    """A short, file-name-safe label of ``settings`` (``learning_rate=0.1`` -> ``lr0.1``)."""
    short = {"learning_rate": "lr", "server_lr": "slr", "server_momentum": "mom", "mu": "mu", "tau": "tau",
             "beta_1": "b1", "beta_2": "b2"}
    return "_".join(f"{short.get(k, k)}{v:g}" for k, v in settings.items()) or "default"


def tuning_score(curve: Sequence[float | None], last: int = 2) -> float:
    """Mean validation accuracy of the last ``last`` evaluated rounds (NaN if none was evaluated).

    Averaging two rounds damps the round-to-round swing of non-IID runs, so one lucky round does not
    decide the choice.
    """
    values = [float(v) for v in curve if v is not None and math.isfinite(float(v))]
    if not values:
        return math.nan
    return float(np.mean(values[-last:]))


@dataclass(frozen=True)
class Trial:
    """One tuning run: a method with candidate settings, its validation curve and score."""

    method: str
    settings: dict
    curve: tuple[float, ...]
    score: float
    seconds: float


def best(trials: Sequence[Trial]) -> Trial:
    """The trial with the highest score (NaN scores lose; the first of equal scores wins); ConfigError if none has one."""
    if not trials:
        raise ConfigError("no tuning trial to choose from")
    if all(math.isnan(t.score) for t in trials):
        raise ConfigError(f"every tuning trial of {trials[0].method} has no validation score")
    return max(trials, key=lambda t: -math.inf if math.isnan(t.score) else t.score)
