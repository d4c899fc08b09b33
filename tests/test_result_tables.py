"""The essay's multi-seed tables from hand-made rows whose intervals are known by hand."""

from __future__ import annotations

import pytest

from fedmnist import result_tables as rt
from fedmnist.labels import method_name, partition_name

RUN = {
    "clients": "10",
    "train_images": "4000",
    "test_images": "10000",
    "local_epochs": "1",
    "eval_every": "2",
    "rounds": "16",
    "ci_low": "0",
    "ci_high": "1",
    "final_loss": "0.3",
    "diverged": "False",
}
# two seeds: for values 0.89 and 0.91 the half-width is t(0.975, 1) · s / √2 = 12.7062 · 0.01 = 0.1271
FEDAVG = {"1": "0.89", "2": "0.91"}
FEDPROX = {"1": "0.90", "2": "0.93"}  # differences +0.01, +0.02: mean 1.50 points, half-width 6.35


def course_rows() -> list[dict]:
    rows = []
    for seed in ("1", "2"):
        common = {
            "seed": seed,
            "loss": "0.1",
            "optimizer": "adam",
            "learning_rate": "0.001",
            "momentum": "0.0",
            "epochs": "2",
            "batch_size": "32",
            "train_images": "60000",
            "test_images": "10000",
        }
        rows.append({**common, "model": "fedavg", "accuracy": FEDAVG[seed], "mu": "0.0"})
        rows.append({**common, "model": "fedprox", "accuracy": FEDPROX[seed], "mu": "0.01"})
        rows += [{**common, "model": f"local_{k}", "accuracy": "0.95", "mu": "0.0"} for k in (1, 2)]
    return rows


def test_course_table_by_hand():
    table = rt.course_table(course_rows())

    assert "| FedAvg | 90.00 ± 12.71 | 0.1000 | — |" in table
    assert "| FedProx (μ = 0.01) | 91.50 ± 19.06 | 0.1000 | +1.50 [-4.85, +7.85], 2/2 |" in table
    assert (
        "| Modelos locales (media de los 5) | 95.00 ± 0.00 | 0.1000 | +5.00 [-7.71, +17.71], 2/2 |" in table
    )
    assert "2 semillas (1, 2)" in table and "Adam, tasa 0.001, 2 épocas, lote 32" in table
    assert "60 000 imágenes de entrenamiento y 10 000 imágenes de test" in table


def test_heterogeneity_tables_mark_diverged_seeds_and_pair_by_seed():
    rows = []
    for seed in ("1", "2"):
        rows.append(
            {
                **RUN,
                "partition": "shards_2",
                "seed": seed,
                "method": "fedavg",
                "mu": "0",
                "final_accuracy": FEDAVG[seed],
            }
        )
        rows.append(
            {
                **RUN,
                "partition": "shards_2",
                "seed": seed,
                "method": "fedprox",
                "mu": "0.1",
                "final_accuracy": FEDPROX[seed],
                "diverged": str(seed == "2"),
            }
        )

    tables = rt.heterogeneity_tables(rows)

    assert (
        "| fragmentos (2 por cliente) | 90.00 ± 12.71 | 91.50 ± 19.06 (diverge en 1/2) | 0.1 |"
        in tables["heterogeneidad"]
    )
    assert (
        "| fragmentos (2 por cliente) | +1.50 [-4.85, +7.85], 2/2 |" in tables["heterogeneidad_diferencias"]
    )
    assert (
        "10 clientes (todos en cada ronda) con 4 000 imágenes de entrenamiento, 16 rondas de 1 época local"
        in tables["heterogeneidad"]
    )
    assert "evaluadas cada 2 rondas y en la última" in tables["heterogeneidad"]


def test_one_seed_gives_means_without_intervals():
    rows = [{**RUN, "partition": "iid", "seed": "1", "method": "fedavg", "mu": "0", "final_accuracy": "0.9"}]

    table = rt.heterogeneity_tables(rows)

    assert "| IID | 90.00 | — |" in table["heterogeneidad"]


