"""Tests for fedmnist.local: a member's four files, and bad inputs refused before anything is written."""

import json
import os
import pickle
import shutil

import keras
import numpy as np
import pytest

from fedmnist.data import client_file, load_partition, save_arrays
from fedmnist.errors import ConfigError, DataError, FedMnistError, UpdateFileError
from fedmnist.exchange import (
    FORMAT_VERSION,
    GLOBAL_FORMAT,
    global_path,
    load_update,
    make_global,
    save_global,
)
from fedmnist.federation_files import MANIFEST_FILE
from fedmnist.io import sha256_file
from fedmnist.local import output_paths, run_local_training
from fedmnist.model import initial_weights, model_fingerprint, weights_sha256
from fedmnist.seeds import training_seed, validation_seed
from fedmnist.training import TrainConfig, make_trainer, validation_split

CONFIG = TrainConfig(epochs=1, batch_size=32, mu=0.01, seed=7)  # the member's default optimizer: Adam, lr 1e-3
CLIENT = 2
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def trainer():
    """The trainer ``run_local_training`` would build for CONFIG (the same for ``TrainConfig(epochs=1)``)."""
    return make_trainer(CONFIG)


@pytest.fixture(scope="module")
def round0_file(tmp_path_factory):
    """pesos_globales_ronda_0.pkl of a federation started from build_model(seed=3)."""
    gw = make_global(initial_weights(3), 0, "init", 3)
    path = global_path(tmp_path_factory.mktemp("pesos"), 0)
    save_global(path, gw)
    return path, gw


@pytest.fixture(scope="module")
def from_file(tmp_path_factory, small_federation, round0_file, trainer):
    """Client 2 trained from pesos_globales_ronda_0.pkl."""
    out_dir = tmp_path_factory.mktemp("salida_fichero")
    out = run_local_training(CLIENT, small_federation, out_dir, CONFIG, round0_file[0], 0, trainer)
    return out, out_dir


@pytest.fixture(scope="module")
def from_nothing(tmp_path_factory, small_federation, trainer):
    """Client 1 trained with no global-weights file: round 0 from build_model's default seed."""
    out_dir = tmp_path_factory.mktemp("salida_sin_fichero")
    out = run_local_training(1, small_federation, out_dir, TrainConfig(epochs=1), None, None, trainer)
    return out, out_dir


def manifest_entry(data_dir, client_id):
    manifest = json.loads((data_dir / MANIFEST_FILE).read_text())
    return next(c for c in manifest["clients"] if c["client_id"] == client_id)


# --- what a member writes ---------------------------------------------------------------------------


def test_writes_exactly_the_four_files(from_file):
    # Prepare
    out, out_dir = from_file
    expected = output_paths(out_dir, CLIENT)

    # Assert
    assert sorted(p.name for p in out_dir.iterdir()) == sorted(p.name for p in expected.values())
    assert out.files == expected
    for key in ("curves", "confusion"):
        assert expected[key].read_bytes()[:8] == PNG_MAGIC


def test_update_file_holds_the_metadata(from_file, round0_file, small_federation):
    # Prepare
    out, out_dir = from_file
    _, start = round0_file
    partition_size = manifest_entry(small_federation, CLIENT)["num_examples"]
    held_out = round(CONFIG.validation_split * partition_size)

    # Execute
    update = load_update(out_dir / f"pesos_cliente_{CLIENT}.pkl")

    # Assert
    assert update.client_id == CLIENT
    assert update.round == 0
    assert update.num_examples == partition_size  # n_k: the data it holds, checked against particion.json
    assert out.result.num_examples == partition_size - held_out
    assert update.start_sha256 == start.sha256 == out.start.sha256
    assert update.fingerprint == model_fingerprint()
    assert update.mu == CONFIG.mu
    assert update.epochs == CONFIG.epochs
    assert update.batch_size == CONFIG.batch_size
    assert not update.bare
    assert update.metrics["test_accuracy"] == out.test.accuracy
    assert update.metrics["validation_examples"] == held_out
    assert (update.metrics["optimizer"], update.metrics["learning_rate"]) == ("adam", 1e-3)
    for saved, trained in zip(update.weights, out.result.weights):
        assert np.array_equal(saved, trained)
    assert weights_sha256(update.weights) != start.sha256, "training must have moved the weights"


