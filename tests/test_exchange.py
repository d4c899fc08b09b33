"""Tests for fedmnist.exchange: update and global-weights files, and refusing pickles that run code."""

from __future__ import annotations

import builtins
import functools
import logging
import math
import os
import pickle
import subprocess

import numpy as np
import pytest

from fedmnist.errors import DataError, UpdateFileError, ValidationError
from fedmnist.exchange import (
    CHECKPOINT_LIMITS,
    GLOBAL_FORMAT,
    MAX_NUM_EXAMPLES,
    MODEL_BYTES,
    MODEL_PARAMS,
    UPDATE_FORMAT,
    UPDATE_LIMITS,
    ClientUpdate,
    WeightsError,
    check_num_examples,
    check_weights,
    checkpoint_limits,
    client_id_from_name,
    find_updates,
    global_path,
    load_global,
    load_update,
    make_global,
    safe_load_pickle,
    save_global,
    save_update,
    state_sha256,
    update_path,
)
from fedmnist.model import DEFAULT_SEED, initial_weights, model_fingerprint, weight_spec, weights_sha256
from fedmnist.safe_pickle import PickleLimits


@pytest.fixture(scope="module")
def cnn_weights() -> list[np.ndarray]:
    return initial_weights(DEFAULT_SEED)


def small_weights() -> list[np.ndarray]:
    """Two tiny arrays: weights of some other model, not the shared CNN."""
    return [np.arange(6, dtype=np.float32).reshape(2, 3), np.array([0.5, -1.5], dtype=np.float32)]


@functools.cache
def _cnn() -> tuple[np.ndarray, ...]:
    return tuple(initial_weights(DEFAULT_SEED))


def cnn() -> list[np.ndarray]:
    """Fresh copies of the shared CNN's initial weights (tests may change them)."""
    return [w.copy() for w in _cnn()]


