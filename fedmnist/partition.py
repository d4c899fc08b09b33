"""Splitting MNIST's training set among clients: IID stratified, Dirichlet(α) and label shards.

The split functions are pure: labels and a ``numpy.random.Generator`` in, a list of index arrays out
(one per client, disjoint, together covering every index exactly once).
"""

from __future__ import annotations

import json
import os
import platform
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from fedmnist import __version__
from fedmnist.config import check_seed
from fedmnist.data import (
    NUM_CLASSES,
    PARTITION_MAX_BYTES,
    Mnist,
    client_file,
    common_test_file,
    save_arrays,
)
from fedmnist.errors import ConfigError, DataError
from fedmnist.exchange import check_num_examples
from fedmnist.io import atomic_write_text, check_writable_dir, read_capped, sha256_file

SCHEMES = ("iid", "dirichlet", "shards")
MANIFEST_FILE = "particion.json"
DISTRIBUTION_PLOT = "distribucion_clases.png"
DIRICHLET_MAX_TRIES = 1000
MANIFEST_MAX_BYTES = 16 << 20
"""Largest particion.json read: a manifest of 10,000 clients takes about 3 MB."""
MAX_CLIENTS = 1_000_000
_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class PartitionConfig:
    """How to split the training set: scheme, number of clients, the scheme's parameter, seed."""

    scheme: str = "iid"
    num_clients: int = 5
    alpha: float = 0.5
    shards_per_client: int = 2
    seed: int = 42

    def validate(self, num_examples: int) -> None:
        """Raise ConfigError for arguments that cannot give a valid partition of ``num_examples``."""
        check_seed(self.seed, "the partition seed")
        if self.scheme not in SCHEMES:
            raise ConfigError(f"unknown partition scheme '{self.scheme}'; choose one of {', '.join(SCHEMES)}")
        if self.num_clients < 1:
            raise ConfigError(f"the number of clients must be at least 1 (got {self.num_clients})")
        if self.num_clients > num_examples:
            raise ConfigError(
                f"cannot split {num_examples} images among {self.num_clients} clients: "
                "every client needs at least one image"
            )
        if self.scheme == "dirichlet" and not (self.alpha > 0 and np.isfinite(self.alpha)):
            raise ConfigError(f"the Dirichlet concentration alpha must be > 0 (got {self.alpha})")
        if self.scheme == "shards":
            if self.shards_per_client < 1:
                raise ConfigError(f"shards per client must be at least 1 (got {self.shards_per_client})")
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


