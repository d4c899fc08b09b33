"""Tests for secure aggregation: the arithmetic (fedmnist.secure_aggregation) and the SecAgg+ protocol over
Flower's primitives (fedmnist.flower_secagg), run in process with a fake exchange that may drop nodes."""

from __future__ import annotations

import dataclasses
import math
import re

import numpy as np
import pytest
from scipy import stats

from fedmnist.errors import ConfigError
from fedmnist.flower_secagg import (
    MASKED,
    bytes_to_vector,
    client_stage,
    neighbour_graph,
    run_server,
)
from fedmnist.privacy import DPConfig
from fedmnist.secure_aggregation import (
    ROBUST_RULES,
    SETTINGS,
    Composition,
    Contribution,
    SecAggConfig,
    SecureAggregationAborted,
    SecureAggregationError,
    VectorLayout,
    aggregate_in_clear,
    check_method_compatible,
    decode_sum,
    encode_contribution,
    quantize,
    rounding_slack,
    sum_vectors,
)
from fedmnist.seeds import quantization_rng, secagg_graph_rng

SEED = 7
SETUP, SHARE, COLLECT, UNMASK = "setup", "share_keys", "collect_masked_vectors", "unmask"
SHAPES = [(2, 3), (3,)]


class FakeExchange:
    """In-process transport: every node keeps its state dict; ``vanish[nid] = stage`` drops the node from
    that stage on (it never answers again); a node whose handler raises answers nothing (an error reply);
``received`` records what the server got, per stage."""

    def __init__(self, vectors: dict[int, np.ndarray], vanish: dict[int, str] | None = None):
        self.vectors, self.vanish = vectors, vanish or {}
        self.states: dict[int, dict] = {nid: {} for nid in vectors}
        self.received: dict[str, dict[int, dict]] = {}
        self.stages: list[str] = []
        self.errors: dict[int, str] = {}

    def __call__(self, stage: str, payloads: dict[int, dict]) -> dict[int, dict]:
        order = [SETUP, SHARE, COLLECT, UNMASK]
        self.stages.append(stage)
        replies = {}
        for nid, payload in payloads.items():
            if nid in self.vanish and order.index(stage) >= order.index(self.vanish[nid]):
                continue
            try:
                reply, self.states[nid] = client_stage(payload, self.states[nid], nid, self.vectors[nid])
            except SecureAggregationError as exc:  # the node answers with an error: a dropout to the server
                self.errors[nid] = str(exc)
                continue
            replies[nid] = reply
        self.received[stage] = replies
        return replies


def contributions(n: int, seed: int, scale: float = 0.3) -> list[Contribution]:
    rng = np.random.default_rng(seed)
    return [Contribution([rng.normal(0, scale, s) for s in SHAPES], int(rng.integers(5, 50))) for _ in range(n)]


def encoded(contribs, layout, config, round_=1):
    return [encode_contribution(c, layout, config, quantization_rng(SEED, round_, i + 1)) for i, c in enumerate(contribs)]


def run(vectors: list[np.ndarray], config: SecAggConfig, layout: VectorLayout, vanish=None):
    node_ids = [1000 + 17 * i for i in range(len(vectors))]  # Flower node ids are arbitrary integers
    fake = FakeExchange(dict(zip(node_ids, vectors)), {node_ids[i]: s for i, s in (vanish or {}).items()})
    params = config.for_sample(len(vectors), layout)
    result = run_server(node_ids, fake, params, layout.size, secagg_graph_rng(SEED, 1))
    return result, fake, node_ids


LAYOUT = VectorLayout(tuple(SHAPES), Composition())


