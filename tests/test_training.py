"""Tests for fedmnist.training: the proximal term, SCAFFOLD's correction, determinism, optimizer reset,
config checks, no retrace."""

import dataclasses

import numpy as np
import pytest
import tensorflow as tf

from fedmnist.config import AGGRESSIVE_TRAINING, TrainingConfig
from fedmnist.data import normalize_images
from fedmnist.errors import ConfigError
from fedmnist.model import initial_weights, weight_spec
from fedmnist.training import (
    ClientTrainer,
    TrainConfig,
    check_scaffold_optimizer,
    check_trainer,
    make_trainer,
    proximal_penalty,
    validation_split,
)

BATCH = 16
PINNED = ("sgd", 0.05, 0.9)
"""The trainer the tests below were written for (``AGGRESSIVE_TRAINING``'s optimizer, rate and momentum)."""


@pytest.fixture(scope="module")
def start_weights():
    """The federation's round-0 weights (build_model's default seed)."""
    return initial_weights()


@pytest.fixture(scope="module")
def trainer():
    """One trainer shared by the tests of this module (as the package reuses one for every client).

    SGD with momentum (the aggressive setting, ``AGGRESSIVE_TRAINING``), pinned: the tests below were
    written for it, and momentum is the optimizer state the reset tests need."""
    return ClientTrainer(*PINNED)


@pytest.fixture(scope="module")
def images(raw_mnist):
    """160 real training images and labels, normalised: (x_a, y_a) 64 images, (x_b, y_b) 96 others."""
    x = normalize_images(raw_mnist.x_train[:160])
    y = raw_mnist.y_train[:160].copy()
    return x[:64], y[:64], x[64:], y[64:]


def l2_distance(a, b):
    return float(np.sqrt(sum(np.sum((np.float64(u) - np.float64(v)) ** 2) for u, v in zip(a, b))))


def assert_weights_identical(a, b):
    assert len(a) == len(b)
    for u, v in zip(a, b):
        assert u.dtype == v.dtype and u.shape == v.shape
        assert np.array_equal(u, v)


# --- the proximal term ------------------------------------------------------------------------


def test_proximal_penalty_value_and_gradient_by_hand():
    # Prepare: two small "layers" and their anchors (the global weights)
    w = [tf.Variable([[1.0, 2.0], [3.0, 4.0]]), tf.Variable([0.5, -1.0, 2.0])]
    a = [tf.Variable([[0.0, 2.5], [1.0, 4.0]]), tf.Variable([0.5, 1.0, -1.0])]
    mu = tf.constant(0.2)
    # squared distance: (1 + 0.25 + 4 + 0) + (0 + 4 + 9) = 18.25
    expected_value = 0.5 * 0.2 * 18.25
    expected_grads = [0.2 * (np.array([[1.0, 2.0], [3.0, 4.0]]) - np.array([[0.0, 2.5], [1.0, 4.0]])),
                      0.2 * (np.array([0.5, -1.0, 2.0]) - np.array([0.5, 1.0, -1.0]))]

    # Execute
    with tf.GradientTape(persistent=True) as tape:
        value = proximal_penalty(w, a, mu)
    grads = tape.gradient(value, w)
    anchor_grads = tape.gradient(value, a)

    # Assert
    assert float(value) == pytest.approx(expected_value, rel=1e-6)
    for grad, expected in zip(grads, expected_grads):
        np.testing.assert_allclose(grad.numpy(), expected, rtol=1e-6, atol=1e-7)
    assert all(g is None for g in anchor_grads), "the global weights must be held fixed"


def test_proximal_penalty_is_zero_at_the_anchor():
    # Prepare
    w = [tf.Variable([1.0, -2.0]), tf.Variable(3.0)]

    # Execute
    value = proximal_penalty(w, [tf.constant([1.0, -2.0]), tf.constant(3.0)], tf.constant(5.0))

    # Assert
    assert float(value) == 0.0


