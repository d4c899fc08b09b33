"""Multi-round federated learning simulated in one process: every aggregation method on the same federation.

``run_simulation(config)`` splits MNIST's training set among K clients, then for R rounds samples
``max(1, ⌊C·K⌋)`` clients, trains each of them locally from the round's global model and aggregates
their updates with every requested rule of ``fedmnist.strategies``. Each method keeps its own global
model, but all of them share

* the partition (``fedmnist.partition.partition`` seeded by ``seed``, as ``fedmnist split`` does),
* the initial weights (``fedmnist.model.initial_weights(seed)``),
* the clients sampled in round r (a generator seeded by ``(seed, r)``) and each client's training
  seed (from ``(seed, r, client_id)``), and the malicious clients,

so the methods are compared on equal terms, a run is reproducible bit for bit, and resuming needs no
random state. FedProx's clients train with the proximal coefficient ``mu``; every other method's with
``mu = 0``. Methods that start a round from identical weights with the same ``mu`` (all of them in
round 1) share one set of local trainings.

One ``ClientTrainer`` (one compiled model) does all training and evaluation. The federation is held as
the raw uint8 images plus one index array per client; a client's images are sliced and normalised
when it is sampled, and only the current round's updates are in memory.

Outputs in ``out_dir`` (every write atomic): ``configuracion.json``, ``metricas_por_ronda.csv`` and
``.json``, ``precision_por_ronda.png``, ``resumen.json``, ``modelo_global_<method>.h5``,
``pesos_globales_<method>.pkl`` and ``checkpoint.pkl`` (rewritten after every round; ``resume=True``
continues from it).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import logging
import math
import pickle
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fedmnist import __version__
from fedmnist.attacks import (
    ATTACKS,
    DATA_ATTACKS,
    attack_strength,
    attack_update,
    check_attack,
    choose_malicious,
    flip_labels,
)
from fedmnist.data import normalize_images
from fedmnist.errors import ConfigError
from fedmnist.io import atomic_write_bytes, atomic_write_text
from fedmnist.partition import SCHEMES, PartitionConfig, partition
from fedmnist.strategies import AGGREGATORS, aggregate

if TYPE_CHECKING:
    from fedmnist.data import Mnist
    from fedmnist.training import ClientTrainer, TrainConfig

log = logging.getLogger(__name__)

DEFAULT_METHODS = ("fedavg", "fedprox", "fedmed")
CONFIG_FILE = "configuracion.json"
METRICS_CSV = "metricas_por_ronda.csv"
METRICS_JSON = "metricas_por_ronda.json"
ACCURACY_PLOT = "precision_por_ronda.png"
SUMMARY_FILE = "resumen.json"
CHECKPOINT_FILE = "checkpoint.pkl"
CHECKPOINT_FORMAT = "fedmnist-simulation-checkpoint"
CHECKPOINT_VERSION = 1
RESUMABLE_FIELDS = ("rounds", "target_accuracy", "stop_at_target")
"""Config fields a resumed run may change: they do not alter the rounds already completed."""

# One independent random stream per purpose: np.random.default_rng([seed, stream, ...]).
_SAMPLING, _TRAINING, _MALICIOUS, _ATTACK = 1, 2, 3, 4


@dataclass(frozen=True)
class SimulationConfig:
    """Everything that determines a simulation's numbers; saved as ``configuracion.json``.

    The defaults run on a laptop in minutes: 10 IID clients, all sampled (C = 1), 10 rounds of one
    local epoch, comparing FedAvg, FedProx (mu = 0.01) and FedMed. ``PRESETS`` holds McMahan et
    al.'s setups.
    """

    num_clients: int = 10
    fraction: float = 1.0
    rounds: int = 10
    local_epochs: int = 1
    batch_size: int = 32
    optimizer: str = "sgd"
    learning_rate: float = 0.05
    momentum: float = 0.9
    partition: str = "iid"
    alpha: float = 0.5
    shards_per_client: int = 2
    methods: tuple[str, ...] = DEFAULT_METHODS
    mu: float = 0.01
    num_malicious: int = 0
    attack: str | None = None
    attack_strength: float | None = None
    trim_beta: float = 0.2
    krum_f: int | None = None
    target_accuracy: float = 0.99
    train_subset: int | None = None
    test_subset: int | None = None
    eval_every: int = 1
    stop_at_target: bool = False
    seed: int = 42

    def __post_init__(self) -> None:
        methods = (self.methods,) if isinstance(self.methods, str) else tuple(self.methods)
        object.__setattr__(self, "methods", tuple(str(m).strip().lower() for m in methods))

    @property
    def clients_per_round(self) -> int:
        """``m = max(1, ⌊C·K⌋)``, the number of clients sampled every round (McMahan et al. 2017)."""
        return max(1, math.floor(self.fraction * self.num_clients + 1e-9))

    @property
    def byzantine_f(self) -> int:
        """``f`` passed to Krum and Multi-Krum: ``krum_f``, else min(F, the most Krum allows for m)."""
        if self.krum_f is not None:
            return self.krum_f
        return max(0, min(self.num_malicious, (self.clients_per_round - 3) // 2))

    def method_mu(self, method: str) -> float:
        """The proximal coefficient the clients of ``method`` train with (``mu`` for FedProx, else 0)."""
        return float(self.mu) if method == "fedprox" else 0.0

    def validate(self) -> None:
        """Raise ConfigError (naming the value and the fix) for anything the simulation cannot run."""

        def need(ok: bool, message: str) -> None:
            if not ok:
                raise ConfigError(message)

        for name in (
            "num_clients",
            "rounds",
            "local_epochs",
            "batch_size",
            "shards_per_client",
            "eval_every",
            "num_malicious",
            "seed",
        ):
            value = getattr(self, name)
            need(
                isinstance(value, (int, np.integer)) and not isinstance(value, bool),
                f"{name} must be an integer (got {value!r})",
            )
        need(self.num_clients >= 1, f"the number of clients must be at least 1 (got {self.num_clients})")
        need(
            0 < self.fraction <= 1,
            f"the fraction of clients per round C must be in (0, 1] (got {self.fraction})",
        )
        need(self.rounds >= 1, f"the number of rounds must be at least 1 (got {self.rounds})")
        self.train_config("fedprox").validate()
        need(
            self.partition in SCHEMES,
            f"unknown partition '{self.partition}'; choose one of {', '.join(SCHEMES)}",
        )
        need(
            self.partition != "dirichlet" or (self.alpha > 0 and math.isfinite(self.alpha)),
            f"the Dirichlet concentration alpha must be > 0 (got {self.alpha})",
        )
        need(
            self.shards_per_client >= 1,
            f"shards per client must be at least 1 (got {self.shards_per_client})",
        )
        need(len(self.methods) > 0, "give at least one aggregation method")
        for method in self.methods:
            if method not in AGGREGATORS:
                raise ConfigError(f"unknown method '{method}'; available: {', '.join(AGGREGATORS)}")
        need(
            len(set(self.methods)) == len(self.methods), f"a method is listed twice: {' '.join(self.methods)}"
        )
        need(
            self.mu >= 0 and math.isfinite(self.mu),
            f"the FedProx coefficient mu must be >= 0 (got {self.mu})",
        )
        need(
            "fedprox" not in self.methods or self.mu > 0,
            "fedprox needs mu > 0 (with mu = 0 it is FedAvg); set --mu or drop fedprox",
        )
        need(
            0 <= self.num_malicious <= self.num_clients,
            f"the number of malicious clients must be in [0, {self.num_clients}] (got {self.num_malicious})",
        )
        if self.num_malicious and self.attack is None:
            raise ConfigError(
                f"{self.num_malicious} malicious clients but no attack: choose --attack {'|'.join(ATTACKS)}"
            )
        if self.attack is not None and not self.num_malicious:
            raise ConfigError(f"attack '{self.attack}' given but no malicious clients: set --malicious F > 0")
        check_attack(self.attack, self.attack_strength)
        need(
            0 <= self.trim_beta < 0.5,
            f"the trimmed-mean fraction beta must be in [0, 0.5) (got {self.trim_beta})",
        )
        need(0 < self.target_accuracy <= 1, f"target accuracy must be in (0, 1] (got {self.target_accuracy})")
        need(
            self.train_subset is None or self.train_subset >= self.num_clients,
            f"--train-subset {self.train_subset} leaves fewer images than the {self.num_clients} clients",
        )
        need(
            self.test_subset is None or self.test_subset >= 1,
            f"--test-subset must be >= 1 (got {self.test_subset})",
        )
        need(self.eval_every >= 1, f"eval_every must be at least 1 (got {self.eval_every})")
        need(self.seed >= 0, f"the seed must be >= 0 (got {self.seed})")
        m, f = self.clients_per_round, self.byzantine_f
        need(f >= 0, f"krum_f must be >= 0 (got {f})")
        if {"krum", "multikrum"} & set(self.methods) and m <= 2 * f + 2:
            raise ConfigError(
                f"Krum with f={f} needs more than {2 * f + 2} clients per round, but C*K gives {m}: raise "
                "--fraction or --clients, or lower --krum-f"
            )

    def train_config(self, method: str) -> TrainConfig:
        """The local training of ``method``'s clients (no validation split: the server evaluates)."""
        from fedmnist.training import TrainConfig

        return TrainConfig(
            epochs=self.local_epochs, batch_size=self.batch_size, optimizer=self.optimizer,
            learning_rate=self.learning_rate, momentum=self.momentum, mu=self.method_mu(method),
            validation_split=0.0, seed=self.seed,
        )

    def partition_config(self) -> PartitionConfig:
        """The split of the training set, seeded by ``seed``."""
        return PartitionConfig(
            self.partition, self.num_clients, self.alpha, self.shards_per_client, self.seed
        )

    def to_dict(self) -> dict:
        """Plain, JSON-ready fields (methods as a list)."""
        out = asdict(self)
        out["methods"] = list(self.methods)
        return out

    @classmethod
    def from_dict(cls, values: dict) -> SimulationConfig:
        """Rebuild a config from ``to_dict()`` output; ConfigError for unknown fields."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown simulation setting(s): {', '.join(unknown)}")
        return cls(**values)

    def sha256(self) -> str:
        """Hash of every field that affects completed rounds (all but ``RESUMABLE_FIELDS``)."""
        payload = {k: v for k, v in self.to_dict().items() if k not in RESUMABLE_FIELDS}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


_MCMAHAN = SimulationConfig(
    num_clients=100,
    fraction=0.1,
    rounds=50,
    local_epochs=5,
    batch_size=10,
    optimizer="sgd",
    learning_rate=0.05,
    momentum=0.0,
    partition="iid",
    target_accuracy=0.99,
)
PRESETS: dict[str, SimulationConfig] = {
    # McMahan et al. 2017, CNN on MNIST: 100 clients of 600 images, C = 0.1, E = 5, B = 10, plain SGD
    # (lr 0.05 without momentum is our choice; the paper tunes it). FedAvg reached 99% in about 20
    # rounds IID and 229 with the pathological non-IID split (2 shards of 300) (their Table 2).
    # One round takes about 30-33 s of local training per method on 2 CPU cores (plus ~2.5 s to
    # evaluate on the 10,000 test images; resultados/simulaciones/mcmahan_*), so pass --methods to pick
    # what to compare.
    "mcmahan-iid": _MCMAHAN,
    "mcmahan-noniid": replace(_MCMAHAN, partition="shards", shards_per_client=2, rounds=300),
}
"""Named configurations; explicit CLI flags override their fields."""


@dataclass(frozen=True)
class RoundMetrics:
    """One method's numbers for one round (test metrics are None in rounds that were not evaluated).

    ``train_loss`` is the mean over the sampled clients of their last local epoch's loss.
    ``seconds`` is what the method alone would have taken: its clients' local training
    (``train_seconds``, shared with the methods that started the round from the same weights and mu),
    its aggregation and its evaluation (``eval_seconds``). ``round_seconds`` is the whole round, all
    methods together. ``start_sha256`` is a prefix of the hash of the global weights the round
    started from.
    """

    round: int
    method: str
    test_accuracy: float | None
    test_loss: float | None
    train_loss: float
    seconds: float
    train_seconds: float
    eval_seconds: float
    round_seconds: float
    mu: float
    num_sampled: int
    sampled_clients: list[int]
    malicious_sampled: list[int]
    start_sha256: str

    def comparable(self) -> dict:
        """Every field but the timings: equal for two runs with the same config."""
        return {k: v for k, v in asdict(self).items() if not k.endswith("seconds")}


@dataclass
class SimulationResult:
    """Per-method, per-round metrics of a simulation and what it wrote."""

    config: SimulationConfig
    metrics: dict[str, list[RoundMetrics]]
    rounds_to_target: dict[str, int | None]
    final_accuracy: dict[str, float | None]
    final_weights: dict[str, list[np.ndarray]]
    malicious_clients: list[int]
    client_sizes: list[int]
    initial_sha256: str
    resumed_from_round: int = 0
    seconds: float = 0.0
    files: dict[str, Path] = field(default_factory=dict)

    def curves(self, key: str = "test_accuracy") -> dict[str, list[float]]:
        """``key`` per round for every method (NaN where not evaluated)."""
        return {
            m: [np.nan if getattr(r, key) is None else getattr(r, key) for r in rows]
            for m, rows in self.metrics.items()
        }


@dataclass(frozen=True)
class Federation:
    """The simulation's data: raw training images with one index array per client, normalised test set."""

    x_train: np.ndarray
    y_train: np.ndarray
    client_indices: list[np.ndarray]
    x_test: np.ndarray
    y_test: np.ndarray
    sha256: str

    def client_data(self, client_id: int) -> tuple[np.ndarray, np.ndarray]:
        """Client ``client_id``'s (1-based) images, normalised, and labels."""
        idx = self.client_indices[client_id - 1]
        return normalize_images(self.x_train[idx]), self.y_train[idx]


