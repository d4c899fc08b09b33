"""Splitting MNIST's training set among clients: IID stratified, Dirichlet(α) and label shards.

The split functions are pure: labels and a ``numpy.random.Generator`` in, a list of index arrays out
(one per client, disjoint, together covering every index exactly once). Writing a split to disk as a
federation's files is ``fedmnist.federation_files``'s job.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedmnist.config import DEFAULT_SEED, check_int, check_seed
from fedmnist.data import NUM_CLASSES
from fedmnist.errors import ConfigError
from fedmnist.settings import SETTINGS, default

SCHEMES: tuple[str, ...] = SETTINGS["partition"].choices
DIRICHLET_MAX_TRIES = 1000


@dataclass(frozen=True)
class PartitionConfig:
    """How to split the training set: scheme, number of clients, the scheme's parameter, seed."""

    scheme: str = "iid"
    num_clients: int = default("clients")
    alpha: float = default("alpha")
    shards_per_client: int = default("shards-per-client")
    seed: int = DEFAULT_SEED

    def validate(self, num_examples: int) -> None:
        """Raise ConfigError for arguments that cannot give a valid partition of ``num_examples``."""
        check_seed(self.seed, "the partition seed")
        if self.scheme not in SCHEMES:
            raise ConfigError(f"unknown partition scheme '{self.scheme}'; choose one of {', '.join(SCHEMES)}")
        check_int(self.num_clients, "the number of clients", 1)
        if self.num_clients > num_examples:
            raise ConfigError(
                f"cannot split {num_examples} images among {self.num_clients} clients: "
                "every client needs at least one image"
            )
        if self.scheme == "dirichlet" and not (self.alpha > 0 and np.isfinite(self.alpha)):
            raise ConfigError(f"the Dirichlet concentration alpha must be > 0 (got {self.alpha})")
        if self.scheme == "shards":
            check_int(self.shards_per_client, "shards per client", 1)
            num_shards = self.num_clients * self.shards_per_client
            if num_examples % num_shards:
                raise ConfigError(
                    f"{num_examples} images do not divide into {num_shards} equal shards "
                    f"({self.num_clients} clients x {self.shards_per_client} shards); choose counts "
                    f"whose product divides {num_examples}"
                )

    def describe(self) -> str:
        """Short human-readable label, e.g. 'dirichlet(alpha=0.3)'."""
        if self.scheme == "dirichlet":
            return f"dirichlet(alpha={self.alpha:g})"
        if self.scheme == "shards":
            return f"shards({self.shards_per_client}/client)"
        return "iid"


def partition_iid(labels: np.ndarray, num_clients: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Stratified IID split: each client's count of every class is within ±1 of (class total)/N.

    Indices of each class are shuffled and dealt round-robin, continuing the deal across classes, so
    client sizes also differ by at most one.
    """
    order = np.concatenate([rng.permutation(np.flatnonzero(labels == c)) for c in range(NUM_CLASSES)])
    seats = rng.permutation(num_clients)
    owner = seats[np.arange(order.size) % num_clients]
    return [np.sort(order[owner == k]) for k in range(num_clients)]


def partition_dirichlet(
    labels: np.ndarray,
    num_clients: int,
    alpha: float,
    rng: np.random.Generator,
    min_size: int | None = None,
) -> list[np.ndarray]:
    """Non-IID split with class proportions per client drawn from Dirichlet(α) (Hsu et al. 2019).

    For each class, a vector p ~ Dir(α·1_N) gives the share of that class each client receives. The
    draw is repeated until every client holds at least ``min_size`` images (default: 10, or fewer for
    tiny datasets), so no client is empty. Small α gives few classes per client; large α tends to IID.
    """
    if min_size is None:
        min_size = max(1, min(10, labels.size // (2 * num_clients)))
    by_class = [np.flatnonzero(labels == c) for c in range(NUM_CLASSES)]
    for _ in range(DIRICHLET_MAX_TRIES):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        for idx in by_class:
            if idx.size == 0:
                continue
            shuffled = rng.permutation(idx)
            shares = rng.dirichlet(np.full(num_clients, alpha))
            cuts = (np.cumsum(shares)[:-1] * idx.size).astype(np.int64)
            for k, piece in enumerate(np.split(shuffled, cuts)):
                parts[k].append(piece)
        result = [np.sort(np.concatenate(p)) if p else np.empty(0, np.int64) for p in parts]
        if min(r.size for r in result) >= min_size:
            return result
    raise ConfigError(
        f"could not draw a Dirichlet(alpha={alpha}) split of {labels.size} images in which all "
        f"{num_clients} clients get at least {min_size} images after {DIRICHLET_MAX_TRIES} tries; "
        "use fewer clients or a larger alpha"
    )


def partition_shards(
    labels: np.ndarray, num_clients: int, shards_per_client: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """Pathological non-IID split (McMahan et al. 2017): sort by label, cut equal shards, deal S each.

    With 60,000 images, 100 clients and 2 shards of 300, most clients see only two digits.
    """
    num_shards = num_clients * shards_per_client
    if labels.size % num_shards:
        raise ConfigError(f"{labels.size} images do not divide into {num_shards} equal shards")
    shuffled = rng.permutation(labels.size)
    by_label = shuffled[np.argsort(labels[shuffled], kind="stable")]
    shards = by_label.reshape(num_shards, -1)
    assignment = rng.permutation(num_shards).reshape(num_clients, shards_per_client)
    return [np.sort(shards[row].ravel()) for row in assignment]


def partition(labels: np.ndarray, config: PartitionConfig) -> list[np.ndarray]:
    """Split ``labels`` as ``config`` says, seeded by ``config.seed``."""
    labels = np.asarray(labels)
    config.validate(labels.size)
    if labels.size and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise ConfigError(f"labels must lie in 0..{NUM_CLASSES - 1} (found {labels.min()}..{labels.max()})")
    rng = np.random.default_rng(config.seed)
    if config.scheme == "iid":
        return partition_iid(labels, config.num_clients, rng)
    if config.scheme == "dirichlet":
        return partition_dirichlet(labels, config.num_clients, config.alpha, rng)
    return partition_shards(labels, config.num_clients, config.shards_per_client, rng)


def class_counts(labels: np.ndarray, parts: list[np.ndarray]) -> np.ndarray:
    """Matrix (num_clients, 10) of how many images of each class every client holds."""
    return np.stack([np.bincount(labels[p], minlength=NUM_CLASSES) for p in parts])
