"""Multi-round federated learning simulated in one process: every method on the same federation.

``run_simulation(config)`` splits MNIST's training set among K clients (``fedmnist.federation``),
then for R rounds samples ``max(1, ⌊C·K⌋)`` clients (``fedmnist.seeds``), trains each of them locally
from its method's global weights, and hands their replies to the shared server step
(``fedmnist.server.Server``), which validates, aggregates, evaluates and records them. This module is
the in-process adapter of the shared round loop (``fedmnist.rounds``): ``SimulatedClients`` trains the
sampled clients from the weights the loop hands it.

Every method keeps its own global model but all share the partition, the initial weights
(``initial_weights(seed)``), the clients sampled in round r, each client's training seed and the
malicious clients, so the methods are compared on equal terms, a run is reproducible bit for bit and
resuming needs no random state. Methods that start a round from identical weights with the same μ
(all of them in round 1) share one set of local trainings.

Outputs in ``out_dir`` (``fedmnist.outputs``): ``configuracion.json``, ``metricas_por_ronda.csv`` and
``.json``, ``precision_por_ronda.png``, ``resumen.json``, ``modelo_global_<method>.h5``,
``pesos_globales_<method>.pkl`` and ``checkpoint.pkl`` (``fedmnist.checkpoint``, rewritten after
every round; ``resume=True`` continues from it).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fedmnist.attacks import DATA_ATTACKS, ThreatConfig, attack_update, choose_malicious
from fedmnist.checkpoint import CHECKPOINT_FILE
from fedmnist.client import ClientState, Instructions
from fedmnist.config import DEFAULT_SEED, TrainingConfig, _is_int, _need
from fedmnist.errors import ConfigError, FedMnistError
from fedmnist.federation import Federation, FederationConfig, prepare_federation
from fedmnist.io import OutputSet, read_text_capped
from fedmnist.methods import DRIFT_CORRECTED, Method, MethodConfig, build_methods
from fedmnist.rounds import Batch, Gathered, LoopConfig, check_privacy_target, with_dp
from fedmnist.seeds import attack_rng, clients_per_round, malicious_rng, training_seed
from fedmnist.server import Reply, RoundRecord, Server, ServerState, rounds_to_target
from fedmnist.settings import default
from fedmnist.tasks import ClientTask, TaskFailure, WorkerData
from fedmnist.workers import ClientExecutor, InProcessExecutor, WorkerPool

if TYPE_CHECKING:
    from fedmnist.data import Mnist
    from fedmnist.privacy import DPConfig
    from fedmnist.secure_aggregation import SecAggConfig
    from fedmnist.training import ClientTrainer

log = logging.getLogger(__name__)

RESUMABLE_FIELDS = ("rounds", "target_accuracy", "stop_at_target")
"""Config fields a resumed run may change: they do not alter the rounds already completed (nor does
``privacy.target_epsilon``)."""

_COMPONENTS = {
    "federation": (FederationConfig, {"num_clients": "num_clients", "partition": "partition", "alpha": "alpha",
                                      "shards_per_client": "shards_per_client", "train_subset": "train_subset",
                                      "test_subset": "test_subset"}),
    "training": (TrainingConfig, {"local_epochs": "epochs", "batch_size": "batch_size", "optimizer": "optimizer",
                                  "learning_rate": "learning_rate", "momentum": "momentum"}),
    "method": (MethodConfig, {"methods": "methods", "mu": "mu", "trim_beta": "trim_beta", "krum_f": "krum_f",
                              "server_lr": "server_lr", "server_momentum": "server_momentum", "beta_1": "beta_1",
                              "beta_2": "beta_2", "tau": "tau"}),
    "threat": (ThreatConfig, {"num_malicious": "num_malicious", "attack": "attack",
                              "attack_strength": "attack_strength"}),
}
FLAT_FIELDS = {flat: (part, name) for part, (_, names) in _COMPONENTS.items() for flat, name in names.items()}
"""Flat setting name (CLI flag, preset field) -> (component, field)."""
PRIVACY_FIELDS = {"dp_noise": "noise_multiplier", "dp_clip": "clip", "dp_adaptive": "adaptive", "dp_side": "side",
                  "dp_delta": "delta", "target_epsilon": "target_epsilon", "dp_sampling": "sampling",
                  "dp_accountant": "accountant"}
"""Flat setting name -> field of ``fedmnist.privacy.DPConfig`` (the optional ``privacy`` component)."""
SECURE_FIELDS = {"secure_aggregation": "secure-aggregation", "secagg_num_shares": "secagg-num-shares",
                 "secagg_threshold": "secagg-threshold", "secagg_clip_range": "secagg-clip-range",
                 "secagg_control_range": "secagg-control-range", "secagg_bits": "secagg-bits",
                 "secagg_modulus": "secagg-modulus", "secagg_weight_bound": "secagg-weight-bound"}
"""Flat setting name -> run-config key of ``fedmnist.secure_aggregation.SecAggConfig`` (the optional
``secure`` component: present when secure aggregation is on)."""


@dataclass(frozen=True)
class SimulationConfig:
    """Everything that determines a simulation's numbers; saved as ``configuracion.json``.

    Composed of the federation, the clients' training, the methods and the threat, each validating
    its own fields, plus the run's own settings. ``create``/``replace`` take flat names
    (``num_clients``, ``local_epochs``, ``mu``…, see ``FLAT_FIELDS``). The defaults (``fedmnist.settings``)
    run on a laptop in minutes: 10 IID clients, all sampled, 10 rounds of every mode's local training
    (Adam, lr 10⁻³, 2 epochs of batches of 32), FedAvg, FedProx (μ = 0.01) and FedMed. ``PRESETS`` holds McMahan et al.'s setups.
    """

    federation: FederationConfig = field(default_factory=FederationConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    threat: ThreatConfig = field(default_factory=ThreatConfig)
    privacy: DPConfig | None = None
    secure: SecAggConfig | None = None
    fraction: float = default("fraction-train")
    rounds: int = default("rounds")
    target_accuracy: float = default("target-accuracy")
    eval_every: int = default("eval-every")
    stop_at_target: bool = default("stop-at-target")
    seed: int = DEFAULT_SEED
    local_steps: int | None = None
    """Minibatch steps every client takes per round (None: ``training.epochs`` whole epochs). Fixes the local
    work when the federation's size, and so each client's number of images, changes."""

    @classmethod
    def create(cls, **settings) -> SimulationConfig:
        """A config from flat settings over the defaults (``num_clients=100, local_epochs=5, …``)."""
        return cls().replace(**settings)

    def replace(self, **settings) -> SimulationConfig:
        """A copy with flat settings changed; ConfigError for unknown names."""
        from fedmnist.errors import ConfigError

        parts: dict[str, dict] = {}
        own = {}
        privacy: dict = {}
        secure: dict = {}
        own_names = {f.name for f in dataclasses.fields(self)} - set(_COMPONENTS) - {"privacy", "secure"}
        for key, value in settings.items():
            if key in SECURE_FIELDS:
                secure[SECURE_FIELDS[key]] = value
            elif key in PRIVACY_FIELDS:
                privacy[PRIVACY_FIELDS[key]] = value
            elif key in FLAT_FIELDS:
                part, name = FLAT_FIELDS[key]
                parts.setdefault(part, {})[name] = tuple(value) if key == "methods" and not isinstance(
                    value, str) else value
            elif key in own_names:
                own[key] = value
            else:
                raise ConfigError(f"unknown simulation setting '{key}'")
        for part, changes in parts.items():
            own[part] = dataclasses.replace(getattr(self, part), **changes)
        if privacy:
            from fedmnist.privacy import DPConfig

            merged = {**(self.privacy.to_dict() if self.privacy is not None else {}), **privacy}
            missing = [flag for flag, name in (("--dp-noise", "noise_multiplier"), ("--dp-clip", "clip"))
                       if merged.get(name) is None]
            if missing:
                raise ConfigError(f"differential privacy needs {' and '.join(missing)} "
                                  "(the noise multiplier z and the clip norm S)")
            own["privacy"] = DPConfig(**merged)
        if secure:
            from fedmnist.secure_aggregation import SecAggConfig

            current = {"secure-aggregation": False} if self.secure is None else {
                key: getattr(self.secure, name) for key, name in _secure_names().items()}
            merged_secure = SecAggConfig.from_settings({**current, **secure})
            own["secure"] = merged_secure if merged_secure.enabled else None
        return dataclasses.replace(self, **own)

    @property
    def clients_per_round(self) -> int:
        """``m = max(1, ⌊C·K⌋)``, the number of clients sampled every round (McMahan et al. 2017)."""
        return clients_per_round(self.federation.num_clients, self.fraction)

    @property
    def krum_f(self) -> int:
        """Krum's f: ``method.krum_f``, else min(attackers, the most Krum allows for m clients)."""
        if self.method.krum_f is not None:
            return self.method.krum_f
        return max(0, min(self.threat.num_malicious, (self.clients_per_round - 3) // 2))

    def validate(self) -> None:
        """Raise ConfigError (naming the value and the fix) for anything the simulation cannot run."""
        self.federation.validate()
        self.training.validate()
        self.method.validate()
        self.threat.validate(self.federation.num_clients)
        _need(isinstance(self.fraction, (int, float)) and 0 < self.fraction <= 1,
              f"the fraction of clients per round C must be in (0, 1] (got {self.fraction})")
        _need(_is_int(self.rounds) and self.rounds >= 1, f"the number of rounds must be an integer >= 1 (got {self.rounds!r})")
        _need(0 < self.target_accuracy <= 1, f"target accuracy must be in (0, 1] (got {self.target_accuracy})")
        _need(_is_int(self.eval_every) and self.eval_every >= 1, f"eval_every must be an integer >= 1 (got {self.eval_every!r})")
        _need(_is_int(self.seed) and self.seed >= 0, f"the seed must be an integer >= 0 (got {self.seed!r})")
        _need(self.local_steps is None or (_is_int(self.local_steps) and self.local_steps >= 1),
              f"local steps must be an integer >= 1 or None (got {self.local_steps!r})")
        self.method.check_clients(self.clients_per_round, self.krum_f)
        if any(m in DRIFT_CORRECTED for m in self.method.methods):
            from fedmnist.training import check_scaffold_optimizer

            check_scaffold_optimizer(self.training.optimizer, self.training.momentum)
        if self.privacy is not None:
            from fedmnist.privacy import check_dp_method

            for method in self.method.methods:
                check_dp_method(method)
            self.privacy.noise_params(self.clients_per_round)
        if self.secure is not None:
            from fedmnist.secure_aggregation import check_method_compatible

            for method in self.method.methods:  # before round 1, with why
                check_method_compatible(method, self.privacy)

    def to_dict(self) -> dict:
        """Plain, JSON-ready nested fields (``secure`` only when secure aggregation is on)."""
        out = asdict(self)
        out["method"]["methods"] = list(self.method.methods)
        out["privacy"] = self.privacy.to_dict() if self.privacy is not None else None
        if self.secure is None:
            del out["secure"]  # a plain run's settings, and so its checkpoints' hash, stay as they were
        if self.local_steps is None:
            del out["local_steps"]  # likewise for runs counted in whole epochs
        return out

    @classmethod
    def from_dict(cls, values: Mapping) -> SimulationConfig:
        """Rebuild a config from ``to_dict()`` output; ConfigError for unknown or malformed fields."""
        from fedmnist.errors import ConfigError
        from fedmnist.privacy import DPConfig

        try:
            parts = {name: kind(**values[name]) for name, (kind, _) in _COMPONENTS.items() if name in values}
            own = {k: v for k, v in values.items() if k not in _COMPONENTS and k not in ("privacy", "secure")}
            if values.get("privacy") is not None:
                own["privacy"] = DPConfig.from_dict(values["privacy"])
            if values.get("secure") is not None:
                from fedmnist.secure_aggregation import SecAggConfig

                own["secure"] = SecAggConfig(**values["secure"])
            return cls(**parts, **own)
        except TypeError as exc:
            raise ConfigError(f"malformed simulation settings ({exc})") from None

    def sha256(self) -> str:
        """Hash of every field that affects completed rounds (all but ``RESUMABLE_FIELDS``)."""
        payload = {k: v for k, v in self.to_dict().items() if k not in RESUMABLE_FIELDS}
        if payload["privacy"] is not None:  # the target ε only says when to stop, like ``rounds``
            payload["privacy"] = {k: v for k, v in payload["privacy"].items() if k != "target_epsilon"}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


_MCMAHAN = SimulationConfig.create(
    num_clients=100, fraction=0.1, rounds=50, local_epochs=5, batch_size=10, optimizer="sgd",
    learning_rate=0.05, momentum=0.0, partition="iid", target_accuracy=0.99,
)
PRESETS: dict[str, SimulationConfig] = {
    # McMahan et al. 2017, CNN on MNIST: 100 clients of 600 images, C = 0.1, E = 5, B = 10, plain SGD
    # (lr 0.05 without momentum is our choice; the paper tunes it). FedAvg reached 99% in about 20
    # rounds IID and 229 with the pathological non-IID split (2 shards of 300) (their Table 2).
    # One round takes about 25 s of local training per method in one process on 2 CPU cores, 10-20 s with
    # --workers 2 (plus ~0.6 s to evaluate on the 10,000 test images; resultados/simulaciones/mcmahan_*),
    # so pass --methods to pick what to compare.
    "mcmahan-iid": _MCMAHAN,
    "mcmahan-noniid": _MCMAHAN.replace(partition="shards", shards_per_client=2, rounds=300),
}
"""Named configurations; explicit CLI flags override their fields."""


@dataclass
class SimulationResult:
    """Per-method, per-round records of a simulation and what it wrote."""

    config: SimulationConfig
    metrics: dict[str, list[RoundRecord]]
    rounds_to_target: dict[str, int | None]
    final_accuracy: dict[str, float | None]
    final_weights: dict[str, list[np.ndarray]]
    malicious_clients: list[int]
    client_sizes: list[int]
    initial_sha256: str
    rounds_run: int = 0
    resumed_from_round: int = 0
    seconds: float = 0.0
    files: dict[str, Path] = field(default_factory=dict)

    def curves(self, key: str = "test_accuracy") -> dict[str, list[float]]:
        """``key`` per round for every method (NaN where not evaluated)."""
        return {
            m: [np.nan if getattr(r, key) is None else getattr(r, key) for r in rows]
            for m, rows in self.metrics.items()
        }


def _secure_names() -> dict[str, str]:
    from fedmnist.secure_aggregation import FIELDS

    return FIELDS


def sample_clients(config: SimulationConfig, round_: int) -> list[int]:
    """Ids (1..K, sorted) of the clients of ``round_``: drawn from a generator seeded by (seed, round).

    ⌊C·K⌋ without replacement, or, under DP-FedAvg with Poisson sampling, each client independently
    with probability q = ⌊C·K⌋/K (the event the accountant composes): ``fedmnist.rounds.sample_round``.
    """
    from fedmnist.rounds import sample_round

    num_clients = config.federation.num_clients
    poisson = config.privacy is not None and config.privacy.sampling == "poisson"
    return sample_round(range(1, num_clients + 1), config.fraction, round_, config.seed,
                        config.clients_per_round / num_clients if poisson else None)


def run_methods(config: SimulationConfig) -> list[Method]:
    """The run's methods, each wrapped in DP-FedAvg when ``config.privacy`` is set (``fedmnist.rounds.with_dp``)."""
    methods = build_methods(config.method, krum_f=config.krum_f, num_clients=config.federation.num_clients)
    return with_dp(methods, config.privacy, config.federation.num_clients, config.clients_per_round, config.seed)


def malicious_clients(config: SimulationConfig) -> list[int]:
    """Ids of the F malicious clients, fixed for the run (the first F of a seeded permutation)."""
    return choose_malicious(config.federation.num_clients, config.threat.num_malicious, malicious_rng(config.seed))


# --- the in-process clients ----------------------------------------------------------------------


def client_tasks(config: SimulationConfig, round_: int, clients: list[int], start: list[np.ndarray],
                 instructions: Instructions, malicious: set[int],
                 states: Mapping[int, list[np.ndarray]] | None = None) -> list[ClientTask]:
    """One ``client_step`` task per client, seeded by (seed, round, client), with the method's ``instructions``.

    ``states`` (SCAFFOLD: client id -> its ``c_i``, absent = never trained) gives each client its own state.
    Memory: one model copy (1.56 MB for the course's CNN) per client that has trained so far, so up to
    ~156 MB for 100 clients and ~1.56 GB for 1,000, all saved in every round's checkpoint.
    """
    flip = config.threat.attack in DATA_ATTACKS
    return [ClientTask(k, start, instructions, training_seed(config.seed, round_, k), config.training.epochs,
                       config.training.batch_size, flip_labels=flip and k in malicious,
                       state=None if states is None else ClientState(states.get(k)), steps=config.local_steps)
            for k in clients]


def collect_replies(outcomes: list, config: SimulationConfig, round_: int, start: list[np.ndarray],
                    start_sha256: str, mu: float, malicious: set[int],
                    states: dict[int, list[np.ndarray]] | None = None) -> tuple[list[Reply], dict[str, str]]:
    """The replies the clients send for their ``client_step`` outcomes, and the clients whose step failed.

    Every client that completed its step keeps its new state in ``states`` (SCAFFOLD's ``c_i⁺``), whether or
    not the server then accepts the reply (a real client cannot know). A model-poisoning attacker then
    replaces its reply with its attack on the model it trained (before any clipping), sent without the
    unclipped bit and with its honest ``Δc_i``. A client whose step failed (its worker died, or its training
    diverged) is returned in the failures, named, and keeps its state.
    """
    threat = config.threat
    replies, failed = [], {}
    for outcome in outcomes:
        if isinstance(outcome, TaskFailure):
            failed[f"client {outcome.client_id}"] = outcome.message
            continue
        client_id, reply = outcome.client_id, outcome.reply
        if states is not None and outcome.state is not None and outcome.state.control is not None:
            states[client_id] = outcome.state.control
        weights, metrics = reply.weights, reply.metrics
        if client_id in malicious:
            weights = attack_update(threat.attack, reply.local_weights, start,
                                    attack_rng(config.seed, round_, client_id), threat.strength)
            metrics = {}
        replies.append(Reply(client_id, weights, reply.num_examples, f"client {client_id}", start_sha256,
                             reply.train_loss, mu, metrics, reply.control_delta))
    return replies, failed


def secure_gathered(outcomes: list, config: SimulationConfig, round_: int, batch: Batch, num_sampled: int,
                    malicious: set[int], states: dict[int, list[np.ndarray]] | None = None) -> Gathered:
    """The simulation twin of a secure round: the clients' encoded vectors (``client_step``'s), summed modulo M
    and decoded (``secure_aggregation.aggregate_encoded``), the arithmetic the masked protocol unmasks.

    A model-poisoning attacker encodes its attack with the same code (the server cannot tell it from an
    honest vector). Fewer survivors than the protocol's threshold t for ``num_sampled`` nodes abort the
    round, as the masked protocol would: no aggregate.
    """
    from fedmnist.secure_aggregation import aggregate_encoded

    secure = batch.instructions.secure
    replies, failed = collect_replies(outcomes, config, round_, batch.start, batch.start_sha256,
                                      batch.instructions.mu, malicious, states)
    encoded = {o.client_id: o.reply.encoded for o in outcomes if not isinstance(o, TaskFailure)}
    vectors = [secure.encode(r.weights, batch.start, r.num_examples, round_, r.client_id, r.control_delta, True)
               if r.client_id in malicious else encoded[r.client_id] for r in replies]
    try:  # a fixed-size sample was checked before round 1: only a Poisson sample can be too small here
        threshold = secure.config.for_sample(num_sampled, secure.layout).threshold
    except ConfigError as exc:
        failed["secure aggregation"] = f"aborted: {exc}; no aggregate"
        return Gathered([], failed)
    if len(vectors) < threshold:
        failed["secure aggregation"] = (f"aborted: {len(vectors)} of {num_sampled} sampled clients took part, "
                                        f"below the threshold t = {threshold}; no aggregate")
        return Gathered([], failed)
    return Gathered([], failed, secure_aggregate=aggregate_encoded(vectors, secure.layout, secure.config),
                    contributors=sorted(int(r.client_id) for r in replies))


class SimulatedClients:
    """The simulation's side of the round loop (``fedmnist.rounds.Clients``): clients 1..K trained by an
    executor, each batch's tasks submitted before any is awaited (a worker pool trains them all at once).

    Malicious clients attack their replies; SCAFFOLD's client controls ``c_i`` live in the server
    state's ``client_state`` (so checkpoints carry them).
    """

    def __init__(self, config: SimulationConfig, executor: ClientExecutor, state: ServerState,
                 malicious: set[int], progress: bool) -> None:
        self.config, self.executor, self.state = config, executor, state
        self.malicious, self.progress = malicious, progress

    def candidates(self, round_: int) -> list[int]:
        """Every client of the federation."""
        del round_
        return list(range(1, self.config.federation.num_clients + 1))

    def record_fields(self, sampled: list[int]) -> dict:
        """The sampled client ids and the malicious ones among them."""
        return {"sampled_clients": sampled, "malicious_sampled": [k for k in sampled if k in self.malicious]}

    def _states(self, batch: Batch) -> dict[int, list[np.ndarray]] | None:
        """The clients' own states for a SCAFFOLD batch (client id -> c_i, kept in the server state), else None."""
        if not batch.instructions.scaffold:
            return None
        return self.state.client_state.setdefault(batch.methods[0], {})

    def exchange(self, round_: int, sampled: list[int], batches: list[Batch]) -> list[Gathered]:
        """Train the sampled clients once per batch (every batch submitted before any is awaited)."""
        from tqdm.auto import tqdm

        states = [self._states(batch) for batch in batches]
        pending = [(time.perf_counter(), self.executor.submit(client_tasks(
            self.config, round_, sampled, batch.start, batch.instructions, self.malicious, state)))
            for batch, state in zip(batches, states)]
        gathered = []
        with tqdm(total=len(batches), desc=f"ronda {round_}", unit="grupo", leave=False,
                  disable=not self.progress) as bar:
            for batch, state, (t0, tasks) in zip(batches, states, pending):
                if batch.instructions.secure is not None:
                    got = secure_gathered(tasks.result(), self.config, round_, batch, len(sampled),
                                          self.malicious, state)
                    got.train_seconds = time.perf_counter() - t0
                    gathered.append(got)
                    bar.update()
                    continue
                replies, failed = collect_replies(tasks.result(), self.config, round_, batch.start,
                                                  batch.start_sha256, batch.instructions.mu, self.malicious, state)
                gathered.append(Gathered(replies, failed, time.perf_counter() - t0))
                bar.update()
        return gathered


def loop_config(config: SimulationConfig) -> LoopConfig:
    """The shared loop's settings for a simulation: every round evaluated every ``eval_every``, a
    round without replies keeps the weights, the target accuracy stops it only with ``stop_at_target``."""
    return LoopConfig(config.rounds, config.fraction, config.seed, min_replies=0, eval_every=config.eval_every,
                      target_accuracy=config.target_accuracy if config.stop_at_target else None,
                      target_epsilon=config.privacy.target_epsilon if config.privacy is not None else None,
                      secure=config.secure)


def run_simulation(
    config: SimulationConfig,
    data_path: str | Path | None = None,
    out_dir: str | Path = "resultados_simulacion",
    progress: bool = True,
    *,
    resume: bool = False,
    trainer: ClientTrainer | None = None,
    mnist: Mnist | None = None,
    callback: Callable[[int, list[RoundRecord]], None] | None = None,
    workers: int | str | None = None,
) -> SimulationResult:
    """Run ``config`` and write its outputs to ``out_dir``.

    Parameters
    ----------
    config
        The simulation; validated first.
    data_path
        MNIST npz (default: ``$FEDMNIST_DATA``, else the keras download). Ignored if ``mnist`` is given.
    out_dir
        Where the outputs and the per-round checkpoint go (checked writable before any work).
    progress
        Show tqdm bars over rounds and over the clients of a round.
    resume
        Continue from ``out_dir/checkpoint.pkl`` if there is one (it must come from the same config,
        ``rounds``, ``target_accuracy`` and ``stop_at_target`` aside). The result equals an uninterrupted run's.
    trainer
        A ``ClientTrainer`` to reuse (built with the config's optimizer settings); default: a new one.
    mnist
        Raw ``fedmnist.data.Mnist`` arrays already in memory, instead of reading ``data_path``.
    callback
        Called as ``callback(round, records_of_the_round)`` after each round's checkpoint is written.
    workers
        None: train the clients one after another in this process with TensorFlow's default threads
        (the numbers of earlier versions). N or "auto": N worker processes (``fedmnist.workers``), each
        pinned to one thread, with the same numbers for every N (they may differ from the in-process
        run's in the last bits, as TensorFlow's sums depend on its thread count); ``resume`` works with
        any N, and with in-process runs of the same numbers.

    Raises
    ------
    ConfigError
        Invalid settings, an unusable output directory, or a checkpoint from another configuration or data.
    """

    from fedmnist.checkpoint import load_checkpoint
    from fedmnist.io import check_writable_dir
    from fedmnist.model import initial_weights
    from fedmnist.rounds import finished

    started = time.perf_counter()
    config.validate()
    out = Path(out_dir)
    check_writable_dir(out, "--out directory")
    fed = prepare_federation(config.federation, config.seed, data_path, mnist)
    malicious = malicious_clients(config)
    methods = run_methods(config)
    init = initial_weights(config.seed)
    state = ServerState.initial(methods, init)
    checkpoint = out / CHECKPOINT_FILE
    if resume and os.path.lexists(checkpoint):  # a dangling link is refused by the reader, not taken for none
        state = load_checkpoint(checkpoint, config, fed.sha256)
        log.info("resuming from %s: %d of %d rounds already done", checkpoint, state.round, config.rounds)
    elif resume:
        log.info("no checkpoint in %s; starting from round 1", out)
    elif os.path.lexists(checkpoint):
        log.info("%s exists; starting afresh (use --resume to continue it)", checkpoint)
    loop = loop_config(config)
    check_privacy_target(methods, state, loop.target_epsilon)
    data = WorkerData.from_federation(fed)
    if workers is not None and not finished(methods, state, loop):
        executor = WorkerPool(workers, data, config.training, model_seed=config.seed)
    else:
        if trainer is None:
            trainer = config.training.build_trainer(config.seed)
        else:
            from fedmnist.training import check_trainer

            check_trainer(trainer, config.training)
        executor = InProcessExecutor(data, config.training, model_seed=config.seed, trainer=trainer)
    with executor:
        return _run(config, loop, out, fed, malicious, methods, state, executor, data_path, progress, callback,
                    started, init)


def _run(config: SimulationConfig, loop: LoopConfig, out: Path, fed: Federation, malicious: list[int],
         methods: list[Method], state: ServerState, executor: ClientExecutor, data_path, progress: bool, callback,
         started: float, init: list[np.ndarray]) -> SimulationResult:
    """The shared round loop (``fedmnist.rounds``) over an open executor, then the final outputs."""
    from tqdm.auto import tqdm

    from fedmnist import checkpoint as ckpt
    from fedmnist import outputs
    from fedmnist.model import weights_sha256
    from fedmnist.rounds import RoundWriter, check_secure_aggregation, run_rounds

    done = state.round
    server = Server(methods, state, executor.evaluate, fed.expected_counts)
    poisson = config.privacy is not None and config.privacy.sampling == "poisson"
    check_secure_aggregation(server, config.secure, config.seed, None if poisson else config.clients_per_round)
    clients = SimulatedClients(config, executor, server.state, set(malicious), progress)
    config_text = outputs.json_text(_config_payload(config, fed, malicious, data_path))
    spec = ckpt.simulation_spec(config, fed.sha256, malicious)
    writer = RoundWriter(out, "--out directory", lambda s: ckpt.state_bytes(spec, s),
                         lambda staged, s, rows: staged.write_text(outputs.CONFIG_FILE, config_text),
                         _metrics_extra(config, malicious),
                         # a fresh run never leaves an earlier run's final files beside its own
                         [] if done else _previous_run_files(out))
    bar = tqdm(total=config.rounds, initial=done, desc="rondas", unit="ronda", disable=not progress)

    def on_round(round_: int, rows: list[RoundRecord]) -> None:
        bar.set_postfix({r.method: f"{r.test_accuracy:.3f}" for r in rows if r.test_accuracy is not None})
        bar.update()
        if callback is not None:
            callback(round_, rows)

    try:
        run_rounds(server, clients, loop, writer, on_round)
    finally:
        bar.close()

    per_method = {m: server.history(m) for m in server.methods}
    result = SimulationResult(
        config=config,
        metrics=per_method,
        rounds_to_target={m: rounds_to_target(rows, config.target_accuracy) for m, rows in per_method.items()},
        final_accuracy={m: outputs.method_summary(rows, None)["final_accuracy"] for m, rows in per_method.items()},
        final_weights=dict(server.state.weights),
        malicious_clients=malicious,
        client_sizes=fed.client_sizes,
        initial_sha256=weights_sha256(init),
        rounds_run=server.state.round,
        resumed_from_round=done,
    )
    # a finished run resumed again adds no round: its summary keeps the run's resume point and time
    previous = _previous_summary(out / outputs.SUMMARY_FILE) if done and result.rounds_run == done else None
    with OutputSet(out, "--out directory") as staged:  # the final models, plot and summary, together
        staged.write_text(outputs.CONFIG_FILE, config_text)
        result.files = _write_outputs(staged, result)
        result.seconds = time.perf_counter() - started
        summary = {**_summary(result), **(previous or {})}
        result.files["summary"] = staged.write_text(outputs.SUMMARY_FILE, outputs.json_text(summary))
    return result


# --- what the simulation writes ---------------------------------------------------------------


def _previous_run_files(out: Path) -> list[str]:
    """The final outputs an earlier run left in ``out`` (a fresh run replaces them all or none)."""
    from fedmnist import outputs

    if not out.is_dir():
        return []
    names = {outputs.SUMMARY_FILE, outputs.ACCURACY_PLOT}
    return sorted(p.name for p in out.iterdir() if p.name in names
                  or (p.name.startswith(("modelo_global_", "pesos_globales_")) and p.suffix in (".h5", ".pkl")))


def _config_payload(config: SimulationConfig, fed: Federation, malicious: list[int], data_path) -> dict:
    from fedmnist.outputs import software

    return {
        "simulation": config.to_dict(),
        "config_sha256": config.sha256(),
        "derived": {
            "clients_per_round": config.clients_per_round,
            "krum_f": config.krum_f,
            "attack_strength": config.threat.strength,
            "malicious_clients": malicious,
            "client_sizes": fed.client_sizes,
        },
        "data": {"path": str(data_path) if data_path else None, "train_images": int(fed.y_train.size),
                 "test_images": int(fed.y_test.size), "sha256": fed.sha256},
        "software": software(),
    }


def _metrics_extra(config: SimulationConfig, malicious: list[int]) -> dict:
    return {"malicious_clients": malicious, "attack": config.threat.attack}


def plot_title(config: SimulationConfig) -> str:
    """The accuracy plot's title: split, K, C, E, B and the attack, in Spanish."""
    fed = config.federation
    split = {"iid": "IID", "dirichlet": f"Dirichlet (α = {fed.alpha:g})",
             "shards": f"{fed.shards_per_client} fragmentos por cliente"}[fed.partition]
    local = f"E={config.training.epochs}" if config.local_steps is None else f"{config.local_steps} pasos locales"
    title = f"{split}, K={fed.num_clients}, C={config.fraction:g}, {local}, B={config.training.batch_size}"
    if config.threat.attack:
        from fedmnist.labels import attack_name

        title += f" — {config.threat.num_malicious} cliente(s) malicioso(s): {attack_name(config.threat.attack)}"
    return title


def _write_outputs(out: OutputSet, result: SimulationResult) -> dict[str, Path]:
    from fedmnist import outputs

    config = result.config
    files = {"config": out.path(outputs.CONFIG_FILE), "metrics_csv": out.path(outputs.METRICS_CSV),
             "metrics_json": out.path(outputs.METRICS_JSON), "checkpoint": out.path(CHECKPOINT_FILE)}
    history = [r for rows in result.metrics.values() for r in rows]
    files["plot"] = outputs.write_accuracy_plot(out, history, plot_title(config), config.target_accuracy)
    for method, weights in result.final_weights.items():
        files.update(outputs.write_global(out, f"pesos_globales_{method}", weights, result.rounds_run, method,
                                          config.seed))
    return files


SUMMARY_MAX_BYTES = 1 << 20
"""A summary is a few kilobytes; a larger file in its place is not read."""


def _previous_summary(path: Path) -> dict | None:
    """``resumed_from_round`` and ``seconds`` of the summary an earlier run of this directory wrote,
    or None when it is missing or not one (then the resumed run's own values are written)."""
    try:  # a FIFO or a device left in its place is ignored unread (read_text_capped refuses it)
        summary = json.loads(read_text_capped(path, SUMMARY_MAX_BYTES, "previous summary", error=FedMnistError))
        fields = {"resumed_from_round": summary["resumed_from_round"], "seconds": summary["seconds"]}
    except (FedMnistError, ValueError, TypeError, KeyError, RecursionError):
        return None
    if not (isinstance(fields["resumed_from_round"], int) and not isinstance(fields["resumed_from_round"], bool)
            and isinstance(fields["seconds"], (int, float)) and not isinstance(fields["seconds"], bool)):
        return None
    return fields


def _summary(result: SimulationResult) -> dict:
    from fedmnist.outputs import method_summary

    config = result.config
    return {
        "rounds": result.rounds_run,
        "max_rounds": config.rounds,
        "target_accuracy": config.target_accuracy,
        "methods": {m: method_summary(rows, config.target_accuracy) for m, rows in result.metrics.items()},
        "malicious_clients": result.malicious_clients,
        "attack": config.threat.attack,
        "attack_strength": config.threat.strength,
        "resumed_from_round": result.resumed_from_round,
        "seconds": result.seconds,
        "privacy": _privacy_summary(result),
    }


def _privacy_summary(result: SimulationResult) -> dict | None:
    """What ε means for this run: adjacency, δ, and whether it is a guarantee worth the name."""
    config = result.config
    if config.privacy is None:
        return None
    from fedmnist.privacy import PrivacyAccountant, privacy_verdict

    accountant = PrivacyAccountant.from_config(config.privacy, config.federation.num_clients,
                                               config.clients_per_round)
    releases = max(len(rows) for rows in result.metrics.values())  # every round is charged
    verdict = privacy_verdict(accountant, releases)
    return {"settings": config.privacy.to_dict(), "adjacency": accountant.adjacency, "delta": accountant.delta,
            "epsilon": verdict.epsilon, "meaningful": verdict.meaningful, "verdict": verdict.message,
            "note": "each method's epsilon covers its own releases; methods run on the same clients' data "
                    "compose, and the per-round metrics (sampled clients, training losses) are not covered"}


def format_summary(result: SimulationResult) -> str:
    """A plain-text table: final accuracy and rounds to target per method."""
    from fedmnist.labels import method_name

    target = result.config.target_accuracy
    lines = [f"{'method':<16}{'final accuracy':>16}{f'rounds to {target:.0%}':>18}{'seconds':>10}"]
    for method, rows in result.metrics.items():
        accuracy = result.final_accuracy[method]
        reached = result.rounds_to_target[method]
        lines.append(
            f"{method_name(method):<16}{'-' if accuracy is None else f'{accuracy:.4f}':>16}"
            f"{'not reached' if reached is None else str(reached):>18}{sum(r.seconds for r in rows):>10.1f}"
        )
    return "\n".join(lines)
