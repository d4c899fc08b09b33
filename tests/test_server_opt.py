"""Tests for fedmnist.server_opt: hand-computed steps, configuration and state checks, input safety,
resuming from a saved state, and equality with Flower 1.42's FedAvgM/FedAdam/FedYogi/FedAdagrad driven
through ``configure_train``/``aggregate_train`` over several rounds."""

import copy
import dataclasses
import math
import pickle

import numpy as np
import pytest

from fedmnist import server_opt
from fedmnist.errors import ValidationError
from fedmnist.exchange import safe_load_pickle
from fedmnist.server_opt import (
    SERVER_OPTIMIZERS,
    ServerOptConfig,
    ServerOptError,
    check_state,
    fedadagrad,
    fedadam,
    fedavgm,
    fedyogi,
    init_state,
    server_step,
)
from fedmnist.strategies import weighted_average

METHODS = ["fedavgm", "fedadam", "fedyogi", "fedadagrad"]
SHAPES = [(3, 4), (4,), ()]


def f32(*values):
    return np.array(values, dtype=np.float32)


def random_weights(rng, shapes=SHAPES, scale=1.0):
    return [np.array(rng.normal(scale=scale, size=shape), dtype=np.float32) for shape in shapes]


def client_round(rng, current, num_clients=5):
    """The clients' (weights, num_examples): the global model plus a client-specific move."""
    shift = np.float32(rng.normal(scale=0.05))  # a common direction, so momentum has something to follow
    return [
        ([np.array(w + shift + rng.normal(scale=0.1, size=w.shape), dtype=np.float32) for w in current],
         int(rng.integers(1, 60)))
        for _ in range(num_clients)
    ]


def assert_close(ours, theirs, rtol=1e-5, atol=1e-6):
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        assert a.shape == np.shape(b)
        np.testing.assert_allclose(a, b, rtol=rtol, atol=atol)


def assert_identical(a, b):
    assert len(a) == len(b)
    for u, v in zip(a, b):
        assert u.dtype == v.dtype and u.shape == v.shape
        assert np.array_equal(u, v)


# --- hand-computed steps ---------------------------------------------------------------------------


def test_fedavgm_by_hand_over_two_rounds():
    # Prepare: x = [1, 2]; the clients move it to [0, 4], then (from the new x) by +[1, 1]
    config = ServerOptConfig("fedavgm", server_lr=0.5, server_momentum=0.9)
    x0 = [f32(1, 2)]

    # Execute
    x1, s1 = fedavgm(x0, [f32(0, 4)], None, config)
    x2, s2 = fedavgm(x1, [x1[0] + f32(1, 1)], s1, config)

    # Assert: g1 = x - x̄ = [1, -2], m1 = g1, x1 = [1, 2] - 0.5*[1, -2] = [0.5, 3]
    np.testing.assert_allclose(x1[0], [0.5, 3.0])
    np.testing.assert_allclose(s1["m"][0], [1.0, -2.0])
    # g2 = [-1, -1], m2 = 0.9*[1, -2] + [-1, -1] = [-0.1, -2.8], x2 = [0.5, 3] - 0.5*m2 = [0.55, 4.4]
    np.testing.assert_allclose(s2["m"][0], [-0.1, -2.8], rtol=1e-6)
    np.testing.assert_allclose(x2[0], [0.55, 4.4], rtol=1e-6)
    assert (s1["t"], s2["t"]) == (1, 2)
    assert s2["v"] == [] and s2["method"] == "fedavgm"


def test_fedavgm_with_unit_rate_and_no_momentum_is_fedavg_exactly():
    config = ServerOptConfig("fedavgm", server_lr=1.0, server_momentum=0.0)
    aggregated = [f32(0.1, 0.2, 0.3), np.array(7.0, np.float32)]

    new, state = fedavgm([f32(5, 5, 5), np.array(1.0, np.float32)], aggregated, None, config)

    assert_identical(new, aggregated)
    assert not any(np.shares_memory(a, b) for a, b in zip(new, aggregated))
    assert all(not m.any() for m in state["m"])


def test_fedavgm_without_momentum_is_a_scaled_fedavg_step():
    config = ServerOptConfig("fedavgm", server_lr=2.0, server_momentum=0.0)

    new, state = fedavgm([f32(1, 1)], [f32(2, 0)], None, config)

    np.testing.assert_allclose(new[0], [3.0, -1.0])
    assert not state["m"][0].any()


