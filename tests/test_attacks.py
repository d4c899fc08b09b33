"""Tests of fedmnist.attacks on hand-computed tiny arrays."""

from __future__ import annotations

import numpy as np
import pytest

from fedmnist.attacks import (
    ATTACKS,
    DEFAULT_STRENGTH,
    attack_strength,
    attack_update,
    check_attack,
    choose_malicious,
    flip_labels,
    gaussian_noise,
    scale,
    sign_flip,
)
from fedmnist.errors import ConfigError


def tiny_pair() -> tuple[list[np.ndarray], list[np.ndarray]]:
    """A trained model and the global model it started from: a 2x2 layer, a 0-dim layer, a bias."""
    trained = [
        np.array([[1.0, 2.0], [3.0, 4.0]], np.float32),
        np.array(0.5, np.float32),
        np.array([1.0, -1.0], np.float32),
    ]
    global_ = [
        np.array([[0.0, 1.0], [1.0, 1.0]], np.float32),
        np.array(0.0, np.float32),
        np.array([0.0, 0.0], np.float32),
    ]
    return trained, global_


def copies(arrays: list[np.ndarray]) -> list[np.ndarray]:
    return [a.copy() for a in arrays]


def test_sign_flip_sends_global_minus_s_times_update():
    # Prepare
    trained, global_ = tiny_pair()
    before = copies(trained), copies(global_)
    # Execute
    sent = sign_flip(trained, global_, strength=4.0)
    # Assert: w_g - 4 (w - w_g)
    assert np.array_equal(sent[0], np.array([[-4.0, -3.0], [-7.0, -11.0]], np.float32))
    assert np.array_equal(sent[1], np.array(-2.0, np.float32))
    assert np.array_equal(sent[2], np.array([-4.0, 4.0], np.float32))
    assert all(a.dtype == np.float32 for a in sent)
    for now, then in zip(trained + global_, before[0] + before[1]):
        assert np.array_equal(now, then)


def test_scale_sends_global_plus_lambda_times_update():
    trained, global_ = tiny_pair()
    sent = scale(trained, global_, strength=10.0)
    assert np.array_equal(sent[0], np.array([[10.0, 11.0], [21.0, 31.0]], np.float32))
    assert np.array_equal(sent[1], np.array(5.0, np.float32))
    assert np.array_equal(sent[2], np.array([10.0, -10.0], np.float32))


def test_strength_one_scale_returns_fresh_copy_of_the_update():
    trained, global_ = tiny_pair()
    sent = scale(trained, global_, strength=1.0)
    for a, b in zip(sent, trained):
        assert np.array_equal(a, b)
        assert not np.shares_memory(a, b)


def test_gaussian_noise_has_std_sigma_around_the_global_model():
    # Prepare: a large layer so the sample std is close to sigma
    global_ = [np.full((200, 100), 3.0, np.float32), np.zeros(7, np.float32)]
    trained = [np.ones((200, 100), np.float32), np.ones(7, np.float32)]
    before = copies(trained)
    # Execute
    sent = gaussian_noise(trained, global_, np.random.default_rng(0), strength=200.0)
    # Assert
    noise = sent[0] - global_[0]
    assert abs(noise.std() - 200.0) < 5.0
    assert abs(noise.mean()) < 5.0
    assert sent[1].shape == (7,) and sent[0].dtype == np.float32
    assert all(np.array_equal(a, b) for a, b in zip(trained, before))


def test_gaussian_noise_is_reproducible_for_a_seed():
    trained, global_ = tiny_pair()
    a = gaussian_noise(trained, global_, np.random.default_rng(5))
    b = gaussian_noise(trained, global_, np.random.default_rng(5))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))


def test_flip_labels_maps_y_to_9_minus_y_without_touching_input():
    y = np.arange(10, dtype=np.uint8)
    flipped = flip_labels(y)
    assert flipped.tolist() == [9, 8, 7, 6, 5, 4, 3, 2, 1, 0]
    assert flipped.dtype == np.uint8
    assert y.tolist() == list(range(10))


def test_attack_update_dispatches_and_labelflip_sends_weights_unchanged():
    trained, global_ = tiny_pair()
    rng = np.random.default_rng(0)
    assert np.array_equal(attack_update("signflip", trained, global_, rng)[0], sign_flip(trained, global_)[0])
    assert np.array_equal(
        attack_update("scale", trained, global_, rng, 2.0)[2], np.array([2.0, -2.0], np.float32)
    )
    sent = attack_update("labelflip", trained, global_, rng)
    assert all(np.array_equal(a, b) and not np.shares_memory(a, b) for a, b in zip(sent, trained))


def test_defaults_are_documented_values():
    assert DEFAULT_STRENGTH == {"signflip": 4.0, "gaussian": 200.0, "scale": 10.0, "labelflip": None}
    assert attack_strength("gaussian") == 200.0
    assert attack_strength("scale", 3.0) == 3.0
    assert set(ATTACKS) == set(DEFAULT_STRENGTH)


@pytest.mark.parametrize(
    ("name", "strength"),
    [("nope", None), ("labelflip", 2.0), ("gaussian", 0.0), ("scale", float("nan")), (None, 3.0)],
)
def test_bad_attack_settings_raise_config_error(name, strength):
    with pytest.raises(ConfigError):
        check_attack(name, strength)


def test_mismatched_layers_are_rejected():
    trained, global_ = tiny_pair()
    with pytest.raises(ValueError, match=r"the update: expected \d+ weight arrays for the global model, got 2"):
        sign_flip(trained[:2], global_)
    with pytest.raises(ValueError, match="shape"):
        scale([trained[0].T[:1], *trained[1:]], global_)


def test_choose_malicious_is_seeded_sorted_and_one_based():
    a = choose_malicious(10, 3, np.random.default_rng(1))
    b = choose_malicious(10, 3, np.random.default_rng(1))
    assert a == b and a == sorted(a) and len(set(a)) == 3
    assert all(1 <= k <= 10 for k in a)
    assert choose_malicious(4, 0, np.random.default_rng(1)) == []
    assert choose_malicious(4, 4, np.random.default_rng(1)) == [1, 2, 3, 4]
    with pytest.raises(ConfigError):
        choose_malicious(4, 5, np.random.default_rng(1))
