"""Aggregation methods as named objects: how their clients train, how replies combine, what state they keep.

A ``Method`` wraps one pure rule of ``fedmnist.strategies`` (unchanged, still equal to Flower's) with
what the rest of a round needs to know about it:

* ``client_mu``: the proximal coefficient its clients train with (μ for FedProx, else 0);
* ``aggregate(global_weights, results, state)``: the server's combination of the replies, returning
  the new global weights and the method's new server state;
* ``initial_state()``: the state kept between rounds (empty for the stateless rules; the server
  optimisers FedAvgM, FedAdam, FedYogi and FedAdagrad keep their moments here, see
  ``fedmnist.server_opt``; SCAFFOLD its control variate). ``ServerState`` checkpoints it;
  ``check_state`` validates a loaded one;
* ``client_control(state, weights)``: what its clients need beside the weights (SCAFFOLD's ``c``);
* ``aggregate_sum(global_weights, agg, state)``: the same server step from a secure round's
  ``SecureAggregate`` (only the sum of the updates), for the methods that compose with secure
  aggregation (``secure_composition`` says what the masked vectors carry, or refuses the others).
* ``instructions(state, weights, round)``: the three above as the ``fedmnist.client.Instructions``
  every mode sends its clients (the one place they are assembled).

``MethodConfig`` holds the methods' settings, validated once; ``build_methods`` turns it into
``Method`` objects in the order given. ``DPMethod`` wraps FedAvg, FedProx or FedAvgM in DP-FedAvg
(``fedmnist.privacy``): clipping, calibrated noise and the accountant's ε after every round.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

import numpy as np

from fedmnist.client import Instructions
from fedmnist.config import DEFAULT_METHODS
from fedmnist.errors import ConfigError
from fedmnist.server_opt import SERVER_OPTIMIZERS, ServerOptConfig, ServerOptError, server_step
from fedmnist.server_opt import check_state as check_optimizer_state
from fedmnist.settings import default
from fedmnist.strategies import AGGREGATORS, DEFAULT_TRIM_BETA, Aggregator, Results

if TYPE_CHECKING:
    from fedmnist.secure_aggregation import Composition, SecureAggregate

DEFAULT_MU: float = default("proximal-mu")
"""FedProx's default proximal coefficient."""

SERVER_OPT_FIELDS = ("server_lr", "server_momentum", "beta_1", "beta_2", "tau")


SCAFFOLD = "scaffold"
DRIFT_CORRECTED = (SCAFFOLD,)
"""Methods whose clients correct their local gradient with control variates (``fedmnist.scaffold``)."""


def available_methods() -> list[str]:
    """Every method name: the aggregation rules, the server optimisers, then SCAFFOLD."""
    return [*AGGREGATORS, *SERVER_OPTIMIZERS, *DRIFT_CORRECTED]


