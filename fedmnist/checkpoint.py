"""Checkpoints of a multi-round run: the ``ServerState`` after each round, saved and validated strictly.

One format serves every multi-round mode (the simulation and the Flower ServerApp). A checkpoint is
plain data (builtins and numpy arrays) read back with the restricted unpickler: the server state
(every method's global weights and state — server-optimiser moments, SCAFFOLD's ``c``, DP-FedAvg's
clip and releases —, the simulated clients' state, the history), the run's settings as a flat dict
(``CheckpointSpec.settings``), the hash of the data it ran on, and an integrity hash of all of it
(``fedmnist.exchange.state_sha256``, as the round files carry).

Before a run resumes from it, it is checked as strictly as a client update: the format, every
setting against the run's (a few, ``CheckpointSpec.resumable``, may change — the number of rounds,
say — the others are named when they differ), the data, the round count against the history,
every method's weights (the CNN's float32 shapes, finite) and state, the records' fields, and last
the integrity hash, so a checkpoint whose weights were zeroed or edited is refused. That hash guards
against accidents and careless edits, not against someone who rewrites the hash as well. Anything
else is a ``ConfigError`` naming the file.
"""

from __future__ import annotations

import hashlib
import json
import math
import pickle
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fedmnist.errors import ConfigError, FedMnistError, ValidationError
from fedmnist.io import atomic_write_bytes
from fedmnist.server import RejectedReply, RoundRecord, ServerState, check_weights

if TYPE_CHECKING:
    from fedmnist.methods import Method
    from fedmnist.simulation import SimulationConfig

CHECKPOINT_FILE = "checkpoint.pkl"
CHECKPOINT_FORMAT = "fedmnist-checkpoint"
CHECKPOINT_VERSION = 3
_SHA_KEY = "state_sha256"


def flat_settings(values: Mapping, prefix: str = "") -> dict:
    """Nested settings as one level of dotted keys (``{"method": {"mu": 0.1}}`` -> ``{"method.mu": 0.1}``)."""
    out = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flat_settings(value, f"{name}."))
        else:
            out[name] = list(value) if isinstance(value, tuple) else value
    return out


@dataclass(frozen=True)
class CheckpointSpec:
    """What a checkpoint of one run must match: its settings, its data, its methods and bounds.

    ``settings`` is flat (``flat_settings``), JSON-able; the keys in ``resumable`` may differ on
    resume (they do not change the rounds already completed). ``max_rounds`` is the rounds the
    resuming run asks for; ``num_clients`` bounds the client ids of the simulated clients' state
    (0: the mode keeps none). ``extra`` is stored beside the state, unchecked (e.g. the malicious clients).
    """

    settings: dict
    data_sha256: str
    methods: tuple[Method, ...]
    max_rounds: int
    resumable: frozenset[str] = frozenset()
    num_clients: int = 0
    extra: dict = field(default_factory=dict)
    data_label: str = "data"

    def settings_sha256(self) -> str:
        """Hash of every setting that affects the completed rounds (all but ``resumable``)."""
        kept = {k: v for k, v in self.settings.items() if k not in self.resumable}
        return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()

    def differences(self, stored: object) -> list[str]:
        """``key: stored -> current`` for every non-resumable setting that differs from ``stored``."""
        if not isinstance(stored, dict):
            return ["the stored settings are unreadable"]
        keys = sorted((set(stored) | set(self.settings)) - set(self.resumable), key=repr)
        return [f"{key if key in self.settings else _short(key)}: {_short(stored.get(key))} -> "
                f"{_short(self.settings.get(key))}" for key in keys if not _same(stored.get(key), self.settings.get(key))]

    def model_copies(self) -> int:
        """Model copies a checkpoint of this run may hold: weights and up to two moment sets per
        method, SCAFFOLD's server control, and one control per simulated client of a SCAFFOLD method."""
        from fedmnist.methods import DRIFT_CORRECTED

        scaffold = sum(m.name in DRIFT_CORRECTED for m in self.methods)
        return 3 * len(self.methods) + 2 + self.num_clients * scaffold


