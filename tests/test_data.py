"""Tests for fedmnist.data: MNIST validation errors, normalisation, data path resolution, partition files."""

from __future__ import annotations

import io
import zipfile

import keras
import numpy as np
import pytest

from fedmnist.data import (
    DATA_ENV,
    MAX_IMAGES,
    client_file,
    load_client_partition,
    load_mnist,
    load_partition_raw,
    load_raw_mnist,
    load_test_set,
    normalize_images,
    resolve_data_path,
    save_arrays,
)
from fedmnist.errors import DataError


def valid_arrays(n_train: int = 20, n_test: int = 10) -> dict[str, np.ndarray]:
    """A tiny dataset in the keras layout: random uint8 pixels, labels cycling through 0-9."""
    rng = np.random.default_rng(0)
    return {
        "x_train": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "y_train": (np.arange(n_train) % 10).astype(np.uint8),
        "x_test": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "y_test": (np.arange(n_test) % 10).astype(np.uint8),
    }


def write_npz(path, **overrides):
    """Write a keras-layout npz; a value of None removes that key."""
    arrays = valid_arrays()
    arrays.update(overrides)
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
    return path


# --- validation errors -----------------------------------------------------------------------


def test_valid_handmade_file_loads(tmp_path):
    # Prepare
    path = write_npz(tmp_path / "ok.npz")
    expected = valid_arrays()

    # Execute
    mnist = load_raw_mnist(path)

    # Assert
    np.testing.assert_array_equal(mnist.x_train, expected["x_train"])
    np.testing.assert_array_equal(mnist.y_test, expected["y_test"])
    assert mnist.x_train.dtype == np.uint8 and mnist.y_train.dtype == np.uint8


def test_missing_file(tmp_path):
    # Prepare
    path = tmp_path / "nope.npz"

    # Execute
    with pytest.raises(DataError) as excinfo:
        load_raw_mnist(path)

    # Assert
    assert str(path) in str(excinfo.value)
    assert "not found" in str(excinfo.value)


def test_directory_instead_of_file(tmp_path):
    # Prepare
    path = tmp_path / "adir.npz"
    path.mkdir()

    # Execute
    with pytest.raises(DataError) as excinfo:
        load_raw_mnist(path)

    # Assert
    assert str(path) in str(excinfo.value)
    assert "not a file" in str(excinfo.value)


@pytest.mark.parametrize(
    "content",
    [b"this is not an npz archive at all", b"", b"PK\x03\x04truncated zip"],
    ids=["text", "empty-file", "truncated-zip"],
)
def test_not_an_npz(tmp_path, content):
    # Prepare
    path = tmp_path / "bad.npz"
    path.write_bytes(content)

    # Execute
    with pytest.raises(DataError) as excinfo:
        load_raw_mnist(path)

    # Assert
    assert str(path) in str(excinfo.value)
    assert "cannot read" in str(excinfo.value)


def test_missing_keys(tmp_path):
    # Prepare
    path = write_npz(tmp_path / "keys.npz", y_train=None, x_test=None)

    # Execute
    with pytest.raises(DataError) as excinfo:
        load_raw_mnist(path)

    # Assert
    message = str(excinfo.value)
    assert str(path) in message
    assert "y_train" in message.split("expected")[0] and "x_test" in message.split("expected")[0]


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        ({"x_train": np.zeros((20, 28, 27), np.uint8)}, "'x_train' has shape (20, 28, 27)"),
        ({"x_test": np.zeros((10, 28, 28, 1), np.uint8)}, "'x_test' has shape (10, 28, 28, 1)"),
        ({"x_train": np.zeros((20, 28, 28), np.float32)}, "'x_train' has dtype float32"),
        ({"y_train": np.zeros(20, np.float64)}, "'y_train' has dtype float64"),
        ({"y_train": np.full(20, 10, np.int64)}, "labels outside 0-9"),
        ({"y_test": np.full(10, -1, np.int64)}, "labels outside 0-9"),
        ({"y_train": np.zeros(19, np.uint8)}, "'y_train' has shape (19,), expected (20,)"),
        ({"y_test": np.zeros((10, 1), np.uint8)}, "'y_test' has shape (10, 1)"),
        ({"x_train": np.zeros((0, 28, 28), np.uint8), "y_train": np.zeros(0, np.uint8)},
         "'x_train' is empty"),
        ({"x_test": np.zeros((0, 28, 28), np.uint8), "y_test": np.zeros(0, np.uint8)},
         "'x_test' is empty"),
    ],
    ids=["image-shape", "image-channel-axis", "image-dtype", "label-dtype", "label-too-big",
         "label-negative", "label-count", "label-2d", "empty-train", "empty-test"],
)
def test_bad_contents(tmp_path, overrides, fragment):
    # Prepare
    path = write_npz(tmp_path / "bad.npz", **overrides)

    # Execute
    with pytest.raises(DataError) as excinfo:
        load_raw_mnist(path)

    # Assert
    assert str(path) in str(excinfo.value)
    assert fragment in str(excinfo.value)


