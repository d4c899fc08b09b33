"""The essay's experiments on a tiny profile, and the tables rendered from result files."""

from __future__ import annotations

import dataclasses

import pytest

from fedmnist import experiments
from fedmnist.errors import ConfigError
from fedmnist.experiments import Profile, read_csv, render_tables, run_experiments

TINY = Profile(
    name="tiny", seeds=(3,), course_epochs=1, course_train_subset=600, course_test_subset=300,
    clients=3, train_subset=450, rounds=1, round_test_subset=200, alphas=(), prox_mus=(0.0, 0.1),
    attacks=("gaussian",), malicious_counts=(1,), attack_methods=("fedavg", "fedmed"),
    attack_rounds=1, attack_train_subset=450,
)


@pytest.fixture(scope="module")
def tiny_results(tmp_path_factory, mnist_path, monkeypatch_module):
    monkeypatch_module.setitem(experiments.PROFILES, "tiny", TINY)
    out = tmp_path_factory.mktemp("resultados")
    run_experiments("tiny", str(mnist_path), out, only=("course", "fedprox_mu", "attacks"), quiet=True)
    return out


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def test_course_rows_cover_every_model(tiny_results):
    # Execute
    rows = read_csv(tiny_results / experiments.COURSE_CSV)

    # Assert: three global methods, five locals, the central model, one seed
    models = [r["model"] for r in rows]
    assert models == ["fedavg", "fedprox", "fedmed", *[f"local_{k}" for k in range(1, 6)], "central"]
    assert {r["seed"] for r in rows} == {"3"}
    for r in rows:
        assert 0.0 <= float(r["ci_low"]) <= float(r["accuracy"]) <= float(r["ci_high"]) <= 1.0


def test_shared_init_beats_independent_init(tiny_results):
    rows = {r["init"]: float(r["accuracy"]) for r in read_csv(tiny_results / experiments.INIT_CSV)}

    assert set(rows) == {"compartida", "independiente"}
    assert rows["compartida"] > rows["independiente"]


def test_fedprox_mu_zero_is_reported_as_fedavg_run(tiny_results):
    rows = read_csv(tiny_results / experiments.PROX_CSV)

    assert [r["mu"] for r in rows] == ["0", "0.1"]
    assert (tiny_results / "simulaciones" / "fedprox_mu_0" / "resumen.json").exists()


def test_tables_are_rendered_from_the_files(tiny_results):
    # Execute
    tables = render_tables(tiny_results)

    # Assert: one table per result file written, numbers as percentages of the CSV values
    assert set(tables) == {"curso", "inicializacion", "fedprox_mu", "ataques"}
    fedavg = next(r for r in read_csv(tiny_results / experiments.COURSE_CSV) if r["model"] == "fedavg")
    assert f"| FedAvg | {float(fedavg['accuracy']) * 100:.2f} |" in tables["curso"]
    attack = read_csv(tiny_results / experiments.ATTACK_CSV)
    assert f"{float(attack[0]['final_accuracy']) * 100:.2f}" in tables["ataques"]


def test_environment_records_command_seeds_and_versions(tiny_results):
    import json

    env = json.loads((tiny_results / experiments.ENV_FILE).read_text())

    assert env["seeds"] == [3]
    assert env["profile"]["name"] == "tiny"
    assert {"tensorflow", "keras", "numpy", "python"} <= set(env["software"])
    assert set(env["seconds_per_experiment"]) == {"course", "fedprox_mu", "attacks"}


def test_unknown_profile_and_experiment_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="unknown profile"):
        run_experiments("huge", None, tmp_path)
    with pytest.raises(ConfigError, match="unknown experiment"):
        run_experiments("quick", None, tmp_path, only=("everything",))


def test_profiles_are_frozen_and_full_repeats_seeds():
    full = experiments.PROFILES["full"]

    assert len(full.seeds) >= 2
    with pytest.raises(dataclasses.FrozenInstanceError):
        full.rounds = 1  # type: ignore[misc]


