"""The multi-round loop the simulation and the Flower ServerApp share.

A round, whatever carries the messages:

1. **stop?** every method reached the target accuracy (when asked), or one more round would take
   some method's ε above the target ε (``privacy_budget_spent``);
2. **sample** the round's clients from the candidates (client ids, or the connected nodes' ids):
   ``sample_round`` draws ⌊C·n⌋ without replacement, or, under DP-FedAvg with Poisson sampling, each
   candidate with probability q = m/K; seeded by (seed, round) over the sorted ids, or secret
   (the operating system's entropy) when the DP noise is unseeded, as a deployment needs;
3. **send instructions, gather replies**: the methods' instructions (start weights, μ, clip, SCAFFOLD's
   ``c``) are grouped into ``Batch``es — methods that would send identical instructions share one
   set of trainings — and handed to the mode's ``Clients`` (in-process executors, Flower's Grid);
4. **step** every method through ``Server.step`` (a secure batch, ``LoopConfig.secure``: through
   ``Server.step_secure`` on the one ``SecureAggregate`` the mode unmasked), then ``Server.end_round``;
5. **write** the round's files and the checkpoint of the ``ServerState`` together (``RoundWriter``,
   one ``fedmnist.io.OutputSet``), so a run killed at any moment resumes from its last complete round.

DP-FedAvg's set-up (wrapping the methods, the accountant, the target-ε pre-check) lives here too
(``with_dp``, ``check_privacy_target``). The file flow (one command per round) uses ``with_dp``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

from fedmnist.io import OutputSet
from fedmnist.methods import DPMethod, Method, with_privacy
from fedmnist.seeds import SAMPLING, sample_positions
from fedmnist.server import Reply, RoundRecord, Server, ServerState, rounds_to_target

if TYPE_CHECKING:
    from fedmnist.client import Instructions
    from fedmnist.privacy import DPConfig
    from fedmnist.secure_aggregation import SecAggConfig, SecureAggregate

log = logging.getLogger(__name__)


# --- DP-FedAvg's set-up -------------------------------------------------------------------------


def with_dp(methods: Sequence[Method], dp: DPConfig | None, num_clients: int, clients_per_round: int,
            seed: int | None) -> list[Method]:
    """``methods`` wrapped in DP-FedAvg for K = ``num_clients``, m = ``clients_per_round`` (unchanged without ``dp``).

    ``seed`` None draws the noise from the operating system (a deployment); an integer makes it
    reproducible, and predictable to whoever knows it (the simulation, tests).
    """
    if dp is None:
        return list(methods)
    return [with_privacy(m, dp, num_clients, clients_per_round, seed) for m in methods]


def _releases(state: ServerState, name: str) -> int:
    return int(state.method_state[name]["releases"])


def check_privacy_target(methods: Sequence[Method], state: ServerState, target_epsilon: float | None) -> None:
    """ConfigError when a DP method cannot honour ``target_epsilon`` from ``state`` (already spent, or
    exceeded by a new run's first round); no-op without a target."""
    if target_epsilon is None:
        return
    for method in methods:
        if isinstance(method, DPMethod):
            method.accountant.check_target(target_epsilon, _releases(state, method.name))


def privacy_budget_spent(methods: Sequence[Method], state: ServerState, target_epsilon: float | None) -> bool:
    """Whether one more round would take some method's ε above ``target_epsilon`` (None: never)."""
    if target_epsilon is None:
        return False
    return any(m.accountant.would_exceed(target_epsilon, _releases(state, m.name))
               for m in methods if isinstance(m, DPMethod))


def poisson_rate(methods: Sequence[Method]) -> float | None:
    """q = m/K when the run's DP accountant assumes Poisson sampling, else None (sample without replacement)."""
    for method in methods:
        if isinstance(method, DPMethod) and method.accountant.sampling == "poisson":
            return method.accountant.sampling_rate
    return None


# --- sampling -----------------------------------------------------------------------------------


def sample_round(candidates: Sequence[int], fraction: float, round_: int, seed: int | None,
                 rate: float | None = None) -> list[int]:
    """The sorted ids of ``round_``'s clients among ``candidates`` (client or node ids).

    Without ``rate``: ``max(1, ⌊C·n⌋)`` of the n candidates without replacement; with ``rate`` q
    (Poisson, DP-FedAvg): each candidate independently with probability q, possibly none. Drawn
    from ``np.random.default_rng([seed, SAMPLING, round_])`` over the sorted ids (the same clients in
    every mode, and after a restart), or from the operating system when ``seed`` is None (DP-FedAvg
    with unseeded noise: a sample nobody can predict, the sampling the accountant assumes).
    """
    ids = sorted(int(c) for c in candidates)
    if rate is not None:
        from fedmnist.privacy import poisson_sample

        rng = np.random.default_rng([seed, SAMPLING, round_] if seed is not None else None)
        return [ids[p] for p in poisson_sample(len(ids), rate, rng)]
    if seed is None:
        from fedmnist.seeds import clients_per_round

        chosen = np.random.default_rng().choice(len(ids), size=clients_per_round(len(ids), fraction), replace=False)
        return sorted(ids[int(p)] for p in chosen)
    return [ids[p] for p in sample_positions(len(ids), fraction, seed, round_)]


# --- send instructions, gather replies ------------------------------------------------------------


@dataclass(frozen=True)
class Batch:
    """One set of instructions for the round's clients, and the methods whose step takes the replies.

    ``instructions`` come from the methods' ``Method.instructions`` (identical for every method of the
    batch); a SCAFFOLD batch serves its method alone, as its clients keep a state of that method.
    """

    methods: tuple[str, ...]
    start: list[np.ndarray]
    start_sha256: str
    instructions: Instructions


@dataclass
class Gathered:
    """What came back for one ``Batch``: the replies and the clients or nodes that gave none (label -> why).

    A secure batch has no replies: ``secure_aggregate`` is what unmasking gave (None: the protocol aborted)
    and ``contributors`` the client ids in it when the mode knows them (the simulation; Flower does not).
    """

    replies: list[Reply]
    failed: dict[str, str] = field(default_factory=dict)
    train_seconds: float = 0.0
    secure_aggregate: SecureAggregate | None = None
    contributors: list[int] = field(default_factory=list)


class Clients(Protocol):
    """Where a mode's clients are: the loop's only view of them."""

    def candidates(self, round_: int) -> list[int]:
        """The ids a round samples from (client ids 1..K, or the connected nodes)."""

    def exchange(self, round_: int, sampled: list[int], batches: list[Batch]) -> list[Gathered]:
        """Send every batch's instructions to the ``sampled`` clients and gather their replies, in order."""

    def record_fields(self, sampled: list[int]) -> dict:
        """The ``Server.step`` keywords naming the sample (``sampled_clients``… or ``sampled_nodes``)."""


def secure_encoding(server: Server, name: str, secure: SecAggConfig, seed: int):
    """The ``SecureEncoding`` method ``name``'s clients encode with (ConfigError if it cannot run on a sum)."""
    from fedmnist.secure_aggregation import SecureEncoding

    composition = server.methods[name].secure_composition(server.max_count_ratio)
    return SecureEncoding.for_method(secure, composition, server.weights(name), seed)


def check_secure_aggregation(server: Server, secure: SecAggConfig | None, seed: int,
                             num_sampled: int | None) -> None:
    """ConfigError, before round 1, when a method cannot run on a masked sum (with why) or the settings cannot
    work with ``num_sampled`` nodes a round (None: not known yet, checked every round); no-op without ``secure``."""
    if secure is None:
        return
    for name in server.methods:
        encoding = secure_encoding(server, name, secure, seed)
        if num_sampled is not None:
            secure.for_sample(num_sampled, encoding.layout)


def instruction_batches(server: Server, round_: int, secure: SecAggConfig | None = None,
                        seed: int = 0) -> list[Batch]:
    """The round's instructions, one ``Batch`` per distinct (start, μ, clip, secure encoding), SCAFFOLD's alone.

    With ``secure`` every method's instructions carry its ``SecureEncoding`` (``seed``: the run's)."""
    batches: dict[tuple, Batch] = {}
    for name, method in server.methods.items():
        told = method.instructions(server.state.method_state[name], server.weights(name), round_)
        if secure is not None:
            told = replace(told, secure=secure_encoding(server, name, secure, seed))
        key = (server.start_sha256(name), told.mu, told.clip, name if told.scaffold else None,
               None if told.secure is None else told.secure.layout.composition)
        if key in batches:
            batches[key] = replace(batches[key], methods=(*batches[key].methods, name))
        else:
            batches[key] = Batch((name,), server.weights(name), key[0], told)
    return list(batches.values())


# --- one writer per round ---------------------------------------------------------------------------


@dataclass
class RoundWriter:
    """Writes a completed round's files and the checkpoint of the server state as one ``OutputSet``.

    ``checkpoint`` gives the checkpoint's bytes for a state (``fedmnist.checkpoint.state_bytes``);
    ``files`` stages the mode's own files of the round (the simulation's configuration, Flower's
    round weights and models); ``discard`` names an earlier run's final files, dropped with the
    first round a fresh run writes.
    """

    out: Path
    what: str
    checkpoint: Callable[[ServerState], bytes]
    files: Callable[[OutputSet, ServerState, list[RoundRecord]], None] | None = None
    metrics_extra: Mapping | None = None
    discard: list[str] = field(default_factory=list)

    def write(self, state: ServerState, rows: list[RoundRecord]) -> None:
        """Stage the checkpoint, the per-round metrics and the mode's files; they appear together."""
        from fedmnist import outputs
        from fedmnist.checkpoint import CHECKPOINT_FILE

        with OutputSet(self.out, self.what) as staged:
            staged.write_bytes(CHECKPOINT_FILE, self.checkpoint(state))
            outputs.write_metrics(staged, state.history, self.metrics_extra)
            if self.files is not None:
                self.files(staged, state, rows)
            for name in self.discard:
                staged.discard(name)
        self.discard = []


# --- the loop -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoopConfig:
    """How the loop runs: rounds (the last one), C, the seed, whether sampling is secret, the accepted
    replies a round needs (0: a round without any keeps the weights), evaluation cadence, stops, and
    secure aggregation's settings (None: plain rounds)."""

    rounds: int
    fraction: float
    seed: int
    secret_sampling: bool = False
    min_replies: int = 0
    eval_every: int = 1
    target_accuracy: float | None = None
    target_epsilon: float | None = None
    secure: SecAggConfig | None = None


def stop_reason(methods: Sequence[Method], state: ServerState, config: LoopConfig, round_: int) -> str | None:
    """Why ``round_`` must not run after ``state`` (a log line), or None."""
    if config.target_accuracy is not None and all(
            rounds_to_target([r for r in state.history if r.method == m.name], config.target_accuracy) is not None
            for m in methods):
        return f"every method reached {config.target_accuracy:.4f} by round {round_ - 1}: stopping early"
    if privacy_budget_spent(methods, state, config.target_epsilon):
        return f"round {round_} would exceed the target epsilon {config.target_epsilon:g}: stopping"
    return None


def finished(methods: Sequence[Method], state: ServerState, config: LoopConfig) -> bool:
    """Whether no round is left to run after ``state`` (a resumed run then needs no clients)."""
    return state.round >= config.rounds or stop_reason(methods, state, config, state.round + 1) is not None


def run_round(server: Server, clients: Clients, config: LoopConfig, round_: int) -> list[RoundRecord]:
    """Sample, send, gather and step every method through ``round_``; returns the round's records."""
    started = time.perf_counter()
    rate = poisson_rate(list(server.methods.values()))
    sampled = sample_round(clients.candidates(round_), config.fraction, round_,
                           None if config.secret_sampling else config.seed, rate)
    batches = instruction_batches(server, round_, config.secure, config.seed)
    gathered = clients.exchange(round_, sampled, batches)
    evaluate_now = round_ % config.eval_every == 0 or round_ == config.rounds
    # a Poisson sample may hold fewer clients than the minimum (or none): its round still counts
    min_replies = config.min_replies if rate is None else min(config.min_replies, len(sampled))
    fields = clients.record_fields(sampled)
    for batch, got in zip(batches, gathered, strict=True):
        for name in batch.methods:
            if batch.instructions.secure is not None:
                server.step_secure(round_, name, got.secure_aggregate, replied_clients=got.contributors,
                                   failed=got.failed, min_replies=min_replies, evaluate=evaluate_now,
                                   train_seconds=got.train_seconds, round_started=started, **fields)
                continue
            server.step(round_, name, got.replies, failed=got.failed, min_replies=min_replies,
                        evaluate=evaluate_now, train_seconds=got.train_seconds, round_started=started, **fields)
    return server.end_round(round_, time.perf_counter() - started)


def run_rounds(server: Server, clients: Clients, config: LoopConfig, writer: RoundWriter,
               on_round: Callable[[int, list[RoundRecord]], None] | None = None) -> int:
    """Run rounds ``server.state.round + 1`` .. ``config.rounds`` until a stop; returns the last round run.

    After every round its files and checkpoint are written (``writer``), then ``on_round(round, rows)``.
    """
    for round_ in range(server.state.round + 1, config.rounds + 1):
        reason = stop_reason(list(server.methods.values()), server.state, config, round_)
        if reason:
            log.info(reason)
            break
        rows = run_round(server, clients, config, round_)
        writer.write(server.state, rows)
        if on_round is not None:
            on_round(round_, rows)
    return server.state.round
