"""Tests for fedmnist.client: the one client step (training, SCAFFOLD, client-side clipping, divergence),
the instructions a method sends, and that every mode goes through the step."""

from __future__ import annotations

import inspect
import re

import numpy as np
import pytest

from fedmnist.client import ClientReply, ClientState, DivergedError, Instructions, client_step
from fedmnist.errors import ConfigError, FedMnistError
from fedmnist.training import TrainResult

SEED = 7
LR = 0.05


def layers(value: float) -> list[np.ndarray]:
    """A two-layer 'model' for the fake trainer."""
    return [np.full((2, 3), value, np.float32), np.full(3, value, np.float32)]


class FakeTrainer:
    """Records its call and moves every weight by ``step`` − Σ correction (NaN after ``diverge``)."""

    def __init__(self, step: float = 0.5, learning_rate: float = LR, diverge: bool = False):
        self.step, self.learning_rate, self.diverge = step, learning_rate, diverge
        self.calls: list[dict] = []

    def train(self, start, x, y, *, epochs, batch_size, mu=0.0, seed=0, x_val=None, y_val=None, correction=None):
        self.calls.append({"mu": mu, "seed": seed, "epochs": epochs, "batch_size": batch_size,
                           "correction": correction, "x_val": x_val})
        shift = [np.float32(self.step) - (0 if correction is None else c) for c in (correction or start)]
        weights = [np.asarray(w + s, np.float32) for w, s in zip(start, shift)]
        if self.diverge:
            weights[1][0] = np.nan
        history = {"loss": [0.9, 0.4], "accuracy": [0.5, 0.8]}
        return TrainResult(weights, len(x), history, num_steps=4)


def run(trainer, instructions, state=None, start=None, **kwargs):
    x, y = np.zeros((6, 28, 28, 1), np.float32), np.zeros(6, np.int32)
    return client_step(trainer, layers(1.0) if start is None else start, x, y, instructions, state,
                       epochs=2, batch_size=3, seed=SEED, **kwargs)


# --- the step, with a fake trainer -------------------------------------------------------------


def test_a_plain_step_is_the_training_and_keeps_the_state():
    trainer, state = FakeTrainer(), ClientState()
    start = layers(1.0)

    reply, new_state = run(trainer, Instructions(3, mu=0.25), state, start=start)

    assert trainer.calls == [{"mu": 0.25, "seed": SEED, "epochs": 2, "batch_size": 3, "correction": None,
                              "x_val": None}]
    assert isinstance(reply, ClientReply) and new_state is state
    assert all(np.array_equal(w, np.full_like(w, 1.5)) for w in reply.weights)
    assert reply.local_weights is reply.weights and reply.num_examples == 6 and reply.num_steps == 4
    assert reply.control_delta is None and reply.unclipped is None and reply.metrics == {}
    assert (reply.train_loss, reply.train_accuracy) == (0.4, 0.8)
    assert all(np.array_equal(w, v) for w, v in zip(start, layers(1.0)))  # input unchanged


def test_the_validation_hold_out_counts_in_num_examples():
    trainer = FakeTrainer()
    x_val, y_val = np.zeros((4, 28, 28, 1), np.float32), np.zeros(4, np.int32)

    reply, _ = run(trainer, Instructions(1), validation=(x_val, y_val))

    assert reply.num_examples == 10 and trainer.calls[0]["x_val"] is x_val


def test_scaffold_trains_with_c_minus_c_i_and_returns_option_two_controls():
    from fedmnist.scaffold import client_control_update

    c = layers(0.125)
    c_i = layers(0.5)
    trainer = FakeTrainer()
    start = layers(1.0)

    reply, new_state = run(trainer, Instructions(2, control=c), ClientState(c_i), start=start)

    correction = trainer.calls[0]["correction"]
    assert all(np.array_equal(k, np.full_like(k, -0.375)) for k in correction)  # c − c_i
    trained = [w + 0.5 + 0.375 for w in start]
    want_control, want_delta = client_control_update(start, trained, c, c_i, 4, LR)
    assert all(np.array_equal(a, b) for a, b in zip(reply.control_delta, want_delta))
    assert all(np.array_equal(a, b) for a, b in zip(new_state.control, want_control))
    assert all(np.array_equal(a, b) for a, b in zip(c_i, layers(0.5)))  # the old state is not touched


