"""The server's round step, shared by the file flow, the simulation and Flower.

Whatever brought a round's replies (files from teammates, in-process clients, Flower messages), the
server does the same four things with them, here and only here:

1. **validate** every reply (``check_reply``): a positive integer client id, a sample count that is a
   finite positive integer at most ``MAX_NUM_EXAMPLES`` and equal to the federation manifest's when there is one,
   float32 finite weights of the shared CNN's shapes, and a start hash equal to the round's global
   weights that the server itself holds;
2. **aggregate** the accepted replies with the method (``fedmnist.methods.Method``);
3. **evaluate** the new global model on the common test set;
4. **record** the round (``RoundRecord``) in the ``ServerState``, which is what checkpoints save.

A secure round (``fedmnist.secure_aggregation``) has no individual replies: the mode unmasks their sum
and calls ``Server.step_secure`` with the one ``SecureAggregate``, which the method turns into its step
(``Method.aggregate_sum``); evaluation, recording and the refusal of a non-finite aggregate are ``step``'s.

The modes are thin adapters: they gather ``Reply`` objects and call ``Server.step``. A rejected reply
is refused with a message naming the client and its file or node; a multi-round mode counts it as a
failed client of that round, the file flow (``strict=True``) stops before writing anything.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING

import numpy as np

from fedmnist.config import check_int
from fedmnist.errors import ConfigError, FedMnistError, ValidationError
from fedmnist.exchange import MAX_NUM_EXAMPLES
from fedmnist.io import quote
from fedmnist.methods import Method, RoundContext

if TYPE_CHECKING:
    from fedmnist.secure_aggregation import SecureAggregate

log = logging.getLogger(__name__)

DOMINANT_SHARE = 0.9
"""Above this share of a round's examples (or three times a fair share, if larger), a client is reported."""


class RejectedReply(ValidationError):
    """A reply the server refuses to aggregate; the message names the client and its file or node."""


class RoundFailedError(FedMnistError, RuntimeError):
    """A round that cannot complete: too few clients connected or too few accepted replies."""


@dataclass
class Reply:
    """One client's answer to a round, however it arrived.

    ``source`` names where it came from (a file path, ``node 123``, ``client 4``) for messages.
    ``start_sha256`` is the hash of the global weights the client says it trained from; None only for
    bare legacy files, which cannot say (accepted with a warning). ``control_delta`` is SCAFFOLD's
    ``Δc_i`` (None for the other methods), checked like the weights. ``node_id`` is the Flower node that
    sent it, as the SuperLink knows it (None in the other modes): what a client id is bound to.
    """

    client_id: int
    weights: list[np.ndarray]
    num_examples: int
    source: str
    start_sha256: str | None = None
    train_loss: float | None = None
    mu: float = 0.0
    metrics: dict = field(default_factory=dict)
    control_delta: list[np.ndarray] | None = None
    node_id: int | None = None

    @property
    def label(self) -> str:
        """``source (client N)``, or ``client N`` when the source is the client itself."""
        return f"{self.source} (client {self.client_id})" if self.source != f"client {self.client_id}" \
            else self.source


def check_num_examples(value, source: str, expected: int | None = None) -> int:
    """``value`` as a sample count (``fedmnist.exchange.check_num_examples``), refused as a ``RejectedReply``."""
    from fedmnist import exchange

    return exchange.check_num_examples(value, source, expected, error=RejectedReply)


def check_weights(weights, source: str) -> list[np.ndarray]:
    """The shared CNN's finite float32 weights (``fedmnist.exchange.check_weights``), else ``RejectedReply``."""
    from fedmnist import exchange

    return exchange.check_weights(weights, source, error=RejectedReply)


