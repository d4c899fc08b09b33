"""Every user-facing hyper-parameter, declared once: its name, type, default, help and old spellings.

One name per setting in every mode: the canonical name is the kebab-case key of Flower's run config
(``local-epochs``); the command-line flag is ``--`` and that name (``--local-epochs``), the Python field
the name with underscores (``local_epochs``) and the notebook's parameter the same in upper case
(``LOCAL_EPOCHS``). Every ``fedmnist`` command builds its flags here (``add_setting``), the typed configs
take their defaults from here (``default``), and the tests check ``FlowerRunConfig``,
``[tool.flwr.app.config]`` and the notebook's parameters cell against this table.

Old spellings (``--epochs``, ``--lr``, ``--mu``, ``--num-malicious`` for Krum's f, the notebook's
``EPOCHS`` and ``PROX_MU``…) keep working for one release, with a ``FutureWarning`` naming the new one.

This module imports nothing from the package (nor TensorFlow): every other module may import it.
"""

from __future__ import annotations

import argparse
import warnings
from dataclasses import dataclass
from typing import Any

_DECLARED = object()
"""``add_setting``'s marker for "the declared default"."""


@dataclass(frozen=True)
class Setting:
    """One hyper-parameter: canonical kebab-case name, type, default, short help and old spellings.

    ``flower_unset`` is what Flower's run config writes for a ``None`` default (TOML has no null):
    a negative number for "the method's default" or "off". ``aliases`` are deprecated flags and
    ``notebook_aliases`` deprecated notebook parameters, both kept for one release.
    """

    name: str
    kind: type
    default: Any
    help: str
    choices: tuple[str, ...] | None = None
    aliases: tuple[str, ...] = ()
    notebook_aliases: tuple[str, ...] = ()
    metavar: str | None = None
    flower_unset: Any = None

    @property
    def flag(self) -> str:
        """The command-line flag, ``--local-epochs``."""
        return f"--{self.name}"

    @property
    def field(self) -> str:
        """The Python field and argparse dest, ``local_epochs``."""
        return self.name.replace("-", "_")

    @property
    def notebook(self) -> str:
        """The notebook parameter, ``LOCAL_EPOCHS``."""
        return self.field.upper()

    @property
    def flower_default(self) -> Any:
        """The value of ``[tool.flwr.app.config]`` and ``FlowerRunConfig`` for this setting."""
        return self.flower_unset if self.default is None else self.default


def _settings(*items: Setting) -> dict[str, Setting]:
    return {s.name: s for s in items}


