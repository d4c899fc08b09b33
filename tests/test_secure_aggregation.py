"""Tests for secure aggregation: the arithmetic (fedmnist.secure_aggregation) and the SecAgg+ protocol over
Flower's primitives (fedmnist.flower_secagg), run in process with a fake exchange that may drop nodes."""

from __future__ import annotations

import dataclasses

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
        counts = np.bincount((masked * 64) // config.modulus, minlength=64)
        assert stats.chisquare(counts).pvalue > 1e-6
        assert stats.kstest(masked / config.modulus, "uniform").pvalue > 1e-6
        assert abs(np.corrcoef(masked, vector)[0, 1]) < 5 / np.sqrt(vector.size)
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
