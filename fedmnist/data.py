"""MNIST loading and validation, and the files that hold a federation's partitions.

MNIST comes from an npz in the keras layout (``x_train``, ``y_train``, ``x_test``, ``y_test``) named by
a ``--data`` flag or the ``FEDMNIST_DATA`` environment variable, or else from
``keras.datasets.mnist.load_data()`` (which needs a network the first time).

Every npz (MNIST, ``cliente_N.npz``, ``test.npz``) is read member by member with ``_NpzReader``: only
the arrays asked for, each ``.npy`` header checked (shape, dtype, at most ``MAX_IMAGES`` images)
before its data is read, never more bytes than the header declares, and nothing unpickled; a file
built to exhaust memory or time gets a ``DataError`` naming it.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedmnist.errors import DataError
from fedmnist.io import atomic_write_bytes, open_regular, quote

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


MAX_IMAGES = 100_000
"""Most images one array of an npz may hold: MNIST has 60,000 training and 10,000 test images."""
_MAX_LABEL_ITEMSIZE = 8
_NPZ_SLACK = 1 << 20  # zip headers, npy headers and small extra members
_MAX_CENTRAL_DIRECTORY = 1 << 20  # a legit npz lists a handful of members in a few hundred bytes
_MAX_NPY_HEADER = 10_000  # numpy's own default limit
_CHUNK = 1 << 20
_NPY_MAGIC = b"\x93NUMPY"


@dataclass(frozen=True)
class _Header:
    """What an ``.npy`` member declares before its data: checked before anything is allocated."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    fortran: bool
    offset: int
    listed: int  # bytes of data the archive lists after the header

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def _shown(shape: tuple[int, ...]) -> str:
    text = str(shape)
    return text if len(text) <= 60 else f"a shape of {len(shape)} axes with sizes of up to {len(str(max(shape)))} digits"


class _NpzReader:
    """An npz archive read member by member: only the requested ``.npy`` members, headers first.

    ``np.load`` would decompress members nobody asked for and allocate whatever a header declares;
    here the archive's size, its central directory, each member's compression method, declared
    size and ``.npy`` header are checked before a member's data is read, and the data is read into
    an array of exactly the declared size (a compressed bomb cannot inflate past it). Nothing is ever
    unpickled (``allow_pickle=False``: object dtypes are refused from the header).
    """

    def __init__(self, path: Path, what: str, max_bytes: int) -> None:
        self.path, self.what = path, what
        if not os.path.lexists(path):
            raise DataError(f"{path}: {what} not found")
        # a regular file of at most max_bytes, never a FIFO or a device; reads stop at the limit
        self._handle = open_regular(path, max_bytes, what, error=DataError)  # closed by __exit__
        try:
            self._open()
        except BaseException:
            self._handle.close()
            raise

    def _open(self) -> None:
        path, what = self.path, self.what
        with self._errors():
            if self._handle.read(len(_NPY_MAGIC)) == _NPY_MAGIC:
                raise DataError(f"{path}: {what} is a single .npy array, not an npz archive with named arrays")
            end = zipfile._EndRecData(self._handle)
            if end is None:
                raise zipfile.BadZipFile("not a zip archive (no end-of-archive record)")
            if end[zipfile._ECD_SIZE] > _MAX_CENTRAL_DIRECTORY:
                raise DataError(
                    f"{path}: {what} lists {end[zipfile._ECD_SIZE]:,} bytes of members, more than an npz "
                    f"of a few arrays needs ({_MAX_CENTRAL_DIRECTORY:,})"
                )
            self._zip = zipfile.ZipFile(self._handle)
            self.members = {}
            for info in self._zip.infolist():
                key = info.filename[:-4] if info.filename.endswith(".npy") else info.filename
                self.members[key] = info

    def __enter__(self) -> _NpzReader:
        return self

    def __exit__(self, *exc) -> None:
        self._handle.close()

    @contextlib.contextmanager
    def _errors(self):
        try:
            yield
        except DataError:
            raise
        except Exception as exc:  # zipfile, zlib and numpy raise many types on damaged archives
            raise DataError(
                f"{self.path}: cannot read {self.what} as an npz archive ({_why(exc)})"
            ) from None

    def _member(self, key: str):
        info = self.members[key]
        if info.flag_bits & 0x1:
            raise DataError(f"{self.path}: '{key}' is encrypted")
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise DataError(
                f"{self.path}: '{key}' uses compression method {info.compress_type}; npz files are "
                "stored or deflated"
            )
        return self._zip.open(info)

    def header(self, key: str) -> _Header:
        """Parse member ``key``'s ``.npy`` header and check it against the member's declared size."""
        with self._errors(), self._member(key) as member:
            version = np.lib.format.read_magic(member)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(member, _MAX_NPY_HEADER)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(member, _MAX_NPY_HEADER)
            else:
                raise DataError(f"{self.path}: '{key}' uses .npy format version {version}, not 1.0 or 2.0")
            offset = member.tell()
        header = _Header(key, tuple(shape), dtype, bool(fortran), offset, self.members[key].file_size - offset)
        if dtype.hasobject:
            raise DataError(f"{self.path}: '{key}' holds Python objects, which are never loaded (allow_pickle=False)")
        return header

    def array(self, header: _Header) -> np.ndarray:
        """Read the data of a checked header into a fresh, writable array of exactly its size.

        The archive must list exactly the bytes the header declares, so a member cannot inflate past
        them (and zipfile stops at the listed size and checks the CRC).
        """
        if header.listed != header.nbytes:
            raise DataError(
                f"{self.path}: '{header.name}' declares {_shown(header.shape)} {header.dtype} "
                f"({header.nbytes:,} bytes) but the archive lists {header.listed:,} bytes of data"
            )
        buffer = np.empty(header.nbytes, dtype=np.uint8)
        with self._errors(), self._member(header.name) as member:
            member.read(header.offset)
            view, filled = memoryview(buffer), 0
            while filled < header.nbytes:
                chunk = member.read(min(_CHUNK, header.nbytes - filled))
                if not chunk:
                    raise EOFError(f"'{header.name}' ended after {filled:,} of {header.nbytes:,} bytes")
                view[filled:filled + len(chunk)] = chunk
                filled += len(chunk)
            member.read(1)  # reaching the end makes zipfile verify the member's CRC
        array = buffer.view(header.dtype)
        return array.reshape(header.shape, order="F" if header.fortran else "C")


