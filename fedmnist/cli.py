"""The ``fedmnist`` command: one sub-command per job, each a thin layer over the package.

Errors caused by input (files, arguments) print one clear line and exit with status 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

from fedmnist.config import DEFAULT_SEED
from fedmnist.errors import FedMnistError

log = logging.getLogger("fedmnist")


def add_data_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data", metavar="PATH",
        help="MNIST npz in the keras layout (default: $FEDMNIST_DATA, else keras download)",
    )


def add_split_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--clients", type=int, default=5, help="number of clients N (default 5)")
    parser.add_argument("--partition", choices=("iid", "dirichlet", "shards"), default="iid",
                        help="iid (stratified), dirichlet (non-IID, alpha) or shards (pathological)")
    parser.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration (default 0.5)")
    parser.add_argument("--shards-per-client", type=int, default=2, help="shards per client (default 2)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help=f"random seed (default {DEFAULT_SEED})")
    add_data_arg(parser)
    parser.add_argument("--out", required=True, help="output directory for the federation's files")


def cmd_split(args: argparse.Namespace) -> int:
    from fedmnist.data import load_raw_mnist
    from fedmnist.partition import PartitionConfig, write_federation

    config = PartitionConfig(args.partition, args.clients, args.alpha, args.shards_per_client, args.seed)
    mnist = load_raw_mnist(args.data)
    config.validate(mnist.y_train.size)
    manifest = write_federation(mnist, config, args.out)
    import json

    info = json.loads(manifest.read_text())
    for client in info["clients"]:
        print(f"cliente_{client['client_id']}.npz: {client['num_examples']} images, "
              f"classes {client['class_counts']}")
    print(f"test.npz: {info['test']['num_examples']} images")
    print(f"wrote {config.num_clients} partitions ({config.describe()}) to {args.out}")
    return 0


def add_train_config_args(parser: argparse.ArgumentParser, epochs: int = 2, batch_size: int = 32) -> None:
    parser.add_argument("--epochs", type=int, default=epochs, help=f"local epochs E (default {epochs})")
    parser.add_argument("--batch-size", type=int, default=batch_size, help=f"batch size B (default {batch_size})")
    parser.add_argument("--optimizer", choices=("sgd", "adam"), default="sgd", help="local optimizer (default sgd)")
    parser.add_argument("--lr", type=float, default=0.05, help="learning rate (default 0.05)")
    parser.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default 0.9)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help=f"seed (default {DEFAULT_SEED})")


def cmd_train(args: argparse.Namespace) -> int:
    from fedmnist.local import run_local_training
    from fedmnist.training import TrainConfig

    config = TrainConfig(args.epochs, args.batch_size, args.optimizer, args.lr, args.momentum, args.mu,
                         args.validation_split, args.seed)
    out = run_local_training(args.client, args.data_dir, args.out, config, args.global_weights, args.round)
    hist = out.result.history
    print(f"client {out.client_id}, round {out.round}: {out.result.num_examples} training images, "
          f"{config.epochs} epochs, mu={config.mu:g}, start weights {out.start.sha256[:12]}")
    print(f"last epoch: loss {hist['loss'][-1]:.4f}, accuracy {hist['accuracy'][-1]:.4f}"
          + (f", val_accuracy {hist['val_accuracy'][-1]:.4f}" if hist.get("val_accuracy") else ""))
    print(f"common test set: accuracy {out.test.accuracy:.4f} "
          f"(95% CI {out.test.ci_low:.4f}-{out.test.ci_high:.4f}), loss {out.test.loss:.4f}")
    for path in out.files.values():
        print(f"wrote {path}")
    print(f"took {out.seconds:.1f} s")
    return 0


def cmd_init(args: argparse.Namespace) -> int:
    from fedmnist.exchange import global_path, make_global, save_global
    from fedmnist.model import initial_weights

    gw = make_global(initial_weights(args.seed), 0, "init", args.seed)
    path = global_path(args.out, 0)
    save_global(path, gw)
    print(f"wrote {path} (build_model(seed={args.seed}), sha256 {gw.sha256})")
    return 0


def add_aggregate_args(parser: argparse.ArgumentParser) -> None:
    from fedmnist.config import DEFAULT_METHODS
    from fedmnist.strategies import AGGREGATORS

    parser.add_argument("--weights-dir", help="directory holding every member's pesos_cliente_N.pkl")
    parser.add_argument("--data-dir", help="federation directory (its test.npz is the common test set)")
    parser.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=sorted(AGGREGATORS),
                        metavar="METHOD", help=f"rules to run (default: {' '.join(DEFAULT_METHODS)}; "
                        f"available: {', '.join(AGGREGATORS)})")
    parser.add_argument("--prox-weights-dir", help="updates of the same round trained with mu > 0, used by fedprox")
    parser.add_argument("--round", type=int, default=None, help="round R the updates must belong to")
    parser.add_argument("--next-from", default=None, help="method whose model starts round R+1 (default: the best)")
    parser.add_argument("--trim-beta", type=float, default=0.2, help="fraction trimmed at each end (trimmed)")
    parser.add_argument("--num-malicious", type=int, default=1, help="clients assumed malicious f (krum)")
    parser.add_argument("--out", default=".", help="output directory (default .)")


def cmd_aggregate(args: argparse.Namespace) -> int:
    from fedmnist.aggregation import AggregationParams, aggregate_directory, format_table

    if not args.weights_dir or not args.data_dir:
        raise FedMnistError("--weights-dir and --data-dir are required (or use --init for round 0)")
    report = aggregate_directory(
        args.weights_dir, args.data_dir, args.out, tuple(args.methods),
        AggregationParams(args.trim_beta, args.num_malicious), args.round, args.prox_weights_dir,
        args.next_from,
    )
    print(f"round {report.round}: {len(report.locals_)} updates, start weights "
          f"{(report.start_sha256 or 'unknown')[:12]}")
    print(format_table(report))
    for note in report.notes:
        print(f"note: {note}")
    for path in report.files.values():
        print(f"wrote {path}")
    return 0


def cmd_aggregation_script(args: argparse.Namespace) -> int:
    """``global_aggregation.py``: aggregation, or ``--init`` for round 0."""
    return cmd_init(args) if args.init else cmd_aggregate(args)


def cmd_demo(args: argparse.Namespace) -> int:
    from fedmnist.demo import DemoConfig, run_demo

    config = DemoConfig(num_clients=args.clients, epochs=args.epochs, batch_size=args.batch_size,
                        mu=args.mu, seed=args.seed, quiet=args.quiet)
    run_demo(config, args.data, args.out)
    return 0


def cmd_experiments(args: argparse.Namespace) -> int:
    from fedmnist.experiments import run_experiments

    run_experiments(args.profile, args.data, args.out, tuple(args.only), args.quiet)
    print(f"results in {args.out}")
    return 0


EXPERIMENT_NAMES = ("course", "heterogeneity", "fedprox_mu", "attacks", "mcmahan")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedmnist", description="Federated learning on MNIST.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("split", help="split MNIST into client partitions and a common test set")
    add_split_args(p)
    p.set_defaults(func=cmd_split)

    p = sub.add_parser("init", help="write pesos_globales_ronda_0.pkl, the shared starting point")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, help=f"model seed (default {DEFAULT_SEED})")
    p.add_argument("--out", default=".", help="output directory (default .)")
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("train", help="train one client on its partition (the notebook's twin)")
    p.add_argument("--client", type=int, required=True, help="client id N (1..N)")
    p.add_argument("--data-dir", required=True, help="directory written by split_data.py")
    p.add_argument("--global-weights", help="pesos_globales_ronda_R.pkl (default: build_model(seed), round 0)")
    p.add_argument("--round", type=int, default=None, help="round R (checked against the weights file)")
    add_train_config_args(p)
    p.add_argument("--mu", type=float, default=0.0, help="FedProx proximal coefficient (default 0: plain training)")
    p.add_argument("--validation-split", type=float, default=0.1, help="held-out fraction for curves (default 0.1)")
    p.add_argument("--out", required=True, help="output directory")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("aggregate", help="aggregate the members' updates with each method and compare")
    add_aggregate_args(p)
    p.set_defaults(func=cmd_aggregate)

    p = sub.add_parser("demo", help="the whole course job in one command: split, train 5 clients, aggregate")
    p.add_argument("--clients", type=int, default=5, help="number of clients (default 5)")
    p.add_argument("--epochs", type=int, default=2, help="local epochs (default 2)")
    p.add_argument("--batch-size", type=int, default=32, help="batch size (default 32)")
    p.add_argument("--mu", type=float, default=0.01, help="FedProx mu of the FedProx clients (default 0.01)")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, help=f"seed (default {DEFAULT_SEED})")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    add_data_arg(p)
    p.add_argument("--out", default="resultados_demo", help="output directory (default resultados_demo)")
    p.set_defaults(func=cmd_demo)

    from fedmnist.simulation import register_simulate

    register_simulate(sub)

    p = sub.add_parser("experiments", help="run the essay's experiments and write their result files")
    p.add_argument("--profile", choices=("quick", "full"), default="quick",
                   help="quick: CI-sized check (minutes); full: the essay's results (about an hour)")
    p.add_argument("--only", nargs="+", default=list(EXPERIMENT_NAMES), choices=EXPERIMENT_NAMES,
                   help="run only these experiments")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    add_data_arg(p)
    p.add_argument("--out", default="resultados", help="output directory (default resultados)")
    p.set_defaults(func=cmd_experiments)

    return parser


def run(func: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Run a command, turning user-facing errors into one line on stderr and exit status 2."""
    logging.basicConfig(level=logging.DEBUG if getattr(args, "verbose", False) else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return func(args)
    except FedMnistError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run(args.func, args)


def main_split(argv: Sequence[str] | None = None) -> int:
    """``split_data.py``: the ``split`` command on its own."""
    parser = argparse.ArgumentParser(prog="split_data.py", description="Split MNIST among N clients.")
    add_split_args(parser)
    return run(cmd_split, parser.parse_args(argv))


def main_aggregation(argv: Sequence[str] | None = None) -> int:
    """``global_aggregation.py``: aggregate a round, or write round 0's weights with ``--init``."""
    parser = argparse.ArgumentParser(prog="global_aggregation.py",
                                     description="Aggregate the members' weights with FedAvg, FedProx, FedMed...")
    parser.add_argument("--init", action="store_true",
                        help="write pesos_globales_ronda_0.pkl (build_model(seed)) and exit")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="model seed for --init")
    add_aggregate_args(parser)
    return run(cmd_aggregation_script, parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
