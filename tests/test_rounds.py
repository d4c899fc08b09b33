"""Tests of fedmnist.rounds: the shared round loop over fake clients, its sampling, DP stop and writer."""

from __future__ import annotations

import json
from dataclasses import asdict

import numpy as np
import pytest

from fedmnist.checkpoint import CHECKPOINT_FILE, CheckpointSpec, load_state, state_bytes
from fedmnist.errors import ConfigError
from fedmnist.methods import MethodConfig, build_methods
from fedmnist.rounds import (
    Gathered,
    LoopConfig,
    RoundWriter,
    check_privacy_target,
    run_rounds,
    sample_round,
    with_dp,
)
from fedmnist.seeds import SAMPLING, sample_positions
from fedmnist.server import Reply, Server, ServerState

SEED = 42
K = 6


@pytest.fixture(scope="module")
def start() -> list[np.ndarray]:
    """The CNN's shapes, filled with small deterministic values (no Keras needed to make them)."""
    from fedmnist.model import weight_spec

    rng = np.random.default_rng(0)
    return [rng.normal(0, 0.05, shape).astype(np.float32) for _, shape, _ in weight_spec()]


class FakeClients:
    """Clients 1..K that 'train' by adding 0.001·k to every weight and claim 10·k examples."""

    def __init__(self, num_clients: int = K):
        self.num_clients = num_clients
        self.calls: list[tuple[int, list[int], list[tuple[str, ...]]]] = []

    def candidates(self, round_):
        return list(range(1, self.num_clients + 1))

    def record_fields(self, sampled):
        return {"sampled_clients": sampled}

    def exchange(self, round_, sampled, batches):
        self.calls.append((round_, list(sampled), [b.methods for b in batches]))
        return [Gathered([Reply(k, [w + np.float32(0.001 * k) for w in b.start], 10 * k, f"client {k}",
                                b.start_sha256) for k in sampled]) for b in batches]


def _writer(tmp_path, spec: CheckpointSpec) -> RoundWriter:
    return RoundWriter(tmp_path, "--out directory", lambda s: state_bytes(spec, s))


def _spec(methods, rounds: int = 3, **settings) -> CheckpointSpec:
    return CheckpointSpec({"seed": SEED, "fraction": 0.5, "rounds": rounds, **settings}, "d" * 64, tuple(methods),
                          rounds, frozenset({"rounds"}))


def test_the_loop_samples_batches_steps_and_checkpoints_every_round(tmp_path, start):
    # Prepare: FedAvg and FedMed share round 1's start, then part
    methods = build_methods(MethodConfig(("fedavg", "fedmed")))
    server = Server(methods, ServerState.initial(methods, start))
    clients = FakeClients()
    seen = []

    # Execute
    last = run_rounds(server, clients, LoopConfig(3, 0.5, SEED), _writer(tmp_path, _spec(methods)),
                      lambda r, rows: seen.append((r, [row.method for row in rows])))

    # Assert: three rounds, ⌊C·K⌋ = 3 clients drawn by (seed, round), one training per distinct start
    assert last == 3 and seen == [(r, ["fedavg", "fedmed"]) for r in (1, 2, 3)]
    assert [c[1] for c in clients.calls] == [[p + 1 for p in sample_positions(K, 0.5, SEED, r)] for r in (1, 2, 3)]
    assert [c[2] for c in clients.calls] == [[("fedavg", "fedmed")], [("fedavg",), ("fedmed",)],
                                             [("fedavg",), ("fedmed",)]]
    expected = [w.astype(np.float64) for w in start]
    for _, sampled, _ in clients.calls:  # FedAvg: the example-weighted mean of start + 0.001·k
        shift = sum(10 * k * 0.001 * k for k in sampled) / sum(10 * k for k in sampled)
        expected = [w + shift for w in expected]
    for got, want in zip(server.state.weights["fedavg"], expected):
        np.testing.assert_allclose(got, want, atol=1e-5)
    # the checkpoint and the metrics of the last round are on disk, and the checkpoint restores the state
    restored = load_state(tmp_path / CHECKPOINT_FILE, _spec(methods))
    assert restored.round == 3 and [asdict(r) for r in restored.history] == [asdict(r) for r in server.state.history]
    assert all(np.array_equal(a, b) for a, b in zip(restored.weights["fedmed"], server.state.weights["fedmed"]))
    assert len(json.loads((tmp_path / "metricas_por_ronda.json").read_text())["rounds"]) == 6
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_a_run_resumed_from_the_loops_checkpoint_equals_an_uninterrupted_one(tmp_path, start):
    methods = build_methods(MethodConfig(("fedadam",)))  # a server optimiser: its moments must come back
    whole = Server(methods, ServerState.initial(methods, start))
    run_rounds(whole, FakeClients(), LoopConfig(3, 0.5, SEED), _writer(tmp_path / "whole", _spec(methods)))

    class Killed(Exception):
        pass

    def kill(round_, rows):
        if round_ == 1:
            raise Killed

    cut = Server(methods, ServerState.initial(methods, start))
    with pytest.raises(Killed):
        run_rounds(cut, FakeClients(), LoopConfig(3, 0.5, SEED), _writer(tmp_path / "cut", _spec(methods)), kill)
    state = load_state(tmp_path / "cut" / CHECKPOINT_FILE, _spec(methods))
    resumed = Server(methods, state)
    clients = FakeClients()
    run_rounds(resumed, clients, LoopConfig(3, 0.5, SEED), _writer(tmp_path / "cut", _spec(methods)))

    assert [c[0] for c in clients.calls] == [2, 3]
    assert all(np.array_equal(a, b) for a, b in zip(resumed.state.weights["fedadam"], whole.state.weights["fedadam"]))
    assert [r.comparable() for r in resumed.state.history] == [r.comparable() for r in whole.state.history]