def test_tuning_table_lists_the_candidates_and_the_choice():
    rows = [
        {
            "experiment": "heterogeneidad",
            "setting": "dirichlet_0.3",
            "mu": m,
            "score": s,
            "chosen": c,
            "validation_images": "5000",
            "rounds": "16",
        }
        for m, s, c in (("0.01", "0.91", "False"), ("0.1", "0.92", "True"))
    ]

    table = rt.tuning_table(rows)

    assert "| Heterogeneidad | Dirichlet (α = 0.3) | 16 | 0.01: 91.00 · 0.1: 92.00 | 0.1 |" in table
    assert "5 000 imágenes de entrenamiento apartadas" in table


def test_drift_tables_by_hand():
    rows = [
        {
            "seed": s,
            "partition": "iid",
            "optimizer": "sgd",
            "learning_rate": "0.05",
            "momentum": "0.9",
            "epochs": "2",
            "local_steps": "125",
            "update_norm": n,
            "update_cosine": "0.5",
            "barrier": "nan",
            "barrier_images": "1000",
            "locals_accuracy": "0.95",
            "fedavg_accuracy": FEDAVG[s],
            "mu": "0.1",
            "fedprox_accuracy": FEDPROX[s],
            "clients": "5",
            "images_per_client": "2000",
            "test_images": "10000",
        }
        for s, n in (("1", "3.0"), ("2", "5.0"))
    ]

    tables = rt.drift_tables(rows)

    # norms 3 and 5: mean 4, half-width 12.7062 · √2 / √2 = 12.71; no barrier measured
    assert (
        "| IID | SGD, tasa 0.05, momento 0.9 | 2 | 125 | 4.00 ± 12.71 | 0.500 ± 0.000 | — |"
        in tables["deriva"]
    )
    assert (
        "| 95.00 ± 0.00 | 90.00 ± 12.71 | -5.00 [-17.71, +7.71], 0/2 | 0.1 | 91.50 ± 19.06 | "
        "+1.50 [-4.85, +7.85], 2/2 |"
    ) in tables["deriva_precision"]


def test_stale_rows_raise_naming_the_missing_columns():
    with pytest.raises(rt.StaleResults, match="lacks the columns seed"):
        rt.course_table([{"model": "fedavg", "accuracy": "0.9"}])
    with pytest.raises(rt.StaleResults, match="no rows"):
        rt.attack_tables([])


def test_attack_convergence_table_gives_the_last10_change_and_its_verdict_by_hand():
    def row(seed, method, change, diverged="False"):
        return {"partition": "dirichlet_0.3", "attack": "none", "malicious": "0", "seed": seed, "method": method,
                "change_last10": change, "diverged": diverged}

    rows = [row("1", "fedavg", "0.01"), row("2", "fedavg", "0.02"),
            row("1", "fedmed", "0.010"), row("2", "fedmed", "0.011"),
            row("1", "bulyan", "-0.10", "True"), row("2", "bulyan", "-0.05"),
            row("1", "trimmed", ""), row("2", "trimmed", "0.0"),
            row("1", "multikrum", "-0.011"), row("2", "multikrum", "-0.010")]

    table = rt.attack_convergence_table(rows)

    # FedAvg: +1 and +2 points, mean 1.50, half-width 12.7062 · 0.7071 / √2 = 6.35, contains 0: no mark.
    # FedMed: +1.0 and +1.1, half-width 12.7062 · 0.0707 / √2 = 0.64, excludes 0: still rising; Multi-Krum
    # the mirror image, still falling.
    assert ("| Dirichlet (α = 0.3) | ninguno | 0 | +1.50 ± 6.35 | +1.05 ± 0.64 (sube) | diverge en 1/2 | "
            "— (run demasiado corto) | -1.05 ± 0.64 (baja) |") in table
    one_seed = rt.attack_convergence_table([row("1", "fedavg", "0.01")])
    assert "| +1.00 (una semilla, sin intervalo) |" in one_seed
    assert "10 últimas rondas" in table
    with pytest.raises(rt.StaleResults, match="change_last10"):
        rt.attack_convergence_table([{k: v for k, v in rows[0].items() if k != "change_last10"}])