def _short(value) -> str:
    """``repr(value)`` on one line of at most 80 characters (values may come from a damaged file)."""
    text = repr(value).replace("\n", " ")
    return text if len(text) <= 80 else text[:77] + "..."


def _same(stored, current) -> bool:
    """Whether a stored value equals ours; False for values that do not compare plainly (arrays)."""
    try:
        return type(stored) is type(current) and bool(stored == current)
    except (TypeError, ValueError):
        return False


def state_payload(spec: CheckpointSpec, state: ServerState) -> dict:
    """The checkpoint's plain data (builtins and numpy arrays), with its integrity hash."""
    from fedmnist.exchange import state_sha256

    payload = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "settings_sha256": spec.settings_sha256(),
        "settings": dict(spec.settings),
        "data_sha256": spec.data_sha256,
        "completed_rounds": int(state.round),
        "extra": dict(spec.extra),
        "weights": {m: [np.ascontiguousarray(w, dtype=np.float32) for w in ws] for m, ws in state.weights.items()},
        "method_state": state.method_state,
        "client_state": {m: {int(k): [np.ascontiguousarray(c) for c in cs] for k, cs in clients.items()}
                         for m, clients in state.client_state.items()},
        "metrics": [asdict(r) for r in state.history],
    }
    payload[_SHA_KEY] = state_sha256(payload)
    return payload


def state_bytes(spec: CheckpointSpec, state: ServerState) -> bytes:
    """The checkpoint of ``state``: a pickle of ``state_payload``."""
    return pickle.dumps(state_payload(spec, state), protocol=4)


def read_checkpoint(path: Path, model_copies: int) -> dict:
    """The payload of checkpoint ``path``, read with the bounded safe unpickler (format and version checked).

    Its contents are checked by ``restore_state``; read it alone to look at a stored setting first
    (Flower's DP federation size).
    """
    from fedmnist.exchange import checkpoint_limits, safe_load_pickle

    try:
        payload = safe_load_pickle(path, checkpoint_limits(max(1, model_copies)))
    except FedMnistError as exc:
        raise ConfigError(f"cannot resume: {exc}") from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise ConfigError(f"{path}: not a fedmnist checkpoint")
    if payload.get("version") != CHECKPOINT_VERSION:
        raise ConfigError(f"{path}: unsupported checkpoint version {_short(payload.get('version'))}")
    return payload


