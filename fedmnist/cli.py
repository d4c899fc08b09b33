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
    from fedmnist.partition import PartitionConfig, read_manifest, write_federation

    config = PartitionConfig(args.partition, args.clients, args.alpha, args.shards_per_client, args.seed)
    mnist = load_raw_mnist(args.data)
    config.validate(mnist.y_train.size)
    write_federation(mnist, config, args.out)
    info = read_manifest(args.out)
    for client in info["clients"]:
        print(f"cliente_{client['client_id']}.npz: {client['num_examples']} images, "
              f"classes {client['class_counts']}")
    print(f"test.npz: {info['test']['num_examples']} images")
    print(f"wrote {config.num_clients} partitions ({config.describe()}) to {args.out}")
    return 0


MEMBER_TRAINING = {"epochs": 2, "batch_size": 32, "optimizer": "adam", "learning_rate": 1e-3, "momentum": 0.0}
"""A member's local training by default (``fedmnist.training.TrainConfig``'s, kept here so the parser need not
import TensorFlow): what a Keras user would write for this CNN."""

DEMO_MU = 0.001
"""``fedmnist demo``'s FedProx μ by default (``fedmnist.demo.DemoConfig``'s)."""

AGGRESSIVE_TRAINING = "--optimizer sgd --lr 0.05 --momentum 0.9"
"""The local training where one-shot FedAvg drifts (the simulation's and the essay's course setting)."""


def add_train_config_args(parser: argparse.ArgumentParser) -> None:
    """The member's local-training flags (``fedmnist train`` and ``fedmnist demo``)."""
    d = MEMBER_TRAINING
    parser.add_argument("--epochs", type=int, default=d["epochs"], help=f"local epochs E (default {d['epochs']})")
    parser.add_argument("--batch-size", type=int, default=d["batch_size"],
                        help=f"batch size B (default {d['batch_size']})")
    parser.add_argument("--optimizer", choices=("sgd", "adam"), default=d["optimizer"],
                        help=f"local optimizer (default {d['optimizer']})")
    parser.add_argument("--lr", type=float, default=d["learning_rate"],
                        help=f"local learning rate (default {d['learning_rate']:g})")
    parser.add_argument("--momentum", type=float, default=d["momentum"],
                        help=f"SGD momentum (default {d['momentum']:g}; Adam has none and ignores it)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help=f"seed (default {DEFAULT_SEED})")


def cmd_train(args: argparse.Namespace) -> int:
    from fedmnist.local import run_local_training
    from fedmnist.training import TrainConfig

    config = TrainConfig(args.epochs, args.batch_size, args.optimizer, args.lr, args.momentum, args.mu,
                         args.validation_split, args.seed)
    out = run_local_training(args.client, args.data_dir, args.out, config, args.global_weights, args.round,
                             dp_clip=args.dp_clip, scaffold=args.scaffold)
    hist = out.result.history
    momentum = f", momentum {config.momentum:g}" if config.optimizer == "sgd" else ""
    print(f"client {out.client_id}, round {out.round}: {out.result.num_examples} training images, "
          f"{config.epochs} epochs of {config.optimizer} (lr {config.learning_rate:g}{momentum}, batch "
          f"{config.batch_size}), mu={config.mu:g}, start weights {out.start.sha256[:12]}")
    print(f"last epoch: loss {hist['loss'][-1]:.4f}, accuracy {hist['accuracy'][-1]:.4f}"
          + (f", val_accuracy {hist['val_accuracy'][-1]:.4f}" if hist.get("val_accuracy") else ""))
    print(f"common test set: accuracy {out.test.accuracy:.4f} "
          f"(95% CI {out.test.ci_low:.4f}-{out.test.ci_high:.4f}), loss {out.test.loss:.4f}")
    for path in out.files.values():
        print(f"wrote {path}")
    print(f"took {out.seconds:.1f} s")
    return 0


def cmd_init(args: argparse.Namespace) -> int:
    from fedmnist.config import check_seed
    from fedmnist.exchange import global_path, make_global, save_global
    from fedmnist.io import check_writable_dir
    from fedmnist.model import initial_weights

    check_seed(args.seed, "--seed")
    check_writable_dir(args.out, "--out directory")
    gw = make_global(initial_weights(args.seed), 0, "init", args.seed)
    path = global_path(args.out, 0)
    save_global(path, gw)
    print(f"wrote {path} (build_model(seed={args.seed}), sha256 {gw.sha256})")
    return 0


def add_aggregate_args(parser: argparse.ArgumentParser) -> None:
    from fedmnist.config import DEFAULT_METHODS
    from fedmnist.methods import available_methods

    parser.add_argument("--weights-dir", help="directory holding every member's pesos_cliente_N.pkl")
    parser.add_argument("--data-dir", help="federation directory (its test.npz is the common test set)")
    parser.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=available_methods(),
                        metavar="METHOD", help=f"rules to run (default: {' '.join(DEFAULT_METHODS)}; "
                        f"available: {', '.join(available_methods())})")
    parser.add_argument("--prox-weights-dir", help="updates of the same round trained with mu > 0, used by fedprox")
    parser.add_argument("--round", type=int, default=None,
                        help="round R of the global weights the updates must have started from")
    parser.add_argument("--global-weights", default=None,
                        help="the round's pesos_globales_ronda_R.pkl every member trained from "
                        "(default: the one beside the updates)")
    parser.add_argument("--next-from", default=None, help="method whose model starts round R+1 (default: the best)")
    parser.add_argument("--trim-beta", type=float, default=0.2, help="fraction trimmed at each end (trimmed)")
    parser.add_argument("--krum-f", "--num-malicious", dest="krum_f", type=int, default=1,
                        help="Byzantine clients f that krum/multikrum tolerate (default 1)")
    add_server_optimizer_args(parser)
    add_privacy_args(parser)
    parser.add_argument("--dp-seeded-noise", action="store_true",
                        help="draw the DP noise from --seed's generator (reproducible runs and tests only: anyone "
                        "who knows the seed can remove the noise); default: the operating system's entropy")
    parser.add_argument("--max-count-ratio", type=float, default=None, metavar="R",
                        help="without particion.json, weight no update by more than R x the median sample "
                        "count claimed (default: no cap; a dominant client is reported either way)")
    parser.add_argument("--out", default=".", help="output directory (default .)")


