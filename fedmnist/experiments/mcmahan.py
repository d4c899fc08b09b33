"""Essay §3.7: McMahan et al. 2017's protocol (100 clients, C = 0.1, E = 5, B = 10): rounds to 97/98/99 %.

Every method's settings are chosen on a validation split of the training set, then each method runs
until 99 % on the 10,000 test images or a maximum number of rounds; every run resumes its checkpoint.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from fedmnist.experiments.common import or_none, simulate, write_csv
from fedmnist.experiments.profiles import Profile

MCMAHAN_CSV = "mcmahan.csv"
MCMAHAN_TUNING_CSV = "mcmahan_ajuste.csv"
# McMahan et al. 2017, Table 2 (CNN, E = 5, B = 10, C = 0.1): rounds to 99% test accuracy.
MCMAHAN_PAPER_ROUNDS = {"iid": 20, "shards": 229}
MCMAHAN_GOAL_ROUNDS = {"iid": 15, "shards": 120}
"""The rounds to 99% the best method must not exceed (issue 14), well under the paper's."""
MCMAHAN_TARGETS = (0.97, 0.98, 0.99)
MCMAHAN_PLATEAU_ROUNDS = 20
"""The last rounds every McMahan method ran over which the essay compares their plateaus."""


def run_mcmahan(profile: Profile, mnist, out_dir: Path, trainer, full_test, say) -> list[dict]:
    """McMahan et al. 2017's protocol (100 clients × 600, C = 0.1, E = 5, B = 10): rounds to 97/98/99%.

    Per split: every method's hyper-parameters are tuned on a validation split of the training set
    (``_tune_mcmahan``), then each method runs the full protocol in its own directory
    (``simulaciones/mcmahan_<split>_<method>``) until it reaches 99% on the 10,000 test images or the
    maximum number of rounds. All runs share the seed, hence the federation, the initial weights and
    the clients sampled each round. Every run continues its checkpoint, so an interrupted command
    rerun picks up where it stopped, and a raised maximum continues a finished run.
    """
    from fedmnist.figures import plot_mcmahan
    from fedmnist.model import initial_weights
    from fedmnist.simulation import PRESETS

    seed = profile.seeds[0]
    reply_mb = sum(w.nbytes for w in initial_weights(seed)) / 1e6
    rows, tuning_rows, curves = [], [], {}
    for split, tuning_rounds, max_rounds in profile.mcmahan:
        preset = PRESETS["mcmahan-iid" if split == "iid" else "mcmahan-noniid"].replace(seed=seed)
        chosen, trials = _tune_mcmahan(profile, preset, split, tuning_rounds, mnist, out_dir, trainer, say)
        tuning_rows += trials
        if tuning_rows:
            write_csv(out_dir / MCMAHAN_TUNING_CSV, tuning_rows)
        curves[split] = {}
        split_rows = {}
        for method in final_order(profile.mcmahan_methods, trials):
            config = preset.replace(rounds=max_rounds, methods=(method,), stop_at_target=True,
                                    target_accuracy=MCMAHAN_TARGETS[-1], **chosen[method])
            run = simulate(config, mnist, out_dir / "simulaciones" / f"mcmahan_{split}_{method}", trainer,
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
                row[f"rounds_to_{round(target * 100)}"] = or_none(reached)
                row[f"mb_per_client_to_{round(target * 100)}"] = (
                    None if reached is None else round(reached * per_client_round, 2))
            row.update({"best_round_accuracy": float(np.nanmax(curve)), "final_accuracy": float(run["final"][method].accuracy),
                        "mb_per_reply": round(per_reply, 4), "paper_rounds_to_99": MCMAHAN_PAPER_ROUNDS[split],
                        "run_seconds": round(sum(r.round_seconds for r in result.metrics[method]), 1)})
            split_rows[method] = row
            say(f"  mcmahan {split} {method}: {row['rounds_to_99'] or 'no 99%'} in {len(curve)} rounds")
            # written after every method, so an interrupted command leaves the finished runs' table
            listed = [m for m in profile.mcmahan_methods if m in split_rows]
            write_csv(out_dir / MCMAHAN_CSV, rows + [split_rows[m] for m in listed])
            plot_mcmahan({m: curves[split][m] for m in listed}, out_dir / f"mcmahan_{split}.png", split,
                         MCMAHAN_TARGETS, MCMAHAN_GOAL_ROUNDS[split])
        rows += [split_rows[m] for m in profile.mcmahan_methods]
    return rows


def final_order(methods: Sequence[str], trials: Sequence[dict]) -> list[str]:
    """The order in which the final McMahan runs go: tuned methods by their chosen validation score,
    best first, then the untuned ones as listed, so that an interrupted command has the most promising
    curves first (the table keeps ``methods``' order)."""
    scores = {t["method"]: float(t["score"]) for t in trials if t["chosen"]}
    tuned = sorted((m for m in methods if m in scores), key=lambda m: -scores[m])
    return tuned + [m for m in methods if m not in scores]


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
            run = simulate(config, tuning_mnist, out_dir / "simulaciones" / name, trainer, validation, resume=True)
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
