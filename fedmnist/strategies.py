"""Server-side aggregation rules: FedAvg/FedProx, FedMed, trimmed mean, Krum, Multi-Krum and Bulyan.

Every rule is a pure function over ``results``, one ``(weights, num_examples)`` pair per client
(``weights`` is the client's list of layer arrays, as ``model.get_weights()`` returns it), like
Flower's ``flwr/server/strategy/aggregate.py``. Each returns a fresh list of arrays in the input's
floating dtype (float32 here) and never modifies or aliases its inputs. For each layer the
clients' arrays are stacked once and reduced along the client axis.

``AGGREGATORS`` maps the method names used by the CLI and the simulation to the rules;
``aggregate(method, results, ...)`` dispatches by name.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from fedmnist.config import check_int
from fedmnist.errors import ValidationError
from fedmnist.model import layers_mismatch
from fedmnist.settings import default

Results = Sequence[tuple[Sequence[np.ndarray], int]]
"""One ``(layer arrays, num_examples)`` pair per client."""

DEFAULT_TRIM_BETA: float = default("trim-beta")
DEFAULT_NUM_MALICIOUS: int = default("krum-f")


class AggregationError(ValidationError, ValueError):
    """Client updates or aggregation parameters that cannot be aggregated.

    A ``ValidationError`` (so the CLI reports it as a user error) and a ``ValueError``.
    """


def weighted_average(results: Results) -> list[np.ndarray]:
    """Average the clients' weights, each weighted by its number of examples (FedAvg).

    McMahan et al. 2017, "Communication-Efficient Learning of Deep Networks from Decentralized
    Data": ``sum_k n_k w_k / sum_k n_k``. The shares n_k / sum n are computed in float64, then
    each layer is accumulated in place in its own dtype (no stacked copy, no temporaries per client).

    Parameters
    ----------
    results
        One ``(weights, num_examples)`` pair per client; all clients have the same layer shapes.

    Returns
    -------
    list[np.ndarray]
        The averaged layers, fresh arrays in the input's floating dtype.

    Raises
    ------
    AggregationError
        (a ``ValueError``) if ``results`` is empty, the clients' layers differ in number or
        shape, a ``num_examples`` is negative or all of them are zero.
    """
    _check_layers(results)
    counts = _example_counts(results)
    shares = counts / counts.sum()
    out = []
    for group in _layer_groups(results):
        dtype = _as_output(np.asarray(group[0]), np.asarray(group[0]).dtype).dtype
        coeffs = shares.astype(dtype)
        total = np.array(group[0], dtype=dtype, copy=True)
        total *= coeffs[0]
        scratch = np.empty_like(total)
        for layer, coeff in zip(group[1:], coeffs[1:]):
            np.multiply(layer, coeff, out=scratch, dtype=dtype)
            total += scratch
        out.append(total)
    return out


def coordinate_median(results: Results) -> list[np.ndarray]:
    """Coordinate-wise median of the clients' weights, unweighted (FedMed).

    Yin et al. 2018, "Byzantine-Robust Distributed Learning: Towards Optimal Statistical Rates".
    With an even number of clients each coordinate is the mean of its two middle values
    (``np.median``). ``num_examples`` is ignored.

    Parameters
    ----------
    results
        One ``(weights, num_examples)`` pair per client; all clients have the same layer shapes.

    Returns
    -------
    list[np.ndarray]
        The median layers, fresh arrays in the input's floating dtype.

    Raises
    ------
    AggregationError
        (a ``ValueError``) if ``results`` is empty or the clients' layers differ in number or shape.
    """
    _check_layers(results)
    out = []
    for group in _layer_groups(results):
        stacked = np.stack(group)
        out.append(_as_output(np.median(stacked, axis=0), stacked.dtype))
    return out


def trimmed_mean(results: Results, beta: float) -> list[np.ndarray]:
    """Coordinate-wise trimmed mean of the clients' weights, unweighted.

    Yin et al. 2018, "Byzantine-Robust Distributed Learning: Towards Optimal Statistical Rates".
    For each coordinate the ``int(beta * n)`` smallest and as many largest of the ``n`` clients'
    values are dropped and the rest averaged (in float64), as Flower's
    ``aggregate_trimmed_avg(results, proportiontocut=beta)``. ``num_examples`` is ignored.

    Parameters
    ----------
    results
        One ``(weights, num_examples)`` pair per client; all clients have the same layer shapes.
    beta
        Fraction of the clients to cut at each end, ``0 <= beta < 0.5``.

    Returns
    -------
    list[np.ndarray]
        The trimmed-mean layers, fresh arrays in the input's floating dtype.

    Raises
    ------
    AggregationError
        (a ``ValueError``) if ``beta`` is outside ``[0, 0.5)``, ``results`` is empty or the
        clients' layers differ in number or shape.
    """
    if not 0.0 <= beta < 0.5:
        raise AggregationError(f"trimmed mean needs 0 <= beta < 0.5, got beta={beta}")
    _check_layers(results)
    n = len(results)
    cut = int(beta * n)
    if n - 2 * cut < 1:  # cannot happen for beta < 0.5; kept as a guard
        raise AggregationError(f"trimming {cut} of {n} clients at each end leaves nothing")
    out = []
    for group in _layer_groups(results):
        stacked = np.stack(group)
        kept = np.sort(stacked, axis=0)[cut : n - cut] if cut else stacked
        out.append(_as_output(kept.mean(axis=0, dtype=np.float64), stacked.dtype))
    return out


def krum(results: Results, num_malicious: int, num_to_keep: int = 0) -> list[np.ndarray]:
    """Krum: the client whose weights are closest to their neighbours; Multi-Krum if num_to_keep > 0.

    Blanchard et al. 2017, "Machine Learning with Adversaries: Byzantine Tolerant Gradient
    Descent". Each client's score is the sum of the squared Euclidean distances from its flattened
    weights to its ``n - f - 2`` nearest other clients (``f = num_malicious``). With
    ``num_to_keep == 0`` the result is a copy of the lowest-scoring client's weights (Krum); with
    ``num_to_keep = m > 0`` it is the ``weighted_average`` of the ``m`` lowest-scoring clients
    (Multi-Krum). Same choice as Flower's ``aggregate_krum(results, num_malicious, to_keep)``
    (ties aside: the lower client index wins here).

    Parameters
    ----------
    results
        One ``(weights, num_examples)`` pair per client; all clients have the same layer shapes.
    num_malicious
        ``f``, the number of Byzantine clients to tolerate, ``f >= 0``.
    num_to_keep
        0 for Krum, else the number ``m`` of clients Multi-Krum averages, ``0 < m <= n``.

    Returns
    -------
    list[np.ndarray]
        Fresh arrays in the input's floating dtype.

    Raises
    ------
    AggregationError
        (a ``ValueError``) if ``n <= 2f + 2``, ``num_malicious < 0``, ``num_to_keep`` is outside
        ``[0, n]``, ``results`` is empty, the clients' layers differ in number or shape, or (for
        Multi-Krum) the kept clients' ``num_examples`` are invalid as in ``weighted_average``.
    """
    _check_layers(results)
    n = len(results)
    if num_malicious < 0:
        raise AggregationError(f"num_malicious must be >= 0, got {num_malicious}")
    if n <= 2 * num_malicious + 2:
        raise AggregationError(
            f"Krum needs n > 2f + 2 clients to tolerate f malicious ones: n={n}, f={num_malicious} "
            f"(at least {2 * num_malicious + 3} clients)"
        )
    if not 0 <= num_to_keep <= n:
        raise AggregationError(f"num_to_keep must be in [0, {n}] for {n} clients, got {num_to_keep}")

    scores = _krum_scores(results, num_closest=n - num_malicious - 2)
    if num_to_keep > 0:
        best = np.argsort(scores, kind="stable")[:num_to_keep]
        return weighted_average([results[i] for i in best])
    chosen = results[int(np.argmin(scores))][0]
    return [_as_output(layer, np.asarray(layer).dtype, copy=True) for layer in chosen]


def multi_krum(results: Results, num_malicious: int, num_to_keep: int | None = None) -> list[np.ndarray]:
    """Multi-Krum: ``krum`` averaging the ``num_to_keep`` best clients, ``n - f`` by default."""
    if num_to_keep is None:
        num_to_keep = len(results) - num_malicious
    return krum(results, num_malicious, num_to_keep)


def bulyan(results: Results, num_malicious: int) -> list[np.ndarray]:
    """Bulyan: a Multi-Krum selection, then a per-coordinate mean of the values nearest the median.

    El Mhamdi et al. 2018, "The Hidden Vulnerability of Distributed Learning in Byzantium". With
    ``n`` clients and ``f = num_malicious``: (1) keep the ``θ = n − 2f`` clients with the lowest Krum
    scores (each score over the ``n − f − 2`` nearest other clients, as ``krum``); (2) for every
    coordinate take the median of the ``θ`` kept values and average the ``β = θ − 2f`` kept values
    closest to it. ``num_examples`` is ignored. Needs ``n >= 4f + 3``.

    This is Flower 1.42's ``flwr.serverapp.strategy.Bulyan`` (with its default ``select_multikrum``):
    one Multi-Krum pass that scores all ``n`` clients once. The paper, and the legacy
    ``flwr.server.strategy.Bulyan`` (``aggregate_bulyan``), select recursively instead: apply Krum,
    move its choice to the selection, re-score the remaining clients, ``θ`` times; the two can keep
    different clients. Ties are broken towards the lower client index here (Flower's sorts are not
    stable); the arithmetic is float64, rounded once to the input's dtype.

    Parameters
    ----------
    results
        One ``(weights, num_examples)`` pair per client; all clients have the same layer shapes.
    num_malicious
        ``f``, the number of Byzantine clients to tolerate, ``f >= 0``.

    Returns
    -------
    list[np.ndarray]
        Fresh arrays in the input's floating dtype.

    Raises
    ------
    AggregationError
        (a ``ValueError``) if ``num_malicious < 0``, ``n < 4f + 3``, ``results`` is empty or the
        clients' layers differ in number or shape.
    """
    _check_layers(results)
    n = len(results)
    check_int(num_malicious, "num_malicious", 0, numpy=True, error=AggregationError)
    if n < 4 * num_malicious + 3:
        raise AggregationError(
            f"Bulyan needs n >= 4f + 3 clients to tolerate f malicious ones: n={n}, f={num_malicious} "
            f"(at least {4 * num_malicious + 3} clients)"
        )
    theta = n - 2 * num_malicious
    beta = theta - 2 * num_malicious
    scores = _krum_scores(results, num_closest=n - num_malicious - 2)
    selected = np.sort(np.argsort(scores, kind="stable")[:theta])
    out = []
    for group in _layer_groups(results):
        dtype = np.asarray(group[0]).dtype
        stacked = np.stack([np.asarray(group[i], dtype=np.float64) for i in selected])
        median = np.median(stacked, axis=0)
        nearest = np.argsort(np.abs(stacked - median), axis=0, kind="stable")[:beta]
        kept = np.take_along_axis(stacked, nearest, axis=0)
        out.append(_as_output(kept.mean(axis=0), dtype))
    return out


@dataclass(frozen=True)
class Aggregator:
    """A named aggregation rule and the ``aggregate`` keyword parameters it takes."""

    name: str
    description: str
    fn: Callable[..., list[np.ndarray]]
    weighted: bool  # whether num_examples affects the result
    params: tuple[str, ...] = ()


AGGREGATORS: dict[str, Aggregator] = {
    a.name: a
    for a in (
        Aggregator("fedavg", "FedAvg: average weighted by num_examples", weighted_average, True),
        Aggregator(
            "fedprox",
            "FedProx: weighted average (the proximal term mu is in the clients' loss)",
            weighted_average,
            True,
        ),
        Aggregator("fedmed", "FedMed: coordinate-wise median", coordinate_median, False),
        Aggregator(
            "trimmed",
            "Coordinate-wise trimmed mean, cutting beta of the clients at each end",
            trimmed_mean,
            False,
            ("beta",),
        ),
        Aggregator(
            "krum",
            "Krum: the single client closest to its n - f - 2 neighbours",
            krum,
            False,
            ("num_malicious",),
        ),
        Aggregator(
            "multikrum",
            "Multi-Krum: weighted average of the m best Krum clients (m = n - f by default)",
            multi_krum,
            True,
            ("num_malicious", "num_to_keep"),
        ),
        Aggregator(
            "bulyan",
            "Bulyan: Multi-Krum keeps n - 2f clients, then a per-coordinate mean of the n - 4f nearest the median",
            bulyan,
            False,
            ("num_malicious",),
        ),
    )
}


def available_methods() -> list[str]:
    """Names of the aggregation methods, in registry order."""
    return list(AGGREGATORS)


def get_aggregator(method: str) -> Aggregator:
    """The registry entry for ``method`` (case-insensitive); AggregationError if unknown."""
    key = method.strip().lower() if isinstance(method, str) else None
    if key not in AGGREGATORS:
        raise AggregationError(f"unknown aggregation method {method!r}; available: {', '.join(AGGREGATORS)}")
    return AGGREGATORS[key]


def aggregate(
    method: str,
    results: Results,
    *,
    trim_beta: float = DEFAULT_TRIM_BETA,
    num_malicious: int = DEFAULT_NUM_MALICIOUS,
    num_to_keep: int | None = None,
) -> list[np.ndarray]:
    """Aggregate ``results`` with the rule named ``method``.

    Only the parameters the rule takes are passed on (``trim_beta`` to "trimmed",
    ``num_malicious`` to "krum", "multikrum" and "bulyan", ``num_to_keep`` to "multikrum", where None means
    ``n - num_malicious``); the others are ignored.

    Raises
    ------
    AggregationError
        (a ``ValueError``) for an unknown method or anything the rule rejects.
    """
    aggregator = get_aggregator(method)
    given = {"beta": trim_beta, "num_malicious": num_malicious, "num_to_keep": num_to_keep}
    return aggregator.fn(results, **{p: given[p] for p in aggregator.params})


def _check_layers(results: Results) -> None:
    """Raise AggregationError unless there is a client and all clients' layer shapes match."""
    if len(results) == 0:
        raise AggregationError("cannot aggregate an empty list of client results")
    reference = [np.shape(layer) for layer in results[0][0]]
    for i, (weights, _) in enumerate(results):
        problem = layers_mismatch(list(weights), reference, "client 0", numpy_only=False)
        if problem is not None:
            raise AggregationError(f"client {i}: {problem}")


