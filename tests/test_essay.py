"""The essay quotes only what the committed result files say."""

from __future__ import annotations

import csv
import dataclasses
import json
import re
from pathlib import Path

import pytest

from fedmnist.errors import ConfigError
from fedmnist.essay import TABLE_BLOCK, essay_tables, fill_essay_tables, render_tables, update_essay
from fedmnist.experiments import ENV_FILE, PROFILES

REPO = Path(__file__).resolve().parents[1]
ESSAY = REPO / "ensayo_aprendizaje_federado.md"
RESULTS = REPO / "resultados"
EXPECTED_TABLES = {"curso", "inicializacion", "techo", "deriva", "deriva_precision", "heterogeneidad",
                   "heterogeneidad_diferencias", "heterogeneidad_cambio", "heterogeneidad_peor_cliente",
                   "fedprox_mu", "fedprox_mu_cambio", "fedprox_mu_peor_cliente", "ajuste_mu", "ataques",
                   "ataques_diferencias", "ataques_convergencia", "ataques_peor_cliente", "mcmahan", "mcmahan_frente_fedavg",
                   "mcmahan_ajuste", "privacidad", "privacidad_ajuste", "privacidad_equipo",
                   "privacidad_estabilidad"}


@pytest.fixture(scope="module")
def essay() -> str:
    return ESSAY.read_text(encoding="utf-8")


def test_every_experiment_has_its_table_in_the_essay(essay):
    assert set(essay_tables(essay)) == EXPECTED_TABLES


@pytest.mark.parametrize("name", sorted(EXPECTED_TABLES))
def test_essay_table_matches_the_result_files(essay, name):
    # Prepare: the table as the committed CSV files give it
    expected = render_tables(RESULTS)

    # Assert
    assert name in expected, f"resultados/ has no data for table '{name}'"
    assert essay_tables(essay)[name] == expected[name]


def test_no_hand_written_tables_outside_the_generated_blocks(essay):
    outside = TABLE_BLOCK.sub("", essay)

    assert not [line for line in outside.splitlines() if line.lstrip().startswith("|")]


def test_figures_exist(essay):
    figures = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", essay)

    assert figures, "the essay shows no figure"
    for figure in figures:
        assert (ESSAY.parent / figure).is_file(), figure


def test_results_record_command_seeds_and_versions():
    env = json.loads((RESULTS / ENV_FILE).read_text())

    assert env["command"].startswith("fedmnist experiments")
    assert env["seeds"]
    assert {"tensorflow", "numpy", "python"} <= set(env["software"])


def test_results_come_from_the_committed_profile():
    # the recorded profile must be the one `fedmnist experiments --profile full` runs today
    env = json.loads((RESULTS / ENV_FILE).read_text())
    profile = json.loads(json.dumps(dataclasses.asdict(PROFILES[env["profile"]["name"]])))

    assert env["profile"] == profile


def test_fill_essay_tables_rewrites_stale_numbers():
    text = "a\n<!-- tabla:x -->\n| old |\n<!-- /tabla -->\nb"

    assert fill_essay_tables(text, {"x": "| new |"}) == "a\n<!-- tabla:x -->\n| new |\n<!-- /tabla -->\nb"


def test_fill_essay_tables_keeps_the_text_between_empty_blocks():
    text = "<!-- tabla:a -->\n<!-- /tabla -->\nprose\n<!-- tabla:b -->\n<!-- /tabla -->"

    filled = fill_essay_tables(text, {"a": "| A |", "b": "| B |"})

    assert filled == "<!-- tabla:a -->\n| A |\n<!-- /tabla -->\nprose\n<!-- tabla:b -->\n| B |\n<!-- /tabla -->"



def test_update_essay_rewrites_only_stale_tables_and_names_them(tmp_path):
    # Prepare: a copy of the essay whose privacy table holds an old number, and one untouched table
    essay = tmp_path / "ensayo.md"
    text = ESSAY.read_text(encoding="utf-8")
    stale = essay_tables(text)["privacidad_equipo"]
    essay.write_text(text.replace(stale, stale.replace("| sí |", "| quizá |", 1)), encoding="utf-8")

    # Execute
    changed = update_essay(essay, RESULTS)

    # Assert: only that table changed, and the essay is now the committed one again
    assert changed == ["privacidad_equipo"]
    assert essay.read_text(encoding="utf-8") == text
    assert update_essay(essay, RESULTS) == []