SETTINGS: dict[str, Setting] = _settings(
    # --- a client's local training (every mode) ---
    Setting("local-epochs", int, 2, "local epochs E", aliases=("--epochs",), notebook_aliases=("EPOCHS",),
            metavar="E"),
    Setting("batch-size", int, 32, "local batch size B", metavar="B"),
    Setting("optimizer", str, "adam", "local optimizer", choices=("sgd", "adam")),
    Setting("learning-rate", float, 1e-3, "local learning rate", aliases=("--lr",), metavar="LR"),
    Setting("momentum", float, 0.0, "local SGD momentum, which Adam ignores"),
    Setting("proximal-mu", float, 0.01, "FedProx's proximal coefficient mu of the fedprox clients",
            aliases=("--mu",), notebook_aliases=("PROX_MU",), metavar="MU"),
    Setting("seed", int, 42, "seed of the partition, the initial weights, the sampling and the training"),
    Setting("validation-split", float, 0.1, "fraction of a member's images held out for the learning curves"),
    # --- the federation ---
    Setting("clients", int, 5, "number of clients K", metavar="K"),
    Setting("partition", str, "iid", "how to split the training set: iid (stratified), dirichlet (non-IID, "
            "alpha) or shards (pathological)", choices=("iid", "dirichlet", "shards")),
    Setting("alpha", float, 0.5, "Dirichlet concentration alpha"),
    Setting("shards-per-client", int, 2, "label shards per client"),
    # --- the rounds ---
    Setting("rounds", int, 10, "rounds R", metavar="R"),
    Setting("num-server-rounds", int, 3, "rounds of the Flower run"),
    Setting("fraction-train", float, 1.0, "fraction C of the clients sampled every round, max(1, floor(C*K))",
            aliases=("--fraction",), metavar="C"),
    Setting("eval-every", int, 1, "evaluate every N rounds and the last", metavar="N"),
    Setting("target-accuracy", float, 0.99, "accuracy whose first round is reported"),
    Setting("stop-at-target", bool, False, "stop once every method has reached --target-accuracy"),
    Setting("train-subset", int, None, "use only the first N training images (quick runs, tests)", metavar="N"),
    Setting("test-subset", int, None, "evaluate on the first N test images only", metavar="N"),
    Setting("resume", bool, False, "continue from the checkpoint in output-dir"),
    # --- the Flower deployment's own keys ---
    Setting("min-train-nodes", int, 2, "fewer accepted replies in a round stop the run"),
    Setting("min-available-nodes", int, 0, "nodes to wait for before round 1 (0: min-train-nodes)"),
    Setting("wait-nodes-timeout", float, 300.0, "seconds to wait for those nodes"),
    Setting("round-timeout", float, 600.0, "seconds to wait for a round's replies"),
    Setting("output-dir", str, "", "absolute output directory on the SuperLink's machine"),
    Setting("test-file", str, "", "absolute path of the common test.npz on the SuperLink's machine"),
    Setting("data-dir", str, "", "federation directory with cliente_N.npz (Flower's simulation engine only)"),
    Setting("dp-clients", int, 0, "federation size K the accountant assumes (0: the nodes connected at round 1)"),
    # --- the methods ---
    Setting("method", str, "fedavg", "aggregation method of the Flower run"),
    Setting("trim-beta", float, 0.2, "fraction trimmed at each end by 'trimmed'", metavar="BETA"),
    Setting("krum-f", int, 1, "Byzantine clients f that krum/multikrum/bulyan tolerate",
            aliases=("--num-malicious",), metavar="F"),
    Setting("server-lr", float, None, "server learning rate eta", metavar="ETA", flower_unset=-1.0),
    Setting("server-momentum", float, None, "fedavgm's server momentum", metavar="BETA", flower_unset=-1.0),
    Setting("beta-1", float, None, "first-moment decay of the adaptive server optimisers", aliases=("--beta1",),
            flower_unset=-1.0),
    Setting("beta-2", float, None, "second-moment decay of fedadam/fedyogi", aliases=("--beta2",),
            flower_unset=-1.0),
    Setting("tau", float, None, "adaptivity floor of fedadam/fedyogi/fedadagrad", flower_unset=-1.0),
    # --- the attackers a simulation injects ---
    Setting("malicious", int, 0, "number of malicious clients the simulation injects", metavar="F"),
    Setting("attack", str, None, "what the malicious clients do"),
    Setting("attack-strength", float, None, "the attack's parameter", metavar="X"),
    # --- differential privacy (DP-FedAvg) ---
    Setting("dp-noise", float, None, "DP-FedAvg noise multiplier z (noise std z*S on the sum)", metavar="Z",
            flower_unset=-1.0),
    Setting("dp-clip", float, None, "L2 clip norm S of every client update (initial S if adaptive)", metavar="S",
            flower_unset=1.0),
    Setting("dp-adaptive", bool, False, "adaptive clipping (Andrew et al. 2021)"),
    Setting("dp-side", str, "server", "who clips: the server or each client", choices=("server", "client")),
    Setting("dp-delta", float, None, "delta of (epsilon, delta)", metavar="DELTA", flower_unset=-1.0),
    Setting("target-epsilon", float, None, "stop before epsilon would exceed EPS", metavar="EPS",
            flower_unset=-1.0),
    Setting("dp-sampling", str, "without_replacement", "client sampling the accountant assumes and the run does",
            choices=("without_replacement", "poisson")),
    Setting("dp-accountant", str, "rdp", "privacy accountant, pld only with poisson sampling", choices=("rdp", "pld")),
    Setting("dp-seeded-noise", bool, False, "draw the DP noise from the seed's generator (reproducible runs and "
            "tests only: anyone who knows the seed can remove the noise)"),
    Setting("max-count-ratio", float, None, "weight no update by more than R x the median sample count claimed; "
            "unset: no cap", metavar="R", flower_unset=0.0),
    # --- secure aggregation (SecAgg+, fedmnist.secure_aggregation) ---
    Setting("secure-aggregation", bool, False, "mask the round's replies with SecAgg+: the server learns only "
            "their sum"),
    Setting("secagg-num-shares", int, None, "nodes holding shares of each node's secrets, itself included; odd, "
            "or unset (0 in the run config) for every sampled node", metavar="K", flower_unset=0),
    Setting("secagg-threshold", int, None, "shares needed to rebuild a secret (more than half of them); unset "
            "(0 in the run config) for a majority", metavar="T", flower_unset=0),
    Setting("secagg-clip-range", float, 1.0, "R: update coordinates are clipped to [-R, R] before quantisation",
            metavar="R"),
    Setting("secagg-control-range", float, 10.0, "R_c: the same for SCAFFOLD's control-variate deltas",
            metavar="RC"),
    Setting("secagg-bits", int, 22, "quantisation bits per coordinate", metavar="BITS"),
    Setting("secagg-modulus", int, 2**32, "M: the masks' field, a power of two", metavar="M"),
    Setting("secagg-weight-bound", int, 60_000, "W: the largest example count a member may weigh with",
            metavar="W"),
)
"""Every declared setting by canonical name."""

