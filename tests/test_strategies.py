"""Tests for fedmnist.strategies: hand-computed cases, input safety, registry, and Flower parity."""

import copy

import numpy as np
import pytest

from fedmnist import strategies
from fedmnist.errors import ValidationError
from fedmnist.strategies import (
    AGGREGATORS,
    AggregationError,
    aggregate,
    available_methods,
    bulyan,
    coordinate_median,
    krum,
    trimmed_mean,
    weighted_average,
)

METHODS = ["fedavg", "fedprox", "fedmed", "trimmed", "krum", "multikrum", "bulyan"]
CNN_SHAPES = [(3, 3, 1, 32), (32,), (3, 3, 32, 64), (64,), (1152, 8), (8,), (8, 10), (10,)]


def f32(*values):
    return np.array(values, dtype=np.float32)


def scalar(value):
    return np.array(value, dtype=np.float32)


def line_results(xs, counts=None):
    """One client per x: a single layer [x, -x] and a 0-dim layer x."""
    counts = counts or [1] * len(xs)
    return [([f32(x, -x), scalar(x)], n) for x, n in zip(xs, counts)]


def random_results(rng, shapes, num_clients, scalar_layer=False):
    results = []
    for _ in range(num_clients):
        weights = [rng.normal(size=shape).astype(np.float32) for shape in shapes]
        if scalar_layer:
            weights.append(np.array(rng.normal(), dtype=np.float32))
        results.append((weights, int(rng.integers(1, 100))))
    return results


# Krum case: points 0, 0.1, 0.3, -0.15 and an outlier at 100 (n=5, f=1, 2 nearest neighbours).
# Scores: 0 -> .01+.0225=.0325, 0.1 -> .01+.04=.05, 0.3 -> .04+.09=.13, -0.15 -> .0225+.0625=.085.
KRUM_XS = [0.3, 100.0, 0.0, -0.15, 0.1]
KRUM_COUNTS = [5, 7, 1, 2, 1]


# --- weighted_average -------------------------------------------------------------------------


def test_weighted_average_by_hand():
    # Prepare
    results = [([f32(0, 4), scalar(2)], 1), ([f32(4, 0), scalar(6)], 3)]

    # Execute
    out = weighted_average(results)

    # Assert: (1*[0,4] + 3*[4,0]) / 4 = [3, 1]; (1*2 + 3*6) / 4 = 5
    np.testing.assert_allclose(out[0], [3.0, 1.0])
    np.testing.assert_allclose(out[1], 5.0)
    assert out[1].shape == ()


def test_weighted_average_counts_need_not_sum_to_one():
    small = [([f32(0, 4)], 1), ([f32(4, 0)], 3)]
    large = [([f32(0, 4)], 1000), ([f32(4, 0)], 3000)]

    np.testing.assert_allclose(weighted_average(large)[0], [3.0, 1.0])
    np.testing.assert_allclose(weighted_average(large)[0], weighted_average(small)[0])


def test_weighted_average_zero_count_client_is_ignored():
    results = [([f32(1, 1)], 2), ([f32(100, -100)], 0)]

    np.testing.assert_allclose(weighted_average(results)[0], [1.0, 1.0])


def test_weighted_average_is_accurate_with_many_clients():
    # Prepare: many clients with uneven counts; float32 BLAS accumulation must stay within a few ulps
    rng = np.random.default_rng(7)
    results = random_results(rng, [(50, 40)], num_clients=40)
    exact = sum(n * w[0].astype(np.float64) for w, n in results) / sum(n for _, n in results)

    # Execute
    out = weighted_average(results)

    # Assert
    np.testing.assert_allclose(out[0], exact, rtol=0, atol=1e-6)


def test_weighted_average_negative_count_raises():
    results = [([f32(1)], 3), ([f32(2)], -1)]

    with pytest.raises(ValueError, match=r"client 1.*num_examples"):
        weighted_average(results)


