"""Secure aggregation wired into every mode: the simulation twin (``fedmnist simulate --secure-aggregation``)
and the Flower ServerApp/ClientApp, run in process over the suite's ``FakeGrid`` (the ClientApp itself answers
every stage), against each other and against the plain rounds."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
from test_flower_app import FakeGrid, _client_node, _train_message
from test_secure_aggregation import assert_looks_uniform_and_uncorrelated

from fedmnist.errors import ConfigError
from fedmnist.flower_config import FlowerRunConfig
from fedmnist.model import initial_weights
from fedmnist.secure_aggregation import SecAggConfig

SEED = 42
WEIGHT_BOUND = 1000
"""W close to the partitions' sizes (about 200 images each): the quantisation error scales with W/Σn_k."""


def _flower_config(tmp_path, federation, **overrides) -> FlowerRunConfig:
    from fedmnist.data import common_test_file

    config = FlowerRunConfig(num_server_rounds=1, local_epochs=1, batch_size=32, optimizer="adam",
                             learning_rate=1e-3, momentum=0.0, min_train_nodes=2, seed=SEED,
                             output_dir=str(tmp_path), test_file=str(common_test_file(federation)),
                             round_timeout=30.0, wait_nodes_timeout=5.0, secure_aggregation=True,
                             secagg_weight_bound=WEIGHT_BOUND)
    return replace(config, **overrides)


def _nodes(federation, config, clients) -> dict:
    from fedmnist.data import client_file

    _train_message(initial_weights(SEED), 1, 0.0)  # the task identity Message needs
    return {100 + k: _client_node(client_file(federation, k), config) for k in clients}


def _simulation(mnist, tmp_path, rounds: int, secure: bool, **settings):
    from fedmnist.simulation import SimulationConfig, run_simulation

    config = SimulationConfig.create(num_clients=3, fraction=1.0, rounds=rounds, local_epochs=1, batch_size=32,
                                     optimizer="adam", learning_rate=1e-3, momentum=0.0, methods=("fedavg",),
                                     seed=SEED, secure_aggregation=secure, secagg_weight_bound=WEIGHT_BOUND,
                                     **settings)
    return run_simulation(config, out_dir=tmp_path, progress=False, mnist=mnist)


def _bound(federation, clients) -> float:
    """The stated bound on the mean update, per coordinate: c·Δ·W/Σn_k (``SecureAggregate.error_bound``)."""
    from fedmnist.data import client_file, load_partition

    total = sum(len(load_partition(client_file(federation, k))[1]) for k in clients)
    return len(clients) * SecAggConfig(enabled=True).step(1.0) * WEIGHT_BOUND / total


def _max_diff(a, b) -> float:
    return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)))) for x, y in zip(a, b))