def prepare_federation(
    config: SimulationConfig, data_path: str | Path | None = None, mnist: Mnist | None = None
) -> Federation:
    """Load MNIST (or take ``mnist``, raw uint8), keep the first train/test subset images, split them."""
    from fedmnist.data import load_raw_mnist

    mnist = mnist if mnist is not None else load_raw_mnist(data_path)
    x_train, y_train, x_test, y_test = mnist.x_train, mnist.y_train, mnist.x_test, mnist.y_test
    if config.train_subset is not None:
        if config.train_subset > len(y_train):
            raise ConfigError(
                f"--train-subset {config.train_subset} exceeds the {len(y_train)} training images"
            )
        x_train, y_train = x_train[: config.train_subset], y_train[: config.train_subset]
    if config.test_subset is not None:
        if config.test_subset > len(y_test):
            raise ConfigError(f"--test-subset {config.test_subset} exceeds the {len(y_test)} test images")
        x_test, y_test = x_test[: config.test_subset], y_test[: config.test_subset]
    parts = partition(y_train, config.partition_config())
    digest = hashlib.sha256()
    for array in (x_train, y_train, x_test, y_test):
        digest.update(f"{array.dtype.str}{array.shape}".encode())
        digest.update(memoryview(np.ascontiguousarray(array)))
    return Federation(x_train, y_train, parts, normalize_images(x_test), y_test, digest.hexdigest())


