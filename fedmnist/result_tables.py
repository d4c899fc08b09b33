"""Markdown tables of the essay's multi-seed experiments, from the rows of their result CSVs.

Cells give the mean over seeds ± the half-width of its 95 % Student-t interval, in percent for
accuracies; comparisons between methods are paired by seed (``fedmnist.stats.paired_comparison``):
the mean difference in points, its 95 % interval in brackets, and in how many seeds the row's method
wins. A result file written by an older version of the experiments lacks some columns: the table
functions raise ``StaleResults`` naming them, and ``fedmnist.essay.render_tables`` skips it. The
privacy tables list every seed and give no interval. The ``*_peor_cliente`` tables say how the honest
clients fare on their own data under the final model (mean, 10th percentile and worst client,
``fedmnist.experiments.common.client_columns``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from fedmnist.experiments.common import CLIENT_COLUMNS
from fedmnist.labels import attack_name, method_name, optimizer_name, partition_name
from fedmnist.stats import format_mean_interval, format_paired, mean_interval, paired_comparison

Rows = Sequence[Mapping[str, str]]
CI_NOTE = "media ± semiamplitud del intervalo de confianza del 95 % (t de Student) entre semillas"
PAIRED_NOTE = (
    "diferencias A − B emparejadas por semilla, en puntos: media [IC 95 %] y semillas en que A supera a B"
)


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _images(count) -> str:
    """``10 000 imágenes`` (Spanish thousands separator)."""
    return f"{int(float(count)):,}".replace(",", " ") + " imágenes"


def _plural(count, word: str, plural: str) -> str:
    return f"{count} {word if int(count) == 1 else plural}"


class StaleResults(ValueError):
    """A result file lacks columns the current tables need (it was written by an older version)."""


def _need(rows: Rows, name: str, columns: Sequence[str]) -> None:
    if not rows:
        raise StaleResults(f"{name} has no rows")
    missing = [c for c in columns if c not in rows[0]]
    if missing:
        raise StaleResults(
            f"{name} lacks the columns {', '.join(missing)}: regenerate it with fedmnist experiments"
        )


def _ci(values: Sequence[float], scale: float = 100.0, digits: int = 2) -> str:
    return format_mean_interval(mean_interval([float(v) for v in values]), scale, digits)


def _true(value) -> bool:
    return str(value) == "True"


def _by_seed(rows: Rows, key: str = "final_accuracy") -> dict[str, float]:
    return {r["seed"]: float(r[key]) for r in rows}


def _paired(a: Mapping[str, float], b: Mapping[str, float]) -> str:
    seeds = sorted(set(a) & set(b), key=int)
    if not seeds:
        return "—"
    return format_paired(paired_comparison([a[s] for s in seeds], [b[s] for s in seeds]))


def _accuracy_cell(rows: Rows, key: str = "final_accuracy") -> str:
    """Mean ± interval, with how many seeds diverged (non-finite test loss) when any did."""
    text = _ci([float(r[key]) for r in rows])
    diverged = sum(_true(r.get("diverged")) for r in rows)
    return f"{text} (diverge en {diverged}/{len(rows)})" if diverged else text


def _seeds(rows: Rows) -> str:
    seeds = sorted({r["seed"] for r in rows}, key=int)
    return f"{len(seeds)} semillas ({', '.join(seeds)})"


def _mean_loss(rows: Rows, key: str) -> str:
    values = [float(r[key]) for r in rows]
    return f"{sum(values) / len(values):.4f}" if all(math.isfinite(v) for v in values) else "no finita"


def course_table(rows: Rows) -> str:
    """``curso``: every global model, the central model and the locals' mean, against FedAvg."""
    _need(
        rows,
        "curso.csv",
        (
            "seed",
            "model",
            "accuracy",
            "loss",
            "mu",
            "optimizer",
            "learning_rate",
            "momentum",
            "epochs",
            "batch_size",
            "train_images",
            "test_images",
        ),
    )
    locals_ = {}
    for seed in {r["seed"] for r in rows}:
        sel = [r for r in rows if r["seed"] == seed and r["model"].startswith("local_")]
        locals_[seed] = {
            "seed": seed,
            "accuracy": sum(float(r["accuracy"]) for r in sel) / len(sel),
            "loss": sum(float(r["loss"]) for r in sel) / len(sel),
        }
    fedavg = _by_seed([r for r in rows if r["model"] == "fedavg"], "accuracy")
    lines = [
        "| modelo | precisión (%), media ± IC 95 % | pérdida media | diferencia con FedAvg (puntos) |",
        "|---|---|---|---|",
    ]
    names = [m for m in dict.fromkeys(r["model"] for r in rows) if not m.startswith("local_")]
    groups = [(n, [r for r in rows if r["model"] == n]) for n in names] + [
        ("locales", list(locals_.values()))
    ]
    for name, sel in groups:
        label = {
            "central": "Central (mismas épocas, todos los datos)",
            "locales": "Modelos locales (media de los 5)",
        }.get(name, method_name(name))
        if name == "fedprox":
            label += f" (μ = {float(sel[0]['mu']):g})"
        diff = "—" if name == "fedavg" else _paired(_by_seed(sel, "accuracy"), fedavg)
        lines.append(
            f"| {label} | {_ci([r['accuracy'] for r in sel])} | {_mean_loss(sel, 'loss')} | {diff} |"
        )
    first = rows[0]
    training = optimizer_name(first["optimizer"], float(first["learning_rate"]), float(first["momentum"]))
    return "\n".join(lines) + (
        f"\n\n{_cap(CI_NOTE)}: {_seeds(rows)}; {PAIRED_NOTE}. Entrenamiento local: {training}, "
        f"{_plural(first['epochs'], 'época', 'épocas')}, lote {first['batch_size']}, con el 10 % de cada "
        f"parte reservado para validación; {_images(first['train_images'])} de entrenamiento y "
        f"{_images(first['test_images'])} de test; μ de FedProx elegido en validación (tabla ajuste_mu)."
    )


def initialisation_table(rows: Rows) -> str:
    """``inicializacion``: one-shot FedAvg of clients from a shared start versus independent starts."""
    _need(rows, "inicializacion.csv", ("seed", "init", "accuracy"))
    labels = list(dict.fromkeys(r["init"] for r in rows))
    shared = _by_seed([r for r in rows if r["init"] == labels[0]], "accuracy")
    lines = [
        "| inicialización de los clientes | precisión de FedAvg en una ronda (%), media ± IC 95 % | "
        f"diferencia con la {labels[0]} (puntos) |",
        "|---|---|---|",
    ]
    for label in labels:
        sel = [r for r in rows if r["init"] == label]
        diff = "—" if label == labels[0] else _paired(_by_seed(sel, "accuracy"), shared)
        lines.append(f"| {label} | {_ci([r['accuracy'] for r in sel])} | {diff} |")
    return "\n".join(lines) + f"\n\n{_cap(CI_NOTE)}: {_seeds(rows)}; {PAIRED_NOTE}."