@pytest.mark.parametrize(("lr", "beta"), [(1.0, 0.7), (0.5, 0.9), (1.0, 0.0)])
def test_fedavgm_steady_step_is_lr_over_one_minus_momentum(lr, beta):
    # Every round the clients move the model by the same +1: the server's step tends to lr/(1 − beta)
    config = ServerOptConfig("fedavgm", server_lr=lr, server_momentum=beta)
    x, state, steps = [np.zeros(1, np.float64)], None, []
    for _ in range(200):
        new, state = fedavgm(x, [x[0] + 1.0], state, config)
        steps.append(float(new[0][0] - x[0][0]))
        x = new

    assert steps[0] == pytest.approx(lr)
    assert steps[-1] == pytest.approx(lr / (1.0 - beta), rel=1e-6)


def test_fedadam_first_step_by_hand():
    # Prepare: Δ = [1, -2]; m = 0.1Δ, v = 0.01Δ², η_1 = η·sqrt(1 - 0.99²) / (1 - 0.9²)  (Flower's exponent 2)
    config = ServerOptConfig("fedadam", server_lr=0.1, beta_1=0.9, beta_2=0.99, tau=1e-3)
    eta_1 = 0.1 * math.sqrt(1 - 0.99**2) / (1 - 0.9**2)
    delta = np.array([1.0, -2.0])

    # Execute
    new, state = fedadam([f32(0, 0)], [f32(1, -2)], None, config)

    # Assert
    np.testing.assert_allclose(state["m"][0], 0.1 * delta, rtol=1e-6)
    np.testing.assert_allclose(state["v"][0], 0.01 * delta**2, rtol=1e-6)
    np.testing.assert_allclose(new[0], eta_1 * 0.1 * delta / (0.1 * np.abs(delta) + 1e-3), rtol=1e-6)
    assert state["t"] == 1


def test_fedadam_second_step_uses_exponent_three():
    config = ServerOptConfig("fedadam", server_lr=0.1, beta_1=0.5, beta_2=0.9, tau=0.01)
    x1, s1 = fedadam([f32(0.0)], [f32(1.0)], None, config)

    x2, s2 = fedadam(x1, [x1[0] + f32(1.0)], s1, config)

    m2 = 0.5 * 0.5 + 0.5 * 1.0
    v2 = 0.9 * 0.1 + 0.1 * 1.0
    eta_2 = 0.1 * math.sqrt(1 - 0.9**3) / (1 - 0.5**3)
    np.testing.assert_allclose(x2[0], x1[0] + eta_2 * m2 / (math.sqrt(v2) + 0.01), rtol=1e-6)
    assert s2["t"] == 2


def test_fedyogi_by_hand_over_two_rounds():
    # Prepare
    config = ServerOptConfig("fedyogi", server_lr=0.1, beta_1=0.5, beta_2=0.9, tau=0.01)

    # Execute: Δ1 = 2 (v grows from 0), then Δ2 = 0.1 with v1 > Δ2² (v shrinks)
    x1, s1 = fedyogi([f32(0.0)], [f32(2.0)], None, config)
    x2, s2 = fedyogi(x1, [x1[0] + f32(0.1)], s1, config)

    # Assert: v1 = 0 - 0.1*4*sign(0 - 4) = 0.4, m1 = 1; v2 = 0.4 - 0.1*0.01*sign(0.4 - 0.01) = 0.399
    np.testing.assert_allclose(s1["v"][0], 0.4, rtol=1e-6)
    np.testing.assert_allclose(x1[0], 0.1 * 1.0 / (math.sqrt(0.4) + 0.01), rtol=1e-6)
    m2 = 0.5 * 1.0 + 0.5 * 0.1
    np.testing.assert_allclose(s2["v"][0], 0.399, rtol=1e-6)
    np.testing.assert_allclose(x2[0] - x1[0], 0.1 * m2 / (math.sqrt(0.399) + 0.01), rtol=1e-5)


def test_fedadagrad_accumulates_squares():
    config = ServerOptConfig("fedadagrad", server_lr=0.1, tau=0.01)
    x1, s1 = fedadagrad([f32(0.0, 0.0)], [f32(3.0, 0.0)], None, config)

    x2, s2 = fedadagrad(x1, [x1[0] + f32(4.0, 0.0)], s1, config)

    np.testing.assert_allclose(s2["v"][0], [25.0, 0.0])
    np.testing.assert_allclose(s2["m"][0], [4.0, 0.0])  # β₁ = 0: m = Δ
    np.testing.assert_allclose(x2[0] - x1[0], [0.1 * 4.0 / (5.0 + 0.01), 0.0], rtol=1e-6)


