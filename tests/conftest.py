"""Shared fixtures: the real MNIST (loaded once per session) and a tiny federation written from it."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pytest

from fedmnist.data import DATA_ENV, Mnist, load_raw_mnist

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MNIST = REPO_ROOT.parent / "shared" / "data" / "mnist.npz"

SMALL_TRAIN_PER_CLASS = 60  # 600 training images
SMALL_TEST_PER_CLASS = 20  # 200 test images
SMALL_NUM_CLIENTS = 3
SMALL_SEED = 42


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "slow: runs a script in a subprocess (imports TensorFlow); deselect with -m 'not slow'"
    )


@pytest.fixture(scope="session")
def mnist_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real MNIST npz: ``$FEDMNIST_DATA``, else ``<repo>/../shared/data/mnist.npz``, else keras' download."""
    env = os.environ.get(DATA_ENV)
    path = Path(env) if env else DEFAULT_MNIST
    if path.is_file():
        return path
    try:
        import keras

        (x_train, y_train), (x_test, y_test) = keras.datasets.mnist.load_data()
    except Exception as exc:
        pytest.fail(
            f"MNIST not found at {path} and the keras download failed ({exc}). These tests need the "
            f"real MNIST in the keras npz layout (x_train, y_train, x_test, y_test): set "
            f"{DATA_ENV}=/path/to/mnist.npz or place it at {DEFAULT_MNIST}.",
            pytrace=False,
        )
    downloaded = tmp_path_factory.mktemp("mnist") / "mnist.npz"
    np.savez(downloaded, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    return downloaded


@pytest.fixture(scope="session")
def raw_mnist(mnist_path: Path) -> Mnist:
    """The real MNIST as uint8 images, loaded and validated once per session."""
    return load_raw_mnist(mnist_path)


def stratified_indices(labels: np.ndarray, per_class: int) -> np.ndarray:
    """The first ``per_class`` indices of every class, in their original order."""
    picks = [np.flatnonzero(labels == c)[:per_class] for c in range(10)]
    return np.sort(np.concatenate(picks))


@pytest.fixture(scope="session")
def small_mnist(raw_mnist: Mnist) -> Mnist:
    """A stratified slice of the real MNIST: 600 training and 200 test images, 10% of each class."""
    train = stratified_indices(raw_mnist.y_train, SMALL_TRAIN_PER_CLASS)
    test = stratified_indices(raw_mnist.y_test, SMALL_TEST_PER_CLASS)
    return Mnist(
        raw_mnist.x_train[train].copy(), raw_mnist.y_train[train].copy(),
        raw_mnist.x_test[test].copy(), raw_mnist.y_test[test].copy(),
    )


@pytest.fixture(scope="session")
def small_federation(tmp_path_factory: pytest.TempPathFactory, small_mnist: Mnist) -> Path:
    """Directory holding a 3-client IID federation of ``small_mnist`` written by ``write_federation``."""
    from fedmnist.federation_files import write_federation
    from fedmnist.partition import PartitionConfig

    out = tmp_path_factory.mktemp("federation")
    write_federation(small_mnist, PartitionConfig("iid", SMALL_NUM_CLIENTS, seed=SMALL_SEED), out)
    return out