def assert_looks_uniform_and_uncorrelated(masked: np.ndarray, vector: np.ndarray, modulus: int) -> None:
    """``masked`` is uniform in [0, M) (chi-square over 64 bins and Kolmogorov-Smirnov, at 1e-6) and uncorrelated
    with the true encoding ``vector`` (|r| below 5 standard errors); equal coordinates no likelier than chance."""
    counts = np.bincount((masked * 64) // modulus, minlength=64)
    assert stats.chisquare(counts).pvalue > 1e-6
    assert stats.kstest(masked / modulus, "uniform").pvalue > 1e-6
    assert abs(np.corrcoef(masked, vector)[0, 1]) < 5 / np.sqrt(vector.size)
    assert np.count_nonzero(masked == vector) <= 3 + 10 * vector.size / modulus


# --- the protocol --------------------------------------------------------------------------------


@pytest.mark.parametrize("num_nodes", [3, 5])
def test_secure_aggregation_engine_unmasks_exactly_the_plain_quantised_sum(num_nodes):
    config = SecAggConfig(enabled=True)
    vectors = encoded(contributions(num_nodes, 1), LAYOUT, config)
    result, fake, node_ids = run(vectors, config, LAYOUT)
    np.testing.assert_array_equal(result.total, sum_vectors(vectors, config.modulus))
    assert result.contributors == tuple(sorted(node_ids)) and result.dropped == ()
    assert fake.stages == [SETUP, SHARE, COLLECT, UNMASK]


def test_secure_aggregation_sparse_secaggplus_ring_unmasks_the_sum_with_a_dropout():
    config = SecAggConfig(enabled=True, num_shares=3, threshold=2)
    vectors = encoded(contributions(5, 2), LAYOUT, config)
    graph = neighbour_graph([1, 2, 3, 4, 5], 3, secagg_graph_rng(SEED, 1))
    assert all(len(g) == 3 and n in g for n, g in graph.items())  # a ring: itself and one on each side
    result, _, node_ids = run(vectors, config, LAYOUT, vanish={4: COLLECT})
    np.testing.assert_array_equal(result.total, sum_vectors(vectors[:4], config.modulus))
    assert result.dropped == (node_ids[4],)


@pytest.mark.parametrize("stage", [COLLECT, UNMASK])
def test_secure_aggregation_tolerates_a_dropout_after_the_key_exchange(stage):
    config = SecAggConfig(enabled=True, threshold=3)
    vectors = encoded(contributions(4, 3), LAYOUT, config)
    result, _, node_ids = run(vectors, config, LAYOUT, vanish={2: stage})
    # Vanishing before its masked vector: the survivors' sum (its pairwise masks removed with its
    # rebuilt key). Vanishing at unmask: its vector is in, its mask seed is rebuilt from 3 shares.
    kept = [v for i, v in enumerate(vectors) if i != 2] if stage == COLLECT else vectors
    np.testing.assert_array_equal(result.total, sum_vectors(kept, config.modulus))
    assert (node_ids[2] in result.contributors) == (stage == UNMASK)
    decoded = decode_sum(result.total, len(result.contributors), LAYOUT, config)
    assert decoded.total_weight == sum(int(v[0]) for v in kept)


def test_secure_aggregation_node_refuses_forged_shares_and_counts_as_a_dropout():
    config = SecAggConfig(enabled=True)
    vectors = encoded(contributions(3, 6), LAYOUT, config)
    fake = FakeExchange(dict(zip([1, 2, 3], vectors)))

    def tampering(stage, payloads):
        if stage == COLLECT:  # the server alters one ciphertext forwarded to node 3
            ciphertexts = list(payloads[3]["ctxts"])
            ciphertexts[0] = ciphertexts[0][:-2] + b"AA"
            payloads = {**payloads, 3: {**payloads[3], "ctxts": ciphertexts}}
        return fake(stage, payloads)

    result = run_server([1, 2, 3], tampering, config.for_sample(3, LAYOUT), LAYOUT.size, secagg_graph_rng(SEED, 1))
    assert "do not decrypt" in fake.errors[3]
    assert result.contributors == (1, 2)
    np.testing.assert_array_equal(result.total, sum_vectors(vectors[:2], config.modulus))


def test_secure_aggregation_below_the_threshold_fails_cleanly():
    config = SecAggConfig(enabled=True, threshold=3)
    vectors = encoded(contributions(4, 4), LAYOUT, config)
    node_ids = [1, 2, 3, 4]
    fake = FakeExchange(dict(zip(node_ids, vectors)), {1: COLLECT, 4: COLLECT})
    params = config.for_sample(4, LAYOUT)
    with pytest.raises(SecureAggregationAborted, match="'collect_masked_vectors': 2 of 4 sampled nodes answered"):
        run_server(node_ids, fake, params, LAYOUT.size, secagg_graph_rng(SEED, 1))
    assert fake.stages == [SETUP, SHARE, COLLECT]  # no unmasking, nothing aggregated


def test_secure_aggregation_fails_when_unmask_shares_are_missing():
    config = SecAggConfig(enabled=True, threshold=3)
    vectors = encoded(contributions(4, 5), LAYOUT, config)
    with pytest.raises(SecureAggregationAborted, match="below the threshold"):
        run(vectors, config, LAYOUT, vanish={0: UNMASK, 1: UNMASK})


def test_secure_aggregation_masked_vectors_look_uniform_and_uncorrelated_with_the_update():
    """What the server receives in the masking stage: residues uniform in [0, M) (chi-square over 64 bins
    and Kolmogorov-Smirnov, at 1e-6: the masks come from fresh keys), uncorrelated with the true encoding."""
    config = SecAggConfig(enabled=True)
    layout = VectorLayout(((4000,),), Composition())
    rng = np.random.default_rng(11)
    contribs = [Contribution([rng.normal(0.2 * i, 0.1, 4000)], 20) for i in range(3)]
    vectors = encoded(contribs, layout, config)
    result, fake, node_ids = run(vectors, config, layout)
    for nid, vector in zip(node_ids, vectors):
        masked = bytes_to_vector(fake.received[COLLECT][nid][MASKED], layout.size, config.modulus)
        assert_looks_uniform_and_uncorrelated(masked, vector, config.modulus)
        assert not np.any(masked == vector)  # not even one coordinate in the clear
    # The plain encodings are far from uniform: the same tests reject them.
    assert stats.kstest(vectors[0] / config.modulus, "uniform").pvalue < 1e-6
    np.testing.assert_array_equal(result.total, sum_vectors(vectors, config.modulus))


def test_secure_aggregation_node_refuses_a_weak_threshold_and_double_reveals():
    with pytest.raises(SecureAggregationError, match="t > k/2"):
        client_stage({"stage": SETUP, "sample_num": 4, "share_num": 4, "threshold": 2,
                      "mod_range": 2**32}, {}, 9)
    _, state = client_stage({"stage": SETUP, "sample_num": 3, "share_num": 3, "threshold": 2,
                             "mod_range": 2**32}, {}, 9)
    with pytest.raises(SecureAggregationError, match="must follow"):
        client_stage({"stage": UNMASK, "active_nids": [9], "dead_nids": []}, state, 9)
    with pytest.raises(SecureAggregationError, match="both as surviving and as dropped"):
        client_stage({"stage": UNMASK, "active_nids": [9, 4], "dead_nids": [4]},
                     {**state, "stage": COLLECT}, 9)


# --- the arithmetic ------------------------------------------------------------------------------


def clipped(update, r):
    return [np.clip(u, -r, r) for u in update]


@pytest.mark.parametrize("num_members", [2, 3, 5])
def test_secure_aggregation_decoded_mean_equals_the_weighted_mean_within_the_bound(num_members):
    config = SecAggConfig(enabled=True, bits=12, weight_bound=100)  # coarse, so the bound is tested
    contribs = contributions(num_members, 20 + num_members, scale=0.5)  # some coordinates beyond R = 1
    rngs = [quantization_rng(SEED, 3, i + 1) for i in range(num_members)]
    agg = aggregate_in_clear(contribs, rngs, LAYOUT, config)
    n = np.array([c.num_examples for c in contribs])
    expected = [sum(k * clipped(c.update, 1.0)[j] for k, c in zip(n, contribs)) / n.sum() for j in range(2)]
    step = 2.0 / (2**12 - 1)
    assert agg.total_weight == n.sum() and agg.num_contributors == num_members
    assert agg.error_bound == pytest.approx(num_members * step * 100 / n.sum())
    for got, want in zip(agg.mean_update, expected):
        assert np.max(np.abs(got - want)) <= agg.error_bound + 1e-12
    assert agg.saturated == sum(int(np.sum(np.abs(u) > 1.0)) for c in contribs for u in c.update)
    global_weights = [np.ones(s, np.float32) for s in SHAPES]
    np.testing.assert_allclose(agg.apply(global_weights)[0], 1 + agg.mean_update[0], rtol=1e-6)
    assert agg.apply(global_weights)[0].dtype == np.float32


def test_secure_aggregation_equal_weights_scaffold_and_bits_ride_along():
    config = SecAggConfig(enabled=True, bits=10, control_range=2.0)
    rng = np.random.default_rng(5)
    dp_layout = VectorLayout(tuple(SHAPES), Composition(weighted=False, unclipped_bit=True))
    members = [Contribution([rng.normal(0, 0.1, s) for s in SHAPES], 30 + i, unclipped=i != 1) for i in range(3)]
    agg = aggregate_in_clear(members, [quantization_rng(SEED, 1, i) for i in range(3)], dp_layout, config)
    assert agg.total_weight == 3 and agg.unclipped_count == 2  # counts do not weigh; the bits are summed
    for i, member in enumerate(members):  # rounding moves one member's update by less than Δ·√d in L2
        alone = decode_sum(encode_contribution(member, dp_layout, config, quantization_rng(SEED, 1, i)), 1,
                           dp_layout, config)
        moved = np.sqrt(sum(np.sum((a - u) ** 2) for a, u in zip(alone.update_sum, member.update)))
        assert 0 < moved < rounding_slack(dp_layout, config) == pytest.approx(config.step(1.0) * 3)
    for j in range(2):
        want = sum(m.update[j] for m in members)
        assert np.max(np.abs(agg.update_sum[j] - want)) <= 3 * config.step(1.0) + 1e-12
    sc_layout = VectorLayout(tuple(SHAPES), Composition(control=True))
    members = [Contribution([rng.normal(0, 0.1, s) for s in SHAPES], 10, [rng.normal(0, 1, s) for s in SHAPES])
               for _ in range(3)]
    agg = aggregate_in_clear(members, [quantization_rng(SEED, 1, i) for i in range(3)], sc_layout, config)
    for j in range(2):
        want = sum(np.clip(m.control_delta[j], -2, 2) for m in members)
        assert np.max(np.abs(agg.control_delta_sum[j] - want)) <= agg.control_error_bound + 1e-12


def test_secure_aggregation_encoding_is_seeded_per_member_and_equals_flowers_quantiser():
    from flwr.common.secure_aggregation.quantization import quantize as flower_quantize

    config = SecAggConfig(enabled=True)
    member = contributions(1, 9)[0]
    first = encode_contribution(member, LAYOUT, config, quantization_rng(SEED, 2, 1))
    np.testing.assert_array_equal(first, encode_contribution(member, LAYOUT, config, quantization_rng(SEED, 2, 1)))
    assert not np.array_equal(first, encode_contribution(member, LAYOUT, config, quantization_rng(SEED, 2, 3)))
    values = np.random.default_rng(2).normal(0, 2, 50)
    saved = np.random.get_state()
    try:
        np.random.seed(4)
        theirs = flower_quantize([values], 1.5, 2**10 - 1)[0]
        np.random.seed(4)
        ours = quantize(values, 1.5, 2**10 - 1, np.random.rand(50))
    finally:
        np.random.set_state(saved)
    np.testing.assert_array_equal(ours, theirs)


def test_secure_aggregation_refuses_bad_contributions():
    config = SecAggConfig(enabled=True, weight_bound=40)
    update = [np.zeros(s) for s in SHAPES]
    with pytest.raises(SecureAggregationError, match="exceeds secagg-weight-bound 40"):
        encode_contribution(Contribution(update, 41), LAYOUT, config, np.random.default_rng(0))
    with pytest.raises(SecureAggregationError, match="non-finite"):
        encode_contribution(Contribution([np.full((2, 3), np.nan), np.zeros(3)], 4), LAYOUT, config,
                            np.random.default_rng(0))
    with pytest.raises(SecureAggregationError, match="control-variate delta"):
        encode_contribution(Contribution(update, 4), VectorLayout(tuple(SHAPES), Composition(control=True)),
                            config, np.random.default_rng(0))
    with pytest.raises(SecureAggregationError, match="cannot come from 2 members"):
        decode_sum(np.zeros(LAYOUT.size, np.int64), 2, LAYOUT, config)


# --- settings and what composes ------------------------------------------------------------------


@pytest.mark.parametrize("settings, sampled, message", [
    ({"threshold": 4}, 3, "secagg-threshold 4 is above the 3 nodes sampled"),
    ({"num_shares": 5}, 4, "secagg-num-shares 5 is above the 4 nodes"),
    ({"num_shares": 4}, 6, "must be odd"),
    ({"threshold": 2}, 4, "must exceed half"),
    ({}, 1, "at least 2 sampled nodes"),
    ({"bits": 30}, 5, "could wrap modulo"),
])
def test_secure_aggregation_settings_inconsistent_with_the_sample(settings, sampled, message):
    with pytest.raises(ConfigError, match=message):
        SecAggConfig(enabled=True, **settings).for_sample(sampled, LAYOUT)


@pytest.mark.parametrize("settings, message", [
    ({"num_shares": 3, "threshold": 4}, "above the 3 shares"),
    ({"threshold": 1}, "secagg-threshold must be an integer >= 2"),
    ({"modulus": 1000}, "power of two"),
    ({"bits": 32}, "secagg-bits"),
    ({"clip_range": 0.0}, "secagg-clip-range"),
    ({"weight_bound": 2**31}, "secagg-weight-bound"),
])
def test_secure_aggregation_settings_rejected_on_creation(settings, message):
    with pytest.raises(ConfigError, match=message):
        SecAggConfig(**settings)


def test_secure_aggregation_settings_from_run_config():
    config = SecAggConfig.from_settings({"secure-aggregation": True, "secagg-num-shares": 0, "secagg-threshold": 3,
                                         "secagg-clip-range": 2, "num-server-rounds": 5})
    assert config == SecAggConfig(enabled=True, threshold=3, clip_range=2.0)
    assert SecAggConfig.from_settings({}) == SecAggConfig()
    assert {name for _, name, *_ in SETTINGS} == {f.name for f in dataclasses.fields(SecAggConfig)}
    defaults = SecAggConfig()  # the declaration's defaults are the dataclass's (0 = unset)
    assert {name: (None if d == 0 and name in ("num_shares", "threshold") else d) for _, name, _, d, _ in SETTINGS} \
        == {name: getattr(defaults, name) for _, name, *_ in SETTINGS}
    with pytest.raises(ConfigError, match="secagg-bits"):
        SecAggConfig.from_settings({"secagg-bits": "22"})


def test_secure_aggregation_default_threshold_is_a_majority_of_the_shares():
    assert SecAggConfig().for_sample(4, LAYOUT).threshold == 3
    assert SecAggConfig(num_shares=3).for_sample(10, LAYOUT).threshold == 2


@pytest.mark.parametrize("method", sorted(ROBUST_RULES))
def test_secure_aggregation_refuses_rules_that_see_individual_updates(method):
    with pytest.raises(ConfigError, match=f"{method} cannot run on a sum"):
        check_method_compatible(method)


def test_secure_aggregation_refuses_server_clipping_and_the_count_cap():
    with pytest.raises(ConfigError, match="server-side DP clipping"):
        check_method_compatible("fedavg", DPConfig(1.0, 0.5, side="server"))
    with pytest.raises(ConfigError, match="max-count-ratio"):
        check_method_compatible("fedavg", max_count_ratio=3.0)
    with pytest.raises(ConfigError, match="wraps only"):
        check_method_compatible("fedadam", DPConfig(1.0, 0.5, side="client"))


@pytest.mark.parametrize("method, dp, want", [
    ("fedavg", None, Composition()),
    ("fedprox", None, Composition()),
    ("fedyogi", None, Composition()),
    ("scaffold", None, Composition(control=True)),
    ("fedavg", DPConfig(1.0, 0.5, side="client"), Composition(weighted=False)),
    ("fedprox", DPConfig(1.0, 0.5, side="client", adaptive=True), Composition(weighted=False, unclipped_bit=True)),
])
def test_secure_aggregation_accepts_methods_that_need_only_the_sum(method, dp, want):
    assert check_method_compatible(method, dp) == want


def test_secure_aggregation_arithmetic_imports_no_flower():
    """The simulation twin shares the arithmetic without Flower: only ``flower_secagg`` opens that door."""
    import subprocess
    import sys

    code = ("import sys, fedmnist.secure_aggregation, fedmnist.seeds; "
            "sys.exit(any(m == 'flwr' or m.startswith('flwr.') for m in sys.modules))")
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0



# --- the server step on a securely aggregated sum (Server.step_secure, Method.aggregate_sum) ---------

ROUND = 1
EPS32 = float(np.finfo(np.float32).eps)


@pytest.fixture(scope="module")
def cnn_start():
    from fedmnist.model import initial_weights

    return initial_weights(3)


def _members(start, scales, seed=11):
    """Members' trained weights: the global weights plus a Gaussian update of each scale (float32)."""
    rng = np.random.default_rng(seed)
    return [[(w + rng.normal(0, s, w.shape)).astype(np.float32) for w in start] for s in scales]


def _server(method, start, **kwargs):
    from fedmnist.server import Server, ServerState

    return Server([method], ServerState.initial([method], start), **kwargs)


def _secure_aggregate(method, start, trained, counts, *, controls=None, bits=None, config=None):
    """``aggregate_in_clear`` of the members, encoded with ``method``'s composition."""
    layout = VectorLayout.of(start, method.secure_composition())
    contribs = [Contribution.from_weights(w, start, n, None if controls is None else controls[i],
                                          None if bits is None else bits[i])
                for i, (w, n) in enumerate(zip(trained, counts))]
    rngs = [quantization_rng(SEED, ROUND, k) for k in range(1, len(trained) + 1)]
    return aggregate_in_clear(contribs, rngs, layout, config or SecAggConfig(weight_bound=100))


def _plain_and_secure(method, start, trained, counts, *, controls=None, bits=None, config=None):
    """The same round on two fresh servers, ``Server.step`` over the replies and ``Server.step_secure``
    over their secure aggregate: (plain result, secure result, aggregate, plain server, secure server)."""
    from fedmnist.model import weights_sha256
    from fedmnist.server import Reply

    ids = list(range(1, len(trained) + 1))
    replies = [Reply(k, w, n, f"client {k}", weights_sha256(start), 0.5,
                     metrics={} if bits is None else {"unclipped": bits[i]},
                     control_delta=None if controls is None else controls[i])
               for i, (k, w, n) in enumerate(zip(ids, trained, counts))]
    agg = _secure_aggregate(method, start, trained, counts, controls=controls, bits=bits, config=config)
    plain_server, secure_server = _server(method, start), _server(method, start)
    plain = plain_server.step(ROUND, method.name, replies, sampled_clients=ids)
    secure = secure_server.step_secure(ROUND, method.name, agg, sampled_clients=ids, replied_clients=ids,
                                       train_loss=0.5)
    return plain, secure, agg, plain_server, secure_server


def _max_diff(a, b) -> float:
    return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)))) for x, y in zip(a, b))