def test_secure_aggregation_flower_round_equals_the_simulation_twin_and_the_plain_round(
        small_mnist, small_federation, tmp_path, monkeypatch):
    """Two secure FedAvg rounds on 3 nodes: equal to the simulation twin to 1e-6 (the same integers), round 1
    equal to the plain round within the bound; the ServerApp receives masked residues only, uniform in the
    field and uncorrelated with each node's true encoding, and writes no individual update."""
    import fedmnist.flower_secagg as flower_secagg
    from fedmnist.exchange import load_global
    from fedmnist.flower_app import SECAGG_KEY, run_server

    true_vectors: dict[int, np.ndarray] = {}
    real_stage = flower_secagg.client_stage

    def recording_stage(inbound, state, node_id, encoded=None):
        if encoded is not None:
            true_vectors[node_id] = np.array(encoded)
        return real_stage(inbound, state, node_id, encoded)

    monkeypatch.setattr(flower_secagg, "client_stage", recording_stage)
    config = _flower_config(tmp_path / "flower", small_federation, num_server_rounds=2)
    nodes = _nodes(small_federation, config, (1, 2, 3))
    received: dict[int, list] = {}

    def recorded(node, answer):
        def reply(message):
            out = answer(message)
            if message.content.config_records[SECAGG_KEY]["stage"] == "collect_masked_vectors":
                received.setdefault(node, []).append(out)
            return out
        return reply

    history = run_server(FakeGrid({n: recorded(n, a) for n, a in nodes.items()}), config)

    assert [(h.num_sampled, h.num_replies, h.failed) for h in history] == [(3, 3, []), (3, 3, [])]
    secure_sim = _simulation(small_mnist, tmp_path / "sim", 2, secure=True)
    final = load_global(tmp_path / "flower" / "pesos_globales_ronda_2.pkl").weights
    assert _max_diff(final, secure_sim.final_weights["fedavg"]) <= 1e-6
    assert [h.test_accuracy for h in history] == pytest.approx(
        [r.test_accuracy for r in secure_sim.metrics["fedavg"]], abs=1e-6)
    plain_sim = _simulation(small_mnist, tmp_path / "plain", 1, secure=False)
    first = load_global(tmp_path / "flower" / "pesos_globales_ronda_1.pkl").weights
    assert 0 < _max_diff(first, plain_sim.final_weights["fedavg"]) <= _bound(small_federation, (1, 2, 3)) + 1e-6

    # What the ServerApp received in the masking stage: one ConfigRecord holding the masked bytes, nothing else.
    from fedmnist.flower_secagg import MASKED, bytes_to_vector

    modulus = SecAggConfig(enabled=True).modulus
    assert sorted(received) == [101, 102, 103] and all(len(r) == 2 for r in received.values())
    for node, replies in received.items():
        reply = replies[-1]
        assert list(reply.content.keys()) == [SECAGG_KEY] and list(reply.content[SECAGG_KEY].keys()) == [MASKED]
        masked = bytes_to_vector(reply.content[SECAGG_KEY][MASKED], true_vectors[node].size, modulus)
        assert_looks_uniform_and_uncorrelated(masked, true_vectors[node], modulus)
    # The outputs hold the global models and aggregate numbers only.
    rounds = json.loads((tmp_path / "flower" / "metricas_por_ronda.json").read_text())["rounds"]
    assert all(r["replied_clients"] == [] and r["train_loss"] is None for r in rounds)


def test_secure_aggregation_flower_tolerates_a_dropout_after_the_key_exchange_and_fails_below_the_threshold(
        small_mnist, tmp_path):
    """4 nodes, threshold 3: one node vanishing at the masking stage leaves a round of 3; two leave 2 < t, and the
    round fails cleanly (min-train-nodes stops the run, nothing of it written)."""
    from fedmnist.federation_files import write_federation
    from fedmnist.flower_app import RoundFailedError, run_server
    from fedmnist.partition import PartitionConfig

    federation = tmp_path / "fed4"
    write_federation(small_mnist, PartitionConfig("iid", 4, seed=SEED), federation)

    def vanishing(answer):
        def reply(message):
            stage = message.content.config_records["secagg"]["stage"]
            return None if stage in ("collect_masked_vectors", "unmask") else answer(message)
        return reply

    config = _flower_config(tmp_path / "one", federation, secagg_threshold=3, round_timeout=2.0)
    nodes = _nodes(federation, config, (1, 2, 3, 4))
    nodes[104] = vanishing(nodes[104])
    (row,) = run_server(FakeGrid(nodes), config)
    assert (row.num_sampled, row.num_replies, row.test_accuracy is not None) == (4, 3, True)
    assert [f.split(":")[0] for f in row.failed] == ["node 104"] and "collect_masked_vectors" in row.failed[0]

    config = _flower_config(tmp_path / "two", federation, secagg_threshold=3, min_train_nodes=2, round_timeout=2.0)
    nodes = _nodes(federation, config, (1, 2, 3, 4))
    nodes[103], nodes[104] = vanishing(nodes[103]), vanishing(nodes[104])
    with pytest.raises(RoundFailedError, match=r"round 1 \(fedavg\): only 0 members in the secure aggregate, 2 "
                       r"needed; failed: .*secure aggregation: secure aggregation aborted"):
        run_server(FakeGrid(nodes), config)
    assert not (tmp_path / "two" / "metricas_por_ronda.json").exists()
    assert not (tmp_path / "two" / "pesos_globales_ronda_1.pkl").exists()


