"""Distributed federated learning on Flower (flwr >= 1.42, Message API): a ServerApp and a ClientApp.

This is the only module of the package that imports ``flwr``. It runs the same training, aggregation
and evaluation as the other modes, over the network:

* ``client_app``: each SuperNode (one team member) trains the shared CNN on its own partition file,
  named by the SuperNode's ``--node-config "data-file='/abs/cliente_N.npz'"`` (in Flower's simulation
  engine: ``cliente_{partition-id + 1}.npz`` of the run's ``data-dir``), with ``ClientTrainer.train``
  and the training seed ``fedmnist.simulation.client_seed`` gives client N in that round, so a Flower
  run and ``run_simulation`` on the same partitions give the same global weights.
* ``server_app``: our own round loop (``@server_app.main()``, push/pull on the Grid). It starts from
  ``initial_weights(seed)``, sends every round's global weights to a seeded sample of the connected
  nodes, waits up to ``round-timeout`` for their replies, aggregates the successful ones with
  ``fedmnist.strategies.aggregate`` (the registry ``global_aggregation.py`` uses), evaluates the new
  global model on the common test set and writes the outputs of the other modes, atomically.

A round with fewer than ``min-train-nodes`` successful replies stops the run with a ``RoundFailedError``
whose message Flower shows as the run's status details (``flwr ls``); the files of earlier rounds stay
as they were. The run configuration (``[tool.flwr.app.config]`` of ``pyproject.toml``, overridden by
``flwr run --run-config``) becomes one ``FlowerRunConfig`` in ``FlowerRunConfig.from_run_config``.
"""

from __future__ import annotations

import csv
import io
import json
import math
import platform
import re
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from logging import INFO, WARNING
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from fedmnist import __version__
from fedmnist.config import DEFAULT_SEED
from fedmnist.errors import ConfigError, DataError, FedMnistError
from fedmnist.io import atomic_write_text
from fedmnist.strategies import AGGREGATORS, DEFAULT_NUM_MALICIOUS, DEFAULT_TRIM_BETA, aggregate

if TYPE_CHECKING:
    from fedmnist.training import ClientTrainer

CONFIG_FILE = "configuracion.json"
METRICS_CSV = "metricas_por_ronda.csv"
METRICS_JSON = "metricas_por_ronda.json"
ACCURACY_PLOT = "precision_por_ronda.png"
POLL_SECONDS = 0.5
_SAMPLING = 1  # random stream of the node sampling: default_rng([seed, _SAMPLING, round])
_CLIENT_FILE = re.compile(r"cliente_(\d+)\.npz$")


class RoundFailedError(FedMnistError, RuntimeError):
    """A round that cannot complete: too few nodes connected or too few successful replies."""


# --- the run configuration ---------------------------------------------------------------------


