"""Client executors: same numbers for any number of workers and in process, failures, no processes left."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from fedmnist.client import Instructions
from fedmnist.config import TrainingConfig
from fedmnist.data import Mnist, normalize_images
from fedmnist.errors import ConfigError, DataError, WorkerError
from fedmnist.evaluation import summarize
from fedmnist.shared_data import compact_test_images, pack, share, unpack
from fedmnist.tasks import (
    ClientResult,
    ClientTask,
    EvalPart,
    EvalTask,
    TaskFailure,
    WorkerData,
    combine_eval,
    eval_tasks,
)
from fedmnist.workers import InProcessExecutor, WorkerPool, describe_exit, resolve_workers, usable_cores

TESTS_DIR = Path(__file__).resolve().parent
NUM_CLIENTS, PER_CLIENT, NUM_TEST, SHARD = 5, 40, 200, 80
ROUNDS = ([1, 2, 4, 5], [2, 3, 5])  # the clients sampled in each round
ATTACKER = 2  # trains on flipped labels
SETTINGS = TrainingConfig(optimizer="sgd", learning_rate=0.05, momentum=0.9)


def tiny_data(mnist: Mnist) -> WorkerData:
    """5 clients of 40 training images (interleaved rows) and 200 test images."""
    n = NUM_CLIENTS * PER_CLIENT
    indices = [np.arange(k, n, NUM_CLIENTS) for k in range(NUM_CLIENTS)]
    test = slice(0, NUM_TEST)
    return WorkerData(mnist.x_train[:n], mnist.y_train[:n], indices, mnist.x_test[test], mnist.y_test[test])


def round_tasks(round_: int, start: list[np.ndarray]) -> list[ClientTask]:
    """Round ``round_``'s tasks: round 2 with the FedProx term, the attacker flipping its labels."""
    mu = 0.0 if round_ == 1 else 0.01
    return [
        ClientTask(k, start, Instructions(round_, mu), seed=1000 * round_ + k, epochs=1, batch_size=10,
                   flip_labels=k == ATTACKER)
        for k in ROUNDS[round_ - 1]
    ]


def two_rounds(executor) -> dict[str, np.ndarray]:
    """Two rounds of FedAvg through ``executor`` (round 2 starts from round 1's average), evaluated."""
    from fedmnist.model import initial_weights
    from fedmnist.strategies import aggregate

    out: dict[str, np.ndarray] = {}
    start = initial_weights(42)
    for round_ in (1, 2):
        tasks = round_tasks(round_, start)
        outcomes = executor.run(tasks)
        assert [type(o) for o in outcomes] == [ClientResult] * len(tasks), outcomes
        assert [o.client_id for o in outcomes] == [t.client_id for t in tasks]  # task order
        for outcome in outcomes:
            assert outcome.reply.num_examples == PER_CLIENT and len(outcome.reply.history["loss"]) == 1
            assert outcome.reply.num_steps == PER_CLIENT // 10
            for i, w in enumerate(outcome.reply.weights):
                out[f"r{round_}_client{outcome.client_id}_{i}"] = w
        start = aggregate("fedavg", [(o.reply.weights, o.reply.num_examples) for o in outcomes])
        for i, w in enumerate(start):
            out[f"r{round_}_global_{i}"] = w
        metrics = executor.evaluate(start)
        out[f"r{round_}_loss"], out[f"r{round_}_confusion"] = np.array(metrics.loss), metrics.confusion
    return out


def assert_same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert sorted(a) == sorted(b)
    different = [key for key in a if not np.array_equal(a[key], b[key])]
    assert not different, f"{len(different)} arrays differ, e.g. {different[:3]}"


def worker_processes(parent: int | None = None) -> set[int]:
    """Live multiprocessing children of ``parent`` (default: this process), the resource tracker aside."""
    parent = os.getpid() if parent is None else parent
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        state, ppid = stat.rsplit(")", 1)[1].split()[:2]
        if int(ppid) == parent and state != "Z" and b"multiprocessing" in cmdline \
                and b"resource_tracker" not in cmdline:
            found.add(int(entry.name))
    return found


