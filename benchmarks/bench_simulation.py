"""Overhead and memory of ``fedmnist.simulation.run_simulation``.

Usage (from the repository root)::

    PYTHONPATH=. python benchmarks/bench_simulation.py --data ../shared/data/mnist.npz \\
        [--clients 10 --per-client 600 --epochs 1 --batch-size 10 --rounds 3] [--skip-time] [--skip-memory]

(a) Time. The same federation (FedAvg, all clients sampled) is run by ``run_simulation`` and as a bare
loop of the very ``trainer.train`` calls the simulation makes (same clients, data, seeds, epochs and
batch size; no aggregation, evaluation, checkpoints or bookkeeping), with one shared, warmed-up
trainer, ``--repeats`` times interleaved; the best of each is shown, in wall time and in CPU time
(all threads; steadier than wall time on a shared machine). The global model is evaluated only after
the last round (``eval_every = rounds``); that evaluation is timed apart and subtracted. Ratios near
1 mean the simulation adds little to the local training it must do anyway.

(b) Memory. One subprocess per configuration runs one round (E = 1, B = 10, FedAvg, 10 sampled
clients) on the full 60,000-image training set and reports its resident memory just before
``run_simulation`` and the peak during it (Linux's VmHWM, reset just before the call), as well as the
process's ``ru_maxrss``. The baseline process does everything but the simulation (imports, MNIST, the
trainer). If the simulation kept a model per client, 1000 clients would need 1000 × 1.56 MB.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

MODEL_MB = 390_410 * 4 / 1e6
MEMORY_CASES = (  # (label, clients K, fraction C, run the simulation)
    ("baseline (no simulation)", 100, 0.1, False),
    ("K=100, C=0.1 (600 images each)", 100, 0.1, True),
    ("K=1000, C=0.01 (60 images each)", 1000, 0.01, True),
    ("K=1000, C=0.1 (60 images each)", 1000, 0.1, True),
)


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MB (Linux reports kB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _status_mb(key: str) -> float | None:
    """A memory line of /proc/self/status (VmRSS, VmHWM) in MB, or None off Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS; False where not supported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def timed(fn) -> tuple[float, float, object]:
    """Wall and CPU seconds (all threads of this process) of ``fn()``, and its result."""
    wall, cpu = time.perf_counter(), time.process_time()
    value = fn()
    return time.perf_counter() - wall, time.process_time() - cpu, value


def bare_training(trainer, config, fed, init) -> None:
    """The simulation's ``trainer.train`` calls alone: same clients, data, seeds, epochs, batch size."""
    from fedmnist.seeds import training_seed
    from fedmnist.simulation import sample_clients

    calls = []
    for round_ in range(1, config.rounds + 1):
        for client_id in sample_clients(config, round_):
            x, y = fed.client_data(client_id)
            calls.append((x, y, training_seed(config.seed, round_, client_id)))
    for x, y, seed in calls:
        trainer.train(init, x, y, epochs=config.training.epochs, batch_size=config.training.batch_size, seed=seed)


def time_benchmark(args: argparse.Namespace) -> None:
    from fedmnist.config import AGGRESSIVE_TRAINING
    from fedmnist.data import load_raw_mnist
    from fedmnist.evaluation import evaluate
    from fedmnist.federation import prepare_federation
    from fedmnist.model import initial_weights
    from fedmnist.simulation import SimulationConfig, run_simulation
    from fedmnist.training import ClientTrainer

    mnist = load_raw_mnist(args.data)
    config = SimulationConfig(training=AGGRESSIVE_TRAINING).replace(  # the training its numbers were timed with
        num_clients=args.clients,
        fraction=1.0,
        rounds=args.rounds,
        local_epochs=args.epochs,
        batch_size=args.batch_size,
        methods=("fedavg",),
        train_subset=args.clients * args.per_client,
        eval_every=args.rounds,
    )
    trainer = ClientTrainer(config.training.optimizer, config.training.learning_rate, config.training.momentum)
    fed = prepare_federation(config.federation, config.seed, mnist=mnist)
    init = initial_weights(config.seed)
    x, y = fed.client_data(1)
    trainer.train(init, x, y, epochs=1, batch_size=config.training.batch_size)  # trace the epoch function
    trainer.predict(init, fed.x_test[:10], fed.y_test[:10])  # and the evaluation

    bare, sim, evaluation, rounds = [], [], [], []
    for _ in range(args.repeats):  # interleaved, so a change in the machine's load hits both
        bare.append(timed(lambda: bare_training(trainer, config, fed, init))[:2])
        with tempfile.TemporaryDirectory() as out:
            wall, cpu, result = timed(
                lambda out=out: run_simulation(
                    config, out_dir=out, progress=False, trainer=trainer, mnist=mnist
                )
            )
        sim.append((wall, cpu))
        rounds.append(sum(r.round_seconds - r.eval_seconds for r in result.metrics["fedavg"]))
        weights = result.final_weights["fedavg"]
        evaluation.append(timed(lambda w=weights: evaluate(trainer, w, fed.x_test, fed.y_test))[:2])

    def best(pairs, i):
        return min(p[i] for p in pairs)

    b_wall, b_cpu = best(bare, 0), best(bare, 1)
    e_wall, e_cpu = best(evaluation, 0), best(evaluation, 1)
    s_wall, s_cpu = best(sim, 0), best(sim, 1)
    print(
        f"\n(a) time: {config.federation.num_clients} clients x {args.per_client} images, "
        f"E={config.training.epochs}, B={config.training.batch_size}, {config.rounds} rounds, FedAvg, all clients sampled, one evaluation on "
        f"{fed.y_test.size} test images after the last round; best of {args.repeats} interleaved runs"
    )
    print(f"{'measure':<56}{'wall s':>9}{'÷ bare':>8}{'CPU s':>9}{'÷ bare':>8}")
    table = [
        ("bare trainer.train loop", b_wall, b_cpu),
        ("run_simulation, all included", s_wall, s_cpu),
        ("  its evaluation (the same call, timed apart)", e_wall, e_cpu),
        ("run_simulation minus evaluation", s_wall - e_wall, s_cpu - e_cpu),
        ("  rounds only, from its metrics (round - eval seconds)", min(rounds), None),
    ]
    for label, wall, cpu in table:
        cpu_text = f"{cpu:>9.2f}{cpu / b_cpu:>8.3f}" if cpu is not None else ""
        print(f"{label:<56}{wall:>9.2f}{wall / b_wall:>8.3f}{cpu_text}")
    print(
        "all runs (wall s): bare "
        + ", ".join(f"{w:.1f}" for w, _ in bare)
        + "; simulation "
        + ", ".join(f"{w:.1f}" for w, _ in sim)
    )