def _setting_note(rows: Rows) -> str:
    first = rows[0]
    images = (
        f"{_images(first['train_images'])} de entrenamiento"
        if first["train_images"]
        else "todo el conjunto de entrenamiento"
    )
    every = "cada ronda" if int(first["eval_every"]) == 1 else f"cada {first['eval_every']} rondas"
    return (
        f"{first['clients']} clientes (todos en cada ronda) con {images}, {first['rounds']} rondas de "
        f"{_plural(first['local_epochs'], 'época local', 'épocas locales')}; precisión en las "
        f"{_images(first['test_images'])} de test (evaluadas {every} y en la última)"
    )


RUN_COLUMNS = (
    "seed",
    "final_accuracy",
    "diverged",
    "clients",
    "train_images",
    "test_images",
    "local_epochs",
    "eval_every",
    "rounds",
)


def heterogeneity_tables(rows: Rows) -> dict[str, str]:
    """``heterogeneidad`` (final accuracy per split and method) and ``heterogeneidad_diferencias``."""
    _need(rows, "heterogeneidad.csv", ("partition", "method", "mu", *RUN_COLUMNS))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    partitions = list(dict.fromkeys(r["partition"] for r in rows))
    main = [
        "| partición | " + " | ".join(method_name(m) for m in methods) + " | μ de FedProx (validación) |",
        "|---|" + "---|" * (len(methods) + 1),
    ]
    others = [m for m in methods if m != "fedavg"]
    diffs = [
        "| partición | " + " | ".join(f"{method_name(m)} − FedAvg" for m in others) + " |",
        "|---|" + "---|" * len(others),
    ]
    for part in partitions:
        sel = {m: [r for r in rows if r["partition"] == part and r["method"] == m] for m in methods}
        mu = next((f"{float(r['mu']):g}" for r in sel.get("fedprox", [])), "—")
        main.append(
            f"| {partition_name(part)} | "
            + " | ".join(_accuracy_cell(sel[m]) for m in methods)
            + f" | {mu} |"
        )
        diffs.append(
            f"| {partition_name(part)} | "
            + " | ".join(_paired(_by_seed(sel[m]), _by_seed(sel["fedavg"])) for m in others)
            + " |"
        )
    note = f"\n\nPrecisión final (%): {CI_NOTE}, {_seeds(rows)}. {_setting_note(rows)}."
    return {
        "heterogeneidad": "\n".join(main) + note,
        "heterogeneidad_diferencias": "\n".join(diffs) + f"\n\n{_cap(PAIRED_NOTE)}.",
    }


def _last10_change(sel: Rows) -> tuple[str, str]:
    """A setting's last-10-round change across seeds (cell text) and whether it has settled (verdict)."""
    from fedmnist.curves import settled

    if any(_true(r["diverged"]) for r in sel):
        return "—", "diverge"
    if any(r["change_last10"] == "" for r in sel):
        return "—", "run demasiado corto"
    change = mean_interval([float(r["change_last10"]) for r in sel])
    verdict = settled(change)
    word = "sin intervalo (una semilla)" if verdict is None else (
        "sí" if verdict else f"no: {'sube' if change.mean > 0 else 'baja'}")
    spread = "" if math.isnan(change.half_width) else f" ± {change.half_width * 100:.2f}"
    return f"{change.mean * 100:+.2f}{spread}", word


CHANGE_NOTE = (
    "pendiente de mínimos cuadrados de la precisión de test en las rondas evaluadas de las 10 últimas × 10"
)


def change_table(rows: Rows, name: str, keys: Sequence[str], headers: Sequence[str], labels) -> str:
    """``*_cambio``: each setting's change over its last 10 rounds, across seeds, and whether it has settled.

    ``keys`` are the CSV columns that identify a setting, ``headers`` their column titles and ``labels``
    turns a setting's key values into its cells. A diverged run's change is not a trend: such settings say so.
    """
    _need(rows, name, (*keys, "seed", "change_last10", "diverged"))
    lines = ["| " + " | ".join(headers) + " | cambio en las 10 últimas rondas (puntos) | ¿sin cambio detectable? |",
             "|" + "---|" * (len(headers) + 2)]
    for key in dict.fromkeys(tuple(r[k] for k in keys) for r in rows):
        sel = [r for r in rows if tuple(r[k] for k in keys) == key]
        lines.append("| " + " | ".join([*labels(key), *_last10_change(sel)]) + " |")
    return "\n".join(lines) + (
        f"\n\nCambio: {CHANGE_NOTE}; {CI_NOTE}, {_seeds(rows)}. «Sí» si el intervalo contiene el cero (con pocas "
        "semillas es ancho: no prueba una curva plana); si no, la curva aún sube (o baja) y su precisión final no "
        "es un nivel alcanzado."
    )


def fedprox_mu_table(rows: Rows) -> str:
    """``fedprox_mu``: final accuracy per μ, the last evaluated rounds' mean, the difference with μ = 0."""
    _need(rows, "fedprox_mu.csv", ("mu", "partition", "mean_last3_evaluated_accuracy", *RUN_COLUMNS))
    mus = list(dict.fromkeys(r["mu"] for r in rows))
    base = _by_seed([r for r in rows if float(r["mu"]) == 0])
    lines = [
        "| μ | precisión final (%) | media de las 3 últimas rondas evaluadas (%) | diferencia con μ = 0 "
        "(FedAvg), puntos |",
        "|---|---|---|---|",
    ]
    for mu in mus:
        sel = [r for r in rows if r["mu"] == mu]
        diff = "—" if float(mu) == 0 or not base else _paired(_by_seed(sel), base)
        lines.append(
            f"| {mu}{' (FedAvg)' if float(mu) == 0 else ''} | {_accuracy_cell(sel)} | "
            f"{_ci([r['mean_last3_evaluated_accuracy'] for r in sel])} | {diff} |"
        )
    return "\n".join(lines) + (
        f"\n\nPartición {partition_name(rows[0]['partition'])}; {CI_NOTE}, {_seeds(rows)}; "
        f"{PAIRED_NOTE}. {_setting_note(rows)}."
    )


