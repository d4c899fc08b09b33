"""Server optimisers: FedAvgM, FedAdam, FedYogi and FedAdagrad as pure functions over layer arrays.

FedAvg replaces the global model ``x`` by the clients' weighted average ``x̄``. A server optimiser
instead treats ``Δ = x̄ − x`` (the average client delta, the negated "pseudo-gradient") as a gradient
step and feeds it to momentum SGD (FedAvgM: Hsu et al. 2019, "Measuring the Effects of Non-Identical
Data Distribution for Federated Visual Classification") or to an adaptive rule (FedAdam, FedYogi,
FedAdagrad: Reddi et al. 2021, "Adaptive Federated Optimization", Algorithm 2).

Every optimiser is ``fn(current, aggregated, state, config) -> (new_global, new_state)``: ``current``
is the global model the clients started from, ``aggregated`` their weighted average (for example
``strategies.weighted_average``), ``state`` the optimiser's state from the previous round. Inputs are
never modified; outputs are fresh arrays in the weights' dtype. The arithmetic runs in float64 and
is rounded once to the weights' dtype, for the new weights and for the state alike.

The state is a plain dict that the restricted unpickler (``exchange.safe_load_pickle``) and JSON-like
formats can hold::

    {"method": "fedadam", "t": 3, "m": [array, ...], "v": [array, ...]}

``t`` counts the server steps already applied (0 in a fresh state), ``m`` is the first moment (the
server momentum buffer for FedAvgM), ``v`` the second moment (an empty list for FedAvgM). Arrays have
the shapes and dtype of the model's layers. ``init_state`` gives the zero state and ``check_state``
validates a loaded one against the model.

The rules equal Flower 1.42's ``flwr.serverapp.strategy`` FedAvgM/FedAdam/FedYogi/FedAdagrad
(``tests/test_server_opt.py`` drives Flower's ``aggregate_train`` over several rounds), including
Flower's choices where the paper differs: zero initial ``v`` (the paper asks ``v_{-1} >= τ²``), the
bias correction of FedAdam (absent from the paper; Flower's exponent is ``server_round + 1``), and
``β₁ = 0`` for FedAdagrad (Flower fixes it; the paper's Algorithm 2 keeps the momentum ``m_t``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from fedmnist.config import check_int
from fedmnist.errors import ValidationError
from fedmnist.model import layers_mismatch

Weights = Sequence[np.ndarray]
State = dict
"""``{"method": str, "t": int, "m": list[np.ndarray], "v": list[np.ndarray]}``."""

STATE_KEYS = ("method", "t", "m", "v")


class ServerOptError(ValidationError, ValueError):
    """A server-optimiser configuration, state or set of weights that cannot be used.

    A ``ValidationError`` (so the CLI reports it as a user error) and a ``ValueError``.
    """


# --- configuration -------------------------------------------------------------------------------

# Per method: the defaults of the fields left as None. Adam/Yogi/Adagrad take Flower 1.42's defaults.
# FedAvgM: Flower's defaults (lr 1, momentum 0) are plain FedAvg. Ours keep η = 1 and use β = 0.7, an
# untuned starting point: under a steady pseudo-gradient FedAvgM's step tends to η/(1−β) times FedAvg's,
# about 3.3 here against 10 for the β = 0.9 that overshot in the project's McMahan IID runs.
# The keys are the fields each method reads; setting another one is refused rather than silently ignored.
_DEFAULTS: dict[str, dict[str, float]] = {
    "fedavgm": {"server_lr": 1.0, "server_momentum": 0.7},
    "fedadam": {"server_lr": 1e-1, "beta_1": 0.9, "beta_2": 0.99, "tau": 1e-3},
    "fedyogi": {"server_lr": 1e-2, "beta_1": 0.9, "beta_2": 0.99, "tau": 1e-3},
    "fedadagrad": {"server_lr": 1e-1, "beta_1": 0.0, "tau": 1e-3},
}
_USES: dict[str, tuple[str, ...]] = {method: tuple(values) for method, values in _DEFAULTS.items()}
_FIELDS = ("server_lr", "server_momentum", "beta_1", "beta_2", "tau")


def default_summary(field: str) -> str:
    """Each server optimiser's default of ``field``, for help texts: ``"fedavgm 1, fedadam 0.1, ..."``."""
    return ", ".join(f"{method} {values[field]:g}" for method, values in _DEFAULTS.items() if field in values)