def _f32_slack(weights) -> float:
    """A few float32 roundings of the largest weight: what two float32 computations of one value may differ by."""
    return 4 * EPS32 * max(1.0, *(float(np.max(np.abs(w))) for w in weights))


def _same_record(plain, secure):
    for name in ("round", "method", "num_sampled", "num_replies", "sampled_clients", "replied_clients",
                 "malicious_sampled", "sampled_nodes", "mu", "start_sha256", "epsilon", "delta", "train_loss"):
        assert getattr(secure.record, name) == getattr(plain.record, name), name
    assert secure.accepted == [] and secure.rejected == {}


@pytest.mark.parametrize("name", ["fedavg", "fedprox", "fedavgm", "fedadam"])
def test_secure_aggregation_round_equals_the_plain_round_for_the_weighted_methods(name, cnn_start):
    from fedmnist.methods import MethodConfig, build_methods

    method = build_methods(MethodConfig((name,), mu=0.1))[0]
    counts = [40, 7, 25]
    plain, secure, agg, plain_server, secure_server = _plain_and_secure(
        method, cnn_start, _members(cnn_start, [0.01, 0.02, 0.005]), counts)
    assert agg.total_weight == sum(counts) and agg.num_contributors == 3 and agg.saturated == 0
    assert secure.record.notes == []
    assert agg.error_bound < 1e-3 * 0.005  # far below the smallest update's scale
    # e: how far the decoded average may be from the plain one; the step multiplies it by at most its
    # slope L: 1 for FedAvg/FedProx, η for FedAvgM's first step (m = Δ), η_t·(1−β₁)/τ for FedAdam's
    # first step x + η_t·(1−β₁)Δ/(√(1−β₂)·|Δ| + τ)
    slack = _f32_slack(cnn_start)
    e = agg.error_bound + slack
    opt = getattr(method, "optimizer", None)
    slope = 1.0
    if name == "fedavgm":
        slope = opt.server_lr
    elif name == "fedadam":
        slope = opt.server_lr * math.sqrt(1 - opt.beta_2 ** 2) / (1 - opt.beta_1 ** 2) * (1 - opt.beta_1) / opt.tau
    assert _max_diff(secure.weights, plain.weights) <= slope * e + slack
    assert _max_diff(secure.weights, cnn_start) > 1e-3  # the round moved the model
    assert secure_server.weights(name) is secure.weights and secure_server.state.history == [secure.record]
    _same_record(plain, secure)
    plain_state, secure_state = plain_server.state.method_state[name], secure_server.state.method_state[name]
    if opt is None:
        assert plain_state == secure_state == {}
        return
    assert secure_state["t"] == plain_state["t"] == 1 and secure_state["method"] == plain_state["method"]
    momentum_scale = 1.0 if name == "fedavgm" else 1 - opt.beta_1  # m = Δ (FedAvgM: −Δ), m = (1−β₁)Δ
    assert _max_diff(secure_state["m"], plain_state["m"]) <= momentum_scale * e + slack
    if name == "fedadam":  # v = (1−β₂)Δ², within (1−β₂)(2|Δ| + e)e
        delta = max(float(np.max(np.abs(m))) for m in plain_state["m"]) / momentum_scale
        assert _max_diff(secure_state["v"], plain_state["v"]) <= (1 - opt.beta_2) * (2 * delta + e) * e + slack


