"""The results figures: written, Spanish labels only, accuracy axes from 0 unless marked as zoomed."""

from __future__ import annotations

import re

import matplotlib.text
import pytest

from fedmnist import figures

MACHINE_NAMES = {
    "gaussian",
    "signflip",
    "shards",
    "iid",
    "none",
    "fedavg",
    "fedprox",
    "bulyan",
    "multikrum",
    "trimmed",
    "sgd",
    "adam",
}
"""Names the result files use; a figure shows their Spanish (or display) names instead."""


@pytest.fixture
def drawn(monkeypatch):
    """The figures saved during a test."""
    saved = []
    save = figures._save

    def keep(fig, path):
        saved.append(fig)
        return save(fig, path)

    monkeypatch.setattr(figures, "_save", keep)
    return saved


def texts(fig) -> list[str]:
    return [t.get_text() for t in fig.findobj(matplotlib.text.Text) if t.get_text()]


def check(fig) -> None:
    words = " ".join(texts(fig))
    assert not MACHINE_NAMES & set(re.findall(r"[\w.]+", words)) and "_" not in words, words
    for ax in fig.axes:
        label = ax.get_ylabel()
        if label.startswith("Precisión"):
            assert ax.get_ylim()[0] == 0 or "eje desde" in label, label


def curve(*values):
    return list(values)


def test_every_results_figure_is_written_in_spanish(tmp_path, drawn):
    # Prepare: two seeds of every experiment's rows
    seeds = ("1", "2")
    course = [
        {"seed": s, "model": m, "accuracy": a, "mu": "0.01", "test_images": "10000"}
        for s in seeds
        for m, a in (
            ("fedavg", "0.97"),
            ("fedprox", "0.972"),
            ("fedmed", "0.96"),
            ("local_1", "0.975"),
            ("central", "0.985"),
        )
    ]
    init = [
        {"seed": s, "init": i, "accuracy": a, "test_images": "10000"}
        for s in seeds
        for i, a in (("compartida", "0.97"), ("independiente", "0.1"))
    ]
    attack = [
        {
            "partition": p,
            "attack": a,
            "malicious": f,
            "seed": s,
            "method": m,
            "final_accuracy": "0.5",
            "diverged": str(a == "gaussian" and m == "fedavg"),
            "test_images": "10000",
        }
        for p in ("iid", "dirichlet_0.3")
        for a, f in (("none", "0"), ("gaussian", "2"))
        for s in seeds
        for m in ("fedavg", "fedprox", "bulyan")
    ]
    drift = [
        {
            "seed": s,
            "partition": p,
            "optimizer": o,
            "learning_rate": "0.05",
            "momentum": "0.9",
            "epochs": e,
            "update_norm": "3",
            "update_cosine": "0.4",
            "barrier": "0.2",
            "barrier_images": "1000",
            "locals_accuracy": "0.95",
            "fedavg_accuracy": "0.9",
            "fedprox_accuracy": "0.93",
            "test_images": "10000",
        }
        for s in seeds
        for p in ("iid", "shards_2")
        for o in ("sgd", "adam")
        for e in ("1", "2")
    ]
    mu_rows = [
        {"mu": m, "seed": s, "final_accuracy": "0.8", "test_images": "10000"}
        for m in ("0", "0.1")
        for s in seeds
    ]
    curves = {
        0.0: [curve(0.5, None, 0.7), curve(0.6, None, 0.8)],
        0.1: [curve(0.5, None, 0.9), curve(0.6, None, 0.9)],
    }

    # Execute
    paths = [
        figures.plot_course(course, tmp_path / "curso.png"),
        figures.plot_initialisation(init, tmp_path / "inicializacion.png"),
        figures.plot_attacks(attack, tmp_path / "ataques.png"),
        *figures.plot_drift(drift, tmp_path / "deriva.png", tmp_path / "deriva_medidas.png"),
        figures.plot_fedprox_mu(mu_rows, curves, tmp_path / "fedprox_mu.png", "shards_2"),
        figures.plot_round_curves(
            {"iid": {"fedavg": curves[0.0]}, "shards_2": {"fedmed": curves[0.1]}},
            tmp_path / "heterogeneidad.png",
            "Precisión por ronda",
            10_000,
        ),
    ]

    # Assert
    for path in paths:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(drawn) == len(paths)
    for fig in drawn:
        check(fig)
    joined = " ".join(texts(drawn[0]))
    assert "Ampliado: el eje empieza en" in joined  # accuracies near 97 %: a zoomed twin panel, said so
    assert "Precisión en las 10 000 imágenes de test (%)" in joined
    assert "div.\n2/2" in " ".join(texts(drawn[2]))  # FedAvg under the Gaussian attack diverged in both seeds
    assert "fragmentos (2 por cliente)" in " ".join(texts(drawn[-1]))


def test_privacy_figure_marks_each_epsilon_spent(tmp_path, drawn):
    # Prepare: two K, a baseline (no target) and two targets whose spent ε are not round numbers
    rows = [
        {"clients": k, "clients_per_round": k // 10, "target_epsilon": t, "epsilon": e, "final_accuracy": a}
        for k in (100, 1000)
        for t, e, a in (("", "", "0.99"), ("8", "7.91", "0.97"), ("2", "2.004", "0.95"))
    ]

    # Execute
    path = figures.plot_privacy(rows, tmp_path / "privacidad.png")

    # Assert
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (fig,) = drawn
    check(fig)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["2", "7.9"]
    low, high = ax.get_xlim()
    assert low < 2.004 and high > 7.91
    assert len([line for line in ax.get_lines() if line.get_linestyle() == ":"]) == 2  # one baseline per K
