"""Across-seed intervals and paired comparisons, against values computed by hand from t tables."""

from __future__ import annotations

import math

import pytest

from fedmnist import stats
from fedmnist.stats import (
    format_mean_interval,
    format_paired,
    mean_interval,
    paired_comparison,
    t_quantile,
)

T_975_2 = 4.302653  # Student-t tables, two-sided 95 %, 2 and 4 degrees of freedom
T_975_4 = 2.776445


def test_t_quantiles_match_the_tables():
    assert t_quantile(0.95, 2) == pytest.approx(T_975_2, abs=1e-6)
    assert t_quantile(0.95, 4) == pytest.approx(T_975_4, abs=1e-6)
    assert t_quantile(0.90, 4) == pytest.approx(2.131847, abs=1e-6)
    with pytest.raises(ValueError, match="degree"):
        t_quantile(0.95, 0)
    with pytest.raises(ValueError, match="confidence"):
        t_quantile(1.0, 3)


def test_mean_interval_by_hand():
    # Prepare: mean 0.2, sample standard deviation 0.1, n = 3
    values = [0.1, 0.2, 0.3]

    # Execute
    interval = mean_interval(values)

    # Assert: half-width t·s/√n = 4.302653 · 0.1 / √3
    assert interval.mean == pytest.approx(0.2)
    assert interval.std == pytest.approx(0.1)
    assert interval.half_width == pytest.approx(T_975_2 * 0.1 / math.sqrt(3), rel=1e-6)
    assert (interval.low, interval.high) == pytest.approx((0.2 - 0.248414, 0.2 + 0.248414), abs=1e-6)
    assert values == [0.1, 0.2, 0.3]


def test_one_value_has_no_interval():
    interval = mean_interval([0.97])

    assert interval.mean == 0.97 and interval.n == 1 and math.isnan(interval.half_width)
    assert format_mean_interval(interval) == "97.00"


def test_bad_values_are_refused():
    with pytest.raises(ValueError, match="at least one"):
        mean_interval([])
    with pytest.raises(ValueError, match="finite"):
        mean_interval([0.5, float("nan")])
    with pytest.raises(ValueError, match="equal lengths"):
        paired_comparison([0.1, 0.2], [0.1])


def test_paired_comparison_by_hand():
    # Prepare: five seeds; differences a − b = 0.02, 0.01, 0.03, −0.01, 0.00
    a = [0.92, 0.91, 0.95, 0.90, 0.93]
    b = [0.90, 0.90, 0.92, 0.91, 0.93]

    # Execute
    comparison = paired_comparison(a, b)

    # Assert: mean 0.01, s = √(0.001/4) = 0.0158114, half-width 2.776445 · s / √5
    d = comparison.difference
    assert d.mean == pytest.approx(0.01)
    assert d.std == pytest.approx(math.sqrt(0.001 / 4))
    assert d.half_width == pytest.approx(T_975_4 * math.sqrt(0.001 / 4) / math.sqrt(5), rel=1e-6)
    assert (comparison.wins, comparison.losses, comparison.ties) == (3, 1, 1)
    assert not comparison.resolved  # the interval [−0.0096, 0.0296] contains 0
    assert format_paired(comparison) == "+1.00 [-0.96, +2.96], 3/5"


def test_a_consistent_difference_is_resolved():
    comparison = paired_comparison([0.95, 0.96, 0.97], [0.90, 0.90, 0.92])

    assert comparison.resolved and comparison.wins == 3
    assert format_mean_interval(mean_interval([0.95, 0.96, 0.97])) == "96.00 ± 2.48"


def test_holm_by_hand():
    # sorted 0.01, 0.02, 0.04 → ×3, ×2, ×1 = 0.03, 0.04, 0.04 (monotone), back in the given order
    assert stats.holm([0.04, 0.01, 0.02]) == pytest.approx([0.04, 0.03, 0.04])
    assert stats.holm([0.5, 0.6]) == pytest.approx([1.0, 1.0])


def test_paired_p_value_matches_the_interval_and_is_conservative_when_undefined():
    a, b = [1.0, 2.0, 4.0], [0.0, 0.5, 1.0]  # differences 1, 1.5, 3: t = 1.833/(1.041/√3) = 3.05, 2 dof
    assert stats.paired_p_value(a, b) == pytest.approx(0.0927, abs=1e-3)
    assert stats.paired_comparison(a, b).difference.low < 0  # p > 0.05 ⇔ the 95 % interval contains 0
    assert stats.paired_p_value([1.0, 2.0], [0.0, 1.0]) == 1.0  # every difference equal
    assert stats.paired_p_value([1.0], [0.0]) == 1.0