def test_int64_labels_become_uint8(tmp_path):
    # Prepare
    labels = np.arange(20, dtype=np.int64) % 10
    path = write_npz(tmp_path / "int64.npz", y_train=labels)

    # Execute
    mnist = load_raw_mnist(path)

    # Assert
    assert mnist.y_train.dtype == np.uint8
    np.testing.assert_array_equal(mnist.y_train, labels)


# --- normalisation ---------------------------------------------------------------------------


def test_normalize_images_values_dtype_and_channel():
    # Prepare
    x = np.array([[[0, 51], [255, 102]]], dtype=np.uint8).repeat(14, axis=1).repeat(14, axis=2)
    original = x.copy()

    # Execute
    out = normalize_images(x)

    # Assert
    assert out.dtype == np.float32
    assert out.shape == (1, 28, 28, 1)
    np.testing.assert_allclose(out[0, 0, 0, 0], 0.0)
    np.testing.assert_allclose(out[0, 0, 14, 0], 0.2)
    np.testing.assert_allclose(out[0, 14, 0, 0], 1.0)
    np.testing.assert_array_equal(x, original)


def test_load_mnist_is_normalised(tmp_path):
    # Prepare
    arrays = valid_arrays()
    path = write_npz(tmp_path / "ok.npz")

    # Execute
    mnist = load_mnist(path)

    # Assert
    assert mnist.x_train.dtype == np.float32 and mnist.x_test.dtype == np.float32
    assert mnist.x_train.shape == (20, 28, 28, 1) and mnist.x_test.shape == (10, 28, 28, 1)
    assert mnist.x_train.min() >= 0.0 and mnist.x_train.max() <= 1.0
    np.testing.assert_allclose(mnist.x_train[..., 0] * 255, arrays["x_train"], atol=1e-4)
    np.testing.assert_array_equal(mnist.y_train, arrays["y_train"])


def test_real_mnist_normalised_range(raw_mnist):
    # Prepare
    x = raw_mnist.x_test[:500]

    # Execute
    out = normalize_images(x)

    # Assert
    assert out.dtype == np.float32 and out.shape == (500, 28, 28, 1)
    assert out.min() == 0.0 and out.max() == 1.0


def test_real_mnist_shapes(raw_mnist):
    # Execute / Assert
    assert raw_mnist.x_train.shape == (60000, 28, 28) and raw_mnist.x_test.shape == (10000, 28, 28)
    assert raw_mnist.y_train.dtype == np.uint8
    assert set(np.unique(raw_mnist.y_train).tolist()) == set(range(10))


# --- where the data comes from ---------------------------------------------------------------


def test_resolve_flag_wins_over_env(monkeypatch, tmp_path):
    # Prepare
    monkeypatch.setenv(DATA_ENV, str(tmp_path / "env.npz"))

    # Execute
    resolved = resolve_data_path(str(tmp_path / "flag.npz"))

    # Assert
    assert resolved == tmp_path / "flag.npz"


def test_resolve_env_when_no_flag(monkeypatch, tmp_path):
    # Prepare
    monkeypatch.setenv(DATA_ENV, str(tmp_path / "env.npz"))

    # Execute
    resolved = resolve_data_path(None)

    # Assert
    assert resolved == tmp_path / "env.npz"


def test_resolve_none_without_flag_or_env(monkeypatch):
    # Prepare
    monkeypatch.delenv(DATA_ENV, raising=False)

    # Execute / Assert
    assert resolve_data_path(None) is None


def test_load_uses_env_file(monkeypatch, tmp_path):
    # Prepare
    path = write_npz(tmp_path / "env.npz")
    monkeypatch.setenv(DATA_ENV, str(path))

    # Execute
    mnist = load_raw_mnist()

    # Assert
    np.testing.assert_array_equal(mnist.x_train, valid_arrays()["x_train"])


