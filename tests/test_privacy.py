"""Tests for fedmnist.privacy: clipping, calibrated noise, adaptive clipping, the accountant against
dp-accounting, and the same rounds as Flower 1.42's DP wrappers where their arithmetic coincides."""

import itertools
import json
import math

import numpy as np
import pytest

from fedmnist.errors import ConfigError, ValidationError
from fedmnist.privacy import (
    DPConfig,
    DPState,
    PrivacyAccountant,
    adaptive_noise_params,
    check_dp_method,
    client_update,
    clients_needed,
    clip_client_weights,
    clip_update,
    default_delta,
    dp_empty_step,
    dp_fedavg_step,
    geometric_clip_update,
    noise_for_epsilon,
    noisy_unclipped_fraction,
    poisson_sample,
    privacy_verdict,
    update_norm,
)

SHAPES = [(3, 3, 1, 4), (4,), (), (10, 3)]
FLOWER_SHAPES = [(3, 3, 1, 4), (4,), (10, 3)]  # Flower's ArrayRecord and in-place clipping need ndim >= 1


def make_layers(rng, scale=1.0, shapes=SHAPES):
    return [np.asarray(scale * rng.normal(size=shape), dtype=np.float32) for shape in shapes]


def trained_from(global_weights, rng, scales):
    """One client per scale: global + a random update whose norm is about ``scale``·sqrt(size)."""
    shapes = [np.shape(g) for g in global_weights]
    return [[np.asarray(g + u) for g, u in zip(global_weights, make_layers(rng, s, shapes))] for s in scales]


def standard_normals(seed, shapes, count_first=False):
    """The draws of a RandomState(seed) in the order Flower's wrappers make them."""
    rs = np.random.RandomState(seed)
    count = rs.standard_normal() if count_first else None
    return count, [rs.standard_normal(shape) for shape in shapes]


# --- configuration -----------------------------------------------------------------------------


def test_config_normalises_and_round_trips():
    config = DPConfig(noise_multiplier=1, clip=0.5, side=" Client ", sampling="without-replacement")

    assert config.side == "client" and config.sampling == "without_replacement"
    assert isinstance(config.noise_multiplier, float)
    assert DPConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(ConfigError, match="unknown differential-privacy setting"):
        DPConfig.from_dict({**config.to_dict(), "epsilon": 3})


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"noise_multiplier": -0.1}, r"noise multiplier z \(--dp-noise\) must be >= 0"),
        ({"noise_multiplier": float("nan")}, "must be a finite number"),
        ({"noise_multiplier": True}, "must be a finite number"),
        ({"clip": 0.0}, r"clip norm S \(--dp-clip\) must be > 0"),
        ({"clip": -1.0}, "clip norm S"),
        ({"delta": 1.0}, r"δ \(delta\) must be in \(0, 1\)"),
        ({"delta": 0.0}, r"δ \(delta\) must be in \(0, 1\)"),
        ({"target_epsilon": 0.0}, "target ε .* must be > 0"),
        ({"noise_multiplier": 0.0, "target_epsilon": 3.0}, "needs noise"),
        ({"side": "both"}, "side must be one of server, client"),
        ({"sampling": "shuffle"}, "sampling must be one of"),
        ({"accountant": "prv"}, "accountant must be one of"),
        ({"accountant": "pld"}, "'pld' needs sampling 'poisson'"),
        ({"target_quantile": 1.5}, r"target quantile γ must be in \[0, 1\]"),
        ({"clip_learning_rate": 0.0}, "clip learning rate"),
        ({"clipped_count_stddev": -1.0}, "σ_b must be >= 0"),
        ({"adaptive": True, "noise_multiplier": 2.0, "clipped_count_stddev": 1.0}, "z < 2·σ_b"),
        ({"adaptive": "yes"}, "adaptive must be true or false"),
    ],
)
def test_config_refuses_bad_settings(values, message):
    with pytest.raises(ConfigError, match=message):
        DPConfig(**{"noise_multiplier": 1.0, "clip": 1.0, **values})


def test_default_delta_is_well_below_one_over_k():
    for k in [1, 2, 5, 10, 100, 1000, 10_000, 10**5, 10**7]:
        assert default_delta(k) <= 1 / (10 * k)
    assert default_delta(5) == 1e-5 and default_delta(10_000) == 1e-5
    assert default_delta(10**6) == pytest.approx(1e-7)
    assert DPConfig(1.0, 1.0).resolved_delta(5) == 1e-5 and DPConfig(1.0, 1.0, delta=1e-3).resolved_delta(5) == 1e-3
    with pytest.raises(ConfigError, match="number of clients"):
        default_delta(0)


def test_only_averaging_methods_can_be_wrapped():
    check_dp_method("fedavg")
    check_dp_method("fedprox")
    with pytest.raises(ConfigError, match="'krum' does not average"):
        check_dp_method("krum")


# --- clipping ----------------------------------------------------------------------------------