def restore_state(path: Path, payload: dict, spec: CheckpointSpec, hint: str = "") -> ServerState:
    """The ``ServerState`` a checkpoint's ``payload`` holds, after checking it against ``spec``.

    ``hint`` ends the message refusing another configuration (how to start afresh in this mode).

    Raises
    ------
    ConfigError
        Written for other settings (naming the keys that differ), other data or a longer run, or
        inconsistent (wrong types, non-finite or misshapen weights, round counts that disagree with
        the history, an integrity hash that does not match the contents).
    """
    from fedmnist.exchange import state_sha256
    from fedmnist.methods import DPMethod

    if not _same(payload.get("settings_sha256"), spec.settings_sha256()):
        raise ConfigError(f"{path} was written by a different configuration "
                          f"({'; '.join(spec.differences(payload.get('settings'))) or 'unknown differences'})"
                          + (f"; {hint}" if hint else ""))
    if not _same(payload.get("data_sha256"), spec.data_sha256):
        raise ConfigError(f"{path} was written for different {spec.data_label}; use the same data or another "
                          "output directory")
    done = payload.get("completed_rounds")
    if isinstance(done, bool) or not isinstance(done, int) or done < 0:
        raise ConfigError(f"{path}: completed_rounds must be an integer >= 0 (got {_short(done)})")
    if done > spec.max_rounds:
        raise ConfigError(f"{path} already holds {done} rounds, more than the {spec.max_rounds} requested; "
                          f"ask for {done} rounds or more")
    methods = [m.name for m in spec.methods]
    weights, method_state = payload.get("weights"), payload.get("method_state")
    if not isinstance(weights, dict) or sorted(weights) != sorted(methods):
        raise ConfigError(f"{path}: does not hold global weights for exactly {', '.join(methods)}")
    if not isinstance(method_state, dict) or sorted(method_state) != sorted(methods) \
            or not all(isinstance(v, dict) for v in method_state.values()):
        raise ConfigError(f"{path}: does not hold a server state for exactly {', '.join(methods)}")
    built = {m.name: m for m in spec.methods}
    for method, arrays in weights.items():
        try:
            check_weights(arrays, f"{path}: global weights of {method}")
            built[method].check_state(method_state[method], arrays)
        except (RejectedReply, ValidationError) as exc:
            raise ConfigError(f"{path}: {exc}") from None
    client_state = _client_state(path, payload.get("client_state", {}), built, weights, spec.num_clients)
    history = _records(path, payload.get("metrics"), methods)
    for method in methods:
        rows = [r for r in history if r.method == method]
        rounds = [r.round for r in rows]
        if rounds != list(range(1, done + 1)):
            raise ConfigError(f"{path}: {method}'s records cover rounds {rounds[:3]}…, not 1..{done}: "
                              "an inconsistent or tampered checkpoint")
        releases = method_state[method].get("releases") if isinstance(built[method], DPMethod) else None
        # every DP round is one release charged to ε, with or without usable replies (Method.empty_round)
        if releases is not None and releases != done:
            raise ConfigError(f"{path}: {method}'s privacy state counts {_short(releases)} noised rounds, not the "
                              f"{done} completed: every round of DP-FedAvg is charged to epsilon, so this "
                              "checkpoint is inconsistent, tampered with, or from a version that did not charge "
                              "rounds without replies (resuming it would under-count epsilon)")
    stored = payload.get(_SHA_KEY)
    if not isinstance(stored, str) or state_sha256({k: v for k, v in payload.items() if k != _SHA_KEY}) != stored:
        raise ConfigError(f"{path}: the integrity hash does not match the contents (weights, state or history "
                          "were changed after the run wrote it): a corrupted or edited checkpoint")
    return ServerState(done, {m: list(weights[m]) for m in methods}, {m: method_state[m] for m in methods},
                       history, client_state)


def load_state(path: Path, spec: CheckpointSpec, hint: str = "") -> ServerState:
    """``read_checkpoint`` then ``restore_state``: the checked ``ServerState`` of checkpoint ``path``."""
    return restore_state(path, read_checkpoint(path, spec.model_copies()), spec, hint)


def _client_state(path: Path, stored, methods: dict, weights: dict, num_clients: int) -> dict:
    """The simulated clients' SCAFFOLD controls, checked: methods that keep them, ids 1..K, arrays like the weights."""
    from fedmnist.methods import DRIFT_CORRECTED
    from fedmnist.scaffold import ScaffoldError, check_controls

    if not isinstance(stored, dict) or not set(stored) <= {m for m in methods if m in DRIFT_CORRECTED}:
        raise ConfigError(f"{path}: client state must map SCAFFOLD methods to their clients' control variates")
    out = {}
    for method, clients in stored.items():
        if not isinstance(clients, dict):
            raise ConfigError(f"{path}: {method}'s client state is not a mapping of client ids")
        out[method] = {}
        for client_id, controls in clients.items():
            if isinstance(client_id, bool) or not isinstance(client_id, int) or not 1 <= client_id <= num_clients:
                raise ConfigError(f"{path}: {method}'s client state names client {_short(client_id)}, not one of 1..{num_clients}")
            try:
                check_controls(controls, weights[method], f"{method}'s control variate of client {client_id}")
            except ScaffoldError as exc:
                raise ConfigError(f"{path}: {exc}") from None
            out[method][client_id] = list(controls)
    return out