def check_reply(
    reply: Reply, start_sha256: str, expected_counts: Mapping[int, int] | None = None
) -> list[str]:
    """Refuse a reply the round cannot use; return warnings about what cannot be verified.

    Raises
    ------
    RejectedReply
        Bad client id, sample count, weights or start weights; the message names ``reply.label``.
    """
    label = reply.label
    check_int(reply.client_id, f"{reply.source}: client id", 1, numpy=True, error=RejectedReply)
    expected = None
    if expected_counts is not None:
        if reply.client_id not in expected_counts:
            raise RejectedReply(f"{label}: this client is not in the federation manifest "
                                f"(clients {min(expected_counts)}..{max(expected_counts)})")
        expected = expected_counts[reply.client_id]
    reply.num_examples = check_num_examples(reply.num_examples, label, expected)
    reply.weights = check_weights(reply.weights, label)
    if reply.control_delta is not None:
        reply.control_delta = check_weights(reply.control_delta, f"{label}, control-variate delta")
    if reply.start_sha256 is None:
        return [f"{label}: bare list of weights: its round and starting point cannot be verified"]
    if reply.start_sha256 != start_sha256:
        raise RejectedReply(
            f"{label}: trained from global weights {str(reply.start_sha256)[:12]}, but this round's are "
            f"{start_sha256[:12]}. Averaging networks trained from different starting points gives "
            "chance-level accuracy (about 10% on MNIST), because their hidden units are not aligned: "
            "every member must train from the round's pesos_globales_ronda_R.pkl"
        )
    return []


def _finite(weights: Sequence[np.ndarray], state) -> bool:
    """Whether the weights and every array or number in ``state`` are finite."""
    if not all(np.isfinite(w).all() for w in weights):
        return False
    pending = [state]
    while pending:
        item = pending.pop()
        if isinstance(item, dict):
            pending.extend(item.values())
        elif isinstance(item, (list, tuple)):
            pending.extend(item)
        elif isinstance(item, np.ndarray) and np.issubdtype(item.dtype, np.floating) and not np.isfinite(item).all():
            return False
        elif isinstance(item, float) and not math.isfinite(item):
            return False
    return True


def dominant_clients(replies: Sequence[Reply]) -> list[str]:
    """Warnings for clients whose sample count outweighs the rest of the round (see ``DOMINANT_SHARE``)."""
    if len(replies) < 2:
        return []
    total = float(sum(r.num_examples for r in replies))
    threshold = min(DOMINANT_SHARE, 3.0 / len(replies))
    return [
        f"{r.label}: claims {r.num_examples} of the round's {int(total)} examples "
        f"({r.num_examples / total:.0%}, above {threshold:.0%}): it dominates the weighted average"
        for r in replies if r.num_examples / total > threshold
    ]


# --- what the server records ------------------------------------------------------------------


@dataclass(frozen=True)
class RoundRecord:
    """One method's numbers for one round, the row of ``metricas_por_ronda.csv`` in every mode.

    Test metrics are None in rounds that were not evaluated. ``train_loss`` is the mean over the
    accepted replies of their last local epoch's loss. ``seconds`` is what the method alone took (its
    clients' training, shared with the methods that started from the same weights, its aggregation
    and evaluation); ``round_seconds`` the whole round. ``sampled_clients`` are client ids (empty in
    Flower, which samples nodes: ``sampled_nodes``); ``failed`` names every client or node that was
    sampled but contributed nothing, with the reason. ``start_sha256`` is a prefix of the hash of the
    global weights the round started from. ``epsilon``/``delta``: the privacy spent so far under
    DP-FedAvg (None without it).
    """

    round: int
    method: str
    test_accuracy: float | None
    test_loss: float | None
    train_loss: float | None
    seconds: float
    train_seconds: float
    eval_seconds: float
    round_seconds: float
    mu: float
    num_sampled: int
    num_replies: int
    sampled_clients: list[int]
    replied_clients: list[int]
    malicious_sampled: list[int]
    sampled_nodes: list[int]
    failed: list[str]
    notes: list[str]
    start_sha256: str
    epsilon: float | None = None
    delta: float | None = None

    def comparable(self) -> dict:
        """Every field but the timings: equal for two runs with the same config."""
        return {k: v for k, v in asdict(self).items() if not k.endswith("seconds")}

    @classmethod
    def from_dict(cls, values: Mapping) -> RoundRecord:
        """Rebuild a record from ``asdict`` output (a checkpoint's); TypeError/KeyError if malformed."""
        names = [f.name for f in fields(cls)]
        if set(values) != set(names):
            differ = sorted(str(k) for k in set(names) ^ set(values))
            raise KeyError(f"{len(differ)} fields differ from a round record's, e.g. {quote(', '.join(differ[:3]), 80)}")
        return cls(**{n: values[n] for n in names})


