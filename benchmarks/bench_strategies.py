"""Time fedmnist's aggregation rules against Flower's on the CNN's layer shapes.

Usage (from the repository root)::

    python benchmarks/bench_strategies.py [--clients 10 --repeats 5 --malicious 1 --beta 0.2]

Every rule runs on the same random float32 client weights as its Flower counterpart in
``flwr.server.strategy.aggregate``; the table shows the best time of ``--repeats`` runs, the ratio
Flower/ours (above 1: ours is faster) and the largest absolute difference between the two results.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

# Conv2D 3x3x1x32, 3x3x32x64, 3x3x64x128, Dense 1152x256, 256x10, each with its bias.
CNN_LAYER_SHAPES = [
    (3, 3, 1, 32), (32,),
    (3, 3, 32, 64), (64,),
    (3, 3, 64, 128), (128,),
    (1152, 256), (256,),
    (256, 10), (10,),
]  # fmt: skip


def random_results(rng: np.random.Generator, num_clients: int) -> list[tuple[list[np.ndarray], int]]:
    """Random float32 weights with the CNN's shapes and a random num_examples per client."""
    return [
        (
            [rng.normal(0.0, 0.05, size=shape).astype(np.float32) for shape in CNN_LAYER_SHAPES],
            int(rng.integers(100, 12_000)),
        )
        for _ in range(num_clients)
    ]


def best_time(fn: Callable[[], list[np.ndarray]], repeats: int) -> tuple[float, list[np.ndarray]]:
    """Best wall time in seconds of ``repeats`` calls, and the last result."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def max_abs_diff(ours: list[np.ndarray], theirs: list[np.ndarray]) -> float:
    """Largest absolute difference between two lists of layers."""
    return max(float(np.max(np.abs(a - np.asarray(b)))) for a, b in zip(ours, theirs, strict=True))


def _import_strategies():
    """Import fedmnist.strategies, from this checkout if the package is not installed."""
    if importlib.util.find_spec("fedmnist") is None:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from fedmnist import strategies

    return strategies


def run(num_clients: int, repeats: int, num_malicious: int, beta: float, seed: int) -> None:
    """Print the timing table."""
    from flwr.server.strategy import aggregate as flwr_agg

    strategies = _import_strategies()
    results = random_results(np.random.default_rng(seed), num_clients)
    keep = num_clients - num_malicious
    cases = [
        ("fedavg", lambda: strategies.weighted_average(results), lambda: flwr_agg.aggregate(results)),
        (
            "fedmed",
            lambda: strategies.coordinate_median(results),
            lambda: flwr_agg.aggregate_median(results),
        ),
        (
            f"trimmed (beta={beta})",
            lambda: strategies.trimmed_mean(results, beta),
            lambda: flwr_agg.aggregate_trimmed_avg(results, beta),
        ),
        (
            f"krum (f={num_malicious})",
            lambda: strategies.krum(results, num_malicious),
            lambda: flwr_agg.aggregate_krum(results, num_malicious, 0),
        ),
        (
            f"multikrum (f={num_malicious}, m={keep})",
            lambda: strategies.krum(results, num_malicious, keep),
            lambda: flwr_agg.aggregate_krum(results, num_malicious, keep),
        ),
    ]

    num_params = sum(int(np.prod(shape)) for shape in CNN_LAYER_SHAPES)
    print(
        f"{num_clients} clients x {num_params:,} float32 parameters, best of {repeats} runs, "
        f"numpy {np.__version__}"
    )
    header = f"{'rule':<28} {'ours (ms)':>10} {'Flower (ms)':>12} {'Flower/ours':>12} {'max |diff|':>11}"
    print(header)
    print("-" * len(header))
    for name, ours_fn, flwr_fn in cases:
        ours_s, ours = best_time(ours_fn, repeats)
        flwr_s, theirs = best_time(flwr_fn, repeats)
        print(
            f"{name:<28} {ours_s * 1e3:>10.2f} {flwr_s * 1e3:>12.2f} "
            f"{flwr_s / ours_s:>12.2f} {max_abs_diff(ours, theirs):>11.2e}"
        )


def main(argv: list[str] | None = None) -> None:
    """Parse the arguments and run the benchmark."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=10, help="number of clients (default 10)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per rule (default 5)")
    parser.add_argument("--malicious", type=int, default=1, help="Krum's f (default 1)")
    parser.add_argument("--beta", type=float, default=0.2, help="trimmed-mean beta (default 0.2)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    args = parser.parse_args(argv)
    if args.clients <= 2 * args.malicious + 2:
        parser.error(f"Krum needs --clients > 2 * --malicious + 2 = {2 * args.malicious + 2}")
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    run(args.clients, args.repeats, args.malicious, args.beta, args.seed)


if __name__ == "__main__":
    main()
