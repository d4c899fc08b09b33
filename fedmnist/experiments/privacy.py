"""Essay §3.8: client-level DP-FedAvg(M) on K = 100 and 1,000 IID clients, one factor at a time.

1. **Tuning** (validation split of the training set, ``dp_tuning_seed``, K = ``dp_tuning_clients``): the
   non-private baseline's client rate and server momentum (``dp_baseline_grid``), then, for every target ε
   on its own, the DP runs' clip norm and server momentum (``dp_grid``), with the baseline's client rate.
2. **Baselines**: non-private FedAvg(M), no clipping, for every K and evaluation seed, for
   ``dp_baseline_rounds`` rounds (fixed and generous; the CSV records the change over the last 10).
3. **DP runs**: for every K and target ε, every evaluation seed, ``dp_rounds`` rounds of DP-FedAvg(M) with
   that ε's tuned clip norm and server momentum and the same local steps, batch size and client rate:
   between two rows of one ε only K changes, and each ε runs at its own best settings. The noise multiplier
   z is the smallest that keeps ε ≤ target after those rounds at δ (``privacy.noise_for_epsilon``), and
   every round is charged.

Every run lives in ``simulaciones/<name>`` and continues its checkpoint, so the command resumes where it
stopped; the CSVs are rewritten after every run.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedmnist import curves
from fedmnist.experiments.common import settings_text, simulate, tuning_trial, write_csv
from fedmnist.experiments.profiles import Profile

PRIVACY_CSV = "privacidad.csv"
PRIVACY_TUNING_CSV = "privacidad_ajuste.csv"
TEAM_PRIVACY_CSV = "privacidad_equipo.csv"
METHOD = "fedavgm"
"""Every run's method: FedAvgM (server momentum 0 is FedAvg exactly), DP-FedAvgM under DP."""


@dataclass(frozen=True)
class PrivacyCase:
    """One cell of the experiment: K clients, a target ε (None: the non-private baseline) and its rounds."""

    clients: int
    target_epsilon: float | None
    rounds: int

    @property
    def label(self) -> str:
        """``K1000_ref`` or ``K1000_eps8``: the runs' directory stem."""
        return f"K{self.clients}_" + ("ref" if self.target_epsilon is None else f"eps{self.target_epsilon:g}")


def case_of(row: Mapping[str, str]) -> PrivacyCase:
    """The case a ``privacidad.csv`` row was run for."""
    target = row["target_epsilon"]
    return PrivacyCase(int(row["clients"]), None if target == "" else float(target), int(row["rounds"]))


def run_dir(out_dir: Path, case: PrivacyCase, seed: int | str) -> Path:
    """Where one final run lives: ``simulaciones/privacidad_K1000_eps8_s43``."""
    return Path(out_dir) / "simulaciones" / f"privacidad_{case.label}_s{seed}"


def privacy_cases(profile: Profile) -> list[PrivacyCase]:
    """The experiment's cells in run order: every K's baseline, then every (K, ε), in ``dp_clients`` order.

    One factor at a time: the DP cells share rounds, local steps, batch size, client rate and C; two cells
    of one target ε share the clip norm and server momentum too (``final_config``), so only K differs.
    """
    baselines = [PrivacyCase(k, None, profile.dp_baseline_rounds) for k in profile.dp_clients]
    private = [PrivacyCase(k, eps, profile.dp_rounds) for k in profile.dp_clients for eps in profile.dp_epsilons]
    return baselines + private


def delta_for(profile: Profile, num_clients: int) -> float:
    """δ of the DP runs with K clients: the profile's, or ``privacy.default_delta(K)``."""
    from fedmnist.privacy import default_delta

    return profile.dp_delta if profile.dp_delta is not None else default_delta(num_clients)


def noise_multiplier(profile: Profile, num_clients: int, target_epsilon: float) -> float:
    """z meeting ``target_epsilon`` after ``dp_rounds`` Poisson-sampled rounds of K clients (q = ⌊C·K⌋/K)."""
    from fedmnist.privacy import noise_for_epsilon
    from fedmnist.seeds import clients_per_round

    m = clients_per_round(num_clients, profile.dp_fraction)
    return noise_for_epsilon(target_epsilon, profile.dp_rounds, num_clients, m, delta_for(profile, num_clients))