def test_positive_mu_keeps_weights_closer_to_the_start(trainer, start_weights, images):
    # Prepare
    x, y, _, _ = images

    # Execute: same data and seed, growing mu
    moved = {
        mu: l2_distance(trainer.train(start_weights, x, y, epochs=1, batch_size=BATCH, mu=mu, seed=3).weights,
                        start_weights)
        for mu in (0.0, 1.0, 5.0)
    }

    # Assert
    assert moved[0.0] > 0
    assert moved[0.0] > moved[1.0] > moved[5.0], moved
    assert moved[5.0] < 0.8 * moved[0.0], moved


# --- SCAFFOLD's correction -----------------------------------------------------------------------

SGD_LR = 0.05


@pytest.fixture(scope="module")
def sgd_trainer():
    """A trainer with plain SGD (no momentum), the local optimizer SCAFFOLD is defined for."""
    return ClientTrainer("sgd", SGD_LR, 0.0)


def random_correction(seed, scale=0.05):
    rng = np.random.default_rng(seed)
    return [np.array(rng.normal(scale=scale, size=shape), dtype=np.float32) for _, shape, _ in weight_spec()]


def zero_correction():
    return [np.zeros(shape, np.float32) for _, shape, _ in weight_spec()]


def manual_sgd(trainer, start, x, y, *, epochs, batch_size, seed, lr, correction):
    """Eager SGD on loss + <correction, w> with the trainer's model, batch order and dropout seeds."""
    trainer.set_weights(start)
    trainer._reset_client_state(seed)
    rng = np.random.default_rng(seed)
    constants = [tf.constant(c) for c in correction]
    y32 = y.astype(np.int32)
    for _ in range(epochs):
        order = rng.permutation(len(x))
        for i in range(0, len(x), batch_size):
            idx = order[i:i + batch_size]
            with tf.GradientTape() as tape:
                probs = trainer.model(tf.constant(x[idx]), training=True)
                objective = trainer._loss(tf.constant(y32[idx]), probs) / len(idx)
                objective += tf.add_n([tf.reduce_sum(c * v) for c, v in zip(constants, trainer.variables)])
            for variable, grad in zip(trainer.variables, tape.gradient(objective, trainer.variables)):
                variable.assign_sub(lr * grad)
    return trainer.get_weights()


def test_zero_correction_is_plain_sgd_bit_for_bit(sgd_trainer, start_weights, images):
    # Prepare
    x, y, _, _ = images

    # Execute: without correction, with c − c_i = 0, and the same with FedProx's term
    plain = sgd_trainer.train(start_weights, x, y, epochs=2, batch_size=BATCH, seed=3)
    zero = sgd_trainer.train(start_weights, x, y, epochs=2, batch_size=BATCH, seed=3, correction=zero_correction())
    prox = sgd_trainer.train(start_weights, x, y, epochs=1, batch_size=BATCH, mu=0.5, seed=4)
    prox_zero = sgd_trainer.train(start_weights, x, y, epochs=1, batch_size=BATCH, mu=0.5, seed=4,
                                  correction=zero_correction())

    # Assert
    assert_weights_identical(plain.weights, zero.weights)
    assert plain.history == zero.history
    assert_weights_identical(prox.weights, prox_zero.weights)
    assert sgd_trainer._epoch_scaffold.experimental_get_tracing_count() == 1


def test_one_full_batch_step_moves_by_minus_lr_times_the_correction(sgd_trainer, start_weights, images):
    # Prepare: one step on the whole batch (K = 1), the same data order and dropout mask in both runs
    x, y, _, _ = images
    corr = random_correction(0)

    # Execute
    plain = sgd_trainer.train(start_weights, x, y, epochs=1, batch_size=len(x), seed=6)
    corrected = sgd_trainer.train(start_weights, x, y, epochs=1, batch_size=len(x), seed=6, correction=corr)

    # Assert: w1 = w0 − lr·(g + corr) = plain − lr·corr
    assert corrected.num_steps == plain.num_steps == 1
    for got, base, c in zip(corrected.weights, plain.weights, corr):
        np.testing.assert_allclose(got, base - SGD_LR * c, rtol=0, atol=1e-6)
    assert l2_distance(corrected.weights, plain.weights) > 1e-2


