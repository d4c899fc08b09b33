"""The training benchmark's bare-TensorFlow reference computes the shared CNN's own function."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
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


def load_bench_demo():
    spec = importlib.util.spec_from_file_location("bench_demo", REPO_ROOT / "benchmarks" / "bench_demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def demo_summary(fedavg, fedprox, fedmed):
    return {"methods": {"fedavg": {"accuracy": fedavg}, "fedprox": {"accuracy": fedprox},
                        "fedmed": {"accuracy": fedmed}}}


def test_the_demo_benchmark_fails_any_global_model_below_the_bar():
    bench = load_bench_demo()

    assert bench.below_threshold(demo_summary(0.97, 0.96, 0.95), 0.95) == []
    assert bench.below_threshold(demo_summary(0.97, 0.9499, 0.95), 0.95) == ["fedprox"]
    assert bench.below_threshold(demo_summary(0.84, 0.97, 0.80), 0.95) == ["fedavg", "fedmed"]


@pytest.mark.slow
def test_the_demo_benchmark_runs_the_command_on_a_small_file(raw_mnist, tmp_path, capsys):
    """The benchmark drives ``fedmnist demo`` through its parser: flags it forwards must reach the demo."""
    bench = load_bench_demo()
    train = np.sort(np.concatenate([np.flatnonzero(raw_mnist.y_train == c)[:30] for c in range(10)]))
    test = np.sort(np.concatenate([np.flatnonzero(raw_mnist.y_test == c)[:10] for c in range(10)]))
    small = tmp_path / "mnist_small.npz"
    np.savez(small, x_train=raw_mnist.x_train[train], y_train=raw_mnist.y_train[train],
             x_test=raw_mnist.x_test[test], y_test=raw_mnist.y_test[test])

    passed = bench.main(["--data", str(small), "--min-accuracy", "0", "--clients", "3", "--local-epochs", "1",
                         "--out", str(tmp_path / "demo")])
    out = capsys.readouterr().out
    failed = bench.main(["--data", str(small), "--min-accuracy", "1", "--clients", "3", "--local-epochs", "1",
                         "--optimizer", "sgd", "--learning-rate", "0.05", "--momentum", "0.9"])

    assert passed == 0 and failed == 1
    assert "3 iid clients, adam, lr 0.001, 1 epochs, batch 32" in out
    for label in ("FedAvg", "FedProx", "FedMed", "locals (mean of 3)"):
        assert label in out
    assert (tmp_path / "demo" / "resultados_agregacion.json").is_file()
    assert "sgd, lr 0.05, momentum 0.9" in capsys.readouterr().out
