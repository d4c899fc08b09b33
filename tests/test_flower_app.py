"""Tests of fedmnist.flower_app: the run config, the records, the ClientApp in-process, the server's pure
pieces, and real loopback deployments (``flower-superlink`` + ``flower-supernode`` processes).

The deployment tests start Flower's processes on 127.0.0.1 (free ports, ``--insecure``, a private
FLWR_HOME) through ``tests/flower_harness.py``, whose ``close()`` stops every process they started,
also when a test fails. Every ClientApp message starts a fresh process that imports TensorFlow, so the
runs are kept to few rounds and nodes; every wait is bounded.
"""

from __future__ import annotations

import json
import time
import tomllib
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from conftest import stratified_indices

from fedmnist.errors import ConfigError, DataError
from fedmnist.flower_app import (
    FlowerRunConfig,
    RoundReplies,
    nodes_to_sample,
    record_to_weights,
    weights_to_record,
)
from fedmnist.model import initial_weights, weight_spec
from fedmnist.rounds import sample_round
from fedmnist.seeds import training_seed

REPO_ROOT = Path(__file__).resolve().parents[1]
SEED = 42
RUN_TIMEOUT = 600.0  # bound on one deployment run; a quiet 2-core machine needs 1-2 minutes


# --- run config --------------------------------------------------------------------------------


def test_pyproject_config_gives_the_dataclass_defaults():
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    app = pyproject["tool"]["flwr"]["app"]

    config = FlowerRunConfig.from_run_config(app["config"])

    assert config == FlowerRunConfig()
    assert set(app["config"]) == set(FlowerRunConfig().to_dict())
    assert app["components"] == {
        "serverapp": "fedmnist.flower_app:server_app",
        "clientapp": "fedmnist.flower_app:client_app",
    }
    assert "federations" not in pyproject["tool"]["flwr"]


def test_run_config_casts_flowers_values():
    config = FlowerRunConfig.from_run_config(
        {"round-timeout": 30, "num-server-rounds": 2.0, "method": " FedProx ", "proximal-mu": 1,
         "output-dir": "/abs/out"}
    )

    assert config.round_timeout == 30.0 and isinstance(config.round_timeout, float)
    assert config.num_server_rounds == 2 and isinstance(config.num_server_rounds, int)
    assert config.method == "fedprox" and config.client_mu == 1.0
    assert config.output_dir == "/abs/out"
    assert replace(config, method="fedavg").client_mu == 0.0


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"num-rounds": 3}, "unknown Flower run-config key"),
        ({"num-server-rounds": 1.5}, "must be an integer"),
        ({"batch-size": True}, "must be a number"),
        ({"learning-rate": "0.1"}, "must be a number"),
        ({"output-dir": 3}, "must be a string"),
        ({"method": "median"}, "unknown method"),
        ({"method": "fedprox", "proximal-mu": 0.0}, "fedprox needs mu > 0"),
        ({"fraction-train": 0.0}, "fraction-train"),
        ({"min-train-nodes": 0}, "min-train-nodes"),
        ({"optimizer": "rmsprop"}, "optimizer"),
        ({"output-dir": "relative/out"}, "absolute path"),
        ({"trim-beta": 0.5}, "trimmed-mean fraction beta"),
        ({"num-malicious": 1}, "unknown Flower run-config key"),
        ({"method": "krum"}, "krum with krum-f=1 needs at least 5 replies per round, but min-train-nodes is 2"),
        ({"method": "multikrum", "min-train-nodes": 6, "krum-f": 2}, "needs at least 7 replies"),
        ({"method": "bulyan", "min-train-nodes": 6}, "bulyan with krum-f=1 needs at least 7"),
        ({"method": "scaffold", "optimizer": "sgd", "momentum": 0.9},
         r"without momentum \(got momentum 0.9\).*momentum=0.0 in --run-config"),
        ({"method": "scaffold"}, r"plain SGD.*not 'adam'.*optimizer='sgd' momentum=0.0 in --run-config"),
        ({"method": "scaffold", "optimizer": "adam", "momentum": 0.0}, "plain SGD.*not 'adam'"),
        ({"method": "scaffold", "optimizer": "sgd", "momentum": 0.0, "dp-noise": 0.5}, "differential privacy.*'scaffold'"),
        ({"method": "scaffold", "optimizer": "sgd", "momentum": 0.0, "server-lr": 0.0},
         "server learning rate must be > 0"),
    ],
)
def test_run_config_rejects_bad_values(values, message):
    with pytest.raises(ConfigError, match=message):
        FlowerRunConfig.from_run_config(values)


def test_robust_rules_run_when_min_train_nodes_meets_their_minimum():
    for values in ({"method": "krum", "min-train-nodes": 5}, {"method": "bulyan", "min-train-nodes": 7},
                   {"method": "multikrum", "min-train-nodes": 3, "krum-f": 0}, {"method": "fedmed"}):
        assert FlowerRunConfig.from_run_config(values).min_train_nodes == values.get("min-train-nodes", 2)


def test_scaffold_run_config_takes_plain_sgd_and_its_server_rate():
    from fedmnist.methods import ScaffoldMethod, build_method

    config = FlowerRunConfig.from_run_config({"method": "scaffold", "optimizer": "sgd", "momentum": 0.0,
                                              "learning-rate": 0.05, "server-lr": 0.5})

    method = build_method(config.method, config.method_config)
    assert isinstance(method, ScaffoldMethod) and method.server_lr == 0.5 and config.client_mu == 0.0
    default = build_method("scaffold", FlowerRunConfig(method="scaffold", momentum=0.0).method_config)
    assert default.server_lr == 1.0