def test_secure_aggregation_simulation_twin_keeps_the_plain_accuracy(small_mnist, raw_mnist, tmp_path):
    """Three rounds on the 600-image slice, evaluated on 2,000 test images: the secure twin's accuracy within
    0.1 points of the plain run's every round, with a quantisation step (W = 1,000, 30 bits: 2·10⁻⁹ per
    coordinate of a member's update) below float32's resolution of the weights.

    Whole trajectories are chaotic: the members train from the secure model, so any rounding difference is
    amplified by the next local training (at W = 1,000 and 22 bits round 2 already moves by a few tenths of a
    point); the per-round bound at the defaults is tested on one aggregation in test_secure_aggregation.py.
    """
    from fedmnist.data import Mnist

    mnist = Mnist(small_mnist.x_train, small_mnist.y_train, raw_mnist.x_test[:2000], raw_mnist.y_test[:2000])
    secure = _simulation(mnist, tmp_path / "secure", 3, secure=True, secagg_bits=30)
    plain = _simulation(mnist, tmp_path / "plain", 3, secure=False)
    got = [r.test_accuracy for r in secure.metrics["fedavg"]]
    want = [r.test_accuracy for r in plain.metrics["fedavg"]]
    assert got == pytest.approx(want, abs=0.001) and want[-1] > 0.4
    assert secure.config.secure is not None and plain.config.secure is None
    stored = json.loads((tmp_path / "secure" / "configuracion.json").read_text())
    assert stored["simulation"]["secure"]["weight_bound"] == WEIGHT_BOUND


@pytest.mark.parametrize("overrides, message", [
    ({"method": "krum"}, "krum cannot run on a sum"),
    ({"method": "fedmed"}, "fedmed cannot run on a sum"),
    ({"max_count_ratio": 2.0}, "max-count-ratio"),
    ({"dp_noise": 0.5, "dp_side": "server"}, "server-side DP clipping"),
    ({"secagg_threshold": 1}, "secagg-threshold must be an integer >= 2"),
    ({"secagg_bits": 40}, "secagg-bits"),
])
def test_secure_aggregation_flower_run_config_refusals(overrides, message):
    values = {"secure-aggregation": True, **{k.replace("_", "-"): v for k, v in overrides.items()}}
    with pytest.raises(ConfigError, match=message):
        FlowerRunConfig.from_run_config(values)


def test_secure_aggregation_flower_refuses_a_threshold_above_the_sample_before_any_message(
        small_federation, tmp_path):
    from fedmnist.flower_app import run_server

    config = _flower_config(tmp_path, small_federation, secagg_threshold=5)
    nodes = _nodes(small_federation, config, (1, 2, 3))
    grid = FakeGrid(nodes)
    with pytest.raises(ConfigError, match="secagg-threshold 5 is above the 3 nodes sampled per round"):
        run_server(grid, config)
    assert grid.pushed == 0


@pytest.mark.parametrize("settings, message", [
    ({"methods": ("fedavg", "trimmed")}, "trimmed cannot run on a sum"),
    ({"methods": ("bulyan",), "num_clients": 7}, "bulyan cannot run on a sum"),
    ({"methods": ("fedavg",), "dp_noise": 0.5, "dp_clip": 1.0}, "server-side DP clipping"),
])
def test_secure_aggregation_simulation_refuses_methods_before_round_one(settings, message):
    from fedmnist.simulation import SimulationConfig

    config = SimulationConfig.create(secure_aggregation=True, **settings)
    with pytest.raises(ConfigError, match=message):
        config.validate()


def test_secure_aggregation_simulation_refuses_a_threshold_above_the_sample(small_mnist, tmp_path):
    from fedmnist.simulation import SimulationConfig, run_simulation

    config = SimulationConfig.create(num_clients=3, rounds=1, methods=("fedavg",), secure_aggregation=True,
                                     secagg_threshold=5)
    with pytest.raises(ConfigError, match="secagg-threshold 5 is above the 3 nodes sampled per round"):
        run_simulation(config, out_dir=tmp_path, progress=False, mnist=small_mnist)
    assert not (tmp_path / "metricas_por_ronda.csv").exists()


