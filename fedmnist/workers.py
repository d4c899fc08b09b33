"""Client executors: a round's local trainings (and evaluations) in this process or in N worker processes.

The server decides *what* to run (which clients, from which weights, with which seed and instructions) and
hands the executor a list of tasks; the executor decides *where* they run and returns one outcome per
task, **in task order** whatever the order they finish in, so the server aggregates in the same order
for any number of workers.

* ``InProcessExecutor``: one ``ClientTrainer`` in this process runs the tasks one after another
  (the simulation's behaviour so far).
* ``WorkerPool``: N worker processes (started with ``spawn``: TensorFlow is not fork-safe), each
  building ONE ``ClientTrainer`` when it starts and reusing its compiled model for every client and
  round. Tasks go to whichever worker is idle; outcomes are put back in task order.

Numbers. TensorFlow's CPU kernels may sum in an order that depends on how many threads they use, so
weights trained with 1 thread and with 2 may differ in their last bits. Each worker therefore runs
with a fixed thread setting, ``threads`` intra-op threads (default 1) and 1 inter-op thread, chosen
independently of N: every task gives the same result bit for bit in any worker of any pool, and the
global weights of every round are identical for N = 1, 2, ... The in-process executor with
``threads=T`` (TensorFlow pinned to T intra-op and 1 inter-op thread) gives those same numbers; with
``threads=None`` it keeps TensorFlow's default thread pools (one thread per core), as runs before the
workers mode did, whose last bits can therefore differ from the workers mode's and from machine to
machine (on a 2-core machine, 1 and 2 threads already differ by up to 3e-8 after one local epoch).

Data. The training images (raw uint8), labels, every client's index array and the test set are
copied ONCE into a ``multiprocessing.shared_memory`` segment that the workers map read-only; a task
carries only the client id, the start weights, the round's instructions, the client's state and the
training settings. Images are normalised as
``fedmnist.data.normalize_images`` does, and label flipping (``fedmnist.attacks.flip_labels``) happens
in the worker. Model-poisoning attacks stay with the server: they transform a returned update.

Failures. A task that raises returns a ``TaskFailure`` naming the client. A worker that dies (killed,
out of memory) fails the task it held with a message naming the client and the signal, and the pool
starts a replacement. Workers ignore Ctrl-C (the parent handles it and closes the pool), exit as soon
as the parent process is gone (they watch a pipe only the parent holds), and are killed by
``close()``, which also unlinks the shared memory; ``close()`` runs on leaving a ``with`` block, on
any exception (KeyboardInterrupt included) while waiting for workers, and when the pool is collected
or the interpreter exits.

Tasks are frozen dataclasses sent whole to the workers. A client task carries the round's
``fedmnist.client.Instructions`` and the client's ``ClientState``; ``execute_task`` runs the whole
``fedmnist.client.client_step`` on them and its ``ClientResult`` carries the reply and the client's new
state back, so a new client-side rule needs no change here. Messages between the parent and its own
workers are pickled by ``multiprocessing``; nothing read from a file is unpickled here.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import signal
import threading
import time
import traceback
import weakref
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from multiprocessing import connection, shared_memory
from typing import TYPE_CHECKING

import numpy as np

from fedmnist.config import DEFAULT_SEED, TrainingConfig
from fedmnist.data import IMAGE_SHAPE
from fedmnist.errors import ConfigError, WorkerError
from fedmnist.shared_data import SharedSpec, pack, share, unpack
from fedmnist.tasks import (
    EVAL_SHARD,
    Outcome,
    Task,
    TaskFailure,
    WorkerData,
    check_tasks,
    combine_eval,
    eval_tasks,
    execute_task,
)

if TYPE_CHECKING:
    from fedmnist.evaluation import EvalResult
    from fedmnist.training import ClientTrainer

Weights = list[np.ndarray]

DEFAULT_THREADS = 1
"""Intra-op threads per worker; fixed whatever the number of workers, so results do not depend on N."""
START_TIMEOUT = 600.0
CLOSE_TIMEOUT = 10.0
_ENV_LOCK = threading.Lock()




# --- executors --------------------------------------------------------------------------------


class PendingTasks:
    """The outcomes of a submitted batch; ``result()`` waits for them, in task order."""

    def __init__(self, count: int, wait_one=None) -> None:
        self._outcomes: list[Outcome | None] = [None] * count
        self._left = count
        self._wait_one = wait_one

    def _set(self, index: int, outcome: Outcome) -> None:
        if self._outcomes[index] is None:
            self._left -= 1
        self._outcomes[index] = outcome

    def done(self) -> bool:
        """Whether every task has an outcome."""
        return self._left == 0

    def result(self) -> list[Outcome]:
        """Block until every task has finished or failed; one outcome per task, in task order."""
        while self._left:
            self._wait_one()
        return list(self._outcomes)


class PendingEvaluation:
    """A submitted evaluation; ``result()`` waits and combines its parts into an ``EvalResult``."""

    def __init__(self, pending: PendingTasks, y_test: np.ndarray) -> None:
        self._pending, self._y_test = pending, y_test

    def done(self) -> bool:
        """Whether every part has finished."""
        return self._pending.done()

    def result(self) -> EvalResult:
        """The evaluation's metrics (raises WorkerError if a part failed)."""
        return combine_eval(self._pending.result(), self._y_test)