def _why(exc: Exception) -> str:
    """What went wrong reading an archive, without echoing its bytes.

    zipfile's and zlib's messages are fixed sentences (with at most a member name, escaped here);
    numpy's header errors quote the header itself, and a file's contents must never reach a message
    (a link to ``/proc/self/environ`` would print the environment), so only their type is named.
    """
    if isinstance(exc, (zipfile.BadZipFile, zlib.error, EOFError)):
        return f"{type(exc).__name__}: {quote(exc, 120)}"
    return f"{type(exc).__name__}: malformed contents"


def _image_header(path: Path, key: str, header: _Header) -> None:
    shape = header.shape
    if len(shape) != 3 or shape[1:] != IMAGE_SHAPE:
        raise DataError(f"{path}: '{key}' has shape {_shown(shape)}, expected (n, 28, 28)")
    if header.dtype != np.uint8:
        raise DataError(f"{path}: '{key}' has dtype {header.dtype}, expected uint8 pixels 0-255")
    if shape[0] > MAX_IMAGES:
        raise DataError(
            f"{path}: '{key}' declares {shape[0]:,} images; at most {MAX_IMAGES:,} are accepted "
            "(MNIST has 60,000 training and 10,000 test images)"
        )


def _label_header(path: Path, key: str, header: _Header, n: int) -> None:
    if len(header.shape) != 1 or header.shape[0] != n:
        raise DataError(f"{path}: '{key}' has shape {_shown(header.shape)}, expected ({n},) to match the images")
    if header.dtype.kind not in "iu" or header.dtype.itemsize > _MAX_LABEL_ITEMSIZE:
        raise DataError(f"{path}: '{key}' has dtype {header.dtype}, expected integer labels")


def _npz_limit(pairs: int) -> int:
    """Largest npz holding ``pairs`` (images, labels) pairs of at most MAX_IMAGES each."""
    per_pair = MAX_IMAGES * (IMAGE_SHAPE[0] * IMAGE_SHAPE[1] + _MAX_LABEL_ITEMSIZE)
    return pairs * per_pair + _NPZ_SLACK


PARTITION_MAX_BYTES = _npz_limit(1)
"""Largest partition file (``cliente_N.npz``, ``test.npz``) read or hashed: one pair of MAX_IMAGES images."""


def _read_pairs(path: Path, what: str, pairs: list[tuple[str, str]], missing_message) -> dict[str, np.ndarray]:
    """Read (images, labels) member pairs of an npz, every header checked before any data is read.

    ``missing_message(missing_keys, found_keys)`` words the error for absent members.
    """
    with _NpzReader(path, what, _npz_limit(len(pairs))) as npz:
        wanted = [key for pair in pairs for key in pair]
        missing = [key for key in wanted if key not in npz.members]
        if missing:
            raise DataError(missing_message(missing, sorted(npz.members)))
        headers = []
        for x_key, y_key in pairs:
            x_header = npz.header(x_key)
            _image_header(path, x_key, x_header)
            y_header = npz.header(y_key)
            _label_header(path, y_key, y_header, x_header.shape[0])
            headers += [x_header, y_header]
        arrays = {h.name: npz.array(h) for h in headers}
    for x_key, y_key in pairs:
        _check_labels(path, y_key, arrays[y_key], arrays[x_key].shape[0])
    return arrays


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
        for split in ("train", "test"):
            _check_images(source, f"x_{split}", arrays[f"x_{split}"])
            _check_labels(source, f"y_{split}", arrays[f"y_{split}"], arrays[f"x_{split}"].shape[0])
    else:
        source = resolved

        def missing_message(missing: list[str], found: list[str]) -> str:
            return (
                f"{source}: missing key(s) {', '.join(missing)}; expected the keras layout "
                f"{', '.join(MNIST_KEYS)} (found: {quote(', '.join(found), 200) or 'none'})"
            )

        arrays = _read_pairs(source, "MNIST file", [("x_train", "y_train"), ("x_test", "y_test")],
                             missing_message)
    for split in ("train", "test"):
        if arrays[f"x_{split}"].shape[0] == 0:
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

    def missing_message(missing: list[str], found: list[str]) -> str:
        return (
            f"{path}: missing key '{missing[0]}'; a partition file holds 'x' (n, 28, 28) uint8 images "
            "and 'y' (n,) labels, as written by split_data.py"
        )

    arrays = _read_pairs(path, "partition file", [("x", "y")], missing_message)
    x, y = arrays["x"], arrays["y"]
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
