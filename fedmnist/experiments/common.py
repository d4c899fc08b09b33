"""What every experiment runner shares: result CSVs, the client executor, and one resumable simulation.

``simulate`` runs one multi-round simulation in its own directory, continuing its checkpoint, and
scores its final models; ``run_row`` is what every multi-round CSV records of a method's run, and
``client_columns`` how its honest clients fare under each final model;
``choose_mu`` picks FedProx's μ on a validation split of the training set, never on the test set.
"""

from __future__ import annotations

import csv
import io
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fedmnist.config import AGGRESSIVE_TRAINING
from fedmnist.errors import ConfigError, DataError
from fedmnist.experiments.profiles import Profile
from fedmnist.io import atomic_write_text, quote, read_text_capped

if TYPE_CHECKING:
    from fedmnist.data import Mnist
    from fedmnist.training import ClientTrainer

log = logging.getLogger(__name__)

WORKERS: dict[str, int | str] = {}
"""``run_experiments(workers=...)``: the simulations' worker processes (empty: in this process)."""
_EVALUATOR = []


def csv_cell(value) -> str:
    """How ``write_csv`` writes one value (floats with six decimals), as ``read_csv`` gives it back."""
    if value is None:
        return ""
    return f"{value:.6f}" if isinstance(value, float) else str(value)


def _csv_text(rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: csv_cell(v) for k, v in row.items()})
    return buffer.getvalue()


def write_csv(path: Path, rows: list[dict]) -> None:
    """Write result rows as a CSV atomically (floats with six decimals)."""
    atomic_write_text(path, _csv_text(rows))


CSV_MAX_BYTES = 64 << 20
"""Largest result table read back: the essay's largest CSV holds a few thousand rows."""


def read_csv(path: str | Path) -> list[dict]:
    """Rows of a result CSV as dicts of strings (a regular file of at most ``CSV_MAX_BYTES``).

    Raises:
        DataError: not a regular file, too large or not UTF-8; the message names the file.
    """
    text = read_text_capped(path, CSV_MAX_BYTES, "result table", error=DataError)
    try:
        return list(csv.DictReader(io.StringIO(text, newline="")))
    except csv.Error as exc:
        raise DataError(f"{path}: malformed CSV ({quote(exc)})") from None



def make_executor(data, settings):
    """A client executor over ``data``: ``WORKERS`` processes when set, else this process."""
    from fedmnist.workers import InProcessExecutor, WorkerPool

    workers = WORKERS.get("workers")
    return WorkerPool(workers, data, settings) if workers is not None else InProcessExecutor(data, settings)


def task_outcomes(pending) -> list:
    """The outcomes of a submitted batch of tasks; a failed task (its worker died) stops the run, named."""
    from fedmnist.errors import WorkerError
    from fedmnist.tasks import TaskFailure

    outcomes = pending.result()
    failed = [o.message for o in outcomes if isinstance(o, TaskFailure)]
    if failed:
        raise WorkerError(f"{len(failed)} training task(s) failed: {failed[0]}")
    return outcomes


@dataclass(frozen=True)
class Score:
    """A final model's test metrics, read from its last round's record (evaluated on the whole test set)."""

    accuracy: float
    loss: float
    ci_low: float
    ci_high: float
    num_examples: int


def _record_score(record, num_examples: int) -> Score:
    from fedmnist.evaluation import wilson_interval

    low, high = wilson_interval(round(record.test_accuracy * num_examples), num_examples)
    return Score(float(record.test_accuracy), float(record.test_loss), low, high, num_examples)