class ClientExecutor(ABC):
    """Runs tasks on ``data``; outcomes come back in task order. Close it (or use ``with``) when done."""

    data: WorkerData
    eval_shard: int | None

    @abstractmethod
    def submit(self, tasks: Sequence[Task]) -> PendingTasks:
        """Start ``tasks``; their outcomes come from the returned ``PendingTasks.result()``."""

    def run(self, tasks: Sequence[Task]) -> list[Outcome]:
        """Run ``tasks`` and return one outcome per task, in task order."""
        return self.submit(tasks).result()

    def submit_evaluation(self, weights: Weights) -> PendingEvaluation:
        """Start evaluating ``weights`` on the test set (in ``eval_shard`` shards), e.g. beside training."""
        pending = self.submit(eval_tasks(weights, self.data.num_test, self.eval_shard))
        return PendingEvaluation(pending, self.data.y_test)

    def evaluate(self, weights: Weights) -> EvalResult:
        """Metrics of ``weights`` on the test set."""
        return self.submit_evaluation(weights).result()

    def close(self) -> None:  # noqa: B027 - nothing to release by default
        """Release the executor's resources (idempotent)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def pin_threads(threads: int) -> None:
    """Fix this process's TensorFlow thread pools at ``threads`` intra-op and 1 inter-op thread.

    Must run before TensorFlow executes its first operation in the process.

    Raises:
        ConfigError: TensorFlow already runs here with other thread pools.
    """
    if not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
        raise ConfigError(f"threads per worker must be a positive integer (got {threads!r})")
    wanted = _thread_env(threads)
    preset = all(os.environ.get(k) == wanted[k] for k in ("TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS"))
    os.environ.update(wanted)
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    except RuntimeError:
        if preset:  # TensorFlow started with these variables already set: it runs with these threads
            return
        raise ConfigError(
            f"TensorFlow already runs in this process with its default threads, so it cannot be pinned to "
            f"{threads}; set TF_NUM_INTRAOP_THREADS={threads} TF_NUM_INTEROP_THREADS=1 before starting "
            "Python, or pin the threads before any TensorFlow computation"
        ) from None


def warm_up(trainer: ClientTrainer) -> None:
    """Trace the trainer's plain and FedProx epochs and its evaluation on a few blank images.

    Tracing alters no state later tasks depend on (every task sets the weights and resets the
    optimizer and dropout state), so numbers are the same with or without it.
    """
    weights = trainer.get_weights()
    x, y = np.zeros((2, *IMAGE_SHAPE, 1), np.float32), np.zeros(2, np.uint8)
    for mu in (0.0, 0.01):
        trainer.train(weights, x, y, epochs=1, batch_size=2, mu=mu, seed=0)
    trainer.predict(weights, x, y)


class InProcessExecutor(ClientExecutor):
    """One ``ClientTrainer`` in this process runs the tasks one after another, when submitted.

    ``threads=None`` leaves TensorFlow's default thread pools; ``threads=T`` pins them (see
    ``pin_threads``), which gives the same numbers as a ``WorkerPool`` with ``threads=T`` (use the
    pool's ``eval_shard`` too for identical evaluation losses).
    ``settings`` is the clients' local training (its optimizer, rate and momentum build the trainer; the
    tasks carry epochs and batch size) and ``model_seed`` the trainer's model seed. ``trainer`` reuses an
    existing trainer built with ``settings``.
    """

    def __init__(
        self,
        data: WorkerData,
        settings: TrainingConfig | None = None,
        *,
        model_seed: int = DEFAULT_SEED,
        trainer: ClientTrainer | None = None,
        threads: int | None = None,
        eval_shard: int | None = None,
    ) -> None:
        self.data, self.settings, self.eval_shard = data, settings or TrainingConfig(), eval_shard
        self.settings.validate()
        if threads is not None:
            pin_threads(threads)
        self.trainer = trainer if trainer is not None else self.settings.build_trainer(model_seed)

    def submit(self, tasks: Sequence[Task]) -> PendingTasks:
        """Run ``tasks`` now, in order; a task that raises gives a ``TaskFailure``."""
        check_tasks(tasks, self.data)
        pending = PendingTasks(len(tasks))
        for index, task in enumerate(tasks):
            try:
                outcome = execute_task(self.trainer, self.data, task)
            except Exception as exc:
                outcome = TaskFailure(index, getattr(task, "client_id", None),
                                      f"{task.describe()} failed: {type(exc).__name__}: {exc}")
            pending._set(index, outcome)
        return pending


# --- the worker process -----------------------------------------------------------------------


def _thread_env(threads: int) -> dict[str, str]:
    return {
        "TF_NUM_INTRAOP_THREADS": str(threads), "TF_NUM_INTEROP_THREADS": "1", "OMP_NUM_THREADS": str(threads)
    }


@contextlib.contextmanager
def _child_environment(threads: int) -> Iterator[None]:
    """Set the thread variables while a worker is spawned, so they hold before it imports TensorFlow."""
    variables = {**_thread_env(threads), "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2")}
    with _ENV_LOCK:
        saved = {k: os.environ.get(k) for k in variables}
        os.environ.update(variables)
        try:
            yield
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


def _exit_with_parent(lifeline) -> None:
    """Block on a pipe only the parent writes to; exit once it closes (the pool closed or the parent died)."""
    with contextlib.suppress(EOFError, OSError):
        while True:
            lifeline.recv()
    os._exit(1)


def _limit_gpu_memory() -> None:
    """Let several workers share an accelerator: allocate its memory as needed, not all at start."""
    import tensorflow as tf

    for gpu in tf.config.list_physical_devices("GPU"):
        with contextlib.suppress(RuntimeError, ValueError):
            tf.config.experimental.set_memory_growth(gpu, True)


def _worker_main(conn, lifeline, spec: SharedSpec, settings: TrainingConfig, model_seed: int, threads: int) -> None:
    """A worker: build one trainer, then run tasks from ``conn`` until told to stop or orphaned."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    threading.Thread(target=_exit_with_parent, args=(lifeline,), daemon=True).start()
    try:
        os.environ.update(_thread_env(threads))
        _block, arrays = spec.attach()
        data = unpack(arrays)
        pin_threads(threads)
        _limit_gpu_memory()
        trainer = settings.build_trainer(model_seed)
        warm_up(trainer)
    except BaseException:
        with contextlib.suppress(OSError):
            conn.send(("failed", traceback.format_exc()))
        os._exit(1)
    conn.send(("ready", os.getpid()))
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            break
        if message is None:
            break
        task = message
        try:
            reply = ("done", execute_task(trainer, data, task))
        except Exception as exc:
            reply = ("error", f"{type(exc).__name__}: {exc}")
        try:
            conn.send(reply)
        except (OSError, ValueError):
            break
    os._exit(0)  # skip TensorFlow's slow teardown; the parent owns the shared memory