def test_weighted_average_zero_total_raises():
    results = [([f32(1)], 0), ([f32(2)], 0)]

    with pytest.raises(ValueError, match="sum to 0"):
        weighted_average(results)


# --- coordinate_median --------------------------------------------------------------------------


def test_median_odd_number_of_clients():
    results = line_results([1.0, 100.0, 5.0])

    out = coordinate_median(results)

    np.testing.assert_allclose(out[0], [5.0, -5.0])
    np.testing.assert_allclose(out[1], 5.0)


def test_median_even_number_averages_middle_values():
    results = line_results([1.0, 100.0, 2.0, 10.0])

    out = coordinate_median(results)

    np.testing.assert_allclose(out[0], [6.0, -6.0])
    np.testing.assert_allclose(out[1], 6.0)


def test_median_ignores_num_examples():
    results = line_results([1.0, 2.0, 30.0], counts=[1000, 1, 1])

    np.testing.assert_allclose(coordinate_median(results)[0], [2.0, -2.0])


# --- trimmed_mean -------------------------------------------------------------------------------


def test_trimmed_mean_cuts_one_each_side_per_coordinate():
    # Prepare: 5 clients, beta=0.2 -> int(1.0) = 1 value cut at each end of every coordinate
    values = [[1, -100], [2, 5], [100, 6], [3, 7], [4, 0]]
    results = [([f32(*v)], 1) for v in values]

    # Execute
    out = trimmed_mean(results, 0.2)

    # Assert: first coordinate mean(2, 3, 4) = 3; second sorted -100,0,5,6,7 -> mean(0, 5, 6)
    np.testing.assert_allclose(out[0], [3.0, 11.0 / 3.0], rtol=1e-6)


def test_trimmed_mean_rounds_the_cut_down():
    # beta=0.1 with 5 clients: int(0.5) = 0, nothing is cut
    results = line_results([1.0, 2.0, 3.0, 4.0, 100.0])

    np.testing.assert_allclose(trimmed_mean(results, 0.1)[1], 22.0)


def test_trimmed_mean_beta_zero_is_plain_mean():
    results = line_results([1.0, 2.0, 9.0], counts=[10, 1, 1])

    np.testing.assert_allclose(trimmed_mean(results, 0.0)[0], [4.0, -4.0])


def test_trimmed_mean_largest_beta_leaves_the_median():
    results = line_results([1.0, 2.0, 3.0, 50.0, 100.0])

    np.testing.assert_allclose(trimmed_mean(results, 0.49)[1], 3.0)


@pytest.mark.parametrize("beta", [0.5, 0.7, 1.0, -0.1, float("nan")])
def test_trimmed_mean_beta_out_of_range_raises(beta):
    results = line_results([1.0, 2.0, 3.0, 4.0])

    with pytest.raises(ValueError, match="beta"):
        trimmed_mean(results, beta)


# --- krum ---------------------------------------------------------------------------------------


def test_krum_chooses_the_client_closest_to_its_neighbours():
    results = line_results(KRUM_XS, KRUM_COUNTS)

    out = krum(results, num_malicious=1)

    np.testing.assert_array_equal(out[0], f32(0.0, -0.0))
    np.testing.assert_array_equal(out[1], scalar(0.0))


def test_krum_never_chooses_the_outlier():
    rng = np.random.default_rng(0)
    for _ in range(20):
        results = random_results(rng, [(4,), (2, 3)], num_clients=6)
        outlier = [np.full(4, 50.0, np.float32), np.full((2, 3), -50.0, np.float32)]
        results.insert(int(rng.integers(0, 7)), (outlier, 1))

        out = krum(results, num_malicious=1)

        assert np.abs(out[0]).max() < 50.0


