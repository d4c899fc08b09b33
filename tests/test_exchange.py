"""Tests for fedmnist.exchange: update and global-weights files, and refusing pickles that run code."""

from __future__ import annotations

import builtins
import logging
import os
import pickle
import subprocess

import numpy as np
import pytest

from fedmnist.errors import UpdateFileError
from fedmnist.exchange import (
    GLOBAL_FORMAT,
    UPDATE_FORMAT,
    ClientUpdate,
    find_updates,
    global_path,
    load_global,
    load_update,
    make_global,
    safe_load_pickle,
    save_global,
    save_update,
    update_path,
)
from fedmnist.model import DEFAULT_SEED, initial_weights, model_fingerprint, weights_sha256


@pytest.fixture(scope="module")
def cnn_weights() -> list[np.ndarray]:
    return initial_weights(DEFAULT_SEED)


def small_weights() -> list[np.ndarray]:
    return [np.arange(6, dtype=np.float32).reshape(2, 3), np.array([0.5, -1.5], dtype=np.float32)]


def make_update(**overrides) -> ClientUpdate:
    fields = {
        "client_id": 4, "round": 2, "num_examples": 1234, "weights": small_weights(),
        "start_sha256": "ab" * 32, "fingerprint": "0123456789abcdef", "mu": 0.01, "epochs": 3,
        "batch_size": 32,
        "metrics": {"loss": [np.float32(0.5), 0.25], "accuracy": np.float64(0.875), "seconds": 12},
    }
    fields.update(overrides)
    return ClientUpdate(**fields)


def write_pickle(path, obj, protocol=4):
    path.write_bytes(pickle.dumps(obj, protocol=protocol))
    return path


# --- client updates -------------------------------------------------------------------------------


def test_update_round_trip(tmp_path):
    # Prepare
    update = make_update()
    path = update_path(tmp_path, 4)

    # Execute
    save_update(path, update)
    loaded = load_update(path)

    # Assert
    assert path.name == "pesos_cliente_4.pkl"
    assert (loaded.client_id, loaded.round, loaded.num_examples) == (4, 2, 1234)
    assert (loaded.start_sha256, loaded.fingerprint) == ("ab" * 32, "0123456789abcdef")
    assert (loaded.mu, loaded.epochs, loaded.batch_size) == (0.01, 3, 32)
    assert loaded.metrics == {"loss": [0.5, 0.25], "accuracy": 0.875, "seconds": 12}
    assert type(loaded.metrics["loss"][0]) is float and type(loaded.metrics["accuracy"]) is float
    assert loaded.bare is False and loaded.path == path
    assert len(loaded.weights) == 2
    for saved, original in zip(loaded.weights, update.weights):
        assert saved.dtype == np.float32
        np.testing.assert_array_equal(saved, original)


def test_update_float64_weights_are_stored_as_float32(tmp_path):
    # Prepare
    update = make_update(weights=[np.array([0.1, 0.2], dtype=np.float64)], num_examples=None)
    path = tmp_path / "pesos_cliente_4.pkl"

    # Execute
    save_update(path, update)
    loaded = load_update(path)

    # Assert
    assert loaded.weights[0].dtype == np.float32
    np.testing.assert_array_equal(loaded.weights[0], np.array([0.1, 0.2], dtype=np.float32))
    assert loaded.num_examples is None


def test_saved_update_is_plain_data(tmp_path):
    # Prepare
    path = tmp_path / "pesos_cliente_4.pkl"

    # Execute
    save_update(path, make_update())
    payload = safe_load_pickle(path)

    # Assert
    assert payload["format"] == UPDATE_FORMAT and payload["version"] == 1
    assert isinstance(payload, dict) and all(isinstance(k, str) for k in payload)


def test_bare_list_of_weights_loads_with_warning(tmp_path, caplog):
    # Prepare
    path = write_pickle(tmp_path / "pesos_cliente_3.pkl", small_weights())

    # Execute
    with caplog.at_level(logging.WARNING, logger="fedmnist.exchange"):
        loaded = load_update(path)

    # Assert
    assert loaded.bare is True
    assert loaded.client_id == 3 and loaded.num_examples is None
    assert loaded.start_sha256 is None and loaded.fingerprint is None
    for a, b in zip(loaded.weights, small_weights()):
        np.testing.assert_array_equal(a, b)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "pesos_cliente_3.pkl" in warnings[0].getMessage() and "bare list" in warnings[0].getMessage()