@dataclass(frozen=True)
class MethodConfig:
    """Which methods run and their parameters.

    ``krum_f`` is Krum's and Multi-Krum's f, the number of Byzantine clients the rule tolerates (not
    the number of attackers a simulation injects: that is ``ThreatConfig.num_malicious``). None
    lets the mode choose (the simulation: min(attackers, the most Krum allows)).
    """

    methods: tuple[str, ...] = DEFAULT_METHODS
    mu: float = DEFAULT_MU
    trim_beta: float = DEFAULT_TRIM_BETA
    krum_f: int | None = None
    num_to_keep: int | None = None
    server_lr: float | None = None
    server_momentum: float | None = None
    beta_1: float | None = None
    beta_2: float | None = None
    tau: float | None = None

    def __post_init__(self) -> None:
        methods = (self.methods,) if isinstance(self.methods, str) else tuple(self.methods)
        object.__setattr__(self, "methods", tuple(str(m).strip().lower() for m in methods))

    def validate(self) -> None:
        """Raise ConfigError for unknown or repeated methods and out-of-range parameters."""
        if not self.methods:
            raise ConfigError("give at least one aggregation method")
        for method in self.methods:
            if method not in AGGREGATORS and method not in SERVER_OPTIMIZERS and method not in DRIFT_CORRECTED:
                raise ConfigError(f"unknown method '{method}'; available: {', '.join(available_methods())}")
        if len(set(self.methods)) != len(self.methods):
            raise ConfigError(f"a method is listed twice: {' '.join(self.methods)}")
        if not (isinstance(self.mu, (int, float)) and self.mu >= 0 and math.isfinite(self.mu)):
            raise ConfigError(f"the FedProx coefficient mu must be a finite number >= 0 (got {self.mu})")
        if "fedprox" in self.methods and self.mu <= 0:
            raise ConfigError("fedprox needs mu > 0 (with mu = 0 it is FedAvg); set --proximal-mu or drop fedprox")
        if not 0 <= self.trim_beta < 0.5:
            raise ConfigError(f"the trimmed-mean fraction beta must be in [0, 0.5) (got {self.trim_beta})")
        if self.krum_f is not None and (isinstance(self.krum_f, bool) or not isinstance(self.krum_f, int)
                                        or self.krum_f < 0):
            raise ConfigError(f"Krum's f must be an integer >= 0 (got {self.krum_f!r})")
        if self.num_to_keep is not None and (not isinstance(self.num_to_keep, int) or self.num_to_keep < 1):
            raise ConfigError(f"Multi-Krum's num_to_keep must be an integer >= 1 (got {self.num_to_keep!r})")
        optimizers = [m for m in self.methods if m in SERVER_OPTIMIZERS]
        for name in SERVER_OPT_FIELDS:
            users = [m for m in SERVER_OPTIMIZERS if name in SERVER_OPTIMIZERS[m].params]
            users += [SCAFFOLD] if name == "server_lr" else []
            if getattr(self, name) is not None and not any(m in users for m in self.methods):
                raise ConfigError(f"{name.replace('_', '-')} is set but no method uses it "
                                  f"(it is a parameter of {', '.join(users)})")
        if SCAFFOLD in self.methods and self.server_lr is not None and (
                isinstance(self.server_lr, bool) or not isinstance(self.server_lr, (int, float))
                or not math.isfinite(self.server_lr) or self.server_lr <= 0):
            raise ConfigError(f"SCAFFOLD's server learning rate must be > 0 (got {self.server_lr!r})")
        for method in optimizers:
            self.optimizer(method)

    def optimizer(self, method: str) -> ServerOptConfig:
        """The server optimiser of ``method`` with the fields it reads (the others stay at its defaults)."""
        try:
            return ServerOptConfig(method, **{f: getattr(self, f) for f in SERVER_OPTIMIZERS[method].params})
        except ServerOptError as exc:
            raise ConfigError(str(exc)) from None

    def min_clients(self, krum_f: int) -> tuple[str, int] | None:
        """The most demanding Krum-family method and the fewest replies per round it needs with ``krum_f``
        (Bulyan 4f + 3, Krum and Multi-Krum 2f + 3), or None when no method has a minimum."""
        if "bulyan" in self.methods:
            return "bulyan", 4 * krum_f + 3
        krum_like = [m for m in self.methods if m in AGGREGATORS and "num_malicious" in AGGREGATORS[m].params]
        return (", ".join(krum_like), 2 * krum_f + 3) if krum_like else None

    def check_clients(self, clients_per_round: int, krum_f: int) -> None:
        """Raise ConfigError if a Krum-family method cannot run with this many clients per round."""
        need = self.min_clients(krum_f)
        if need is not None and clients_per_round < need[1]:
            raise ConfigError(
                f"{need[0]} with f={krum_f} needs at least {need[1]} clients per round, but there are "
                f"{clients_per_round}: raise --fraction-train or --clients, or lower --krum-f"
            )


