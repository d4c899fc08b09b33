"""Malicious clients for the simulation: model-poisoning attacks on a client's update, and label flipping.

Every model attack is a pure function with one signature,
``attack(weights, global_weights, rng, strength) -> weights``: ``weights`` is what the client
trained honestly (a list of layer arrays), ``global_weights`` the round's global model it started
from, ``rng`` a ``numpy.random.Generator`` and ``strength`` the attack's parameter. It returns fresh
float32 arrays and never modifies its inputs. The update of a client is ``Δ = w − w_g``.

=============  ===========================================  ================  =============================
name           what the malicious client sends              default strength  FedAvg / FedMed, 1 of 5 bad
=============  ===========================================  ================  =============================
``signflip``   ``w_g − s·Δ``                                ``s = 4``         0.09 / 0.64 (chance level)
``gaussian``   ``w_g + N(0, σ²)`` (the update is noise)     ``σ = 200``       0.12 / 0.67 (chance level)
``scale``      ``w_g + λ·Δ``                                ``λ = 10``        0.37 / 0.69 (overshoots)
``labelflip``  honest training on labels ``9 − y``          (none)            0.71 / 0.67 (mild)
=============  ===========================================  ================  =============================

(Test accuracy after 3 rounds, 5 IID clients of 300 MNIST images, E = 1, B = 32, Adam 1e-3, all
clients sampled, seed 7, first 300 test images; without attack both reach about 0.7.)

With ``K`` equally sized clients of which one sends ``w_g + a·Δ_m`` and the others ``w_g + Δ_h``,
FedAvg's new model is ``w_g + ((K−1)·Δ_h + a·Δ_m) / K``: for ``K = 5`` sign flipping with ``s = 4``
gives ``w_g + 0.8·Δ_h − 0.8·Δ_m``, which cancels the honest progress at best and, as the malicious
step grows, pushes the model away from it; scaling with ``λ = 10`` takes a step 2.8 times too long.
The Gaussian attack's σ = 200 is the strength of the "Gaussian Byzantine workers" in the experiments
of Blanchard et al. 2017 ("Machine Learning with Adversaries: Byzantine Tolerant Gradient Descent",
NeurIPS, §5), which send vectors drawn from ``N(0, 200²·I)`` in place of their gradient; here the
noise replaces the client's update, so one attacker of five adds noise of standard deviation 40 to
every weight of the average. The coordinate-wise median, the trimmed mean and Krum ignore a single
outlier like these.

Label flipping (Tolpegin et al. 2020, "Data Poisoning Attacks Against Federated Learning Systems")
is a data attack: the malicious client trains normally on ``flip_labels(y) = 9 − y``. It is much
weaker than the model attacks: with a minority of flippers FedAvg loses little or no accuracy.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from fedmnist.config import check_int
from fedmnist.errors import ConfigError
from fedmnist.model import layers_mismatch
from fedmnist.settings import default

Weights = list[np.ndarray]
ModelAttack = Callable[[Sequence[np.ndarray], Sequence[np.ndarray], np.random.Generator, float], Weights]

NUM_CLASSES = 10
DEFAULT_SIGNFLIP = 4.0
DEFAULT_GAUSSIAN_STD = 200.0
DEFAULT_SCALE = 10.0


def _check_pair(weights: Sequence[np.ndarray], global_weights: Sequence[np.ndarray]) -> None:
    problem = layers_mismatch(list(weights), [np.shape(g) for g in global_weights], "the global model",
                              numpy_only=False)
    if problem is not None:
        raise ValueError(f"the update: {problem}")


def _combine(global_weights, weights, factor: float) -> Weights:
    """``w_g + factor·(w − w_g)``, per layer, computed in float64 and returned as float32."""
    _check_pair(weights, global_weights)
    out = []
    for w, g in zip(weights, global_weights):
        g64 = np.asarray(g, dtype=np.float64)
        out.append((g64 + factor * (np.asarray(w, dtype=np.float64) - g64)).astype(np.float32))
    return out


def sign_flip(
    weights: Sequence[np.ndarray],
    global_weights: Sequence[np.ndarray],
    rng: np.random.Generator | None = None,
    strength: float = DEFAULT_SIGNFLIP,
) -> Weights:
    """Send ``w_g − s·(w − w_g)``: the update reversed and amplified ``s`` times (``rng`` unused)."""
    return _combine(global_weights, weights, -float(strength))


def scale(
    weights: Sequence[np.ndarray],
    global_weights: Sequence[np.ndarray],
    rng: np.random.Generator | None = None,
    strength: float = DEFAULT_SCALE,
) -> Weights:
    """Send ``w_g + λ·(w − w_g)``: the update boosted ``λ`` times (``rng`` unused)."""
    return _combine(global_weights, weights, float(strength))


def gaussian_noise(
    weights: Sequence[np.ndarray],
    global_weights: Sequence[np.ndarray],
    rng: np.random.Generator,
    strength: float = DEFAULT_GAUSSIAN_STD,
) -> Weights:
    """Send ``w_g + ε`` with ``ε ~ N(0, σ²)`` per coordinate, ``σ = strength``: the update is pure noise.

    Blanchard et al. 2017, §5, use σ = 200 ("Gaussian Byzantine workers"). ``weights`` only fixes
    the shapes; the noise is drawn from ``rng`` layer by layer in order.
    """
    _check_pair(weights, global_weights)
    return [
        (np.asarray(g, dtype=np.float64) + rng.normal(0.0, float(strength), size=np.shape(g))).astype(
            np.float32
        )
        for g in global_weights
    ]


def flip_labels(y: np.ndarray, num_classes: int = NUM_CLASSES) -> np.ndarray:
    """Labels ``num_classes − 1 − y`` (MNIST: 0↔9, 1↔8, …), as a new array of ``y``'s dtype."""
    y = np.asarray(y)
    return (num_classes - 1 - y).astype(y.dtype)