MEMBER_PROXIMAL_MU = 0.0
"""μ of a member's job (``fedmnist train``, the notebook): plain training unless asked for FedProx."""
DEMO_PROXIMAL_MU = 0.001
"""μ of ``fedmnist demo``'s FedProx clients (small: the members train with Adam)."""
SIMULATION_CLIENTS = 10
"""K of ``fedmnist simulate`` by default (the course team, ``clients``' default, is 5)."""


def default(name: str) -> Any:
    """The declared default of setting ``name`` (KeyError for an undeclared one)."""
    return SETTINGS[name].default


def format_value(value: Any) -> str:
    """A default as help shows it (``0.001``, ``adam``, ``none``)."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def help_text(name: str, shown: Any = _DECLARED, note: str = "") -> str:
    """The help of ``name``: its short help and the default (declared unless ``shown``), plus a note."""
    setting = SETTINGS[name]
    value = setting.default if shown is _DECLARED else shown
    said = [] if setting.kind is bool or value is None else [f"default {format_value(value)}"]
    said += [note] if note else []
    return f"{setting.help} ({'; '.join(said)})" if said else setting.help


def deprecation_message(old: str, new: str) -> str:
    """The one line a deprecated spelling prints."""
    return f"{old} is deprecated and will be removed in the next release; use {new}"


def warn_deprecated(old: str, new: str) -> None:
    """Warn (``FutureWarning``, shown by default) that ``old`` is now spelled ``new``: one line on stderr."""
    warnings.warn_explicit(deprecation_message(old, new), FutureWarning, "fedmnist", 0)


class _Deprecating(argparse.Action):
    """Store (or store_true) an option, warning when it was given under a deprecated spelling."""

    def __init__(self, option_strings, dest, *, deprecated=(), canonical="", flag_only=False, **kwargs):
        if flag_only:
            kwargs["nargs"] = 0
        super().__init__(option_strings, dest, **kwargs)
        self.deprecated, self.canonical, self.flag_only = tuple(deprecated), canonical, flag_only

    def __call__(self, parser, namespace, values, option_string=None):
        if option_string in self.deprecated:
            warn_deprecated(option_string, self.canonical)
        setattr(namespace, self.dest, True if self.flag_only else values)


def add_setting(parser: argparse.ArgumentParser, name: str, *, default: Any = _DECLARED, shown: Any = _DECLARED,
                note: str = "", help: str | None = None, aliases: tuple[str, ...] | None = None,
                **kwargs) -> argparse.Action:
    """Add setting ``name``'s flag (and its deprecated aliases) to ``parser``.

    ``default`` is the parsed value when the flag is absent (declared default unless given: ``None``
    lets a preset or config fill it in); ``shown`` is the default the help states (declared unless
    given); ``note`` is appended to the help, ``help`` replaces it; ``aliases`` replaces the declared
    deprecated spellings (``()``: none, where an old spelling never existed and would confuse). A bool
    setting is a switch.
    """
    setting = SETTINGS[name]
    old = setting.aliases if aliases is None else tuple(aliases)
    value = setting.default if default is _DECLARED else default
    shown = value if shown is _DECLARED and default is not None else shown
    text = help if help is not None else help_text(name, shown, note)
    if old:
        text += f" [deprecated spelling: {', '.join(old)}]"
    options = {"dest": setting.field, "deprecated": old, "canonical": setting.flag}
    if setting.kind is bool:
        options["flag_only"] = True
    else:
        options.update(type=setting.kind, choices=setting.choices,
                       metavar=setting.metavar if setting.choices is None else None)
    options.update(kwargs)
    if old:  # the old spellings: same destination, kept out of the usage line
        parser.add_argument(*old, action=_Deprecating, default=argparse.SUPPRESS, help=argparse.SUPPRESS,
                            **options)
    return parser.add_argument(setting.flag, action=_Deprecating, default=value, help=text, **options)


def member_default(name: str) -> Any:
    """The default of setting ``name`` in a member's job (``fedmnist train``, the notebook): μ is 0 there."""
    return MEMBER_PROXIMAL_MU if name == "proximal-mu" else default(name)


def renamed(old: str, old_value: Any, new: str, new_value: Any) -> Any:
    """The value of a renamed notebook parameter: ``new_value``, or the deprecated ``old``'s if it was set.

    The notebook's parameters cell declares the old names as None; papermill injects what the user
    passed after it. An old name given warns; given beside a new one changed from its default, it is
    refused (which to believe?).
    """
    if old_value is None:
        return new_value
    warn_deprecated(old, new)
    setting = next(s for s in SETTINGS.values() if s.notebook == new)
    if new_value not in (member_default(setting.name), old_value):
        from fedmnist.errors import ConfigError

        raise ConfigError(f"both {old} = {old_value!r} and {new} = {new_value!r} are set; set only {new}")
    return old_value
