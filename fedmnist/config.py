"""Project-wide defaults and the local-training settings, importable without loading TensorFlow."""

from __future__ import annotations

import math
import numbers
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


def check_seed(seed, what: str = "seed") -> None:
    """Raise ConfigError unless ``seed`` is an integer >= 0 (numpy's and Keras's seeds cannot be negative)."""
    _need(_is_int(seed) and seed >= 0, f"{what} must be an integer >= 0 (got {seed!r})")


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
        check_int(self.epochs, "local epochs", 1)
        check_int(self.batch_size, "batch size", 1)
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


def check_int(value: object, name: str, minimum: int = 0, maximum: int | None = None, *,
              numpy: bool = False, error: type[Exception] | None = None) -> int:
    """``value`` as an int when it is an integer in [``minimum``, ``maximum``]; else ``error`` naming ``name``.

    The one check of every count, seed, index and size the package validates, so the rule (``True``
    is not a count, 2.0 is not an integer) and its message, ``NAME must be an integer >= MIN (got
    VALUE)``, are written once. ``numpy`` also accepts numpy integers, for values read from arrays;
    a configuration saved as JSON keeps plain ints. ``error`` defaults to ``ConfigError``.
    """
    integral = isinstance(value, int) or (numpy and isinstance(value, numbers.Integral))
    if isinstance(value, bool) or not integral or value < minimum or (maximum is not None and value > maximum):
        from fedmnist.errors import ConfigError

        bound = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise (error or ConfigError)(f"{name} must be an integer {bound} (got {value!r})")
    return int(value)
