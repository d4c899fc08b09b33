"""One client's round, written once: what every mode's client does between receiving and replying.

The member's job (``fedmnist.local``: ``fedmnist train`` and the notebook), the simulation's
executors (``fedmnist.workers``: in process and in worker processes) and the Flower ClientApp
(``fedmnist.flower_app``) differ only in where the data, the instructions and the reply travel
(files, tasks, messages). Each of them calls ``client_step`` and nothing else of the client logic,
so the three give the same numbers by construction (fedjax's ``client_init`` → ``client_step`` →
``client_final``; Flower's ``@app.train()``).

``client_step`` takes the round's ``Instructions`` (what the server's method tells its clients:
``fedmnist.methods.Method.instructions``) and the client's own ``ClientState`` and, in this order:

1. trains from the start weights (``ClientTrainer.train``) with FedProx's proximal term μ and, under
   SCAFFOLD, the correction ``c − c_i`` (Karimireddy et al. 2020);
2. refuses a training that diverged (any non-finite weight or control variate): ``DivergedError``,
   and the client's state does not change;
3. computes SCAFFOLD's option-II control update ``(c_i⁺, Δc_i)`` from the honest training;
4. clips the update to the clip norm S for client-side DP-FedAvg, recording Andrew et al.'s
   "unclipped" bit;
5. in a secure round (``Instructions.secure``), encodes the clipped update, its example count and, as
   the method needs, ``Δc_i`` and the unclipped bit into one integer vector
   (``secure_aggregation.SecureEncoding.encode``, quantised with the (seed, round, client) generator):
   ``ClientReply.encoded``, which the mode masks (Flower, ``fedmnist.flower_secagg``) or sums in the
   clear (the simulation twin), instead of sending the weights;

and returns the reply (``ClientReply``) and the client's new state.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from fedmnist.errors import ConfigError, ValidationError

if TYPE_CHECKING:
    from fedmnist.secure_aggregation import SecureEncoding
    from fedmnist.training import ClientTrainer

Weights = list[np.ndarray]


class DivergedError(ValidationError):
    """A local training produced non-finite weights or control variates: nothing is sent, no state changes."""


@dataclass(frozen=True, eq=False)
class Instructions:
    """What the server tells one client for one round, beside the start weights.

    ``round`` is the training round (1-based); ``mu`` FedProx's proximal coefficient (0: none);
    ``clip`` the L2 norm S of client-side DP-FedAvg (None: the client does not clip); ``control``
    SCAFFOLD's server control variate ``c`` (None: no SCAFFOLD); ``secure`` how to encode the reply for
    secure aggregation (``secure_aggregation.SecureEncoding``; None: a plain round). A new client-side
    rule is a new optional field here, read in ``client_step``. Checked once, on creation (ConfigError).
    """

    round: int
    mu: float = 0.0
    clip: float | None = None
    control: Weights | None = None
    secure: SecureEncoding | None = None

    def __post_init__(self) -> None:
        if isinstance(self.round, bool) or not isinstance(self.round, (int, np.integer)) or self.round < 1:
            raise ConfigError(f"the round of a client's instructions must be an integer >= 1 (got {self.round!r})")
        if isinstance(self.mu, bool) or not isinstance(self.mu, (int, float)) or not (
                math.isfinite(self.mu) and self.mu >= 0):
            raise ConfigError(f"the FedProx coefficient mu must be >= 0 (got {self.mu!r})")
        if self.clip is not None and (isinstance(self.clip, bool) or not isinstance(self.clip, (int, float))
                                      or not (math.isfinite(self.clip) and self.clip > 0)):
            raise ConfigError(f"the clip norm S must be a finite number > 0 (got {self.clip!r})")
        if self.control is not None and (not isinstance(self.control, (list, tuple))
                                         or not all(isinstance(c, np.ndarray) for c in self.control)):
            raise ConfigError("SCAFFOLD's server control variate must be a list of numpy arrays")
        if self.secure is not None:
            from fedmnist.secure_aggregation import SecureEncoding

            if not isinstance(self.secure, SecureEncoding):
                raise ConfigError("the secure-aggregation encoding must be a secure_aggregation.SecureEncoding")

    @property
    def scaffold(self) -> bool:
        """Whether the client trains with SCAFFOLD's correction and replies with ``Δc_i``."""
        return self.control is not None


@dataclass(frozen=True, eq=False)
class ClientState:
    """A client's own state across rounds: SCAFFOLD's ``c_i`` (None: zeros, before its first SCAFFOLD round)."""

    control: Weights | None = None