def test_corrected_training_is_sgd_on_loss_plus_linear_term(sgd_trainer, start_weights, images):
    # Prepare: 40 images, batch 16 -> 3 steps per epoch (the last of 8 images), 2 epochs
    x, y, _, _ = images
    x, y = x[:40], y[:40]
    corr = random_correction(1)
    reference = ClientTrainer("sgd", SGD_LR, 0.0)

    # Execute
    result = sgd_trainer.train(start_weights, x, y, epochs=2, batch_size=BATCH, seed=8, correction=corr)
    by_hand = manual_sgd(reference, start_weights, x, y, epochs=2, batch_size=BATCH, seed=8, lr=SGD_LR,
                         correction=corr)
    plain_by_hand = manual_sgd(reference, start_weights, x, y, epochs=2, batch_size=BATCH, seed=8, lr=SGD_LR,
                               correction=zero_correction())
    plain = sgd_trainer.train(start_weights, x, y, epochs=2, batch_size=BATCH, seed=8)

    # Assert: the eager replica reproduces plain training (so it follows the same batches and masks) ...
    for got, want in zip(plain.weights, plain_by_hand):
        np.testing.assert_allclose(got, want, rtol=0, atol=2e-6)
    # ... and the corrected training is SGD on loss + <c − c_i, w>
    for got, want in zip(result.weights, by_hand):
        np.testing.assert_allclose(got, want, rtol=0, atol=2e-6)
    assert result.num_steps == 6
    assert l2_distance(result.weights, plain.weights) > 1e-2


def test_num_steps_counts_every_batch(trainer, sgd_trainer, start_weights, images):
    x, y, x_val, y_val = images

    assert trainer.train(start_weights, x, y, epochs=3, batch_size=10, seed=0).num_steps == 3 * 7
    assert trainer.train(start_weights, x, y, epochs=1, batch_size=64, mu=0.1).num_steps == 1
    assert sgd_trainer.train(start_weights, x[:33], y[:33], epochs=2, batch_size=BATCH,
                             x_val=x_val, y_val=y_val, correction=zero_correction()).num_steps == 2 * 3


def test_local_steps_stream_reshuffled_passes_and_take_exactly_that_many_steps(trainer, start_weights, images):
    from fedmnist.training import _orders

    x, y, _, _ = images
    # 7 images, B = 3, 5 steps: 15 indices cut from three freshly shuffled passes of 0..6
    (stream,) = _orders(7, epochs=9, batch_size=3, steps=5, rng=np.random.default_rng(1))
    rng = np.random.default_rng(1)
    passes = np.concatenate([rng.permutation(7) for _ in range(3)])
    assert np.array_equal(stream, passes[:15]) and stream.dtype == np.int32
    assert sorted(stream[:7]) == list(range(7)) and sorted(stream[7:14]) == list(range(7))
    # whole epochs unchanged: one permutation per epoch, in the generator's order
    rng = np.random.default_rng(2)
    assert all(np.array_equal(a, rng.permutation(5)) for a in _orders(5, 2, 3, None, np.random.default_rng(2)))
    # 4 steps of B = 10 on 64 images (less than one pass) and 25 on 30 (more than eight passes)
    short = trainer.train(start_weights, x, y, epochs=3, batch_size=10, seed=4, steps=4)
    long = trainer.train(start_weights, x[:30], y[:30], epochs=1, batch_size=10, seed=4, steps=25)
    assert short.num_steps == 4 and long.num_steps == 25 and len(short.history["loss"]) == 1
    assert_weights_identical(short.weights, trainer.train(start_weights, x, y, epochs=1, batch_size=10, seed=4,
                                                          steps=4).weights)  # epochs are not used
    with pytest.raises(ConfigError, match="local steps must be an integer >= 1"):
        trainer.train(start_weights, x, y, epochs=1, batch_size=10, steps=0)


