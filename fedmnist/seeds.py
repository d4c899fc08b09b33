"""One seed formula per purpose, and the client-sampling rule every multi-round mode shares.

Every random stream is ``np.random.default_rng([seed, STREAM, ...])`` (or its ``SeedSequence``) with
its own stream number, so streams never overlap, a run needs no saved random state to resume, and
the file flow, the simulation and Flower draw the same numbers for the same (seed, round, client).

Rounds are numbered from 1: round r trains from the global weights written after r − 1
aggregations (``pesos_globales_ronda_{r-1}.pkl`` in the file flow).
"""

from __future__ import annotations

import math

import numpy as np

SAMPLING, TRAINING, MALICIOUS, ATTACK, VALIDATION, SERVER_NOISE = 1, 2, 3, 4, 5, 6
QUANTIZATION, SECAGG_GRAPH = 7, 8
"""Stream numbers, one per purpose."""


def training_seed(seed: int, round_: int, client_id: int) -> int:
    """Seed of ``client_id``'s local training in ``round_`` (shuffling and dropout masks)."""
    state = np.random.SeedSequence([seed, TRAINING, round_, client_id]).generate_state(1, np.uint32)
    return int(state[0] >> 1)


def validation_seed(seed: int, client_id: int) -> int:
    """Seed of the validation hold-out of ``client_id``'s partition (the same in every round)."""
    state = np.random.SeedSequence([seed, VALIDATION, client_id]).generate_state(1, np.uint32)
    return int(state[0] >> 1)


def malicious_rng(seed: int) -> np.random.Generator:
    """Generator that picks the run's malicious clients."""
    return np.random.default_rng([seed, MALICIOUS])


def attack_rng(seed: int, round_: int, client_id: int) -> np.random.Generator:
    """Generator of a malicious client's poisoned update in ``round_``."""
    return np.random.default_rng([seed, ATTACK, round_, client_id])


def server_rng(seed: int, round_: int) -> np.random.Generator:
    """Generator of the server's own randomness in ``round_`` (e.g. differential-privacy noise)."""
    return np.random.default_rng([seed, SERVER_NOISE, round_])


def quantization_rng(seed: int, round_: int, client_id: int) -> np.random.Generator:
    """Generator of the stochastic rounding of ``client_id``'s secure-aggregation encoding in ``round_``
    (the simulation and Flower draw the same integers from it)."""
    return np.random.default_rng([seed, QUANTIZATION, round_, client_id])


def secagg_graph_rng(seed: int, round_: int) -> np.random.Generator:
    """Generator of the server's SecAgg+ neighbour graph in ``round_`` (which nodes hold whose shares)."""
    return np.random.default_rng([seed, SECAGG_GRAPH, round_])


def clients_per_round(num_available: int, fraction: float) -> int:
    """``max(1, ⌊C·n⌋)`` clients per round (McMahan et al. 2017; Flower's strategies use ⌊C·n⌋ too)."""
    return max(1, math.floor(fraction * num_available + 1e-9))


def sample_positions(num_available: int, fraction: float, seed: int, round_: int) -> list[int]:
    """Sorted positions (0-based) of the ``clients_per_round`` candidates drawn for ``round_``.

    The simulation maps position p to client p + 1; Flower maps it to the p-th smallest node id, so
    both pick the same clients when node ids sort like client ids.
    """
    rng = np.random.default_rng([seed, SAMPLING, round_])
    chosen = rng.choice(num_available, size=clients_per_round(num_available, fraction), replace=False)
    return sorted(int(p) for p in chosen)