@dataclass(frozen=True)
class ServerOptConfig:
    """Hyper-parameters of one server optimiser; fields left as None take the method's defaults.

    Attributes
    ----------
    method
        "fedavgm", "fedadam", "fedyogi" or "fedadagrad" (case-insensitive, stored lower-case).
    server_lr
        η, the server learning rate, > 0. Defaults: FedAvgM 1.0, FedAdam 0.1, FedYogi 0.01,
        FedAdagrad 0.1 (Flower's).
    server_momentum
        β of FedAvgM, in [0, 1); default 0.7 (Flower's default 0 with η = 1 is plain FedAvg). A steady
        pseudo-gradient gives steps η/(1−β) times FedAvg's (≈ 3.3 by default, 10 with β = 0.9): an
        untuned starting point, to be chosen on validation data like η.
    beta_1
        β₁, decay of the first moment, in [0, 1); default 0.9 for FedAdam/FedYogi, 0 for FedAdagrad.
    beta_2
        β₂, decay of the second moment of FedAdam/FedYogi, in [0, 1); default 0.99.
    tau
        τ > 0, the adaptivity floor added to √v; default 1e-3 (Flower's).

    The clients' learning rate η_l (Flower's ``eta_l``, unused by its server) is the local training's
    ``learning_rate``, not a server parameter. A field the method does not use must be (and stays)
    None, so ``dataclasses.replace`` works within a method.

    Raises
    ------
    ServerOptError
        For an unknown method, a value out of range or a field the method does not use.
    """

    method: str
    server_lr: float | None = None
    server_momentum: float | None = None
    beta_1: float | None = None
    beta_2: float | None = None
    tau: float | None = None

    def __post_init__(self) -> None:
        method = self.method.strip().lower() if isinstance(self.method, str) else None
        if method not in _DEFAULTS:
            raise ServerOptError(
                f"unknown server optimiser {self.method!r}; available: {', '.join(SERVER_OPTIMIZERS)}"
            )
        object.__setattr__(self, "method", method)
        defaults = _DEFAULTS[method]
        for name in _FIELDS:
            value = getattr(self, name)
            if name not in defaults:
                if value is not None:
                    raise ServerOptError(f"{method} does not use {name} (got {value!r}); leave it unset")
                continue
            if value is None:
                value = defaults[name]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ServerOptError(f"{method}: {name} must be a finite number, got {value!r}")
            object.__setattr__(self, name, float(value))
        if not self.server_lr > 0:
            raise ServerOptError(f"{method}: the server learning rate must be > 0, got {self.server_lr}")
        for name in ("server_momentum", "beta_1", "beta_2"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value < 1.0:
                raise ServerOptError(f"{method}: {name} must be in [0, 1), got {value}")
        if self.tau is not None and not self.tau > 0:
            raise ServerOptError(f"{method}: tau must be > 0, got {self.tau}")

    def to_dict(self) -> dict[str, float | str]:
        """The method and the values it uses, for saving beside the results."""
        return {"method": self.method, **{name: getattr(self, name) for name in _USES[self.method]}}


# --- state ---------------------------------------------------------------------------------------


def init_state(method: str, weights: Weights) -> State:
    """The zero state of ``method`` for a model with ``weights``' layer shapes (step count 0)."""
    method = ServerOptConfig(method).method
    zeros = [np.zeros(np.shape(w), dtype=_dtype(w)) for w in weights]
    second = [z.copy() for z in zeros] if method != "fedavgm" else []
    return {"method": method, "t": 0, "m": zeros, "v": second}


def check_state(state: object, method: str, weights: Weights) -> None:
    """Raise ServerOptError unless ``state`` is a valid state of ``method`` for ``weights``' shapes.

    Meant for a state read from a file: names the first problem found (missing key, other method,
    negative or non-integer step count, wrong number of arrays, shape, dtype, non-finite values).
    """
    method = ServerOptConfig(method).method
    if not isinstance(state, Mapping):
        raise ServerOptError(f"the server-optimiser state must be a dict, got {type(state).__name__}")
    missing = [k for k in STATE_KEYS if k not in state]
    if missing:
        raise ServerOptError(f"the server-optimiser state lacks {', '.join(missing)}")
    extra = sorted(str(k) for k in state if k not in STATE_KEYS)
    if extra:
        raise ServerOptError(f"the server-optimiser state has unknown keys: {', '.join(extra)}")
    if state["method"] != method:
        raise ServerOptError(f"the server-optimiser state is for {state['method']!r}, not {method!r}")
    t = state["t"]
    check_int(t, "the server-optimiser step count t", 0, numpy=True, error=ServerOptError)
    for key in ("m", "v"):
        arrays = state[key]
        expected = 0 if (key == "v" and method == "fedavgm") else len(weights)
        if not isinstance(arrays, (list, tuple)) or len(arrays) != expected:
            got = len(arrays) if isinstance(arrays, (list, tuple)) else type(arrays).__name__
            raise ServerOptError(f"the server-optimiser state's {key!r} must hold {expected} arrays, got {got}")
        problem = layers_mismatch(list(arrays), [np.shape(w) for w in weights[:expected]], "the global model")
        if problem is not None:
            raise ServerOptError(f"the server-optimiser state's {key!r}: {problem}")
        for j, (array, w) in enumerate(zip(arrays, weights)):
            if array.dtype != _dtype(w):
                raise ServerOptError(
                    f"the server-optimiser state's {key!r}: weight {j} has dtype {array.dtype}, expected {_dtype(w)}"
                )
            if not np.all(np.isfinite(array)):
                raise ServerOptError(f"the server-optimiser state's {key!r}: weight {j} holds non-finite values")
            if key == "v" and np.any(array < 0):
                raise ServerOptError(f"the server-optimiser state's 'v': weight {j} holds negative values")


# --- the rules -----------------------------------------------------------------------------------


def fedavgm(
    current: Weights, aggregated: Weights, state: Mapping | None, config: ServerOptConfig
) -> tuple[list[np.ndarray], State]:
    """FedAvgM (Hsu et al. 2019): server SGD with momentum on the pseudo-gradient.

    ``g = x − x̄``, ``m ← β·m + g``, ``x ← x − η·m``, as Flower's ``FedAvgM`` (its first-round
    ``m = g`` is this with the zero initial ``m``). With β = 0 the buffer is not used and stays zero,
    as in Flower; with η = 1 and β = 0 the result is a copy of ``x̄`` (FedAvg), as Flower returns it.
    """
    method, t, m, _ = _begin("fedavgm", current, aggregated, state, config)
    lr, beta = config.server_lr, config.server_momentum
    if lr == 1.0 and beta == 0.0:
        new = [np.array(a, dtype=_dtype(x), copy=True) for a, x in zip(aggregated, current)]
        return new, _state(method, t + 1, _copy(m), [])
    new, new_m = [], []
    for x, a, m_j in zip(current, aggregated, m):
        g = _f64(x) - _f64(a)
        if beta > 0.0:
            g = beta * _f64(m_j) + g
            new_m.append(_cast(g, x))
        else:
            new_m.append(np.array(m_j, copy=True))
        new.append(_cast(_f64(x) - lr * g, x))
    return new, _state(method, t + 1, new_m, [])


def fedadam(
    current: Weights, aggregated: Weights, state: Mapping | None, config: ServerOptConfig
) -> tuple[list[np.ndarray], State]:
    """FedAdam (Reddi et al. 2021, Alg. 2) with Flower's bias-corrected step.

    ``Δ = x̄ − x``, ``m ← β₁m + (1−β₁)Δ``, ``v ← β₂v + (1−β₂)Δ²``,
    ``x ← x + η_t·m/(√v + τ)`` with ``η_t = η·√(1 − β₂^(t+1)) / (1 − β₁^(t+1))`` where ``t`` is the
    step number (1 in the first round). This is Flower's ``eta_norm`` with its exponent
    ``server_round + 1`` (rounds start at 1, so t = server_round while no round is skipped); Kingma &
    Ba's Adam would use the exponent t, and the paper's FedAdam has no bias correction at all.
    Flower computes ``η_t`` in float64, so its new weights are float64; here they are rounded to the
    weights' dtype.
    """
    method, t, m, v = _begin("fedadam", current, aggregated, state, config)
    b1, b2, tau = config.beta_1, config.beta_2, config.tau
    step = t + 1
    eta_t = config.server_lr * math.sqrt(1.0 - b2 ** (step + 1.0)) / (1.0 - b1 ** (step + 1.0))
    return _adaptive(method, step, current, aggregated, m, v, b1, eta_t, tau,
                     lambda v_j, d: b2 * v_j + (1.0 - b2) * d * d)


def fedyogi(
    current: Weights, aggregated: Weights, state: Mapping | None, config: ServerOptConfig
) -> tuple[list[np.ndarray], State]:
    """FedYogi (Reddi et al. 2021, Alg. 2): ``v ← v − (1−β₂)·Δ²·sign(v − Δ²)``, ``x ← x + η·m/(√v + τ)``.

    ``m`` as in FedAdam, no bias correction, zero initial ``v`` (Flower's; the paper asks v ≥ τ²).
    """
    method, t, m, v = _begin("fedyogi", current, aggregated, state, config)
    b2 = config.beta_2
    return _adaptive(method, t + 1, current, aggregated, m, v, config.beta_1, config.server_lr, config.tau,
                     lambda v_j, d: v_j - (1.0 - b2) * d * d * np.sign(v_j - d * d))


def fedadagrad(
    current: Weights, aggregated: Weights, state: Mapping | None, config: ServerOptConfig
) -> tuple[list[np.ndarray], State]:
    """FedAdagrad (Reddi et al. 2021, Alg. 2): ``v ← v + Δ²``, ``x ← x + η·m/(√v + τ)``.

    ``m = Δ`` with the default β₁ = 0, as Flower's FedAdagrad (which fixes β₁ = 0); the paper's
    Algorithm 2 keeps ``m ← β₁m + (1−β₁)Δ`` for FedAdagrad too, which β₁ > 0 gives.
    """
    method, t, m, v = _begin("fedadagrad", current, aggregated, state, config)
    return _adaptive(method, t + 1, current, aggregated, m, v, config.beta_1, config.server_lr, config.tau,
                     lambda v_j, d: v_j + d * d)


@dataclass(frozen=True)
class ServerOptimizer:
    """A named server optimiser and the ``ServerOptConfig`` fields it reads."""

    name: str
    description: str
    fn: Callable[[Weights, Weights, Mapping | None, ServerOptConfig], tuple[list[np.ndarray], State]]
    params: tuple[str, ...]


SERVER_OPTIMIZERS: dict[str, ServerOptimizer] = {
    o.name: o
    for o in (
        ServerOptimizer("fedavgm", "FedAvgM: server SGD with momentum on the average client delta",
                        fedavgm, _USES["fedavgm"]),
        ServerOptimizer("fedadam", "FedAdam: server Adam on the average client delta", fedadam,
                        _USES["fedadam"]),
        ServerOptimizer("fedyogi", "FedYogi: server Yogi on the average client delta", fedyogi,
                        _USES["fedyogi"]),
        ServerOptimizer("fedadagrad", "FedAdagrad: server Adagrad on the average client delta", fedadagrad,
                        _USES["fedadagrad"]),
    )
}


def server_step(
    config: ServerOptConfig, current: Weights, aggregated: Weights, state: Mapping | None = None
) -> tuple[list[np.ndarray], State]:
    """Apply ``config.method`` once: the new global weights and the new state (None: zero state)."""
    return SERVER_OPTIMIZERS[config.method].fn(current, aggregated, state, config)


# --- helpers -------------------------------------------------------------------------------------


def _adaptive(method, step, current, aggregated, m, v, beta_1, eta, tau, update_v):
    """The shared FedOpt step: moments from Δ = x̄ − x, then ``x + eta·m/(√v + tau)``."""
    new, new_m, new_v = [], [], []
    for x, a, m_j, v_j in zip(current, aggregated, m, v):
        delta = _f64(a) - _f64(x)
        m64 = beta_1 * _f64(m_j) + (1.0 - beta_1) * delta
        v64 = update_v(_f64(v_j), delta)
        new.append(_cast(_f64(x) + eta * m64 / (np.sqrt(v64) + tau), x))
        new_m.append(_cast(m64, x))
        new_v.append(_cast(v64, x))
    return new, _state(method, step, new_m, new_v)


def _begin(method: str, current: Weights, aggregated: Weights, state: Mapping | None,
           config: ServerOptConfig) -> tuple[str, int, list, list]:
    """Check the inputs; the step count and moments of ``state`` (zeros if None)."""
    if config.method != method:
        raise ServerOptError(f"{method} was called with a configuration for {config.method}")
    if len(current) == 0:
        raise ServerOptError("the global model has no layers")
    problem = layers_mismatch(list(aggregated), [np.shape(x) for x in current], "the global model", numpy_only=False)
    if problem is not None:
        raise ServerOptError(f"the aggregate: {problem}")
    if state is None:
        state = init_state(method, current)
    else:
        check_state(state, method, current)
    return method, int(state["t"]), list(state["m"]), list(state["v"])


def _state(method: str, t: int, m: list[np.ndarray], v: list[np.ndarray]) -> State:
    return {"method": method, "t": int(t), "m": m, "v": v}


def _dtype(w) -> np.dtype:
    """The weights' floating dtype (float32 for non-float input)."""
    dtype = np.asarray(w).dtype
    return dtype if np.issubdtype(dtype, np.floating) else np.dtype(np.float32)


def _f64(a) -> np.ndarray:
    return np.asarray(a, dtype=np.float64)


def _cast(value: np.ndarray, like) -> np.ndarray:
    """``value`` as a fresh array in ``like``'s floating dtype."""
    return np.array(value, dtype=_dtype(like), copy=True)


def _copy(arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
    return [np.array(a, copy=True) for a in arrays]