def sample_clients(config: SimulationConfig, round_: int) -> list[int]:
    """Ids (1..K, sorted) of the clients of ``round_``: drawn from a generator seeded by (seed, round)."""
    rng = np.random.default_rng([config.seed, _SAMPLING, round_])
    chosen = rng.choice(config.num_clients, size=config.clients_per_round, replace=False)
    return sorted(int(k) + 1 for k in chosen)


def malicious_clients(config: SimulationConfig) -> list[int]:
    """Ids of the F malicious clients, fixed for the run (the first F of a seeded permutation)."""
    return choose_malicious(
        config.num_clients, config.num_malicious, np.random.default_rng([config.seed, _MALICIOUS])
    )


def client_seed(config: SimulationConfig, round_: int, client_id: int) -> int:
    """Training seed of ``client_id`` in ``round_`` (shuffling and dropout), from (seed, round, client)."""
    state = np.random.SeedSequence([config.seed, _TRAINING, round_, client_id]).generate_state(1, np.uint32)
    return int(state[0] >> 1)


def rounds_to_target(rows: Sequence[RoundMetrics], target: float) -> int | None:
    """The first round whose test accuracy reaches ``target``, or None."""
    for row in rows:
        if row.test_accuracy is not None and row.test_accuracy >= target:
            return row.round
    return None


