"""Tests for fedmnist.partition and split_data.py: IID bounds, Dirichlet skew, shards, the written files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest

from fedmnist.cli import main_split
from fedmnist.data import load_partition_raw
from fedmnist.errors import ConfigError
from fedmnist.federation_files import DISTRIBUTION_PLOT, MANIFEST_FILE, read_manifest, write_federation
from fedmnist.io import sha256_file
from fedmnist.partition import (
    PartitionConfig,
    class_counts,
    partition,
    partition_dirichlet,
    partition_iid,
    partition_shards,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
SCHEME_CONFIGS = [
    PartitionConfig("iid", 10, seed=1),
    PartitionConfig("dirichlet", 10, alpha=0.5, seed=1),
    PartitionConfig("dirichlet", 10, alpha=0.05, seed=1),
    PartitionConfig("shards", 100, shards_per_client=2, seed=1),
]
SCHEME_IDS = ["iid", "dirichlet-0.5", "dirichlet-0.05", "shards-100x2"]


def assert_iid_bounds(counts: np.ndarray, class_totals: np.ndarray) -> None:
    """Every client's count of every class within ±1 of total/N, and client sizes within ±1."""
    num_clients = counts.shape[0]
    expected = class_totals / num_clients
    assert np.all(np.abs(counts - expected) < 1), counts
    sizes = counts.sum(axis=1)
    assert sizes.max() - sizes.min() <= 1, sizes
    np.testing.assert_array_equal(counts.sum(axis=0), class_totals)


