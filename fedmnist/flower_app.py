"""Distributed federated learning on Flower (flwr >= 1.42, Message API): a ServerApp and a ClientApp.

This is the only module of the package that imports ``flwr``. It runs the same training, aggregation
and evaluation as the other modes, over the network:

* ``client_app``: each SuperNode (one team member) trains the shared CNN on its own partition file,
  named by the SuperNode's ``--node-config "data-file='/abs/cliente_N.npz'"`` (in Flower's simulation
  engine: ``cliente_{partition-id + 1}.npz`` of the run's ``data-dir``) with
  ``fedmnist.client.client_step``, the client step of the member's job and of the simulation, and the
  training seed ``fedmnist.seeds.training_seed`` gives client N in that round, so a Flower run,
  ``run_simulation`` and the file flow on the same partitions give the same global weights.
* ``server_app``: a thin adapter over the shared server step (``fedmnist.server.Server``), driven by
  the round loop the simulation runs too (``fedmnist.rounds``; ``FlowerClients`` is its push/pull on
  the Grid). It starts from ``initial_weights(seed)`` (or, with ``resume``, from the last round of
  ``output-dir/checkpoint.pkl``), sends every round's global weights to a sample of the connected
  nodes (⌊C·n⌋ seeded by (seed, round), the simulation's rule, or Poisson under DP), waits up to
  ``round-timeout`` for their replies and hands them to ``Server.step``, which validates each one (a
  malformed, non-finite, misshapen or wrong-start reply fails that node, never the ServerApp),
  aggregates, evaluates on the common test set and records; ``fedmnist.outputs`` writes the files of
  the other modes and the checkpoint, atomically, after every round.

SCAFFOLD (``method='scaffold'``, Karimireddy et al. 2020, ``fedmnist.scaffold``): the ServerApp sends the
server control variate ``c`` beside the weights (ArrayRecord ``control``); each ClientApp trains with
the correction ``c − c_i``, where ``c_i`` is its own control variate kept in ``context.state`` (Flower's
per-node state of the run: zeros the first time the node trains, untouched in the rounds it is not
sampled), stores ``c_i⁺`` there and replies with ``Δc_i`` (ArrayRecord ``control-delta``) beside its
weights. The server updates ``c ← c + Σ Δc_i / N`` with N the nodes connected in that round (those the
round sampled from), the simulation's K when every node stays connected. Where ``context.state`` lives
in flwr 1.42: Flower's simulation engine keeps it per node in the engine's memory and stores the
ClientApp's updated Context before handing its reply on; a SuperNode keeps it in its in-memory
NodeState for the run, saved when the ClientApp process exits just after sending its reply, and a
restarted SuperNode starts again from ``c_i = 0``.

Secure aggregation (``secure-aggregation=true``, issue 26): a round's training runs as SecAgg+'s four
stages (``fedmnist.flower_secagg``), each a TRAIN message whose ``secagg`` ConfigRecord carries the stage's
payload. The ClientApp answers a stage with ``client_stage`` and keeps its keys and shares in
``context.state`` (``secagg-state``); in the masking stage, which also carries the train message's
records, it trains through ``client_step`` (which encodes the clipped update) and replies with the masked
vector alone. ``secure_round`` drives the stages over the Grid, a node silent or failing at a stage drops
out, and the one decoded ``SecureAggregate`` goes to ``Server.step_secure`` (``fedmnist.rounds``); below
the threshold the round has no aggregate and ``min-train-nodes`` stops the run. Every round the ServerApp
logs the bytes of the records it pushed and pulled (``Traffic``).

A reply's client id is bound to the node that sent it (``NodeIdentities``): the first time a node's
reply names a client id no other node holds, that node speaks for that client for as long as it stays
connected; a reply naming a client bound to another node, or a node switching clients, is refused, so
a node cannot take over another member's id whatever the order of the replies. The node id is what the
SuperLink knows of the sender (with node authentication, the id its public key registered), the one
identity a reply cannot forge.

A round with fewer than ``min-train-nodes`` accepted replies stops the run with a ``RoundFailedError``
whose message Flower shows as the run's status details (``flwr ls``); the files of earlier rounds stay
as they were. Under DP-FedAvg such a round runs anyway, on what was accepted (the noise alone if
nothing), and is charged to ε: stopping would reveal, uncharged, how many replies were valid. The run configuration (``[tool.flwr.app.config]`` of ``pyproject.toml``, overridden by
``flwr run --run-config``) becomes one ``FlowerRunConfig`` in ``FlowerRunConfig.from_run_config``.
"""

from __future__ import annotations

