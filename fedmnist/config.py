"""Project-wide defaults and the local-training settings, importable without loading TensorFlow."""

from __future__ import annotations

import math
from dataclasses import dataclass

from fedmnist.settings import SETTINGS, default

DEFAULT_SEED: int = default("seed")
"""Seed of the shared initial weights (``build_model``) and of every seeded step by default."""

DEFAULT_METHODS = ("fedavg", "fedprox", "fedmed")
"""The course's three aggregation methods."""

OPTIMIZERS: tuple[str, ...] = SETTINGS["optimizer"].choices


def _need(ok: bool, message: str) -> None:
    if not ok:
        from fedmnist.errors import ConfigError

        raise ConfigError(message)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class TrainingConfig:
    """A client's local training, the one default of every mode (notebook, train, demo, simulation, Flower).

    The defaults (``fedmnist.settings``) are what a Keras user writes for this CNN: Adam, lr 10⁻³, 2 epochs
    of batches of 32, under which one-shot FedAvg of 5 IID members stays close to their local models.
    Adam has no momentum (0, so that saved configurations do not claim one). ``AGGRESSIVE_TRAINING`` is
    the setting where client drift shows. ``build_trainer`` gives the ``ClientTrainer`` it describes.
    """

    epochs: int = default("local-epochs")
    batch_size: int = default("batch-size")
    optimizer: str = default("optimizer")
    learning_rate: float = default("learning-rate")
    momentum: float = default("momentum")

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

    def build_trainer(self, model_seed: int = DEFAULT_SEED):
        """A new ``fedmnist.training.ClientTrainer`` with this optimizer, rate and momentum (imports TensorFlow)."""
        self.validate()
        from fedmnist.training import ClientTrainer

        return ClientTrainer(self.optimizer, self.learning_rate, self.momentum, model_seed=model_seed)


AGGRESSIVE_TRAINING = TrainingConfig(epochs=1, batch_size=32, optimizer="sgd", learning_rate=0.05, momentum=0.9)
"""The local training where one-shot FedAvg drifts: SGD, lr 0.05, momentum 0.9, one epoch of batches of 32.

The simulation's and Flower's default until the defaults were unified; the essay's course-setting runs
(``fedmnist experiments``, the drift grid, the benchmarks) pin it, so their committed numbers reproduce."""