def _mcmahan_row(method, seed, first, held, mean, change, half="0.001", split="iid"):
    return {"split": split, "method": method, "seed": str(seed), "settings": "learning_rate=0.2",
            "rounds_run": "50", "first_99": first, "sustained_99": held, "mean_last10": mean, "min_last10": mean,
            "change_last10": change, "change_last10_half_width": half,
            "mb_per_client_to_first_99": f"{int(first) * 0.15616:.2f}" if first else "",
            "mb_per_client_to_sustained_99": f"{int(held) * 0.15616:.2f}" if held else "",
            "paper_rounds_to_99": "20"}


def test_mcmahan_tables_by_hand():
    rows = [_mcmahan_row("fedavg", 43, "20", "25", "0.990", "0.002"),
            _mcmahan_row("fedavg", 44, "22", "", "0.988", "0.004"),
            _mcmahan_row("fedavgm", 43, "14", "16", "0.991", "0.000"),
            _mcmahan_row("fedavgm", 44, "16", "18", "0.992", "0.000")]

    tables = rt.mcmahan_tables(rows)

    # FedAvg: both seeds reach 99 % (mean 21 ± t_{.975,1}·√2/√2 = 12.71), only one holds it
    assert "| IID | FedAvg | η_l = 0.2 | 21.0 ± 12.7 (20 / 22) | 25 / — | 98.90 ± 1.27 |" in tables["mcmahan"]
    # changes +0.2 and +0.4 points: mean 0.3 ± 12.71·0.1414/1.414 = 1.27, the interval contains zero
    # MB to the first 99 %: (20 + 22)/2 · 0.15616; none to the held one (a seed never holds it)
    assert "+0.30 ± 1.27 (sin cambio detectable) | 3.3 / — | 50 |" in tables["mcmahan"]
    assert "| IID | FedAvgM | η_l = 0.2 | 15.0 ± 12.7 (14 / 16) | 17.0 ± 12.7 (16 / 18) |" in tables["mcmahan"]
    assert "2.3 / 2.7 |" in tables["mcmahan"]  # (14 + 16)/2 · 0.15616 and (16 + 18)/2 · 0.15616
    assert "20 rondas IID" in tables["mcmahan"]
    # paired against FedAvg: +0.10 and +0.40 points; rounds −6 on both seeds (earlier in both); held: seed 43
    # shared (16 − 25 = −9), seed 44 held only by FedAvgM
    versus = tables["mcmahan_frente_fedavg"]
    assert "+0.25 [-1.66, +2.16], 2/2 | -6.0 [-6.0, -6.0], antes en 2/2 | -9.0, antes en 1/1 (solo A en 1) |" \
        in versus
    with pytest.raises(rt.StaleResults, match="sustained_99"):
        rt.mcmahan_tables([{k: v for k, v in rows[0].items() if k != "sustained_99"}])


def test_mcmahan_change_of_one_seed_uses_its_slope_interval_and_says_when_it_still_rises():
    rows = [_mcmahan_row("fedavg", 43, "", "", "0.985", "0.004", half="0.001")]

    table = rt.mcmahan_tables(rows)["mcmahan"]

    assert "| nunca | nunca | 98.50 | +0.40 ± 0.10 (sube) |" in table
    assert "mcmahan_frente_fedavg" not in rt.mcmahan_tables(rows)