@pytest.mark.parametrize("num_clients", [None, 5])
def test_secure_aggregation_scaffold_round_divides_the_control_sum_by_the_federation(num_clients, cnn_start):
    from fedmnist.methods import MethodConfig, build_methods

    method = build_methods(MethodConfig(("scaffold",), server_lr=0.8), num_clients=num_clients)[0]
    rng = np.random.default_rng(5)
    controls = [[rng.normal(0, 0.5, w.shape).astype(np.float32) for w in cnn_start] for _ in range(3)]
    plain, secure, agg, plain_server, secure_server = _plain_and_secure(
        method, cnn_start, _members(cnn_start, [0.01, 0.02, 0.005]), [40, 7, 25], controls=controls)
    slack = _f32_slack(cnn_start)
    assert _max_diff(secure.weights, plain.weights) <= 0.8 * (agg.error_bound + slack) + slack
    n = num_clients or 3  # the federation, never the one pseudo-reply
    want = [sum(c[j].astype(np.float64) for c in controls) / n for j in range(len(cnn_start))]
    plain_c = plain_server.state.method_state["scaffold"]["control"]
    secure_c = secure_server.state.method_state["scaffold"]["control"]
    assert _max_diff(plain_c, want) <= slack
    assert _max_diff(secure_c, plain_c) <= agg.control_error_bound / n + slack
    assert agg.control_error_bound / n < 1e-4 * 0.5
    _same_record(plain, secure)


