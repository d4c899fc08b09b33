"""The essay's experiments on a tiny profile (real MNIST slices), the tables and the resumable runs."""

from __future__ import annotations

import dataclasses
import json
import math
import types

import numpy as np
import pytest

from fedmnist import experiments
from fedmnist.data import Mnist, normalize_images
from fedmnist.errors import ConfigError
from fedmnist.essay import render_tables
from fedmnist.experiments import Profile, ceiling, common, drift, mcmahan, read_csv, run_experiments
from fedmnist.stats import format_mean_interval, mean_interval

TINY = Profile(
    name="tiny", seeds=(3, 4), validation_size=300, course_epochs=1, course_train_subset=1_000,
    course_mu_grid=(0.01, 0.1), clients=3, train_subset=450, rounds=2, partitions=("iid", "shards_2"),
    mu_grid=(0.01, 0.1), prox_mus=(0.0, 0.1),
    attack_cases=(("iid", "none", 0), ("iid", "gaussian", 1), ("shards_2", "signflip", 1)),
    attack_methods=("fedavg", "fedprox", "fedmed", "bulyan"), attack_clients=7, attack_krum_f=1,
    attack_rounds=2, attack_train_subset=700, attack_eval_every=1,
    drift_seeds=(3, 4), drift_clients=4,
    drift_train_subset=400,
    drift_optimizers=(("adam", 1e-3, 0.0), ("sgd", 0.05, 0.9)), drift_epochs=(1, 2),
    drift_partitions=("iid", "shards_2"), drift_mu_grid=(0.01, 0.1), drift_barrier_images=100,
)
MULTI_SEED = ("course", "drift", "heterogeneity", "fedprox_mu", "attacks")
TRAIN_IMAGES, TEST_IMAGES = 2_400, 500


def _stratified(labels: np.ndarray, per_class: int) -> np.ndarray:
    return np.sort(np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in range(10)]))


