"""One team member's job: train the shared CNN on its partition from the round's global weights.

Used by ``local_training.ipynb`` and ``fedmnist train``: both call ``run_local_training`` and get the
same four files (``modelo_local_cliente_N.h5``, ``pesos_cliente_N.pkl``,
``curvas_aprendizaje_cliente_N.png``, ``matriz_confusion_cliente_N.png``). The round itself is
``fedmnist.client.client_step``, as in the simulation and Flower; this module reads its inputs from files
(the global weights, the member's partition and SCAFFOLD control file) and writes its outputs.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedmnist.client import ClientState, DivergedError, Instructions, client_step
from fedmnist.data import client_file, common_test_file, load_partition
from fedmnist.errors import ConfigError, DataError, UpdateFileError, ValidationError
from fedmnist.evaluation import EvalResult, evaluate
from fedmnist.exchange import (
    ClientControl,
    ClientUpdate,
    GlobalWeights,
    control_bytes,
    control_path,
    load_control,
    load_global,
    make_global,
    save_update,
    update_path,
)
from fedmnist.federation_files import check_file_hash, checked_test_file, read_manifest
from fedmnist.io import OutputSet, check_writable_dir
from fedmnist.model import DEFAULT_SEED, initial_weights, model_fingerprint, save_keras_model
from fedmnist.seeds import training_seed, validation_seed
from fedmnist.training import (
    ClientTrainer,
    TrainConfig,
    TrainResult,
    check_trainer,
    make_trainer,
    validation_split,
)

log = logging.getLogger(__name__)


@dataclass
class LocalTrainingOutput:
    """Everything a member's local training produced, with the paths of the files written."""

    client_id: int
    round: int
    start: GlobalWeights
    result: TrainResult
    test: EvalResult
    update: ClientUpdate
    files: dict[str, Path]
    seconds: float


def output_paths(out_dir: str | Path, client_id: int) -> dict[str, Path]:
    """The four files a member's training writes."""
    out_dir = Path(out_dir)
    return {
        "model": out_dir / f"modelo_local_cliente_{client_id}.h5",
        "update": update_path(out_dir, client_id),
        "curves": out_dir / f"curvas_aprendizaje_cliente_{client_id}.png",
        "confusion": out_dir / f"matriz_confusion_cliente_{client_id}.png",
    }


def starting_point(global_weights: str | Path | None, round_: int | None, seed: int = DEFAULT_SEED) -> GlobalWeights:
    """The round's shared starting weights: the given file, or ``build_model(seed)`` for round 0."""
    if global_weights:
        start = load_global(global_weights)
        if round_ is not None and round_ != start.round:
            raise ConfigError(
                f"{global_weights}: holds the global weights of round {start.round}, but round {round_} "
                "was requested; use the file of the round you are training"
            )
        return start
    if round_ not in (None, 0):
        raise ConfigError(
            f"round {round_} needs the global weights written by the previous aggregation "
            f"(pesos_globales_ronda_{round_}.pkl); pass it with --global-weights / GLOBAL_WEIGHTS"
        )
    log.info("no global weights given: starting from build_model(seed=%d), round 0", seed)
    return make_global(initial_weights(seed), 0, "init", seed)


def check_partition_file(data_dir: str | Path, client_id: int) -> Path:
    """Path of the client's partition, checked against the federation manifest when there is one."""
    path = client_file(data_dir, client_id)
    if not os.path.lexists(path):
        raise DataError(
            f"{path}: partition file not found; run split_data.py first or check CLIENT_ID/--client "
            f"({client_id}) and DATA_DIR/--data-dir ({data_dir})"
        )
    manifest = read_manifest(data_dir)
    if manifest:
        entries = {c["client_id"]: c for c in manifest.get("clients", [])}
        entry = entries.get(client_id)
        if entry is None:
            raise DataError(
                f"{path}: client {client_id} is not in the federation manifest "
                f"({len(entries)} clients: 1..{len(entries)})"
            )
        check_file_hash(path, entry.get("sha256"), "partition file")
    return path


def hold_out(x: np.ndarray, y: np.ndarray, config: TrainConfig, client_id: int
             ) -> tuple[np.ndarray, np.ndarray, tuple[np.ndarray, np.ndarray] | None]:
    """The member's training rows and its validation hold-out (None: none), seeded by ``validation_seed``."""
    x_fit, y_fit, x_val, y_val = validation_split(x, y, config.validation_split,
                                                  validation_seed(config.seed, client_id))
    return x_fit, y_fit, None if x_val is None else (x_val, y_val)


