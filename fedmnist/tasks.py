"""What a client executor runs: the federation's data, client and evaluation tasks, and their outcomes.

Tasks are frozen dataclasses the server builds and an executor (``fedmnist.workers``) runs in this
process or sends whole to a worker process. A client task carries the round's
``fedmnist.client.Instructions`` and the client's ``ClientState``; ``execute_task`` runs the whole
``fedmnist.client.client_step`` on them and its ``ClientResult`` carries the reply and the client's new
state back. Evaluation tasks score a slice of the common test set; ``combine_eval`` joins them.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from fedmnist import attacks
from fedmnist.client import ClientReply, ClientState, Instructions, client_step
from fedmnist.config import check_int
from fedmnist.data import IMAGE_SHAPE, NUM_CLASSES, normalize_images
from fedmnist.errors import ConfigError, DataError, WorkerError

if TYPE_CHECKING:
    from fedmnist.evaluation import EvalResult
    from fedmnist.training import ClientTrainer

Weights = list[np.ndarray]

EVAL_SHARD = 2500
"""Test images per evaluation task of a pool (a multiple of ``fedmnist.training.EVAL_BATCH``)."""


# --- configuration and data -------------------------------------------------------------------


def _check_images(name: str, x: np.ndarray) -> None:
    raw = x.dtype == np.uint8 and x.ndim == 3 and x.shape[1:] == IMAGE_SHAPE
    normalised = x.dtype == np.float32 and x.ndim == 4 and x.shape[1:] == (*IMAGE_SHAPE, 1)
    if not (raw or normalised):
        raise DataError(
            f"{name} has dtype {x.dtype} and shape {x.shape}; expected uint8 (n, 28, 28) images or "
            "float32 (n, 28, 28, 1) ones from fedmnist.data.normalize_images"
        )


def _check_labels(name: str, y: np.ndarray, n: int) -> None:
    if y.ndim != 1 or y.shape[0] != n or not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{name} has dtype {y.dtype} and shape {y.shape}; expected ({n},) integer labels")
    if y.size and (y.min() < 0 or y.max() >= NUM_CLASSES):
        raise DataError(f"{name} holds labels outside 0-{NUM_CLASSES - 1}")


@dataclass(frozen=True, eq=False)
class WorkerData:
    """What the workers train and evaluate on: the training set, each client's indices, the test set.

    ``client_indices[k - 1]`` are client ``k``'s rows of ``x_train``/``y_train`` (ids start at 1, as
    in the simulation). Training images are raw uint8; the test images may be raw or normalised.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    client_indices: tuple[np.ndarray, ...]
    x_test: np.ndarray | None = None
    y_test: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.x_train.dtype != np.uint8 or self.x_train.ndim != 3 or self.x_train.shape[1:] != IMAGE_SHAPE:
            raise DataError(
                f"x_train has dtype {self.x_train.dtype} and shape {self.x_train.shape}; "
                "expected raw uint8 (n, 28, 28) images"
            )
        _check_labels("y_train", self.y_train, len(self.x_train))
        indices = tuple(np.asarray(idx) for idx in self.client_indices)
        if not indices:
            raise DataError("no clients: client_indices is empty")
        for k, idx in enumerate(indices, start=1):
            if idx.ndim != 1 or idx.size == 0 or not np.issubdtype(idx.dtype, np.integer):
                raise DataError(
                    f"client {k}'s indices must be a non-empty 1-D integer array (got {idx.shape})"
                )
            if idx.min() < 0 or idx.max() >= len(self.x_train):
                raise DataError(f"client {k}'s indices fall outside the {len(self.x_train)} training images")
        object.__setattr__(self, "client_indices", indices)
        if (self.x_test is None) != (self.y_test is None):
            raise DataError("give both x_test and y_test, or neither")
        if self.x_test is not None:
            _check_images("x_test", self.x_test)
            _check_labels("y_test", self.y_test, len(self.x_test))

    @classmethod
    def from_federation(cls, federation) -> WorkerData:
        """From anything with the simulation's ``Federation`` fields (x/y_train, client_indices, x/y_test)."""
        return cls(
            federation.x_train, federation.y_train, tuple(federation.client_indices),
            federation.x_test, federation.y_test,
        )

    @property
    def num_clients(self) -> int:
        """Number of clients K."""
        return len(self.client_indices)

    @property
    def num_test(self) -> int:
        """Number of test images (0 without a test set)."""
        return 0 if self.y_test is None else len(self.y_test)

    def client_data(self, client_id: int) -> tuple[np.ndarray, np.ndarray]:
        """Client ``client_id``'s (1-based) images, normalised, and labels."""
        idx = self.client_indices[client_id - 1]
        return normalize_images(self.x_train[idx]), self.y_train[idx]

    def test_data(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """Test images ``start:stop``, normalised, and their labels."""
        return normalize_images(self.x_test[start:stop]), self.y_test[start:stop]


# --- tasks and outcomes -----------------------------------------------------------------------


def _check_weights(weights) -> None:
    if not isinstance(weights, (list, tuple)) or not all(isinstance(w, np.ndarray) for w in weights):
        raise ConfigError("task weights must be a list of numpy arrays (model.get_weights() order)")


@dataclass(frozen=True, eq=False)
class ClientTask:
    """Client ``client_id``'s round: ``client_step`` from ``weights`` as ``instructions`` say, for ``epochs`` epochs.

    ``seed`` fixes the shuffling and dropout; ``flip_labels`` trains on ``9 − y`` (label flipping);
    ``state`` is the client's own state (SCAFFOLD's ``c_i``; None: a client that never trained).
    """

    client_id: int
    weights: Weights
    instructions: Instructions
    seed: int
    epochs: int
    batch_size: int
    flip_labels: bool = False
    state: ClientState | None = None
    steps: int | None = None
    """Minibatch steps instead of whole epochs (``ClientTrainer.train``'s ``steps``); None: ``epochs`` epochs."""

    def __post_init__(self) -> None:
        _check_weights(self.weights)
        if not isinstance(self.instructions, Instructions):
            raise ConfigError(f"{self.describe()}: instructions must be a fedmnist.client.Instructions "
                              f"(got {type(self.instructions).__name__})")
        if self.state is not None and not isinstance(self.state, ClientState):
            raise ConfigError(f"{self.describe()}: state must be a fedmnist.client.ClientState or None")
        for name in ("client_id", "seed", "epochs", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
                raise ConfigError(f"{self.describe()}: {name} must be an integer (got {value!r})")
        if self.client_id < 1:
            raise ConfigError(f"client ids start at 1 (got {self.client_id})")
        if self.epochs < 1 or self.batch_size < 1:
            raise ConfigError(f"{self.describe()}: epochs and batch size must be at least 1")
        if self.steps is not None:
            check_int(self.steps, f"{self.describe()}: local steps", 1, numpy=True)
        if self.seed < 0:
            raise ConfigError(f"{self.describe()}: the seed must be >= 0 (got {self.seed})")

    def describe(self) -> str:
        """What the task is, for messages."""
        return f"client {self.client_id}"


@dataclass(frozen=True, eq=False)
class EvalTask:
    """Evaluate ``weights`` on the executor's test images ``start:stop`` (None: to the end)."""

    weights: Weights
    start: int = 0
    stop: int | None = None

    def __post_init__(self) -> None:
        _check_weights(self.weights)
        if self.start < 0 or (self.stop is not None and self.stop <= self.start):
            raise ConfigError(f"empty or negative test range {self.start}:{self.stop}")

    def describe(self) -> str:
        """What the task is, for messages."""
        return f"evaluation of test images {self.start}:{'' if self.stop is None else self.stop}"


@dataclass(eq=False)
class ClientResult:
    """What a client's round returned: its reply (``fedmnist.client.ClientReply``) and its new state."""

    client_id: int
    reply: ClientReply
    state: ClientState | None = None
    seconds: float = 0.0


@dataclass(eq=False)
class EvalPart:
    """Mean loss and predicted labels of one ``EvalTask``."""

    start: int
    stop: int
    loss: float
    predictions: np.ndarray
    seconds: float = 0.0


@dataclass(frozen=True)
class TaskFailure:
    """Task ``index`` of a batch did not complete; ``client_id`` is None for an evaluation."""

    index: int
    client_id: int | None
    message: str


Task = ClientTask | EvalTask
Outcome = ClientResult | EvalPart | TaskFailure


def execute_task(trainer: ClientTrainer, data: WorkerData, task: Task) -> ClientResult | EvalPart:
    """Run one task with ``trainer`` on ``data``: the one code path of every executor."""
    t0 = time.perf_counter()
    if isinstance(task, ClientTask):
        x, y = data.client_data(task.client_id)
        if task.flip_labels:
            y = attacks.flip_labels(y)
        reply, state = client_step(trainer, task.weights, x, y, task.instructions, task.state,
                                   epochs=task.epochs, batch_size=task.batch_size, seed=task.seed,
                                   client_id=task.client_id, steps=task.steps)
        return ClientResult(task.client_id, reply, state, time.perf_counter() - t0)
    if isinstance(task, EvalTask):
        stop = data.num_test if task.stop is None else min(task.stop, data.num_test)
        x, y = data.test_data(task.start, stop)
        loss, predicted = trainer.predict(task.weights, x, y)
        return EvalPart(task.start, stop, loss, predicted, time.perf_counter() - t0)
    raise ConfigError(f"unknown task type {type(task).__name__}")


def check_tasks(tasks: Sequence[Task], data: WorkerData) -> None:
    for task in tasks:
        if isinstance(task, ClientTask):
            if task.client_id > data.num_clients:
                raise ConfigError(
                    f"client {task.client_id} does not exist: there are {data.num_clients} clients"
                )
        elif isinstance(task, EvalTask):
            if data.num_test == 0:
                raise ConfigError("an evaluation task needs a test set: give WorkerData x_test and y_test")
            if task.start >= data.num_test:
                raise ConfigError(f"{task.describe()}: the test set has only {data.num_test} images")
        else:
            raise ConfigError(f"unknown task type {type(task).__name__}")


def eval_tasks(weights: Weights, num_test: int, shard: int | None) -> list[EvalTask]:
    """Tasks evaluating ``weights`` on ``num_test`` test images in shards of ``shard`` (None: one task)."""
    if shard is None or shard >= num_test:
        return [EvalTask(weights)]
    if shard < 1:
        raise ConfigError(f"the evaluation shard must hold at least one image (got {shard})")
    return [EvalTask(weights, start, min(start + shard, num_test)) for start in range(0, num_test, shard)]


def combine_eval(parts: Sequence[Outcome], y_test: np.ndarray) -> EvalResult:
    """One ``EvalResult`` from the parts of ``eval_tasks`` (the loss is their example-weighted mean).

    Raises:
        WorkerError: a part failed.
    """
    from fedmnist.evaluation import summarize

    failed = [p for p in parts if isinstance(p, TaskFailure)]
    if failed:
        raise WorkerError(f"evaluation failed: {failed[0].message}")
    if len(parts) == 1:
        return summarize(y_test[parts[0].start: parts[0].stop], parts[0].predictions, parts[0].loss)
    sizes = np.array([p.stop - p.start for p in parts], dtype=np.float64)
    loss = float(np.dot(sizes, [p.loss for p in parts]) / sizes.sum())
    predicted = np.concatenate([p.predictions for p in parts])
    return summarize(y_test[parts[0].start: parts[-1].stop], predicted, loss)


