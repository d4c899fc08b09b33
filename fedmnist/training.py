"""Client training: E local epochs of minibatch SGD/Adam from the round's global weights.

One ``ClientTrainer`` holds one model, one optimizer and one compiled epoch function, and is reused
for every client and round (no rebuild, recompile or retrace). A whole epoch runs inside a single
``tf.function`` so small batches (McMahan's B=10) are not dominated by Python overhead.

FedProx (Li et al. 2020) lives here: with ``mu > 0`` the loss gains μ/2·‖w − w_global‖², with the
global weights held fixed, which keeps heterogeneous clients from drifting far from the global model.
So does SCAFFOLD's drift correction (Karimireddy et al. 2020; the control variates are in
``fedmnist.scaffold``): with ``correction = c − c_i`` every step's gradient gains that constant, i.e. SGD
on loss + ⟨c − c_i, w⟩. It is defined for plain SGD (no momentum), and refused otherwise.

Each variant (plain, proximal, corrected, both) is one ``tf.function`` traced once per trainer; the
anchors, μ and the correction live in variables, so a new client never retraces.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import tensorflow as tf

from fedmnist.config import OPTIMIZERS, TrainingConfig, check_int, check_seed
from fedmnist.errors import ConfigError
from fedmnist.model import DEFAULT_SEED, Weights, build_model, weights_mismatch
from fedmnist.settings import MEMBER_PROXIMAL_MU, default

EVAL_BATCH = 500


@dataclass(frozen=True)
class TrainConfig(TrainingConfig):
    """A team member's job: the shared local training (``TrainingConfig``, its defaults untouched) plus
    the job's own three settings: FedProx's μ (0, plain training, unless asked), the validation hold-out
    of the learning curves and the seed. The defaults train a 12k-image part in about a minute on a laptop.
    """

    mu: float = MEMBER_PROXIMAL_MU
    validation_split: float = default("validation-split")
    seed: int = DEFAULT_SEED

    def validate(self) -> None:
        """Raise ConfigError for values training cannot use (the shared fields via ``TrainingConfig``)."""
        super().validate()
        check_seed(self.seed)
        if not (isinstance(self.mu, (int, float)) and self.mu >= 0 and np.isfinite(self.mu)):
            raise ConfigError(f"the FedProx coefficient mu must be >= 0 (got {self.mu})")
        if not 0 <= self.validation_split < 1:
            raise ConfigError(f"validation split must be in [0, 1) (got {self.validation_split})")


@dataclass
class TrainResult:
    """What one client's local training produced.

    ``num_steps`` is the number of optimizer steps taken (``K`` in SCAFFOLD's control update):
    ``epochs·⌈n / batch_size⌉``, counted by the compiled epochs themselves.
    """

    weights: Weights
    num_examples: int
    history: dict[str, list[float]] = field(default_factory=dict)
    num_steps: int = 0


def check_scaffold_optimizer(optimizer: str, momentum: float) -> None:
    """Raise ConfigError unless SCAFFOLD's correction is defined for this local optimizer (plain SGD).

    Option II's control update ``c_i⁺ = c_i − c + (x − y_i)/(K·η_l)`` recovers the client's average
    gradient only if each of the K steps moved the weights by exactly ``η_l·(g + c − c_i)``; momentum
    and Adam rescale and mix the steps, so the control variates would be wrong.
    """
    if optimizer != "sgd":
        raise ConfigError(
            f"SCAFFOLD needs plain SGD as the local optimizer, not '{optimizer}': its control variates "
            "(c_i + (x - y_i)/(K*lr) - c) assume every local step is lr*(gradient + c - c_i)"
        )
    if momentum != 0:
        raise ConfigError(
            f"SCAFFOLD needs local SGD without momentum (got momentum {momentum}): its control variates "
            "(c_i + (x - y_i)/(K*lr) - c) assume every local step is lr*(gradient + c - c_i)"
        )


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
        optimizer: str = TrainingConfig.optimizer,
        learning_rate: float = TrainingConfig.learning_rate,
        momentum: float = TrainingConfig.momentum,
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
        self._corrections = [tf.Variable(tf.zeros_like(v), trainable=False) for v in self.variables]
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
        self._epochs = {
            (proximal, corrected): tf.function(self._make_epoch(proximal, corrected), input_signature=spec)
            for proximal in (False, True)
            for corrected in (False, True)
        }
        self._epoch_plain = self._epochs[False, False]
        self._epoch_prox = self._epochs[True, False]
        self._epoch_scaffold = self._epochs[False, True]
        self._evaluate = tf.function(
            self._evaluate_graph,
            input_signature=[tf.TensorSpec([None, 28, 28, 1], tf.float32), tf.TensorSpec([None], tf.int32)],
        )

    def _make_epoch(self, proximal: bool, corrected: bool):
        model, variables, optimizer, loss_fn = self.model, self.variables, self.optimizer, self._loss
        anchors, mu, corrections = self._anchors, self._mu, self._corrections

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
                if corrected:
                    grads = [g + c for g, c in zip(grads, corrections)]
                optimizer.apply_gradients(zip(grads, variables))
                loss_sum += batch_loss
                hits = tf.equal(tf.argmax(probs, axis=1, output_type=tf.int32), yb)
                correct += tf.reduce_sum(tf.cast(hits, tf.float32))
            total = tf.cast(n, tf.float32)
            return loss_sum / total, correct / total, num_batches

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
        correction: Weights | None = None,
        on_epoch: Callable[[dict[str, list[float]]], bool] | None = None,
        steps: int | None = None,
    ) -> TrainResult:
        """Train from ``global_weights`` on (x, y) for ``epochs`` epochs; deterministic for a seed.

        ``steps`` (None: whole epochs) trains exactly that many minibatch steps of ``batch_size`` instead,
        over a stream of freshly shuffled passes (a batch may straddle two passes), whatever the size of
        the partition: what fixes the local work per round across federations of different sizes. The
        history then has one entry for the whole stream, and ``epochs`` is not used.

        ``mu > 0`` adds FedProx's proximal term anchored at ``global_weights``. ``correction`` (SCAFFOLD's
        ``c − c_i``, one array per weight array) is added to every step's gradient; it needs a trainer
        with plain SGD and momentum 0 (ConfigError otherwise). Data are reshuffled every epoch with a
        generator seeded by ``seed``, which also fixes the dropout masks. ``on_epoch``, if given, is
        called after every epoch with the history so far while the model holds that epoch's weights
        (``get_weights`` copies them); when it returns True the training stops there, optimizer state
        and all carried over from epoch to epoch as in an uninterrupted run.
        """
        if len(x) == 0:
            raise ConfigError("cannot train on an empty partition")
        if len(x) != len(y):
            raise ConfigError(f"{len(x)} images but {len(y)} labels")
        if correction is not None:
            check_scaffold_optimizer(self.optimizer_name, self.momentum)
            problem = weights_mismatch(correction)
            if problem:
                raise ConfigError(f"the SCAFFOLD correction does not fit the shared CNN: {problem}")
            if not all(np.all(np.isfinite(c)) for c in correction):
                raise ConfigError("the SCAFFOLD correction has non-finite values")
        self.set_weights(global_weights)
        for anchor, value in zip(self._anchors, global_weights):
            anchor.assign(np.asarray(value, dtype=np.float32))
        self._mu.assign(float(mu))
        if correction is not None:
            for variable, value in zip(self._corrections, correction):
                variable.assign(np.asarray(value, dtype=np.float32))
        self._reset_client_state(seed)
        epoch_fn = self._epochs[mu > 0, correction is not None]
        rng = np.random.default_rng(seed)
        x_t = tf.convert_to_tensor(x, dtype=tf.float32)
        y_t = tf.convert_to_tensor(np.asarray(y, dtype=np.int32))
        history: dict[str, list[float]] = {"loss": [], "accuracy": []}
        if x_val is not None and len(x_val):
            history.update(val_loss=[], val_accuracy=[])
        num_steps = 0
        for order in _orders(len(x), epochs, batch_size, steps, rng):
            loss, accuracy, taken = epoch_fn(x_t, y_t, tf.convert_to_tensor(order), tf.constant(batch_size, tf.int32))
            num_steps += int(taken)
            history["loss"].append(float(loss))
            history["accuracy"].append(float(accuracy))
            if "val_loss" in history:
                val_loss, predicted = self.predict(None, x_val, y_val)
                history["val_loss"].append(val_loss)
                history["val_accuracy"].append(float(np.mean(predicted == y_val)))
            if on_epoch is not None and on_epoch(history):
                break
        return TrainResult(self.get_weights(), len(x), history, num_steps)


def _orders(n: int, epochs: int, batch_size: int, steps: int | None, rng: np.random.Generator) -> list[np.ndarray]:
    """The index orders the compiled epoch runs: one permutation per epoch, or, with ``steps``, one stream of
    ``steps·batch_size`` indices cut from ⌈steps·batch_size / n⌉ concatenated permutations."""
    if steps is None:
        return [rng.permutation(n).astype(np.int32) for _ in range(epochs)]
    need = check_int(steps, "local steps", 1, numpy=True) * batch_size
    passes = -(-need // n)
    return [np.concatenate([rng.permutation(n) for _ in range(passes)])[:need].astype(np.int32)]


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


def check_trainer(trainer: ClientTrainer, training: TrainingConfig) -> None:
    """Raise ConfigError unless ``trainer`` was built with ``training``'s optimizer, rate and momentum.

    A trainer passed in to save its compiled graphs must train as the config says, or the files would
    record settings the model was not trained with.
    """
    momentum = training.momentum if training.optimizer == "sgd" else 0.0
    mine = (trainer.optimizer_name, trainer.learning_rate, trainer.momentum)
    if mine[0] != training.optimizer or not np.isclose(mine[1], training.learning_rate, rtol=1e-6) \
            or not np.isclose(mine[2], momentum, atol=1e-9):
        raise ConfigError(
            f"the trainer passed in uses {mine[0]} lr={mine[1]:g} momentum={mine[2]:g}, but the config asks for "
            f"{training.optimizer} lr={training.learning_rate:g} momentum={momentum:g}"
        )


def make_trainer(config: TrainConfig) -> ClientTrainer:
    """A trainer for ``config``'s optimizer settings (after checking the whole job's settings)."""
    config.validate()
    return config.build_trainer()