def member_instructions(start: GlobalWeights, config: TrainConfig, dp_clip: float | None,
                        controls: MemberControls | None) -> tuple[Instructions, ClientState]:
    """The round's instructions and the member's state, from its flags, the global weights and its control file.

    The training round is ``start.round + 1`` (the round that starts from those weights): its seed is
    ``fedmnist.seeds.training_seed(seed, round, client id)``, the one the simulation and Flower give the same
    client, so the three modes train it identically. μ is ``--mu``, the clip norm ``--dp-clip``, SCAFFOLD's
    ``c`` and ``c_i`` come from the global-weights file and the control file (``member_controls``).
    """
    server = own = None
    if controls is not None:
        server, own = controls.server, controls.own
    return Instructions(start.round + 1, config.mu, dp_clip, server), ClientState(own)


def make_update(result: TrainResult, start: GlobalWeights, config: TrainConfig, client_id: int,
                metrics: dict | None = None, num_examples: int | None = None) -> ClientUpdate:
    """The update a member hands the server for ``result``.

    ``num_examples`` is FedAvg's n_k, the size of the member's partition (validation hold-out included),
    which the server checks against ``particion.json``; default: the examples trained on.
    """
    return ClientUpdate(
        client_id=client_id,
        round=start.round,
        num_examples=result.num_examples if num_examples is None else num_examples,
        weights=result.weights,
        start_sha256=start.sha256,
        fingerprint=model_fingerprint(),
        mu=config.mu,
        epochs=config.epochs,
        batch_size=config.batch_size,
        metrics=metrics or {"history": result.history},
    )


@dataclass
class MemberControls:
    """A member's SCAFFOLD round: the server's ``c``, its own ``c_i`` and where ``c_i`` is kept."""

    client_id: int
    server: list[np.ndarray]
    own: list[np.ndarray]
    path: Path
    round: int

    def record(self, new_own: list[np.ndarray]) -> ClientControl:
        """The control file's contents after this round: ``c_i⁺``, with the ``c_i`` the round started from."""
        return ClientControl(self.client_id, self.round, new_own, self.own)


def member_controls(start: GlobalWeights, client_id: int, config: TrainConfig, path: str | Path,
                    requested: bool, dp_clip: float | None) -> MemberControls | None:
    """The member's SCAFFOLD inputs for this round, checked before any training; None without SCAFFOLD.

    Raises
    ------
    ConfigError
        SCAFFOLD with momentum, Adam or client-side DP clipping.
    UpdateFileError
        A control file or a server control variate that is not this client's or not the CNN's.
    """
    from fedmnist.methods import SCAFFOLD, MethodConfig, build_method
    from fedmnist.scaffold import zero_controls
    from fedmnist.training import check_scaffold_optimizer

    if not requested and start.method != SCAFFOLD:
        return None
    try:
        check_scaffold_optimizer(config.optimizer, config.momentum)
    except ConfigError as exc:
        why = "--scaffold was given" if requested else f"{start.path} comes from a SCAFFOLD aggregation"
        raise ConfigError(f"{exc}. SCAFFOLD is on because {why}: train with --optimizer sgd --momentum 0 "
                          "and an SGD --learning-rate such as 0.05") from None
    if dp_clip is not None:
        raise ConfigError("SCAFFOLD cannot be combined with --dp-clip: DP-FedAvg runs with FedAvg or FedProx only")
    if start.method == SCAFFOLD and not start.state:
        log.warning("%s comes from SCAFFOLD but carries no server control variate: c = 0", start.path)
    if start.method == SCAFFOLD and start.state:
        try:  # the server's own check of a SCAFFOLD state: exactly {"control": arrays like the weights}
            build_method(SCAFFOLD, MethodConfig((SCAFFOLD,))).check_state(start.state, start.weights)
        except ValidationError as exc:
            raise UpdateFileError(f"{start.path}: SCAFFOLD server state: {exc}") from None
        server = list(start.state["control"])
    else:
        server = zero_controls(start.weights)
    path = Path(path)
    training_round = start.round + 1
    if not os.path.lexists(path):  # a dangling link is refused by the reader, not taken for a first round
        log.info("%s not found: client %d starts SCAFFOLD with c_i = 0", path, client_id)
        own = zero_controls(start.weights)
    else:
        stored = load_control(path, client_id)
        if stored.round > training_round:
            raise UpdateFileError(f"{path}: written by round {stored.round}'s training, later than this round "
                                  f"({training_round}); use the control file of this federation and round")
        # retraining the same round starts again from the c_i that round started from
        own = stored.previous if stored.round == training_round else stored.control
    return MemberControls(client_id, server, own, path, training_round)