def simulate(config, mnist, out_dir: Path, trainer, full_test, resume: bool = False,
             final_from_records: bool = False) -> dict:
    """Run one simulation quietly and evaluate its final models on the full test set.

    With ``resume``, a checkpoint left in ``out_dir`` by the same configuration is continued (its
    numbers equal an uninterrupted run's); one from another configuration is ignored. With
    ``final_from_records`` and a run that evaluates every round's model on all of ``mnist``'s test
    images (``full_test``), the final metrics are the last round's record (``Score``), so tables and
    curves give the same number and nothing is evaluated twice.
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
    whole_test = config.federation.test_subset is None and len(full_test[1]) == mnist.y_test.size
    if final_from_records and whole_test and all(
            rows and rows[-1].round == result.rounds_run and rows[-1].test_accuracy is not None
            for rows in result.metrics.values()):
        final = {m: _record_score(rows[-1], len(full_test[1])) for m, rows in result.metrics.items()}
    else:
        trainer = trainer or evaluator()
        final = {m: evaluate(trainer, w, *full_test) for m, w in result.final_weights.items()}
    return {"result": result, "final": final}


def evaluator():
    """The one ``ClientTrainer`` that evaluates every final model (built once, reused)."""
    from fedmnist.training import ClientTrainer

    if not _EVALUATOR:
        _EVALUATOR.append(ClientTrainer())
    return _EVALUATOR[0]


def sim_config(profile: Profile, seed: int, **changes):
    """The profile's multi-round simulation (every client in every round) for ``seed``, with ``changes``."""
    from fedmnist.simulation import SimulationConfig

    base = SimulationConfig(training=AGGRESSIVE_TRAINING).replace(
        num_clients=profile.clients, fraction=1.0, rounds=profile.rounds, local_epochs=profile.local_epochs,
        batch_size=profile.batch_size, train_subset=profile.train_subset, eval_every=profile.eval_every,
        test_subset=profile.round_test_subset, seed=seed, target_accuracy=0.95,
    )
    return base.replace(**changes)


def settings_text(settings: dict) -> str:
    """Chosen settings as ``name=value`` pairs for a CSV cell (``learning_rate=0.2 server_momentum=0.3``)."""
    return " ".join(f"{k}={v:g}" for k, v in settings.items())


def or_none(value):
    """An empty CSV cell for None."""
    return "" if value is None else value


DIVERGED_LOSS = 1_000.0
"""A test loss above this (or not finite) means the model diverged: its weights blew up (a model at chance
level has a loss near ln 10 ≈ 2.3), as under a Gaussian attack, rather than merely learning nothing."""


def diverged(loss: float | None) -> bool:
    """Whether a test loss says the model diverged (not finite, or above ``DIVERGED_LOSS``)."""
    return loss is not None and not (np.isfinite(loss) and loss <= DIVERGED_LOSS)


def run_row(run: dict, method: str) -> dict:
    """What every multi-round CSV records of one method's run: final metrics, divergence, the change of its
    last 10 rounds (``fedmnist.curves.recent_change``; empty when the run is too short), cost."""
    from fedmnist.curves import SETTLE_WINDOW, as_curve, recent_change

    result, final = run["result"], run["final"][method]
    records = result.metrics[method]
    first_diverged = next((r.round for r in records if diverged(r.test_loss)), None)
    evaluated = [r.test_accuracy for r in records if r.test_accuracy is not None]
    config = result.config
    return {"clients": config.federation.num_clients, "train_images": config.federation.train_subset or "",
            "test_images": final.num_examples, "local_epochs": config.training.epochs,
            "eval_every": config.eval_every, "rounds": result.rounds_run,
            "final_accuracy": float(final.accuracy), "ci_low": float(final.ci_low),
            "ci_high": float(final.ci_high), "final_loss": float(final.loss),
            "diverged": diverged(final.loss), "first_diverged_round": or_none(first_diverged),
            "mean_last3_evaluated_accuracy": float(np.mean(evaluated[-3:])),
            "change_last10": or_none(recent_change(as_curve(result.curves()[method]), SETTLE_WINDOW)),
            "rounds_to_95": or_none(result.rounds_to_target.get(method)),
            "method_seconds": round(sum(r.seconds for r in records), 1),
            "run_seconds": round(sum(r.round_seconds for r in records), 1)}


CLIENT_COLUMNS = ("client_mean_accuracy", "client_p10_accuracy", "client_worst_accuracy", "honest_clients")
"""What ``client_columns`` adds to a row: the honest clients' mean, 10th percentile and worst accuracy."""


