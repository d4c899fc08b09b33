"""The drift experiment: how much local work it takes for one-shot FedAvg to lose to its own clients.

A grid over the clients' local training (optimiser and learning rate × local epochs × partition): for
every setting and seed, ``clients`` clients train one round from one shared start w₀ =
``initial_weights(seed)``, on a split of ``train_subset`` training images. Per setting we measure

* the drift itself (``fedmnist.drift``): the mean ‖w_k − w₀‖, the mean cosine between the clients'
  updates, and the loss barrier on the segment between disjoint pairs of clients (clients 1-2, 3-4…)
  on the first ``barrier_images`` test images;
* the local models' mean accuracy, one-shot FedAvg's (their weighted average) and FedProx's (the same
  clients trained with the proximal term), all on the whole test set.

FedProx's μ is chosen for every (optimiser, partition, epochs) on validation: the clients draw their
images from the training set minus ``validation_size`` held-out images (``fedmnist.tuning``, first
seed), every μ of ``mu_grid`` trains the first seed's clients, and the μ whose average scores best on
the held-out images is the one every seed uses. Client k of seed s trains with the seed
``training_seed(s, 1, k)``, as in the course flow and the simulation.

The trainings run in an executor (``fedmnist.workers``: one ``WorkerPool`` per optimiser, or this
process); every finished (optimiser, partition, seed) block is saved to a JSON ``cache``, which a
rerun with the same grid and data continues.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from fedmnist.errors import ConfigError, FedMnistError
from fedmnist.io import read_text_capped

log = logging.getLogger(__name__)

SEGMENT_POINTS = 11
"""Models evaluated along each segment between two clients (t = 0, 0.1, …, 1)."""


@dataclass(frozen=True)
class DriftGrid:
    """The settings of the drift experiment (``Profile.drift_*`` in ``fedmnist.experiments``)."""

    seeds: tuple[int, ...]
    clients: int
    train_subset: int
    optimizers: tuple[tuple[str, float, float], ...]
    epochs: tuple[int, ...]
    partitions: tuple[str, ...]
    mu_grid: tuple[float, ...]
    validation_size: int
    batch_size: int = 32
    barrier_images: int = 1_000
    barrier_pairs: int = 2

    def __post_init__(self) -> None:
        from fedmnist.labels import partition_settings

        if not self.seeds or self.clients < 2 or self.train_subset < self.clients:
            raise ConfigError("the drift grid needs seeds, at least 2 clients and an image per client")
        if not self.epochs or any(e < 1 for e in self.epochs) or not self.mu_grid or min(self.mu_grid) <= 0:
            raise ConfigError("the drift grid needs local epochs >= 1 and FedProx coefficients mu > 0")
        if not 0 <= self.barrier_pairs <= self.clients // 2:
            raise ConfigError(
                f"{self.barrier_pairs} disjoint pairs cannot be drawn from {self.clients} clients"
            )
        for label in self.partitions:
            partition_settings(label)


def _fingerprint(grid: DriftGrid, mnist) -> str:
    digest = hashlib.sha256(json.dumps(asdict(grid), sort_keys=True).encode())
    for array in (mnist.y_train, mnist.y_test):
        digest.update(memoryview(np.ascontiguousarray(array)))
    digest.update(memoryview(np.ascontiguousarray(mnist.x_train[:: max(1, len(mnist.x_train) // 100)])))
    return digest.hexdigest()


CACHE_MAX_BYTES = 64 << 20
"""Largest drift cache read back: a grid's blocks of numbers take a few hundred kilobytes."""


class _Cache:
    """Finished blocks of the grid, by key, saved as JSON after every block (atomically)."""

    def __init__(self, path: Path | None, fingerprint: str) -> None:
        self.path, self.fingerprint, self.blocks = path, fingerprint, {}
        if path is not None and path.exists():
            try:  # a FIFO or a device in its place is ignored unread
                saved = json.loads(read_text_capped(path, CACHE_MAX_BYTES, "drift cache", error=FedMnistError))
            except (FedMnistError, ValueError, RecursionError) as exc:
                log.warning("ignoring the drift cache %s: %s", path, exc)
                return
            if (
                isinstance(saved, dict)
                and saved.get("fingerprint") == fingerprint
                and isinstance(saved.get("blocks"), dict)
            ):
                self.blocks = saved["blocks"]
            else:
                log.info("the drift cache %s comes from other settings or data: starting afresh", path)

    def get(self, key: str) -> dict | None:
        return self.blocks.get(key)

    def put(self, key: str, block: dict) -> None:
        from fedmnist.io import atomic_write_text

        self.blocks[key] = block
        if self.path is not None:
            atomic_write_text(
                self.path,
                json.dumps({"fingerprint": self.fingerprint, "blocks": self.blocks}, allow_nan=True) + "\n",
            )