def test_clipping_bounds_every_norm_and_keeps_the_direction():
    rng = np.random.default_rng(0)
    clip = 0.8
    for scale in [1e-3, 0.01, 0.1, 1.0, 10.0, 1e3]:
        update = make_layers(rng, scale)
        norm = update_norm(update)

        clipped, original = clip_update(update, clip)

        assert original == pytest.approx(norm)
        assert update_norm(clipped) <= clip * (1 + 1e-6)
        if norm > clip:
            assert update_norm(clipped) == pytest.approx(clip, rel=1e-6)
            for c, u in zip(clipped, update):
                np.testing.assert_allclose(c, u * (clip / norm), rtol=1e-6)
        assert [c.dtype for c in clipped] == [u.dtype for u in update]
        assert [c.shape for c in clipped] == [u.shape for u in update]


def test_small_update_is_returned_unchanged_as_fresh_arrays():
    rng = np.random.default_rng(1)
    update = make_layers(rng, 1e-3)
    before = [u.copy() for u in update]

    clipped, _ = clip_update(update, 10.0)

    for c, u, b in zip(clipped, update, before):
        np.testing.assert_array_equal(c, b)
        assert c is not u
    clipped[0][...] = 7
    np.testing.assert_array_equal(update[0], before[0])


def test_zero_update_is_left_as_is():
    update = [np.zeros((2, 2), np.float32), np.zeros((), np.float32)]

    clipped, norm = clip_update(update, 1.0)

    assert norm == 0.0
    assert all(not c.any() for c in clipped)


def test_update_norm_is_the_global_l2_norm():
    assert update_norm([np.array([3.0, 0.0]), np.array(4.0)]) == 5.0


def test_bad_updates_are_refused():
    with pytest.raises(ValidationError, match="non-finite"):
        clip_update([np.array([1.0, np.nan])], 1.0)
    with pytest.raises(ValidationError, match=r"client update: weight 0 has shape \(3,\), expected \(4,\)"):
        client_update([np.zeros(3)], [np.zeros(4)])
    with pytest.raises(ValidationError, match="expected 1 weight arrays for the global model, got 2"):
        client_update([np.zeros(3), np.zeros(1)], [np.zeros(3)])
    with pytest.raises(ConfigError, match="clip norm S"):
        clip_update([np.ones(2)], 0.0)


def test_client_side_clipping_sends_global_plus_clipped_update():
    rng = np.random.default_rng(2)
    g = make_layers(rng)
    big, small = trained_from(g, rng, [5.0, 1e-3])

    sent = clip_client_weights(big, g, 1.0)
    kept = clip_client_weights(small, g, 1.0)

    assert not sent.unclipped and sent.norm > 1.0
    assert update_norm(client_update(sent.weights, g)) == pytest.approx(1.0, rel=1e-5)
    assert kept.unclipped
    for k, s in zip(kept.weights, small):
        np.testing.assert_allclose(k, s, rtol=1e-6, atol=1e-7)
    assert [w.dtype for w in sent.weights] == [np.float32] * len(SHAPES)


# --- the server step: noise --------------------------------------------------------------------


def test_noise_has_the_calibrated_standard_deviation():
    # Prepare: clients that did not move, so the new global weights are the noise alone
    g = [np.zeros((400, 500), np.float32), np.zeros(7, np.float32)]
    z, clip, m = 1.3, 0.7, 3
    config = DPConfig(noise_multiplier=z, clip=clip)

    # Execute
    result = dp_fedavg_step(g, [g] * m, config, DPState.initial(config), np.random.default_rng(123))

    # Assert: std z·S/m (relative error of a 200,000-sample std is ~0.16 %, so 1 % is > 6 sigma)
    x = np.concatenate([w.ravel().astype(np.float64) for w in result.weights])
    sigma = z * clip / m
    assert result.noise_std == pytest.approx(sigma)
    assert abs(x.std() / sigma - 1) < 0.01
    assert abs(x.mean()) < 6 * sigma / math.sqrt(x.size)
    chi2 = float(np.sum((x / sigma) ** 2))
    assert abs(chi2 - x.size) < 6 * math.sqrt(2 * x.size)


def test_noise_is_on_the_sum_when_fewer_clients_reply():
    # 3 replies of 5 sampled clients: the sum still gets z·S, the mean z·S/5
    g = [np.zeros(100_000, np.float32)]
    config = DPConfig(noise_multiplier=2.0, clip=1.0)

    result = dp_fedavg_step(g, [g] * 3, config, DPState.initial(config), np.random.default_rng(5), num_sampled=5)

    assert result.noise_std == pytest.approx(0.4)
    assert abs(result.weights[0].std() / 0.4 - 1) < 0.02