def client_row(seed: str, final: str, mean: str, p10: str, worst: str, **keys) -> dict:
    """One run's row with the honest clients' columns (10 clients unless ``keys`` say otherwise)."""
    return {**RUN, "seed": seed, "final_accuracy": final, "client_mean_accuracy": mean,
            "client_p10_accuracy": p10, "client_worst_accuracy": worst, "honest_clients": "10", **keys}


# two seeds: a spread of 1, 2, 4 or 6 points gives a half-width of 12.7062 · spread / 2 = 6.35, 12.71, 25.41
# or 38.12 points


def test_heterogeneity_client_table_by_hand():
    rows = [client_row("1", "0.89", "0.88", "0.80", "0.75", partition="iid", method="fedavg"),
            client_row("2", "0.91", "0.90", "0.84", "0.75", partition="iid", method="fedavg"),
            client_row("1", "0.70", "0.60", "0.40", "0.10", partition="shards_2", method="fedavg"),
            client_row("2", "0.72", "0.66", "0.40", "0.12", partition="shards_2", method="fedavg",
                       diverged="True")]

    table = rt.heterogeneity_client_table(rows)

    assert "| IID | FedAvg | 90.00 ± 12.71 | 89.00 ± 12.71 | 82.00 ± 25.41 | 75.00 ± 0.00 |" in table
    assert ("| fragmentos (2 por cliente) | FedAvg | 71.00 ± 12.71 (diverge en 1/2) | 63.00 ± 38.12 | "
            "40.00 ± 0.00 | 11.00 ± 12.71 |") in table
    assert "datos propios de validación" in table.lower() and "re-ponderadas por las proporciones" in table
    assert "2 semillas (1, 2)" in table and "cuentan los 10 clientes" in table


def test_fedprox_mu_client_table_by_hand():
    rows = [client_row(seed, final, mean, p10, worst, mu=mu, partition="shards_2")
            for mu, seed, final, mean, p10, worst in (("0", "1", "0.80", "0.78", "0.50", "0.30"),
                                                      ("0", "2", "0.82", "0.80", "0.54", "0.36"),
                                                      ("0.1", "1", "0.85", "0.84", "0.70", "0.60"),
                                                      ("0.1", "2", "0.85", "0.84", "0.70", "0.60"))]

    table = rt.fedprox_mu_client_table(rows)

    assert "| 0 (FedAvg) | 81.00 ± 12.71 | 79.00 ± 12.71 | 52.00 ± 25.41 | 33.00 ± 38.12 |" in table
    assert "| 0.1 | 85.00 ± 0.00 | 84.00 ± 0.00 | 70.00 ± 0.00 | 60.00 ± 0.00 |" in table
    assert "partición fragmentos (2 por cliente)" in table


def test_attack_client_table_counts_only_the_honest_clients_by_hand():
    case = {"partition": "iid", "attack": "gaussian", "malicious": "2", "honest_clients": "8"}
    rows = [client_row("1", "0.10", "0.10", "0.10", "0.10", method="fedavg", diverged="True", **case),
            client_row("2", "0.12", "0.12", "0.11", "0.10", method="fedavg", **case),
            client_row("1", "0.95", "0.95", "0.92", "0.90", method="fedmed", **case),
            client_row("2", "0.97", "0.96", "0.92", "0.90", method="fedmed", **case)]

    table = rt.attack_client_table(rows)

    assert ("| IID | ruido gaussiano | 2 | 8 | FedAvg | 11.00 ± 12.71 (diverge en 1/2) | 11.00 ± 12.71 | "
            "10.50 ± 6.35 | 10.00 ± 0.00 | — |") in table
    # worst client, paired by seed with FedAvg's: 0.90 − 0.10 and 0.90 − 0.10, both seeds above
    assert ("| IID | ruido gaussiano | 2 | 8 | FedMed | 96.00 ± 12.71 | 95.50 ± 6.35 | 92.00 ± 0.00 | 90.00 ± 0.00 | "
            "+80.00 [+80.00, +80.00], 2/2 |") in table
    assert "los clientes maliciosos quedan fuera" in table


