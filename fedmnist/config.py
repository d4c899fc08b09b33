"""Project-wide defaults and the local-training settings, importable without loading TensorFlow."""

from __future__ import annotations

import math
from dataclasses import dataclass

DEFAULT_SEED = 42
"""Seed of the shared initial weights (``build_model``) and of every seeded step by default."""

DEFAULT_METHODS = ("fedavg", "fedprox", "fedmed")
"""The course's three aggregation methods."""

OPTIMIZERS = ("sgd", "adam")


def _need(ok: bool, message: str) -> None:
    if not ok:
        from fedmnist.errors import ConfigError

        raise ConfigError(message)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_seed(seed, what: str = "seed") -> None:
    """Raise ConfigError unless ``seed`` is an integer >= 0 (numpy's and Keras's seeds cannot be negative)."""
    _need(_is_int(seed) and seed >= 0, f"{what} must be an integer >= 0 (got {seed!r})")


@dataclass(frozen=True)
class TrainingConfig:
    """A client's local training hyper-parameters, shared by every mode (notebook, simulation, Flower)."""

    epochs: int = 2
    batch_size: int = 32
    optimizer: str = "sgd"
    learning_rate: float = 0.05
    momentum: float = 0.9

    def __post_init__(self) -> None:
        if isinstance(self.optimizer, str):
            object.__setattr__(self, "optimizer", self.optimizer.strip().lower())

    def validate(self) -> None:
        """Raise ConfigError for values training cannot use."""
        _need(_is_int(self.epochs) and self.epochs >= 1, f"local epochs must be an integer >= 1 (got {self.epochs!r})")
        _need(_is_int(self.batch_size) and self.batch_size >= 1,
              f"batch size must be an integer >= 1 (got {self.batch_size!r})")
        _need(self.optimizer in OPTIMIZERS,
              f"unknown optimizer '{self.optimizer}'; choose one of {', '.join(OPTIMIZERS)}")
        _need(isinstance(self.learning_rate, (int, float)) and self.learning_rate > 0
              and math.isfinite(self.learning_rate), f"learning rate must be > 0 (got {self.learning_rate})")
        _need(isinstance(self.momentum, (int, float)) and 0 <= self.momentum < 1,
              f"momentum must be in [0, 1) (got {self.momentum})")