def test_step_is_the_equal_weight_mean_of_clipped_updates_plus_noise():
    # Prepare
    rng = np.random.default_rng(3)
    g = make_layers(rng)
    clients = trained_from(g, rng, [3.0, 0.001, 0.5])
    before = [[w.copy() for w in c] for c in clients]
    z, clip = 0.9, 1.5
    config = DPConfig(noise_multiplier=z, clip=clip)
    _, xi = standard_normals(7, SHAPES)

    # Execute
    result = dp_fedavg_step(g, clients, config, DPState.initial(config), noise=xi)

    # Assert: w + (Σ clip(Δ_i) + z·S·ξ) / m, by hand in float64
    deltas = [[w.astype(np.float64) - gl for w, gl in zip(c, g)] for c in clients]
    norms = [math.sqrt(sum(float(np.sum(d**2)) for d in delta)) for delta in deltas]
    want = [gl + (sum(delta[i] * min(1, clip / n) for delta, n in zip(deltas, norms)) + z * clip * xi[i]) / 3
            for i, gl in enumerate(g)]
    for got, expected in zip(result.weights, want):
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    assert result.clip == clip and result.state == DPState(clip=clip, releases=1)
    assert result.unclipped_fraction is None
    for c, b in zip(clients, before):
        for w, wb in zip(c, b):
            np.testing.assert_array_equal(w, wb)


@pytest.mark.parametrize("adaptive", [False, True])
def test_a_round_without_usable_updates_releases_the_noise_alone_and_counts(adaptive):
    # Prepare: S = 1.5, z = 0.9, m = 4 clients sampled, none usable
    rng = np.random.default_rng(8)
    g = make_layers(rng)
    config = DPConfig(noise_multiplier=0.9, clip=1.5, adaptive=adaptive, clipped_count_stddev=1.0 if adaptive else None)
    _, xi = standard_normals(9, SHAPES)

    # Execute
    result = dp_empty_step(g, config, DPState(1.5, releases=6), 4, noise=xi, count_noise=0.3 if adaptive else None)

    # Assert: w + z_Δ·S·ξ/m by hand, one release more; adaptive: b̃ = (0 + σ_b·0.3)/m moves S
    z_delta = config.noise_params(4)[0]
    for got, gl, x in zip(result.weights, g, xi):
        np.testing.assert_allclose(got, gl + z_delta * 1.5 * x / 4, rtol=1e-5, atol=1e-6)
    assert result.state.releases == 7 and result.noise_std == pytest.approx(z_delta * 1.5 / 4)
    if adaptive:
        assert result.unclipped_fraction == pytest.approx(0.3 / 4)
        assert result.state.clip == pytest.approx(geometric_clip_update(1.5, 0.3 / 4, 0.5, 0.2))
    else:
        assert result.state.clip == 1.5 and result.unclipped_fraction is None


def test_step_is_seeded():
    rng = np.random.default_rng(4)
    g = make_layers(rng)
    clients = trained_from(g, rng, [1.0, 2.0])
    config = DPConfig(noise_multiplier=1.0, clip=1.0)
    state = DPState.initial(config)

    a = dp_fedavg_step(g, clients, config, state, np.random.default_rng([42, 6, 1]))
    b = dp_fedavg_step(g, clients, config, state, np.random.default_rng([42, 6, 1]))
    c = dp_fedavg_step(g, clients, config, state, np.random.default_rng([42, 6, 2]))

    for x, y in zip(a.weights, b.weights):
        np.testing.assert_array_equal(x, y)
    assert any(not np.array_equal(x, w) for x, w in zip(a.weights, c.weights))


def test_without_noise_the_step_needs_no_generator():
    g = [np.zeros(2, np.float32)]
    clients = [[np.array([3.0, 4.0], np.float32)], [np.array([0.0, 0.2], np.float32)]]
    config = DPConfig(noise_multiplier=0.0, clip=1.0)

    result = dp_fedavg_step(g, clients, config, DPState.initial(config))

    np.testing.assert_allclose(result.weights[0], [0.3, 0.5], rtol=1e-6)  # ([0.6, 0.8] + [0, 0.2]) / 2
    with pytest.raises(ValueError, match="needs a numpy Generator"):
        dp_fedavg_step(g, clients, DPConfig(1.0, 1.0), DPState(clip=1.0))


def test_client_side_refuses_unclipped_updates_and_matches_server_side():
    rng = np.random.default_rng(8)
    g = make_layers(rng)
    clients = trained_from(g, rng, [2.0, 0.01, 0.7])
    server, client = DPConfig(1.0, 1.2), DPConfig(1.0, 1.2, side="client")
    sent = [clip_client_weights(c, g, 1.2).weights for c in clients]
    _, xi = standard_normals(9, SHAPES)

    via_server = dp_fedavg_step(g, clients, server, DPState.initial(server), noise=xi)
    via_clients = dp_fedavg_step(g, sent, client, DPState.initial(client), noise=xi)

    for a, b in zip(via_server.weights, via_clients.weights):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValidationError, match=r"node 7: update norm .* exceeds the clip norm S = 1\.2"):
        dp_fedavg_step(g, clients, client, DPState.initial(client), noise=xi, labels=["node 7", "b", "c"])


