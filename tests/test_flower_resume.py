"""The Flower ServerApp on the shared round loop: Poisson node sampling, its checkpoint, and resuming a run
whose ServerApp died — on an in-process Grid (fast) and on a loopback deployment whose ``flwr-serverapp``
process is killed with SIGKILL (slow, ``tests/flower_harness.py``)."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
from test_flower_app import FakeGrid, _client_node, _run_config, _train_message

from fedmnist.errors import ConfigError
from fedmnist.flower_app import FlowerRunConfig, record_to_weights, run_server, weights_to_record
from fedmnist.model import initial_weights, weights_sha256

SEED = 42
RUN_TIMEOUT = 600.0


def _echo_node(client_id: int):
    """A node that 'trains' by adding 0.001·client_id to every weight (no Keras: fast)."""
    from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

    def answer(message):
        start = record_to_weights(message.content["arrays"])
        trained = [w + np.float32(0.001 * client_id) for w in start]
        content = RecordDict({"arrays": weights_to_record(trained),
                              "metrics": MetricRecord({"num-examples": 50, "client-id": client_id, "train-loss": 0.5}),
                              "reply": ConfigRecord({"start-sha256": weights_sha256(start)})})
        return Message(content=content, reply_to=message)

    return answer


def _config(out: Path, test_file: Path, **overrides) -> FlowerRunConfig:
    """Seeded DP-FedAvg over the echo nodes, K = 5, resumable."""
    values = {"num_server_rounds": 3, "min_train_nodes": 1, "seed": SEED, "output_dir": str(out),
              "test_file": str(test_file), "round_timeout": 30.0, "wait_nodes_timeout": 5.0, "dp_noise": 1.0,
              "dp_clip": 1.0, "dp_seeded_noise": True, "fraction_train": 0.4, "dp_clients": 5, "resume": True,
              "learning_rate": 0.05}
    return FlowerRunConfig(**{**values, **overrides})


def _nodes() -> dict:
    return {100 * k: _echo_node(k) for k in range(1, 6)}


def test_flower_samples_nodes_poisson_under_dp(small_federation, tmp_path):
    from fedmnist.data import common_test_file
    from fedmnist.privacy import poisson_sample
    from fedmnist.seeds import SAMPLING

    _train_message(initial_weights(SEED), 1, 0.0)  # task identity
    config = _config(tmp_path, common_test_file(small_federation), dp_sampling="poisson", num_server_rounds=4)

    history = run_server(FakeGrid(_nodes()), config)

    nodes = sorted(_nodes())
    for row in history:  # q = ⌊0.4·5⌋/5 = 0.4 per node, drawn by (seed, round) over the sorted node ids
        draw = poisson_sample(5, 0.4, np.random.default_rng([SEED, SAMPLING, row.round]))
        assert row.sampled_nodes == [nodes[p] for p in draw]
        assert row.replied_clients == [n // 100 for n in row.sampled_nodes]
    assert len({len(r.sampled_nodes) for r in history}) > 1  # not a fixed ⌊C·K⌋ = 2 every round


def test_flower_resume_on_an_in_process_grid_continues_the_checkpoint(small_federation, tmp_path):
    from fedmnist.data import common_test_file
    from fedmnist.exchange import load_global

    _train_message(initial_weights(SEED), 1, 0.0)  # task identity
    test_file = common_test_file(small_federation)

    class Crash(Exception):
        pass

    calls = []

    def dies_in_round_three(message):
        calls.append(int(message.content["config"]["server-round"]))
        if calls[-1] == 3:
            raise Crash
        return _echo_node(1)(message)

    crashing = {**_nodes(), 100: dies_in_round_three}
    with pytest.raises(Crash):
        run_server(FakeGrid(crashing), _config(tmp_path / "cut", test_file, fraction_train=1.0, dp_clients=5))
    out = tmp_path / "cut"
    # another configuration is refused naming the key, before anything is written
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    with pytest.raises(ConfigError, match=r"different configuration \(learning-rate: 0\.05 -> 0\.1\)"):
        run_server(FakeGrid(_nodes()), _config(out, test_file, fraction_train=1.0, learning_rate=0.1))
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before

    resumed = run_server(FakeGrid(_nodes()), _config(out, test_file, fraction_train=1.0, num_server_rounds=4))
    straight = run_server(FakeGrid(_nodes()), _config(tmp_path / "straight", test_file, fraction_train=1.0,
                                                      num_server_rounds=4))

    assert [r.round for r in resumed] == [1, 2, 3, 4]
    assert [r.comparable() for r in resumed] == [r.comparable() for r in straight]
    assert [r.epsilon for r in resumed] == [r.epsilon for r in straight] and resumed[-1].epsilon > resumed[1].epsilon
    final = load_global(out / "pesos_globales_ronda_4.pkl").weights
    assert all(np.array_equal(a, b) for a, b in zip(final, load_global(
        tmp_path / "straight" / "pesos_globales_ronda_4.pkl").weights))
    assert json.loads((out / "configuracion.json").read_text())["resumed_from_round"] == 2
    # without resume the checkpoint is not continued: a fresh run of 1 round replaces it
    fresh = run_server(FakeGrid(_nodes()), _config(out, test_file, fraction_train=1.0, num_server_rounds=1,
                                                   resume=False))
    assert [r.round for r in fresh] == [1] and not (out / "pesos_globales_ronda_4.pkl").exists()


# --- loopback deployments ----------------------------------------------------------------------


def _completed_rounds(out: Path) -> int:
    try:
        return len(json.loads((out / "metricas_por_ronda.json").read_text())["rounds"])
    except (OSError, ValueError, KeyError):
        return 0


def _run_killed_and_resumed(flower, small_federation, out: Path, **settings) -> tuple[int, int]:
    """Submit a 4-round run, SIGKILL its ``flwr-serverapp`` once a round is complete, submit it again;
    returns the rounds done when it was killed and the status of the resumed run."""
    from fedmnist.data import client_file, common_test_file

    config = _run_config(out, common_test_file(small_federation), **{
        "num-server-rounds": 4, "batch-size": 32, "resume": True, **settings})
    flower.start_supernodes({f"nodo{k}": {"data-file": str(client_file(small_federation, k))} for k in (1, 2)},
                            wait=False)
    first = flower.submit(config)
    flower.wait_supernodes()
    deadline = time.monotonic() + RUN_TIMEOUT
    while _completed_rounds(out) < 1:
        assert time.monotonic() < deadline, flower.server_log(first)
        time.sleep(0.2)
    apps = flower.app_processes()
    assert apps, "no flwr-serverapp process found"
    for pid in apps:
        os.kill(pid, signal.SIGKILL)
    killed_at = _completed_rounds(out)
    assert 1 <= killed_at < 4, killed_at
    second = flower.submit(config)
    run = flower.wait_finished(second, RUN_TIMEOUT)
    assert run["status"] == "finished:completed", flower.server_log(second)
    return killed_at, second


def _uninterrupted(small_federation, out: Path, **settings) -> list:
    """The same 4 rounds on an in-process Grid (the ClientApp run in this process), never interrupted."""
    from fedmnist.data import client_file, common_test_file

    _train_message(initial_weights(SEED), 1, 0.0)  # task identity
    values = _run_config(out, common_test_file(small_federation), **{"num-server-rounds": 4, "batch-size": 32,
                                                                      **settings})
    config = FlowerRunConfig.from_run_config(values)
    nodes = {10 * k: _client_node(client_file(small_federation, k), config) for k in (1, 2)}
    return run_server(FakeGrid(nodes), config)


DP_SETTINGS = {"method": "fedavg", "dp-noise": 1.0, "dp-clip": 0.01, "dp-seeded-noise": True, "dp-clients": 2}
"""Seeded DP-FedAvg: the restart must carry the weights, the clip and the releases the accountant counts
(a server optimiser's moments crossing a restart are checked in process, tests/test_rounds.py)."""


@pytest.fixture(scope="module")
def killed_and_resumed(tmp_path_factory, small_federation):
    """One loopback deployment whose ServerApp is SIGKILLed after round 1 or later and resumed, and the
    same 4 rounds uninterrupted on an in-process Grid: (output dir, rounds done when killed, reference)."""
    from flower_harness import FlowerDeployment, alive

    root = tmp_path_factory.mktemp("reanudar")
    deployment = FlowerDeployment(root / "deployment")
    try:
        deployment.start_superlink()
        killed_at, _ = _run_killed_and_resumed(deployment, small_federation, root / "salida", **DP_SETTINGS)
    finally:
        deployment.close()
    assert not [pid for pid in deployment.known if alive(pid)]
    reference = _uninterrupted(small_federation, root / "referencia", **DP_SETTINGS)
    return root / "salida", killed_at, reference, root / "referencia"


@pytest.mark.slow
def test_flower_resume_after_the_serverapp_is_killed_equals_an_uninterrupted_run(killed_and_resumed):
    from fedmnist.exchange import load_global

    out, killed_at, reference, reference_dir = killed_and_resumed
    rows = json.loads((out / "metricas_por_ronda.json").read_text())["rounds"]
    assert [r["round"] for r in rows] == [1, 2, 3, 4]
    assert json.loads((out / "configuracion.json").read_text())["resumed_from_round"] == killed_at
    final = load_global(out / "pesos_globales_ronda_4.pkl").weights
    expected = load_global(reference_dir / "pesos_globales_ronda_4.pkl").weights
    assert max(float(np.max(np.abs(a - b))) for a, b in zip(final, expected)) <= 1e-6
    assert [r["test_accuracy"] for r in rows] == pytest.approx([r.test_accuracy for r in reference], abs=1e-6)


@pytest.mark.slow
def test_flower_resume_keeps_counting_epsilon_across_the_restart(killed_and_resumed):
    from fedmnist.privacy import PrivacyAccountant

    out, killed_at, reference, _ = killed_and_resumed
    rows = json.loads((out / "metricas_por_ronda.json").read_text())["rounds"]
    accountant = PrivacyAccountant(1.0, 2, 2, rows[0]["delta"])
    expected = [accountant.epsilon(t) for t in range(1, 5)]
    assert [r["epsilon"] for r in rows] == [r.epsilon for r in reference] == expected
    assert rows[killed_at]["epsilon"] > rows[killed_at - 1]["epsilon"]  # the first round after the restart adds to ε
