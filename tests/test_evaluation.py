"""Tests for fedmnist.evaluation: Wilson interval, confusion matrix, summaries, interval overlap, clients' accuracy."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fedmnist.evaluation import (
    client_accuracies,
    client_summary,
    confusion_matrix,
    intervals_overlap,
    per_class_accuracy,
    summarize,
    wilson_interval,
)


def result_with(correct: int, total: int):
    """An EvalResult for ``correct`` right answers out of ``total`` (all of class 0)."""
    y_true = np.zeros(total, dtype=np.uint8)
    y_pred = np.r_[np.zeros(correct, np.uint8), np.ones(total - correct, np.uint8)]
    return summarize(y_true, y_pred, loss=0.1)


# --- Wilson interval -------------------------------------------------------------------------------


def test_wilson_95_of_100_hand_computed():
    # Prepare: p = 0.95, n = 100, z = 1.96:
    #   centre = (p + z²/2n) / (1 + z²/n) = 0.969207 / 1.038415 = 0.933353
    #   half   = z / (1 + z²/n) * sqrt(p(1-p)/n + z²/4n²) = 1.887427 * 0.023896 = 0.045103
    expected = (0.88825, 0.97846)

    # Execute
    low, high = wilson_interval(95, 100)

    # Assert
    assert low == pytest.approx(expected[0], abs=1e-5)
    assert high == pytest.approx(expected[1], abs=1e-5)


def test_wilson_edges_stay_in_unit_interval():
    # Execute
    none_right = wilson_interval(0, 10)
    all_right = wilson_interval(10, 10)

    # Assert
    assert none_right[0] == 0.0 and 0.0 < none_right[1] < 0.35
    assert all_right[1] == pytest.approx(1.0) and all_right[1] <= 1.0
    assert 0.65 < all_right[0] < 1.0
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_wilson_narrows_with_more_samples_and_contains_p():
    # Execute
    small = wilson_interval(90, 100)
    large = wilson_interval(9000, 10000)

    # Assert
    assert small[0] < 0.9 < small[1] and large[0] < 0.9 < large[1]
    assert (large[1] - large[0]) < (small[1] - small[0]) / 5


# --- confusion matrix ------------------------------------------------------------------------------


def test_confusion_matrix_hand_computed():
    # Prepare
    y_true = np.array([0, 0, 1, 2, 2, 2])
    y_pred = np.array([0, 1, 1, 2, 0, 2])

    # Execute
    matrix = confusion_matrix(y_true, y_pred, num_classes=3)

    # Assert
    np.testing.assert_array_equal(matrix, [[1, 1, 0], [0, 1, 0], [1, 0, 2]])


def test_confusion_matrix_default_ten_classes_uint8_labels():
    # Prepare
    y_true = np.array([9, 9, 3], dtype=np.uint8)
    y_pred = np.array([9, 4, 3], dtype=np.uint8)

    # Execute
    matrix = confusion_matrix(y_true, y_pred)

    # Assert
    assert matrix.shape == (10, 10) and matrix.sum() == 3
    assert (matrix[9, 9], matrix[9, 4], matrix[3, 3]) == (1, 1, 1)


# --- summarize ---------------------------------------------------------------------------------------


def test_summarize_per_class_accuracy():
    # Prepare
    y_true = np.array([0, 0, 1, 2, 2, 2], dtype=np.uint8)
    y_pred = np.array([0, 1, 1, 2, 0, 2], dtype=np.uint8)

    # Execute
    result = summarize(y_true, y_pred, loss=np.float32(0.75))

    # Assert
    assert result.accuracy == pytest.approx(4 / 6)
    assert result.num_examples == 6
    assert result.per_class_accuracy[:3] == pytest.approx([0.5, 1.0, 2 / 3])
    assert result.per_class_accuracy[3:] == [0.0] * 7  # classes absent from the set
    assert result.loss == 0.75 and type(result.loss) is float
    assert (result.ci_low, result.ci_high) == pytest.approx(wilson_interval(4, 6))
    assert result.confusion.shape == (10, 10) and int(np.trace(result.confusion)) == 4


def test_summarize_to_dict_is_json_ready():
    # Prepare
    result = result_with(8, 10)

    # Execute
    text = json.dumps(result.to_dict())

    # Assert
    back = json.loads(text)
    assert back["accuracy"] == 0.8 and back["num_examples"] == 10
    assert back["confusion"][0][:2] == [8, 2]


# --- intervals_overlap -------------------------------------------------------------------------------


def test_intervals_overlap():
    # Prepare
    high = result_with(95, 100)
    close = result_with(93, 100)
    low = result_with(50, 100)

    # Execute / Assert
    assert intervals_overlap(high, close) and intervals_overlap(close, high)
    assert not intervals_overlap(high, low) and not intervals_overlap(low, high)
    assert intervals_overlap(high, high)


# --- how each client fares -----------------------------------------------------------------------------


class FixedPredictor:
    """Predicts given labels whatever the weights, and remembers the weights it was asked about."""

    def __init__(self, predicted):
        self.predicted, self.seen = np.asarray(predicted), []

    def predict(self, weights, x, y):
        self.seen.append(weights)
        return 0.5, self.predicted


def test_per_class_accuracy_by_hand():
    # Prepare: class 0 right 1 of 2, class 1 right 2 of 3, class 2 right 1 of 1, no image of 3..9
    y = np.array([0, 0, 1, 1, 1, 2])
    predictor = FixedPredictor([0, 1, 1, 1, 0, 2])
    weights = [np.zeros(2)]

    # Execute
    accuracy = per_class_accuracy(predictor, weights, np.zeros((6, 28, 28, 1)), y)

    # Assert
    assert accuracy.shape == (10,)
    assert accuracy[:3] == pytest.approx([0.5, 2 / 3, 1.0])
    assert np.isnan(accuracy[3:]).all()  # unknown, not zero
    assert predictor.seen == [weights]


def test_client_accuracies_reweight_the_class_accuracies_by_hand():
    # Prepare: the model gets every 0 right and every 1 wrong
    accuracy = np.array([1.0, 0.0] + [0.5] * 8)
    counts = np.zeros((3, 10), dtype=np.int64)
    counts[0, 0] = 40  # only zeros
    counts[1, [0, 1]] = [30, 10]  # three quarters zeros
    counts[2, 1] = 5  # only ones

    # Execute / Assert
    assert client_accuracies(accuracy, counts) == pytest.approx([1.0, 0.75, 0.0])


def test_a_client_with_the_test_sets_proportions_gets_the_overall_accuracy():
    # Prepare: 6 test images, 4 right (class accuracies 1/2, 2/3, 1)
    y = np.array([0, 0, 1, 1, 1, 2])
    accuracy = per_class_accuracy(FixedPredictor([0, 1, 1, 1, 0, 2]), None, np.zeros(6), y)
    test_counts = np.bincount(y, minlength=10)[None, :]

    # Execute / Assert
    assert client_accuracies(accuracy, test_counts) == pytest.approx([4 / 6])


def test_client_accuracies_refuse_what_has_no_answer():
    accuracy = np.array([1.0, np.nan] + [0.5] * 8)
    holds_one = np.zeros((1, 10))
    holds_one[0, 1] = 3

    with pytest.raises(ValueError, match=r"classes \[1\].*unknown"):
        client_accuracies(accuracy, holds_one)
    with pytest.raises(ValueError, match="hold no image"):
        client_accuracies(np.ones(10), np.zeros((2, 10)))
    with pytest.raises(ValueError, match="label counts"):
        client_accuracies(np.ones(10), np.ones((2, 9)))
    # a class nobody holds may be unknown
    assert client_accuracies(accuracy, np.eye(10)[[0]]) == pytest.approx([1.0])


def test_client_summary_by_hand():
    # five clients, sorted 0.5 0.6 0.7 0.8 0.9: the 10th percentile sits 0.1 · 4 = 0.4 of the way from 0.5 to 0.6
    summary = client_summary(np.array([0.8, 0.5, 0.9, 0.6, 0.7]))

    assert summary == pytest.approx({"mean": 0.7, "p10": 0.54, "worst": 0.5})
    # ten clients: 0.9 of the way from the lowest to the second lowest
    assert client_summary(np.r_[0.2, 0.3, np.ones(8)])["p10"] == pytest.approx(0.29)
    assert client_summary(np.array([0.6])) == pytest.approx({"mean": 0.6, "p10": 0.6, "worst": 0.6})
    with pytest.raises(ValueError, match="one accuracy per client"):
        client_summary(np.array([]))