def test_step_refuses_empty_rounds():
    config = DPConfig(1.0, 1.0)
    with pytest.raises(ValidationError, match="no client updates"):
        dp_fedavg_step([np.zeros(2)], [], config, DPState.initial(config), np.random.default_rng(0))


# --- adaptive clipping -------------------------------------------------------------------------


def test_adaptive_clip_grows_when_updates_are_clipped_and_shrinks_when_they_fit():
    # Andrew et al.: S·exp(−η(b̃ − γ)), b̃ the fraction of UNclipped updates (count noise injected = 0)
    rng = np.random.default_rng(10)
    g = make_layers(rng)
    config = DPConfig(noise_multiplier=1.0, clip=1.0, adaptive=True, clipped_count_stddev=2.0)
    state = DPState(clip=1.0, releases=4)
    _, xi = standard_normals(0, SHAPES)

    big = dp_fedavg_step(g, trained_from(g, rng, [5.0] * 4), config, state, noise=xi, count_noise=0.0)
    small = dp_fedavg_step(g, trained_from(g, rng, [1e-4] * 4), config, state, noise=xi, count_noise=0.0)

    assert big.unclipped_fraction == 0.0 and big.state.clip == pytest.approx(math.exp(0.2 * 0.5))
    assert small.unclipped_fraction == 1.0 and small.state.clip == pytest.approx(math.exp(-0.2 * 0.5))
    assert big.state.releases == 5
    # the noise of the round is calibrated to the S that clipped it: z_Δ·S_t/m
    z_delta = (1.0 - (2 * 2.0) ** -2) ** -0.5
    assert big.clip == 1.0 and big.noise_std == pytest.approx(z_delta / 4)


def test_adaptive_clipping_converges_to_the_target_quantile():
    # Prepare: 20 clients whose update norms are 1..20; γ = 0.5 puts S between the 10th and 11th norm
    g = [np.zeros(1, np.float32)]
    clients = [[np.array([float(k)], np.float32)] for k in range(1, 21)]
    config = DPConfig(noise_multiplier=0.0, clip=0.1, adaptive=True)
    state = DPState.initial(config)

    # Execute: 200 rounds without noise
    for _ in range(200):
        state = dp_fedavg_step(g, clients, config, state).state

    # Assert
    assert 9.0 < state.clip < 12.0


def test_client_side_adaptive_needs_every_bit():
    rng = np.random.default_rng(11)
    g = make_layers(rng)
    config = DPConfig(1.0, 1.0, adaptive=True, side="client", clipped_count_stddev=1.0)
    sent = [clip_client_weights(c, g, 1.0) for c in trained_from(g, rng, [3.0, 1e-4])]
    _, xi = standard_normals(1, SHAPES)

    result = dp_fedavg_step(g, [s.weights for s in sent], config, DPState.initial(config),
                            unclipped=[s.unclipped for s in sent], noise=xi, count_noise=0.0)

    assert result.unclipped_fraction == 0.5
    with pytest.raises(ValidationError, match="unclipped bit"):
        dp_fedavg_step(g, [s.weights for s in sent], config, DPState.initial(config), noise=xi, count_noise=0.0)


def test_noisy_unclipped_fraction_by_hand():
    assert noisy_unclipped_fraction(3, 4, 0.5, sample=-1.0) == (3 - 0.5) / 4
    a = noisy_unclipped_fraction(3, 4, 0.5, np.random.default_rng(1))
    assert a == noisy_unclipped_fraction(3, 4, 0.5, np.random.default_rng(1))


def test_dp_state_round_trips_and_refuses_bad_entries():
    state = DPState(clip=0.1 * 3, releases=7)

    assert DPState.from_dict(json.loads(json.dumps(state.to_dict()))) == state
    with pytest.raises(ConfigError, match="exactly 'clip' and 'releases'"):
        DPState.from_dict({"clip": 1.0})
    with pytest.raises(ConfigError, match="clip norm S must be > 0"):
        DPState.from_dict({"clip": 0.0, "releases": 1})


# --- Flower 1.42 parity ------------------------------------------------------------------------


@pytest.fixture
def flwr_dp():
    strategy = pytest.importorskip("flwr.serverapp.strategy")
    from flwr.supercore import differential_privacy

    return strategy, differential_privacy


def _replies(weights_per_client, global_weights, metrics_per_client=None):
    """Train replies as the Grid would deliver them (task identity set as in tests/test_flower_app.py)."""
    from flwr.app import ArrayRecord, Message, MessageType, MetricRecord, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id = TaskIdentity.node_id = TaskIdentity.task_id = 1
    replies = []
    for i, weights in enumerate(weights_per_client):
        out = Message(content=RecordDict({"arrays": ArrayRecord(list(global_weights))}), dst_node_id=100 + i,
                      message_type=MessageType.TRAIN, group_id="1")
        out.metadata.__dict__["_message_id"] = out.object_id
        metrics = {"num-examples": 50, **(metrics_per_client[i] if metrics_per_client else {})}
        replies.append(Message(content=RecordDict({"arrays": ArrayRecord([np.asarray(w) for w in weights]),
                                                   "metrics": MetricRecord(metrics)}), reply_to=out))
    return replies


