"""Tests for fedmnist.scaffold: option II control updates and the server step computed by hand on 1-D
quadratics, the drift SCAFFOLD removes, client sampling, input safety and error messages."""

import copy

import numpy as np
import pytest

from fedmnist.errors import ValidationError
from fedmnist.scaffold import (
    ScaffoldError,
    check_controls,
    client_control_update,
    correction,
    server_update,
    zero_controls,
)


def f32(*values):
    return np.array(values, dtype=np.float32)


def local_sgd(x, correction_value, curvature, target, steps, lr):
    """K steps of SGD on f(w) = curvature/2·(w − target)², each gradient plus the correction."""
    y = np.float64(x)
    for _ in range(steps):
        y = y - lr * (curvature * (y - target) + correction_value)
    return y


def scaffold_round(x, c, client_controls, clients, chosen, num_clients, steps, lr, use_correction=True):
    """One round over the ``chosen`` clients of 1-D quadratics ``clients[i] = (curvature, target)``."""
    ys, deltas = [], []
    for i in chosen:
        corr = correction(c, client_controls[i])[0][0] if use_correction else 0.0
        curvature, target = clients[i]
        y = [np.array([local_sgd(x[0][0], corr, curvature, target, steps, lr)], dtype=np.float32)]
        client_controls[i], delta = client_control_update(x, y, c, client_controls[i], steps, lr)
        ys.append(y)
        deltas.append(delta)
    return server_update(x, c, ys, deltas, num_clients)


# --- by hand -------------------------------------------------------------------------------------


def test_two_rounds_by_hand():
    # Prepare: f_1 = ½(w − 1)², f_2 = ½(w + 3)², x = 0, lr = 0.5, K = 2, both clients every round
    clients = [(1.0, 1.0), (1.0, -3.0)]
    x, c = [f32(0.0)], [f32(0.0)]
    controls = [[f32(0.0)], [f32(0.0)]]

    # Execute: round 1 (no correction yet)
    # client 1: 0 -> 0.5 -> 0.75, c_1 = (0 − 0.75)/(2·0.5) = −0.75; client 2: 0 -> −1.5 -> −2.25, c_2 = 2.25
    x, c = scaffold_round(x, c, controls, clients, [0, 1], 2, steps=2, lr=0.5)

    # Assert: x = avg(0.75, −2.25) = −0.75, c = (−0.75 + 2.25)/2 = 0.75
    np.testing.assert_allclose(x[0], [-0.75])
    np.testing.assert_allclose(c[0], [0.75])
    np.testing.assert_allclose(controls[0][0], [-0.75])
    np.testing.assert_allclose(controls[1][0], [2.25])

    # Execute: round 2, corrections c − c_1 = 1.5 and c − c_2 = −1.5
    # client 1: −0.75 -> −0.625 -> −0.5625; c_1 = −0.75 − 0.75 + (−0.75 + 0.5625)/1 = −1.6875
    # client 2: −0.75 -> −1.125 -> −1.3125; c_2 = 2.25 − 0.75 + (−0.75 + 1.3125)/1 = 2.0625
    x, c = scaffold_round(x, c, controls, clients, [0, 1], 2, steps=2, lr=0.5)

    # Assert: x = −0.75 + avg(0.1875, −0.5625) = −0.9375; c = avg(c_1, c_2) = 0.1875
    np.testing.assert_allclose(controls[0][0], [-1.6875])
    np.testing.assert_allclose(controls[1][0], [2.0625])
    np.testing.assert_allclose(x[0], [-0.9375])
    np.testing.assert_allclose(c[0], [0.1875])


def test_client_control_update_by_hand():
    # Prepare: two layers, one of them 0-dim
    x = [f32(1.0, 2.0), np.array(0.5, np.float32)]
    y = [f32(0.0, 2.5), np.array(1.5, np.float32)]
    c = [f32(0.1, 0.2), np.array(0.3, np.float32)]
    ci = [f32(-0.1, 0.0), np.array(1.0, np.float32)]

    # Execute: K = 4, lr = 0.25 -> (x − y)/(K·lr) = x − y
    new, delta = client_control_update(x, y, c, ci, num_steps=4, learning_rate=0.25)

    # Assert: c_i − c + (x − y)
    np.testing.assert_allclose(new[0], [-0.1 - 0.1 + 1.0, 0.0 - 0.2 - 0.5], rtol=1e-6)
    np.testing.assert_allclose(new[1], 1.0 - 0.3 - 1.0, rtol=1e-6)
    np.testing.assert_allclose(delta[0], new[0] - ci[0], rtol=1e-6)
    np.testing.assert_allclose(delta[1], new[1] - ci[1], rtol=1e-6)
    assert new[1].shape == () and delta[1].shape == ()
    assert all(a.dtype == np.float32 for a in new + delta)