def _charged_anyway(why: str) -> str:
    """The note of a DP round run below the minimum of replies instead of being aborted."""
    return (f"{why}: under DP the round runs anyway and counts towards epsilon (aborting it would reveal, "
            "uncharged, how many replies were valid)")


@dataclass
class ServerState:
    """Everything the server carries between rounds: what a checkpoint saves and ``--resume`` restores.

    ``round`` is the number of completed rounds; ``weights`` and ``method_state`` are per method.
    ``client_state`` is what an in-process simulation keeps for its simulated clients between rounds
    (SCAFFOLD's ``c_i``: method -> client id -> arrays, only for clients that have trained); the other
    modes leave it empty, their clients keep their own.
    """

    round: int
    weights: dict[str, list[np.ndarray]]
    method_state: dict[str, dict]
    history: list[RoundRecord] = field(default_factory=list)
    client_state: dict[str, dict[int, list[np.ndarray]]] = field(default_factory=dict)

    @classmethod
    def initial(cls, methods: Sequence[Method], weights: list[np.ndarray], round_: int = 0) -> ServerState:
        """Every method starting from ``weights`` after ``round_`` completed rounds."""
        return cls(round_, {m.name: list(weights) for m in methods}, {m.name: m.initial_state() for m in methods})


@dataclass
class StepResult:
    """What one ``Server.step`` did: the record, the new weights and evaluation, the accepted replies."""

    record: RoundRecord
    weights: list[np.ndarray]
    evaluation: object | None
    accepted: list[Reply]
    rejected: dict[str, str]
    warnings: list[str]