def memory_child(clients: int, fraction: float, simulate: bool, data: str | None) -> None:
    """Run in a subprocess: one round on the full training set, then print peak RSS as JSON."""
    from fedmnist.config import AGGRESSIVE_TRAINING
    from fedmnist.data import load_raw_mnist, normalize_images
    from fedmnist.model import initial_weights
    from fedmnist.simulation import SimulationConfig, run_simulation
    from fedmnist.training import ClientTrainer

    config = SimulationConfig(training=AGGRESSIVE_TRAINING).replace(  # the training its numbers were timed with
        num_clients=clients,
        fraction=fraction,
        rounds=1,
        local_epochs=1,
        batch_size=10,
        methods=("fedavg",),
        test_subset=1000,
    )
    mnist = load_raw_mnist(data)
    trainer = ClientTrainer(config.training.optimizer, config.training.learning_rate, config.training.momentum)
    init = initial_weights(config.seed)
    x_warm, y_warm = normalize_images(mnist.x_train[:20]), mnist.y_train[:20]
    trainer.train(init, x_warm, y_warm, epochs=1, batch_size=10)  # trace training and evaluation first
    # one evaluation of the 1000 test images: its activations (batches of 1000) are a ~190 MB transient
    trainer.predict(
        init, normalize_images(mnist.x_test[: config.federation.test_subset]), mnist.y_test[: config.federation.test_subset]
    )
    process_peak = peak_rss_mb()
    before = _status_mb("VmRSS")
    can_reset = reset_peak_rss()
    seconds = 0.0
    if simulate:
        with tempfile.TemporaryDirectory() as out:
            start = time.perf_counter()
            run_simulation(config, out_dir=out, progress=False, trainer=trainer, mnist=mnist)
            seconds = time.perf_counter() - start
    during = _status_mb("VmHWM") if can_reset else peak_rss_mb()
    stats = {
        "process_peak_before": process_peak,
        "before": before,
        "during": during,
        "peak": peak_rss_mb(),
        "sampled": config.clients_per_round,
        "seconds": seconds,
    }
    print(json.dumps(stats))


def memory_benchmark(args: argparse.Namespace) -> None:
    print(
        "\n(b) peak RSS of one round (E=1, B=10, FedAvg) on the full 60,000 training images, one process each"
    )
    print(
        f"{'configuration':<34}{'sampled':>8}{'RSS before':>12}{'peak during':>13}{'added':>9}"
        f"{'process peak':>14}{'all K models':>14}{'seconds':>9}"
    )
    for label, clients, fraction, simulate in MEMORY_CASES:
        command = [sys.executable, __file__, "--child", str(clients), str(fraction), str(int(simulate))]
        if args.data:
            command += ["--data", args.data]
        done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, check=False)
        if done.returncode:
            print(f"{label}: failed\n{done.stderr[-2000:]}")
            continue
        st = json.loads(done.stdout.strip().splitlines()[-1])
        all_models = f"{clients * MODEL_MB:.0f} MB" if simulate else "-"
        print(
            f"{label:<34}{st['sampled'] if simulate else '-':>8}{st['before']:>9.0f} MB{st['during']:>10.0f} MB"
            f"{st['during'] - st['before']:>6.0f} MB{st['peak']:>11.0f} MB{all_models:>14}{st['seconds']:>9.1f}"
        )
    print(
        "RSS before: resident after imports, MNIST, the trainer and one evaluation; peak during: the kernel's high-water\n"
        "mark (VmHWM) reset just before run_simulation; process peak: ru_maxrss over the whole process."
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=os.environ.get("FEDMNIST_DATA"), help="MNIST npz (keras layout)")
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--per-client", type=int, default=600)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--repeats", type=int, default=2, help="interleaved bare/simulation runs (best is shown)"
    )
    parser.add_argument("--skip-time", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--child", nargs=3, metavar=("K", "C", "SIMULATE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        memory_child(int(args.child[0]), float(args.child[1]), bool(int(args.child[2])), args.data)
        return 0
    if not args.skip_time:
        time_benchmark(args)
    if not args.skip_memory:
        memory_benchmark(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