def test_multikrum_averages_the_best_clients_by_num_examples():
    results = line_results(KRUM_XS, KRUM_COUNTS)

    out = krum(results, num_malicious=1, num_to_keep=3)

    # best three: 0.0 (count 1), 0.1 (count 1), -0.15 (count 2) -> (0 + 0.1 - 0.3) / 4
    np.testing.assert_allclose(out[0], [-0.05, 0.05], rtol=1e-6)
    np.testing.assert_allclose(out[1], -0.05, rtol=1e-6)


def test_multikrum_default_keeps_n_minus_f():
    results = line_results(KRUM_XS, KRUM_COUNTS)
    without_outlier = [r for i, r in enumerate(results) if i != 1]

    out = aggregate("multikrum", results, num_malicious=1)

    np.testing.assert_allclose(out[0], weighted_average(without_outlier)[0], rtol=1e-6)


def test_multikrum_keeping_all_is_fedavg():
    results = line_results(KRUM_XS, KRUM_COUNTS)

    out = krum(results, num_malicious=1, num_to_keep=5)

    np.testing.assert_allclose(out[0], weighted_average(results)[0], rtol=1e-6)


@pytest.mark.parametrize(("n", "f"), [(4, 1), (2, 0), (6, 2), (1, 0)])
def test_krum_needs_more_than_2f_plus_2_clients(n, f):
    results = line_results([float(x) for x in range(n)])

    with pytest.raises(ValueError, match=r"n > 2f \+ 2"):
        krum(results, num_malicious=f)


@pytest.mark.parametrize(("n", "f"), [(5, 1), (3 + 2 * 3, 3)])
def test_krum_accepts_2f_plus_3_clients(n, f):
    results = line_results([float(x) for x in range(n)])

    assert len(krum(results, num_malicious=f)) == 2


@pytest.mark.parametrize(("f", "m"), [(-1, 0), (1, 6), (1, -1)])
def test_krum_invalid_parameters_raise(f, m):
    results = line_results(KRUM_XS)

    with pytest.raises(ValueError, match=r"num_malicious|num_to_keep"):
        krum(results, num_malicious=f, num_to_keep=m)


def test_krum_with_identical_clients():
    results = line_results([2.0] * 5)

    np.testing.assert_array_equal(krum(results, 1)[0], f32(2.0, -2.0))


# --- bulyan -------------------------------------------------------------------------------------

# Bulyan case, n=7, f=1: Krum scores over the 4 nearest others (squared distances, the outlier aside):
#   p0 (0, 3.2): 5.44 + 6.74 + 11.24 + 15.08 = 38.5     p4 (4, 4):     4.5 + 8 + 9.64 + 16.64 = 38.78
#   p1 (1, 0):   5 + 5.84 + 8.5 + 11.24 = 30.58        p5 (2.5, 2.5): .5 + 2.74 + 4.5 + 6.74 = 14.48
#   p2 (2, 2):   .5 + 2.44 + 5 + 5.44 = 13.38          p6 (60, -60):  the outlier
#   p3 (3.2, 1): 2.44 + 2.74 + 5.84 + 9.64 = 20.66
# theta = 5 kept: p2, p5, p3, p1, p0. Coordinate 0: 0, 1, 2, 3.2, 2.5 -> median 2, the beta = 3 nearest
# are 2, 2.5, 1 -> 11/6. Coordinate 1: 3.2, 0, 2, 1, 2.5 -> median 2, nearest 2, 2.5, 1 -> 11/6.
BULYAN_POINTS = [(0, 3.2), (1, 0), (2, 2), (3.2, 1), (4, 4), (2.5, 2.5), (60, -60)]


def test_bulyan_by_hand():
    results = [([f32(*p)], n) for p, n in zip(BULYAN_POINTS, [1, 50, 2, 3, 4, 5, 6])]

    out = bulyan(results, num_malicious=1)

    np.testing.assert_allclose(out[0], [11.0 / 6.0, 11.0 / 6.0], rtol=1e-6)
    assert out[0].dtype == np.float32