def test_the_loop_stops_before_the_target_epsilon_and_samples_poisson_under_dp(tmp_path, start):
    from fedmnist.privacy import DPConfig, PrivacyAccountant, poisson_sample

    accountant = PrivacyAccountant(1.0, 10, 5, 1e-5, sampling="poisson")
    target = (accountant.epsilon(2) + accountant.epsilon(3)) / 2
    dp = DPConfig(1.0, 1.0, delta=1e-5, target_epsilon=target, sampling="poisson")
    methods = with_dp(build_methods(MethodConfig(("fedavg",))), dp, 10, 5, SEED)
    server = Server(methods, ServerState.initial(methods, start))
    clients = FakeClients(10)

    run_rounds(server, clients, LoopConfig(5, 0.5, SEED, target_epsilon=target), _writer(tmp_path, _spec(methods)))

    rows = server.history("fedavg")
    assert [r.round for r in rows] == [1, 2]  # a third round would spend more than the target
    assert [r.epsilon for r in rows] == [accountant.epsilon(1), accountant.epsilon(2)]
    for round_, sampled, _ in clients.calls:  # each client with probability q = 5/10, drawn by (seed, round)
        draw = poisson_sample(10, 0.5, np.random.default_rng([SEED, SAMPLING, round_]))
        assert sampled == [p + 1 for p in draw]
    with pytest.raises(ConfigError, match="already exceeded"):
        check_privacy_target(methods, server.state, accountant.epsilon(1))


def test_sample_round_is_seeded_over_sorted_ids_or_secret():
    nodes = [907, 12, 5566, 3, 41]
    for round_ in (1, 2, 3):
        assert sample_round(nodes, 0.4, round_, SEED) == [sorted(nodes)[p]
                                                          for p in sample_positions(5, 0.4, SEED, round_)]
    assert sample_round(nodes, 0.4, 1, SEED) == sample_round(list(reversed(nodes)), 0.4, 1, SEED)
    secret = {tuple(sample_round(nodes, 0.4, 1, None)) for _ in range(30)}
    assert len(secret) > 1 and all(len(s) == 2 for s in secret)
    assert sample_round(nodes, 1.0, 1, SEED, rate=1.0) == sorted(nodes)
    assert sample_round(nodes, 1.0, 1, SEED, rate=0.0) == []



class ReplyLessClients(FakeClients):
    """FakeClients whose round ``silent`` replies come from the wrong start (all refused by the server)."""

    def __init__(self, num_clients: int, silent: int):
        super().__init__(num_clients)
        self.silent = silent

    def exchange(self, round_, sampled, batches):
        gathered = super().exchange(round_, sampled, batches)
        if round_ == self.silent:
            for got in gathered:
                for reply in got.replies:
                    reply.start_sha256 = "0" * 64
        return gathered


