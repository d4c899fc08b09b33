"""Local training speed: ``ClientTrainer.train`` against a bare TensorFlow loop of the same arithmetic.

Usage (from the repository root)::

    PYTHONPATH=. python benchmarks/bench_training.py --data ../shared/data/mnist.npz \\
        [--images 600 --epochs 5 --batch-sizes 10 32 --repeats 5] [--onednn both|default|on|off]

For each batch size, one client's ``--images`` MNIST images are trained for ``--epochs`` epochs by

* ``fedmnist``: ``ClientTrainer.train`` (Keras model, Keras SGD, dropout, loss/accuracy bookkeeping,
  a whole epoch in one ``tf.function``), exactly what every client of the simulation runs;
* ``bare TF``: the same CNN written with ``tf.nn`` ops on plain variables, plain SGD by
  ``assign_sub``, no dropout, no bookkeeping, also one ``tf.function`` per epoch: the least any
  TensorFlow loop pays for this CNN's arithmetic on this machine.

Both start from the same weights and run interleaved ``--repeats`` times; the best of each is shown
with its images per second, the arithmetic rate (≈ 46.5 MFLOP per image and step: the forward pass
is 15.5 MFLOP, the backward about twice that) and the ratio fedmnist ÷ bare TF (1.0 = no overhead).
The line "McMahan round" projects one round of McMahan et al.'s protocol (10 clients × 600 images ×
5 epochs = 30,000 image-steps) from the fedmnist rate.

oneDNN: TensorFlow reads ``TF_ENABLE_ONEDNN_OPTS`` once, at import, so each setting runs in its own
subprocess; ``--onednn both`` (default) measures the default and ``=1`` and prints their ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MCMAHAN_IMAGE_STEPS = 10 * 600 * 5


def forward_mflop() -> float:
    """Multiply-adds ×2 of one image's forward pass through the shared CNN, in MFLOP."""
    convs = [(28, 1, 32), (14, 32, 64), (7, 64, 128)]  # (output side, in channels, out channels), 3×3
    flops = sum(side * side * cin * cout * 9 * 2 for side, cin, cout in convs)
    flops += 1152 * 256 * 2 + 256 * 10 * 2
    return flops / 1e6


def bare_logits(weights, images):
    """The shared CNN's logits from its 10 weight arrays with plain ``tf.nn`` ops (no dropout)."""
    import tensorflow as tf

    h = images
    for i in range(3):
        h = tf.nn.relu(tf.nn.conv2d(h, weights[2 * i], 1, "SAME") + weights[2 * i + 1])
        h = tf.nn.max_pool2d(h, 2, 2, "VALID")
    h = tf.nn.relu(tf.reshape(h, [-1, 1152]) @ weights[6] + weights[7])
    return h @ weights[8] + weights[9]


def _bare_loop(initial, x, y, learning_rate: float):
    """A ``tf.function`` epoch of plain SGD on the shared CNN's math, and its variables."""
    import tensorflow as tf

    weights = [tf.Variable(w) for w in initial]

    @tf.function
    def epoch(order, batch_size):
        n = tf.shape(order)[0]
        for i in tf.range((n + batch_size - 1) // batch_size):
            idx = order[i * batch_size: tf.minimum((i + 1) * batch_size, n)]
            xb, yb = tf.gather(x, idx), tf.gather(y, idx)
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(yb, bare_logits(weights, xb)))
            for variable, grad in zip(weights, tape.gradient(loss, weights)):
                variable.assign_sub(learning_rate * grad)
        return n

    return epoch, weights