def test_training_uses_the_shared_seed_formulas(from_file, round0_file, small_federation, trainer):
    # Prepare: the same training written out by hand with fedmnist.seeds' formulas, round 0's weights
    # being trained in training round 1 (the seed the simulation and Flower give this client)
    out, _ = from_file
    _, start = round0_file
    x, y = load_partition(client_file(small_federation, CLIENT))
    x_fit, y_fit, x_val, y_val = validation_split(x, y, CONFIG.validation_split, validation_seed(CONFIG.seed, CLIENT))

    # Execute
    expected = trainer.train(start.weights, x_fit, y_fit, epochs=CONFIG.epochs, batch_size=CONFIG.batch_size,
                             mu=CONFIG.mu, seed=training_seed(CONFIG.seed, 1, CLIENT), x_val=x_val, y_val=y_val)

    # Assert
    assert out.result.num_examples == expected.num_examples == len(x_fit)
    assert out.result.history == expected.history
    for a, b in zip(out.result.weights, expected.weights):
        assert np.array_equal(a, b)


def test_keras_model_file_loads_with_the_trained_weights(from_file):
    # Prepare
    out, out_dir = from_file

    # Execute
    model = keras.models.load_model(out_dir / f"modelo_local_cliente_{CLIENT}.h5")

    # Assert
    assert model.input_shape == (None, 28, 28, 1)
    assert model.output_shape == (None, 10)
    for loaded, trained in zip(model.get_weights(), out.result.weights):
        assert np.array_equal(loaded, trained)


def test_without_a_file_round_0_starts_from_build_model_default_seed(from_nothing):
    # Prepare
    out, out_dir = from_nothing

    # Execute
    update = load_update(out_dir / "pesos_cliente_1.pkl")

    # Assert
    assert out.round == 0 and update.round == 0
    assert update.start_sha256 == weights_sha256(initial_weights()) == out.start.sha256
    assert update.mu == 0.0 and update.epochs == 1 and update.client_id == 1
    assert sorted(p.name for p in out_dir.iterdir()) == sorted(p.name for p in output_paths(out_dir, 1).values())


# --- bad input: a clear error and nothing written -------------------------------------------------