def _example_counts(results: Results) -> np.ndarray:
    """The clients' num_examples as float64; AggregationError if negative or all zero."""
    counts = np.array([num_examples for _, num_examples in results], dtype=np.float64)
    bad = np.flatnonzero(~(counts >= 0))
    if bad.size:
        i = int(bad[0])
        raise AggregationError(f"client {i}: num_examples must be >= 0, got {results[i][1]}")
    if counts.sum() == 0:
        raise AggregationError("the clients' num_examples sum to 0; cannot weight their average")
    return counts


def _layer_groups(results: Results) -> list[tuple[np.ndarray, ...]]:
    """For each layer, the tuple of the clients' arrays for it."""
    return list(zip(*(weights for weights, _ in results)))


def _as_output(value: np.ndarray, input_dtype: np.dtype, *, copy: bool = False) -> np.ndarray:
    """``value`` as an ndarray in the input's floating dtype (float32 if the input is not float)."""
    dtype = input_dtype if np.issubdtype(input_dtype, np.floating) else np.dtype(np.float32)
    return np.array(value, dtype=dtype, copy=True) if copy else np.asarray(value, dtype=dtype)


def _krum_scores(results: Results, num_closest: int) -> np.ndarray:
    """Each client's sum of squared distances to its ``num_closest`` nearest other clients."""
    n = len(results)
    sizes = [int(np.size(layer)) for layer in results[0][0]]
    flat = np.zeros((n, sum(sizes)), dtype=np.float64)
    if flat.shape[1]:
        for i, (weights, _) in enumerate(results):
            np.concatenate([np.ravel(layer) for layer in weights], out=flat[i])
    gram = flat @ flat.T
    sq_norms = np.diag(gram)
    distances = np.maximum(sq_norms[:, None] + sq_norms[None, :] - 2.0 * gram, 0.0)
    np.fill_diagonal(distances, 0.0)
    # Column 0 of each sorted row is the client itself (distance 0), as in Flower.
    return np.sort(distances, axis=1)[:, 1 : num_closest + 1].sum(axis=1)
