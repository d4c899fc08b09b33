"""Client-level differential privacy for federated averaging (DP-FedAvg) and its (ε, δ) accounting.

DP-FedAvg (McMahan et al. 2018, "Learning Differentially Private Recurrent Language Models"): each
sampled client's update Δ_i = w_i − w (its trained weights minus the round's global weights) is clipped
to L2 norm S over all layers together; the server sums the clipped updates with EQUAL weights, adds
Gaussian noise of standard deviation z·S to the sum and divides by m, the number of sampled clients
(noise z·S/m on the average). One member's whole update moves the sum by at most S (added or removed)
or 2S (replaced), so every round is a sampled Gaussian mechanism, and its privacy loss over the rounds is
computed with Google's ``dp-accounting``. The guarantee is client-level: ε bounds what the released
global models reveal about whether one member (all of its images) took part, not about single images.

Adaptive clipping (Andrew et al. 2021, "Differentially Private Learning with Adaptive Clipping")
replaces the fixed S by a private estimate of the γ-quantile of the update norms: every round each
client also reports b_i = 1[‖Δ_i‖ ≤ S], the server releases the noised fraction
b̃ = (Σ b_i + N(0, σ_b²)) / m and sets S ← S·exp(−η_C·(b̃ − γ)). The update noise multiplier becomes
z_Δ = (z⁻² − (2σ_b)⁻²)^(−1/2) so that both releases together cost what one Gaussian of multiplier z
costs (their Theorem 1): the accountant is always fed z.

Under secure aggregation (``fedmnist.secure_aggregation``) the server holds only the sum of the clients'
clipped and quantised updates and the count of their unclipped bits: ``dp_fedavg_sum_step`` releases that
sum as ``dp_fedavg_step`` releases the replies, with the noise calibrated to S plus the quantisation's
rounding slack, so the accountant is charged the same z.

Randomness comes in as a ``numpy.random.Generator`` that the caller seeds from (seed, round)
(``fedmnist.seeds.server_rng``), or as injected standard-normal samples (tests, Flower parity).
Inputs are never modified; every result is a fresh array.

Same arithmetic as Flower 1.42's wrappers (``flwr/serverapp/strategy/dp_fixed_clipping.py``,
``dp_adaptive_clipping.py``, ``flwr/supercore/differential_privacy.py``) where they coincide:
clipping (``compute_clip_model_update``), noise z·S/m on the mean for equal client weights
(``compute_stdv``), σ_b and z_Δ (``compute_adaptive_noise_params``) and the geometric step
(``_geometric_update``). Where this module differs on purpose:

* Flower 1.42's adaptive ``norm_bit`` is "clipped" (scaling factor < 1) and is fed to the update
  above, which then shrinks S when most updates are clipped; here b_i is "not clipped", as in the
  paper (and in Flower's older ``DPFedAvgAdaptive``), so S moves towards the γ-quantile;
* a round's noise is calibrated to the S that clipped that round's updates (Flower adds it after
  updating S, with the next round's S);
* the noise z·S goes on the sum whatever the number of replies (Flower adds z·S/m to the mean of the
  replies, less noise on the sum when some of the m sampled clients fail);
* an all-zero update is left as it is (Flower divides by its zero norm).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from functools import cache, cached_property

import numpy as np

from fedmnist.config import check_int
from fedmnist.errors import ConfigError, ValidationError
from fedmnist.model import layers_mismatch
from fedmnist.settings import default

log = logging.getLogger(__name__)

SIDES = ("server", "client")
"""Where updates are clipped: by the server (it sees raw updates) or by each client before sending."""

SAMPLINGS = ("without_replacement", "poisson")
"""How a round's clients are drawn: m = ⌊C·K⌋ of K without replacement (what the simulation and the Flower
app do), or each client independently with probability q = m/K."""

ACCOUNTANTS = ("rdp", "pld")
"""dp-accounting's Rényi-DP accountant, or its privacy-loss-distribution one (tighter; Poisson only)."""

DP_METHODS = ("fedavg", "fedprox", "fedavgm")
"""Methods DP-FedAvg can wrap: their server step starts from the mean of the updates. FedAvgM (DP-FedAvgM,
McMahan et al. 2018's server momentum) applies its momentum to the noised mean, which is post-processing of
the release and costs no privacy. The robust rules (median, trimmed mean, Krum) do not sum the clipped
updates, so the sensitivity argument does not cover them."""

DEFAULT_TARGET_QUANTILE = 0.5
"""γ: target fraction of unclipped updates (Andrew et al. 2021; Flower's default)."""

DEFAULT_CLIP_LEARNING_RATE = 0.2
"""η_C: learning rate of the geometric update of S (Andrew et al. 2021; Flower's default)."""

COUNT_STDDEV_DIVISOR = 20
"""σ_b = m/20 when not given (Andrew et al. 2021's recommendation; Flower's default)."""

MAX_DEFAULT_DELTA = 1e-5
"""Cap of the default δ: the δ of the published MNIST DP-SGD results (TensorFlow Privacy, Opacus)."""

MAX_MEANINGFUL_EPSILON = 10.0
"""Above this ε a guarantee is too weak to mean much (Ponomareva et al. 2023, "How to DP-fy ML": ε ≤ 1
strong, ε ≤ 10 reasonable, larger values weak)."""


def default_delta(num_clients: int) -> float:
    """δ = min(1e-5, 1/(10·K)): well below 1/K at every population size K.

    δ must be much smaller than 1/K: a mechanism that publishes one member's data chosen at random is
    (0, 1/K)-DP. 1e-5 makes ε comparable with the published MNIST results; beyond K = 10,000 clients
    the 1/(10·K) term takes over.
    """
    num_clients = check_int(num_clients, "number of clients K", 1, numpy=True)
    return min(MAX_DEFAULT_DELTA, 1.0 / (10 * num_clients))