# --- the simulation ---------------------------------------------------------------------------


def _every_method_reached(history: Sequence[RoundMetrics], config: SimulationConfig) -> bool:
    return all(
        rounds_to_target([r for r in history if r.method == m], config.target_accuracy) is not None
        for m in config.methods
    )


def _check_trainer(trainer, config: SimulationConfig) -> None:
    """A trainer passed in must have been built with the config's optimizer settings."""
    import keras

    optimizer = trainer.optimizer
    kind = "sgd" if isinstance(optimizer, keras.optimizers.SGD) else "adam"
    lr = float(np.asarray(optimizer.learning_rate))
    momentum = float(getattr(optimizer, "momentum", 0.0)) if kind == "sgd" else 0.0
    wanted_momentum = config.momentum if config.optimizer == "sgd" else 0.0
    if (
        kind != config.optimizer
        or not math.isclose(lr, config.learning_rate, rel_tol=1e-6)
        or not math.isclose(momentum, wanted_momentum, abs_tol=1e-9)
    ):
        raise ConfigError(
            f"the trainer passed in uses {kind} lr={lr:g} momentum={momentum:g}, but the config asks for "
            f"{config.optimizer} lr={config.learning_rate:g} momentum={wanted_momentum:g}"
        )


def _run_round(
    round_: int,
    config: SimulationConfig,
    fed: Federation,
    trainer,
    global_weights: dict[str, list[np.ndarray]],
    malicious: set[int],
    progress: bool,
) -> tuple[dict[str, list[np.ndarray]], list[RoundMetrics]]:
    """Train the sampled clients once per group of methods with identical starts, aggregate, evaluate."""
    from tqdm.auto import tqdm

    from fedmnist.evaluation import evaluate
    from fedmnist.model import weights_sha256

    round_start = time.perf_counter()
    sampled = sample_clients(config, round_)
    bad_sampled = [k for k in sampled if k in malicious]
    strength = attack_strength(config.attack, config.attack_strength) if config.attack else None
    starts = {m: weights_sha256(global_weights[m]) for m in config.methods}
    groups: dict[tuple[str, float], list[str]] = {}
    for method in config.methods:
        groups.setdefault((starts[method], config.method_mu(method)), []).append(method)
    evaluate_now = round_ % config.eval_every == 0 or round_ == config.rounds

    new_weights: dict[str, list[np.ndarray]] = {}
    partial: dict[str, dict] = {}
    bar = tqdm(
        total=len(sampled) * len(groups),
        desc=f"ronda {round_}",
        unit="cliente",
        leave=False,
        disable=not progress,
    )
    try:
        for (_, mu), members in groups.items():
            start = global_weights[members[0]]
            train_start = time.perf_counter()
            results, losses = [], []
            for client_id in sampled:
                x, y = fed.client_data(client_id)
                attacked = client_id in malicious
                if attacked and config.attack in DATA_ATTACKS:
                    y = flip_labels(y)
                trained = trainer.train(
                    start,
                    x,
                    y,
                    epochs=config.local_epochs,
                    batch_size=config.batch_size,
                    mu=mu,
                    seed=client_seed(config, round_, client_id),
                )
                weights = trained.weights
                if attacked:
                    rng = np.random.default_rng([config.seed, _ATTACK, round_, client_id])
                    weights = attack_update(config.attack, weights, start, rng, strength)
                results.append((weights, trained.num_examples))
                losses.append(trained.history["loss"][-1])
                bar.update()
            train_seconds = time.perf_counter() - train_start
            for method in members:
                t0 = time.perf_counter()
                new = aggregate(method, results, trim_beta=config.trim_beta, num_malicious=config.byzantine_f)
                aggregate_seconds = time.perf_counter() - t0
                accuracy = loss = None
                t0 = time.perf_counter()
                if evaluate_now:
                    result = evaluate(trainer, new, fed.x_test, fed.y_test)
                    accuracy, loss = float(result.accuracy), float(result.loss)
                eval_seconds = time.perf_counter() - t0
                new_weights[method] = new
                partial[method] = {
                    "test_accuracy": accuracy,
                    "test_loss": loss,
                    "train_loss": float(np.mean(losses)),
                    "seconds": train_seconds + aggregate_seconds + eval_seconds,
                    "train_seconds": train_seconds,
                    "eval_seconds": eval_seconds,
                    "mu": mu,
                }
            del results
    finally:
        bar.close()
    round_seconds = time.perf_counter() - round_start
    rows = [
        RoundMetrics(
            round=round_,
            method=m,
            round_seconds=round_seconds,
            num_sampled=len(sampled),
            sampled_clients=list(sampled),
            malicious_sampled=list(bad_sampled),
            start_sha256=starts[m][:16],
            **partial[m],
        )
        for m in config.methods
    ]
    return new_weights, rows