def make_update(**overrides) -> ClientUpdate:
    fields = {
        "client_id": 4, "round": 2, "num_examples": 1234, "weights": cnn(),
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
    assert len(loaded.weights) == len(weight_spec())
    for saved, original in zip(loaded.weights, update.weights):
        assert saved.dtype == np.float32
        np.testing.assert_array_equal(saved, original)


def test_update_float64_weights_are_stored_as_float32(tmp_path):
    # Prepare
    weights64 = [w.astype(np.float64) + 0.1 for w in cnn()]
    path = write_pickle(tmp_path / "pesos_cliente_4.pkl", weights64)

    # Execute
    loaded = load_update(path)

    # Assert
    assert all(w.dtype == np.float32 for w in loaded.weights)
    np.testing.assert_array_equal(loaded.weights[0], weights64[0].astype(np.float32))
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
    path = write_pickle(tmp_path / "pesos_cliente_3.pkl", cnn())

    # Execute
    with caplog.at_level(logging.WARNING, logger="fedmnist.exchange"):
        loaded = load_update(path)

    # Assert
    assert loaded.bare is True
    assert loaded.client_id == 3 and loaded.num_examples is None
    assert loaded.start_sha256 is None and loaded.fingerprint is None
    for a, b in zip(loaded.weights, cnn()):
        np.testing.assert_array_equal(a, b)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "pesos_cliente_3.pkl" in warnings[0].getMessage() and "bare list" in warnings[0].getMessage()


def test_bare_list_pickled_with_highest_protocol(tmp_path):
    # Prepare: what `pickle.dump(model.get_weights(), f, pickle.HIGHEST_PROTOCOL)` writes
    path = write_pickle(tmp_path / "pesos_cliente_5.pkl", cnn(), protocol=5)

    # Execute
    loaded = load_update(path)

    # Assert
    assert loaded.client_id == 5
    for a, b in zip(loaded.weights, cnn()):
        np.testing.assert_array_equal(a, b)


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


def test_find_updates_names_files_whose_names_do_not_parse_as_a_client(tmp_path, caplog):
    # Prepare: a ten-digit id, a newline in the name, a leading zero, a non-ASCII digit
    odd = ["pesos_cliente_1234567890.pkl", "pesos_cliente_2\n.pkl", "pesos_cliente_03.pkl", "pesos_cliente_\u0664.pkl"]
    for name in ["pesos_cliente_1.pkl", *odd]:
        (tmp_path / name).write_bytes(b"")

    # Execute
    with caplog.at_level("WARNING", logger="fedmnist.exchange"):
        found = find_updates(tmp_path)

    # Assert: only the well-named update is read; every other one is named, one escaped line each
    assert [p.name for p in found] == ["pesos_cliente_1.pkl"]
    warnings = [r.getMessage() for r in caplog.records if "does not parse as a client update" in r.getMessage()]
    assert len(warnings) == len(odd) and all("\n" not in w for w in warnings)
    for name in ["pesos_cliente_1234567890.pkl", "pesos_cliente_2\\n.pkl", "pesos_cliente_03.pkl",
                 "pesos_cliente_\u0664.pkl"]:
        assert any(name in w for w in warnings), (name, warnings)


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


def _adam_state(weights):
    from fedmnist.server_opt import init_state

    state = init_state("fedadam", weights)
    state["t"] = 2
    return state


def test_global_server_state_round_trips_with_its_hash(tmp_path, cnn_weights):
    path = tmp_path / "pesos_globales_ronda_2.pkl"
    state = _adam_state(cnn_weights)
    state["m"][0] = state["m"][0] + 0.5

    save_global(path, make_global(cnn_weights, 2, "fedadam", state=state))
    loaded = load_global(path)

    assert loaded.state["t"] == 2 and np.array_equal(loaded.state["m"][0], state["m"][0])
    assert pickle.loads(path.read_bytes())["server_state_sha256"] == state_sha256(state)


@pytest.mark.parametrize("spoil", ["array", "counter", "key", "missing-hash"])
def test_global_server_state_changed_after_writing_is_detected(spoil, tmp_path, cnn_weights):
    path = tmp_path / "pesos_globales_ronda_2.pkl"
    save_global(path, make_global(cnn_weights, 2, "fedadam", state=_adam_state(cnn_weights)))
    payload = pickle.loads(path.read_bytes())
    if spoil == "array":  # a finite, well-shaped change that the method's own checks would accept
        payload["server_state"]["v"][3][0] += 1e-3
    elif spoil == "counter":
        payload["server_state"]["t"] = 7
    elif spoil == "key":
        payload["server_state"]["extra"] = 1
    else:
        del payload["server_state_sha256"]
    write_pickle(path, payload)

    with pytest.raises(UpdateFileError) as excinfo:
        load_global(path)

    message = str(excinfo.value)
    assert str(path) in message
    assert ("server_state_sha256" in message) if spoil == "missing-hash" else ("server state hash" in message)


def test_state_hash_tells_apart_types_shapes_and_order_of_lists():
    a = np.zeros((2, 3), np.float32)
    assert state_sha256({"m": [a]}) == state_sha256({"m": [a.copy()]})
    assert len({state_sha256(v) for v in ({"m": [a]}, {"m": [a.reshape(3, 2)]}, {"m": [a.astype(np.float64)]},
                                          {"m": [a, a]}, {"t": 1}, {"t": 1.0},
                                          {"t": "1"}, {"t": True})}) == 8


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


# --- limits sized from the model ------------------------------------------------------------------


def test_model_size_constants_match_the_cnn():
    # Execute
    params = sum(math.prod(shape) for _, shape, _ in weight_spec())

    # Assert
    assert params == MODEL_PARAMS == 390_410
    assert MODEL_BYTES == 4 * MODEL_PARAMS
    assert 2 * MODEL_BYTES < UPDATE_LIMITS.max_bytes < 8 * MODEL_BYTES  # float64 weights fit, little more
    assert CHECKPOINT_LIMITS.max_bytes >= 6 * 3 * MODEL_BYTES  # six methods with two extra states each


def test_real_update_fits_its_limit(tmp_path):
    # Prepare
    path = update_path(tmp_path, 4)
    save_update(path, make_update())

    # Execute / Assert
    assert path.stat().st_size < UPDATE_LIMITS.max_bytes / 2
    assert load_update(path).client_id == 4


def test_file_larger_than_the_limit_is_refused_before_reading(tmp_path):
    # Prepare: a legitimate update, read with a limit just below its size
    path = update_path(tmp_path, 4)
    save_update(path, make_update())
    size = path.stat().st_size

    # Execute
    with pytest.raises(UpdateFileError) as excinfo:
        load_update(path, PickleLimits(size - 1, 1000, what="client update"))

    # Assert
    assert str(path) in str(excinfo.value)
    assert f"{size:,} bytes" in str(excinfo.value) and "client update" in str(excinfo.value)


@pytest.mark.parametrize("field", ["max_bytes", "max_nodes", "max_depth"])
@pytest.mark.parametrize("value", [0, -1, True, 1.5])
def test_pickle_limits_validate_their_fields(field, value):
    # Prepare
    values = {"max_bytes": 10, "max_nodes": 10, "max_depth": 10} | {field: value}

    # Execute / Assert
    with pytest.raises(ValueError, match=field):
        PickleLimits(**values)


# --- identity and sample counts -------------------------------------------------------------------


def test_client_id_inside_must_match_the_file_name(tmp_path):
    # Prepare: client 4's update saved under client 2's name
    path = update_path(tmp_path, 2)
    save_update(path, make_update(client_id=4))

    # Execute
    with pytest.raises(UpdateFileError) as excinfo:
        load_update(path)

    # Assert
    message = str(excinfo.value)
    assert str(path) in message and "client 4" in message and "says client 2" in message


def test_client_id_of_a_file_with_another_name_is_taken_from_inside(tmp_path):
    # Prepare
    path = tmp_path / "mi_actualizacion.pkl"
    save_update(path, make_update(client_id=7))

    # Execute / Assert
    assert load_update(path).client_id == 7


@pytest.mark.parametrize(
    ("name", "expected"),
    [("pesos_cliente_12.pkl", 12), ("pesos_cliente_x.pkl", None), ("xpesos_cliente_1.pkl", None),
     ("pesos_cliente_1.pkl.bak", None), ("pesos_cliente_1234567890.pkl", None)],
)
def test_client_id_from_name(name, expected):
    # Execute / Assert
    assert client_id_from_name(name) == expected


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        (10**12, "exceeds the limit of 10,000,000"),
        (10**400, "an integer of 1329 bits"),
        (math.inf, "must be a finite integer"),
        (math.nan, "must be a finite integer"),
        (1.5, "must be a finite integer"),
        (-3, "must be positive"),
        (0, "must be positive"),
    ],
    ids=["1e12", "1e400", "inf", "nan", "fraction", "negative", "zero"],
)
def test_implausible_sample_counts_in_a_file_are_refused(tmp_path, value, fragment):
    # Prepare
    payload = make_update().to_payload() | {"num_examples": value}
    path = write_pickle(tmp_path / "pesos_cliente_4.pkl", payload)

    # Execute
    with pytest.raises(UpdateFileError) as excinfo:
        load_update(path)

    # Assert
    assert str(path) in str(excinfo.value) and fragment in str(excinfo.value)
    assert len(str(excinfo.value)) < 400


