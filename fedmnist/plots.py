"""Figures for the team (labels in Spanish). Every function writes one PNG atomically and returns."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from fedmnist.io import atomic_path
from fedmnist.labels import method_name


def _save(fig: plt.Figure, path: str | Path) -> Path:
    path = Path(path)
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png")
    plt.close(fig)
    return path


def plot_class_distribution(counts: np.ndarray, path: str | Path, title: str = "") -> Path:
    """Heatmap clients x classes of image counts."""
    import seaborn as sns

    num_clients = counts.shape[0]
    height = min(2 + 0.35 * num_clients, 30)
    fig, ax = plt.subplots(figsize=(8, height))
    sns.heatmap(
        counts, ax=ax, cmap="viridis", annot=num_clients <= 20, fmt="d",
        xticklabels=list(range(counts.shape[1])),
        yticklabels=[str(k) for k in range(1, num_clients + 1)] if num_clients <= 50 else False,
        cbar_kws={"label": "imágenes"},
    )
    ax.set_xlabel("Clase (dígito)")
    ax.set_ylabel("Cliente")
    ax.set_title(f"Distribución de clases por cliente{f' — {title}' if title else ''}")
    return _save(fig, path)


def plot_learning_curves(history: Mapping[str, Sequence[float]], path: str | Path, title: str = "") -> Path:
    """Loss and accuracy per epoch, training and (if present) validation."""
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    epochs = np.arange(1, len(history["loss"]) + 1)
    for ax, key, label in ((ax_loss, "loss", "Pérdida"), (ax_acc, "accuracy", "Precisión")):
        ax.plot(epochs, history[key], "o-", label="entrenamiento")
        if history.get(f"val_{key}"):
            ax.plot(epochs, history[f"val_{key}"], "s--", label="validación")
        ax.set_xlabel("Época")
        ax.set_ylabel(label)
        ax.set_xticks(epochs)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title or "Curvas de aprendizaje")
    return _save(fig, path)


def plot_confusion_matrix(confusion: np.ndarray, path: str | Path, title: str = "") -> Path:
    """Seaborn heatmap of a 10x10 confusion matrix (rows: true class, columns: predicted)."""
    import seaborn as sns

    fig, ax = plt.subplots(figsize=(7, 6))
    sns.heatmap(confusion, annot=True, fmt="d", cmap="Blues", ax=ax, cbar=False)
    ax.set_xlabel("Clase predicha")
    ax.set_ylabel("Clase real")
    ax.set_title(title or "Matriz de confusión")
    return _save(fig, path)


def plot_method_comparison(
    methods: Sequence[tuple[str, float, float, float]],
    locals_: Sequence[tuple[str, float, float, float]],
    path: str | Path,
    title: str = "",
) -> Path:
    """Bars of test accuracy per global method, local models beside them, 95% intervals drawn.

    Each entry is (label, accuracy, ci_low, ci_high).
    """
    entries = list(methods) + list(locals_)
    labels = [e[0] for e in entries]
    acc = np.array([e[1] for e in entries]) * 100
    err = np.array([[e[1] - e[2], e[3] - e[1]] for e in entries]).T * 100
    colors = ["tab:blue"] * len(methods) + ["tab:gray"] * len(locals_)
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(entries) + 2), 4.5))
    bars = ax.bar(labels, acc, yerr=err, capsize=4, color=colors)
    for bar, value, above in zip(bars, acc, err[1]):
        ax.text(bar.get_x() + bar.get_width() / 2, value + above + 0.3, f"{value:.2f}",
                ha="center", va="bottom", fontsize=8)
    low = max(0.0, float(np.min(acc - err[0])) - 5)
    ax.set_ylim(low, 100.5)
    ax.set_ylabel("Precisión en el test común (%)")
    ax.set_title(title or "Comparación de métodos de agregación (IC 95%)")
    ax.tick_params(axis="x", rotation=30)
    if locals_:
        from matplotlib.patches import Patch

        ax.legend(handles=[Patch(color="tab:blue", label="modelo global"),
                           Patch(color="tab:gray", label="modelo local")], loc="best")
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def plot_accuracy_per_round(
    curves: Mapping[str, Sequence[float]], path: str | Path, title: str = "", target: float | None = None
) -> Path:
    """Test accuracy of the global model against the round, one line per method."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, values in curves.items():
        rounds = np.arange(1, len(values) + 1)
        ax.plot(rounds, np.asarray(values) * 100, marker="o" if len(values) <= 30 else None,
                markersize=3, label=method_name(name))
    if target is not None:
        ax.axhline(target * 100, color="black", linestyle=":", linewidth=1, label=f"objetivo {target:.0%}")
    ax.set_xlabel("Ronda")
    ax.set_ylabel("Precisión en el test común (%)")
    ax.set_title(title or "Precisión del modelo global por ronda")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)
