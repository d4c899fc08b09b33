"""Tests of the command-line entry points run as the team runs them: exit codes, messages, nothing written.

Each test starts a Python process (TensorFlow's import makes that take several seconds), so only what
needs a real process is tested here; the package functions are tested in-process elsewhere.
"""

import argparse
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fedmnist.cli import add_aggregate_args
from fedmnist.exchange import (
    ClientUpdate,
    global_path,
    load_global,
    load_update,
    make_global,
    save_global,
    save_update,
    update_path,
)
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


def members_updates(weights_dir, data_dir, start):
    """Three members' updates made from ``start`` (small perturbations), with particion.json's counts."""
    manifest = json.loads((data_dir / "particion.json").read_text())
    rng = np.random.default_rng(0)
    for client in manifest["clients"]:
        weights = [(w + 0.02 * rng.standard_normal(w.shape)).astype(np.float32) for w in start.weights]
        save_update(update_path(weights_dir, client["client_id"]), ClientUpdate(
            client_id=client["client_id"], round=start.round, num_examples=client["num_examples"], weights=weights,
            start_sha256=start.sha256, fingerprint=model_fingerprint()))


def test_global_aggregation_with_global_weights_round_and_krum_f(tmp_path, small_federation):
    # Prepare: the round's file kept apart from the updates; Krum with f = 0 (the default f = 1 needs
    # more than four clients, and there are three)
    weights_dir, server_dir, out_dir = tmp_path / "pesos", tmp_path / "servidor", tmp_path / "global"
    start = make_global(initial_weights(), 0, "init", 42)
    save_global(global_path(server_dir, 0), start)
    members_updates(weights_dir, small_federation, start)

    # Execute
    proc = run_cli(REPO / "global_aggregation.py", "--weights-dir", weights_dir, "--data-dir", small_federation,
                   "--global-weights", global_path(server_dir, 0), "--round", "0", "--methods", "fedavg", "krum",
                   "--krum-f", "0", "--out", out_dir)

    # Assert
    assert proc.returncode == 0, proc.stderr
    assert "round 1:" in proc.stdout
    following = load_global(global_path(out_dir, 1))
    assert following.round == 1 and following.seed == 42
    summary = json.loads((out_dir / "resultados_agregacion.json").read_text())
    assert (summary["round"], summary["start_round"], summary["start_sha256"]) == (1, 0, start.sha256)
    members = {weights_sha256(load_update(update_path(weights_dir, k)).weights) for k in (1, 2, 3)}
    assert summary["methods"]["krum"]["sha256"] in members  # Krum picks one member's weights


def test_krum_f_flag_and_its_old_name():
    # Prepare
    parser = argparse.ArgumentParser()
    add_aggregate_args(parser)

    # Execute / Assert
    assert parser.parse_args([]).krum_f == 1
    assert parser.parse_args(["--krum-f", "2"]).krum_f == 2
    with pytest.warns(FutureWarning, match="--num-malicious is deprecated.*use --krum-f"):
        assert parser.parse_args(["--num-malicious", "0"]).krum_f == 0


def test_global_aggregation_without_the_rounds_file(tmp_path, small_federation):
    # Prepare: members' updates but no pesos_globales_ronda_0.pkl beside them, and no --global-weights
    weights_dir, out_dir = tmp_path / "pesos", tmp_path / "global"
    members_updates(weights_dir, small_federation, make_global(initial_weights(), 1, "fedavg", 42))

    # Execute
    proc = run_cli(REPO / "global_aggregation.py", "--weights-dir", weights_dir, "--data-dir", small_federation,
                   "--out", out_dir)

    # Assert
    assert proc.returncode == 2, proc.stderr
    assert "--global-weights" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out_dir.exists()


def test_global_aggregation_into_a_file(tmp_path, small_federation):
    # Prepare: --out names an existing file
    weights_dir, out_file = tmp_path / "pesos", tmp_path / "global"
    start = make_global(initial_weights(), 0, "init", 42)
    save_global(global_path(weights_dir, 0), start)
    members_updates(weights_dir, small_federation, start)
    out_file.write_text("not a directory")

    # Execute
    proc = run_cli(REPO / "global_aggregation.py", "--weights-dir", weights_dir, "--data-dir", small_federation,
                   "--out", out_file)

    # Assert
    assert proc.returncode == 2, proc.stderr
    assert str(out_file) in proc.stderr and "is a file" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert out_file.read_text() == "not a directory"


def test_train_with_a_missing_partition(tmp_path):
    # Prepare
    data_dir, out_dir = tmp_path / "datos", tmp_path / "salida"
    data_dir.mkdir()

    # Execute
    proc = run_cli("-m", "fedmnist.cli", "train", "--client", "2", "--data-dir", data_dir, "--local-epochs", "1",
                   "--out", out_dir)

    # Assert
    assert proc.returncode == 2, proc.stderr
    assert "cliente_2.npz" in proc.stderr and "partition file not found" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out_dir.exists()


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--clients", "0"], "number of clients must be an integer >= 1"),
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