def base_config(profile: Profile, num_clients: int, rounds: int, seed: int, learning_rate: float,
                server_momentum: float):
    """The non-private run of K clients: IID, C, local steps of B, SGD at the client rate, FedAvgM."""
    from fedmnist.simulation import SimulationConfig

    return SimulationConfig.create(
        num_clients=num_clients, fraction=profile.dp_fraction, rounds=rounds, local_epochs=1,
        local_steps=profile.dp_local_steps, batch_size=profile.dp_batch_size, optimizer="sgd",
        learning_rate=learning_rate, momentum=0.0, partition="iid", methods=(METHOD,),
        server_momentum=server_momentum, train_subset=profile.dp_train_subset, eval_every=profile.dp_eval_every,
        target_accuracy=0.97, stop_at_target=False, seed=seed,
    )


def dp_config(base, profile: Profile, num_clients: int, target_epsilon: float, clip: float):
    """``base`` under DP-FedAvg: server-side fixed clip S, Poisson sampling, z for ``target_epsilon``."""
    return base.replace(dp_noise=noise_multiplier(profile, num_clients, target_epsilon), dp_clip=clip,
                        dp_sampling="poisson", dp_delta=delta_for(profile, num_clients), dp_side="server")


def final_config(profile: Profile, case: PrivacyCase, seed: int, chosen: dict):
    """The evaluation run of ``case`` with ``seed`` and the tuned settings ``chosen``."""
    if case.target_epsilon is None:
        settings = chosen["baseline"]
        return base_config(profile, case.clients, case.rounds, seed, settings["learning_rate"],
                           settings["server_momentum"])
    settings = chosen["dp"][case.target_epsilon]
    base = base_config(profile, case.clients, case.rounds, seed, settings["learning_rate"],
                       settings["server_momentum"])
    return dp_config(base, profile, case.clients, case.target_epsilon, settings["clip"])


def median_update_norm(config, mnist) -> float:
    """Median L2 norm of the round-1 updates of ``config``'s round-1 clients, trained without DP (2 digits).

    The DP runs' clip norms are factors of it. It is measured on the tuning data (training images, like
    every tuning choice), so it is not itself private: a deployment would take S from public data or clip
    adaptively (``--dp-adaptive``, Andrew et al. 2021). The clients train through the simulation's own
    ``client_tasks`` and executor, so they are exactly round 1 of a run with ``config``.
    """
    from fedmnist.client import Instructions
    from fedmnist.federation import prepare_federation
    from fedmnist.model import initial_weights
    from fedmnist.privacy import client_update, update_norm
    from fedmnist.simulation import client_tasks, sample_clients
    from fedmnist.tasks import TaskFailure, WorkerData
    from fedmnist.workers import InProcessExecutor

    fed = prepare_federation(config.federation, config.seed, mnist=mnist)
    start = initial_weights(config.seed)
    tasks = client_tasks(config, 1, sample_clients(config, 1), start, Instructions(1), malicious=set())
    with InProcessExecutor(WorkerData.from_federation(fed), config.training, model_seed=config.seed) as executor:
        outcomes = executor.run(tasks)
    failed = [outcome.message for outcome in outcomes if isinstance(outcome, TaskFailure)]
    if failed:
        raise RuntimeError(f"measuring the round-1 update norms: {failed[0]}")
    return float(f"{np.median([update_norm(client_update(o.reply.weights, start)) for o in outcomes]):.2g}")