def test_server_needs_output_dir_and_test_file():
    with pytest.raises(ConfigError, match="output-dir"):
        FlowerRunConfig(test_file="/t.npz").check_server()
    with pytest.raises(ConfigError, match="test-file"):
        FlowerRunConfig(output_dir="/out").check_server()
    FlowerRunConfig(output_dir="/out", test_file="/t.npz").check_server()


def test_nodes_before_start():
    assert FlowerRunConfig(min_train_nodes=2).nodes_before_start == 2
    assert FlowerRunConfig(min_train_nodes=2, min_available_nodes=3).nodes_before_start == 3


# --- records -----------------------------------------------------------------------------------


def test_array_record_round_trip_keeps_order_dtype_and_shape():
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
    from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents

    weights = initial_weights(SEED)
    weights.append(np.arange(4, dtype=np.int64))  # more than 10 arrays, and a second dtype
    weights.append(weights[1].copy())  # equal content twice (one object on the wire)
    record = weights_to_record(weights)
    wire = {oid: obj.deflate() for oid, obj in get_all_nested_objects(record).items()}

    for back in (record_to_weights(record), record_to_weights(inflate_object_from_contents(record.object_id, wire))):
        assert len(back) == len(weights)
        for got, want in zip(back, weights):
            assert got.dtype == want.dtype and got.shape == want.shape
            np.testing.assert_array_equal(got, want)
    assert [tuple(w.shape) for w in weights[:-2]] == [shape for _, shape, _ in weight_spec()]


# --- the ClientApp -----------------------------------------------------------------------------


def test_client_partition_from_node_config(small_federation):
    from fedmnist.data import client_file
    from fedmnist.flower_app import client_partition

    second = client_file(small_federation, 2)
    assert client_partition({"data-file": str(second)}) == (second, 2)
    assert client_partition({"data-file": str(second), "client-id": 7}) == (second, 7)
    assert client_partition({"partition-id": 2, "num-partitions": 3}, str(small_federation)) == (
        client_file(small_federation, 3), 3)


@pytest.mark.parametrize(
    ("node_config", "data_dir", "error", "message"),
    [
        ({}, "", ConfigError, "no data: start it with --node-config"),
        ({"data-file": "cliente_1.npz"}, "", ConfigError, "absolute path"),
        ({"data-file": "/nowhere/cliente_1.npz"}, "", DataError, "not found"),
        ({"data-file": "/nowhere/datos.npz"}, "", ConfigError, "client-id=N"),
        ({"partition-id": 0}, "", ConfigError, "data-dir"),
        ({"partition-id": 5}, "FED", DataError, "cliente_6.npz"),
    ],
)
def test_client_partition_errors(small_federation, node_config, data_dir, error, message):
    from fedmnist.flower_app import client_partition

    with pytest.raises(error, match=message):
        client_partition(node_config, str(small_federation) if data_dir else "")


def _train_message(weights, round_: int, mu: float, node_id: int = 7, control=None):
    """A train Message as the Grid would deliver it (needs a task identity outside a running app);
    ``control``: SCAFFOLD's server control variate, sent as the ServerApp does."""
    from flwr.app import ConfigRecord, Message, MessageType, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from fedmnist.flower_app import CONTROL_KEY

    TaskIdentity.run_id = TaskIdentity.node_id = TaskIdentity.task_id = 1
    content = RecordDict({
        "arrays": weights_to_record(weights),
        "config": ConfigRecord({"server-round": round_, "proximal-mu": mu}),
    })
    if control is not None:
        content[CONTROL_KEY] = weights_to_record(control)
    message = Message(content=content, dst_node_id=node_id, message_type=MessageType.TRAIN, group_id=str(round_))
    message.metadata.__dict__["_message_id"] = message.object_id  # what pushing it through the Grid sets
    return message


def test_client_app_trains_in_process(small_federation):
    from flwr.app import Context, RecordDict

    from fedmnist.data import client_file, load_partition
    from fedmnist.flower_app import client_app
    from fedmnist.training import ClientTrainer

    config = FlowerRunConfig(local_epochs=1, batch_size=32, optimizer="adam", learning_rate=1e-3,
                             momentum=0.0, seed=SEED)
    start = initial_weights(SEED)
    path = client_file(small_federation, 2)
    context = Context(run_id=1, node_id=7, node_config={"data-file": str(path)}, state=RecordDict(),
                      run_config=config.to_dict())

    reply = client_app(_train_message(start, round_=3, mu=0.0), context)

    assert not reply.has_error(), reply.error
    metrics = reply.content["metrics"]
    x, y = load_partition(path)
    assert metrics["num-examples"] == len(y) and metrics["client-id"] == 2 and metrics["server-round"] == 3
    got = record_to_weights(reply.content["arrays"])
    assert [w.shape for w in got] == [w.shape for w in start]
    assert all(w.dtype == np.float32 for w in got)
    # the same training as the in-process simulation gives client 2 in round 3
    want = ClientTrainer("adam", 1e-3, 0.0, model_seed=SEED).train(
        start, x, y, epochs=1, batch_size=32, seed=training_seed(SEED, 3, 2))
    for a, b in zip(got, want.weights):
        np.testing.assert_allclose(a, b, atol=1e-6)
    assert metrics["train-loss"] == pytest.approx(want.history["loss"][-1])
    assert "control-delta" not in reply.content and len(context.state) == 0  # no SCAFFOLD, no state


