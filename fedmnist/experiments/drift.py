"""Essay §3.3: client drift over local epochs, learning rate and optimiser (``fedmnist.drift_grid``)."""

from __future__ import annotations

from pathlib import Path

from fedmnist.experiments.common import evaluator, make_executor, write_csv
from fedmnist.experiments.profiles import Profile

DRIFT_CSV = "deriva.csv"
DRIFT_TUNING_CSV = "deriva_ajuste_mu.csv"


def run_drift(profile: Profile, mnist, out_dir: Path, trainer, full_test, say) -> list[dict]:
    """The drift grid (``fedmnist.drift_grid``): its rows, the μ tuning rows and two figures.

    Finished blocks of the grid are kept in ``simulaciones/deriva/hechos.json``, so an interrupted run
    continues where it stopped.
    """
    from fedmnist.drift_grid import DriftGrid, run_drift_grid
    from fedmnist.figures import plot_drift

    del trainer, full_test
    grid = DriftGrid(seeds=profile.drift_seeds, clients=profile.drift_clients,
                     train_subset=profile.drift_train_subset,
                     optimizers=profile.drift_optimizers, epochs=profile.drift_epochs,
                     partitions=profile.drift_partitions, mu_grid=profile.drift_mu_grid,
                     validation_size=profile.validation_size, batch_size=profile.batch_size,
                     barrier_images=profile.drift_barrier_images, barrier_pairs=profile.drift_barrier_pairs)
    rows, tuning_rows = run_drift_grid(grid, mnist, make_executor, evaluator(), say,
                                       cache=out_dir / "simulaciones" / "deriva" / "hechos.json")
    write_csv(out_dir / DRIFT_CSV, rows)
    write_csv(out_dir / DRIFT_TUNING_CSV, tuning_rows)
    plot_drift(rows, out_dir / "deriva.png", out_dir / "deriva_medidas.png")
    return rows