def test_secure_aggregation_flags_reach_both_modes_with_the_declared_defaults():
    from fedmnist.cli import build_parser, config_from_args

    args = build_parser().parse_args(["simulate", "--out", "x", "--secure-aggregation", "--secagg-bits", "20",
                                      "--secagg-threshold", "3"])
    secure = config_from_args(args).secure
    assert (secure.enabled, secure.bits, secure.threshold, secure.num_shares) == (True, 20, 3, None)
    plain = config_from_args(build_parser().parse_args(["simulate", "--out", "x"]))
    assert plain.secure is None and "secure" not in plain.to_dict()  # a plain run's settings hash is unchanged
    assert FlowerRunConfig().secure is None
    assert FlowerRunConfig(secure_aggregation=True).secure == SecAggConfig(enabled=True)


# --- a loopback deployment ---------------------------------------------------------------------------


@pytest.fixture
def flower(tmp_path, small_federation):
    """A SuperLink and three SuperNodes (one per client of the 3-client federation); stopped afterwards."""
    from flower_harness import FlowerDeployment, alive

    from fedmnist.data import client_file

    deployment = FlowerDeployment(tmp_path / "deployment")
    try:
        deployment.start_superlink()
        deployment.start_supernodes({f"nodo{k}": {"data-file": str(client_file(small_federation, k))}
                                     for k in (1, 2, 3)}, wait=False)
        yield deployment
    finally:
        deployment.close()
    assert not [pid for pid in deployment.known if alive(pid)]


@pytest.mark.slow
def test_secure_aggregation_loopback_deployment_equals_the_simulation_twin(flower, tmp_path, small_mnist,
                                                                          small_federation):
    """Three SuperNodes on 127.0.0.1, two secure FedAvg rounds: the global weights of every round equal the
    simulation twin's to 1e-6 (the same integers) and, in round 1, the plain round's within the bound."""
    from test_flower_app import RUN_TIMEOUT, _run_config

    from fedmnist.data import common_test_file
    from fedmnist.exchange import load_global

    out = tmp_path / "salida"
    run_id = flower.submit(_run_config(out, common_test_file(small_federation), **{
        "batch-size": 32, "min-train-nodes": 3, "secure-aggregation": True, "secagg-weight-bound": WEIGHT_BOUND}))
    flower.wait_supernodes()
    twins = [_simulation(small_mnist, tmp_path / f"sim{r}", r, secure=True) for r in (1, 2)]
    plain = _simulation(small_mnist, tmp_path / "plain", 1, secure=False)
    run = flower.wait_finished(run_id, RUN_TIMEOUT)

    assert run["status"] == "finished:completed", flower.server_log(run_id)
    rounds = json.loads((out / "metricas_por_ronda.json").read_text())["rounds"]
    assert [(r["num_sampled"], r["num_replies"], r["failed"]) for r in rounds] == [(3, 3, []), (3, 3, [])]
    for round_, twin in zip((1, 2), twins):
        weights = load_global(out / f"pesos_globales_ronda_{round_}.pkl").weights
        assert _max_diff(weights, twin.final_weights["fedavg"]) <= 1e-6
    first = load_global(out / "pesos_globales_ronda_1.pkl").weights
    assert _max_diff(first, plain.final_weights["fedavg"]) <= _bound(small_federation, (1, 2, 3)) + 1e-6


def test_secure_aggregation_traffic_counts_every_record_even_empty_lists():
    from flwr.app import ConfigRecord, RecordDict

    from fedmnist.flower_app import content_bytes, weights_to_record

    content = RecordDict({"secagg": ConfigRecord({"dead": [], "ids": [1, 2], "blob": b"abc"}),
                          "arrays": weights_to_record([np.zeros((2, 3), np.float32)])})
    assert content_bytes(content) == len("dead") + (len("ids") + 16) + (len("blob") + 3) + \
        content["arrays"].count_bytes()