def run_local_training(
    client_id: int,
    data_dir: str | Path,
    out_dir: str | Path,
    config: TrainConfig = TrainConfig(),
    global_weights: str | Path | None = None,
    round_: int | None = None,
    trainer: ClientTrainer | None = None,
    dp_clip: float | None = None,
    scaffold: bool = False,
) -> LocalTrainingOutput:
    """Train client ``client_id`` and write its four files to ``out_dir`` (five with SCAFFOLD's control file).

    The output directory is checked writable and all inputs are loaded and checked before any
    training; the four files appear together (``fedmnist.io.OutputSet``) or not at all. With
    ``dp_clip`` S (client-side DP-FedAvg) the update is clipped to L2 norm S before it is written and
    records whether it was within S (the bit adaptive clipping needs); the norm itself stays here.

    SCAFFOLD is on when the round's global weights come from a SCAFFOLD aggregation (they carry the
    server control variate ``c``) or, in round 0, with ``scaffold=True`` (``c`` = 0). The member then
    trains with the correction ``c − c_i``, where ``c_i`` is its own control variate kept beside its
    update in ``out_dir/control_cliente_N.pkl`` (zeros the first time), sends ``Δc_i`` in its update
    and rewrites the control file with the update, in the same all-or-nothing set.
    """
    config.validate()
    if client_id < 1:
        raise ConfigError(f"client ids start at 1 (got {client_id})")
    if dp_clip is not None and not (isinstance(dp_clip, (int, float)) and dp_clip > 0):
        raise ConfigError(f"the clip norm S (--dp-clip) must be > 0 (got {dp_clip})")
    check_writable_dir(out_dir, "--out directory")
    started = time.perf_counter()
    x, y = load_partition(check_partition_file(data_dir, client_id))
    x_test, y_test = load_partition(checked_test_file(common_test_file(data_dir)))
    start = starting_point(global_weights, round_, config.seed)
    controls = member_controls(start, client_id, config, control_path(out_dir, client_id), scaffold, dp_clip)
    instructions, state = member_instructions(start, config, dp_clip, controls)

    if trainer is None:
        trainer = make_trainer(config)
    else:
        check_trainer(trainer, config)
    x_fit, y_fit, validation = hold_out(x, y, config, client_id)
    try:
        reply, new_state = client_step(trainer, start.weights, x_fit, y_fit, instructions, state,
                                       epochs=config.epochs, batch_size=config.batch_size,
                                       seed=training_seed(config.seed, instructions.round, client_id),
                                       validation=validation)
    except DivergedError as exc:
        raise DivergedError(f"client {client_id}: {exc}; nothing was written to {out_dir}: lower --learning-rate and train "
                            "again") from None
    result = TrainResult(reply.local_weights, len(x_fit), reply.history, reply.num_steps)
    test = evaluate(trainer, result.weights, x_test, y_test)

    metrics = {
        "history": result.history,
        "test_accuracy": test.accuracy,
        "test_loss": test.loss,
        "optimizer": config.optimizer,
        "learning_rate": config.learning_rate,
        "validation_examples": len(x) - result.num_examples,
        **reply.metrics,
    }
    update = make_update(result, start, config, client_id, metrics, num_examples=reply.num_examples)
    update.weights, update.control_delta = reply.weights, reply.control_delta
    new_control = None if controls is None else controls.record(new_state.control)
    from fedmnist.plots import plot_confusion_matrix, plot_learning_curves

    files = output_paths(out_dir, client_id)
    with OutputSet(out_dir, "--out directory") as staged:
        with staged.temp_path(files["model"].name) as tmp:
            save_keras_model(result.weights, tmp)
        with staged.temp_path(files["curves"].name) as tmp:
            plot_learning_curves(result.history, tmp, title=f"Cliente {client_id} — ronda {start.round}")
        with staged.temp_path(files["confusion"].name) as tmp:
            plot_confusion_matrix(test.confusion, tmp,
                                  title=f"Cliente {client_id} — test común (precisión {test.accuracy:.2%})")
        with staged.temp_path(files["update"].name) as tmp:
            save_update(tmp, update)
        if new_control is not None:
            files["control"] = controls.path
            staged.write_bytes(controls.path.name, control_bytes(new_control))
    update.path = files["update"]
    return LocalTrainingOutput(client_id, start.round, start, result, test, update, files,
                               time.perf_counter() - started)
