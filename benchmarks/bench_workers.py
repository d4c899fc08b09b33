"""McMahan-round throughput with N worker processes, against today's single process.

Usage (from the repository root)::

    PYTHONPATH=. python benchmarks/bench_workers.py --data ../shared/data/mnist.npz \\
        [--clients 10 --per-client 600 --epochs 5 --batch-size 10 --test-images 10000 --rounds 2] \\
        [--workers 1 2 ...] [--threads 1] [--repeats 1]

A round is McMahan et al.'s: ``--clients`` clients of ``--per-client`` images each train ``--epochs``
epochs with batches of ``--batch-size`` (plain SGD, lr 0.05, no momentum) from the global model, FedAvg
combines them, and the new global model is evaluated on ``--test-images`` test images. Every mode runs
the same ``--rounds`` rounds (same partition, seeds and start) after its warm-up, and is timed from the
first round's start to the last evaluation's end. Modes:

* ``1 process, TF default threads``: today's simulation, one ``ClientTrainer`` in one process with
  TensorFlow's default thread pools, training then evaluating (``InProcessExecutor``); the baseline
  the issue's goal (≥ 1.2× on 2 cores) refers to. Its own subprocess.
* ``1 process, T thread(s)``: the same with TensorFlow pinned to ``--threads`` threads, in its own
  subprocess; its weights must equal the workers' (same per-client thread setting).
* ``N workers``: ``fedmnist.workers.WorkerPool`` with N processes of ``--threads`` threads each,
  evaluation split into shards and overlapped with the next round's training; N = 1, 2, … up to the
  usable cores by default, all in this run, so the ratios to N = 1 are measured under the same load.

The table gives seconds per round, training image-steps per second (evaluation time included in the
wall time), the ratios to N = 1 and to today's process, the start-up time (TensorFlow import, model
build and tracing; not in the round time) and whether the final global weights equal those of N = 1.
Start-up is paid once per run, not per round. ``--repeats`` reruns every mode interleaved and keeps
each mode's fastest run (the machine may be shared).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

LEARNING_RATE = 0.05
THREAD_VARS = ("TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS", "OMP_NUM_THREADS")


def build_data(args: argparse.Namespace):
    """The first clients × per-client training images split IID (seeded), and the first test images."""
    from fedmnist.data import load_raw_mnist
    from fedmnist.partition import PartitionConfig, partition
    from fedmnist.tasks import WorkerData

    mnist = load_raw_mnist(args.data)
    n = args.clients * args.per_client
    parts = partition(mnist.y_train[:n], PartitionConfig("iid", args.clients, seed=args.seed))
    test = slice(0, args.test_images)
    return WorkerData(mnist.x_train[:n], mnist.y_train[:n], parts, mnist.x_test[test], mnist.y_test[test])


def settings():
    from fedmnist.config import TrainingConfig

    return TrainingConfig(optimizer="sgd", learning_rate=LEARNING_RATE, momentum=0.0)


def sha256(weights) -> str:
    """Hash of the arrays' bytes (without importing TensorFlow)."""
    digest = hashlib.sha256()
    for w in weights:
        digest.update(w.tobytes())
    return digest.hexdigest()


def run_rounds(executor, start, args: argparse.Namespace, overlap: bool) -> dict:
    """``args.rounds`` FedAvg rounds through ``executor``; wall seconds, accuracies and the final hash."""
    from fedmnist.client import Instructions
    from fedmnist.strategies import aggregate
    from fedmnist.tasks import ClientResult, ClientTask

    accuracies, evaluation = [], None
    t0 = time.perf_counter()
    for round_ in range(1, args.rounds + 1):
        tasks = [
            ClientTask(k, start, Instructions(round_), seed=args.seed * 10_000 + round_ * 100 + k, epochs=args.epochs,
                       batch_size=args.batch_size)
            for k in range(1, args.clients + 1)
        ]
        training = executor.submit(tasks)
        if evaluation is not None:  # the previous round's evaluation ran beside this round's training
            accuracies.append(evaluation.result().accuracy)
        outcomes = training.result()
        failed = [o for o in outcomes if not isinstance(o, ClientResult)]
        if failed:
            raise SystemExit(f"round {round_}: {failed[0].message}")
        start = aggregate("fedavg", [(o.weights, o.num_examples) for o in outcomes])
        evaluation = executor.submit_evaluation(start)
        if not overlap:
            accuracies.append(evaluation.result().accuracy)
            evaluation = None
    if evaluation is not None:
        accuracies.append(evaluation.result().accuracy)
    return {"seconds": time.perf_counter() - t0, "accuracies": accuracies, "sha256": sha256(start)}