def test_server_update_by_hand_with_sampling_and_server_rate():
    # Prepare: N = 10 clients, 2 of them report
    x, c = [f32(1.0, 1.0)], [f32(0.5, -0.5)]
    ys = [[f32(2.0, 0.0)], [f32(0.0, 0.0)]]
    deltas = [[f32(1.0, 2.0)], [f32(3.0, -4.0)]]

    # Execute
    new_x, new_c = server_update(x, c, ys, deltas, num_clients=10, server_lr=2.0)

    # Assert: x + 2·avg([1, −1], [−1, −1]) = [1, −1]; c + (2/10)·avg(Δc) = c + Σ Δc / 10
    np.testing.assert_allclose(new_x[0], [1.0, -1.0])
    np.testing.assert_allclose(new_c[0], [0.5 + 0.4, -0.5 - 0.2], rtol=1e-6)


def test_server_update_weighted_by_examples():
    x, c = [f32(0.0)], [f32(0.0)]
    ys = [[f32(4.0)], [f32(0.0)]]
    deltas = [[f32(1.0)], [f32(1.0)]]

    new_x, new_c = server_update(x, c, ys, deltas, num_clients=2, num_examples=[1, 3])

    np.testing.assert_allclose(new_x[0], [1.0])  # (1·4 + 3·0)/4
    np.testing.assert_allclose(new_c[0], [1.0])  # the control update stays unweighted


def test_correction_is_global_minus_client():
    out = correction([f32(1.0, 2.0)], [f32(0.5, 3.0)])

    np.testing.assert_allclose(out[0], [0.5, -1.0])
    assert out[0].dtype == np.float32


def test_zero_controls():
    weights = [np.ones((2, 3), np.float32), np.array(1.0, np.float32), np.ones(2, np.float64)]

    zeros = zero_controls(weights)

    assert [z.shape for z in zeros] == [(2, 3), (), (2,)]
    assert [z.dtype for z in zeros] == [np.float32, np.float32, np.float64]
    assert not any(z.any() for z in zeros)
    assert not any(np.shares_memory(z, w) for z, w in zip(zeros, weights))


# --- what SCAFFOLD is for ------------------------------------------------------------------------


def test_scaffold_removes_client_drift_on_heterogeneous_quadratics():
    # Prepare: f_1 = ½(w − 1)², f_2 = ½·4(w + 1)²; the minimiser of f_1 + f_2 is (1 − 4)/5 = −0.6.
    # FedAvg with K = 5 local steps settles elsewhere (client drift); SCAFFOLD reaches −0.6.
    clients = [(1.0, 1.0), (4.0, -1.0)]
    results = {}
    for use_correction in (False, True):
        x, c = [f32(0.0)], [f32(0.0)]
        controls = [zero_controls(x), zero_controls(x)]

        # Execute
        for _ in range(200):
            x, c = scaffold_round(x, c, controls, clients, [0, 1], 2, steps=5, lr=0.1,
                                  use_correction=use_correction)
        results[use_correction] = (x[0][0], c[0][0], [ci[0][0] for ci in controls])

    # Assert: SCAFFOLD's x is the optimum, its c_i the clients' gradients there (−1.6 and 1.6), c their mean
    x_scaffold, c_scaffold, controls_scaffold = results[True]
    assert x_scaffold == pytest.approx(-0.6, abs=1e-5)
    assert c_scaffold == pytest.approx(0.0, abs=1e-5)
    assert controls_scaffold == pytest.approx([-1.6, 1.6], abs=1e-5)
    assert abs(results[False][0] - -0.6) > 0.1


def test_with_sampling_c_stays_the_mean_of_all_client_controls():
    # Prepare: N = 5 quadratics, 2 sampled per round
    rng = np.random.default_rng(0)
    clients = [(float(h), float(a)) for h, a in zip(rng.uniform(0.5, 3.0, 5), rng.normal(size=5))]
    x, c = [f32(0.0)], [f32(0.0)]
    controls = [zero_controls(x) for _ in clients]

    for _ in range(30):
        # Execute
        chosen = sorted(rng.choice(5, size=2, replace=False))
        x, c = scaffold_round(x, c, controls, clients, chosen, 5, steps=3, lr=0.1)

        # Assert
        np.testing.assert_allclose(c[0], np.mean([ci[0] for ci in controls], axis=0), atol=1e-6)

    optimum = sum(h * a for h, a in clients) / sum(h for h, _ in clients)
    assert abs(x[0][0] - optimum) < 0.05


# --- inputs and errors ---------------------------------------------------------------------------