def run_simulation(
    config: SimulationConfig,
    data_path: str | Path | None = None,
    out_dir: str | Path = "resultados_simulacion",
    progress: bool = True,
    *,
    resume: bool = False,
    trainer: ClientTrainer | None = None,
    mnist: Mnist | None = None,
    callback: Callable[[int, list[RoundMetrics]], None] | None = None,
) -> SimulationResult:
    """Run ``config`` and write its outputs to ``out_dir``.

    Parameters
    ----------
    config
        The simulation; validated first.
    data_path
        MNIST npz (default: ``$FEDMNIST_DATA``, else the keras download). Ignored if ``mnist`` is given.
    out_dir
        Where the outputs and the per-round checkpoint go.
    progress
        Show tqdm bars over rounds and over the clients of a round.
    resume
        Continue from ``out_dir/checkpoint.pkl`` if there is one (it must come from the same config,
        ``rounds`` and ``target_accuracy`` aside). The result equals an uninterrupted run's.
    trainer
        A ``ClientTrainer`` to reuse (built with the config's optimizer settings); default: a new one.
    mnist
        Raw ``fedmnist.data.Mnist`` arrays already in memory, instead of reading ``data_path``.
    callback
        Called as ``callback(round, metrics_of_the_round)`` after each round's checkpoint is written.

    Raises
    ------
    ConfigError
        Invalid settings, or a checkpoint from a different configuration or data.
    """
    from tqdm.auto import tqdm

    from fedmnist.model import initial_weights, weights_sha256
    from fedmnist.training import ClientTrainer

    started = time.perf_counter()
    config.validate()
    out = Path(out_dir)
    fed = prepare_federation(config, data_path, mnist)
    malicious = malicious_clients(config)
    init = initial_weights(config.seed)
    init_sha = weights_sha256(init)
    global_weights = dict.fromkeys(config.methods, init)
    history: list[RoundMetrics] = []
    done = 0
    checkpoint = out / CHECKPOINT_FILE
    if resume and checkpoint.exists():
        state = load_checkpoint(checkpoint, config, fed.sha256)
        global_weights, history, done = state["weights"], state["metrics"], state["completed_rounds"]
        log.info("resuming from %s: %d of %d rounds already done", checkpoint, done, config.rounds)
    elif resume:
        log.info("no checkpoint in %s; starting from round 1", out)
    elif checkpoint.exists():
        log.info("%s exists; starting afresh (use --resume to continue it)", checkpoint)
    if trainer is None:
        trainer = ClientTrainer(
            config.optimizer, config.learning_rate, config.momentum, model_seed=config.seed
        )
    else:
        _check_trainer(trainer, config)

    out.mkdir(parents=True, exist_ok=True)
    _write_config(out / CONFIG_FILE, config, fed, malicious, data_path)
    bar = tqdm(total=config.rounds, initial=done, desc="rondas", unit="ronda", disable=not progress)
    try:
        for round_ in range(done + 1, config.rounds + 1):
            if config.stop_at_target and _every_method_reached(history, config):
                log.info("every method reached %.4f by round %d: stopping early", config.target_accuracy, round_ - 1)
                break
            global_weights, rows = _run_round(
                round_, config, fed, trainer, global_weights, set(malicious), progress
            )
            history.extend(rows)
            save_checkpoint(checkpoint, config, fed.sha256, round_, global_weights, history, malicious)
            _write_metrics(out, config, history, malicious)
            bar.set_postfix(
                {_label(r.method): f"{r.test_accuracy:.3f}" for r in rows if r.test_accuracy is not None}
            )
            bar.update()
            if callback is not None:
                callback(round_, rows)
    finally:
        bar.close()

    per_method = {m: [r for r in history if r.method == m] for m in config.methods}
    result = SimulationResult(
        config=config,
        metrics=per_method,
        rounds_to_target={
            m: rounds_to_target(rows, config.target_accuracy) for m, rows in per_method.items()
        },
        final_accuracy={
            m: next((r.test_accuracy for r in reversed(rows) if r.test_accuracy is not None), None)
            for m, rows in per_method.items()
        },
        final_weights=global_weights,
        malicious_clients=malicious,
        client_sizes=[int(p.size) for p in fed.client_indices],
        initial_sha256=init_sha,
        resumed_from_round=done,
    )
    result.files = _write_outputs(out, result)
    result.seconds = time.perf_counter() - started
    _write_summary(out / SUMMARY_FILE, result)
    result.files["summary"] = out / SUMMARY_FILE
    return result


