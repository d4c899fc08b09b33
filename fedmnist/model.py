"""The shared CNN every client trains, its deterministic initialisation, and weight fingerprints.

Federated averaging only works when every client starts from the same weights: averaging CNNs trained
from different random initialisations gives chance-level accuracy. ``build_model(seed)`` therefore
gives the same initial weights bit for bit for the same seed, and ``weights_sha256`` lets a file of
weights name the starting point it came from. Keras is imported when a model is built, so the pure
modules can check weights against the CNN's shapes (``layers_mismatch``) without loading TensorFlow.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np

from fedmnist.config import DEFAULT_SEED

if TYPE_CHECKING:
    import keras

DROPOUT_RATE = 0.5
ARCHITECTURE = "fedmnist-cnn-v1"
NUM_CLASSES = 10
INPUT_SHAPE = (28, 28, 1)

Weights = list[np.ndarray]


def build_model(seed: int = DEFAULT_SEED) -> keras.Model:
    """The course CNN (390,410 parameters), uncompiled, with initial weights fixed by ``seed``.

    Conv2D 32 → MaxPool → Conv2D 64 → MaxPool → Conv2D 128 → MaxPool (3×3 kernels, 'same' padding,
    ReLU) → Flatten (1152) → Dense 256 ReLU → Dropout → Dense 10 softmax.
    """
    import keras

    def glorot(offset: int) -> keras.initializers.Initializer:
        return keras.initializers.GlorotUniform(seed=seed * 10 + offset)

    conv = functools.partial(keras.layers.Conv2D, kernel_size=3, padding="same", activation="relu")
    inputs = keras.Input(shape=INPUT_SHAPE, name="imagen")
    x = conv(32, kernel_initializer=glorot(1), name="conv1")(inputs)
    x = keras.layers.MaxPooling2D(name="pool1")(x)
    x = conv(64, kernel_initializer=glorot(2), name="conv2")(x)
    x = keras.layers.MaxPooling2D(name="pool2")(x)
    x = conv(128, kernel_initializer=glorot(3), name="conv3")(x)
    x = keras.layers.MaxPooling2D(name="pool3")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    x = keras.layers.Dense(256, activation="relu", kernel_initializer=glorot(4), name="dense")(x)
    x = keras.layers.Dropout(DROPOUT_RATE, seed=seed, name="dropout")(x)
    outputs = keras.layers.Dense(NUM_CLASSES, activation="softmax", kernel_initializer=glorot(5),
                                 name="salida")(x)
    return keras.Model(inputs, outputs, name="cnn_mnist")


def compile_for_saving(model: keras.Model) -> keras.Model:
    """Compile with the loss and metric a user expects when reloading the saved .h5."""
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


def get_weights(model: keras.Model) -> Weights:
    """The model's weights as fresh float32 arrays, in ``model.get_weights()`` order."""
    return [np.array(w, dtype=np.float32, copy=True) for w in model.get_weights()]


@functools.cache
def weight_spec() -> tuple[tuple[str, tuple[int, ...], str], ...]:
    """(name, shape, dtype) of each weight array of the shared CNN, in exchange order."""
    model = build_model(DEFAULT_SEED)
    return tuple(
        (f"{layer.name}/{w.name}", tuple(w.shape), "float32")
        for layer in model.layers
        for w in layer.weights
    )


def initial_weights(seed: int = DEFAULT_SEED) -> Weights:
    """The starting weights of a new federation (those of ``build_model(seed)``)."""
    return get_weights(build_model(seed))


def model_fingerprint() -> str:
    """Short hash of the architecture and its weight names, shapes and dtypes.

    Two weight files with the same fingerprint fit the same model; a file whose fingerprint differs
    was made by another architecture (or another version of this one).
    """
    payload = json.dumps({"architecture": ARCHITECTURE, "weights": weight_spec()}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def weights_sha256(weights: Weights) -> str:
    """sha256 over every array's dtype, shape and little-endian bytes, in order."""
    digest = hashlib.sha256()
    for weight in weights:
        array = np.ascontiguousarray(weight)
        little = array.dtype.newbyteorder("<")
        digest.update(f"{little.str}{array.shape}".encode())
        digest.update(array.astype(little, copy=False).tobytes())
    return digest.hexdigest()


def layers_mismatch(arrays: object, shapes: Sequence[tuple[int, ...]], reference: str = "the model", *,
                    names: Sequence[str] | None = None, numpy_only: bool = True) -> str | None:
    """Why ``arrays`` is not one array per layer of ``shapes``, in order, or None when it is.

    The one layer-shape check (weights against the CNN, controls and optimiser moments against the
    global weights, clients against each other), so every caller says the same thing: ``expected 10
    weight arrays for the shared CNN, got 9``, ``weight 2 (conv2/kernel) has shape (3, 3, 32, 16),
    expected (3, 3, 32, 64) as in the shared CNN``. ``reference`` names where ``shapes`` come from,
    ``names`` labels the weights; ``numpy_only`` requires numpy arrays (what a file or a reply must
    hold), else anything numpy can shape passes (the pure rules take array-likes).
    """
    if not isinstance(arrays, (list, tuple)):
        return f"expected a list of arrays, got {type(arrays).__name__}"
    if len(arrays) != len(shapes):
        return f"expected {len(shapes)} weight arrays for {reference}, got {len(arrays)}"
    for i, (array, shape) in enumerate(zip(arrays, shapes)):
        label = f"weight {i}" + (f" ({names[i]})" if names is not None else "")
        if numpy_only and not isinstance(array, np.ndarray):
            return f"{label} is a {type(array).__name__}, not a numpy array"
        if np.shape(array) != tuple(shape):
            return f"{label} has shape {np.shape(array)}, expected {tuple(shape)} as in {reference}"
    return None


def weights_mismatch(weights: Weights) -> str | None:
    """Why ``weights`` do not fit the shared CNN (count, shapes, floating dtype), or None when they do."""
    spec = weight_spec()
    problem = layers_mismatch(weights, [shape for _, shape, _ in spec], "the shared CNN",
                              names=[name for name, _, _ in spec])
    if problem is not None:
        return problem
    for i, (array, (name, _, _)) in enumerate(zip(weights, spec)):
        if not np.issubdtype(array.dtype, np.floating):
            return f"weight {i} ({name}) has dtype {array.dtype}, expected floating point"
    return None


@functools.cache
def _model_for_saving() -> keras.Model:
    """One compiled model reused by every save (the server saves a model per method or per round)."""
    return compile_for_saving(build_model(DEFAULT_SEED))


def save_keras_model(weights: Weights, path: str | os.PathLike) -> None:
    """Save the shared CNN holding ``weights`` as a compiled Keras .h5 file, atomically."""
    from fedmnist.io import atomic_path

    model = _model_for_saving()
    model.set_weights([np.asarray(w, dtype=np.float32) for w in weights])
    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.ERROR)  # the course asks for .h5, which Keras 3 calls legacy at every save
    try:
        with atomic_path(path, suffix=".h5") as tmp:
            model.save(tmp)
    finally:
        absl.setLevel(level)


def count_params(model: keras.Model) -> int:
    """Number of trainable parameters."""
    return int(sum(np.prod(v.shape) for v in model.trainable_weights))


if __name__ == "__main__":
    build_model().summary()
