"""Essay §3.8: DP-FedAvg (server-side clipping and Gaussian noise) on 100 and 1,000 IID clients.

Accuracy against ε for several noise levels, and what a 5-member course team would get.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fedmnist.experiments.common import simulate, write_csv
from fedmnist.experiments.profiles import Profile

PRIVACY_CSV = "privacidad.csv"
TEAM_PRIVACY_CSV = "privacidad_equipo.csv"


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
    from fedmnist.figures import plot_privacy
    from fedmnist.privacy import PrivacyAccountant, clients_needed, privacy_verdict
    from fedmnist.simulation import SimulationConfig

    rows = []
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
            for seed in profile.dp_seeds or profile.seeds:
                config = base.replace(seed=seed, dp_noise=z, dp_clip=clip)
                name = f"privacidad_K{num_clients}_z{z:g}_s{seed}"
                run = simulate(config, mnist, out_dir / "simulaciones" / name, trainer, full_test, resume=True)
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
                say(f"  privacy K={num_clients} z={z:g} seed {seed} done")
    write_csv(out_dir / PRIVACY_CSV, rows)
    team = []
    for z in profile.dp_team_noises:
        accountant = PrivacyAccountant(z, 5, 5, 1e-5)
        verdict = privacy_verdict(accountant, profile.dp_rounds)
        needed = clients_needed(2.0, profile.dp_rounds, profile.dp_fraction, mean_noise_std=z / 5, delta=1e-5)
        team.append({"noise_multiplier": z, "rounds": profile.dp_rounds, "epsilon": round(verdict.epsilon, 4),
                     "delta": verdict.delta, "meaningful": verdict.meaningful,
                     "noise_std_over_clip": z / 5,
                     "clients_for_epsilon_2": needed.num_clients if needed else "",
                     "their_noise_multiplier": round(needed.noise_multiplier, 4) if needed else ""})
    write_csv(out_dir / TEAM_PRIVACY_CSV, team)
    plot_privacy(rows, out_dir / "privacidad.png")
    return rows