def test_update_essay_refuses_a_table_the_results_lack_and_leaves_the_essay(tmp_path):
    essay = tmp_path / "ensayo.md"
    text = "intro\n<!-- tabla:inventada -->\n| 1 |\n<!-- /tabla -->\n"
    essay.write_text(text, encoding="utf-8")

    with pytest.raises(ConfigError, match=r"ensayo\.md: the essay quotes table 'inventada'"):
        update_essay(essay, RESULTS)
    assert essay.read_text(encoding="utf-8") == text


def test_essay_command_updates_the_essay_and_reports_a_missing_one_in_one_line(tmp_path, capsys):
    from fedmnist.essay import main

    essay = tmp_path / "ensayo.md"
    essay.write_text(ESSAY.read_text(encoding="utf-8"), encoding="utf-8")

    assert main(["--essay", str(essay), "--results", str(RESULTS)]) == 0
    assert "0 table(s) updated" in capsys.readouterr().out
    assert main(["--essay", str(tmp_path / "missing.md"), "--results", str(RESULTS)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {tmp_path / 'missing.md'}: essay not found"]


def test_fedmnist_essay_is_the_same_command(tmp_path, capsys):
    from fedmnist.cli import main

    essay = tmp_path / "ensayo.md"
    text = ESSAY.read_text(encoding="utf-8")
    stale = re.sub(r"(<!-- tabla:[^>]+ -->\n)\|[^\n]*\n", r"\1| vieja |\n", text, count=1)
    assert stale != text
    essay.write_text(stale, encoding="utf-8")

    assert main(["essay", "--essay", str(essay), "--results", str(RESULTS)]) == 0
    assert "1 table(s) updated" in capsys.readouterr().out
    assert essay.read_text(encoding="utf-8") == text

TWO_DECIMALS = re.compile(r"(?<![\d.])\d+\.\d{2}(?![\d.])")


def _result_numbers(results: Path) -> set[str]:
    """Every number the result files hold, as the essay writes it: a fraction as a percentage, or as is."""
    numbers: set[str] = set()
    for path in results.rglob("*.csv"):
        for row in csv.reader(path.read_text(encoding="utf-8").splitlines()):
            for cell in row:
                for value in re.findall(r"-?\d+(?:\.\d+)?(?:e-?\d+)?", cell):
                    number = float(value)
                    numbers.update({f"{number * 100:.2f}", f"{number:.2f}"})
    return numbers


def _unknown_numbers(essay_text: str, results: Path) -> list[str]:
    """Two-decimal numbers of the prose (outside the generated tables) that neither a table nor a file gives."""
    prose = TABLE_BLOCK.sub("", essay_text)
    known = set(TWO_DECIMALS.findall("\n".join(render_tables(results).values()))) | _result_numbers(results)
    return sorted(set(TWO_DECIMALS.findall(prose)) - known)


def test_every_two_decimal_number_in_the_prose_comes_from_the_results(essay):
    unknown = _unknown_numbers(essay, RESULTS)

    assert not unknown, f"the essay quotes numbers no result file holds: {unknown}"


def test_the_prose_number_check_catches_an_invented_number(tmp_path):
    # Prepare: one result file with one accuracy
    (tmp_path / "x.csv").write_text("method,final_accuracy\nfedavg,0.9727\n", encoding="utf-8")
    text = "FedAvg obtuvo el 97.27 % y FedProx el 12.34 %.\n<!-- tabla:x -->\n| 55.55 |\n<!-- /tabla -->"

    # Assert: the file's number passes, the invented one is named, a table's own cell is not prose
    assert _unknown_numbers(text, tmp_path) == ["12.34"]


def _holm_survivors(family):
    """The labels of ``family`` (label → (a rows by seed, b rows by seed, column)) whose Holm-adjusted paired
    p-value is below 0.05."""
    from fedmnist.stats import holm, paired_p_value

    p = []
    for a, b, key in family.values():
        seeds = sorted(set(a) & set(b), key=int)
        p.append(paired_p_value([float(a[s][key]) for s in seeds], [float(b[s][key]) for s in seeds]))
    return {label for label, adjusted in zip(family, holm(p)) if adjusted < 0.05}


def test_the_holm_readings_the_essay_quotes_follow_from_the_csvs(essay):
    from fedmnist.experiments.common import read_csv

    attack = read_csv(RESULTS / "ataques.csv")

    def by_seed(case, method):
        return {r["seed"]: r for r in attack if (r["partition"], r["attack"], r["malicious"]) == case
                and r["method"] == method}

    cases = list(dict.fromkeys((r["partition"], r["attack"], r["malicious"]) for r in attack))
    rules = [m for m in dict.fromkeys(r["method"] for r in attack) if m != "fedavg"]
    table = {(c, m): (by_seed(c, m), by_seed(c, "fedavg"), "final_accuracy") for c in cases for m in rules}
    clean = {k: v for k, v in table.items() if k[0][1] == "none" and k[1] != "fedprox"}
    # §2: of the 8 clean prices, the 6 whose interval excludes zero survive; of the 25-cell table, 9 survive
    assert len(clean) == 8 and len(_holm_survivors(clean)) == 6
    assert len(table) == 25 and _holm_survivors(table) == (
        {(c, m) for c in cases if c[0] == "iid" and c[1] != "none" for m in rules if m != "fedprox"}
        | {(("dirichlet_0.3", "none", "0"), "multikrum")})
    assert "(25 comparaciones)" in essay and "las 6 cuyo intervalo excluye el cero" in essay
    # §3.6, the worst honest client without attackers: of the same 8 comparisons only IID's median and
    # Bulyan survive, so none of Dirichlet's (the summary's two included)
    worst = {k: (a, b, "client_worst_accuracy") for k, (a, b, _) in clean.items()}
    assert _holm_survivors(worst) == {(("iid", "none", "0"), "fedmed"), (("iid", "none", "0"), "bulyan")}
    prose = " ".join(essay.split())
    assert "sobre las 8 comparaciones del peor cliente sin atacantes" in prose
    assert "solo resisten las dos de IID (la mediana y Bulyan)" in prose
    assert "ninguna de esas dos diferencias resiste la corrección de Holm" in prose
    # §3.7: none of the six comparisons with the project's FedAvg survives
    mcmahan = read_csv(RESULTS / "mcmahan.csv")
    runs = {m: {r["seed"]: r for r in mcmahan if r["method"] == m and r["split"] == "iid"}
            for m in ("fedavg", "fedavgm", "fedadagrad")}
    six = {(m, key): (runs[m], runs["fedavg"], key) for m in ("fedavgm", "fedadagrad")
           for key in ("first_99", "sustained_99", "mean_last10")}
    assert len(six) == 6 and not _holm_survivors(six)
    assert "con la corrección de Holm sobre las seis" in essay
    # §3.7, 2 shards: of the two last-10-round comparisons with FedAvg only FedYogi's survives (the round
    # columns have no test: FedAvg reaches 99 % in one seed)
    shards = {m: {r["seed"]: r for r in mcmahan if r["method"] == m and r["split"] == "shards"}
              for m in ("fedavg", "scaffold", "fedyogi")}
    two = {m: (shards[m], shards["fedavg"], "mean_last10") for m in ("scaffold", "fedyogi")}
    assert _holm_survivors(two) == {"fedyogi"}
    from fedmnist.stats import holm, paired_p_value

    scaffold_p, yogi_p = holm([paired_p_value([float(shards[m][s]["mean_last10"]) for s in "43 44 45".split()],
                                              [float(shards["fedavg"][s]["mean_last10"]) for s in "43 44 45".split()])
                               for m in ("scaffold", "fedyogi")])
    assert (f"la de FedYogi resiste por poco (p ajustada {yogi_p:.3f}) y la de SCAFFOLD no ({scaffold_p:.3f})"
            in " ".join(essay.split()))


def test_the_attack_rows_last10_change_is_the_slope_of_their_committed_curves():
    # ataques_convergencia reads change_last10; each row's value must be recent_change of its own run's curve
    from fedmnist.curves import SETTLE_WINDOW, recent_change
    from fedmnist.experiments.common import read_csv

    rows = read_csv(RESULTS / "ataques.csv")
    checked = 0
    for r in rows:
        if r["diverged"] == "True":
            continue
        name = f"ataques_{r['partition']}_{r['attack']}_{r['malicious']}_s{r['seed']}"
        curve = {int(c["round"]): float(c["test_accuracy"])
                 for c in read_csv(RESULTS / "simulaciones" / name / "metricas_por_ronda.csv")
                 if c["method"] == r["method"] and c["test_accuracy"] != ""}
        assert float(r["change_last10"]) == pytest.approx(recent_change(curve, SETTLE_WINDOW), abs=1e-6), name
        checked += 1
    assert checked >= 130


def test_each_privacy_tuning_choice_is_inside_its_clip_grid_as_the_essay_says(essay):
    # §3.8: "los dos recortes elegidos quedan dentro de la rejilla"; the chosen clip factor of every ε has a
    # tried neighbour on each side, at the chosen momentum, and each ε's best is the chosen row
    from fedmnist.experiments.common import read_csv

    def parse_settings(text):
        return {k: float(v) for k, v in (item.split("=", 1) for item in text.split())}

    assert "los dos recortes elegidos quedan dentro de la rejilla" in " ".join(essay.split())
    rows = [r for r in read_csv(RESULTS / "privacidad_ajuste.csv") if r["stage"] == "dp"]
    targets = sorted({r["target_epsilon"] for r in rows})
    assert len(targets) == 2
    momenta = set()
    for target in targets:
        sel = [dict(r, **{"parsed": parse_settings(r["settings"])}) for r in rows if r["target_epsilon"] == target]
        chosen = [r for r in sel if r["chosen"] == "True"]
        assert len(chosen) == 1 and float(chosen[0]["score"]) == max(float(r["score"]) for r in sel)
        clip, momentum = chosen[0]["parsed"]["clip_factor"], chosen[0]["parsed"]["server_momentum"]
        tried = sorted(r["parsed"]["clip_factor"] for r in sel if r["parsed"]["server_momentum"] == momentum)
        assert tried[0] < clip < tried[-1], (target, clip, tried)
        momenta.add((momentum, min(r["parsed"]["server_momentum"] for r in sel)))
    # and the momentum: the essay says whether the chosen one is the smallest tried (an edge) in both ε
    at_edge = all(chosen == smallest for chosen, smallest in momenta)
    assert ("es en cambio el menor de los probados en los dos ε" in " ".join(essay.split())) == at_edge


def test_the_private_runs_instability_the_essay_counts_follows_from_their_curves(essay):
    # §3.8 on K = 1,000, ε = 8: the ranges of lost replies, unstable rounds (all and the last 50) and the
    # first round with either come from privacidad_estabilidad; every lost reply's recorded cause is a
    # diverged local training; at ε = 2 none is lost and at most one round per seed is unstable
    from fedmnist.experiments.common import read_csv

    table = render_tables(RESULTS)["privacidad_estabilidad"]
    cells = [[c.strip() for c in line.split("|")[1:-1]] for line in table.splitlines()[2:] if line.startswith("| 1000")]
    eps8 = [c for c in cells if c[1] == "8"]
    eps2 = [c for c in cells if c[1] == "2"]
    assert len(eps8) == len(eps2) == 3

    def numbers(cell):
        return [int(n) for n in re.findall(r"\d+", cell)]

    lost = [numbers(c[7]) for c in eps8]
    unstable = [numbers(c[8]) for c in eps8]
    prose = " ".join(essay.split())
    assert f"entre {min(n[0] for n in lost)} y {max(n[0] for n in lost)} (según la semilla) se pierden" in prose
    assert f"en {min(n[0] for n in unstable)} a {max(n[0] for n in unstable)} rondas la pérdida" in prose
    assert f"(de {min(n[1] for n in unstable)} a {max(n[1] for n in unstable)} de las 50 últimas rondas" in prose
    assert f"y de {min(n[2] for n in lost)} a {max(n[2] for n in lost)} algún descarte" in prose
    assert "Ninguna de las dos cosas ocurre antes de la ronda 160" in prose
    assert min(int(c[9]) for c in eps8) >= 160
    assert all(numbers(c[7])[0] == 0 and numbers(c[8])[0] <= 1 for c in eps2)
    assert "ninguna respuesta se descarta y solo una o ninguna ronda" in prose
    causes = [cause for seed in (43, 44, 45)
              for r in read_csv(RESULTS / "simulaciones" / f"privacidad_K1000_eps8_s{seed}" / "metricas_por_ronda.csv")
              for cause in r["failed"].split(" | ") if cause]
    assert sum(n[0] for n in lost) == len(causes)
    assert all("DivergedError" in cause for cause in causes)


def test_privacy_stability_table_is_left_out_while_a_run_lacks_its_metrics(tmp_path, caplog):
    # Prepare: privacidad.csv without the run folders it names
    (tmp_path / "privacidad.csv").write_bytes((RESULTS / "privacidad.csv").read_bytes())

    # Execute
    tables = render_tables(tmp_path)

    # Assert: the privacy table is drawn, the per-run one is not, and the warning names the missing file
    assert "privacidad" in tables and "privacidad_estabilidad" not in tables
    assert "metricas_por_ronda.csv is missing" in caplog.text and "privacidad_K100_ref_s43" in caplog.text
