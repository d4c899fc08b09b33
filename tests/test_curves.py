"""Reading a per-round accuracy curve: first crossing, held level, and whether it still moves."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedmnist import curves
from fedmnist.stats import MeanInterval


def test_as_curve_drops_rounds_that_were_not_evaluated():
    assert curves.as_curve([0.5, math.nan, None, 0.7]) == {1: 0.5, 4: 0.7}


def test_first_round_and_sustained_round_differ_when_the_curve_touches_the_target_and_falls_back():
    # touches 0.99 at round 3, falls back, then holds from round 6 on
    curve = curves.as_curve([0.95, 0.97, 0.99, 0.96, 0.99, 0.995, 0.99, 0.995, 0.99, 0.992])

    assert curves.first_round(curve, 0.99) == 3
    # 3-round moving averages: r3 .97, r4 .9733, r5 .98, r6 .9817, r7 .9917, r8 .9933, r9 .9917, r10 .9923
    assert curves.sustained_round(curve, 0.99, window=3) == 7
    assert curves.first_round(curve, 0.999) is None


def test_sustained_round_is_none_when_the_average_at_the_end_is_below_the_target():
    curve = curves.as_curve([0.99] * 8 + [0.95, 0.95])

    assert curves.sustained_round(curve, 0.99, window=3) is None
    assert curves.sustained_round(curves.as_curve([0.995, 0.995]), 0.99, window=3) is None  # shorter than window


def test_moving_average_uses_evaluated_rounds_only():
    curve = {5: 0.2, 10: 0.4, 15: 0.9}

    assert curves.moving_average(curve, 2) == pytest.approx({10: 0.3, 15: 0.65})
    with pytest.raises(ValueError):
        curves.moving_average(curve, 0)


def test_last_mean_and_min_cover_the_last_window_rounds():
    curve = curves.as_curve([0.1] * 5 + [0.5, 0.7])

    assert curves.last_mean(curve, 2) == pytest.approx(0.6)
    assert curves.last_min(curve, 3) == pytest.approx(0.1)


def test_recent_change_is_the_least_squares_slope_times_the_window():
    # a straight line rising 0.001 a round over rounds 1..30: the last 10 rounds rose 0.01
    curve = curves.as_curve([0.9 + 0.001 * r for r in range(1, 31)])

    assert curves.recent_change(curve, 10) == pytest.approx(0.01)
    change = curves.recent_change_interval(curve, 10)
    assert change.mean == pytest.approx(0.01) and change.half_width == pytest.approx(0.0, abs=1e-12)
    assert curves.settled(change) is False
    # too short: the run has no 10 rounds before its last
    assert curves.recent_change(curves.as_curve([0.5] * 10), 10) is None


def test_recent_change_with_sparse_evaluations_uses_the_points_in_the_span():
    curve = {50: 0.90, 55: 0.92, 60: 0.94, 40: 0.0}  # round 40 lies outside [50, 60]

    assert curves.recent_change(curve, 10) == pytest.approx(0.04)
    assert curves.recent_change({45: 0.9, 60: 0.92}, 10) is None  # one point in [50, 60]


def test_a_noisy_flat_curve_is_settled_and_a_rising_one_across_seeds_is_not():
    rng = np.random.default_rng(0)
    flat = curves.as_curve([0.978, 0.982] * 20)  # ±0.2 points around 98 %, no trend
    assert curves.settled(curves.change_across_seeds([flat])) is True

    rising = [curves.as_curve(0.9 + 0.002 * np.arange(40) + rng.normal(0, 0.001, 40)) for _ in range(3)]
    change = curves.change_across_seeds(rising)
    assert change.n == 3 and change.mean == pytest.approx(0.02, abs=0.005)
    assert curves.settled(change) is False


def test_change_across_seeds_by_hand():
    # three seeds whose last 10 rounds rose by exactly 0.01, 0.02 and 0.03
    seeds = [curves.as_curve([0.5 + d / 10 * r for r in range(1, 21)]) for d in (0.01, 0.02, 0.03)]

    change = curves.change_across_seeds(seeds)

    # mean 0.02, s = 0.01, t_{0.975,2} = 4.303: half-width 4.303·0.01/√3 = 0.02484
    assert change.mean == pytest.approx(0.02) and change.half_width == pytest.approx(0.02484, abs=1e-5)
    assert curves.settled(change) is True
    assert curves.change_across_seeds([seeds[0], curves.as_curve([0.5] * 5)]) is None


def test_settled_is_none_without_an_interval():
    assert curves.settled(None) is None
    assert curves.settled(MeanInterval(0.1, math.nan, 1, math.nan)) is None
