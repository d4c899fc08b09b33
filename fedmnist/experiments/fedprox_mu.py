"""Essay §3.5: FedProx's test accuracy as a function of μ on the most heterogeneous split."""

from __future__ import annotations

from pathlib import Path

from fedmnist.experiments.common import client_columns, run_row, sim_config, simulate, write_csv
from fedmnist.experiments.profiles import Profile

PROX_CSV = "fedprox_mu.csv"


def run_fedprox_mu(profile: Profile, mnist, out_dir: Path, trainer, full_test, say) -> list[dict]:
    """FedProx with μ ∈ profile.prox_mus on the most heterogeneous split (μ = 0 is FedAvg), every seed.

    This table shows how the test accuracy depends on μ; the μ the other experiments use is chosen on
    validation instead. Each (μ, seed) is one resumable run in ``simulaciones/fedprox_mu_<μ>_s<seed>``;
    every row also says how the clients fare under the final model (``client_columns``).
    """
    from fedmnist.figures import plot_fedprox_mu
    from fedmnist.labels import partition_settings

    rows, curves = [], {}
    for mu in profile.prox_mus:
        method = "fedprox" if mu > 0 else "fedavg"  # FedProx with mu = 0 is FedAvg
        curves[mu] = []
        for seed in profile.seeds:
            config = sim_config(profile, seed, methods=(method,), mu=mu if mu > 0 else 0.01,
                                 **partition_settings(profile.prox_partition))
            run = simulate(config, mnist, out_dir / "simulaciones" / f"fedprox_mu_{mu:g}_s{seed}", trainer,
                            full_test, resume=True, final_from_records=True)
            rows.append({"mu": f"{mu:g}", "partition": profile.prox_partition, "seed": seed,
                         **run_row(run, method), **client_columns(run, mnist, full_test, trainer)[method]})
            curves[mu].append(run["result"].curves()[method])
            say(f"  fedprox mu={mu:g} seed {seed} done")
        write_csv(out_dir / PROX_CSV, rows)
    plot_fedprox_mu(rows, curves, out_dir / "fedprox_mu.png", profile.prox_partition)
    return rows