def _summary(run_dir):
    import json

    return json.loads((run_dir / "resumen.json").read_text())


@pytest.fixture
def run_tiny_mcmahan(raw_mnist, monkeypatch):
    """``run(out, max_rounds, **profile)``: run_mcmahan with McMahan's preset shrunk to 3 clients of 100 images."""
    from fedmnist import simulation
    from fedmnist.data import normalize_images
    from fedmnist.training import ClientTrainer

    tiny = simulation.SimulationConfig.create(num_clients=3, fraction=1.0, local_epochs=1, batch_size=32,
                                              learning_rate=0.05, momentum=0.0, train_subset=300,
                                              test_subset=200)
    monkeypatch.setitem(simulation.PRESETS, "mcmahan-iid", tiny)
    full_test = (normalize_images(raw_mnist.x_test[:200]), raw_mnist.y_test[:200])
    trainer = ClientTrainer()

    def run(out, max_rounds, **fields):
        settings = {"mcmahan": (("iid", 1, max_rounds),), "mcmahan_methods": ("fedavg", "fedmed"),
                    "mcmahan_grid": {"fedavg": {"learning_rate": (0.05, 0.2)}}, "mcmahan_validation": 1_000,
                    **fields}
        profile = dataclasses.replace(TINY, **settings)
        return experiments.run_mcmahan(profile, raw_mnist, out, trainer, full_test, lambda *_: None)

    return run


def test_mcmahan_tunes_on_validation_then_continues_its_checkpoints_when_the_cap_is_raised(tmp_path, run_tiny_mcmahan):
    # Execute: tuning + one round per method, then a cap of two rounds, and a fresh two-round run
    first = run_tiny_mcmahan(tmp_path / "r", 1)
    raised = run_tiny_mcmahan(tmp_path / "r", 2)
    fresh = run_tiny_mcmahan(tmp_path / "fresh", 2)

    # Assert: one tuning run per candidate, FedAvg's winner is every method's local rate
    runs = tmp_path / "r" / "simulaciones"
    assert sorted(p.name for p in runs.iterdir()) == [
        "ajuste_iid_fedavg_lr0.05", "ajuste_iid_fedavg_lr0.2", "mcmahan_iid_fedavg", "mcmahan_iid_fedmed"]
    trials = read_csv(tmp_path / "r" / experiments.MCMAHAN_TUNING_CSV)
    assert [t["settings"] for t in trials] == ["learning_rate=0.05", "learning_rate=0.2"]
    winner = max(trials, key=lambda t: float(t["score"]))
    assert [t["chosen"] for t in trials].count("True") == 1 and winner["chosen"] == "True"
    assert {r["learning_rate"] for r in first} == {float(winner["settings"].split("=")[1])}
    # the raised cap continued round 1's checkpoints and equals the uninterrupted run
    def without_time(rows):
        return [{k: v for k, v in r.items() if k != "run_seconds"} for r in rows]

    assert [(r["method"], r["rounds_run"]) for r in first] == [("fedavg", 1), ("fedmed", 1)]
    assert _summary(runs / "mcmahan_iid_fedavg")["resumed_from_round"] == 1
    assert without_time(raised) == without_time(fresh)
    assert raised[0]["rounds_run"] == 2
    table = render_tables(tmp_path / "fresh")
    assert "| IID | FedAvg | η_l = " in table["mcmahan"] and "— / — / — |" in table["mcmahan"]
    assert table["mcmahan_ajuste"].count("| sí |") == 1


def test_mcmahan_checkpoint_of_another_configuration_is_not_continued(tmp_path, run_tiny_mcmahan):
    run_tiny_mcmahan(tmp_path, 1, mcmahan_grid={})
    rows = run_tiny_mcmahan(tmp_path, 1, mcmahan_grid={"fedavg": {"learning_rate": (0.2,)}})

    assert [r["learning_rate"] for r in rows] == [0.2, 0.2]
    assert _summary(tmp_path / "simulaciones" / "mcmahan_iid_fedavg")["resumed_from_round"] == 0
