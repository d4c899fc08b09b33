"""The ``fedmnist`` command: one sub-command per job, each a thin layer over the package.

Errors caused by input (files, arguments) print one clear line and exit with status 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

from fedmnist.config import AGGRESSIVE_TRAINING, DEFAULT_SEED, TrainingConfig
from fedmnist.errors import FedMnistError
from fedmnist.settings import DEMO_PROXIMAL_MU, MEMBER_PROXIMAL_MU, SETTINGS, add_setting, format_value

log = logging.getLogger("fedmnist")


def add_data_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data", metavar="PATH",
        help="MNIST npz in the keras layout (default: $FEDMNIST_DATA, else keras download)",
    )


def add_split_args(parser: argparse.ArgumentParser) -> None:
    """The flags of ``fedmnist split`` and ``split_data.py``."""
    for name in ("clients", "partition", "alpha", "shards-per-client", "seed"):
        add_setting(parser, name)
    add_data_arg(parser)
    parser.add_argument("--out", required=True, help="output directory for the federation's files")


def cmd_split(args: argparse.Namespace) -> int:
    from fedmnist.data import load_raw_mnist
    from fedmnist.federation_files import read_manifest, write_federation
    from fedmnist.partition import PartitionConfig

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


TRAINING_FLAGS = {"local-epochs": "epochs", "batch-size": "batch_size", "optimizer": "optimizer",
                  "learning-rate": "learning_rate", "momentum": "momentum"}
"""The local-training settings and their ``fedmnist.config.TrainingConfig`` fields."""


def training_flags(training: TrainingConfig, names: Sequence[str] = tuple(TRAINING_FLAGS)) -> str:
    """``training`` as the command-line flags that ask for it (``--optimizer sgd --learning-rate 0.05 ...``)."""
    return " ".join(f"{SETTINGS[n].flag} {format_value(getattr(training, TRAINING_FLAGS[n]))}" for n in names)


AGGRESSIVE_FLAGS = training_flags(AGGRESSIVE_TRAINING, ("optimizer", "learning-rate", "momentum"))
"""The local training where one-shot FedAvg drifts (the essay's course setting), as flags."""


def add_train_config_args(parser: argparse.ArgumentParser) -> None:
    """The member's local-training flags (``fedmnist train`` and ``fedmnist demo``): every mode's defaults."""
    for name in (*TRAINING_FLAGS, "seed"):
        add_setting(parser, name)


def training_from_args(args: argparse.Namespace) -> dict:
    """The ``TrainingConfig`` fields the training flags give."""
    return {field: getattr(args, SETTINGS[name].field) for name, field in TRAINING_FLAGS.items()}


def cmd_train(args: argparse.Namespace) -> int:
    from fedmnist.local import run_local_training
    from fedmnist.training import TrainConfig

    config = TrainConfig(**training_from_args(args), mu=args.proximal_mu, validation_split=args.validation_split,
                         seed=args.seed)
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
    add_setting(parser, "trim-beta")
    add_setting(parser, "krum-f")
    add_server_optimizer_args(parser)
    add_privacy_args(parser)
    add_setting(parser, "dp-seeded-noise", note="default: the operating system's entropy")
    add_setting(parser, "max-count-ratio", note="only without particion.json; a dominant client is reported either way")
    parser.add_argument("--out", default=".", help="output directory (default .)")


def cmd_aggregate(args: argparse.Namespace) -> int:
    from fedmnist.aggregation import aggregate_directory, format_table
    from fedmnist.methods import MethodConfig

    if not args.weights_dir or not args.data_dir:
        raise FedMnistError("--weights-dir and --data-dir are required (or use --init for round 0)")
    params = MethodConfig(tuple(args.methods), trim_beta=args.trim_beta, krum_f=args.krum_f,
                          server_lr=args.server_lr, server_momentum=args.server_momentum, beta_1=args.beta_1,
                          beta_2=args.beta_2, tau=args.tau)
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

    config = DemoConfig(num_clients=args.clients, **training_from_args(args), mu=args.proximal_mu, seed=args.seed,
                        quiet=args.quiet)
    run_demo(config, args.data, args.out)
    return 0


def cmd_experiments(args: argparse.Namespace) -> int:
    from fedmnist.experiments import run_experiments

    run_experiments(args.profile, args.data, args.out, tuple(args.only), args.quiet, args.workers)
    print(f"results in {args.out}")
    return 0


from fedmnist.experiments import EXPERIMENTS as EXPERIMENT_NAMES  # noqa: E402  (TF-free module)

# --- fedmnist simulate -----------------------------------------------------------------------------

SECURE_AGGREGATION_FLAGS = ("secure-aggregation", "secagg-num-shares", "secagg-threshold", "secagg-clip-range",
                            "secagg-control-range", "secagg-bits", "secagg-modulus", "secagg-weight-bound")
"""Secure aggregation's flags (``fedmnist.secure_aggregation.SETTINGS``), the Flower run config's keys."""

_SIMULATE_FLAGS = {
    "clients": "num_clients", "fraction-train": "fraction", "rounds": "rounds", "local-epochs": "local_epochs",
    "batch-size": "batch_size", "optimizer": "optimizer", "learning-rate": "learning_rate", "momentum": "momentum",
    "partition": "partition", "alpha": "alpha", "shards-per-client": "shards_per_client",
    "proximal-mu": "mu", "malicious": "num_malicious", "attack": "attack", "attack-strength": "attack_strength",
    "trim-beta": "trim_beta", "krum-f": "krum_f", "target-accuracy": "target_accuracy",
    "train-subset": "train_subset", "test-subset": "test_subset", "eval-every": "eval_every",
    "stop-at-target": "stop_at_target", "seed": "seed", "server-lr": "server_lr",
    "server-momentum": "server_momentum", "beta-1": "beta_1", "beta-2": "beta_2", "tau": "tau",
    "dp-noise": "dp_noise", "dp-clip": "dp_clip", "dp-adaptive": "dp_adaptive", "dp-side": "dp_side",
    "dp-delta": "dp_delta", "target-epsilon": "target_epsilon", "dp-sampling": "dp_sampling",
    "dp-accountant": "dp_accountant", **{key: key.replace("-", "_") for key in SECURE_AGGREGATION_FLAGS},
}
"""``fedmnist simulate``'s settings (``fedmnist.settings`` names) -> flat simulation setting (besides ``methods``)."""


def add_server_optimizer_args(parser: argparse.ArgumentParser) -> None:
    """Flags of the server optimisers (fedavgm, fedadam, fedyogi, fedadagrad); unset: each one's default."""
    from fedmnist.server_opt import default_summary

    for name in ("server-lr", "server-momentum", "beta-1", "beta-2", "tau"):
        add_setting(parser, name, note=f"defaults: {default_summary(SETTINGS[name].field)}")


def add_privacy_args(parser: argparse.ArgumentParser) -> None:
    """DP-FedAvg flags (client-level differential privacy around fedavg/fedprox); unset: ``DPConfig``'s defaults."""
    from fedmnist.privacy import MAX_DEFAULT_DELTA

    add_setting(parser, "dp-noise")
    add_setting(parser, "dp-clip")
    add_setting(parser, "dp-adaptive", default=None)
    for name in ("dp-side", "dp-sampling", "dp-accountant"):
        add_setting(parser, name, default=None, shown=SETTINGS[name].default)
    add_setting(parser, "dp-delta", note=f"default min({MAX_DEFAULT_DELTA:g}, 1/(10K))")
    add_setting(parser, "target-epsilon")


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
    given = {flat: getattr(args, SETTINGS[name].field) for name, flat in _SIMULATE_FLAGS.items()
             if getattr(args, SETTINGS[name].field) is not None}
    if args.methods is not None:
        given["methods"] = args.methods
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
    from fedmnist.attacks import ATTACKS, DEFAULT_STRENGTH
    from fedmnist.methods import available_methods
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
    add("--preset", choices=sorted(PRESETS), help="named configuration: McMahan et al. 2017's MNIST CNN setups, "
        "with their own local training (plain SGD, E = 5, B = 10, as the paper, so its rounds-to-target compare)")

    def setting(name: str, shown, **kwargs) -> None:
        add_setting(p, name, default=None, shown=shown, **kwargs)

    training, federation, method = d.training, d.federation, d.method
    setting("clients", federation.num_clients)
    setting("fraction-train", d.fraction)
    setting("rounds", d.rounds)
    for name, field in TRAINING_FLAGS.items():
        setting(name, getattr(training, field))
    setting("partition", federation.partition)
    setting("alpha", federation.alpha)
    setting("shards-per-client", federation.shards_per_client)
    add("--methods", nargs="+", choices=available_methods(), metavar="METHOD",
        help=f"aggregation methods to compare (default: {' '.join(d.method.methods)}; "
        f"available: {', '.join(available_methods())})")
    setting("proximal-mu", method.mu)
    add_server_optimizer_args(p)
    add_privacy_args(p)
    for name in SECURE_AGGREGATION_FLAGS:
        setting(name, SETTINGS[name].default)
    setting("malicious", d.threat.num_malicious)
    setting("attack", None, choices=ATTACKS)
    setting("attack-strength", None, note="defaults: " + ", ".join(
        f"{name} {value:g}" for name, value in DEFAULT_STRENGTH.items() if value is not None))
    setting("trim-beta", method.trim_beta)
    setting("krum-f", None, aliases=(), note="default: min(F, (m - 3) // 2)")
    setting("target-accuracy", d.target_accuracy)
    setting("train-subset", None)
    setting("test-subset", None)
    setting("eval-every", d.eval_every)
    setting("seed", d.seed)
    add_data_arg(p)
    setting("stop-at-target", None)
    add("--quiet", action="store_true", help="no progress bars")
    add_setting(p, "resume", help="continue from OUT/checkpoint.pkl (same settings required)")
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
    add_setting(p, "seed")
    p.add_argument("--out", default=".", help="output directory (default .)")
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("train", help="train one client on its partition (the notebook's twin)",
                       epilog=f"defaults: every mode's local training ({training_flags(TrainingConfig())}); the "
                       f"aggressive setting where one-shot FedAvg drifts: {AGGRESSIVE_FLAGS}")
    p.add_argument("--client", type=int, required=True, help="client id N (1..N)")
    p.add_argument("--data-dir", required=True, help="directory written by split_data.py")
    p.add_argument("--global-weights", help="pesos_globales_ronda_R.pkl (default: build_model(seed), round 0)")
    p.add_argument("--round", type=int, default=None, help="round R (checked against the weights file)")
    add_train_config_args(p)
    add_setting(p, "proximal-mu", default=MEMBER_PROXIMAL_MU, note="a member's job trains without the proximal "
                "term unless asked")
    add_setting(p, "validation-split")
    add_setting(p, "dp-clip", help="client-side DP-FedAvg: clip the update to L2 norm S before writing it")
    p.add_argument("--scaffold", action="store_true",
                   help="train with SCAFFOLD's correction from round 0 (later rounds switch it on by themselves "
                        "when the global weights come from a SCAFFOLD aggregation); needs plain SGD, not the "
                        "default Adam: --optimizer sgd --momentum 0 and an SGD --learning-rate such as "
                        "0.05 (in every round); keeps the client's control variate in OUT/control_cliente_N.pkl")
    p.add_argument("--out", required=True, help="output directory")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("aggregate", help="aggregate the members' updates with each method and compare")
    add_aggregate_args(p)
    p.set_defaults(func=cmd_aggregate)

    p = sub.add_parser("demo", help="the whole course job in one command: split, train 5 clients, aggregate",
                       epilog=f"the members train as fedmnist train does by default; the aggressive setting "
                       f"where one-shot FedAvg drifts: {AGGRESSIVE_FLAGS}")
    add_setting(p, "clients")
    add_train_config_args(p)
    add_setting(p, "proximal-mu", default=DEMO_PROXIMAL_MU)
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

    p = sub.add_parser("essay", help="rewrite the essay's tables from the result files")
    from fedmnist import essay

    essay.add_arguments(p)
    p.set_defaults(func=essay.command)

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
    add_setting(parser, "seed", note="the model seed of --init")
    add_aggregate_args(parser)
    return run(cmd_aggregation_script, parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
