"""Secure aggregation (SecAgg+, Bell et al. 2020): its settings, what it composes with, and its arithmetic.

The server must learn only the SUM of the sampled members' updates. This module is the transport-free
half: which methods can run on a sum (``check_method_compatible``), how a member turns its reply into
one vector of integers (``encode_contribution``), and how the server turns the unmasked integer sum
back into the round's aggregate (``decode_sum``). The masking protocol that carries the integers
(key agreement, Shamir shares, pairwise and private masks, over Flower's primitives) is in
``fedmnist.flower_secagg``; this module imports no Flower, so the simulation twin runs the same
quantise → sum → dequantise arithmetic without the network or the cryptography.

Data flow per round
-------------------
1. Member k trains from the global weights w and forms its update u_k = w_k − w (already clipped to
   the L2 norm S under DP-FedAvg with client-side clipping; ``fedmnist.privacy``).
2. ``encode_contribution``: every coordinate of u_k is clipped to [−R, R] (``clip_range``), multiplied
   by a_k = n_k/W (n_k its example count, W the ``weight_bound``; a_k = 1 and W = 1 for equal
   weights), and quantised onto the grid {−R + jΔ : j = 0…L}, L = 2^bits − 1, Δ = 2R/L, by stochastic
   rounding drawn from ``seeds.quantization_rng(seed, round, client)`` (so the simulation and every
   Flower node produce the same integers). SCAFFOLD's Δc_k rides along, unweighted, on its own range
   (``control_range``). The vector starts with three exact integers: the weight n_k (or 1), the
   member's unclipped bit b_k (adaptive clipping; else 0) and how many of its coordinates were
   saturated by the clipping to the range.
3. ``fedmnist.flower_secagg`` masks the vector modulo M (``modulus``); the server receives only
   masked vectors, uniform in [0, M), and unmasks their sum modulo M over the c surviving members.
4. ``decode_sum``: Σ n_k (the total count: no member's count is ever visible), Σ b_k, the number of
   saturated coordinates, and the weighted sum Σ n_k·clip(u_k) = W·(Δ·Q − c·R) from the integer sum
   Q of the update block; the mean update is that over Σ n_k. Nothing overflows because
   c·L < M and c·W < M (checked by ``SecAggConfig.for_sample`` once the sample is known).

What the server sees: the number of surviving members and the sums above; never one member's update,
count or bit.

The bound
---------
Stochastic rounding moves each member's coordinate by less than one grid step Δ = 2R/(2^bits − 1) and
is unbiased. Over c members the error of the decoded weighted sum is < c·Δ·W per coordinate, so the
mean update (weighted sum / Σ n_k) is within c·Δ·W/Σ n_k of the mean of the members' clipped updates
(< Δ for equal weights, where Σ n_k = c), and Σ Δc_k within c·Δ_c. ``SecureAggregate.error_bound``
gives the number for a round. Clipping is not an error the bound covers: a coordinate of u_k beyond
±R is sent as ±R (and Δc beyond ±R_c as ±R_c), so an update that exceeds the range is aggregated with
its large coordinates saturated, biased towards zero and turned in direction; ``saturated`` counts
them so that R can be raised. Under client-side DP clipping with S ≤ R nothing saturates (each
coordinate of a clipped update is at most ‖u‖ ≤ S), and saturating never lengthens an update; the
rounding may, by less than Δ·√d over d coordinates (3·10⁻⁴ for the course's CNN at the defaults), so
DP-FedAvg calibrates its noise to S + Δ·√d (``SecureAggregate.rounding_slack``, used by
``privacy.dp_fedavg_sum_step``), which keeps the accountant's z.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from fedmnist.errors import ConfigError, FedMnistError, ValidationError
from fedmnist.settings import SETTINGS as DECLARED
from fedmnist.settings import default

DEFAULT_CLIP_RANGE: float = default("secagg-clip-range")
"""R: bound of every coordinate of a member's update (an MNIST round moves a weight by far less)."""