def test_bulyan_selects_once_unlike_the_recursive_selection():
    # Prepare: 0, 1, 2, 3, 7, 8, 10 (f=1). Krum scores over the 4 nearest: 63, 42, 31, 30, 51, 66, 126.
    # One Multi-Krum pass keeps {0, 1, 2, 3, 7}: median 2, nearest three 2, 1, 3 -> 2.
    # The recursive selection (paper, legacy Flower) keeps 3, then 2, 8, 0, 7: median 3, nearest 3, 2, 0 -> 5/3.
    results = [([scalar(x)], 1) for x in [0.0, 1.0, 2.0, 3.0, 7.0, 8.0, 10.0]]

    # Execute
    out = bulyan(results, num_malicious=1)

    # Assert
    np.testing.assert_allclose(out[0], 2.0)
    legacy = pytest.importorskip("flwr.server.strategy.aggregate")
    theirs = legacy.aggregate_bulyan(list(results), 1, legacy.aggregate_krum, to_keep=0)
    np.testing.assert_allclose(theirs[0], 5.0 / 3.0, rtol=1e-6)


def test_bulyan_without_malicious_clients_is_the_unweighted_mean():
    results = line_results([1.0, 2.0, 9.0], counts=[10, 1, 1])

    np.testing.assert_allclose(bulyan(results, 0)[0], [4.0, -4.0])


def test_bulyan_resists_a_far_outlier():
    rng = np.random.default_rng(4)
    results = random_results(rng, [(4,), (2, 3)], num_clients=6)
    results.insert(2, ([np.full(4, 1e4, np.float32), np.full((2, 3), -1e4, np.float32)], 1000))

    out = bulyan(results, 1)

    assert max(float(np.abs(layer).max()) for layer in out) < 5.0


@pytest.mark.parametrize(("n", "f"), [(6, 1), (10, 2), (2, 0), (1, 0)])
def test_bulyan_needs_4f_plus_3_clients(n, f):
    results = line_results([float(x) for x in range(n)])

    with pytest.raises(ValueError, match=r"n >= 4f \+ 3"):
        bulyan(results, num_malicious=f)


@pytest.mark.parametrize(("n", "f"), [(3, 0), (7, 1), (11, 2)])
def test_bulyan_accepts_4f_plus_3_clients(n, f):
    results = line_results([float(x) for x in range(n)])

    assert len(bulyan(results, num_malicious=f)) == 2


@pytest.mark.parametrize("f", [-1, 1.5, True])
def test_bulyan_invalid_num_malicious_raises(f):
    with pytest.raises(AggregationError, match="num_malicious must be an integer >= 0"):
        bulyan(line_results([float(x) for x in range(11)]), num_malicious=f)


# --- properties shared by all rules -------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_zero_dim_layers(method):
    # mean, median, trimmed mean (1 cut each end), Krum's choice, Multi-Krum's best 3 and Bulyan (f=1:
    # Krum keeps 1..5, the 3 values nearest their median 3 are 2.5, 3, 3.5): all 3
    results = [([scalar(x)], 1) for x in [-1.0, 1.0, 2.5, 3.0, 3.5, 5.0, 7.0]]

    out = aggregate(method, results, num_to_keep=3)

    assert len(out) == 1
    assert isinstance(out[0], np.ndarray)
    assert out[0].shape == ()
    np.testing.assert_allclose(out[0], 3.0)


@pytest.mark.parametrize("method", METHODS)
def test_empty_results_raise(method):
    with pytest.raises(ValueError, match="empty"):
        aggregate(method, [])


@pytest.mark.parametrize("method", METHODS)
def test_mismatched_shapes_raise_naming_client_and_layer(method):
    results = line_results([1.0, 2.0, 3.0, 4.0, 5.0])
    results[3] = ([f32(1, 2), f32(3)], 1)  # layer 1 is (1,) instead of ()

    with pytest.raises(ValueError, match=r"client 3: weight 1 has shape \(1,\), expected \(\) as in client 0"):
        aggregate(method, results)