def client_columns(run: dict, mnist: Mnist, full_test: tuple[np.ndarray, np.ndarray],
                   trainer: ClientTrainer | None = None) -> dict[str, dict]:
    """Per method, how the honest clients fare under its final global model (``CLIENT_COLUMNS``).

    On the common test set every client sees the same model, so its accuracy there is the row's
    ``final_accuracy``; on its own data the clients differ, and that is what these columns measure.

    Each honest client's accuracy on its own data is the final model's per-class accuracy on
    ``full_test`` re-weighted by the client's label proportions (``fedmnist.evaluation.client_accuracies``,
    the exact expectation: the partitions skew only labels); the row gets their mean, 10th percentile
    and minimum. Honest: not in ``result.malicious_clients``, whose own data an attack may corrupt. The
    federation is rebuilt from the run's configuration and ``mnist`` (deterministic, as the run's own).
    """
    from fedmnist.evaluation import client_accuracies, client_summary, per_class_accuracy
    from fedmnist.federation import prepare_federation

    result = run["result"]
    config = result.config
    counts = prepare_federation(config.federation, config.seed, mnist=mnist).label_counts
    malicious = set(result.malicious_clients)
    honest = [k for k in range(1, len(counts) + 1) if k not in malicious]
    trainer = trainer or evaluator()
    columns = {}
    for method, weights in result.final_weights.items():
        accuracies = client_accuracies(per_class_accuracy(trainer, weights, *full_test),
                                       counts[[k - 1 for k in honest]])
        summary = client_summary(accuracies)
        columns[method] = dict(zip(CLIENT_COLUMNS, (summary["mean"], summary["p10"], summary["worst"],
                                                    len(honest))))
    return columns


def _tuning_data(profile: Profile, mnist) -> tuple:
    """The training set minus ``validation_size`` held-out images (first seed), and those, normalised."""
    from fedmnist.data import normalize_images
    from fedmnist.tuning import validation_split

    tuning = validation_split(mnist, profile.validation_size, profile.seeds[0])
    return tuning, (normalize_images(tuning.x_test), tuning.y_test)


def tuning_trial(config, method: str, settings: dict, tuning: tuple, run_dir: Path, trainer, name: str | None = None,
                 final_from_records: bool = False):
    """One tuning trial: ``config`` run on the tuning data (resuming ``run_dir``), scored by ``method``'s curve.

    ``tuning`` is ``(tuning_mnist, validation)``, the training set minus the held-out images and those images
    as the test set; the score is ``tuning_score`` of the validation curve. ``name`` labels the trial
    (default: the method).
    """
    from fedmnist.tuning import Trial, tuning_score

    tuning_mnist, validation = tuning
    run = simulate(config, tuning_mnist, run_dir, trainer, validation, resume=True,
                   final_from_records=final_from_records)
    curve = run["result"].curves()[method]
    seconds = sum(r.round_seconds for r in run["result"].metrics[method])
    return Trial(name or method, settings, tuple(curve), tuning_score(curve), seconds)


def choose_mu(profile: Profile, experiment: str, label: str, base, mnist, out_dir: Path, trainer, say
              ) -> tuple[float, list[dict]]:
    """FedProx's μ for one setting, chosen on validation; the candidates' rows.

    Every μ of ``profile.mu_grid`` runs FedProx alone with ``base``'s federation and rounds (first
    seed, no attacker) on the training set minus the held-out images, which play the test set's role;
    the best ``tuning_score`` (mean validation accuracy of the last two evaluated rounds) wins. The runs
    continue their checkpoints in ``simulaciones/ajuste_mu_<experiment>_<label>_mu<μ>``.
    """
    from fedmnist.tuning import best

    tuning = _tuning_data(profile, mnist)
    validation = tuning[1]
    trials = []
    for mu in profile.mu_grid:
        config = base.replace(seed=profile.seeds[0], methods=("fedprox",), mu=mu, num_malicious=0,
                              attack=None)
        trials.append(tuning_trial(config, "fedprox", {"mu": mu}, tuning, out_dir / "simulaciones" /
                                   f"ajuste_mu_{experiment}_{label}_mu{mu:g}", trainer, final_from_records=True))
        say(f"  {experiment} {label}: tuning mu={mu:g}, validation {trials[-1].score:.4f}")
    chosen = best(trials)
    rows = [{"experiment": experiment, "setting": label, "mu": t.settings["mu"],
             "validation_images": int(validation[1].size), "rounds": base.rounds, "score": t.score,
             "chosen": t is chosen, "run_seconds": round(t.seconds, 1)} for t in trials]
    return float(chosen.settings["mu"]), rows
