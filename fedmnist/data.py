"""MNIST loading and validation, and the files that hold a federation's partitions.

MNIST comes from an npz in the keras layout (``x_train``, ``y_train``, ``x_test``, ``y_test``) named by
a ``--data`` flag or the ``FEDMNIST_DATA`` environment variable, or else from
``keras.datasets.mnist.load_data()`` (which needs a network the first time).
"""

from __future__ import annotations

import io
import os
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedmnist.errors import DataError
from fedmnist.io import atomic_write_bytes

DATA_ENV = "FEDMNIST_DATA"
NUM_CLASSES = 10
IMAGE_SHAPE = (28, 28)
TEST_FILE = "test.npz"
MNIST_KEYS = ("x_train", "y_train", "x_test", "y_test")


@dataclass(frozen=True)
class Mnist:
    """MNIST arrays. Images are uint8 (n, 28, 28) when raw, float32 (n, 28, 28, 1) when normalised."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray

    def normalized(self) -> Mnist:
        """Return the float32 [0, 1] version with a channel axis."""
        return Mnist(
            normalize_images(self.x_train), self.y_train, normalize_images(self.x_test), self.y_test
        )


def resolve_data_path(path: str | os.PathLike | None) -> Path | None:
    """The MNIST npz to read: the explicit path, else ``$FEDMNIST_DATA``, else None (keras download)."""
    if path:
        return Path(path)
    env = os.environ.get(DATA_ENV)
    return Path(env) if env else None


def normalize_images(x: np.ndarray) -> np.ndarray:
    """uint8 images (n, 28, 28) to float32 in [0, 1] with a channel axis (n, 28, 28, 1)."""
    if x.dtype == np.float32 and x.ndim == 4:
        return x
    return (x.astype(np.float32) / np.float32(255.0))[..., np.newaxis]


def _read_npz(path: Path, what: str) -> dict[str, np.ndarray]:
    if not path.exists():
        raise DataError(f"{path}: {what} not found")
    if not path.is_file():
        raise DataError(f"{path}: {what} is not a file")
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise DataError(f"{path}: {what} is a single .npy array, not an npz archive with named arrays")
        with loaded as npz:
            return {key: npz[key] for key in npz.files}
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, KeyError, zlib.error) as exc:
        raise DataError(f"{path}: cannot read {what} as an npz archive ({exc})") from exc


def _check_images(path: Path, key: str, x: np.ndarray) -> None:
    if x.ndim != 3 or x.shape[1:] != IMAGE_SHAPE:
        raise DataError(f"{path}: '{key}' has shape {x.shape}, expected (n, 28, 28)")
    if x.dtype != np.uint8:
        raise DataError(f"{path}: '{key}' has dtype {x.dtype}, expected uint8 pixels 0-255")


def _check_labels(path: Path, key: str, y: np.ndarray, n: int) -> None:
    if y.ndim != 1 or y.shape[0] != n:
        raise DataError(f"{path}: '{key}' has shape {y.shape}, expected ({n},) to match the images")
    if not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{path}: '{key}' has dtype {y.dtype}, expected integer labels")
    if y.size and (y.min() < 0 or y.max() >= NUM_CLASSES):
        raise DataError(
            f"{path}: '{key}' holds labels outside 0-{NUM_CLASSES - 1} "
            f"(min {y.min()}, max {y.max()})"
        )


def load_raw_mnist(path: str | os.PathLike | None = None) -> Mnist:
    """Load and validate MNIST as uint8 images and uint8 labels.

    Raises:
        DataError: the file is missing, unreadable, or has wrong keys, shapes, dtypes or labels; or
            no file was given and the keras download failed (the message says how to pass one).
    """
    resolved = resolve_data_path(path)
    if resolved is None:
        arrays = _keras_download()
        source = Path("keras.datasets.mnist")
    else:
        arrays = _read_npz(resolved, "MNIST file")
        source = resolved
        missing = [key for key in MNIST_KEYS if key not in arrays]
        if missing:
            raise DataError(
                f"{source}: missing key(s) {', '.join(missing)}; expected the keras layout "
                f"{', '.join(MNIST_KEYS)} (found: {', '.join(sorted(arrays)) or 'none'})"
            )
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        _check_images(source, f"x_{split}", x)
        _check_labels(source, f"y_{split}", y, x.shape[0])
        if x.shape[0] == 0:
            raise DataError(f"{source}: 'x_{split}' is empty")
    return Mnist(
        arrays["x_train"], arrays["y_train"].astype(np.uint8),
        arrays["x_test"], arrays["y_test"].astype(np.uint8),
    )


def load_mnist(path: str | os.PathLike | None = None) -> Mnist:
    """Load, validate and normalise MNIST (float32 images in [0, 1], shape (n, 28, 28, 1))."""
    return load_raw_mnist(path).normalized()


def _keras_download() -> dict[str, np.ndarray]:
    try:
        import keras

        (x_train, y_train), (x_test, y_test) = keras.datasets.mnist.load_data()
    except Exception as exc:  # network errors come in many types
        raise DataError(
            "could not download MNIST through keras.datasets.mnist.load_data() "
            f"({type(exc).__name__}: {exc}). Offline, pass a local copy in the keras layout "
            f"(x_train, y_train, x_test, y_test) with --data PATH or the {DATA_ENV} environment "
            "variable, e.g. --data ../shared/data/mnist.npz"
        ) from exc
    return {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}


# --- partition files -------------------------------------------------------------------------


def client_file(data_dir: str | os.PathLike, client_id: int) -> Path:
    """Path of client ``client_id``'s partition (ids start at 1)."""
    return Path(data_dir) / f"cliente_{client_id}.npz"


def common_test_file(data_dir: str | os.PathLike) -> Path:
    """Path of the common test set of a federation directory."""
    return Path(data_dir) / TEST_FILE


def save_arrays(path: str | os.PathLike, x: np.ndarray, y: np.ndarray) -> None:
    """Write a partition (uint8 images ``x``, uint8 labels ``y``) atomically and reproducibly.

    The npz is written with fixed zip timestamps so the same arrays give byte-identical files.
    """
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for key, array in (("x", x), ("y", y)):
            member = io.BytesIO()
            np.lib.format.write_array(member, np.ascontiguousarray(array), allow_pickle=False)
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, member.getvalue())
    atomic_write_bytes(path, buffer.getvalue())


def load_partition_raw(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Load and validate a partition file: uint8 images (n, 28, 28) and uint8 labels (n,)."""
    path = Path(path)
    arrays = _read_npz(path, "partition file")
    for key in ("x", "y"):
        if key not in arrays:
            raise DataError(
                f"{path}: missing key '{key}'; a partition file holds 'x' (n, 28, 28) uint8 images "
                "and 'y' (n,) labels, as written by split_data.py"
            )
    x, y = arrays["x"], arrays["y"]
    _check_images(path, "x", x)
    _check_labels(path, "y", y, x.shape[0])
    if x.shape[0] == 0:
        raise DataError(f"{path}: the partition holds no images")
    return x, y.astype(np.uint8)


def load_partition(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Load a partition file normalised for training: float32 (n, 28, 28, 1) images, uint8 labels."""
    x, y = load_partition_raw(path)
    return normalize_images(x), y


def load_client_partition(data_dir: str | os.PathLike, client_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Load client ``client_id``'s normalised partition from a federation directory."""
    return load_partition(client_file(data_dir, client_id))


def load_test_set(data_dir: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Load the federation's common test set, normalised."""
    return load_partition(common_test_file(data_dir))
