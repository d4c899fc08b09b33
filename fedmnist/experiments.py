"""The experiments behind ``ensayo_aprendizaje_federado.md``, reproducible with one command.

``fedmnist experiments --profile quick|full --out resultados`` runs every experiment of the essay
on the real MNIST with the shared CNN, the same seed and initial weights for every method, and writes
small result files (CSV, JSON, PNG) plus ``entorno.json`` (command, seeds, software versions).
``render_tables`` turns those files into the Markdown tables the essay quotes; a test checks that
the essay's tables equal what the committed files give.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import platform
import re
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from fedmnist.config import DEFAULT_SEED
from fedmnist.errors import ConfigError
from fedmnist.io import atomic_write_text

log = logging.getLogger(__name__)

COURSE_CSV = "curso.csv"
INIT_CSV = "inicializacion.csv"
HETERO_CSV = "heterogeneidad.csv"
PROX_CSV = "fedprox_mu.csv"
ATTACK_CSV = "ataques.csv"
MCMAHAN_CSV = "mcmahan.csv"
MCMAHAN_TUNING_CSV = "mcmahan_ajuste.csv"
PRIVACY_CSV = "privacidad.csv"
TEAM_PRIVACY_CSV = "privacidad_equipo.csv"
ENV_FILE = "entorno.json"
EXPERIMENTS = ("course", "heterogeneity", "fedprox_mu", "attacks", "mcmahan", "privacy")

# McMahan et al. 2017, Table 2 (CNN, E = 5, B = 10, C = 0.1): rounds to 99% test accuracy.
MCMAHAN_PAPER_ROUNDS = {"iid": 20, "shards": 229}
MCMAHAN_GOAL_ROUNDS = {"iid": 15, "shards": 120}
"""The rounds to 99% the best method must not exceed (issue 14), well under the paper's."""
MCMAHAN_TARGETS = (0.97, 0.98, 0.99)
MCMAHAN_METHODS = ("fedavg", "fedprox", "fedmed", "fedavgm", "fedadam", "fedyogi", "fedadagrad", "scaffold")
MCMAHAN_GRID: dict[str, dict[str, tuple[float, ...]]] = {
    # FedAvg's local rate first; the others keep it and tune their own parameter
    "fedavg": {"learning_rate": (0.025, 0.05, 0.1, 0.2, 0.4)},
    "fedprox": {"mu": (0.001, 0.01, 0.1)},
    "fedavgm": {"server_momentum": (0.3, 0.5, 0.7)},
    "fedadam": {"server_lr": (0.003, 0.01, 0.03, 0.1)},
    "fedyogi": {"server_lr": (0.003, 0.01, 0.03, 0.1)},
    "fedadagrad": {"server_lr": (0.01, 0.03, 0.1, 0.3)},
}
"""Candidate settings of the McMahan runs, per method (product of the values); methods absent here
(FedMed, SCAFFOLD with the paper's η_g = 1) take FedAvg's chosen local rate untuned."""


@dataclass(frozen=True)
class Profile:
    """How much of each experiment to run; ``quick`` is CI-sized, ``full`` is the essay's."""

    name: str
    seeds: tuple[int, ...]
    course_epochs: int = 2
    course_train_subset: int | None = None
    course_test_subset: int | None = None
    course_mu: float = 0.01
    clients: int = 10
    train_subset: int = 10_000
    rounds: int = 10
    local_epochs: int = 1
    batch_size: int = 32
    round_test_subset: int | None = 2_000
    alphas: tuple[float, ...] = (1.0, 0.3, 0.1)
    prox_mus: tuple[float, ...] = (0.0, 0.01, 0.1, 1.0)
    prox_partition: str = "shards"
    attacks: tuple[str, ...] = ("gaussian", "signflip")
    malicious_counts: tuple[int, ...] = (0, 1, 2)
    attack_methods: tuple[str, ...] = ("fedavg", "fedmed", "trimmed", "krum")
    attack_rounds: int = 8
    attack_train_subset: int = 5_000
    mcmahan: tuple[tuple[str, int, int], ...] = ()
    """(split, tuning rounds, maximum rounds) of McMahan's protocol: ``mcmahan_methods`` tuned on the
    validation split for the tuning rounds, then run until 99% or the maximum (see ``run_mcmahan``)."""
    mcmahan_methods: tuple[str, ...] = MCMAHAN_METHODS
    mcmahan_grid: dict[str, dict[str, tuple[float, ...]]] = field(
        default_factory=lambda: {m: dict(g) for m, g in MCMAHAN_GRID.items()})
    mcmahan_validation: int = 6_000
    """Training images held out as the tuning runs' validation set."""
    dp_clients: tuple[int, ...] = (100, 1000)
    """Federation sizes K of the DP-FedAvg runs (IID, equal parts, C = ``dp_fraction``)."""
    dp_noises: tuple[float, ...] = (0.0, 1.0, 2.0, 4.0)
    dp_rounds: int = 20
    dp_fraction: float = 0.1
    dp_train_subset: int | None = None
    dp_eval_every: int = 5
    dp_team_noises: tuple[float, ...] = (1.0, 4.0, 16.0)


PROFILES: dict[str, Profile] = {
    "quick": Profile(
        name="quick", seeds=(DEFAULT_SEED,), course_epochs=1, course_train_subset=3_000,
        course_test_subset=1_000, clients=5, train_subset=1_500, rounds=2, round_test_subset=500,
        alphas=(0.3,), prox_mus=(0.0, 0.1), attacks=("gaussian",), malicious_counts=(0, 1),
        attack_methods=("fedavg", "fedmed"), attack_rounds=2, attack_train_subset=1_500,
        mcmahan=(("iid", 1, 1),), mcmahan_methods=("fedavg",), mcmahan_grid={},
        dp_clients=(20,), dp_noises=(0.0, 1.0), dp_rounds=2, dp_train_subset=2_000, dp_eval_every=1,
        dp_team_noises=(1.0,),
    ),
    "full": Profile(
        name="full", seeds=(42, 43), train_subset=5_000, rounds=8, attack_rounds=6,
        attack_train_subset=4_000,
        mcmahan=(("iid", 5, 30), ("shards", 10, 120)),
    ),
}


