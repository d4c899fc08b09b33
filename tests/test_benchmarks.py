"""The training benchmark's bare-TensorFlow reference computes the shared CNN's own function."""

import importlib.util
from pathlib import Path

import numpy as np
import tensorflow as tf

from fedmnist.data import normalize_images
from fedmnist.model import build_model, get_weights

REPO_ROOT = Path(__file__).resolve().parents[1]


def load_bench_training():
    spec = importlib.util.spec_from_file_location("bench_training", REPO_ROOT / "benchmarks" / "bench_training.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bare_logits_match_the_keras_model(raw_mnist):
    bench = load_bench_training()
    model = build_model(7)
    x = normalize_images(raw_mnist.x_train[:32])
    expected = model(x, training=False).numpy()
    got = tf.nn.softmax(bench.bare_logits([tf.constant(w) for w in get_weights(model)], tf.constant(x))).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)


def test_forward_flop_count_of_the_shared_cnn():
    # conv1 0.45 + conv2 7.23 + conv3 7.23 + dense 0.59 + output 0.005 MFLOP
    assert abs(load_bench_training().forward_mflop() - 15.497) < 1e-3


def test_the_simulation_benchmark_runs_on_a_tiny_federation(mnist_path, capsys):
    """The benchmark calls the package's current API: a renamed function would break it silently."""
    spec = importlib.util.spec_from_file_location("bench_simulation", REPO_ROOT / "benchmarks" / "bench_simulation.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    code = module.main(["--data", str(mnist_path), "--clients", "2", "--per-client", "20", "--rounds", "1",
                        "--repeats", "1", "--skip-memory"])

    assert code == 0
    assert "run_simulation, all included" in capsys.readouterr().out
