"""Published results the essay's tables put beside the project's own, with their citations.

Only numbers read in the paper itself go here. A field that could not be read is None and the tables
print it as pending (``PENDING``), never as a guess.
"""

from __future__ import annotations

from dataclasses import dataclass

PENDING = "pendiente de verificar"
"""What a table prints for a published number not read in its source."""


@dataclass(frozen=True)
class PublishedDP:
    """One row of a client-level DP federated-learning table on MNIST.

    ``clients`` K; ``epsilon`` and ``delta`` of the guarantee (None: non-private); ``accuracy`` in [0, 1];
    ``rounds`` the communication rounds; ``clients_per_round`` m. None: not read in the source.
    """

    clients: int
    epsilon: float | None
    delta: float | None
    accuracy: float | None
    rounds: int | None
    clients_per_round: int | None
    source: str


GEYER_2017_CITATION = ("R. C. Geyer, T. Klein y M. Nabi (2017), «Differentially Private Federated Learning: A Client "
                       "Level Perspective», arXiv:1712.07557 (NIPS 2017 Workshop), tabla de resultados en MNIST")
"""Where ``GEYER_2017``'s rows come from."""

GEYER_2017: tuple[PublishedDP, ...] = tuple(
    PublishedDP(k, None, None, None, None, None, GEYER_2017_CITATION) for k in (100, 1_000, 10_000)
)
"""Geyer, Klein & Nabi (2017): client-level DP FedAvg on MNIST with K = 100, 1,000 and 10,000 clients.

TO BE FILLED FROM THE PAPER: the stored copies of arXiv:1712.07557 searched while this module was
written gave its abstract and introduction but not its results table, so ε, δ, accuracy, rounds and m
are left None (printed as ``PENDING``) until someone reads them in the paper itself. Only K = 100,
1,000 and 10,000 is known (the paper's three federations)."""


def geyer_row(clients: int) -> PublishedDP | None:
    """Geyer et al.'s private row for ``clients`` K, or None when the paper has no such K."""
    return next((r for r in GEYER_2017 if r.clients == int(clients)), None)


def describe(row: PublishedDP | None) -> str:
    """A table cell: ``<accuracy> % (ε = …, δ = …, <rounds> rondas, m = …)``, ``PENDING`` when not read, — when absent."""
    if row is None:
        return "—"
    if row.accuracy is None:
        return PENDING
    parts = [f"ε = {row.epsilon:g}" if row.epsilon is not None else "sin privacidad"]
    if row.delta is not None:
        parts.append(f"δ = {row.delta:g}")
    if row.rounds is not None:
        parts.append(f"{row.rounds} rondas")
    if row.clients_per_round is not None:
        parts.append(f"m = {row.clients_per_round}")
    return f"{row.accuracy * 100:.1f} % ({', '.join(parts)})"
