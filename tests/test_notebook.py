"""Tests of local_training.ipynb: its papermill parameters cell, committed without outputs, and a real
papermill run on the small federation (a Jupyter kernel in a subprocess: marked slow, but it runs by default)."""

import ast
import os
from pathlib import Path

import nbformat
import pytest

from fedmnist.exchange import global_path, load_update, make_global, save_global
from fedmnist.local import output_paths
from fedmnist.model import initial_weights, model_fingerprint
from fedmnist.training import TrainConfig

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "local_training.ipynb"
PARAMETERS = ("CLIENT_ID", "DATA_DIR", "GLOBAL_WEIGHTS", "ROUND", "LOCAL_EPOCHS", "BATCH_SIZE", "OPTIMIZER",
              "LEARNING_RATE", "MOMENTUM", "PROXIMAL_MU", "SCAFFOLD", "SEED", "OUT_DIR", "EPOCHS", "PROX_MU")


@pytest.fixture(scope="module")
def notebook():
    return nbformat.read(NOTEBOOK, as_version=4)


def code_cells(nb):
    return [cell for cell in nb.cells if cell.cell_type == "code"]


def test_first_code_cell_is_the_tagged_parameters_cell(notebook):
    # Prepare
    first = code_cells(notebook)[0]

    # Execute
    assigned = {target.id for node in ast.parse(first.source).body if isinstance(node, ast.Assign)
                for target in node.targets if isinstance(target, ast.Name)}

    # Assert
    assert "parameters" in first.metadata.get("tags", [])
    assert set(PARAMETERS) <= assigned
    tagged = [c for c in notebook.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert tagged == [first], "papermill needs exactly one parameters cell"


def test_parameter_defaults_are_the_course_defaults(notebook):
    # Execute
    namespace = {}
    exec(code_cells(notebook)[0].source, namespace)  # plain assignments only

    # Assert
    assert namespace["GLOBAL_WEIGHTS"] is None and namespace["ROUND"] == 0
    assert namespace["PROXIMAL_MU"] == 0.0 and namespace["SEED"] == 42 and namespace["CLIENT_ID"] >= 1
    assert namespace["EPOCHS"] is None and namespace["PROX_MU"] is None  # deprecated: set only by papermill
    assert namespace["SCAFFOLD"] is False
    member = TrainConfig()  # the member's job: what fedmnist train does by default (Adam, lr 1e-3, E = 2, B = 32)
    assert (namespace["LOCAL_EPOCHS"], namespace["BATCH_SIZE"]) == (member.epochs, member.batch_size)
    assert (namespace["OPTIMIZER"], namespace["LEARNING_RATE"], namespace["MOMENTUM"]) == (
        member.optimizer, member.learning_rate, member.momentum)


def test_parameters_cell_is_plain_assignments_of_constants(notebook):
    # Execute
    body = ast.parse(code_cells(notebook)[0].source).body

    # Assert: no logic in the cell papermill rewrites
    for node in body:
        assert isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant), ast.unparse(node)


def test_notebook_is_committed_without_outputs(notebook):
    for cell in code_cells(notebook):
        assert cell.get("outputs", []) == [], cell.source[:60]
        assert cell.get("execution_count") is None, cell.source[:60]


def test_every_code_cell_is_valid_python(notebook):
    for cell in code_cells(notebook):
        ast.parse(cell.source)


@pytest.mark.slow
def test_papermill_run_writes_the_four_files(tmp_path, small_federation, monkeypatch):
    # Prepare: the kernel imports fedmnist from the repository and trains from round 0's file
    import papermill

    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "3")
    start = make_global(initial_weights(), 0, "init", 42)
    start_file = global_path(tmp_path / "pesos", 0)
    save_global(start_file, start)
    out_dir = tmp_path / "salida"
    executed = tmp_path / "salida_cliente_2.ipynb"

    # Execute
    papermill.execute_notebook(
        str(NOTEBOOK), str(executed), kernel_name="python3", cwd=str(REPO), progress_bar=False,
        parameters={"CLIENT_ID": 2, "DATA_DIR": str(small_federation), "GLOBAL_WEIGHTS": str(start_file),
                    "ROUND": 0, "LOCAL_EPOCHS": 1, "BATCH_SIZE": 32, "OPTIMIZER": "sgd", "LEARNING_RATE": 0.05,
                    "MOMENTUM": 0.9, "PROXIMAL_MU": 0.01, "SEED": 42, "OUT_DIR": str(out_dir)},
    )

    # Assert
    expected = output_paths(out_dir, 2)
    assert sorted(p.name for p in out_dir.iterdir()) == sorted(p.name for p in expected.values())
    update = load_update(expected["update"])
    assert update.client_id == 2 and update.round == 0
    assert update.start_sha256 == start.sha256
    assert update.fingerprint == model_fingerprint()
    assert update.mu == 0.01 and update.epochs == 1 and update.batch_size == 32
    assert (update.metrics["optimizer"], update.metrics["learning_rate"]) == ("sgd", 0.05)  # the aggressive setting
    result = nbformat.read(executed, as_version=4)
    printed = "".join(out.get("text", "") for cell in code_cells(result) for out in cell.get("outputs", []))
    assert "pesos_cliente_2.pkl" in printed
    shown = "".join(out.get("data", {}).get("text/plain", "") for cell in code_cells(result) for out in cell.outputs)
    assert "optimizer='sgd', learning_rate=0.05, momentum=0.9, mu=0.01" in shown  # the config cell's repr
    assert not any(out.get("output_type") == "error" for cell in code_cells(result) for out in cell.outputs)


@pytest.mark.slow
def test_papermill_run_with_scaffold_writes_the_members_control_file(small_federation, tmp_path, monkeypatch):
    import papermill

    from fedmnist.exchange import control_path, load_control

    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "3")
    out_dir = tmp_path / "salida"

    papermill.execute_notebook(
        str(NOTEBOOK), str(tmp_path / "salida.ipynb"), kernel_name="python3", cwd=str(REPO), progress_bar=False,
        parameters={"CLIENT_ID": 1, "DATA_DIR": str(small_federation), "EPOCHS": 1, "OPTIMIZER": "sgd",
                    "LEARNING_RATE": 0.05, "MOMENTUM": 0.0, "SCAFFOLD": True, "OUT_DIR": str(out_dir)},
    )  # EPOCHS: the deprecated name of LOCAL_EPOCHS, still honoured

    update = load_update(output_paths(out_dir, 1)["update"])
    assert update.control_delta is not None and update.epochs == 1
    assert load_control(control_path(out_dir, 1), 1).round == 1
