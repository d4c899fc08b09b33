"""SCAFFOLD's control variates (Karimireddy et al. 2020, "SCAFFOLD: Stochastic Controlled Averaging for
Federated Learning", Algorithm 1 with option II) as pure functions over lists of layer arrays.

Client drift: on heterogeneous data each client's local SGD walks towards its own optimum. SCAFFOLD
keeps a server control variate ``c`` (an estimate of the average client gradient) and one ``c_i`` per
client (an estimate of that client's gradient); every local step follows ``g_i(y) + c − c_i``, i.e.
the client's gradient with its own bias swapped for the average one. ``ClientTrainer.train`` applies
that correction (``correction(c, c_i)``); this module holds the rest:

- client, after its ``K`` local steps of plain SGD with rate ``η_l`` from ``x`` to ``y_i``
  (``client_control_update``): ``c_i⁺ = c_i − c + (x − y_i) / (K·η_l)``, sends ``Δy_i = y_i − x`` (its
  weights) and ``Δc_i = c_i⁺ − c_i``, keeps ``c_i⁺``;
- server, with ``S`` the clients of the round out of ``N`` (``server_update``):
  ``x ← x + η_g·avg_S(Δy_i)``, ``c ← c + (|S|/N)·avg_S(Δc_i)`` (= ``c + Σ_S Δc_i / N``), which keeps
  ``c`` the average of all ``N`` clients' ``c_i`` under client sampling.

All controls start at zero (``zero_controls``). Option II reuses the local run, so it costs no extra
gradient pass; it assumes each step moved the weights by exactly ``η_l·(g + c − c_i)``, which is why
``ClientTrainer`` refuses the correction with momentum or Adam. Functions never modify their inputs and
return fresh arrays in the weights' dtype, computed in float64 and rounded once.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from fedmnist.config import check_int
from fedmnist.errors import ValidationError
from fedmnist.model import layers_mismatch

Arrays = Sequence[np.ndarray]


class ScaffoldError(ValidationError, ValueError):
    """Control variates or SCAFFOLD parameters that cannot be used together.

    A ``ValidationError`` (so the CLI reports it as a user error) and a ``ValueError``.
    """


def zero_controls(weights: Arrays) -> list[np.ndarray]:
    """The initial control variate (server's or a client's): zeros shaped like ``weights``."""
    return [np.zeros(np.shape(w), dtype=_dtype(w)) for w in weights]


def check_controls(controls: object, weights: Arrays, what: str = "control variate") -> None:
    """Raise ScaffoldError unless ``controls`` is a list of finite arrays shaped and typed like ``weights``.

    ``what`` names the object in the message (for example the file it came from).
    """
    problem = layers_mismatch(controls, [np.shape(w) for w in weights])
    if problem is not None:
        raise ScaffoldError(f"{what}: {problem}")
    for j, (c, w) in enumerate(zip(controls, weights)):
        if c.dtype != _dtype(w):
            raise ScaffoldError(f"{what}: weight {j} has dtype {c.dtype}, expected {_dtype(w)}")
        if not np.all(np.isfinite(c)):
            raise ScaffoldError(f"{what}: weight {j} holds non-finite values")


def all_finite(*arrays: Arrays) -> bool:
    """Whether every array of every list is finite (a diverged training gives NaN controls)."""
    return all(np.isfinite(a).all() for group in arrays for a in group)


def correction(global_control: Arrays, client_control: Arrays) -> list[np.ndarray]:
    """``c − c_i``, the term SCAFFOLD adds to every local gradient of client ``i``."""
    _check_pairs(global_control, client_control, "the client control variate", "the server control variate")
    return [_cast(_f64(c) - _f64(ci), c) for c, ci in zip(global_control, client_control)]


def client_control_update(
    global_weights: Arrays,
    client_weights: Arrays,
    global_control: Arrays,
    client_control: Arrays,
    num_steps: int,
    learning_rate: float,
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Option II: ``c_i⁺ = c_i − c + (x − y_i)/(K·η_l)``; returns ``(c_i⁺, Δc_i = c_i⁺ − c_i)``.

    Parameters
    ----------
    global_weights
        ``x``, the weights the client started from.
    client_weights
        ``y_i``, its weights after ``num_steps`` corrected SGD steps.
    global_control, client_control
        ``c`` and ``c_i`` as used during those steps.
    num_steps
        ``K``, the local steps actually taken (``TrainResult.num_steps``), >= 1.
    learning_rate
        ``η_l``, the local SGD rate (without momentum), > 0.

    Raises
    ------
    ScaffoldError
        For ``num_steps < 1``, a non-positive or non-finite rate, or arrays whose number or shapes differ.
    """
    check_int(num_steps, "SCAFFOLD's number of local steps K", 1, numpy=True, error=ScaffoldError)
    if not (isinstance(learning_rate, (int, float)) and math.isfinite(learning_rate) and learning_rate > 0):
        raise ScaffoldError(f"SCAFFOLD needs a local learning rate > 0, got {learning_rate!r}")
    _check_pairs(global_weights, client_weights, "the client's weights", "the global weights")
    _check_pairs(global_weights, global_control, "the server control variate", "the global weights")
    _check_pairs(global_weights, client_control, "the client control variate", "the global weights")
    scale = 1.0 / (int(num_steps) * float(learning_rate))
    new_controls, deltas = [], []
    for x, y, c, ci in zip(global_weights, client_weights, global_control, client_control):
        new = _f64(ci) - _f64(c) + (_f64(x) - _f64(y)) * scale
        new_controls.append(_cast(new, x))
        deltas.append(_cast(new - _f64(ci), x))
    return new_controls, deltas