def _arrays(record):
    return [record[str(i)].numpy() for i in range(len(record))]


def _assert_same(ours, theirs):
    for a, b in zip(ours, theirs):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_client_clipping_matches_flowers_mods(flwr_dp):
    _, dp = flwr_dp
    rng = np.random.default_rng(20)
    g = make_layers(rng, shapes=FLOWER_SHAPES)
    for trained in trained_from(g, rng, [3.0, 1e-3]):
        theirs = [w.copy() for w in trained]
        clipped_bit = dp.compute_adaptive_clip_model_update(theirs, g, 0.9)

        ours = clip_client_weights(trained, g, 0.9)

        _assert_same(ours.weights, theirs)
        assert ours.unclipped == (not clipped_bit)  # Flower's norm_bit means "clipped"


@pytest.mark.parametrize("seed", [0, 1])
def test_server_side_fixed_clipping_matches_flower(flwr_dp, seed):
    # Prepare
    strategy, _ = flwr_dp
    from flwr.app import ArrayRecord

    rng = np.random.default_rng(seed)
    g = make_layers(rng, shapes=FLOWER_SHAPES)
    clients = trained_from(g, rng, [2.0, 0.01, 0.5, 4.0])
    z, clip = 0.8, 1.1
    flower = strategy.DifferentialPrivacyServerSideFixedClipping(strategy.FedAvg(), z, clip, len(clients))
    flower.current_arrays = ArrayRecord(list(g))  # what configure_train stores
    config = DPConfig(noise_multiplier=z, clip=clip)
    _, xi = standard_normals(100 + seed, FLOWER_SHAPES)

    # Execute
    np.random.seed(100 + seed)
    arrays, _ = flower.aggregate_train(1, _replies(clients, g))
    ours = dp_fedavg_step(g, clients, config, DPState.initial(config), noise=xi)

    # Assert
    _assert_same(ours.weights, _arrays(arrays))


def test_client_side_fixed_clipping_matches_flower(flwr_dp):
    strategy, dp = flwr_dp
    rng = np.random.default_rng(30)
    g = make_layers(rng, shapes=FLOWER_SHAPES)
    clients = trained_from(g, rng, [2.0, 0.01, 3.0])
    z, clip = 1.2, 0.6
    sent = []
    for trained in clients:  # what Flower's fixedclipping_mod does on each client
        weights = [w.copy() for w in trained]
        dp.compute_clip_model_update(weights, g, clip)
        sent.append(weights)
    flower = strategy.DifferentialPrivacyClientSideFixedClipping(strategy.FedAvg(), z, clip, len(clients))
    config = DPConfig(noise_multiplier=z, clip=clip, side="client")
    _, xi = standard_normals(31, FLOWER_SHAPES)

    np.random.seed(31)
    arrays, _ = flower.aggregate_train(1, _replies(sent, g))
    ours = dp_fedavg_step(g, sent, config, DPState.initial(config), noise=xi)

    _assert_same(ours.weights, _arrays(arrays))


def _coinciding_quantile(seed, count, m, sigma_b):
    """γ equal to the noised fraction Flower will draw first: S then stays put in both (exp(0) = 1)."""
    count_xi, _ = standard_normals(seed, FLOWER_SHAPES, count_first=True)
    return float(count + sigma_b * count_xi) / float(m)


def test_server_side_adaptive_clipping_matches_flower_where_they_coincide(flwr_dp):
    # Half the updates are clipped, so Flower's clipped count equals our unclipped count; with γ equal to
    # the noised fraction the clip norm does not move, and Flower's noise (which uses the updated S) and
    # ours (the S that clipped) agree. Elsewhere the two move S in opposite directions (module docstring).
    strategy, _ = flwr_dp
    from flwr.app import ArrayRecord

    rng = np.random.default_rng(40)
    g = make_layers(rng, shapes=FLOWER_SHAPES)
    clients = trained_from(g, rng, [3.0, 1e-4, 5.0, 1e-3])
    z, clip, sigma_b, seed = 1.0, 0.9, 1.0, 41
    gamma = _coinciding_quantile(seed, 2, 4, sigma_b)
    assert 0 <= gamma <= 1
    flower = strategy.DifferentialPrivacyServerSideAdaptiveClipping(
        strategy.FedAvg(), z, len(clients), initial_clipping_norm=clip, target_clipped_quantile=gamma,
        clip_norm_lr=0.2, clipped_count_stddev=sigma_b)
    flower.current_arrays = ArrayRecord(list(g))
    config = DPConfig(noise_multiplier=z, clip=clip, adaptive=True, target_quantile=gamma,
                      clipped_count_stddev=sigma_b)
    count_xi, xi = standard_normals(seed, FLOWER_SHAPES, count_first=True)

    np.random.seed(seed)
    arrays, _ = flower.aggregate_train(1, _replies(clients, g))
    ours = dp_fedavg_step(g, clients, config, DPState.initial(config), noise=xi, count_noise=count_xi)

    assert ours.unclipped_fraction == gamma
    assert ours.state.clip == flower.clipping_norm == clip
    assert ours.noise_std == pytest.approx(flower.noise_multiplier * clip / 4, rel=1e-15)
    _assert_same(ours.weights, _arrays(arrays))