@pytest.mark.parametrize("method", METHODS)
def test_mismatched_number_of_layers_raises(method):
    results = line_results([1.0, 2.0, 3.0, 4.0, 5.0])
    results[2] = ([f32(1, 2)], 1)

    with pytest.raises(ValueError, match="client 2: expected 2 weight arrays for client 0, got 1"):
        aggregate(method, results)


@pytest.mark.parametrize("method", METHODS)
def test_inputs_unchanged_and_outputs_fresh_float32(method):
    # Prepare
    rng = np.random.default_rng(3)
    results = random_results(rng, [(3, 4), (4,)], num_clients=7, scalar_layer=True)
    expected = copy.deepcopy(results)
    input_ids = [id(r) for r in results]
    input_layers = [layer for weights, _ in results for layer in weights]

    # Execute
    out = aggregate(method, results)

    # Assert
    assert [id(r) for r in results] == input_ids
    for (weights, n), (weights0, n0) in zip(results, expected):
        assert n == n0
        assert len(weights) == len(weights0)
        for layer, layer0 in zip(weights, weights0):
            np.testing.assert_array_equal(layer, layer0)
    assert [layer.shape for layer in out] == [(3, 4), (4,), ()]
    for layer in out:
        assert isinstance(layer, np.ndarray)
        assert layer.dtype == np.float32
        assert not any(np.shares_memory(layer, inp) for inp in input_layers)


@pytest.mark.parametrize("method", METHODS)
def test_identical_clients_result_is_not_aliased(method):
    # Every rule's answer equals the shared weights, which must still be copied
    layer = f32(1, 2, 3)
    results = [([layer], 4)] * 8  # 8 clients (Bulyan needs 7); Multi-Krum keeps 4: shares exact in float32

    out = aggregate(method, results, num_to_keep=4)

    np.testing.assert_array_equal(out[0], layer)
    assert not np.shares_memory(out[0], layer)
    out[0][0] = 99.0
    assert layer[0] == 1.0


def test_float64_input_keeps_its_dtype():
    results = [([np.array([1.0, 2.0])], 1), ([np.array([3.0, 4.0])], 1)]

    assert weighted_average(results)[0].dtype == np.float64


def test_errors_are_value_and_validation_errors():
    with pytest.raises(AggregationError) as info:
        weighted_average([])

    assert isinstance(info.value, ValueError)
    assert isinstance(info.value, ValidationError)


# --- registry and dispatch ----------------------------------------------------------------------


def test_registry_names():
    assert available_methods() == METHODS
    assert list(AGGREGATORS) == METHODS
    assert all(AGGREGATORS[name].name == name for name in METHODS)
    assert all(AGGREGATORS[name].description for name in METHODS)


def test_registry_rules():
    assert AGGREGATORS["fedavg"].fn is weighted_average
    assert AGGREGATORS["fedprox"].fn is weighted_average
    assert AGGREGATORS["fedmed"].fn is coordinate_median
    assert AGGREGATORS["trimmed"].fn is trimmed_mean
    assert AGGREGATORS["krum"].fn is krum
    assert AGGREGATORS["multikrum"].fn is strategies.multi_krum
    assert AGGREGATORS["bulyan"].fn is bulyan
    assert AGGREGATORS["bulyan"].params == ("num_malicious",)
    assert {n for n in METHODS if AGGREGATORS[n].weighted} == {"fedavg", "fedprox", "multikrum"}