def test_a_client_without_state_starts_scaffold_from_zero_controls():
    trainer = FakeTrainer()

    run(trainer, Instructions(1, control=layers(0.25)), None)

    assert all(np.array_equal(k, np.full_like(k, 0.25)) for k in trainer.calls[0]["correction"])


def test_client_side_clipping_sends_global_plus_the_clipped_update_and_keeps_the_model():
    trainer = FakeTrainer(step=0.5)
    start = layers(1.0)  # the update is 0.5 in each of 9 weights: norm 1.5

    clipped, _ = run(trainer, Instructions(1, clip=0.3), start=start)
    within, _ = run(trainer, Instructions(1, clip=2.0), start=start)

    norm = np.sqrt(sum(float(np.sum((w - s).astype(np.float64) ** 2)) for w, s in zip(clipped.weights, start)))
    assert norm == pytest.approx(0.3, rel=1e-5) and clipped.unclipped is False
    assert clipped.metrics == {"unclipped": False}
    assert all(np.array_equal(w, np.full_like(w, 1.5)) for w in clipped.local_weights)  # the model stays local
    assert within.unclipped is True and all(np.array_equal(w, np.full_like(w, 1.5)) for w in within.weights)


def test_clipping_comes_after_the_honest_control_update():
    trainer = FakeTrainer()
    told = Instructions(1, clip=0.1, control=layers(0.0))

    reply, _ = run(trainer, told)

    unclipped, _ = run(FakeTrainer(), Instructions(1, control=layers(0.0)))
    assert all(np.array_equal(a, b) for a, b in zip(reply.control_delta, unclipped.control_delta))
    assert reply.unclipped is False


def test_a_diverged_training_raises_and_changes_no_state():
    own = layers(0.5)
    state = ClientState(own)

    with pytest.raises(DivergedError, match=r"diverged \(non-finite weights\); the client keeps its previous c_i"):
        run(FakeTrainer(diverge=True), Instructions(1, control=layers(0.0)), state)
    with pytest.raises(DivergedError, match=r"diverged \(non-finite weights\)$"):
        run(FakeTrainer(diverge=True), Instructions(1, clip=1.0))
    assert state.control is own and all(np.array_equal(a, b) for a, b in zip(own, layers(0.5)))
    assert issubclass(DivergedError, FedMnistError)


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
def test_a_non_finite_control_variate_is_a_divergence_too():
    # finite weights, but (x − y)/(K·η) overflows float32 with a vanishing rate
    with pytest.raises(DivergedError, match="non-finite SCAFFOLD control variate"):
        run(FakeTrainer(learning_rate=1e-300), Instructions(1, control=layers(0.0)))


@pytest.mark.parametrize(("kwargs", "fragment"), [
    ({"round": 0}, "round"),
    ({"round": 1.0}, "round"),
    ({"round": 1, "mu": -0.1}, "mu must be >= 0"),
    ({"round": 1, "mu": float("nan")}, "mu must be >= 0"),
    ({"round": 1, "clip": 0.0}, "clip norm"),
    ({"round": 1, "clip": True}, "clip norm"),
    ({"round": 1, "control": "c"}, "list of numpy arrays"),
])
def test_instructions_refuse_bad_values(kwargs, fragment):
    with pytest.raises(ConfigError, match=fragment):
        Instructions(**kwargs)


