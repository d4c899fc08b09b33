"""The course job in one command: split MNIST, train every member as the notebook does, aggregate.

The FedAvg and FedMed models aggregate clients trained with μ = 0; the FedProx model aggregates the
same clients trained from the same start with FedProx's proximal term (μ > 0), so the comparison
between the three rules is the one the course asks for. The members train with every mode's
default training (``fedmnist.config.TrainingConfig``: Adam, lr 10⁻³, 2 epochs, B = 32); the aggressive
setting where one-shot FedAvg loses to its local models is ``optimizer="sgd", learning_rate=0.05,
momentum=0.9``.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from fedmnist.aggregation import (
    DEFAULT_METHODS,
    format_table,
    manifest_counts,
    run_aggregation,
    write_outputs,
)
from fedmnist.data import common_test_file, load_partition, load_raw_mnist
from fedmnist.errors import ConfigError, FedMnistError
from fedmnist.exchange import global_path, make_global, save_global
from fedmnist.federation_files import checked_test_file, write_federation
from fedmnist.io import atomic_write_text, read_text_capped
from fedmnist.local import run_local_training
from fedmnist.model import DEFAULT_SEED, initial_weights
from fedmnist.partition import PartitionConfig
from fedmnist.settings import DEMO_PROXIMAL_MU, default
from fedmnist.training import TrainConfig, make_trainer


@dataclass(frozen=True)
class DemoConfig:
    """Settings of ``fedmnist demo``; the defaults are the course setup."""

    num_clients: int = default("clients")
    epochs: int = TrainConfig.epochs
    batch_size: int = TrainConfig.batch_size
    optimizer: str = TrainConfig.optimizer
    learning_rate: float = TrainConfig.learning_rate
    momentum: float = TrainConfig.momentum
    mu: float = DEMO_PROXIMAL_MU
    seed: int = DEFAULT_SEED
    partition: str = default("partition")
    quiet: bool = False

    def train_config(self, mu: float = 0.0) -> TrainConfig:
        """Every member's job: this demo's local training, with FedProx's ``mu`` (0: plain training)."""
        return TrainConfig(epochs=self.epochs, batch_size=self.batch_size, optimizer=self.optimizer,
                           learning_rate=self.learning_rate, momentum=self.momentum, mu=mu, seed=self.seed)


def run_demo(config: DemoConfig, data: str | None, out_dir: str | Path) -> dict:
    """Run the whole flow into ``out_dir`` and return the aggregation summary."""
    if config.mu <= 0:
        raise ConfigError(f"the demo's FedProx clients need mu > 0 (got {config.mu})")
    plain, prox = config.train_config(), config.train_config(config.mu)
    prox.validate()  # before anything is written
    say = (lambda *_: None) if config.quiet else (lambda msg: print(msg, flush=True))
    out_dir = Path(out_dir)
    started = time.perf_counter()
    data_dir, plain_dir, prox_dir = out_dir / "datos", out_dir / "clientes", out_dir / "clientes_fedprox"

    say(f"[1/4] splitting MNIST among {config.num_clients} clients ({config.partition}) -> {data_dir}")
    mnist = load_raw_mnist(data)
    split = PartitionConfig(config.partition, config.num_clients, seed=config.seed)
    split.validate(mnist.y_train.size)
    write_federation(mnist, split, data_dir)

    start = make_global(initial_weights(config.seed), 0, "init", config.seed)
    start_file = global_path(out_dir, 0)
    save_global(start_file, start)
    say(f"[2/4] shared starting point {start_file} (sha256 {start.sha256[:12]})")

    trainer = make_trainer(plain)
    momentum = f", momentum {plain.momentum:g}" if plain.optimizer == "sgd" else ""
    say(f"[3/4] local training: {plain.optimizer}, lr {plain.learning_rate:g}{momentum}, "
        f"{plain.epochs} epochs, batch {plain.batch_size}")
    outputs = {}
    for label, train_config, target in (("mu=0", plain, plain_dir), (f"FedProx mu={config.mu:g}", prox, prox_dir)):
        for client_id in range(1, config.num_clients + 1):
            t0 = time.perf_counter()
            out = run_local_training(client_id, data_dir, target, train_config, start_file, 0, trainer)
            outputs[(label, client_id)] = out
            say(f"[3/4] client {client_id}/{config.num_clients} ({label}): "
                f"test accuracy {out.test.accuracy:.4f}, {time.perf_counter() - t0:.1f} s")

    say("[4/4] aggregating with " + ", ".join(DEFAULT_METHODS))
    x_test, y_test = load_partition(checked_test_file(common_test_file(data_dir)))
    plain_updates = [outputs[("mu=0", k)].update for k in range(1, config.num_clients + 1)]
    prox_updates = [outputs[(f"FedProx mu={config.mu:g}", k)].update for k in range(1, config.num_clients + 1)]
    report = run_aggregation(plain_updates, x_test, y_test, DEFAULT_METHODS, prox_updates=prox_updates,
                             evaluator=trainer, start=start, counts=manifest_counts(data_dir))
    write_outputs(report, out_dir)
    atomic_write_text(out_dir / "configuracion_demo.json",
                      json.dumps({"demo": asdict(config), "train": asdict(plain)}, indent=2) + "\n")
    say(format_table(report))
    for note in report.notes:
        say(f"note: {note}")
    say(f"done in {time.perf_counter() - started:.0f} s; outputs in {out_dir}")
    return json.loads(read_text_capped(out_dir / "resultados_agregacion.json", 16 << 20, "aggregation results",
                                       error=FedMnistError))