# --- checkpoint -------------------------------------------------------------------------------


def save_checkpoint(
    path: Path,
    config: SimulationConfig,
    data_sha256: str,
    completed_rounds: int,
    weights: dict[str, list[np.ndarray]],
    metrics: list[RoundMetrics],
    malicious: list[int],
) -> None:
    """Write the state after ``completed_rounds`` as plain data (builtins and numpy arrays), atomically."""
    payload = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "config_sha256": config.sha256(),
        "config": config.to_dict(),
        "data_sha256": data_sha256,
        "completed_rounds": int(completed_rounds),
        "malicious_clients": [int(k) for k in malicious],
        "weights": {m: [np.ascontiguousarray(w, dtype=np.float32) for w in ws] for m, ws in weights.items()},
        "metrics": [asdict(r) for r in metrics],
    }
    atomic_write_bytes(path, pickle.dumps(payload, protocol=4))


def load_checkpoint(path: Path, config: SimulationConfig, data_sha256: str) -> dict:
    """Read a checkpoint with ``safe_load_pickle`` and check it belongs to ``config`` and the data.

    Returns a dict with ``completed_rounds``, ``weights`` (per method) and ``metrics`` (RoundMetrics).

    Raises
    ------
    ConfigError
        The checkpoint is not one, or was written for another configuration, data or a longer run.
    """
    from fedmnist.exchange import safe_load_pickle

    state = safe_load_pickle(path)
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ConfigError(f"{path}: not a fedmnist simulation checkpoint")
    if state.get("version") != CHECKPOINT_VERSION:
        raise ConfigError(f"{path}: unsupported checkpoint version {state.get('version')!r}")
    if state.get("config_sha256") != config.sha256():
        stored = state.get("config") or {}
        current = config.to_dict()
        diff = [
            f"{k}: {stored.get(k)!r} -> {current[k]!r}"
            for k in current
            if k not in RESUMABLE_FIELDS and stored.get(k) != current[k]
        ]
        raise ConfigError(
            f"{path} was written by a different configuration ({'; '.join(diff) or 'unknown differences'}); "
            "rerun with the same settings, drop --resume to start afresh, or use another --out"
        )
    if state.get("data_sha256") != data_sha256:
        raise ConfigError(
            f"{path} was written for different MNIST data; use the same --data or another --out"
        )
    done = int(state["completed_rounds"])
    if done > config.rounds:
        raise ConfigError(
            f"{path} already holds {done} rounds, more than the {config.rounds} requested; "
            f"ask for --rounds {done} or more"
        )
    from fedmnist.model import weights_mismatch

    weights = state.get("weights")
    if not isinstance(weights, dict) or set(weights) != set(config.methods):
        raise ConfigError(f"{path}: does not hold global weights for {', '.join(config.methods)}")
    for method, arrays in weights.items():
        problem = weights_mismatch(arrays)
        if problem:
            raise ConfigError(f"{path}: the global weights of {method} do not fit the CNN: {problem}")
    try:
        metrics = [RoundMetrics(**row) for row in state["metrics"]]
    except (KeyError, TypeError) as exc:
        raise ConfigError(f"{path}: malformed metrics in the checkpoint ({exc})") from None
    return {
        "completed_rounds": done,
        "weights": {m: list(weights[m]) for m in config.methods},
        "metrics": metrics,
    }


# --- outputs ----------------------------------------------------------------------------------


def _label(method: str) -> str:
    from fedmnist.plots import method_label

    return method_label(method)