def test_keras_download_failure_tells_how_to_pass_a_file(monkeypatch):
    # Prepare
    monkeypatch.delenv(DATA_ENV, raising=False)

    def offline():
        raise OSError("network is unreachable")

    monkeypatch.setattr(keras.datasets.mnist, "load_data", offline)

    # Execute
    with pytest.raises(DataError) as excinfo:
        load_raw_mnist(None)

    # Assert
    message = str(excinfo.value)
    assert "--data" in message and DATA_ENV in message
    assert "network is unreachable" in message


def test_keras_download_result_is_validated(monkeypatch):
    # Prepare
    monkeypatch.delenv(DATA_ENV, raising=False)
    arrays = valid_arrays()
    fake = ((arrays["x_train"], arrays["y_train"]), (arrays["x_test"], arrays["y_test"]))
    monkeypatch.setattr(keras.datasets.mnist, "load_data", lambda: fake)

    # Execute
    mnist = load_raw_mnist(None)

    # Assert
    np.testing.assert_array_equal(mnist.x_test, arrays["x_test"])
    assert mnist.y_train.dtype == np.uint8


# --- partition files -------------------------------------------------------------------------


def test_partition_file_round_trip(tmp_path):
    # Prepare
    arrays = valid_arrays()
    path = tmp_path / "cliente_1.npz"

    # Execute
    save_arrays(path, arrays["x_train"], arrays["y_train"])
    x, y = load_partition_raw(path)

    # Assert
    np.testing.assert_array_equal(x, arrays["x_train"])
    np.testing.assert_array_equal(y, arrays["y_train"])
    assert x.dtype == np.uint8 and y.dtype == np.uint8
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cliente_1.npz"]


def test_partition_file_writes_are_byte_identical(tmp_path):
    # Prepare
    arrays = valid_arrays()

    # Execute
    save_arrays(tmp_path / "a.npz", arrays["x_train"], arrays["y_train"])
    save_arrays(tmp_path / "b.npz", arrays["x_train"].copy(), arrays["y_train"].copy())

    # Assert
    assert (tmp_path / "a.npz").read_bytes() == (tmp_path / "b.npz").read_bytes()


def test_partition_file_is_a_plain_npz(tmp_path):
    # Prepare
    arrays = valid_arrays()
    path = tmp_path / "p.npz"

    # Execute
    save_arrays(path, arrays["x_test"], arrays["y_test"])

    # Assert
    with np.load(path, allow_pickle=False) as npz:
        assert sorted(npz.files) == ["x", "y"]
        np.testing.assert_array_equal(npz["x"], arrays["x_test"])


@pytest.mark.parametrize(
    ("arrays", "fragment"),
    [
        ({"x": np.zeros((3, 28, 28), np.uint8)}, "missing key 'y'"),
        ({"x": np.zeros((3, 28, 28), np.float32), "y": np.zeros(3, np.uint8)}, "dtype float32"),
        ({"x": np.zeros((3, 28, 28), np.uint8), "y": np.zeros(2, np.uint8)}, "expected (3,)"),
        ({"x": np.zeros((0, 28, 28), np.uint8), "y": np.zeros(0, np.uint8)}, "no images"),
    ],
    ids=["missing-y", "float-images", "label-count", "empty"],
)
def test_bad_partition_file(tmp_path, arrays, fragment):
    # Prepare
    path = tmp_path / "cliente_9.npz"
    np.savez(path, **arrays)

    # Execute
    with pytest.raises(DataError) as excinfo:
        load_partition_raw(path)

    # Assert
    assert str(path) in str(excinfo.value)
    assert fragment in str(excinfo.value)


def test_federation_partitions_load_normalised(small_federation):
    # Execute
    x, y = load_client_partition(small_federation, 2)
    x_test, y_test = load_test_set(small_federation)

    # Assert
    assert client_file(small_federation, 2) == small_federation / "cliente_2.npz"
    assert x.dtype == np.float32 and x.shape == (200, 28, 28, 1)
    assert y.dtype == np.uint8 and y.shape == (200,)
    assert x_test.shape == (200, 28, 28, 1)
    assert np.bincount(y_test, minlength=10).tolist() == [20] * 10


# --- inputs that once crashed instead of giving a DataError ---


def test_npy_file_instead_of_npz(tmp_path):
    # Prepare
    path = tmp_path / "mnist.npy"
    np.save(path, np.zeros((2, 28, 28), np.uint8))

    # Execute
    with pytest.raises(DataError) as excinfo:
        load_raw_mnist(path)

    # Assert
    assert str(path) in str(excinfo.value)