@dataclass(frozen=True)
class FlowerRunConfig:
    """The Flower run's settings: ``[tool.flwr.app.config]`` with ``--run-config`` applied, typed.

    Each field is the kebab-case key with ``_`` for ``-`` (``num_server_rounds`` is
    ``num-server-rounds``). ``output_dir`` and ``test_file`` are needed by the ServerApp only,
    ``data_dir`` by the ClientApp in Flower's simulation engine only.
    """

    num_server_rounds: int = 3
    local_epochs: int = 1
    batch_size: int = 32
    optimizer: str = "sgd"
    learning_rate: float = 0.05
    momentum: float = 0.9
    method: str = "fedavg"
    proximal_mu: float = 0.01
    fraction_train: float = 1.0
    min_train_nodes: int = 2
    min_available_nodes: int = 0
    wait_nodes_timeout: float = 300.0
    round_timeout: float = 600.0
    seed: int = DEFAULT_SEED
    output_dir: str = ""
    test_file: str = ""
    data_dir: str = ""
    trim_beta: float = DEFAULT_TRIM_BETA
    num_malicious: int = DEFAULT_NUM_MALICIOUS

    def __post_init__(self) -> None:
        for name in ("method", "optimizer"):
            value = getattr(self, name)
            if isinstance(value, str):
                object.__setattr__(self, name, value.strip().lower())

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, bool | int | float | str]) -> FlowerRunConfig:
        """Cast and check Flower's ``context.run_config``; missing keys keep their defaults.

        Raises
        ------
        ConfigError
            An unknown key, a value of the wrong type (``1.5`` for an integer, a number for a
            string) or a value ``validate`` rejects.
        """
        by_key = {f.name.replace("_", "-"): f for f in fields(cls)}
        unknown = sorted(set(run_config) - set(by_key))
        if unknown:
            raise ConfigError(
                f"unknown Flower run-config key(s): {', '.join(unknown)}; known: {', '.join(by_key)}"
            )
        values = {}
        for key, value in run_config.items():
            kind = type(getattr(cls, by_key[key].name))
            values[by_key[key].name] = _cast(key, value, kind)
        config = cls(**values)
        config.validate()
        return config

    def validate(self) -> None:
        """Raise ConfigError, naming the run-config key, for values the run cannot use."""

        def need(ok: bool, message: str) -> None:
            if not ok:
                raise ConfigError(message)

        need(self.num_server_rounds >= 1, f"num-server-rounds must be >= 1 (got {self.num_server_rounds})")
        need(self.local_epochs >= 1, f"local-epochs must be >= 1 (got {self.local_epochs})")
        need(self.batch_size >= 1, f"batch-size must be >= 1 (got {self.batch_size})")
        need(self.optimizer in ("sgd", "adam"), f"optimizer must be 'sgd' or 'adam' (got {self.optimizer!r})")
        need(
            self.learning_rate > 0 and math.isfinite(self.learning_rate),
            f"learning-rate must be > 0 (got {self.learning_rate})",
        )
        need(0 <= self.momentum < 1, f"momentum must be in [0, 1) (got {self.momentum})")
        need(
            self.method in AGGREGATORS,
            f"unknown method {self.method!r}; choose one of {', '.join(AGGREGATORS)}",
        )
        need(
            self.proximal_mu >= 0 and math.isfinite(self.proximal_mu),
            f"proximal-mu must be >= 0 (got {self.proximal_mu})",
        )
        need(
            self.method != "fedprox" or self.proximal_mu > 0,
            "method 'fedprox' needs proximal-mu > 0 (with mu = 0 it is FedAvg)",
        )
        need(0 < self.fraction_train <= 1, f"fraction-train must be in (0, 1] (got {self.fraction_train})")
        need(self.min_train_nodes >= 1, f"min-train-nodes must be >= 1 (got {self.min_train_nodes})")
        need(
            self.min_available_nodes >= 0,
            f"min-available-nodes must be >= 0 (got {self.min_available_nodes})",
        )
        need(self.wait_nodes_timeout > 0, f"wait-nodes-timeout must be > 0 (got {self.wait_nodes_timeout})")
        need(self.round_timeout > 0, f"round-timeout must be > 0 (got {self.round_timeout})")
        need(self.seed >= 0, f"seed must be >= 0 (got {self.seed})")
        need(0 <= self.trim_beta < 0.5, f"trim-beta must be in [0, 0.5) (got {self.trim_beta})")
        need(self.num_malicious >= 0, f"num-malicious must be >= 0 (got {self.num_malicious})")
        for key, value in (("output-dir", self.output_dir), ("test-file", self.test_file),
                           ("data-dir", self.data_dir)):
            need(
                not value or Path(value).is_absolute(),
                f"{key} must be an absolute path (got {value!r}): Flower's processes run in other "
                "working directories",
            )

    def check_server(self) -> None:
        """Raise ConfigError unless ``output-dir`` and ``test-file`` are set, as the ServerApp needs."""
        if not self.output_dir:
            raise ConfigError("set output-dir, e.g. flwr run . <connection> --run-config \"output-dir='/abs/out'\"")
        if not self.test_file:
            raise ConfigError("set test-file to the federation's common test set, e.g. test-file='/abs/datos/test.npz'")

    @property
    def nodes_before_start(self) -> int:
        """Nodes that must be connected before round 1 (``min-available-nodes``, 0: ``min-train-nodes``)."""
        return max(self.min_available_nodes, self.min_train_nodes)

    @property
    def client_mu(self) -> float:
        """The proximal coefficient the clients train with: ``proximal-mu`` for FedProx, else 0."""
        return float(self.proximal_mu) if self.method == "fedprox" else 0.0

    def to_dict(self) -> dict:
        """The settings under their run-config keys."""
        return {k.replace("_", "-"): v for k, v in asdict(self).items()}