# --- the member's defaults: fedmnist train and fedmnist demo (in-process: argparse and the config they build) ---


def captured_call(monkeypatch, module, name):
    """Replace ``module.name`` by a recorder that stops the command before any work (exit status 2)."""
    from fedmnist.errors import FedMnistError

    calls = []

    def record(*args, **kwargs):
        calls.append((args, kwargs))
        raise FedMnistError("stopped by the test")

    monkeypatch.setattr(module, name, record)
    return calls


def test_train_defaults_are_the_member_job_and_the_aggressive_setting_is_a_flag_away(monkeypatch, tmp_path):
    import fedmnist.local
    from fedmnist.cli import main
    from fedmnist.training import TrainConfig

    # Prepare
    calls = captured_call(monkeypatch, fedmnist.local, "run_local_training")
    base = ["train", "--client", "1", "--data-dir", str(tmp_path), "--out", str(tmp_path / "salida")]

    # Execute
    main(base)
    main([*base, "--optimizer", "sgd", "--learning-rate", "0.05", "--momentum", "0.9", "--proximal-mu", "0.01",
          "--seed", "3"])

    # Assert: the config handed to the package, field by field
    default, aggressive = calls[0][0][3], calls[1][0][3]
    assert default == TrainConfig()
    assert (default.optimizer, default.learning_rate, default.momentum) == ("adam", 1e-3, 0.0)
    assert aggressive == TrainConfig(optimizer="sgd", learning_rate=0.05, momentum=0.9, mu=0.01, seed=3)


def test_demo_defaults_are_the_member_job_and_the_aggressive_setting_is_a_flag_away(monkeypatch):
    import fedmnist.demo
    from fedmnist.cli import main
    from fedmnist.demo import DemoConfig
    from fedmnist.settings import DEMO_PROXIMAL_MU as DEMO_MU
    from fedmnist.training import TrainConfig

    # Prepare
    calls = captured_call(monkeypatch, fedmnist.demo, "run_demo")

    # Execute
    main(["demo", "--quiet"])
    main(["demo", "--quiet", "--optimizer", "sgd", "--learning-rate", "0.05", "--momentum", "0.9", "--proximal-mu",
          "0.1"])

    # Assert
    default, aggressive = calls[0][0][0], calls[1][0][0]
    assert default == DemoConfig(quiet=True) and DemoConfig().mu == DEMO_MU
    assert default.train_config() == TrainConfig()
    assert default.train_config(default.mu) == TrainConfig(mu=DEMO_MU)
    assert aggressive.train_config(aggressive.mu) == TrainConfig(optimizer="sgd", learning_rate=0.05, momentum=0.9,
                                                                 mu=0.1)


def test_train_help_names_the_defaults_and_scaffolds_flags(capsys):
    from fedmnist.cli import main

    # Execute
    with pytest.raises(SystemExit):
        main(["train", "--help"])

    # Assert
    text = " ".join(capsys.readouterr().out.split())
    assert "local optimizer (default adam)" in text and "(default 0.001)" in text
    assert "--optimizer sgd --learning-rate 0.05 --momentum 0.9" in text
    assert "--optimizer sgd --momentum 0" in text  # what --scaffold needs


def test_train_scaffold_with_the_default_adam_is_refused_clearly(small_federation, tmp_path, capsys):
    from fedmnist.cli import main

    # Prepare
    out_dir = tmp_path / "salida"

    # Execute
    code = main(["train", "--client", "1", "--data-dir", str(small_federation), "--local-epochs", "1", "--scaffold",
                 "--out", str(out_dir)])

    # Assert
    err = capsys.readouterr().err
    assert code == 2
    assert "SCAFFOLD needs plain SGD as the local optimizer, not 'adam'" in err
    assert "Traceback" not in err
    assert not out_dir.exists() or not any(out_dir.iterdir())


# --- the CLI boundary: one line, exit 2, nothing written ----------------------------------------------


def assert_one_line_error(code: int, err: str, *fragments: str) -> None:
    """Exit status 2 and exactly one ``error:`` line on stderr naming what went wrong, no traceback."""
    assert code == 2, err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    for fragment in fragments:
        assert fragment in lines[0], err