DEFAULT_CONTROL_RANGE: float = default("secagg-control-range")
"""R_c: bound of every coordinate of SCAFFOLD's Δc (a difference of average gradients)."""

DEFAULT_BITS: int = default("secagg-bits")
"""Quantisation bits: L = 2^22 − 1 steps, Flower's ``quantization_range`` default (2^22)."""

DEFAULT_MODULUS: int = default("secagg-modulus")
"""M: the field of the masks (Flower's ``modulus_range`` default)."""

DEFAULT_WEIGHT_BOUND: int = default("secagg-weight-bound")
"""W: the largest example count a member may weigh with (the MNIST training set, so any partition fits)."""

MAX_MODULUS = 2**62
"""Sums of two residues must fit in int64."""

HEADER = ("weight", "unclipped", "saturated")
"""The exact integers that start every encoded vector, in order."""

ROBUST_RULES = {
    "fedmed": "the coordinate-wise median needs every update",
    "trimmed": "the trimmed mean sorts every coordinate of every update",
    "krum": "Krum scores each update by its distances to the others",
    "multikrum": "Multi-Krum scores each update by its distances to the others",
    "bulyan": "Bulyan selects updates by Krum and trims every coordinate",
}
"""Rules that must see individual updates, with why (the server of a secure round sees only a sum)."""

WEIGHTED_METHODS = ("fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi", "fedadagrad", "scaffold")
"""Methods whose server step needs only the example-weighted mean update (SCAFFOLD also Σ Δc_i)."""


class SecureAggregationError(ValidationError):
    """A contribution or an unmasked sum that the secure-aggregation arithmetic cannot use."""


class SecureAggregationAborted(FedMnistError):
    """The round's secure aggregation failed (too few members left to unmask): no aggregate exists."""