@dataclass(frozen=True)
class RoundContext:
    """What a round's aggregation may need beyond the replies: its number, how many clients were
    sampled (DP-FedAvg divides by it), the replies' labels for messages, and the clients' unclipped bits
    (client-side adaptive clipping)."""

    round: int
    num_sampled: int
    labels: tuple[str, ...] = ()
    unclipped: tuple[bool, ...] | None = None
    control_deltas: tuple[list[np.ndarray] | None, ...] | None = None
    """SCAFFOLD's ``Δc_i`` of every reply, in the replies' order."""


@dataclass(frozen=True)
class Method:
    """One named aggregation method."""

    name: str
    rule: Aggregator
    client_mu: float = 0.0
    params: dict = field(default_factory=dict)
    releases_every_round: ClassVar[bool] = False
    """Whether every round the method runs is a release that must be charged (DP-FedAvg): such a round is
    never aborted for too few replies, since the abort itself would say, uncharged, how many were valid."""

    def initial_state(self) -> dict:
        """The server state before round 1 (the stateless rules keep none)."""
        return {}

    def check_state(self, state: object, weights: Sequence[np.ndarray]) -> None:
        """Raise ServerOptError unless ``state`` (e.g. from a checkpoint) is a valid state of this method."""
        del weights
        if state != {}:
            raise ServerOptError(f"{self.name} keeps no server state, but one was given")

    def aggregate(
        self, global_weights: Sequence[np.ndarray], results: Results, state: dict,
        context: RoundContext | None = None,
    ) -> tuple[list[np.ndarray], dict]:
        """The new global weights from the round's ``(weights, num_examples)`` replies, and the new state."""
        del global_weights, context  # the plain rules combine the clients' weights alone
        return self.rule.fn(results, **self.params), dict(state)

    def secure_composition(self, max_count_ratio: float | None = None) -> Composition:
        """What a secure round's masked vectors must carry for this method
        (``secure_aggregation.check_method_compatible``); ConfigError, with why, for a method that must see
        individual replies or with the count-ratio cap ``max_count_ratio``."""
        from fedmnist.secure_aggregation import check_method_compatible

        return check_method_compatible(self.name, None, max_count_ratio)

    def aggregate_sum(
        self, global_weights: Sequence[np.ndarray], agg: SecureAggregate, state: dict,
        context: RoundContext | None = None,
    ) -> tuple[list[np.ndarray], dict]:
        """The new global weights and state from a secure round, where the server holds only the sum.

        ``aggregate`` over one pseudo-reply: the members' weighted average w + ``agg.mean_update``, with
        their total count. FedAvg, FedProx and the server optimisers need nothing else, so the step equals
        the plain round's within ``agg.error_bound`` per coordinate of the average (before the optimiser).
        """
        self.check_secure(agg)
        return self.aggregate(global_weights, [(agg.apply(global_weights), agg.total_weight)], state, context)

    def check_secure(self, agg: SecureAggregate) -> None:
        """ConfigError if this method cannot run on a sum; SecureAggregationError if ``agg`` was encoded with
        another composition (an equal-weights sum would silently drop FedAvg's example weights)."""
        from fedmnist.secure_aggregation import SecureAggregationError

        want = self.secure_composition()
        if agg.composition != want:
            raise SecureAggregationError(f"{self.name} needs a secure aggregate encoded as {want}, this one was "
                                         f"encoded as {agg.composition}: encode with the method's secure_composition()")

    def empty_round(
        self, global_weights: Sequence[np.ndarray], state: dict, context: RoundContext | None = None,
    ) -> tuple[list[np.ndarray], dict] | None:
        """The step of a round with no usable update (no reply accepted, no secure aggregate, or one
        refused): None, the global weights and the state stay as they were (DP-FedAvg releases noise)."""
        del global_weights, state, context
        return None

    def unadopted_state(self, state: dict) -> dict:
        """The state after a round whose aggregate was computed but not adopted (not finite): unchanged
        (DP-FedAvg counts the release its noise was drawn for)."""
        return state

    def client_clip(self, state: dict) -> float | None:
        """The L2 bound clients must clip their update to before sending it (client-side DP), else None."""
        del state
        return None

    def refuse(self, reply, global_weights: Sequence[np.ndarray], state: dict) -> str | None:
        """Why this method cannot use a ``Reply`` that passed the server's checks (None: it can)."""
        del reply, global_weights, state
        return None

    def client_control(self, state: dict, global_weights: Sequence[np.ndarray]) -> list[np.ndarray] | None:
        """The server control variate ``c`` its clients need beside the weights (SCAFFOLD), else None."""
        del state, global_weights
        return None

    def privacy(self, state: dict) -> tuple[float, float] | None:
        """(ε, δ) spent after the rounds ``state`` records, for private methods; None otherwise."""
        del state
        return None

    def instructions(self, state: dict, global_weights: Sequence[np.ndarray], round_: int) -> Instructions:
        """What this method's clients are told for ``round_``: μ, the clip norm and SCAFFOLD's ``c``."""
        return Instructions(round_, self.client_mu, self.client_clip(state), self.client_control(state, global_weights))