def write_federation(mnist: Mnist, config: PartitionConfig, out_dir: str | Path) -> Path:
    """Write the client partitions, the common test set, the manifest and the class heatmap.

    ``mnist`` holds raw uint8 images. Every file is written atomically; the manifest is written last,
    so a directory with ``particion.json`` is complete. Returns the manifest's path.
    """
    from fedmnist.plots import plot_class_distribution

    out_dir = check_writable_dir(out_dir, "output directory")
    parts = partition(mnist.y_train, config)
    counts = class_counts(mnist.y_train, parts)
    out_dir.mkdir(parents=True, exist_ok=True)
    clients = []
    for k, idx in enumerate(parts, start=1):
        path = client_file(out_dir, k)
        save_arrays(path, mnist.x_train[idx], mnist.y_train[idx])
        clients.append({
            "client_id": k,
            "file": path.name,
            "num_examples": int(idx.size),
            "class_counts": counts[k - 1].tolist(),
            "sha256": sha256_file(path),
        })
    test_path = common_test_file(out_dir)
    save_arrays(test_path, mnist.x_test, mnist.y_test)
    plot_class_distribution(counts, out_dir / DISTRIBUTION_PLOT, title=config.describe())
    manifest = {
        "format": "fedmnist-partition",
        "version": 1,
        "config": asdict(config),
        "num_clients": config.num_clients,
        "num_train_examples": int(mnist.y_train.size),
        "clients": clients,
        "test": {
            "file": test_path.name,
            "num_examples": int(mnist.y_test.size),
            "class_counts": np.bincount(mnist.y_test, minlength=NUM_CLASSES).tolist(),
            "sha256": sha256_file(test_path),
        },
        "software": {"fedmnist": __version__, "numpy": np.__version__, "python": platform.python_version()},
    }
    manifest_path = out_dir / MANIFEST_FILE
    atomic_write_text(manifest_path, json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    return manifest_path


def read_manifest(data_dir: str | Path) -> dict | None:
    """The federation manifest of ``data_dir``, checked, or None if there is none.

    The file is read only up to ``MANIFEST_MAX_BYTES``; it must be a JSON object whose ``clients``
    list gives each client a distinct integer ``client_id`` >= 1 and, where stated, a ``num_examples``
    that passes ``fedmnist.exchange.check_num_examples`` and a hexadecimal ``sha256``.

    Raises:
        DataError: naming the file and the problem (never a JSON traceback).
    """
    path = Path(data_dir) / MANIFEST_FILE
    if not os.path.lexists(path):  # a dangling link is refused below, not taken for "no manifest"
        return None
    data = read_capped(path, MANIFEST_MAX_BYTES, "federation manifest", error=DataError)
    try:
        manifest = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise DataError(f"{path}: not a valid JSON manifest ({type(exc).__name__}: {str(exc)[:200]})") from None
    _check_manifest(path, manifest)
    return manifest


def _check_manifest(path: Path, manifest) -> None:
    if not isinstance(manifest, dict):
        raise DataError(f"{path}: the manifest must be a JSON object, found {type(manifest).__name__}")
    clients = manifest.get("clients")
    if not isinstance(clients, list):
        raise DataError(f"{path}: the manifest has no 'clients' list")
    seen = set()
    for i, entry in enumerate(clients):
        if not isinstance(entry, dict):
            raise DataError(f"{path}: clients[{i}] is not an object")
        client_id = entry.get("client_id")
        if isinstance(client_id, bool) or not isinstance(client_id, int) or not 1 <= client_id <= MAX_CLIENTS:
            raise DataError(f"{path}: clients[{i}] has no valid client_id (an integer from 1 to {MAX_CLIENTS:,})")
        if client_id in seen:
            raise DataError(f"{path}: client {client_id} appears twice")
        seen.add(client_id)
        if entry.get("num_examples") is not None:
            check_num_examples(entry["num_examples"], f"{path}: client {client_id}", error=DataError)
        digest = entry.get("sha256")
        if digest is not None and not (isinstance(digest, str) and _SHA256.fullmatch(digest)):
            raise DataError(f"{path}: client {client_id} has a malformed sha256")
    test = manifest.get("test")
    if test is not None:
        if not isinstance(test, dict):
            raise DataError(f"{path}: 'test' is not an object")
        digest = test.get("sha256")
        if digest is not None and not (isinstance(digest, str) and _SHA256.fullmatch(digest)):
            raise DataError(f"{path}: the test set has a malformed sha256")


def check_file_hash(path: str | Path, expected: str | None, what: str) -> None:
    """Refuse ``path`` if its sha256 differs from ``expected``, the hash ``particion.json`` recorded for it.

    The hash catches an accident or a careless edit (a file copied from another federation, truncated,
    swapped for a few images); whoever can rewrite the manifest can rewrite the hash too. The file is
    hashed through ``fedmnist.io.sha256_file``: a FIFO or a device in its place is refused unread.

    Raises:
        DataError: naming the file; nothing is read when ``expected`` is None.
    """
    if not expected:
        return
    if sha256_file(path, PARTITION_MAX_BYTES, what, error=DataError) != expected:
        raise DataError(
            f"{path}: contents differ from the manifest's sha256 ({MANIFEST_FILE}): the {what} was changed or corrupted; "
            "copy it again from the federation written by split_data.py"
        )


def checked_test_file(test_path: str | Path) -> Path:
    """``test_path``, the common test set, checked against the sha256 that ``particion.json`` beside it gives.

    Without a manifest in its directory (a Flower ``test-file`` elsewhere) only its existence is checked;
    the npz reader checks its contents either way.

    Raises:
        DataError: missing, not a regular file, or different from the manifest's hash.
    """
    test_path = Path(test_path)
    if not os.path.lexists(test_path):
        raise DataError(f"{test_path}: common test set not found; run split_data.py first")
    manifest = read_manifest(test_path.parent)
    entry = manifest.get("test") if manifest else None
    if isinstance(entry, dict) and entry.get("file") == test_path.name:
        check_file_hash(test_path, entry.get("sha256"), "common test set")
    return test_path


def manifest_counts(manifest: dict | None) -> dict[int, int] | None:
    """Each client's sample count from a manifest read by ``read_manifest`` (None without one or counts).

    The server refuses an update whose claimed count differs from these.
    """
    if not manifest:
        return None
    counts = {c["client_id"]: int(c["num_examples"]) for c in manifest["clients"]
              if c.get("num_examples") is not None}
    return counts or None
