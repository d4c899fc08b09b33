"""Tests of fedmnist.simulation on small slices of the real MNIST (a few seconds of training each).

One Adam trainer is shared by the module (Adam learns more per image than SGD, which keeps the
federations small), as ``run_simulation(trainer=...)`` allows.
"""

from __future__ import annotations

import csv
import json
from dataclasses import replace

import numpy as np
import pytest

from fedmnist.errors import ConfigError
from fedmnist.simulation import (
    CHECKPOINT_FILE,
    PRESETS,
    SimulationConfig,
    config_from_args,
    load_checkpoint,
    prepare_federation,
    run_simulation,
    sample_clients,
    save_checkpoint,
)

TINY = SimulationConfig(
    num_clients=5,
    fraction=0.6,
    rounds=2,
    local_epochs=1,
    batch_size=32,
    optimizer="adam",
    learning_rate=1e-3,
    momentum=0.0,
    methods=("fedavg", "fedprox", "fedmed"),
    mu=0.01,
    train_subset=500,
    test_subset=200,
    seed=7,
)


@pytest.fixture(scope="module")
def trainer():
    """One compiled model for every simulation of this module."""
    from fedmnist.training import ClientTrainer

    return ClientTrainer("adam", 1e-3, 0.0)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, raw_mnist, trainer):
    """An uninterrupted run of TINY: 5 clients x 100 images, 3 sampled per round, 2 rounds."""
    out = tmp_path_factory.mktemp("reference")
    return run_simulation(TINY, out_dir=out, progress=False, trainer=trainer, mnist=raw_mnist)


def comparable(result) -> dict:
    return {m: [r.comparable() for r in rows] for m, rows in result.metrics.items()}


def same_weights(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))


# --- fairness: one partition, one init, one sampling sequence -----------------------------------


def test_methods_share_partition_init_and_sampled_clients(reference, raw_mnist):
    from fedmnist.model import initial_weights, weights_sha256

    init = weights_sha256(initial_weights(TINY.seed))[:16]
    assert reference.initial_sha256[:16] == init
    for method, rows in reference.metrics.items():
        assert [r.round for r in rows] == [1, 2]
        assert rows[0].start_sha256 == init, method
        for row in rows:
            assert row.sampled_clients == sample_clients(TINY, row.round)
            assert row.num_sampled == 3
            assert row.mu == (0.01 if method == "fedprox" else 0.0)
    # after round 1 each method continues from its own global model
    assert reference.metrics["fedavg"][1].start_sha256 != reference.metrics["fedmed"][1].start_sha256
    assert reference.client_sizes == [100] * 5
    other = prepare_federation(replace(TINY, methods=("krum",)), mnist=raw_mnist)
    mine = prepare_federation(TINY, mnist=raw_mnist)
    assert all(np.array_equal(a, b) for a, b in zip(mine.client_indices, other.client_indices))


def test_sampling_depends_on_seed_and_round_only():
    config = SimulationConfig(num_clients=100, fraction=0.1, seed=3)
    first = sample_clients(config, 1)
    assert len(first) == 10 and first == sorted(first) and all(1 <= k <= 100 for k in first)
    assert first == sample_clients(replace(config, methods=("krum",), mu=0.5, rounds=99), 1)
    assert first != sample_clients(config, 2)
    assert first != sample_clients(replace(config, seed=4), 1)


def test_a_method_gives_the_same_numbers_whatever_else_runs(reference, trainer, raw_mnist, tmp_path):
    alone = run_simulation(
        replace(TINY, methods=("fedmed",)), out_dir=tmp_path, progress=False, trainer=trainer, mnist=raw_mnist
    )
    assert [r.comparable() for r in alone.metrics["fedmed"]] == comparable(reference)["fedmed"]
    assert same_weights(alone.final_weights["fedmed"], reference.final_weights["fedmed"])


# --- reproducibility and resume ----------------------------------------------------------------


def test_same_seed_gives_identical_metrics_and_weights(reference, trainer, raw_mnist, tmp_path):
    again = run_simulation(TINY, out_dir=tmp_path, progress=False, trainer=trainer, mnist=raw_mnist)
    assert comparable(again) == comparable(reference)
    for method in TINY.methods:
        assert same_weights(again.final_weights[method], reference.final_weights[method])
    accuracy = reference.final_accuracy
    assert all(0.0 <= accuracy[m] <= 1.0 for m in TINY.methods)


def test_resume_after_interruption_equals_uninterrupted_run(reference, trainer, raw_mnist, tmp_path):
    class Interrupted(Exception):
        pass

    def stop_after_first_round(round_, rows):
        if round_ == 1:
            raise Interrupted

    with pytest.raises(Interrupted):
        run_simulation(
            TINY,
            out_dir=tmp_path,
            progress=False,
            trainer=trainer,
            mnist=raw_mnist,
            callback=stop_after_first_round,
        )
    fed = prepare_federation(TINY, mnist=raw_mnist)
    assert load_checkpoint(tmp_path / CHECKPOINT_FILE, TINY, fed.sha256)["completed_rounds"] == 1

    resumed = run_simulation(
        TINY, out_dir=tmp_path, progress=False, trainer=trainer, mnist=raw_mnist, resume=True
    )
    assert resumed.resumed_from_round == 1
    assert comparable(resumed) == comparable(reference)
    for method in TINY.methods:
        assert same_weights(resumed.final_weights[method], reference.final_weights[method])
    rows = json.loads((tmp_path / "metricas_por_ronda.json").read_text())["rounds"]
    assert [(r["round"], r["method"]) for r in rows] == [(r, m) for r in (1, 2) for m in TINY.methods]


