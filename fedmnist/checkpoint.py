"""Checkpoints of a multi-round run: the ``ServerState`` after each round, saved and validated strictly.

A checkpoint is plain data (builtins and numpy arrays) read back with the restricted unpickler; before
a run resumes from it, it is checked as strictly as a client update: the format, the configuration
and data it was written for, the round count against the history, every method's weights (the CNN's
float32 shapes, finite) and the records' fields. Anything else is a ``ConfigError`` naming the file.
"""

from __future__ import annotations

import math
import pickle
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fedmnist.errors import ConfigError, FedMnistError, ValidationError
from fedmnist.io import atomic_write_bytes
from fedmnist.server import RejectedReply, RoundRecord, ServerState, check_weights

if TYPE_CHECKING:
    from fedmnist.simulation import SimulationConfig

CHECKPOINT_FORMAT = "fedmnist-simulation-checkpoint"
CHECKPOINT_VERSION = 2


def save_checkpoint(path: Path, config: SimulationConfig, data_sha256: str, state: ServerState,
                    malicious: list[int]) -> None:
    """Write ``state`` as plain data (builtins and numpy arrays), atomically."""
    atomic_write_bytes(path, checkpoint_bytes(config, data_sha256, state, malicious))


def checkpoint_bytes(config: SimulationConfig, data_sha256: str, state: ServerState, malicious: list[int]) -> bytes:
    """The checkpoint of ``state``: a pickle of plain data (builtins and numpy arrays)."""
    payload = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "config_sha256": config.sha256(),
        "config": config.to_dict(),
        "data_sha256": data_sha256,
        "completed_rounds": int(state.round),
        "malicious_clients": [int(k) for k in malicious],
        "weights": {m: [np.ascontiguousarray(w, dtype=np.float32) for w in ws] for m, ws in state.weights.items()},
        "method_state": state.method_state,
        "client_state": {m: {int(k): [np.ascontiguousarray(c) for c in cs] for k, cs in clients.items()}
                         for m, clients in state.client_state.items()},
        "metrics": [asdict(r) for r in state.history],
    }
    return pickle.dumps(payload, protocol=4)


def load_checkpoint(path: Path, config: SimulationConfig, data_sha256: str) -> ServerState:
    """Read and validate a checkpoint of ``config`` on the data hashed ``data_sha256``.

    Raises
    ------
    ConfigError
        Not a checkpoint, written for another configuration, data or a longer run, or inconsistent
        (wrong types, non-finite or misshapen weights, round counts that disagree with the history).
    """
    from fedmnist.exchange import checkpoint_limits, safe_load_pickle
    from fedmnist.methods import DRIFT_CORRECTED

    # weights and up to two moment sets per method, one control per client for SCAFFOLD
    copies = 3 * len(config.method.methods) + 2 + config.federation.num_clients * sum(
        m in DRIFT_CORRECTED for m in config.method.methods)
    try:
        state = safe_load_pickle(path, checkpoint_limits(copies))
    except FedMnistError as exc:
        raise ConfigError(f"cannot resume: {exc}") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ConfigError(f"{path}: not a fedmnist simulation checkpoint")
    if state.get("version") != CHECKPOINT_VERSION:
        raise ConfigError(f"{path}: unsupported checkpoint version {state.get('version')!r}")
    if state.get("config_sha256") != config.sha256():
        raise ConfigError(
            f"{path} was written by a different configuration ({_config_diff(state.get('config'), config)}); "
            "rerun with the same settings, drop --resume to start afresh, or use another --out"
        )
    if state.get("data_sha256") != data_sha256:
        raise ConfigError(f"{path} was written for different MNIST data; use the same --data or another --out")
    done = state.get("completed_rounds")
    if isinstance(done, bool) or not isinstance(done, int) or done < 0:
        raise ConfigError(f"{path}: completed_rounds must be an integer >= 0 (got {done!r})")
    if done > config.rounds:
        raise ConfigError(f"{path} already holds {done} rounds, more than the {config.rounds} requested; "
                          f"ask for --rounds {done} or more")
    methods = list(config.method.methods)
    weights, method_state = state.get("weights"), state.get("method_state")
    if not isinstance(weights, dict) or sorted(weights) != sorted(methods):
        raise ConfigError(f"{path}: does not hold global weights for exactly {', '.join(methods)}")
    if not isinstance(method_state, dict) or sorted(method_state) != sorted(methods) \
            or not all(isinstance(v, dict) for v in method_state.values()):
        raise ConfigError(f"{path}: does not hold a server state for exactly {', '.join(methods)}")
    from fedmnist.simulation import run_methods

    built = {m.name: m for m in run_methods(config)}
    for method, arrays in weights.items():
        try:
            check_weights(arrays, f"{path}: global weights of {method}")
            built[method].check_state(method_state[method], arrays)
        except (RejectedReply, ValidationError) as exc:
            raise ConfigError(f"{path}: {exc}") from None
    client_state = _client_state(path, state.get("client_state", {}), built, weights,
                                 config.federation.num_clients)
    history = _records(path, state.get("metrics"), methods)
    for method in methods:
        rows = [r for r in history if r.method == method]
        rounds = [r.round for r in rows]
        if rounds != list(range(1, done + 1)):
            raise ConfigError(f"{path}: {method}'s records cover rounds {rounds[:3]}…, not 1..{done}: "
                              "an inconsistent or tampered checkpoint")
        releases = method_state[method].get("releases") if config.privacy is not None else None
        if releases is not None and releases != sum(r.num_replies > 0 for r in rows):
            raise ConfigError(f"{path}: {method}'s privacy state counts {releases!r} noised rounds, but its "
                              "records show another number: an inconsistent or tampered checkpoint")
    return ServerState(done, {m: list(weights[m]) for m in methods}, {m: method_state[m] for m in methods},
                       history, client_state)


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
                raise ConfigError(f"{path}: {method}'s client state names client {client_id!r}, not one of 1..{num_clients}")
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


def _config_diff(stored, config: SimulationConfig) -> str:
    from fedmnist.simulation import RESUMABLE_FIELDS

    if not isinstance(stored, dict):
        return "unknown differences"
    current = config.to_dict()
    diff = []
    for key, value in current.items():
        if key in RESUMABLE_FIELDS or stored.get(key) == value:
            continue
        if isinstance(value, dict) and isinstance(stored.get(key), dict):
            diff += [f"{key}.{k}: {stored[key].get(k)!r} -> {v!r}" for k, v in value.items()
                     if stored[key].get(k) != v]
        else:
            diff.append(f"{key}: {stored.get(key)!r} -> {value!r}")
    return "; ".join(diff) or "unknown differences"
