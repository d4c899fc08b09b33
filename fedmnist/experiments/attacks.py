"""Essay §3.6: malicious clients against FedAvg, FedProx and the robust rules, IID and non-IID."""

from __future__ import annotations

from pathlib import Path

from fedmnist.experiments.common import choose_mu, client_columns, run_row, sim_config, simulate, write_csv
from fedmnist.experiments.profiles import Profile

ATTACK_CSV = "ataques.csv"
ATTACK_TUNING_CSV = "ataques_ajuste_mu.csv"


def run_attacks(profile: Profile, mnist, out_dir: Path, trainer, full_test, say) -> list[dict]:
    """Malicious clients against FedAvg, FedProx and the robust rules, IID and non-IID, every seed.

    ``profile.attack_cases`` lists (partition, attack, attackers); every case runs every method of
    ``attack_methods`` in one resumable simulation per seed
    (``simulaciones/ataques_<partition>_<attack>_<F>_s<seed>``),
    with f = ``attack_krum_f`` for Krum, Multi-Krum and Bulyan whatever the attackers. FedProx's μ is
    chosen on validation per partition, without attackers. A model whose test loss is not finite or
    above ``DIVERGED_LOSS`` is recorded as diverged (``diverged``, ``first_diverged_round``). Every row
    also says how the honest clients (the attackers left out) fare under the final model (``client_columns``).
    """
    from fedmnist.figures import plot_attacks
    from fedmnist.labels import partition_settings

    rows, tuning_rows = [], []
    for label in dict.fromkeys(case[0] for case in profile.attack_cases):
        base = sim_config(profile, profile.seeds[0], num_clients=profile.attack_clients,
                           rounds=profile.attack_rounds, train_subset=profile.attack_train_subset,
                           eval_every=profile.attack_eval_every, methods=profile.attack_methods,
                           krum_f=profile.attack_krum_f, **partition_settings(label))
        mu = base.method.mu
        if "fedprox" in profile.attack_methods:
            mu, tuned = choose_mu(profile, "ataques", label, base, mnist, out_dir, trainer, say)
            tuning_rows += tuned
        for partition, attack, count in profile.attack_cases:
            if partition != label:
                continue
            for seed in profile.seeds:
                config = base.replace(seed=seed, mu=mu, num_malicious=count,
                                      attack=None if attack == "none" else attack)
                name = f"ataques_{label}_{attack}_{count}_s{seed}"
                run = simulate(config, mnist, out_dir / "simulaciones" / name, trainer, full_test,
                                resume=True, final_from_records=True)
                clients = client_columns(run, mnist, full_test, trainer)
                for method in config.method.methods:
                    rows.append({"partition": label, "attack": attack, "malicious": count, "seed": seed,
                                 "method": method, "mu": mu if method == "fedprox" else 0.0,
                                 "krum_f": profile.attack_krum_f, **run_row(run, method), **clients[method]})
                say(f"  attacks {label} {attack} x{count} seed {seed} done")
            write_csv(out_dir / ATTACK_CSV, rows)
        if tuning_rows:
            write_csv(out_dir / ATTACK_TUNING_CSV, tuning_rows)
    plot_attacks(rows, out_dir / "ataques.png")
    return rows