def alive(pid: int) -> bool:
    """Whether ``pid`` is a running (not zombie) process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def wait_until(condition, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.2)
    return condition()


# --- without worker processes -----------------------------------------------------------------


def test_tasks_and_settings_reject_bad_values():
    w = [np.zeros(2, np.float32)]
    with pytest.raises(ConfigError, match="client ids start at 1"):
        ClientTask(0, w, Instructions(1), 1, 1, 10)
    with pytest.raises(ConfigError, match="client 3: epochs"):
        ClientTask(3, w, Instructions(1), 1, 0, 10)
    with pytest.raises(ConfigError, match="mu must be >= 0"):
        ClientTask(3, w, Instructions(1, -1.0), 1, 1, 10)
    with pytest.raises(ConfigError, match="list of numpy arrays"):
        ClientTask(3, "weights", Instructions(1), 1, 1, 10)
    with pytest.raises(ConfigError, match="empty or negative test range"):
        EvalTask(w, 5, 5)
    with pytest.raises(ConfigError, match="unknown optimizer"):
        TrainingConfig(optimizer="rmsprop").build_trainer()
    with pytest.raises(ConfigError, match="positive integer or 'auto'"):
        resolve_workers(0)


def test_auto_workers_follow_the_usable_cores():
    assert resolve_workers("auto") == usable_cores() == len(os.sched_getaffinity(0))
    assert resolve_workers("auto", threads=usable_cores() + 1) == 1
    assert resolve_workers("3") == 3


def test_worker_data_checks_its_arrays(small_mnist):
    x, y = small_mnist.x_train[:10], small_mnist.y_train[:10]
    with pytest.raises(DataError, match="client 2's indices fall outside"):
        WorkerData(x, y, [np.arange(5), np.array([3, 10])])
    with pytest.raises(DataError, match="raw uint8"):
        WorkerData(normalize_images(x), y, [np.arange(10)])
    with pytest.raises(DataError, match="both x_test and y_test"):
        WorkerData(x, y, [np.arange(10)], x_test=x)
    data = WorkerData(x, y, [np.arange(5), np.arange(5, 10)])
    images, labels = data.client_data(2)
    assert np.array_equal(images, normalize_images(x[5:])) and np.array_equal(labels, y[5:])


def test_shared_memory_round_trip_and_unlink(small_mnist):
    data = WorkerData(
        small_mnist.x_train, small_mnist.y_train, [np.arange(0, 600, 2), np.arange(1, 600, 2)],
        normalize_images(small_mnist.x_test), small_mnist.y_test,
    )
    spec, block = share(pack(data))
    try:
        assert spec.name is not None and Path("/dev/shm", spec.name).exists()
        view, arrays = spec.attach()
        copy = unpack(arrays)
        assert copy.x_test.dtype == np.uint8  # normalised test images are stored losslessly as uint8
        assert np.array_equal(copy.test_data(0, 200)[0], data.test_data(0, 200)[0])
        for k in (1, 2):
            assert all(np.array_equal(a, b) for a, b in zip(copy.client_data(k), data.client_data(k)))
        assert not arrays["x_train"].flags.writeable
        del arrays, copy
        view.close()
    finally:
        block.close()
        block.unlink()
    assert not Path("/dev/shm", spec.name).exists()


def test_data_goes_inline_when_shared_memory_is_short(small_mnist, monkeypatch):
    import fedmnist.shared_data as shared_data

    monkeypatch.setattr(shared_data, "shm_free_bytes", lambda: 1000)
    spec, block = share({"y": small_mnist.y_train})
    assert block is None and spec.name is None
    assert np.array_equal(spec.attach()[1]["y"], small_mnist.y_train)


def test_test_images_stay_float_when_not_from_uint8():
    x = np.full((2, 28, 28, 1), 0.3, np.float32)
    assert compact_test_images(x) is x


def test_sharded_evaluation_combines_like_one():
    y = np.array([0, 1, 2, 3, 4])
    predicted = np.array([0, 1, 2, 0, 4])
    assert [(t.start, t.stop) for t in eval_tasks([], 5, 2)] == [(0, 2), (2, 4), (4, 5)]
    assert [(t.start, t.stop) for t in eval_tasks([], 5, None)] == [(0, None)]
    ranges = [(0, 2, 1.0), (2, 4, 2.0), (4, 5, 4.0)]
    parts = [EvalPart(start, stop, loss, predicted[start:stop]) for start, stop, loss in ranges]
    combined = combine_eval(parts, y)
    whole = summarize(y, predicted, (2 * 1.0 + 2 * 2.0 + 4.0) / 5)
    assert combined.accuracy == whole.accuracy == 0.8
    assert combined.loss == pytest.approx(whole.loss, abs=0)
    assert np.array_equal(combined.confusion, whole.confusion)
    with pytest.raises(WorkerError, match="evaluation failed: boom"):
        combine_eval([*parts[:2], TaskFailure(2, None, "boom")], y)


def test_exit_codes_in_words():
    assert "SIGKILL" in describe_exit(-9) and "out-of-memory" in describe_exit(-9)
    assert describe_exit(3) == "exited with status 3"


# --- worker pools -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data(raw_mnist) -> WorkerData:
    return tiny_data(raw_mnist)


@pytest.fixture(scope="module")
def one_worker(data) -> dict[str, np.ndarray]:
    """Two rounds through a pool of one worker: the reference numbers."""
    with WorkerPool(1, data, SETTINGS, eval_shard=SHARD) as pool:
        pids = pool.pids
        results = two_rounds(pool)
    assert not any(alive(pid) for pid in pids)
    return results


@pytest.mark.slow
def test_two_workers_give_the_same_weights_as_one(data, one_worker):
    with WorkerPool(2, data, SETTINGS, eval_shard=SHARD) as pool:
        assert len(set(pool.pids)) == 2
        shm = pool.shared_memory_name
        results = two_rounds(pool)
    assert_same(results, one_worker)
    assert not worker_processes()
    assert not Path("/dev/shm", shm).exists()


IN_PROCESS_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
import numpy as np
from fedmnist.attacks import flip_labels
from fedmnist.data import load_raw_mnist
from fedmnist.workers import InProcessExecutor
import test_workers as t

data = t.tiny_data(load_raw_mnist({mnist!r}))
executor = InProcessExecutor(data, t.SETTINGS, threads=1, eval_shard=t.SHARD)
results = t.two_rounds(executor)
# the attacker's round-1 training, done by hand: labels 9 - y, in this process
from fedmnist.model import initial_weights
task = next(k for k in t.round_tasks(1, initial_weights(42)) if k.flip_labels)
x, y = data.client_data(task.client_id)
direct = executor.trainer.train(task.weights, x, flip_labels(y), epochs=1, batch_size=10, seed=task.seed)
results.update({{f"direct_{{i}}": w for i, w in enumerate(direct.weights)}})
np.savez({out!r}, **results)
"""