def _dp_method(adaptive: bool, num_clients: int = 6, per_round: int = 3):
    from fedmnist.methods import MethodConfig, build_methods, with_privacy

    dp = DPConfig(0.5, 0.6, adaptive=adaptive, side="client", clipped_count_stddev=1.0 if adaptive else None)
    return with_privacy(build_methods(MethodConfig(("fedavg",)))[0], dp, num_clients, per_round, seed=3)


@pytest.mark.parametrize("adaptive", [False, True])
def test_secure_aggregation_dp_fedavg_round_equals_the_plain_round(adaptive, cnn_start):
    from fedmnist.privacy import clip_client_weights
    from fedmnist.seeds import server_rng

    method = _dp_method(adaptive, per_round=4)  # 4 sampled, 3 reply: both divide by m = 4
    clip = method.client_clip(method.initial_state())
    # update norms about 0.25, 0.5 and 1.0 (d = 390,410 coordinates) against S = 0.6: two fit, one is clipped
    clipped = [clip_client_weights(w, cnn_start, clip) for w in _members(cnn_start, [0.0004, 0.0008, 0.0016])]
    bits = [c.unclipped for c in clipped] if adaptive else None
    assert [c.unclipped for c in clipped] == [True, True, False]
    plain, secure, agg, plain_server, secure_server = _plain_and_secure(
        method, cnn_start, [c.weights for c in clipped], [600, 20, 75], bits=bits)
    assert agg.total_weight == agg.num_contributors == 3  # equal weights: the counts never enter
    assert agg.unclipped_count == (2 if adaptive else None)
    # plain: w + (Σ clip(Δ) + z_Δ·S·ξ)/m; secure: w + (Σ q + z_Δ·(S + slack)·ξ)/m with the same ξ
    m = method.accountant.clients_per_round
    rng = server_rng(method.seed, ROUND)
    if adaptive:
        rng.standard_normal()  # the count's noise is drawn first
    xis = [rng.standard_normal(w.shape) for w in cnn_start]
    xi = max(float(np.max(np.abs(x))) for x in xis)
    z_delta = method.dp.noise_params(m)[0]
    slack = _f32_slack(cnn_start)
    bound = (agg.error_bound * agg.total_weight + z_delta * agg.rounding_slack * xi) / m + slack
    assert 0 < agg.rounding_slack < 1e-3 * clip
    assert _max_diff(secure.weights, plain.weights) <= bound
    want = [g + (u + z_delta * (clip + agg.rounding_slack) * x) / m for g, u, x in zip(cnn_start, agg.update_sum, xis)]
    assert _max_diff(secure.weights, want) <= slack
    assert _max_diff(secure.weights, cnn_start) > 1e-3
    # the same DP state (S's adaptive update saw the same count and the same count noise) and the same ε
    assert secure_server.state.method_state["fedavg"] == plain_server.state.method_state["fedavg"]
    assert (secure_server.state.method_state["fedavg"]["clip"] != clip) == adaptive
    assert secure.record.epsilon == plain.record.epsilon and math.isfinite(secure.record.epsilon) \
        and secure.record.epsilon > 0
    _same_record(plain, secure)