def test_client_app_keeps_its_scaffold_control_in_the_context_state(small_federation):
    from flwr.app import Context, RecordDict

    from fedmnist.data import client_file, load_partition
    from fedmnist.flower_app import CONTROL_DELTA_KEY, client_app, node_control
    from fedmnist.scaffold import client_control_update, correction, zero_controls
    from fedmnist.training import ClientTrainer

    config = FlowerRunConfig(local_epochs=1, batch_size=32, optimizer="sgd", learning_rate=0.05, momentum=0.0,
                             method="scaffold", seed=SEED)
    path = client_file(small_federation, 2)
    x, y = load_partition(path)
    context = Context(run_id=1, node_id=7, node_config={"data-file": str(path)}, state=RecordDict(),
                      run_config=config.to_dict())
    reference = ClientTrainer("sgd", 0.05, 0.0, model_seed=SEED)
    x0 = initial_weights(SEED)
    zeros = zero_controls(x0)

    # round 1: c = 0 and no c_i yet (zeros): plain SGD, c_i⁺ = (x − y)/(K·η) = Δc_i
    first = client_app(_train_message(x0, round_=1, mu=0.0, control=zeros), context)
    want = reference.train(x0, x, y, epochs=1, batch_size=32, seed=training_seed(SEED, 1, 2), correction=zeros)
    c_i, delta = client_control_update(x0, want.weights, zeros, zeros, want.num_steps, 0.05)
    assert want.num_steps == -(-len(y) // 32)
    _assert_close(record_to_weights(first.content[CONTROL_DELTA_KEY]), delta)
    _assert_close(node_control(context.state, x0), c_i)
    assert max(float(np.abs(a).max()) for a in c_i) > 0

    # round 3 (the node skipped round 2): a new c; the stored c_i corrects the gradient
    x1 = record_to_weights(first.content["arrays"])
    c = [0.5 * a for a in c_i]
    second = client_app(_train_message(x1, round_=3, mu=0.0, control=c), context)
    want = reference.train(x1, x, y, epochs=1, batch_size=32, seed=training_seed(SEED, 3, 2),
                           correction=correction(c, c_i))
    c_i_new, delta = client_control_update(x1, want.weights, c, c_i, want.num_steps, 0.05)
    _assert_close(record_to_weights(second.content["arrays"]), want.weights)
    _assert_close(record_to_weights(second.content[CONTROL_DELTA_KEY]), delta)
    _assert_close(node_control(context.state, x0), c_i_new)
    unaware = reference.train(x1, x, y, epochs=1, batch_size=32, seed=training_seed(SEED, 3, 2),
                              correction=correction(c, zeros))  # what forgetting c_i would give
    assert max(float(np.abs(a - b).max()) for a, b in zip(unaware.weights, want.weights)) > 1e-4


def test_client_app_refuses_a_control_that_does_not_fit(small_federation):
    from flwr.app import ArrayRecord, Context, RecordDict

    from fedmnist.data import client_file
    from fedmnist.flower_app import STATE_CONTROL_KEY, client_app
    from fedmnist.scaffold import ScaffoldError, zero_controls

    config = FlowerRunConfig(optimizer="sgd", momentum=0.0, method="scaffold", seed=SEED)
    start = initial_weights(SEED)
    context = Context(run_id=1, node_id=7, node_config={"data-file": str(client_file(small_federation, 1))},
                      state=RecordDict(), run_config=config.to_dict())
    with pytest.raises(ScaffoldError, match=r"server's SCAFFOLD control variate.*weight 0"):
        client_app(_train_message(start, 1, 0.0, control=[np.zeros(3, np.float32), *start[1:]]), context)
    context.state[STATE_CONTROL_KEY] = ArrayRecord([np.zeros(2, np.float32)])
    with pytest.raises(ScaffoldError, match=r"this node's SCAFFOLD control variate.*got 1$"):
        client_app(_train_message(start, 1, 0.0, control=zero_controls(start)), context)


def _assert_close(got, want, atol=1e-6):
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_allclose(a, b, rtol=0, atol=atol)


def test_client_app_names_a_missing_data_file(tmp_path):
    from flwr.app import Context, RecordDict

    from fedmnist.flower_app import client_app

    missing = tmp_path / "cliente_4.npz"
    context = Context(run_id=1, node_id=7, node_config={"data-file": str(missing)}, state=RecordDict(),
                      run_config={})
    with pytest.raises(DataError, match=f"{missing}.*not found"):
        client_app(_train_message(initial_weights(SEED), round_=1, mu=0.0), context)


# --- the ServerApp's pure pieces ---------------------------------------------------------------


def test_sampling_is_seeded_and_takes_the_floor_like_the_simulation():
    from fedmnist.flower_app import nodes_needed
    from fedmnist.simulation import SimulationConfig, sample_clients

    nodes = [907, 12, 5566, 3]
    assert nodes_to_sample(4, 1.0) == 4
    assert nodes_to_sample(3, 0.5) == 1
    assert nodes_to_sample(10, 0.01) == 1
    assert nodes_to_sample(10, 0.3) == 3
    assert nodes_to_sample(7, 0.3) == 2  # floor(2.1), as the simulation: C*K not whole
    assert nodes_needed(2, 1.0) == 2
    assert nodes_needed(3, 0.5) == 6  # floor(0.5 * 6) = 3, floor(0.5 * 5) = 2
    assert nodes_needed(10, 0.1) == 100
    # K = 7, C = 0.3: the same number of clients per round and, with node ids that sort like the
    # client ids, the same clients as the simulation
    config = SimulationConfig.create(num_clients=7, fraction=0.3, seed=SEED)
    node_of = {k: 1000 + 17 * k for k in range(1, 8)}
    for round_ in range(1, 6):
        clients = sample_clients(config, round_)
        assert len(clients) == config.clients_per_round == 2
        assert sample_round(list(node_of.values()), 0.3, round_, SEED) == [node_of[k] for k in clients]
    assert sample_round(nodes, 1.0, 1, SEED) == sorted(nodes)
    picked = sample_round(nodes, 0.5, 2, SEED)
    assert picked == sample_round(list(reversed(nodes)), 0.5, 2, SEED)
    assert len(picked) == 2 and picked == sorted(picked) and set(picked) <= set(nodes)
    assert len({tuple(sample_round(nodes, 0.5, r, SEED)) for r in range(1, 20)}) > 1


def test_round_replies_name_failed_and_missing_nodes():
    from fedmnist.server import Reply

    ok = Reply(1, [np.zeros(1, np.float32)], 10, "node 1", "x")
    replies = RoundReplies(sent=[1, 2, 3], ok=[ok], failed={3: "error 5: node unavailable"})

    assert replies.missing == [2]
    assert replies.failures(60) == {"node 3": "error 5: node unavailable", "node 2": "no reply after 60 s"}


# --- the ServerApp's loop on an in-process Grid ------------------------------------------------


class FakeGrid:
    """A Grid whose nodes answer in-process: ``answers[node](message)`` gives the reply or None."""

    def __init__(self, answers: dict, accept: int | None = None):
        self.answers = answers
        self.accept = accept  # push only the first `accept` messages, as a SuperLink refusing some
        self.pending: dict[str, object] = {}
        self.pushed = 0

    def get_node_ids(self):
        return list(self.answers)

    def push_messages(self, messages):
        ids = []
        for message in messages[: self.accept]:
            self.pushed += 1
            message.metadata.__dict__["_message_id"] = f"message-{self.pushed}"
            ids.append(message.metadata.message_id)
            self.pending[message.metadata.message_id] = self.answers[message.metadata.dst_node_id](message)
        return ids

    def pull_messages(self, message_ids):
        return [self.pending.pop(i) for i in message_ids if self.pending.get(i) is not None]


def _client_node(path: Path, config: FlowerRunConfig):
    """A node answering like a SuperNode with ``data-file=path`` (the ClientApp run in-process).

    Like Flower, the node keeps one Context for the run: what the ClientApp stores in ``context.state``
    (SCAFFOLD's ``c_i``) is there the next time this node is sampled.
    """
    from flwr.app import Context, RecordDict

    from fedmnist.flower_app import client_app

    contexts = []

    def answer(message):
        if not contexts:
            contexts.append(Context(run_id=1, node_id=message.metadata.dst_node_id,
                                    node_config={"data-file": str(path)}, state=RecordDict(),
                                    run_config=config.to_dict()))
        return client_app(message, contexts[0])

    return answer


def _lost_node(message):
    """A node that vanished: the SuperLink answers for it with NODE_UNAVAILABLE (source: the SuperLink)."""
    from flwr.app import Error, Message

    return Message(Error(code=5, reason="Node Unavailable"), reply_to=message)


def test_collect_replies_matches_replies_to_their_nodes():
    from flwr.app import ConfigRecord, Message, MessageType, MetricRecord, RecordDict

    from fedmnist.flower_app import collect_replies

    start = initial_weights(SEED)
    _train_message(start, 1, 0.0)  # sets the task identity Message needs

    def good(message):
        content = RecordDict({"arrays": weights_to_record(start),
                              "metrics": MetricRecord({"num-examples": 5, "client-id": 4, "train-loss": 0.5}),
                              "reply": ConfigRecord({"start-sha256": "abc"})})
        return Message(content=content, reply_to=message)

    def malformed(message):
        return Message(content=RecordDict({"metrics": MetricRecord({"num-examples": 5})}), reply_to=message)

    grid = FakeGrid({10: good, 20: _lost_node, 30: lambda m: None, 40: malformed, 50: good}, accept=4)
    content = RecordDict({"arrays": weights_to_record(start)})
    messages = [Message(content=content, dst_node_id=n, message_type=MessageType.TRAIN, group_id="1")
                for n in (10, 20, 30, 40, 50)]

    t0 = time.monotonic()
    replies = collect_replies(grid, messages, timeout=1.0)

    assert time.monotonic() - t0 < 10
    assert [(r.source, r.client_id, r.num_examples, r.start_sha256) for r in replies.ok] == [("node 10", 4, 5, "abc")]
    assert replies.failed[20].startswith("error 5")
    assert "no 'arrays'" in replies.failed[40]
    assert "did not accept" in replies.failed[50]
    assert replies.missing == [30]


def test_parse_reply_reads_the_control_delta_only_in_scaffold_rounds():
    from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

    from fedmnist.flower_app import parse_reply

    start = initial_weights(SEED)
    request = _train_message(start, 1, 0.0)
    delta = [np.full(w.shape, 0.25, np.float32) for w in start]

    def reply(control_delta):
        content = RecordDict({"arrays": weights_to_record(start),
                              "metrics": MetricRecord({"num-examples": 5, "client-id": 4}),
                              "reply": ConfigRecord({"start-sha256": "abc"})})
        if control_delta is not None:
            content["control-delta"] = control_delta
        return Message(content=content, reply_to=request)

    got = parse_reply(9, reply(weights_to_record(delta)), with_control=True).control_delta
    assert len(got) == len(delta) and all(np.array_equal(a, b) for a, b in zip(got, delta))
    assert parse_reply(9, reply(weights_to_record(delta))).control_delta is None  # not asked for: ignored
    assert parse_reply(9, reply(None), with_control=True).control_delta is None  # the method refuses it
    with pytest.raises(ValueError, match="unreadable control-delta"):
        parse_reply(9, reply(ArrayRecord({"x": Array(delta[0])})), with_control=True)


def test_server_loop_writes_every_round_and_stops_cleanly(small_federation, tmp_path):
    from fedmnist.data import client_file, common_test_file
    from fedmnist.exchange import load_global
    from fedmnist.flower_app import RoundFailedError, run_server
    from fedmnist.outputs import CSV_COLUMNS, METRICS_CSV

    _train_message(initial_weights(SEED), 1, 0.0)  # task identity
    config = FlowerRunConfig(num_server_rounds=2, local_epochs=1, batch_size=32, optimizer="adam",
                             learning_rate=1e-3, momentum=0.0, min_train_nodes=2, seed=SEED,
                             output_dir=str(tmp_path / "ok"), test_file=str(common_test_file(small_federation)),
                             round_timeout=30.0, wait_nodes_timeout=5.0)
    nodes = {100 + k: _client_node(client_file(small_federation, k), config) for k in (1, 2, 3)}
    nodes[103] = _lost_node  # node 103 is gone: rounds go on with 2 of 3 replies

    history = run_server(FakeGrid(nodes), config)

    assert [(h.round, h.num_sampled, h.num_replies, h.replied_clients) for h in history] == [
        (1, 3, 2, [1, 2]), (2, 3, 2, [1, 2])]
    assert all(len(h.failed) == 1 and h.failed[0].startswith("node 103: error 5") for h in history)
    out = tmp_path / "ok"
    header = (out / METRICS_CSV).read_text().splitlines()[0].split(",")
    assert header == CSV_COLUMNS  # the simulation's columns: one writer for every mode
    assert load_global(out / "pesos_globales_ronda_2.pkl").round == 2
    assert (out / "modelo_global_fedavg.h5").is_file() and (out / "precision_por_ronda.png").is_file()

    # min-train-nodes=3 with a node lost in round 2: round 1's files stay as they were
    strict = replace(config, min_train_nodes=3, output_dir=str(tmp_path / "strict"))
    answers = {100 + k: _client_node(client_file(small_federation, k), strict) for k in (1, 2, 3)}
    healthy, calls = answers[103], []

    def lost_in_round_two(message):
        calls.append(message)
        return healthy(message) if len(calls) == 1 else _lost_node(message)

    answers[103] = lost_in_round_two
    grid = FakeGrid(answers)
    with pytest.raises(RoundFailedError, match=r"round 2 \(fedavg\): only 2 accepted replies, 3 needed; "
                       r"failed: node 103: error 5"):
        run_server(grid, strict)
    out = tmp_path / "strict"
    assert json.loads((out / "metricas_por_ronda.json").read_text())["rounds"][0]["num_replies"] == 3
    assert len(json.loads((out / "metricas_por_ronda.json").read_text())["rounds"]) == 1
    assert load_global(out / "pesos_globales_ronda_1.pkl").round == 1
    assert not (out / "pesos_globales_ronda_2.pkl").exists()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left


def _spoiled(answer, spoil: str):
    """A node that trains honestly, then sends a reply spoiled as ``spoil`` says."""
    from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

    def respond(message):
        honest = answer(message)
        weights = record_to_weights(honest.content["arrays"])
        metrics = dict(honest.content["metrics"])
        start = honest.content["reply"]["start-sha256"]
        delta = honest.content.array_records.get("control-delta")
        delta = record_to_weights(delta) if delta is not None else None
        if spoil == "nan":
            weights[0][...] = np.nan
        elif spoil == "inf":
            weights[-1][...] = np.inf
        elif spoil == "shape":
            weights[0] = weights[0][..., :1].copy()
        elif spoil == "start":
            start = "0" * 64
        elif spoil == "count-inf":
            metrics["num-examples"] = float("inf")
        elif spoil == "count-huge":
            metrics["num-examples"] = 1e300
        elif spoil == "count-lie":
            metrics["num-examples"] = 10**12
        elif spoil == "claim-client-1":
            metrics["client-id"] = 1
        elif spoil == "delta-missing":
            delta = None
        elif spoil == "delta-nan":
            delta[2][0] = np.nan
        content = RecordDict({"arrays": weights_to_record(weights), "metrics": MetricRecord(metrics),
                              "reply": ConfigRecord({"start-sha256": start})})
        if delta is not None:
            content["control-delta"] = weights_to_record(delta)
        return Message(content=content, reply_to=message)

    return respond


@pytest.mark.parametrize("spoil", ["nan", "inf", "shape", "start", "count-inf", "count-huge", "count-lie"])
def test_a_bad_reply_fails_its_node_and_the_round_goes_on(spoil, small_federation, tmp_path):
    from fedmnist.data import client_file, common_test_file
    from fedmnist.flower_app import run_server

    _train_message(initial_weights(SEED), 1, 0.0)  # task identity
    config = FlowerRunConfig(num_server_rounds=1, local_epochs=1, batch_size=32, optimizer="adam",
                             learning_rate=1e-3, momentum=0.0, min_train_nodes=2, seed=SEED,
                             output_dir=str(tmp_path), test_file=str(common_test_file(small_federation)),
                             round_timeout=30.0, wait_nodes_timeout=5.0)
    nodes = {100 + k: _client_node(client_file(small_federation, k), config) for k in (1, 2, 3)}
    nodes[102] = _spoiled(nodes[102], spoil)

    (row,) = run_server(FakeGrid(nodes), config)

    assert row.num_replies == 2 and row.replied_clients == [1, 3]
    assert len(row.failed) == 1 and row.failed[0].startswith("node 102 (client 2): "), row.failed
    if spoil == "count-lie":  # no manifest on the SuperLink: accepted? no: above the documented bound
        assert "num_examples" in row.failed[0]
    assert np.isfinite(row.test_loss)
    saved = json.loads((tmp_path / "metricas_por_ronda.json").read_text())["rounds"][0]
    assert saved["failed"] == row.failed


# --- identity: a client id is bound to the node that first spoke for it ------------------------------


def _claim(node_id: int, client_id) -> object:
    from fedmnist.server import Reply

    return Reply(client_id, [np.zeros(1, np.float32)], 10, f"node {node_id}", "x", node_id=node_id)


@pytest.mark.parametrize("order", ["honest-first", "impostor-first"])
def test_node_claiming_another_nodes_client_id_is_refused_in_any_order(order):
    from fedmnist.flower_app import NodeIdentities

    # Prepare: nodes 10 and 20 speak for clients 1 and 2 in round 1
    identities = NodeIdentities()
    admitted, refused = identities.admit([_claim(10, 1), _claim(20, 2)], [10, 20, 5])
    assert [r.node_id for r in admitted] == [10, 20] and refused == {}

    # Execute: round 2, node 5 (a lower id: it sorts first) claims client 1 too
    replies = [_claim(10, 1), _claim(20, 2), _claim(5, 1)]
    admitted, refused = identities.admit(replies if order == "honest-first" else replies[::-1], [10, 20, 5])

    # Assert: the honest node's reply is kept, the impostor's refused by name
    assert sorted(r.node_id for r in admitted) == [10, 20]
    assert list(refused) == ["node 5"] and "node 10 speaks for" in refused["node 5"]


def test_node_switching_client_and_simultaneous_first_claims_are_refused():
    from fedmnist.flower_app import NodeIdentities

    identities = NodeIdentities()
    identities.admit([_claim(10, 1)])

    # a bound node claiming another client is refused; two new nodes claiming one new id: both refused
    admitted, refused = identities.admit([_claim(10, 2), _claim(30, 3), _claim(40, 3)])
    assert admitted == [] and set(refused) == {"node 10", "node 30", "node 40"}
    assert "speaks for client 1" in refused["node 10"] and "none of them is bound" in refused["node 30"]
    assert identities.client_of == {10: 1}

    # once node 10 has left the SuperLink, its client id is free again
    admitted, refused = identities.admit([_claim(50, 1)], connected=[50])
    assert [r.node_id for r in admitted] == [50] and identities.client_of == {50: 1}


def test_an_impostor_node_is_refused_and_the_honest_reply_kept(small_federation, tmp_path):
    from fedmnist.data import client_file, common_test_file
    from fedmnist.flower_app import run_server

    # Prepare: nodes 101..103 are clients 1..3; node 50 (sorting first) is lost in round 1, then trains on
    # client 3's data and claims client 1's id
    _train_message(initial_weights(SEED), 1, 0.0)  # task identity
    config = FlowerRunConfig(num_server_rounds=2, local_epochs=1, batch_size=32, optimizer="adam",
                             learning_rate=1e-3, momentum=0.0, min_train_nodes=2, seed=SEED,
                             output_dir=str(tmp_path), test_file=str(common_test_file(small_federation)),
                             round_timeout=30.0, wait_nodes_timeout=5.0)
    nodes = {100 + k: _client_node(client_file(small_federation, k), config) for k in (1, 2, 3)}
    impostor, calls = _spoiled(_client_node(client_file(small_federation, 3), config), "claim-client-1"), []

    def lost_then_impostor(message):
        calls.append(message)
        return _lost_node(message) if len(calls) == 1 else impostor(message)

    nodes[50] = lost_then_impostor

    # Execute
    history = run_server(FakeGrid(nodes), config)

    # Assert
    assert [(h.round, h.replied_clients) for h in history] == [(1, [1, 2, 3]), (2, [1, 2, 3])]
    assert history[1].failed == ["node 50: node 50: claims client 1, which node 101 speaks for: refused as an "
                                 "impostor"]


def _scaffold_config(**overrides) -> FlowerRunConfig:
    """SCAFFOLD on the 3-client federation: plain SGD, bounded waits."""
    config = FlowerRunConfig(local_epochs=1, batch_size=32, optimizer="sgd", learning_rate=0.05, momentum=0.0,
                             method="scaffold", min_train_nodes=1, seed=SEED, round_timeout=30.0,
                             wait_nodes_timeout=5.0)
    return replace(config, **overrides)


def test_scaffold_refuses_replies_without_a_valid_control_delta(small_federation, tmp_path):
    from fedmnist.data import client_file, common_test_file
    from fedmnist.flower_app import run_server

    _train_message(initial_weights(SEED), 1, 0.0)  # task identity
    config = _scaffold_config(num_server_rounds=1, output_dir=str(tmp_path),
                              test_file=str(common_test_file(small_federation)))
    nodes = {100 + k: _client_node(client_file(small_federation, k), config) for k in (1, 2, 3)}
    nodes[102] = _spoiled(nodes[102], "delta-missing")
    nodes[103] = _spoiled(nodes[103], "delta-nan")

    (row,) = run_server(FakeGrid(nodes), config)

    assert row.num_sampled == 3 and row.num_replies == 1 and row.replied_clients == [1]
    missing, nan = sorted(row.failed)
    assert missing.startswith("node 102 (client 2): SCAFFOLD needs the client's control-variate delta"), missing
    assert nan.startswith("node 103 (client 3), control-variate delta: weight 2 holds NaN"), nan
    assert json.loads((tmp_path / "metricas_por_ronda.json").read_text())["rounds"][0]["failed"] == row.failed


def test_scaffold_with_client_sampling_equals_the_simulation(small_mnist, small_federation, tmp_path):
    """Five rounds, 2 of 3 nodes each: client 3 first trains in round 2 against a c it never fed, and
    client 1, idle in rounds 2-4, trains in round 5 with the c_1 its node kept since round 1."""
    from fedmnist.data import client_file, common_test_file
    from fedmnist.exchange import load_global
    from fedmnist.flower_app import run_server
    from fedmnist.simulation import SimulationConfig, run_simulation

    _train_message(initial_weights(SEED), 1, 0.0)  # task identity
    config = _scaffold_config(num_server_rounds=5, fraction_train=0.67, min_train_nodes=2,
                              output_dir=str(tmp_path / "flower"), test_file=str(common_test_file(small_federation)))
    nodes = {10 * k: _client_node(client_file(small_federation, k), config) for k in (1, 2, 3)}
    history = run_server(FakeGrid(nodes), config)

    sim = SimulationConfig.create(num_clients=3, fraction=0.67, rounds=5, local_epochs=1, batch_size=32,
                                  optimizer="sgd", learning_rate=0.05, momentum=0.0, methods=("scaffold",),
                                  seed=SEED)
    result = run_simulation(sim, out_dir=tmp_path / "sim", progress=False, mnist=small_mnist)

    simulated = result.metrics["scaffold"]
    assert [h.replied_clients for h in history] == [r.replied_clients for r in simulated] == [
        [1, 2], [2, 3], [2, 3], [2, 3], [1, 3]]
    assert [h.sampled_nodes for h in history] == [[10 * k for k in r.replied_clients] for r in simulated]
    assert all(not h.failed for h in history)
    final = load_global(tmp_path / "flower" / "pesos_globales_ronda_5.pkl").weights
    for a, b in zip(final, result.final_weights["scaffold"]):
        assert np.max(np.abs(a - b)) <= 1e-6
    assert [h.test_accuracy for h in history] == pytest.approx([r.test_accuracy for r in simulated], abs=1e-6)


def test_server_waits_for_nodes_with_a_bound(tmp_path, small_federation):
    from fedmnist.data import common_test_file
    from fedmnist.flower_app import RoundFailedError, run_server

    config = FlowerRunConfig(min_train_nodes=3, wait_nodes_timeout=1.0, output_dir=str(tmp_path),
                             test_file=str(common_test_file(small_federation)))
    with pytest.raises(RoundFailedError, match=r"round 1: only 2 SuperNode\(s\) connected after 1 s, 3 needed"):
        run_server(FakeGrid({1: None, 2: None}), config)


# --- loopback deployments ----------------------------------------------------------------------


@pytest.fixture
def deployment(tmp_path):
    """A FlowerDeployment factory under tmp_path; every process it started is stopped afterwards."""
    from flower_harness import FlowerDeployment

    made = []

    def make(**kwargs) -> FlowerDeployment:
        made.append(FlowerDeployment(tmp_path / f"deployment{len(made)}", **kwargs))
        return made[-1]

    yield make
    for deployment in made:
        deployment.close()
    for deployment in made:
        leftover = [pid for pid in deployment.known if _alive(pid)]
        assert not leftover, f"processes left running: {leftover}"


def _alive(pid: int) -> bool:
    from flower_harness import alive

    return alive(pid)


def _run_config(out: Path, test_file: Path, **overrides) -> dict:
    """The run config of the deployment tests: Adam on tiny partitions, bounded timeouts."""
    values = {
        "num-server-rounds": 2,
        "local-epochs": 1,
        "batch-size": 10,
        "optimizer": "adam",
        "learning-rate": 0.001,
        "momentum": 0.0,
        "method": "fedavg",
        "seed": SEED,
        "round-timeout": 300.0,
        "wait-nodes-timeout": 120.0,
        "output-dir": str(out),
        "test-file": str(test_file),
    }
    values.update(overrides)
    return values


@pytest.fixture(scope="module")
def two_client_mnist(raw_mnist):
    """1500 training images (150 per class) and 300 test images of the real MNIST."""
    from fedmnist.data import Mnist

    train = stratified_indices(raw_mnist.y_train, 150)
    test = stratified_indices(raw_mnist.y_test, 30)
    return Mnist(raw_mnist.x_train[train], raw_mnist.y_train[train], raw_mnist.x_test[test],
                 raw_mnist.y_test[test])


@pytest.mark.slow
@pytest.mark.parametrize("settings", [
    {"method": "fedavg", "optimizer": "adam", "learning-rate": 1e-3},
    # SCAFFOLD: round 2 trains with the c_i each node's ClientApp process left in Flower's context.state
    {"method": "scaffold", "optimizer": "sgd", "learning-rate": 0.05},
], ids=["fedavg", "scaffold"])
def test_two_supernodes_train_two_rounds_like_the_simulation(settings, deployment, tmp_path, two_client_mnist):
    from fedmnist.data import client_file, common_test_file
    from fedmnist.exchange import load_global
    from fedmnist.federation_files import write_federation
    from fedmnist.partition import PartitionConfig
    from fedmnist.simulation import SimulationConfig, run_simulation

    fed, out = tmp_path / "federacion", tmp_path / "salida"
    write_federation(two_client_mnist, PartitionConfig("iid", 2, seed=SEED), fed)
    flower = deployment()
    flower.start_superlink()
    flower.start_supernodes({f"nodo{k}": {"data-file": str(client_file(fed, k))} for k in (1, 2)}, wait=False)

    method = settings["method"]
    run_id = flower.submit(_run_config(out, common_test_file(fed), **settings))  # its ServerApp waits for 2 nodes
    flower.wait_supernodes()
    # Meanwhile, the in-process simulation of the same partitions, seed and settings, round by round.
    config = SimulationConfig.create(num_clients=2, fraction=1.0, rounds=1, local_epochs=1, batch_size=10,
                                     optimizer=settings["optimizer"], learning_rate=settings["learning-rate"],
                                     momentum=0.0, partition="iid", methods=(method,), seed=SEED)
    simulated = [
        run_simulation(config.replace(rounds=r), out_dir=tmp_path / "simulacion", progress=False,
                       mnist=two_client_mnist, resume=True)
        for r in (1, 2)
    ]
    run = flower.wait_finished(run_id, RUN_TIMEOUT)

    assert run["status"] == "finished:completed", flower.server_log(run_id)
    for name in (f"modelo_global_{method}.h5", "precision_por_ronda.png", "metricas_por_ronda.csv",
                 "configuracion.json", "pesos_globales_ronda_0.pkl", "pesos_globales_ronda_2.pkl"):
        assert (out / name).is_file(), name
    rounds = json.loads((out / "metricas_por_ronda.json").read_text())["rounds"]
    assert [r["round"] for r in rounds] == [1, 2]
    assert all(r["num_replies"] == 2 and r["replied_clients"] == [1, 2] for r in rounds)
    assert rounds[-1]["test_accuracy"] > 0.5, rounds
    final = load_global(out / "pesos_globales_ronda_2.pkl")
    for a, b in zip(_load_h5(out / f"modelo_global_{method}.h5").get_weights(), final.weights):
        np.testing.assert_array_equal(a, b)
    for row, sim in zip(rounds, simulated):
        flower_weights = load_global(out / f"pesos_globales_ronda_{row['round']}.pkl").weights
        for a, b in zip(flower_weights, sim.final_weights[method]):
            assert np.max(np.abs(a - b)) <= 1e-6
        assert row["test_accuracy"] == pytest.approx(sim.final_accuracy[method], abs=0.01)


def _load_h5(path: Path):
    import keras

    return keras.models.load_model(path)


def _three_nodes(deployment, small_federation):
    """A SuperLink and three SuperNodes (one per client of the 3-client federation), still starting."""
    from fedmnist.data import client_file

    flower = deployment()
    flower.start_superlink()
    nodes = {f"nodo{k}": {"data-file": str(client_file(small_federation, k))} for k in (1, 2, 3)}
    flower.start_supernodes(nodes, wait=False)
    return flower


def _wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise TimeoutError(f"{what} within {timeout:g} s")


def _rounds_done(out: Path) -> int:
    try:
        return len(json.loads((out / "metricas_por_ronda.json").read_text())["rounds"])
    except (OSError, ValueError, KeyError):
        return 0


@pytest.mark.slow
def test_a_lost_supernode_leaves_enough_replies(deployment, tmp_path, small_federation):
    from fedmnist.data import common_test_file
    from fedmnist.exchange import load_global

    out = tmp_path / "salida"
    flower = _three_nodes(deployment, small_federation)
    config = _run_config(out, common_test_file(small_federation), **{
        "num-server-rounds": 1, "batch-size": 32, "min-train-nodes": 2, "min-available-nodes": 3})

    run_id = flower.submit(config)
    flower.wait_supernodes()
    _wait_for(lambda: flower.clientapps("nodo3"), 240, "no ClientApp started on nodo3")
    flower.kill_supernode("nodo3")
    run = flower.wait_finished(run_id, RUN_TIMEOUT)

    assert run["status"] == "finished:completed", flower.server_log(run_id)
    (row,) = json.loads((out / "metricas_por_ronda.json").read_text())["rounds"]
    assert row["num_sampled"] == 3 and row["num_replies"] == 2 and row["replied_clients"] == [1, 2]
    assert len(row["failed"]) == 1 and row["failed"][0].startswith("node ")
    assert load_global(out / "pesos_globales_ronda_1.pkl").round == 1


@pytest.mark.slow
def test_too_few_replies_fail_the_run_and_keep_earlier_rounds(deployment, tmp_path, small_federation):
    from fedmnist.data import common_test_file
    from fedmnist.exchange import load_global

    out = tmp_path / "salida"
    flower = _three_nodes(deployment, small_federation)
    config = _run_config(out, common_test_file(small_federation), **{
        "num-server-rounds": 2, "batch-size": 32, "min-train-nodes": 3})

    run_id = flower.submit(config)
    flower.wait_supernodes()
    seen: set[int] = set()

    def round_two_started() -> bool:
        current = flower.clientapps("nodo3")
        if _rounds_done(out) < 1:
            seen.update(current)
            return False
        return bool(current - seen)

    _wait_for(round_two_started, 400, "no round-2 ClientApp started on nodo3")
    snapshot = {p.name: p.read_bytes() for p in out.iterdir()}
    flower.kill_supernode("nodo3")
    run = flower.wait_finished(run_id, RUN_TIMEOUT)

    assert run["status"] == "finished:failed"
    assert "round 2 (fedavg): only 2 accepted replies, 3 needed" in run["status-details"], run
    assert "failed: node" in run["status-details"] or "no reply after" in run["status-details"]
    # round 1's files are complete and untouched; nothing of round 2 was written
    assert {p.name: p.read_bytes() for p in out.iterdir()} == snapshot
    assert not (out / "pesos_globales_ronda_2.pkl").exists()
    assert load_global(out / "pesos_globales_ronda_1.pkl").round == 1
    assert _rounds_done(out) == 1
    _load_h5(out / "modelo_global_fedavg.h5")