def test_secure_aggregation_settings_leave_a_plain_flower_checkpoint_unchanged():
    from fedmnist.flower_app import checkpoint_spec
    from fedmnist.methods import build_method

    method = build_method("fedavg", FlowerRunConfig().method_config)
    plain = checkpoint_spec(FlowerRunConfig(), method, "0" * 64, None)
    secure = checkpoint_spec(FlowerRunConfig(secure_aggregation=True), method, "0" * 64, None)
    assert not any(key.startswith("secagg") or key == "secure-aggregation" for key in plain.settings)
    assert secure.settings["secure-aggregation"] is True and secure.settings_sha256() != plain.settings_sha256()


@pytest.mark.slow
def test_secure_aggregation_loopback_tolerates_a_supernode_dropping_out_after_the_key_exchange(tmp_path, small_mnist):
    """Four SuperNodes, threshold 3: the fourth fails at the masking stage (node config ``test-drop-at-stage``,
    after sharing its keys); the round is the secure aggregate of the other three."""
    from flower_harness import FlowerDeployment, alive
    from test_flower_app import RUN_TIMEOUT, _run_config

    from fedmnist.data import client_file, common_test_file
    from fedmnist.federation_files import write_federation
    from fedmnist.flower_app import TEST_DROP_AT
    from fedmnist.partition import PartitionConfig

    federation, out = tmp_path / "fed4", tmp_path / "salida"
    write_federation(small_mnist, PartitionConfig("iid", 4, seed=SEED), federation)
    flower = FlowerDeployment(tmp_path / "deployment")
    try:
        flower.start_superlink()
        nodes = {f"nodo{k}": {"data-file": str(client_file(federation, k))} for k in (1, 2, 3, 4)}
        nodes["nodo4"][TEST_DROP_AT] = "collect_masked_vectors"
        flower.start_supernodes(nodes, wait=False)
        run_id = flower.submit(_run_config(out, common_test_file(federation), **{
            "num-server-rounds": 1, "batch-size": 32, "min-train-nodes": 3, "min-available-nodes": 4,
            "secure-aggregation": True, "secagg-threshold": 3, "secagg-weight-bound": WEIGHT_BOUND}))
        flower.wait_supernodes()
        run = flower.wait_finished(run_id, RUN_TIMEOUT)
        assert run["status"] == "finished:completed", flower.server_log(run_id)
    finally:
        flower.close()
    assert not [pid for pid in flower.known if alive(pid)]
    (row,) = json.loads((out / "metricas_por_ronda.json").read_text())["rounds"]
    assert (row["num_sampled"], row["num_replies"], len(row["failed"])) == (4, 3, 1)
    assert "stage 'collect_masked_vectors'" in row["failed"][0] and row["test_accuracy"] > 0.1


def test_secure_aggregation_simulation_goes_on_when_a_poisson_sample_is_too_small(small_mnist, tmp_path):
    from fedmnist.simulation import SimulationConfig, run_simulation

    # K = 3, q = 1/3: some rounds sample fewer than 2 clients, too few for the protocol; they abort, the run goes on
    config = SimulationConfig.create(num_clients=3, fraction=0.34, rounds=6, local_epochs=1, batch_size=32,
                                     methods=("fedavg",), seed=SEED, train_subset=300, test_subset=200,
                                     secure_aggregation=True, secagg_weight_bound=WEIGHT_BOUND, dp_noise=0.5,
                                     dp_clip=1.0, dp_side="client", dp_sampling="poisson")
    result = run_simulation(config, out_dir=tmp_path, progress=False, mnist=small_mnist)

    rows = result.metrics["fedavg"]
    small = [r for r in rows if len(r.sampled_clients) < 2]
    assert len(rows) == 6 and small, [r.sampled_clients for r in rows]
    for row in small:
        assert row.num_replies == 0
        assert any("secure aggregation" in f and "aborted" in f for f in row.failed), row.failed
        assert any("released its noise alone" in n for n in row.notes), row.notes
    # an aborted round is still a round of the mechanism: ε after round t is the accountant's for t rounds
    from fedmnist.privacy import PrivacyAccountant

    accountant = PrivacyAccountant(0.5, 3, 1, rows[0].delta, sampling="poisson")
    assert [r.epsilon for r in rows] == [accountant.epsilon(t) for t in range(1, 7)]
