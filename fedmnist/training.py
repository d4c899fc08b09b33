"""Client training: E local epochs of minibatch SGD/Adam from the round's global weights.

One ``ClientTrainer`` holds one model, one optimizer and one compiled epoch function, and is reused
for every client and round (no rebuild, recompile or retrace). A whole epoch runs inside a single
``tf.function`` so small batches (McMahan's B=10) are not dominated by Python overhead.

FedProx (Li et al. 2020) lives here: with ``mu > 0`` the loss gains μ/2·‖w − w_global‖², with the
global weights held fixed, which keeps heterogeneous clients from drifting far from the global model.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import tensorflow as tf

from fedmnist.errors import ConfigError
from fedmnist.model import DEFAULT_SEED, Weights, build_model, weights_mismatch

OPTIMIZERS = ("sgd", "adam")
EVAL_BATCH = 500


@dataclass(frozen=True)
class TrainConfig:
    """Local training hyper-parameters; the defaults train a 12k-image part in about a minute on a laptop."""

    epochs: int = 2
    batch_size: int = 32
    optimizer: str = "sgd"
    learning_rate: float = 0.05
    momentum: float = 0.9
    mu: float = 0.0
    validation_split: float = 0.1
    seed: int = DEFAULT_SEED

    def validate(self) -> None:
        """Raise ConfigError for values training cannot use."""
        if self.epochs < 1:
            raise ConfigError(f"epochs must be at least 1 (got {self.epochs})")
        if self.batch_size < 1:
            raise ConfigError(f"batch size must be at least 1 (got {self.batch_size})")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"unknown optimizer '{self.optimizer}'; choose one of {', '.join(OPTIMIZERS)}")
        if not self.learning_rate > 0:
            raise ConfigError(f"learning rate must be > 0 (got {self.learning_rate})")
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"momentum must be in [0, 1) (got {self.momentum})")
        if not (self.mu >= 0 and np.isfinite(self.mu)):
            raise ConfigError(f"the FedProx coefficient mu must be >= 0 (got {self.mu})")
        if not 0 <= self.validation_split < 1:
            raise ConfigError(f"validation split must be in [0, 1) (got {self.validation_split})")


@dataclass
class TrainResult:
    """What one client's local training produced."""

    weights: Weights
    num_examples: int
    history: dict[str, list[float]] = field(default_factory=dict)


def proximal_penalty(variables: list, anchors: list, mu: tf.Tensor) -> tf.Tensor:
    """FedProx's proximal term μ/2·Σ‖w − w_global‖² (its gradient is μ·(w − w_global))."""
    squared = tf.add_n([tf.reduce_sum(tf.square(v - tf.stop_gradient(a))) for v, a in zip(variables, anchors)])
    return 0.5 * mu * squared


