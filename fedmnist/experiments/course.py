"""Essay §3.1 and §3.2: the course's round (locals, FedAvg/FedProx/FedMed, central model) and initialisation.

One round of the course flow (5 IID members) per seed, every member training as the member job does;
beside it, the same members trained from independent random initialisations and averaged (one-shot
FedAvg), the failure that makes a shared starting point necessary.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from fedmnist.experiments.common import evaluator, make_executor, task_outcomes, write_csv
from fedmnist.experiments.profiles import Profile

COURSE_CSV = "curso.csv"
COURSE_TUNING_CSV = "curso_ajuste_mu.csv"
INIT_CSV = "inicializacion.csv"


def _fit_part(indices: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """The rows of ``indices`` a member trains on after the validation hold-out of ``fedmnist.local.hold_out``."""
    from fedmnist.training import validation_split as hold_out

    return hold_out(indices, indices, fraction, seed)[0]


def run_course(profile: Profile, mnist, out_dir: Path, trainer, say) -> list[dict]:
    """One round of the course (5 IID clients) per seed: locals, FedAvg/FedProx/FedMed, central model.

    Every member trains as ``fedmnist.local.run_local_training`` does (the member job's optimiser, its 10 % validation
    hold-out, the same seeds), from the seed's shared start; the central model trains as long on all
    the data. FedProx's μ is chosen once, on ``profile.validation_size`` training images held out from
    5 members of the rest (first seed). Also averages the clients trained from *independent* random
    initialisations (one-shot FedAvg), the failure that makes a shared starting point necessary.
    The trainings run in the ``WORKERS`` processes (all of a seed's at once).
    """
    from fedmnist.aggregation import run_aggregation
    from fedmnist.client import Instructions
    from fedmnist.data import Mnist, normalize_images
    from fedmnist.evaluation import evaluate
    from fedmnist.exchange import make_global
    from fedmnist.local import make_update
    from fedmnist.model import initial_weights
    from fedmnist.partition import PartitionConfig, partition
    from fedmnist.seeds import training_seed, validation_seed
    from fedmnist.strategies import weighted_average
    from fedmnist.tasks import ClientTask, WorkerData
    from fedmnist.training import TrainConfig, TrainResult
    from fedmnist.tuning import Trial, best, validation_split

    del trainer  # the trainings run in the executor, with the course's optimiser
    n_train = profile.course_train_subset or mnist.y_train.size
    n_test = profile.course_test_subset or mnist.y_test.size
    x_test, y_test = normalize_images(mnist.x_test[:n_test]), mnist.y_test[:n_test]
    plain = TrainConfig(epochs=profile.course_epochs, batch_size=profile.batch_size,
                        optimizer=profile.course_optimizer, learning_rate=profile.course_learning_rate,
                        momentum=profile.course_momentum, seed=profile.seeds[0])
    plain.validate()
    seed0 = profile.seeds[0]
    tuning = validation_split(Mnist(mnist.x_train[:n_train], mnist.y_train[:n_train], mnist.x_test[:0],
                                    mnist.y_test[:0]), profile.validation_size, seed0)
    x_val, y_val = normalize_images(tuning.x_test), tuning.y_test
    # one data block for the executor: the course's training images, then the tuning members' images
    x_all = np.concatenate([mnist.x_train[:n_train], tuning.x_train])
    y_all = np.concatenate([mnist.y_train[:n_train], tuning.y_train])
    clients: list[np.ndarray] = []

    def add(indices: np.ndarray) -> int:
        clients.append(indices)
        return len(clients)

    members = {}  # (seed or "tuning", k) -> executor client id; k = 0 is the central model
    for seed in profile.seeds:
        for k, idx in enumerate(partition(y_all[:n_train], PartitionConfig("iid", 5, seed=seed)), start=1):
            members[seed, k] = add(_fit_part(idx, plain.validation_split, validation_seed(seed, k)))
        everyone = np.arange(n_train)
        members[seed, 0] = add(_fit_part(everyone, plain.validation_split, validation_seed(seed, 0)))
    tuning_parts = partition(tuning.y_train, PartitionConfig("iid", 5, seed=seed0))
    for k, idx in enumerate(tuning_parts, start=1):
        fit = _fit_part(idx, plain.validation_split, validation_seed(seed0, k))
        members["tuning", k] = add(n_train + fit)
    data = WorkerData(x_all, y_all, tuple(clients), x_test, y_test)
    settings = plain  # its optimizer, rate and momentum build the executor's trainers

    def tasks(seed: int, owner, starts: dict[int, list[np.ndarray]], mu: float, ks=range(1, 6)) -> list:
        return [ClientTask(members[owner, k], starts[k], Instructions(1, mu), training_seed(seed, 1, k),
                           plain.epochs, plain.batch_size) for k in ks]

    rows, init_rows, tuning_rows = [], [], []
    with make_executor(data, settings) as executor:
        start0 = initial_weights(seed0)
        shared0 = dict.fromkeys(range(1, 6), start0)
        tuning_batches = {mu: executor.submit(tasks(seed0, "tuning", shared0, mu))
                          for mu in profile.course_mu_grid}
        batches = {}
        for seed in profile.seeds:
            start = initial_weights(seed)
            own = {k: initial_weights(seed * 1000 + k) for k in range(1, 6)}
            batches[seed] = {
                "plain": executor.submit(tasks(seed, seed, dict.fromkeys(range(1, 6), start), 0.0)),
                "central": executor.submit(tasks(seed, seed, {0: start}, 0.0, ks=(0,))),
                "independent": executor.submit(tasks(seed, seed, own, 0.0)),
            }
        trials = []
        for mu, batch in tuning_batches.items():
            t0 = time.perf_counter()
            results = [(o.reply.weights, o.reply.num_examples) for o in task_outcomes(batch)]
            score = float(evaluate(evaluator(), weighted_average(results), x_val, y_val).accuracy)
            trials.append(Trial("fedprox", {"mu": mu}, (score,), score, time.perf_counter() - t0))
            say(f"  course tuning mu={mu:g}: validation accuracy {score:.4f}")
        chosen = best(trials)
        mu = float(chosen.settings["mu"])
        tuning_rows = [{"experiment": "curso", "setting": "iid", "mu": t.settings["mu"],
                        "validation_images": int(y_val.size), "rounds": 1, "score": t.score,
                        "chosen": t is chosen} for t in trials]
        for seed in profile.seeds:
            batches[seed]["prox"] = executor.submit(
                tasks(seed, seed, dict.fromkeys(range(1, 6), initial_weights(seed)), mu))
        for seed in profile.seeds:
            t0 = time.perf_counter()
            start = make_global(initial_weights(seed), 0, "init", seed)
            configs = {"plain": replace(plain, seed=seed), "prox": replace(plain, seed=seed, mu=mu)}
            updates = {}
            for label in ("plain", "prox"):
                updates[label] = [
                    make_update(TrainResult(o.reply.weights, o.reply.num_examples, o.reply.history,
                                            o.reply.num_steps), start, configs[label], k)
                    for k, o in enumerate(task_outcomes(batches[seed][label]), start=1)]
            report = run_aggregation(updates["plain"], x_test, y_test, prox_updates=updates["prox"],
                                     evaluator=evaluator(), start=start)
            seed_rows = [(name, r.evaluation, mu if name == "fedprox" else 0.0)
                         for name, r in report.methods.items()]
            seed_rows += [(f"local_{u.client_id}", e, 0.0) for u, e in report.locals_]
            central = task_outcomes(batches[seed]["central"])[0]
            seed_rows.append(("central", evaluate(evaluator(), central.reply.weights, x_test, y_test), 0.0))
            independent = [(o.reply.weights, o.reply.num_examples) for o in task_outcomes(batches[seed]["independent"])]
            shared = [(u.weights, u.num_examples) for u in updates["plain"]]
            for label, results in (("compartida", shared), ("independiente", independent)):
                evaluation = evaluate(evaluator(), weighted_average(results), x_test, y_test)
                init_rows.append({"seed": seed, "init": label, **_metrics(evaluation),
                                  "test_images": int(y_test.size)})
            train_seconds = sum(o.seconds for b in batches[seed].values() for o in b.result())
            eval_seconds = time.perf_counter() - t0
            for name, evaluation, model_mu in seed_rows:
                rows.append({"seed": seed, "model": name, **_metrics(evaluation), "mu": model_mu,
                             "optimizer": plain.optimizer, "learning_rate": plain.learning_rate,
                             "momentum": plain.momentum, "epochs": plain.epochs,
                             "batch_size": plain.batch_size, "train_images": n_train,
                             "test_images": int(y_test.size), "train_task_seconds": round(train_seconds, 1),
                             "eval_seconds": round(eval_seconds, 1)})
            say(f"  course seed {seed} done")
    write_csv(out_dir / COURSE_CSV, rows)
    write_csv(out_dir / INIT_CSV, init_rows)
    write_csv(out_dir / COURSE_TUNING_CSV, tuning_rows)
    from fedmnist.figures import plot_course, plot_initialisation

    plot_course(rows, out_dir / "curso.png")
    plot_initialisation(init_rows, out_dir / "inicializacion.png")
    return rows


def _metrics(evaluation) -> dict:
    return {"accuracy": float(evaluation.accuracy), "ci_low": float(evaluation.ci_low),
            "ci_high": float(evaluation.ci_high), "loss": float(evaluation.loss)}