def _cast(key: str, value, kind: type):
    """``value`` as ``kind`` (int, float or str); ConfigError if it is not one (bools are not numbers)."""
    if kind is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string (got {value!r}); quote it: {key}='...'")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{key} must be a number (got {value!r})")
    if kind is int:
        if isinstance(value, float) and not value.is_integer():
            raise ConfigError(f"{key} must be an integer (got {value!r})")
        return int(value)
    return float(value)


# --- weights <-> records -----------------------------------------------------------------------


def weights_to_record(weights: list[np.ndarray]) -> ArrayRecord:
    """The layer arrays as an ArrayRecord with keys "0".."N-1" (order, dtype and shape kept)."""
    return ArrayRecord([np.ascontiguousarray(w) for w in weights])


def record_to_weights(record: ArrayRecord) -> list[np.ndarray]:
    """The layer arrays of ``weights_to_record``, read by key so their order is explicit."""
    return [record[str(i)].numpy() for i in range(len(record))]


# --- the ClientApp -----------------------------------------------------------------------------

client_app = ClientApp()

_TRAINERS: dict[tuple, ClientTrainer] = {}
"""One compiled trainer per optimizer setting, reused while the process lives (Ray's actors)."""


def client_partition(node_config: Mapping, data_dir: str = "") -> tuple[Path, int]:
    """The partition file and client id (1-based) of this SuperNode.

    Deployment: ``data-file`` of the node config, with ``client-id`` or, without it, N of the file
    name ``cliente_N.npz``. Flower's simulation engine: ``partition-id`` p gives
    ``data_dir/cliente_{p+1}.npz`` and id p + 1.

    Raises
    ------
    ConfigError
        Neither ``data-file`` nor ``partition-id`` is set, the path is relative, or the id is unknown.
    DataError
        The partition file does not exist.
    """
    from fedmnist.data import client_file

    if "data-file" in node_config:
        path = Path(str(node_config["data-file"]))
        if not path.is_absolute():
            raise ConfigError(
                f"node-config data-file={str(path)!r} must be an absolute path (relative paths would be "
                "resolved in the working directory of Flower's ClientApp process)"
            )
        if "client-id" in node_config:
            client_id = _cast("client-id", node_config["client-id"], int)
        else:
            match = _CLIENT_FILE.search(path.name)
            if not match:
                raise ConfigError(
                    f"cannot tell the client id from data-file {path.name!r}: name it cliente_N.npz or "
                    "add client-id=N to the SuperNode's --node-config"
                )
            client_id = int(match.group(1))
    elif "partition-id" in node_config:
        if not data_dir:
            raise ConfigError(
                "Flower simulation: set the run-config key data-dir to the federation directory "
                "(cliente_{partition-id + 1}.npz are read from it)"
            )
        client_id = _cast("partition-id", node_config["partition-id"], int) + 1
        path = client_file(data_dir, client_id)
    else:
        raise ConfigError(
            "this SuperNode has no data: start it with --node-config \"data-file='/abs/cliente_N.npz'\""
        )
    if client_id < 1:
        raise ConfigError(f"client ids start at 1 (got {client_id})")
    if not path.is_file():
        raise DataError(f"partition file {path} (client {client_id}) not found on this SuperNode")
    return path, client_id


def _trainer(config: FlowerRunConfig) -> ClientTrainer:
    from fedmnist.training import ClientTrainer

    key = (config.optimizer, config.learning_rate, config.momentum, config.seed)
    if key not in _TRAINERS:
        _TRAINERS[key] = ClientTrainer(
            config.optimizer, config.learning_rate, config.momentum, model_seed=config.seed
        )
    return _TRAINERS[key]


def training_seed(seed: int, round_: int, client_id: int) -> int:
    """Client ``client_id``'s training seed in ``round_``: the simulation's ``client_seed``."""
    from fedmnist.simulation import SimulationConfig, client_seed

    return client_seed(SimulationConfig(seed=seed), round_, client_id)


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received global weights on this node's partition; reply with weights and metrics."""
    from fedmnist.data import load_partition

    config = FlowerRunConfig.from_run_config(context.run_config)
    path, client_id = client_partition(context.node_config, config.data_dir)
    x, y = load_partition(path)
    instructions = msg.content["config"]
    round_ = int(instructions["server-round"])
    mu = float(instructions["proximal-mu"])
    result = _trainer(config).train(
        record_to_weights(msg.content["arrays"]),
        x,
        y,
        epochs=config.local_epochs,
        batch_size=config.batch_size,
        mu=mu,
        seed=training_seed(config.seed, round_, client_id),
    )
    metrics = MetricRecord({
        "num-examples": int(result.num_examples),
        "train-loss": float(result.history["loss"][-1]),
        "train-accuracy": float(result.history["accuracy"][-1]),
        "client-id": int(client_id),
        "server-round": round_,
    })
    content = RecordDict({"arrays": weights_to_record(result.weights), "metrics": metrics})
    return Message(content=content, reply_to=msg)