def measure(args: argparse.Namespace) -> dict:
    """Run both loops in this process (with whatever oneDNN setting it was started with)."""
    import numpy as np
    import tensorflow as tf

    from fedmnist.data import load_raw_mnist, normalize_images
    from fedmnist.model import initial_weights
    from fedmnist.training import ClientTrainer

    mnist = load_raw_mnist(args.data)
    x = normalize_images(mnist.x_train[: args.images])
    y = mnist.y_train[: args.images].astype(np.int32)
    start = initial_weights(args.seed)
    trainer = ClientTrainer("sgd", args.lr, 0.0, model_seed=args.seed)
    epoch, bare_weights = _bare_loop(start, tf.constant(x), tf.constant(y), args.lr)
    rng = np.random.default_rng(args.seed)
    orders = [tf.constant(rng.permutation(len(x)).astype(np.int32)) for _ in range(args.epochs)]

    def run_fedmnist(batch_size: int) -> None:
        trainer.train(start, x, y, epochs=args.epochs, batch_size=batch_size, seed=args.seed)

    def run_bare(batch_size: int) -> None:
        for variable, value in zip(bare_weights, start):
            variable.assign(value)
        for order in orders:
            epoch(order, tf.constant(batch_size)).numpy()

    out = {"onednn": os.environ.get("TF_ENABLE_ONEDNN_OPTS", "default"), "batches": {}}
    for batch_size in args.batch_sizes:
        run_fedmnist(batch_size)  # trace and warm up both
        run_bare(batch_size)
        best = {"fedmnist": float("inf"), "bare": float("inf")}
        for _ in range(args.repeats):
            for name, fn in (("fedmnist", run_fedmnist), ("bare", run_bare)):
                t0 = time.perf_counter()
                fn(batch_size)
                best[name] = min(best[name], time.perf_counter() - t0)
        out["batches"][str(batch_size)] = best
    return out


def run_setting(args: argparse.Namespace, onednn: str | None) -> dict:
    """``measure`` in a subprocess with TF_ENABLE_ONEDNN_OPTS set to ``onednn`` (None: unset)."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    env.pop("TF_ENABLE_ONEDNN_OPTS", None)
    if onednn is not None:
        env["TF_ENABLE_ONEDNN_OPTS"] = onednn
    command = [sys.executable, __file__, "--child", "--data", str(args.data), "--images", str(args.images),
               "--epochs", str(args.epochs), "--repeats", str(args.repeats), "--lr", str(args.lr),
               "--seed", str(args.seed), "--batch-sizes", *map(str, args.batch_sizes)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"benchmark subprocess failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def report(args: argparse.Namespace, results: list[dict]) -> None:
    train_mflop = 3 * forward_mflop()
    steps = args.images * args.epochs
    print(f"one client: {args.images} images × {args.epochs} epochs = {steps} image-steps, "
          f"best of {args.repeats}; ≈ {train_mflop:.1f} MFLOP per image-step")
    print(f"{'oneDNN':>8} {'B':>4} {'fedmnist s':>11} {'img/s':>7} {'GFLOP/s':>8} {'bare TF s':>10} "
          f"{'img/s':>7} {'fedmnist ÷ bare':>16} {'McMahan round':>14}")
    for res in results:
        for batch, best in res["batches"].items():
            rate = steps / best["fedmnist"]
            print(f"{res['onednn']:>8} {batch:>4} {best['fedmnist']:11.2f} {rate:7.0f} "
                  f"{rate * train_mflop / 1e3:8.1f} {best['bare']:10.2f} {steps / best['bare']:7.0f} "
                  f"{best['fedmnist'] / best['bare']:16.2f} {MCMAHAN_IMAGE_STEPS / rate:12.1f} s")
    if len(results) == 2:
        for batch in results[0]["batches"]:
            ratio = results[0]["batches"][batch]["fedmnist"] / results[1]["batches"][batch]["fedmnist"]
            print(f"B={batch}: fedmnist time with TF_ENABLE_ONEDNN_OPTS={results[0]['onednn']} ÷ "
                  f"with ={results[1]['onednn']}: {ratio:.2f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=os.environ.get("FEDMNIST_DATA"), help="MNIST .npz")
    parser.add_argument("--images", type=int, default=600)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[10, 32])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--onednn", choices=("both", "default", "on", "off"), default="both")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args)))
        return 0
    settings = {"both": [None, "1"], "default": [None], "on": ["1"], "off": ["0"]}[args.onednn]
    report(args, [run_setting(args, s) for s in settings])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
