"""A federation's files: ``cliente_N.npz``, ``test.npz``, the class heatmap and the ``particion.json`` manifest.

``write_federation`` splits MNIST (``fedmnist.partition``) and writes every file atomically, the
manifest last, so a directory holding ``particion.json`` is complete; ``read_manifest`` reads it back,
bounded and checked, for the members and the server.
"""

from __future__ import annotations

import json
import os
import platform
import re
from dataclasses import asdict
from pathlib import Path

import numpy as np

from fedmnist import __version__
from fedmnist.config import check_int
from fedmnist.data import NUM_CLASSES, PARTITION_MAX_BYTES, Mnist, client_file, common_test_file, save_arrays
from fedmnist.errors import DataError
from fedmnist.exchange import check_num_examples
from fedmnist.io import atomic_write_text, check_writable_dir, read_capped, sha256_file
from fedmnist.partition import PartitionConfig, class_counts, partition

MANIFEST_FILE = "particion.json"
DISTRIBUTION_PLOT = "distribucion_clases.png"
MANIFEST_MAX_BYTES = 16 << 20
"""Largest particion.json read: a manifest of 10,000 clients takes about 3 MB."""
MAX_CLIENTS = 1_000_000
_SHA256 = re.compile(r"[0-9a-f]{64}")


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
        client_id = check_int(entry.get("client_id"), f"{path}: clients[{i}].client_id", 1, MAX_CLIENTS,
                              error=DataError)
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