def cmd_aggregate(args: argparse.Namespace) -> int:
    from fedmnist.aggregation import aggregate_directory, format_table
    from fedmnist.methods import MethodConfig

    if not args.weights_dir or not args.data_dir:
        raise FedMnistError("--weights-dir and --data-dir are required (or use --init for round 0)")
    params = MethodConfig(tuple(args.methods), trim_beta=args.trim_beta, krum_f=args.krum_f,
                          server_lr=args.server_lr, server_momentum=args.server_momentum, beta_1=args.beta1,
                          beta_2=args.beta2, tau=args.tau)
    report = aggregate_directory(
        args.weights_dir, args.data_dir, args.out, tuple(args.methods), params, args.round,
        args.prox_weights_dir, args.next_from, args.global_weights, args.max_count_ratio, privacy_from_args(args),
        args.dp_seeded_noise, getattr(args, "seed", DEFAULT_SEED),
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
                        optimizer=args.optimizer, learning_rate=args.lr, momentum=args.momentum, mu=args.mu,
                        seed=args.seed, quiet=args.quiet)
    run_demo(config, args.data, args.out)
    return 0


def cmd_experiments(args: argparse.Namespace) -> int:
    from fedmnist.experiments import run_experiments

    run_experiments(args.profile, args.data, args.out, tuple(args.only), args.quiet, args.workers)
    print(f"results in {args.out}")
    return 0


from fedmnist.experiments import EXPERIMENTS as EXPERIMENT_NAMES  # noqa: E402  (TF-free module)

# --- fedmnist simulate -----------------------------------------------------------------------------