def attack_tables(rows: Rows) -> dict[str, str]:
    """``ataques`` (final accuracy per case and method) and ``ataques_diferencias`` (against FedAvg)."""
    _need(rows, "ataques.csv", ("partition", "attack", "malicious", "method", "mu", "krum_f", *RUN_COLUMNS))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    others = [m for m in methods if m != "fedavg"]
    head = "| partición | ataque | maliciosos | "
    main = [
        head + " | ".join(method_name(m) for m in methods) + " |",
        "|---|---|---|" + "---|" * len(methods),
    ]
    diffs = [
        head + " | ".join(f"{method_name(m)} − FedAvg" for m in others) + " |",
        "|---|---|---|" + "---|" * len(others),
    ]
    cases = list(dict.fromkeys((r["partition"], r["attack"], r["malicious"]) for r in rows))
    for case in cases:
        sel = {
            m: [r for r in rows if (r["partition"], r["attack"], r["malicious"]) == case and r["method"] == m]
            for m in methods
        }
        lead = f"| {partition_name(case[0])} | {attack_name(case[1])} | {case[2]} | "
        main.append(lead + " | ".join(_accuracy_cell(sel[m]) if sel[m] else "—" for m in methods) + " |")
        if sel.get("fedavg"):
            diffs.append(
                lead
                + " | ".join(
                    _paired(_by_seed(sel[m]), _by_seed(sel["fedavg"])) if sel[m] else "—" for m in others
                )
                + " |"
            )
    mus = {r["partition"]: f"{float(r['mu']):g}" for r in rows if r["method"] == "fedprox"}
    mu_note = (
        (
            "; μ de FedProx elegido en validación sin atacantes: "
            + ", ".join(f"{partition_name(p)} {m}" for p, m in mus.items())
        )
        if mus
        else ""
    )
    robust = [method_name(m) for m in methods if m in ("krum", "multikrum", "bulyan")]
    f_note = f"; {', '.join(robust)} con f = {rows[0]['krum_f']}" if robust else ""
    note = (
        f"\n\nPrecisión final (%): {CI_NOTE}, {_seeds(rows)}; «diverge»: semillas cuyo modelo final tiene "
        f"una pérdida de test no finita o mayor que 1000 (los pesos se disparan; un modelo al azar tiene "
        f"ln 10 ≈ 2.3). {_setting_note(rows)}{f_note}{mu_note}."
    )
    return {
        "ataques": "\n".join(main) + note,
        "ataques_diferencias": "\n".join(diffs) + f"\n\n{_cap(PAIRED_NOTE)}.",
    }


CLIENT_HEAD = ("test común (%) | clientes honestos, datos propios: media (%) | percentil 10 (%) | "
               "peor cliente (%) |")
CLIENT_NOTE = (
    "«Datos propios de validación» de un cliente: las imágenes de test re-ponderadas por las proporciones de "
    "etiquetas de sus datos de entrenamiento, es decir, la precisión esperada exacta con datos nuevos de su "
    "distribución (sin ruido de muestreo; válido porque las particiones solo sesgan las etiquetas y todas las "
    "imágenes de una clase vienen del mismo conjunto); percentil 10 con interpolación lineal entre los "
    "clientes honestos de cada ejecución; peor cliente: su mínimo"
)


def _client_cells(rows: Rows) -> str:
    """Test accuracy, then the honest clients' mean, 10th percentile and worst, each across seeds."""
    return f"{_accuracy_cell(rows)} | " + " | ".join(
        _ci([r[key] for r in rows]) for key in CLIENT_COLUMNS[:3]) + " |"


def _honest(rows: Rows) -> str:
    return "/".join(sorted({r["honest_clients"] for r in rows}, key=int))


def _client_note(rows: Rows, who: str) -> str:
    return (f"\n\nPrecisión (%) del modelo global final: {CI_NOTE}, {_seeds(rows)}. {CLIENT_NOTE}; {who}. En el "
            f"test común todos los clientes ven el mismo modelo (la precisión final de la tabla principal). "
            f"{_setting_note(rows)}")


def heterogeneity_client_table(rows: Rows) -> str:
    """``heterogeneidad_peor_cliente``: per split and method, how the clients fare on their own data."""
    _need(rows, "heterogeneidad.csv", ("partition", "method", *CLIENT_COLUMNS, *RUN_COLUMNS))
    lines = ["| partición | método | " + CLIENT_HEAD, "|---|---|---|---|---|---|"]
    for part in dict.fromkeys(r["partition"] for r in rows):
        for method in dict.fromkeys(r["method"] for r in rows):
            sel = [r for r in rows if r["partition"] == part and r["method"] == method]
            if sel:
                lines.append(f"| {partition_name(part)} | {method_name(method)} | {_client_cells(sel)}")
    return "\n".join(lines) + _client_note(rows, f"sin atacantes, cuentan los {_honest(rows)} clientes") + "."


def fedprox_mu_client_table(rows: Rows) -> str:
    """``fedprox_mu_peor_cliente``: per μ, how the clients fare on their own data."""
    _need(rows, "fedprox_mu.csv", ("mu", "partition", *CLIENT_COLUMNS, *RUN_COLUMNS))
    lines = ["| μ | " + CLIENT_HEAD, "|---|---|---|---|---|"]
    for mu in dict.fromkeys(r["mu"] for r in rows):
        sel = [r for r in rows if r["mu"] == mu]
        lines.append(f"| {mu}{' (FedAvg)' if float(mu) == 0 else ''} | {_client_cells(sel)}")
    who = f"sin atacantes, cuentan los {_honest(rows)} clientes"
    return "\n".join(lines) + _client_note(rows, who) + f"; partición {partition_name(rows[0]['partition'])}."


