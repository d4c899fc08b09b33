"""Hyper-parameter tuning helpers: the validation split, the grid, the score and the choice."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedmnist.data import Mnist
from fedmnist.errors import ConfigError
from fedmnist.tuning import Trial, best, candidate_label, candidates, tuning_score, validation_split


@pytest.fixture
def toy() -> Mnist:
    x_train = np.arange(100, dtype=np.uint8).reshape(100, 1, 1) * np.ones((1, 28, 28), np.uint8)
    x_test = np.full((20, 28, 28), 255, np.uint8)
    return Mnist(x_train, np.arange(100) % 10, x_test, np.zeros(20, np.int64))


def test_validation_split_moves_a_seeded_sample_of_training_images_into_the_test_role(toy):
    split = validation_split(toy, 30, seed=4)
    again = validation_split(toy, 30, seed=4)
    other = validation_split(toy, 30, seed=5)

    train_ids, held_ids = split.x_train[:, 0, 0].astype(int), split.x_test[:, 0, 0].astype(int)
    assert len(train_ids) == 70 and len(held_ids) == 30
    assert set(train_ids) | set(held_ids) == set(range(100)) and not set(train_ids) & set(held_ids)
    assert np.array_equal(split.y_test, toy.y_train[held_ids])  # labels follow their images
    assert 255 not in split.x_test and 255 not in split.x_train  # the test images are gone
    assert np.array_equal(split.x_test, again.x_test) and not np.array_equal(split.x_test, other.x_test)


@pytest.mark.parametrize("size", [0, 100, -1, 2.5, True])
def test_validation_split_size_is_checked(toy, size):
    with pytest.raises(ConfigError, match="validation split"):
        validation_split(toy, size, seed=0)


def test_candidates_are_the_product_of_the_grid_in_order():
    assert candidates({"learning_rate": (0.1, 0.2), "mu": (0.01,)}) == [
        {"learning_rate": 0.1, "mu": 0.01}, {"learning_rate": 0.2, "mu": 0.01}]
    assert candidates({}) == [{}]
    with pytest.raises(ConfigError, match="no value for mu"):
        candidates({"mu": ()})
    assert candidate_label({"learning_rate": 0.1, "server_momentum": 0.5}) == "lr0.1_mom0.5"


def test_score_averages_the_last_evaluated_rounds_and_best_ignores_nan():
    assert tuning_score([0.5, None, 0.8, 0.9]) == pytest.approx(0.85)
    assert math.isnan(tuning_score([None, float("nan")]))
    trials = [Trial("fedavg", {"lr": 1}, (), math.nan, 0.0), Trial("fedavg", {"lr": 2}, (), 0.7, 0.0),
              Trial("fedavg", {"lr": 3}, (), 0.7, 0.0)]
    assert best(trials).settings == {"lr": 2}  # first of equals
    with pytest.raises(ConfigError):
        best([])
    with pytest.raises(ConfigError, match="no validation score"):
        best(trials[:1])