@pytest.fixture(scope="module")
def small_npz(tmp_path_factory, raw_mnist):
    """2,400 training and 500 test images of the real MNIST, 10 % of each class, as an npz file."""
    train = _stratified(raw_mnist.y_train, TRAIN_IMAGES // 10)
    test = _stratified(raw_mnist.y_test, TEST_IMAGES // 10)
    path = tmp_path_factory.mktemp("mnist") / "mnist.npz"
    np.savez(path, x_train=raw_mnist.x_train[train], y_train=raw_mnist.y_train[train],
             x_test=raw_mnist.x_test[test], y_test=raw_mnist.y_test[test])
    return path


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


@pytest.fixture(scope="module")
def tiny_results(tmp_path_factory, small_npz, monkeypatch_module):
    monkeypatch_module.setitem(experiments.PROFILES, "tiny", TINY)
    out = tmp_path_factory.mktemp("resultados")
    run_experiments("tiny", str(small_npz), out, only=MULTI_SEED, quiet=True)
    return out


def _chosen(rows, **match) -> float:
    sel = [r for r in rows if all(str(r[k]) == str(v) for k, v in match.items())]
    winner = max(sel, key=lambda r: float(r.get("score") or r.get("validation_accuracy")))
    assert [r for r in sel if r["chosen"] == "True"] == [winner]  # one: the best (the first of equals)
    return float(winner["mu"])


@pytest.mark.slow
def test_course_rows_cover_every_model_and_seed(tiny_results):
    rows = read_csv(tiny_results / experiments.COURSE_CSV)

    # three global methods, five locals and the central model for each seed, on the whole (small) test set
    for seed in ("3", "4"):
        models = [r["model"] for r in rows if r["seed"] == seed]
        assert models == ["fedavg", "fedprox", "fedmed", *[f"local_{k}" for k in range(1, 6)], "central"]
    for r in rows:
        assert 0.0 <= float(r["ci_low"]) <= float(r["accuracy"]) <= float(r["ci_high"]) <= 1.0
        assert (r["optimizer"], r["test_images"], r["train_images"]) == ("adam", str(TEST_IMAGES), "1000")


@pytest.mark.slow
def test_course_fedprox_mu_is_the_validation_winner(tiny_results):
    tuning = read_csv(tiny_results / experiments.COURSE_TUNING_CSV)
    rows = read_csv(tiny_results / experiments.COURSE_CSV)

    assert [float(r["mu"]) for r in tuning] == [0.01, 0.1]
    assert {r["validation_images"] for r in tuning} == {"300"}
    mu = _chosen(tuning)
    assert {float(r["mu"]) for r in rows if r["model"] == "fedprox"} == {mu}
    assert {float(r["mu"]) for r in rows if r["model"] != "fedprox"} == {0.0}


@pytest.mark.slow
def test_shared_init_beats_independent_init(tiny_results):
    rows = read_csv(tiny_results / experiments.INIT_CSV)

    mean = {label: np.mean([float(r["accuracy"]) for r in rows if r["init"] == label])
            for label in ("compartida", "independiente")}
    assert len(rows) == 4
    assert mean["compartida"] > mean["independiente"]


@pytest.mark.slow
def test_drift_grid_measures_every_setting(tiny_results):
    rows = read_csv(tiny_results / experiments.DRIFT_CSV)

    # Assert: 2 seeds × 2 optimisers × 2 partitions × 2 epoch counts, 100 images per client
    assert len(rows) == 16
    for r in rows:
        assert float(r["local_steps"]) == int(r["epochs"]) * math.ceil(100 / 32)
        assert -1.0 <= float(r["update_cosine"]) <= 1.0 and float(r["barrier"]) >= 0.0
        assert float(r["update_norm"]) > 0 and r["test_images"] == str(TEST_IMAGES)
        # the proximal pull shortens the walk
        assert float(r["fedprox_update_norm"]) <= float(r["update_norm"]) * 1.05
    same = ("seed", "optimizer", "learning_rate", "partition")
    for r in (r for r in rows if r["epochs"] == "2"):
        one = next(o for o in rows if o["epochs"] == "1" and all(o[k] == r[k] for k in same))
        assert float(r["update_norm"]) > float(one["update_norm"])  # twice the local work walks further


@pytest.mark.slow
def test_drift_mu_is_chosen_on_validation_per_setting(tiny_results):
    rows = read_csv(tiny_results / experiments.DRIFT_CSV)
    tuning = read_csv(tiny_results / experiments.DRIFT_TUNING_CSV)

    assert len(tuning) == 2 * 2 * 2 * 2  # optimisers × partitions × epochs × candidates, first seed only
    for r in rows:
        setting = {k: r[k] for k in ("optimizer", "learning_rate", "partition", "epochs")}
        assert float(r["mu"]) == _chosen(tuning, **setting)


@pytest.mark.slow
def test_drift_continues_from_its_cache(tiny_results, small_npz, monkeypatch):
    # Prepare: no executor may be built, since every block of the grid is in the cache
    from fedmnist.data import load_raw_mnist

    def no_executor(*_):
        raise AssertionError("the drift grid retrained a cached block")

    monkeypatch.setattr(drift, "make_executor", no_executor)
    before = (tiny_results / experiments.DRIFT_CSV).read_text()

    # Execute
    drift.run_drift(TINY, load_raw_mnist(small_npz), tiny_results, None, None, lambda *_: None)

    # Assert
    assert (tiny_results / experiments.DRIFT_CSV).read_text() == before


def _last_round(run_dir, method: str) -> dict:
    rows = [r for r in read_csv(run_dir / "metricas_por_ronda.csv") if r["method"] == method]
    return rows[-1]


@pytest.mark.slow
def test_multi_round_tables_equal_the_last_round_on_the_whole_test_set(tiny_results):
    rows = read_csv(tiny_results / experiments.HETERO_CSV)

    assert {(r["partition"], r["seed"], r["method"]) for r in rows} == {
        (p, s, m) for p in ("iid", "shards_2") for s in ("3", "4") for m in ("fedavg", "fedprox", "fedmed")}
    for r in rows:
        run_dir = tiny_results / "simulaciones" / f"heterogeneidad_{r['partition']}_s{r['seed']}"
        config = json.loads((run_dir / "configuracion.json").read_text())
        assert config["data"]["test_images"] == TEST_IMAGES == int(r["test_images"])
        last = _last_round(run_dir, r["method"])
        assert float(last["test_accuracy"]) == pytest.approx(float(r["final_accuracy"]), abs=1e-6)
        assert r["diverged"] == "False" and float(r["run_seconds"]) > 0


@pytest.mark.slow
def test_heterogeneity_fedprox_mu_is_chosen_on_a_validation_split(tiny_results):
    rows = read_csv(tiny_results / experiments.HETERO_CSV)
    tuning = read_csv(tiny_results / experiments.HETERO_TUNING_CSV)

    for partition in ("iid", "shards_2"):
        mu = _chosen(tuning, setting=partition)
        prox = [r for r in rows if r["partition"] == partition and r["method"] == "fedprox"]
        assert {float(r["mu"]) for r in prox} == {mu}
        # the tuning runs train on the training set minus the 300 held-out images, scored on those
        run_dir = tiny_results / "simulaciones" / f"ajuste_mu_heterogeneidad_{partition}_mu{mu:g}"
        data = json.loads((run_dir / "configuracion.json").read_text())["data"]
        assert (data["train_images"], data["test_images"]) == (TINY.train_subset, TINY.validation_size)


@pytest.mark.slow
def test_fedprox_mu_table_runs_every_mu_and_seed(tiny_results):
    rows = read_csv(tiny_results / experiments.PROX_CSV)

    assert [(r["mu"], r["seed"]) for r in rows] == [("0", "3"), ("0", "4"), ("0.1", "3"), ("0.1", "4")]
    assert (tiny_results / "simulaciones" / "fedprox_mu_0_s3" / "resumen.json").exists()


@pytest.mark.slow
def test_attacks_run_fedprox_and_bulyan_and_record_divergence(tiny_results):
    rows = read_csv(tiny_results / experiments.ATTACK_CSV)
    tuning = read_csv(tiny_results / experiments.ATTACK_TUNING_CSV)

    cases = list(dict.fromkeys((r["partition"], r["attack"], r["malicious"]) for r in rows))
    assert cases == [("iid", "none", "0"), ("iid", "gaussian", "1"), ("shards_2", "signflip", "1")]
    assert {r["method"] for r in rows} == {"fedavg", "fedprox", "fedmed", "bulyan"}
    assert len(rows) == 3 * 2 * 4
    for r in rows:
        assert r["diverged"] == str(common.diverged(float(r["final_loss"])))
        assert r["krum_f"] == "1" and r["clients"] == "7"
    for partition in ("iid", "shards_2"):
        mu = _chosen(tuning, setting=partition)
        prox = [r for r in rows if r["partition"] == partition and r["method"] == "fedprox"]
        assert {float(r["mu"]) for r in prox} == {mu}


def test_diverged_means_a_non_finite_or_exploded_test_loss():
    assert common.diverged(float("nan")) and common.diverged(float("inf"))
    assert common.diverged(7.3e16)
    assert not common.diverged(2.31) and not common.diverged(None)


@pytest.mark.slow
def test_tables_are_rendered_from_the_files(tiny_results):
    # Execute
    tables = render_tables(tiny_results)

    # Assert: one table per result file, numbers as the mean ± t-interval of the CSV values
    assert set(tables) == {"curso", "inicializacion", "deriva", "deriva_precision", "heterogeneidad",
                           "heterogeneidad_diferencias", "heterogeneidad_peor_cliente", "heterogeneidad_cambio",
                           "fedprox_mu", "fedprox_mu_peor_cliente", "fedprox_mu_cambio", "ataques",
                           "ataques_diferencias", "ataques_convergencia", "ataques_peor_cliente", "ajuste_mu"}
    course = read_csv(tiny_results / experiments.COURSE_CSV)
    fedavg = mean_interval([float(r["accuracy"]) for r in course if r["model"] == "fedavg"])
    assert f"| FedAvg | {format_mean_interval(fedavg)} |" in tables["curso"]
    attack = read_csv(tiny_results / experiments.ATTACK_CSV)
    cell = format_mean_interval(mean_interval([float(r["final_accuracy"]) for r in attack
                                               if r["attack"] == "gaussian" and r["method"] == "fedmed"]))
    assert "| IID | ruido gaussiano | 1 | " in tables["ataques"] and cell in tables["ataques"]
    assert ("diverge en" in tables["ataques"]) == any(r["diverged"] == "True" for r in attack)
    assert tables["ajuste_mu"].count("\n| ") == 1 + 2 + 2  # the course, two splits, two attack partitions
    for name, text in tables.items():  # Spanish category names only
        assert not any(word in text for word in ("gaussian |", "signflip", "shards", "| iid")), name


CLIENTS_PROFILE = dataclasses.replace(
    TINY, name="clients", seeds=(3,), rounds=1, partitions=("shards_2",), mu_grid=(0.1,), prox_mus=(0.1,),
    attack_cases=(("shards_2", "signflip", 1),), attack_methods=("fedavg", "fedmed"), attack_clients=4,
    attack_rounds=1, attack_train_subset=400)
"""One seed and one round of each multi-round experiment, with at most 4 clients."""


@pytest.mark.slow
def test_rows_say_how_the_honest_clients_fare(tmp_path, small_npz, monkeypatch):
    # Prepare
    monkeypatch.setitem(experiments.PROFILES, "clients", CLIENTS_PROFILE)

    # Execute
    run_experiments("clients", str(small_npz), tmp_path, only=("heterogeneity", "fedprox_mu", "attacks"),
                    quiet=True)

    # Assert: every row has the honest clients' mean, 10th percentile and worst accuracy on their own data
    for name in (experiments.HETERO_CSV, experiments.PROX_CSV, experiments.ATTACK_CSV):
        rows = read_csv(tmp_path / name)
        assert rows, name
        for r in rows:
            mean, p10, worst = (float(r[k]) for k in common.CLIENT_COLUMNS[:3])
            # with at most 10 clients the (linear) 10th percentile cannot exceed the mean
            assert 0 <= worst <= p10 <= mean <= 1, (name, r)
            attackers = int(r.get("malicious", 0))
            assert int(r["honest_clients"]) == int(r["clients"]) - attackers
    assert {r["honest_clients"] for r in read_csv(tmp_path / experiments.ATTACK_CSV)} == {"3"}
    assert {"heterogeneidad_peor_cliente", "fedprox_mu_peor_cliente", "ataques_peor_cliente"} <= set(
        render_tables(tmp_path))


def test_stale_result_files_are_skipped_not_fatal(tmp_path):
    # Prepare: a heterogeneity CSV in the format of an earlier version (one seed, no seed column)
    old = "partition,method,rounds,final_accuracy\niid,fedavg,8,0.95\n"
    (tmp_path / experiments.HETERO_CSV).write_text(old)

    assert render_tables(tmp_path) == {}


@pytest.mark.slow
def test_environment_records_command_seeds_and_costs(tiny_results):
    env = json.loads((tiny_results / experiments.ENV_FILE).read_text())

    assert env["seeds"] == [3, 4]
    assert env["profile"]["name"] == "tiny"
    assert {"tensorflow", "keras", "numpy", "python"} <= set(env["software"])
    assert set(env["seconds_per_experiment"]) == set(MULTI_SEED)


def test_unknown_profile_and_experiment_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="unknown profile"):
        run_experiments("huge", None, tmp_path)
    with pytest.raises(ConfigError, match="unknown experiment"):
        run_experiments("quick", None, tmp_path, only=("everything",))


def test_full_profile_repeats_five_seeds_on_the_whole_data():
    full = experiments.PROFILES["full"]

    assert full.seeds == (42, 43, 44, 45, 46)
    assert full.course_train_subset is None and full.course_test_subset is None
    assert full.round_test_subset is None and len(full.drift_seeds) >= 3
    assert {"fedprox", "multikrum", "bulyan"} <= set(full.attack_methods)
    assert any(p != "iid" and a != "none" for p, a, _ in full.attack_cases)  # attackers in a non-IID split
    assert full.attack_clients >= 4 * full.attack_krum_f + 3
    assert full.ceiling_seeds == (42, 43, 44, 45, 46) and full.ceiling_train_subset is None
    assert (full.ceiling_validation, full.ceiling_patience, full.ceiling_max_epochs) == (6_000, 3, 30)
    with pytest.raises(dataclasses.FrozenInstanceError):
        full.rounds = 1  # type: ignore[misc]


@pytest.mark.parametrize(("changes", "message"), [
    ({"attack_clients": 10, "attack_krum_f": 2}, "Bulyan with f = 2 needs at least 11"),
    ({"partitions": ("iid", "noniid")}, "unknown partition label 'noniid'"),
    ({"attack_cases": (("iid", "gaussian", 0),)}, "attack case"),
    ({"attack_cases": (("iid", "none", 1),)}, "attack case"),
    ({"seeds": (3, 3)}, "distinct"),
    ({"mu_grid": (0.0, 0.1)}, "μ > 0"),
    ({"drift_barrier_pairs": 3}, "drift_barrier_pairs"),
    ({"ceiling_seeds": ()}, "ceiling_seeds"),
    ({"ceiling_patience": 0}, "ceiling_patience"),
    ({"ceiling_max_epochs": 0}, "ceiling_max_epochs"),
    ({"ceiling_train_subset": 300, "ceiling_validation": 300}, "ceiling_train_subset"),
])
def test_profiles_refuse_settings_the_experiments_cannot_run(changes, message):
    with pytest.raises(ConfigError, match=message):
        dataclasses.replace(TINY, **changes)


@pytest.mark.slow
def test_multi_round_experiments_continue_their_checkpoints(tmp_path, small_npz, tiny_results, monkeypatch):
    # Prepare: part of the tiny profile, first cut at one round, then raised to the profile's two
    part = dataclasses.replace(TINY, partitions=("shards_2",), prox_mus=(0.1,),
                               attack_cases=(("iid", "gaussian", 1),))
    cut = dataclasses.replace(part, name="cut", rounds=1, attack_rounds=1)
    monkeypatch.setitem(experiments.PROFILES, "cut", cut)
    monkeypatch.setitem(experiments.PROFILES, "part", dataclasses.replace(part, name="part"))
    only = ("heterogeneity", "fedprox_mu", "attacks")

    # Execute: interrupted after round 1 of every run, then continued
    run_experiments("cut", str(small_npz), tmp_path, only=only, quiet=True)
    run_experiments("part", str(small_npz), tmp_path, only=only, quiet=True)

    # Assert: every run (tuning runs too) resumed from round 1 ...
    runs = sorted((tmp_path / "simulaciones").iterdir())
    assert len(runs) == (2 + 2) + 2 + (2 + 2)
    for run_dir in runs:
        assert json.loads((run_dir / "resumen.json").read_text())["resumed_from_round"] == 1, run_dir.name

    # ... and gives the uninterrupted run's numbers
    def numbers(path, keep):
        return [{k: v for k, v in r.items() if not k.endswith("seconds")} for r in read_csv(path) if keep(r)]

    for name, keep in ((experiments.HETERO_CSV, lambda r: r["partition"] == "shards_2"),
                       (experiments.PROX_CSV, lambda r: r["mu"] == "0.1"),
                       (experiments.ATTACK_CSV, lambda r: r["attack"] == "gaussian"),
                       (experiments.ATTACK_TUNING_CSV, lambda r: r["setting"] == "iid")):
        assert numbers(tmp_path / name, keep) == numbers(tiny_results / name, keep), name


@pytest.mark.slow
def test_drift_grid_gives_the_same_numbers_in_a_worker_pool(small_npz, monkeypatch):
    # Prepare: one small block, run in this process and in one worker process
    from fedmnist.data import load_raw_mnist
    from fedmnist.drift_grid import DriftGrid, run_drift_grid

    grid = DriftGrid(seeds=(5,), clients=2, train_subset=200, optimizers=(("sgd", 0.05, 0.9),), epochs=(1,),
                     partitions=("iid",), mu_grid=(0.1,), validation_size=100, barrier_images=50,
                     barrier_pairs=1)
    mnist = load_raw_mnist(small_npz)

    # Execute
    monkeypatch.setitem(common.WORKERS, "workers", 1)
    pooled, _ = run_drift_grid(grid, mnist, common.make_executor, common.evaluator(), lambda *_: None)
    monkeypatch.delitem(common.WORKERS, "workers")
    local, _ = run_drift_grid(grid, mnist, common.make_executor, common.evaluator(), lambda *_: None)

    # Assert: equal up to the last bits TensorFlow's thread count changes
    for key in ("update_norm", "update_cosine", "barrier", "locals_accuracy", "fedavg_accuracy",
                "fedprox_accuracy"):
        assert pooled[0][key] == pytest.approx(local[0][key], rel=1e-3, abs=2e-3), key
def _summary(run_dir):
    import json

    return json.loads((run_dir / "resumen.json").read_text())


@pytest.fixture
def run_tiny_mcmahan(raw_mnist, monkeypatch):
    """``run(out, rounds, **profile)``: run_mcmahan with McMahan's preset shrunk to 3 clients of 100 images."""
    from fedmnist import simulation
    from fedmnist.data import normalize_images
    from fedmnist.training import ClientTrainer

    tiny = simulation.SimulationConfig.create(num_clients=3, fraction=1.0, local_epochs=1, batch_size=32,
                                              optimizer="sgd", learning_rate=0.05, momentum=0.0, train_subset=300,
                                              test_subset=200)
    monkeypatch.setitem(simulation.PRESETS, "mcmahan-iid", tiny)
    full_test = (normalize_images(raw_mnist.x_test[:200]), raw_mnist.y_test[:200])
    trainer = ClientTrainer("sgd", 0.05, 0.9)  # what run_experiments passes (AGGRESSIVE_TRAINING's optimizer)

    def run(out, rounds, methods=("fedavg", "fedmed"), **fields):
        settings = {"mcmahan": (("iid", 1, rounds, methods),), "mcmahan_seeds": (5, 6),
                    "mcmahan_grid": {"fedavg": {"learning_rate": (0.05, 0.2)}}, "mcmahan_validation": 1_000,
                    **fields}
        profile = dataclasses.replace(TINY, **settings)
        return mcmahan.run_mcmahan(profile, raw_mnist, out, trainer, full_test, lambda *_: None)

    return run


@pytest.mark.slow
def test_mcmahan_tunes_on_the_tuning_seed_then_runs_every_evaluation_seed_and_continues_when_rounds_are_raised(
        tmp_path, run_tiny_mcmahan):
    # Execute: tuning + one round per method and seed, then two rounds, and a fresh two-round run
    first = run_tiny_mcmahan(tmp_path / "r", 1)
    raised = run_tiny_mcmahan(tmp_path / "r", 2)
    fresh = run_tiny_mcmahan(tmp_path / "fresh", 2)

    # Assert: one tuning run per candidate (tuning seed 42), FedAvg's winner is every method's local rate
    runs = tmp_path / "r" / "simulaciones"
    assert sorted(p.name for p in runs.iterdir()) == [
        "ajuste_iid_fedavg_lr0.05", "ajuste_iid_fedavg_lr0.2", "mcmahan_iid_fedavg_s5", "mcmahan_iid_fedavg_s6",
        "mcmahan_iid_fedmed_s5", "mcmahan_iid_fedmed_s6"]
    assert json.loads((runs / "ajuste_iid_fedavg_lr0.2" / "configuracion.json").read_text(
    ))["simulation"]["seed"] == 42
    trials = read_csv(tmp_path / "r" / experiments.MCMAHAN_TUNING_CSV)
    assert [t["settings"] for t in trials] == ["learning_rate=0.05", "learning_rate=0.2"]
    assert {t["tuning_seed"] for t in trials} == {"42"}
    winner = max(trials, key=lambda t: float(t["score"]))
    assert [t["chosen"] for t in trials].count("True") == 1 and winner["chosen"] == "True"
    assert {r["learning_rate"] for r in first} == {float(winner["settings"].split("=")[1])}
    # seed by seed, every method; no run stops at its target
    assert [(r["seed"], r["method"], r["rounds_run"]) for r in first] == [
        (5, "fedavg", 1), (5, "fedmed", 1), (6, "fedavg", 1), (6, "fedmed", 1)]
    config = json.loads((runs / "mcmahan_iid_fedmed_s6" / "configuracion.json").read_text())["simulation"]
    assert config["seed"] == 6 and config["stop_at_target"] is False
    # the raised rounds continued round 1's checkpoints and equal the uninterrupted run

    def without_time(rows):
        return [{k: v for k, v in r.items() if k != "run_seconds"} for r in rows]

    assert _summary(runs / "mcmahan_iid_fedavg_s5")["resumed_from_round"] == 1
    assert without_time(raised) == without_time(fresh)
    assert raised[0]["rounds_run"] == 2 and raised[0]["seed"] != raised[2]["seed"]
    assert raised[0]["final_accuracy"] != raised[2]["final_accuracy"]  # another seed, another run
    table = render_tables(tmp_path / "fresh")
    assert "| IID | FedAvg | η_l = " in table["mcmahan"] and "| nunca / nunca |" not in table["mcmahan"]
    assert "| IID | FedMed |" in table["mcmahan_frente_fedavg"]
    assert table["mcmahan_ajuste"].count("| sí |") == 1
    assert (tmp_path / "fresh" / "mcmahan_iid.png").exists()


@pytest.mark.slow
def test_mcmahan_checkpoint_of_another_configuration_is_not_continued(tmp_path, run_tiny_mcmahan):
    run_tiny_mcmahan(tmp_path, 1, methods=("fedavg",), mcmahan_grid={})
    rows = run_tiny_mcmahan(tmp_path, 1, methods=("fedavg",), mcmahan_grid={"fedavg": {"learning_rate": (0.2,)}})

    assert [r["learning_rate"] for r in rows] == [0.2, 0.2]
    assert _summary(tmp_path / "simulaciones" / "mcmahan_iid_fedavg_s5")["resumed_from_round"] == 0


@pytest.mark.slow
def test_mcmahan_table_is_written_after_each_run(tmp_path, run_tiny_mcmahan, monkeypatch):
    written = []
    write_csv = mcmahan.write_csv

    def spy(path, rows):
        write_csv(path, rows)
        if path.name == experiments.MCMAHAN_CSV:
            written.append([(r["seed"], r["method"]) for r in read_csv(path)])

    monkeypatch.setattr(mcmahan, "write_csv", spy)
    run_tiny_mcmahan(tmp_path, 1, methods=("fedmed",), mcmahan_grid={})

    assert written == [[("5", "fedmed")], [("5", "fedmed"), ("6", "fedmed")]]


def test_mcmahan_run_measures_by_hand():
    # touches 99 % at round 3, falls back, holds from round 9 (5-round average ≥ 0.99 from there on)
    values = [0.97, 0.98, 0.99, 0.97, 0.98] + [0.995] * 7

    row = mcmahan.run_measures(values, mb_per_client_round=0.5)

    assert (row["first_97"], row["first_98"], row["first_99"]) == (1, 2, 3)
    # averages: r9 (.98 + .995·4)/5 = .992 ≥ .99, r8 (.97 + .98 + .995·3)/5 = .987
    assert row["sustained_99"] == 9
    assert row["mb_per_client_to_first_99"] == 1.5 and row["mb_per_client_to_sustained_99"] == 4.5
    assert row["mean_last10"] == pytest.approx((0.99 + 0.97 + 0.98 + 0.995 * 7) / 10)
    assert row["min_last10"] == 0.97 and row["best_accuracy"] == 0.995
    assert row["change_last10"] > 0 and row["rounds_run"] == 12
    never = mcmahan.run_measures([0.9] * 12, 0.5)
    assert never["first_99"] == never["sustained_99"] == never["mb_per_client_to_first_99"] == ""


def test_profile_refuses_a_mcmahan_tuning_seed_among_the_evaluation_seeds():
    with pytest.raises(ConfigError, match="tuning seed 43"):
        dataclasses.replace(TINY, mcmahan_tuning_seed=43, mcmahan_seeds=(43, 44))
    with pytest.raises(ConfigError, match="mcmahan case"):
        dataclasses.replace(TINY, mcmahan=(("iid", 1, 2),))
    with pytest.raises(ConfigError, match=r"unknown McMahan method.*fedavgg"):
        dataclasses.replace(TINY, mcmahan=(("iid", 1, 2, ("fedavg", "fedavgg")),))


@pytest.mark.parametrize(("losses", "patience", "max_epochs", "stop", "best"), [
    ([0.9, 0.5, 0.6, 0.55, 0.4, 0.45, 0.5, 0.6], 3, 30, 8, 5),  # epoch 5 improves: patience starts again
    ([0.9, 0.5, 0.6, 0.55, 0.4, 0.45, 0.5, 0.6], 2, 30, 4, 2),
    ([0.9, 0.5, 0.6, 0.55, 0.4, 0.45, 0.5, 0.6], 1, 30, 3, 2),
    ([0.9, 0.5, 0.6, 0.55, 0.4, 0.45, 0.5, 0.6], 3, 2, 2, 2),  # the cap stops first
    ([0.5, 0.5, 0.5], 2, 30, 3, 1),  # an equal loss is no improvement
    ([0.5, math.nan, 0.7, 0.4], 2, 30, 3, 1),  # a non-finite loss never wins
])
def test_stop_epoch_follows_the_patience_rule_by_hand(losses, patience, max_epochs, stop, best):
    assert ceiling.stop_epoch(losses, patience, max_epochs) == stop
    assert ceiling.best_epoch(losses[:stop]) == best
    assert ceiling.should_stop(losses[:stop], patience) == (stop - best >= patience)


def test_stop_epoch_refuses_losses_that_end_before_the_training_stops():
    with pytest.raises(ValueError, match="before the training stops"):
        ceiling.stop_epoch([0.9, 0.8, 0.7], 2, 30)
    with pytest.raises(ValueError, match="no validation loss"):
        ceiling.best_epoch([])


class ScriptedTrainer:
    """Stands in for ``ClientTrainer`` in ``run_ceiling``: epoch e's weights are [e], its validation loss
    comes from ``losses`` (accuracy 1 − loss); ``predict`` gets every label right with ``good_epoch``'s
    weights and every label wrong with any other."""

    optimizer_name, learning_rate, momentum = "adam", 1e-3, 0.0

    def __init__(self, losses, good_epoch):
        self.losses, self.good_epoch, self.trained, self.weights = losses, good_epoch, [], None

    def train(self, weights, x, y, *, epochs, batch_size, seed, x_val, y_val, on_epoch):
        self.trained.append((len(y), len(y_val), seed))
        history = {"loss": [], "accuracy": [], "val_loss": [], "val_accuracy": []}
        for epoch in range(1, epochs + 1):
            self.weights = [np.array([epoch], np.float32)]
            history["loss"].append(1.0)
            history["accuracy"].append(0.5)
            history["val_loss"].append(self.losses[epoch - 1])
            history["val_accuracy"].append(1 - self.losses[epoch - 1])
            if on_epoch(history):
                break
        return types.SimpleNamespace(weights=self.get_weights(), history=history)

    def get_weights(self):
        return [w.copy() for w in self.weights]

    def predict(self, weights, x, y):
        right = int(weights[0][0]) == self.good_epoch
        return (0.1 if right else 2.0), (y if right else (y + 1) % 10)


@pytest.fixture
def synthetic():
    """80 random training and 30 test images: ``run_ceiling``'s data when the trainer is scripted."""
    rng = np.random.default_rng(0)
    mnist = Mnist(rng.integers(0, 256, (80, 28, 28), dtype=np.uint8), rng.integers(0, 10, 80).astype(np.uint8),
                  rng.integers(0, 256, (30, 28, 28), dtype=np.uint8), rng.integers(0, 10, 30).astype(np.uint8))
    return mnist, (normalize_images(mnist.x_test), mnist.y_test)


CEILING = dataclasses.replace(TINY, ceiling_seeds=(3, 4), ceiling_validation=20, ceiling_patience=2,
                              ceiling_max_epochs=10, ceiling_train_subset=60)


def test_ceiling_stops_early_and_reports_the_best_epoch_restored(tmp_path, synthetic):
    # Prepare: validation losses that stop a patience-2 training after epoch 4, epoch 2 the best
    mnist, full_test = synthetic
    trainer = ScriptedTrainer([0.9, 0.5, 0.6, 0.55, 0.3, 0.2], good_epoch=2)

    # Execute
    rows = ceiling.run_ceiling(CEILING, mnist, tmp_path, trainer, full_test, lambda *_: None)

    # Assert: one row per seed; the restored epoch-2 weights score every test image right
    assert [r["seed"] for r in rows] == ["3", "4"] and tuple(rows[0]) == ceiling.COLUMNS
    assert rows == read_csv(tmp_path / experiments.CEILING_CSV)
    assert trainer.trained[0][:2] == (40, 20)  # the first 60 images minus 20 held out
    assert trainer.trained[0][2] != trainer.trained[1][2]  # each seed its own training order
    for row in rows:
        assert (row["epochs_run"], row["best_epoch"], row["stopped_early"]) == ("4", "2", "True")
        assert float(row["validation_loss"]) == 0.5 and float(row["validation_accuracy"]) == 0.5
        assert row["validation_losses"] == "0.900000 0.500000 0.600000 0.550000"
        assert float(row["test_accuracy"]) == 1.0 and float(row["test_loss"]) == pytest.approx(0.1)
        assert float(row["ci_low"]) < 1.0 == float(row["ci_high"])
        assert (row["train_images"], row["validation_images"], row["test_images"]) == ("40", "20", "30")


def test_ceiling_stops_at_the_cap_when_validation_keeps_improving(tmp_path, synthetic):
    mnist, full_test = synthetic
    trainer = ScriptedTrainer([0.9, 0.8, 0.7, 0.6], good_epoch=3)

    rows = ceiling.run_ceiling(dataclasses.replace(CEILING, ceiling_max_epochs=3), mnist, tmp_path, trainer,
                               full_test, lambda *_: None)

    assert {(r["epochs_run"], r["best_epoch"], r["stopped_early"]) for r in rows} == {("3", "3", "False")}
    assert {r["test_accuracy"] for r in rows} == {"1.000000"}


def test_ceiling_resumes_finished_seeds_and_retrains_on_other_settings(tmp_path, synthetic):
    # Prepare: a finished run of seeds 3 and 4
    mnist, full_test = synthetic
    ceiling.run_ceiling(CEILING, mnist, tmp_path, ScriptedTrainer([0.9, 0.5, 0.6, 0.55], 2), full_test,
                        lambda *_: None)
    first = (tmp_path / experiments.CEILING_CSV).read_text()

    # Execute: the same run again, then seeds 4 and 5, then another patience
    again = ScriptedTrainer([0.9, 0.5, 0.6, 0.55], 2)
    same = ceiling.run_ceiling(CEILING, mnist, tmp_path, again, full_test, lambda *_: None)
    kept = (tmp_path / experiments.CEILING_CSV).read_text()
    extended = ScriptedTrainer([0.9, 0.5, 0.6, 0.55], 2)
    more = ceiling.run_ceiling(dataclasses.replace(CEILING, ceiling_seeds=(4, 5)), mnist, tmp_path, extended,
                               full_test, lambda *_: None)
    other = ScriptedTrainer([0.9, 0.5, 0.6, 0.55, 0.7], 2)
    patient = ceiling.run_ceiling(dataclasses.replace(CEILING, ceiling_patience=3), mnist, tmp_path, other,
                                  full_test, lambda *_: None)

    # Assert: nothing retrained when finished; only the new seed; everything under a new setting
    assert again.trained == [] and kept == first
    assert [r["seed"] for r in same] == ["3", "4"]
    assert len(extended.trained) == 1 and [r["seed"] for r in more] == ["4", "5"]
    assert more[0] == same[1]
    assert len(other.trained) == 2 and {r["epochs_run"] for r in patient} == {"5"}


@pytest.mark.slow
def test_ceiling_trains_the_real_cnn_to_its_best_validation_epoch(tmp_path, small_npz, monkeypatch):
    # Prepare: two seeds, 500 training and 200 validation images of the real MNIST, at most 3 epochs
    profile = dataclasses.replace(CEILING, name="tiny", ceiling_validation=200, ceiling_train_subset=700,
                                  ceiling_patience=1, ceiling_max_epochs=3)
    monkeypatch.setitem(experiments.PROFILES, "tiny", profile)

    # Execute
    rows = run_experiments("tiny", str(small_npz), tmp_path, only=("ceiling",), quiet=True)["ceiling"]

    # Assert: the recorded curve says where the rule stopped and which epoch was kept
    assert [r["seed"] for r in rows] == ["3", "4"]
    for row in rows:
        curve = [float(v) for v in row["validation_losses"].split()]
        assert int(row["epochs_run"]) == len(curve) == ceiling.stop_epoch(curve, 1, 3)
        assert 1 <= int(row["best_epoch"]) == ceiling.best_epoch(curve) <= int(row["epochs_run"])
        assert float(row["validation_loss"]) == curve[int(row["best_epoch"]) - 1]
        assert float(row["ci_low"]) <= float(row["test_accuracy"]) <= float(row["ci_high"])
        assert float(row["test_accuracy"]) > 0.5 and row["test_images"] == str(TEST_IMAGES)
    assert rows[0]["validation_losses"] != rows[1]["validation_losses"]
    assert "ceiling" in json.loads((tmp_path / experiments.ENV_FILE).read_text())["seconds_per_experiment"]
    table = render_tables(tmp_path)["techo"]
    assert "| media ± IC 95 % |" in table and "2 semillas (3, 4)" in table