def _finite(value):
    """JSON has no NaN: a diverged model's NaN or infinite metric becomes null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def _dump_json(path: Path, payload: dict) -> None:
    atomic_write_text(path, json.dumps(_finite(payload), indent=2, ensure_ascii=False) + "\n")


def _write_config(
    path: Path, config: SimulationConfig, fed: Federation, malicious: list[int], data_path
) -> None:
    _dump_json(
        path,
        {
            "simulation": config.to_dict(),
            "config_sha256": config.sha256(),
            "derived": {
                "clients_per_round": config.clients_per_round,
                "krum_f": config.byzantine_f,
                "attack_strength": attack_strength(config.attack, config.attack_strength)
                if config.attack
                else None,
                "malicious_clients": malicious,
                "client_sizes": [int(p.size) for p in fed.client_indices],
            },
            "data": {
                "path": str(data_path) if data_path else None,
                "train_images": int(fed.y_train.size),
                "test_images": int(fed.y_test.size),
                "sha256": fed.sha256,
            },
            "software": {
                "fedmnist": __version__,
                "numpy": np.__version__,
                "python": platform.python_version(),
            },
        },
    )


CSV_COLUMNS = [f.name for f in fields(RoundMetrics)]


def _write_metrics(
    out: Path, config: SimulationConfig, history: list[RoundMetrics], malicious: list[int]
) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in history:
        values = asdict(row)
        values["sampled_clients"] = " ".join(map(str, row.sampled_clients))
        values["malicious_sampled"] = " ".join(map(str, row.malicious_sampled))
        writer.writerow({k: "" if v is None else v for k, v in values.items()})
    atomic_write_text(out / METRICS_CSV, buffer.getvalue())
    _dump_json(
        out / METRICS_JSON,
        {
            "methods": list(config.methods),
            "malicious_clients": malicious,
            "attack": config.attack,
            "rounds": [asdict(r) for r in history],
        },
    )


def _plot_title(config: SimulationConfig) -> str:
    title = (
        f"{config.partition_config().describe()}, K={config.num_clients}, C={config.fraction:g}, "
        f"E={config.local_epochs}, B={config.batch_size}"
    )
    if config.attack:
        title += f" — {config.num_malicious} cliente(s) malicioso(s): {config.attack}"
    return title


def _joined_curves(curves: dict[str, list[float]]) -> dict[str, list[float]]:
    """Fill the rounds that were not evaluated (``eval_every > 1``) by joining the evaluated ones.

    ``plot_accuracy_per_round`` plots ``values[i]`` at round ``i + 1``; joining the evaluated points
    with straight lines is what a line plot over the evaluated rounds would draw, whereas NaN gaps
    would leave isolated points (invisible once markers are off, beyond 30 rounds).
    """
    joined = {}
    for method, curve in curves.items():
        values = np.asarray(curve, dtype=np.float64)
        known = np.flatnonzero(np.isfinite(values))
        if known.size < 2:
            joined[method] = values.tolist()
            continue
        filled = np.interp(np.arange(values.size), known, values[known], left=np.nan, right=np.nan)
        joined[method] = filled.tolist()
    return joined


def _write_outputs(out: Path, result: SimulationResult) -> dict[str, Path]:
    from fedmnist.exchange import make_global, save_global
    from fedmnist.model import save_keras_model
    from fedmnist.plots import plot_accuracy_per_round

    config = result.config
    files = {
        "config": out / CONFIG_FILE,
        "metrics_csv": out / METRICS_CSV,
        "metrics_json": out / METRICS_JSON,
        "checkpoint": out / CHECKPOINT_FILE,
    }
    files["plot"] = plot_accuracy_per_round(
        _joined_curves(result.curves()),
        out / ACCURACY_PLOT,
        title=_plot_title(config),
        target=config.target_accuracy,
    )
    for method, weights in result.final_weights.items():
        model_path = out / f"modelo_global_{method}.h5"
        save_keras_model(weights, model_path)
        weights_path = out / f"pesos_globales_{method}.pkl"
        save_global(weights_path, make_global(weights, config.rounds, method, config.seed))
        files[f"model_{method}"], files[f"weights_{method}"] = model_path, weights_path
    return files


def _write_summary(path: Path, result: SimulationResult) -> None:
    config = result.config
    methods = {}
    for method, rows in result.metrics.items():
        accuracies = [r.test_accuracy for r in rows if r.test_accuracy is not None]
        final = next((r for r in reversed(rows) if r.test_accuracy is not None), None)
        methods[method] = {
            "final_accuracy": result.final_accuracy[method],
            "final_loss": final.test_loss if final else None,
            "best_accuracy": max(accuracies) if accuracies else None,
            "rounds_to_target": result.rounds_to_target[method],
            "seconds": sum(r.seconds for r in rows),
        }
    _dump_json(
        path,
        {
            "rounds": config.rounds,
            "target_accuracy": config.target_accuracy,
            "methods": methods,
            "malicious_clients": result.malicious_clients,
            "attack": config.attack,
            "attack_strength": attack_strength(config.attack, config.attack_strength)
            if config.attack
            else None,
            "resumed_from_round": result.resumed_from_round,
            "seconds": result.seconds,
        },
    )


def format_summary(result: SimulationResult) -> str:
    """A plain-text table: final accuracy and rounds to target per method."""
    target = result.config.target_accuracy
    lines = [f"{'method':<16}{'final accuracy':>16}{f'rounds to {target:.0%}':>18}{'seconds':>10}"]
    for method, rows in result.metrics.items():
        accuracy = result.final_accuracy[method]
        reached = result.rounds_to_target[method]
        lines.append(
            f"{_label(method):<16}{'-' if accuracy is None else f'{accuracy:.4f}':>16}"
            f"{'not reached' if reached is None else str(reached):>18}{sum(r.seconds for r in rows):>10.1f}"
        )
    return "\n".join(lines)


# --- command line -----------------------------------------------------------------------------

_FLAG_FIELDS = {
    "clients": "num_clients",
    "fraction": "fraction",
    "rounds": "rounds",
    "local_epochs": "local_epochs",
    "batch_size": "batch_size",
    "optimizer": "optimizer",
    "lr": "learning_rate",
    "momentum": "momentum",
    "partition": "partition",
    "alpha": "alpha",
    "shards_per_client": "shards_per_client",
    "methods": "methods",
    "mu": "mu",
    "malicious": "num_malicious",
    "attack": "attack",
    "attack_strength": "attack_strength",
    "trim_beta": "trim_beta",
    "krum_f": "krum_f",
    "target_accuracy": "target_accuracy",
    "train_subset": "train_subset",
    "test_subset": "test_subset",
    "eval_every": "eval_every",
    "stop_at_target": "stop_at_target",
    "seed": "seed",
}


def config_from_args(args: argparse.Namespace) -> SimulationConfig:
    """The preset (or the defaults) with every flag given on the command line applied on top."""
    base = PRESETS[args.preset] if args.preset else SimulationConfig()
    given = {
        name: getattr(args, flag) for flag, name in _FLAG_FIELDS.items() if getattr(args, flag) is not None
    }
    if "methods" in given:
        given["methods"] = tuple(given["methods"])
    return replace(base, **given)


def register_simulate(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``simulate`` sub-command to the ``fedmnist`` parser."""
    d = SimulationConfig()
    p = sub.add_parser(
        "simulate",
        help="simulate R rounds of federated learning in one process, comparing aggregation methods",
        description="Simulate federated learning on MNIST in one process. Every method runs on the same "
        "partition, initial weights and sampled clients. Flags override --preset's fields.",
        epilog="example: fedmnist simulate --clients 10 --rounds 5 --methods fedavg fedmed "
        "--malicious 2 --attack gaussian --data ../shared/data/mnist.npz --out sim",
    )
    add = p.add_argument
    add(
        "--preset",
        choices=sorted(PRESETS),
        help="named configuration (McMahan et al. 2017's MNIST CNN setups)",
    )
    add("--clients", type=int, help=f"number of clients K (default {d.num_clients})")
    add("--fraction", type=float, help=f"fraction C of clients sampled per round (default {d.fraction:g})")
    add("--rounds", type=int, help=f"rounds R (default {d.rounds})")
    add("--local-epochs", type=int, help=f"local epochs E (default {d.local_epochs})")
    add("--batch-size", type=int, help=f"local batch size B (default {d.batch_size})")
    add("--optimizer", choices=("sgd", "adam"), help=f"local optimizer (default {d.optimizer})")
    add("--lr", type=float, help=f"local learning rate (default {d.learning_rate:g})")
    add("--momentum", type=float, help=f"SGD momentum (default {d.momentum:g})")
    add("--partition", choices=SCHEMES, help=f"how to split the training set (default {d.partition})")
    add("--alpha", type=float, help=f"Dirichlet concentration (default {d.alpha:g})")
    add("--shards-per-client", type=int, help=f"label shards per client (default {d.shards_per_client})")
    add(
        "--methods",
        nargs="+",
        choices=list(AGGREGATORS),
        metavar="METHOD",
        help=f"aggregation methods to compare (default: {' '.join(d.methods)}; "
        f"available: {', '.join(AGGREGATORS)})",
    )
    add("--mu", type=float, help=f"FedProx proximal coefficient of the fedprox clients (default {d.mu:g})")
    add("--malicious", type=int, metavar="F", help="number of malicious clients (default 0)")
    add("--attack", choices=ATTACKS, help="what the malicious clients do")
    add(
        "--attack-strength",
        type=float,
        metavar="X",
        help="signflip s (default 4), gaussian sigma (default 200), scale lambda (default 10)",
    )
    add(
        "--trim-beta", type=float, help=f"fraction trimmed at each end by 'trimmed' (default {d.trim_beta:g})"
    )
    add("--krum-f", type=int, help="f assumed by krum/multikrum (default: min(F, (m - 3) // 2))")
    add(
        "--target-accuracy",
        type=float,
        help=f"accuracy whose first round is reported (default {d.target_accuracy:g})",
    )
    add(
        "--train-subset",
        type=int,
        metavar="N",
        help="use only the first N training images (quick runs, tests)",
    )
    add("--test-subset", type=int, metavar="N", help="evaluate on the first N test images only")
    add("--eval-every", type=int, metavar="N", help="evaluate every N rounds and the last (default 1)")
    add("--seed", type=int, help=f"seed of the partition, init, sampling and training (default {d.seed})")
    add(
        "--data",
        metavar="PATH",
        help="MNIST npz in the keras layout (default: $FEDMNIST_DATA, else keras download)",
    )
    add("--stop-at-target", action="store_true", default=None,
        help="stop once every method has reached --target-accuracy")
    add("--quiet", action="store_true", help="no progress bars")
    add("--resume", action="store_true", help="continue from OUT/checkpoint.pkl (same settings required)")
    add("--out", required=True, help="output directory")
    p.set_defaults(func=cmd_simulate)
    return p


def cmd_simulate(args: argparse.Namespace) -> int:
    """Run ``fedmnist simulate`` and print the summary table."""
    config = config_from_args(args)
    result = run_simulation(config, args.data, args.out, progress=not args.quiet, resume=args.resume)
    if result.malicious_clients:
        print(f"malicious clients ({config.attack}): {' '.join(map(str, result.malicious_clients))}")
    print(format_summary(result))
    print(f"wrote {len(result.files)} files to {args.out} in {result.seconds:.1f} s")
    return 0