def test_stop_at_target_ends_the_run_and_a_resumed_run_adds_no_round(reference, trainer, raw_mnist, tmp_path):
    # Arrange: a target every method passes in round 1 (the reference's round-1 accuracies are far above it)
    low = min(rows[0].test_accuracy for rows in reference.metrics.values()) - 0.01
    config = replace(TINY, rounds=4, target_accuracy=low, stop_at_target=True)

    # Execute: a run capped at 4 rounds, then the same run resumed with a higher cap
    first = run_simulation(config, out_dir=tmp_path, progress=False, trainer=trainer, mnist=raw_mnist)
    resumed = run_simulation(
        replace(config, rounds=6), out_dir=tmp_path, progress=False, trainer=trainer, mnist=raw_mnist,
        resume=True,
    )

    # Assert: one round only, the same numbers as the reference's round 1, nothing added on resume
    assert {m: [r.round for r in rows] for m, rows in first.metrics.items()} == {m: [1] for m in TINY.methods}
    assert first.rounds_to_target == dict.fromkeys(TINY.methods, 1)
    assert {m: rows[0].comparable() for m, rows in first.metrics.items()} == {
        m: rows[0].comparable() for m, rows in reference.metrics.items()
    }
    assert resumed.resumed_from_round == 1
    assert comparable(resumed) == comparable(first)


def test_resume_refuses_another_config_or_a_longer_checkpoint(raw_mnist, trainer, tmp_path):
    from fedmnist.model import initial_weights

    fed = prepare_federation(TINY, mnist=raw_mnist)
    weights = dict.fromkeys(TINY.methods, initial_weights(TINY.seed))
    save_checkpoint(tmp_path / CHECKPOINT_FILE, TINY, fed.sha256, 2, weights, [], [])
    with pytest.raises(ConfigError, match=r"mu: 0\.01 -> 0\.1"):
        run_simulation(
            replace(TINY, mu=0.1),
            out_dir=tmp_path,
            progress=False,
            trainer=trainer,
            mnist=raw_mnist,
            resume=True,
        )
    with pytest.raises(ConfigError, match="already holds 2 rounds"):
        run_simulation(
            replace(TINY, rounds=1),
            out_dir=tmp_path,
            progress=False,
            trainer=trainer,
            mnist=raw_mnist,
            resume=True,
        )
    with pytest.raises(ConfigError, match="different MNIST data"):
        load_checkpoint(tmp_path / CHECKPOINT_FILE, TINY, "0" * 64)


# --- outputs -----------------------------------------------------------------------------------