_SIMULATE_FLAGS = {
    "clients": "num_clients", "fraction": "fraction", "rounds": "rounds", "local_epochs": "local_epochs",
    "batch_size": "batch_size", "optimizer": "optimizer", "lr": "learning_rate", "momentum": "momentum",
    "partition": "partition", "alpha": "alpha", "shards_per_client": "shards_per_client", "methods": "methods",
    "mu": "mu", "malicious": "num_malicious", "attack": "attack", "attack_strength": "attack_strength",
    "trim_beta": "trim_beta", "krum_f": "krum_f", "target_accuracy": "target_accuracy",
    "train_subset": "train_subset", "test_subset": "test_subset", "eval_every": "eval_every",
    "stop_at_target": "stop_at_target", "seed": "seed", "server_lr": "server_lr",
    "server_momentum": "server_momentum", "beta1": "beta_1", "beta2": "beta_2", "tau": "tau",
    "dp_noise": "dp_noise", "dp_clip": "dp_clip", "dp_adaptive": "dp_adaptive", "dp_side": "dp_side",
    "dp_delta": "dp_delta", "target_epsilon": "target_epsilon", "dp_sampling": "dp_sampling",
    "dp_accountant": "dp_accountant",
}
"""``fedmnist simulate`` flag (argparse dest) -> flat simulation setting."""


def add_server_optimizer_args(parser: argparse.ArgumentParser) -> None:
    """Flags of the server optimisers (fedavgm, fedadam, fedyogi, fedadagrad); unset: each one's default."""
    add = parser.add_argument
    add("--server-lr", type=float, metavar="ETA",
        help="server learning rate (defaults: fedavgm 1, fedadam 0.1, fedyogi 0.01, fedadagrad 0.1)")
    add("--server-momentum", type=float, metavar="BETA", help="fedavgm's server momentum (default 0.7)")
    add("--beta1", type=float, help="first-moment decay of fedadam/fedyogi (0.9) and fedadagrad (0)")
    add("--beta2", type=float, help="second-moment decay of fedadam/fedyogi (default 0.99)")
    add("--tau", type=float, help="adaptivity floor of fedadam/fedyogi/fedadagrad (default 1e-3)")


def add_privacy_args(parser: argparse.ArgumentParser) -> None:
    """DP-FedAvg flags (client-level differential privacy around fedavg/fedprox)."""
    add = parser.add_argument
    add("--dp-noise", type=float, metavar="Z", help="DP-FedAvg noise multiplier z (noise std z*S on the sum)")
    add("--dp-clip", type=float, metavar="S", help="L2 clip norm S of every client update (initial S if adaptive)")
    add("--dp-adaptive", action="store_true", default=None, help="adaptive clipping (Andrew et al. 2021)")
    add("--dp-side", choices=("server", "client"), help="who clips: the server (default) or each client")
    add("--dp-delta", type=float, metavar="DELTA", help="delta of (epsilon, delta) (default min(1e-5, 1/(10K)))")
    add("--target-epsilon", type=float, metavar="EPS", help="stop before epsilon would exceed EPS")
    add("--dp-sampling", choices=("without_replacement", "poisson"),
        help="client sampling the accountant assumes and the run does (default without_replacement)")
    add("--dp-accountant", choices=("rdp", "pld"), help="privacy accountant (pld needs poisson; default rdp)")


def privacy_from_args(args: argparse.Namespace):
    """The ``DPConfig`` the DP flags describe, or None without ``--dp-noise``/``--dp-clip``."""
    from fedmnist.privacy import DPConfig

    if args.dp_noise is None and args.dp_clip is None:
        return None
    if args.dp_noise is None or args.dp_clip is None:
        raise FedMnistError("differential privacy needs both --dp-noise and --dp-clip")
    given = {"adaptive": args.dp_adaptive, "side": args.dp_side, "delta": args.dp_delta,
             "target_epsilon": args.target_epsilon, "sampling": args.dp_sampling, "accountant": args.dp_accountant}
    return DPConfig(args.dp_noise, args.dp_clip, **{k: v for k, v in given.items() if v is not None})


def config_from_args(args: argparse.Namespace):
    """The preset (or the defaults) with every flag given on the command line applied on top."""
    from fedmnist.simulation import PRESETS, SimulationConfig

    base = PRESETS[args.preset] if args.preset else SimulationConfig()
    given = {name: getattr(args, flag) for flag, name in _SIMULATE_FLAGS.items() if getattr(args, flag) is not None}
    return base.replace(**given)


def _workers(value: str) -> int | str:
    """``--workers``: a positive integer or "auto"."""
    if value == "auto":
        return value
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of workers or 'auto', got {value!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"the number of workers must be at least 1 (got {number})")
    return number