def in_process_child(args: argparse.Namespace) -> dict:
    """Measure the in-process executor in this (fresh) process; ``--child-threads 0`` keeps TF's default."""
    t0 = time.perf_counter()
    from fedmnist.model import initial_weights
    from fedmnist.tasks import EVAL_SHARD
    from fedmnist.workers import InProcessExecutor, warm_up

    threads = args.child_threads or None
    executor = InProcessExecutor(
        build_data(args), settings(), threads=threads, eval_shard=EVAL_SHARD if threads else None
    )
    warm_up(executor.trainer)
    start = initial_weights(args.seed)
    startup = time.perf_counter() - t0
    return {**run_rounds(executor, start, args, overlap=False), "startup": startup}


def run_in_process(args: argparse.Namespace, threads: int) -> dict:
    """``in_process_child`` in a subprocess (TensorFlow's threads are fixed per process)."""
    env = {k: v for k, v in os.environ.items() if k not in THREAD_VARS}
    command = [sys.executable, __file__, "--child-threads", str(threads), *forward(args)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"benchmark subprocess failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_pool(args: argparse.Namespace, workers: int, data, start) -> dict:
    from fedmnist.workers import WorkerPool

    t0 = time.perf_counter()
    with WorkerPool(workers, data, settings(), threads=args.threads) as pool:
        startup = time.perf_counter() - t0
        return {**run_rounds(pool, start, args, overlap=True), "startup": startup}


def forward(args: argparse.Namespace) -> list[str]:
    """The shared arguments, for a child process."""
    out = []
    for name in ("data", "clients", "per_client", "epochs", "batch_size", "test_images", "rounds", "seed"):
        value = getattr(args, name)
        if value is not None:
            out += [f"--{name.replace('_', '-')}", str(value)]
    return out


def report(args: argparse.Namespace, rows: list[tuple[str, dict]]) -> None:
    steps = args.clients * args.per_client * args.epochs
    print(
        f"\nMcMahan round: {args.clients} clients × {args.per_client} images, E={args.epochs}, "
        f"B={args.batch_size} ({steps:,} image-steps) + evaluation on {args.test_images:,} test images; "
        f"{args.rounds} round(s) per mode after warm-up, best of {args.repeats}; {args.threads} thread(s) "
        f"per worker; {os.cpu_count()} CPUs, {len(os.sched_getaffinity(0))} usable"
    )
    base = next((r for label, r in rows if label.startswith("1 process, TF default")), None)
    one = next((r for label, r in rows if label == "1 worker"), None)
    print(f"{'mode':<32}{'s/round':>9}{'img-steps/s':>13}{'× N=1':>8}{'× today':>9}{'start s':>9}  weights")
    for label, r in rows:
        per_round = r["seconds"] / args.rounds
        same = "= N=1" if one is not None and r["sha256"] == one["sha256"] else "differ from N=1"
        if r is one:
            same = r["sha256"][:12]
        vs_one = f"{one['seconds'] / r['seconds']:.2f}" if one else "-"
        vs_base = f"{base['seconds'] / r['seconds']:.2f}" if base else "-"
        print(f"{label:<32}{per_round:>9.2f}{steps / per_round:>13.0f}{vs_one:>8}{vs_base:>9}"
              f"{r['startup']:>9.1f}  {same}")
    accuracies = {label: r["accuracies"][-1] for label, r in rows}
    print("final test accuracy: " + ", ".join(f"{k} {v:.4f}" for k, v in accuracies.items()))
    print(f"load average after the run: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=os.environ.get("FEDMNIST_DATA"), help="MNIST npz (keras layout)")
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--per-client", type=int, default=600)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=10)
    parser.add_argument("--test-images", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--workers", type=int, nargs="+", help="pool sizes (default: 1 … usable cores)")
    parser.add_argument("--threads", type=int, default=1, help="TensorFlow threads per worker")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--skip-in-process", action="store_true", help="only the worker pools")
    parser.add_argument("--child-threads", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child_threads is not None:
        print(json.dumps(in_process_child(args)))
        return 0

    from fedmnist.model import initial_weights
    from fedmnist.workers import usable_cores

    sizes = args.workers or list(range(1, max(1, usable_cores() // args.threads) + 1))
    data, start = build_data(args), initial_weights(args.seed)
    modes = []
    if not args.skip_in_process:
        modes += [("1 process, TF default threads", lambda: run_in_process(args, 0)),
                  (f"1 process, {args.threads} thread(s)", lambda: run_in_process(args, args.threads))]
    for n in sizes:
        modes.append((f"{n} worker{'s' if n > 1 else ''}", lambda n=n: run_pool(args, n, data, start)))
    best: dict[str, dict] = {}
    for repeat in range(args.repeats):
        for label, measure in modes:
            result = measure()
            print(f"[{repeat + 1}/{args.repeats}] {label}: {result['seconds'] / args.rounds:.2f} s/round "
                  f"(start-up {result['startup']:.1f} s)", flush=True)
            if label not in best or result["seconds"] < best[label]["seconds"]:
                best[label] = result
    report(args, [(label, best[label]) for label, _ in modes])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