def test_corrupted_deflate_stream(tmp_path, small_mnist):
    # Prepare: a partition file whose compressed image stream is damaged just after its header
    path = tmp_path / "cliente_1.npz"
    save_arrays(path, small_mnist.x_train[:200], small_mnist.y_train[:200])
    damaged = bytearray(path.read_bytes())
    for i in range(100, 108):
        damaged[i] ^= 0xA5
    path.write_bytes(bytes(damaged))

    # Execute
    with pytest.raises(DataError) as excinfo:
        load_partition_raw(path)

    # Assert
    assert str(path) in str(excinfo.value)



# --- reading npz archives member by member ----------------------------------------------------------


def npz_with(path, members: dict[str, bytes], compression=zipfile.ZIP_DEFLATED):
    with zipfile.ZipFile(path, "w", compression=compression) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


def npy(array: np.ndarray, version=None) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, array, version=version)
    return buffer.getvalue()


def test_partition_in_every_layout_numpy_can_write(tmp_path):
    # Prepare: Fortran order, big-endian int16 labels, .npy format 2.0, a member without '.npy', stored
    arrays = valid_arrays()
    x = np.asfortranarray(arrays["x_train"])
    y = arrays["y_train"].astype(">i2")
    path = npz_with(tmp_path / "cliente_1.npz", {"x.npy": npy(x, version=(2, 0)), "y": npy(y)},
                    compression=zipfile.ZIP_STORED)

    # Execute
    x_loaded, y_loaded = load_partition_raw(path)

    # Assert
    np.testing.assert_array_equal(x_loaded, arrays["x_train"])
    np.testing.assert_array_equal(y_loaded, arrays["y_train"])
    assert x_loaded.flags.writeable and y_loaded.dtype == np.uint8


def test_only_the_needed_members_are_read(tmp_path, monkeypatch):
    # Prepare: an extra member that is not even a valid .npy
    arrays = valid_arrays()
    path = npz_with(tmp_path / "cliente_1.npz", {"x.npy": npy(arrays["x_train"]), "y.npy": npy(arrays["y_train"]),
                                                 "notas.npy": b"garbage, never parsed"})
    opened = []
    original = zipfile.ZipFile.open

    def spy(self, name, *args, **kwargs):
        opened.append(getattr(name, "filename", name))
        return original(self, name, *args, **kwargs)

    monkeypatch.setattr(zipfile.ZipFile, "open", spy)

    # Execute
    x, _ = load_partition_raw(path)

    # Assert
    assert x.shape == (20, 28, 28)
    assert set(opened) == {"x.npy", "y.npy"}


def test_declared_size_must_match_the_archive(tmp_path):
    # Prepare: a header declaring 20 images in front of the bytes of 19
    arrays = valid_arrays()
    data = npy(arrays["x_train"])[: -28 * 28]
    path = npz_with(tmp_path / "cliente_1.npz", {"x.npy": data, "y.npy": npy(arrays["y_train"])})

    # Execute
    with pytest.raises(DataError) as excinfo:
        load_partition_raw(path)

    # Assert
    assert str(path) in str(excinfo.value)
    assert "'x' declares (20, 28, 28) uint8 (15,680 bytes) but the archive lists 14,896 bytes" in str(excinfo.value)


def test_images_beyond_the_bound_are_refused_from_the_header(tmp_path):
    # Prepare: a header for MAX_IMAGES + 1 images, and no data at all
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "|u1", "fortran_order": False,
                                                  "shape": (MAX_IMAGES + 1, 28, 28)})
    path = npz_with(tmp_path / "cliente_1.npz", {"x.npy": header.getvalue(), "y.npy": npy(np.zeros(3, np.uint8))})

    # Execute
    with pytest.raises(DataError, match=r"'x' declares 100,001 images; at most 100,000"):
        load_partition_raw(path)


def test_object_labels_are_never_unpickled(tmp_path):
    # Prepare
    arrays = valid_arrays()
    labels = np.array([Exception("unpickled")] * 20, dtype=object)
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, labels, allow_pickle=True)
    path = npz_with(tmp_path / "cliente_1.npz", {"x.npy": npy(arrays["x_train"]), "y.npy": buffer.getvalue()})

    # Execute / Assert
    with pytest.raises(DataError, match="'y' holds Python objects"):
        load_partition_raw(path)


def test_real_mnist_reads_like_np_load(mnist_path, raw_mnist):
    # Execute
    with np.load(mnist_path) as npz:
        # Assert
        for key in ("x_train", "y_train", "x_test", "y_test"):
            np.testing.assert_array_equal(getattr(raw_mnist, key), npz[key])