def server_update(
    global_weights: Arrays,
    global_control: Arrays,
    client_weights: Sequence[Arrays],
    control_deltas: Sequence[Arrays],
    num_clients: int,
    server_lr: float = 1.0,
    num_examples: Sequence[int] | None = None,
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """One SCAFFOLD server step: ``(x + η_g·avg(y_i − x), c + Σ_S Δc_i / N)``.

    Parameters
    ----------
    global_weights, global_control
        ``x`` and ``c`` of the round.
    client_weights, control_deltas
        ``y_i`` and ``Δc_i`` of the ``|S|`` clients that reported, in the same order.
    num_clients
        ``N``, the number of clients in the federation (sampled or not), ``N >= |S|``.
    server_lr
        ``η_g`` > 0; 1 (the paper's choice in its experiments) makes ``x`` the clients' average.
    num_examples
        None for the paper's unweighted average of the ``Δy_i``; else the clients' example counts, to
        weight it as FedAvg does (equal counts give the same result). ``c`` is always updated unweighted:
        it estimates the plain average of the ``N`` clients' ``c_i``.

    Raises
    ------
    ScaffoldError
        For no clients, mismatched list lengths or shapes, ``N < |S|``, a bad rate or bad counts.
    """
    sampled = len(client_weights)
    if sampled == 0:
        raise ScaffoldError("SCAFFOLD cannot update the server without any client")
    if len(control_deltas) != sampled:
        raise ScaffoldError(f"{sampled} client weights but {len(control_deltas)} control-variate deltas")
    check_int(num_clients, f"the federation's number of clients N (at least the {sampled} that reported)", sampled,
              numpy=True, error=ScaffoldError)
    if not (isinstance(server_lr, (int, float)) and math.isfinite(server_lr) and server_lr > 0):
        raise ScaffoldError(f"the SCAFFOLD server learning rate must be > 0, got {server_lr!r}")
    _check_pairs(global_weights, global_control, "the server control variate", "the global weights")
    for k, (y, dc) in enumerate(zip(client_weights, control_deltas)):
        _check_pairs(global_weights, y, f"client {k}'s weights", "the global weights")
        _check_pairs(global_weights, dc, f"client {k}'s control-variate delta", "the global weights")
    shares = _shares(sampled, num_examples)

    new_weights, new_control = [], []
    for j, (x, c) in enumerate(zip(global_weights, global_control)):
        x64 = _f64(x)
        step = sum(share * (_f64(y[j]) - x64) for share, y in zip(shares, client_weights))
        new_weights.append(_cast(x64 + server_lr * step, x))
        delta_sum = sum(_f64(dc[j]) for dc in control_deltas)
        new_control.append(_cast(_f64(c) + delta_sum / num_clients, c))
    return new_weights, new_control


def _shares(sampled: int, num_examples: Sequence[int] | None) -> np.ndarray:
    """The weights of the clients' deltas: 1/|S| each, or n_k / Σn."""
    if num_examples is None:
        return np.full(sampled, 1.0 / sampled)
    if len(num_examples) != sampled:
        raise ScaffoldError(f"{sampled} clients but {len(num_examples)} example counts")
    counts = np.array(num_examples, dtype=np.float64)
    if np.any(~(counts >= 0)) or counts.sum() <= 0:
        raise ScaffoldError(f"example counts must be >= 0 and not all zero, got {list(num_examples)}")
    return counts / counts.sum()


def _check_pairs(reference: Arrays, other: Arrays, what: str, reference_name: str) -> None:
    problem = layers_mismatch(list(other), [np.shape(r) for r in reference], reference_name, numpy_only=False)
    if problem is not None:
        raise ScaffoldError(f"{what}: {problem}")


def _dtype(w) -> np.dtype:
    dtype = np.asarray(w).dtype
    return dtype if np.issubdtype(dtype, np.floating) else np.dtype(np.float32)


def _f64(a) -> np.ndarray:
    return np.asarray(a, dtype=np.float64)


def _cast(value, like) -> np.ndarray:
    return np.array(value, dtype=_dtype(like), copy=True)