def _records(path: Path, rows, methods: list[str]) -> list[RoundRecord]:
    if not isinstance(rows, list):
        raise ConfigError(f"{path}: malformed metrics in the checkpoint")
    records = []
    for row in rows:
        try:
            if not isinstance(row, dict):
                raise TypeError("a record is not a dict")
            record = RoundRecord.from_dict(row)
        except (KeyError, TypeError) as exc:
            raise ConfigError(f"{path}: malformed metrics in the checkpoint ({exc})") from None
        problem = _record_problem(record, methods)
        if problem:
            raise ConfigError(f"{path}: malformed record in the checkpoint: {problem}")
        records.append(record)
    return records


def _record_problem(record: RoundRecord, methods: list[str]) -> str | None:
    """What is wrong with a checkpoint's record (types and ranges of every field), or None."""

    def number(value, low=0.0, high=math.inf, optional=True) -> bool:
        if value is None:
            return optional
        return isinstance(value, (int, float)) and not isinstance(value, bool) and (
            math.isnan(value) or low <= value <= high)

    def ints(values) -> bool:
        return isinstance(values, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in values)

    def texts(values) -> bool:
        return isinstance(values, list) and all(isinstance(v, str) for v in values)

    if record.method not in methods:
        return f"unknown method {str(record.method)[:40]!r}"
    if isinstance(record.round, bool) or not isinstance(record.round, int) or record.round < 1:
        return f"round {record.round!r}"
    if not number(record.test_accuracy, 0.0, 1.0):
        return f"test_accuracy {record.test_accuracy!r}"
    for key in ("test_loss", "train_loss", "seconds", "train_seconds", "eval_seconds", "round_seconds", "mu",
                "epsilon", "delta"):
        if not number(getattr(record, key), optional=key in ("test_loss", "train_loss", "epsilon", "delta")):
            return f"{key} {getattr(record, key)!r}"
    for key in ("num_sampled", "num_replies"):
        value = getattr(record, key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            return f"{key} {value!r}"
    for key in ("sampled_clients", "replied_clients", "malicious_sampled", "sampled_nodes"):
        if not ints(getattr(record, key)):
            return f"{key} must be a list of integers"
    for key in ("failed", "notes"):
        if not texts(getattr(record, key)):
            return f"{key} must be a list of strings"
    if not isinstance(record.start_sha256, str):
        return "start_sha256 must be a string"
    return None


# --- the simulation's checkpoint ------------------------------------------------------------------


def simulation_spec(config: SimulationConfig, data_sha256: str, malicious: Sequence[int] = ()) -> CheckpointSpec:
    """The ``CheckpointSpec`` of a simulation: its settings (``RESUMABLE_FIELDS`` and the target ε may
    change on resume), the federation's data hash, its methods and clients."""
    from fedmnist.simulation import RESUMABLE_FIELDS, run_methods

    return CheckpointSpec(flat_settings(config.to_dict()), data_sha256, tuple(run_methods(config)), config.rounds,
                          frozenset((*RESUMABLE_FIELDS, "privacy.target_epsilon")), config.federation.num_clients,
                          {"malicious_clients": [int(k) for k in malicious]}, "MNIST data")


def checkpoint_bytes(config: SimulationConfig, data_sha256: str, state: ServerState,
                     malicious: Sequence[int]) -> bytes:
    """The checkpoint of a simulation's ``state``."""
    return state_bytes(simulation_spec(config, data_sha256, malicious), state)


def save_checkpoint(path: Path, config: SimulationConfig, data_sha256: str, state: ServerState,
                    malicious: Sequence[int]) -> None:
    """Write a simulation's ``state`` as a checkpoint, atomically."""
    atomic_write_bytes(path, checkpoint_bytes(config, data_sha256, state, malicious))


def load_checkpoint(path: Path, config: SimulationConfig, data_sha256: str) -> ServerState:
    """Read and validate a checkpoint of simulation ``config`` on the data hashed ``data_sha256``.

    Raises
    ------
    ConfigError
        Not a checkpoint, written for another configuration, data or a longer run, inconsistent or edited.
    """
    return load_state(Path(path), simulation_spec(config, data_sha256),
                      "rerun with the same settings, drop --resume to start afresh, or use another --out")