@dataclass(frozen=True)
class ServerOptMethod(Method):
    """A server optimiser (Reddi et al. 2021; Hsu et al. 2019): the weighted average of the clients'
    weights gives the pseudo-gradient Δ = avg − w, which the optimiser applies with its own state."""

    optimizer: ServerOptConfig | None = None

    def check_state(self, state: object, weights: Sequence[np.ndarray]) -> None:
        """Raise ServerOptError unless ``state`` is empty or a valid state of this optimiser for ``weights``."""
        if state != {}:
            check_optimizer_state(state, self.name, weights)

    def aggregate(
        self, global_weights: Sequence[np.ndarray], results: Results, state: dict,
        context: RoundContext | None = None,
    ) -> tuple[list[np.ndarray], dict]:
        """One optimiser step from the weighted average of the replies; an empty state starts at zero."""
        del context
        averaged = self.rule.fn(results)
        return server_step(self.optimizer, global_weights, averaged, state or None)


@dataclass(frozen=True)
class DPMethod(Method):
    """DP-FedAvg (McMahan et al. 2018; Andrew et al. 2021 for adaptive S) around FedAvg, FedProx or FedAvgM.

    Every client's update is clipped to S (by the server, or by the client with ``side='client'``),
    the clipped updates are averaged with equal weights over the m sampled clients and Gaussian noise
    of standard deviation z·S/m is added (``fedmnist.privacy.dp_fedavg_step``), drawn from a generator
    seeded by (seed, round). With ``optimizer`` (FedAvgM: DP-FedAvgM, McMahan et al. 2018's server
    momentum) the noised mean is then fed to the server optimiser, post-processing that costs no privacy.
    The state is ``DPState.to_dict()`` (S and the releases so far, from which the accountant gives ε) and,
    with an optimiser, its state under ``"server"``. Every round is one release, with or without usable
    updates (``empty_round``): the accountant is charged every round the mechanism ran.
    """

    dp: object | None = None
    accountant: object | None = None
    seed: int | None = 0
    optimizer: ServerOptConfig | None = None
    releases_every_round: ClassVar[bool] = True

    def initial_state(self) -> dict:
        """S as configured, nothing released (and a fresh optimiser state, empty until its first step)."""
        from fedmnist.privacy import DPState

        state = DPState.initial(self.dp).to_dict()
        return {**state, "server": {}} if self.optimizer is not None else state

    def _dp_state(self, state: dict):
        from fedmnist.privacy import DPState

        return DPState.from_dict({k: v for k, v in state.items() if k != "server"})

    def check_state(self, state: object, weights: Sequence[np.ndarray]) -> None:
        """Raise ServerOptError unless ``state`` is a DP-FedAvg state (S > 0, releases >= 0), with a valid
        optimiser state under ``"server"`` exactly when the method has an optimiser."""
        if not isinstance(state, dict) or ("server" in state) != (self.optimizer is not None):
            keys = "'clip', 'releases'" + (", 'server'" if self.optimizer is not None else "")
            raise ServerOptError(f"{self.name}: a DP-FedAvg state must have exactly {keys}")
        try:
            self._dp_state(state)
        except ConfigError as exc:
            raise ServerOptError(str(exc)) from None
        if self.optimizer is not None and state["server"] != {}:
            check_optimizer_state(state["server"], self.optimizer.method, weights)

    def _adopt(self, global_weights: Sequence[np.ndarray], step, state: dict) -> tuple[list[np.ndarray], dict]:
        """The released step's weights (through the server optimiser, if any) and the next state."""
        new_state = step.state.to_dict()
        if self.optimizer is None:
            return step.weights, new_state
        weights, server = server_step(self.optimizer, global_weights, step.weights, state.get("server") or None)
        return weights, {**new_state, "server": server}

    def _num_sampled(self, contributors: int) -> int:
        """m, the denominator: the accountant's clients per round (McMahan et al.'s fixed denominator)."""
        return max(self.accountant.clients_per_round, contributors)

    def aggregate(
        self, global_weights: Sequence[np.ndarray], results: Results, state: dict,
        context: RoundContext | None = None,
    ) -> tuple[list[np.ndarray], dict]:
        """One DP-FedAvg step.

        The noise comes from a generator seeded by (seed, round) when ``seed`` is set (the simulation,
        whose adversary is simulated too; tests), else from the operating system's entropy: anyone who
        knows a seed can regenerate the noise and subtract it. The average divides by the m the
        accountant assumes (McMahan et al.'s fixed denominator), not by the realised number of
        replies, which under Poisson sampling is itself private.
        """
        from fedmnist.privacy import dp_fedavg_step

        context = context or RoundContext(0, len(results))
        unclipped = context.unclipped if (self.dp.side == "client" and self.dp.adaptive) else None
        rng = self._noise_rng(context.round)
        step = dp_fedavg_step(global_weights, [w for w, _ in results], self.dp, self._dp_state(state), rng,
                              unclipped=unclipped, num_sampled=self._num_sampled(len(results)),
                              labels=list(context.labels) or None)
        return self._adopt(global_weights, step, state)

    def empty_round(
        self, global_weights: Sequence[np.ndarray], state: dict, context: RoundContext | None = None,
    ) -> tuple[list[np.ndarray], dict]:
        """No usable update: the noise alone is released (``privacy.dp_empty_step``) and charged as a round."""
        from fedmnist.privacy import dp_empty_step

        context = context or RoundContext(0, 0)
        step = dp_empty_step(global_weights, self.dp, self._dp_state(state), self._num_sampled(0),
                             self._noise_rng(context.round))
        return self._adopt(global_weights, step, state)

    def unadopted_state(self, state: dict) -> dict:
        """A computed release that was not adopted (not finite) still counts: one more release, S kept."""
        return {**state, "releases": int(state["releases"]) + 1}

    def _noise_rng(self, round_: int) -> np.random.Generator:
        """The round's noise generator: seeded by (seed, round) when ``seed`` is set, else the OS's entropy."""
        from fedmnist.seeds import server_rng

        return server_rng(self.seed, round_) if self.seed is not None else np.random.default_rng()

    def secure_composition(self, max_count_ratio: float | None = None) -> Composition:
        """Equal weights and, when S is adaptive, the unclipped bits; server-side clipping is refused."""
        from fedmnist.secure_aggregation import check_method_compatible

        return check_method_compatible(self.name, self.dp, max_count_ratio)

    def aggregate_sum(
        self, global_weights: Sequence[np.ndarray], agg: SecureAggregate, state: dict,
        context: RoundContext | None = None,
    ) -> tuple[list[np.ndarray], dict]:
        """One DP-FedAvg step from the sum of the members' client-clipped updates
        (``privacy.dp_fedavg_sum_step``): the same generator, m and accountant as ``aggregate``, the noise
        calibrated to S + ``agg.rounding_slack``, and S's adaptive update from ``agg.unclipped_count``."""
        from fedmnist.privacy import dp_fedavg_sum_step

        self.check_secure(agg)  # equal weights, and the unclipped bits when S is adaptive
        context = context or RoundContext(0, agg.num_contributors)
        step = dp_fedavg_sum_step(global_weights, agg.update_sum, agg.num_contributors, self.dp,
                                  self._dp_state(state), self._noise_rng(context.round),
                                  num_unclipped=agg.unclipped_count, slack=agg.rounding_slack,
                                  num_sampled=self._num_sampled(agg.num_contributors))
        return self._adopt(global_weights, step, state)

    def client_clip(self, state: dict) -> float | None:
        """S, which the clients clip to under client-side clipping."""
        return float(state["clip"]) if self.dp.side == "client" else None

    def refuse(self, reply, global_weights: Sequence[np.ndarray], state: dict) -> str | None:
        """Under client-side clipping, an update longer than S (beyond rounding) is refused, and so is a
        reply without its unclipped bit when S is adaptive."""
        from fedmnist.privacy import _clip_tolerance, client_update, update_norm

        clip = self.client_clip(state)
        if clip is None:
            return None
        if self.dp.adaptive and not isinstance(reply.metrics.get("unclipped"), bool):
            return "client-side adaptive clipping needs the reply's unclipped bit, and it is missing"
        norm = update_norm(client_update(reply.weights, global_weights, "reply"))
        if norm > clip + _clip_tolerance(global_weights, clip):
            return (f"update norm {norm:.4g} exceeds the clip norm S = {clip:.4g}: with client-side clipping "
                    "every client must clip its update before sending it")
        return None

    def privacy(self, state: dict) -> tuple[float, float] | None:
        """ε after the releases so far, at the accountant's δ."""
        return self.accountant.epsilon(int(state["releases"])), self.accountant.delta