def test_a_dp_round_without_valid_replies_releases_noise_and_is_charged_to_epsilon(tmp_path, start):
    from fedmnist.privacy import DPConfig, PrivacyAccountant
    from fedmnist.seeds import server_rng

    # Prepare: DP-FedAvgM (server momentum on the noised mean), 10 clients, 5 a round, every reply of round 2 refused
    dp = DPConfig(1.0, 0.05, delta=1e-5, sampling="poisson")
    methods = with_dp(build_methods(MethodConfig(("fedavgm",), server_momentum=0.5)), dp, 10, 5, SEED)
    spec = _spec(methods)
    server = Server(methods, ServerState.initial(methods, start))
    clients = ReplyLessClients(10, silent=2)
    seen = {}

    # Execute
    run_rounds(server, clients, LoopConfig(3, 0.5, SEED), _writer(tmp_path, spec),
               lambda r, rows: seen.setdefault(r, [w.copy() for w in server.weights("fedavgm")]))

    # Assert: three rounds, three releases: ε after round 2 is the accountant's for two rounds
    accountant = PrivacyAccountant(1.0, 10, 5, 1e-5, sampling="poisson")
    rows = server.history("fedavgm")
    assert rows[1].num_replies == 0 and rows[1].num_sampled > 0
    assert [r.epsilon for r in rows] == [accountant.epsilon(t) for t in (1, 2, 3)]
    assert server.state.method_state["fedavgm"]["releases"] == 3
    assert any("released its noise alone" in n for n in rows[1].notes)
    # round 2 released w + β·m + z·S·ξ/m: the noise alone, through the server momentum (state "server")
    noise = server_rng(SEED, 2)
    xi = [noise.standard_normal(w.shape) for w in start]
    momentum = [b - a for a, b in zip(seen[1], start)]  # round 1's buffer: m₁ = w₀ − w₁ (zero buffer before)
    expected = [w1 - 0.5 * m1 + 1.0 * 0.05 * x / 5 for w1, m1, x in zip(seen[1], momentum, xi)]
    for got, want in zip(seen[2], expected):
        np.testing.assert_allclose(got, want, rtol=0, atol=2e-6)
    # the checkpoint restores it, and a checkpoint that did not charge a round is refused
    restored = load_state(tmp_path / CHECKPOINT_FILE, spec)
    assert restored.method_state["fedavgm"]["releases"] == 3 and restored.method_state["fedavgm"]["server"]["t"] == 3
    undercharged = ServerState(3, restored.weights, {"fedavgm": {**restored.method_state["fedavgm"], "releases": 2}},
                               restored.history)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / CHECKPOINT_FILE).write_bytes(state_bytes(spec, undercharged))
    with pytest.raises(ConfigError, match="counts 2 noised rounds, not the 3 completed"):
        load_state(tmp_path / "bad" / CHECKPOINT_FILE, spec)


def test_a_dp_run_resumed_across_a_round_without_replies_equals_an_uninterrupted_one(tmp_path, start):
    from fedmnist.privacy import DPConfig

    dp = DPConfig(1.0, 0.05, delta=1e-5, sampling="poisson")
    methods = with_dp(build_methods(MethodConfig(("fedavgm",), server_momentum=0.5)), dp, 10, 5, SEED)
    whole = Server(methods, ServerState.initial(methods, start))
    run_rounds(whole, ReplyLessClients(10, 2), LoopConfig(3, 0.5, SEED), _writer(tmp_path / "whole", _spec(methods)))

    class Killed(Exception):
        pass

    def kill(round_, rows):
        if round_ == 2:
            raise Killed

    cut = Server(methods, ServerState.initial(methods, start))
    with pytest.raises(Killed):
        run_rounds(cut, ReplyLessClients(10, 2), LoopConfig(3, 0.5, SEED), _writer(tmp_path / "cut", _spec(methods)),
                   kill)
    resumed = Server(methods, load_state(tmp_path / "cut" / CHECKPOINT_FILE, _spec(methods)))
    run_rounds(resumed, ReplyLessClients(10, 2), LoopConfig(3, 0.5, SEED), _writer(tmp_path / "cut", _spec(methods)))

    assert all(np.array_equal(a, b) for a, b in zip(resumed.state.weights["fedavgm"], whole.state.weights["fedavgm"]))
    assert [r.comparable() for r in resumed.state.history] == [r.comparable() for r in whole.state.history]