import math
import os
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from logging import INFO, WARNING
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from fedmnist.client import ClientState, DivergedError, Instructions, client_step
from fedmnist.errors import ConfigError, DataError
from fedmnist.flower_config import RESUMABLE_KEYS, FlowerRunConfig, cast
from fedmnist.methods import (
    ScaffoldMethod,
    build_method,
)
from fedmnist.rounds import Batch, Gathered
from fedmnist.seeds import clients_per_round, training_seed
from fedmnist.server import Reply, RoundFailedError, RoundRecord, Server, ServerState

if TYPE_CHECKING:
    from fedmnist.training import ClientTrainer

POLL_SECONDS = 0.5
CONTROL_KEY = "control"
"""The train message's ArrayRecord holding SCAFFOLD's server control variate ``c``."""
CONTROL_DELTA_KEY = "control-delta"
"""The reply's ArrayRecord holding the node's ``Δc_i = c_i⁺ − c_i``."""
STATE_CONTROL_KEY = "scaffold-control"
"""The ArrayRecord of ``context.state`` holding the node's own control variate ``c_i``."""
SECAGG_KEY = "secagg"
"""The ConfigRecord of a secure round's stage messages and replies (``fedmnist.flower_secagg`` payloads)."""
SECAGG_STATE_KEY = "secagg-state"
"""The ConfigRecord of ``context.state`` holding the node's SecAgg+ state between stages (keys, shares)."""
TEST_DROP_AT = "test-drop-at-stage"
"""Node-config key for tests only: the ClientApp fails at the named SecAgg+ stage (a dropout on loopback)."""
TRAFFIC_LOG = "message contents:"
"""Marks the ServerApp's per-round log line of its traffic (``Traffic``), which benchmarks read."""
SECAGG_SEED = "secagg-seed"
SECAGG_COMPOSITION = ("secagg-weighted", "secagg-control", "secagg-unclipped-bit")
"""Train-message config keys of a secure round's encoding: the run's seed and the method's ``Composition``."""
_CLIENT_FILE = re.compile(r"cliente_(\d+)\.npz$")
__all__ = ["RoundFailedError", "client_app", "server_app"]


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
            client_id = cast("client-id", node_config["client-id"], int)
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
        client_id = cast("partition-id", node_config["partition-id"], int) + 1
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


def node_control(state: RecordDict, weights: list[np.ndarray]) -> list[np.ndarray]:
    """This node's SCAFFOLD control variate ``c_i`` from its ``context.state`` (zeros before it first trains).

    Raises
    ------
    ScaffoldError
        The stored record does not fit ``weights`` (another model, or a corrupted state).
    """
    from fedmnist.scaffold import zero_controls

    record = state.array_records.get(STATE_CONTROL_KEY)
    if record is None:
        return zero_controls(weights)
    return _read_control(record, weights, f"this node's SCAFFOLD control variate (context.state "
                                          f"'{STATE_CONTROL_KEY}')")


def _read_control(record: ArrayRecord, weights: list[np.ndarray], what: str) -> list[np.ndarray]:
    """The arrays of a control-variate record, checked against ``weights`` (ScaffoldError naming ``what``)."""
    from fedmnist.scaffold import ScaffoldError, check_controls

    try:
        controls = record_to_weights(record)
    except Exception as exc:  # a record without keys "0".."N-1"
        raise ScaffoldError(f"{what}: unreadable record ({type(exc).__name__}: {exc})") from None
    check_controls(controls, weights, what)
    return controls


def _trainer(config: FlowerRunConfig) -> ClientTrainer:
    from fedmnist.training import ClientTrainer

    key = (config.optimizer, config.learning_rate, config.momentum, config.seed)
    if key not in _TRAINERS:
        _TRAINERS[key] = ClientTrainer(
            config.optimizer, config.learning_rate, config.momentum, model_seed=config.seed
        )
    return _TRAINERS[key]


def instructions_content(weights: list[np.ndarray], instructions: Instructions) -> RecordDict:
    """A train message's content: the weights (``arrays``), the instructions' ``config`` ConfigRecord
    (``server-round``, ``proximal-mu``, ``dp-clip`` under client-side clipping; in a secure round the
    ``secagg-*`` settings, the seed and the composition) and SCAFFOLD's ``c`` (ArrayRecord ``control``)."""
    from fedmnist.secure_aggregation import FIELDS

    values = {"server-round": instructions.round, "proximal-mu": instructions.mu}
    if instructions.clip is not None:
        values["dp-clip"] = instructions.clip
    if instructions.secure is not None:
        secure = instructions.secure
        values.update({key: 0 if getattr(secure.config, name) is None else getattr(secure.config, name)
                       for key, name in FIELDS.items()})
        comp = secure.layout.composition
        values.update(zip(SECAGG_COMPOSITION, (comp.weighted, comp.control, comp.unclipped_bit)))
        values[SECAGG_SEED] = secure.seed
    content = RecordDict({"arrays": weights_to_record(weights), "config": ConfigRecord(values)})
    if instructions.control is not None:
        content[CONTROL_KEY] = weights_to_record(instructions.control)
    return content