# --- the pool ---------------------------------------------------------------------------------


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def resolve_workers(workers: int | str, threads: int = DEFAULT_THREADS) -> int:
    """The number of worker processes: ``workers``, or for 'auto' the usable cores ÷ ``threads``."""
    if workers == "auto":
        return max(1, usable_cores() // threads)
    if isinstance(workers, str) and workers.isdigit():
        workers = int(workers)
    if not isinstance(workers, (int, np.integer)) or isinstance(workers, bool) or workers < 1:
        raise ConfigError(f"the number of workers must be a positive integer or 'auto' (got {workers!r})")
    return int(workers)


def describe_exit(exitcode: int | None) -> str:
    """A dead process's exit code in words."""
    if exitcode is None:
        return "stopped responding"
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        hint = " (killed from outside, e.g. by the out-of-memory killer)" if name == "SIGKILL" else ""
        return f"was killed by {name}{hint}"
    return f"exited with status {exitcode}"


@dataclass(eq=False)
class _Worker:
    process: mp.process.BaseProcess
    conn: connection.Connection
    lifeline: connection.Connection
    ready: bool = False
    job: tuple[PendingTasks, int, Task] | None = None
    startup_error: str | None = None


def _shutdown(workers: list[_Worker], block: shared_memory.SharedMemory | None, timeout: float) -> None:
    """Stop every worker (politely, then by force) and unlink the shared memory; safe to call twice."""
    current = list(workers)
    workers.clear()
    for worker in current:
        if worker.ready and worker.job is None:
            with contextlib.suppress(OSError, ValueError):
                worker.conn.send(None)
        worker.lifeline.close()  # busy or starting workers exit on their own once this closes
    deadline = time.monotonic() + timeout
    for worker in current:
        worker.process.join(max(0.0, deadline - time.monotonic()))
    for worker in current:
        if worker.process.exitcode is None:
            worker.process.kill()
            worker.process.join(5)
        worker.conn.close()
    if block is not None:
        with contextlib.suppress(BufferError):
            block.close()
        with contextlib.suppress(FileNotFoundError):
            block.unlink()


class WorkerPool(ClientExecutor):
    """``num_workers`` processes ('auto': one per usable core), each with one reusable ``ClientTrainer``.

    Every worker runs TensorFlow with ``threads`` intra-op threads and 1 inter-op thread, whatever
    ``num_workers`` is, so outcomes are identical for any number of workers. Evaluations are split
    into tasks of ``eval_shard`` test images (fixed, so they do not depend on N either) that run in
    parallel, or beside the next round's training when submitted before it. The constructor returns
    once every worker has built and traced its model (seconds: each imports TensorFlow). Workers are
    started with ``spawn`` (fresh interpreters; ``fork`` is unsafe with TensorFlow), so the caller's
    ``__main__`` must be importable without side effects (``if __name__ == "__main__":``). Use a pool
    from one thread at a time.

    Raises:
        ConfigError: invalid settings.
        WorkerError: a worker could not start (its error is in the message).
    """

    def __init__(
        self,
        num_workers: int | str,
        data: WorkerData,
        settings: TrainingConfig | None = None,
        *,
        model_seed: int = DEFAULT_SEED,
        threads: int = DEFAULT_THREADS,
        eval_shard: int | None = EVAL_SHARD,
        start_timeout: float = START_TIMEOUT,
    ) -> None:
        if not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
            raise ConfigError(f"threads per worker must be a positive integer (got {threads!r})")
        self.num_workers = resolve_workers(num_workers, threads)
        self.data, self.settings, self.model_seed = data, settings or TrainingConfig(), model_seed
        self.settings.validate()
        self.threads, self.eval_shard = threads, eval_shard
        self._ctx = mp.get_context("spawn")
        self._workers: list[_Worker] = []
        self._queue: deque[tuple[PendingTasks, int, Task]] = deque()
        self._closed = False
        self._spec, self._block = share(pack(data))
        self._finalizer = weakref.finalize(self, _shutdown, self._workers, self._block, CLOSE_TIMEOUT)
        try:
            for _ in range(self.num_workers):
                self._spawn()
            deadline = time.monotonic() + start_timeout
            while not all(w.ready for w in self._workers):
                if time.monotonic() > deadline:
                    raise WorkerError(f"the workers did not start within {start_timeout:.0f} s")
                self._wait_one(timeout=max(0.0, deadline - time.monotonic()))
        except BaseException:
            self.close()
            raise

    # public ------------------------------------------------------------------------------------

    @property
    def pids(self) -> list[int]:
        """Process ids of the current workers."""
        return [w.process.pid for w in self._workers]

    @property
    def shared_memory_name(self) -> str | None:
        """Name of the shared-memory segment holding the data (None: each worker got a copy)."""
        return self._spec.name

    def submit(self, tasks: Sequence[Task]) -> PendingTasks:
        """Queue ``tasks``; idle workers start at once. Later batches queue behind earlier ones."""
        if self._closed:
            raise WorkerError("the worker pool is closed")
        check_tasks(tasks, self.data)
        pending = PendingTasks(len(tasks), self._wait_one)
        self._queue.extend((pending, index, task) for index, task in enumerate(tasks))
        self._guarded(self._dispatch)
        return pending

    def close(self) -> None:
        """Stop the workers (abandoning running tasks) and free the shared memory; idempotent."""
        if self._closed:
            return
        self._closed = True
        abandoned = [w.job for w in self._workers if w.job is not None] + list(self._queue)
        self._queue.clear()
        self._finalizer()
        for pending, index, task in abandoned:
            pending._set(index, TaskFailure(index, getattr(task, "client_id", None),
                                            f"{task.describe()} was abandoned: the worker pool was closed"))

    # internals ---------------------------------------------------------------------------------

    def _guarded(self, step, *args) -> None:
        """Run a step of the pool; any exception (Ctrl-C included) closes the pool before it propagates."""
        try:
            step(*args)
        except BaseException:
            self.close()
            raise

    def _spawn(self) -> None:
        parent_conn, child_conn = self._ctx.Pipe(duplex=True)
        life_read, life_write = self._ctx.Pipe(duplex=False)
        process = self._ctx.Process(
            target=_worker_main,
            args=(child_conn, life_read, self._spec, self.settings, self.model_seed, self.threads),
            name="fedmnist-worker",
            daemon=True,
        )
        with _child_environment(self.threads):
            process.start()
        child_conn.close()
        life_read.close()
        self._workers.append(_Worker(process, parent_conn, life_write))

    def _wait_one(self, timeout: float | None = None) -> None:
        if self._closed:
            raise WorkerError("the worker pool was closed before these tasks finished")
        self._guarded(self._handle_events, timeout)

    def _handle_events(self, timeout: float | None) -> None:
        """Wait for a message or a death among the workers, handle it, and hand out queued tasks."""
        owners = {}
        for worker in self._workers:
            owners[worker.conn] = worker
            owners[worker.process.sentinel] = worker
        for ready in connection.wait(list(owners), timeout):
            worker = owners[ready]
            if worker not in self._workers:
                continue
            if ready is worker.conn:
                self._receive(worker)
            else:
                while worker in self._workers and worker.conn.poll():
                    self._receive(worker)
                if worker in self._workers:
                    self._bury(worker)
        self._dispatch()

    def _receive(self, worker: _Worker) -> None:
        try:
            kind, payload = worker.conn.recv()
        except (EOFError, OSError):
            self._bury(worker)
            return
        if kind == "ready":
            worker.ready = True
        elif kind == "failed":
            worker.startup_error = payload
        elif worker.job is not None:
            pending, index, task = worker.job
            worker.job = None
            if kind == "done":
                pending._set(index, payload)
            else:
                message = f"{task.describe()} failed in worker {worker.process.pid}: {payload}"
                pending._set(index, TaskFailure(index, getattr(task, "client_id", None), message))

    def _bury(self, worker: _Worker) -> None:
        """A worker died: fail its task, or stop the pool if it never started; start a replacement."""
        self._workers.remove(worker)
        worker.process.join(5)
        how = describe_exit(worker.process.exitcode)
        worker.lifeline.close()
        worker.conn.close()
        if not worker.ready:
            detail = (worker.startup_error or "").strip().splitlines()
            raise WorkerError(
                f"a worker process could not start: it {how}" + (f" ({detail[-1]})" if detail else "")
            )
        if worker.job is not None:
            pending, index, task = worker.job
            pending._set(index, TaskFailure(
                index, getattr(task, "client_id", None),
                f"{task.describe()} failed: worker process {worker.process.pid} {how} while running it",
            ))
        self._spawn()

    def _dispatch(self) -> None:
        for worker in list(self._workers):
            if not self._queue:
                return
            if worker.ready and worker.job is None:
                job = self._queue.popleft()
                worker.job = job
                try:
                    worker.conn.send(job[2])
                except (OSError, ValueError):  # it died before taking the task: give the task to another
                    worker.job = None
                    self._queue.appendleft(job)
                    self._bury(worker)

