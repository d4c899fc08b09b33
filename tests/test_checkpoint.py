"""Tests of fedmnist.checkpoint: settings that must match (named when they differ) and the integrity hash."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from fedmnist.checkpoint import (
    CHECKPOINT_FILE,
    CheckpointSpec,
    flat_settings,
    load_checkpoint,
    load_state,
    save_checkpoint,
    state_bytes,
)
from fedmnist.errors import ConfigError
from fedmnist.methods import MethodConfig, build_methods
from fedmnist.server import ServerState
from fedmnist.simulation import SimulationConfig

SEED = 42
DATA = "d" * 64


@pytest.fixture(scope="module")
def weights() -> list[np.ndarray]:
    from fedmnist.model import weight_spec

    rng = np.random.default_rng(1)
    return [rng.normal(0, 0.05, shape).astype(np.float32) for _, shape, _ in weight_spec()]


def _written(tmp_path, spec: CheckpointSpec, weights) -> tuple:
    state = ServerState.initial(spec.methods, weights)
    path = tmp_path / CHECKPOINT_FILE
    path.write_bytes(state_bytes(spec, state))
    return path, state


def test_flat_settings_name_nested_keys_with_dots():
    assert flat_settings({"a": 1, "method": {"mu": 0.1, "methods": ("x", "y")}, "privacy": None, "e": {}}) == {
        "a": 1, "method.mu": 0.1, "method.methods": ["x", "y"], "privacy": None, "e": {}}


def test_a_checkpoint_of_another_configuration_is_refused_naming_the_key(tmp_path, weights):
    methods = tuple(build_methods(MethodConfig(("fedavg",))))
    spec = CheckpointSpec({"seed": SEED, "learning-rate": 0.05, "num-server-rounds": 3}, DATA, methods, 3,
                          frozenset({"num-server-rounds"}))
    path, _ = _written(tmp_path, spec, weights)

    with pytest.raises(ConfigError, match=r"different configuration \(learning-rate: 0\.05 -> 0\.1; seed: 42 -> 7\)"):
        load_state(path, CheckpointSpec({**spec.settings, "learning-rate": 0.1, "seed": 7}, DATA, methods, 3,
                                         spec.resumable))
    with pytest.raises(ConfigError, match=r"different configuration \(extra: None -> 1\)"):
        load_state(path, CheckpointSpec({**spec.settings, "extra": 1}, DATA, methods, 3, spec.resumable))
    with pytest.raises(ConfigError, match="different data"):
        load_state(path, CheckpointSpec(spec.settings, "e" * 64, methods, 3, spec.resumable))
    # a resumable key may change
    longer = CheckpointSpec({**spec.settings, "num-server-rounds": 9}, DATA, methods, 9, spec.resumable)
    assert load_state(path, longer).round == 0


def test_the_simulations_checkpoint_names_the_setting_that_differs(tmp_path, weights):
    config = SimulationConfig.create(num_clients=4, methods=("fedavg",), rounds=3, seed=SEED)
    path = tmp_path / CHECKPOINT_FILE
    save_checkpoint(path, config, DATA, ServerState.initial(build_methods(config.method), weights), [])

    with pytest.raises(ConfigError, match=r"\(seed: 42 -> 7\); rerun with the same settings"):
        load_checkpoint(path, config.replace(seed=7), DATA)
    assert load_checkpoint(path, config.replace(rounds=8, stop_at_target=True), DATA).round == 0


@pytest.mark.parametrize("edit", ["zeroed weights", "edited accuracy", "edited extra"])
def test_an_edited_checkpoint_is_refused_by_its_integrity_hash(tmp_path, weights, edit):
    # Prepare: a one-round checkpoint whose every field stays well-formed after the edit
    config = SimulationConfig.create(num_clients=4, methods=("fedavg",), rounds=3, seed=SEED)
    from fedmnist.server import RoundRecord

    record = RoundRecord(1, "fedavg", 0.5, 1.0, 1.2, 1.0, 0.5, 0.1, 1.1, 0.0, 4, 4, [1, 2, 3, 4], [1, 2, 3, 4],
                         [], [], [], [], "a" * 16)
    state = ServerState(1, {"fedavg": list(weights)}, {"fedavg": {}}, [record])
    path = tmp_path / CHECKPOINT_FILE
    save_checkpoint(path, config, DATA, state, [])
    assert load_checkpoint(path, config, DATA).round == 1
    payload = pickle.loads(path.read_bytes())
    if edit == "zeroed weights":
        for w in payload["weights"]["fedavg"]:
            w[...] = 0.0
    elif edit == "edited accuracy":
        payload["metrics"][0]["test_accuracy"] = 0.99
    else:
        payload["extra"]["malicious_clients"] = [3]
    path.write_bytes(pickle.dumps(payload, protocol=4))

    # Execute / Assert: one line naming the file
    with pytest.raises(ConfigError) as refused:
        load_checkpoint(path, config, DATA)
    message = str(refused.value)
    assert message.startswith(str(path)) and "integrity hash does not match" in message and "\n" not in message


def test_the_integrity_hash_does_not_stop_whoever_rewrites_it(tmp_path, weights):
    """What the README says: the hash catches accidents and careless edits, not a rewritten hash."""
    from fedmnist.exchange import state_sha256

    config = SimulationConfig.create(num_clients=4, methods=("fedavg",), rounds=3, seed=SEED)
    path = tmp_path / CHECKPOINT_FILE
    save_checkpoint(path, config, DATA, ServerState.initial(build_methods(config.method), weights), [])
    payload = pickle.loads(path.read_bytes())
    payload["weights"]["fedavg"][0][...] = 0.0
    payload["state_sha256"] = state_sha256({k: v for k, v in payload.items() if k != "state_sha256"})
    path.write_bytes(pickle.dumps(payload, protocol=4))

    assert not load_checkpoint(path, config, DATA).weights["fedavg"][0].any()


def test_damaged_settings_are_named_on_one_line(tmp_path, weights):
    methods = tuple(build_methods(MethodConfig(("fedavg",))))
    spec = CheckpointSpec({"seed": SEED}, DATA, methods, 3)
    path, _ = _written(tmp_path, spec, weights)
    payload = pickle.loads(path.read_bytes())
    payload["settings"] = {"seed": np.arange(300).reshape(30, 10), 5: "x\ny"}
    payload["settings_sha256"] = np.zeros(4)
    path.write_bytes(pickle.dumps(payload, protocol=4))

    with pytest.raises(ConfigError) as refused:
        load_state(path, spec)
    message = str(refused.value)
    assert "\n" not in message and "5: 'x\\ny' -> None" in message and "seed: array(" in message
