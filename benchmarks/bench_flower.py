"""Flower's simulation engine against ``fedmnist.simulation.run_simulation`` on the same federation.

Usage (from the repository root; Flower's simulation engine needs Ray, ``pip install "flwr[simulation]"``,
or a Ray installation on PYTHONPATH)::

    PYTHONPATH=. python benchmarks/bench_flower.py --data ../shared/data/mnist.npz \\
        [--clients 10 --per-client 600 --epochs 1 --batch-size 10 --rounds 3 --test-images 2000]

Both run FedAvg with every client sampled, on the first ``clients × per-client`` training images split
IID with the same seed (``write_federation`` writes the partitions Flower's ClientApps read, as
``cliente_{partition-id + 1}.npz``), from the same initial weights and the same training seeds, and
both evaluate the global model on the same test images after every round; so they compute the same
weights, which the script checks. Each is timed from a cold start in this process: ``run_simulation``
including TensorFlow's import and its trainer; Flower from ``flwr run`` until its ServerApp process
exits (a ``flower-superlink --simulation`` on a free loopback port is started beforehand, untimed; the
time covers Ray's start, the ServerApp and the ClientApp actors, each importing TensorFlow). The
per-round times of both (``round_seconds`` of their metrics) are shown too. Without Ray the script
says so and exits 0.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "tests"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", help="MNIST npz (default: $FEDMNIST_DATA, else ../shared/data/mnist.npz)")
    p.add_argument("--clients", type=int, default=10)
    p.add_argument("--per-client", type=int, default=600)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=10)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--test-images", type=int, default=2000)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--client-cpus", type=float, default=None,
                   help="CPUs Ray reserves per ClientApp actor (Flower's default: 2)")
    p.add_argument("--timeout", type=float, default=1800, help="bound on the Flower run, seconds")
    p.add_argument("--workers", type=int, default=None,
                   help="run ours with N worker processes of one thread each (compare with --client-cpus 1)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if importlib.util.find_spec("ray") is None:
        print("Ray is not installed, so Flower's simulation engine cannot run; nothing measured.\n"
              "Install it with `pip install \"flwr[simulation]\"` (or put a Ray installation on PYTHONPATH) "
              "and run this script again.")
        return 0

    import numpy as np
    from flower_harness import FlowerDeployment

    from fedmnist.data import Mnist, common_test_file, load_raw_mnist
    from fedmnist.exchange import load_global
    from fedmnist.federation_files import write_federation
    from fedmnist.simulation import SimulationConfig, run_simulation

    data = args.data or os.environ.get("FEDMNIST_DATA") or ROOT.parent / "shared" / "data" / "mnist.npz"
    raw = load_raw_mnist(data)
    n = args.clients * args.per_client
    mnist = Mnist(raw.x_train[:n], raw.y_train[:n], raw.x_test[: args.test_images], raw.y_test[: args.test_images])
    config = SimulationConfig.create(
        num_clients=args.clients, fraction=1.0, rounds=args.rounds, local_epochs=args.epochs,
        batch_size=args.batch_size, optimizer="sgd", learning_rate=0.05, momentum=0.0, partition="iid",
        methods=("fedavg",), seed=args.seed,
    )
    print(f"federation: {args.clients} clients x ~{args.per_client} images (IID), E={args.epochs}, "
          f"B={args.batch_size}, {args.rounds} rounds, FedAvg, {args.test_images} test images")

    with tempfile.TemporaryDirectory(prefix="bench_flower_") as tmp_name:
        tmp = Path(tmp_name)
        fed = tmp / "federacion"
        write_federation(mnist, config.federation.partition_config(config.seed), fed)

        t0 = time.perf_counter()
        ours = run_simulation(config, out_dir=tmp / "ours", progress=False, mnist=mnist, workers=args.workers)
        ours_seconds = time.perf_counter() - t0
        ours_rounds = [r.round_seconds for r in ours.metrics["fedavg"]]

        run_config = {
            "num-server-rounds": args.rounds, "local-epochs": args.epochs, "batch-size": args.batch_size,
            "optimizer": "sgd", "learning-rate": 0.05, "momentum": 0.0, "method": "fedavg",
            "fraction-train": 1.0, "min-train-nodes": args.clients, "seed": args.seed,
            "round-timeout": args.timeout, "output-dir": str(tmp / "flower"),
            "test-file": str(common_test_file(fed)), "data-dir": str(fed),
        }
        federation = f"num-supernodes={args.clients}"
        if args.client_cpus is not None:
            federation += f" client-resources-num-cpus={args.client_cpus:g}"
        with FlowerDeployment(tmp / "deployment", simulation=True) as flower:
            flower.start_superlink()
            t0 = time.perf_counter()
            run_id = flower.submit(run_config, federation_config=federation)
            run = flower.wait_finished(run_id, args.timeout)
            flower_seconds = (flower.ended_at or time.perf_counter()) - t0
            if run["status"] != "finished:completed":
                print(f"the Flower run ended {run['status']}: {run.get('status-details')}\n"
                      + flower.server_log(run_id)[-3000:])
                return 1
        rows = json.loads((tmp / "flower" / "metricas_por_ronda.json").read_text())["rounds"]
        flower_rounds = [r["round_seconds"] for r in rows]
        flower_weights = load_global(tmp / "flower" / f"pesos_globales_ronda_{args.rounds}.pkl").weights
        diff = max(float(np.max(np.abs(a - b))) for a, b in zip(flower_weights, ours.final_weights["fedavg"]))

    def fmt(values):
        return " ".join(f"{v:6.1f}" for v in values)

    print(f"{'':28}{'total s':>9}   per round s")
    label = 'fedmnist run_simulation' + (f' ({args.workers} workers)' if args.workers else '')
    print(f"{label:28}{ours_seconds:9.1f}   {fmt(ours_rounds)}")
    print(f"{'Flower simulation (Ray)':28}{flower_seconds:9.1f}   {fmt(flower_rounds)}")
    print(f"accuracy after round {args.rounds}: ours {ours.final_accuracy['fedavg']:.4f}, "
          f"Flower {rows[-1]['test_accuracy']:.4f}; max |weights difference| {diff:.2e}")
    print(f"ratio Flower / ours: {flower_seconds / ours_seconds:.2f}x total, "
          f"{sum(flower_rounds) / sum(ours_rounds):.2f}x summed rounds (goal: >= 3x total)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
