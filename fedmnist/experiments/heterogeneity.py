"""Essay §3.4: IID versus Dirichlet(α) versus label-shard splits, for FedAvg, FedProx and FedMed."""

from __future__ import annotations

from pathlib import Path

from fedmnist.experiments.common import choose_mu, client_columns, run_row, sim_config, simulate, write_csv
from fedmnist.experiments.profiles import Profile

HETERO_CSV = "heterogeneidad.csv"
HETERO_TUNING_CSV = "heterogeneidad_ajuste_mu.csv"


def run_heterogeneity(profile: Profile, mnist, out_dir: Path, trainer, full_test, say) -> list[dict]:
    """IID versus Dirichlet(α) versus s-shard splits, for FedAvg, FedProx and FedMed, over every seed.

    FedProx's μ is chosen on validation for each split (``choose_mu``). Each (split, seed) is one
    resumable simulation in ``simulaciones/heterogeneidad_<split>_s<seed>``; every row also says how the
    clients fare under the final model (``client_columns``).
    """
    from fedmnist.figures import plot_round_curves
    from fedmnist.labels import partition_settings

    rows, tuning_rows, curves = [], [], {}
    for label in profile.partitions:
        base = sim_config(profile, profile.seeds[0], methods=("fedavg", "fedprox", "fedmed"),
                           **partition_settings(label))
        mu, tuned = choose_mu(profile, "heterogeneidad", label, base, mnist, out_dir, trainer, say)
        tuning_rows += tuned
        curves[label] = {}
        for seed in profile.seeds:
            config = base.replace(seed=seed, mu=mu)
            run_dir = out_dir / "simulaciones" / f"heterogeneidad_{label}_s{seed}"
            run = simulate(config, mnist, run_dir, trainer, full_test, resume=True, final_from_records=True)
            clients = client_columns(run, mnist, full_test, trainer)
            for method in config.method.methods:
                rows.append({"partition": label, "seed": seed, "method": method,
                             "mu": mu if method == "fedprox" else 0.0, **run_row(run, method),
                             **clients[method]})
                curves[label].setdefault(method, []).append(run["result"].curves()[method])
            say(f"  heterogeneity {label} seed {seed} done")
        write_csv(out_dir / HETERO_CSV, rows)
        write_csv(out_dir / HETERO_TUNING_CSV, tuning_rows)
    plot_round_curves(curves, out_dir / "heterogeneidad.png",
                      f"Precisión por ronda según la partición ({profile.clients} clientes, "
                      f"{len(profile.seeds)} semillas)", rows[0]["test_images"])
    return rows