@pytest.mark.parametrize("adaptive", [False, True])
def test_secure_aggregation_dp_sum_step_is_the_reply_step_on_the_summed_updates(adaptive):
    from fedmnist.errors import ValidationError
    from fedmnist.privacy import DPState, client_update, dp_fedavg_step, dp_fedavg_sum_step

    start = [np.zeros((2, 3), np.float32), np.ones(3, np.float32)]
    dp = DPConfig(0.5, 1.0, adaptive=adaptive, side="client", clipped_count_stddev=1.0 if adaptive else None)
    trained = [[start[0] + np.float32(0.1), start[1] - np.float32(0.2)],
               [start[0] - np.float32(0.3), start[1] + np.float32(0.1)]]
    updates = [client_update(w, start) for w in trained]
    total = [np.sum([u[j].astype(np.float64) for u in updates], axis=0) for j in range(2)]
    noise = [np.full((2, 3), 0.5), np.array([1.0, -2.0, 0.0])]
    kwargs = {"num_sampled": 4, "noise": noise, "count_noise": -0.7 if adaptive else None}
    plain = dp_fedavg_step(start, trained, dp, DPState(1.0, 2), unclipped=[True, False] if adaptive else None,
                           **kwargs)
    exact = dp_fedavg_sum_step(start, total, 2, dp, DPState(1.0, 2), num_unclipped=1 if adaptive else None, **kwargs)
    assert _max_diff(exact.weights, plain.weights) == 0 and exact.state == plain.state
    assert exact.noise_std == plain.noise_std and exact.unclipped_fraction == plain.unclipped_fraction
    # a rounding slack s raises only the noise: z_Δ·(S + s) on the sum, m = 4, one release more
    slacked = dp_fedavg_sum_step(start, total, 2, dp, DPState(1.0, 2), slack=0.25,
                                 num_unclipped=1 if adaptive else None, **kwargs)
    z_delta = dp.noise_params(4)[0]
    for j in range(2):
        want = start[j] + (total[j] + z_delta * 1.25 * noise[j]) / 4
        np.testing.assert_allclose(slacked.weights[j], want.astype(np.float32), rtol=0, atol=1e-6)
    assert slacked.noise_std == pytest.approx(z_delta * 1.25 / 4) and slacked.state == DPState(plain.state.clip, 3)
    with pytest.raises(ConfigError, match="needs client-side clipping"):
        dp_fedavg_sum_step(start, total, 2, dataclasses.replace(dp, side="server"), DPState(1.0, 2), **kwargs)
    if adaptive:
        with pytest.raises(ValidationError, match="number of unclipped updates, an integer in \\[0, 2\\]"):
            dp_fedavg_sum_step(start, total, 2, dp, DPState(1.0, 2), num_unclipped=3, **kwargs)


