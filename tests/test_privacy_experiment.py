"""The privacy experiment (essay §3.8): its one-factor-at-a-time grid, its table, and a tiny end-to-end run."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from fedmnist import experiments
from fedmnist.checkpoint import flat_settings
from fedmnist.errors import ConfigError
from fedmnist.experiments import privacy as exp
from fedmnist.experiments.profiles import PROFILES, Profile
from fedmnist.published import GEYER_2017, PENDING, describe, geyer_row
from fedmnist.result_tables import StaleResults, privacy_table, privacy_tuning_table

GRID = Profile(name="grid", seeds=(1, 2), dp_clients=(100, 1000), dp_epsilons=(8.0, 2.0), dp_rounds=20,
               dp_baseline_rounds=50)
CHOSEN = {"baseline": {"learning_rate": 0.2, "server_momentum": 0.0},
          "dp": {8.0: {"learning_rate": 0.1, "clip_factor": 0.5, "server_momentum": 0.9, "clip": 0.35},
                 2.0: {"learning_rate": 0.1, "clip_factor": 0.25, "server_momentum": 0.5, "clip": 0.18}}}


def _diff(a, b) -> set[str]:
    fa, fb = flat_settings(a.to_dict()), flat_settings(b.to_dict())
    return {k for k in fa.keys() | fb.keys() if fa.get(k) != fb.get(k)}


def test_cases_vary_one_factor_at_a_time_with_clip_steps_and_rounds_fixed():
    cases = exp.privacy_cases(GRID)

    assert [(c.clients, c.target_epsilon, c.rounds) for c in cases] == [
        (100, None, 50), (1000, None, 50), (100, 8.0, 20), (100, 2.0, 20), (1000, 8.0, 20), (1000, 2.0, 20)]
    configs = {(c.clients, c.target_epsilon): exp.final_config(GRID, c, 43, CHOSEN) for c in cases}
    # K alone: the same z (q = m/K = 0.1 and δ = 1e-5 at both K), clip, local steps, batch, rates, rounds
    assert _diff(configs[100, 8.0], configs[1000, 8.0]) == {"federation.num_clients"}
    assert _diff(configs[100, 2.0], configs[1000, 2.0]) == {"federation.num_clients"}
    # ε: the noise multiplier and that ε's own tuned clip and server momentum, nothing else
    assert _diff(configs[1000, 8.0], configs[1000, 2.0]) == {"privacy.noise_multiplier", "privacy.clip",
                                                             "method.server_momentum"}
    assert configs[1000, 2.0].privacy.clip == 0.18 and configs[1000, 2.0].method.server_momentum == 0.5
    private = configs[1000, 8.0]
    assert private.privacy.clip == 0.35 and private.local_steps == GRID.dp_local_steps == 30
    assert private.privacy.sampling == "poisson" and private.method.server_momentum == 0.9
    assert configs[1000, 2.0].privacy.noise_multiplier > private.privacy.noise_multiplier
    baseline = configs[1000, None]
    assert baseline.privacy is None and baseline.training.learning_rate == 0.2 and baseline.rounds == 50
    assert _diff(configs[100, None], baseline) == {"federation.num_clients"}


def test_each_target_epsilon_is_tuned_on_its_own(tmp_path, small_mnist, monkeypatch):
    from fedmnist.experiments import read_csv
    from fedmnist.tuning import Trial

    profile = dataclasses.replace(GRID, dp_validation=100, dp_tuning_clients=20,
                                  dp_baseline_grid={"learning_rate": (0.05, 0.1), "server_momentum": (0.9,)},
                                  dp_grid={"clip_factor": (0.1, 0.5), "server_momentum": (0.5,)})
    runs = []

    def fake_trial(config, method, settings, tuning, run_dir, trainer, name=None):
        runs.append((run_dir.name, config))
        if config.privacy is None:  # the baseline: client rate 0.1 wins
            score = 0.9 + settings["learning_rate"]
        else:  # more noise (ε = 2) favours the smaller clip, less noise (ε = 8) the larger
            small_clip = config.privacy.noise_multiplier > exp.noise_multiplier(profile, 20, 8.0)
            score = 0.8 + 0.1 * ((settings["clip_factor"] == 0.1) == small_clip)
        return Trial(name or method, settings, (score,), score, 1.0)

    monkeypatch.setattr(exp, "tuning_trial", fake_trial)
    monkeypatch.setattr(exp, "median_update_norm", lambda config, mnist: 2.0)

    chosen = exp.tune_privacy(profile, small_mnist, tmp_path, trainer=None, say=lambda text: None)

    assert chosen["baseline"] == {"learning_rate": 0.1, "server_momentum": 0.9}
    assert chosen["dp"][8.0] == {"learning_rate": 0.1, "clip_factor": 0.5, "server_momentum": 0.5, "clip": 1.0}
    assert chosen["dp"][2.0] == {"learning_rate": 0.1, "clip_factor": 0.1, "server_momentum": 0.5, "clip": 0.2}
    names = [name for name, _ in runs]
    assert names[2:] == ["privacidad_ajuste_K20_eps8_lr0.1_clip_factor0.1_mom0.5",
                         "privacidad_ajuste_K20_eps8_lr0.1_clip_factor0.5_mom0.5",
                         "privacidad_ajuste_K20_eps2_lr0.1_clip_factor0.1_mom0.5",
                         "privacidad_ajuste_K20_eps2_lr0.1_clip_factor0.5_mom0.5"]
    for name, config in runs[2:]:  # every DP trial's noise is calibrated for its own ε at the final rounds
        target = 8.0 if "_eps8_" in name else 2.0
        assert config.privacy.noise_multiplier == exp.noise_multiplier(profile, 20, target)
    trials = read_csv(tmp_path / exp.PRIVACY_TUNING_CSV)
    assert [(t["stage"], t["target_epsilon"], t["chosen"]) for t in trials] == [
        ("baseline", "", "False"), ("baseline", "", "True"), ("dp", "8.000000", "False"), ("dp", "8.000000", "True"),
        ("dp", "2.000000", "True"), ("dp", "2.000000", "False")]
    cases = exp.privacy_cases(profile)
    finals = {(c.clients, c.target_epsilon): exp.final_config(profile, c, 43, chosen) for c in cases}
    assert finals[1000, 2.0].privacy.clip == 0.2 and finals[1000, 8.0].privacy.clip == 1.0


def test_noise_multiplier_meets_the_target_at_the_fixed_rounds():
    from fedmnist.privacy import PrivacyAccountant

    for k in (100, 1000):
        z = exp.noise_multiplier(GRID, k, 8.0)
        accountant = PrivacyAccountant(z, k, k // 10, exp.delta_for(GRID, k), sampling="poisson")
        assert accountant.epsilon(GRID.dp_rounds) <= 8.0 < accountant.epsilon(GRID.dp_rounds + 5)


@pytest.mark.parametrize(("changes", "message"), [
    ({"dp_seeds": (42, 43)}, "exclude the tuning seed"),
    ({"dp_clients": (100, 100)}, "distinct federation sizes"),
    ({"dp_epsilons": (0.0,)}, "target ε > 0"),
    ({"dp_epsilons": (8.0, 8)}, "distinct target ε"),  # one ε tuned and run twice under the same names
    ({"dp_delta": 0.01}, "dp_delta must be in"),
    ({"dp_grid": {"clip_factor": (0.0,)}}, "out of range"),
    ({"dp_baseline_grid": {"mu": (0.1,)}}, "dp_baseline_grid takes"),
    ({"dp_local_steps": 0}, "dp_local_steps"),
])
def test_profiles_refuse_privacy_settings_the_experiment_cannot_run(changes, message):
    with pytest.raises(ConfigError, match=message):
        dataclasses.replace(GRID, **changes)


def test_full_profile_tunes_apart_from_three_evaluation_seeds_and_charges_k_1000():
    full = PROFILES["full"]

    assert len(full.dp_seeds) >= 3 and full.dp_tuning_seed not in full.dp_seeds
    assert 1000 in full.dp_clients and 100 in full.dp_clients and full.dp_tuning_clients == 1000
    assert 8.0 in full.dp_epsilons and 2.0 in full.dp_epsilons and full.dp_delta is None


def _row(clients, target, seed, accuracy, change, epsilon="inf", z=0.0, loss=0.05):
    private = target != ""
    return {"clients": str(clients), "clients_per_round": str(clients // 10), "sampling": "poisson",
            "local_steps": "30", "batch_size": "10", "learning_rate": "0.100000", "server_momentum": "0.900000",
            "clip": "0.350000" if private else "", "rounds": "300", "target_epsilon": target,
            "noise_multiplier": f"{z:.6f}", "noise_std": f"{z * 0.35 / (clients // 10):.6f}",
            "epsilon": epsilon, "delta": "0.000010" if private else "", "seed": str(seed),
            "final_accuracy": f"{accuracy:.6f}", "final_loss": f"{loss:.6f}", "change_last10": f"{change:.6f}"}


def test_privacy_table_by_hand():
    rows = [_row(1000, "", s, a, c) for s, a, c in ((43, 0.97, 0.0005), (44, 0.98, 0.0010), (45, 0.99, 0.0015))]
    rows += [_row(1000, "8.000000", s, a, c, "7.9912", 1.36) for s, a, c in
             ((43, 0.90, 0.004), (44, 0.92, 0.005), (45, 0.94, 0.006))]
    rows += [_row(100, "8.000000", 43, 0.80, 0.0, "7.9", 2.0)]  # no K = 100 reference: nothing to pair with
    rows += [dict(_row(100, "2.000000", 43, 0.70, 0.0, "1.9", 5.0), clip="0.089000", server_momentum="0.500000")]

    lines = privacy_table(rows).splitlines()

    # mean ± t(0.975, 2)·sd/√3: 0.02·4.3027/√3 = 4.97 points; the changes: 0.2 ± 0.25 points (contains 0),
    # and 0.5 ± 0.25 (does not: still rising)
    # the private row against the same K's reference, seed by seed: −7, −6, −5 points → −6 ± 4.3027·1/√3
    assert lines[2] == ("| 1000 (100) | sin privacidad | — | — | ∞ | 98.00 ± 2.48 | — | "
                        "+0.10 ± 0.12 (sin cambio detectable) | — |")
    assert lines[3] == (f"| 1000 (100) | 8 | 1.36 | 0.0048 | 7.99 (δ = 1e-05) | 92.00 ± 4.97 | -6.00 [-8.48, -3.52], 0/3 | "
                        f"+0.50 ± 0.25 (sube) | {describe(geyer_row(1000))} |")
    assert lines[4].startswith("| 100 (10) | 8 | 2 |") and lines[4].split(" | ")[6] == "—"
    caption = lines[-1]
    # each ε's own tuned clip and momentum, then what every private row shares
    assert ("con el recorte y el momento ajustados para cada ε: ε = 8: S = 0.35, β = 0.9; ε = 2: S = 0.089, β = 0.5; "
            "en todas, 30 pasos locales de B = 10, η_l = 0.1, 300 rondas") in caption
    assert "Semillas: 43, 44, 45" in caption and "Geyer" in caption and "«diverge»" not in caption
    with pytest.raises(StaleResults):
        privacy_table([{"clients": "100", "noise_multiplier": "1"}])


def test_privacy_table_says_when_a_private_row_diverged_instead_of_calling_it_settled():
    # Prepare: a reference, and private rows whose weights blew up in two of three seeds (a flat slope at chance)
    rows = [_row(100, "", s, 0.987, 0.0) for s in (43, 44, 45)]
    rows += [_row(100, "8.000000", s, a, c, "7.91", 1.37, loss) for s, a, c, loss in
             ((43, 0.08, 0.001, 3.8e5), (44, 0.07, -0.001, float("inf")), (45, 0.11, 0.0, 2.31))]

    lines = privacy_table(rows).splitlines()

    # Assert: the reference keeps its verdict, the private row names its diverged seeds, the caption defines it
    assert lines[2].endswith("(sin cambio detectable) | — |")
    assert "(diverge en 2/3 semillas)" in lines[3] and "sin cambio detectable" not in lines[3]
    assert "«diverge»: semillas cuyo modelo final tiene una pérdida de test no finita o mayor que 1000" in lines[-1]
    # a row without a recorded loss is not counted as diverged (and does not break the table)
    rows[-1] = dict(rows[-1], final_loss="")
    assert "(diverge en 2/3 semillas)" in privacy_table(rows).splitlines()[3]


def test_geyer_rows_are_pending_until_read_in_the_paper():
    assert [r.clients for r in GEYER_2017] == [100, 1000, 10000]
    assert all(r.accuracy is None for r in GEYER_2017)  # not found in the stored copies: never guessed
    assert describe(geyer_row(1000)) == PENDING and describe(geyer_row(6000)) == "—"
    read = dataclasses.replace(GEYER_2017[1], epsilon=8.0, delta=1e-3, accuracy=0.5, rounds=10, clients_per_round=7)
    assert describe(read) == "50.0 % (ε = 8, δ = 0.001, 10 rondas, m = 7)"  # a made-up row: the format only


def test_privacy_tuning_table_marks_the_choice():
    rows = [{"stage": "baseline", "clients": "1000", "settings": "learning_rate=0.1 server_momentum=0.9",
             "tuning_rounds": "60", "target_epsilon": "", "score": "0.951", "chosen": "True"},
            {"stage": "dp", "clients": "1000", "settings": "learning_rate=0.1 clip_factor=0.5 server_momentum=0.9",
             "tuning_rounds": "60", "target_epsilon": "8.000000", "score": "0.9", "chosen": "False"}]

    lines = privacy_tuning_table(rows).splitlines()

    assert lines[2] == "| sin privacidad | 1000 | η_l = 0.1, β = 0.9 | 60 | 95.10 | sí |"
    assert lines[3] == "| DP (ε = 8) | 1000 | η_l = 0.1, S / mediana de ‖Δ‖ = 0.5, β = 0.9 | 60 | 90.00 |  |"
    assert lines[5] == ("Cada ensayo con DP usa el z de las ejecuciones finales de su ε (calibrado para todas sus "
                        "rondas) y se detiene en las rondas indicadas.")  # no seed, validation or norm recorded
    for r in rows:
        r.update(tuning_seed="42", validation_images="6000", median_update_norm="0.890000")
    caption = privacy_tuning_table(rows).splitlines()[-1]
    assert caption == ("Semilla del ajuste: 42 (nunca una de evaluación); validación: 6 000 imágenes de entrenamiento "
                       "apartadas; mediana de las normas ‖Δ‖ de la ronda 1 sin privacidad: 0.89 (S = factor × "
                       "mediana, a dos cifras); cada ensayo con DP usa el z de las ejecuciones finales de su ε "
                       "(calibrado para todas sus rondas) y se detiene en las rondas indicadas.")


@pytest.fixture(scope="module")
def small_npz(tmp_path_factory, raw_mnist):
    """2,400 training and 500 test images of the real MNIST (a tenth of each class), as an npz file."""
    def stratified(labels, per_class):
        return np.sort(np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in range(10)]))

    train, test = stratified(raw_mnist.y_train, 240), stratified(raw_mnist.y_test, 50)
    path = tmp_path_factory.mktemp("mnist") / "mnist.npz"
    np.savez(path, x_train=raw_mnist.x_train[train], y_train=raw_mnist.y_train[train],
             x_test=raw_mnist.x_test[test], y_test=raw_mnist.y_test[test])
    return path


@pytest.mark.slow
def test_quick_privacy_experiment_end_to_end(tmp_path, small_npz):
    from fedmnist.essay import render_tables
    from fedmnist.experiments import read_csv, run_experiments
    from fedmnist.privacy import PrivacyAccountant

    quick = PROFILES["quick"]
    run_experiments("quick", str(small_npz), tmp_path, only=("privacy",), quiet=True)

    rows = read_csv(tmp_path / experiments.PRIVACY_CSV)
    assert [(r["clients"], r["target_epsilon"]) for r in rows] == [("20", ""), ("40", ""), ("20", "8.000000"),
                                                                    ("40", "8.000000")]
    trials = read_csv(tmp_path / experiments.PRIVACY_TUNING_CSV)
    assert [t["stage"] for t in trials] == ["baseline", "baseline"] and [t["chosen"] for t in trials].count("True") == 1
    winner = next(t for t in trials if t["chosen"] == "True")
    for row in rows:
        assert row["local_steps"] == "2" and int(row["rounds"]) == quick.dp_rounds == quick.dp_baseline_rounds
        if row["target_epsilon"] == "":  # the baseline: its own tuned settings, no clip, no ε
            assert row["epsilon"] == "inf" and row["clip"] == ""
            assert f"server_momentum={float(row['server_momentum']):g}" in winner["settings"]
            continue
        k, m, z = int(row["clients"]), int(row["clients_per_round"]), float(row["noise_multiplier"])
        assert z == exp.noise_multiplier(quick, k, 8.0)
        spent = PrivacyAccountant(z, k, m, float(row["delta"]), sampling="poisson").epsilon(quick.dp_rounds)
        assert float(row["epsilon"]) == pytest.approx(spent, abs=1e-4) and spent <= 8.0
        assert float(row["server_momentum"]) == 0.9 and float(row["clip"]) > 0
    assert len({r["clip"] for r in rows if r["target_epsilon"]}) == 1  # one clip norm for every K
    tables = render_tables(tmp_path)
    assert "| 20 (2) | 8 | " in tables["privacidad"] and "Geyer" in tables["privacidad"]  # no K = 20 in the paper: —
    assert tables["privacidad_ajuste"].count("| sí |") == 1
    assert (tmp_path / "privacidad.png").is_file() and (tmp_path / experiments.TEAM_PRIVACY_CSV).is_file()


def test_median_update_norm_is_the_median_of_the_round_1_client_updates(small_mnist):
    from fedmnist.federation import prepare_federation
    from fedmnist.model import initial_weights
    from fedmnist.privacy import client_update, update_norm
    from fedmnist.seeds import training_seed
    from fedmnist.simulation import sample_clients

    profile = dataclasses.replace(PROFILES["quick"], dp_train_subset=None)
    config = exp.base_config(profile, 20, 1, 7, 0.1, 0.0)
    fed = prepare_federation(config.federation, config.seed, mnist=small_mnist)
    trainer = config.training.build_trainer(config.seed)
    start = initial_weights(config.seed)
    clients = sample_clients(config, 1)
    norms = [update_norm(client_update(trainer.train(
        start, *fed.client_data(k), epochs=1, batch_size=config.training.batch_size,
        seed=training_seed(config.seed, 1, k), steps=config.local_steps).weights, start)) for k in clients]

    assert len(clients) == 2 and len(set(norms)) == 2
    assert exp.median_update_norm(config, small_mnist) == float(f"{np.median(norms):.2g}") > 0