def run_privacy(profile: Profile, mnist, out_dir: Path, trainer, full_test, say) -> list[dict]:
    """Tune on validation, then run every case of ``privacy_cases`` with every evaluation seed.

    One row per (K, target ε, seed) goes to ``privacidad.csv``: the settings, z, the ε actually spent and
    δ, the final accuracy with its Wilson interval, the change over the last 10 rounds and the cost. The
    tuning trials go to ``privacidad_ajuste.csv``, what a 5-member team would get to
    ``privacidad_equipo.csv``.
    """
    from fedmnist.figures import plot_privacy

    chosen = tune_privacy(profile, mnist, out_dir, trainer, say)
    rows: list[dict] = []
    for case in privacy_cases(profile):
        seeds_curves = []
        for seed in profile.dp_seeds:
            config = final_config(profile, case, seed, chosen)
            run = simulate(config, mnist, run_dir(out_dir, case, seed), trainer, full_test, resume=True,
                           final_from_records=True)
            rows.append(result_row(case, config, run))
            seeds_curves.append(curves.as_curve(run["result"].curves()[METHOD]))
            say(f"  privacy {case.label} seed {seed}: {rows[-1]['final_accuracy']:.4f}, epsilon {rows[-1]['epsilon']}")
            write_csv(out_dir / PRIVACY_CSV, rows)
        change = curves.change_across_seeds(seeds_curves)
        if change is not None:
            say(f"  privacy {case.label}: last-10-round change {change.mean:+.4f} ± {change.half_width:.4f}, "
                f"settled: {curves.settled(change)}")
    write_csv(out_dir / TEAM_PRIVACY_CSV, team_rows(profile))
    plot_privacy(rows, out_dir / "privacidad.png")
    return rows


def result_row(case: PrivacyCase, config, run: dict) -> dict:
    """What ``privacidad.csv`` records of one run."""
    result = run["result"]
    records = result.metrics[METHOD]
    last, evaluation = records[-1], run["final"][METHOD]
    curve = curves.as_curve(result.curves()[METHOD])
    change = curves.recent_change(curve)
    dp = config.privacy
    seconds = sum(r.round_seconds for r in records)
    return {
        "clients": case.clients, "clients_per_round": config.clients_per_round,
        "sampling": "without_replacement" if dp is None else dp.sampling,
        "local_steps": config.local_steps, "batch_size": config.training.batch_size,
        "learning_rate": config.training.learning_rate, "server_momentum": config.method.server_momentum,
        "clip": "" if dp is None else dp.clip, "rounds": last.round,
        "target_epsilon": "" if case.target_epsilon is None else case.target_epsilon,
        "noise_multiplier": 0.0 if dp is None else dp.noise_multiplier,
        "noise_std": 0.0 if dp is None else dp.noise_multiplier * dp.clip / config.clients_per_round,
        "epsilon": "inf" if last.epsilon is None or not math.isfinite(last.epsilon) else round(last.epsilon, 4),
        "delta": "" if last.delta is None else last.delta, "seed": config.seed,
        "final_accuracy": float(evaluation.accuracy), "ci_low": float(evaluation.ci_low),
        "ci_high": float(evaluation.ci_high), "final_loss": float(evaluation.loss),
        "mean_last10": curves.last_mean(curve), "change_last10": "" if change is None else change,
        "rounds_without_reply": sum(r.num_replies == 0 for r in records),
        "run_seconds": round(seconds, 1), "seconds_per_round": round(seconds / max(1, len(records)), 2),
    }


# --- tuning on the validation split ---------------------------------------------------------------