@pytest.mark.slow
def test_in_process_with_pinned_threads_equals_the_pool(one_worker, mnist_path, tmp_path):
    out = tmp_path / "in_process.npz"
    script = IN_PROCESS_SCRIPT.format(tests=str(TESTS_DIR), mnist=str(mnist_path), out=str(out))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TF_NUM_", "OMP_NUM_"))}
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    with np.load(out) as npz:
        results = {k: npz[k] for k in npz.files}
    direct = [results.pop(f"direct_{i}") for i in range(10)]
    assert_same(results, one_worker)
    # the label flip happened in the worker: it equals training on 9 - y by hand
    assert all(np.array_equal(d, one_worker[f"r1_client{ATTACKER}_{i}"]) for i, d in enumerate(direct))


@pytest.mark.slow
def test_killed_worker_fails_its_client_and_is_replaced(data, one_worker):
    from fedmnist.model import initial_weights

    start = initial_weights(42)
    bad = ClientTask(3, [w[:1] for w in start], Instructions(1), seed=1, epochs=1, batch_size=10)
    slow = ClientTask(4, start, Instructions(1), seed=1, epochs=50, batch_size=10)
    pool = WorkerPool(1, data, SETTINGS, eval_shard=SHARD)
    try:
        first = pool.pids[0]
        outcomes = pool.run([bad])  # a task that raises fails alone; the worker goes on
        assert isinstance(outcomes[0], TaskFailure) and outcomes[0].client_id == 3
        assert "client 3 failed" in outcomes[0].message and "do not fit the shared CNN" in outcomes[0].message
        assert pool.pids == [first]

        pending = pool.submit([slow, *round_tasks(1, start)])
        time.sleep(1.0)
        os.kill(first, signal.SIGKILL)
        outcomes = pending.result()
        failure = outcomes[0]
        assert isinstance(failure, TaskFailure) and failure.index == 0 and failure.client_id == 4
        assert "client 4 failed" in failure.message and "SIGKILL" in failure.message, failure.message
        assert pool.pids != [first] and not alive(first)
        for outcome in outcomes[1:]:  # the replacement computes the very same numbers
            assert isinstance(outcome, ClientResult)
            for i, w in enumerate(outcome.reply.weights):
                assert np.array_equal(w, one_worker[f"r1_client{outcome.client_id}_{i}"])
        replacement = pool.pids[0]
    finally:
        pool.close()
    assert not alive(replacement) and not worker_processes()
    with pytest.raises(WorkerError, match="closed"):
        pool.submit(round_tasks(1, start))


