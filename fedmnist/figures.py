"""Figures of the essay's results sections (Spanish labels), drawn from the experiments' result rows.

Every figure shows the mean over seeds with its 95 % Student-t interval (``fedmnist.stats``), on
accuracy axes from 0 to 100 % unless a panel says it is zoomed; titles sit on their own panels and
the figure's title above them (constrained layout), so they never overlap. Each function writes one
PNG atomically. Rows may hold numbers or the strings a CSV gives back.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from fedmnist.io import atomic_path
from fedmnist.labels import attack_name, method_name, optimizer_name, partition_name
from fedmnist.stats import mean_interval

BAND_NOTE = "media de las semillas; barras y bandas: IC 95 % (t de Student) entre semillas"


def accuracy_label(test_images) -> str:
    """``Precisión en las 10 000 imágenes de test (%)`` for that many images."""
    return f"Precisión en las {int(float(test_images)):,} imágenes de test (%)".replace(",", " ")


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png")
    plt.close(fig)
    return path


def _pct_interval(values: Sequence[float]) -> tuple[float, float]:
    """Mean and half-width (0 for one value) of ``values``, in percent."""
    interval = mean_interval([float(v) for v in values])
    half = 0.0 if math.isnan(interval.half_width) else interval.half_width
    return interval.mean * 100, half * 100


def _true(value) -> bool:
    return value is True or str(value) == "True"


def _bar_values(ax, x: Sequence[float], means: Sequence[float], low: float = 0.0) -> None:
    """Write each bar's value inside it (above it when the bar is too short), left of its error bar."""
    span = ax.get_ylim()[1] - low if ax.get_ylim()[1] > low else 100 - low
    for xi, mean in zip(x, means):
        inside = mean - low > 0.12 * span
        ax.text(
            xi - 0.2,
            mean - 0.03 * span if inside else mean + 0.01 * span,
            f"{mean:.2f}",
            ha="center",
            va="top" if inside else "bottom",
            fontsize=8,
            color="white" if inside else "black",
            fontweight="bold" if inside else "normal",
        )