@dataclass(frozen=True)
class ScaffoldMethod(Method):
    """SCAFFOLD (Karimireddy et al. 2020, option II; ``fedmnist.scaffold``).

    The server keeps the control variate ``c`` (state ``{"control": [arrays]}``, empty = zeros) and
    sends it with the weights; every client trains with plain SGD corrected by ``c − c_i`` and replies
    with its weights and ``Δc_i``. The server moves to ``x + η_g·avg(y_i − x)`` (the average weighted by
    the clients' example counts, FedAvg's, which equals the paper's plain average for equal counts) and
    ``c`` to ``c + Σ Δc_i / N``, with ``N`` the federation's number of clients (``num_clients``; None:
    the round's replies, i.e. everyone takes part in every round).
    """

    server_lr: float = 1.0
    num_clients: int | None = None

    def check_state(self, state: object, weights: Sequence[np.ndarray]) -> None:
        """Raise ServerOptError unless ``state`` is empty or ``{"control": c}`` shaped like ``weights``."""
        from fedmnist.scaffold import ScaffoldError, check_controls

        if state == {}:
            return
        if not isinstance(state, dict) or set(state) != {"control"}:
            raise ServerOptError("a SCAFFOLD state must be {'control': [arrays]}")
        try:
            check_controls(state["control"], weights, "SCAFFOLD's server control variate")
        except ScaffoldError as exc:
            raise ServerOptError(str(exc)) from None

    def client_control(self, state: dict, global_weights: Sequence[np.ndarray]) -> list[np.ndarray]:
        """``c``: the state's, or zeros before the first round."""
        from fedmnist.scaffold import zero_controls

        return list(state["control"]) if state else zero_controls(global_weights)

    def aggregate(
        self, global_weights: Sequence[np.ndarray], results: Results, state: dict,
        context: RoundContext | None = None,
    ) -> tuple[list[np.ndarray], dict]:
        """``fedmnist.scaffold.server_update`` over the replies and their ``Δc_i`` (in ``context``)."""
        from fedmnist.scaffold import ScaffoldError, server_update

        deltas = context.control_deltas if context is not None else None
        if deltas is None or len(deltas) != len(results) or any(d is None for d in deltas):
            raise ScaffoldError("SCAFFOLD needs every reply's control-variate delta")
        num_clients = self._federation_size(len(results))
        weights, control = server_update(global_weights, self.client_control(state, global_weights),
                                         [w for w, _ in results], list(deltas), num_clients, self.server_lr,
                                         [n for _, n in results])
        return weights, {"control": control}

    def _federation_size(self, num_contributors: int) -> int:
        """N, which Σ Δc_i is divided by: ``num_clients``, or the round's contributors when larger or unknown."""
        return max(self.num_clients or 0, num_contributors)

    def aggregate_sum(
        self, global_weights: Sequence[np.ndarray], agg: SecureAggregate, state: dict,
        context: RoundContext | None = None,
    ) -> tuple[list[np.ndarray], dict]:
        """SCAFFOLD's step from a secure round: ``x + η_g·(mean update)`` and ``c + Σ Δc_i / N``, with N the
        federation's size from the contributors (the sum is one pseudo-reply, never a federation of one)."""
        from fedmnist.scaffold import server_update

        del context
        self.check_secure(agg)  # Σ Δc_i rides along
        weights, control = server_update(global_weights, self.client_control(state, global_weights),
                                         [agg.apply(global_weights)], [agg.control_delta_sum],
                                         self._federation_size(agg.num_contributors), self.server_lr)
        return weights, {"control": control}

    def refuse(self, reply, global_weights: Sequence[np.ndarray], state: dict) -> str | None:
        """A reply without its control-variate delta (its client did not train with SCAFFOLD) is refused."""
        del global_weights, state
        if getattr(reply, "control_delta", None) is None:
            return ("SCAFFOLD needs the client's control-variate delta with its weights, and the reply has none: "
                    "the client did not train with SCAFFOLD's correction")
        return None