def _csv_text(rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{v:.6f}" if isinstance(v, float) else v) for k, v in row.items()})
    return buffer.getvalue()


def _write_csv(path: Path, rows: list[dict]) -> None:
    atomic_write_text(path, _csv_text(rows))


def read_csv(path: str | Path) -> list[dict]:
    """Rows of a result CSV as dicts of strings."""
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


# --- experiment 1 and 2: the course flow, and shared versus independent initialisation ----------


def run_course(profile: Profile, mnist, out_dir: Path, trainer, say) -> list[dict]:
    """One round of the course (5 IID clients) per seed: locals, FedAvg/FedProx/FedMed, central model.

    Also averages clients trained from *independent* random initialisations (one-shot FedAvg), the
    failure that makes a shared starting point necessary.
    """
    from fedmnist.aggregation import run_aggregation
    from fedmnist.data import normalize_images
    from fedmnist.evaluation import evaluate
    from fedmnist.exchange import make_global
    from fedmnist.local import make_update, train_member
    from fedmnist.model import initial_weights
    from fedmnist.partition import PartitionConfig, partition
    from fedmnist.strategies import weighted_average
    from fedmnist.training import TrainConfig

    n_train = profile.course_train_subset or mnist.y_train.size
    n_test = profile.course_test_subset or mnist.y_test.size
    x_all = normalize_images(mnist.x_train[:n_train])
    y_all = mnist.y_train[:n_train]
    x_test, y_test = normalize_images(mnist.x_test[:n_test]), mnist.y_test[:n_test]
    rows, init_rows = [], []
    for seed in profile.seeds:
        t0 = time.perf_counter()
        parts = partition(y_all, PartitionConfig("iid", 5, seed=seed))
        start = make_global(initial_weights(seed), 0, "init", seed)
        # the essay's course section studies the aggressive setting (plain SGD, lr 0.05, momentum 0.9), where
        # client drift shows; it is spelled out so that changing the member job's defaults keeps these numbers
        plain = TrainConfig(epochs=profile.course_epochs, optimizer="sgd", learning_rate=0.05, momentum=0.9,
                            seed=seed)
        prox = replace(plain, mu=profile.course_mu)
        updates = {}
        for label, config in (("plain", plain), ("prox", prox)):
            updates[label] = []
            for k, idx in enumerate(parts, start=1):
                result = train_member(trainer, start, x_all[idx], y_all[idx], config, k)
                updates[label].append(make_update(result, start, config, k))
                say(f"  course seed {seed}: client {k} ({label}) trained")
        report = run_aggregation(updates["plain"], x_test, y_test, prox_updates=updates["prox"],
                                 evaluator=trainer, start=start)
        for name, r in report.methods.items():
            rows.append({"seed": seed, "model": name, **_metrics(r.evaluation)})
        for update, evaluation in report.locals_:
            rows.append({"seed": seed, "model": f"local_{update.client_id}", **_metrics(evaluation)})
        central = train_member(trainer, start, x_all, y_all, plain, 0)
        rows.append({"seed": seed, "model": "central", **_metrics(evaluate(trainer, central.weights, x_test, y_test))})

        independent = []
        for k, idx in enumerate(parts, start=1):
            own_start = make_global(initial_weights(seed * 1000 + k), 0, "init", seed * 1000 + k)
            result = train_member(trainer, own_start, x_all[idx], y_all[idx], plain, k)
            independent.append((result.weights, result.num_examples))
        shared = [(u.weights, u.num_examples) for u in updates["plain"]]
        for label, results in (("compartida", shared), ("independiente", independent)):
            averaged = weighted_average(results)
            init_rows.append({"seed": seed, "init": label, **_metrics(evaluate(trainer, averaged, x_test, y_test))})
        say(f"  course seed {seed} done in {time.perf_counter() - t0:.0f} s")
    _write_csv(out_dir / COURSE_CSV, rows)
    _write_csv(out_dir / INIT_CSV, init_rows)
    _plot_course(rows, out_dir / "curso.png")
    return rows


def _metrics(evaluation) -> dict:
    return {"accuracy": float(evaluation.accuracy), "ci_low": float(evaluation.ci_low),
            "ci_high": float(evaluation.ci_high), "loss": float(evaluation.loss)}


def _plot_course(rows: list[dict], path: Path) -> None:
    """Course-flow bars (mean ± spread over seeds) from ``curso.csv`` rows."""
    from fedmnist.plots import method_label, plot_method_comparison

    def summary(name: str) -> tuple[str, float, float, float]:
        acc = np.array([float(r["accuracy"]) for r in rows if r["model"] == name])
        spread = acc.std(ddof=1) if acc.size > 1 else 0.0
        label = {"central": "Central"}.get(name, method_label(name).replace("local_", "local "))
        return label, float(acc.mean()), float(acc.mean() - spread), float(acc.mean() + spread)

    names = list(dict.fromkeys(r["model"] for r in rows))
    globals_ = [summary(n) for n in names if not n.startswith("local_")]
    locals_ = [summary(n) for n in names if n.startswith("local_")]
    plot_method_comparison(globals_, locals_, path,
                           title="Flujo del curso (5 clientes IID, 1 ronda): media ± desv. entre semillas")


# --- experiments 3 to 6: multi-round simulations --------------------------------------------------


def _simulate(config, mnist, out_dir: Path, trainer, full_test, resume: bool = False) -> dict:
    """Run one simulation quietly and evaluate its final models on the full test set.

    With ``resume``, a checkpoint left in ``out_dir`` by the same configuration is continued (its
    numbers equal an uninterrupted run's); one from another configuration is ignored.
    """
    from fedmnist.checkpoint import load_checkpoint
    from fedmnist.evaluation import evaluate
    from fedmnist.federation import prepare_federation
    from fedmnist.simulation import CHECKPOINT_FILE, run_simulation

    training = config.training
    if (trainer.optimizer_name, trainer.learning_rate, trainer.momentum) != (
        training.optimizer, training.learning_rate, training.momentum if training.optimizer == "sgd" else 0.0
    ):
        trainer = None  # the simulation builds one with the config's optimizer
    if resume and (out_dir / CHECKPOINT_FILE).exists():
        try:
            load_checkpoint(out_dir / CHECKPOINT_FILE, config,
                            prepare_federation(config.federation, config.seed, mnist=mnist).sha256)
        except ConfigError as exc:
            log.warning("not resuming %s, starting it afresh: %s", out_dir, exc)
            resume = False
    result = run_simulation(config, out_dir=out_dir, progress=False, resume=resume, trainer=trainer,
                            mnist=mnist, workers=WORKERS.get("workers"))
    trainer = trainer or _evaluator()
    final = {m: evaluate(trainer, w, *full_test) for m, w in result.final_weights.items()}
    return {"result": result, "final": final}


_EVALUATOR = []
WORKERS: dict[str, int | str] = {}
"""``run_experiments(workers=...)``: the simulations' worker processes (empty: in this process)."""


def _evaluator():
    from fedmnist.training import ClientTrainer

    if not _EVALUATOR:
        _EVALUATOR.append(ClientTrainer())
    return _EVALUATOR[0]


def _sim_config(profile: Profile, seed: int, **changes):
    from fedmnist.simulation import SimulationConfig

    base = SimulationConfig.create(
        num_clients=profile.clients, fraction=1.0, rounds=profile.rounds, local_epochs=profile.local_epochs,
        batch_size=profile.batch_size, train_subset=profile.train_subset,
        test_subset=profile.round_test_subset, seed=seed, target_accuracy=0.95,
    )
    return base.replace(**changes)


def run_heterogeneity(profile: Profile, mnist, out_dir: Path, trainer, full_test, say) -> list[dict]:
    """IID versus Dirichlet(α) versus 2-shard splits, for FedAvg, FedProx and FedMed."""
    splits = [("iid", {"partition": "iid"})]
    splits += [(f"dirichlet_{a:g}", {"partition": "dirichlet", "alpha": a}) for a in profile.alphas]
    splits += [("shards_2", {"partition": "shards", "shards_per_client": 2})]
    rows = []
    curves = {}
    for label, changes in splits:
        config = _sim_config(profile, profile.seeds[0], methods=("fedavg", "fedprox", "fedmed"), **changes)
        run = _simulate(config, mnist, out_dir / "simulaciones" / f"heterogeneidad_{label}", trainer, full_test)
        for method, evaluation in run["final"].items():
            rows.append({"partition": label, "method": method, "rounds": config.rounds,
                         "final_accuracy": float(evaluation.accuracy), "ci_low": float(evaluation.ci_low),
                         "ci_high": float(evaluation.ci_high),
                         "rounds_to_95": _or_none(run["result"].rounds_to_target[method])})
        curves[label] = run["result"].curves()
        say(f"  heterogeneity {label} done")
    _write_csv(out_dir / HETERO_CSV, rows)
    _plot_curves_grid(curves, out_dir / "heterogeneidad.png", "Precisión por ronda según la partición")
    return rows


def _or_none(value):
    return "" if value is None else value


def run_fedprox_mu(profile: Profile, mnist, out_dir: Path, trainer, full_test, say) -> list[dict]:
    """FedProx with μ ∈ profile.prox_mus on the most heterogeneous split (μ = 0 is FedAvg)."""
    rows, curves = [], {}
    for mu in profile.prox_mus:
        method = "fedprox" if mu > 0 else "fedavg"  # FedProx with mu = 0 is FedAvg
        config = _sim_config(profile, profile.seeds[0], methods=(method,), mu=mu if mu > 0 else 0.01,
                             partition=profile.prox_partition, shards_per_client=2, alpha=0.1)
        run = _simulate(config, mnist, out_dir / "simulaciones" / f"fedprox_mu_{mu:g}", trainer, full_test)
        evaluation = run["final"][method]
        acc_curve = run["result"].curves()[method]
        rows.append({"mu": f"{mu:g}", "partition": profile.prox_partition, "rounds": config.rounds,
                     "final_accuracy": float(evaluation.accuracy), "ci_low": float(evaluation.ci_low),
                     "ci_high": float(evaluation.ci_high),
                     "mean_last3_round_accuracy": float(np.nanmean(acc_curve[-3:]))})
        curves[f"μ = {mu:g}"] = acc_curve
        say(f"  fedprox mu={mu:g} done")
    _write_csv(out_dir / PROX_CSV, rows)
    from fedmnist.plots import plot_accuracy_per_round

    plot_accuracy_per_round(curves, out_dir / "fedprox_mu.png",
                            title=f"FedProx según μ (partición {profile.prox_partition})")
    return rows


def run_attacks(profile: Profile, mnist, out_dir: Path, trainer, full_test, say) -> list[dict]:
    """0, 1 and 2 malicious clients of 10 (each attack), FedAvg versus robust rules."""
    rows = []
    cases = [(0, None)] + [(f, a) for a in profile.attacks for f in profile.malicious_counts if f > 0]
    for count, attack in cases:
        config = _sim_config(profile, profile.seeds[0], methods=profile.attack_methods,
                             rounds=profile.attack_rounds, train_subset=profile.attack_train_subset,
                             num_malicious=count, attack=attack, krum_f=max(count, 1))
        label = "sin_ataque" if attack is None else f"{attack}_{count}"
        run = _simulate(config, mnist, out_dir / "simulaciones" / f"ataques_{label}", trainer, full_test)
        for method, evaluation in run["final"].items():
            rows.append({"attack": attack or "ninguno", "malicious": count, "method": method,
                         "rounds": config.rounds, "final_accuracy": float(evaluation.accuracy),
                         "ci_low": float(evaluation.ci_low), "ci_high": float(evaluation.ci_high)})
        say(f"  attacks {label} done")
    _write_csv(out_dir / ATTACK_CSV, rows)
    return rows


def run_mcmahan(profile: Profile, mnist, out_dir: Path, trainer, full_test, say) -> list[dict]:
    """McMahan et al. 2017's protocol (100 clients × 600, C = 0.1, E = 5, B = 10): rounds to 97/98/99%.

    Per split: every method's hyper-parameters are tuned on a validation split of the training set
    (``_tune_mcmahan``), then each method runs the full protocol in its own directory
    (``simulaciones/mcmahan_<split>_<method>``) until it reaches 99% on the 10,000 test images or the
    maximum number of rounds. All runs share the seed, hence the federation, the initial weights and
    the clients sampled each round. Every run continues its checkpoint, so an interrupted command
    rerun picks up where it stopped, and a raised maximum continues a finished run.
    """
    from fedmnist.model import initial_weights
    from fedmnist.simulation import PRESETS

    seed = profile.seeds[0]
    reply_mb = sum(w.nbytes for w in initial_weights(seed)) / 1e6
    rows, tuning_rows, curves = [], [], {}
    for split, tuning_rounds, max_rounds in profile.mcmahan:
        preset = PRESETS["mcmahan-iid" if split == "iid" else "mcmahan-noniid"].replace(seed=seed)
        chosen, trials = _tune_mcmahan(profile, preset, split, tuning_rounds, mnist, out_dir, trainer, say)
        tuning_rows += trials
        curves[split] = {}
        for method in profile.mcmahan_methods:
            config = preset.replace(rounds=max_rounds, methods=(method,), stop_at_target=True,
                                    target_accuracy=MCMAHAN_TARGETS[-1], **chosen[method])
            run = _simulate(config, mnist, out_dir / "simulaciones" / f"mcmahan_{split}_{method}", trainer,
                            full_test, resume=True)
            result = run["result"]
            curve = result.curves()[method]
            curves[split][method] = curve
            # SCAFFOLD's clients send their control-variate delta beside the weights: twice the bytes
            per_reply = reply_mb * (2 if method == "scaffold" else 1)
            per_client_round = per_reply * config.clients_per_round / config.federation.num_clients
            row = {"split": split, "method": method, "learning_rate": config.training.learning_rate,
                   "settings": _settings_text(chosen[method]), "max_rounds": max_rounds, "rounds_run": len(curve)}
            for target in MCMAHAN_TARGETS:
                reached = _first_round(curve, target)
                row[f"rounds_to_{round(target * 100)}"] = _or_none(reached)
                row[f"mb_per_client_to_{round(target * 100)}"] = (
                    None if reached is None else round(reached * per_client_round, 2))
            row.update({"best_round_accuracy": float(np.nanmax(curve)), "final_accuracy": float(run["final"][method].accuracy),
                        "mb_per_reply": round(per_reply, 4), "paper_rounds_to_99": MCMAHAN_PAPER_ROUNDS[split],
                        "run_seconds": round(sum(r.round_seconds for r in result.metrics[method]), 1)})
            rows.append(row)
            say(f"  mcmahan {split} {method}: {row['rounds_to_99'] or 'no 99%'} in {len(curve)} rounds")
        if rows:
            _write_csv(out_dir / MCMAHAN_CSV, rows)
        if tuning_rows:
            _write_csv(out_dir / MCMAHAN_TUNING_CSV, tuning_rows)
        _plot_mcmahan(curves[split], split, out_dir / f"mcmahan_{split}.png")
    return rows


def _tune_mcmahan(profile: Profile, preset, split: str, rounds: int, mnist, out_dir: Path, trainer, say
                  ) -> tuple[dict[str, dict], list[dict]]:
    """Each method's settings chosen by validation accuracy after ``rounds`` rounds; the trials as rows.

    The tuning federation is McMahan's (100 clients, the same split scheme) built from the training set
    minus ``profile.mcmahan_validation`` held-out images, which serve as its test set. FedAvg's local
    rate is chosen first and becomes the local rate of every method whose grid does not set its own.
    A method with one candidate is not tuned.
    """
    from fedmnist.data import normalize_images
    from fedmnist.tuning import Trial, best, candidate_label, candidates, tuning_score, validation_split

    tuning_mnist = validation_split(mnist, profile.mcmahan_validation, preset.seed)
    validation = (normalize_images(tuning_mnist.x_test), tuning_mnist.y_test)
    base = preset.replace(rounds=rounds, stop_at_target=False)
    order = sorted(profile.mcmahan_methods, key=lambda m: m != "fedavg")
    shared: dict[str, float] = {}
    chosen, rows = {}, []
    for method in order:
        options = candidates(profile.mcmahan_grid.get(method, {}))
        if len(options) == 1:
            chosen[method] = {**shared, **options[0]}
            shared.update({k: v for k, v in chosen[method].items() if method == "fedavg" and k == "learning_rate"})
            continue
        trials = []
        for option in options:
            settings = {**shared, **option}
            config = base.replace(methods=(method,), **settings)
            name = f"ajuste_{split}_{method}_{candidate_label(settings)}"
            run = _simulate(config, tuning_mnist, out_dir / "simulaciones" / name, trainer, validation, resume=True)
            curve = run["result"].curves()[method]
            seconds = sum(r.round_seconds for r in run["result"].metrics[method])
            trials.append(Trial(method, settings, tuple(curve), tuning_score(curve), seconds))
            say(f"  tuning {split} {method} {candidate_label(settings)}: validation {trials[-1].score:.4f}")
        winner = best(trials)
        chosen[method] = dict(winner.settings)
        if method == "fedavg" and "learning_rate" in winner.settings:
            shared["learning_rate"] = winner.settings["learning_rate"]
        for trial in trials:
            rows.append({"split": split, "method": method, "settings": _settings_text(trial.settings),
                         "tuning_rounds": rounds, "validation_images": profile.mcmahan_validation,
                         "last_validation_accuracy": float(trial.curve[-1]), "score": trial.score,
                         "chosen": trial is winner, "run_seconds": round(trial.seconds, 1)})
    return chosen, rows


def _settings_text(settings: dict) -> str:
    return " ".join(f"{k}={v:g}" for k, v in settings.items())


def _first_round(curve: list[float], target: float) -> int | None:
    return next((i for i, v in enumerate(curve, start=1) if v is not None and v >= target), None)


def _plot_mcmahan(curves: dict[str, list[float]], split: str, path: Path) -> None:
    """Every method's test accuracy per round (10,000 images), zoomed on 90-100% with the targets marked."""
    import matplotlib.pyplot as plt

    from fedmnist.io import atomic_path
    from fedmnist.plots import method_label

    fig, ax = plt.subplots(figsize=(8, 4.8))
    for method, values in curves.items():
        ax.plot(np.arange(1, len(values) + 1), np.asarray(values, dtype=float) * 100, marker="o",
                markersize=2.5, linewidth=1.2, label=method_label(method))
    for target in MCMAHAN_TARGETS:
        ax.axhline(target * 100, color="black", linestyle=":", linewidth=0.8)
    ax.axvline(MCMAHAN_GOAL_ROUNDS[split], color="grey", linestyle="--", linewidth=0.8,
               label=f"objetivo: {MCMAHAN_GOAL_ROUNDS[split]} rondas")
    ax.set_ylim(90, 100)
    ax.set_xlabel("Ronda")
    ax.set_ylabel("Precisión en las 10 000 imágenes de test (%)\n(eje desde 90 %)")
    partition = "IID" if split == "iid" else "no IID patológica (2 fragmentos por cliente)"
    ax.set_title(f"Protocolo de McMahan, partición {partition}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2, loc="lower right")
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png")
    plt.close(fig)


def median_update_norm(config, mnist) -> float:
    """Median L2 norm of the round-1 updates of the clients sampled in round 1, trained without DP.

    The clip norm S of the DP runs is set to it (Andrew et al. 2021 aim at this quantile), from
    training data only. It is not itself private: a real deployment would take S from a public
    proxy, or use adaptive clipping (``--dp-adaptive``).
    """
    from fedmnist.federation import prepare_federation
    from fedmnist.model import initial_weights
    from fedmnist.privacy import client_update, update_norm
    from fedmnist.seeds import training_seed
    from fedmnist.simulation import sample_clients
    from fedmnist.training import ClientTrainer

    fed = prepare_federation(config.federation, config.seed, mnist=mnist)
    training = config.training
    trainer = ClientTrainer(training.optimizer, training.learning_rate, training.momentum)
    start = initial_weights(config.seed)
    norms = []
    for client_id in sample_clients(config, 1):
        x, y = fed.client_data(client_id)
        trained = trainer.train(start, x, y, epochs=training.epochs, batch_size=training.batch_size,
                                seed=training_seed(config.seed, 1, client_id))
        norms.append(update_norm(client_update(trained.weights, start)))
    return float(f"{np.median(norms):.2g}")


def run_privacy(profile: Profile, mnist, out_dir: Path, trainer, full_test, say) -> list[dict]:
    """DP-FedAvg (server-side fixed clipping) on K = 100 and 1,000 IID clients for several noise levels z.

    McMahan et al. 2017's local training (E = 1 here, B = 10, SGD 0.05), C = 0.1, every z on the same
    federations and seeds; z = 0 clips without noise (ε = ∞), the non-private reference. Also what a
    5-member course team would get (``privacidad_equipo.csv``).
    """
    from fedmnist.privacy import clients_needed, privacy_verdict
    from fedmnist.simulation import SimulationConfig

    rows = []
    curves: dict[str, dict[str, list[float]]] = {}
    for num_clients in profile.dp_clients:
        base = SimulationConfig.create(
            num_clients=num_clients, fraction=profile.dp_fraction, rounds=profile.dp_rounds, local_epochs=1,
            batch_size=10, optimizer="sgd", learning_rate=0.05, momentum=0.0, partition="iid",
            methods=("fedavg",), train_subset=profile.dp_train_subset, eval_every=profile.dp_eval_every,
            target_accuracy=0.95,
        )
        clip = median_update_norm(base.replace(seed=profile.seeds[0]), mnist)
        say(f"  privacy K={num_clients}: clip norm S = {clip:g}")
        for z in profile.dp_noises:
            for seed in profile.seeds:
                config = base.replace(seed=seed, dp_noise=z, dp_clip=clip)
                name = f"privacidad_K{num_clients}_z{z:g}_s{seed}"
                run = _simulate(config, mnist, out_dir / "simulaciones" / name, trainer, full_test, resume=True)
                records = run["result"].metrics["fedavg"]
                last = records[-1]
                evaluation = run["final"]["fedavg"]
                rows.append({"clients": num_clients, "clients_per_round": config.clients_per_round,
                             "noise_multiplier": z, "clip": clip, "seed": seed, "rounds": last.round,
                             "rounds_without_update": sum(r.num_replies == 0 for r in records),
                             "final_loss": float(evaluation.loss),
                             "epsilon": "inf" if last.epsilon is None or not np.isfinite(last.epsilon)
                             else round(last.epsilon, 4),
                             "delta": last.delta, "noise_std": z * clip / config.clients_per_round,
                             "final_accuracy": float(evaluation.accuracy), "ci_low": float(evaluation.ci_low),
                             "ci_high": float(evaluation.ci_high)})
                if seed == profile.seeds[0]:
                    curves.setdefault(f"K = {num_clients}", {})[f"z = {z:g}"] = run["result"].curves()["fedavg"]
                say(f"  privacy K={num_clients} z={z:g} seed {seed} done")
    _write_csv(out_dir / PRIVACY_CSV, rows)
    team = []
    for z in profile.dp_team_noises:
        from fedmnist.privacy import PrivacyAccountant

        accountant = PrivacyAccountant(z, 5, 5, 1e-5)
        verdict = privacy_verdict(accountant, profile.dp_rounds)
        needed = clients_needed(2.0, profile.dp_rounds, profile.dp_fraction, mean_noise_std=z / 5, delta=1e-5)
        team.append({"noise_multiplier": z, "rounds": profile.dp_rounds, "epsilon": round(verdict.epsilon, 4),
                     "delta": verdict.delta, "meaningful": verdict.meaningful,
                     "noise_std_over_clip": z / 5,
                     "clients_for_epsilon_2": needed.num_clients if needed else "",
                     "their_noise_multiplier": round(needed.noise_multiplier, 4) if needed else ""})
    _write_csv(out_dir / TEAM_PRIVACY_CSV, team)
    _plot_privacy(rows, out_dir / "privacidad.png")
    return rows


def _plot_privacy(rows: list[dict], path: Path) -> None:
    """Final accuracy against ε (log scale), one line per K, mean over seeds with their range."""
    import matplotlib.pyplot as plt

    from fedmnist.io import atomic_path

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for num_clients in dict.fromkeys(r["clients"] for r in rows):
        points = []
        for z in dict.fromkeys(r["noise_multiplier"] for r in rows if r["clients"] == num_clients):
            sel = [r for r in rows if r["clients"] == num_clients and r["noise_multiplier"] == z]
            acc = np.array([r["final_accuracy"] for r in sel]) * 100
            eps = float("inf") if sel[0]["epsilon"] == "inf" else float(np.mean([r["epsilon"] for r in sel]))
            points.append((eps, acc.mean(), acc.min(), acc.max(), z))
        finite = sorted(p for p in points if np.isfinite(p[0]))
        line = ax.errorbar([p[0] for p in finite], [p[1] for p in finite],
                           yerr=[[p[1] - p[2] for p in finite], [p[3] - p[1] for p in finite]],
                           marker="o", capsize=3, label=f"K = {num_clients} (m = {num_clients // 10} por ronda)")
        for p in points:
            if not np.isfinite(p[0]):
                ax.axhline(p[1], color=line[0].get_color(), linestyle=":", linewidth=1)
    from matplotlib.ticker import FixedLocator, NullFormatter, ScalarFormatter

    ax.set_xscale("log")
    ax.xaxis.set_major_locator(FixedLocator([1, 2, 5, 10, 20, 50]))
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("ε medio de las semillas (δ = 1e-5, sustitución de un cliente); barras: rango entre semillas")
    ax.set_ylabel("Precisión final en el test (%)")
    ax.set_ylim(0, 100)
    ax.set_title("DP-FedAvg: precisión frente a ε (punteado: sin ruido, z = 0)")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png")
    plt.close(fig)


def _plot_curves_grid(curves: dict[str, dict[str, list[float]]], path: Path, title: str) -> None:
    import matplotlib.pyplot as plt

    from fedmnist.io import atomic_path
    from fedmnist.plots import method_label

    fig, axes = plt.subplots(1, len(curves), figsize=(3.6 * len(curves), 3.4), sharey=True, squeeze=False)
    for ax, (label, per_method) in zip(axes[0], curves.items()):
        for method, values in per_method.items():
            ax.plot(np.arange(1, len(values) + 1), np.asarray(values) * 100, marker="o", markersize=3,
                    label=method_label(method))
        ax.set_title(label.replace("_", " "))
        ax.set_xlabel("Ronda")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("Precisión (%)")
    axes[0][0].legend()
    fig.suptitle(title)
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png")
    plt.close(fig)


# --- driver -----------------------------------------------------------------------------------


def environment(profile: Profile, out_dir: Path, seconds: dict[str, float]) -> dict:
    """Command, profile, seeds and software versions, saved beside the results."""
    import keras
    import tensorflow as tf

    from fedmnist import __version__

    try:
        import flwr

        flwr_version = flwr.__version__ if hasattr(flwr, "__version__") else "installed"
    except ImportError:
        flwr_version = None
    return {
        "command": f"fedmnist experiments --profile {profile.name} --out {out_dir.name} --data MNIST.npz",
        "profile": asdict(profile),
        "seeds": list(profile.seeds),
        "seconds_per_experiment": {k: round(v, 1) for k, v in seconds.items()},
        "seconds_note": "wall time of the latest run of each experiment; the McMahan runs continue their "
                        "checkpoints, so their total time is run_seconds in mcmahan.csv (sum of round times)",
        "software": {"fedmnist": __version__, "python": platform.python_version(),
                     "tensorflow": tf.__version__, "keras": keras.__version__, "numpy": np.__version__,
                     "flwr": flwr_version},
        "machine": {"platform": platform.platform(), "processor": platform.machine(),
                    "cpus": __import__("os").cpu_count()},
    }


def run_experiments(
    profile_name: str,
    data: str | None,
    out_dir: str | Path,
    only: tuple[str, ...] = EXPERIMENTS,
    quiet: bool = False,
    workers: int | str | None = None,
) -> dict[str, list[dict]]:
    """Run the selected experiments of a profile into ``out_dir`` (simulations in ``workers`` processes)."""
    from fedmnist.data import load_raw_mnist, normalize_images
    from fedmnist.training import ClientTrainer

    if profile_name not in PROFILES:
        raise ConfigError(f"unknown profile '{profile_name}'; choose one of {', '.join(PROFILES)}")
    unknown = [e for e in only if e not in EXPERIMENTS]
    if unknown:
        raise ConfigError(f"unknown experiment(s) {', '.join(unknown)}; choose from {', '.join(EXPERIMENTS)}")
    profile = PROFILES[profile_name]
    WORKERS.clear()
    if workers is not None:
        WORKERS["workers"] = workers
    say = (lambda *_: None) if quiet else (lambda msg: print(msg, flush=True))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    mnist = load_raw_mnist(data)
    full_test = (normalize_images(mnist.x_test), mnist.y_test)
    trainer = ClientTrainer()
    runners = {
        "course": lambda: run_course(profile, mnist, out_dir, trainer, say),
        "heterogeneity": lambda: run_heterogeneity(profile, mnist, out_dir, trainer, full_test, say),
        "fedprox_mu": lambda: run_fedprox_mu(profile, mnist, out_dir, trainer, full_test, say),
        "attacks": lambda: run_attacks(profile, mnist, out_dir, trainer, full_test, say),
        "mcmahan": lambda: run_mcmahan(profile, mnist, out_dir, trainer, full_test, say),
        "privacy": lambda: run_privacy(profile, mnist, out_dir, trainer, full_test, say),
    }
    results = {}
    env_path = out_dir / ENV_FILE
    for name in only:
        say(f"experiment {name} ({profile.name} profile)")
        t0 = time.perf_counter()
        results[name] = runners[name]()
        # merge with what other runs of the same profile (e.g. --only) recorded in this directory
        previous = json.loads(env_path.read_text()) if env_path.exists() else {}
        same = previous.get("profile", {}).get("name") == profile.name
        seconds = dict(previous.get("seconds_per_experiment", {})) if same else {}
        seconds[name] = time.perf_counter() - t0
        atomic_write_text(env_path, json.dumps(environment(profile, out_dir, seconds),
                                               indent=2, ensure_ascii=False) + "\n")
    return results


# --- tables for the essay ---------------------------------------------------------------------


def _pct(value: str | float) -> str:
    return f"{float(value) * 100:.2f}"


def _mean_spread(values: list[float]) -> str:
    arr = np.array(values, dtype=float)
    if arr.size == 1:
        return f"{arr[0] * 100:.2f}"
    return f"{arr.mean() * 100:.2f} ± {arr.std(ddof=1) * 100:.2f}"


_SETTING_SYMBOLS = {"learning_rate": "η_l", "mu": "μ", "server_lr": "η_s", "server_momentum": "β", "tau": "τ",
                    "beta_1": "β₁", "beta_2": "β₂"}


def _settings_label(text: str) -> str:
    """``learning_rate=0.2 mu=0.001`` as ``η_l = 0.2, μ = 0.001`` for the essay's tables."""
    pairs = [item.split("=", 1) for item in text.split()]
    return ", ".join(f"{_SETTING_SYMBOLS.get(k, k)} = {v}" for k, v in pairs) or "—"


def _split_label(split: str) -> str:
    return {"iid": "IID", "shards": "patológica (2 fragmentos)"}.get(split, split)


def render_tables(results_dir: str | Path) -> dict[str, str]:
    """The essay's Markdown tables, computed from the result files in ``results_dir``."""
    from fedmnist.plots import method_label

    results_dir = Path(results_dir)
    tables: dict[str, str] = {}
    if (results_dir / COURSE_CSV).exists():
        rows = read_csv(results_dir / COURSE_CSV)
        seeds = sorted({r["seed"] for r in rows})
        names = list(dict.fromkeys(r["model"] for r in rows))
        lines = ["| modelo | precisión (%) media ± desv. | pérdida media |", "|---|---|---|"]
        locals_acc = [float(r["accuracy"]) for r in rows if r["model"].startswith("local_")]
        for name in names:
            if name.startswith("local_"):
                continue
            sel = [r for r in rows if r["model"] == name]
            label = "Central (mismas épocas)" if name == "central" else method_label(name)
            lines.append(f"| {label} | {_mean_spread([float(r['accuracy']) for r in sel])} | "
                         f"{np.mean([float(r['loss']) for r in sel]):.4f} |")
        lines.append(f"| Modelos locales (5 por semilla) | {_mean_spread(locals_acc)} | "
                     f"{np.mean([float(r['loss']) for r in rows if r['model'].startswith('local_')]):.4f} |")
        tables["curso"] = "\n".join(lines) + f"\n\nSemillas: {', '.join(seeds)}."
    if (results_dir / INIT_CSV).exists():
        rows = read_csv(results_dir / INIT_CSV)
        lines = ["| inicialización | precisión de FedAvg en una ronda (%) |", "|---|---|"]
        for label in dict.fromkeys(r["init"] for r in rows):
            lines.append(f"| {label} | {_mean_spread([float(r['accuracy']) for r in rows if r['init'] == label])} |")
        tables["inicializacion"] = "\n".join(lines)
    if (results_dir / HETERO_CSV).exists():
        rows = read_csv(results_dir / HETERO_CSV)
        methods = list(dict.fromkeys(r["method"] for r in rows))
        lines = ["| partición | " + " | ".join(method_label(m) for m in methods) + " |",
                 "|---|" + "---|" * len(methods)]
        for part in dict.fromkeys(r["partition"] for r in rows):
            cells = [_pct(next(r["final_accuracy"] for r in rows if r["partition"] == part and r["method"] == m))
                     for m in methods]
            lines.append(f"| {part.replace('_', ' ')} | " + " | ".join(cells) + " |")
        tables["heterogeneidad"] = "\n".join(lines)
    if (results_dir / PROX_CSV).exists():
        rows = read_csv(results_dir / PROX_CSV)
        lines = ["| μ | precisión final (%) | media de las 3 últimas rondas (%) |", "|---|---|---|"]
        for r in rows:
            lines.append(f"| {r['mu']} | {_pct(r['final_accuracy'])} | {_pct(r['mean_last3_round_accuracy'])} |")
        tables["fedprox_mu"] = "\n".join(lines)
    if (results_dir / ATTACK_CSV).exists():
        rows = read_csv(results_dir / ATTACK_CSV)
        methods = list(dict.fromkeys(r["method"] for r in rows))
        lines = ["| ataque | maliciosos | " + " | ".join(method_label(m) for m in methods) + " |",
                 "|---|---|" + "---|" * len(methods)]
        for key in dict.fromkeys((r["attack"], r["malicious"]) for r in rows):
            cells = [_pct(next(r["final_accuracy"] for r in rows if (r["attack"], r["malicious"]) == key
                               and r["method"] == m)) for m in methods]
            lines.append(f"| {key[0]} | {key[1]} | " + " | ".join(cells) + " |")
        tables["ataques"] = "\n".join(lines)
    if (results_dir / MCMAHAN_CSV).exists():
        rows = read_csv(results_dir / MCMAHAN_CSV)
        lines = ["| partición | método | ajustes (elegidos en validación) | rondas hasta 97 / 98 / 99 % | "
                 "MB enviados por cliente hasta 99 % | mejor precisión (%) | rondas ejecutadas |",
                 "|---|---|---|---|---|---|---|"]
        for r in rows:
            reached = " / ".join(r[f"rounds_to_{t}"] or "—" for t in (97, 98, 99))
            mb = f"{float(r['mb_per_client_to_99']):.2f}" if r["mb_per_client_to_99"] else "—"
            lines.append(f"| {_split_label(r['split'])} | {method_label(r['method'])} | {_settings_label(r['settings'])} | "
                         f"{reached} | {mb} | {_pct(r['best_round_accuracy'])} | {r['rounds_run']} |")
        paper = {r["split"]: r["paper_rounds_to_99"] for r in rows}
        tables["mcmahan"] = "\n".join(lines) + "\n\n— : no alcanzado en las rondas ejecutadas. MB por cliente: lo que " \
            "sube el conjunto de los clientes hasta esa ronda (rondas × 10 respuestas × MB por respuesta) repartido " \
            "entre los 100. Artículo (FedAvg, CNN de 1,66 M parámetros): " + \
            ", ".join(f"{paper[s]} rondas {_split_label(s)}" for s in paper) + "."
    if (results_dir / MCMAHAN_TUNING_CSV).exists():
        rows = read_csv(results_dir / MCMAHAN_TUNING_CSV)
        lines = ["| partición | método | candidato | precisión de validación (%), media de las 2 últimas rondas | "
                 "elegido |", "|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {_split_label(r['split'])} ({r['tuning_rounds']} rondas) | {method_label(r['method'])} | "
                         f"{_settings_label(r['settings'])} | {_pct(r['score'])} | {'sí' if r['chosen'] == 'True' else ''} |")
        tables["mcmahan_ajuste"] = "\n".join(lines)
    if (results_dir / PRIVACY_CSV).exists():
        rows = read_csv(results_dir / PRIVACY_CSV)
        lines = ["| K (m por ronda) | S | z | ruido en la media (σ = z·S/m) | ε final (δ = 1e-5) | "
                 "precisión final (%) por semilla | media (%) | rondas sin respuesta válida |",
                 "|---|---|---|---|---|---|---|---|"]
        for key in dict.fromkeys((r["clients"], r["noise_multiplier"]) for r in rows):
            sel = [r for r in rows if (r["clients"], r["noise_multiplier"]) == key]
            first = sel[0]
            eps = "∞ (sin ruido)" if first["epsilon"] == "inf" else \
                " / ".join(f"{float(r['epsilon']):.2f}" for r in sel)
            accs = [float(r["final_accuracy"]) for r in sel]
            lines.append(f"| {first['clients']} ({first['clients_per_round']}) | {float(first['clip']):g} | "
                         f"{float(first['noise_multiplier']):g} | {float(first['noise_std']):.4f} | {eps} | "
                         f"{' / '.join(_pct(a) for a in accs)} | {np.mean(accs) * 100:.2f} | "
                         f"{' / '.join(r['rounds_without_update'] for r in sel)} |")
        tables["privacidad"] = "\n".join(lines) + f"\n\n{sel[0]['rounds']} rondas; semillas: " + \
            ", ".join(dict.fromkeys(r["seed"] for r in rows)) + "."
    if (results_dir / TEAM_PRIVACY_CSV).exists():
        rows = read_csv(results_dir / TEAM_PRIVACY_CSV)
        lines = ["| z (5 miembros, todos en cada ronda) | rondas | ε (δ = 1e-5) | ¿con sentido (ε ≤ 10)? | "
                 "clientes necesarios para ε ≤ 2 con el mismo ruido en la media (C = 0.1) |", "|---|---|---|---|---|"]
        for r in rows:
            verdict = "sí" if r["meaningful"] == "True" else "no"
            lines.append(f"| {float(r['noise_multiplier']):g} | {r['rounds']} | {float(r['epsilon']):.1f} | {verdict} | "
                         f"{r['clients_for_epsilon_2'] or 'más de 10⁷'} |")
        tables["privacidad_equipo"] = "\n".join(lines)
    return tables


TABLE_BLOCK = re.compile(
    r"<!-- tabla:(?P<name>[\w-]+) -->\n(?P<body>(?:(?!<!--).)*?)\n?<!-- /tabla -->", re.DOTALL
)


def essay_tables(text: str) -> dict[str, str]:
    """The generated table blocks of the essay, by name."""
    return {m.group("name"): m.group("body").strip() for m in TABLE_BLOCK.finditer(text)}


def fill_essay_tables(text: str, tables: dict[str, str]) -> str:
    """Replace every table block of the essay with the table rendered from the result files."""
    def body(match: re.Match) -> str:
        name = match.group("name")
        if name not in tables:
            raise ConfigError(f"the essay quotes table '{name}', but the results have no such table")
        return f"<!-- tabla:{name} -->\n{tables[name]}\n<!-- /tabla -->"

    return TABLE_BLOCK.sub(body, text)