def test_secure_aggregation_dp_refuses_a_sum_of_unclipped_updates(cnn_start):
    from fedmnist.seeds import server_rng

    method = _dp_method(adaptive=False)
    agg = _secure_aggregate(method, cnn_start, _members(cnn_start, [0.004, 0.004, 0.004]), [1, 1, 1])
    server = _server(method, cnn_start)
    before = [w.copy() for w in server.weights("fedavg")]

    # nobody can tell which member did not clip: the whole sum is refused, the run goes on
    step = server.step_secure(ROUND, "fedavg", agg, evaluate=False)

    assert any(re.search(r"refused .*the members did not clip their updates to S = 0\.6", n) for n in step.warnings)
    # the round still releases: the noise alone, w + z·S·ξ/m (the refused sum counts as zero), charged to ε
    m = method.accountant.clients_per_round
    rng = server_rng(method.seed, ROUND)
    want = [b + 0.5 * 0.6 * rng.standard_normal(b.shape) / m for b in before]
    assert _max_diff(server.weights("fedavg"), want) <= _f32_slack(before)
    assert server.state.method_state["fedavg"]["releases"] == 1
    assert step.record.epsilon == method.accountant.epsilon(1)
    assert [r.round for r in server.state.history] == [ROUND]


def _refused(name):
    from fedmnist.methods import MethodConfig, build_methods, with_privacy

    if name == "server-side dp":
        dp = DPConfig(0.5, 0.6, side="server")
        return with_privacy(build_methods(MethodConfig(("fedavg",)))[0], dp, 6, 3, seed=3), "server-side DP clipping"
    return build_methods(MethodConfig((name,), krum_f=0))[0], f"{name} cannot run on a sum: {ROBUST_RULES[name]}"


@pytest.mark.parametrize("name", [*sorted(ROBUST_RULES), "server-side dp", "max-count-ratio"])
def test_secure_aggregation_step_refuses_methods_that_must_see_every_update(name, cnn_start):
    from fedmnist.methods import MethodConfig, build_methods

    fedavg = build_methods(MethodConfig(("fedavg",)))[0]
    agg = _secure_aggregate(fedavg, cnn_start, _members(cnn_start, [0.01, 0.01]), [5, 9])
    if name == "max-count-ratio":
        method, reason = fedavg, "max-count-ratio"
        server = _server(method, cnn_start, max_count_ratio=3.0)
    else:
        method, reason = _refused(name)
        server = _server(method, cnn_start)
    with pytest.raises(ConfigError, match=f"^secure aggregation gives the server only the sum of the updates.*{reason}"):
        server.step_secure(ROUND, method.name, agg)
    if name != "max-count-ratio":
        with pytest.raises(ConfigError, match=reason):
            method.aggregate_sum(cnn_start, agg, method.initial_state())
    assert server.state.history == [] and server.weights(method.name) == list(cnn_start)


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
@pytest.mark.parametrize("spoil", ["nan update", "inf control", "overflowing step"])
def test_secure_aggregation_step_never_adopts_a_non_finite_aggregate(spoil, cnn_start):
    from fedmnist.methods import MethodConfig, build_methods

    name = "scaffold" if spoil == "inf control" else "fedavg"
    method = build_methods(MethodConfig((name,)))[0]
    controls = [[np.zeros(w.shape, np.float32) for w in cnn_start]] * 2 if name == "scaffold" else None
    agg = _secure_aggregate(method, cnn_start, _members(cnn_start, [0.01, 0.01]), [5, 9], controls=controls)
    if spoil == "nan update":
        agg = dataclasses.replace(agg, update_sum=[u.copy() for u in agg.update_sum])
        agg.update_sum[2][0, 0, 0, 0] = np.nan
    elif spoil == "inf control":
        agg = dataclasses.replace(agg, control_delta_sum=[c.copy() for c in agg.control_delta_sum])
        agg.control_delta_sum[-1][0] = np.inf
    else:  # finite float64 sums whose average overflows float32 weights
        agg = dataclasses.replace(agg, update_sum=[u + 1e300 for u in agg.update_sum])
    server = _server(method, cnn_start, evaluate=lambda w: pytest.fail("must not evaluate here"))
    result = server.step_secure(ROUND, name, agg, evaluate=False)
    assert result.weights is server.weights(name) and _max_diff(result.weights, cnn_start) == 0
    assert server.state.method_state[name] == {}
    assert any("is not finite" in n for n in result.record.notes) and result.record.num_replies == 2


def test_secure_aggregation_step_without_an_aggregate_fails_or_keeps_the_model(cnn_start):
    from fedmnist.methods import MethodConfig, build_methods
    from fedmnist.server import RoundFailedError

    method = build_methods(MethodConfig(("fedavg",)))[0]
    server = _server(method, cnn_start)
    with pytest.raises(RoundFailedError, match=r"only 0 members in the secure aggregate, 1 needed; failed: node 7: "
                                               "too few members left"):
        server.step_secure(ROUND, "fedavg", None, failed={"node 7": "too few members left"})
    assert server.state.history == []
    result = server.step_secure(ROUND, "fedavg", None, min_replies=0, sampled_nodes=[7, 8, 9])
    assert result.record.num_replies == 0 and result.record.num_sampled == 3 and result.weights is server.weights("fedavg")
    assert _max_diff(result.weights, cnn_start) == 0 and "no secure aggregate" in result.record.notes[0]
    agg = _secure_aggregate(method, cnn_start, _members(cnn_start, [0.01, 0.01]), [5, 9])
    with pytest.raises(SecureAggregationError, match="3 replied clients for 2 contributors"):
        server.step_secure(2, "fedavg", agg, replied_clients=[1, 2, 3])
    with pytest.raises(SecureAggregationError, match="the secure aggregate has layers"):
        server.step_secure(2, "fedavg", dataclasses.replace(agg, update_sum=agg.update_sum[:-1]))
    with pytest.raises(RoundFailedError, match="only 2 members"):
        server.step_secure(2, "fedavg", agg, min_replies=3)
    assert len(server.state.history) == 1