def test_client_side_adaptive_clipping_matches_flower_where_they_coincide(flwr_dp):
    strategy, dp = flwr_dp
    rng = np.random.default_rng(50)
    g = make_layers(rng, shapes=FLOWER_SHAPES)
    clients = trained_from(g, rng, [1e-4, 3.0, 2.0, 1e-3])
    z, clip, sigma_b, seed = 0.5, 0.7, 0.8, 51
    sent, bits, metrics = [], [], []
    for trained in clients:  # what Flower's adaptiveclipping_mod does on each client
        weights = [w.copy() for w in trained]
        metrics.append({"norm_bit": int(dp.compute_adaptive_clip_model_update(weights, g, clip))})
        sent.append(weights)
        bits.append(clip_client_weights(trained, g, clip).unclipped)
    gamma = _coinciding_quantile(seed, 2, 4, sigma_b)
    flower = strategy.DifferentialPrivacyClientSideAdaptiveClipping(
        strategy.FedAvg(), z, len(clients), initial_clipping_norm=clip, target_clipped_quantile=gamma,
        clipped_count_stddev=sigma_b)
    config = DPConfig(noise_multiplier=z, clip=clip, adaptive=True, side="client", target_quantile=gamma,
                      clipped_count_stddev=sigma_b)
    count_xi, xi = standard_normals(seed, FLOWER_SHAPES, count_first=True)

    np.random.seed(seed)
    arrays, _ = flower.aggregate_train(1, _replies(sent, g, metrics))
    ours = dp_fedavg_step(g, sent, config, DPState.initial(config), unclipped=bits, noise=xi,
                          count_noise=count_xi)

    assert sum(bits) == 2 and ours.state.clip == flower.clipping_norm == clip
    _assert_same(ours.weights, _arrays(arrays))


@pytest.mark.parametrize(("z", "m", "sigma_b"), [(1.0, 100, None), (0.3, 10, None), (1.5, 5, 2.0), (0.0, 8, None),
                                                 (0.0, 8, 0.5), (2.0, 50, 1.5)])
def test_adaptive_noise_params_match_flower(flwr_dp, z, m, sigma_b):
    _, dp = flwr_dp

    assert adaptive_noise_params(z, m, sigma_b) == dp.compute_adaptive_noise_params(z, m, sigma_b)


def test_adaptive_noise_params_refuse_what_flower_refuses(flwr_dp):
    _, dp = flwr_dp
    with pytest.raises(ValueError, match="too low"):
        dp.compute_adaptive_noise_params(1.0, 10, None)  # σ_b = 0.5: z must be < 1
    with pytest.raises(ConfigError, match="z < 2·σ_b"):
        adaptive_noise_params(1.0, 10, None)
    with pytest.raises(ConfigError, match="z < 2·σ_b"):
        DPConfig(1.0, 1.0, adaptive=True).noise_params(10)
    assert DPConfig(1.0, 1.0, adaptive=True).noise_params(100) == (pytest.approx((1 - 10**-2) ** -0.5), 5.0)


@pytest.mark.parametrize("fraction", [0.0, 0.3, 0.5, 1.0])
def test_geometric_update_matches_flower(flwr_dp, fraction):
    strategy, _ = flwr_dp
    flower = strategy.DifferentialPrivacyServerSideAdaptiveClipping(
        strategy.FedAvg(), 0.0, 10, initial_clipping_norm=0.37, target_clipped_quantile=0.4, clip_norm_lr=0.3)

    flower._geometric_update(fraction)

    assert geometric_clip_update(0.37, fraction, 0.4, 0.3) == flower.clipping_norm


# --- accounting --------------------------------------------------------------------------------


def _direct_rdp(event, relation, delta):
    from dp_accounting.rdp import RdpAccountant

    accountant = RdpAccountant(neighboring_relation=relation)
    accountant.compose(event)
    return accountant.get_epsilon(delta)