def test_fedadagrad_with_momentum_as_in_the_paper():
    config = ServerOptConfig("fedadagrad", server_lr=1.0, beta_1=0.5, tau=0.5)

    new, state = fedadagrad([f32(0.0)], [f32(2.0)], None, config)

    np.testing.assert_allclose(state["m"][0], 1.0)
    np.testing.assert_allclose(new[0], 1.0 / (2.0 + 0.5))


def test_adaptive_step_is_bounded_by_the_server_rate():
    # |m|/sqrt(v) <= 1 for FedAdagrad with β₁ = 0: a huge delta moves x by less than η
    config = ServerOptConfig("fedadagrad", server_lr=0.1)

    new, _ = fedadagrad([f32(0.0, 0.0)], [f32(1e6, -1e6)], None, config)

    assert np.all(np.abs(new[0]) <= np.float32(0.1))
    assert np.all(np.abs(new[0]) > 0.09)


# --- configuration ---------------------------------------------------------------------------------


def test_config_defaults():
    assert ServerOptConfig("fedadam").to_dict() == {
        "method": "fedadam", "server_lr": 0.1, "beta_1": 0.9, "beta_2": 0.99, "tau": 1e-3}
    assert ServerOptConfig("fedyogi").to_dict() == {
        "method": "fedyogi", "server_lr": 0.01, "beta_1": 0.9, "beta_2": 0.99, "tau": 1e-3}
    assert ServerOptConfig("fedadagrad").to_dict() == {
        "method": "fedadagrad", "server_lr": 0.1, "beta_1": 0.0, "tau": 1e-3}
    avgm = ServerOptConfig(" FedAvgM ")
    assert avgm.method == "fedavgm"
    assert avgm.to_dict() == {"method": "fedavgm", "server_lr": 1.0, "server_momentum": 0.7}


def test_config_defaults_match_flowers_where_taken_from_it():
    strategy = pytest.importorskip("flwr.serverapp.strategy")
    for name, cls in [("fedadam", strategy.FedAdam), ("fedyogi", strategy.FedYogi),
                      ("fedadagrad", strategy.FedAdagrad)]:
        ours, theirs = ServerOptConfig(name), cls()
        assert (ours.server_lr, ours.beta_1, ours.tau) == (theirs.eta, theirs.beta_1, theirs.tau), name
        if name != "fedadagrad":
            assert ours.beta_2 == theirs.beta_2


def test_config_is_frozen_and_compares_by_value():
    config = ServerOptConfig("fedadam")

    with pytest.raises(AttributeError):
        config.server_lr = 1.0  # type: ignore[misc]
    assert config == ServerOptConfig("fedadam", server_lr=0.1)
    assert config.server_momentum is None  # unused fields stay unset


def test_config_replace_within_a_method():
    config = dataclasses.replace(ServerOptConfig("fedavgm"), server_lr=0.5)

    assert config.to_dict() == {"method": "fedavgm", "server_lr": 0.5, "server_momentum": 0.7}
    with pytest.raises(ServerOptError, match="tau must be > 0"):
        dataclasses.replace(ServerOptConfig("fedyogi"), tau=-1.0)


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"method": "fedsgd"}, "unknown server optimiser 'fedsgd'"),
        ({"method": None}, "unknown server optimiser"),
        ({"method": "fedadam", "server_lr": 0.0}, "server learning rate must be > 0"),
        ({"method": "fedadam", "server_lr": -1.0}, "server learning rate must be > 0"),
        ({"method": "fedadam", "server_lr": float("nan")}, "finite number"),
        ({"method": "fedadam", "server_lr": "0.1"}, "finite number"),
        ({"method": "fedadam", "server_lr": True}, "finite number"),
        ({"method": "fedadam", "beta_1": 1.0}, r"beta_1 must be in \[0, 1\)"),
        ({"method": "fedyogi", "beta_2": -0.1}, r"beta_2 must be in \[0, 1\)"),
        ({"method": "fedavgm", "server_momentum": 1.0}, r"server_momentum must be in \[0, 1\)"),
        ({"method": "fedadam", "tau": 0.0}, "tau must be > 0"),
        ({"method": "fedadam", "server_momentum": 0.9}, "fedadam does not use server_momentum"),
        ({"method": "fedavgm", "beta_1": 0.9}, "fedavgm does not use beta_1"),
        ({"method": "fedadagrad", "beta_2": 0.9}, "fedadagrad does not use beta_2"),
    ],
)
def test_config_rejects(kwargs, fragment):
    with pytest.raises(ServerOptError, match=fragment) as info:
        ServerOptConfig(**kwargs)

    assert isinstance(info.value, ValidationError) and isinstance(info.value, ValueError)