def test_bare_list_pickled_with_highest_protocol(tmp_path):
    # Prepare: what `pickle.dump(model.get_weights(), f, pickle.HIGHEST_PROTOCOL)` writes
    path = write_pickle(tmp_path / "pesos_cliente_5.pkl", small_weights(), protocol=5)

    # Execute
    loaded = load_update(path)

    # Assert
    assert loaded.client_id == 5
    np.testing.assert_array_equal(loaded.weights[0], small_weights()[0])


def test_wrong_format_tag(tmp_path):
    # Prepare
    payload = make_update().to_payload() | {"format": "someone-elses-format"}
    path = write_pickle(tmp_path / "pesos_cliente_4.pkl", payload)

    # Execute
    with pytest.raises(UpdateFileError) as excinfo:
        load_update(path)

    # Assert
    assert str(path) in str(excinfo.value)
    assert "not a fedmnist client update" in str(excinfo.value)
    assert "someone-elses-format" in str(excinfo.value)


def test_global_file_passed_as_update(tmp_path, cnn_weights):
    # Prepare
    path = global_path(tmp_path, 0)
    save_global(path, make_global(cnn_weights, 0, "init", DEFAULT_SEED))

    # Execute
    with pytest.raises(UpdateFileError) as excinfo:
        load_update(path)

    # Assert
    assert str(path) in str(excinfo.value)
    assert "this is a global-weights file" in str(excinfo.value)


def test_update_passed_as_global(tmp_path):
    # Prepare
    path = tmp_path / "pesos_cliente_4.pkl"
    save_update(path, make_update())

    # Execute
    with pytest.raises(UpdateFileError) as excinfo:
        load_global(path)

    # Assert
    assert str(path) in str(excinfo.value)
    assert "client update, not global weights" in str(excinfo.value)


@pytest.mark.parametrize(
    ("field", "value", "fragment"),
    [
        ("num_examples", 0, "num_examples must be positive"),
        ("num_examples", "100", "field 'num_examples' has type str"),
        ("mu", -0.1, "mu must be a finite number >= 0"),
        ("client_id", True, "field 'client_id' has type bool"),
        ("weights", [], "'weights' must be a non-empty list"),
        ("weights", [np.arange(3)], "weight 0 has dtype int64"),
        ("version", 99, "unsupported update version 99"),
    ],
)
def test_bad_update_fields(tmp_path, field, value, fragment):
    # Prepare
    payload = make_update().to_payload() | {field: value}
    path = write_pickle(tmp_path / "pesos_cliente_4.pkl", payload)

    # Execute
    with pytest.raises(UpdateFileError) as excinfo:
        load_update(path)

    # Assert
    assert str(path) in str(excinfo.value)
    assert fragment in str(excinfo.value)


def test_object_arrays_are_refused(tmp_path):
    # Prepare
    weights = [np.array([1.0, "x"], dtype=object)]
    path = write_pickle(tmp_path / "pesos_cliente_2.pkl", weights)

    # Execute
    with pytest.raises(UpdateFileError) as excinfo:
        load_update(path)

    # Assert
    assert str(path) in str(excinfo.value)
    assert "arrays of Python objects are not allowed" in str(excinfo.value)


# --- malicious and broken files -------------------------------------------------------------------


