"""The central reference ("techo"): the shared CNN trained centrally until validation stops improving.

Every federated number of the essay is compared with this model. Per seed, the CNN starts from the
seed's initial weights and trains on the training set minus ``ceiling_validation`` held-out images (a
draw per seed, ``fedmnist.tuning.validation_split``) with the project's default training (Adam,
lr 10⁻³, batches of 32). After every epoch the held-out images are scored; the training stops once
the validation loss has not fallen below its best for ``ceiling_patience`` epochs, or after
``ceiling_max_epochs``, and the reported model is the best epoch's (its weights restored), scored on
the test images. The loss decides rather than the accuracy: on a few thousand images the accuracy
moves in steps of a few hundredths of a point and ties often, while the loss keeps falling as long as
the model improves and turns up when it starts to overfit.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path

from fedmnist.experiments.common import csv_cell, read_csv, write_csv
from fedmnist.experiments.profiles import Profile

log = logging.getLogger(__name__)

CEILING_CSV = "techo.csv"
SETTING_COLUMNS = ("optimizer", "learning_rate", "batch_size", "patience", "max_epochs", "train_images",
                   "validation_images", "test_images")
"""What a finished seed's row must share with the current run to be kept instead of retrained."""
COLUMNS = ("seed", *SETTING_COLUMNS, "epochs_run", "best_epoch", "stopped_early", "validation_accuracy",
           "validation_loss", "test_accuracy", "ci_low", "ci_high", "test_loss", "validation_losses", "run_seconds")
"""The columns of ``techo.csv``, in order."""


def best_epoch(losses: Sequence[float]) -> int:
    """The epoch (from 1) of the lowest validation loss; the first of equals; non-finite losses count as +∞."""
    if not losses:
        raise ValueError("no validation loss yet")
    keys = [float(v) if math.isfinite(v) else math.inf for v in losses]
    return keys.index(min(keys)) + 1


def should_stop(losses: Sequence[float], patience: int) -> bool:
    """Whether the last ``patience`` epochs brought no validation loss below the best before them."""
    return len(losses) - best_epoch(losses) >= patience


def stop_epoch(losses: Sequence[float], patience: int, max_epochs: int) -> int:
    """The epoch after which a training that sees these validation losses, one per epoch, stops.

    Raises:
        ValueError: the losses end before the rule or ``max_epochs`` stops the training.
    """
    for epoch in range(1, min(len(losses), max_epochs) + 1):
        if epoch == max_epochs or should_stop(losses[:epoch], patience):
            return epoch
    raise ValueError(f"{len(losses)} losses end before the training stops (patience {patience}, "
                     f"at most {max_epochs} epochs)")


def _ceiling_trainer(trainer, training):
    """``trainer`` if it trains as ``training`` says (``training.check_trainer``), else a new one that does."""
    from fedmnist.errors import ConfigError
    from fedmnist.training import check_trainer

    if trainer is not None:
        try:
            check_trainer(trainer, training)
            return trainer
        except ConfigError:
            pass
    return training.build_trainer()


def _finished(path: Path, settings: dict) -> dict[str, dict]:
    """Rows of ``path`` (an earlier run) with today's columns and ``settings``, by seed; {} if there is none."""
    from fedmnist.errors import DataError

    if not path.exists():
        return {}
    try:
        rows = read_csv(path)
    except DataError as exc:
        log.warning("not resuming from %s: %s", path, exc)
        return {}
    wanted = {k: csv_cell(v) for k, v in settings.items()}
    return {r["seed"]: r for r in rows
            if tuple(r) == COLUMNS and all(r[k] == v for k, v in wanted.items())}


