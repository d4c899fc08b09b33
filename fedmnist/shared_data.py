"""The federation's data copied once into a ``multiprocessing.shared_memory`` segment for the workers.

The training images (raw uint8), labels, every client's index array and the test set go into one
segment that the worker processes of ``fedmnist.workers`` map read-only (``SharedSpec.attach``); when
/dev/shm is too small for it the arrays travel by pickling to each worker instead.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from multiprocessing import shared_memory
from typing import TYPE_CHECKING

import numpy as np

from fedmnist.data import normalize_images
from fedmnist.tasks import WorkerData

if TYPE_CHECKING:
    pass

Weights = list[np.ndarray]


# --- shared memory ----------------------------------------------------------------------------


def compact_test_images(x: np.ndarray) -> np.ndarray:
    """Normalised test images back to uint8 when that is lossless (4× less shared memory)."""
    if x.dtype == np.uint8:
        return x
    raw = np.rint(x[..., 0] * np.float32(255.0))
    if raw.min() < 0 or raw.max() > 255:
        return x
    raw = raw.astype(np.uint8)
    return raw if np.array_equal(normalize_images(raw), x) else x


def pack(data: WorkerData) -> dict[str, np.ndarray]:
    sizes = np.array([idx.size for idx in data.client_indices], dtype=np.int64)
    arrays = {
        "x_train": data.x_train,
        "y_train": data.y_train,
        "indices": np.concatenate([idx.astype(np.int64) for idx in data.client_indices]),
        "offsets": np.concatenate([[0], np.cumsum(sizes)]),
    }
    if data.x_test is not None:
        arrays["x_test"], arrays["y_test"] = compact_test_images(data.x_test), data.y_test
    return arrays


def unpack(arrays: dict[str, np.ndarray]) -> WorkerData:
    offsets = arrays["offsets"]
    indices = tuple(arrays["indices"][offsets[k]: offsets[k + 1]] for k in range(len(offsets) - 1))
    return WorkerData(
        arrays["x_train"], arrays["y_train"], indices, arrays.get("x_test"), arrays.get("y_test")
    )


@dataclass(frozen=True)
class SharedSpec:
    """How a worker finds the arrays: a shared-memory segment's name and layout, or the arrays inline."""

    name: str | None
    layout: tuple[tuple[str, str, tuple[int, ...], int], ...] = ()
    inline: dict | None = None

    def attach(self) -> tuple[shared_memory.SharedMemory | None, dict[str, np.ndarray]]:
        """Map the arrays read-only (or return the inline copy)."""
        if self.name is None:
            return None, self.inline
        block = shared_memory.SharedMemory(name=self.name)
        arrays = {}
        for key, dtype, shape, offset in self.layout:
            array = np.ndarray(shape, dtype=np.dtype(dtype), buffer=block.buf, offset=offset)
            array.flags.writeable = False
            arrays[key] = array
        return block, arrays


def shm_free_bytes() -> int | None:
    try:
        return shutil.disk_usage("/dev/shm").free
    except OSError:
        return None


def share(arrays: dict[str, np.ndarray]) -> tuple[SharedSpec, shared_memory.SharedMemory | None]:
    """Copy ``arrays`` into one new shared-memory segment (or, if /dev/shm is too small, keep them inline)."""
    layout, offset = [], 0
    for key, array in arrays.items():
        offset = -(-offset // 64) * 64
        layout.append((key, array.dtype.str, tuple(array.shape), offset))
        offset += array.nbytes
    size = max(offset, 1)
    free = shm_free_bytes()
    if free is not None and free < size + (16 << 20):
        # Writing past a full tmpfs kills the process with SIGBUS: send each worker a copy instead.
        return SharedSpec(None, inline={k: np.ascontiguousarray(a) for k, a in arrays.items()}), None
    block = shared_memory.SharedMemory(create=True, size=size)
    try:
        for (key, dtype, shape, start) in layout:
            np.ndarray(shape, dtype=np.dtype(dtype), buffer=block.buf, offset=start)[...] = arrays[key]
    except BaseException:
        block.close()
        block.unlink()
        raise
    return SharedSpec(block.name, tuple(layout)), block


