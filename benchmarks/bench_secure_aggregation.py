"""What secure aggregation costs on a loopback Flower deployment: seconds and bytes per round.

Usage (from the repository root)::

    PYTHONPATH=. python benchmarks/bench_secure_aggregation.py --data ../shared/data/mnist.npz \\
        [--nodes 5 --per-client 200 --rounds 2 --test-images 500 --out resultados/agregacion_segura_coste.csv]

One SuperLink and ``--nodes`` SuperNodes on 127.0.0.1 (``tests/flower_harness.py``), each with its IID
partition of the first ``nodes × per-client`` MNIST training images. For 3, 4, … ``nodes`` sampled per round
(``fraction-train`` = m/nodes of the connected nodes) the same FedAvg run (Adam, E = 1, B = 32, the same
seed) is submitted twice, without and with ``secure-aggregation`` (its default settings), and each round's
``round_seconds`` (the ServerApp's, from sampling to the written checkpoint) and its traffic are read back:
the bytes of the message contents the ServerApp pushed and pulled in the round, which it logs from the
records themselves (``fedmnist.flower_app.content_bytes``: every record's ``count_bytes``, framing aside).
The rows go to ``--out`` (CSV, written atomically): nodes, secure_aggregation, round, seconds, bytes_sent,
bytes_received, test_accuracy.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "tests"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

COLUMNS = ["nodes", "secure_aggregation", "round", "seconds", "bytes_sent", "bytes_received", "test_accuracy"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", help="MNIST npz (default: $FEDMNIST_DATA, else ../shared/data/mnist.npz)")
    p.add_argument("--nodes", type=int, default=5, help="SuperNodes started; rounds sample 3..NODES of them")
    p.add_argument("--per-client", type=int, default=200)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--test-images", type=int, default=500)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--timeout", type=float, default=900, help="bound on each Flower run, seconds")
    p.add_argument("--out", default=str(ROOT / "resultados" / "agregacion_segura_coste.csv"))
    return p.parse_args(argv)


def traffic(log_text: str) -> dict[int, tuple[int, int]]:
    """Round -> (bytes sent, bytes received) from the ServerApp's log lines (``flower_app.TRAFFIC_LOG``)."""
    from fedmnist.flower_app import TRAFFIC_LOG

    pattern = re.compile(r"round (\d+): " + re.escape(TRAFFIC_LOG) + r" (\d+) bytes sent, (\d+) bytes received")
    return {int(r): (int(s), int(g)) for r, s, g in pattern.findall(log_text)}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.nodes < 3:
        print("--nodes must be at least 3 (secure aggregation needs 3 nodes to hide one update)")
        return 2
    from flower_harness import FlowerDeployment

    from fedmnist.data import Mnist, client_file, common_test_file, load_raw_mnist
    from fedmnist.federation_files import write_federation
    from fedmnist.io import atomic_write_text
    from fedmnist.partition import PartitionConfig

    data = args.data or os.environ.get("FEDMNIST_DATA") or ROOT.parent / "shared" / "data" / "mnist.npz"
    raw = load_raw_mnist(data)
    n = args.nodes * args.per_client
    mnist = Mnist(raw.x_train[:n], raw.y_train[:n], raw.x_test[: args.test_images], raw.y_test[: args.test_images])
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_secagg_") as tmp_name:
        tmp = Path(tmp_name)
        fed = tmp / "federacion"
        write_federation(mnist, PartitionConfig("iid", args.nodes, seed=args.seed), fed)
        with FlowerDeployment(tmp / "deployment") as flower:
            flower.start_superlink()
            flower.start_supernodes({f"nodo{k}": {"data-file": str(client_file(fed, k))}
                                     for k in range(1, args.nodes + 1)})
            for sampled in range(3, args.nodes + 1):
                for secure in (False, True):
                    out = tmp / f"m{sampled}_{'segura' if secure else 'plana'}"
                    run_config = {
                        "num-server-rounds": args.rounds, "local-epochs": 1, "batch-size": 32, "optimizer": "adam",
                        "learning-rate": 0.001, "momentum": 0.0, "method": "fedavg",
                        "fraction-train": sampled / args.nodes, "min-train-nodes": sampled,
                        "min-available-nodes": args.nodes, "seed": args.seed, "round-timeout": args.timeout,
                        "output-dir": str(out), "test-file": str(common_test_file(fed)),
                        "secure-aggregation": secure,
                    }
                    run_id = flower.submit(run_config)
                    run = flower.wait_finished(run_id, args.timeout)
                    log_text = flower.server_log(run_id)
                    if run["status"] != "finished:completed":
                        print(f"the run with {sampled} nodes (secure: {secure}) ended {run['status']}: "
                              f"{run.get('status-details')}\n{log_text[-3000:]}")
                        return 1
                    sizes = traffic(log_text)
                    for r in json.loads((out / "metricas_por_ronda.json").read_text())["rounds"]:
                        sent, received = sizes[r["round"]]
                        rows.append([sampled, secure, r["round"], round(r["round_seconds"], 3), sent, received,
                                     r["test_accuracy"]])
                        print(f"nodes {sampled}, secure {secure!s:5}, round {r['round']}: "
                              f"{r['round_seconds']:.2f} s, {sent} B sent, {received} B received")
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(COLUMNS)
    writer.writerows(rows)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, text.getvalue())
    print(f"wrote {len(rows)} rows to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