MODEL_ATTACKS: dict[str, ModelAttack] = {
    "signflip": sign_flip,
    "gaussian": gaussian_noise,
    "scale": scale,
}
"""Attacks applied to the trained weights, by name."""

DATA_ATTACKS = ("labelflip",)
"""Attacks applied to the client's labels before training."""

ATTACKS = (*MODEL_ATTACKS, *DATA_ATTACKS)

DEFAULT_STRENGTH: dict[str, float | None] = {
    "signflip": DEFAULT_SIGNFLIP,
    "gaussian": DEFAULT_GAUSSIAN_STD,
    "scale": DEFAULT_SCALE,
    "labelflip": None,
}


def check_attack(name: str | None, strength: float | None = None) -> None:
    """Raise ConfigError for an unknown attack or a strength it cannot use."""
    if name is None:
        if strength is not None:
            raise ConfigError("an attack strength was given but no attack (--attack)")
        return
    if name not in ATTACKS:
        raise ConfigError(f"unknown attack '{name}'; choose one of {', '.join(ATTACKS)}")
    if strength is None:
        return
    if DEFAULT_STRENGTH[name] is None:
        raise ConfigError(f"the '{name}' attack takes no strength")
    if not (np.isfinite(strength) and strength > 0):
        raise ConfigError(f"the attack strength must be a finite number > 0 (got {strength})")


def attack_strength(name: str, strength: float | None = None) -> float | None:
    """``strength``, or the attack's documented default when None."""
    check_attack(name, strength)
    return DEFAULT_STRENGTH[name] if strength is None else float(strength)


def attack_update(
    name: str,
    weights: Sequence[np.ndarray],
    global_weights: Sequence[np.ndarray],
    rng: np.random.Generator,
    strength: float | None = None,
) -> Weights:
    """What a malicious client sends instead of ``weights`` under attack ``name``.

    A data attack (``labelflip``) acts before training, so its trained weights are sent as they are
    (copied).
    """
    value = attack_strength(name, strength)
    if name in DATA_ATTACKS:
        _check_pair(weights, global_weights)
        return [np.array(w, dtype=np.float32, copy=True) for w in weights]
    return MODEL_ATTACKS[name](weights, global_weights, rng, value)


def choose_malicious(num_clients: int, num_malicious: int, rng: np.random.Generator) -> list[int]:
    """The ids (1..num_clients) of the malicious clients: the first ``num_malicious`` of a permutation."""
    if not 0 <= num_malicious <= num_clients:
        raise ConfigError(
            f"the number of malicious clients must be in [0, {num_clients}] (got {num_malicious})"
        )
    return sorted(int(k) + 1 for k in rng.permutation(num_clients)[:num_malicious])


@dataclass(frozen=True)
class ThreatConfig:
    """The attackers a simulation injects: how many clients are malicious and what they do."""

    num_malicious: int = default("malicious")
    attack: str | None = None
    attack_strength: float | None = None

    def validate(self, num_clients: int) -> None:
        """Raise ConfigError for an attack without attackers, attackers without an attack, or bad counts."""
        check_int(self.num_malicious, "the number of malicious clients", 0, num_clients)
        if self.num_malicious and self.attack is None:
            raise ConfigError(
                f"{self.num_malicious} malicious clients but no attack: choose --attack {'|'.join(ATTACKS)}"
            )
        if self.attack is not None and not self.num_malicious:
            raise ConfigError(f"attack '{self.attack}' given but no malicious clients: set --malicious F > 0")
        check_attack(self.attack, self.attack_strength)

    @property
    def strength(self) -> float | None:
        """The attack's strength (its documented default when not given), None without an attack."""
        return attack_strength(self.attack, self.attack_strength) if self.attack else None