@pytest.mark.parametrize(
    ("value", "expected"),
    [(1, 1), (60_000, 60_000), (np.int64(250), 250), (250.0, 250), (np.float32(8.0), 8),
     (MAX_NUM_EXAMPLES, MAX_NUM_EXAMPLES)],
)
def test_check_num_examples_accepts_plausible_counts(value, expected):
    # Execute
    count = check_num_examples(value, "node 7")

    # Assert
    assert count == expected and type(count) is int


@pytest.mark.parametrize(
    "value", [True, np.bool_(True), "100", None, [3], MAX_NUM_EXAMPLES + 1, 10**400, -math.inf, 1e300],
)
def test_check_num_examples_refuses_and_names_the_source(value):
    # Execute
    with pytest.raises(ValidationError) as excinfo:
        check_num_examples(value, "node 7")

    # Assert
    assert str(excinfo.value).startswith("node 7: num_examples")


def test_check_num_examples_against_the_manifest():
    # Execute / Assert
    assert check_num_examples(120, "node 7", expected=120) == 120
    with pytest.raises(ValidationError, match=r"claims 121 training examples.*gives this client 120"):
        check_num_examples(121, "node 7", expected=120)


def test_check_num_examples_raises_the_callers_error():
    # Execute / Assert
    with pytest.raises(DataError, match=r"particion\.json: num_examples must be positive"):
        check_num_examples(0, "particion.json", error=DataError)


@pytest.mark.parametrize(
    ("field", "value", "fragment"),
    [
        ("round", -1, "field 'round' must be in [0, "),
        ("round", 10**300, "an integer of"),
        ("client_id", 0, "field 'client_id' must be in [1, "),
        ("batch_size", 0, "field 'batch_size' must be in [1, "),
        ("start_sha256", "x" * 10_000, "field 'start_sha256' is not a hexadecimal hash"),
        ("fingerprint", "not hex", "field 'fingerprint' is not a hexadecimal hash"),
        ("mu", math.inf, "mu must be a finite number >= 0"),
        ("format", "z" * 10_000, "not a fedmnist client update"),
    ],
)
def test_metadata_out_of_range_is_refused_briefly(tmp_path, field, value, fragment):
    # Prepare
    payload = make_update().to_payload() | {field: value}
    path = write_pickle(tmp_path / "pesos_cliente_4.pkl", payload)

    # Execute
    with pytest.raises(UpdateFileError) as excinfo:
        load_update(path)

    # Assert
    assert str(path) in str(excinfo.value) and fragment in str(excinfo.value)
    assert len(str(excinfo.value)) < 400