def test_scaffold_does_not_retrace_for_a_new_client(start_weights, images):
    # Prepare
    x, y, x_other, y_other = images
    fresh = ClientTrainer("sgd", SGD_LR, 0.0)

    # Execute: two clients with other sizes, batch sizes and corrections
    fresh.train(start_weights, x[:40], y[:40], epochs=1, batch_size=BATCH, correction=random_correction(2))
    fresh.train(start_weights, x_other, y_other, epochs=2, batch_size=BATCH * 2, correction=random_correction(3))

    # Assert
    assert fresh._epoch_scaffold.experimental_get_tracing_count() == 1
    assert fresh._epoch_plain.experimental_get_tracing_count() == 0


@pytest.mark.parametrize(
    ("optimizer", "momentum", "fragment"),
    [("sgd", 0.9, "without momentum \\(got momentum 0.9\\)"), ("adam", 0.0, "plain SGD .*not 'adam'")],
)
def test_scaffold_refuses_momentum_and_adam(start_weights, images, trainer, optimizer, momentum, fragment):
    # Prepare: the module's trainer has SGD with momentum 0.9
    x, y, _, _ = images
    other = trainer if optimizer == "sgd" else make_trainer(TrainConfig(optimizer="adam", learning_rate=1e-3))

    # Execute / Assert
    with pytest.raises(ConfigError, match=fragment):
        other.train(start_weights, x, y, epochs=1, batch_size=BATCH, correction=zero_correction())
    with pytest.raises(ConfigError, match=fragment):
        check_scaffold_optimizer(optimizer, momentum)


def test_check_scaffold_optimizer_accepts_plain_sgd():
    check_scaffold_optimizer("sgd", 0.0)


def test_bad_correction_raises_config_error(sgd_trainer, start_weights, images):
    x, y, _, _ = images
    short = zero_correction()[:-1]
    infinite = zero_correction()
    infinite[0] = np.full_like(infinite[0], np.inf)

    with pytest.raises(ConfigError, match=r"SCAFFOLD correction does not fit .* weight arrays"):
        sgd_trainer.train(start_weights, x, y, epochs=1, batch_size=BATCH, correction=short)
    with pytest.raises(ConfigError, match="non-finite"):
        sgd_trainer.train(start_weights, x, y, epochs=1, batch_size=BATCH, correction=infinite)


def test_correction_is_not_kept_for_the_next_client(sgd_trainer, start_weights, images):
    x, y, _, _ = images

    first = sgd_trainer.train(start_weights, x, y, epochs=1, batch_size=BATCH, seed=2)
    sgd_trainer.train(start_weights, x, y, epochs=1, batch_size=BATCH, seed=2, correction=random_correction(4))
    again = sgd_trainer.train(start_weights, x, y, epochs=1, batch_size=BATCH, seed=2)

    assert_weights_identical(first.weights, again.weights)


# --- determinism and state reset ----------------------------------------------------------------


def test_same_seed_gives_bit_identical_weights_and_history(trainer, start_weights, images):
    # Prepare: the shared trainer (already used by other tests) and a fresh one
    x, y, x_val, y_val = images
    fresh = ClientTrainer(*PINNED)

    # Execute
    a = trainer.train(start_weights, x, y, epochs=2, batch_size=BATCH, seed=11, x_val=x_val, y_val=y_val)
    b = fresh.train(start_weights, x, y, epochs=2, batch_size=BATCH, seed=11, x_val=x_val, y_val=y_val)

    # Assert
    assert_weights_identical(a.weights, b.weights)
    assert a.history == b.history
    assert a.num_examples == b.num_examples == len(x)