def read_instructions(content: RecordDict, start: list[np.ndarray]) -> Instructions:
    """The ``Instructions`` of a train message's content (``instructions_content``); ``c`` checked against
    ``start`` (ScaffoldError naming the record)."""
    values = content["config"]
    control = None
    if CONTROL_KEY in content.array_records:
        control = _read_control(content.array_records[CONTROL_KEY], start,
                                f"the server's SCAFFOLD control variate (message record '{CONTROL_KEY}')")
    clip = float(values["dp-clip"]) if "dp-clip" in values else None
    secure = None
    if values.get("secure-aggregation"):
        from fedmnist.secure_aggregation import Composition, SecAggConfig, SecureEncoding

        composition = Composition(*(bool(values[key]) for key in SECAGG_COMPOSITION))
        secure = SecureEncoding.for_method(SecAggConfig.from_settings(dict(values)), composition, start,
                                           int(values[SECAGG_SEED]))
    return Instructions(int(values["server-round"]), float(values["proximal-mu"]), clip, control, secure)


def _client_round(msg: Message, context: Context):
    """``client_step`` on this node's partition as the message says: (reply, new state, client id, start,
    instructions). Nothing is stored in ``context.state`` here."""
    from fedmnist.data import load_partition

    config = FlowerRunConfig.from_run_config(context.run_config)
    path, client_id = client_partition(context.node_config, config.data_dir)
    x, y = load_partition(path)
    start = record_to_weights(msg.content["arrays"])
    instructions = read_instructions(msg.content, start)
    state = ClientState(node_control(context.state, start) if instructions.scaffold else None)
    try:
        reply, new_state = client_step(_trainer(config), start, x, y, instructions, state,
                                       epochs=config.local_epochs, batch_size=config.batch_size,
                                       seed=training_seed(config.seed, instructions.round, client_id),
                                       client_id=client_id)
    except DivergedError as exc:  # this node's round fails; its context.state is left as it was
        raise DivergedError(f"client {client_id}: {exc}") from None
    return reply, new_state, client_id, start, instructions


def _keep_control(context: Context, new_state: ClientState) -> None:
    """SCAFFOLD: keep ``c_i⁺`` in ``context.state`` for this node's next round."""
    if new_state.control is not None:
        context.state[STATE_CONTROL_KEY] = weights_to_record(new_state.control)


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    """Run ``fedmnist.client.client_step`` on this node's partition as the message says; reply with its result.

    Under SCAFFOLD the node's ``c_i`` is read from ``context.state`` and its ``c_i⁺`` kept there; the reply
    carries ``Δc_i`` (ArrayRecord ``control-delta``) and, under client-side clipping, the unclipped bit.
    A message with a ``secagg`` ConfigRecord is a stage of a secure round (``secure_stage``).
    """
    from fedmnist.model import weights_sha256

    if SECAGG_KEY in msg.content.config_records:
        return secure_stage(msg, context)
    reply, new_state, client_id, start, instructions = _client_round(msg, context)
    values = {
        "num-examples": int(reply.num_examples),
        "train-loss": reply.train_loss,
        "train-accuracy": reply.train_accuracy,
        "client-id": int(client_id),
        "server-round": instructions.round,
    }
    if reply.unclipped is not None:
        values["unclipped"] = int(reply.unclipped)
    content = RecordDict({"arrays": weights_to_record(reply.weights), "metrics": MetricRecord(values),
                          "reply": ConfigRecord({"start-sha256": weights_sha256(start)})})
    if reply.control_delta is not None:  # SCAFFOLD: Δc_i to the server, c_i⁺ kept for this node's next round
        content[CONTROL_DELTA_KEY] = weights_to_record(reply.control_delta)
        _keep_control(context, new_state)
    return Message(content=content, reply_to=msg)