# --- the ServerApp: pure pieces ----------------------------------------------------------------


def nodes_to_sample(num_nodes: int, fraction: float) -> int:
    """``⌈fraction · num_nodes⌉`` nodes per round (at least one)."""
    return max(1, math.ceil(fraction * num_nodes - 1e-9))


def nodes_needed(min_train_nodes: int, fraction: float) -> int:
    """The fewest connected nodes whose sample (``nodes_to_sample``) holds ``min_train_nodes``."""
    n = min_train_nodes
    while nodes_to_sample(n, fraction) < min_train_nodes:
        n += 1
    return n


def sample_nodes(node_ids: list[int], fraction: float, seed: int, round_: int) -> list[int]:
    """The sorted node ids of ``round_``: ``nodes_to_sample`` of them, drawn with (seed, round)."""
    ids = sorted(node_ids)
    rng = np.random.default_rng([seed, _SAMPLING, round_])
    chosen = rng.choice(len(ids), size=nodes_to_sample(len(ids), fraction), replace=False)
    return sorted(ids[i] for i in chosen)


@dataclass(frozen=True)
class ClientReply:
    """One successful reply: the node, its client id, its trained weights and metrics."""

    node_id: int
    client_id: int
    weights: list[np.ndarray]
    num_examples: int
    train_loss: float


@dataclass
class RoundReplies:
    """What came back from the nodes a round was sent to."""

    sent: list[int]
    ok: list[ClientReply] = field(default_factory=list)
    failed: dict[int, str] = field(default_factory=dict)

    @property
    def missing(self) -> list[int]:
        """Nodes that neither replied nor failed before the timeout."""
        answered = {r.node_id for r in self.ok} | set(self.failed)
        return [n for n in self.sent if n not in answered]


def replies_shortfall(round_: int, replies: RoundReplies, min_replies: int, timeout: float) -> str | None:
    """Why the round cannot be aggregated (fewer than ``min_replies`` successes), or None if it can."""
    if len(replies.ok) >= min_replies:
        return None
    parts = [f"round {round_}: only {len(replies.ok)} successful replies of {len(replies.sent)} "
             f"nodes (min-train-nodes={min_replies})"]
    if replies.failed:
        parts.append("failed: " + "; ".join(f"node {n}: {why}" for n, why in sorted(replies.failed.items())))
    if replies.missing:
        parts.append(f"no reply after {timeout:g} s from node(s) {', '.join(map(str, replies.missing))}")
    return "; ".join(parts)


def _parse_reply(node_id: int, reply: Message) -> ClientReply:
    """A ClientReply from a reply message; ValueError if it lacks weights or metrics."""
    from fedmnist.model import weights_mismatch

    arrays = reply.content.array_records.get("arrays")
    metrics = reply.content.metric_records.get("metrics")
    if arrays is None or metrics is None or "num-examples" not in metrics:
        raise ValueError("the reply has no 'arrays' ArrayRecord or no 'metrics' with num-examples")
    weights = record_to_weights(arrays)
    problem = weights_mismatch(weights)
    if problem:
        raise ValueError(f"the reply's weights do not fit the shared CNN: {problem}")
    return ClientReply(
        node_id,
        int(metrics.get("client-id", 0)),
        weights,
        int(metrics["num-examples"]),
        float(metrics.get("train-loss", math.nan)),
    )


# --- the ServerApp: talking to the Grid --------------------------------------------------------