def test_aggregate_dispatches_with_parameters():
    results = line_results([*KRUM_XS, 0.2, -0.05], [*KRUM_COUNTS, 3, 4])
    cases = {
        "fedavg": weighted_average(results),
        "FedProx": weighted_average(results),
        " fedmed ": coordinate_median(results),
        "trimmed": trimmed_mean(results, 0.2),
        "krum": krum(results, 1),
        "multikrum": krum(results, 1, 6),
        "Bulyan": bulyan(results, 1),
    }

    for method, expected in cases.items():
        np.testing.assert_array_equal(aggregate(method, results)[0], expected[0])

    np.testing.assert_array_equal(
        aggregate("trimmed", results, trim_beta=0.4)[0], trimmed_mean(results, 0.4)[0]
    )
    np.testing.assert_array_equal(
        aggregate("multikrum", results, num_malicious=1, num_to_keep=2)[0],
        krum(results, 1, 2)[0],
    )
    np.testing.assert_array_equal(aggregate("krum", results, num_malicious=0)[0], krum(results, 0)[0])
    np.testing.assert_array_equal(aggregate("bulyan", results, num_malicious=0)[0], bulyan(results, 0)[0])


def test_aggregate_ignores_parameters_a_rule_does_not_take():
    results = line_results([1.0, 2.0, 3.0])

    out = aggregate("fedavg", results, trim_beta=0.9, num_malicious=5, num_to_keep=7)

    np.testing.assert_allclose(out[0], [2.0, -2.0])


def test_aggregate_passes_invalid_parameters_to_the_rule():
    results = line_results([1.0, 2.0, 3.0, 4.0, 5.0])

    with pytest.raises(ValueError, match="beta"):
        aggregate("trimmed", results, trim_beta=0.5)
    with pytest.raises(ValueError, match="2f"):
        aggregate("krum", results, num_malicious=2)
    with pytest.raises(ValueError, match="4f"):
        aggregate("bulyan", results, num_malicious=1)


@pytest.mark.parametrize("method", ["geomed", "", "fed avg", None])
def test_unknown_method_lists_available_names(method):
    with pytest.raises(ValueError, match="unknown aggregation method") as info:
        aggregate(method, line_results([1.0]))

    assert all(name in str(info.value) for name in METHODS)


# --- parity with Flower's aggregate.py ----------------------------------------------------------


@pytest.fixture(scope="module")
def flwr_agg():
    return pytest.importorskip("flwr.server.strategy.aggregate")


PARITY_CASES = [
    (0, [(5,)], 3, False),
    (1, [(2, 3), (3,)], 7, True),
    (2, [(4, 4, 2)], 10, True),
    (3, CNN_SHAPES, 9, True),
    (4, CNN_SHAPES, 12, False),
]


def assert_same(ours, theirs):
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        assert a.shape == np.shape(b)
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("seed", "shapes", "n", "with_scalar"), PARITY_CASES)
def test_matches_flower_weighted_average(flwr_agg, seed, shapes, n, with_scalar):
    results = random_results(np.random.default_rng(seed), shapes, n, with_scalar)

    assert_same(weighted_average(results), flwr_agg.aggregate(results))


@pytest.mark.parametrize(("seed", "shapes", "n", "with_scalar"), PARITY_CASES)
def test_matches_flower_median(flwr_agg, seed, shapes, n, with_scalar):
    results = random_results(np.random.default_rng(seed), shapes, n, with_scalar)

    assert_same(coordinate_median(results), flwr_agg.aggregate_median(results))


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.2, 0.3, 0.45])
@pytest.mark.parametrize(("seed", "shapes", "n", "with_scalar"), PARITY_CASES)
def test_matches_flower_trimmed_mean(flwr_agg, seed, shapes, n, with_scalar, beta):
    results = random_results(np.random.default_rng(seed), shapes, n, with_scalar)

    assert_same(trimmed_mean(results, beta), flwr_agg.aggregate_trimmed_avg(results, beta))