def test_registry():
    assert list(SERVER_OPTIMIZERS) == METHODS
    assert [SERVER_OPTIMIZERS[m].fn for m in METHODS] == [fedavgm, fedadam, fedyogi, fedadagrad]
    assert all(SERVER_OPTIMIZERS[m].name == m and SERVER_OPTIMIZERS[m].description for m in METHODS)
    assert SERVER_OPTIMIZERS["fedavgm"].params == ("server_lr", "server_momentum")
    assert "tau" in SERVER_OPTIMIZERS["fedyogi"].params


def test_rule_refuses_a_config_for_another_method():
    with pytest.raises(ServerOptError, match="fedadam was called with a configuration for fedyogi"):
        fedadam([f32(0)], [f32(1)], None, ServerOptConfig("fedyogi"))


# --- state ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_init_state_is_zero_and_valid(method):
    weights = random_weights(np.random.default_rng(0))

    state = init_state(method, weights)

    assert state["method"] == method and state["t"] == 0
    assert [m.shape for m in state["m"]] == [w.shape for w in weights]
    assert all(m.dtype == np.float32 and not m.any() for m in state["m"] + state["v"])
    assert len(state["v"]) == (0 if method == "fedavgm" else len(weights))
    check_state(state, method, weights)


def _bad_states(method, weights):
    good = init_state(method, weights)
    yield "dict", [1, 2]
    yield "lacks t", {k: v for k, v in good.items() if k != "t"}
    yield "unknown keys: extra", {**good, "extra": 1}
    yield "is for 'fedyogi'", {**good, "method": "fedyogi"}
    yield "integer >= 0", {**good, "t": -1}
    yield "integer >= 0", {**good, "t": 1.0}
    yield "integer >= 0", {**good, "t": True}
    yield "'m' must hold 3 arrays, got 2", {**good, "m": good["m"][:2]}
    yield r"'m': weight 1 has shape \(5,\), expected \(4,\)", {**good, "m": [good["m"][0], np.zeros(5, np.float32), good["m"][2]]}
    yield r"'m': weight 0 is a list, not a numpy array", {**good, "m": [[0.0] * 4, *good["m"][1:]]}
    yield "dtype float64", {**good, "m": [m.astype(np.float64) for m in good["m"]]}
    yield "non-finite", {**good, "m": [good["m"][0] + np.nan, *good["m"][1:]]}
    yield "'v': weight 2 holds negative values", {**good, "v": [*good["v"][:2], np.array(-1.0, np.float32)]}


@pytest.mark.parametrize("case", range(13))
def test_check_state_rejects(case):
    weights = random_weights(np.random.default_rng(1))
    fragment, state = list(_bad_states("fedadam", weights))[case]

    with pytest.raises(ServerOptError, match=fragment):
        check_state(state, "fedadam", weights)
    with pytest.raises(ServerOptError, match=fragment):
        fedadam(weights, weights, state, ServerOptConfig("fedadam"))


def test_fedavgm_state_must_have_no_second_moment():
    weights = random_weights(np.random.default_rng(1))
    state = {**init_state("fedavgm", weights), "v": [np.zeros(1, np.float32)]}

    with pytest.raises(ServerOptError, match="'v' must hold 0 arrays, got 1"):
        check_state(state, "fedavgm", weights)


@pytest.mark.parametrize("method", METHODS)
def test_mismatched_aggregate_raises(method):
    weights = random_weights(np.random.default_rng(2))
    config = ServerOptConfig(method)

    with pytest.raises(ServerOptError, match="the aggregate: expected 3 weight arrays for the global model, got 2"):
        server_step(config, weights, weights[:2])
    with pytest.raises(ServerOptError, match=r"the aggregate: weight 0 has shape \(4, 3\)"):
        server_step(config, weights, [weights[0].T, *weights[1:]])
    with pytest.raises(ServerOptError, match="no layers"):
        server_step(config, [], [])


