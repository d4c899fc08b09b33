"""Tests of the command-line entry points run as the team runs them: exit codes, messages, nothing written.

Each test starts a Python process (TensorFlow's import makes that take several seconds), so only what
needs a real process is tested here; the package functions are tested in-process elsewhere.
"""

import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fedmnist.exchange import ClientUpdate, load_global, save_update, update_path
from fedmnist.model import initial_weights, model_fingerprint, weights_sha256

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow  # each test starts a Python process; they still run by default


def run_cli(*args, cwd=REPO):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    return subprocess.run([sys.executable, *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300, check=False)


class RunsCommand:
    """Unpickling this calls os.system: what a malicious teammate's .pkl could do."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def test_global_aggregation_init_writes_the_initial_weights(tmp_path):
    # Prepare
    out_dir = tmp_path / "pesos"

    # Execute
    proc = run_cli(REPO / "global_aggregation.py", "--init", "--out", out_dir)

    # Assert
    assert proc.returncode == 0, proc.stderr
    assert [p.name for p in out_dir.iterdir()] == ["pesos_globales_ronda_0.pkl"]
    start = load_global(out_dir / "pesos_globales_ronda_0.pkl")
    assert start.round == 0
    assert start.method == "init"
    expected = initial_weights()
    assert len(start.weights) == len(expected)
    for saved, built in zip(start.weights, expected):
        assert np.array_equal(saved, built)
    assert start.sha256 == weights_sha256(expected)
    assert "pesos_globales_ronda_0.pkl" in proc.stdout


def test_global_aggregation_refuses_a_malicious_pickle(tmp_path, small_federation):
    # Prepare: one honest update and one that would run a command when unpickled
    weights_dir, out_dir, marker = tmp_path / "pesos", tmp_path / "global", tmp_path / "pwned"
    weights = initial_weights()
    honest = ClientUpdate(client_id=1, round=0, num_examples=100, weights=weights,
                          start_sha256=weights_sha256(weights), fingerprint=model_fingerprint())
    save_update(update_path(weights_dir, 1), honest)
    update_path(weights_dir, 2).write_bytes(pickle.dumps(RunsCommand(f"touch {marker}")))

    # Execute
    proc = run_cli(REPO / "global_aggregation.py", "--weights-dir", weights_dir, "--data-dir", small_federation,
                   "--out", out_dir)

    # Assert
    assert proc.returncode == 2, proc.stderr
    assert "pesos_cliente_2.pkl" in proc.stderr
    assert "refusing to load" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not marker.exists(), "the pickle's code ran"
    assert not out_dir.exists()


def test_train_with_a_missing_partition(tmp_path):
    # Prepare
    data_dir, out_dir = tmp_path / "datos", tmp_path / "salida"
    data_dir.mkdir()

    # Execute
    proc = run_cli("-m", "fedmnist.cli", "train", "--client", "2", "--data-dir", data_dir, "--epochs", "1",
                   "--out", out_dir)

    # Assert
    assert proc.returncode == 2, proc.stderr
    assert "cliente_2.npz" in proc.stderr and "partition file not found" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out_dir.exists()


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--clients", "0"], "number of clients must be at least 1"),
        (["--partition", "bogus"], "invalid choice: 'bogus'"),
    ],
    ids=["zero-clients", "unknown-scheme"],
)
def test_split_with_bad_arguments(args, fragment, tmp_path, mnist_path):
    # Prepare
    out_dir = tmp_path / "datos"

    # Execute
    proc = run_cli("-m", "fedmnist.cli", "split", *args, "--data", mnist_path, "--out", out_dir)

    # Assert
    assert proc.returncode == 2, proc.stderr
    assert fragment in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out_dir.exists()
