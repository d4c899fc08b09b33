"""Across-seed statistics of the experiments: a mean with its 95 % Student-t interval, and paired comparisons.

Repeating an experiment with several seeds (partition, initial weights, client sampling and training
order all change with it) measures how much a result owes to chance; the Wilson interval of one run
(``fedmnist.evaluation``) covers only the sampling of the test images, which is far smaller. With
n seeds and values x_1..x_n:

* ``mean_interval``: x̄ ± t_{0.975, n−1}·s/√n (s the sample standard deviation), the usual interval
  for the mean of a few independent repetitions;
* ``paired_comparison``: two methods run on the same seeds share their seed's luck, so the interval is
  that of the mean of the per-seed differences a_i − b_i (a paired t-interval), which is much tighter
  than comparing two separate intervals; it also counts how many seeds each method wins.

With one value there is no spread to measure: the half-width is NaN and the text shows the mean alone.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

CONFIDENCE = 0.95


def _values(values: Sequence[float], name: str = "values") -> np.ndarray:
    array = np.asarray(list(values), dtype=np.float64)
    if array.ndim != 1 or array.size == 0:
        raise ValueError(f"{name}: need at least one number")
    if not np.isfinite(array).all():
        raise ValueError(f"{name}: every value must be finite (got {array.tolist()})")
    return array


def t_quantile(confidence: float, dof: int) -> float:
    """The two-sided Student-t quantile t_{(1 + confidence)/2, dof}."""
    from scipy.stats import t

    if not 0 < confidence < 1:
        raise ValueError(f"the confidence must be in (0, 1) (got {confidence})")
    if dof < 1:
        raise ValueError(f"a t quantile needs at least 1 degree of freedom (got {dof})")
    return float(t.ppf((1 + confidence) / 2, dof))


@dataclass(frozen=True)
class MeanInterval:
    """The mean of n values and the half-width of its confidence interval (NaN for n = 1)."""

    mean: float
    half_width: float
    n: int
    std: float
    confidence: float = CONFIDENCE

    @property
    def low(self) -> float:
        """Lower end of the interval (NaN for n = 1)."""
        return self.mean - self.half_width

    @property
    def high(self) -> float:
        """Upper end of the interval (NaN for n = 1)."""
        return self.mean + self.half_width


def mean_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> MeanInterval:
    """Mean ± t_{(1+c)/2, n−1}·s/√n of ``values`` (one per seed)."""
    array = _values(values)
    n = int(array.size)
    if n == 1:
        return MeanInterval(float(array[0]), math.nan, 1, math.nan, confidence)
    std = float(array.std(ddof=1))
    half_width = t_quantile(confidence, n - 1) * std / math.sqrt(n)
    return MeanInterval(float(array.mean()), half_width, n, std, confidence)


@dataclass(frozen=True)
class PairedComparison:
    """a − b over paired values: the mean difference, its interval, and the seeds each side wins."""

    difference: MeanInterval
    wins: int
    losses: int
    ties: int

    @property
    def n(self) -> int:
        """Number of pairs."""
        return self.difference.n

    @property
    def resolved(self) -> bool:
        """Whether the interval excludes 0 (a difference the seeds resolve); False for n = 1."""
        return self.difference.n > 1 and (self.difference.low > 0 or self.difference.high < 0)


def paired_comparison(
    a: Sequence[float], b: Sequence[float], confidence: float = CONFIDENCE
) -> PairedComparison:
    """Compare ``a`` with ``b``, paired position by position (the same seed): mean of a_i − b_i with its
    t-interval, and how many pairs have a_i > b_i (wins), a_i < b_i (losses) or equal values (ties)."""
    first, second = _values(a, "a"), _values(b, "b")
    if first.size != second.size:
        raise ValueError(f"paired values need equal lengths (got {first.size} and {second.size})")
    diff = first - second
    return PairedComparison(
        mean_interval(diff, confidence), int((diff > 0).sum()), int((diff < 0).sum()), int((diff == 0).sum())
    )


def paired_p_value(a: Sequence[float], b: Sequence[float]) -> float:
    """Two-sided p-value of the paired t-test of ``a`` − ``b`` (the test behind ``paired_comparison``'s
    interval); 1.0 when it is undefined (one pair, or every difference equal), the conservative reading."""
    from scipy.stats import ttest_1samp

    first, second = _values(a, "a"), _values(b, "b")
    if first.size != second.size:
        raise ValueError(f"paired values need equal lengths (got {first.size} and {second.size})")
    diff = first - second
    if diff.size < 2 or np.all(diff == diff[0]):
        return 1.0
    return float(ttest_1samp(diff, 0.0).pvalue)


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values of one family of comparisons (same order as given): a
    comparison is significant at level α for the whole family when its adjusted p is below α."""
    values = _values(p_values, "p_values")
    order = np.argsort(values, kind="stable")
    adjusted = np.empty_like(values)
    running = 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (values.size - rank) * values[index]))
        adjusted[index] = running
    return adjusted.tolist()


def format_mean_interval(interval: MeanInterval, scale: float = 100.0, digits: int = 2) -> str:
    """``mean ± half-width`` scaled (percent by default); the mean alone for a single value."""
    mean = interval.mean * scale
    if math.isnan(interval.half_width):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {interval.half_width * scale:.{digits}f}"


def format_paired(comparison: PairedComparison, scale: float = 100.0, digits: int = 2) -> str:
    """``+d [low, high], w/n``: the scaled difference, its interval and the pairs ``a`` wins
    (e.g. ``+1.20 [+0.40, +2.00], 5/5``)."""
    d = comparison.difference
    text = f"{d.mean * scale:+.{digits}f}"
    if not math.isnan(d.half_width):
        text += f" [{d.low * scale:+.{digits}f}, {d.high * scale:+.{digits}f}]"
    return f"{text}, {comparison.wins}/{comparison.n}"