def secure_stage(msg: Message, context: Context) -> Message:
    """One SecAgg+ stage on this node (``flower_secagg.client_stage``), its state kept in ``context.state``.

    In the masking stage the node trains through ``client_step``, which encodes its clipped update, and
    replies with that vector masked: the reply holds the masked bytes only (no weights, example count or
    metric in the clear). A stage the protocol refuses raises, which the ServerApp counts as a dropout.
    """
    from flwr.common.secure_aggregation.secaggplus_constants import Key, Stage

    from fedmnist.flower_secagg import client_stage

    inbound = dict(msg.content.config_records[SECAGG_KEY])
    if context.node_config.get(TEST_DROP_AT) == inbound.get(Key.STAGE):
        raise RuntimeError(f"this SuperNode drops out at secure-aggregation stage '{inbound.get(Key.STAGE)}' "
                           f"(node config {TEST_DROP_AT}: fault injection for tests)")
    record = context.state.config_records.get(SECAGG_STATE_KEY)
    state = {} if record is None else dict(record)
    encoded, new_client_state = None, None
    if inbound.get(Key.STAGE) == Stage.COLLECT_MASKED_VECTORS:
        reply, new_client_state, _, _, instructions = _client_round(msg, context)
        if instructions.secure is None:
            raise ConfigError("the masking stage of a secure round came without secure-aggregation instructions")
        encoded = reply.encoded
    out, new_state = client_stage(inbound, state, int(context.node_id), encoded)
    context.state[SECAGG_STATE_KEY] = ConfigRecord(new_state)
    if new_client_state is not None:
        _keep_control(context, new_client_state)
    return Message(content=RecordDict({SECAGG_KEY: ConfigRecord(out)}), reply_to=msg)


# --- the ServerApp: pure pieces ----------------------------------------------------------------


def nodes_to_sample(num_nodes: int, fraction: float) -> int:
    """``max(1, ⌊fraction · num_nodes⌋)`` nodes per round: the simulation's (and Flower's) rule."""
    return clients_per_round(num_nodes, fraction)


def nodes_needed(min_train_nodes: int, fraction: float) -> int:
    """The fewest connected nodes whose sample (``nodes_to_sample``) holds ``min_train_nodes``."""
    n = max(min_train_nodes, math.ceil(min_train_nodes / fraction - 1e-9) - 1)
    while nodes_to_sample(n, fraction) < min_train_nodes:
        n += 1
    return n


@dataclass
class RoundReplies:
    """What came back from the nodes a round was sent to: parsed replies and nodes that failed."""

    sent: list[int]
    ok: list[Reply] = field(default_factory=list)
    failed: dict[int, str] = field(default_factory=dict)

    @property
    def missing(self) -> list[int]:
        """Nodes that neither replied nor failed before the timeout."""
        answered = {int(r.source.split()[1]) for r in self.ok} | set(self.failed)
        return [n for n in self.sent if n not in answered]

    def failures(self, timeout: float) -> dict[str, str]:
        """Every node that contributed no reply, with the reason, for the server step's record."""
        out = {f"node {n}": why for n, why in sorted(self.failed.items())}
        out.update({f"node {n}": f"no reply after {timeout:g} s" for n in self.missing})
        return out


def parse_reply(node_id: int, reply: Message, with_control: bool = False) -> Reply:
    """The server's ``Reply`` from a node's message, claims unchecked (``Server.step`` checks them).

    With ``with_control`` (a SCAFFOLD round) the ``control-delta`` ArrayRecord becomes
    ``Reply.control_delta``, checked by the server like the weights; without it the reply's
    ``control_delta`` is None, which SCAFFOLD refuses.

    Raises
    ------
    ValueError
        The message lacks the ``arrays`` ArrayRecord or ``metrics`` with ``num-examples`` and
        ``client-id``, or its records cannot be read as arrays.
    """
    arrays = reply.content.array_records.get("arrays")
    metrics = reply.content.metric_records.get("metrics")
    if arrays is None or metrics is None or "num-examples" not in metrics or "client-id" not in metrics:
        raise ValueError("the reply has no 'arrays' ArrayRecord or no 'metrics' with num-examples and client-id")
    start = reply.content.config_records.get("reply")
    start_sha = start.get("start-sha256") if start is not None else None
    if not isinstance(start_sha, str):
        raise ValueError("the reply does not say which global weights it trained from (reply.start-sha256)")
    try:
        weights = record_to_weights(arrays)
    except Exception as exc:  # a peer's malformed record must fail its node, never the ServerApp
        raise ValueError(f"unreadable arrays ({type(exc).__name__}: {exc})") from None
    control_delta = None
    if with_control and CONTROL_DELTA_KEY in reply.content.array_records:
        try:
            control_delta = record_to_weights(reply.content.array_records[CONTROL_DELTA_KEY])
        except Exception as exc:
            raise ValueError(f"unreadable {CONTROL_DELTA_KEY} ({type(exc).__name__}: {exc})") from None
    loss = metrics.get("train-loss")
    return Reply(
        client_id=metrics["client-id"],
        weights=weights,
        num_examples=metrics["num-examples"],
        source=f"node {node_id}",
        node_id=int(node_id),
        start_sha256=start_sha,
        train_loss=float(loss) if isinstance(loss, (int, float)) and math.isfinite(loss) else None,
        metrics={"unclipped": bool(metrics["unclipped"])} if "unclipped" in metrics else {},
        control_delta=control_delta,
    )


