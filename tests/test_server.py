"""Tests of fedmnist.server: the round step every mode shares (validate, aggregate, evaluate, record)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedmnist.methods import MethodConfig, build_methods
from fedmnist.model import initial_weights, weights_sha256
from fedmnist.server import (
    MAX_NUM_EXAMPLES,
    RejectedReply,
    Reply,
    RoundFailedError,
    Server,
    ServerState,
    check_num_examples,
    check_reply,
    dominant_clients,
    rounds_to_target,
)


@pytest.fixture(scope="module")
def start():
    return initial_weights(3)


def reply(start, client_id: int, shift: float, n: int = 10, **changes) -> Reply:
    weights = [w + np.float32(shift) for w in start]
    values = {"start_sha256": weights_sha256(start), "train_loss": 0.5}
    values.update(changes)
    return Reply(client_id, weights, n, f"pesos/pesos_cliente_{client_id}.pkl", **values)


def server_for(start, methods=("fedavg", "fedmed"), **kwargs) -> Server:
    built = build_methods(MethodConfig(methods))
    return Server(built, ServerState.initial(built, start), **kwargs)


@pytest.mark.parametrize("value", [0, -3, 1.5, math.inf, math.nan, 10**400, MAX_NUM_EXAMPLES + 1, "600", True, None])
def test_bad_sample_counts_are_refused_without_a_traceback(value):
    with pytest.raises(RejectedReply, match="node 4: num_examples"):
        check_num_examples(value, "node 4")


def test_sample_counts_match_the_manifest():
    assert check_num_examples(600, "x") == 600 and check_num_examples(600.0, "x") == 600
    with pytest.raises(RejectedReply, match=r"claims 601 .* gives this client 600"):
        check_num_examples(601, "x", expected=600)


@pytest.mark.parametrize("spoil", ["nan", "inf", "shape", "dtype", "layers", "start", "client"])
def test_check_reply_refuses_and_names_the_client(spoil, start):
    r = reply(start, 2, 0.1)
    if spoil == "nan":
        r.weights[1][0] = np.nan
    elif spoil == "inf":
        r.weights[-1][0] = -np.inf
    elif spoil == "shape":
        r.weights[0] = r.weights[0][:1]
    elif spoil == "dtype":
        r.weights[0] = r.weights[0].astype(np.int32)
    elif spoil == "layers":
        r.weights.pop()
    elif spoil == "start":
        r.start_sha256 = weights_sha256(initial_weights(4))
    else:
        r.client_id = 0
    with pytest.raises(RejectedReply, match=r"pesos_cliente_2\.pkl"):
        check_reply(r, weights_sha256(start))


def test_other_float_precisions_become_float32_and_overflow_is_refused(start):
    r = reply(start, 2, 0.1)
    r.weights[0] = r.weights[0].astype(np.float64)
    check_reply(r, weights_sha256(start))
    assert r.weights[0].dtype == np.float32
    r.weights[1] = np.full(r.weights[1].shape, 1e300)
    with pytest.raises(RejectedReply, match="NaN or infinite"):
        check_reply(r, weights_sha256(start))


def test_bare_reply_is_accepted_with_a_warning_and_unknown_manifest_clients_refused(start):
    bare = reply(start, 2, 0.1, start_sha256=None)
    assert "cannot be verified" in check_reply(bare, weights_sha256(start))[0]
    with pytest.raises(RejectedReply, match="not in the federation manifest"):
        check_reply(reply(start, 9, 0.1), weights_sha256(start), {1: 10, 2: 10})


def test_step_aggregates_accepted_replies_records_and_keeps_state(start):
    server = server_for(start, evaluate=lambda w: type("E", (), {"accuracy": 0.5, "loss": 1.0})())
    replies = [reply(start, 2, 0.2, n=30), reply(start, 1, 0.1, n=10), reply(start, 3, 0.0, n=10)]
    replies[2].weights[0][...] = np.nan  # refused: counts as a failed client

    step = server.step(1, "fedavg", replies, sampled_clients=[1, 2, 3])

    assert [r.client_id for r in step.accepted] == [1, 2]
    expected = [w + np.float32(0.1) * 0.25 + np.float32(0.2) * 0.75 for w in start]
    for got, want in zip(step.weights, expected):
        np.testing.assert_allclose(got, want, atol=1e-6)
    record = step.record
    assert (record.round, record.num_sampled, record.num_replies, record.replied_clients) == (1, 3, 2, [1, 2])
    assert len(record.failed) == 1 and "pesos_cliente_3.pkl (client 3)" in record.failed[0]
    assert record.test_accuracy == 0.5 and record.start_sha256 == weights_sha256(start)[:16]
    assert server.weights("fedavg") is step.weights and server.weights("fedmed") == start

    # the next step of the same method checks replies against the new global weights
    stale = server.step(2, "fedavg", [reply(start, 1, 0.1)], min_replies=0)
    assert stale.record.num_replies == 0 and "trained from global weights" in stale.record.failed[0]


def test_step_refuses_below_min_replies_and_strict_mode_raises(start):
    server = server_for(start)
    bad = reply(start, 1, 0.1)
    bad.weights[0][...] = np.inf
    with pytest.raises(RoundFailedError, match=r"round 1 \(fedavg\): only 1 accepted replies, 2 needed"):
        server.step(1, "fedavg", [bad, reply(start, 2, 0.1)], min_replies=2)
    assert server.weights("fedavg") == start and server.state.history == []
    with pytest.raises(RejectedReply, match=r"pesos_cliente_1\.pkl"):
        server.step(1, "fedavg", [bad, reply(start, 2, 0.1)], strict=True)
    dup = [reply(start, 2, 0.1), reply(start, 2, 0.3)]
    with pytest.raises(RejectedReply, match="appears twice"):
        server.step(1, "fedavg", dup, strict=True)


def test_end_round_orders_records_by_method_and_counts_the_round(start):
    server = server_for(start, methods=("fedmed", "fedavg"))
    replies = [reply(start, k, 0.1 * k) for k in (1, 2, 3)]
    server.step(1, "fedavg", replies)
    server.step(1, "fedmed", replies)
    rows = server.end_round(1, round_seconds=2.5)
    assert [r.method for r in rows] == ["fedmed", "fedavg"] and server.state.round == 1
    assert all(r.round_seconds == 2.5 for r in server.state.history)


def test_dominant_clients_are_reported(start):
    replies = [reply(start, 1, 0.1, n=600), reply(start, 2, 0.1, n=600), reply(start, 3, 0.1, n=10**6)]
    (warning,) = dominant_clients(replies)
    assert "client 3" in warning and "dominates" in warning
    assert dominant_clients([reply(start, k, 0.1, n=600) for k in range(1, 11)]) == []


def test_rounds_to_target_takes_the_first_evaluated_round(start):
    server = server_for(start, methods=("fedavg",))
    rows = []
    for round_, accuracy in ((1, None), (2, 0.95), (3, 0.99), (4, 0.995)):
        server.evaluate = (lambda a: (lambda w: type("E", (), {"accuracy": a, "loss": 0.1})()))(accuracy)
        step = server.step(round_, "fedavg", [reply(server.weights("fedavg"), 1, 0.0)],
                           evaluate=accuracy is not None)
        rows.append(step.record)
    assert rounds_to_target(rows, 0.99) == 3 and rounds_to_target(rows, 0.999) is None


def test_max_count_ratio_caps_a_lying_count_at_a_multiple_of_the_median(start):
    server = server_for(start, methods=("fedavg",), max_count_ratio=2.0)
    replies = [reply(start, 1, 0.1, n=100), reply(start, 2, 0.2, n=100), reply(start, 3, 0.9, n=10**6)]
    step = server.step(1, "fedavg", replies)
    # weights 100, 100, 200 (2 x the median 100), not 10**6
    expected = [w + np.float32(0.1) * 0.25 + np.float32(0.2) * 0.25 + np.float32(0.9) * 0.5 for w in start]
    for got, want in zip(step.weights, expected):
        np.testing.assert_allclose(got, want, atol=1e-6)
    assert any("weighted as 200 examples" in n for n in step.record.notes)
    assert any("dominates" in n for n in step.record.notes)


def test_an_infinite_count_cap_is_a_clear_error(start):
    from fedmnist.errors import ConfigError

    with pytest.raises(ConfigError, match="max-count-ratio"):
        server_for(start, max_count_ratio=math.inf)


def test_an_aggregate_that_overflows_is_never_adopted(start):
    server = server_for(start, methods=("fedadam",))
    huge = reply(start, 1, 0.0)
    huge.weights = [w + np.float32(1e21) for w in start]  # finite, but the squared mean delta overflows float32
    step = server.step(1, "fedadam", [huge, reply(start, 2, 0.1), reply(start, 3, 0.2)])
    assert all(np.array_equal(a, b) for a, b in zip(step.weights, start))
    assert server.state.method_state["fedadam"] == {}
    assert any("not finite" in n for n in step.record.notes)


def test_client_side_adaptive_dp_refuses_a_reply_without_its_bit(start):
    from fedmnist.methods import build_methods, with_privacy
    from fedmnist.privacy import DPConfig

    dp = DPConfig(0.1, 10.0, adaptive=True, side="client", clipped_count_stddev=1.0)
    method = with_privacy(build_methods(MethodConfig(("fedavg",)))[0], dp, 3, 3, seed=1)
    server = Server([method], ServerState.initial([method], start))
    replies = [reply(start, k, 0.0001, metrics={"unclipped": True}) for k in (1, 2)] + [reply(start, 3, 0.0001)]
    step = server.step(1, "fedavg", replies)
    assert step.record.replied_clients == [1, 2]
    assert "unclipped bit" in step.record.failed[0] and "client 3" in step.record.failed[0]


def test_dp_fedavgm_steps_its_momentum_from_the_noised_mean_and_checks_its_state(start):
    from fedmnist.methods import ServerOptError, build_methods, with_privacy
    from fedmnist.privacy import DPConfig, DPState, dp_fedavg_step
    from fedmnist.seeds import server_rng
    from fedmnist.server_opt import server_step

    dp = DPConfig(0.5, 0.01)
    method = with_privacy(build_methods(MethodConfig(("fedavgm",), server_momentum=0.7))[0], dp, 6, 3, seed=1)
    server = Server([method], ServerState.initial([method], start))
    replies = [reply(start, k, 0.001 * k) for k in (1, 2, 3)]

    step = server.step(1, "fedavgm", replies, evaluate=False)

    # the DP release (clip, equal weights, z·S/m) then FedAvgM from it: post-processing of the release
    released = dp_fedavg_step(start, [r.weights for r in replies], dp, DPState(0.01), server_rng(1, 1), num_sampled=3)
    want, server_state = server_step(method.optimizer, start, released.weights)
    assert all(np.array_equal(a, b) for a, b in zip(step.weights, want))
    state = server.state.method_state["fedavgm"]
    assert state["releases"] == 1 and state["server"]["t"] == server_state["t"] == 1
    method.check_state(state, start)
    for bad in ({"clip": 0.01, "releases": 1}, {**state, "server": {"method": "fedadam"}}):
        with pytest.raises(ServerOptError):
            method.check_state(bad, start)


# --- SCAFFOLD replies ---------------------------------------------------------------------------


def _control(start, value: float) -> list[np.ndarray]:
    return [np.full_like(w, value) for w in start]


def test_scaffold_step_moves_weights_and_control_and_refuses_replies_without_a_delta(start):
    # Arrange: N = 4 clients in the federation, 3 reply, one of them without its control-variate delta
    built = build_methods(MethodConfig(("scaffold", "fedavg")), num_clients=4)
    server = Server(built, ServerState.initial(built, start))
    replies = [reply(start, 1, 0.1, n=10, control_delta=_control(start, 0.4)),
               reply(start, 2, 0.3, n=30, control_delta=_control(start, 0.8)),
               reply(start, 3, 1.0, n=10)]

    # Act
    step = server.step(1, "scaffold", replies, sampled_clients=[1, 2, 3], evaluate=False, min_replies=1)
    plain = server.step(1, "fedavg", replies, sampled_clients=[1, 2, 3], evaluate=False)

    # Assert: x + weighted mean of the deltas (η_g = 1); c = Σ Δc_i / N; client 3 named as refused
    assert step.record.replied_clients == [1, 2]
    assert any("client 3" in f and "control-variate delta" in f for f in step.record.failed)
    for got, w in zip(step.weights, start):
        np.testing.assert_allclose(got, w + np.float32(0.25), atol=1e-6)
    for got in server.state.method_state["scaffold"]["control"]:
        np.testing.assert_allclose(got, (0.4 + 0.8) / 4, atol=1e-6)
    assert plain.record.replied_clients == [1, 2, 3]  # the other methods can use every reply


@pytest.mark.parametrize("spoil, fragment", [
    (lambda d: d[0].fill(np.nan), "control-variate delta"),
    (lambda d: d.pop(), "control-variate delta"),
])
def test_bad_control_delta_is_refused_like_bad_weights(start, spoil, fragment):
    delta = _control(start, 0.1)
    spoil(delta)

    with pytest.raises(RejectedReply, match=fragment):
        check_reply(reply(start, 1, 0.1, control_delta=delta), weights_sha256(start))


def test_scaffold_state_is_checked(start):
    from fedmnist.server_opt import ServerOptError

    method = build_methods(MethodConfig(("scaffold",)))[0]
    method.check_state({}, start)
    method.check_state({"control": _control(start, 0.0)}, start)
    for bad in ({"control": _control(start, 0.0)[:-1]}, {"control": _control(start, 0.0), "x": 1}, {"m": []}):
        with pytest.raises(ServerOptError):
            method.check_state(bad, start)


@pytest.mark.parametrize("order", [1, -1], ids=["first-kept-before", "last-kept-before"])
def test_a_client_id_claimed_twice_is_refused_in_every_reply_whatever_the_order(start, order):
    # Prepare: two valid replies claim client 2; which is genuine cannot be told from the replies
    server = server_for(start)
    copy = reply(start, 2, 0.3)
    copy.source = "copia/pesos_cliente_2.pkl"
    replies = [reply(start, 1, 0.1), reply(start, 2, 0.2), copy][::order]

    # Execute
    step = server.step(1, "fedavg", replies)

    # Assert: neither claimant is kept, so the order cannot pick the winner
    assert step.record.replied_clients == [1]
    assert len(step.rejected) == 2 and all("appears twice" in why for why in step.rejected.values())


def test_a_dp_round_below_the_minimum_runs_and_is_charged_instead_of_stopping(start):
    from fedmnist.methods import with_privacy
    from fedmnist.privacy import DPConfig

    method = with_privacy(build_methods(MethodConfig(("fedavg",)))[0], DPConfig(0.5, 1.0), 3, 3, seed=1)
    server = Server([method], ServerState.initial([method], start))
    bad = reply(start, 1, 0.1)
    bad.weights[0][...] = np.inf  # refused on its content: a data-dependent count of valid replies

    one = server.step(1, "fedavg", [bad, reply(start, 2, 0.1)], min_replies=2, evaluate=False)
    none = server.step(2, "fedavg", [], min_replies=2, evaluate=False)

    assert one.record.replied_clients == [2] and "only 1 accepted replies, 2 needed" in one.record.notes[0]
    assert any("no accepted reply" in n and "counts towards epsilon" in n for n in none.record.notes)
    assert server.state.method_state["fedavg"]["releases"] == 2
    assert none.record.epsilon == method.accountant.epsilon(2) and [r.round for r in server.state.history] == [1, 2]