def wait_for_nodes(grid: Grid, needed: int, timeout: float, what: str) -> list[int]:
    """The connected node ids once there are at least ``needed``; RoundFailedError after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        ids = sorted(grid.get_node_ids())
        if len(ids) >= needed:
            return ids
        if time.monotonic() >= deadline:
            raise RoundFailedError(
                f"{what}: only {len(ids)} SuperNode(s) connected after {timeout:g} s, {needed} needed "
                "(min-train-nodes, fraction-train, min-available-nodes)"
            )
        time.sleep(1.0)


def collect_replies(grid: Grid, messages: list[Message], timeout: float) -> RoundReplies:
    """Push ``messages``, then pull their replies every ``POLL_SECONDS`` until all came or ``timeout``.

    Replies are matched to nodes through ``reply_to_message_id`` (error replies the SuperLink makes
    for a vanished node carry the SuperLink's id as their source).
    """
    replies = RoundReplies(sent=[m.metadata.dst_node_id for m in messages])
    message_ids = list(grid.push_messages(messages))
    message_ids += [None] * (len(messages) - len(message_ids))  # a rejected push returns fewer ids
    node_of = {mid: m.metadata.dst_node_id for mid, m in zip(message_ids, messages) if mid}
    for m, mid in zip(messages, message_ids):
        if not mid:
            replies.failed[m.metadata.dst_node_id] = "the SuperLink did not accept the message"
    pending = set(node_of)
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        for reply in grid.pull_messages(list(pending)):
            mid = reply.metadata.reply_to_message_id
            if mid not in pending:
                continue
            pending.discard(mid)
            node = node_of[mid]
            if reply.has_error():
                replies.failed[node] = f"error {reply.error.code}: {reply.error.reason}"
                continue
            try:
                replies.ok.append(_parse_reply(node, reply))
            except ValueError as exc:
                replies.failed[node] = str(exc)
        if pending:
            time.sleep(POLL_SECONDS)
    return replies


# --- the ServerApp: the round loop -------------------------------------------------------------


@dataclass(frozen=True)
class FlowerRoundMetrics:
    """One round's numbers; the columns shared with ``simulation.RoundMetrics`` mean the same.

    ``train_seconds`` is the wait for the replies (the clients' training and the network),
    ``seconds`` and ``round_seconds`` the whole round (one method, so they are equal).
    """

    round: int
    method: str
    test_accuracy: float
    test_loss: float
    train_loss: float
    seconds: float
    train_seconds: float
    eval_seconds: float
    round_seconds: float
    mu: float
    num_sampled: int
    start_sha256: str
    num_replies: int
    sampled_nodes: list[int]
    replied_clients: list[int]
    failed_nodes: list[str]


CSV_COLUMNS = [f.name for f in fields(FlowerRoundMetrics)]


def run_server(grid: Grid, config: FlowerRunConfig, run_id: int | None = None) -> list[FlowerRoundMetrics]:
    """Run ``config.num_server_rounds`` rounds on ``grid`` and write the outputs to ``output-dir``.

    Raises
    ------
    ConfigError, DataError
        Bad settings or an unreadable test set (before any node is contacted).
    RoundFailedError
        Too few nodes connected, or a round with fewer than ``min-train-nodes`` successful replies.
    AggregationError
        The method rejects the replies (e.g. Krum with n <= 2f + 2).
    """
    from fedmnist.data import load_partition
    from fedmnist.evaluation import evaluate
    from fedmnist.exchange import global_path, make_global, save_global
    from fedmnist.model import initial_weights, save_keras_model, weights_sha256
    from fedmnist.plots import method_label, plot_accuracy_per_round
    from fedmnist.training import ClientTrainer

    config.check_server()
    out = Path(config.output_dir)
    x_test, y_test = load_partition(config.test_file)
    evaluator = ClientTrainer(config.optimizer, config.learning_rate, config.momentum, model_seed=config.seed)
    weights = initial_weights(config.seed)
    out.mkdir(parents=True, exist_ok=True)
    _dump_json(out / CONFIG_FILE, {
        "flower": config.to_dict(),
        "run_id": run_id,
        "initial_sha256": weights_sha256(weights),
        "software": {"fedmnist": __version__, "numpy": np.__version__, "python": platform.python_version()},
    })
    save_global(global_path(out, 0), make_global(weights, 0, "init", config.seed))
    history: list[FlowerRoundMetrics] = []
    title = (f"Flower, {method_label(config.method)}: E={config.local_epochs}, B={config.batch_size}, "
             f"C={config.fraction_train:g}")

    for round_ in range(1, config.num_server_rounds + 1):
        started = time.perf_counter()
        needed = nodes_needed(config.min_train_nodes, config.fraction_train)
        if round_ == 1:
            needed = max(needed, config.nodes_before_start)
        node_ids = wait_for_nodes(grid, needed, config.wait_nodes_timeout, f"round {round_}")
        sampled = sample_nodes(node_ids, config.fraction_train, config.seed, round_)
        log(INFO, "[fedmnist] round %d: training on %d of %d nodes", round_, len(sampled), len(node_ids))
        content = RecordDict({
            "arrays": weights_to_record(weights),
            "config": ConfigRecord({"server-round": round_, "proximal-mu": config.client_mu}),
        })
        messages = [
            Message(content=content, dst_node_id=node, message_type=MessageType.TRAIN,
                    group_id=str(round_), ttl=config.round_timeout)
            for node in sampled
        ]
        t0 = time.perf_counter()
        replies = collect_replies(grid, messages, config.round_timeout)
        train_seconds = time.perf_counter() - t0
        for node, why in sorted(replies.failed.items()):
            log(WARNING, "[fedmnist] round %d: node %d failed: %s", round_, node, why)
        for node in replies.missing:
            log(WARNING, "[fedmnist] round %d: node %d did not reply within %g s", round_, node,
                config.round_timeout)
        shortfall = replies_shortfall(round_, replies, config.min_train_nodes, config.round_timeout)
        if shortfall:
            raise RoundFailedError(shortfall)

        ok = sorted(replies.ok, key=lambda r: (r.client_id, r.node_id))
        clients = [r.client_id for r in ok]
        if len(set(clients)) < len(clients):
            log(WARNING, "[fedmnist] round %d: client ids repeat (%s): do two SuperNodes share a "
                "data-file?", round_, clients)
        start_sha = weights_sha256(weights)[:16]
        weights = aggregate(
            config.method,
            [(r.weights, r.num_examples) for r in ok],
            trim_beta=config.trim_beta,
            num_malicious=config.num_malicious,
        )
        t0 = time.perf_counter()
        result = evaluate(evaluator, weights, x_test, y_test)
        eval_seconds = time.perf_counter() - t0
        round_seconds = time.perf_counter() - started
        history.append(FlowerRoundMetrics(
            round=round_,
            method=config.method,
            test_accuracy=float(result.accuracy),
            test_loss=float(result.loss),
            train_loss=float(np.mean([r.train_loss for r in ok])),
            seconds=round_seconds,
            train_seconds=train_seconds,
            eval_seconds=eval_seconds,
            round_seconds=round_seconds,
            mu=config.client_mu,
            num_sampled=len(sampled),
            start_sha256=start_sha,
            num_replies=len(ok),
            sampled_nodes=sampled,
            replied_clients=clients,
            failed_nodes=[f"{n}: {why}" for n, why in sorted(replies.failed.items())]
            + [f"{n}: no reply" for n in replies.missing],
        ))
        # Metrics last: a round listed in them has all of its files.
        save_global(global_path(out, round_), make_global(weights, round_, config.method, config.seed))
        save_keras_model(weights, out / f"modelo_global_{config.method}.h5")
        plot_accuracy_per_round({config.method: [h.test_accuracy for h in history]}, out / ACCURACY_PLOT,
                                title=title)
        _write_metrics(out, config, history)
        log(INFO, "[fedmnist] round %d: %d replies, test accuracy %.4f, loss %.4f (%.1f s)", round_,
            len(ok), result.accuracy, result.loss, round_seconds)
    return history


def _dump_json(path: Path, payload: dict) -> None:
    atomic_write_text(path, json.dumps(payload, indent=2, ensure_ascii=False, default=str) + "\n")


def _write_metrics(out: Path, config: FlowerRunConfig, history: list[FlowerRoundMetrics]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in history:
        values = asdict(row)
        for key in ("sampled_nodes", "replied_clients"):
            values[key] = " ".join(map(str, values[key]))
        values["failed_nodes"] = " | ".join(values["failed_nodes"])
        writer.writerow(values)
    atomic_write_text(out / METRICS_CSV, buffer.getvalue())
    _dump_json(out / METRICS_JSON, {"methods": [config.method], "rounds": [asdict(r) for r in history]})


server_app = ServerApp()


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    """Flower's entry point: read the run config, run the rounds."""
    config = FlowerRunConfig.from_run_config(context.run_config)
    run_server(grid, config, run_id=context.run_id)