@dataclass(eq=False)
class ClientReply:
    """What one client's round produced.

    ``weights`` is what it sends (clipped under client-side DP); ``local_weights`` its trained model
    before clipping, which stays on the client (the member's job saves and evaluates it; the same list
    as ``weights`` when nothing was clipped). ``num_examples`` is FedAvg's n_k, the client's partition
    (a validation hold-out included); ``num_steps`` the optimizer steps K; ``control_delta`` SCAFFOLD's
    ``Δc_i`` (None without SCAFFOLD); ``unclipped`` whether ‖Δ‖ ≤ S (None without clipping); ``encoded``
    the secure round's integer vector (None in a plain round), the only thing a secure round sends.
    """

    weights: Weights
    num_examples: int
    history: dict[str, list[float]] = field(default_factory=dict)
    num_steps: int = 0
    control_delta: Weights | None = None
    unclipped: bool | None = None
    local_weights: Weights | None = None
    encoded: np.ndarray | None = None

    @property
    def train_loss(self) -> float:
        """The last local epoch's mean training loss."""
        return float(self.history["loss"][-1])

    @property
    def train_accuracy(self) -> float:
        """The last local epoch's training accuracy."""
        return float(self.history["accuracy"][-1])

    @property
    def metrics(self) -> dict:
        """The reply's metrics the server reads (the unclipped bit under client-side clipping)."""
        return {} if self.unclipped is None else {"unclipped": self.unclipped}


def client_step(
    trainer: ClientTrainer,
    start_weights: Sequence[np.ndarray],
    x: np.ndarray,
    y: np.ndarray,
    instructions: Instructions,
    state: ClientState | None,
    *,
    epochs: int,
    batch_size: int,
    seed: int,
    validation: tuple[np.ndarray, np.ndarray] | None = None,
    client_id: int | None = None,
    steps: int | None = None,
) -> tuple[ClientReply, ClientState]:
    """One client's round: train from ``start_weights`` on (x, y) as ``instructions`` say; reply and new state.

    ``seed`` fixes shuffling and dropout (``fedmnist.seeds.training_seed``); ``validation`` (x, y) held
    out of the partition gives the history its validation curves and counts in ``num_examples``.
    SCAFFOLD's local rate ``η_l`` is the trainer's. ``state`` None is a client that never trained.
    ``client_id`` picks the quantisation generator of a secure round (required then, unused otherwise).
    ``steps``: that many minibatch steps instead of ``epochs`` whole epochs (``ClientTrainer.train``).
    Inputs are not modified. Without SCAFFOLD the state comes back as it was given.

    Raises
    ------
    DivergedError
        The trained weights, or SCAFFOLD's new control variate or its delta, are not finite.
    ConfigError, ScaffoldError
        Settings the trainer refuses (e.g. SCAFFOLD with momentum), or controls that do not fit the weights.
    """
    from fedmnist.scaffold import all_finite, client_control_update, correction, zero_controls

    state = ClientState() if state is None else state
    start = list(start_weights)
    own = None
    extra = {}
    if instructions.scaffold:
        own = state.control if state.control is not None else zero_controls(start)
        extra["correction"] = correction(instructions.control, own)
    if steps is not None:
        extra["steps"] = steps
    x_val, y_val = validation if validation is not None else (None, None)
    result = trainer.train(start, x, y, epochs=epochs, batch_size=batch_size, mu=instructions.mu, seed=seed,
                           x_val=x_val, y_val=y_val, **extra)
    keeps = "; the client keeps its previous c_i" if instructions.scaffold else ""
    if not all_finite(result.weights):
        raise DivergedError(f"the local training diverged (non-finite weights){keeps}")
    reply = ClientReply(result.weights, len(x) + (0 if x_val is None else len(x_val)), result.history,
                        result.num_steps, local_weights=result.weights)
    new_state = state
    if instructions.scaffold:  # option II from the honest training, before anything alters the reply
        new_control, reply.control_delta = client_control_update(
            start, result.weights, instructions.control, own, result.num_steps, trainer.learning_rate)
        if not all_finite(new_control, reply.control_delta):
            raise DivergedError(f"the local training diverged (non-finite SCAFFOLD control variate){keeps}")
        new_state = ClientState(control=new_control)
    if instructions.clip is not None:  # client-side DP-FedAvg: nothing unclipped leaves the client
        from fedmnist.privacy import clip_client_weights

        clipped = clip_client_weights(result.weights, start, instructions.clip)
        reply.weights, reply.unclipped = clipped.weights, bool(clipped.unclipped)
    if instructions.secure is not None:  # secure aggregation: the clipped update, encoded (masked by the mode)
        if client_id is None:
            raise ConfigError("a secure round's client step needs the client id (its quantisation generator)")
        reply.encoded = instructions.secure.encode(reply.weights, start, reply.num_examples, instructions.round,
                                                   client_id, reply.control_delta, reply.unclipped)
    return reply, new_state