class ClientTrainer:
    """Trains the shared CNN on one client's data at a time, reusing one compiled model.

    The optimizer's state (momentum, Adam moments) is reset for every client, as each client starts a
    fresh local optimisation from the global weights.
    """

    def __init__(
        self,
        optimizer: str = "sgd",
        learning_rate: float = 0.05,
        momentum: float = 0.9,
        model_seed: int = DEFAULT_SEED,
    ) -> None:
        if optimizer not in OPTIMIZERS:
            raise ConfigError(f"unknown optimizer '{optimizer}'; choose one of {', '.join(OPTIMIZERS)}")
        self.optimizer_name, self.learning_rate = optimizer, float(learning_rate)
        self.momentum = float(momentum) if optimizer == "sgd" else 0.0
        self.model = build_model(model_seed)
        self.variables = list(self.model.trainable_variables)
        if len(self.variables) != len(self.model.weights):
            raise RuntimeError("the shared CNN is expected to have only trainable weights")
        if optimizer == "sgd":
            self.optimizer = keras.optimizers.SGD(learning_rate=learning_rate, momentum=momentum)
        else:
            self.optimizer = keras.optimizers.Adam(learning_rate=learning_rate)
        self.optimizer.build(self.variables)
        self._optimizer_state = [
            v for v in self.optimizer.variables if v is not getattr(self.optimizer, "_learning_rate", None)
        ]
        self._anchors = [tf.Variable(tf.zeros_like(v), trainable=False) for v in self.variables]
        self._mu = tf.Variable(0.0, trainable=False, dtype=tf.float32)
        self._dropout_state = [
            layer.seed_generator.state for layer in self.model.layers if hasattr(layer, "seed_generator")
        ]
        self._loss = keras.losses.SparseCategoricalCrossentropy(reduction="sum")
        spec = [
            tf.TensorSpec([None, 28, 28, 1], tf.float32),
            tf.TensorSpec([None], tf.int32),
            tf.TensorSpec([None], tf.int32),
            tf.TensorSpec([], tf.int32),
        ]
        self._epoch_plain = tf.function(self._make_epoch(proximal=False), input_signature=spec)
        self._epoch_prox = tf.function(self._make_epoch(proximal=True), input_signature=spec)
        self._evaluate = tf.function(
            self._evaluate_graph,
            input_signature=[tf.TensorSpec([None, 28, 28, 1], tf.float32), tf.TensorSpec([None], tf.int32)],
        )

    def _make_epoch(self, proximal: bool):
        model, variables, optimizer, loss_fn = self.model, self.variables, self.optimizer, self._loss
        anchors, mu = self._anchors, self._mu

        def epoch(x, y, order, batch_size):
            n = tf.shape(order)[0]
            num_batches = (n + batch_size - 1) // batch_size
            loss_sum = tf.constant(0.0)
            correct = tf.constant(0.0)
            for i in tf.range(num_batches):
                idx = order[i * batch_size: tf.minimum((i + 1) * batch_size, n)]
                xb = tf.gather(x, idx)
                yb = tf.gather(y, idx)
                count = tf.cast(tf.shape(idx)[0], tf.float32)
                with tf.GradientTape() as tape:
                    probs = model(xb, training=True)
                    batch_loss = loss_fn(yb, probs)
                    objective = batch_loss / count
                    if proximal:
                        objective += proximal_penalty(variables, anchors, mu)
                grads = tape.gradient(objective, variables)
                optimizer.apply_gradients(zip(grads, variables))
                loss_sum += batch_loss
                hits = tf.equal(tf.argmax(probs, axis=1, output_type=tf.int32), yb)
                correct += tf.reduce_sum(tf.cast(hits, tf.float32))
            total = tf.cast(n, tf.float32)
            return loss_sum / total, correct / total

        return epoch

    def _evaluate_graph(self, x, y):
        n = tf.shape(x)[0]
        num_batches = (n + EVAL_BATCH - 1) // EVAL_BATCH
        loss_sum = tf.constant(0.0)
        predictions = tf.TensorArray(tf.int32, size=num_batches, infer_shape=False)
        for i in tf.range(num_batches):
            start = i * EVAL_BATCH
            stop = tf.minimum(start + EVAL_BATCH, n)
            probs = self.model(x[start:stop], training=False)
            loss_sum += self._loss(y[start:stop], probs)
            predictions = predictions.write(i, tf.argmax(probs, axis=1, output_type=tf.int32))
        return loss_sum / tf.cast(n, tf.float32), predictions.concat()

    def set_weights(self, weights: Weights) -> None:
        """Load ``weights`` into the model after checking they fit."""
        problem = weights_mismatch(weights)
        if problem:
            raise ConfigError(f"the weights do not fit the shared CNN: {problem}")
        for variable, value in zip(self.variables, weights):
            variable.assign(np.asarray(value, dtype=np.float32))

    def get_weights(self) -> Weights:
        """Current weights as fresh float32 arrays."""
        return [v.numpy().astype(np.float32, copy=True) for v in self.variables]

    def predict(self, weights: Weights | None, x: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
        """Mean cross-entropy and predicted labels of ``weights`` (None: current weights) on (x, y)."""
        if weights is not None:
            self.set_weights(weights)
        loss, predicted = self._evaluate(tf.convert_to_tensor(x), tf.convert_to_tensor(y.astype(np.int32)))
        return float(loss), predicted.numpy()

    def _reset_client_state(self, seed: int) -> None:
        for variable in self._optimizer_state:
            variable.assign(tf.zeros_like(variable))
        for state in self._dropout_state:
            state.assign(tf.constant([seed, 0], dtype=state.dtype))

    def train(
        self,
        global_weights: Weights,
        x: np.ndarray,
        y: np.ndarray,
        *,
        epochs: int,
        batch_size: int,
        mu: float = 0.0,
        seed: int = 0,
        x_val: np.ndarray | None = None,
        y_val: np.ndarray | None = None,
    ) -> TrainResult:
        """Train from ``global_weights`` on (x, y) for ``epochs`` epochs; deterministic for a seed.

        ``mu > 0`` adds FedProx's proximal term anchored at ``global_weights``. Data are reshuffled
        every epoch with a generator seeded by ``seed``, which also fixes the dropout masks.
        """
        if len(x) == 0:
            raise ConfigError("cannot train on an empty partition")
        if len(x) != len(y):
            raise ConfigError(f"{len(x)} images but {len(y)} labels")
        self.set_weights(global_weights)
        for anchor, value in zip(self._anchors, global_weights):
            anchor.assign(np.asarray(value, dtype=np.float32))
        self._mu.assign(float(mu))
        self._reset_client_state(seed)
        epoch_fn = self._epoch_prox if mu > 0 else self._epoch_plain
        rng = np.random.default_rng(seed)
        x_t = tf.convert_to_tensor(x, dtype=tf.float32)
        y_t = tf.convert_to_tensor(np.asarray(y, dtype=np.int32))
        history: dict[str, list[float]] = {"loss": [], "accuracy": []}
        if x_val is not None and len(x_val):
            history.update(val_loss=[], val_accuracy=[])
        for _ in range(epochs):
            order = tf.convert_to_tensor(rng.permutation(len(x)).astype(np.int32))
            loss, accuracy = epoch_fn(x_t, y_t, order, tf.constant(batch_size, tf.int32))
            history["loss"].append(float(loss))
            history["accuracy"].append(float(accuracy))
            if "val_loss" in history:
                val_loss, predicted = self.predict(None, x_val, y_val)
                history["val_loss"].append(val_loss)
                history["val_accuracy"].append(float(np.mean(predicted == y_val)))
        return TrainResult(self.get_weights(), len(x), history)


def validation_split(
    x: np.ndarray, y: np.ndarray, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Hold out a seeded random ``fraction`` of a client's data for validation curves."""
    if fraction <= 0:
        return x, y, None, None
    order = np.random.default_rng(seed).permutation(len(x))
    num_val = round(fraction * len(x))
    if num_val < 1 or num_val >= len(x):
        return x, y, None, None
    val, train = order[:num_val], order[num_val:]
    return x[train], y[train], x[val], y[val]


def make_trainer(config: TrainConfig) -> ClientTrainer:
    """A trainer for ``config``'s optimizer settings."""
    config.validate()
    return ClientTrainer(config.optimizer, config.learning_rate, config.momentum)