def _integer(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _need(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


# --- settings ------------------------------------------------------------------------------------

FIELDS = {"secure-aggregation": "enabled", "secagg-num-shares": "num_shares", "secagg-threshold": "threshold",
          "secagg-clip-range": "clip_range", "secagg-control-range": "control_range", "secagg-bits": "bits",
          "secagg-modulus": "modulus", "secagg-weight-bound": "weight_bound"}
"""Run-config key (declared in ``fedmnist.settings``) -> ``SecAggConfig`` field."""

SETTINGS = tuple((key, name, DECLARED[key].kind, DECLARED[key].flower_default, DECLARED[key].help)
                 for key, name in FIELDS.items())
"""Every setting as (run-config key, ``SecAggConfig`` field, type, default, help), from its one declaration in
``fedmnist.settings``. The default is the run config's: 0 stands for "unset" (shares, threshold)."""


@dataclass(frozen=True)
class ProtocolParams:
    """What the masking protocol needs for one round: m sampled nodes, k shares per node (its
    neighbourhood, itself included), reconstruction threshold t, modulus M."""

    num_sampled: int
    num_shares: int
    threshold: int
    modulus: int


@dataclass(frozen=True)
class SecAggConfig:
    """Secure-aggregation settings, validated on creation (ConfigError naming the run-config key).

    ``num_shares`` k (``secagg-num-shares``): how many nodes hold a share of each node's secrets, itself
    included; None = every sampled node (SecAgg's complete graph), else an odd number for SecAgg+'s
    ring of neighbours. ``threshold`` t (``secagg-threshold``): shares needed to rebuild a secret, so
    the round survives while every node keeps t live neighbours; None = ⌊k/2⌋ + 1. It must exceed
    k/2: two disjoint sets of neighbours could otherwise rebuild both a node's mask seed and its key
    and unmask its update. ``clip_range`` R, ``control_range`` R_c, ``bits`` and ``modulus`` M set the
    quantisation (see the module's bound); ``weight_bound`` W is the largest example count a member
    may weigh with (a larger count is refused, not capped).
    """

    enabled: bool = False
    num_shares: int | None = None
    threshold: int | None = None
    clip_range: float = DEFAULT_CLIP_RANGE
    control_range: float = DEFAULT_CONTROL_RANGE
    bits: int = DEFAULT_BITS
    modulus: int = DEFAULT_MODULUS
    weight_bound: int = DEFAULT_WEIGHT_BOUND

    def __post_init__(self) -> None:
        _need(isinstance(self.enabled, (bool, np.bool_)),
              f"secure-aggregation must be true or false (got {self.enabled!r})")
        k, t = self.num_shares, self.threshold
        _need(k is None or (_integer(k) and k >= 2),
              f"secagg-num-shares must be an integer >= 2, or unset for every sampled node (got {k!r})")
        _need(t is None or (_integer(t) and t >= 2),
              f"secagg-threshold must be an integer >= 2, or unset for a majority of the shares (got {t!r}): "
              "with 1 a single share is the secret itself")
        if k is not None and t is not None:
            self._check_threshold(k, t)
        for name, value in (("secagg-clip-range", self.clip_range), ("secagg-control-range", self.control_range)):
            _need(isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
                  and math.isfinite(value) and value > 0, f"{name} must be a finite number > 0 (got {value!r})")
        m = self.modulus
        _need(_integer(m) and 2**8 <= m <= MAX_MODULUS and (m & (m - 1)) == 0,
              f"secagg-modulus must be a power of two between 2^8 and 2^62 (got {m!r})")
        _need(_integer(self.bits) and 1 <= self.bits <= 61 and 2 * self.levels < m,
              f"secagg-bits must be an integer >= 1 with 2·(2^bits − 1) < secagg-modulus, so that two "
              f"members' sum cannot wrap (got {self.bits!r} with modulus {m})")
        w = self.weight_bound
        _need(_integer(w) and w >= 1 and 2 * w < m,
              f"secagg-weight-bound must be an integer >= 1 with 2·W < secagg-modulus (got {w!r})")
        object.__setattr__(self, "enabled", bool(self.enabled))
        object.__setattr__(self, "clip_range", float(self.clip_range))
        object.__setattr__(self, "control_range", float(self.control_range))

    @classmethod
    def from_settings(cls, values: Mapping[str, object]) -> SecAggConfig:
        """The config from kebab-case settings (a Flower run config, parsed flags); keys not in ``SETTINGS``
        are ignored, missing or None ones take their defaults, and 0 shares or threshold means unset."""
        given = {}
        for key, name, kind, _, _ in SETTINGS:
            if key not in values or values[key] is None:  # None: a flag left unset
                continue
            value = values[key]
            if kind is float and _integer(value):
                value = float(value)
            given[name] = None if name in ("num_shares", "threshold") and value == 0 else value
        return cls(**given)

    @staticmethod
    def _check_threshold(num_shares: int, threshold: int) -> None:
        _need(threshold <= num_shares,
              f"secagg-threshold {threshold} is above the {num_shares} shares per node: no secret could be rebuilt")
        _need(2 * threshold > num_shares,
              f"secagg-threshold {threshold} must exceed half of the {num_shares} shares per node: otherwise two "
              "disjoint groups of neighbours could rebuild both a node's mask seed and its key")

    @property
    def levels(self) -> int:
        """L = 2^bits − 1: the largest quantised value of one coordinate."""
        return 2**self.bits - 1

    def step(self, value_range: float) -> float:
        """Δ = 2R/L: the quantisation step for values in [−R, R]."""
        return 2.0 * value_range / self.levels

    def for_sample(self, num_sampled: int, layout: VectorLayout) -> ProtocolParams:
        """The round's protocol parameters once its m sampled nodes are known; ConfigError if the settings
        cannot work with m (too few nodes, k or t above m, an even ring, or a sum that could wrap mod M)."""
        m = num_sampled
        _need(_integer(m) and m >= 2,
              f"secure aggregation needs at least 2 sampled nodes per round (got {m!r}): the sum of one is its update")
        k = m if self.num_shares is None else int(self.num_shares)
        _need(k <= m, f"secagg-num-shares {k} is above the {m} nodes sampled per round")
        _need(k == m or k % 2 == 1,
              f"secagg-num-shares {k} must be odd (a node and k//2 neighbours on each side), or all {m} sampled nodes")
        t = k // 2 + 1 if self.threshold is None else int(self.threshold)
        _need(t <= m, f"secagg-threshold {t} is above the {m} nodes sampled per round")
        self._check_threshold(k, t)
        bounds = {"the quantised update": self.levels, "the weight": self.weight_bound,
                  "the count of saturated coordinates": layout.num_values}
        for what, largest in bounds.items():
            _need(m * largest < self.modulus,
                  f"the sum of {m} nodes' {what} (up to {m} × {largest}) could wrap modulo secagg-modulus "
                  f"{self.modulus}: raise secagg-modulus or lower secagg-bits/secagg-weight-bound")
        return ProtocolParams(num_sampled=m, num_shares=k, threshold=t, modulus=self.modulus)


# --- what composes -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Composition:
    """What a method needs from the masked vector.

    ``weighted``: each update weighted by its example count (the FedAvg family), else equal weights
    (DP-FedAvg averages clipped updates over m). ``control``: SCAFFOLD's Δc_i rides along (summed).
    ``unclipped_bit``: adaptive client-side clipping's bits b_i ride along (summed).
    """

    weighted: bool = True
    control: bool = False
    unclipped_bit: bool = False


def check_method_compatible(method: str, dp=None, max_count_ratio: float | None = None) -> Composition:
    """What ``method`` (with DP settings ``dp``, a ``privacy.DPConfig`` or None, and the count-ratio cap)
    needs from a secure round; ConfigError with the reason when it must see individual replies."""
    name = str(method).strip().lower()
    refused = "secure aggregation gives the server only the sum of the updates"
    if name in ROBUST_RULES:
        raise ConfigError(f"{refused}, but {name} cannot run on a sum: {ROBUST_RULES[name]}")
    if name not in WEIGHTED_METHODS:
        raise ConfigError(f"unknown method '{name}' for secure aggregation")
    if max_count_ratio:
        raise ConfigError(f"{refused}: the count-ratio cap (max-count-ratio) compares each node's example count "
                          "with the round's median, and no node's count is visible")
    if dp is None:
        return Composition(weighted=True, control=name == "scaffold")
    from fedmnist.privacy import check_dp_method

    check_dp_method(name)
    if dp.side != "client":
        raise ConfigError(f"{refused}: server-side DP clipping needs each raw update; clip on the clients "
                          "(dp side 'client') so the server adds its noise to the sum of clipped updates")
    return Composition(weighted=False, control=False, unclipped_bit=bool(dp.adaptive))


# --- encoding ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VectorLayout:
    """The integer vector's layout: ``HEADER``, the update's coordinates, then Δc's (SCAFFOLD)."""

    shapes: tuple[tuple[int, ...], ...]
    composition: Composition

    @classmethod
    def of(cls, weights: Sequence[np.ndarray], composition: Composition) -> VectorLayout:
        """The layout for a model with ``weights``' layer shapes."""
        return cls(tuple(tuple(int(d) for d in np.shape(w)) for w in weights), composition)

    @property
    def num_values(self) -> int:
        """Coordinates of the update (and of Δc): what the saturated count can reach."""
        return sum(math.prod(s) for s in self.shapes) * (2 if self.composition.control else 1)

    @property
    def size(self) -> int:
        """Length of the encoded vector."""
        return len(HEADER) + self.num_values


@dataclass(frozen=True)
class Contribution:
    """What one member adds to a secure round: its update w_k − w (clipped under client-side DP), its
    example count, SCAFFOLD's Δc_k and adaptive clipping's unclipped bit when the method needs them."""

    update: list[np.ndarray]
    num_examples: int
    control_delta: list[np.ndarray] | None = None
    unclipped: bool | None = None

    @classmethod
    def from_weights(cls, trained: Sequence[np.ndarray], global_weights: Sequence[np.ndarray],
                     num_examples: int, control_delta: Sequence[np.ndarray] | None = None,
                     unclipped: bool | None = None) -> Contribution:
        """The contribution of a member that trained ``global_weights`` into ``trained``."""
        from fedmnist.privacy import client_update

        control = None if control_delta is None else [np.asarray(c) for c in control_delta]
        return cls(client_update(trained, global_weights, "trained weights"), num_examples, control, unclipped)


def _flat(arrays: Sequence[np.ndarray], shapes: Sequence[tuple[int, ...]], what: str) -> np.ndarray:
    if len(arrays) != len(shapes):
        raise SecureAggregationError(f"{what}: {len(arrays)} arrays, the model has {len(shapes)} layers")
    for j, (a, shape) in enumerate(zip(arrays, shapes)):
        if np.shape(a) != shape:
            raise SecureAggregationError(f"{what}, layer {j}: shape {np.shape(a)}, the model's is {shape}")
    flat = np.concatenate([np.asarray(a, dtype=np.float64).ravel() for a in arrays]) if arrays \
        else np.zeros(0, dtype=np.float64)
    if not np.all(np.isfinite(flat)):
        raise SecureAggregationError(f"{what} has non-finite values")
    return flat


def quantize(values: np.ndarray, value_range: float, levels: int, uniforms: np.ndarray) -> np.ndarray:
    """Flower's ``quantize`` (clip to [−R, R], scale onto [0, L], stochastic rounding) with the uniform
    draws passed in instead of NumPy's global generator; int64 in [0, L]."""
    scaled = (np.clip(values, -value_range, value_range) + value_range) * (levels / (2 * value_range))
    rounded = np.ceil(scaled).astype(np.int64)
    rounded[uniforms < rounded - scaled] -= 1
    return rounded


def encode_contribution(contribution: Contribution, layout: VectorLayout, config: SecAggConfig,
                        rng: np.random.Generator) -> np.ndarray:
    """The member's integer vector (int64, ``layout.size`` values in [0, M)): ``HEADER``, then its
    clipped update times n_k/W quantised on [−R, R], then Δc_k quantised on [−R_c, R_c].

    ``rng``: ``seeds.quantization_rng(seed, round, client)``; its draws (one uniform per update
    coordinate, then per Δc coordinate) decide the stochastic rounding. Raises SecureAggregationError
    for a reply that does not fit the layout or a count above the weight bound.
    """
    comp = layout.composition
    n = contribution.num_examples
    if not _integer(n) or n < 1:
        raise SecureAggregationError(f"the example count must be an integer >= 1 (got {n!r})")
    if comp.weighted and n > config.weight_bound:
        raise SecureAggregationError(f"the example count {n} exceeds secagg-weight-bound {config.weight_bound}: "
                                     "raise the bound (counts are refused, not capped)")
    weight, bound = (int(n), config.weight_bound) if comp.weighted else (1, 1)
    update = _flat(contribution.update, layout.shapes, "update")
    saturated = int(np.count_nonzero(np.abs(update) > config.clip_range))
    blocks = [quantize(np.clip(update, -config.clip_range, config.clip_range) * (weight / bound), config.clip_range, config.levels, rng.random(update.size))]
    if comp.control:
        if contribution.control_delta is None:
            raise SecureAggregationError("SCAFFOLD needs the member's control-variate delta, and it is missing")
        control = _flat(contribution.control_delta, layout.shapes, "control-variate delta")
        saturated += int(np.count_nonzero(np.abs(control) > config.control_range))
        blocks.append(quantize(control, config.control_range, config.levels, rng.random(control.size)))
    elif contribution.control_delta is not None:
        raise SecureAggregationError("a control-variate delta was given, but the method does not use one")
    bit = contribution.unclipped
    if comp.unclipped_bit != (bit is not None) or (bit is not None and not isinstance(bit, (bool, np.bool_))):
        raise SecureAggregationError("adaptive client-side clipping needs the member's unclipped bit (true/false), "
                                     "and only it" if comp.unclipped_bit else
                                     "an unclipped bit was given, but the method does not use one")
    header = np.array([weight, int(bool(bit)), saturated], dtype=np.int64)
    return np.concatenate([header, *blocks])


def rounding_slack(layout: VectorLayout, config: SecAggConfig) -> float:
    """Δ·√d: the most stochastic rounding can lengthen one member's update block (L2 norm, d coordinates)."""
    d = layout.num_values // (2 if layout.composition.control else 1)
    return config.step(config.clip_range) * math.sqrt(d)


def sum_vectors(vectors: Sequence[np.ndarray], modulus: int) -> np.ndarray:
    """Σ vectors mod M (int64): what unmasking yields, computed in the clear (the simulation twin)."""
    if not vectors:
        raise SecureAggregationError("no vectors to sum")
    total = np.zeros_like(np.asarray(vectors[0], dtype=np.int64))
    for v in vectors:
        total = (total + np.asarray(v, dtype=np.int64)) % modulus
    return total


# --- decoding ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SecureAggregate:
    """What the server learns from a secure round, and the stated bound on its error.

    ``update_sum``: Σ_k a_k·clip(u_k) times W (Σ n_k·clip(u_k) weighted, Σ clip(u_k) equal);
    ``total_weight``: Σ n_k (equal weights: the contributors); ``control_delta_sum``: Σ Δc_k (SCAFFOLD);
    ``unclipped_count``: Σ b_k (adaptive clipping); ``saturated``: coordinates clipped to the range, all
    members together; ``error_bound``/``control_error_bound``: per coordinate, of ``mean_update`` and
    of ``control_delta_sum``, against the same quantities computed in floating point; ``rounding_slack``:
    W·Δ·√d, the most the rounding can lengthen one member's term of ``update_sum`` (L2 norm; Δ·√d for
    equal weights, what client-side DP-FedAvg adds to the clip norm S); ``composition``: what the vectors
    carried, so that a method can check the aggregate was encoded for it.
    """

    update_sum: list[np.ndarray]
    total_weight: int
    num_contributors: int
    control_delta_sum: list[np.ndarray] | None
    unclipped_count: int | None
    saturated: int
    error_bound: float
    control_error_bound: float | None
    rounding_slack: float
    composition: Composition

    @property
    def mean_update(self) -> list[np.ndarray]:
        """Σ n_k·u_k / Σ n_k (equal weights: the contributors' plain mean), float64."""
        return [s / self.total_weight for s in self.update_sum]

    def apply(self, global_weights: Sequence[np.ndarray]) -> list[np.ndarray]:
        """w + mean update in the global weights' dtypes: the weighted average of the members' weights."""
        return [np.asarray(np.asarray(g, dtype=np.float64) + u, dtype=np.asarray(g).dtype)
                for g, u in zip(global_weights, self.mean_update)]


def _unflatten(flat: np.ndarray, shapes: Sequence[tuple[int, ...]]) -> list[np.ndarray]:
    out, start = [], 0
    for shape in shapes:
        size = math.prod(shape)
        out.append(flat[start:start + size].reshape(shape).copy())
        start += size
    return out


def decode_sum(total: np.ndarray, num_contributors: int, layout: VectorLayout,
               config: SecAggConfig) -> SecureAggregate:
    """The round's aggregate from the unmasked sum of ``num_contributors`` members' encoded vectors
    (see the module's bound); SecureAggregationError if the sum cannot come from such vectors."""
    total = np.asarray(total)
    c = num_contributors
    if not _integer(c) or c < 1:
        raise SecureAggregationError(f"the number of contributors must be an integer >= 1 (got {c!r})")
    if total.shape != (layout.size,) or not np.issubdtype(total.dtype, np.integer):
        raise SecureAggregationError(f"the unmasked sum must be {layout.size} integers (got {total.dtype} "
                                     f"of shape {total.shape})")
    if total.min(initial=0) < 0 or total.max(initial=0) >= config.modulus:
        raise SecureAggregationError(f"the unmasked sum has values outside [0, {config.modulus})")
    comp = layout.composition
    weight, unclipped, saturated = (int(v) for v in total[:len(HEADER)])
    bound = config.weight_bound if comp.weighted else 1
    if not (c <= weight <= c * bound) or unclipped > c or saturated > c * layout.num_values:
        raise SecureAggregationError(f"the unmasked sum's header ({weight}, {unclipped}, {saturated}) cannot come "
                                     f"from {c} members: the vectors were not encoded with these settings")
    d = layout.num_values // (2 if comp.control else 1)
    blocks = total[len(HEADER):].astype(np.float64)
    step = config.step(config.clip_range)
    update_sum = (blocks[:d] * step - c * config.clip_range) * bound
    control_sum, control_bound = None, None
    if comp.control:
        control_step = config.step(config.control_range)
        control_sum = _unflatten(blocks[d:] * control_step - c * config.control_range, layout.shapes)
        control_bound = c * control_step
    return SecureAggregate(
        update_sum=_unflatten(update_sum, layout.shapes), total_weight=weight, num_contributors=c,
        control_delta_sum=control_sum, unclipped_count=unclipped if comp.unclipped_bit else None,
        saturated=saturated, error_bound=c * step * bound / weight, control_error_bound=control_bound,
        rounding_slack=rounding_slack(layout, config) * bound, composition=comp,
    )


def aggregate_encoded(vectors: Sequence[np.ndarray], layout: VectorLayout, config: SecAggConfig) -> SecureAggregate:
    """The simulation twin's server half: sum the members' encoded vectors modulo M and decode; the same
    numbers as the masked protocol, which unmasks exactly this sum. The caller checked the round's sample
    (``SecAggConfig.for_sample``), so that no sum of its members can wrap."""
    return decode_sum(sum_vectors(vectors, config.modulus), len(vectors), layout, config)


def aggregate_in_clear(contributions: Sequence[Contribution], rngs: Sequence[np.random.Generator],
                       layout: VectorLayout, config: SecAggConfig) -> SecureAggregate:
    """Encode every contribution, sum modulo M, decode (``aggregate_encoded``) in one call."""
    if len(rngs) != len(contributions):
        raise ValueError(f"{len(rngs)} generators for {len(contributions)} contributions")
    config.for_sample(len(contributions), layout)  # at least two members, and the sum cannot wrap
    return aggregate_encoded([encode_contribution(c, layout, config, rng) for c, rng in zip(contributions, rngs)],
                             layout, config)


# --- what a member is told -----------------------------------------------------------------------


@dataclass(frozen=True)
class SecureEncoding:
    """What a member needs to encode its reply in a secure round (``client.Instructions.secure``): the
    settings, the vector layout (the model's shapes and the method's ``Composition``) and the run's seed,
    from which ``seeds.quantization_rng(seed, round, client)`` draws its stochastic rounding."""

    config: SecAggConfig
    layout: VectorLayout
    seed: int

    @classmethod
    def for_method(cls, config: SecAggConfig, composition: Composition, weights: Sequence[np.ndarray],
                   seed: int) -> SecureEncoding:
        """The encoding of a method with ``composition`` (``Method.secure_composition``) on a model with ``weights``."""
        return cls(config, VectorLayout.of(weights, composition), int(seed))

    def encode(self, trained: Sequence[np.ndarray], start: Sequence[np.ndarray], num_examples: int,
               round_: int, client_id: int, control_delta: Sequence[np.ndarray] | None = None,
               unclipped: bool | None = None) -> np.ndarray:
        """The member's integer vector for its (clipped) ``trained`` weights, from the round's ``start``; the
        control delta and the unclipped bit are used only when the composition carries them."""
        from fedmnist.seeds import quantization_rng

        comp = self.layout.composition
        contribution = Contribution.from_weights(trained, start, num_examples,
                                                 control_delta if comp.control else None,
                                                 unclipped if comp.unclipped_bit else None)
        return encode_contribution(contribution, self.layout, self.config,
                                   quantization_rng(self.seed, round_, client_id))