@dataclass
class NodeIdentities:
    """Which node speaks for which client id, bound from what the SuperLink knows: the sending node's id.

    The first time a node's reply names a (valid) client id held by no other node, the two are bound.
    Afterwards a reply naming a client bound to another node is an impostor's, and a node naming another
    client than its own is refused too, whatever order the replies come in. When several unbound nodes
    claim the same unbound id in one round none is bound and all are refused (which is genuine cannot be
    told). A binding ends when its node leaves the SuperLink (a restarted SuperNode gets a new node id).
    """

    client_of: dict[int, int] = field(default_factory=dict)
    """Node id -> the client id it speaks for."""

    def admit(self, replies: list[Reply], connected: list[int] | None = None) -> tuple[list[Reply], dict[str, str]]:
        """The replies whose node may speak for their client id, and the refused ones (``node N`` -> reason).

        ``connected``: the node ids the SuperLink lists now; bindings of nodes no longer there are dropped.
        Replies whose client id is not a positive integer pass unbound: ``Server.step`` refuses them.
        """
        if connected is not None:
            alive = set(connected)
            self.client_of = {n: c for n, c in self.client_of.items() if n in alive}
        node_of = {c: n for n, c in self.client_of.items()}
        claims: dict[int, set[int]] = {}
        for reply in replies:
            if _client_id(reply) is not None:
                claims.setdefault(_client_id(reply), set()).add(reply.node_id)
        admitted, refused = [], {}
        for reply in replies:
            client, node = _client_id(reply), reply.node_id
            why = None
            if client is None:
                pass
            elif node in self.client_of and self.client_of[node] != client:
                why = f"speaks for client {self.client_of[node]}, but this reply claims client {client}"
            elif client in node_of and node_of[client] != node:
                why = f"claims client {client}, which node {node_of[client]} speaks for: refused as an impostor"
            elif client not in node_of and len(claims[client]) > 1:
                why = (f"claims client {client}, as do nodes {sorted(n for n in claims[client] if n != node)} "
                       "in the same round, and none of them is bound to it yet: all are refused")
            if why:
                refused[f"node {node}"] = f"node {node}: {why}"
            else:
                admitted.append(reply)
        for reply in admitted:
            if _client_id(reply) is not None and reply.node_id not in self.client_of:
                self.client_of[reply.node_id] = _client_id(reply)
        return admitted, refused


def _client_id(reply: Reply) -> int | None:
    """The reply's client id if it is a positive integer (else None: ``Server.step`` refuses it)."""
    value = reply.client_id
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 1 <= value <= 10**9:
        return None
    return int(value)


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


def content_bytes(content: RecordDict) -> int:
    """The bytes a message's records hold (Flower's ``count_bytes`` of every record): what crosses the network,
    framing aside. An empty list in a ConfigRecord counts its key only (Flower's ``count_bytes`` fails on it)."""
    def record_bytes(record) -> int:
        if isinstance(record, ConfigRecord):
            return sum(len(k) if isinstance(v, list) and not v else ConfigRecord({k: v}).count_bytes()
                       for k, v in record.items())
        return record.count_bytes()

    return sum(record_bytes(record) for record in content.values())


@dataclass
class Traffic:
    """Bytes of the message contents the ServerApp pushed and pulled (``content_bytes``), per round."""

    sent: int = 0
    received: int = 0


def push_and_pull(grid: Grid, messages: list[Message], timeout: float,
                  traffic: Traffic | None = None) -> tuple[dict[int, Message], dict[int, str]]:
    """Push ``messages``, then pull their replies every ``POLL_SECONDS`` until all came or ``timeout``.

    Returns the replies by node (in arrival order) and the nodes that failed (a push the SuperLink refused,
    an error reply), with why; a node in neither gave no reply in time. Replies are matched to nodes
    through ``reply_to_message_id`` (error replies the SuperLink makes for a vanished node carry the
    SuperLink's id as their source).
    """
    answered: dict[int, Message] = {}
    failed: dict[int, str] = {}
    if traffic is not None:
        traffic.sent += sum(content_bytes(m.content) for m in messages)
    message_ids = list(grid.push_messages(messages))
    message_ids += [None] * (len(messages) - len(message_ids))  # a rejected push returns fewer ids
    node_of = {mid: m.metadata.dst_node_id for mid, m in zip(message_ids, messages) if mid}
    for m, mid in zip(messages, message_ids):
        if not mid:
            failed[m.metadata.dst_node_id] = "the SuperLink did not accept the message"
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
                failed[node] = f"error {reply.error.code}: {reply.error.reason}"
            else:
                answered[node] = reply
                if traffic is not None:
                    traffic.received += content_bytes(reply.content)
        if pending:
            time.sleep(POLL_SECONDS)
    return answered, failed