def with_privacy(method: Method, dp, num_clients: int, clients_per_round: int, seed: int | None) -> DPMethod:
    """``method`` (FedAvg, FedProx or FedAvgM) wrapped in DP-FedAvg, with its accountant for K clients, m per
    round; FedAvgM's server optimiser then steps from the noised mean.

    ``seed`` None draws the noise from the operating system (the deployed modes); an integer makes it
    reproducible and predictable to whoever knows it (the simulation, tests).
    """
    from dataclasses import fields as dataclass_fields

    from fedmnist.privacy import PrivacyAccountant, check_dp_method

    check_dp_method(method.name)
    dp.noise_params(clients_per_round)  # adaptive: z < 2σ_b, checked before round 1
    accountant = PrivacyAccountant.from_config(dp, num_clients, clients_per_round)
    base = {f.name: getattr(method, f.name) for f in dataclass_fields(Method)}
    optimizer = method.optimizer if isinstance(method, ServerOptMethod) else None
    return DPMethod(**base, dp=dp, accountant=accountant, seed=seed, optimizer=optimizer)


def build_method(name: str, config: MethodConfig, krum_f: int = 1, num_clients: int | None = None) -> Method:
    """The ``Method`` called ``name`` with ``config``'s parameters (``krum_f`` when config leaves it open;
    ``num_clients``: the federation's size N, which SCAFFOLD's server control divides by)."""
    if name == SCAFFOLD:
        server_lr = 1.0 if config.server_lr is None else float(config.server_lr)
        return ScaffoldMethod(name, AGGREGATORS["fedavg"], 0.0, server_lr=server_lr, num_clients=num_clients)
    if name in SERVER_OPTIMIZERS:
        return ServerOptMethod(name, AGGREGATORS["fedavg"], 0.0, optimizer=config.optimizer(name))
    rule = AGGREGATORS[name]
    given = {
        "beta": config.trim_beta,
        "num_malicious": config.krum_f if config.krum_f is not None else krum_f,
        "num_to_keep": config.num_to_keep,
    }
    mu = float(config.mu) if name == "fedprox" else 0.0
    return Method(name, rule, mu, {p: given[p] for p in rule.params})


def build_methods(config: MethodConfig, krum_f: int = 1, num_clients: int | None = None) -> list[Method]:
    """Every method of ``config``, validated, in order."""
    config.validate()
    return [build_method(name, config, krum_f, num_clients) for name in config.methods]