@pytest.mark.parametrize("method", METHODS)
def test_state_survives_the_restricted_unpickler_and_resumes_bit_identically(method, tmp_path):
    # Prepare: four rounds in one go, and the same rounds with the state saved and reloaded after two
    rng = np.random.default_rng(5)
    config = ServerOptConfig(method)
    x0 = random_weights(rng)
    rounds = []
    x, state = x0, None
    for _ in range(4):
        results = client_round(rng, x)
        rounds.append(results)
        x, state = server_step(config, x, weighted_average(results), state)
    straight = (x, state)

    # Execute
    x, state = x0, None
    for results in rounds[:2]:
        x, state = server_step(config, x, weighted_average(results), state)
    path = tmp_path / "state.pkl"
    path.write_bytes(pickle.dumps({"weights": x, "state": state}))
    loaded = safe_load_pickle(path)
    x, state = loaded["weights"], loaded["state"]
    check_state(state, method, x)
    for results in rounds[2:]:
        x, state = server_step(config, x, weighted_average(results), state)

    # Assert
    assert_identical(x, straight[0])
    assert state["t"] == straight[1]["t"] == 4
    assert_identical(state["m"], straight[1]["m"])
    assert_identical(state["v"], straight[1]["v"])


@pytest.mark.parametrize("method", METHODS)
def test_inputs_unchanged_and_outputs_fresh(method):
    # Prepare: a state after one step, so every state array is non-zero
    rng = np.random.default_rng(6)
    config = ServerOptConfig(method)
    current = random_weights(rng)
    _, state = server_step(config, current, weighted_average(client_round(rng, current)))
    aggregated = weighted_average(client_round(rng, current))
    snapshot = copy.deepcopy((current, aggregated, state))
    given = current + aggregated + state["m"] + state["v"]

    # Execute
    new, new_state = server_step(config, current, aggregated, state)

    # Assert
    assert_identical(current, snapshot[0])
    assert_identical(aggregated, snapshot[1])
    assert state["t"] == snapshot[2]["t"] == 1
    assert_identical(state["m"], snapshot[2]["m"])
    assert_identical(state["v"], snapshot[2]["v"])
    out = new + new_state["m"] + new_state["v"]
    assert all(isinstance(a, np.ndarray) and a.dtype == np.float32 for a in out)
    assert not any(np.shares_memory(a, b) for a in out for b in given)
    assert [a.shape for a in new] == [a.shape for a in current]
    assert new_state["t"] == 2
    check_state(new_state, method, current)


@pytest.mark.parametrize("method", METHODS)
def test_a_zero_delta_leaves_the_model_where_it_is(method):
    weights = random_weights(np.random.default_rng(7))

    new, _ = server_step(ServerOptConfig(method), weights, weights)

    assert_identical(new, weights)


def test_server_step_dispatches_by_config():
    rng = np.random.default_rng(8)
    current = random_weights(rng)
    aggregated = weighted_average(client_round(rng, current))
    for method in METHODS:
        config = ServerOptConfig(method)
        assert_identical(server_step(config, current, aggregated)[0],
                         getattr(server_opt, method)(current, aggregated, None, config)[0])


# --- equality with Flower 1.42's message-API strategies ----------------------------------------------


@pytest.fixture
def flower(monkeypatch):
    """Flower's strategies, with the task identity a Message needs outside a running app."""
    strategy = pytest.importorskip("flwr.serverapp.strategy")
    from flwr.supercore.task_identity import TaskIdentity

    for name in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, name, 1)
    return strategy


class _Grid:
    """Just enough of a Grid for ``configure_train`` to sample its nodes."""

    def __init__(self, num_nodes):
        self.nodes = list(range(1, num_nodes + 1))

    def get_node_ids(self):
        return list(self.nodes)


def _replies(results):
    """Train replies as a ClientApp sends them: ArrayRecord + MetricRecord with 'num-examples'."""
    from flwr.app import ArrayRecord, Message, MessageType, MetricRecord, RecordDict

    return [
        Message(content=RecordDict({"arrays": ArrayRecord([np.array(w) for w in weights]),
                                    "metrics": MetricRecord({"num-examples": n})}),
                dst_node_id=i + 1, message_type=MessageType.TRAIN)
        for i, (weights, n) in enumerate(results)
    ]


def _flower_strategy(flower, config):
    if config.method == "fedavgm":
        return flower.FedAvgM(server_learning_rate=config.server_lr, server_momentum=config.server_momentum)
    if config.method == "fedadagrad":
        strategy = flower.FedAdagrad(eta=config.server_lr, tau=config.tau)
        strategy.beta_1 = config.beta_1  # Flower fixes 0; the paper's variant sets it after construction
        return strategy
    cls = flower.FedAdam if config.method == "fedadam" else flower.FedYogi
    return cls(eta=config.server_lr, beta_1=config.beta_1, beta_2=config.beta_2, tau=config.tau)