@pytest.mark.parametrize(("k", "m", "z", "rounds"), [(5, 5, 2.0, 10), (1000, 30, 0.8, 5)])
def test_without_replacement_epsilon_is_dp_accountings(k, m, z, rounds):
    from dp_accounting import NeighboringRelation, dp_event

    accountant = PrivacyAccountant(z, k, m, 1e-5)
    event = dp_event.SelfComposedDpEvent(
        dp_event.SampledWithoutReplacementDpEvent(k, m, dp_event.GaussianDpEvent(z / 2)), rounds)

    assert accountant.adjacency == "replace-one"
    assert accountant.epsilon(rounds) == pytest.approx(_direct_rdp(event, NeighboringRelation.REPLACE_ONE, 1e-5),
                                                       rel=1e-12)


@pytest.mark.parametrize(("kind", "k", "m", "z", "rounds"),
                         [("rdp", 1000, 10, 1.0, 50), ("rdp", 60, 6, 0.7, 8), ("pld", 1000, 10, 1.0, 50)])
def test_poisson_epsilon_is_dp_accountings(kind, k, m, z, rounds):
    from dp_accounting import NeighboringRelation, dp_event
    from dp_accounting.pld import PLDAccountant

    accountant = PrivacyAccountant(z, k, m, 1e-6, sampling="poisson", accountant=kind)
    event = dp_event.SelfComposedDpEvent(dp_event.PoissonSampledDpEvent(m / k, dp_event.GaussianDpEvent(z)), rounds)
    if kind == "rdp":
        want = _direct_rdp(event, NeighboringRelation.ADD_OR_REMOVE_ONE, 1e-6)
    else:
        pld = PLDAccountant(NeighboringRelation.ADD_OR_REMOVE_ONE)
        pld.compose(event)
        want = pld.get_epsilon(1e-6)

    assert accountant.adjacency == "add-or-remove-one"
    assert accountant.epsilon(rounds) == pytest.approx(want, rel=1e-12)


def test_replace_one_epsilon_accounts_for_sensitivity_2s():
    # With q = 1 the mechanism is a plain Gaussian of sensitivity 2S (swap +S for −S); dp-accounting's PLD
    # computes its ε tightly for REPLACE_ONE. The RDP bound may be looser, never smaller; feeding the
    # undivided z to the RDP event (google/differential-privacy#378) would report less than the truth.
    from dp_accounting import NeighboringRelation, dp_event
    from dp_accounting.pld import PLDAccountant

    z, rounds = 1.0, 10
    exact = PLDAccountant(NeighboringRelation.REPLACE_ONE, value_discretization_interval=1e-3)
    exact.compose(dp_event.SelfComposedDpEvent(dp_event.GaussianDpEvent(z), rounds))
    naive = dp_event.SelfComposedDpEvent(dp_event.SampledWithoutReplacementDpEvent(5, 5, dp_event.GaussianDpEvent(z)),
                                         rounds)

    ours = PrivacyAccountant(z, 5, 5, 1e-5).epsilon(rounds)

    assert exact.get_epsilon(1e-5) <= ours <= 1.2 * exact.get_epsilon(1e-5)
    assert _direct_rdp(naive, NeighboringRelation.REPLACE_ONE, 1e-5) < exact.get_epsilon(1e-5)


def test_epsilon_grows_with_rounds_and_is_infinite_without_noise():
    accountant = PrivacyAccountant(1.0, 100, 10, 1e-5, sampling="poisson")

    eps = [accountant.epsilon(t) for t in range(1, 7)]

    assert accountant.epsilon(0) == 0.0
    assert all(a < b for a, b in itertools.pairwise(eps))
    assert eps[-1] == accountant.epsilon(6)
    assert PrivacyAccountant(0.0, 100, 10, 1e-5).epsilon(3) == math.inf
    assert PrivacyAccountant(0.0, 100, 10, 1e-5).epsilon(0) == 0.0


def test_run_stops_before_exceeding_the_target():
    # Prepare: a target between ε(3) and ε(4)
    accountant = PrivacyAccountant(1.0, 100, 10, 1e-5, sampling="poisson")
    target = (accountant.epsilon(3) + accountant.epsilon(4)) / 2

    # Execute: the loop a run does, asking before every round
    done = 0
    while done < 10 and not accountant.would_exceed(target, done):
        done += 1

    # Assert
    assert done == 3 == accountant.max_rounds(target, 10)
    assert accountant.epsilon(done) <= target < accountant.epsilon(done + 1)
    assert accountant.max_rounds(1e6, 10) == 10 and accountant.max_rounds(1e-9, 10) == 0


def test_targets_a_run_cannot_honour_are_refused():
    accountant = PrivacyAccountant(1.0, 100, 10, 1e-5, sampling="poisson")
    first = accountant.epsilon(1)

    accountant.check_target(first * 1.01)
    accountant.check_target(accountant.epsilon(5), rounds_done=5)
    with pytest.raises(ConfigError, match="exceeded by the first round alone"):
        accountant.check_target(first * 0.99)
    with pytest.raises(ConfigError, match="already exceeded: the 5 rounds done spent"):
        accountant.check_target(accountant.epsilon(5) * 0.99, rounds_done=5)
    with pytest.raises(ConfigError, match="needs noise"):
        PrivacyAccountant(0.0, 100, 10, 1e-5).check_target(5.0)
    with pytest.raises(ConfigError, match="must be > 0"):
        accountant.check_target(-1.0)