def register_simulate(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``simulate`` sub-command to the ``fedmnist`` parser."""
    from fedmnist.attacks import ATTACKS
    from fedmnist.methods import available_methods
    from fedmnist.partition import SCHEMES
    from fedmnist.simulation import PRESETS, SimulationConfig

    d = SimulationConfig()
    p = sub.add_parser(
        "simulate",
        help="simulate R rounds of federated learning in one process, comparing aggregation methods",
        description="Simulate federated learning on MNIST in one process. Every method runs on the same "
        "partition, initial weights and sampled clients. Flags override --preset's fields.",
        epilog="example: fedmnist simulate --clients 10 --rounds 5 --methods fedavg fedmed "
        "--malicious 2 --attack gaussian --data ../shared/data/mnist.npz --out sim",
    )
    add = p.add_argument
    add("--preset", choices=sorted(PRESETS), help="named configuration (McMahan et al. 2017's MNIST CNN setups)")
    add("--clients", type=int, help=f"number of clients K (default {d.federation.num_clients})")
    add("--fraction", type=float, help=f"fraction C of clients sampled per round, max(1, floor(C*K)) "
        f"(default {d.fraction:g})")
    add("--rounds", type=int, help=f"rounds R (default {d.rounds})")
    add("--local-epochs", type=int, help=f"local epochs E (default {d.training.epochs})")
    add("--batch-size", type=int, help=f"local batch size B (default {d.training.batch_size})")
    add("--optimizer", choices=("sgd", "adam"), help=f"local optimizer (default {d.training.optimizer})")
    add("--lr", type=float, help=f"local learning rate (default {d.training.learning_rate:g})")
    add("--momentum", type=float, help=f"SGD momentum (default {d.training.momentum:g})")
    add("--partition", choices=SCHEMES, help=f"how to split the training set (default {d.federation.partition})")
    add("--alpha", type=float, help=f"Dirichlet concentration (default {d.federation.alpha:g})")
    add("--shards-per-client", type=int, help=f"label shards per client (default {d.federation.shards_per_client})")
    add("--methods", nargs="+", choices=available_methods(), metavar="METHOD",
        help=f"aggregation methods to compare (default: {' '.join(d.method.methods)}; "
        f"available: {', '.join(available_methods())})")
    add("--mu", type=float, help=f"FedProx proximal coefficient of the fedprox clients (default {d.method.mu:g})")
    add_server_optimizer_args(p)
    add_privacy_args(p)
    add("--malicious", type=int, metavar="F", help="number of malicious clients the simulation injects (default 0)")
    add("--attack", choices=ATTACKS, help="what the malicious clients do")
    add("--attack-strength", type=float, metavar="X",
        help="signflip s (default 4), gaussian sigma (default 200), scale lambda (default 10)")
    add("--trim-beta", type=float, help=f"fraction trimmed at each end by 'trimmed' (default {d.method.trim_beta:g})")
    add("--krum-f", type=int, help="Byzantine clients f tolerated by krum/multikrum (default: min(F, (m - 3) // 2))")
    add("--target-accuracy", type=float, help=f"accuracy whose first round is reported (default {d.target_accuracy:g})")
    add("--train-subset", type=int, metavar="N", help="use only the first N training images (quick runs, tests)")
    add("--test-subset", type=int, metavar="N", help="evaluate on the first N test images only")
    add("--eval-every", type=int, metavar="N", help="evaluate every N rounds and the last (default 1)")
    add("--seed", type=int, help=f"seed of the partition, init, sampling and training (default {d.seed})")
    add_data_arg(p)
    add("--stop-at-target", action="store_true", default=None,
        help="stop once every method has reached --target-accuracy")
    add("--quiet", action="store_true", help="no progress bars")
    add("--resume", action="store_true", help="continue from OUT/checkpoint.pkl (same settings required)")
    add("--workers", type=_workers, metavar="N|auto",
        help="train each round's clients in N worker processes, one thread each (auto: one per core); "
        "the same numbers for every N. Default: one after another in this process")
    add("--out", required=True, help="output directory")
    p.set_defaults(func=cmd_simulate)
    return p


def cmd_simulate(args: argparse.Namespace) -> int:
    """Run ``fedmnist simulate`` and print the summary table."""
    from fedmnist.simulation import format_summary, run_simulation

    config = config_from_args(args)
    result = run_simulation(config, args.data, args.out, progress=not args.quiet, resume=args.resume,
                            workers=args.workers)
    if result.malicious_clients:
        print(f"malicious clients ({config.threat.attack}): {' '.join(map(str, result.malicious_clients))}")
    print(format_summary(result))
    print(f"wrote {len(result.files)} files to {args.out} in {result.seconds:.1f} s")
    return 0


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

    p = sub.add_parser("train", help="train one client on its partition (the notebook's twin)",
                       epilog=f"defaults: {MEMBER_TRAINING['optimizer']}, lr {MEMBER_TRAINING['learning_rate']:g}, "
                       f"{MEMBER_TRAINING['epochs']} epochs of batches of {MEMBER_TRAINING['batch_size']}; the "
                       f"aggressive setting where one-shot FedAvg drifts: {AGGRESSIVE_TRAINING}")
    p.add_argument("--client", type=int, required=True, help="client id N (1..N)")
    p.add_argument("--data-dir", required=True, help="directory written by split_data.py")
    p.add_argument("--global-weights", help="pesos_globales_ronda_R.pkl (default: build_model(seed), round 0)")
    p.add_argument("--round", type=int, default=None, help="round R (checked against the weights file)")
    add_train_config_args(p)
    p.add_argument("--mu", type=float, default=0.0, help="FedProx proximal coefficient (default 0: plain training)")
    p.add_argument("--validation-split", type=float, default=0.1, help="held-out fraction for curves (default 0.1)")
    p.add_argument("--dp-clip", type=float, default=None, metavar="S",
                   help="client-side DP-FedAvg: clip the update to L2 norm S before writing it")
    p.add_argument("--scaffold", action="store_true",
                   help="train with SCAFFOLD's correction from round 0 (later rounds switch it on by themselves "
                        "when the global weights come from a SCAFFOLD aggregation); needs plain SGD, not the "
                        "default Adam: --optimizer sgd --momentum 0 and an SGD --lr such as 0.05 (in every "
                        "round); keeps the client's control variate in OUT/control_cliente_N.pkl")
    p.add_argument("--out", required=True, help="output directory")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("aggregate", help="aggregate the members' updates with each method and compare")
    add_aggregate_args(p)
    p.set_defaults(func=cmd_aggregate)

    p = sub.add_parser("demo", help="the whole course job in one command: split, train 5 clients, aggregate",
                       epilog=f"the members train as fedmnist train does by default; the aggressive setting "
                       f"where one-shot FedAvg drifts: {AGGRESSIVE_TRAINING}")
    p.add_argument("--clients", type=int, default=5, help="number of clients (default 5)")
    add_train_config_args(p)
    p.add_argument("--mu", type=float, default=DEMO_MU, help=f"FedProx mu of the FedProx clients (default {DEMO_MU:g})")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    add_data_arg(p)
    p.add_argument("--out", default="resultados_demo", help="output directory (default resultados_demo)")
    p.set_defaults(func=cmd_demo)

    register_simulate(sub)

    p = sub.add_parser("experiments", help="run the essay's experiments and write their result files")
    p.add_argument("--profile", choices=("quick", "full"), default="quick",
                   help="quick: CI-sized check (minutes); full: the essay's results (hours on a 2-core CPU; every run resumes)")
    p.add_argument("--only", nargs="+", default=list(EXPERIMENT_NAMES), choices=EXPERIMENT_NAMES,
                   help="run only these experiments")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.add_argument("--workers", type=_workers, metavar="N|auto",
                   help="run the simulations' clients in N worker processes (see fedmnist simulate --workers)")
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
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 2
    except OSError as exc:  # a write the package did not wrap (a library saving a file): still one line
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"error: {one_line(where)}{one_line(exc.strerror or type(exc).__name__)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


MAX_ERROR_CHARS = 2000
"""Longest error line printed: a message is one line, however long the names or values it quotes."""


def one_line(message: object) -> str:
    """``message`` as one printable line of at most ``MAX_ERROR_CHARS`` (control characters escaped)."""
    from fedmnist.io import quote

    return quote(message, MAX_ERROR_CHARS)


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