def test_special_file_in_place_of_the_partition_does_not_hang_train(tmp_path, small_federation):
    import shutil

    # Prepare: a FIFO where the member's cliente_1.npz should be (hashing it used to block for ever)
    data_dir, out_dir = tmp_path / "datos", tmp_path / "salida"
    shutil.copytree(small_federation, data_dir)
    (data_dir / "cliente_1.npz").unlink()
    os.mkfifo(data_dir / "cliente_1.npz")

    # Execute
    proc = run_cli("-m", "fedmnist.cli", "train", "--client", "1", "--data-dir", data_dir, "--local-epochs", "1",
                   "--out", out_dir)

    # Assert
    assert_one_line_error(proc.returncode, proc.stderr, str(data_dir / "cliente_1.npz"), "is a FIFO")
    assert not out_dir.exists()


@pytest.mark.parametrize("command", ["split", "init"])
def test_out_naming_an_existing_file_is_one_line(tmp_path, capsys, mnist_path, command):
    from fedmnist.cli import main

    # Prepare
    out_file = tmp_path / "salida"
    out_file.write_text("not a directory")
    extra = ["--data", str(mnist_path)] if command == "split" else []

    # Execute
    code = main([command, *extra, "--out", str(out_file)])

    # Assert
    assert_one_line_error(code, capsys.readouterr().err, str(out_file), "is a file, not a directory")
    assert out_file.read_text() == "not a directory"


@pytest.mark.parametrize("command", ["split", "init", "train", "simulate", "aggregation-script"])
def test_negative_seed_is_one_line(tmp_path, capsys, mnist_path, small_federation, command):
    from fedmnist.cli import main, main_aggregation

    # Prepare
    out_dir = tmp_path / "salida"
    extra = {"split": ["--data", str(mnist_path)], "init": [],
             "train": ["--client", "1", "--data-dir", str(small_federation), "--local-epochs", "1"],
             "simulate": ["--clients", "3", "--rounds", "1", "--data", str(mnist_path)],
             "aggregation-script": ["--weights-dir", str(tmp_path), "--data-dir", str(small_federation)]}[command]

    # Execute
    if command == "aggregation-script":  # global_aggregation.py: --seed rebuilds round 0's weights
        code = main_aggregation([*extra, "--seed", "-1", "--out", str(out_dir)])
    else:
        code = main([command, *extra, "--seed", "-1", "--out", str(out_dir)])

    # Assert
    assert_one_line_error(code, capsys.readouterr().err, "seed must be an integer >= 0 (got -1)")
    assert not out_dir.exists()


def disk_full(monkeypatch) -> None:
    """Every new output file fails with ENOSPC, as on a full disk (the write probe of ``check_writable_dir``
    still succeeds: the disk fills up during the run)."""
    import errno

    from fedmnist import io

    real = io._create_temp

    def create_temp(path, suffix, directory=None):
        if Path(path).name == "probe":
            return real(path, suffix, directory)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(io, "_create_temp", create_temp)


@pytest.mark.parametrize("command", ["aggregate", "train", "simulate"])
def test_full_disk_is_one_line_and_writes_nothing(tmp_path, capsys, monkeypatch, small_federation, mnist_path,
                                                  command):
    from fedmnist.cli import main

    # Prepare
    out_dir = tmp_path / "salida"
    out_dir.mkdir()
    if command == "aggregate":
        weights_dir = tmp_path / "pesos"
        start = make_global(initial_weights(), 0, "init", 42)
        save_global(global_path(weights_dir, 0), start)
        members_updates(weights_dir, small_federation, start)
        args = ["aggregate", "--weights-dir", str(weights_dir), "--data-dir", str(small_federation),
                "--methods", "fedavg"]
    elif command == "train":
        args = ["train", "--client", "1", "--data-dir", str(small_federation), "--local-epochs", "1"]
    else:
        args = ["simulate", "--clients", "3", "--rounds", "1", "--methods", "fedavg", "--local-epochs", "1",
                "--train-subset", "300", "--test-subset", "100", "--quiet", "--data", str(mnist_path)]
    disk_full(monkeypatch)

    # Execute
    code = main([*args, "--out", str(out_dir)])

    # Assert
    assert_one_line_error(code, capsys.readouterr().err, str(out_dir), "No space left on device")
    assert list(out_dir.iterdir()) == []


@pytest.mark.parametrize("command", ["init", "split"])
def test_read_only_destination_is_one_line(tmp_path, capsys, monkeypatch, mnist_path, command):
    import errno

    from fedmnist import io
    from fedmnist.cli import main

    # Prepare: every file created in the destination fails as on a read-only mount (chmod cannot
    # show it to root)
    out_dir = tmp_path / "salida"
    out_dir.mkdir()

    def read_only(path, suffix, directory=None):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))

    monkeypatch.setattr(io, "_create_temp", read_only)
    extra = ["--data", str(mnist_path)] if command == "split" else []

    # Execute
    code = main([command, *extra, "--out", str(out_dir)])

    # Assert
    assert_one_line_error(code, capsys.readouterr().err, str(out_dir), "not writable (Read-only file system)")
    assert list(out_dir.iterdir()) == []