def test_metric_files_plot_models_and_summary_are_written(reference):
    from fedmnist.exchange import load_global, safe_load_pickle

    out = reference.files["config"].parent
    saved = json.loads((out / "configuracion.json").read_text())
    assert SimulationConfig.from_dict(saved["simulation"]) == TINY
    assert saved["derived"]["clients_per_round"] == 3
    with open(out / "metricas_por_ronda.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 2 * 3
    assert {
        "round",
        "method",
        "test_accuracy",
        "test_loss",
        "train_loss",
        "round_seconds",
        "sampled_clients",
    } <= set(rows[0])
    assert float(rows[0]["test_accuracy"]) == reference.metrics["fedavg"][0].test_accuracy
    assert json.loads((out / "metricas_por_ronda.json").read_text())["methods"] == list(TINY.methods)
    assert (out / "precision_por_ronda.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((out / "resumen.json").read_text())
    for method in TINY.methods:
        assert summary["methods"][method]["final_accuracy"] == reference.final_accuracy[method]
        assert summary["methods"][method]["rounds_to_target"] is None  # 99% is out of reach here
        assert (out / f"modelo_global_{method}.h5").stat().st_size > 100_000
        gw = load_global(out / f"pesos_globales_{method}.pkl")
        assert gw.method == method and same_weights(gw.weights, reference.final_weights[method])
    checkpoint = safe_load_pickle(out / "checkpoint.pkl")
    assert checkpoint["completed_rounds"] == 2 and set(checkpoint["weights"]) == set(TINY.methods)


# --- attacks -----------------------------------------------------------------------------------


def test_one_gaussian_attacker_of_five_breaks_fedavg_but_not_fedmed(raw_mnist, trainer, tmp_path):
    config = replace(
        TINY,
        fraction=1.0,
        methods=("fedavg", "fedmed"),
        num_malicious=1,
        attack="gaussian",
        train_subset=1500,
        test_subset=300,
    )
    result = run_simulation(config, out_dir=tmp_path, progress=False, trainer=trainer, mnist=raw_mnist)
    assert len(result.malicious_clients) == 1
    assert all(r.malicious_sampled == result.malicious_clients for r in result.metrics["fedavg"])
    fedavg, fedmed = result.final_accuracy["fedavg"], result.final_accuracy["fedmed"]
    assert fedavg < 0.3, result.final_accuracy
    assert fedmed > 0.45 and fedmed - fedavg > 0.25, result.final_accuracy
    assert (
        json.loads((tmp_path / "resumen.json").read_text())["malicious_clients"] == result.malicious_clients
    )


def test_robust_rules_run_under_sign_flipping(raw_mnist, trainer, tmp_path):
    config = replace(
        TINY,
        rounds=1,
        fraction=1.0,
        methods=("trimmed", "krum", "multikrum"),
        num_malicious=1,
        attack="signflip",
        train_subset=100,
        test_subset=50,
    )
    result = run_simulation(config, out_dir=tmp_path, progress=False, trainer=trainer, mnist=raw_mnist)
    saved = json.loads((tmp_path / "configuracion.json").read_text())["derived"]
    assert saved["krum_f"] == 1 and saved["attack_strength"] == 4.0
    assert saved["malicious_clients"] == result.malicious_clients
    assert set(result.final_accuracy) == {"trimmed", "krum", "multikrum"}


# --- configuration and command line ------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"fraction": 0.0}, "fraction"),
        ({"methods": ("fedprox",), "mu": 0.0}, "fedprox needs mu > 0"),
        ({"methods": ("nope",)}, "unknown method"),
        ({"methods": ("fedavg", "fedavg")}, "twice"),
        ({"num_malicious": 1}, "no attack"),
        ({"attack": "gaussian"}, "no malicious clients"),
        ({"num_malicious": 1, "attack": "labelflip", "attack_strength": 2.0}, "takes no strength"),
        ({"methods": ("krum",), "num_clients": 4, "krum_f": 1}, "Krum with f=1"),
        ({"train_subset": 3}, "fewer images"),
        ({"rounds": 0}, "rounds"),
        ({"batch_size": 2.5}, "integer"),
    ],
)
def test_bad_values_raise_config_error(changes, message):
    with pytest.raises(ConfigError, match=message):
        replace(TINY, **changes).validate()


def test_partition_errors_surface_as_config_errors(raw_mnist):
    with pytest.raises(ConfigError, match="shards"):
        prepare_federation(replace(TINY, partition="shards", shards_per_client=3), mnist=raw_mnist)


def test_presets_are_mcmahan_setups_and_flags_override_them():
    from fedmnist.cli import build_parser

    iid, noniid = PRESETS["mcmahan-iid"], PRESETS["mcmahan-noniid"]
    for preset in (iid, noniid):
        assert (preset.num_clients, preset.fraction, preset.local_epochs, preset.batch_size) == (
            100,
            0.1,
            5,
            10,
        )
        assert preset.optimizer == "sgd" and preset.target_accuracy == 0.99 and preset.train_subset is None
    assert iid.partition == "iid" and (noniid.partition, noniid.shards_per_client) == ("shards", 2)

    args = build_parser().parse_args(
        ["simulate", "--preset", "mcmahan-noniid", "--rounds", "3", "--out", "x"]
    )
    assert config_from_args(args) == replace(noniid, rounds=3)
    args = build_parser().parse_args(
        ["simulate", "--methods", "krum", "fedavg", "--malicious", "2", "--attack", "scale", "--out", "x"]
    )
    assert config_from_args(args) == SimulationConfig(
        methods=("krum", "fedavg"), num_malicious=2, attack="scale"
    )


def test_cli_simulate_writes_results_and_rejects_bad_values(mnist_path, tmp_path, capsys):
    from fedmnist.cli import main

    out = tmp_path / "sim"
    code = main(
        [
            "simulate",
            "--clients",
            "3",
            "--rounds",
            "2",
            "--eval-every",
            "2",
            "--methods",
            "fedavg",
            "--train-subset",
            "30",
            "--test-subset",
            "50",
            "--quiet",
            "--data",
            str(mnist_path),
            "--out",
            str(out),
        ]
    )
    assert code == 0
    assert "FedAvg" in capsys.readouterr().out
    rows = json.loads((out / "metricas_por_ronda.json").read_text())["rounds"]
    assert (
        rows[0]["test_accuracy"] is None and rows[1]["test_accuracy"] is not None
    )  # evaluated every 2 rounds
    assert main(["simulate", "--fraction", "1.5", "--out", str(tmp_path / "bad")]) == 2
    assert "fraction" in capsys.readouterr().err


def test_plot_joins_rounds_that_were_not_evaluated():
    from fedmnist.simulation import _joined_curves

    joined = _joined_curves({"fedavg": [np.nan, 0.2, np.nan, 0.4], "fedmed": [np.nan, 0.5]})
    assert np.isnan(joined["fedavg"][0]) and np.allclose(joined["fedavg"][1:], [0.2, 0.3, 0.4])
    assert np.isnan(joined["fedmed"][0]) and joined["fedmed"][1] == 0.5