class Server:
    """Holds the ``ServerState`` and runs the validate → aggregate → evaluate → record step.

    ``evaluate`` maps global weights to an ``EvalResult`` on the common test set (None: never
    evaluate). ``expected_counts`` are the manifest's sample counts by client id, when known. Without
    them a client's claimed count is only bounded; ``max_count_ratio`` R then caps every claim at R
    times the round's median claim (a minority of liars cannot move the median), so no client can
    buy the weighted average with a large number.
    """

    def __init__(
        self,
        methods: Sequence[Method],
        state: ServerState,
        evaluate: Callable[[list[np.ndarray]], object] | None = None,
        expected_counts: Mapping[int, int] | None = None,
        max_count_ratio: float | None = None,
    ) -> None:
        if max_count_ratio is not None and not (isinstance(max_count_ratio, (int, float))
                                                and math.isfinite(max_count_ratio) and max_count_ratio >= 1):
            raise ConfigError(f"--max-count-ratio must be a number >= 1 (got {max_count_ratio!r})")
        self.max_count_ratio = max_count_ratio
        self.methods = {m.name: m for m in methods}
        missing = set(self.methods) - set(state.weights)
        if missing:
            raise ValueError(f"the server state has no weights for {', '.join(sorted(missing))}")
        self.state = state
        self.evaluate = evaluate
        self.expected_counts = dict(expected_counts) if expected_counts else None
        self._checked: dict[tuple[int, str], tuple[Reply, list[str] | str]] = {}

    def weights(self, method: str) -> list[np.ndarray]:
        """The current global weights of ``method``."""
        return self.state.weights[method]

    def start_sha256(self, method: str) -> str:
        """Hash of ``method``'s current global weights, which every reply must have started from."""
        from fedmnist.model import weights_sha256

        return weights_sha256(self.state.weights[method])

    def validate(self, replies: Sequence[Reply], start_sha256: str) -> tuple[list[Reply], dict[str, str], list[str]]:
        """Split ``replies`` into accepted and rejected (label -> reason), with warnings.

        A reply shared by several methods with the same start is checked once per round. A client id
        claimed by several valid replies is refused in all of them: which one is genuine cannot be told
        here, and keeping the first would let whoever sorts first win (Flower binds ids to nodes first).
        """
        accepted, rejected, warnings = [], {}, []
        valid: list[tuple[Reply, list[str]]] = []
        for reply in replies:
            key = (id(reply), start_sha256)  # the cache holds the reply, so its id cannot be reused
            if key not in self._checked:
                try:
                    self._checked[key] = (reply, check_reply(reply, start_sha256, self.expected_counts))
                except RejectedReply as exc:
                    self._checked[key] = (reply, str(exc))
            outcome = self._checked[key][1]
            if isinstance(outcome, str):
                rejected[reply.label] = outcome
            else:
                valid.append((reply, outcome))
        sources: dict[int, list[str]] = {}
        for reply, _ in valid:
            sources.setdefault(int(reply.client_id), []).append(reply.source)
        for reply, outcome in valid:
            claimants = sources[int(reply.client_id)]
            if len(claimants) > 1:
                others = ", ".join(s for s in claimants if s != reply.source) or reply.source
                rejected[reply.label] = (f"{reply.label}: client id {reply.client_id} appears twice (also in "
                                         f"{others}); every reply claiming it is refused")
                continue
            accepted.append(reply)
            warnings.extend(outcome)
        return accepted, rejected, warnings

    def step(
        self,
        round_: int,
        method: str,
        replies: Sequence[Reply],
        *,
        sampled_clients: Sequence[int] = (),
        sampled_nodes: Sequence[int] = (),
        failed: Mapping[str, str] | None = None,
        malicious_sampled: Sequence[int] = (),
        min_replies: int = 1,
        strict: bool = False,
        evaluate: bool = True,
        train_seconds: float = 0.0,
        round_started: float | None = None,
    ) -> StepResult:
        """Validate, aggregate, evaluate and record ``method``'s round ``round_``.

        ``failed`` lists clients or nodes that never produced a reply (label -> reason). With
        ``strict`` the first rejected reply raises ``RejectedReply``; otherwise it counts as failed.
        With ``min_replies=0`` a round where nothing was accepted keeps the global weights unchanged
        (the simulation's choice: one bad round must not end a long run).

        Raises
        ------
        RejectedReply
            With ``strict``, for the first reply refused.
        RoundFailedError
            Fewer than ``min_replies`` accepted replies (the state is left unchanged); never for a method
            that ``releases_every_round`` (DP-FedAvg), whose round runs and is charged with a note.
        AggregationError
            The rule rejects the accepted replies (e.g. Krum with n <= 2f + 2).
        """
        rule = self.methods[method]
        start_sha = self.start_sha256(method)
        accepted, rejected, warnings = self.validate(replies, start_sha)
        for reply in list(accepted):
            why = rule.refuse(reply, self.state.weights[method], self.state.method_state[method])
            if why:
                accepted.remove(reply)
                rejected[reply.label] = f"{reply.label}: {why}"
        if strict and rejected:
            raise RejectedReply(next(iter(rejected.values())))
        for why in rejected.values():
            log.warning("round %d, %s: refused %s", round_, method, why)
        accepted.sort(key=lambda r: r.client_id)
        failures = [f"{k}: {v}" for k, v in (failed or {}).items()] + list(rejected.values())
        if len(accepted) < min_replies:
            why = f"only {len(accepted)} accepted replies, {min_replies} needed"
            if not rule.releases_every_round:
                raise RoundFailedError(f"round {round_} ({method}): {why}"
                                       + (f"; failed: {'; '.join(failures)}" if failures else ""))
            warnings.append(_charged_anyway(why))
        warnings += dominant_clients(accepted)
        counts = [r.num_examples for r in accepted]
        if self.max_count_ratio is not None and accepted:
            cap = int(min(self.max_count_ratio * float(np.median(counts)), MAX_NUM_EXAMPLES))
            for i, reply in enumerate(accepted):
                if counts[i] > cap:
                    warnings.append(f"{reply.label}: weighted as {cap} examples, not the {counts[i]} it claims "
                                    f"(capped at {self.max_count_ratio:g} x the round's median)")
                    counts[i] = cap
        for warning in warnings:
            log.warning("round %d, %s: %s", round_, method, warning)
        t0 = time.perf_counter()
        num_sampled = len(sampled_clients) or len(sampled_nodes) or len(replies)
        aggregated = None
        if accepted:
            context = RoundContext(round_, num_sampled, tuple(r.label for r in accepted),
                                   tuple(r.metrics.get("unclipped") for r in accepted),
                                   tuple(r.control_delta for r in accepted))
            aggregated = self._finite_or_none(round_, method, rule.aggregate(
                self.state.weights[method], [(r.weights, n) for r, n in zip(accepted, counts)],
                self.state.method_state[method], context), warnings)
        else:  # min_replies == 0: nothing usable came back
            aggregated = self._empty_round(round_, method, num_sampled, "no accepted reply", warnings)
        losses = [r.train_loss for r in accepted if r.train_loss is not None]
        record, weights, evaluation = self._conclude(
            round_, method, start_sha, aggregated, t0, warnings, num_sampled=num_sampled,
            replied_clients=[int(r.client_id) for r in accepted],
            train_loss=float(np.mean(losses)) if losses else None, failures=failures,
            sampled_clients=sampled_clients, sampled_nodes=sampled_nodes, malicious_sampled=malicious_sampled,
            evaluate=evaluate, train_seconds=train_seconds, round_started=round_started)
        return StepResult(record, weights, evaluation, accepted, rejected, warnings)

    def step_secure(
        self,
        round_: int,
        method: str,
        agg: SecureAggregate | None,
        *,
        replied_clients: Sequence[int] = (),
        sampled_clients: Sequence[int] = (),
        sampled_nodes: Sequence[int] = (),
        failed: Mapping[str, str] | None = None,
        malicious_sampled: Sequence[int] = (),
        min_replies: int = 1,
        evaluate: bool = True,
        train_loss: float | None = None,
        train_seconds: float = 0.0,
        round_started: float | None = None,
    ) -> StepResult:
        """``step`` for a secure round: aggregate, evaluate and record ``method``'s round from the one
        ``SecureAggregate`` that unmasking gave (``secure_aggregation``), never from individual replies.

        ``agg`` None: nothing was unmasked (too few members survived), which counts as a round without
        accepted replies; so does an aggregate the method refuses (a member that did not clip under DP). ``replied_clients``: the contributors' client ids when the mode knows them
        (empty, or exactly ``agg.num_contributors`` of them). ``train_loss``: the round's mean training loss
        as the mode aggregated it, or None. The record has ``step``'s fields, ``num_replies`` = the
        contributors and nothing about any one update (a note counts the coordinates saturated at the
        quantisation range, all members together); the result's ``accepted`` and ``rejected`` are empty. A
        non-finite aggregate, or one whose step is not finite, is not adopted.

        Raises
        ------
        ConfigError
            ``method`` must see individual replies, or the server caps counts (``max_count_ratio``).
        SecureAggregationError
            ``agg`` does not fit the global model, or ``replied_clients`` does not match its contributors.
        RoundFailedError
            Fewer than ``min_replies`` contributors (the state is left unchanged); never for a method that
            ``releases_every_round`` (DP-FedAvg), whose round runs and is charged with a note.
        """
        from fedmnist.secure_aggregation import SecureAggregationError

        rule = self.methods[method]
        rule.secure_composition(self.max_count_ratio)
        start_sha = self.start_sha256(method)
        current = self.state.weights[method]
        contributors = 0 if agg is None else agg.num_contributors
        if agg is not None and [np.shape(u) for u in agg.update_sum] != [np.shape(w) for w in current]:
            raise SecureAggregationError(f"round {round_} ({method}): the secure aggregate has layers "
                                         f"{[np.shape(u) for u in agg.update_sum]}, the global model "
                                         f"{[np.shape(w) for w in current]}")
        if replied_clients and len(replied_clients) != contributors:
            raise SecureAggregationError(f"round {round_} ({method}): {len(replied_clients)} replied clients for "
                                         f"{contributors} contributors to the secure aggregate")
        failures = [f"{k}: {v}" for k, v in (failed or {}).items()]
        warnings: list[str] = []
        if contributors < min_replies:
            why = f"only {contributors} members in the secure aggregate, {min_replies} needed"
            if not rule.releases_every_round:
                raise RoundFailedError(f"round {round_} ({method}): {why}"
                                       + (f"; failed: {'; '.join(failures)}" if failures else ""))
            warnings.append(_charged_anyway(why))
            log.warning("round %d, %s: %s", round_, method, warnings[-1])
        if agg is not None and agg.saturated:
            warnings.append(f"{agg.saturated} coordinates of the members' updates (or control-variate deltas) lay "
                            "beyond the quantisation range and were aggregated saturated: raise secagg-clip-range "
                            "(or secagg-control-range)")
            log.warning("round %d, %s: %s", round_, method, warnings[-1])
        t0 = time.perf_counter()
        num_sampled = len(sampled_clients) or len(sampled_nodes) or contributors
        aggregated = None
        if agg is None:  # min_replies == 0: nothing was unmasked
            aggregated = self._empty_round(round_, method, num_sampled, "no secure aggregate", warnings)
        elif not _finite(agg.update_sum, agg.control_delta_sum):
            aggregated = self._not_adopted(round_, method, warnings)
        else:
            context = RoundContext(round_, num_sampled)
            try:
                step = rule.aggregate_sum(current, agg, self.state.method_state[method], context)
            except SecureAggregationError:  # an aggregate encoded for another method: a set-up error, not the data's
                raise
            except ValidationError as exc:  # e.g. a member that did not clip under DP: the sum cannot be used,
                step = None                 # and nobody can tell whose it was, so the whole round is refused
                log.warning("round %d, %s: the secure aggregate of round %d was refused (%s)", round_, method,
                            round_, exc)
                aggregated = self._empty_round(round_, method, num_sampled,
                                               f"the secure aggregate of round {round_} was refused ({exc})", warnings)
            if step is not None:
                aggregated = self._finite_or_none(round_, method, step, warnings)
        record, weights, evaluation = self._conclude(
            round_, method, start_sha, aggregated, t0, warnings, num_sampled=num_sampled,
            replied_clients=[int(k) for k in replied_clients], train_loss=train_loss, failures=failures,
            sampled_clients=sampled_clients, sampled_nodes=sampled_nodes, malicious_sampled=malicious_sampled,
            evaluate=evaluate, train_seconds=train_seconds, round_started=round_started,
            num_replies=contributors)
        return StepResult(record, weights, evaluation, [], {}, warnings)

    def _empty_round(self, round_: int, method: str, num_sampled: int, why: str,
                     warnings: list[str]) -> tuple[list[np.ndarray], dict] | None:
        """A round without a usable update: the method's ``empty_round`` (None: weights and state unchanged;
        DP-FedAvg releases the noise alone and counts the round), with a note saying which."""
        rule = self.methods[method]
        step = rule.empty_round(self.state.weights[method], self.state.method_state[method],
                                RoundContext(round_, num_sampled))
        if step is None:
            warnings.append(f"{why}: {method}'s global weights and state are unchanged")
            return None
        warnings.append(f"{why}: {method} released its noise alone, and the round counts towards epsilon")
        return self._finite_or_none(round_, method, step, warnings)

    def _not_adopted(self, round_: int, method: str, warnings: list[str]) -> tuple[list[np.ndarray], dict] | None:
        """The current weights and the method's ``unadopted_state`` (None when that is the state as it was)."""
        warnings.append(f"the aggregate of round {round_} is not finite: {method}'s global weights are unchanged")
        log.warning("round %d, %s: %s", round_, method, warnings[-1])
        state = self.state.method_state[method]
        charged = self.methods[method].unadopted_state(state)
        return None if charged is state else (self.state.weights[method], charged)

    def _finite_or_none(self, round_: int, method: str, aggregated: tuple[list[np.ndarray], dict],
                        warnings: list[str]) -> tuple[list[np.ndarray], dict] | None:
        """The method's (weights, state) when finite; else the weights unchanged and the state as the method
        says for an unadopted step (``_not_adopted``): finite replies can still overflow (a huge update, a
        server optimiser's moments), and the server never adopts a model or a state it could not resume from."""
        if _finite(*aggregated):
            return aggregated
        return self._not_adopted(round_, method, warnings)

    def _conclude(
        self, round_: int, method: str, start_sha: str, aggregated: tuple[list[np.ndarray], dict] | None,
        started: float, warnings: list[str], *, num_sampled: int, replied_clients: list[int],
        train_loss: float | None, failures: list[str], sampled_clients: Sequence[int],
        sampled_nodes: Sequence[int], malicious_sampled: Sequence[int], evaluate: bool, train_seconds: float,
        round_started: float | None, num_replies: int | None = None,
    ) -> tuple[RoundRecord, list[np.ndarray], object | None]:
        """The tail every round shares: adopt ``aggregated`` (None: keep the current weights and state),
        evaluate, record. ``started``: when aggregation began; ``num_replies`` defaults to the replied clients."""
        rule = self.methods[method]
        if aggregated is None:
            weights, state = self.state.weights[method], self.state.method_state[method]
        else:
            weights, state = aggregated
        aggregate_seconds = time.perf_counter() - started
        evaluation = None
        t0 = time.perf_counter()
        if evaluate and self.evaluate is not None:
            evaluation = self.evaluate(weights)
        eval_seconds = time.perf_counter() - t0
        privacy = rule.privacy(state)
        record = RoundRecord(
            round=round_,
            method=method,
            test_accuracy=None if evaluation is None else float(evaluation.accuracy),
            test_loss=None if evaluation is None else float(evaluation.loss),
            train_loss=train_loss,
            seconds=train_seconds + aggregate_seconds + eval_seconds,
            train_seconds=train_seconds,
            eval_seconds=eval_seconds,
            round_seconds=(time.perf_counter() - round_started) if round_started is not None else 0.0,
            mu=rule.client_mu,
            num_sampled=num_sampled,
            num_replies=len(replied_clients) if num_replies is None else num_replies,
            sampled_clients=[int(k) for k in sampled_clients],
            replied_clients=replied_clients,
            malicious_sampled=[int(k) for k in malicious_sampled],
            sampled_nodes=[int(n) for n in sampled_nodes],
            failed=failures,
            notes=warnings,
            start_sha256=start_sha[:16],
            epsilon=None if privacy is None else privacy[0],
            delta=None if privacy is None else privacy[1],
        )
        self.state.weights[method] = weights
        self.state.method_state[method] = state
        self.state.history.append(record)
        return record, weights, evaluation

    def end_round(self, round_: int, round_seconds: float | None = None) -> list[RoundRecord]:
        """Close ``round_``: stamp the whole round's duration on its records and count it as completed."""
        from dataclasses import replace

        self.state.round = round_
        self._checked.clear()
        order = {name: i for i, name in enumerate(self.methods)}
        earlier = [r for r in self.state.history if r.round != round_]
        rows = sorted((r for r in self.state.history if r.round == round_), key=lambda r: order[r.method])
        if round_seconds is not None:
            rows = [replace(r, round_seconds=round_seconds) for r in rows]
        self.state.history = earlier + rows
        return rows

    def history(self, method: str) -> list[RoundRecord]:
        """The records of ``method``, in round order."""
        return [r for r in self.state.history if r.method == method]


def rounds_to_target(rows: Sequence[RoundRecord], target: float) -> int | None:
    """The first round whose test accuracy reaches ``target``, or None (``fedmnist.curves.first_round``)."""
    from fedmnist.curves import first_round

    return first_round({r.round: r.test_accuracy for r in rows if r.test_accuracy is not None}, target)