@pytest.mark.slow
def test_a_pool_that_cannot_start_in_time_leaves_nothing(data):
    with pytest.raises(WorkerError, match="did not start within"):
        WorkerPool(1, data, SETTINGS, start_timeout=0.01)
    assert wait_until(lambda: not worker_processes(), 10)


PARENT_SCRIPT = """
import json, sys
sys.path.insert(0, {tests!r})
import numpy as np
from fedmnist.data import load_raw_mnist
from fedmnist.client import Instructions
from fedmnist.tasks import ClientTask
from fedmnist.workers import WorkerPool
import test_workers as t

if __name__ == "__main__":
    pool = WorkerPool(1, t.tiny_data(load_raw_mnist({mnist!r})), t.SETTINGS)
    print(json.dumps({{"pids": pool.pids, "shm": pool.shared_memory_name}}), flush=True)
    with np.load({weights!r}) as npz:
        start = [npz[f"w{{i}}"] for i in range(len(npz.files))]
    pool.run([ClientTask(k, start, Instructions(1), seed=k, epochs=500, batch_size=10) for k in (1, 2, 3)])
    print("finished", flush=True)
"""


@pytest.mark.slow
@pytest.mark.parametrize("how", ["ctrl-c", "sigkill"])
def test_no_worker_survives_its_parent(how, mnist_path, tmp_path):
    from fedmnist.model import initial_weights

    weights = tmp_path / "start.npz"  # the parent does not import TensorFlow: it starts sooner
    np.savez(weights, **{f"w{i}": w for i, w in enumerate(initial_weights(42))})
    script = tmp_path / "parent.py"
    script.write_text(PARENT_SCRIPT.format(tests=str(TESTS_DIR), mnist=str(mnist_path), weights=str(weights)))
    parent = subprocess.Popen(
        [sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )
    try:
        line = parent.stdout.readline()
        assert line, parent.stderr.read()[-3000:]
        info = json.loads(line)
        assert all(alive(pid) for pid in info["pids"])
        time.sleep(1.0)  # the first task is running
        if how == "ctrl-c":
            os.killpg(parent.pid, signal.SIGINT)  # the whole process group, as a terminal does
        else:
            os.kill(parent.pid, signal.SIGKILL)  # the parent alone: its workers must notice
        parent.wait(timeout=60)
        stderr = parent.stderr.read()
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
    if how == "ctrl-c":
        assert parent.returncode != 0 and "KeyboardInterrupt" in stderr, stderr[-3000:]
        assert not any(alive(pid) for pid in info["pids"])  # closed before the parent exited
    else:
        assert parent.returncode == -signal.SIGKILL
        assert wait_until(lambda: not any(alive(pid) for pid in info["pids"]), 30)
    # Ctrl-C: close() unlinked it; SIGKILL: multiprocessing's resource tracker does, once workers are gone
    assert wait_until(lambda: not Path("/dev/shm", info["shm"]).exists(), 30)


@pytest.mark.slow
def test_in_process_failures_name_the_client(data):
    executor = InProcessExecutor(data, SETTINGS)
    outcome = executor.run([ClientTask(1, [np.zeros(3, np.float32)], Instructions(1), 1, 1, 10)])[0]
    assert isinstance(outcome, TaskFailure) and outcome.client_id == 1
    assert outcome.message.startswith("client 1 failed: ConfigError")
    # a SCAFFOLD correction reaches the trainer, which refuses it with momentum
    start = executor.trainer.get_weights()
    corrected = ClientTask(1, start, Instructions(1, control=[np.zeros_like(w) for w in start]), 1, 1, 10)
    outcome = executor.run([corrected])[0]
    assert isinstance(outcome, TaskFailure) and "SCAFFOLD needs local SGD without momentum" in outcome.message
    with pytest.raises(ConfigError, match="client 9 does not exist"):
        executor.run([ClientTask(9, [np.zeros(3, np.float32)], Instructions(1), 1, 1, 10)])