def optimizer_key(optimizer: tuple[str, float, float]) -> str:
    """A short name of an (optimizer, learning rate, momentum) setting: ``sgd_lr0.05_m0.9``."""
    name, lr, momentum = optimizer
    return f"{name}_lr{lr:g}_m{momentum:g}"


def run_drift_grid(
    grid: DriftGrid,
    mnist,
    make_executor: Callable,
    evaluator,
    say: Callable[[str], None],
    cache: Path | None = None,
) -> tuple[list[dict], list[dict]]:
    """Run the grid; return one row per (seed, optimiser, partition, epochs) and the μ tuning rows.

    ``make_executor(WorkerData, TrainingConfig)`` gives the executor the trainings and test
    evaluations run in (``fedmnist.experiments.common.make_executor``); ``evaluator`` (a ``ClientTrainer``) scores
    the FedProx candidates on the held-out validation images in this process.
    """
    from fedmnist.config import TrainingConfig
    from fedmnist.data import normalize_images
    from fedmnist.evaluation import evaluate
    from fedmnist.labels import partition_settings
    from fedmnist.partition import PartitionConfig, partition
    from fedmnist.settings import default
    from fedmnist.tasks import WorkerData
    from fedmnist.tuning import validation_split

    tuning = validation_split(mnist, grid.validation_size, grid.seeds[0])
    if grid.train_subset > tuning.y_train.size:
        raise ConfigError(
            f"the drift grid asks for {grid.train_subset} training images, but only "
            f"{tuning.y_train.size} remain after the validation hold-out"
        )
    x_pool, y_pool = tuning.x_train[: grid.train_subset], tuning.y_train[: grid.train_subset]
    validation = (normalize_images(tuning.x_test), tuning.y_test)
    store = _Cache(cache, _fingerprint(grid, mnist))
    ids, clients = {}, []
    for label in grid.partitions:
        settings = partition_settings(label)
        for seed in grid.seeds:
            split = PartitionConfig(
                settings["partition"],
                grid.clients,
                settings.get("alpha", default("alpha")),
                settings.get("shards_per_client", default("shards-per-client")),
                seed,
            )
            for k, idx in enumerate(partition(y_pool, split), start=1):
                clients.append(idx)
                ids[label, seed, k] = len(clients)
    data = WorkerData(x_pool, y_pool, tuple(clients), normalize_images(mnist.x_test), mnist.y_test)
    rows, tuning_rows = [], []
    for optimizer in grid.optimizers:
        keys = {
            (label, seed): f"{optimizer_key(optimizer)}|{label}|{seed}"
            for label in grid.partitions
            for seed in grid.seeds
        }
        missing = [k for k in keys.values() if store.get(k) is None]
        executor = make_executor(data, TrainingConfig(optimizer=optimizer[0], learning_rate=optimizer[1], momentum=optimizer[2])) if missing else None
        try:
            for label in grid.partitions:
                chosen: dict[int, float] = {}
                for seed in grid.seeds:
                    key = keys[label, seed]
                    block = store.get(key)
                    if block is None:
                        t0 = time.perf_counter()
                        block = _run_block(
                            grid,
                            executor,
                            ids,
                            label,
                            seed,
                            optimizer,
                            chosen,
                            lambda w: evaluate(evaluator, w, *validation).accuracy,
                        )
                        block["seconds"] = round(time.perf_counter() - t0, 1)
                        for row in block["rows"]:
                            row["block_seconds"] = block["seconds"]
                        store.put(key, block)
                    chosen = {int(e): float(mu) for e, mu in block["mu"].items()}
                    rows += block["rows"]
                    tuning_rows += block["tuning"]
                    say(f"  drift {optimizer_key(optimizer)} {label} seed {seed} done")
        finally:
            if executor is not None:
                executor.close()
    return rows, tuning_rows