def train_to_best(trainer, weights, train: tuple, validation: tuple, *, batch_size: int, seed: int,
                  patience: int, max_epochs: int, say=lambda _msg: None) -> tuple[list, dict[str, list[float]]]:
    """Train from ``weights`` epoch by epoch until ``should_stop`` (or ``max_epochs``); the best epoch's weights.

    Returns the weights of the epoch with the lowest validation loss and the per-epoch history
    (``loss``, ``accuracy``, ``val_loss``, ``val_accuracy``) of every epoch run.
    """
    best: list = []

    def on_epoch(history: dict[str, list[float]]) -> bool:
        losses = history["val_loss"]
        if best_epoch(losses) == len(losses):
            best[:] = trainer.get_weights()
        say(f"    epoch {len(losses)}: validation loss {losses[-1]:.4f}, "
            f"accuracy {history['val_accuracy'][-1]:.4f}")
        return should_stop(losses, patience)

    result = trainer.train(weights, *train, epochs=max_epochs, batch_size=batch_size, seed=seed,
                           x_val=validation[0], y_val=validation[1], on_epoch=on_epoch)
    return best, result.history


def run_ceiling(profile: Profile, mnist, out_dir: Path, trainer, full_test, say) -> list[dict]:
    """The central model trained to early stopping, one row per seed of ``profile.ceiling_seeds``.

    Each seed trains with ``fedmnist.config.TrainingConfig``'s defaults (``trainer`` is reused if it
    trains with them) from ``initial_weights(seed)``, on the first ``ceiling_train_subset`` training
    images (all by default) minus ``ceiling_validation`` held out with the seed, shuffled and with
    dropout masks drawn from ``training_seed(seed, 1, 0)``. ``techo.csv`` is rewritten after every
    seed; a seed whose row is already there with the same settings (``SETTING_COLUMNS``) is kept, not
    retrained, so an interrupted command continues with the next seed. Returns the file's rows.
    """
    from fedmnist.config import TrainingConfig
    from fedmnist.data import Mnist, normalize_images
    from fedmnist.evaluation import evaluate
    from fedmnist.model import initial_weights
    from fedmnist.seeds import training_seed
    from fedmnist.tuning import validation_split

    training = TrainingConfig()
    n_train = min(profile.ceiling_train_subset or mnist.y_train.size, mnist.y_train.size)
    source = Mnist(mnist.x_train[:n_train], mnist.y_train[:n_train], mnist.x_test[:0], mnist.y_test[:0])
    settings = {"optimizer": training.optimizer, "learning_rate": float(training.learning_rate),
                "batch_size": training.batch_size, "patience": profile.ceiling_patience,
                "max_epochs": profile.ceiling_max_epochs, "train_images": n_train - profile.ceiling_validation,
                "validation_images": profile.ceiling_validation, "test_images": len(full_test[1])}
    path = out_dir / CEILING_CSV
    done = _finished(path, settings)
    rows: list[dict] = []
    for seed in profile.ceiling_seeds:
        if str(seed) in done:
            rows.append(done[str(seed)])
            say(f"  ceiling seed {seed}: already in {CEILING_CSV}, kept")
            continue
        t0 = time.perf_counter()
        split = validation_split(source, profile.ceiling_validation, seed)
        trainer = _ceiling_trainer(trainer, training)
        say(f"  ceiling seed {seed}: training on {split.y_train.size} images")
        weights, history = train_to_best(
            trainer, initial_weights(seed), (normalize_images(split.x_train), split.y_train),
            (normalize_images(split.x_test), split.y_test), batch_size=training.batch_size,
            seed=training_seed(seed, 1, 0), patience=profile.ceiling_patience,
            max_epochs=profile.ceiling_max_epochs, say=say)
        losses = history["val_loss"]
        best = best_epoch(losses)
        test = evaluate(trainer, weights, *full_test)
        row = {"seed": seed, **settings, "epochs_run": len(losses), "best_epoch": best,
               "stopped_early": should_stop(losses, profile.ceiling_patience),
               "validation_accuracy": float(history["val_accuracy"][best - 1]),
               "validation_loss": float(losses[best - 1]), "test_accuracy": float(test.accuracy),
               "ci_low": float(test.ci_low), "ci_high": float(test.ci_high), "test_loss": float(test.loss),
               "validation_losses": " ".join(f"{v:.6f}" for v in losses),
               "run_seconds": round(time.perf_counter() - t0, 1)}
        rows.append(row)
        say(f"  ceiling seed {seed}: best epoch {best} of {len(losses)}, test accuracy {test.accuracy:.4f}")
        write_csv(path, rows)
    write_csv(path, rows)  # also drops rows of other seeds or settings when every seed was kept
    return read_csv(path)