def test_every_method_supplies_its_instructions():
    from fedmnist.methods import MethodConfig, build_method, with_privacy
    from fedmnist.privacy import DPConfig

    weights = layers(1.0)
    config = MethodConfig(("fedavg", "fedprox", "scaffold"), mu=0.3)
    fedavg, fedprox, scaffold = (build_method(m, config) for m in config.methods)

    plain = fedavg.instructions(fedavg.initial_state(), weights, 4)
    assert (plain.round, plain.mu, plain.clip, plain.control) == (4, 0.0, None, None)
    assert fedprox.instructions({}, weights, 1).mu == 0.3
    told = scaffold.instructions({}, weights, 1)
    assert told.scaffold and all(np.array_equal(c, np.zeros_like(w)) for c, w in zip(told.control, weights))
    c = layers(0.25)
    assert scaffold.instructions({"control": c}, weights, 2).control[0] is not None
    dp = with_privacy(fedavg, DPConfig(0.5, 0.7, side="client"), 10, 5, seed=1)
    assert dp.instructions(dp.initial_state(), weights, 1).clip == 0.7
    server_side = with_privacy(fedavg, DPConfig(0.5, 0.7), 10, 5, seed=1)
    assert server_side.instructions(server_side.initial_state(), weights, 1).clip is None


# --- the step with the real trainer ------------------------------------------------------------


@pytest.fixture(scope="module")
def sgd_trainer():
    from fedmnist.training import ClientTrainer

    return ClientTrainer("sgd", LR, 0.0, model_seed=SEED)


@pytest.fixture(scope="module")
def tiny(small_mnist):
    from fedmnist.data import normalize_images

    return normalize_images(small_mnist.x_train[:40]), small_mnist.y_train[:40]


def test_the_step_is_the_trainers_training_bit_for_bit(sgd_trainer, tiny):
    from fedmnist.model import initial_weights
    from fedmnist.scaffold import client_control_update, correction

    x, y = tiny
    start = initial_weights(SEED)
    c = [np.full_like(w, 1e-3) for w in start]

    reply, state = client_step(sgd_trainer, start, x, y, Instructions(1, mu=0.01, control=c), None,
                               epochs=1, batch_size=10, seed=3)

    zeros = [np.zeros_like(w) for w in start]
    want = sgd_trainer.train(start, x, y, epochs=1, batch_size=10, mu=0.01, seed=3, correction=correction(c, zeros))
    assert all(np.array_equal(a, b) for a, b in zip(reply.weights, want.weights))
    assert reply.num_steps == want.num_steps == 4 and reply.history == want.history
    new, delta = client_control_update(start, want.weights, c, zeros, want.num_steps, LR)
    assert all(np.array_equal(a, b) for a, b in zip(state.control, new))
    assert all(np.array_equal(a, b) for a, b in zip(reply.control_delta, delta))


def test_the_step_refuses_scaffold_with_momentum(tiny):
    from fedmnist.model import initial_weights
    from fedmnist.training import ClientTrainer

    x, y = tiny
    start = initial_weights(SEED)
    with pytest.raises(ConfigError, match="without momentum"):
        client_step(ClientTrainer("sgd", LR, 0.9, model_seed=SEED), start, x, y,
                    Instructions(1, control=[np.zeros_like(w) for w in start]), None, epochs=1, batch_size=10, seed=1)


def test_fedmnist_train_with_a_learning_rate_that_diverges_exits_non_zero_and_writes_nothing(
        small_federation, tmp_path, capsys):
    from fedmnist.cli import main

    out = tmp_path / "miembro"
    code = main(["train", "--client", "1", "--data-dir", str(small_federation), "--local-epochs", "1", "--learning-rate", "1e30",
                 "--out", str(out)])

    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code != 0 and len(errors) == 1 and "Traceback" not in err
    assert "client 1: the local training diverged" in errors[0] and "nothing was written" in errors[0]
    assert not out.exists() or not any(out.iterdir())


# --- every mode goes through the one step ------------------------------------------------------