def _run_block(
    grid: DriftGrid,
    executor,
    ids: dict,
    label: str,
    seed: int,
    optimizer: tuple[str, float, float],
    chosen: dict[int, float],
    validation_accuracy: Callable,
) -> dict:
    """One (optimiser, partition, seed) block: every epoch count, plain and FedProx clients, measured.

    ``chosen`` maps epochs to μ; empty for the first seed, whose block tries every μ on validation
    (``validation_accuracy(weights)``).
    """
    from fedmnist.client import Instructions
    from fedmnist.drift import barrier, segment, update_cosines, update_norms
    from fedmnist.experiments.common import task_outcomes
    from fedmnist.model import initial_weights
    from fedmnist.seeds import training_seed
    from fedmnist.strategies import weighted_average
    from fedmnist.tasks import ClientTask, EvalTask

    start = initial_weights(seed)
    ks = range(1, grid.clients + 1)
    tuning = not chosen

    def batch(epochs: int, mu: float):
        return executor.submit(
            [
                ClientTask(ids[label, seed, k], start, Instructions(1, mu), training_seed(seed, 1, k), epochs,
                           grid.batch_size)
                for k in ks
            ]
        )

    pending = {
        e: {
            "plain": batch(e, 0.0),
            "prox": {mu: batch(e, mu) for mu in (grid.mu_grid if tuning else (chosen[e],))},
        }
        for e in grid.epochs
    }
    rows, tuning_rows, mus = [], [], {}
    for epochs in grid.epochs:
        plain = task_outcomes(pending[epochs]["plain"])
        locals_ = [o.reply.weights for o in plain]
        prox = {mu: task_outcomes(p) for mu, p in pending[epochs]["prox"].items()}
        averages = {
            mu: weighted_average([(o.reply.weights, o.reply.num_examples) for o in outcomes])
            for mu, outcomes in prox.items()
        }
        if tuning:
            scores = {mu: float(validation_accuracy(w)) for mu, w in averages.items()}
            mu = max(scores, key=lambda m: (scores[m], -list(scores).index(m)))  # first of equals
            tuning_rows += [
                {
                    "optimizer": optimizer[0],
                    "learning_rate": optimizer[1],
                    "momentum": optimizer[2],
                    "partition": label,
                    "epochs": epochs,
                    "mu": m,
                    "validation_images": grid.validation_size,
                    "validation_accuracy": s,
                    "chosen": m == mu,
                }
                for m, s in scores.items()
            ]
        else:
            mu = chosen[epochs]
        mus[epochs] = mu
        fedavg = weighted_average([(o.reply.weights, o.reply.num_examples) for o in plain])
        models = [*locals_, fedavg, averages[mu]]
        evaluations = [executor.submit_evaluation(w) for w in models]
        pairs = [(locals_[2 * i], locals_[2 * i + 1]) for i in range(grid.barrier_pairs)]
        segments = [
            executor.submit(
                [EvalTask(model, 0, grid.barrier_images) for model in segment(a, b, SEGMENT_POINTS)]
            )
            for a, b in pairs
        ]
        scores = [e.result() for e in evaluations]
        barriers = [barrier([part.loss for part in task_outcomes(s)]) for s in segments]
        local_acc = [s.accuracy for s in scores[: len(locals_)]]
        rows.append(
            {
                "seed": seed,
                "partition": label,
                "optimizer": optimizer[0],
                "learning_rate": optimizer[1],
                "momentum": optimizer[2],
                "epochs": epochs,
                "batch_size": grid.batch_size,
                "clients": grid.clients,
                "images_per_client": float(np.mean([o.reply.num_examples for o in plain])),
                "local_steps": float(np.mean([o.reply.num_steps for o in plain])),
                "update_norm": float(np.mean(update_norms(start, locals_))),
                "update_cosine": float(np.mean(update_cosines(start, locals_))),
                "barrier": float(np.mean(barriers)) if barriers else float("nan"),
                "barrier_images": grid.barrier_images,
                "test_images": int(scores[-1].num_examples),
                "locals_accuracy": float(np.mean(local_acc)),
                "locals_accuracy_min": float(np.min(local_acc)),
                "locals_loss": float(np.mean([s.loss for s in scores[: len(locals_)]])),
                "fedavg_accuracy": float(scores[-2].accuracy),
                "fedavg_loss": float(scores[-2].loss),
                "mu": mu,
                "fedprox_accuracy": float(scores[-1].accuracy),
                "fedprox_loss": float(scores[-1].loss),
                "fedprox_update_norm": float(np.mean(update_norms(start, [o.reply.weights for o in prox[mu]]))),
                "train_task_seconds": round(
                    sum(o.seconds for o in plain) + sum(o.seconds for p in prox.values() for o in p), 1
                ),
            }
        )
    return {"rows": rows, "tuning": tuning_rows, "mu": {str(e): m for e, m in mus.items()}}