def start_split(*args: str | Path) -> subprocess.Popen:
    """Start ``python split_data.py ARGS`` from the repository root, capturing its output."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "TF_CPP_MIN_LOG_LEVEL": "2"}
    return subprocess.Popen(
        [sys.executable, "split_data.py", *map(str, args)], cwd=REPO_ROOT, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


@pytest.fixture(scope="module")
def labels(raw_mnist) -> np.ndarray:
    return raw_mnist.y_train


@pytest.fixture(scope="module")
def small_npz(tmp_path_factory, small_mnist) -> Path:
    """The 600/200 slice as a keras-layout MNIST file, for fast CLI runs."""
    path = tmp_path_factory.mktemp("small") / "mnist_small.npz"
    np.savez(path, x_train=small_mnist.x_train, y_train=small_mnist.y_train,
             x_test=small_mnist.x_test, y_test=small_mnist.y_test)
    return path


@pytest.fixture(scope="module")
def split_runs(tmp_path_factory, mnist_path, small_npz) -> dict[str, tuple[int, str, str, Path]]:
    """Run the real ``split_data.py`` twice, concurrently: a bad argument, and 5 IID clients of MNIST.

    Each run pays for importing TensorFlow, so both start together. Maps a name to
    (exit code, stdout, stderr, output directory).
    """
    base = tmp_path_factory.mktemp("split_cli")
    outs = {"bad": base / "bad", "iid5": base / "iid5"}
    procs = {
        "bad": start_split("--clients", "0", "--data", small_npz, "--out", outs["bad"]),
        "iid5": start_split("--clients", "5", "--partition", "iid", "--data", mnist_path,
                            "--out", outs["iid5"]),
    }
    results = {}
    try:
        for name, proc in procs.items():
            stdout, stderr = proc.communicate(timeout=300)
            results[name] = (proc.returncode, stdout, stderr, outs[name])
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return results


# --- IID ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_clients", [1, 5, 7])
def test_iid_is_stratified(labels, num_clients):
    # Prepare
    totals = np.bincount(labels, minlength=10)

    # Execute
    parts = partition_iid(labels, num_clients, np.random.default_rng(3))

    # Assert
    assert len(parts) == num_clients
    assert_iid_bounds(class_counts(labels, parts), totals)


def test_iid_single_client_gets_everything(labels):
    # Execute
    parts = partition(labels, PartitionConfig("iid", 1))

    # Assert
    np.testing.assert_array_equal(parts[0], np.arange(labels.size))


def test_class_counts_hand_computed():
    # Prepare
    labels = np.array([0, 1, 1, 9, 9, 9], dtype=np.uint8)
    parts = [np.array([0, 3]), np.array([1, 2, 4, 5])]

    # Execute
    counts = class_counts(labels, parts)

    # Assert
    expected = np.zeros((2, 10), dtype=np.int64)
    expected[0, 0], expected[0, 9] = 1, 1
    expected[1, 1], expected[1, 9] = 2, 2
    np.testing.assert_array_equal(counts, expected)


# --- every scheme --------------------------------------------------------------------------------


@pytest.mark.parametrize("config", SCHEME_CONFIGS, ids=SCHEME_IDS)
def test_parts_are_disjoint_and_cover_everything(labels, config):
    # Prepare
    original = labels.copy()

    # Execute
    parts = partition(labels, config)

    # Assert
    assert len(parts) == config.num_clients
    assert all(p.dtype == np.int64 for p in parts)
    everything = np.sort(np.concatenate(parts))
    np.testing.assert_array_equal(everything, np.arange(labels.size))
    np.testing.assert_array_equal(labels, original)


@pytest.mark.parametrize("config", SCHEME_CONFIGS, ids=SCHEME_IDS)
def test_same_seed_same_split_other_seed_other_split(labels, config):
    # Execute
    first = partition(labels, config)
    again = partition(labels, config)
    other = partition(labels, PartitionConfig(**{**asdict(config), "seed": config.seed + 1}))

    # Assert
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other))


# --- Dirichlet -----------------------------------------------------------------------------------


def mean_max_class_share(counts: np.ndarray) -> float:
    return float(np.mean(counts.max(axis=1) / counts.sum(axis=1)))


def mean_classes_for_90_percent(counts: np.ndarray) -> float:
    shares = -np.sort(-counts, axis=1) / counts.sum(axis=1, keepdims=True)
    return float(np.mean((np.cumsum(shares, axis=1) < 0.9).sum(axis=1) + 1))


def test_dirichlet_skew_grows_as_alpha_falls(labels):
    # Execute
    counts = {
        alpha: class_counts(labels, partition(labels, PartitionConfig("dirichlet", 10, alpha=alpha, seed=7)))
        for alpha in (100.0, 1.0, 0.1)
    }

    # Assert
    for c in counts.values():
        assert c.sum(axis=1).min() >= 10  # every client non-empty (default minimum size)
    share = [mean_max_class_share(counts[a]) for a in (100.0, 1.0, 0.1)]
    needed = [mean_classes_for_90_percent(counts[a]) for a in (100.0, 1.0, 0.1)]
    assert share[0] < share[1] < share[2], share
    assert needed[0] > needed[1] > needed[2], needed
    assert share[0] < 0.2  # alpha = 100 is close to IID (max share 0.1 when perfectly balanced)
    assert needed[2] <= 4  # alpha = 0.1 leaves clients with a few dominant digits


def test_dirichlet_tiny_dataset_never_leaves_a_client_empty():
    # Prepare
    labels = np.repeat(np.arange(10, dtype=np.uint8), 4)  # 40 images, 10 clients

    # Execute
    parts = partition_dirichlet(labels, 10, 0.3, np.random.default_rng(0))

    # Assert
    assert min(p.size for p in parts) >= 1
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(40))


def test_dirichlet_impossible_split_raises():
    # Prepare: one class only, and alpha so small that one client always gets nearly all of it
    labels = np.zeros(20, dtype=np.uint8)

    # Execute
    with pytest.raises(ConfigError) as excinfo:
        partition_dirichlet(labels, 10, 1e-4, np.random.default_rng(0))

    # Assert
    assert "larger alpha" in str(excinfo.value)


# --- shards ---------------------------------------------------------------------------------------


def test_shards_mcmahan_setup(labels):
    # Execute
    parts = partition(labels, PartitionConfig("shards", 100, shards_per_client=2, seed=0))

    # Assert
    assert [p.size for p in parts] == [600] * 100
    classes_per_client = (class_counts(labels, parts) > 0).sum(axis=1)
    # A sorted shard of 300 images can straddle one class boundary, so at most 2 classes a shard.
    assert classes_per_client.max() <= 4
    # Only the 9 class boundaries can fall inside a shard, so at most 9 clients exceed 2 classes.
    assert np.mean(classes_per_client <= 2) >= 0.8
    assert np.sum(classes_per_client > 2) <= 9


def test_shards_small_hand_made():
    # Prepare: 4 classes x 6 images, 4 clients x 2 shards of 3 -> every shard is a single class
    labels = np.repeat(np.arange(4, dtype=np.uint8), 6)[::-1].copy()

    # Execute
    parts = partition_shards(labels, 4, 2, np.random.default_rng(5))

    # Assert
    for p in parts:
        assert p.size == 6
        assert len(np.unique(labels[p])) <= 2


# --- bad arguments --------------------------------------------------------------------------------


BAD_CONFIGS = [
    (PartitionConfig("iid", 0), "number of clients must be an integer >= 1"),
    (PartitionConfig("iid", -3), "number of clients must be an integer >= 1"),
    (PartitionConfig("iid", 601), "cannot split 600 images among 601 clients"),
    (PartitionConfig("dirichlet", 5, alpha=0.0), "alpha must be > 0"),
    (PartitionConfig("dirichlet", 5, alpha=-1.0), "alpha must be > 0"),
    (PartitionConfig("dirichlet", 5, alpha=float("nan")), "alpha must be > 0"),
    (PartitionConfig("shards", 7, shards_per_client=2), "do not divide into 14 equal shards"),
    (PartitionConfig("shards", 5, shards_per_client=0), "shards per client must be an integer >= 1"),
    (PartitionConfig("iid", 2.5), "number of clients must be an integer >= 1"),
    (PartitionConfig("iid", True), "number of clients must be an integer >= 1"),
    (PartitionConfig("random", 5), "unknown partition scheme 'random'"),
]
BAD_IDS = ["zero-clients", "negative-clients", "more-clients-than-images", "alpha-zero",
           "alpha-negative", "alpha-nan", "shards-not-dividing", "zero-shards", "fractional-clients", "bool-clients",
           "unknown-scheme"]


@pytest.mark.parametrize(("config", "fragment"), BAD_CONFIGS, ids=BAD_IDS)
def test_bad_config_raises(small_mnist, config, fragment):
    # Execute
    with pytest.raises(ConfigError) as excinfo:
        partition(small_mnist.y_train, config)

    # Assert
    assert fragment in str(excinfo.value)


@pytest.mark.parametrize(("config", "fragment"), BAD_CONFIGS, ids=BAD_IDS)
def test_bad_config_writes_nothing(tmp_path, small_mnist, config, fragment):
    # Prepare
    out = tmp_path / "fed"

    # Execute
    with pytest.raises(ConfigError):
        write_federation(small_mnist, config, out)

    # Assert
    assert not out.exists()


def test_partition_shards_direct_call_checks_divisibility():
    # Execute / Assert
    with pytest.raises(ConfigError, match="10 images do not divide into 3 equal shards"):
        partition_shards(np.zeros(10, np.uint8), 3, 1, np.random.default_rng(0))


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--clients", "0"], "an integer >= 1"),
        (["--clients", "601"], "cannot split 600 images"),
        (["--partition", "dirichlet", "--alpha", "0"], "alpha must be > 0"),
        (["--partition", "shards", "--clients", "7"], "do not divide"),
    ],
    ids=["zero-clients", "too-many-clients", "alpha-zero", "shards-not-dividing"],
)
def test_cli_bad_arguments_in_process(tmp_path, capsys, small_npz, args, fragment):
    # Prepare
    out = tmp_path / "fed"

    # Execute
    code = main_split([*args, "--data", str(small_npz), "--out", str(out)])

    # Assert
    captured = capsys.readouterr()
    assert code == 2
    assert fragment in captured.err and captured.err.startswith("error: ")
    assert not out.exists()


def test_cli_unknown_scheme_is_a_usage_error(tmp_path, capsys, small_npz):
    # Prepare
    out = tmp_path / "fed"

    # Execute
    with pytest.raises(SystemExit) as excinfo:
        main_split(["--partition", "random", "--data", str(small_npz), "--out", str(out)])

    # Assert
    assert excinfo.value.code == 2
    assert "invalid choice: 'random'" in capsys.readouterr().err
    assert not out.exists()


def test_cli_missing_data_file_is_a_clean_error(tmp_path, capsys):
    # Prepare
    out = tmp_path / "fed"
    missing = tmp_path / "no_mnist.npz"

    # Execute
    code = main_split(["--data", str(missing), "--out", str(out)])

    # Assert
    err = capsys.readouterr().err
    assert code == 2
    assert str(missing) in err and "not found" in err
    assert not out.exists()


@pytest.mark.slow
def test_split_data_script_bad_argument_subprocess(split_runs):
    # Execute
    code, _, stderr, out = split_runs["bad"]

    # Assert
    assert code == 2, stderr
    assert "error: the number of clients must be an integer >= 1 (got 0)" in stderr
    assert "Traceback" not in stderr
    assert not out.exists()


# --- the written federation ------------------------------------------------------------------------


def test_write_federation_files(small_federation):
    # Execute
    names = sorted(p.name for p in small_federation.iterdir())

    # Assert
    assert names == sorted(["cliente_1.npz", "cliente_2.npz", "cliente_3.npz", "test.npz",
                            MANIFEST_FILE, DISTRIBUTION_PLOT])
    assert (small_federation / DISTRIBUTION_PLOT).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_manifest_matches_files(small_federation, small_mnist):
    # Execute
    manifest = read_manifest(small_federation)

    # Assert
    assert manifest["format"] == "fedmnist-partition"
    assert manifest["config"] == {"scheme": "iid", "num_clients": 3, "alpha": 0.5,
                                  "shards_per_client": 2, "seed": 42}
    assert manifest["num_clients"] == 3 and manifest["num_train_examples"] == 600
    assert [c["client_id"] for c in manifest["clients"]] == [1, 2, 3]
    for client in manifest["clients"]:
        path = small_federation / client["file"]
        _, y = load_partition_raw(path)
        assert client["file"] == f"cliente_{client['client_id']}.npz"
        assert client["num_examples"] == y.size
        assert client["class_counts"] == np.bincount(y, minlength=10).tolist()
        assert client["sha256"] == sha256_file(path)
    test = manifest["test"]
    assert test["file"] == "test.npz" and test["num_examples"] == 200
    assert test["class_counts"] == [20] * 10
    assert test["sha256"] == sha256_file(small_federation / "test.npz")


def test_federation_holds_exactly_the_source_images(small_federation, small_mnist):
    # Prepare
    loaded = [load_partition_raw(small_federation / f"cliente_{k}.npz") for k in (1, 2, 3)]

    # Execute
    x = np.concatenate([part[0] for part in loaded])
    y = np.concatenate([part[1] for part in loaded])
    x_test, y_test = load_partition_raw(small_federation / "test.npz")

    # Assert
    assert_iid_bounds(np.stack([np.bincount(p[1], minlength=10) for p in loaded]), np.full(10, 60))
    pairs = sorted(zip((img.tobytes() for img in x), y.tolist()))
    source = sorted(zip((img.tobytes() for img in small_mnist.x_train), small_mnist.y_train.tolist()))
    assert pairs == source
    np.testing.assert_array_equal(x_test, small_mnist.x_test)
    np.testing.assert_array_equal(y_test, small_mnist.y_test)


def test_write_federation_is_byte_reproducible(tmp_path, small_federation, small_mnist):
    # Prepare
    config = PartitionConfig("iid", 3, seed=42)

    # Execute
    manifest = write_federation(small_mnist, config, tmp_path / "again")

    # Assert
    assert manifest == tmp_path / "again" / MANIFEST_FILE
    names = sorted(p.name for p in small_federation.iterdir())
    assert names == sorted(p.name for p in (tmp_path / "again").iterdir())
    for name in names:
        assert (small_federation / name).read_bytes() == (tmp_path / "again" / name).read_bytes(), name


def test_write_federation_other_seed_other_files(tmp_path, small_federation, small_mnist):
    # Execute
    write_federation(small_mnist, PartitionConfig("iid", 3, seed=43), tmp_path / "other")

    # Assert
    assert (tmp_path / "other" / "cliente_1.npz").read_bytes() != (
        small_federation / "cliente_1.npz").read_bytes()
    assert (tmp_path / "other" / "test.npz").read_bytes() == (small_federation / "test.npz").read_bytes()
    manifest = json.loads((tmp_path / "other" / MANIFEST_FILE).read_text(encoding="utf-8"))
    assert manifest["config"]["seed"] == 43


@pytest.mark.slow
def test_split_data_script_real_mnist_iid(split_runs, raw_mnist):
    # Prepare
    totals = np.bincount(raw_mnist.y_train, minlength=10)

    # Execute
    code, stdout, stderr, out = split_runs["iid5"]

    # Assert
    assert code == 0, stderr
    assert "wrote 5 partitions (iid)" in stdout
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [f"cliente_{k}.npz" for k in range(1, 6)] + ["test.npz", MANIFEST_FILE, DISTRIBUTION_PLOT])
    counts = np.stack([
        np.bincount(load_partition_raw(out / f"cliente_{k}.npz")[1], minlength=10) for k in range(1, 6)
    ])
    assert_iid_bounds(counts, totals)
    assert counts.sum(axis=1).tolist() == [12000] * 5
    _, y_test = load_partition_raw(out / "test.npz")
    np.testing.assert_array_equal(y_test, raw_mnist.y_test)
    manifest = read_manifest(out)
    assert [c["class_counts"] for c in manifest["clients"]] == counts.tolist()


# --- files the project wrote and reads back: test.npz against particion.json's sha256 ------------------


@pytest.fixture
def swapped_test_set(tmp_path, small_federation) -> Path:
    """A copy of the small federation whose test.npz was replaced by 20 images of one label."""
    import shutil

    from fedmnist.data import save_arrays

    data_dir = tmp_path / "datos"
    shutil.copytree(small_federation, data_dir)
    x, y = load_partition_raw(data_dir / "test.npz")
    ones = np.flatnonzero(y == 1)[:20]
    save_arrays(data_dir / "test.npz", x[ones], y[ones])
    return data_dir


def test_swapped_test_set_hash_mismatch_is_refused(swapped_test_set, small_federation):
    from fedmnist.errors import DataError
    from fedmnist.federation_files import checked_test_file

    # Execute / Assert: the federation's own test set passes, the swapped one is refused by name
    assert checked_test_file(small_federation / "test.npz") == small_federation / "test.npz"
    with pytest.raises(DataError, match=r"test\.npz: contents differ from the manifest's sha256 \(particion\.json\)"):
        checked_test_file(swapped_test_set / "test.npz")


def test_test_set_without_a_manifest_is_only_checked_to_exist(tmp_path, swapped_test_set):
    from fedmnist.errors import DataError
    from fedmnist.federation_files import checked_test_file

    # Prepare: a Flower test-file outside any federation directory
    (swapped_test_set / MANIFEST_FILE).unlink()

    # Execute / Assert
    assert checked_test_file(swapped_test_set / "test.npz") == swapped_test_set / "test.npz"
    with pytest.raises(DataError, match="common test set not found"):
        checked_test_file(tmp_path / "nada" / "test.npz")


def test_malformed_test_hash_in_the_manifest_is_refused(tmp_path):
    from fedmnist.errors import DataError

    # Prepare
    (tmp_path / MANIFEST_FILE).write_text(json.dumps({"clients": [], "test": {"file": "test.npz", "sha256": 5}}))

    # Execute / Assert
    with pytest.raises(DataError, match="the test set has a malformed sha256"):
        read_manifest(tmp_path)


@pytest.mark.parametrize("entry", ["aggregate", "train"])
def test_swapped_test_set_hash_mismatch_stops_aggregate_and_train_before_any_output(swapped_test_set, tmp_path,
                                                                                    entry):
    from fedmnist.errors import DataError

    # Prepare
    out_dir = tmp_path / "salida"

    # Execute
    with pytest.raises(DataError, match=r"test\.npz: contents differ from the manifest's sha256") as excinfo:
        if entry == "aggregate":
            from fedmnist.aggregation import aggregate_directory

            aggregate_directory(tmp_path / "pesos", swapped_test_set, out_dir)
        else:
            from fedmnist.local import run_local_training

            run_local_training(1, swapped_test_set, out_dir)

    # Assert
    assert str(swapped_test_set / "test.npz") in str(excinfo.value)
    assert not out_dir.exists()