def test_no_mode_keeps_a_copy_of_the_client_logic():
    import fedmnist.flower_app
    import fedmnist.local
    import fedmnist.simulation
    import fedmnist.tasks
    import fedmnist.workers

    for module in (fedmnist.local, fedmnist.simulation, fedmnist.tasks, fedmnist.workers, fedmnist.flower_app):
        source = inspect.getsource(module)
        for copy in ("client_control_update", "clip_client_weights", "all_finite", "correction("):
            assert copy not in source, f"{module.__name__} still calls {copy}"
        # training itself too (the workers' warm-up aside, which only traces the trainer's graphs)
        if module is not fedmnist.workers:
            assert not re.search(r"(?<!client_app)\.train\(", source), f"{module.__name__} still trains by itself"


def test_every_mode_goes_through_client_step(monkeypatch, small_federation, small_mnist, tmp_path):
    from test_flower_app import FakeGrid, _client_node, _train_message

    import fedmnist.client
    import fedmnist.flower_app
    import fedmnist.local
    import fedmnist.tasks
    from fedmnist.data import client_file, common_test_file
    from fedmnist.flower_app import FlowerRunConfig, run_server
    from fedmnist.local import run_local_training
    from fedmnist.model import initial_weights
    from fedmnist.simulation import SimulationConfig, run_simulation
    from fedmnist.training import TrainConfig

    calls: list[tuple[str, int]] = []

    def spy(mode):
        def step(trainer, start, x, y, instructions, state, **kwargs):
            calls.append((mode, instructions.round))
            return fedmnist.client.client_step(trainer, start, x, y, instructions, state, **kwargs)
        return step

    for module in (fedmnist.local, fedmnist.tasks, fedmnist.flower_app):
        monkeypatch.setattr(module, "client_step", spy(module.__name__.split(".")[-1]))

    run_local_training(1, small_federation, tmp_path / "local", TrainConfig(epochs=1, validation_split=0))
    sim = SimulationConfig.create(num_clients=2, rounds=1, local_epochs=1, methods=("fedavg",), seed=SEED,
                                  train_subset=200, test_subset=100)
    run_simulation(sim, out_dir=tmp_path / "sim", progress=False, mnist=small_mnist)
    _train_message(initial_weights(SEED), 1, 0.0)  # task identity
    config = FlowerRunConfig(num_server_rounds=1, local_epochs=1, min_train_nodes=2, seed=SEED,
                             output_dir=str(tmp_path / "flower"), test_file=str(common_test_file(small_federation)))
    run_server(FakeGrid({10 * k: _client_node(client_file(small_federation, k), config) for k in (1, 2)}), config)

    assert calls == [("local", 1), ("tasks", 1), ("tasks", 1), ("flower_app", 1), ("flower_app", 1)]


def test_a_diverged_flower_node_fails_its_round_and_keeps_its_control(small_federation):
    from flwr.app import Context, RecordDict
    from test_flower_app import _train_message

    from fedmnist.data import client_file
    from fedmnist.flower_app import STATE_CONTROL_KEY, FlowerRunConfig, client_app, weights_to_record
    from fedmnist.model import initial_weights

    config = FlowerRunConfig(local_epochs=1, batch_size=32, optimizer="sgd", learning_rate=1e30, momentum=0.0,
                             method="scaffold", seed=SEED)
    start = initial_weights(SEED)
    own = [np.full_like(w, 0.01) for w in start]
    context = Context(run_id=1, node_id=7, node_config={"data-file": str(client_file(small_federation, 2))},
                      state=RecordDict({STATE_CONTROL_KEY: weights_to_record(own)}), run_config=config.to_dict())

    with pytest.raises(DivergedError, match="client 2: the local training diverged"):
        client_app(_train_message(start, 1, 0.0, control=[np.zeros_like(w) for w in start]), context)

    kept = [context.state[STATE_CONTROL_KEY][str(i)].numpy() for i in range(len(own))]
    assert all(np.array_equal(a, b) for a, b in zip(kept, own))