def test_different_seed_gives_different_weights(trainer, start_weights, images):
    # Prepare
    x, y, _, _ = images

    # Execute
    a = trainer.train(start_weights, x, y, epochs=1, batch_size=BATCH, seed=1)
    b = trainer.train(start_weights, x, y, epochs=1, batch_size=BATCH, seed=2)

    # Assert
    assert any(not np.array_equal(u, v) for u, v in zip(a.weights, b.weights))
    assert a.history != b.history


def test_training_twice_in_a_row_gives_identical_results(trainer, start_weights, images):
    # Prepare
    x, y, x_other, y_other = images

    # Execute: the same job twice, then once more after another client's FedProx job
    first = trainer.train(start_weights, x, y, epochs=1, batch_size=BATCH, seed=5)
    second = trainer.train(start_weights, x, y, epochs=1, batch_size=BATCH, seed=5)
    trainer.train(first.weights, x_other, y_other, epochs=1, batch_size=BATCH, mu=0.5, seed=9)
    third = trainer.train(start_weights, x, y, epochs=1, batch_size=BATCH, seed=5)

    # Assert: momentum, dropout state, anchors and mu are reset for every client
    assert_weights_identical(first.weights, second.weights)
    assert_weights_identical(first.weights, third.weights)
    assert first.history == second.history == third.history


def test_adam_state_is_reset_between_clients(start_weights, images):
    # Prepare
    x, y, x_other, y_other = images
    adam = make_trainer(TrainConfig(optimizer="adam", learning_rate=1e-3))

    # Execute
    first = adam.train(start_weights, x, y, epochs=1, batch_size=BATCH, seed=4)
    adam.train(start_weights, x_other, y_other, epochs=1, batch_size=BATCH, seed=8)
    again = adam.train(start_weights, x, y, epochs=1, batch_size=BATCH, seed=4)

    # Assert
    assert_weights_identical(first.weights, again.weights)


# --- inputs and outputs -----------------------------------------------------------------------


def test_training_does_not_mutate_the_input_weights(trainer, start_weights, images):
    # Prepare
    x, y, _, _ = images
    given = [w.copy() for w in start_weights]
    snapshot = [w.copy() for w in given]
    ids = [id(w) for w in given]

    # Execute
    result = trainer.train(given, x, y, epochs=1, batch_size=BATCH, mu=0.1, seed=0)

    # Assert
    assert [id(w) for w in given] == ids
    assert_weights_identical(given, snapshot)
    assert all(r is not g for r, g in zip(result.weights, given))
    assert all(r.dtype == np.float32 for r in result.weights)


def test_history_has_val_keys_only_with_validation_data(trainer, start_weights, images):
    # Prepare
    x, y, x_val, y_val = images

    # Execute
    with_val = trainer.train(start_weights, x, y, epochs=2, batch_size=BATCH, x_val=x_val, y_val=y_val)
    without = trainer.train(start_weights, x, y, epochs=2, batch_size=BATCH)

    # Assert
    assert set(with_val.history) == {"loss", "accuracy", "val_loss", "val_accuracy"}
    assert all(len(v) == 2 for v in with_val.history.values())
    assert all(0.0 <= v <= 1.0 for v in with_val.history["val_accuracy"])
    assert all(np.isfinite(v) and v > 0 for v in with_val.history["val_loss"])
    assert set(without.history) == {"loss", "accuracy"}
    assert all(len(v) == 2 for v in without.history.values())


def test_on_epoch_stops_the_training_where_an_uninterrupted_run_of_that_length_ends(trainer, start_weights, images):
    # Prepare: a callback that snapshots every epoch's weights and stops after the second of five
    x, y, x_val, y_val = images
    seen, snapshots = [], []

    def on_epoch(history):
        seen.append(len(history["val_loss"]))
        snapshots.append(trainer.get_weights())
        return len(history["val_loss"]) == 2

    # Execute
    stopped = trainer.train(start_weights, x, y, epochs=5, batch_size=BATCH, seed=5, x_val=x_val, y_val=y_val,
                            on_epoch=on_epoch)
    two = trainer.train(start_weights, x, y, epochs=2, batch_size=BATCH, seed=5, x_val=x_val, y_val=y_val)
    one = trainer.train(start_weights, x, y, epochs=1, batch_size=BATCH, seed=5)

    # Assert: two epochs ran, the optimizer state carried on between them, and the snapshots are the epochs'
    assert seen == [1, 2]
    assert stopped.history == two.history and stopped.num_steps == two.num_steps
    assert_weights_identical(stopped.weights, two.weights)
    assert_weights_identical(snapshots[1], two.weights)
    assert_weights_identical(snapshots[0], one.weights)


