"""The experiment profiles: how much of each experiment ``fedmnist experiments --profile`` runs.

``quick`` is a CI-sized check of minutes; ``full`` gives the essay's results. A profile is checked
once, when it is built, and copied into ``entorno.json`` beside the results.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fedmnist.config import DEFAULT_SEED, check_int
from fedmnist.errors import ConfigError

MCMAHAN_GRID: dict[str, dict[str, tuple[float, ...]]] = {
    # FedAvg's local rate first; the others keep it and tune their own parameter
    "fedavg": {"learning_rate": (0.025, 0.05, 0.1, 0.2, 0.4)},
    "fedprox": {"mu": (0.001, 0.01, 0.1)},
    "fedavgm": {"server_momentum": (0.3, 0.5, 0.7)},
    "fedadam": {"server_lr": (0.003, 0.01, 0.03, 0.1)},
    "fedyogi": {"server_lr": (0.003, 0.01, 0.03, 0.1)},
    "fedadagrad": {"server_lr": (0.01, 0.03, 0.1, 0.3)},
}
"""Candidate settings of the McMahan runs, per method (product of the values); methods absent here
(FedMed, SCAFFOLD with the paper's η_g = 1) take FedAvg's chosen local rate untuned."""


@dataclass(frozen=True)
class Profile:
    """How much of each experiment to run; ``quick`` is CI-sized, ``full`` is the essay's.

    Every table repeats its runs over ``seeds`` (the drift grid over ``drift_seeds``) and reports the
    mean with a 95 % Student-t interval across them (``fedmnist.stats``). FedProx's μ is never chosen on
    the test set: for each setting, every candidate of the grid runs on the training set minus
    ``validation_size`` held-out images (``fedmnist.tuning.validation_split`` with the first seed), and
    the best validation accuracy wins.
    """

    name: str
    seeds: tuple[int, ...]
    validation_size: int = 5_000
    """Training images held out to choose FedProx's μ of the course, drift, heterogeneity and attack runs."""
    course_epochs: int = 2
    course_train_subset: int | None = None
    course_test_subset: int | None = None
    course_optimizer: str = "adam"
    course_learning_rate: float = 1e-3
    course_momentum: float = 0.0
    """The member job's local training (``fedmnist.training.TrainConfig``'s defaults, what a Keras user
    writes for this CNN); the drift grid covers the aggressive SGD settings."""
    course_mu_grid: tuple[float, ...] = (0.001, 0.01, 0.1)
    clients: int = 10
    train_subset: int = 10_000
    rounds: int = 10
    local_epochs: int = 1
    batch_size: int = 32
    round_test_subset: int | None = None
    """Test images of the per-round evaluations (None: the 10,000, so curves and tables agree)."""
    eval_every: int = 1
    partitions: tuple[str, ...] = ("iid", "dirichlet_1", "dirichlet_0.3", "dirichlet_0.1", "shards_2")
    """Splits of the heterogeneity runs (``fedmnist.labels.partition_settings``)."""
    mu_grid: tuple[float, ...] = (0.01, 0.1, 1.0)
    """FedProx's μ candidates of the multi-round settings (heterogeneity, attacks)."""
    prox_mus: tuple[float, ...] = (0.0, 0.01, 0.1, 1.0)
    prox_partition: str = "shards_2"
    attack_cases: tuple[tuple[str, str, int], ...] = (
        ("iid", "none", 0), ("iid", "gaussian", 1), ("iid", "gaussian", 2), ("iid", "signflip", 1),
        ("iid", "signflip", 2), ("dirichlet_0.3", "none", 0), ("dirichlet_0.3", "gaussian", 2),
        ("dirichlet_0.3", "signflip", 2))
    """(partition, attack or ``none``, malicious clients) of every attack run."""
    attack_methods: tuple[str, ...] = (
        "fedavg", "fedprox", "fedmed", "trimmed", "krum", "multikrum", "bulyan")
    attack_clients: int = 12
    """Clients of the attack runs, all in every round: Bulyan needs at least 4f + 3 of them."""
    attack_krum_f: int = 2
    """f (attackers tolerated) of Krum, Multi-Krum and Bulyan in every attack run, attackers or not."""
    attack_rounds: int = 20
    attack_train_subset: int = 4_800
    attack_eval_every: int = 5
    drift_seeds: tuple[int, ...] = (42, 43, 44)
    drift_clients: int = 5
    drift_train_subset: int = 10_000
    drift_optimizers: tuple[tuple[str, float, float], ...] = (
        ("adam", 1e-3, 0.0), ("sgd", 0.05, 0.9), ("sgd", 0.01, 0.0))
    """(optimizer, learning rate, momentum) of the drift grid's local training."""
    drift_epochs: tuple[int, ...] = (1, 2, 5)
    drift_partitions: tuple[str, ...] = ("iid", "shards_2")
    drift_mu_grid: tuple[float, ...] = (0.01, 0.1, 1.0)
    drift_barrier_images: int = 1_000
    """First test images on which the loss along the segment between two clients is measured."""
    drift_barrier_pairs: int = 2
    """Disjoint pairs of clients (1-2, 3-4, …) whose segment is measured."""
    mcmahan: tuple[tuple[str, int, int, tuple[str, ...]], ...] = ()
    """(split, tuning rounds, rounds, methods) of McMahan's protocol: FedAvg and the methods tuned on the
    validation split for the tuning rounds (``mcmahan_tuning_seed``), then every method run for all the
    rounds with each of ``mcmahan_seeds`` (see ``run_mcmahan``)."""
    mcmahan_tuning_seed: int = DEFAULT_SEED
    """Seed of the McMahan tuning runs (initial weights, federation, sampling); never an evaluation seed."""
    mcmahan_seeds: tuple[int, ...] = (DEFAULT_SEED + 1, DEFAULT_SEED + 2, DEFAULT_SEED + 3)
    """Evaluation seeds of the McMahan runs."""
    mcmahan_grid: dict[str, dict[str, tuple[float, ...]]] = field(
        default_factory=lambda: {m: dict(g) for m, g in MCMAHAN_GRID.items()})
    mcmahan_validation: int = 6_000
    """Training images held out as the tuning runs' validation set."""
    dp_clients: tuple[int, ...] = (100, 1000)
    """Federation sizes K of the privacy experiment (IID, equal parts): the factor varied with the clip, the
    local steps and the rounds fixed (K = 6,000 clients of 10 images runs too; see the full profile's costs)."""
    dp_epsilons: tuple[float, ...] = (8.0, 2.0)
    """Target ε of the DP runs, each met at the fixed rounds by the noise multiplier the accountant gives
    (``privacy.noise_for_epsilon``); the DP settings are tuned at each of them on its own."""
    dp_delta: float | None = None
    """δ of every DP run (None: ``privacy.default_delta(K)`` = min(10⁻⁵, 1/(10·K)), below 1/K)."""
    dp_fraction: float = 0.1
    """C: each client joins a round with probability q = ⌊C·K⌋/K (Poisson sampling, add-or-remove-one ε);
    the non-private baselines sample ⌊C·K⌋ clients without replacement."""
    dp_local_steps: int = 30
    """Minibatch steps every client takes per round, whatever its number of images (``local_steps``)."""
    dp_batch_size: int = 10
    dp_rounds: int = 300
    """Rounds of every DP run (all K, all ε): the T the noise multipliers are calibrated for."""
    dp_baseline_rounds: int = 300
    """Rounds of the non-private baselines: fixed and generous, so that they stop improving (the table
    reports the change over their last 10 rounds)."""
    dp_eval_every: int = 5
    dp_train_subset: int | None = None
    dp_tuning_clients: int = 1000
    """K of the tuning runs (on the validation split, ``dp_tuning_seed``); their choice holds for every K."""
    dp_tuning_rounds: int = 60
    """Rounds of every tuning run (a DP tuning run uses the final runs' noise and stops early)."""
    dp_validation: int = 6_000
    """Training images held out as the tuning runs' validation set."""
    dp_tuning_seed: int = DEFAULT_SEED
    dp_seeds: tuple[int, ...] = (DEFAULT_SEED + 1, DEFAULT_SEED + 2, DEFAULT_SEED + 3)
    """Evaluation seeds of the baselines and DP runs (never the tuning seed)."""
    dp_baseline_grid: dict[str, tuple[float, ...]] = field(
        default_factory=lambda: {"learning_rate": (0.05, 0.1, 0.2), "server_momentum": (0.0, 0.9)})
    """Candidates of the non-private baseline (FedAvgM; server momentum 0 is FedAvg), product of the values."""
    dp_grid: dict[str, tuple[float, ...]] = field(
        default_factory=lambda: {"clip_factor": (0.05, 0.1, 0.25, 0.5, 1.0, 2.0), "server_momentum": (0.0, 0.5, 0.9)})
    """Candidates of the DP runs at every target ε, with the baseline's client rate: the clip norm S as a
    factor of the median round-1 update norm, and the server momentum (0: DP-FedAvg; else DP-FedAvgM). The
    clip factors span a factor 40 and the momentum reaches 0 so that no ε's choice sits at an edge it could
    not see past (ε = 2 favours small clips; ε = 8 large ones, the larger the less momentum)."""
    dp_team_noises: tuple[float, ...] = (1.0, 4.0, 16.0)
    dp_team_rounds: int = 20
    ceiling_seeds: tuple[int, ...] = (42, 43, 44, 45, 46)
    """Seeds of the central reference (``run_ceiling``): initial weights, validation draw and training order."""
    ceiling_validation: int = 6_000
    """Training images held out (a draw per seed) to stop the central training and pick its best epoch."""
    ceiling_patience: int = 3
    """Epochs without a lower validation loss after which the central training stops."""
    ceiling_max_epochs: int = 30
    """Most epochs of the central training, stopped or not."""
    ceiling_train_subset: int | None = None
    """First training images the central reference uses before the hold-out (None: all 60,000)."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError for settings the experiments cannot run (naming the field)."""
        from fedmnist.attacks import ATTACKS
        from fedmnist.labels import partition_settings
        from fedmnist.methods import available_methods

        for name in ("seeds", "drift_seeds", "mcmahan_seeds", "ceiling_seeds"):
            seeds = getattr(self, name)
            if not seeds or len(set(seeds)) != len(seeds):
                raise ConfigError(f"profile {self.name}: {name} must be distinct integers >= 0 "
                                  f"(got {seeds!r})")
            for seed in seeds:
                check_int(seed, f"profile {self.name}: every one of {name}", 0)
        for name in ("validation_size", "clients", "rounds", "eval_every", "attack_clients", "attack_rounds",
                     "attack_eval_every", "drift_clients", "drift_barrier_images",
                     "course_epochs", "ceiling_validation", "ceiling_patience", "ceiling_max_epochs"):
            check_int(getattr(self, name), f"profile {self.name}: {name}", 1)
        for name in ("course_mu_grid", "mu_grid", "drift_mu_grid"):
            grid = getattr(self, name)
            if not grid or not all(isinstance(m, (int, float)) and m > 0 for m in grid):
                raise ConfigError(f"profile {self.name}: {name} needs FedProx coefficients μ > 0 "
                                  f"(got {grid!r})")
        if self.ceiling_train_subset is not None:
            check_int(self.ceiling_train_subset, f"profile {self.name}: ceiling_train_subset",
                      self.ceiling_validation + 1)
        if not self.drift_epochs or not self.drift_optimizers or not self.drift_partitions:
            raise ConfigError(f"profile {self.name}: the drift grid needs epochs, optimizers and partitions")
        if not 0 <= self.drift_barrier_pairs <= self.drift_clients // 2:
            raise ConfigError(f"profile {self.name}: drift_barrier_pairs must be between 0 and "
                              f"{self.drift_clients // 2} for {self.drift_clients} clients")
        for label in (*self.partitions, self.prox_partition, *self.drift_partitions,
                      *(case[0] for case in self.attack_cases)):
            partition_settings(label)
        for partition, attack, count in self.attack_cases:
            if (attack == "none") != (count == 0) or (attack != "none" and attack not in ATTACKS):
                raise ConfigError(f"profile {self.name}: attack case ({partition}, {attack}, {count}) must "
                                  f"be ('none', 0) or an attack of {', '.join(ATTACKS)} with at least one "
                                  "attacker")
        check_int(self.mcmahan_tuning_seed, f"profile {self.name}: mcmahan_tuning_seed", 0)
        if self.mcmahan_tuning_seed in self.mcmahan_seeds:
            raise ConfigError(f"profile {self.name}: the McMahan tuning seed {self.mcmahan_tuning_seed} must not "
                              "be one of mcmahan_seeds (settings chosen on a seed are not evaluated on it)")
        for case in self.mcmahan:
            if len(case) != 4 or case[0] not in ("iid", "shards") or not case[3]:
                raise ConfigError(f"profile {self.name}: every mcmahan case must be (iid or shards, tuning rounds, "
                                  f"rounds, methods) (got {case!r})")
            check_int(case[1], f"profile {self.name}: McMahan {case[0]} tuning rounds", 1)
            check_int(case[2], f"profile {self.name}: McMahan {case[0]} rounds", 1)
            unknown = [m for m in case[3] if m not in available_methods()]
            if unknown:
                raise ConfigError(f"profile {self.name}: unknown McMahan method(s) {', '.join(map(str, unknown))}; "
                                  f"available: {', '.join(available_methods())}")
        self._validate_privacy()
        if "bulyan" in self.attack_methods and self.attack_clients < 4 * self.attack_krum_f + 3:
            raise ConfigError(f"profile {self.name}: Bulyan with f = {self.attack_krum_f} needs at least "
                              f"{4 * self.attack_krum_f + 3} attack_clients (got {self.attack_clients})")


    def _validate_privacy(self) -> None:
        """ConfigError for privacy settings the experiment cannot run (naming the field)."""
        name = f"profile {self.name}"
        for field_name in ("dp_local_steps", "dp_batch_size", "dp_rounds", "dp_baseline_rounds", "dp_eval_every",
                           "dp_tuning_rounds", "dp_validation", "dp_tuning_clients", "dp_team_rounds"):
            check_int(getattr(self, field_name), f"{name}: {field_name}", 1)
        check_int(self.dp_tuning_seed, f"{name}: dp_tuning_seed", 0)
        if not self.dp_clients or len(set(self.dp_clients)) != len(self.dp_clients):
            raise ConfigError(f"{name}: dp_clients must be distinct federation sizes (got {self.dp_clients!r})")
        for k in (*self.dp_clients, self.dp_tuning_clients):
            check_int(k, f"{name}: every federation size of dp_clients", 2)
        if not self.dp_seeds or len(set(self.dp_seeds)) != len(self.dp_seeds) or self.dp_tuning_seed in self.dp_seeds:
            raise ConfigError(f"{name}: dp_seeds must be distinct and exclude the tuning seed {self.dp_tuning_seed} "
                              f"(got {self.dp_seeds!r})")
        if not self.dp_epsilons or not all(isinstance(e, (int, float)) and not isinstance(e, bool) and e > 0
                                           for e in self.dp_epsilons) \
                or len(set(self.dp_epsilons)) != len(self.dp_epsilons):
            raise ConfigError(f"{name}: dp_epsilons must be distinct target ε > 0 (got {self.dp_epsilons!r})")
        if not 0 < self.dp_fraction <= 1:
            raise ConfigError(f"{name}: dp_fraction must be in (0, 1] (got {self.dp_fraction})")
        if self.dp_delta is not None and not 0 < self.dp_delta < 1 / max(self.dp_clients):
            raise ConfigError(f"{name}: dp_delta must be in (0, 1/K) for every K of dp_clients (got {self.dp_delta})")
        if set(self.dp_baseline_grid) - {"learning_rate", "server_momentum"} \
                or set(self.dp_grid) - {"clip_factor", "server_momentum", "learning_rate"}:
            raise ConfigError(f"{name}: dp_baseline_grid takes learning_rate and server_momentum; dp_grid "
                              "clip_factor, server_momentum and learning_rate")
        for grid in (self.dp_baseline_grid, self.dp_grid):
            for key, values in grid.items():
                if not values or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
                    raise ConfigError(f"{name}: the candidates of {key} must be numbers (got {values!r})")
                if any(v < 0 or (key != "server_momentum" and v == 0) or (key == "server_momentum" and v >= 1)
                       for v in values):
                    raise ConfigError(f"{name}: a candidate of {key} is out of range (got {values!r})")


PROFILES: dict[str, Profile] = {
    "quick": Profile(
        name="quick", seeds=(DEFAULT_SEED, DEFAULT_SEED + 1), validation_size=1_000, course_epochs=1,
        course_train_subset=3_000, course_test_subset=1_000, course_mu_grid=(0.01, 0.1), clients=5,
        train_subset=1_500, rounds=2, partitions=("iid", "shards_2"), mu_grid=(0.01, 0.1),
        prox_mus=(0.0, 0.1), attack_cases=(("iid", "none", 0), ("iid", "gaussian", 1)),
        attack_methods=("fedavg", "fedmed", "bulyan"),
        attack_clients=7, attack_krum_f=1, attack_rounds=2, attack_train_subset=1_400, attack_eval_every=1,
        drift_seeds=(DEFAULT_SEED, DEFAULT_SEED + 1), drift_train_subset=1_500,
        drift_optimizers=(("adam", 1e-3, 0.0),),
        drift_epochs=(1, 2), drift_partitions=("iid",), drift_mu_grid=(0.01, 0.1), drift_barrier_images=300,
        mcmahan=(("iid", 1, 1, ("fedavg",)),), mcmahan_seeds=(DEFAULT_SEED + 1,), mcmahan_grid={},
        dp_clients=(20, 40), dp_epsilons=(8.0,), dp_local_steps=2, dp_batch_size=10, dp_rounds=2,
        dp_baseline_rounds=2, dp_eval_every=1, dp_train_subset=2_000, dp_tuning_clients=20, dp_tuning_rounds=1,
        dp_validation=400, dp_seeds=(DEFAULT_SEED + 1,), dp_baseline_grid={"learning_rate": (0.1,),
                                                                            "server_momentum": (0.0, 0.9)},
        dp_grid={"clip_factor": (0.5,), "server_momentum": (0.9,)}, dp_team_noises=(1.0,), dp_team_rounds=2,
        ceiling_seeds=(DEFAULT_SEED,), ceiling_validation=300, ceiling_patience=1, ceiling_max_epochs=2,
        ceiling_train_subset=1_500,
    ),
    "full": Profile(
        # sizes chosen so that every experiment but McMahan's and privacy fits about four hours on
        # two cores with --workers 2 (measured: course ~14 min, ceiling ~13, drift ~24, heterogeneity ~37, fedprox_mu ~12,
        # attacks ~165 at 60 rounds, the rounds every rule needs to settle); the measured costs go to entorno.json,
        # and per run to the CSVs (run_seconds)
        name="full", seeds=(42, 43, 44, 45, 46), train_subset=3_600, rounds=15, eval_every=2,
        partitions=("iid", "dirichlet_0.3", "dirichlet_0.1", "shards_2"),
        attack_cases=(("iid", "none", 0), ("iid", "gaussian", 2), ("iid", "signflip", 2),
                      ("dirichlet_0.3", "none", 0), ("dirichlet_0.3", "signflip", 2)),
        attack_methods=("fedavg", "fedprox", "fedmed", "trimmed", "multikrum", "bulyan"),
        attack_train_subset=2_400, attack_rounds=60, attack_eval_every=5, drift_train_subset=8_000,
        # McMahan: tuned on seed 42 (validation split), evaluated on 43-45 without stopping at 99 %; 4-8 s a
        # round with --workers 2 on an otherwise idle 2-core machine: IID ~1 h, shards ~2.5 h (resumable)
        mcmahan=(("iid", 5, 50, ("fedavg", "fedavgm", "fedadagrad")),
                 ("shards", 10, 150, ("fedavg", "scaffold", "fedyogi"))),
        # privacy (the defaults of the dp_* fields): IID, C = 0.1 (Poisson under DP), 30 local steps of B = 10, SGD,
        # FedAvgM, 300 rounds for the baselines and for every (K, ε), seeds 43-45, tuned at K = 1,000 on a
        # 6,000-image validation split with seed 42 (42 tuning runs of 60 rounds: 6 baseline, 18 per ε).
        # Measured per round with --workers 2 on this 2-core machine: K = 100 (m = 10) 0.62 s, K = 1,000
        # (m = 100) 4.6-4.9 s (5.3-5.6 s under DP, unpaused ε = 8 runs), so tuning ~3.5 h, baselines ~80 min,
        # DP runs 3 h 36 min of run_seconds: ~8 h of compute (9 h 50 min of run_seconds with pauses).
        # K = 6,000 of 10 images (m ≈ 600 Poisson, DP) took ~100 s a round in one process (2.1 GB peak);
        # at an estimated ~45 s with --workers 2, adding it to dp_clients costs ~33 h more.
    ),
}