class Exploit:
    """Unpickling an instance calls ``func(*args)``."""

    def __init__(self, func, args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def exploits(marker):
    return {
        "os.system": Exploit(os.system, (f"touch {marker}",)),
        "builtins.eval": Exploit(builtins.eval, (f"open({str(marker)!r}, 'w').close()",)),
        "subprocess.Popen": Exploit(subprocess.Popen, (["touch", str(marker)],)),
    }


EXPLOIT_NAMES = ["os.system", "builtins.eval", "subprocess.Popen"]


@pytest.mark.parametrize("name", EXPLOIT_NAMES)
def test_exploit_payload_is_live_with_plain_pickle(tmp_path, name):
    # Control: the payload really runs code under pickle.loads, so the refusal tests below mean something.
    # Prepare
    marker = tmp_path / "pwned"
    data = pickle.dumps(exploits(marker)[name])

    # Execute
    result = pickle.loads(data)
    if isinstance(result, subprocess.Popen):
        result.wait(timeout=30)

    # Assert
    assert marker.exists()


@pytest.mark.parametrize("name", EXPLOIT_NAMES)
@pytest.mark.parametrize("loader", [load_update, load_global, safe_load_pickle],
                         ids=["load_update", "load_global", "safe_load_pickle"])
def test_code_running_pickle_is_refused(tmp_path, name, loader):
    # Prepare
    marker = tmp_path / "pwned"
    path = write_pickle(tmp_path / "pesos_cliente_1.pkl", exploits(marker)[name])

    # Execute
    with pytest.raises(UpdateFileError) as excinfo:
        loader(path)

    # Assert
    assert str(path) in str(excinfo.value)
    assert "refusing to load" in str(excinfo.value)
    assert not marker.exists()


def test_exploit_hidden_inside_an_update_is_refused(tmp_path):
    # Prepare
    marker = tmp_path / "pwned"
    payload = make_update().to_payload()
    payload["metrics"] = {"loss": exploits(marker)["os.system"]}
    path = write_pickle(tmp_path / "pesos_cliente_1.pkl", payload)

    # Execute
    with pytest.raises(UpdateFileError) as excinfo:
        load_update(path)

    # Assert
    assert "posix.system" in str(excinfo.value) or "os.system" in str(excinfo.value)
    assert not marker.exists()


def test_truncated_file(tmp_path):
    # Prepare
    path = tmp_path / "pesos_cliente_1.pkl"
    save_update(path, make_update())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])

    # Execute
    with pytest.raises(UpdateFileError) as excinfo:
        load_update(path)

    # Assert
    assert str(path) in str(excinfo.value)
    assert "truncated" in str(excinfo.value)


@pytest.mark.parametrize("cut", [1, 10, 100, -1])
def test_truncated_at_various_points(tmp_path, cut):
    # Prepare
    path = tmp_path / "pesos_cliente_1.pkl"
    save_update(path, make_update())
    data = path.read_bytes()
    path.write_bytes(data[:cut])

    # Execute / Assert
    with pytest.raises(UpdateFileError, match=r"pesos_cliente_1\.pkl"):
        load_update(path)


def test_garbage_bytes(tmp_path):
    # Prepare
    path = tmp_path / "pesos_cliente_1.pkl"
    path.write_bytes(b"\x00\xffthis is not a pickle at all" * 10)

    # Execute
    with pytest.raises(UpdateFileError) as excinfo:
        load_update(path)

    # Assert
    assert str(path) in str(excinfo.value)
    assert "invalid pickle" in str(excinfo.value) or "corrupted" in str(excinfo.value)


def test_empty_file(tmp_path):
    # Prepare
    path = tmp_path / "pesos_cliente_1.pkl"
    path.write_bytes(b"")

    # Execute
    with pytest.raises(UpdateFileError) as excinfo:
        load_update(path)

    # Assert
    assert str(excinfo.value) == f"{path}: the file is empty"


def test_missing_file(tmp_path):
    # Prepare
    path = tmp_path / "pesos_cliente_1.pkl"

    # Execute
    with pytest.raises(UpdateFileError) as excinfo:
        load_update(path)

    # Assert
    assert str(excinfo.value) == f"{path}: file not found"


def test_not_a_dict_or_list(tmp_path):
    # Prepare
    path = write_pickle(tmp_path / "pesos_cliente_1.pkl", "just a string")

    # Execute
    with pytest.raises(UpdateFileError) as excinfo:
        load_update(path)

    # Assert
    assert str(path) in str(excinfo.value) and "found str" in str(excinfo.value)


# --- find_updates ---------------------------------------------------------------------------------


def test_find_updates_sorts_numerically(tmp_path):
    # Prepare
    for name in ["pesos_cliente_10.pkl", "pesos_cliente_2.pkl", "pesos_cliente_1.pkl",
                 "pesos_cliente_3.pkl", "pesos_cliente_x.pkl", "pesos_globales_ronda_0.pkl", "notas.txt"]:
        (tmp_path / name).write_bytes(b"")

    # Execute
    found = find_updates(tmp_path)

    # Assert
    assert [p.name for p in found] == ["pesos_cliente_1.pkl", "pesos_cliente_2.pkl",
                                       "pesos_cliente_3.pkl", "pesos_cliente_10.pkl"]


