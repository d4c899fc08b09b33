"""Tests of fedmnist.simulation on small slices of the real MNIST (a few seconds of training each).

One Adam trainer is shared by the module (Adam learns more per image than SGD, which keeps the
federations small), as ``run_simulation(trainer=...)`` allows.
"""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from fedmnist.checkpoint import load_checkpoint, save_checkpoint
from fedmnist.cli import config_from_args
from fedmnist.errors import ConfigError
from fedmnist.federation import prepare_federation
from fedmnist.simulation import (
    CHECKPOINT_FILE,
    PRESETS,
    SimulationConfig,
    run_simulation,
    sample_clients,
)

TINY = SimulationConfig.create(
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
    other = prepare_federation(TINY.replace(methods=("krum",), mu=0.5).federation, TINY.seed, mnist=raw_mnist)
    mine = prepare_federation(TINY.federation, TINY.seed, mnist=raw_mnist)
    assert all(np.array_equal(a, b) for a, b in zip(mine.client_indices, other.client_indices))


def test_sampling_depends_on_seed_and_round_only():
    config = SimulationConfig.create(num_clients=100, fraction=0.1, seed=3)
    first = sample_clients(config, 1)
    assert len(first) == 10 and first == sorted(first) and all(1 <= k <= 100 for k in first)
    assert first == sample_clients(config.replace(methods=("krum",), mu=0.5, rounds=99), 1)
    assert first != sample_clients(config, 2)
    assert first != sample_clients(config.replace(seed=4), 1)


def test_a_method_gives_the_same_numbers_whatever_else_runs(reference, trainer, raw_mnist, tmp_path):
    alone = run_simulation(
        TINY.replace(methods=("fedmed",)), out_dir=tmp_path, progress=False, trainer=trainer, mnist=raw_mnist
    )
    assert [r.comparable() for r in alone.metrics["fedmed"]] == comparable(reference)["fedmed"]
    assert same_weights(alone.final_weights["fedmed"], reference.final_weights["fedmed"])


# --- reproducibility and resume ----------------------------------------------------------------


def test_same_seed_gives_identical_metrics_and_weights(reference, trainer, raw_mnist, tmp_path):
    again = run_simulation(TINY, out_dir=tmp_path, progress=False, trainer=trainer, mnist=raw_mnist)
    assert comparable(again) == comparable(reference)
    for method in TINY.method.methods:
        assert same_weights(again.final_weights[method], reference.final_weights[method])
    accuracy = reference.final_accuracy
    assert all(0.0 <= accuracy[m] <= 1.0 for m in TINY.method.methods)


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
    fed = prepare_federation(TINY.federation, TINY.seed, mnist=raw_mnist)
    assert load_checkpoint(tmp_path / CHECKPOINT_FILE, TINY, fed.sha256).round == 1

    resumed = run_simulation(
        TINY, out_dir=tmp_path, progress=False, trainer=trainer, mnist=raw_mnist, resume=True
    )
    assert resumed.resumed_from_round == 1
    assert comparable(resumed) == comparable(reference)
    for method in TINY.method.methods:
        assert same_weights(resumed.final_weights[method], reference.final_weights[method])
    rows = json.loads((tmp_path / "metricas_por_ronda.json").read_text())["rounds"]
    assert [(r["round"], r["method"]) for r in rows] == [(r, m) for r in (1, 2) for m in TINY.method.methods]


def test_stop_at_target_ends_the_run_and_a_resumed_run_adds_no_round(reference, trainer, raw_mnist, tmp_path):
    # Arrange: a target every method passes in round 1 (the reference's round-1 accuracies are far above it)
    low = min(rows[0].test_accuracy for rows in reference.metrics.values()) - 0.01
    config = TINY.replace(rounds=4, target_accuracy=low, stop_at_target=True)

    # Execute: a run capped at 4 rounds, then the same run resumed with a higher cap
    first = run_simulation(config, out_dir=tmp_path, progress=False, trainer=trainer, mnist=raw_mnist)
    resumed = run_simulation(
        config.replace(rounds=6), out_dir=tmp_path, progress=False, trainer=trainer, mnist=raw_mnist,
        resume=True,
    )

    # Assert: one round only, the same numbers as the reference's round 1, nothing added on resume
    assert {m: [r.round for r in rows] for m, rows in first.metrics.items()} == {m: [1] for m in TINY.method.methods}
    assert first.rounds_to_target == dict.fromkeys(TINY.method.methods, 1)
    assert {m: rows[0].comparable() for m, rows in first.metrics.items()} == {
        m: rows[0].comparable() for m, rows in reference.metrics.items()
    }
    assert resumed.resumed_from_round == 1
    assert comparable(resumed) == comparable(first)
    # the summary still describes the run that made the numbers, not the resume that added nothing
    summary = json.loads((tmp_path / "resumen.json").read_text())
    assert (summary["resumed_from_round"], summary["seconds"]) == (0, pytest.approx(first.seconds))


def test_previous_summary_is_read_only_when_it_is_a_small_summary(tmp_path):
    from fedmnist.simulation import SUMMARY_MAX_BYTES, _previous_summary

    path = tmp_path / "resumen.json"
    path.write_text(json.dumps({"resumed_from_round": 3, "seconds": 1.5}))
    assert _previous_summary(path) == {"resumed_from_round": 3, "seconds": 1.5}
    for text in ("{", json.dumps({"resumed_from_round": True, "seconds": 1.5}), json.dumps({"seconds": 2}),
                 json.dumps({"resumed_from_round": 3, "seconds": 1.5, "pad": "x" * SUMMARY_MAX_BYTES})):
        path.write_text(text)
        assert _previous_summary(path) is None
    assert _previous_summary(tmp_path / "missing.json") is None


def test_resume_refuses_another_config_or_a_longer_checkpoint(raw_mnist, trainer, tmp_path):
    from fedmnist.methods import build_methods
    from fedmnist.model import initial_weights
    from fedmnist.server import ServerState

    fed = prepare_federation(TINY.federation, TINY.seed, mnist=raw_mnist)
    state = ServerState.initial(build_methods(TINY.method), initial_weights(TINY.seed), round_=2)
    save_checkpoint(tmp_path / CHECKPOINT_FILE, TINY, fed.sha256, state, [])
    with pytest.raises(ConfigError, match=r"method.mu: 0\.01 -> 0\.1"):
        run_simulation(
            TINY.replace(mu=0.1),
            out_dir=tmp_path,
            progress=False,
            trainer=trainer,
            mnist=raw_mnist,
            resume=True,
        )
    with pytest.raises(ConfigError, match="already holds 2 rounds"):
        run_simulation(
            TINY.replace(rounds=1),
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
    assert json.loads((out / "metricas_por_ronda.json").read_text())["methods"] == list(TINY.method.methods)
    assert (out / "precision_por_ronda.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((out / "resumen.json").read_text())
    for method in TINY.method.methods:
        assert summary["methods"][method]["final_accuracy"] == reference.final_accuracy[method]
        assert summary["methods"][method]["rounds_to_target"] is None  # 99% is out of reach here
        assert (out / f"modelo_global_{method}.h5").stat().st_size > 100_000
        gw = load_global(out / f"pesos_globales_{method}.pkl")
        assert gw.method == method and same_weights(gw.weights, reference.final_weights[method])
    checkpoint = safe_load_pickle(out / "checkpoint.pkl")
    assert checkpoint["completed_rounds"] == 2 and set(checkpoint["weights"]) == set(TINY.method.methods)


# --- attacks -----------------------------------------------------------------------------------


def test_one_gaussian_attacker_of_five_breaks_fedavg_but_not_fedmed(raw_mnist, trainer, tmp_path):
    config = TINY.replace(
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
    config = TINY.replace(
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
        ({"methods": ("krum",), "num_clients": 4, "krum_f": 1}, "krum with f=1"),
        ({"train_subset": 3}, "one image or more for each"),
        ({"rounds": 0}, "rounds"),
        ({"batch_size": 2.5}, "integer"),
    ],
)
def test_bad_values_raise_config_error(changes, message):
    with pytest.raises(ConfigError, match=message):
        TINY.replace(**changes).validate()


def test_partition_errors_surface_as_config_errors(raw_mnist):
    with pytest.raises(ConfigError, match="shards"):
        config = TINY.replace(partition="shards", shards_per_client=3)
        prepare_federation(config.federation, config.seed, mnist=raw_mnist)


def test_presets_are_mcmahan_setups_and_flags_override_them():
    from fedmnist.cli import build_parser

    iid, noniid = PRESETS["mcmahan-iid"], PRESETS["mcmahan-noniid"]
    for preset in (iid, noniid):
        assert (preset.federation.num_clients, preset.fraction, preset.training.epochs,
                preset.training.batch_size) == (
            100,
            0.1,
            5,
            10,
        )
        assert preset.training.optimizer == "sgd" and preset.target_accuracy == 0.99
        assert preset.federation.train_subset is None
    assert iid.federation.partition == "iid"
    assert (noniid.federation.partition, noniid.federation.shards_per_client) == ("shards", 2)

    args = build_parser().parse_args(
        ["simulate", "--preset", "mcmahan-noniid", "--rounds", "3", "--out", "x"]
    )
    assert config_from_args(args) == noniid.replace(rounds=3)
    args = build_parser().parse_args(
        ["simulate", "--methods", "krum", "fedavg", "--malicious", "2", "--attack", "scale", "--out", "x"]
    )
    assert config_from_args(args) == SimulationConfig.create(
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
    assert main(["simulate", "--fraction-train", "1.5", "--out", str(tmp_path / "bad")]) == 2
    assert "fraction" in capsys.readouterr().err


def test_plot_joins_rounds_that_were_not_evaluated():
    from fedmnist.outputs import joined_curves

    joined = joined_curves({"fedavg": [np.nan, 0.2, np.nan, 0.4], "fedmed": [np.nan, 0.5]})
    assert np.isnan(joined["fedavg"][0]) and np.allclose(joined["fedavg"][1:], [0.2, 0.3, 0.4])
    assert np.isnan(joined["fedmed"][0]) and joined["fedmed"][1] == 0.5


# --- the shared server step in the simulation -------------------------------------------------


def test_stop_at_target_stamps_the_rounds_run_in_the_outputs(reference, trainer, raw_mnist, tmp_path):
    from fedmnist.exchange import load_global

    low = min(rows[0].test_accuracy for rows in reference.metrics.values()) - 0.01
    config = TINY.replace(rounds=4, target_accuracy=low, stop_at_target=True)
    result = run_simulation(config, out_dir=tmp_path, progress=False, trainer=trainer, mnist=raw_mnist)
    summary = json.loads((tmp_path / "resumen.json").read_text())
    assert result.rounds_run == 1 and summary["rounds"] == 1 and summary["max_rounds"] == 4
    for method in TINY.method.methods:
        assert load_global(tmp_path / f"pesos_globales_{method}.pkl").round == 1
        assert summary["methods"][method]["rounds_run"] == 1


@pytest.mark.parametrize("spoil", ["nan", "inf", "shape", "start"])
def test_a_bad_reply_is_refused_and_counts_as_a_failed_client(spoil, trainer, raw_mnist, tmp_path, monkeypatch):
    import fedmnist.simulation as simulation

    honest = simulation.collect_replies

    def one_bad(*args, **kwargs):
        replies, failed = honest(*args, **kwargs)
        bad = replies[0]
        if spoil == "nan":
            bad.weights[0] = np.full_like(bad.weights[0], np.nan)
        elif spoil == "inf":
            bad.weights[-1] = np.full_like(bad.weights[-1], np.inf)
        elif spoil == "shape":
            bad.weights[0] = bad.weights[0][..., :1]
        else:
            bad.start_sha256 = "0" * 64
        return replies, failed

    monkeypatch.setattr(simulation, "collect_replies", one_bad)
    config = TINY.replace(rounds=1, methods=("fedavg",))
    result = run_simulation(config, out_dir=tmp_path, progress=False, trainer=trainer, mnist=raw_mnist)
    row = result.metrics["fedavg"][0]
    first = row.sampled_clients[0]
    assert row.num_replies == 2 and first not in row.replied_clients
    assert len(row.failed) == 1 and f"client {first}" in row.failed[0]
    assert np.all([np.isfinite(w).all() for w in result.final_weights["fedavg"]])
    csv_text = (tmp_path / "metricas_por_ronda.csv").read_text()
    assert f"client {first}" in csv_text


@pytest.mark.parametrize(
    ("tamper", "message"),
    [
        (lambda c: c.update(completed_rounds="2"), "completed_rounds"),
        (lambda c: c.update(completed_rounds=1), "records cover rounds"),
        (lambda c: c["weights"]["fedavg"].__setitem__(0, np.full((3, 3, 1, 32), np.nan, np.float32)), "NaN"),
        (lambda c: c["weights"]["fedavg"].pop(), "expected"),
        (lambda c: c["metrics"][0].update(test_accuracy="high"), "malformed"),
        (lambda c: c.update(method_state=[]), "server state"),
        (lambda c: c["metrics"][0].update(method="zzz"), "unknown method"),
        (lambda c: c["metrics"][0].update(failed=None), "failed must be a list"),
        (lambda c: c["metrics"][0].update(test_accuracy=5.0), "test_accuracy"),
    ],
)
def test_a_tampered_checkpoint_is_refused_before_any_output(tamper, message, reference, raw_mnist, trainer,
                                                            tmp_path):
    import pickle

    from fedmnist.exchange import safe_load_pickle

    checkpoint = safe_load_pickle(reference.files["checkpoint"])
    tamper(checkpoint)
    (tmp_path / CHECKPOINT_FILE).write_bytes(pickle.dumps(checkpoint, protocol=4))
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(ConfigError, match=message):
        run_simulation(TINY, out_dir=tmp_path, progress=False, trainer=trainer, mnist=raw_mnist, resume=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_an_output_path_that_is_a_file_fails_before_any_work(tmp_path):
    target = tmp_path / "not_a_dir"
    target.write_text("x")
    with pytest.raises(ConfigError, match=r"not a directory|is a file"):
        run_simulation(TINY, out_dir=target, progress=False)


def test_server_optimisers_keep_their_state_and_resume_bit_identically(trainer, raw_mnist, tmp_path):
    from fedmnist.exchange import safe_load_pickle

    config = TINY.replace(methods=("fedavgm", "fedadam"), server_lr=0.5)
    whole = run_simulation(config, out_dir=tmp_path / "whole", progress=False, trainer=trainer, mnist=raw_mnist)

    class Interrupted(Exception):
        pass

    def stop(round_, rows):
        if round_ == 1:
            raise Interrupted

    with pytest.raises(Interrupted):
        run_simulation(config, out_dir=tmp_path / "cut", progress=False, trainer=trainer, mnist=raw_mnist,
                       callback=stop)
    state = safe_load_pickle(tmp_path / "cut" / CHECKPOINT_FILE)["method_state"]
    assert state["fedadam"]["t"] == 1 and len(state["fedadam"]["v"]) == 10 and state["fedavgm"]["v"] == []
    resumed = run_simulation(config, out_dir=tmp_path / "cut", progress=False, trainer=trainer, mnist=raw_mnist,
                             resume=True)
    assert comparable(resumed) == comparable(whole)
    for method in ("fedavgm", "fedadam"):
        assert same_weights(resumed.final_weights[method], whole.final_weights[method])
    # FedAvgM and FedAdam move away from plain FedAvg's model after round 1
    assert whole.metrics["fedavgm"][1].start_sha256 != whole.metrics["fedadam"][1].start_sha256


def test_a_tampered_optimiser_state_is_refused(trainer, raw_mnist, tmp_path):
    import pickle

    from fedmnist.exchange import safe_load_pickle

    config = TINY.replace(methods=("fedadam",), rounds=1)
    run_simulation(config, out_dir=tmp_path, progress=False, trainer=trainer, mnist=raw_mnist)
    checkpoint = safe_load_pickle(tmp_path / CHECKPOINT_FILE)
    checkpoint["method_state"]["fedadam"]["v"][0][...] = -1.0
    (tmp_path / CHECKPOINT_FILE).write_bytes(pickle.dumps(checkpoint, protocol=4))
    with pytest.raises(ConfigError, match=r"checkpoint\.pkl"):
        run_simulation(config.replace(rounds=2), out_dir=tmp_path, progress=False, trainer=trainer,
                       mnist=raw_mnist, resume=True)


# --- differential privacy ----------------------------------------------------------------------

DP = TINY.replace(num_clients=10, fraction=0.5, methods=("fedavg",), train_subset=600, dp_noise=1.0, dp_clip=1.0)


def test_dp_fedavg_reports_epsilon_per_round_and_stops_before_the_target(trainer, raw_mnist, tmp_path):
    from fedmnist.privacy import PrivacyAccountant

    accountant = PrivacyAccountant(1.0, 10, 5, 1e-5)
    target = (accountant.epsilon(2) + accountant.epsilon(3)) / 2  # room for two rounds, not three
    config = DP.replace(rounds=5, target_epsilon=target)
    result = run_simulation(config, out_dir=tmp_path, progress=False, trainer=trainer, mnist=raw_mnist)
    rows = result.metrics["fedavg"]
    assert [r.round for r in rows] == [1, 2]
    assert [r.epsilon for r in rows] == [accountant.epsilon(1), accountant.epsilon(2)]
    assert all(r.delta == 1e-5 for r in rows)
    summary = json.loads((tmp_path / "resumen.json").read_text())
    assert summary["methods"]["fedavg"]["epsilon"] == accountant.epsilon(2) <= target
    assert summary["rounds"] == 2
    with pytest.raises(ConfigError, match="already exceeded"):
        run_simulation(config.replace(target_epsilon=accountant.epsilon(1)), out_dir=tmp_path, progress=False,
                       trainer=trainer, mnist=raw_mnist, resume=True)


def test_dp_client_side_clipping_and_resume_are_exact(trainer, raw_mnist, tmp_path):
    config = DP.replace(rounds=2, dp_side="client", dp_clip=0.5)
    whole = run_simulation(config, out_dir=tmp_path / "a", progress=False, trainer=trainer, mnist=raw_mnist)
    assert all(r.failed == [] and r.num_replies == 5 for r in whole.metrics["fedavg"])
    run_simulation(config.replace(rounds=1), out_dir=tmp_path / "b", progress=False, trainer=trainer,
                   mnist=raw_mnist)
    resumed = run_simulation(config, out_dir=tmp_path / "b", progress=False, trainer=trainer, mnist=raw_mnist,
                             resume=True)
    assert comparable(resumed) == comparable(whole)
    assert same_weights(resumed.final_weights["fedavg"], whole.final_weights["fedavg"])
    server_side = run_simulation(config.replace(dp_side="server"), out_dir=tmp_path / "c", progress=False,
                                 trainer=trainer, mnist=raw_mnist)
    # clipping by the clients or by the server gives the same model (same draws, same clipped updates)
    for a, b in zip(server_side.final_weights["fedavg"], whole.final_weights["fedavg"]):
        np.testing.assert_allclose(a, b, atol=1e-6)


@pytest.mark.parametrize(("changes", "message"), [
    ({"methods": ("fedmed",)}, "wraps only fedavg, fedprox"),
    ({"dp_noise": -1.0}, "must be >= 0"),
    ({"dp_clip": 0.0}, "must be > 0"),
    ({"dp_delta": 1.0}, "must be in"),
    ({"dp_accountant": "pld"}, "needs sampling 'poisson'"),
])
def test_bad_privacy_settings_are_refused(changes, message):
    with pytest.raises(ConfigError, match=message):
        DP.replace(**changes).validate()


# --- parallel clients ----------------------------------------------------------------------------


@pytest.mark.slow
def test_workers_give_the_same_weights_for_any_n_and_resume_across_n(raw_mnist, tmp_path):
    from fedmnist.workers import usable_cores

    config = TINY.replace(methods=("fedavg", "fedmed"), num_malicious=1, attack="labelflip", rounds=2)
    one = run_simulation(config, out_dir=tmp_path / "one", progress=False, mnist=raw_mnist, workers=1)
    two = run_simulation(config, out_dir=tmp_path / "two", progress=False, mnist=raw_mnist, workers=2)
    assert [r.sampled_clients for r in one.metrics["fedavg"]] == [sample_clients(config, r) for r in (1, 2)]
    assert any(r.malicious_sampled for r in one.metrics["fedavg"])
    assert comparable(one) == comparable(two)
    for method in ("fedavg", "fedmed"):
        assert same_weights(one.final_weights[method], two.final_weights[method])

    run_simulation(config.replace(rounds=1), out_dir=tmp_path / "mixed", progress=False, mnist=raw_mnist,
                   workers=2)
    resumed = run_simulation(config, out_dir=tmp_path / "mixed", progress=False, mnist=raw_mnist, workers=1,
                             resume=True)
    assert comparable(resumed) == comparable(one)
    assert usable_cores() >= 1


def test_a_finished_run_resumed_with_workers_starts_no_worker_process(raw_mnist, trainer, tmp_path, monkeypatch):
    from fedmnist import simulation

    config = TINY.replace(methods=("fedavg",), rounds=1)
    first = run_simulation(config, out_dir=tmp_path, progress=False, mnist=raw_mnist, trainer=trainer)

    def no_pool(*args, **kwargs):
        raise AssertionError("a worker pool was started for a run with no round left")

    monkeypatch.setattr(simulation, "WorkerPool", no_pool)
    again = run_simulation(config, out_dir=tmp_path, progress=False, mnist=raw_mnist, trainer=trainer, workers=2,
                           resume=True)

    assert again.resumed_from_round == 1 and comparable(again) == comparable(first)
    with pytest.raises(AssertionError, match="worker pool"):  # a run with rounds left still uses the pool
        run_simulation(config.replace(rounds=2), out_dir=tmp_path, progress=False, mnist=raw_mnist, workers=2,
                       resume=True)


# --- SCAFFOLD: per-client control variates kept by the simulation --------------------------------

SCAFFOLD_SETTINGS = {"num_clients": 3, "fraction": 0.67, "rounds": 2, "local_epochs": 1, "batch_size": 50,
                     "optimizer": "sgd", "learning_rate": 0.1, "momentum": 0.0, "train_subset": 300,
                     "test_subset": 100, "methods": ("scaffold",), "partition": "shards", "shards_per_client": 1,
                     "seed": 5}


@pytest.fixture(scope="module")
def scaffold_trainer():
    from fedmnist.training import ClientTrainer

    return ClientTrainer("sgd", 0.1, 0.0, model_seed=5)


def test_scaffold_simulation_equals_the_algorithm_computed_by_hand(raw_mnist, tmp_path, scaffold_trainer):
    # Arrange: 3 one-digit-ish clients, 2 sampled per round, so a client's c_i is stale when it returns
    from fedmnist.model import initial_weights
    from fedmnist.seeds import training_seed

    config = SimulationConfig.create(**SCAFFOLD_SETTINGS)
    fed = prepare_federation(config.federation, config.seed, mnist=raw_mnist)
    lr, n_clients = 0.1, 3

    # Act
    result = run_simulation(config, out_dir=tmp_path, progress=False, mnist=raw_mnist, trainer=scaffold_trainer)

    # Assert: Karimireddy et al.'s Algorithm 1 (option II) written out with plain numpy
    x = [w.astype(np.float64) for w in initial_weights(config.seed)]
    c = [np.zeros_like(w) for w in x]
    own: dict[int, list[np.ndarray]] = {}
    sampled_per_round = []
    for round_ in (1, 2):
        sampled = sample_clients(config, round_)
        sampled_per_round.append(sampled)
        steps, deltas, counts = [], [], []
        for k in sampled:
            ci = own.get(k, [np.zeros_like(w) for w in x])
            xs, ys = fed.client_data(k)
            trained = scaffold_trainer.train([w.astype(np.float32) for w in x], xs, ys, epochs=1, batch_size=50,
                                             mu=0.0, seed=training_seed(config.seed, round_, k),
                                             correction=[(a - b).astype(np.float32) for a, b in zip(c, ci)])
            assert trained.num_steps == -(-len(ys) // 50)
            y = [w.astype(np.float64) for w in trained.weights]
            new_ci = [b - a + (w0 - w1) / (trained.num_steps * lr) for a, b, w0, w1 in zip(c, ci, x, y)]
            deltas.append([n - o for n, o in zip(new_ci, ci)])
            own[k] = new_ci
            steps.append([w1 - w0 for w0, w1 in zip(x, y)])
            counts.append(len(ys))
        shares = np.array(counts, dtype=float) / sum(counts)
        x = [w0 + sum(s * d[j] for s, d in zip(shares, steps)) for j, w0 in enumerate(x)]
        c = [cj + sum(d[j] for d in deltas) / n_clients for j, cj in enumerate(c)]
    assert sampled_per_round[0] != sampled_per_round[1]
    for got, want in zip(result.final_weights["scaffold"], x):
        np.testing.assert_allclose(got, want, atol=2e-6)
    state = load_checkpoint(tmp_path / CHECKPOINT_FILE, config, fed.sha256)
    for got, want in zip(state.method_state["scaffold"]["control"], c):
        np.testing.assert_allclose(got, want, atol=2e-5)
    assert sorted(state.client_state["scaffold"]) == sorted(own)
    for k, controls in own.items():
        for got, want in zip(state.client_state["scaffold"][k], controls):
            np.testing.assert_allclose(got, want, atol=2e-5)


def test_scaffold_resumes_bit_identically(raw_mnist, tmp_path, scaffold_trainer):
    config = SimulationConfig.create(**SCAFFOLD_SETTINGS)
    straight = run_simulation(config, out_dir=tmp_path / "a", progress=False, mnist=raw_mnist, trainer=scaffold_trainer)
    run_simulation(config.replace(rounds=1), out_dir=tmp_path / "b", progress=False, mnist=raw_mnist,
                   trainer=scaffold_trainer)
    resumed = run_simulation(config, out_dir=tmp_path / "b", progress=False, mnist=raw_mnist, resume=True,
                             trainer=scaffold_trainer)

    assert resumed.resumed_from_round == 1
    for a, b in zip(straight.final_weights["scaffold"], resumed.final_weights["scaffold"]):
        assert np.array_equal(a, b)
    fed_sha = prepare_federation(config.federation, config.seed, mnist=raw_mnist).sha256
    first, second = (load_checkpoint(tmp_path / d / CHECKPOINT_FILE, config, fed_sha) for d in "ab")
    assert first.client_state.keys() == second.client_state.keys()
    for k, controls in first.client_state["scaffold"].items():
        assert all(np.array_equal(p, q) for p, q in zip(controls, second.client_state["scaffold"][k]))
    assert all(np.array_equal(p, q) for p, q in zip(first.method_state["scaffold"]["control"],
                                                    second.method_state["scaffold"]["control"]))


@pytest.mark.parametrize("spoil, fragment", [
    (lambda s: s["client_state"]["scaffold"].update({99: s["client_state"]["scaffold"][next(iter(s["client_state"]["scaffold"]))]}),
     "client 99"),
    (lambda s: next(iter(s["client_state"]["scaffold"].values()))[0].fill(np.nan), "non-finite"),
    (lambda s: s["client_state"]["scaffold"].update({1: [np.zeros(3, np.float32)]}), "control variate of client 1"),
    (lambda s: s["client_state"].update({"fedavg": {}}), "client state must map SCAFFOLD"),
    (lambda s: s["method_state"]["scaffold"].update({"control": []}), "control variate"),
])
def test_tampered_scaffold_checkpoint_is_refused(raw_mnist, tmp_path, scaffold_trainer, spoil, fragment):
    import pickle

    config = SimulationConfig.create(**{**SCAFFOLD_SETTINGS, "rounds": 1})
    run_simulation(config, out_dir=tmp_path, progress=False, mnist=raw_mnist, trainer=scaffold_trainer)
    path = tmp_path / CHECKPOINT_FILE
    stored = pickle.loads(path.read_bytes())
    spoil(stored)
    path.write_bytes(pickle.dumps(stored, protocol=4))

    with pytest.raises(ConfigError, match=fragment):
        load_checkpoint(path, config.replace(rounds=2), prepare_federation(config.federation, config.seed,
                                                                             mnist=raw_mnist).sha256)


@pytest.mark.parametrize("settings, fragment", [
    ({"momentum": 0.9}, "without momentum"),
    ({"optimizer": "adam", "learning_rate": 0.001}, "plain SGD"),
    ({"dp_noise": 1.0, "dp_clip": 1.0}, "scaffold"),
])
def test_scaffold_config_refuses_what_its_control_variates_cannot_handle(settings, fragment):
    with pytest.raises(ConfigError, match=fragment):
        SimulationConfig.create(**{**SCAFFOLD_SETTINGS, **settings}).validate()


def test_a_diverged_scaffold_client_fails_its_round_and_keeps_its_control(raw_mnist, tmp_path):
    # lr 1e30 makes every local training blow up: the weights and controls would be NaN or infinite
    config = SimulationConfig.create(**{**SCAFFOLD_SETTINGS, "rounds": 1, "learning_rate": 1e30})

    result = run_simulation(config, out_dir=tmp_path, progress=False, mnist=raw_mnist)

    record = result.metrics["scaffold"][0]
    assert record.num_replies == 0 and len(record.failed) == 2
    assert all("diverged" in f and "previous c_i" in f for f in record.failed)
    state = load_checkpoint(tmp_path / CHECKPOINT_FILE, config.replace(rounds=2),
                            prepare_federation(config.federation, config.seed, mnist=raw_mnist).sha256)
    assert state.client_state.get("scaffold", {}) == {}


def test_local_steps_are_a_setting_that_leaves_epoch_runs_hash_unchanged():
    from fedmnist.client import Instructions
    from fedmnist.simulation import client_tasks

    stepped = TINY.replace(local_steps=7)

    assert "local_steps" not in TINY.to_dict() and stepped.to_dict()["local_steps"] == 7
    assert SimulationConfig.from_dict(stepped.to_dict()) == stepped and stepped.sha256() != TINY.sha256()
    assert SimulationConfig.from_dict(TINY.to_dict()).local_steps is None
    weights = [np.zeros(2, np.float32)]
    (task,) = client_tasks(stepped, 1, [3], weights, Instructions(1), set())
    assert task.steps == 7 and client_tasks(TINY, 1, [3], weights, Instructions(1), set())[0].steps is None
    with pytest.raises(ConfigError, match="local steps must be an integer >= 1"):
        TINY.replace(local_steps=0).validate()