def test_second_client_of_another_size_does_not_retrace(start_weights, images):
    # Prepare
    x, y, x_other, y_other = images
    fresh = ClientTrainer(*PINNED)

    # Execute: two clients with different sizes and batch sizes
    fresh.train(start_weights, x[:40], y[:40], epochs=1, batch_size=BATCH, seed=0)
    after_first = fresh._epoch_plain.experimental_get_tracing_count()
    fresh.train(start_weights, x_other, y_other, epochs=2, batch_size=BATCH * 2, seed=1)

    # Assert
    assert after_first == 1
    assert fresh._epoch_plain.experimental_get_tracing_count() == 1


def test_set_weights_with_wrong_shapes_raises_config_error(trainer, start_weights):
    # Prepare
    transposed = [w.copy() for w in start_weights]
    dense = next(i for i, (_, shape, _) in enumerate(weight_spec()) if len(shape) == 2)
    transposed[dense] = transposed[dense].T.copy()
    too_few = [w.copy() for w in start_weights[:-1]]

    # Execute / Assert
    with pytest.raises(ConfigError, match="shape"):
        trainer.set_weights(transposed)
    with pytest.raises(ConfigError, match="weight arrays"):
        trainer.set_weights(too_few)


def test_empty_or_mismatched_data_raise_config_error(trainer, start_weights, images):
    # Prepare
    x, y, _, _ = images

    # Execute / Assert
    with pytest.raises(ConfigError, match="empty"):
        trainer.train(start_weights, x[:0], y[:0], epochs=1, batch_size=BATCH)
    with pytest.raises(ConfigError, match="labels"):
        trainer.train(start_weights, x[:10], y[:9], epochs=1, batch_size=BATCH)


# --- configuration ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"epochs": 0}, "epochs"),
        ({"batch_size": 0}, "batch size"),
        ({"mu": -0.01}, "mu"),
        ({"mu": float("nan")}, "mu"),
        ({"optimizer": "rmsprop"}, "unknown optimizer 'rmsprop'"),
        ({"learning_rate": 0.0}, "learning rate"),
        ({"momentum": 1.0}, "momentum"),
        ({"validation_split": 1.0}, "validation split"),
    ],
)
def test_train_config_validate_rejects(changes, fragment):
    # Prepare
    config = TrainConfig(**changes)

    # Execute / Assert
    with pytest.raises(ConfigError, match=fragment):
        config.validate()


def test_default_train_config_is_valid():
    TrainConfig().validate()
    TrainConfig(epochs=1, batch_size=1, optimizer="sgd", mu=0.0, validation_split=0.0).validate()


def test_member_job_and_every_mode_share_one_default_training():
    # Execute
    member, shared = TrainConfig(), TrainingConfig()

    # Assert: the member's job is the shared training plus its own μ (0), hold-out and seed
    assert (member.optimizer, member.learning_rate, member.momentum) == ("adam", 1e-3, 0.0)
    assert (member.epochs, member.batch_size, member.mu) == (2, 32, 0.0)
    assert TrainingConfig(**{f.name: getattr(member, f.name) for f in dataclasses.fields(TrainingConfig)}) == shared
    assert isinstance(member, TrainingConfig)
    assert (AGGRESSIVE_TRAINING.optimizer, AGGRESSIVE_TRAINING.learning_rate, AGGRESSIVE_TRAINING.momentum,
            AGGRESSIVE_TRAINING.epochs) == ("sgd", 0.05, 0.9, 1)


