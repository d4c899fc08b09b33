"""Tests for fedmnist.model: the shared CNN's architecture, deterministic init, hashes and .h5 export."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from fedmnist.model import (
    DEFAULT_SEED,
    build_model,
    count_params,
    initial_weights,
    layers_mismatch,
    model_fingerprint,
    save_keras_model,
    weight_spec,
    weights_mismatch,
    weights_sha256,
)

EXPECTED_SHAPES = [(3, 3, 1, 32), (32,), (3, 3, 32, 64), (64,), (3, 3, 64, 128), (128,),
                   (1152, 256), (256,), (256, 10), (10,)]


@pytest.fixture(scope="module")
def model() -> keras.Model:
    return build_model(DEFAULT_SEED)


@pytest.fixture(scope="module")
def weights(model) -> list[np.ndarray]:
    return [np.array(w, dtype=np.float32) for w in model.get_weights()]


# --- architecture --------------------------------------------------------------------------------


def test_parameter_count(model):
    # Execute / Assert
    assert count_params(model) == 390_410
    assert model.count_params() == 390_410


def test_layer_sequence_and_output_shapes(model):
    # Execute
    layers = [(type(layer).__name__, tuple(layer.output.shape)) for layer in model.layers]

    # Assert
    assert layers == [
        ("InputLayer", (None, 28, 28, 1)),
        ("Conv2D", (None, 28, 28, 32)),
        ("MaxPooling2D", (None, 14, 14, 32)),
        ("Conv2D", (None, 14, 14, 64)),
        ("MaxPooling2D", (None, 7, 7, 64)),
        ("Conv2D", (None, 7, 7, 128)),
        ("MaxPooling2D", (None, 3, 3, 128)),
        ("Flatten", (None, 1152)),
        ("Dense", (None, 256)),
        ("Dropout", (None, 256)),
        ("Dense", (None, 10)),
    ]


def test_layer_configuration(model):
    # Prepare
    configs = [layer.get_config() for layer in model.layers]
    convs = [c for layer, c in zip(model.layers, configs) if isinstance(layer, keras.layers.Conv2D)]
    pools = [c for layer, c in zip(model.layers, configs) if isinstance(layer, keras.layers.MaxPooling2D)]
    dense = [c for layer, c in zip(model.layers, configs) if isinstance(layer, keras.layers.Dense)]
    dropout = [c for layer, c in zip(model.layers, configs) if isinstance(layer, keras.layers.Dropout)]

    # Assert
    assert [c["filters"] for c in convs] == [32, 64, 128]
    assert all(tuple(c["kernel_size"]) == (3, 3) for c in convs)
    assert all(c["padding"] == "same" and c["activation"] == "relu" for c in convs)
    assert all(tuple(c["pool_size"]) == (2, 2) for c in pools)
    assert [(c["units"], c["activation"]) for c in dense] == [(256, "relu"), (10, "softmax")]
    assert len(dropout) == 1 and 0 < dropout[0]["rate"] < 1


def test_output_is_a_probability_distribution(model):
    # Prepare
    x = np.random.default_rng(0).random((4, 28, 28, 1), dtype=np.float32)

    # Execute
    probs = np.asarray(model(x, training=False))

    # Assert
    assert probs.shape == (4, 10)
    assert np.all(probs >= 0)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)


def test_weight_spec_matches_model(weights):
    # Execute
    spec = weight_spec()

    # Assert
    assert [shape for _, shape, _ in spec] == EXPECTED_SHAPES
    assert [w.shape for w in weights] == EXPECTED_SHAPES
    assert all(dtype == "float32" for _, _, dtype in spec)


# --- deterministic initialisation ----------------------------------------------------------------


def test_same_seed_bit_identical_weights(weights):
    # Execute
    again = initial_weights(DEFAULT_SEED)

    # Assert
    assert len(again) == len(weights)
    for a, b in zip(weights, again):
        assert a.dtype == b.dtype == np.float32
        assert a.tobytes() == b.tobytes()


def test_different_seed_different_weights(weights):
    # Execute
    other = initial_weights(DEFAULT_SEED + 1)

    # Assert
    kernels = range(0, len(weights), 2)
    assert all(not np.array_equal(weights[i], other[i]) for i in kernels)
    assert weights_sha256(other) != weights_sha256(weights)


def test_biases_start_at_zero_and_kernels_do_not(weights):
    # Assert
    assert all(not np.any(weights[i]) for i in range(1, len(weights), 2))
    assert all(np.std(weights[i]) > 0 for i in range(0, len(weights), 2))


# --- fingerprints and hashes ----------------------------------------------------------------------


def test_model_fingerprint_is_stable_hex_string():
    # Execute
    first = model_fingerprint()
    build_model(7)  # building another model must not change it
    second = model_fingerprint()

    # Assert
    assert isinstance(first, str)
    assert first == second
    assert len(first) == 16 and int(first, 16) >= 0


def test_weights_sha256_equal_for_equal_arrays(weights):
    # Prepare
    copies = [w.copy() for w in weights]

    # Execute / Assert
    assert weights_sha256(copies) == weights_sha256(weights)
    assert len(weights_sha256(weights)) == 64


def test_weights_sha256_changes_when_one_value_changes(weights):
    # Prepare
    changed = [w.copy() for w in weights]
    changed[6][100, 17] = np.nextafter(changed[6][100, 17], np.float32(np.inf))

    # Execute / Assert
    assert weights_sha256(changed) != weights_sha256(weights)


def test_weights_sha256_sees_shape_dtype_and_order():
    # Prepare
    a = np.arange(6, dtype=np.float32)
    b = np.ones(2, dtype=np.float32)

    # Execute
    base = weights_sha256([a, b])

    # Assert
    assert weights_sha256([a.reshape(2, 3), b]) != base
    assert weights_sha256([a.astype(np.float64), b]) != base
    assert weights_sha256([b, a]) != base
    assert weights_sha256([a.astype(">f4"), b]) == base  # byte order does not matter, values do


def test_weights_sha256_of_non_contiguous_view_equals_copy():
    # Prepare
    a = np.arange(12, dtype=np.float32).reshape(3, 4)

    # Execute / Assert
    assert weights_sha256([a.T]) == weights_sha256([np.ascontiguousarray(a.T)])


# --- weights_mismatch -----------------------------------------------------------------------------


def test_weights_mismatch_none_for_fitting_weights(weights):
    # Execute / Assert
    assert weights_mismatch(weights) is None


def test_weights_mismatch_wrong_count(weights):
    # Execute
    message = weights_mismatch(weights[:-1])

    # Assert
    assert message == "expected 10 weight arrays for the shared CNN, got 9"


def test_weights_mismatch_wrong_shape(weights):
    # Prepare
    bad = list(weights)
    bad[2] = np.zeros((3, 3, 32, 16), np.float32)

    # Execute
    message = weights_mismatch(bad)

    # Assert
    assert message == ("weight 2 (conv2/kernel) has shape (3, 3, 32, 16), expected (3, 3, 32, 64) "
                       "as in the shared CNN")


def test_weights_mismatch_wrong_dtype(weights):
    # Prepare
    bad = list(weights)
    bad[9] = np.zeros(10, np.int32)

    # Execute
    message = weights_mismatch(bad)

    # Assert
    assert "weight 9" in message and "int32" in message


def test_weights_mismatch_not_arrays(weights):
    # Prepare
    bad = list(weights)
    bad[1] = [0.0] * 32

    # Execute / Assert
    assert "not a numpy array" in weights_mismatch(bad)
    assert "expected a list" in weights_mismatch({"w": weights[0]})


# --- .h5 export -----------------------------------------------------------------------------------


def test_save_keras_model_writes_loadable_h5(tmp_path):
    # Prepare
    weights = initial_weights(3)  # not the weights build_model(DEFAULT_SEED) starts with
    path = tmp_path / "modelo_global.h5"

    # Execute
    save_keras_model(weights, path)
    loaded = keras.models.load_model(path)

    # Assert
    assert sorted(p.name for p in tmp_path.iterdir()) == ["modelo_global.h5"]
    assert path.read_bytes()[:8] == b"\x89HDF\r\n\x1a\n"
    reloaded = loaded.get_weights()
    assert len(reloaded) == len(weights)
    for a, b in zip(weights, reloaded):
        np.testing.assert_array_equal(a, b)
    assert loaded.count_params() == 390_410


def test_layers_mismatch_names_the_weight_and_the_reference():
    # Prepare: the shapes of a two-layer model
    shapes = [(2, 2), ()]
    good = [np.zeros((2, 2), np.float32), np.array(0.0, np.float32)]

    # Execute / Assert
    assert layers_mismatch(good, shapes) is None
    assert layers_mismatch(good[:1], shapes, "client 0") == "expected 2 weight arrays for client 0, got 1"
    assert layers_mismatch([good[0], np.zeros(3)], shapes) == "weight 1 has shape (3,), expected () as in the model"
    assert layers_mismatch([[[0.0, 0.0], [0.0, 0.0]], 0.0], shapes) == "weight 0 is a list, not a numpy array"
    assert layers_mismatch([[[0.0, 0.0], [0.0, 0.0]], 0.0], shapes, numpy_only=False) is None
    assert layers_mismatch(np.zeros(2), shapes) == "expected a list of arrays, got ndarray"
    assert layers_mismatch(good, shapes, names=["a/kernel", "b/bias"]) is None
    assert layers_mismatch([good[0], np.zeros(1)], shapes, names=["a/kernel", "b/bias"]).startswith("weight 1 (b/bias)")