def collect_replies(grid: Grid, messages: list[Message], timeout: float, with_control: bool = False,
                    traffic: Traffic | None = None) -> RoundReplies:
    """Push ``messages`` and pull their replies (``push_and_pull``), each parsed into a ``Reply``.

    ``with_control``: read the replies' SCAFFOLD ``control-delta`` (``parse_reply``).
    """
    replies = RoundReplies(sent=[m.metadata.dst_node_id for m in messages])
    answered, replies.failed = push_and_pull(grid, messages, timeout, traffic)
    for node, reply in answered.items():
        try:
            replies.ok.append(parse_reply(node, reply, with_control))
        except ValueError as exc:
            replies.failed[node] = str(exc)
    return replies


def secure_round(grid: Grid, sampled: list[int], content: RecordDict, encoding, graph_rng: np.random.Generator,
                 timeout: float, round_: int, traffic: Traffic | None = None) -> Gathered:
    """Drive a secure round's four SecAgg+ stages over the Grid (``flower_secagg.run_server``) and decode the
    one aggregate the ServerApp may learn (``secure_aggregation.decode_sum``).

    ``content``: the train message's (``instructions_content``), sent with the masking stage, in which the
    nodes train; ``encoding``: the batch's ``SecureEncoding``. A node that fails or is silent at a stage
    drops out (named in ``failed``); below the threshold the round has no aggregate (``failed`` says why).

    Raises
    ------
    ConfigError
        The settings cannot work with this many sampled nodes (``SecAggConfig.for_sample``).
    """
    from flwr.common.secure_aggregation.secaggplus_constants import Stage

    from fedmnist import flower_secagg
    from fedmnist.secure_aggregation import SecureAggregationAborted, SecureAggregationError, decode_sum

    params = encoding.config.for_sample(len(sampled), encoding.layout)
    failed: dict[str, str] = {}
    t0 = time.perf_counter()

    def exchange(stage: str, payloads: dict[int, dict]) -> dict[int, dict]:
        messages = []
        for node, payload in payloads.items():
            records = RecordDict({SECAGG_KEY: ConfigRecord(payload)})
            if stage == Stage.COLLECT_MASKED_VECTORS:
                for key, record in content.items():
                    records[key] = record
            messages.append(Message(content=records, dst_node_id=node, message_type=MessageType.TRAIN,
                                    group_id=str(round_), ttl=timeout))
        answered, why = push_and_pull(grid, messages, timeout, traffic)
        out = {}
        for node in payloads:
            reply = answered.get(node)
            if reply is not None and SECAGG_KEY in reply.content.config_records:
                out[node] = dict(reply.content.config_records[SECAGG_KEY])
            else:
                reason = why.get(node, "no reply" if reply is None else f"no '{SECAGG_KEY}' record in the reply")
                failed[f"node {node}"] = f"secure aggregation, stage '{stage}': {reason}"
        return out

    try:
        result = flower_secagg.run_server(sampled, exchange, params, encoding.layout.size, graph_rng)
        agg = decode_sum(result.total, len(result.contributors), encoding.layout, encoding.config)
    except (SecureAggregationAborted, SecureAggregationError) as exc:
        failed["secure aggregation"] = str(exc)
        return Gathered([], failed, time.perf_counter() - t0)
    return Gathered([], failed, time.perf_counter() - t0, secure_aggregate=agg)


# --- the ServerApp: the round loop -------------------------------------------------------------

_ROUND_FILE = re.compile(r"pesos_globales_ronda_(\d+)\.pkl")


