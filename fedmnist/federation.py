"""The simulation's federation: MNIST split among K clients in memory, plus the common test set.

The training images stay raw uint8 with one index array per client; a client's images are sliced
and normalised only when it trains, so 1,000 clients cost no more memory than 10.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fedmnist.config import _need, check_int
from fedmnist.data import normalize_images
from fedmnist.partition import SCHEMES, PartitionConfig, class_counts, partition
from fedmnist.settings import SIMULATION_CLIENTS, default

if TYPE_CHECKING:
    from fedmnist.data import Mnist


@dataclass(frozen=True)
class FederationConfig:
    """How many clients, how the training set is split among them, and which images are used."""

    num_clients: int = SIMULATION_CLIENTS
    partition: str = default("partition")
    alpha: float = default("alpha")
    shards_per_client: int = default("shards-per-client")
    train_subset: int | None = None
    test_subset: int | None = None

    def validate(self) -> None:
        """Raise ConfigError for values no federation can have (data-dependent checks come later)."""
        check_int(self.num_clients, "the number of clients", 1)
        _need(self.partition in SCHEMES, f"unknown partition '{self.partition}'; choose one of {', '.join(SCHEMES)}")
        _need(self.partition != "dirichlet" or (isinstance(self.alpha, (int, float)) and self.alpha > 0
                                               and np.isfinite(self.alpha)),
              f"the Dirichlet concentration alpha must be > 0 (got {self.alpha})")
        check_int(self.shards_per_client, "shards per client", 1)
        if self.train_subset is not None:
            check_int(self.train_subset, f"--train-subset (one image or more for each of the {self.num_clients} clients)",
                      self.num_clients)
        if self.test_subset is not None:
            check_int(self.test_subset, "--test-subset", 1)

    def partition_config(self, seed: int) -> PartitionConfig:
        """The split of the training set, seeded by ``seed`` (as ``split_data.py --seed`` does)."""
        return PartitionConfig(self.partition, self.num_clients, self.alpha, self.shards_per_client, seed)


@dataclass(frozen=True)
class Federation:
    """Raw training images with one index array per client, and the normalised test set."""

    x_train: np.ndarray
    y_train: np.ndarray
    client_indices: list[np.ndarray]
    x_test: np.ndarray
    y_test: np.ndarray
    sha256: str

    def client_data(self, client_id: int) -> tuple[np.ndarray, np.ndarray]:
        """Client ``client_id``'s (1-based) images, normalised, and labels."""
        idx = self.client_indices[client_id - 1]
        return normalize_images(self.x_train[idx]), self.y_train[idx]

    @property
    def client_sizes(self) -> list[int]:
        """Every client's number of training images, by id."""
        return [int(p.size) for p in self.client_indices]

    @property
    def expected_counts(self) -> dict[int, int]:
        """Client id -> number of training images: what each client's reply must claim."""
        return {k + 1: int(p.size) for k, p in enumerate(self.client_indices)}

    @property
    def label_counts(self) -> np.ndarray:
        """(clients, 10) images of each class every client holds, row k for client k + 1.

        The partitions only skew labels, so these counts fix each client's data distribution
        (``fedmnist.evaluation.client_accuracies`` uses them).
        """
        return class_counts(self.y_train, self.client_indices)


def prepare_federation(
    config: FederationConfig, seed: int, data_path: str | Path | None = None, mnist: Mnist | None = None
) -> Federation:
    """Load MNIST (or take ``mnist``, raw uint8), keep the first train/test subset images, split them."""
    from fedmnist.data import load_raw_mnist
    from fedmnist.errors import ConfigError

    mnist = mnist if mnist is not None else load_raw_mnist(data_path)
    x_train, y_train, x_test, y_test = mnist.x_train, mnist.y_train, mnist.x_test, mnist.y_test
    if config.train_subset is not None:
        if config.train_subset > len(y_train):
            raise ConfigError(f"--train-subset {config.train_subset} exceeds the {len(y_train)} training images")
        x_train, y_train = x_train[: config.train_subset], y_train[: config.train_subset]
    if config.test_subset is not None:
        if config.test_subset > len(y_test):
            raise ConfigError(f"--test-subset {config.test_subset} exceeds the {len(y_test)} test images")
        x_test, y_test = x_test[: config.test_subset], y_test[: config.test_subset]
    split = config.partition_config(seed)
    split.validate(len(y_train))
    parts = partition(y_train, split)
    digest = hashlib.sha256()
    for array in (x_train, y_train, x_test, y_test):
        digest.update(f"{array.dtype.str}{array.shape}".encode())
        digest.update(memoryview(np.ascontiguousarray(array)))
    return Federation(x_train, y_train, parts, normalize_images(x_test), y_test, digest.hexdigest())