# --- weights --------------------------------------------------------------------------------------


def nan_at(weights, index):
    weights[index].flat[0] = np.nan
    return weights


@pytest.mark.parametrize(
    ("weights", "fragment"),
    [
        (nan_at(cnn(), 3), "weight 3 holds NaN or infinite values"),
        ([w.astype(np.float64) * (1e300 if i == 4 else 1) for i, w in enumerate(cnn())],
         "weight 4 holds NaN or infinite values"),  # finite in float64, infinite as float32
        (small_weights(), "do not fit the shared CNN"),
        ([*cnn()[:-1], cnn()[-1].astype(np.int32)], "weight 9 has dtype int32"),
        ("weights", "non-empty list"),
    ],
    ids=["nan", "float32-overflow", "other-model", "int-dtype", "not-a-list"],
)
def test_update_with_unusable_weights_is_refused(tmp_path, weights, fragment):
    # Prepare
    payload = make_update().to_payload() | {"weights": weights}
    path = write_pickle(tmp_path / "pesos_cliente_4.pkl", payload)

    # Execute
    with pytest.raises(WeightsError) as excinfo:
        load_update(path)

    # Assert: a bad file and a bad reply at once, naming the file
    assert isinstance(excinfo.value, UpdateFileError) and isinstance(excinfo.value, ValidationError)
    assert str(path) in str(excinfo.value) and fragment in str(excinfo.value)


def test_check_weights_returns_float32_without_changing_the_input():
    # Prepare
    weights64 = [w.astype(np.float64) for w in cnn()]
    weights32 = cnn()
    before = [w.copy() for w in weights64]

    # Execute
    from32 = check_weights(weights32, "node 3")
    from64 = check_weights(weights64, "node 3")

    # Assert
    assert all(a is b for a, b in zip(from32, weights32))  # already float32: no copy
    assert all(w.dtype == np.float32 for w in from64)
    for original, now in zip(before, weights64):
        assert now.dtype == np.float64
        np.testing.assert_array_equal(original, now)


def test_check_weights_names_the_source_with_the_callers_error():
    # Execute
    with pytest.raises(ValidationError) as excinfo:
        check_weights(nan_at(cnn(), 0), "node 3")

    # Assert
    assert str(excinfo.value) == "node 3: weight 0 holds NaN or infinite values"


@pytest.mark.parametrize("bare", [False, True], ids=["dict", "bare-list"])
def test_global_with_nan_is_refused(tmp_path, bare):
    # Prepare: the stored hash matches the NaN weights, so only the finiteness check can catch them
    weights = nan_at(cnn(), 2)
    path = tmp_path / "pesos_globales_ronda_1.pkl"
    if bare:
        write_pickle(path, weights)
    else:
        write_pickle(path, {"format": GLOBAL_FORMAT, "version": 1, "round": 1, "method": "fedavg",
                            "seed": None, "sha256": weights_sha256(weights),
                            "fingerprint": model_fingerprint(), "weights": weights})

    # Execute
    with pytest.raises(UpdateFileError) as excinfo:
        load_global(path)

    # Assert
    assert str(path) in str(excinfo.value) and "NaN or infinite" in str(excinfo.value)


def test_checkpoint_limits_grow_with_the_model_copies():
    # Execute
    small, large = checkpoint_limits(1), checkpoint_limits(1000)

    # Assert
    assert small.max_bytes > MODEL_BYTES and small.what == "checkpoint"
    assert large.max_bytes > 1000 * MODEL_BYTES
    assert CHECKPOINT_LIMITS == checkpoint_limits(128)
    with pytest.raises(ValueError, match="model_copies"):
        checkpoint_limits(0)


def test_a_huge_integer_mu_is_refused_without_a_traceback(tmp_path):
    import pickle as _pickle

    from fedmnist.errors import UpdateFileError
    from fedmnist.exchange import ClientUpdate, load_update, update_path
    from fedmnist.model import initial_weights, model_fingerprint

    update = ClientUpdate(2, 0, 10, initial_weights(), "ab" * 32, model_fingerprint())
    payload = update.to_payload()
    payload["mu"] = 2**2000
    path = update_path(tmp_path, 2)
    path.write_bytes(_pickle.dumps(payload, protocol=4))
    with pytest.raises(UpdateFileError, match="mu must be a finite number"):
        load_update(path)