def test_accountant_from_config_and_bad_settings():
    config = DPConfig(1.0, 1.0, sampling="poisson", accountant="pld")

    accountant = PrivacyAccountant.from_config(config, 50, 5)

    assert (accountant.delta, accountant.sampling_rate, accountant.accountant) == (1e-5, 0.1, "pld")
    with pytest.raises(ConfigError, match="clients per round m"):
        PrivacyAccountant(1.0, 5, 6, 1e-5)
    with pytest.raises(ConfigError, match="'pld' needs sampling 'poisson'"):
        PrivacyAccountant(1.0, 5, 5, 1e-5, accountant="pld")
    with pytest.raises(ConfigError, match=r"δ \(delta\)"):
        PrivacyAccountant(1.0, 5, 5, 1.0)


# --- what ε means with few clients -------------------------------------------------------------


def test_a_course_team_gets_no_meaningful_epsilon():
    verdict = privacy_verdict(PrivacyAccountant(1.0, 5, 5, default_delta(5)), rounds=10)

    assert not verdict.meaningful and verdict.epsilon > 10
    assert "not meaningful" in verdict.message and "q = 1" in verdict.message


def test_a_large_federation_gets_a_meaningful_epsilon():
    verdict = privacy_verdict(PrivacyAccountant(1.0, 100_000, 100, default_delta(100_000), sampling="poisson"), 100)

    assert verdict.meaningful and verdict.epsilon < 1
    assert verdict.adjacency == "add-or-remove-one" and verdict.message.startswith("ε = ")


def test_no_noise_or_a_large_delta_is_not_meaningful():
    assert "no privacy" in privacy_verdict(PrivacyAccountant(0.0, 5, 5, 1e-5), 3).message
    assert "not below 1/K" in privacy_verdict(PrivacyAccountant(50.0, 5, 5, 0.5), 1).message


def test_clients_needed_at_the_same_noise_on_the_mean():
    # z/m = 0.2 is z = 1 for a 5-member team; 20 rounds, 10 % of the clients per round, target ε = 2
    found = clients_needed(2.0, 20, 0.1, mean_noise_std=0.2, sampling="poisson")

    assert found is not None and found.epsilon <= 2.0
    assert found.noise_multiplier == pytest.approx(0.2 * found.clients_per_round)
    k = found.num_clients - 1
    m = max(1, math.floor(0.1 * k + 1e-9))
    before = PrivacyAccountant(0.2 * m, k, m, default_delta(k), sampling="poisson")
    assert before.epsilon(20) > 2.0


def test_more_clients_do_not_help_at_a_fixed_noise_multiplier_with_everyone_in_every_round():
    assert clients_needed(1.0, 10, 1.0, noise_multiplier=1.0, sampling="poisson", max_clients=10_000) is None
    with pytest.raises(ConfigError, match="exactly one"):
        clients_needed(1.0, 10, 1.0)


def test_poisson_sample_is_seeded_and_has_rate_q():
    a = poisson_sample(10_000, 0.1, np.random.default_rng(0))

    assert a == poisson_sample(10_000, 0.1, np.random.default_rng(0))
    assert a == sorted(set(a)) and abs(len(a) - 1000) < 6 * math.sqrt(900)


@pytest.mark.parametrize(("target", "rounds", "clients", "per_round", "delta", "sampling"), [
    (8.0, 30, 1000, 100, 1e-5, "poisson"),
    (2.0, 30, 1000, 100, 1e-5, "poisson"),
    (8.0, 12, 100, 10, 1e-5, "without_replacement"),
])
def test_noise_for_epsilon_is_the_smallest_z_the_accountant_accepts(target, rounds, clients, per_round, delta,
                                                                   sampling):
    z = noise_for_epsilon(target, rounds, clients, per_round, delta, sampling=sampling, digits=3)

    def epsilon(noise):
        return PrivacyAccountant(noise, clients, per_round, delta, sampling).epsilon(rounds)

    unit = 10.0 ** (math.floor(math.log10(z)) - 2)
    assert epsilon(z) <= target < epsilon(z - unit)  # three significant digits: one unit less is too little
    assert z == float(f"{z:.3g}")


def test_noise_for_epsilon_grows_with_the_rounds_and_refuses_a_bad_target():
    fewer = noise_for_epsilon(8.0, 10, 1000, 100, 1e-5, digits=2)
    more = noise_for_epsilon(8.0, 40, 1000, 100, 1e-5, digits=2)

    assert fewer < more
    with pytest.raises(ConfigError, match="target ε must be > 0"):
        noise_for_epsilon(0.0, 10, 1000, 100, 1e-5)