def test_secure_aggregation_on_real_mnist_keeps_the_plain_rounds_accuracy(small_mnist, raw_mnist):
    """Three members of a 600-image MNIST slice, two FedAvg rounds in process, secure aggregation at its
    default settings (W = 60,000, 22 bits): the same test accuracy as the plain round within 0.1 points on
    2,000 test images, every round.

    Each round the members train once, from the plain model, and both servers aggregate those same trained
    weights (the secure server relative to its own global model): the comparison isolates the aggregation.
    Letting each server's members train from its own model would compare two chaotic trajectories: started
    10⁻⁷ apart, local SGD on this slice moves round 2's accuracy by up to 0.6 points either way, as any
    rounding difference does.
    """
    from fedmnist.data import normalize_images
    from fedmnist.evaluation import evaluate
    from fedmnist.methods import MethodConfig, build_methods
    from fedmnist.model import initial_weights, weights_sha256
    from fedmnist.server import Reply
    from fedmnist.training import ClientTrainer

    data = small_mnist.normalized()
    x_test, y_test = normalize_images(raw_mnist.x_test[:2000]), raw_mnist.y_test[:2000]
    parts = np.split(np.random.default_rng(SEED).permutation(len(data.x_train)), [150, 350])  # 150, 200, 250
    trainer = ClientTrainer()
    method = build_methods(MethodConfig(("fedavg",)))[0]
    start = initial_weights(SEED)
    layout = VectorLayout.of(start, method.secure_composition())
    evaluate_fn = lambda w: evaluate(trainer, w, x_test, y_test)  # noqa: E731
    plain_server, secure_server = _server(method, start, evaluate=evaluate_fn), _server(method, start, evaluate=evaluate_fn)
    for round_ in (1, 2):
        global_weights, secure_global = plain_server.weights("fedavg"), secure_server.weights("fedavg")
        trained = [trainer.train(global_weights, data.x_train[p], data.y_train[p], epochs=2, batch_size=32,
                                 seed=10 * round_ + k).weights for k, p in enumerate(parts, start=1)]
        replies = [Reply(k, w, len(p), f"client {k}", weights_sha256(global_weights))
                   for k, (w, p) in enumerate(zip(trained, parts), start=1)]
        plain = plain_server.step(round_, "fedavg", replies)
        contribs = [Contribution.from_weights(w, secure_global, len(p)) for w, p in zip(trained, parts)]
        agg = aggregate_in_clear(contribs, [quantization_rng(SEED, round_, k) for k in (1, 2, 3)], layout,
                                 SecAggConfig())
        secure = secure_server.step_secure(round_, "fedavg", agg)
        assert abs(secure.record.test_accuracy - plain.record.test_accuracy) <= 0.001, round_
    assert plain.record.test_accuracy > 0.4  # the rounds trained the model (chance: 0.1)
    assert _max_diff(secure.weights, plain.weights) <= agg.error_bound + _f32_slack(start)  # no error carries over


def test_secure_aggregation_step_notes_saturated_coordinates(cnn_start):
    from fedmnist.methods import MethodConfig, build_methods

    method = build_methods(MethodConfig(("fedavg",)))[0]
    trained = _members(cnn_start, [0.01, 0.01])
    trained[1][3][:4] += np.float32(1.5)  # four coordinates of one member beyond R = 1
    agg = _secure_aggregate(method, cnn_start, trained, [5, 9])
    result = _server(method, cnn_start).step_secure(ROUND, "fedavg", agg)
    assert agg.saturated == 4 and result.record.notes == [
        "4 coordinates of the members' updates (or control-variate deltas) lay beyond the quantisation range and "
        "were aggregated saturated: raise secagg-clip-range (or secagg-control-range)"]
    assert result.weights[3][0] == pytest.approx(cnn_start[3][0] + (5 * (trained[0][3][0] - cnn_start[3][0]) + 9) / 14,
                                                 abs=agg.error_bound + _f32_slack(cnn_start))


@pytest.mark.parametrize("encoded_for, used_by", [("dp", "fedavg"), ("fedavg", "scaffold"), ("fedavg", "dp"),
                                                  ("dp", "adaptive dp")])
def test_secure_aggregation_step_refuses_an_aggregate_encoded_for_another_method(encoded_for, used_by, cnn_start):
    from fedmnist.methods import MethodConfig, build_methods

    def method(name):
        if name in ("dp", "adaptive dp"):
            return _dp_method(adaptive=name == "adaptive dp")
        return build_methods(MethodConfig((name,)))[0]

    agg = _secure_aggregate(method(encoded_for), cnn_start, _members(cnn_start, [0.0001, 0.0001]), [5, 9])
    server = _server(method(used_by), cnn_start)
    with pytest.raises(SecureAggregationError, match=r"needs a secure aggregate encoded as Composition\(.*this one "
                                                     r"was encoded as Composition\("):
        server.step_secure(ROUND, next(iter(server.methods)), agg)
    assert server.state.history == []



def test_secure_dp_round_below_the_minimum_is_released_and_charged_not_aborted(cnn_start):
    # whether enough members survived must not decide, uncharged, whether anything is released
    method = _dp_method(adaptive=False)
    server = _server(method, cnn_start)
    step = server.step_secure(ROUND, "fedavg", None, min_replies=2, evaluate=False)
    assert any("only 0 members in the secure aggregate, 2 needed: under DP the round runs anyway" in n
               for n in step.warnings)
    assert server.state.method_state["fedavg"]["releases"] == 1
    assert step.record.epsilon == method.accountant.epsilon(1)