class FlowerClients:
    """Flower's side of the shared round loop (``fedmnist.rounds.Clients``): the connected SuperNodes,
    reached through the Grid, one train message per sampled node and batch."""

    def __init__(self, grid: Grid, config: FlowerRunConfig, server: Server) -> None:
        self.grid, self.config, self.server = grid, config, server
        self.first = True
        self.connected: list[int] = []
        self.identities = NodeIdentities()
        self.traffic = Traffic()

    def candidates(self, round_: int) -> list[int]:
        """The connected node ids, once enough are (``min-train-nodes``; before this process's first
        round also ``min-available-nodes``); SCAFFOLD's N becomes their number."""
        needed = nodes_needed(self.config.min_train_nodes, self.config.fraction_train)
        if self.first:
            needed, self.first = max(needed, self.config.nodes_before_start), False
        node_ids = wait_for_nodes(self.grid, needed, self.config.wait_nodes_timeout, f"round {round_}")
        for name, method in list(self.server.methods.items()):
            if isinstance(method, ScaffoldMethod):  # c's update divides by N: the nodes this round samples from
                self.server.methods[name] = replace(method, num_clients=len(node_ids))
        self.connected = node_ids
        return node_ids

    def record_fields(self, sampled: list[int]) -> dict:
        """Flower samples nodes, not client ids."""
        return {"sampled_nodes": sampled}

    def exchange(self, round_: int, sampled: list[int], batches: list[Batch]) -> list[Gathered]:
        """Push every batch's train message to the sampled nodes and pull their replies."""
        log(INFO, "[fedmnist] round %d: training on %d of %d nodes", round_, len(sampled), len(self.connected))
        from fedmnist.seeds import secagg_graph_rng

        self.traffic = Traffic()
        gathered = []
        for batch in batches:
            if not sampled:  # a Poisson sample can be empty
                gathered.append(Gathered([]))
                continue
            content = instructions_content(batch.start, batch.instructions)
            if batch.instructions.secure is not None:
                got = secure_round(self.grid, sampled, content, batch.instructions.secure,
                                   secagg_graph_rng(self.config.seed, round_), self.config.round_timeout, round_,
                                   self.traffic)
                for node, why in got.failed.items():
                    log(WARNING, "[fedmnist] round %d: %s failed: %s", round_, node, why)
                gathered.append(got)
                continue
            messages = [Message(content=content, dst_node_id=node, message_type=MessageType.TRAIN,
                                group_id=str(round_), ttl=self.config.round_timeout) for node in sampled]
            t0 = time.perf_counter()
            replies = collect_replies(self.grid, messages, self.config.round_timeout,
                                      with_control=batch.instructions.scaffold, traffic=self.traffic)
            admitted, impostors = self.identities.admit(replies.ok, self.connected)
            failures = {**replies.failures(self.config.round_timeout), **impostors}
            for node, why in failures.items():
                log(WARNING, "[fedmnist] round %d: %s failed: %s", round_, node, why)
            ok = sorted(admitted, key=lambda r: r.node_id)
            gathered.append(Gathered(ok, failures, time.perf_counter() - t0))
        log(INFO, "[fedmnist] round %d: %s %d bytes sent, %d bytes received", round_, TRAFFIC_LOG,
            self.traffic.sent, self.traffic.received)
        return gathered


def checkpoint_spec(config: FlowerRunConfig, method, data_sha256: str, dp_clients: int | None):
    """The ``CheckpointSpec`` of a Flower run: its run config (``RESUMABLE_KEYS`` may change) and the
    federation size K its DP accountant was built for, the test set's hash, its one method."""
    from fedmnist.checkpoint import CheckpointSpec
    from fedmnist.secure_aggregation import FIELDS

    settings = {**config.to_dict(), "dp-num-clients": dp_clients}
    if not config.secure_aggregation:  # a plain run's settings, and so its checkpoints' hash, stay as they were
        settings = {k: v for k, v in settings.items() if k not in FIELDS}
    return CheckpointSpec(settings, data_sha256, (method,), config.num_server_rounds, RESUMABLE_KEYS,
                          data_label="test data (test-file)")