@pytest.mark.parametrize("num_to_keep", [0, 1, 2, "n-f"])
@pytest.mark.parametrize(("seed", "shapes", "n", "with_scalar"), PARITY_CASES)
def test_matches_flower_krum(flwr_agg, seed, shapes, n, with_scalar, num_to_keep):
    rng = np.random.default_rng(seed)
    results = random_results(rng, shapes, n, with_scalar)
    # A couple of far-away clients so the choice is not just noise
    for i in rng.choice(n, size=(n - 3) // 2, replace=False):
        results[i] = ([w + np.float32(5.0) for w in results[i][0]], results[i][1])
    f = (n - 3) // 2
    m = n - f if num_to_keep == "n-f" else num_to_keep

    ours = krum(results, f, m)
    theirs = flwr_agg.aggregate_krum(results, f, m)

    assert_same(ours, theirs)
    if m == 0:
        for a, b in zip(ours, theirs):
            np.testing.assert_array_equal(a, b)  # the very same client, copied


@pytest.mark.parametrize("seed", range(5))
def test_krum_scores_match_direct_distances(seed):
    # Prepare: the matrix-product distances against a direct float64 computation
    rng = np.random.default_rng(seed)
    results = random_results(rng, [(6, 5), (5,)], 6, scalar_layer=True)
    flat = np.stack([np.concatenate([np.ravel(layer) for layer in w]) for w, _ in results])
    flat = flat.astype(np.float64)
    distances = ((flat[:, None, :] - flat[None, :, :]) ** 2).sum(axis=2)

    # Execute: n - f - 2 = 3 nearest for f = 1
    scores = strategies._krum_scores(results, num_closest=3)

    # Assert
    np.testing.assert_allclose(scores, np.sort(distances, axis=1)[:, 1:4].sum(axis=1), rtol=1e-9)


@pytest.fixture
def flwr_serverapp(monkeypatch):
    """Flower's message-API strategies, with the task identity a Message needs outside a running app."""
    strategy = pytest.importorskip("flwr.serverapp.strategy")
    from flwr.supercore.task_identity import TaskIdentity

    for name in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, name, 1)
    return strategy


def train_replies(results):
    """Train replies as a ClientApp sends them: ArrayRecord + MetricRecord with 'num-examples'."""
    from flwr.app import ArrayRecord, Message, MessageType, MetricRecord, RecordDict

    return [
        Message(content=RecordDict({"arrays": ArrayRecord([np.array(w) for w in weights]),
                                    "metrics": MetricRecord({"num-examples": n})}),
                dst_node_id=i + 1, message_type=MessageType.TRAIN)
        for i, (weights, n) in enumerate(results)
    ]


BULYAN_PARITY_CASES = [pytest.param(seed, shapes, n, f, scalar_layer,
                                    marks=[pytest.mark.slow] if seed >= 2 else [])  # the two small cases stay fast
                       for seed, (shapes, n, f, scalar_layer) in enumerate([
                           ([(5,)], 3, 0, False),
                           ([(2, 3), (3,)], 7, 1, True),
                           ([(4, 4, 2)], 8, 1, True),
                           (CNN_SHAPES, 9, 1, True),
                           (CNN_SHAPES, 11, 2, False),
                           ([(6,), (2, 2)], 12, 2, True),
                           ([(3, 5)], 16, 3, True),
                       ])]


@pytest.mark.parametrize(("seed", "shapes", "n", "f", "with_scalar"), BULYAN_PARITY_CASES)
def test_matches_flower_serverapp_bulyan(flwr_serverapp, seed, shapes, n, f, with_scalar):
    # Prepare: random clients, f of them far away
    rng = np.random.default_rng(seed)
    results = random_results(rng, shapes, n, with_scalar)
    for i in rng.choice(n, size=f, replace=False):
        results[i] = ([w + np.float32(rng.choice([-5.0, 5.0])) for w in results[i][0]], results[i][1])
    snapshot = copy.deepcopy(results)

    # Execute
    ours = bulyan(results, f)
    arrays, _ = flwr_serverapp.Bulyan(num_malicious_nodes=f).aggregate_train(1, train_replies(results))

    # Assert
    assert_same(ours, arrays.to_numpy_ndarrays())
    for (weights, _), (weights0, _) in zip(results, snapshot):
        for layer, layer0 in zip(weights, weights0):
            np.testing.assert_array_equal(layer, layer0)