def check_dp_method(method: str) -> None:
    """Raise ConfigError unless ``method`` averages the updates (DP-FedAvg's sensitivity needs a sum)."""
    if method not in DP_METHODS:
        raise ConfigError(
            f"differential privacy (--dp-noise) wraps only {', '.join(DP_METHODS)}: '{method}' does not average "
            "the clipped updates, so the noise z·S would not bound one client's influence"
        )


# --- configuration -----------------------------------------------------------------------------


def _number(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
            or not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number (got {value!r})")
    return float(value)


def _need(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _choice(value, name: str, options: Sequence[str]) -> str:
    text = value.strip().lower().replace("-", "_") if isinstance(value, str) else value
    _need(text in options, f"{name} must be one of {', '.join(options)} (got {value!r})")
    return text


@dataclass(frozen=True)
class DPConfig:
    """DP-FedAvg settings, validated once on creation (ConfigError naming the setting).

    ``noise_multiplier`` z (``--dp-noise``): noise std z·S on the sum of the clipped updates; 0 = no privacy.
    ``clip`` S (``--dp-clip``): L2 bound of every update; with ``adaptive`` it is the initial S.
    ``adaptive`` (``--dp-adaptive``): Andrew et al. 2021 with ``target_quantile`` γ, ``clip_learning_rate``
    η_C and ``clipped_count_stddev`` σ_b (None: m/20 when z > 0, as Andrew et al. and Flower).
    ``side``: 'server' clips the raw updates it receives; 'client' expects clipped ones
    (``clip_client_weights`` on each client) and, if adaptive, each client's unclipped bit.
    ``delta`` δ: None = ``default_delta(K)``. ``target_epsilon``: stop before ε would exceed it.
    ``sampling``: 'without_replacement' (m = ⌊C·K⌋ of K, replace-one adjacency) or 'poisson' (each
    client with probability q = m/K, add/remove-one adjacency). ``accountant``: 'rdp' or 'pld' (Poisson).
    """

    noise_multiplier: float
    clip: float
    adaptive: bool = False
    target_quantile: float = DEFAULT_TARGET_QUANTILE
    clip_learning_rate: float = DEFAULT_CLIP_LEARNING_RATE
    clipped_count_stddev: float | None = None
    side: str = default("dp-side")
    delta: float | None = None
    target_epsilon: float | None = None
    sampling: str = default("dp-sampling")
    accountant: str = default("dp-accountant")

    def __post_init__(self) -> None:
        z = _number(self.noise_multiplier, "noise multiplier z (--dp-noise)")
        _need(z >= 0, f"noise multiplier z (--dp-noise) must be >= 0 (got {z})")
        clip = _number(self.clip, "clip norm S (--dp-clip)")
        _need(clip > 0, f"clip norm S (--dp-clip) must be > 0 (got {clip})")
        _need(isinstance(self.adaptive, (bool, np.bool_)), f"adaptive must be true or false (got {self.adaptive!r})")
        gamma = _number(self.target_quantile, "target quantile γ")
        _need(0 <= gamma <= 1, f"target quantile γ must be in [0, 1] (got {gamma})")
        lr = _number(self.clip_learning_rate, "clip learning rate η_C")
        _need(lr > 0, f"clip learning rate η_C must be > 0 (got {lr})")
        sigma_b = self.clipped_count_stddev
        if sigma_b is not None:
            sigma_b = _number(sigma_b, "clipped-count stddev σ_b")
            _need(sigma_b >= 0, f"clipped-count stddev σ_b must be >= 0 (got {sigma_b})")
        delta = self.delta
        if delta is not None:
            delta = _number(delta, "δ (delta)")
            _need(0 < delta < 1, f"δ (delta) must be in (0, 1) (got {delta})")
        target = self.target_epsilon
        if target is not None:
            target = _number(target, "target ε (--target-epsilon)")
            _need(target > 0, f"target ε (--target-epsilon) must be > 0 (got {target})")
            _need(z > 0, "target ε (--target-epsilon) needs noise: with z = 0 every round has ε = ∞")
        side = _choice(self.side, "side", SIDES)
        sampling = _choice(self.sampling, "sampling", SAMPLINGS)
        accountant = _choice(self.accountant, "accountant", ACCOUNTANTS)
        _need(accountant != "pld" or sampling == "poisson",
              "accountant 'pld' needs sampling 'poisson' (dp-accounting's PLD has no sampling-without-replacement event)")
        for name, value in [("noise_multiplier", z), ("clip", clip), ("adaptive", bool(self.adaptive)),
                            ("target_quantile", gamma), ("clip_learning_rate", lr),
                            ("clipped_count_stddev", sigma_b), ("delta", delta), ("target_epsilon", target),
                            ("side", side), ("sampling", sampling), ("accountant", accountant)]:
            object.__setattr__(self, name, value)
        if self.adaptive and z > 0 and sigma_b is not None:
            adaptive_noise_params(z, 1, sigma_b)  # z < 2σ_b or ConfigError, before any round runs

    def resolved_delta(self, num_clients: int) -> float:
        """δ of this run: the given one, or ``default_delta(K)``."""
        return default_delta(num_clients) if self.delta is None else self.delta

    def noise_params(self, clients_per_round: int) -> tuple[float, float]:
        """(z_Δ, σ_b) for m sampled clients: (z, 0) with fixed clipping; see ``adaptive_noise_params``."""
        if not self.adaptive:
            return self.noise_multiplier, 0.0
        sigma_b, z_delta = adaptive_noise_params(self.noise_multiplier, clients_per_round,
                                                 self.clipped_count_stddev)
        return z_delta, sigma_b

    def to_dict(self) -> dict:
        """Plain JSON-able values (for ``resumen.json`` and checkpoints)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> DPConfig:
        """The inverse of ``to_dict``; unknown keys are a ConfigError."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        _need(not unknown, f"unknown differential-privacy setting(s): {', '.join(unknown)}")
        _need({"noise_multiplier", "clip"} <= set(data), "differential-privacy settings need noise_multiplier and clip")
        return cls(**data)


# --- updates and clipping ------------------------------------------------------------------------


def _label(labels: Sequence[str] | None, index: int) -> str:
    return labels[index] if labels is not None else f"client update {index + 1}"


def client_update(trained: Sequence[np.ndarray], global_weights: Sequence[np.ndarray],
                  label: str = "client update") -> list[np.ndarray]:
    """Δ = trained − global, layer by layer (the arrays' dtype); ValidationError if the layers differ."""
    problem = layers_mismatch(list(trained), [np.shape(g) for g in global_weights], "the global model",
                              numpy_only=False)
    if problem is not None:
        raise ValidationError(f"{label}: {problem}")
    return [np.asarray(np.subtract(np.asarray(t), np.asarray(g))) for t, g in zip(trained, global_weights)]


def update_norm(update: Sequence[np.ndarray]) -> float:
    """Global L2 norm over all layers together (float64 sums)."""
    return math.sqrt(sum(float(np.sum(np.square(np.asarray(a, dtype=np.float64)))) for a in update))


def clip_update(update: Sequence[np.ndarray], clip: float, label: str = "client update"
                ) -> tuple[list[np.ndarray], float]:
    """(update scaled by min(1, S/‖update‖), ‖update‖): every layer by the same factor (McMahan et al.'s
    flat clipping, Flower's ``clip_inputs_inplace``); an update of norm ≤ S comes back unchanged."""
    _need(isinstance(clip, (int, float, np.integer, np.floating)) and not isinstance(clip, bool)
          and math.isfinite(clip) and clip > 0, f"clip norm S must be a finite number > 0 (got {clip!r})")
    norm = update_norm(update)
    if not math.isfinite(norm):
        raise ValidationError(f"{label}: the update has non-finite values")
    if norm <= clip:
        return [np.array(a, copy=True) for a in update], norm
    scale = clip / norm
    return [np.asarray(np.asarray(a) * scale, dtype=np.asarray(a).dtype) for a in update], norm


@dataclass(frozen=True)
class ClippedWeights:
    """What a client sends under client-side clipping.

    ``weights`` = global + clipped Δ (the usual weights format); ``unclipped`` = ‖Δ‖ ≤ S, Andrew et al.'s
    bit b_i, sent too when clipping is adaptive; ``norm`` = ‖Δ‖ stays on the client (sending it would
    leak it).
    """

    weights: list[np.ndarray]
    unclipped: bool
    norm: float


def clip_client_weights(trained: Sequence[np.ndarray], global_weights: Sequence[np.ndarray],
                        clip: float) -> ClippedWeights:
    """Client-side clipping (Flower's ``fixedclipping_mod`` / ``adaptiveclipping_mod`` arithmetic):
    Δ = trained − global clipped to S, returned as global + clipped Δ in the global weights' dtype."""
    update = client_update(trained, global_weights, "trained weights")
    clipped, norm = clip_update(update, clip, "trained weights")
    weights = [np.asarray(np.add(np.asarray(g), u), dtype=np.asarray(g).dtype)
               for g, u in zip(global_weights, clipped)]
    return ClippedWeights(weights=weights, unclipped=norm <= clip, norm=norm)


# --- noise and adaptive clipping -----------------------------------------------------------------


def _standard_normals(shapes: Sequence[tuple], rng: np.random.Generator | None,
                      samples: Sequence[np.ndarray] | None) -> list[np.ndarray]:
    if samples is not None:
        problem = layers_mismatch(list(samples), shapes, "the model", numpy_only=False)
        if problem is not None:
            raise ValueError(f"injected noise: {problem}")
        return [np.asarray(s, dtype=np.float64) for s in samples]
    if rng is None:
        raise ValueError("differential-privacy noise needs a numpy Generator (rng) or injected samples")
    return [np.asarray(rng.standard_normal(shape), dtype=np.float64) for shape in shapes]


def noisy_mean(updates: Sequence[Sequence[np.ndarray]], noise_std_on_sum: float, num_sampled: int,
               rng: np.random.Generator | None = None, noise: Sequence[np.ndarray] | None = None
               ) -> list[np.ndarray]:
    """(Σ_i update_i + N(0, σ²·I)) / m in float64, with σ = ``noise_std_on_sum``: EQUAL client weights.

    ``noise``: standard-normal samples, one array per layer, used instead of drawing from ``rng``.
    """
    if not updates:
        raise ValidationError("no client updates to average")
    total = [np.zeros(np.shape(a), dtype=np.float64) for a in updates[0]]
    for update in updates:
        _accumulate(total, update)
    return noisy_sum_mean(total, noise_std_on_sum, num_sampled, rng, noise)


def _accumulate(total: list[np.ndarray], update: Sequence[np.ndarray]) -> None:
    """``total += update`` layer by layer, in float64 (in place: one model's memory however many updates)."""
    for i, a in enumerate(update):
        total[i] += np.asarray(a, dtype=np.float64)


def noisy_sum_mean(total: Sequence[np.ndarray], noise_std_on_sum: float, num_sampled: int,
                   rng: np.random.Generator | None = None, noise: Sequence[np.ndarray] | None = None
                   ) -> list[np.ndarray]:
    """(``total`` + N(0, σ²·I)) / m in float64 for a sum already formed (an all-zero sum: nobody contributed)."""
    out = [np.array(a, dtype=np.float64, copy=True) for a in total]
    if noise_std_on_sum > 0:
        for i, xi in enumerate(_standard_normals([a.shape for a in out], rng, noise)):
            out[i] += noise_std_on_sum * xi
    return [layer / num_sampled for layer in out]


def adaptive_noise_params(noise_multiplier: float, clients_per_round: float,
                          clipped_count_stddev: float | None = None) -> tuple[float, float]:
    """(σ_b, z_Δ) of adaptive clipping, as Flower's ``compute_adaptive_noise_params``.

    σ_b defaults to m/20; z_Δ = (z⁻² − (2σ_b)⁻²)^(−1/2) needs z < 2σ_b (ConfigError otherwise). With z = 0
    there is no noise: σ_b defaults to 0 and z_Δ = 0.
    """
    if noise_multiplier > 0:
        if clipped_count_stddev is None:
            clipped_count_stddev = clients_per_round / COUNT_STDDEV_DIVISOR
        if noise_multiplier >= 2 * clipped_count_stddev:
            raise ConfigError(
                f"adaptive clipping needs noise multiplier z < 2·σ_b: z = {noise_multiplier} and σ_b = "
                f"{clipped_count_stddev} (default m/{COUNT_STDDEV_DIVISOR} with m = {clients_per_round} clients per "
                "round); lower z, sample more clients per round or give a larger σ_b"
            )
        z_delta = (noise_multiplier ** (-2) - (2 * clipped_count_stddev) ** (-2)) ** -0.5
        if z_delta / noise_multiplier >= 2:
            log.warning("adaptive clipping: the update noise multiplier grows from z = %s to z_Δ = %s "
                        "(σ_b = %s is small); sample more clients per round or raise σ_b",
                        noise_multiplier, z_delta, clipped_count_stddev)
        return float(clipped_count_stddev), float(z_delta)
    return (0.0 if clipped_count_stddev is None else float(clipped_count_stddev)), 0.0


def noisy_unclipped_fraction(num_unclipped: int, num_sampled: int, stddev: float,
                             rng: np.random.Generator | None = None, sample: float | None = None) -> float:
    """b̃ = (Σ b_i + N(0, σ_b²)) / m; ``sample`` is an injected standard-normal draw (none drawn if σ_b = 0)."""
    if stddev == 0:
        return float(num_unclipped) / float(num_sampled)
    if sample is None:
        if rng is None:
            raise ValueError("the noised unclipped count needs a numpy Generator (rng) or an injected sample")
        sample = float(rng.standard_normal())
    return float(num_unclipped + stddev * float(sample)) / float(num_sampled)


def geometric_clip_update(clip: float, unclipped_fraction: float, target_quantile: float,
                          learning_rate: float) -> float:
    """S·exp(−η_C·(b̃ − γ)) (Andrew et al. 2021): S shrinks when more than γ of the updates fit under it."""
    return clip * math.exp(-learning_rate * (unclipped_fraction - target_quantile))


# --- the server step -----------------------------------------------------------------------------


@dataclass(frozen=True)
class DPState:
    """What DP-FedAvg carries from round to round; a checkpoint saves ``to_dict()``.

    ``clip``: the S the next round clips with (changes only when adaptive); ``releases``: noised
    aggregates released so far, the T the accountant is asked about.
    """

    clip: float
    releases: int = 0

    def __post_init__(self) -> None:
        clip = _number(self.clip, "DP state clip norm S")
        _need(clip > 0, f"DP state clip norm S must be > 0 (got {clip})")
        releases = check_int(self.releases, "DP state releases", 0, numpy=True)
        object.__setattr__(self, "clip", clip)
        object.__setattr__(self, "releases", releases)

    @classmethod
    def initial(cls, config: DPConfig) -> DPState:
        """State before round 1: the configured S, nothing released."""
        return cls(clip=config.clip, releases=0)

    def to_dict(self) -> dict:
        """JSON-able; floats round-trip exactly through JSON, so a resumed run draws the same numbers."""
        return {"clip": self.clip, "releases": self.releases}

    @classmethod
    def from_dict(cls, data: dict) -> DPState:
        """The inverse of ``to_dict`` (ConfigError for a malformed entry)."""
        _need(isinstance(data, dict) and set(data) == {"clip", "releases"},
              f"differential-privacy state must have exactly 'clip' and 'releases' (got {data!r})")
        return cls(clip=data["clip"], releases=data["releases"])


@dataclass(frozen=True)
class DPRound:
    """One DP-FedAvg round's result; everything here may be published (it is what the noise protects).

    ``weights``: new global weights (the global weights' dtypes); ``clip``: the S that clipped this round;
    ``noise_std``: std of the noise on the averaged update (z_Δ·S/m); ``unclipped_fraction``: the noised
    b̃ when adaptive (None otherwise); ``state``: the next round's ``DPState``.
    """

    weights: list[np.ndarray]
    clip: float
    noise_std: float
    unclipped_fraction: float | None
    state: DPState


def _clip_tolerance(global_weights: Sequence[np.ndarray], clip: float) -> float:
    """Rounding slack of Δ recomputed as (global + clipped Δ) − global in the weights' precision."""
    eps = max((np.finfo(np.asarray(g).dtype).eps for g in global_weights
               if np.issubdtype(np.asarray(g).dtype, np.floating)), default=np.finfo(np.float64).eps)
    return float(eps) * (update_norm(global_weights) + clip) + 1e-12 * clip


def dp_fedavg_step(
    global_weights: Sequence[np.ndarray],
    client_weights: Sequence[Sequence[np.ndarray]],
    config: DPConfig,
    state: DPState,
    rng: np.random.Generator | None = None,
    *,
    unclipped: Sequence[bool] | None = None,
    num_sampled: int | None = None,
    labels: Sequence[str] | None = None,
    noise: Sequence[np.ndarray] | None = None,
    count_noise: float | None = None,
) -> DPRound:
    """One round of DP-FedAvg over the clients' trained weights.

    Server side: clip every Δ_i = w_i − w to S = ``state.clip``. Client side: the clients clipped
    (``clip_client_weights``); a Δ_i longer than S (beyond rounding) is refused with a ValidationError, and
    ``unclipped`` holds the clients' bits when adaptive. Then w + (Σ clipped Δ_i + N(0, (z_Δ·S)²·I)) / m.
    ``num_sampled`` m: clients sampled for the round (default: the replies); with Poisson sampling pass
    the expected m = q·K (McMahan et al.'s fixed denominator). Draws: the adaptive count noise first,
    then one standard-normal array per layer (Flower's order); ``noise``/``count_noise`` inject them.
    """
    n = len(client_weights)
    if n == 0:
        raise ValidationError("no client updates for the differentially private round")
    if labels is not None and len(labels) != n:
        raise ValueError(f"{len(labels)} labels for {n} client updates")
    m = _num_sampled(n, num_sampled)
    clip = state.clip
    total = [np.zeros(np.shape(g), dtype=np.float64) for g in global_weights]
    bits = []
    if config.side == "server" and unclipped is not None:
        raise ValueError("server-side clipping computes the unclipped bits itself; do not pass them")
    if config.side == "client":
        if config.adaptive and (unclipped is None or len(unclipped) != n):
            raise ValidationError("client-side adaptive clipping needs every client's unclipped bit "
                                  f"({0 if unclipped is None else len(unclipped)} for {n} clients)")
        if not config.adaptive and unclipped is not None:
            raise ValueError("unclipped bits are only used by adaptive clipping")
        tolerance = _clip_tolerance(global_weights, clip)
    for i, weights in enumerate(client_weights):  # one update at a time: memory of one model, not of n
        update = client_update(weights, global_weights, _label(labels, i))
        norm = update_norm(update)
        if config.side == "client":
            if not math.isfinite(norm):
                raise ValidationError(f"{_label(labels, i)}: the update has non-finite values")
            if norm > clip + tolerance:
                raise ValidationError(
                    f"{_label(labels, i)}: update norm {norm:.6g} exceeds the clip norm S = {clip:.6g}; with "
                    "client-side clipping every client must clip its update before sending it"
                )
        clipped, norm = clip_update(update, clip, _label(labels, i))  # client side: rounding slack only
        _accumulate(total, clipped)
        bits.append(norm <= clip if config.side == "server" else bool(unclipped[i]) if config.adaptive else None)
    return _release(global_weights, total, sum(bits) if config.adaptive else None, m, config, state, clip,
                    rng, noise, count_noise)


def dp_fedavg_sum_step(
    global_weights: Sequence[np.ndarray],
    update_sum: Sequence[np.ndarray],
    num_contributors: int,
    config: DPConfig,
    state: DPState,
    rng: np.random.Generator | None = None,
    *,
    num_unclipped: int | None = None,
    num_sampled: int | None = None,
    slack: float = 0.0,
    noise: Sequence[np.ndarray] | None = None,
    count_noise: float | None = None,
) -> DPRound:
    """One round of DP-FedAvg from the SUM of c client-clipped updates (secure aggregation: the server
    never sees one of them); the same release as ``dp_fedavg_step`` with the clients' updates summed.

    ``update_sum``: Σ_k Δ_k of the c = ``num_contributors`` members, each clipped to S = ``state.clip`` on
    its client and then quantised, which may lengthen it by up to ``slack`` (``SecureAggregate.rounding_slack``,
    Δ·√d). Quantisation slack: every member's term of the sum is bounded by S + slack, not S, so the noise
    is calibrated to that bound: w + (Σ Δ_k + N(0, (z_Δ·(S + slack))²·I)) / m. The noise multiplier
    relative to the sensitivity stays z, so the accountant is charged exactly as for a plain round (one
    release of multiplier z), at the cost of (1 + slack/S) times the noise (the slack is 3·10⁻⁴ for the
    course's CNN at the default settings).
    The alternative, clipping on the clients to S − slack, would change the client step and fail once an
    adaptive S falls below the slack. ``num_unclipped``: Σ b_k, the number of members whose update was not
    clipped (adaptive clipping only), noised and fed to S's geometric update as in the plain round.
    ``num_sampled`` m, ``noise``, ``count_noise`` and the draws' order: as ``dp_fedavg_step``.

    Raises
    ------
    ConfigError
        Server-side clipping (the server would need each raw update).
    ValidationError
        A sum that does not fit the model, is not finite, or is longer than c·(S + slack) (the members did
        not clip to S), or an unclipped count missing, given without adaptive clipping, or outside [0, c].
    """
    if config.side != "client":
        raise ConfigError("DP-FedAvg on a sum of updates needs client-side clipping: server-side clipping "
                          "needs each raw update")
    c = num_contributors
    if isinstance(c, bool) or not isinstance(c, (int, np.integer)) or c < 1:
        raise ValueError(f"num_contributors must be an integer >= 1 (got {c!r})")
    _need(isinstance(slack, (int, float, np.integer, np.floating)) and not isinstance(slack, bool)
          and math.isfinite(slack) and slack >= 0, f"the rounding slack must be a finite number >= 0 (got {slack!r})")
    m = _num_sampled(int(c), num_sampled)
    clip = state.clip
    if len(update_sum) != len(global_weights) or any(np.shape(u) != np.shape(g)
                                                     for u, g in zip(update_sum, global_weights)):
        raise ValidationError(f"the sum of the updates has layers {[np.shape(u) for u in update_sum]}, the global "
                              f"model {[np.shape(g) for g in global_weights]}")
    total = [np.asarray(a, dtype=np.float64) for a in update_sum]
    norm = update_norm(total)
    if not math.isfinite(norm):
        raise ValidationError("the sum of the updates has non-finite values")
    most = c * (clip + slack + _clip_tolerance(global_weights, clip))
    if norm > most:
        raise ValidationError(f"the sum of {c} updates has norm {norm:.6g}, above c·(S + slack) = {most:.6g}: "
                              f"the members did not clip their updates to S = {clip:.6g}")
    if config.adaptive:
        if isinstance(num_unclipped, bool) or not isinstance(num_unclipped, (int, np.integer)) \
                or not 0 <= num_unclipped <= c:
            raise ValidationError(f"client-side adaptive clipping needs the number of unclipped updates, an "
                                  f"integer in [0, {c}] (got {num_unclipped!r})")
    elif num_unclipped is not None:
        raise ValueError("the unclipped count is only used by adaptive clipping")
    return _release(global_weights, total, num_unclipped, m, config, state, clip + slack, rng, noise, count_noise)


def dp_empty_step(global_weights: Sequence[np.ndarray], config: DPConfig, state: DPState, num_sampled: int,
                  rng: np.random.Generator | None = None, *, noise: Sequence[np.ndarray] | None = None,
                  count_noise: float | None = None) -> DPRound:
    """A DP-FedAvg round in which no update can be used (no client sampled, none replied, every reply
    refused, or a secure sum that was aborted or refused): the same release with an all-zero sum.

    w + N(0, (z_Δ·S)²·I) / m and, when adaptive, b̃ = (0 + N(0, σ_b²)) / m moves S. A missing or refused
    update counts as a zero contribution, which lies within one member's sensitivity S of any clipped
    update, so the round is exactly the sampled Gaussian mechanism the accountant charges: it is one
    release (``DPState.releases`` + 1) like any other round. Publishing the unchanged model instead would
    make "nothing happened" an output whose probability depends on the members' data, which the
    accountant does not cover. ``num_sampled`` m: the accountant's clients per round.
    """
    m = check_int(num_sampled, "num_sampled", 1, numpy=True, error=ValueError)
    total = [np.zeros(np.shape(g), dtype=np.float64) for g in global_weights]
    return _release(global_weights, total, 0 if config.adaptive else None, m, config, state, state.clip,
                    rng, noise, count_noise)


def _num_sampled(num_updates: int, num_sampled: int | None) -> int:
    """m: the clients sampled for the round (default: the updates)."""
    m = num_updates if num_sampled is None else num_sampled
    return check_int(m, "num_sampled", 1, numpy=True, error=ValueError)


def _release(global_weights: Sequence[np.ndarray], total: Sequence[np.ndarray],
             num_unclipped: int | None, m: int, config: DPConfig, state: DPState, sensitivity: float,
             rng: np.random.Generator | None, noise: Sequence[np.ndarray] | None,
             count_noise: float | None) -> DPRound:
    """The noised release shared by every step: the adaptive count's noise and S's update first, then
    w + (``total`` + N(0, (z_Δ·sensitivity)²·I)) / m, ``total`` being Σ clipped updates (float64);
    ``sensitivity`` bounds one member's term of the sum."""
    clip = state.clip
    z_delta, sigma_b = config.noise_params(m)
    fraction = None
    next_clip = clip
    if config.adaptive:
        fraction = noisy_unclipped_fraction(num_unclipped, m, sigma_b, rng, count_noise)
        next_clip = geometric_clip_update(clip, fraction, config.target_quantile, config.clip_learning_rate)
    mean = noisy_sum_mean(total, z_delta * sensitivity, m, rng, noise)
    weights = [np.asarray(np.asarray(g, dtype=np.float64) + mu, dtype=np.asarray(g).dtype)
               for g, mu in zip(global_weights, mean)]
    return DPRound(weights=weights, clip=clip, noise_std=z_delta * sensitivity / m, unclipped_fraction=fraction,
                   state=DPState(clip=next_clip, releases=state.releases + 1))


def poisson_sample(num_clients: int, sampling_rate: float, rng: np.random.Generator) -> list[int]:
    """Positions (0-based, sorted) of the clients that join a round, each independently with probability q."""
    return [int(p) for p in np.flatnonzero(rng.random(num_clients) < sampling_rate)]


# --- accounting ----------------------------------------------------------------------------------


@contextmanager
def _quiet_absl() -> Iterator[None]:
    """dp-accounting logs a warning per RDP order it drops; those orders are excluded correctly."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


@dataclass(frozen=True)
class PrivacyAccountant:
    """ε after T rounds of DP-FedAvg, computed by Google's ``dp-accounting``.

    One round is one sampled Gaussian release of noise multiplier z (for adaptive clipping the z of the
    configuration, Andrew et al.'s Theorem 1) over K clients with m of them per round:

    * ``without_replacement``: ``SampledWithoutReplacementDpEvent(K, m, GaussianDpEvent(z/2))`` on the RDP
      accountant with REPLACE_ONE adjacency: ε bounds what is learnt when one member's data is swapped for
      another's (K public). Replacing a clipped update moves the sum by up to 2S, and dp-accounting's RDP
      formula for this event takes the multiplier relative to that sensitivity, hence z/2 (its
      ``GaussianDpEvent`` is defined relative to S; google/differential-privacy issue #378);
    * ``poisson``: ``PoissonSampledDpEvent(q = m/K, GaussianDpEvent(z))`` on the RDP or PLD accountant with
      ADD_OR_REMOVE_ONE adjacency: ε bounds what is learnt about whether one member took part at all.

    T rounds compose as ``SelfComposedDpEvent(event, T)``. z = 0 means no privacy: ε = ∞ after any round.
    """

    noise_multiplier: float
    num_clients: int
    clients_per_round: int
    delta: float
    sampling: str = "without_replacement"
    accountant: str = "rdp"

    def __post_init__(self) -> None:
        z = _number(self.noise_multiplier, "noise multiplier z")
        _need(z >= 0, f"noise multiplier z must be >= 0 (got {z})")
        k, m = self.num_clients, self.clients_per_round
        check_int(k, "number of clients K", 1, numpy=True)
        check_int(m, f"clients per round m (K = {k})", 1, k, numpy=True)
        delta = _number(self.delta, "δ (delta)")
        _need(0 < delta < 1, f"δ (delta) must be in (0, 1) (got {delta})")
        sampling = _choice(self.sampling, "sampling", SAMPLINGS)
        accountant = _choice(self.accountant, "accountant", ACCOUNTANTS)
        _need(accountant != "pld" or sampling == "poisson", "accountant 'pld' needs sampling 'poisson'")
        for name, value in [("noise_multiplier", z), ("num_clients", int(k)), ("clients_per_round", int(m)),
                            ("delta", delta), ("sampling", sampling), ("accountant", accountant)]:
            object.__setattr__(self, name, value)

    @classmethod
    def from_config(cls, config: DPConfig, num_clients: int, clients_per_round: int) -> PrivacyAccountant:
        """The accountant of a run: K clients in the federation, m sampled per round."""
        return cls(noise_multiplier=config.noise_multiplier, num_clients=num_clients,
                   clients_per_round=clients_per_round, delta=config.resolved_delta(num_clients),
                   sampling=config.sampling, accountant=config.accountant)

    @property
    def sampling_rate(self) -> float:
        """q = m/K."""
        return self.clients_per_round / self.num_clients

    @property
    def adjacency(self) -> str:
        """Which neighbouring datasets ε compares: 'replace-one' or 'add-or-remove-one' (a whole client)."""
        return "replace-one" if self.sampling == "without_replacement" else "add-or-remove-one"

    def round_event(self):
        """The dp-accounting event of one round."""
        from dp_accounting import dp_event

        if self.sampling == "without_replacement":
            return dp_event.SampledWithoutReplacementDpEvent(
                self.num_clients, self.clients_per_round, dp_event.GaussianDpEvent(self.noise_multiplier / 2))
        return dp_event.PoissonSampledDpEvent(self.sampling_rate, dp_event.GaussianDpEvent(self.noise_multiplier))

    def event(self, rounds: int):
        """The dp-accounting event of ``rounds`` rounds."""
        from dp_accounting import dp_event

        return dp_event.SelfComposedDpEvent(self.round_event(), rounds)

    def _new_accountant(self):
        from dp_accounting import NeighboringRelation
        from dp_accounting.pld import PLDAccountant
        from dp_accounting.rdp import RdpAccountant

        if self.accountant == "pld":
            return PLDAccountant(NeighboringRelation.ADD_OR_REMOVE_ONE)
        relation = NeighboringRelation.REPLACE_ONE if self.sampling == "without_replacement" \
            else NeighboringRelation.ADD_OR_REMOVE_ONE
        return RdpAccountant(neighboring_relation=relation)

    @cached_property
    def _rdp_one_round(self) -> tuple[np.ndarray, np.ndarray]:
        """(orders, RDP of one round): T rounds are T times it, exactly as the accountant composes them."""
        accountant = self._new_accountant()
        with _quiet_absl():
            accountant.compose(self.round_event())
        return np.asarray(accountant.orders), np.asarray(accountant.rdp)

    def epsilon(self, rounds: int) -> float:
        """ε after ``rounds`` rounds at this δ (0 before any round, ∞ when z = 0)."""
        check_int(rounds, "rounds", 0, numpy=True)
        if rounds == 0:
            return 0.0
        if self.noise_multiplier == 0:
            return math.inf
        with _quiet_absl():
            if self.accountant == "rdp":
                from dp_accounting.rdp.rdp_privacy_accountant import compute_epsilon

                orders, rdp = self._rdp_one_round
                return float(compute_epsilon(orders, int(rounds) * rdp, self.delta)[0])
            accountant = self._new_accountant()
            accountant.compose(self.event(int(rounds)))
            return float(accountant.get_epsilon(self.delta))

    def would_exceed(self, target_epsilon: float, rounds_done: int) -> bool:
        """Whether one more round would take ε above the target: the run stops BEFORE that round."""
        return self.epsilon(rounds_done + 1) > target_epsilon

    def max_rounds(self, target_epsilon: float, limit: int) -> int:
        """Most rounds T ≤ ``limit`` with ε(T) ≤ target (ε grows with T: bisection)."""
        if self.epsilon(limit) <= target_epsilon:
            return limit
        low, high = 0, limit  # ε(low) ≤ target < ε(high)
        while high - low > 1:
            mid = (low + high) // 2
            low, high = (mid, high) if self.epsilon(mid) <= target_epsilon else (low, mid)
        return low

    def check_target(self, target_epsilon: float, rounds_done: int = 0) -> None:
        """ConfigError for a target ε that a run cannot honour: not positive, without noise, already
        exceeded by the rounds a resumed run has done, or exceeded by the first round of a new run."""
        target = _number(target_epsilon, "target ε (--target-epsilon)")
        _need(target > 0, f"target ε (--target-epsilon) must be > 0 (got {target})")
        _need(self.noise_multiplier > 0, "target ε (--target-epsilon) needs noise: with z = 0 every round has ε = ∞")
        spent = self.epsilon(rounds_done)
        _need(spent <= target,
              f"target ε = {target:g} is already exceeded: the {rounds_done} rounds done spent ε = {spent:.4g} "
              f"(δ = {self.delta:g}, {self.adjacency})")
        if rounds_done == 0:
            first = self.epsilon(1)
            _need(first <= target,
                  f"target ε = {target:g} is exceeded by the first round alone (ε = {first:.4g} at δ = "
                  f"{self.delta:g}, {self.adjacency}); raise the noise z, sample fewer clients per round or "
                  "raise the target")


# --- what ε means with few clients -----------------------------------------------------------------


@dataclass(frozen=True)
class PrivacyVerdict:
    """ε of a run and whether it is a meaningful guarantee, with the reason in ``message``."""

    epsilon: float
    delta: float
    adjacency: str
    meaningful: bool
    message: str


def privacy_verdict(accountant: PrivacyAccountant, rounds: int,
                    max_epsilon: float = MAX_MEANINGFUL_EPSILON) -> PrivacyVerdict:
    """Whether ε after ``rounds`` rounds means something: z > 0, δ < 1/K and ε ≤ ``max_epsilon``.

    With a course team (K = 5, every member in every round, q = 1) there is no amplification by
    sampling and ε stays far above 10 at any noise the model survives: say so instead of printing ε as if
    it were a guarantee (``clients_needed`` tells how many clients would make it one).
    """
    a = accountant
    eps = a.epsilon(rounds)
    noise = (f"noise std on the averaged update z·S/m = {a.noise_multiplier / a.clients_per_round:.3g}·S, "
             f"q = m/K = {a.clients_per_round}/{a.num_clients}")
    where = f"δ = {a.delta:g}, {a.adjacency}, {rounds} rounds"
    if a.noise_multiplier == 0:
        return PrivacyVerdict(eps, a.delta, a.adjacency, False, "no privacy: noise multiplier z = 0 (ε = ∞)")
    if a.delta >= 1 / a.num_clients:
        return PrivacyVerdict(eps, a.delta, a.adjacency, False,
                              f"not meaningful: δ = {a.delta:g} is not below 1/K = {1 / a.num_clients:g} (publishing "
                              "one member's data at random meets such a δ)")
    if eps > max_epsilon:
        why = (" Every client takes part in every round (q = 1): sampling gives no amplification, so only a"
               " large z (noise z·S/m on every coordinate of the average) lowers ε." if a.sampling_rate >= 1 else "")
        return PrivacyVerdict(eps, a.delta, a.adjacency, False,
                              f"not meaningful: ε = {eps:.3g} > {max_epsilon:g} ({where}; {noise}).{why}")
    return PrivacyVerdict(eps, a.delta, a.adjacency, True, f"ε = {eps:.3g} ({where}; {noise})")


@dataclass(frozen=True)
class ClientsNeeded:
    """The population ``clients_needed`` found, and its ε."""

    num_clients: int
    clients_per_round: int
    noise_multiplier: float
    epsilon: float
    delta: float


def clients_needed(target_epsilon: float, rounds: int, fraction: float, *,
                   noise_multiplier: float | None = None, mean_noise_std: float | None = None,
                   delta: float | None = None, sampling: str = "without_replacement", accountant: str = "rdp",
                   max_clients: int = 10_000_000) -> ClientsNeeded | None:
    """Fewest clients K (m = max(1, ⌊C·K⌋) per round, T rounds) whose ε is ≤ the target; None if none
    up to ``max_clients``.

    Give exactly one of: ``noise_multiplier`` z, the same at every K (q = m/K stays ≈ C, so more clients
    barely lower ε: the answer is small or None); or ``mean_noise_std`` σ/S = z/m, the noise the averaged
    update carries (what the model's accuracy depends on), so z = σ/S·m grows with K. δ = ``delta`` or
    ``default_delta(K)``. Search: doubling, then bisection (ε decreases with K up to the rounding of
    ⌊C·K⌋ and the default δ).
    """
    from fedmnist.seeds import clients_per_round

    _need((noise_multiplier is None) != (mean_noise_std is None),
          "give exactly one of noise_multiplier and mean_noise_std")
    _need(0 < fraction <= 1, f"fraction C must be in (0, 1] (got {fraction})")
    _need(target_epsilon > 0, f"target ε must be > 0 (got {target_epsilon})")
    check_int(max_clients, "max_clients", 1)

    def estimate(k: int) -> ClientsNeeded:
        m = clients_per_round(k, fraction)
        z = noise_multiplier if noise_multiplier is not None else mean_noise_std * m
        acc = PrivacyAccountant(z, k, m, default_delta(k) if delta is None else delta, sampling, accountant)
        return ClientsNeeded(k, m, float(z), acc.epsilon(rounds), acc.delta)

    k = 1
    while True:
        found = estimate(k)
        if found.epsilon <= target_epsilon:
            break
        if k == max_clients:
            return None
        k = min(2 * k, max_clients)
    low, high = k // 2, found  # ε(low) > target ≥ ε(high.num_clients), or low = 0
    while high.num_clients - low > 1:
        mid = (low + high.num_clients) // 2
        at_mid = estimate(mid)
        if at_mid.epsilon <= target_epsilon:
            high = at_mid
        else:
            low = mid
    return high


@cache
def noise_for_epsilon(target_epsilon: float, rounds: int, num_clients: int, clients_per_round: int, delta: float,
                      sampling: str = "poisson", accountant: str = "rdp", digits: int = 3) -> float:
    """The smallest noise multiplier z, to ``digits`` significant digits, whose ε after ``rounds`` rounds of
    K = ``num_clients``, m = ``clients_per_round`` is at most ``target_epsilon`` at ``delta``.

    Bisection on z with ``PrivacyAccountant`` itself (ε decreases as z grows), then rounded up to the
    grid of ``digits`` significant digits and stepped down while the next lower value still meets the
    target, so ε(z) ≤ target < ε(z − one unit of the last digit). ConfigError when no z up to 10⁴ does
    (δ too small for the rounds, say).
    """
    target = _number(target_epsilon, "target ε")
    _need(target > 0, f"target ε must be > 0 (got {target})")
    check_int(rounds, "rounds", 1, numpy=True)
    check_int(digits, "digits", 1, 8)

    def epsilon(z: float) -> float:
        return PrivacyAccountant(z, num_clients, clients_per_round, delta, sampling, accountant).epsilon(rounds)

    high = 1.0
    while epsilon(high) > target:
        high *= 2
        _need(high <= 1e4, f"no noise multiplier up to 10⁴ gives ε ≤ {target:g} after {rounds} rounds "
                           f"(K = {num_clients}, m = {clients_per_round}, δ = {delta:g})")
    low = high / 2
    while low > 1e-3 and epsilon(low) <= target:
        high, low = low, low / 2
    # ε(low) > target ≥ ε(high)
    while (high - low) > high * 10.0 ** -(digits + 1):
        mid = (low + high) / 2
        low, high = (low, mid) if epsilon(mid) <= target else (mid, high)
    unit = 10.0 ** (math.floor(math.log10(high)) - digits + 1)
    z = math.ceil(high / unit - 1e-9) * unit
    while z - unit > 0 and epsilon(round(z - unit, 12)) <= target:
        z -= unit
    z = float(round(z, 12))
    _need(epsilon(z) <= target, f"the accountant's ε is not monotone near z = {z:g}: no safe noise multiplier found")
    return z