@pytest.mark.parametrize("table", [rt.heterogeneity_client_table, rt.fedprox_mu_client_table,
                                   rt.attack_client_table])
def test_client_tables_of_results_without_the_client_columns_are_stale(table):
    row = {**RUN, "seed": "1", "partition": "iid", "attack": "none", "malicious": "0", "method": "fedavg",
           "mu": "0", "final_accuracy": "0.9"}

    with pytest.raises(rt.StaleResults, match="client_mean_accuracy"):
        table([row])


def test_change_table_says_settled_only_when_the_interval_contains_zero_by_hand():
    def row(partition, method, seed, change, diverged="False"):
        return {"partition": partition, "method": method, "seed": seed, "change_last10": change, "diverged": diverged}

    rows = [row("iid", "fedavg", "1", "0.001"), row("iid", "fedavg", "2", "-0.001"),
            row("iid", "fedmed", "1", "0.010"), row("iid", "fedmed", "2", "0.012"),
            row("shards_2", "fedavg", "1", "0.5", diverged="True"), row("shards_2", "fedavg", "2", "0.1"),
            row("shards_2", "fedmed", "1", ""), row("shards_2", "fedmed", "2", "")]

    table = rt.change_table(rows, "h.csv", ("partition", "method"), ("partición", "método"),
                            lambda key: (partition_name(key[0]), method_name(key[1])))

    # ±0.1 points: mean 0, half-width 12.706·0.1414/√2 = 1.27 points
    assert "| IID | FedAvg | +0.00 ± 1.27 | sí |" in table
    # 1.0 and 1.2 points: mean 1.1 ± 12.706·0.1414/√2 = 1.27 → contains zero, settled
    assert "| IID | FedMed | +1.10 ± 1.27 | sí |" in table
    assert "| fragmentos (2 por cliente) | FedAvg | — | diverge |" in table
    assert "| fragmentos (2 por cliente) | FedMed | — | run demasiado corto |" in table
    rising = [row("iid", "fedavg", "1", "0.010"), row("iid", "fedavg", "2", "0.011")]
    assert "| +1.05 ± 0.64 | no: sube |" in rt.change_table(
        rising, "h.csv", ("partition", "method"), ("p", "m"), lambda key: key)
    with pytest.raises(rt.StaleResults, match="change_last10"):
        rt.change_table([{k: v for k, v in rows[0].items() if k != "change_last10"}], "h.csv",
                        ("partition", "method"), ("p", "m"), lambda key: key)


def ceiling_rows() -> list[dict]:
    settings = {"optimizer": "adam", "learning_rate": "0.001000", "batch_size": "32", "patience": "3",
                "max_epochs": "30", "train_images": "54000", "validation_images": "6000", "test_images": "10000"}
    return [  # listed out of seed order: the table sorts them
        {**settings, "seed": "2", "epochs_run": "10", "best_epoch": "7", "validation_accuracy": "0.991",
         "test_accuracy": "0.991", "ci_low": "0.9890", "ci_high": "0.9927", "test_loss": "0.05"},
        {**settings, "seed": "1", "epochs_run": "8", "best_epoch": "5", "validation_accuracy": "0.990",
         "test_accuracy": "0.989", "ci_low": "0.9867", "ci_high": "0.9910", "test_loss": "0.03"},
    ]