def attack_client_table(rows: Rows) -> str:
    """``ataques_peor_cliente``: per attack case and method, how the honest clients fare on their own data.

    The last column pairs each rule's worst honest client with FedAvg's, seed by seed: what the rule
    costs (or saves) the client it serves worst.
    """
    _need(rows, "ataques.csv", ("partition", "attack", "malicious", "method", *CLIENT_COLUMNS, *RUN_COLUMNS))
    lines = ["| partición | ataque | maliciosos | clientes honestos | método | " + CLIENT_HEAD
             + " peor cliente − FedAvg (puntos) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    worst = "client_worst_accuracy"
    for case in dict.fromkeys((r["partition"], r["attack"], r["malicious"]) for r in rows):
        in_case = [r for r in rows if (r["partition"], r["attack"], r["malicious"]) == case]
        base = _by_seed([r for r in in_case if r["method"] == "fedavg"], worst)
        for method in methods:
            sel = [r for r in in_case if r["method"] == method]
            if sel:
                diff = "—" if method == "fedavg" else _paired(_by_seed(sel, worst), base)
                lines.append(f"| {partition_name(case[0])} | {attack_name(case[1])} | {case[2]} | {_honest(sel)} | "
                             f"{method_name(method)} | {_client_cells(sel)} {diff} |")
    who = "los clientes maliciosos quedan fuera de la media, el percentil y el peor"
    return "\n".join(lines) + _client_note(rows, who) + (
        f"; «diverge»: como en la tabla de precisión final. Última columna: {PAIRED_NOTE}, del peor cliente honesto."
    )


def attack_convergence_table(rows: Rows) -> str:
    """``ataques_convergencia``: each rule's change of test accuracy over the last 10 rounds, per attack case.

    A change whose interval contains zero says the rule has settled within the rounds run; one that
    excludes it is marked (sube / baja): that rule's final accuracy in ``ataques`` is a point on a curve
    still moving, not a level reached.
    """
    _need(rows, "ataques.csv", ("partition", "attack", "malicious", "method", "seed", "change_last10", "diverged"))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    lines = [
        "| partición | ataque | maliciosos | " + " | ".join(method_name(m) for m in methods) + " |",
        "|---|---|---|" + "---|" * len(methods),
    ]
    for case in dict.fromkeys((r["partition"], r["attack"], r["malicious"]) for r in rows):
        cells = []
        for m in methods:
            sel = [r for r in rows if (r["partition"], r["attack"], r["malicious"]) == case and r["method"] == m]
            if not sel:
                cells.append("—")
                continue
            text, word = _last10_change(sel)
            if word == "diverge":
                text = f"diverge en {sum(_true(r['diverged']) for r in sel)}/{len(sel)}"
            elif word.startswith("no: "):
                text = f"{text} ({word[4:]})"
            elif word != "sí":
                text = f"{text} ({'una semilla, sin intervalo' if word.startswith('sin intervalo') else word})"
            cells.append(text)
        lines.append(f"| {partition_name(case[0])} | {attack_name(case[1])} | {case[2]} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + (
        f"\n\nCambio de la precisión de test (puntos) en las 10 últimas rondas: {CHANGE_NOTE}; {CI_NOTE}, "
        f"{_seeds(rows)}. «(sube)» o «(baja)»: el intervalo excluye el cero, la regla no se ha estabilizado y su "
        "precisión final no es un nivel alcanzado; sin marca, no se detecta cambio (con pocas semillas el intervalo "
        "es ancho: no prueba una curva plana); «diverge»: como en la tabla de precisión final."
    )


def drift_tables(rows: Rows) -> dict[str, str]:
    """``deriva`` (the drift measures) and ``deriva_precision`` (locals, one-shot FedAvg, FedProx)."""
    _need(
        rows,
        "deriva.csv",
        (
            "seed",
            "partition",
            "optimizer",
            "learning_rate",
            "momentum",
            "epochs",
            "local_steps",
            "update_norm",
            "update_cosine",
            "barrier",
            "barrier_images",
            "locals_accuracy",
            "fedavg_accuracy",
            "mu",
            "fedprox_accuracy",
            "clients",
            "images_per_client",
            "test_images",
        ),
    )
    keys = list(
        dict.fromkeys(
            (r["partition"], r["optimizer"], r["learning_rate"], r["momentum"], r["epochs"]) for r in rows
        )
    )
    measures = [
        "| partición | entrenamiento local | E | pasos locales | ‖wₖ − w₀‖ | coseno entre actualizaciones | "
        "barrera de pérdida |",
        "|---|---|---|---|---|---|---|",
    ]
    accuracy = [
        "| partición | entrenamiento local | E | locales (%) | FedAvg (%) | FedAvg − locales | μ | "
        "FedProx (%) | FedProx − FedAvg |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for key in keys:
        sel = [
            r
            for r in rows
            if (r["partition"], r["optimizer"], r["learning_rate"], r["momentum"], r["epochs"]) == key
        ]
        training = optimizer_name(key[1], float(key[2]), float(key[3]))
        lead = f"| {partition_name(key[0])} | {training} | {key[4]} | "
        barriers = [r["barrier"] for r in sel if math.isfinite(float(r["barrier"]))]
        measures.append(
            lead + f"{float(sel[0]['local_steps']):.0f} | {_ci([r['update_norm'] for r in sel], 1)} | "
            f"{_ci([r['update_cosine'] for r in sel], 1, 3)} | "
            f"{_ci(barriers, 1, 3) if barriers else '—'} |"
        )
        accuracy.append(
            lead
            + f"{_ci([r['locals_accuracy'] for r in sel])} | {_ci([r['fedavg_accuracy'] for r in sel])} | "
            f"{_paired(_by_seed(sel, 'fedavg_accuracy'), _by_seed(sel, 'locals_accuracy'))} | "
            f"{float(sel[0]['mu']):g} | {_ci([r['fedprox_accuracy'] for r in sel])} | "
            f"{_paired(_by_seed(sel, 'fedprox_accuracy'), _by_seed(sel, 'fedavg_accuracy'))} |"
        )
    first = rows[0]
    setting = (
        f"{first['clients']} clientes de {float(first['images_per_client']):.0f} imágenes, una ronda desde "
        f"un mismo punto de partida; {CI_NOTE}, {_seeds(rows)}"
    )
    return {
        "deriva": "\n".join(measures)
        + (
            f"\n\n{setting}. Barrera: el máximo, a lo largo del segmento entre dos clientes (1-2 y 3-4), "
            "de la pérdida menos la recta entre sus extremos, en las primeras "
            f"{_images(first['barrier_images'])} de test."
        ),
        "deriva_precision": "\n".join(accuracy)
        + (
            f"\n\n{setting}; precisión en las {_images(first['test_images'])} de test; «locales»: la media "
            f"de los modelos locales de cada semilla; {PAIRED_NOTE}; μ de FedProx elegido en validación para "
            "cada fila."
        ),
    }


def tuning_table(rows: Rows) -> str:
    """``ajuste_mu``: every setting's FedProx candidates with their validation accuracy, and the choice."""
    _need(
        rows,
        "*_ajuste_mu.csv",
        ("experiment", "setting", "mu", "score", "chosen", "validation_images", "rounds"),
    )
    names = {
        "curso": "Flujo del curso",
        "heterogeneidad": "Heterogeneidad",
        "ataques": "Ataques (sin atacantes)",
    }
    lines = [
        "| experimento | partición | rondas | precisión de validación (%) por μ | μ elegido |",
        "|---|---|---|---|---|",
    ]
    for key in dict.fromkeys((r["experiment"], r["setting"]) for r in rows):
        sel = [r for r in rows if (r["experiment"], r["setting"]) == key]
        scores = " · ".join(f"{float(r['mu']):g}: {float(r['score']) * 100:.2f}" for r in sel)
        chosen = next(f"{float(r['mu']):g}" for r in sel if _true(r["chosen"]))
        lines.append(
            f"| {names.get(key[0], key[0])} | {partition_name(key[1])} | {sel[0]['rounds']} | {scores} | "
            f"{chosen} |"
        )
    return "\n".join(lines) + (
        f"\n\nValidación: {_images(rows[0]['validation_images'])} de entrenamiento apartadas (primera "
        "semilla); cada candidato entrena FedProx con el resto y puntúa la media de la precisión de "
        "validación en las dos últimas rondas evaluadas (en una ronda, la de esa ronda)."
    )


def _pct(value: str | float) -> str:
    return f"{float(value) * 100:.2f}"


_SETTING_SYMBOLS = {"learning_rate": "η_l", "mu": "μ", "server_lr": "η_s", "server_momentum": "β", "tau": "τ",
                    "beta_1": "β₁", "beta_2": "β₂", "clip_factor": "S / mediana de ‖Δ‖"}


def _settings_label(text: str) -> str:
    """``learning_rate=0.2 mu=0.001`` as ``η_l = 0.2, μ = 0.001`` for the essay's tables."""
    pairs = [item.split("=", 1) for item in text.split()]
    return ", ".join(f"{_SETTING_SYMBOLS.get(k, k)} = {v}" for k, v in pairs) or "—"


def split_label(split: str) -> str:
    """The Spanish name of a McMahan split (``iid``, ``shards``)."""
    return {"iid": "IID", "shards": "patológica (2 fragmentos)"}.get(split, split)


MCMAHAN_COLUMNS = ("split", "method", "seed", "settings", "rounds_run", "first_99", "sustained_99", "mean_last10",
                   "min_last10", "change_last10", "change_last10_half_width", "mb_per_client_to_first_99",
                   "mb_per_client_to_sustained_99", "paper_rounds_to_99")


def _rounds_cell(values: Sequence[str]) -> str:
    """Rounds per seed: the mean ± interval when every seed reached it, else each seed's (— : never)."""
    listed = " / ".join(v or "—" for v in values)
    if len(values) > 1 and all(values):
        return f"{_ci([float(v) for v in values], 1.0, 1)} ({listed})"
    return listed if len(values) > 1 else (values[0] or "nunca")


def _change_text(change, diverged: tuple[int, int] = (0, 0)) -> str:
    """A last-10-round change (``MeanInterval`` or None) in points with its interval, and whether that interval
    contains zero ("sin cambio detectable") or not ("sube"/"baja"); the mean alone when there is no interval.

    ``diverged`` (seeds whose model diverged, seeds) replaces the verdict: a run whose weights blew up has no
    level to settle at, whatever its slope says."""
    from fedmnist.curves import settled

    if change is None:
        return "—"
    spread = "" if math.isnan(change.half_width) else f" ± {change.half_width * 100:.2f}"
    verdict = settled(change)
    word = f" (diverge en {diverged[0]}/{diverged[1]} semillas)" if diverged[0] else "" if verdict is None else \
        " (sin cambio detectable)" if verdict else " (sube)" if change.mean > 0 else " (baja)"
    return f"{change.mean * 100:+.2f}{spread}{word}"


def _mcmahan_change(rows: Rows):
    """The McMahan runs' last-10-round change: across seeds, or one seed's slope interval."""
    from fedmnist.stats import MeanInterval

    if any(r["change_last10"] == "" for r in rows):
        return None
    if len(rows) == 1:
        return MeanInterval(float(rows[0]["change_last10"]), float(rows[0]["change_last10_half_width"]), 1,
                            math.nan)
    return mean_interval([float(r["change_last10"]) for r in rows])


def _rounds_versus(a_rows: Rows, b_rows: Rows, key: str) -> str:
    """A − FedAvg in rounds to ``key`` over the seeds where both reach it, how many of them A reaches first,
    and the seeds where only one of the two reaches it at all."""
    a = {r["seed"]: float(r[key]) for r in a_rows if r[key]}
    b = {r["seed"]: float(r[key]) for r in b_rows if r[key]}
    shared = sorted(set(a) & set(b), key=int)
    only = [f"solo A en {len(set(a) - set(b))}" if set(a) - set(b) else "",
            f"solo FedAvg en {len(set(b) - set(a))}" if set(b) - set(a) else ""]
    tail = "; ".join(o for o in only if o)
    if not shared:
        return f"— ({tail})" if tail else "—"
    diff = paired_comparison([a[s] for s in shared], [b[s] for s in shared])
    d = diff.difference
    text = f"{d.mean:+.1f}" + ("" if math.isnan(d.half_width) else f" [{d.low:+.1f}, {d.high:+.1f}]")
    return f"{text}, antes en {diff.losses}/{diff.n}" + (f" ({tail})" if tail else "")


def mcmahan_tables(rows: Rows) -> dict[str, str]:
    """``mcmahan`` (per method: reaching 99 %, holding it, the last 10 rounds, the bytes) and
    ``mcmahan_frente_fedavg`` (each method against the project's own FedAvg on the same seeds)."""
    _need(rows, "mcmahan.csv", MCMAHAN_COLUMNS)
    lines = ["| partición | método | ajustes (elegidos en validación) | primera ronda ≥ 99 % | "
             "99 % sostenido desde la ronda | media de las 10 últimas rondas (%) | cambio en las 10 últimas "
             "rondas (puntos) | MB por cliente hasta la primera / el sostenido | rondas |",
             "|---|---|---|---|---|---|---|---|---|"]
    versus = ["| partición | método (A) | media de las 10 últimas rondas: A − FedAvg | primera ronda ≥ 99 %: "
              "A − FedAvg | sostenido: A − FedAvg |", "|---|---|---|---|---|"]
    keys = list(dict.fromkeys((r["split"], r["method"]) for r in rows))
    for split, method in keys:
        sel = sorted((r for r in rows if (r["split"], r["method"]) == (split, method)), key=lambda r: int(r["seed"]))
        mb = []
        for key in ("mb_per_client_to_first_99", "mb_per_client_to_sustained_99"):
            reached = [float(r[key]) for r in sel if r[key]]
            mb.append(f"{sum(reached) / len(reached):.1f}" if len(reached) == len(sel) else "—")
        lines.append(f"| {split_label(split)} | {method_name(method)} | {_settings_label(sel[0]['settings'])} | "
                     f"{_rounds_cell([r['first_99'] for r in sel])} | "
                     f"{_rounds_cell([r['sustained_99'] for r in sel])} | "
                     f"{_ci([r['mean_last10'] for r in sel])} | {_change_text(_mcmahan_change(sel))} | {mb[0]} / {mb[1]} | "
                     f"{' / '.join(sorted({r['rounds_run'] for r in sel}, key=int))} |")
        base = [r for r in rows if (r["split"], r["method"]) == (split, "fedavg")]
        if method == "fedavg" or not base:
            continue
        cells = [_paired(_by_seed(sel, "mean_last10"), _by_seed(base, "mean_last10"))]
        for key in ("first_99", "sustained_99"):
            cells.append(_rounds_versus(sel, base, key))
        versus.append(f"| {split_label(split)} | {method_name(method)} | " + " | ".join(cells) + " |")
    paper = {r["split"]: r["paper_rounds_to_99"] for r in rows}
    tables = {"mcmahan": "\n".join(lines) + (
        f"\n\nPrecisión en las 10 000 imágenes de test en cada ronda; {_seeds(rows)} de evaluación, ninguna la "
        "del ajuste; ninguna ejecución se detiene al llegar al 99 %. Rondas: valor por semilla (— : nunca) y, "
        "si todas llegan, " + CI_NOTE + ". «Sostenido»: la media móvil de 5 rondas no baja del 99 % desde esa "
        "ronda hasta el final. Cambio: pendiente de mínimos cuadrados de las 10 últimas rondas × 10, con su "
        "intervalo entre semillas (con una semilla, el de la pendiente); «sin cambio detectable» si contiene el "
        "cero. MB por "
        "cliente: lo que sube la federación hasta esa ronda repartido entre los 100 clientes (media de las "
        "semillas; — si alguna no llega). FedAvg del artículo (CNN de 1,66 M parámetros): "
        + ", ".join(f"{paper[s]} rondas {split_label(s)}" for s in paper) + " hasta el 99 % (primera ronda).")}
    if len(versus) > 2:
        tables["mcmahan_frente_fedavg"] = "\n".join(versus) + (
            "\n\nDiferencias A − FedAvg emparejadas por semilla: la media de las 10 últimas rondas en puntos, "
            "media [IC 95 %] y semillas en que A supera a FedAvg; las rondas, en rondas (negativo: A llega antes), "
            "sobre las semillas en que ambos llegan, con las semillas en que A llega antes.")
    return tables


def mcmahan_tuning_table(rows: Rows) -> str:
    """``mcmahan_ajuste``: every McMahan candidate's validation score, the chosen one marked."""
    lines = ["| partición | método | candidato | precisión de validación (%), media de las 2 últimas rondas | "
             "elegido |", "|---|---|---|---|---|"]
    seeds = sorted({r.get("tuning_seed", "") for r in rows} - {""})
    for r in rows:
        lines.append(f"| {split_label(r['split'])} ({r['tuning_rounds']} rondas) | {method_name(r['method'])} | "
                     f"{_settings_label(r['settings'])} | {_pct(r['score'])} | {'sí' if r['chosen'] == 'True' else ''} |")
    return "\n".join(lines) + (f"\n\nSemilla del ajuste: {', '.join(seeds)} (nunca una de evaluación); validación: "
                               f"{_images(rows[0]['validation_images'])} de entrenamiento apartadas." if seeds else "")


PRIVACY_COLUMNS = ("clients", "clients_per_round", "target_epsilon", "noise_multiplier", "noise_std", "epsilon",
                   "delta", "clip", "local_steps", "batch_size", "learning_rate", "server_momentum", "rounds",
                   "seed", "final_accuracy", "final_loss", "change_last10")


def _epsilon_cell(sel: Rows) -> str:
    spent = [r["epsilon"] for r in sel]
    if all(e == "inf" for e in spent):
        return "∞"
    values = sorted({f"{float(e):.2f}" for e in spent})
    delta = sorted({f"{float(r['delta']):g}" for r in sel})
    return f"{' / '.join(values)} (δ = {' / '.join(delta)})"


def _blew_up(row: Mapping[str, str]) -> bool:
    """Whether a ``privacidad.csv`` row's final test loss says its model diverged; an empty loss does not."""
    from fedmnist.experiments.common import diverged

    return row["final_loss"] != "" and diverged(float(row["final_loss"]))


def privacy_table(rows: Rows) -> str:
    """``privacidad``: per (K, target ε) the noise, the ε spent, the final accuracy, its difference from the
    same K's non-private row paired by seed, its last change across seeds, and Geyer et al.'s (2017) figure
    at the same K beside it."""
    from fedmnist.experiments.common import DIVERGED_LOSS
    from fedmnist.published import GEYER_2017_CITATION, describe, geyer_row

    _need(rows, "privacidad.csv", PRIVACY_COLUMNS)
    lines = ["| K (m por ronda) | ε objetivo | z | ruido en la media (σ = z·S/m) | ε gastado | "
             "precisión final (%) | frente a sin privacidad, mismo K (puntos) | "
             "cambio en las 10 últimas rondas (puntos) | Geyer et al. (2017), mismo K |",
             "|---|---|---|---|---|---|---|---|---|"]
    for key in dict.fromkeys((r["clients"], r["target_epsilon"]) for r in rows):
        sel = [r for r in rows if (r["clients"], r["target_epsilon"]) == key]
        first = sel[0]
        private = first["target_epsilon"] != ""
        reference = [r for r in rows if r["clients"] == first["clients"] and r["target_epsilon"] == ""]
        cost = _paired(_by_seed(sel), _by_seed(reference)) if private else "—"
        changes = [float(r["change_last10"]) for r in sel if r["change_last10"] != ""]
        target = f"{float(first['target_epsilon']):g}" if private else "sin privacidad"
        z = f"{float(first['noise_multiplier']):g}" if private else "—"
        sigma = f"{float(first['noise_std']):.4f}" if private else "—"
        published = describe(geyer_row(int(first["clients"]))) if private else "—"
        blown = (sum(_blew_up(r) for r in sel), len(sel))
        lines.append(f"| {first['clients']} ({first['clients_per_round']}) | {target} | {z} | {sigma} | "
                     f"{_epsilon_cell(sel)} | {_ci([float(r['final_accuracy']) for r in sel])} | {cost} | "
                     f"{_change_text(mean_interval(changes) if changes else None, blown)} | {published} |")
    dp = [r for r in rows if r["target_epsilon"] != ""]
    base = [r for r in rows if r["target_epsilon"] == ""]
    notes = []
    if dp:
        per_target = {}
        for r in dp:
            per_target.setdefault(f"{float(r['target_epsilon']):g}", set()).add(
                f"S = {float(r['clip']):g}, β = {float(r['server_momentum']):g}")
        tuned = "; ".join(f"ε = {t}: {' / '.join(sorted(v))}" for t, v in per_target.items())
        r = dp[0]
        notes.append(f"filas privadas (DP-FedAvg(M), recorte en el servidor, muestreo de Poisson), con el recorte y el "
                     f"momento ajustados para cada ε: {tuned}; en todas, {r['local_steps']} pasos locales de "
                     f"B = {r['batch_size']}, η_l = {float(r['learning_rate']):g}, {r['rounds']} rondas")
    if base:
        r = base[0]
        notes.append(f"sin privacidad: sin recorte ni ruido, η_l = {float(r['learning_rate']):g}, "
                     f"β = {float(r['server_momentum']):g}, {r['rounds']} rondas")
    seeds = ", ".join(dict.fromkeys(r["seed"] for r in rows))
    return "\n".join(lines) + "\n\n" + _cap("; ".join(notes)) + f". Semillas: {seeds}; {CI_NOTE}. " + \
        "Frente a sin privacidad: diferencia pareada por semilla con la fila sin privacidad del mismo K, media " + \
        "[IC 95 %] y semillas en que la fila privada la supera. " + \
        "Cambio: pendiente de mínimos cuadrados de las 10 últimas rondas × 10; estable si su IC 95 % contiene 0" + \
        ("" if not any(_blew_up(r) for r in rows) else
         f"; «diverge»: semillas cuyo modelo final tiene una pérdida de test no finita o mayor que {DIVERGED_LOSS:g} "
         "(los pesos se disparan; un modelo al azar tiene ln 10 ≈ 2.3), y entonces el cambio no dice que se haya "
         "estabilizado") + f". Geyer et al.: {GEYER_2017_CITATION}."


PRIVACY_TARGETS = (0.92, 0.95)
"""Test accuracies whose first round, and the round from which every later evaluation stays at or above
them, ``privacidad_estabilidad`` gives (0.92: the issue's goal at K = 1,000 and ε ≤ 8)."""
SLOPE_WINDOW = 100
"""Last rounds whose least-squares change ``privacidad_estabilidad`` gives: the 10 of ``change_last10`` hold
only two evaluations of a run evaluated every 5 rounds."""
LATE_WINDOW = 50
"""Last rounds in which ``privacidad_estabilidad`` counts the unstable rounds again, to show where they fall."""
UNSTABLE_TRAIN_LOSS = 10.0
"""A round whose mean training loss over the accepted replies is above this (or not finite) had some client
train unstably from the global weights: the loss of a model at chance level is ln 10 ≈ 2.3."""
STABILITY_COLUMNS = ("round", "test_accuracy", "train_loss", "num_sampled", "num_replies")


def _train_loss_text(value: float) -> str:
    return f"{value:.2f}" if 0.01 <= value < 1e4 else f"{value:.2g}"


def privacy_stability_table(rows: Rows, per_round: Callable[[Mapping[str, str]], Rows],
                            at_round: int | None = None) -> str:
    """``privacidad_estabilidad``: how each run of ``privacidad.csv`` got to its final accuracy, from its
    per-round metrics (``per_round(row)``): the rounds it first reaches and then holds each of
    ``PRIVACY_TARGETS``, its accuracy at ``at_round`` (the tuning runs' length; None: no column), the change
    over its last ``SLOPE_WINDOW`` rounds, the replies it lost and the rounds with an unstable mean training
    loss (with how many fall in the last ``LATE_WINDOW`` rounds), the first round with either, and the median
    of the per-round training loss."""
    from fedmnist.curves import first_round, recent_change, sustained_round

    _need(rows, "privacidad.csv", ("clients", "clients_per_round", "target_epsilon", "seed"))
    targets = " | ".join(f"{t * 100:g} %: primera ronda / se mantiene desde" for t in PRIVACY_TARGETS)
    at_header = f" precisión en la ronda {at_round} (%) |" if at_round else ""
    lines = [f"| K (m por ronda) | ε objetivo | semilla | {targets} |{at_header} cambio en las "
             f"{SLOPE_WINDOW} últimas rondas (puntos) | respuestas perdidas (rondas con alguna; de ellas en "
             f"las {LATE_WINDOW} últimas) | rondas con `train_loss` medio > {UNSTABLE_TRAIN_LOSS:g} (en las "
             f"{LATE_WINDOW} últimas) | primera ronda con alguna de las dos | mediana de `train_loss` por ronda |",
             "|---" * (8 + len(PRIVACY_TARGETS) + bool(at_round)) + "|"]
    for row in rows:
        metrics = per_round(row)
        _need(metrics, f"the per-round metrics of the seed-{row['seed']} run", STABILITY_COLUMNS)
        curve = {int(m["round"]): float(m["test_accuracy"]) for m in metrics if m["test_accuracy"] != ""}
        losses = {int(m["round"]): float(m["train_loss"]) for m in metrics if m["train_loss"] != ""}
        lost = {int(m["round"]): int(m["num_sampled"]) - int(m["num_replies"]) for m in metrics}
        lost_rounds = [r for r, n in lost.items() if n > 0]
        unstable = [r for r, v in losses.items() if not v <= UNSTABLE_TRAIN_LOSS]
        late_from = max(lost) - LATE_WINDOW
        reached = " | ".join(f"{first_round(curve, t) or 'nunca'} / {sustained_round(curve, t, 1) or 'nunca'}"
                             for t in PRIVACY_TARGETS)
        at_cell = f" {_pct(curve[at_round]) if at_round in curve else '—'} |" if at_round else ""
        change = recent_change(curve, SLOPE_WINDOW) if curve else None
        losses_sorted = sorted(losses.values())
        median = float(np.median(losses_sorted)) if losses_sorted else None
        target = f"{float(row['target_epsilon']):g}" if row["target_epsilon"] != "" else "sin privacidad"
        lines.append(f"| {row['clients']} ({row['clients_per_round']}) | {target} | {row['seed']} | {reached} |"
                     f"{at_cell} {'—' if change is None else f'{change * 100:+.2f}'} | "
                     f"{sum(lost.values())} ({len(lost_rounds)}; {sum(r > late_from for r in lost_rounds)}) | "
                     f"{len(unstable)} ({sum(r > late_from for r in unstable)}) | {min(lost_rounds + unstable, default='—')} | "
                     f"{'—' if median is None else _train_loss_text(median)} |")
    return "\n".join(lines) + (
        "\n\nUna fila por ejecución final de `privacidad.csv`, leída de su `metricas_por_ronda.csv` (una "
        "evaluación cada pocas rondas). «Se mantiene desde»: la ronda desde la que todas las evaluaciones "
        "siguientes quedan en o por encima del umbral (nunca: la última queda por debajo). Cambio: pendiente "
        f"de mínimos cuadrados de las {SLOPE_WINDOW} últimas rondas × {SLOPE_WINDOW}. Respuestas perdidas: "
        "clientes muestreados menos respuestas agregadas (la causa de cada una, en la columna `failed`). "
        "`train_loss`: la pérdida de "
        "entrenamiento media de las respuestas aceptadas en la ronda; no hay valor en una ronda sin ninguna.")


def privacy_tuning_table(rows: Rows) -> str:
    """``privacidad_ajuste``: every privacy tuning candidate's validation score, the chosen one marked."""
    _need(rows, "privacidad_ajuste.csv", ("stage", "clients", "settings", "tuning_rounds", "score", "chosen"))
    stages = {"baseline": "sin privacidad", "dp": "DP"}
    lines = ["| etapa | K | candidato | rondas | precisión de validación (%), media de las 2 últimas evaluaciones | "
             "elegido |", "|---|---|---|---|---|---|"]
    for r in rows:
        stage = stages.get(r["stage"], r["stage"])
        if r["stage"] == "dp" and r.get("target_epsilon"):
            stage += f" (ε = {float(r['target_epsilon']):g})"
        lines.append(f"| {stage} | {r['clients']} | {_settings_label(r['settings'])} | {r['tuning_rounds']} | "
                     f"{_pct(r['score'])} | {'sí' if _true(r['chosen']) else ''} |")
    notes = []
    seeds = sorted({r.get("tuning_seed", "") for r in rows} - {""})
    if seeds:
        notes.append(f"Semilla del ajuste: {', '.join(seeds)} (nunca una de evaluación); validación: "
                     f"{_images(rows[0]['validation_images'])} de entrenamiento apartadas")
    norms = sorted({r.get("median_update_norm", "") for r in rows} - {""})
    if norms:
        notes.append(f"mediana de las normas ‖Δ‖ de la ronda 1 sin privacidad: {float(norms[0]):g} "
                     "(S = factor × mediana, a dos cifras)")
    if any(r["stage"] == "dp" for r in rows):
        notes.append("cada ensayo con DP usa el z de las ejecuciones finales de su ε (calibrado para todas sus "
                     "rondas) y se detiene en las rondas indicadas")
    return "\n".join(lines) + (f"\n\n{_cap('; '.join(notes))}." if notes else "")


def team_privacy_table(rows: Rows) -> str:
    """``privacidad_equipo``: ε of a 5-member team per noise level, and the clients ε ≤ 2 would need."""
    lines = ["| z (5 miembros, todos en cada ronda) | rondas | ε (δ = 1e-5) | ¿con sentido (ε ≤ 10)? | "
             "clientes necesarios para ε ≤ 2 con el mismo ruido en la media (C = 0.1) |", "|---|---|---|---|---|"]
    for r in rows:
        verdict = "sí" if r["meaningful"] == "True" else "no"
        lines.append(f"| {float(r['noise_multiplier']):g} | {r['rounds']} | {float(r['epsilon']):.1f} | {verdict} | "
                     f"{r['clients_for_epsilon_2'] or 'más de 10⁷'} |")
    return "\n".join(lines)


CEILING_COLUMNS = ("seed", "optimizer", "learning_rate", "batch_size", "patience", "max_epochs", "train_images",
                   "validation_images", "test_images", "epochs_run", "best_epoch", "validation_accuracy",
                   "test_accuracy", "ci_low", "ci_high", "test_loss")


def ceiling_table(rows: Rows) -> str:
    """``techo``: the central model trained to early stopping, per seed, and its mean across seeds."""
    _need(rows, "techo.csv", CEILING_COLUMNS)
    rows = sorted(rows, key=lambda r: int(r["seed"]))
    lines = ["| semilla | épocas ejecutadas | mejor época | precisión de validación (%) | "
             "precisión de test (%) [IC 95 % de Wilson] | pérdida de test |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['seed']} | {r['epochs_run']} | {r['best_epoch']} | {_pct(r['validation_accuracy'])} | "
                     f"{_pct(r['test_accuracy'])} [{_pct(r['ci_low'])}, {_pct(r['ci_high'])}] | "
                     f"{float(r['test_loss']):.4f} |")
    lines.append(f"| media ± IC 95 % | {_ci([r['epochs_run'] for r in rows], 1.0, 1)} | "
                 f"{_ci([r['best_epoch'] for r in rows], 1.0, 1)} | {_ci([r['validation_accuracy'] for r in rows])} | "
                 f"{_ci([r['test_accuracy'] for r in rows])} | {_mean_loss(rows, 'test_loss')} |")
    first = rows[0]
    training = optimizer_name(first["optimizer"], float(first["learning_rate"]), 0.0)
    return "\n".join(lines) + (
        f"\n\n{_cap(CI_NOTE)}: {_seeds(rows)}. Modelo central: la CNN del proyecto desde los pesos iniciales "
        f"de cada semilla, {training}, lote {first['batch_size']}, con {_images(first['train_images'])} de "
        f"entrenamiento; tras cada época se mide la pérdida en {_images(first['validation_images'])} de "
        "entrenamiento apartadas como validación (una extracción distinta en cada semilla) y el entrenamiento "
        f"se detiene tras {_plural(first['patience'], 'época', 'épocas')} sin que baje (como mucho "
        f"{_plural(first['max_epochs'], 'época', 'épocas')}); se conserva la época de menor pérdida de "
        f"validación, evaluada en las {_images(first['test_images'])} de test."
    )