FLOWER_CASES = [
    ServerOptConfig("fedavgm"),
    ServerOptConfig("fedavgm", server_lr=1.0, server_momentum=0.0),
    ServerOptConfig("fedavgm", server_lr=0.5, server_momentum=0.9),
    ServerOptConfig("fedavgm", server_lr=1.5, server_momentum=0.0),
    ServerOptConfig("fedadam"),
    ServerOptConfig("fedadam", server_lr=0.03, beta_1=0.5, beta_2=0.9, tau=1e-2),
    ServerOptConfig("fedyogi"),
    ServerOptConfig("fedyogi", server_lr=0.1, beta_1=0.0, beta_2=0.5, tau=1e-4),
    ServerOptConfig("fedadagrad"),
    ServerOptConfig("fedadagrad", server_lr=0.3, beta_1=0.9, tau=1e-2),
]


@pytest.mark.parametrize("config", FLOWER_CASES, ids=lambda c: "-".join(f"{v}" for v in c.to_dict().values()))
def test_matches_flower_over_successive_rounds(flower, config):
    # Prepare: both servers see the same client weights every round (the clients move from our model)
    from flwr.app import ArrayRecord, ConfigRecord

    rng = np.random.default_rng(11)
    strategy = _flower_strategy(flower, config)
    grid = _Grid(6)
    ours = random_weights(rng, [(3, 3, 1, 4), (4,), (36, 10), (10,), ()])
    start = [w.copy() for w in ours]
    theirs = [w.copy() for w in ours]
    state = None

    for server_round in range(1, 6):
        results = client_round(rng, ours, num_clients=6)

        # Execute: Flower's round as its start() loop runs it, and ours
        messages = strategy.configure_train(server_round, ArrayRecord(theirs), ConfigRecord({}), grid)
        assert len(list(messages)) == 6
        arrays, _ = strategy.aggregate_train(server_round, _replies(results))
        theirs = arrays.to_numpy_ndarrays()
        ours, state = server_step(config, ours, weighted_average(results), state)

        # Assert: the same model every round, within float32 rounding (Flower's FedAdam gives float64)
        assert_close(ours, theirs)
        assert all(w.dtype == np.float32 for w in ours)
        assert state["t"] == server_round
    assert max(float(np.max(np.abs(a - b))) for a, b in zip(ours, start)) > 1e-2  # the model did move, so the comparison is not between untouched weights


@pytest.mark.parametrize("method", ["fedadam", "fedyogi", "fedadagrad"])
def test_moments_match_flowers(flower, method):
    # Flower's m_t and v_t after three rounds equal our state's m and v
    from flwr.app import ArrayRecord, ConfigRecord

    rng = np.random.default_rng(12)
    config = ServerOptConfig(method)
    strategy = _flower_strategy(flower, config)
    ours = random_weights(rng)
    theirs = [w.copy() for w in ours]
    state = None
    for server_round in (1, 2, 3):
        results = client_round(rng, ours)
        strategy.configure_train(server_round, ArrayRecord(theirs), ConfigRecord({}), _Grid(5))
        theirs = strategy.aggregate_train(server_round, _replies(results))[0].to_numpy_ndarrays()
        ours, state = server_step(config, ours, weighted_average(results), state)

    keys = [str(j) for j in range(len(ours))]
    assert_close(state["m"], [strategy.m_t[k] for k in keys])
    assert_close(state["v"], [strategy.v_t[k] for k in keys])


def test_fedavgm_momentum_matches_flowers(flower):
    from flwr.app import ArrayRecord, ConfigRecord

    rng = np.random.default_rng(13)
    config = ServerOptConfig("fedavgm", server_lr=0.8, server_momentum=0.6)
    strategy = _flower_strategy(flower, config)
    ours = random_weights(rng)
    state = None
    for server_round in (1, 2, 3):
        results = client_round(rng, ours)
        strategy.configure_train(server_round, ArrayRecord(ours), ConfigRecord({}), _Grid(5))
        strategy.aggregate_train(server_round, _replies(results))
        ours, state = server_step(config, ours, weighted_average(results), state)

    assert_close(state["m"], strategy.momentum_vector)
