"""Drift measures on tiny arrays whose answers are known by hand."""

from __future__ import annotations

import numpy as np
import pytest

from fedmnist.drift import barrier, interpolate, segment, update_cosines, update_norms

START = [np.zeros((2, 2), np.float32), np.zeros(2, np.float32)]


def model(a, b, c, d, e, f):
    return [np.array([[a, b], [c, d]], np.float32), np.array([e, f], np.float32)]


def test_norms_and_cosines_by_hand():
    clients = [model(3, 4, 0, 0, 0, 0), model(0, 0, 0, 0, 0, 2), model(-3, -4, 0, 0, 0, 0)]

    assert update_norms(START, clients) == pytest.approx([5.0, 2.0, 5.0])
    assert update_cosines(START, clients) == pytest.approx([0.0, -1.0, 0.0])  # pairs (0,1) (0,2) (1,2)
    assert update_cosines(START, [model(1, 0, 0, 0, 0, 0), START]) == [0.0]  # a zero update


def test_shapes_must_match():
    with pytest.raises(ValueError, match="client 0"):
        update_norms(START, [[np.zeros(3, np.float32)]])
    with pytest.raises(ValueError, match="no client"):
        update_cosines(START, [])


def test_segment_and_barrier_of_a_double_well():
    a, b = [np.array([-1.0], np.float32)], [np.array([1.0], np.float32)]

    def loss(w):  # two minima at ±1, a bump of height 1 at 0
        x = float(w[0][0])
        return (x * x - 1) ** 2

    losses = [loss(w) for w in segment(a, b, points=5)]

    assert losses == pytest.approx([0.0, 0.5625, 1.0, 0.5625, 0.0])
    assert barrier(losses) == pytest.approx(1.0)
    assert barrier([1.0, 0.5, 0.0]) == pytest.approx(0.0)  # linear path: no barrier
    assert interpolate(a, b, 0.25)[0].dtype == np.float32 and interpolate(a, b, 0.25)[0][0] == pytest.approx(-0.5)
    with pytest.raises(ValueError):
        segment(a, b, points=1)