class RunsCommand:
    """Unpickling this calls os.system: what a malicious teammate's .pkl could do."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


@pytest.fixture
def federation_copy(tmp_path, small_federation):
    """A private copy of the small federation that a test may damage."""
    return shutil.copytree(small_federation, tmp_path / "datos")


@pytest.fixture
def out_dir(tmp_path):
    path = tmp_path / "salida"
    path.mkdir()
    return path


def run_expecting_error(error, fragment, data_dir, out_dir, client_id=CLIENT, global_weights=None, round_=None):
    with pytest.raises(error) as info:
        run_local_training(client_id, data_dir, out_dir, CONFIG, global_weights, round_)
    assert isinstance(info.value, FedMnistError)
    assert fragment in str(info.value)
    assert list(out_dir.iterdir()) == [], "nothing may be written when an input is bad"
    return str(info.value)


def test_missing_partition_file(small_federation, out_dir):
    message = run_expecting_error(DataError, "partition file not found", small_federation, out_dir, client_id=4)
    assert "cliente_4.npz" in message


def test_partition_of_the_wrong_shape(federation_copy, out_dir, small_mnist):
    # Prepare: 28x27 images, with the manifest updated so that only the shape is wrong
    path = client_file(federation_copy, CLIENT)
    save_arrays(path, small_mnist.x_train[:50, :, :27], small_mnist.y_train[:50])
    manifest = json.loads((federation_copy / MANIFEST_FILE).read_text())
    for entry in manifest["clients"]:
        if entry["client_id"] == CLIENT:
            entry["sha256"] = sha256_file(path)
    (federation_copy / MANIFEST_FILE).write_text(json.dumps(manifest))

    # Execute / Assert
    message = run_expecting_error(DataError, "(n, 28, 28)", federation_copy, out_dir)
    assert "cliente_2.npz" in message and "(50, 28, 27)" in message


def test_partition_that_differs_from_the_manifest(federation_copy, out_dir):
    # Prepare: a valid partition file whose labels were changed after the split
    path = client_file(federation_copy, CLIENT)
    with np.load(path) as npz:
        x, y = npz["x"], npz["y"].copy()
    y[0] = (y[0] + 1) % 10
    save_arrays(path, x, y)

    # Execute / Assert
    message = run_expecting_error(DataError, "manifest's sha256", federation_copy, out_dir)
    assert "cliente_2.npz" in message


def test_global_weights_that_do_not_fit_the_model(small_federation, out_dir, tmp_path):
    # Prepare: a well-formed global-weights payload for another architecture
    weights = [np.zeros((3, 3, 1, 16), np.float32), np.zeros(16, np.float32)]
    path = tmp_path / "pesos_globales_ronda_0.pkl"
    path.write_bytes(pickle.dumps({
        "format": GLOBAL_FORMAT, "version": FORMAT_VERSION, "round": 0, "method": "init", "seed": 42,
        "sha256": weights_sha256(weights), "fingerprint": model_fingerprint(), "weights": weights,
    }))

    # Execute / Assert
    message = run_expecting_error(UpdateFileError, "do not fit", small_federation, out_dir, global_weights=path)
    assert str(path) in message


def test_unsafe_pickle_is_refused_without_running_it(small_federation, out_dir, tmp_path):
    # Prepare
    marker = tmp_path / "pwned"
    path = tmp_path / "pesos_globales_ronda_0.pkl"
    path.write_bytes(pickle.dumps(RunsCommand(f"touch {marker}")))

    # Execute / Assert
    message = run_expecting_error(UpdateFileError, "refusing to load", small_federation, out_dir,
                                  global_weights=path)
    assert str(path) in message
    assert not marker.exists(), "the pickle's code ran"


def test_truncated_pickle(small_federation, out_dir, round0_file, tmp_path):
    # Prepare
    data = round0_file[0].read_bytes()
    path = tmp_path / "pesos_globales_ronda_0.pkl"
    path.write_bytes(data[: len(data) // 2])

    # Execute / Assert
    message = run_expecting_error(UpdateFileError, "truncated", small_federation, out_dir,
                                  global_weights=path)
    assert str(path) in message


def test_client_update_given_as_global_weights(small_federation, out_dir, from_file):
    # Prepare: a member's pesos_cliente_N.pkl passed where the round's global weights belong
    _, trained_dir = from_file

    # Execute / Assert
    run_expecting_error(UpdateFileError, "client update, not global weights", small_federation, out_dir,
                        global_weights=trained_dir / f"pesos_cliente_{CLIENT}.pkl")


def test_round_mismatch(small_federation, out_dir, tmp_path):
    # Prepare: the global weights of round 1
    path = global_path(tmp_path, 1)
    save_global(path, make_global(initial_weights(), 1, "fedavg"))

    # Execute / Assert
    message = run_expecting_error(ConfigError, "round 1", small_federation, out_dir, global_weights=path, round_=0)
    assert "round 0" in message and str(path) in message


def test_round_after_0_needs_a_file(small_federation, out_dir):
    message = run_expecting_error(ConfigError, "pesos_globales_ronda_1.pkl", small_federation, out_dir, round_=1)
    assert "round 1" in message


def test_missing_common_test_set(federation_copy, out_dir):
    # Prepare
    (federation_copy / "test.npz").unlink()

    # Execute / Assert
    run_expecting_error(DataError, "test.npz", federation_copy, out_dir)


def test_client_id_0_is_refused(small_federation, out_dir):
    run_expecting_error(ConfigError, "client ids start at 1", small_federation, out_dir, client_id=0)


def test_invalid_config_is_refused(small_federation, out_dir):
    with pytest.raises(ConfigError, match="epochs"):
        run_local_training(CLIENT, small_federation, out_dir, TrainConfig(epochs=0))
    assert list(out_dir.iterdir()) == []


def test_a_trainer_built_for_other_settings_is_refused_before_training(small_federation, tmp_path):
    from fedmnist.training import ClientTrainer

    with pytest.raises(ConfigError, match="trainer passed in uses sgd"):
        run_local_training(1, small_federation, tmp_path / "out", TrainConfig(epochs=1), None, None,
                           ClientTrainer("sgd", 0.05, 0.9))
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