def _integer_rounds(ax) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def plot_course(rows: Sequence[Mapping], path: str | Path) -> Path:
    """The course flow (``curso.csv``): global models, central model and the locals' mean, full and zoomed."""
    seeds = list(dict.fromkeys(str(r["seed"]) for r in rows))
    names = [m for m in dict.fromkeys(r["model"] for r in rows) if not m.startswith("local_")]
    entries = []
    for name in names:
        sel = [r for r in rows if r["model"] == name]
        label = {"central": "Central"}.get(name, method_name(name))
        if name == "fedprox":
            label += f"\n(μ = {float(sel[0]['mu']):g})"
        entries.append(
            (label, [float(r["accuracy"]) for r in sel], "tab:blue" if name != "central" else "tab:green")
        )
    local_means = [
        np.mean(
            [float(r["accuracy"]) for r in rows if str(r["seed"]) == s and r["model"].startswith("local_")]
        )
        for s in seeds
    ]
    entries.append(("Locales\n(media de 5)", local_means, "tab:gray"))
    means = np.array([_pct_interval(v)[0] for _, v, _ in entries])
    halves = np.array([_pct_interval(v)[1] for _, v, _ in entries])
    zoom_low = max(0.0, math.floor(float(np.min(means - halves))) - 1.0)
    panels = [(0.0, "Escala completa")]
    if zoom_low >= 10:  # a zoomed twin panel, labelled as such, when the bars would look alike
        panels.append((zoom_low, f"Ampliado: el eje empieza en {zoom_low:g} %"))
    fig, axes = plt.subplots(
        1, len(panels), figsize=(6 * len(panels), 4.6), squeeze=False, layout="constrained"
    )
    x = np.arange(len(entries))
    for ax, (low, title) in zip(axes[0], panels):
        ax.bar(x, means, yerr=halves, capsize=4, color=[c for *_, c in entries])
        ax.set_ylim(low, 100.5)
        _bar_values(ax, x, means, low)
        ax.set_xticks(x, [e[0] for e in entries], fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        ax.set_ylabel(
            accuracy_label(rows[0]["test_images"]) if low == 0 else f"Precisión (%), eje desde {low:g} %"
        )
    fig.suptitle(
        f"Flujo del curso: 5 clientes IID, una ronda, {len(seeds)} semillas\n{BAND_NOTE}", fontsize=10
    )
    return _save(fig, path)


def plot_initialisation(rows: Sequence[Mapping], path: str | Path) -> Path:
    """One-shot FedAvg from a shared start versus from independent starts (``inicializacion.csv``)."""
    labels = list(dict.fromkeys(r["init"] for r in rows))
    stats = [_pct_interval([float(r["accuracy"]) for r in rows if r["init"] == label]) for label in labels]
    fig, ax = plt.subplots(figsize=(5.5, 4.2), layout="constrained")
    x = np.arange(len(labels))
    ax.bar(
        x,
        [m for m, _ in stats],
        yerr=[h for _, h in stats],
        capsize=4,
        color=["tab:blue", "tab:red"][: len(x)],
    )
    ax.set_ylim(0, 105)
    _bar_values(ax, x, [m for m, _ in stats])
    ax.axhline(10, color="black", linestyle=":", linewidth=1, label="azar (10 %)")
    ax.set_xticks(x, [f"inicialización {label}" for label in labels])
    ax.set_ylim(0, 105)
    ax.set_ylabel(accuracy_label(rows[0]["test_images"]))
    ax.set_title(
        f"FedAvg de 5 clientes en una ronda\n({len({str(r['seed']) for r in rows})} semillas; "
        "barras: IC 95 %)",
        fontsize=10,
    )
    ax.legend(loc="upper right")
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def _mean_curve(curves: Sequence[Sequence[float]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rounds evaluated in every seed's curve, with the mean and half-width there (percent)."""
    length = min(len(c) for c in curves)
    stacked = np.array([[np.nan if v is None else float(v) for v in c[:length]] for c in curves]) * 100
    rounds, means, halves = [], [], []
    for i in range(length):
        column = stacked[:, i]
        if np.isfinite(column).all():
            mean, half = _pct_interval(column / 100)
            rounds.append(i + 1)
            means.append(mean)
            halves.append(half)
    return np.array(rounds), np.array(means), np.array(halves)


def _draw_curves(ax, per_label: Mapping[str, Sequence[Sequence[float]]], names: Mapping[str, str]) -> None:
    for key, curves in per_label.items():
        rounds, means, halves = _mean_curve(curves)
        (line,) = ax.plot(rounds, means, marker="o", markersize=3, label=names.get(key, key))
        ax.fill_between(
            rounds, means - halves, means + halves, color=line.get_color(), alpha=0.2, linewidth=0
        )


def plot_round_curves(
    curves: Mapping[str, Mapping[str, Sequence[Sequence[float]]]],
    path: str | Path,
    title: str,
    test_images: int,
) -> Path:
    """Test accuracy per round, one panel per partition, one line per method (mean of the seeds' curves)."""
    count = len(curves)
    fig, axes = plt.subplots(
        1, count, figsize=(3.8 * count, 3.8), sharey=True, squeeze=False, layout="constrained"
    )
    for ax, (label, per_method) in zip(axes[0], curves.items()):
        _draw_curves(ax, per_method, {m: method_name(m) for m in per_method})
        ax.set_title(partition_name(label), fontsize=10)
        ax.set_xlabel("Ronda")
        ax.set_ylim(0, 100)
        _integer_rounds(ax)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(accuracy_label(test_images))
    axes[0][0].legend(loc="lower right")
    fig.suptitle(f"{title}\n{BAND_NOTE}", fontsize=10)
    return _save(fig, path)


def plot_fedprox_mu(
    rows: Sequence[Mapping],
    curves: Mapping[float, Sequence[Sequence[float]]],
    path: str | Path,
    partition: str,
) -> Path:
    """Final accuracy against μ (left) and the mean curves per μ (right), on ``partition``."""
    mus = list(dict.fromkeys(str(r["mu"]) for r in rows))
    stats = [_pct_interval([float(r["final_accuracy"]) for r in rows if str(r["mu"]) == mu]) for mu in mus]
    names = [f"{mu} (FedAvg)" if float(mu) == 0 else mu for mu in mus]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2), layout="constrained")
    x = np.arange(len(mus))
    left.bar(x, [m for m, _ in stats], yerr=[h for _, h in stats], capsize=4, color="tab:orange")
    left.set_ylim(0, 105)
    _bar_values(left, x, [m for m, _ in stats])
    left.set_xticks(x, names)
    left.set_xlabel("μ")
    left.set_ylim(0, 105)
    left.set_ylabel(accuracy_label(rows[0]["test_images"]))
    left.set_title("Precisión final", fontsize=10)
    left.grid(axis="y", alpha=0.3)
    _draw_curves(
        right,
        {f"{mu:g}": c for mu, c in curves.items()},
        {f"{mu:g}": f"μ = {mu:g}" + (" (FedAvg)" if mu == 0 else "") for mu in curves},
    )
    right.set_xlabel("Ronda")
    right.set_ylabel(accuracy_label(rows[0]["test_images"]))
    right.set_ylim(0, 100)
    _integer_rounds(right)
    right.set_title("Precisión por ronda", fontsize=10)
    right.grid(alpha=0.3)
    right.legend(loc="lower right")
    fig.suptitle(
        f"FedProx según μ, partición {partition_name(partition)}, {len({str(r['seed']) for r in rows})} "
        f"semillas\n{BAND_NOTE}",
        fontsize=10,
    )
    return _save(fig, path)


def plot_attacks(rows: Sequence[Mapping], path: str | Path) -> Path:
    """Final accuracy under attack, one panel per partition: one group of bars per case, one bar per method.

    A bar whose seeds diverged (``diverged``: test loss not finite or huge) is hatched and labelled with
    how many did.
    """
    partitions = list(dict.fromkeys(r["partition"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    fig, axes = plt.subplots(
        len(partitions), 1, figsize=(12, 3.9 * len(partitions)), squeeze=False, layout="constrained"
    )
    width = 0.8 / len(methods)
    colors = plt.get_cmap("tab10").colors
    for ax, partition in zip(axes[:, 0], partitions):
        cases = list(
            dict.fromkeys((r["attack"], str(r["malicious"])) for r in rows if r["partition"] == partition)
        )
        for j, method in enumerate(methods):
            for i, case in enumerate(cases):
                sel = [
                    r
                    for r in rows
                    if r["partition"] == partition
                    and (r["attack"], str(r["malicious"])) == case
                    and r["method"] == method
                ]
                if not sel:
                    continue
                mean, half = _pct_interval([float(r["final_accuracy"]) for r in sel])
                diverged = sum(_true(r["diverged"]) for r in sel)
                xi = i + (j - (len(methods) - 1) / 2) * width
                ax.bar(
                    xi,
                    mean,
                    width,
                    yerr=half,
                    capsize=2,
                    color=colors[j % len(colors)],
                    hatch="//" if diverged else None,
                    edgecolor="black" if diverged else None,
                    label=method_name(method) if i == 0 else None,
                )
                if diverged:
                    ax.text(
                        xi,
                        mean + half + 1,
                        f"div.\n{diverged}/{len(sel)}",
                        ha="center",
                        va="bottom",
                        fontsize=6,
                    )
        ax.set_xticks(
            np.arange(len(cases)),
            [
                "sin ataque" if a == "none" else f"{attack_name(a)}\n{m} malicioso{'s' if m != '1' else ''}"
                for a, m in cases
            ],
        )
        ax.set_ylim(0, 112)
        ax.set_yticks(range(0, 101, 20))
        ax.set_ylabel(accuracy_label(rows[0]["test_images"]).replace("Precisión", "Precisión final"))
        ax.set_title(f"Partición {partition_name(partition)}", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    axes[0, 0].legend(ncol=len(methods), fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.25))
    fig.suptitle(
        f"Clientes maliciosos, {len({str(r['seed']) for r in rows})} semillas\n{BAND_NOTE}; rayado: "
        "modelos que divergen (pérdida de test no finita o > 1000)",
        fontsize=10,
    )
    return _save(fig, path)


def _drift_points(rows: Sequence[Mapping], partition: str, optimizer: tuple, key: str):
    epochs = sorted({int(r["epochs"]) for r in rows})
    points = []
    for e in epochs:
        sel = [
            float(r[key])
            for r in rows
            if r["partition"] == partition and _opt(r) == optimizer and int(r["epochs"]) == e
        ]
        sel = [v for v in sel if math.isfinite(v)]
        if sel:
            interval = mean_interval(sel)
            points.append((e, interval.mean, 0.0 if math.isnan(interval.half_width) else interval.half_width))
    return points


def _opt(row: Mapping) -> tuple[str, float, float]:
    return row["optimizer"], float(row["learning_rate"]), float(row["momentum"])


def plot_drift(
    rows: Sequence[Mapping], accuracy_path: str | Path, measures_path: str | Path
) -> tuple[Path, Path]:
    """Two figures of the drift grid (``deriva.csv``) against the local epochs: the accuracies of the
    local models, one-shot FedAvg and FedProx (one panel per partition × optimiser), and the drift
    measures (one panel per partition × measure, one line per optimiser)."""
    partitions = list(dict.fromkeys(r["partition"] for r in rows))
    optimizers = list(dict.fromkeys(_opt(r) for r in rows))
    epochs = sorted({int(r["epochs"]) for r in rows})
    seeds = len({str(r["seed"]) for r in rows})
    fig, axes = plt.subplots(
        len(partitions),
        len(optimizers),
        figsize=(4.2 * len(optimizers), 3.6 * len(partitions)),
        squeeze=False,
        sharey=True,
        layout="constrained",
    )
    series = (
        ("locals_accuracy", "modelos locales (media)", "tab:gray"),
        ("fedavg_accuracy", "FedAvg en una ronda", "tab:blue"),
        ("fedprox_accuracy", "FedProx (μ elegido en validación)", "tab:orange"),
    )
    for i, partition in enumerate(partitions):
        for j, optimizer in enumerate(optimizers):
            ax = axes[i, j]
            for key, label, color in series:
                pts = _drift_points(rows, partition, optimizer, key)
                ax.errorbar(
                    [p[0] for p in pts],
                    [p[1] * 100 for p in pts],
                    yerr=[p[2] * 100 for p in pts],
                    marker="o",
                    capsize=3,
                    color=color,
                    label=label,
                )
            ax.set_xticks(epochs)
            ax.set_ylim(0, 100)
            ax.set_title(f"{partition_name(partition)}\n{optimizer_name(*optimizer)}", fontsize=9)
            ax.grid(alpha=0.3)
            if i == len(partitions) - 1:
                ax.set_xlabel("Épocas locales (una ronda)")
        axes[i, 0].set_ylabel(accuracy_label(rows[0]["test_images"]))
    axes[0, 0].legend(fontsize=8, loc="lower left")
    fig.suptitle(
        f"Deriva de los clientes en una ronda: modelos locales, FedAvg y FedProx, {seeds} semillas\n"
        f"{BAND_NOTE}",
        fontsize=10,
    )
    first = _save(fig, accuracy_path)

    barrier_images = f"{int(float(rows[0]['barrier_images'])):,}".replace(",", " ")
    measures = (
        ("update_norm", "‖wₖ − w₀‖ medio", 0.0),
        ("update_cosine", "coseno medio entre actualizaciones", None),
        (
            "barrier",
            f"barrera de pérdida entre dos clientes\n(primeras {barrier_images} imágenes de test)",
            0.0,
        ),
    )
    fig, axes = plt.subplots(
        len(partitions),
        len(measures),
        figsize=(4.2 * len(measures), 3.4 * len(partitions)),
        squeeze=False,
        layout="constrained",
    )
    for i, partition in enumerate(partitions):
        for j, (key, label, bottom) in enumerate(measures):
            ax = axes[i, j]
            for optimizer in optimizers:
                pts = _drift_points(rows, partition, optimizer, key)
                ax.errorbar(
                    [p[0] for p in pts],
                    [p[1] for p in pts],
                    yerr=[p[2] for p in pts],
                    marker="o",
                    capsize=3,
                    label=optimizer_name(*optimizer),
                )
            ax.set_xticks(epochs)
            if bottom is not None:
                ax.set_ylim(bottom=bottom)
            else:
                ax.set_ylim(min(0.0, ax.get_ylim()[0]), 1.0)
            ax.set_ylabel(label, fontsize=9)
            ax.set_title(partition_name(partition), fontsize=9)
            ax.grid(alpha=0.3)
            if i == len(partitions) - 1:
                ax.set_xlabel("Épocas locales (una ronda)")
    axes[0, 0].legend(fontsize=8)
    fig.suptitle(f"Medidas de la deriva tras una ronda ({seeds} semillas; barras: IC 95 %)", fontsize=10)
    return first, _save(fig, measures_path)


def plot_mcmahan(curves: Mapping[str, Sequence[float]], path: str | Path, split: str,
                 targets: Sequence[float], goal_rounds: int, seeds: int = 1) -> Path:
    """Every McMahan method's test accuracy per round (10,000 images; mean over ``seeds`` seeds), zoomed on
    90-100 % with the targets and the goal's rounds marked."""
    fig, ax = plt.subplots(figsize=(8, 4.8))
    for method, values in curves.items():
        ax.plot(np.arange(1, len(values) + 1), np.asarray(values, dtype=float) * 100, marker="o",
                markersize=2.5, linewidth=1.2, label=method_name(method))
    for target in targets:
        ax.axhline(target * 100, color="black", linestyle=":", linewidth=0.8)
    ax.axvline(goal_rounds, color="grey", linestyle="--", linewidth=0.8, label=f"objetivo: {goal_rounds} rondas")
    ax.set_ylim(90, 100)
    ax.set_xlabel("Ronda")
    ax.set_ylabel("Precisión en las 10 000 imágenes de test (%)\n(eje desde 90 %)")
    partition = "IID" if split == "iid" else "no IID patológica (2 fragmentos por cliente)"
    ax.set_title(f"Protocolo de McMahan, partición {partition}"
                 + (f" (media de {seeds} semillas)" if seeds > 1 else " (una semilla)"))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2, loc="lower right")
    return _save(fig, path)


def plot_privacy(rows: Sequence[Mapping], path: str | Path) -> Path:
    """DP-FedAvg(M)'s final accuracy against the ε spent (log scale), one line per K: the mean over seeds
    with their range; dotted, the non-private baseline of the same K."""
    from matplotlib.ticker import FixedFormatter, FixedLocator, NullFormatter

    fig, ax = plt.subplots(figsize=(7, 4.2))
    spent: list[float] = []
    for num_clients in dict.fromkeys(r["clients"] for r in rows):
        mine = [r for r in rows if r["clients"] == num_clients]
        points = []
        for target in dict.fromkeys(r["target_epsilon"] for r in mine):
            sel = [r for r in mine if r["target_epsilon"] == target]
            acc = np.array([float(r["final_accuracy"]) for r in sel]) * 100
            eps = math.inf if target == "" else float(np.mean([float(r["epsilon"]) for r in sel]))
            points.append((eps, acc.mean(), acc.min(), acc.max()))
        finite = sorted(p for p in points if math.isfinite(p[0]))
        spent += [p[0] for p in finite]
        line = ax.errorbar([p[0] for p in finite], [p[1] for p in finite],
                           yerr=[[p[1] - p[2] for p in finite], [p[3] - p[1] for p in finite]],
                           marker="o", capsize=3, label=f"K = {num_clients} (m = {mine[0]['clients_per_round']} por ronda)")
        for p in points:
            if not math.isfinite(p[0]):
                ax.axhline(p[1], color=line[0].get_color(), linestyle=":", linewidth=1)
    ax.set_xscale("log")
    ticks = sorted({round(e, 1) for e in spent})
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_major_formatter(FixedFormatter([f"{t:g}" for t in ticks]))
    ax.xaxis.set_minor_formatter(NullFormatter())
    if spent:
        ax.set_xlim(min(spent) / 1.4, max(spent) * 1.4)
    ax.set_xlabel("ε gastado: media de las semillas (vecindad: añadir o quitar un cliente)")
    ax.set_ylabel("Precisión final en el test (%)")
    ax.set_ylim(0, 100)
    ax.set_title("DP-FedAvg(M): precisión frente a ε\nbarras: rango entre semillas; punteado: sin privacidad",
                 fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(loc="center right")
    return _save(fig, path)