def test_training_config_builds_the_trainer_it_describes():
    # Execute
    trainer = AGGRESSIVE_TRAINING.build_trainer(model_seed=3)

    # Assert
    assert (trainer.optimizer_name, trainer.learning_rate, trainer.momentum) == PINNED
    check_trainer(trainer, AGGRESSIVE_TRAINING)
    with pytest.raises(ConfigError, match="momentum"):
        TrainingConfig(optimizer="sgd", momentum=1.5).build_trainer()


def test_train_config_keeps_the_shared_field_order():
    # Prepare: fedmnist train builds its TrainConfig positionally
    shared = [f.name for f in dataclasses.fields(TrainingConfig)]

    # Execute
    config = TrainConfig(2, 32, "sgd", 0.05, 0.9, 0.01, 0.1, 3)

    # Assert
    assert [f.name for f in dataclasses.fields(TrainConfig)][: len(shared)] == shared
    assert (config.optimizer, config.learning_rate, config.momentum, config.mu, config.seed) == ("sgd", 0.05, 0.9,
                                                                                                 0.01, 3)


def test_default_member_job_trains_with_adam():
    # Execute
    trainer = make_trainer(TrainConfig())

    # Assert
    assert trainer.optimizer_name == "adam" and trainer.learning_rate == 1e-3 and trainer.momentum == 0.0
    assert trainer.optimizer.__class__.__name__ == "Adam"


def test_default_member_job_is_refused_by_scaffold():
    # Prepare
    config = TrainConfig()

    # Execute / Assert: the default (Adam) needs the explicit SGD flags to run SCAFFOLD
    with pytest.raises(ConfigError, match="SCAFFOLD needs plain SGD as the local optimizer, not 'adam'"):
        check_scaffold_optimizer(config.optimizer, config.momentum)
    check_scaffold_optimizer(TrainConfig(optimizer="sgd", learning_rate=0.05).optimizer, TrainConfig().momentum)


def test_trainer_rejects_unknown_optimizer():
    with pytest.raises(ConfigError, match="unknown optimizer"):
        ClientTrainer(optimizer="rmsprop")


# --- validation split ---------------------------------------------------------------------------


def test_validation_split_sizes_and_disjointness():
    # Prepare: image i holds the value i everywhere, so rows can be traced back
    n = 100
    x = np.broadcast_to(np.arange(n, dtype=np.float32)[:, None, None, None], (n, 28, 28, 1)).copy()
    y = (np.arange(n) % 10).astype(np.uint8)

    # Execute
    x_fit, y_fit, x_val, y_val = validation_split(x, y, 0.1, seed=7)
    again = validation_split(x, y, 0.1, seed=7)
    other = validation_split(x, y, 0.1, seed=8)

    # Assert
    assert len(x_fit) == len(y_fit) == 90
    assert len(x_val) == len(y_val) == 10
    fit_ids, val_ids = x_fit[:, 0, 0, 0].astype(int), x_val[:, 0, 0, 0].astype(int)
    assert set(fit_ids).isdisjoint(val_ids)
    assert sorted(np.concatenate([fit_ids, val_ids])) == list(range(n))
    assert np.array_equal(y_fit, fit_ids % 10) and np.array_equal(y_val, val_ids % 10)
    assert np.array_equal(again[2], x_val)
    assert not np.array_equal(other[2], x_val)


@pytest.mark.parametrize(("n", "fraction"), [(100, 0.0), (5, 0.05), (3, 0.9)])
def test_validation_split_without_a_usable_hold_out_keeps_everything(n, fraction):
    # Prepare
    x = np.zeros((n, 28, 28, 1), np.float32)
    y = np.zeros(n, np.uint8)

    # Execute
    x_fit, y_fit, x_val, y_val = validation_split(x, y, fraction, seed=0)

    # Assert
    assert x_fit is x and y_fit is y
    assert x_val is None and y_val is None