def _stored_dp_clients(payload: dict | None) -> int | None:
    """K of the DP accountant a checkpoint was written with (checked with the rest of its settings later)."""
    settings = payload.get("settings") if isinstance(payload, dict) else None
    value = settings.get("dp-num-clients") if isinstance(settings, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 1 else None


def _earlier_round_files(out: Path) -> list[str]:
    """The round files an earlier run left in ``out`` (a fresh run drops them with its first round)."""
    if not out.is_dir():
        return []
    return sorted(p.name for p in out.iterdir() if (m := _ROUND_FILE.fullmatch(p.name)) and int(m.group(1)) > 0)


def run_server(grid: Grid, config: FlowerRunConfig, run_id: int | None = None) -> list[RoundRecord]:
    """Run ``config.num_server_rounds`` rounds on ``grid`` and write the outputs to ``output-dir``.

    The rounds run in the shared loop (``fedmnist.rounds``); after each one ``checkpoint.pkl`` is
    written with the round's files. With ``resume`` a checkpoint of the same settings is continued
    from its last completed round (seeded, the result equals an uninterrupted run's); without it, an
    existing checkpoint is replaced by this fresh run's.

    Raises
    ------
    ConfigError, DataError
        Bad settings, an unusable output directory, an unreadable test set, or (``resume``) a
        checkpoint of other settings, another test set or an edited one (before any node is contacted).
    RoundFailedError
        Too few nodes connected, or a round with fewer than ``min-train-nodes`` accepted replies.
    AggregationError
        The method rejects the replies (e.g. Krum with n <= 2f + 2).
    """
    from fedmnist import checkpoint as ckpt
    from fedmnist import outputs
    from fedmnist.data import load_partition
    from fedmnist.evaluation import evaluate
    from fedmnist.exchange import global_path, make_global, save_global
    from fedmnist.federation_files import checked_test_file
    from fedmnist.io import check_writable_dir
    from fedmnist.labels import method_name
    from fedmnist.model import initial_weights, weights_sha256
    from fedmnist.rounds import (
        LoopConfig,
        RoundWriter,
        check_privacy_target,
        check_secure_aggregation,
        run_rounds,
        with_dp,
    )
    from fedmnist.training import ClientTrainer

    config.check_server()
    out = Path(config.output_dir)
    check_writable_dir(out, "output-dir")
    x_test, y_test = load_partition(checked_test_file(config.test_file))
    data_sha256 = weights_sha256([x_test, y_test])
    evaluator = ClientTrainer(config.optimizer, config.learning_rate, config.momentum, model_seed=config.seed)
    path = out / ckpt.CHECKPOINT_FILE
    payload = None
    if config.resume and os.path.lexists(path):  # a dangling link is refused by the reader, not taken for none
        payload = ckpt.read_checkpoint(path, 5)  # the weights, up to two moment sets, SCAFFOLD's c
    elif os.path.lexists(path):
        log(INFO, "[fedmnist] %s exists; starting afresh (resume=true continues it)", path)
    method = build_method(config.method, config.method_config)
    weights = initial_weights(config.seed)
    dp = config.privacy
    dp_clients = None
    if dp is not None:
        dp_clients = config.dp_clients or _stored_dp_clients(payload) or len(
            wait_for_nodes(grid, config.nodes_before_start, config.wait_nodes_timeout, "DP-FedAvg's K"))
        (method,) = with_dp([method], dp, dp_clients, nodes_to_sample(dp_clients, config.fraction_train),
                            config.seed if config.dp_seeded_noise else None)
    spec = checkpoint_spec(config, method, data_sha256, dp_clients)
    if payload is not None:
        state = ckpt.restore_state(path, payload, spec, "use the same run config, set resume=false to start "
                                                        "afresh, or choose another output-dir")
        log(INFO, "[fedmnist] resuming from %s: %d of %d rounds already done", path, state.round,
            config.num_server_rounds)
        if isinstance(method, ScaffoldMethod):
            log(WARNING, "[fedmnist] SCAFFOLD resumed: the server's c continues, but every node's c_i lived in "
                "the previous run's context.state and starts again from zero")
    else:
        if config.resume:
            log(INFO, "[fedmnist] no checkpoint in %s; starting from round 1", out)
        state = ServerState.initial([method], weights)
    check_privacy_target([method], state, dp.target_epsilon if dp is not None else None)
    server = Server([method], state, lambda w: evaluate(evaluator, w, x_test, y_test),
                    max_count_ratio=config.max_count_ratio or None)
    check_secure_aggregation(server, config.secure, config.seed, None)  # the sample is checked every round
    outputs.dump_json(out / outputs.CONFIG_FILE, {
        "flower": config.to_dict(), "run_id": run_id, "initial_sha256": weights_sha256(weights),
        "resumed_from_round": state.round, "software": outputs.software(),
    })
    save_global(global_path(out, 0), make_global(weights, 0, "init", config.seed))
    title = (f"Flower, {method_name(config.method)}: E={config.local_epochs}, B={config.batch_size}, "
             f"C={config.fraction_train:g}")

    def round_files(staged, state: ServerState, rows: list[RoundRecord]) -> None:
        final = state.weights[config.method]
        with staged.temp_path(global_path(".", state.round).name) as tmp:
            save_global(tmp, make_global(final, state.round, config.method, config.seed))
        outputs.write_global(staged, f"pesos_globales_{config.method}", final, state.round, config.method,
                             config.seed)
        outputs.write_accuracy_plot(staged, state.history, title)

    def report(round_: int, rows: list[RoundRecord]) -> None:
        record = rows[0]
        log(INFO, "[fedmnist] round %d: %d replies, test accuracy %.4f, loss %.4f (%.1f s)", round_,
            record.num_replies, record.test_accuracy, record.test_loss, record.round_seconds)

    stale = [] if state.round else _earlier_round_files(out)
    writer = RoundWriter(out, "output-dir", lambda s: ckpt.state_bytes(spec, s), round_files, discard=stale)
    loop = LoopConfig(config.num_server_rounds, config.fraction_train, config.seed,
                      secret_sampling=dp is not None and not config.dp_seeded_noise,
                      min_replies=config.min_train_nodes, target_epsilon=dp.target_epsilon if dp is not None else None,
                      secure=config.secure)
    run_rounds(server, FlowerClients(grid, config, server), loop, writer, report)
    return server.state.history


server_app = ServerApp()


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    """Flower's entry point: read the run config, run the rounds."""
    config = FlowerRunConfig.from_run_config(context.run_config)
    run_server(grid, config, run_id=context.run_id)
