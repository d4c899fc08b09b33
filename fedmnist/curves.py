"""What a per-round accuracy curve says: when it first reaches a target, whether it stays there, and
whether it has settled or still moves.

A curve maps round → test accuracy over the rounds that were evaluated (some experiments evaluate
every k rounds). Three readings of one run:

* ``first_round``: the first evaluated round at or above a target, what "rounds to 99 %" usually means;
  a noisy curve can touch the target once and fall back.
* ``sustained_round``: the round from which the moving average of the last ``window`` evaluated rounds
  stays at or above the target until the run's last round; ``None`` ("never") when the average at the
  end is below it. Unlike the first crossing it cannot be met by one lucky round.
* ``recent_change``: how much the curve moved over its last ``window`` rounds, as the least-squares
  slope of the evaluated points in ``(T − window, T]`` times ``window``. Across seeds, ``settled`` says
  whether the 95 % interval of those changes contains zero: only then may a text call a run converged,
  a plateau, or "enough rounds". It is a test of *no detectable change*, not proof of a flat curve: with
  three seeds the interval is wide (t = 4.30), so tables print it beside the change itself.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from fedmnist.stats import MeanInterval, mean_interval, t_quantile

Curve = Mapping[int, float]
SUSTAIN_WINDOW = 5
"""Evaluated rounds averaged by ``sustained_round``."""
SETTLE_WINDOW = 10
"""Rounds over which ``recent_change`` measures the last change."""


def as_curve(values: Sequence[float | None]) -> dict[int, float]:
    """A per-round list (round 1 first; None or NaN where not evaluated) as round → accuracy."""
    return {i: float(v) for i, v in enumerate(values, start=1) if v is not None and not math.isnan(v)}


def first_round(curve: Curve, target: float) -> int | None:
    """The first evaluated round with accuracy ≥ ``target`` (None if none)."""
    return next((r for r in sorted(curve) if curve[r] >= target), None)


def moving_average(curve: Curve, window: int = SUSTAIN_WINDOW) -> dict[int, float]:
    """Round → mean of the last ``window`` evaluated rounds up to it (from the ``window``-th evaluated round)."""
    if window < 1:
        raise ValueError(f"window must be >= 1 (got {window})")
    rounds = sorted(curve)
    values = np.array([curve[r] for r in rounds], dtype=np.float64)
    return {rounds[i]: float(values[i - window + 1:i + 1].mean()) for i in range(window - 1, len(rounds))}


def sustained_round(curve: Curve, target: float, window: int = SUSTAIN_WINDOW) -> int | None:
    """The round from which the ``window``-round moving average stays ≥ ``target`` to the last round.

    None when the moving average at the last round is below the target (or the run is shorter than the
    window): the run does not hold the target at its end.
    """
    averages = moving_average(curve, window)
    since = None
    for r in sorted(averages):
        if averages[r] >= target:
            since = r if since is None else since
        else:
            since = None
    return since


def last_mean(curve: Curve, window: int = SETTLE_WINDOW) -> float:
    """Mean accuracy of the evaluated rounds among the last ``window`` rounds of the run."""
    last = max(curve)
    return float(np.mean([v for r, v in curve.items() if r > last - window]))


def last_min(curve: Curve, window: int = SETTLE_WINDOW) -> float:
    """Lowest accuracy of the evaluated rounds among the last ``window`` rounds of the run."""
    last = max(curve)
    return float(min(v for r, v in curve.items() if r > last - window))


def _window_points(curve: Curve, window: int) -> tuple[np.ndarray, np.ndarray]:
    if window < 1:
        raise ValueError(f"window must be >= 1 (got {window})")
    last = max(curve)
    rounds = np.array([r for r in sorted(curve) if r > last - window], dtype=np.float64)
    return rounds, np.array([curve[int(r)] for r in rounds], dtype=np.float64)


def recent_change(curve: Curve, window: int = SETTLE_WINDOW) -> float | None:
    """The change over the last ``window`` rounds: least-squares slope of ``(T − window, T]`` × ``window``.

    None when fewer than two evaluated rounds fall in that span (or the run is shorter than ``window``).
    """
    if not curve or max(curve) <= window:
        return None
    rounds, values = _window_points(curve, window)
    if rounds.size < 2:
        return None
    return float(np.polyfit(rounds, values, 1)[0] * window)


def recent_change_interval(curve: Curve, window: int = SETTLE_WINDOW) -> MeanInterval | None:
    """One run's ``recent_change`` with the 95 % interval of its slope (n − 2 degrees of freedom).

    For a single seed, where there is no spread across seeds to measure; None with fewer than three
    evaluated rounds in the span. It treats the rounds as independent, which successive accuracies are
    not quite, so the interval is on the narrow side.
    """
    change = recent_change(curve, window)
    if change is None:
        return None
    rounds, values = _window_points(curve, window)
    n = rounds.size
    if n < 3:
        return None
    slope, intercept = np.polyfit(rounds, values, 1)
    residuals = values - (slope * rounds + intercept)
    spread = float(np.sqrt(residuals @ residuals / (n - 2) / ((rounds - rounds.mean()) @ (rounds - rounds.mean()))))
    return MeanInterval(change, t_quantile(0.95, n - 2) * spread * window, int(n), spread * window)


def change_across_seeds(curves: Sequence[Curve], window: int = SETTLE_WINDOW) -> MeanInterval | None:
    """The mean of each seed's ``recent_change`` with its across-seed interval; for one seed, the slope's
    own interval. None when a curve is too short to measure."""
    changes = [recent_change(c, window) for c in curves]
    if not changes or any(c is None for c in changes):
        return None
    if len(changes) == 1:
        return recent_change_interval(curves[0], window)
    return mean_interval(changes)


def settled(change: MeanInterval | None) -> bool | None:
    """Whether a change's interval contains zero (the run has stopped moving); None when not measurable."""
    if change is None or math.isnan(change.half_width):
        return None
    return change.low <= 0 <= change.high