def tune_privacy(profile: Profile, mnist, out_dir: Path, trainer, say) -> dict[str, dict]:
    """The baseline's and every target ε's DP settings, chosen by validation accuracy; trials in
    ``privacidad_ajuste.csv``.

    Runs on the training set minus ``dp_validation`` held-out images (their test set), with the tuning
    seed and K = ``dp_tuning_clients``, for ``dp_tuning_rounds`` rounds each. First the baseline grid
    (client rate × server momentum, no privacy); then, with the winner's client rate and for each target ε
    of ``dp_epsilons``, the DP grid (clip factor × server momentum), z calibrated for the final runs'
    ``dp_rounds`` at that ε. A grid with one candidate is not run. Returns ``{"baseline": {...}, "dp":
    {ε: {...}}}`` (each DP one with its absolute ``clip``).
    """
    from fedmnist.data import normalize_images
    from fedmnist.tuning import Trial, best, candidate_label, candidates, validation_split

    tuning_mnist = validation_split(mnist, profile.dp_validation, profile.dp_tuning_seed)
    validation = (normalize_images(tuning_mnist.x_test), tuning_mnist.y_test)
    k, rounds, seed = profile.dp_tuning_clients, profile.dp_tuning_rounds, profile.dp_tuning_seed
    rows: list[dict] = []

    def trial(stage: str, settings: dict, config, name: str) -> Trial:
        found = tuning_trial(config, METHOD, settings, (tuning_mnist, validation), out_dir / "simulaciones" / name,
                             trainer, name=stage)
        say(f"  privacy tuning {stage} {candidate_label(settings)}: validation {found.score:.4f}")
        return found

    def choose(stage: str, options: list[dict], run_one, target_epsilon: float | None = None) -> dict:
        if len(options) == 1:
            return dict(options[0])
        trials = [run_one(option) for option in options]
        winner = best(trials)
        for t in trials:
            rows.append({"stage": stage, "clients": k, "settings": settings_text(t.settings), "tuning_rounds": rounds,
                         "tuning_seed": seed, "validation_images": profile.dp_validation,
                         "target_epsilon": "" if target_epsilon is None else target_epsilon,
                         "last_validation_accuracy": float(t.curve[-1]), "score": t.score, "chosen": t is winner,
                         "run_seconds": round(t.seconds, 1)})
            write_csv(out_dir / PRIVACY_TUNING_CSV, rows)
        return dict(winner.settings)

    def baseline_trial(option: dict) -> Trial:
        config = base_config(profile, k, rounds, seed, option["learning_rate"], option["server_momentum"])
        return trial("baseline", option, config, f"privacidad_ajuste_K{k}_{candidate_label(option)}")

    baseline = choose("baseline", candidates(profile.dp_baseline_grid), baseline_trial)
    rate = baseline["learning_rate"]
    dp_grid = {"learning_rate": (rate,), **profile.dp_grid}
    norms: dict[float, float] = {}

    def norm(learning_rate: float) -> float:
        if learning_rate not in norms:
            norms[learning_rate] = median_update_norm(base_config(profile, k, rounds, seed, learning_rate, 0.0),
                                                      tuning_mnist)
        return norms[learning_rate]

    def clip_for(option: dict) -> float:
        """S: the option's fraction of the median round-1 update norm, to two significant digits."""
        return float(f"{option['clip_factor'] * norm(option['learning_rate']):.2g}")

    def dp_trial(option: dict, target: float) -> Trial:
        clip = clip_for(option)
        base = base_config(profile, k, rounds, seed, option["learning_rate"], option["server_momentum"])
        config = dp_config(base, profile, k, target, clip)
        return trial(f"dp eps{target:g}", option, config,
                     f"privacidad_ajuste_K{k}_eps{target:g}_{candidate_label(option)}")

    dp: dict[float, dict] = {}
    for target in profile.dp_epsilons:
        dp[target] = choose("dp", candidates(dp_grid), lambda option, t=target: dp_trial(option, t), target)
        dp[target]["clip"] = clip_for(dp[target])
    if rows:
        for row in rows:
            row["median_update_norm"] = norms.get(rate, "")
        write_csv(out_dir / PRIVACY_TUNING_CSV, rows)
    say(f"  privacy: baseline {settings_text(baseline)}; "
        + "; ".join(f"DP eps {t:g} {settings_text(s)}" for t, s in dp.items()))
    return {"baseline": baseline, "dp": dp}


# --- a course team ------------------------------------------------------------------------------------


def team_rows(profile: Profile) -> list[dict]:
    """ε of a 5-member team (q = 1) per noise level, and the clients ε ≤ 2 would need with the same noise."""
    from fedmnist.privacy import PrivacyAccountant, clients_needed, privacy_verdict

    rows = []
    for z in profile.dp_team_noises:
        verdict = privacy_verdict(PrivacyAccountant(z, 5, 5, 1e-5), profile.dp_team_rounds)
        needed = clients_needed(2.0, profile.dp_team_rounds, profile.dp_fraction, mean_noise_std=z / 5, delta=1e-5)
        rows.append({"noise_multiplier": z, "rounds": profile.dp_team_rounds, "epsilon": round(verdict.epsilon, 4),
                     "delta": verdict.delta, "meaningful": verdict.meaningful, "noise_std_over_clip": z / 5,
                     "clients_for_epsilon_2": needed.num_clients if needed else "",
                     "their_noise_multiplier": round(needed.noise_multiplier, 4) if needed else ""})
    return rows