def test_ceiling_table_by_hand():
    # Prepare: test accuracies 0.989 and 0.991: mean 99.00, s = 0.1414 points, half-width 12.7062 · 0.1 = 1.27;
    # epochs 8 and 10: mean 9.0, s = √2, half-width 12.7062 · √2 / √2 = 12.7; validation 0.990, 0.991: ± 0.64
    rows = ceiling_rows()

    # Execute
    table = rt.ceiling_table(rows)

    # Assert
    lines = table.splitlines()
    assert lines[2] == "| 1 | 8 | 5 | 99.00 | 98.90 [98.67, 99.10] | 0.0300 |"
    assert lines[3] == "| 2 | 10 | 7 | 99.10 | 99.10 [98.90, 99.27] | 0.0500 |"
    assert lines[4] == "| media ± IC 95 % | 9.0 ± 12.7 | 6.0 ± 12.7 | 99.05 ± 0.64 | 99.00 ± 1.27 | 0.0400 |"
    assert "2 semillas (1, 2)" in table and "Adam, tasa 0.001, lote 32" in table
    assert "54 000 imágenes de entrenamiento" in table and "6 000 imágenes de entrenamiento apartadas" in table
    assert "tras 3 épocas sin que baje (como mucho 30 épocas)" in table
    assert "las 10 000 imágenes de test" in table


def test_ceiling_table_refuses_rows_without_its_columns():
    rows = [{k: v for k, v in r.items() if k != "best_epoch"} for r in ceiling_rows()]

    with pytest.raises(rt.StaleResults, match="best_epoch"):
        rt.ceiling_table(rows)


def _round(n, accuracy="", loss="0.5", sampled=10, replies=10):
    return {"round": str(n), "test_accuracy": accuracy, "train_loss": loss, "num_sampled": str(sampled),
            "num_replies": str(replies)}


def test_privacy_stability_table_by_hand():
    # Prepare: a 120-round run evaluated every 10 rounds: 92 % first at 20, lost at 40, held from 60; 95 % at
    # 100 and 120 (so held from 100); two replies lost in round 5 and one in round 110; a non-finite and
    # a huge mean training loss in rounds 90 and 115; a round with no reply has no loss
    accuracy = {10: 0.90, 20: 0.925, 30: 0.93, 40: 0.91, 50: 0.91, 60: 0.92, 70: 0.93, 80: 0.94, 90: 0.94,
                100: 0.95, 110: 0.96, 120: 0.955}
    metrics = [_round(n, str(accuracy.get(n, "")), loss) for n, loss in
               ((n, {90: "inf", 115: "1e12"}.get(n, "0.5")) for n in range(1, 121))]
    metrics[4] = _round(5, loss="0.3", replies=8)
    metrics[109] = _round(110, str(accuracy[110]), loss="0.4", replies=9)
    metrics[119] = _round(120, str(accuracy[120]), loss="", replies=0)
    row = {"clients": "100", "clients_per_round": "10", "target_epsilon": "8", "seed": "43"}
    asked = []

    def per_round(r):
        asked.append(r["seed"])
        return metrics

    # Execute
    table = rt.privacy_stability_table([row], per_round, at_round=60)
    untimed = rt.privacy_stability_table([row], per_round)

    # Assert: firsts and holds, accuracy at round 60, the slope of the last 100 rounds (10 evaluations),
    # 13 lost replies in 3 rounds (1 of them in the last 50), 2 unstable rounds (both late), first at 5
    import numpy as np

    rounds = np.arange(30, 121, 10)
    slope = np.polyfit(rounds, [accuracy[r] for r in rounds], 1)[0] * 100 * 100
    cells = [c.strip() for c in table.splitlines()[2].split("|")[1:-1]]
    assert cells == ["100 (10)", "8", "43", "20 / 60", "100 / 100", "92.00", f"{slope:+.2f}", "13 (3; 2)",
                     "2 (2)", "5", "0.50"]
    assert asked == ["43", "43"]
    assert "ronda 60" in table and "ronda 60" not in untimed and len(untimed.splitlines()[2].split("|")) == 12


def test_privacy_stability_table_refuses_metrics_without_its_columns():
    row = {"clients": "100", "clients_per_round": "10", "target_epsilon": "", "seed": "43"}

    with pytest.raises(rt.StaleResults, match="num_replies"):
        rt.privacy_stability_table([row], lambda r: [{"round": "1", "test_accuracy": "0.5", "train_loss": "1",
                                                       "num_sampled": "10"}])
