"""The three modes on one federation: the file flow's commands, ``fedmnist simulate`` and Flower give the
same round-1 FedAvg weights (the issue's example, on a small MNIST file so it runs in seconds).

Flower's ServerApp is driven here on an in-process Grid whose nodes run the real ClientApp; the
loopback deployment (real SuperLink and SuperNodes) is compared with the other two modes in
``tests/test_flower_app.py::test_two_supernodes_train_two_rounds_like_the_simulation``.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import stratified_indices

SEED = 7


@pytest.fixture(scope="module")
def small_mnist_file(tmp_path_factory, raw_mnist):
    """An npz in the keras layout: 900 training and 200 test images of the real MNIST."""
    train = stratified_indices(raw_mnist.y_train, 90)
    test = stratified_indices(raw_mnist.y_test, 20)
    path = tmp_path_factory.mktemp("mnist") / "mnist_pequeno.npz"
    np.savez(path, x_train=raw_mnist.x_train[train], y_train=raw_mnist.y_train[train],
             x_test=raw_mnist.x_test[test], y_test=raw_mnist.y_test[test])
    return path


def test_file_flow_simulation_and_flower_give_the_same_round_one_weights(small_mnist_file, tmp_path):
    from test_flower_app import FakeGrid, _client_node, _train_message

    from fedmnist.cli import main, main_aggregation, main_split
    from fedmnist.data import client_file, common_test_file
    from fedmnist.exchange import load_global
    from fedmnist.flower_app import FlowerRunConfig, run_server
    from fedmnist.model import initial_weights

    data, pesos, glob, sim = (tmp_path / d for d in ("datos", "pesos", "global", "sim"))
    common = ["--data", str(small_mnist_file)]
    training = ["--local-epochs", "1", "--batch-size", "32", "--optimizer", "sgd", "--learning-rate", "0.05", "--momentum", "0.9"]

    # the file flow, command by command
    assert main_split(["--clients", "3", "--partition", "iid", "--seed", str(SEED), *common, "--out", str(data)]) == 0
    assert main_aggregation(["--init", "--seed", str(SEED), "--out", str(pesos)]) == 0
    for k in (1, 2, 3):
        assert main(["train", "--client", str(k), "--data-dir", str(data), "--global-weights",
                     str(pesos / "pesos_globales_ronda_0.pkl"), *training, "--seed", str(SEED),
                     "--validation-split", "0", "--out", str(pesos)]) == 0
    assert main_aggregation(["--weights-dir", str(pesos), "--data-dir", str(data), "--methods", "fedavg",
                             "--out", str(glob)]) == 0
    file_flow = load_global(glob / "pesos_globales_ronda_1.pkl").weights

    # the simulation
    assert main(["simulate", "--clients", "3", "--fraction-train", "1", "--rounds", "1", "--local-epochs", "1",
                 "--batch-size", "32", "--optimizer", "sgd", "--learning-rate", "0.05", "--momentum", "0.9", "--seed",
                 str(SEED), "--methods", "fedavg", "--quiet", *common, "--out", str(sim)]) == 0
    simulated = load_global(sim / "pesos_globales_fedavg.pkl").weights

    # Flower: the ServerApp's loop, the ClientApp on each node (node ids sort like the client ids)
    _train_message(initial_weights(SEED), 1, 0.0)
    config = FlowerRunConfig(num_server_rounds=1, local_epochs=1, batch_size=32, optimizer="sgd",
                             learning_rate=0.05, momentum=0.9, method="fedavg", min_train_nodes=3, seed=SEED,
                             output_dir=str(tmp_path / "flower"), test_file=str(common_test_file(data)))
    nodes = {10 * k: _client_node(client_file(data, k), config) for k in (1, 2, 3)}
    run_server(FakeGrid(nodes), config)
    flower = load_global(tmp_path / "flower" / "pesos_globales_ronda_1.pkl").weights

    for a, b, c in zip(file_flow, simulated, flower):
        assert np.max(np.abs(a - b)) <= 1e-6
        assert np.max(np.abs(a - c)) <= 1e-6
    assert not all(np.array_equal(a, b) for a, b in zip(file_flow, initial_weights(SEED)))


@pytest.mark.parametrize("settings", [
    {"method": "fedadam", "server-lr": 0.05},
    {"method": "fedavgm"},
    {"method": "fedavg", "dp-noise": 0.5, "dp-clip": 0.3, "dp-side": "client", "dp-seeded-noise": True},
])
def test_flower_and_the_simulation_agree_on_stateful_and_private_methods(settings, small_mnist,
                                                                         small_federation, tmp_path):
    from test_flower_app import FakeGrid, _client_node, _train_message

    from fedmnist.data import client_file, common_test_file
    from fedmnist.exchange import load_global
    from fedmnist.flower_app import FlowerRunConfig, run_server
    from fedmnist.model import initial_weights
    from fedmnist.simulation import SimulationConfig, run_simulation

    flat = {"local-epochs": 1, "batch-size": 32, "optimizer": "adam", "learning-rate": 1e-3, "momentum": 0.0,
            "num-server-rounds": 2, "min-train-nodes": 3, "seed": 42, "output-dir": str(tmp_path / "flower"),
            "test-file": str(common_test_file(small_federation)), **settings}
    config = FlowerRunConfig.from_run_config(flat)
    _train_message(initial_weights(42), 1, 0.0)
    nodes = {10 * k: _client_node(client_file(small_federation, k), config) for k in (1, 2, 3)}
    history = run_server(FakeGrid(nodes), config)

    sim = SimulationConfig.create(
        num_clients=3, fraction=1.0, rounds=2, local_epochs=1, batch_size=32, optimizer="adam",
        learning_rate=1e-3, momentum=0.0, methods=(settings["method"],), seed=42,
        server_lr=settings.get("server-lr"),
        **({"dp_noise": settings["dp-noise"], "dp_clip": settings["dp-clip"], "dp_side": settings["dp-side"]}
           if "dp-noise" in settings else {}),
    )
    result = run_simulation(sim, out_dir=tmp_path / "sim", progress=False, mnist=small_mnist)
    for round_ in (1, 2):
        flower = load_global(tmp_path / "flower" / f"pesos_globales_ronda_{round_}.pkl").weights
        if round_ == 2:
            for a, b in zip(flower, result.final_weights[settings["method"]]):
                assert np.max(np.abs(a - b)) <= 1e-6
    assert [h.epsilon for h in history] == [r.epsilon for r in result.metrics[settings["method"]]]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["fedadam", "dp"])
def test_the_manual_flow_carries_server_state_across_rounds_like_the_simulation(method, small_mnist_file,
                                                                                tmp_path):
    from fedmnist.cli import main, main_aggregation, main_split
    from fedmnist.exchange import load_global

    data, pesos = tmp_path / "datos", tmp_path / "pesos"
    common = ["--data", str(small_mnist_file)]
    training = ["--local-epochs", "1", "--batch-size", "32", "--optimizer", "sgd", "--learning-rate", "0.05", "--momentum", "0.9"]
    server = (["--methods", "fedadam", "--server-lr", "0.05"] if method == "fedadam"
              else ["--methods", "fedavg", "--dp-noise", "0.5", "--dp-clip", "0.4", "--dp-side", "client",
                    "--dp-seeded-noise"])
    clip = ["--dp-clip", "0.4"] if method == "dp" else []
    assert main_split(["--clients", "3", "--partition", "iid", "--seed", str(SEED), *common, "--out", str(data)]) == 0
    assert main_aggregation(["--init", "--seed", str(SEED), "--out", str(pesos / "ronda_0")]) == 0
    for round_ in (0, 1):
        start = pesos / f"ronda_{round_}" / f"pesos_globales_ronda_{round_}.pkl"
        members = pesos / f"miembros_{round_}"
        for k in (1, 2, 3):
            assert main(["train", "--client", str(k), "--data-dir", str(data), "--global-weights", str(start),
                         *training, "--seed", str(SEED), "--validation-split", "0", *clip,
                         "--out", str(members)]) == 0
        assert main_aggregation(["--weights-dir", str(members), "--data-dir", str(data), "--global-weights",
                                 str(start), *server, "--out", str(pesos / f"ronda_{round_ + 1}")]) == 0
    manual = load_global(pesos / "ronda_2" / "pesos_globales_ronda_2.pkl")
    assert manual.state is not None and manual.round == 2

    flags = ["--server-lr", "0.05"] if method == "fedadam" else ["--dp-noise", "0.5", "--dp-clip", "0.4",
                                                                 "--dp-side", "client"]
    name = "fedadam" if method == "fedadam" else "fedavg"
    assert main(["simulate", "--clients", "3", "--fraction-train", "1", "--rounds", "2", "--local-epochs", "1",
                 "--batch-size", "32", "--optimizer", "sgd", "--learning-rate", "0.05", "--momentum", "0.9", "--seed",
                 str(SEED), "--methods", name, *flags, "--quiet", *common, "--out", str(tmp_path / "sim")]) == 0
    simulated = load_global(tmp_path / "sim" / f"pesos_globales_{name}.pkl").weights
    for a, b in zip(manual.weights, simulated):
        assert np.max(np.abs(a - b)) <= 1e-6


@pytest.mark.slow
def test_the_manual_flow_runs_scaffold_with_member_control_files_like_the_simulation(small_mnist_file, tmp_path):
    from fedmnist.cli import main, main_aggregation, main_split
    from fedmnist.exchange import control_path, load_control, load_global, load_update

    data, pesos, members = tmp_path / "datos", tmp_path / "pesos", tmp_path / "miembros"
    common = ["--data", str(small_mnist_file)]
    training = ["--local-epochs", "1", "--batch-size", "32", "--optimizer", "sgd", "--learning-rate", "0.05", "--momentum", "0"]
    assert main_split(["--clients", "3", "--partition", "shards", "--seed", str(SEED), *common, "--out", str(data)]) == 0
    assert main_aggregation(["--init", "--seed", str(SEED), "--out", str(pesos / "ronda_0")]) == 0
    for round_ in (0, 1):
        start = pesos / f"ronda_{round_}" / f"pesos_globales_ronda_{round_}.pkl"
        for k in (1, 2, 3):  # round 0 asks for SCAFFOLD; round 1's global file switches it on by itself
            assert main(["train", "--client", str(k), "--data-dir", str(data), "--global-weights", str(start),
                         *training, "--seed", str(SEED), "--validation-split", "0",
                         *(["--scaffold"] if round_ == 0 else []), "--out", str(members)]) == 0
            assert load_control(control_path(members, k), k).round == round_ + 1
        if round_ == 1:  # a member who retrains the round starts again from the same c_i: same update
            before = load_update(members / "pesos_cliente_2.pkl")
            assert main(["train", "--client", "2", "--data-dir", str(data), "--global-weights", str(start),
                         *training, "--seed", str(SEED), "--validation-split", "0", "--out", str(members)]) == 0
            again = load_update(members / "pesos_cliente_2.pkl")
            assert all(np.array_equal(a, b) for a, b in zip(before.control_delta, again.control_delta))
        assert main_aggregation(["--weights-dir", str(members), "--data-dir", str(data), "--global-weights",
                                 str(start), "--methods", "scaffold", "--out", str(pesos / f"ronda_{round_ + 1}")]) == 0
    manual = load_global(pesos / "ronda_2" / "pesos_globales_ronda_2.pkl")
    assert manual.method == "scaffold" and set(manual.state) == {"control"}

    assert main(["simulate", "--clients", "3", "--fraction-train", "1", "--rounds", "2", "--local-epochs", "1",
                 "--batch-size", "32", "--optimizer", "sgd", "--learning-rate", "0.05", "--momentum", "0", "--seed",
                 str(SEED), "--partition", "shards", "--methods", "scaffold", "--quiet", *common,
                 "--out", str(tmp_path / "sim")]) == 0
    simulated = load_global(tmp_path / "sim" / "pesos_globales_scaffold.pkl").weights
    for a, b in zip(manual.weights, simulated):
        assert np.max(np.abs(a - b)) <= 1e-6


@pytest.fixture(scope="module")
def scaffold_member(small_mnist_file, tmp_path_factory):
    """A split federation and a member directory after one SCAFFOLD round of client 1."""
    from fedmnist.cli import main_split

    root = tmp_path_factory.mktemp("scaffold_member")
    data, members = root / "datos", root / "miembros"
    assert main_split(["--clients", "3", "--partition", "iid", "--seed", str(SEED), "--data", str(small_mnist_file),
                       "--out", str(data)]) == 0
    return data, members


@pytest.mark.parametrize("spoil, fragment", [
    ("other_client", "holds the control variate of client 2"),
    ("nan", "NaN or infinite"),
    ("update", "not a fedmnist SCAFFOLD control file"),
    ("later_round", "later than this round"),
])
def test_bad_control_files_are_refused_before_training(scaffold_member, tmp_path, capsys, spoil, fragment):
    import shutil

    from fedmnist.cli import main
    from fedmnist.exchange import ClientControl, control_bytes, control_path, update_path
    from fedmnist.model import initial_weights

    data, _ = scaffold_member
    out = tmp_path / "miembro"
    out.mkdir()
    zeros = [np.zeros_like(w) for w in initial_weights(SEED)]
    path = control_path(out, 1)
    if spoil == "update":
        args = ["train", "--client", "1", "--data-dir", str(data), "--local-epochs", "1", "--optimizer", "sgd",
                "--momentum", "0", "--validation-split", "0", "--out", str(tmp_path / "otro")]
        assert main(args) == 0
        shutil.copy(update_path(tmp_path / "otro", 1), path)
    else:
        client, round_, control = 1, 1, zeros
        if spoil == "other_client":
            client = 2
        if spoil == "nan":
            control = [z.copy() for z in zeros]
            control[0][...] = np.nan
        if spoil == "later_round":
            round_ = 5
        path.write_bytes(control_bytes(ClientControl(client, round_, control, zeros)))
    before = sorted(p.name for p in out.iterdir())

    code = main(["train", "--client", "1", "--data-dir", str(data), "--local-epochs", "1", "--optimizer", "sgd",
                 "--momentum", "0", "--validation-split", "0", "--scaffold", "--out", str(out)])

    assert code != 0
    err = capsys.readouterr().err
    assert fragment in err and str(path) in err
    assert sorted(p.name for p in out.iterdir()) == before  # nothing written


def test_scaffold_member_needs_plain_sgd(scaffold_member, tmp_path, capsys):
    from fedmnist.cli import main

    data, _ = scaffold_member
    code = main(["train", "--client", "1", "--data-dir", str(data), "--local-epochs", "1", "--optimizer", "sgd",
                 "--momentum", "0.9", "--scaffold", "--out", str(tmp_path)])

    assert code != 0 and "without momentum" in capsys.readouterr().err


def test_a_diverged_scaffold_member_writes_nothing(scaffold_member, tmp_path, capsys):
    from fedmnist.cli import main

    data, _ = scaffold_member
    out = tmp_path / "miembro"
    code = main(["train", "--client", "1", "--data-dir", str(data), "--local-epochs", "1", "--optimizer", "sgd",
                 "--momentum", "0", "--learning-rate", "1e30", "--validation-split", "0", "--scaffold", "--out", str(out)])

    assert code != 0 and "diverged" in capsys.readouterr().err
    assert not out.exists() or not any(out.iterdir())


def test_scaffold_switched_on_by_the_round_file_names_it_when_the_optimizer_does_not_fit(scaffold_member, tmp_path,
                                                                                      capsys):
    from fedmnist.cli import main
    from fedmnist.exchange import global_path, make_global, save_global
    from fedmnist.model import initial_weights

    data, _ = scaffold_member
    start = make_global(initial_weights(SEED), 1, "scaffold", SEED, state={"control": [np.zeros_like(w) for w in
                                                                                    initial_weights(SEED)]})
    save_global(global_path(tmp_path, 1), start)
    code = main(["train", "--client", "1", "--data-dir", str(data), "--global-weights", str(global_path(tmp_path, 1)),
                 "--local-epochs", "1", "--out", str(tmp_path / "m")])

    err = capsys.readouterr().err
    assert code != 0 and "pesos_globales_ronda_1.pkl comes from a SCAFFOLD aggregation" in err and "--optimizer sgd" in err


# --- SCAFFOLD and client-side DP through the one client step, in every mode ------------------------

CLIENT_STEP_CASES = {
    # SCAFFOLD on a non-IID split: plain SGD, the members' c_i in control files, the nodes' in context.state
    "scaffold": {"partition": "shards", "momentum": 0.0, "method": "scaffold", "member": [], "first": ["--scaffold"],
                 "server": ["--methods", "scaffold"], "simulation": {}, "flower": {}},
    # client-side DP-FedAvg: every client clips its update to S before it leaves, seeded noise on the server
    "client-dp": {"partition": "iid", "momentum": 0.9, "method": "fedavg", "member": ["--dp-clip", "0.4"], "first": [],
                  "server": ["--methods", "fedavg", "--dp-noise", "0.5", "--dp-clip", "0.4", "--dp-side", "client",
                             "--dp-seeded-noise"],
                  "simulation": {"dp_noise": 0.5, "dp_clip": 0.4, "dp_side": "client"},
                  "flower": {"dp-noise": 0.5, "dp-clip": 0.4, "dp-side": "client", "dp-seeded-noise": True}},
}


def run_file_flow(name: str, mnist_file, root) -> list[np.ndarray]:
    """Case ``name``'s two rounds by the file flow (``fedmnist train`` per member, then
    ``global_aggregation``) under ``root``: the final global weights."""
    from pathlib import Path

    from fedmnist.cli import main, main_aggregation, main_split
    from fedmnist.exchange import load_global

    case, root = CLIENT_STEP_CASES[name], Path(root)
    data, pesos, members = root / "datos", root / "pesos", root / "miembros"
    training = ["--local-epochs", "1", "--batch-size", "32", "--optimizer", "sgd", "--learning-rate", "0.05",
                "--momentum", str(case["momentum"]), "--seed", str(SEED), "--validation-split", "0"]
    assert main_split(["--clients", "3", "--partition", case["partition"], "--seed", str(SEED),
                       "--data", str(mnist_file), "--out", str(data)]) == 0
    assert main_aggregation(["--init", "--seed", str(SEED), "--out", str(pesos / "ronda_0")]) == 0
    for round_ in (0, 1):
        start = pesos / f"ronda_{round_}" / f"pesos_globales_ronda_{round_}.pkl"
        for k in (1, 2, 3):
            assert main(["train", "--client", str(k), "--data-dir", str(data), "--global-weights", str(start),
                         *training, *case["member"], *(case["first"] if round_ == 0 else []),
                         "--out", str(members)]) == 0  # SCAFFOLD: each member's control file stays there
        assert main_aggregation(["--weights-dir", str(members), "--data-dir", str(data),
                                 "--global-weights", str(start), *case["server"],
                                 "--out", str(pesos / f"ronda_{round_ + 1}")]) == 0
    final = load_global(pesos / "ronda_2" / "pesos_globales_ronda_2.pkl")
    assert final.round == 2 and final.method == case["method"]
    return final.weights


PINNED_FILE_FLOW = """
import sys
sys.path.insert(0, {tests!r})
from fedmnist.workers import pin_threads
pin_threads(1)  # the worker processes' thread setting, before TensorFlow runs anything
import numpy as np
import test_modes
np.savez({out!r}, *test_modes.run_file_flow({name!r}, {mnist!r}, {root!r}))
"""


def pinned_file_flow(name: str, mnist_file, root) -> list[np.ndarray]:
    """``run_file_flow`` in a fresh process whose TensorFlow runs on one thread, as every worker does: the
    file flow a ``--workers`` simulation reproduces (TensorFlow's sums depend on its thread count)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    out = Path(root) / "pinned.npz"
    script = PINNED_FILE_FLOW.format(tests=str(Path(__file__).parent), out=str(out), name=name,
                                     mnist=str(mnist_file), root=str(Path(root) / "pinned"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TF_NUM_", "OMP_NUM_"))}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=900,
                          check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    with np.load(out) as npz:
        return [npz[f"arr_{i}"] for i in range(len(npz.files))]


@pytest.fixture(scope="module", params=sorted(CLIENT_STEP_CASES))
def file_flow_two_rounds(request, small_mnist_file, tmp_path_factory):
    """The case's name, its file flow's federation directory and final global weights."""
    root = tmp_path_factory.mktemp(f"file_flow_{request.param}")
    return request.param, root / "datos", run_file_flow(request.param, small_mnist_file, root)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["simulation", "simulation-workers-2", "flower"])
def test_scaffold_and_client_dp_same_weights_in_every_mode(mode, file_flow_two_rounds, small_mnist_file, tmp_path):
    """SCAFFOLD and client-side DP clipping over two rounds: the file flow, the simulation (in process and
    with two worker processes) and Flower (its ServerApp's loop, the real ClientApp on every node) all run
    ``fedmnist.client.client_step`` and end with the same global weights. The worker processes run
    TensorFlow on one thread each, so their run is compared with the file flow on one thread."""
    from test_flower_app import FakeGrid, _client_node, _train_message

    from fedmnist.data import client_file, common_test_file
    from fedmnist.exchange import load_global
    from fedmnist.flower_app import FlowerRunConfig, run_server
    from fedmnist.model import initial_weights
    from fedmnist.simulation import SimulationConfig, run_simulation

    name, data, file_flow = file_flow_two_rounds
    case = CLIENT_STEP_CASES[name]
    method = case["method"]
    if mode == "flower":
        _train_message(initial_weights(SEED), 1, 0.0)  # task identity
        config = FlowerRunConfig.from_run_config({
            "num-server-rounds": 2, "local-epochs": 1, "batch-size": 32, "optimizer": "sgd", "learning-rate": 0.05,
            "momentum": case["momentum"], "method": method, "min-train-nodes": 3, "seed": SEED,
            "output-dir": str(tmp_path / "flower"), "test-file": str(common_test_file(data)), **case["flower"]})
        nodes = {10 * k: _client_node(client_file(data, k), config) for k in (1, 2, 3)}
        history = run_server(FakeGrid(nodes), config)
        assert [h.replied_clients for h in history] == [[1, 2, 3]] * 2
        final = load_global(tmp_path / "flower" / "pesos_globales_ronda_2.pkl").weights
    else:
        config = SimulationConfig.create(
            num_clients=3, fraction=1.0, rounds=2, local_epochs=1, batch_size=32, optimizer="sgd",
            learning_rate=0.05, momentum=case["momentum"], partition=case["partition"], methods=(method,),
            seed=SEED, **case["simulation"])
        workers = 2 if mode == "simulation-workers-2" else None
        result = run_simulation(config, small_mnist_file, tmp_path / "sim", progress=False, workers=workers)
        assert [r.replied_clients for r in result.metrics[method]] == [[1, 2, 3]] * 2
        final = result.final_weights[method]
        if workers:
            file_flow = pinned_file_flow(name, small_mnist_file, tmp_path)

    assert max(float(np.max(np.abs(a - b))) for a, b in zip(file_flow, final)) <= 1e-6
    assert not all(np.array_equal(a, b) for a, b in zip(final, initial_weights(SEED)))
