"""The Flower run's settings: ``[tool.flwr.app.config]`` of ``pyproject.toml`` with ``flwr run
--run-config`` applied, as one typed ``FlowerRunConfig`` validated once.

Every key and its default come from ``fedmnist.settings`` (the same words as the other modes' flags,
with hyphens). This module does not import Flower: the ServerApp and ClientApp
(``fedmnist.flower_app``) read their settings from it, and tests and tools can check a run config
without starting one.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from fedmnist.config import TrainingConfig
from fedmnist.errors import ConfigError
from fedmnist.methods import DRIFT_CORRECTED, SERVER_OPT_FIELDS, MethodConfig, build_method
from fedmnist.settings import SETTINGS


def _key(key: str):
    """The default of run-config ``key``: its declaration in ``fedmnist.settings`` (TOML's stand-in for None)."""
    return SETTINGS[key].flower_default


@dataclass(frozen=True)
class FlowerRunConfig:
    """The Flower run's settings: ``[tool.flwr.app.config]`` with ``--run-config`` applied, typed.

    Each field is the kebab-case key with ``_`` for ``-`` (``num_server_rounds`` is
    ``num-server-rounds``), declared with its default in ``fedmnist.settings``: the local training is
    every mode's (Adam, lr 10⁻³, 2 local epochs of batches of 32) and ``proximal-mu`` FedProx's μ. The server optimisers' keys (``server-lr``, ``server-momentum``,
    ``beta-1``, ``beta-2``, ``tau``) take the method's default when negative (TOML has no null).
    DP-FedAvg is on when ``dp-noise`` >= 0 (``dp-clip``, ``dp-adaptive``, ``dp-side``, ``dp-delta`` and
    ``target-epsilon``, negative: the defaults / none); ``dp-clients`` is the federation size K the
    accountant assumes (0: the nodes connected when round 1 starts), with ⌊C·K⌋ sampled per round.
    ``dp-sampling`` is the accountant's sampling: ``without_replacement`` (⌊C·K⌋ nodes a round) or
    ``poisson`` (each connected node with probability q = ⌊C·K⌋/K).
    ``resume``: continue from ``output-dir/checkpoint.pkl`` when there is one (same settings, see
    ``RESUMABLE_KEYS``); without it an existing checkpoint is replaced by a fresh run's.
    ``method='scaffold'`` needs ``optimizer='sgd'`` and ``momentum=0.0`` (its control variates assume
    plain local SGD) and no DP; ``server-lr`` is its η_g (negative: 1).
    ``secure-aggregation``: SecAgg+ on the training replies (``fedmnist.flower_secagg``), with the
    ``secagg-*`` parameters of ``fedmnist.secure_aggregation.SecAggConfig`` (0 shares or threshold: unset);
    methods that must see individual replies, server-side DP clipping and ``max-count-ratio`` are refused.
    ``output_dir`` and ``test_file`` are needed by the ServerApp only,
    ``data_dir`` by the ClientApp in Flower's simulation engine only.
    """

    num_server_rounds: int = _key("num-server-rounds")
    local_epochs: int = _key("local-epochs")
    batch_size: int = _key("batch-size")
    optimizer: str = _key("optimizer")
    learning_rate: float = _key("learning-rate")
    momentum: float = _key("momentum")
    method: str = _key("method")
    proximal_mu: float = _key("proximal-mu")
    fraction_train: float = _key("fraction-train")
    min_train_nodes: int = _key("min-train-nodes")
    min_available_nodes: int = _key("min-available-nodes")
    wait_nodes_timeout: float = _key("wait-nodes-timeout")
    round_timeout: float = _key("round-timeout")
    seed: int = _key("seed")
    output_dir: str = _key("output-dir")
    test_file: str = _key("test-file")
    data_dir: str = _key("data-dir")
    trim_beta: float = _key("trim-beta")
    krum_f: int = _key("krum-f")
    server_lr: float = _key("server-lr")
    server_momentum: float = _key("server-momentum")
    beta_1: float = _key("beta-1")
    beta_2: float = _key("beta-2")
    tau: float = _key("tau")
    dp_noise: float = _key("dp-noise")
    dp_clip: float = _key("dp-clip")
    dp_adaptive: bool = _key("dp-adaptive")
    dp_side: str = _key("dp-side")
    dp_delta: float = _key("dp-delta")
    target_epsilon: float = _key("target-epsilon")
    dp_clients: int = _key("dp-clients")
    dp_seeded_noise: bool = _key("dp-seeded-noise")
    dp_sampling: str = _key("dp-sampling")
    max_count_ratio: float = _key("max-count-ratio")
    resume: bool = _key("resume")
    secure_aggregation: bool = _key("secure-aggregation")
    secagg_num_shares: int = _key("secagg-num-shares")
    secagg_threshold: int = _key("secagg-threshold")
    secagg_clip_range: float = _key("secagg-clip-range")
    secagg_control_range: float = _key("secagg-control-range")
    secagg_bits: int = _key("secagg-bits")
    secagg_modulus: int = _key("secagg-modulus")
    secagg_weight_bound: int = _key("secagg-weight-bound")

    def __post_init__(self) -> None:
        for name in ("method", "optimizer"):
            value = getattr(self, name)
            if isinstance(value, str):
                object.__setattr__(self, name, value.strip().lower())

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, bool | int | float | str]) -> FlowerRunConfig:
        """Cast and check Flower's ``context.run_config``; missing keys keep their defaults.

        Raises
        ------
        ConfigError
            An unknown key, a value of the wrong type (``1.5`` for an integer, a number for a
            string) or a value ``validate`` rejects.
        """
        by_key = {f.name.replace("_", "-"): f for f in fields(cls)}
        unknown = sorted(set(run_config) - set(by_key))
        if unknown:
            raise ConfigError(
                f"unknown Flower run-config key(s): {', '.join(unknown)}; known: {', '.join(by_key)}"
            )
        values = {}
        for key, value in run_config.items():
            kind = type(getattr(cls, by_key[key].name))
            values[by_key[key].name] = cast(key, value, kind)
        config = cls(**values)
        config.validate()
        return config

    @property
    def training(self) -> TrainingConfig:
        """The clients' local training (the settings every mode shares)."""
        return TrainingConfig(self.local_epochs, self.batch_size, self.optimizer, self.learning_rate, self.momentum)

    @property
    def method_config(self) -> MethodConfig:
        """The method and its parameters (the settings every mode shares)."""
        optimizer = {name: value if value >= 0 else None
                     for name in SERVER_OPT_FIELDS if (value := getattr(self, name)) is not None}
        return MethodConfig((self.method,), self.proximal_mu, self.trim_beta, self.krum_f, **optimizer)

    def validate(self) -> None:
        """Raise ConfigError, naming the run-config key, for values the run cannot use.

        The training and method settings are checked by ``TrainingConfig`` and ``MethodConfig``,
        as in every mode; this checks the Flower run's own keys.
        """

        def need(ok: bool, message: str) -> None:
            if not ok:
                raise ConfigError(message)

        self.training.validate()
        self.method_config.validate()
        if self.method in DRIFT_CORRECTED:
            from fedmnist.training import check_scaffold_optimizer

            try:
                check_scaffold_optimizer(self.optimizer, self.momentum)
            except ConfigError as exc:
                raise ConfigError(f"{exc}; set optimizer='sgd' momentum=0.0 in --run-config") from None
        if self.privacy is not None:
            from fedmnist.privacy import check_dp_method

            check_dp_method(self.method)
        need(self.dp_clients >= 0, f"dp-clients must be >= 0 (got {self.dp_clients})")
        from fedmnist.privacy import SAMPLINGS

        need(self.dp_sampling in SAMPLINGS,
             f"dp-sampling must be one of {', '.join(SAMPLINGS)} (got {self.dp_sampling!r})")
        if self.secure is not None:
            from fedmnist.secure_aggregation import check_method_compatible

            check_method_compatible(self.method, self.privacy, self.max_count_ratio or None)
        need(self.max_count_ratio == 0 or (math.isfinite(self.max_count_ratio) and self.max_count_ratio >= 1),
             f"max-count-ratio must be 0 (no cap) or >= 1 (got {self.max_count_ratio})")
        need(self.num_server_rounds >= 1, f"num-server-rounds must be >= 1 (got {self.num_server_rounds})")
        need(0 < self.fraction_train <= 1, f"fraction-train must be in (0, 1] (got {self.fraction_train})")
        need(self.min_train_nodes >= 1, f"min-train-nodes must be >= 1 (got {self.min_train_nodes})")
        robust = self.method_config.min_clients(self.krum_f)
        need(robust is None or self.min_train_nodes >= robust[1],
             f"{robust and robust[0]} with krum-f={self.krum_f} needs at least {robust and robust[1]} replies per "
             f"round, but min-train-nodes is {self.min_train_nodes}: raise min-train-nodes or lower krum-f")
        need(
            self.min_available_nodes >= 0,
            f"min-available-nodes must be >= 0 (got {self.min_available_nodes})",
        )
        need(self.wait_nodes_timeout > 0, f"wait-nodes-timeout must be > 0 (got {self.wait_nodes_timeout})")
        need(self.round_timeout > 0, f"round-timeout must be > 0 (got {self.round_timeout})")
        need(self.seed >= 0, f"seed must be >= 0 (got {self.seed})")
        for key, value in (("output-dir", self.output_dir), ("test-file", self.test_file),
                           ("data-dir", self.data_dir)):
            need(
                not value or Path(value).is_absolute(),
                f"{key} must be an absolute path (got {value!r}): Flower's processes run in other "
                "working directories",
            )

    def check_server(self) -> None:
        """Raise ConfigError unless ``output-dir`` and ``test-file`` are set, as the ServerApp needs."""
        if not self.output_dir:
            raise ConfigError("set output-dir, e.g. flwr run . <connection> --run-config \"output-dir='/abs/out'\"")
        if not self.test_file:
            raise ConfigError("set test-file to the federation's common test set, e.g. test-file='/abs/datos/test.npz'")

    @property
    def nodes_before_start(self) -> int:
        """Nodes that must be connected before round 1 (``min-available-nodes``, 0: ``min-train-nodes``)."""
        return max(self.min_available_nodes, self.min_train_nodes)

    @property
    def privacy(self):
        """The ``DPConfig`` of DP-FedAvg when ``dp-noise`` >= 0, else None (validated on creation)."""
        if self.dp_noise < 0:
            return None
        from fedmnist.privacy import DPConfig

        return DPConfig(self.dp_noise, self.dp_clip, self.dp_adaptive, side=self.dp_side,
                        delta=self.dp_delta if self.dp_delta >= 0 else None,
                        target_epsilon=self.target_epsilon if self.target_epsilon >= 0 else None,
                        sampling=self.dp_sampling)

    @property
    def secure(self):
        """The ``SecAggConfig`` when ``secure-aggregation`` is on, else None (validated on creation)."""
        from fedmnist.secure_aggregation import SecAggConfig

        config = SecAggConfig.from_settings(self.to_dict())
        return config if config.enabled else None

    @property
    def client_mu(self) -> float:
        """The proximal coefficient the clients train with: ``proximal-mu`` for FedProx, else 0."""
        return build_method(self.method, self.method_config).client_mu

    def to_dict(self) -> dict:
        """The settings under their run-config keys."""
        return {k.replace("_", "-"): v for k, v in asdict(self).items()}


def cast(key: str, value, kind: type):
    """``value`` as ``kind`` (int, float or str); ConfigError if it is not one (bools are not numbers)."""
    if kind is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string (got {value!r}); quote it: {key}='...'")
        return value
    if kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false (got {value!r})")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{key} must be a number (got {value!r})")
    if kind is int:
        if isinstance(value, float) and not value.is_integer():
            raise ConfigError(f"{key} must be an integer (got {value!r})")
        return int(value)
    return float(value)


RESUMABLE_KEYS = frozenset({"num-server-rounds", "target-epsilon", "resume", "wait-nodes-timeout", "round-timeout",
                            "min-available-nodes", "min-train-nodes", "output-dir", "test-file"})
"""Run-config keys a resumed run may change: they decide how long to wait, when to stop or where the
files are (the test set itself is checked by its hash), not what the completed rounds computed."""