def test_inputs_unchanged_and_outputs_fresh():
    # Prepare
    rng = np.random.default_rng(1)
    shapes = [(3, 2), (2,), ()]

    def arrays():
        return [np.array(rng.normal(size=s), dtype=np.float32) for s in shapes]

    x, y, c, ci = arrays(), arrays(), arrays(), arrays()
    ys, deltas = [arrays(), arrays()], [arrays(), arrays()]
    snapshot = copy.deepcopy((x, y, c, ci, ys, deltas))
    given = x + y + c + ci + [a for group in ys + deltas for a in group]

    # Execute
    out = list(client_control_update(x, y, c, ci, 3, 0.1))
    out += list(server_update(x, c, ys, deltas, num_clients=4))
    out.append(correction(c, ci))

    # Assert
    for now, before in zip((x, y, c, ci), snapshot[:4]):
        for a, b in zip(now, before):
            np.testing.assert_array_equal(a, b)
    for now, before in zip(ys + deltas, snapshot[4] + snapshot[5]):
        for a, b in zip(now, before):
            np.testing.assert_array_equal(a, b)
    produced = [a for group in out for a in group]
    assert all(a.dtype == np.float32 for a in produced)
    assert not any(np.shares_memory(a, b) for a in produced for b in given)


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"num_steps": 0}, "K must be an integer >= 1"),
        ({"num_steps": 2.0}, "K must be an integer >= 1"),
        ({"num_steps": True}, "K must be an integer >= 1"),
        ({"learning_rate": 0.0}, "local learning rate > 0"),
        ({"learning_rate": float("inf")}, "local learning rate > 0"),
        ({"client_weights": [f32(1.0)]}, "the client's weights: expected 2 weight arrays for the global weights, got 1"),
        ({"client_control": [f32(1.0), f32(1.0, 2.0)]},
         r"the client control variate: weight 1 has shape \(2,\), expected \(\) as in the global weights"),
    ],
)
def test_client_control_update_rejects(kwargs, fragment):
    args = {"global_weights": [f32(1.0), np.array(1.0, np.float32)],
            "client_weights": [f32(0.0), np.array(0.0, np.float32)],
            "global_control": [f32(0.0), np.array(0.0, np.float32)],
            "client_control": [f32(0.0), np.array(0.0, np.float32)],
            "num_steps": 2, "learning_rate": 0.1}

    with pytest.raises(ScaffoldError, match=fragment) as info:
        client_control_update(**{**args, **kwargs})

    assert isinstance(info.value, ValidationError) and isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"client_weights": [], "control_deltas": []}, "without any client"),
        ({"control_deltas": [[f32(0.0)]]}, "2 client weights but 1 control-variate deltas"),
        ({"num_clients": 1}, r"N \(at least the 2 that reported\) must be an integer >= 2 \(got 1\)"),
        ({"num_clients": 3.0}, r"N \(at least the 2 that reported\) must be an integer"),
        ({"server_lr": 0.0}, "server learning rate must be > 0"),
        ({"num_examples": [1]}, "2 clients but 1 example counts"),
        ({"num_examples": [0, 0]}, "not all zero"),
        ({"num_examples": [-1, 3]}, "must be >= 0"),
        ({"control_deltas": [[f32(0.0)], [f32(0.0, 1.0)]]},
         r"client 1's control-variate delta: weight 0 has shape \(2,\)"),
        ({"global_control": [f32(0.0), f32(0.0)]}, "the server control variate: expected 1 weight arrays for the global weights, got 2"),
    ],
)
def test_server_update_rejects(kwargs, fragment):
    args = {"global_weights": [f32(1.0)], "global_control": [f32(0.0)],
            "client_weights": [[f32(0.0)], [f32(2.0)]], "control_deltas": [[f32(0.0)], [f32(1.0)]],
            "num_clients": 4}

    with pytest.raises(ScaffoldError, match=fragment):
        server_update(**{**args, **kwargs})


def test_check_controls():
    weights = [np.zeros((2, 2), np.float32), np.array(0.0, np.float32)]
    check_controls(zero_controls(weights), weights)

    cases = [
        ({"c": 1}, "control_cliente_3.pkl: expected a list of arrays, got dict"),
        ([np.zeros((2, 2), np.float32)], "control_cliente_3.pkl: expected 2 weight arrays for the model, got 1"),
        ([np.zeros((2, 2), np.float32), np.zeros(1, np.float32)], r"weight 1 has shape \(1,\), expected \(\) as in the model"),
        ([np.zeros((2, 2), np.float64), np.array(0.0, np.float32)], "weight 0 has dtype float64, expected float32"),
        ([np.full((2, 2), np.inf, np.float32), np.array(0.0, np.float32)], "weight 0 holds non-finite values"),
        ([[[0.0, 0.0], [0.0, 0.0]], np.array(0.0, np.float32)], "weight 0 is a list, not a numpy array"),
    ]
    for controls, fragment in cases:
        with pytest.raises(ScaffoldError, match=fragment):
            check_controls(controls, weights, what="control_cliente_3.pkl")