def test_find_updates_empty_directory(tmp_path):
    # Execute / Assert
    assert find_updates(tmp_path) == []


# --- global weights -------------------------------------------------------------------------------


def test_global_round_trip(tmp_path, cnn_weights):
    # Prepare
    gw = make_global(cnn_weights, 5, "fedavg", seed=DEFAULT_SEED)
    path = global_path(tmp_path, 5)

    # Execute
    save_global(path, gw)
    loaded = load_global(path)

    # Assert
    assert path.name == "pesos_globales_ronda_5.pkl"
    assert (loaded.round, loaded.method, loaded.seed) == (5, "fedavg", DEFAULT_SEED)
    assert loaded.sha256 == gw.sha256 == weights_sha256(cnn_weights)
    assert loaded.fingerprint == model_fingerprint()
    assert loaded.path == path
    for a, b in zip(loaded.weights, cnn_weights):
        assert a.dtype == np.float32
        np.testing.assert_array_equal(a, b)


def test_global_modified_array_is_detected(tmp_path, cnn_weights):
    # Prepare
    path = tmp_path / "pesos_globales_ronda_1.pkl"
    save_global(path, make_global(cnn_weights, 1, "fedavg"))
    payload = pickle.loads(path.read_bytes())
    payload["weights"][6][0, 0] += 1.0
    write_pickle(path, payload)

    # Execute
    with pytest.raises(UpdateFileError) as excinfo:
        load_global(path)

    # Assert
    assert str(path) in str(excinfo.value)
    assert "differs from the stored" in str(excinfo.value) and "corrupted" in str(excinfo.value)


def test_global_wrong_stored_hash(tmp_path, cnn_weights):
    # Prepare
    payload = {"format": GLOBAL_FORMAT, "version": 1, "round": 1, "method": "fedavg", "seed": None,
               "sha256": "0" * 64, "fingerprint": model_fingerprint(), "weights": cnn_weights}
    path = write_pickle(tmp_path / "pesos_globales_ronda_1.pkl", payload)

    # Execute
    with pytest.raises(UpdateFileError) as excinfo:
        load_global(path)

    # Assert
    assert str(path) in str(excinfo.value) and "000000000000" in str(excinfo.value)


def test_global_wrong_fingerprint(tmp_path, cnn_weights):
    # Prepare
    payload = {"format": GLOBAL_FORMAT, "version": 1, "round": 1, "method": "fedavg", "seed": None,
               "sha256": weights_sha256(cnn_weights), "fingerprint": "ffffffffffffffff",
               "weights": cnn_weights}
    path = write_pickle(tmp_path / "pesos_globales_ronda_1.pkl", payload)

    # Execute
    with pytest.raises(UpdateFileError) as excinfo:
        load_global(path)

    # Assert
    assert str(path) in str(excinfo.value) and "fingerprint ffffffffffffffff differs" in str(excinfo.value)


def test_global_weights_that_do_not_fit_the_cnn(tmp_path):
    # Prepare
    path = tmp_path / "pesos_globales_ronda_1.pkl"
    save_global(path, make_global(small_weights(), 1, "fedavg"))

    # Execute
    with pytest.raises(UpdateFileError) as excinfo:
        load_global(path)

    # Assert
    assert str(path) in str(excinfo.value) and "do not fit the shared CNN" in str(excinfo.value)


def test_bare_list_as_global_is_round_zero(tmp_path, cnn_weights, caplog):
    # Prepare
    path = write_pickle(tmp_path / "pesos_globales_ronda_0.pkl", cnn_weights)

    # Execute
    with caplog.at_level(logging.WARNING, logger="fedmnist.exchange"):
        loaded = load_global(path)

    # Assert
    assert (loaded.round, loaded.method) == (0, "bare")
    assert loaded.sha256 == weights_sha256(cnn_weights)
    assert any("bare list" in r.getMessage() for r in caplog.records)


def test_make_global_copies_to_float32(cnn_weights):
    # Prepare
    weights64 = [w.astype(np.float64) for w in cnn_weights]

    # Execute
    gw = make_global(weights64, 2, "fedmed")

    # Assert
    assert all(w.dtype == np.float32 for w in gw.weights)
    assert gw.sha256 == weights_sha256(cnn_weights)
    assert gw.fingerprint == model_fingerprint() and gw.round == 2 and gw.method == "fedmed"
