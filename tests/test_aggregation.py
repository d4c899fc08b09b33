"""Tests for fedmnist.aggregation: refusals that name the file and write nothing, hand-checked rules,
the FedProx note, --next-from, and the manual course flow end to end (split, train 3 clients, aggregate)."""

import csv
import json
import os
import pickle
import shutil

import keras
import numpy as np
import pytest

from fedmnist.aggregation import (
    AggregationParams,
    aggregate_directory,
    aggregate_updates,
    fill_missing_counts,
    load_updates,
    run_aggregation,
    validate_updates,
    write_outputs,
)
from fedmnist.data import Mnist, load_partition
from fedmnist.errors import DataError, FedMnistError, UpdateFileError, ValidationError
from fedmnist.exchange import (
    ClientUpdate,
    global_path,
    load_global,
    load_update,
    make_global,
    save_global,
    save_update,
    update_path,
)
from fedmnist.local import run_local_training
from fedmnist.model import initial_weights, model_fingerprint, weight_spec, weights_sha256
from fedmnist.partition import MANIFEST_FILE, PartitionConfig, write_federation
from fedmnist.training import ClientTrainer, TrainConfig

METHODS = ("fedavg", "fedprox", "fedmed")
COUNTS = {1: 50, 2: 120, 3: 30}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
DENSE = next(i for i, (_, shape, _) in enumerate(weight_spec()) if len(shape) == 2)


@pytest.fixture(scope="module")
def start():
    """Round-0 global weights (build_model's default seed)."""
    return make_global(initial_weights(), 0, "init")


@pytest.fixture(scope="module")
def evaluator():
    return ClientTrainer()


@pytest.fixture(scope="module")
def test_set(small_federation):
    return load_partition(small_federation / "test.npz")


def perturbed(weights, seed, scale=0.02):
    rng = np.random.default_rng(seed)
    return [(w + scale * rng.standard_normal(w.shape)).astype(np.float32) for w in weights]


def handmade_updates(start, directory, counts=COUNTS, mu=0.0, seed=0):
    """Small perturbations of the start weights, as if each client had trained (no training)."""
    return [
        ClientUpdate(client_id=cid, round=0, num_examples=n, weights=perturbed(start.weights, seed + cid),
                     start_sha256=start.sha256, fingerprint=model_fingerprint(), mu=mu, epochs=1,
                     batch_size=32, path=update_path(directory, cid))
        for cid, n in counts.items()
    ]


def save_all(updates):
    for u in updates:
        save_update(u.path, u)


def weighted_mean_by_hand(weight_lists, counts):
    total = float(sum(counts))
    return [sum(np.float64(ws[i]) * n for ws, n in zip(weight_lists, counts)) / total
            for i in range(len(weight_lists[0]))]


def assert_close_weights(actual, expected, rtol=1e-6):
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        assert a.shape == e.shape
        np.testing.assert_allclose(a, e, rtol=rtol, atol=1e-7)


class RunsCommand:
    """Unpickling this calls os.system: what a malicious teammate's .pkl could do."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


# --- validation: every refusal names the file and writes nothing -----------------------------------


def spoil_fingerprint(updates):
    updates[1].fingerprint = "0123456789abcdef"


def spoil_shape(updates):
    updates[1].weights[DENSE] = np.ascontiguousarray(updates[1].weights[DENSE].T)


def spoil_nan(updates):
    updates[2].weights[0][0, 0, 0, 0] = np.nan


def spoil_duplicate(updates):
    updates[2].client_id = 1


def spoil_rounds(updates):
    updates[1].round = 1


def spoil_starts(updates):
    updates[2].start_sha256 = weights_sha256(initial_weights(7))


SPOILERS = [
    pytest.param(spoil_fingerprint, ["pesos_cliente_2.pkl", "fingerprint 0123456789abcdef"], id="fingerprint"),
    pytest.param(spoil_shape, ["pesos_cliente_2.pkl", "shape"], id="shape"),
    pytest.param(spoil_nan, ["pesos_cliente_3.pkl", "NaN"], id="nan"),
    pytest.param(spoil_duplicate, ["pesos_cliente_3.pkl", "pesos_cliente_1.pkl", "appears twice"], id="duplicate"),
    pytest.param(spoil_rounds, ["pesos_cliente_2.pkl: round 1", "different rounds"], id="rounds"),
    pytest.param(spoil_starts, ["pesos_cliente_3.pkl", "chance-level", "same pesos_globales_ronda_R.pkl"],
                 id="starts"),
]


@pytest.mark.parametrize(("spoil", "fragments"), SPOILERS)
def test_validate_updates_refuses_and_names_the_file(spoil, fragments, start, tmp_path):
    # Prepare
    updates = handmade_updates(start, tmp_path)
    validate_updates(updates)  # the unspoiled set is fine
    spoil(updates)

    # Execute / Assert
    with pytest.raises(ValidationError) as info:
        validate_updates(updates)
    for fragment in fragments:
        assert fragment in str(info.value)


@pytest.mark.parametrize(("spoil", "fragments"), SPOILERS)
def test_validate_updates_without_files_names_the_client(spoil, fragments, start, tmp_path):
    # Prepare: in-memory updates (as the simulation and experiments make them) have no path
    updates = handmade_updates(start, tmp_path)
    for update in updates:
        update.path = None
    spoil(updates)

    # Execute / Assert: a ValidationError that does not say "None" where a file name would go
    with pytest.raises(ValidationError) as info:
        validate_updates(updates)
    assert "None" not in str(info.value)


@pytest.mark.parametrize(("spoil", "fragments"), SPOILERS)
def test_aggregate_directory_refuses_and_writes_nothing(spoil, fragments, start, tmp_path, small_federation):
    # Prepare
    weights_dir, out_dir = tmp_path / "pesos", tmp_path / "global"
    updates = handmade_updates(start, weights_dir)
    spoil(updates)
    save_all(updates)

    # Execute / Assert
    with pytest.raises(ValidationError) as info:
        aggregate_directory(weights_dir, small_federation, out_dir, METHODS)
    for fragment in fragments:
        assert fragment in str(info.value)
    assert not out_dir.exists()


def test_malicious_pickle_among_the_updates_is_refused_unrun(start, tmp_path, small_federation):
    # Prepare
    weights_dir, out_dir, marker = tmp_path / "pesos", tmp_path / "global", tmp_path / "pwned"
    save_all(handmade_updates(start, weights_dir))
    update_path(weights_dir, 2).write_bytes(pickle.dumps(RunsCommand(f"touch {marker}")))

    # Execute / Assert
    with pytest.raises(UpdateFileError) as info:
        aggregate_directory(weights_dir, small_federation, out_dir, METHODS)
    assert "pesos_cliente_2.pkl" in str(info.value)
    assert "refusing to load" in str(info.value)
    assert not marker.exists(), "the pickle's code ran"
    assert not out_dir.exists()


def test_truncated_update_is_refused(start, tmp_path, small_federation):
    # Prepare
    weights_dir, out_dir = tmp_path / "pesos", tmp_path / "global"
    save_all(handmade_updates(start, weights_dir))
    path = update_path(weights_dir, 3)
    path.write_bytes(path.read_bytes()[:1000])

    # Execute / Assert
    with pytest.raises(UpdateFileError, match=r"pesos_cliente_3\.pkl"):
        aggregate_directory(weights_dir, small_federation, out_dir, METHODS)
    assert not out_dir.exists()


@pytest.mark.parametrize("make_dir", [True, False], ids=["empty", "missing"])
def test_empty_or_missing_weights_dir(make_dir, tmp_path, small_federation):
    # Prepare
    weights_dir, out_dir = tmp_path / "pesos", tmp_path / "global"
    if make_dir:
        weights_dir.mkdir()
        (weights_dir / "notas.txt").write_text("no updates here")

    # Execute / Assert
    with pytest.raises(ValidationError) as info:
        aggregate_directory(weights_dir, small_federation, out_dir, METHODS)
    assert str(weights_dir) in str(info.value)
    assert ("no pesos_cliente_N.pkl" if make_dir else "not found") in str(info.value)
    assert not out_dir.exists()


def test_requested_round_must_match(start, tmp_path, small_federation):
    # Prepare
    weights_dir, out_dir = tmp_path / "pesos", tmp_path / "global"
    save_all(handmade_updates(start, weights_dir))

    # Execute / Assert
    with pytest.raises(ValidationError, match="round 1 was requested"):
        aggregate_directory(weights_dir, small_federation, out_dir, METHODS, expected_round=1)
    assert not out_dir.exists()


def test_missing_common_test_set(start, tmp_path):
    # Prepare
    weights_dir, data_dir, out_dir = tmp_path / "pesos", tmp_path / "datos", tmp_path / "global"
    data_dir.mkdir()
    save_all(handmade_updates(start, weights_dir))

    # Execute / Assert
    with pytest.raises(DataError, match=r"test\.npz"):
        aggregate_directory(weights_dir, data_dir, out_dir, METHODS)
    assert not out_dir.exists()


def test_prox_updates_from_another_start_are_refused(start, tmp_path, small_federation):
    # Prepare
    weights_dir, prox_dir, out_dir = tmp_path / "pesos", tmp_path / "pesos_fedprox", tmp_path / "global"
    save_all(handmade_updates(start, weights_dir))
    other = make_global(initial_weights(7), 0, "init", 7)
    save_all(handmade_updates(other, prox_dir, mu=0.01))

    # Execute / Assert
    with pytest.raises(ValidationError, match="FedProx updates started from other global weights"):
        aggregate_directory(weights_dir, small_federation, out_dir, METHODS, prox_dir=prox_dir)
    assert not out_dir.exists()


@pytest.mark.parametrize(
    ("methods", "next_from", "fragment"),
    [
        (("fedavg", "fedmed"), "fedprox", "--next-from fedprox is not among the methods"),
        (("fedavg", "nosuchrule"), None, "unknown method(s) nosuchrule"),
        ((), None, "no aggregation method"),
    ],
)
def test_bad_methods_or_next_from(methods, next_from, fragment, start, tmp_path, small_federation):
    # Prepare
    weights_dir, out_dir = tmp_path / "pesos", tmp_path / "global"
    save_all(handmade_updates(start, weights_dir))

    # Execute / Assert
    with pytest.raises(ValidationError) as info:
        aggregate_directory(weights_dir, small_federation, out_dir, methods, next_from=next_from)
    assert fragment in str(info.value)
    assert not out_dir.exists()


# --- bare lists of weights (the original notebook style) -------------------------------------------


@pytest.fixture
def bare_federation(tmp_path, start, small_federation):
    """A weights dir of bare pickled get_weights() lists and a data dir whose manifest has 50/120/30."""
    weights_dir, data_dir = tmp_path / "pesos", tmp_path / "datos"
    weights_dir.mkdir()
    data_dir.mkdir()
    shutil.copy(small_federation / "test.npz", data_dir / "test.npz")
    manifest = {"format": "fedmnist-partition", "version": 1,
                "clients": [{"client_id": cid, "num_examples": n} for cid, n in COUNTS.items()]}
    (data_dir / MANIFEST_FILE).write_text(json.dumps(manifest))
    weights = {cid: perturbed(start.weights, 10 + cid) for cid in COUNTS}
    for cid, ws in weights.items():
        update_path(weights_dir, cid).write_bytes(pickle.dumps(ws))
    return weights_dir, data_dir, weights


def test_bare_updates_get_their_counts_from_the_manifest(bare_federation):
    # Prepare
    weights_dir, data_dir, weights = bare_federation

    # Execute
    updates = load_updates(weights_dir)
    notes = fill_missing_counts(updates, data_dir)
    fedavg = aggregate_updates("fedavg", updates, AggregationParams())

    # Assert
    assert [(u.client_id, u.num_examples, u.bare) for u in updates] == [(1, 50, True), (2, 120, True), (3, 30, True)]
    assert len(notes) == 3 and all("particion.json" in note for note in notes)
    assert_close_weights(fedavg, weighted_mean_by_hand([weights[c] for c in COUNTS], list(COUNTS.values())))
    assert all("cannot be verified" in note for note in validate_updates(updates))


def test_bare_update_missing_from_the_manifest_weighs_one(bare_federation, start):
    # Prepare
    weights_dir, data_dir, _ = bare_federation
    update_path(weights_dir, 4).write_bytes(pickle.dumps(perturbed(start.weights, 99)))

    # Execute
    updates = load_updates(weights_dir)
    notes = fill_missing_counts(updates, data_dir)

    # Assert
    assert [u.num_examples for u in updates] == [50, 120, 30, 1]
    assert "pesos_cliente_4.pkl: sample count unknown" in notes[-1]


def test_bare_updates_aggregate_directory_weights_by_the_manifest(bare_federation, tmp_path):
    # Prepare
    weights_dir, data_dir, weights = bare_federation
    out_dir = tmp_path / "global"

    # Execute
    report = aggregate_directory(weights_dir, data_dir, out_dir, ("fedavg",))

    # Assert
    expected = weighted_mean_by_hand([weights[c] for c in COUNTS], list(COUNTS.values()))
    following = load_global(global_path(out_dir, 1))
    assert following.round == 1 and following.method == "fedavg"
    assert_close_weights(following.weights, expected)
    summary = json.loads((out_dir / "resultados_agregacion.json").read_text())
    assert [local["train_examples"] for local in summary["locals"]] == list(COUNTS.values())
    assert [local["num_examples"] for local in summary["locals"]] == [200, 200, 200]  # test images
    assert any("particion.json" in note for note in summary["notes"])
    assert any("cannot be verified" in note for note in report.notes)


# --- the rules on hand-made updates -----------------------------------------------------------------


@pytest.fixture(scope="module")
def handmade_report(start, evaluator, test_set, tmp_path_factory):
    updates = handmade_updates(start, tmp_path_factory.mktemp("pesos"))
    snapshot = [[w.copy() for w in u.weights] for u in updates]
    x_test, y_test = test_set
    report = run_aggregation(updates, x_test, y_test, ("fedavg", "fedprox", "fedmed", "trimmed"),
                             AggregationParams(trim_beta=0.34), evaluator=evaluator)
    return report, updates, snapshot


def test_fedavg_is_the_weighted_mean_by_hand(handmade_report):
    # Prepare
    report, updates, _ = handmade_report

    # Execute
    expected = weighted_mean_by_hand([u.weights for u in updates], [u.num_examples for u in updates])

    # Assert
    assert_close_weights(report.methods["fedavg"].weights, expected)
    assert report.methods["fedavg"].train_examples == sum(COUNTS.values())
    assert report.methods["fedavg"].sha256 == weights_sha256(report.methods["fedavg"].weights)


def test_fedmed_and_trimmed_by_hand(handmade_report):
    # Prepare
    report, updates, _ = handmade_report
    stacked = [np.stack([u.weights[i] for u in updates]) for i in range(len(updates[0].weights))]

    # Assert: median of three = middle value; trimming one of three at each end = the same middle value
    assert_close_weights(report.methods["fedmed"].weights, [np.median(s, axis=0) for s in stacked])
    assert_close_weights(report.methods["trimmed"].weights, [np.median(s, axis=0) for s in stacked])


def test_inputs_are_not_modified(handmade_report):
    report, updates, snapshot = handmade_report
    for update, saved in zip(updates, snapshot):
        for w, s in zip(update.weights, saved):
            assert np.array_equal(w, s)
    assert all(r.weights[0] is not u.weights[0] for r in report.methods.values() for u in updates)


def test_best_method_has_the_highest_accuracy(handmade_report):
    # Prepare
    report, _, _ = handmade_report
    ranked = sorted(report.methods.values(), key=lambda r: (-r.evaluation.accuracy, r.evaluation.loss))

    # Assert
    assert report.best == ranked[0].method
    assert report.runner_up == ranked[1].method
    assert report.methods[report.best].evaluation.accuracy == max(
        r.evaluation.accuracy for r in report.methods.values())
    assert report.next_from == report.best
    assert [u.client_id for u, _ in report.locals_] == [1, 2, 3]


def test_fedprox_note_says_it_equals_fedavg_without_mu(handmade_report):
    # Prepare
    report, _, _ = handmade_report

    # Assert
    assert any("FedProx equals FedAvg" in note for note in report.notes)
    for a, b in zip(report.methods["fedprox"].weights, report.methods["fedavg"].weights):
        assert np.array_equal(a, b)


def test_fedprox_note_lists_the_mus_and_aggregates_the_prox_updates(start, evaluator, test_set, tmp_path):
    # Prepare
    updates = handmade_updates(start, tmp_path / "pesos")
    prox = handmade_updates(start, tmp_path / "pesos_fedprox", seed=50)
    for update, mu in zip(prox, (0.01, 0.1, 0.0)):
        update.mu = mu
    x_test, y_test = test_set

    # Execute
    report = run_aggregation(updates, x_test, y_test, ("fedavg", "fedprox"), prox_updates=prox,
                             evaluator=evaluator, evaluate_locals=False)

    # Assert
    note = next(n for n in report.notes if n.startswith("FedProx"))
    assert "equals FedAvg" not in note
    assert "1: 0.01" in note and "2: 0.1" in note and "3: 0" in note
    assert report.methods["fedprox"].mu_values == {1: 0.01, 2: 0.1, 3: 0.0}
    assert_close_weights(report.methods["fedprox"].weights,
                         weighted_mean_by_hand([u.weights for u in prox], [u.num_examples for u in prox]))
    assert report.methods["fedprox"].sha256 != report.methods["fedavg"].sha256


def test_next_from_chooses_the_next_rounds_weights(start, evaluator, test_set, tmp_path):
    # Prepare
    updates = handmade_updates(start, tmp_path / "pesos")
    x_test, y_test = test_set

    # Execute
    report = run_aggregation(updates, x_test, y_test, ("fedavg", "fedmed"), next_from="fedmed",
                             evaluator=evaluator, evaluate_locals=False)
    files = write_outputs(report, tmp_path / "global")

    # Assert
    following = load_global(files["next_round"])
    assert report.next_from == "fedmed"
    assert following.round == 1 and following.method == "fedmed"
    assert following.sha256 == report.methods["fedmed"].sha256 != report.methods["fedavg"].sha256
    assert json.loads(files["json"].read_text())["next_from"] == "fedmed"


# --- end to end: split -> train 3 clients -> aggregate --------------------------------------------------


E2E_TRAIN_PER_CLASS = 180  # 1,800 images: 600 per client
E2E_TEST_PER_CLASS = 50  # 500 test images
E2E_CONFIG = TrainConfig(epochs=3, batch_size=32)  # 3 x 17 steps: FedAvg ~0.82-0.84 over split seeds


def first_per_class(labels, per_class):
    return np.sort(np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in range(10)]))


@pytest.fixture(scope="module")
def e2e(tmp_path_factory, raw_mnist):
    """The course's manual flow on 1,800 real images: split, round-0 file, 3 members, aggregation."""
    root = tmp_path_factory.mktemp("e2e")
    data_dir, weights_dir, out_dir = root / "datos", root / "pesos", root / "global"
    train = first_per_class(raw_mnist.y_train, E2E_TRAIN_PER_CLASS)
    test = first_per_class(raw_mnist.y_test, E2E_TEST_PER_CLASS)
    mnist = Mnist(raw_mnist.x_train[train], raw_mnist.y_train[train], raw_mnist.x_test[test], raw_mnist.y_test[test])
    write_federation(mnist, PartitionConfig("iid", 3, seed=42), data_dir)
    start = make_global(initial_weights(), 0, "init", 42)
    save_global(global_path(weights_dir, 0), start)
    trainer = ClientTrainer()
    locals_ = [run_local_training(k, data_dir, weights_dir, E2E_CONFIG, global_path(weights_dir, 0), 0, trainer)
               for k in (1, 2, 3)]
    report = aggregate_directory(weights_dir, data_dir, out_dir, METHODS, expected_round=0)
    summary = json.loads((out_dir / "resultados_agregacion.json").read_text())
    return {"data": data_dir, "weights": weights_dir, "out": out_dir, "start": start, "locals": locals_,
            "report": report, "summary": summary}


def test_e2e_writes_every_output(e2e):
    # Prepare
    expected = {f"modelo_global_{m}.h5" for m in METHODS} | {f"matriz_confusion_{m}.png" for m in METHODS} | {
        "comparacion_metodos.png", "resultados_agregacion.json", "resultados_agregacion.csv",
        "pesos_globales_ronda_1.pkl"}

    # Assert
    assert {p.name for p in e2e["out"].iterdir()} == expected
    for name in expected:
        if name.endswith(".png"):
            assert (e2e["out"] / name).read_bytes()[:8] == PNG_MAGIC
    assert set(e2e["summary"]["files"].values()) == expected


def test_e2e_fedavg_is_far_above_chance(e2e):
    accuracy = e2e["summary"]["methods"]["fedavg"]["accuracy"]
    assert accuracy > 0.5, f"FedAvg reached only {accuracy:.3f} on the common test set"


def test_e2e_fedavg_is_the_weighted_mean_of_the_members_files(e2e):
    # Prepare
    updates = [load_update(update_path(e2e["weights"], k)) for k in (1, 2, 3)]

    # Execute
    expected = weighted_mean_by_hand([u.weights for u in updates], [u.num_examples for u in updates])

    # Assert
    assert [u.start_sha256 for u in updates] == [e2e["start"].sha256] * 3
    assert_close_weights(e2e["report"].methods["fedavg"].weights, expected)


def test_e2e_json_and_csv_agree(e2e):
    # Prepare
    summary = e2e["summary"]
    with open(e2e["out"] / "resultados_agregacion.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))

    # Assert
    assert summary["round"] == 0 and summary["next_round"] == 1
    assert summary["start_sha256"] == e2e["start"].sha256
    assert summary["model_fingerprint"] == model_fingerprint()
    globals_ = {r["name"]: r for r in rows if r["kind"] == "global"}
    assert list(globals_) == list(METHODS) == list(summary["methods"])
    for name, result in summary["methods"].items():
        assert float(globals_[name]["accuracy"]) == pytest.approx(result["accuracy"], abs=1e-6)
        assert float(globals_[name]["loss"]) == pytest.approx(result["loss"], abs=1e-6)
        assert result["ci_low"] <= result["accuracy"] <= result["ci_high"]
        assert result["num_examples"] == 500
        assert result["clients"] == [1, 2, 3]
    locals_ = [r for r in rows if r["kind"] == "local"]
    assert [r["name"] for r in locals_] == ["cliente_1", "cliente_2", "cliente_3"]
    for row, local, out in zip(locals_, summary["locals"], e2e["locals"]):
        assert float(row["accuracy"]) == pytest.approx(local["accuracy"], abs=1e-6)
        assert int(row["train_examples"]) == local["train_examples"] == out.result.num_examples
        assert local["num_examples"] == 500  # test images, as for the methods
        assert local["accuracy"] == pytest.approx(out.test.accuracy)
    best = max(summary["methods"], key=lambda m: (summary["methods"][m]["accuracy"], -summary["methods"][m]["loss"]))
    assert summary["best"] == best == summary["next_from"]


def test_e2e_next_round_file_holds_the_best_methods_weights(e2e):
    # Execute
    following = load_global(e2e["out"] / "pesos_globales_ronda_1.pkl")

    # Assert
    best = e2e["summary"]["best"]
    assert following.round == 1
    assert following.method == best
    assert following.sha256 == e2e["summary"]["methods"][best]["sha256"]
    for a, b in zip(following.weights, e2e["report"].methods[best].weights):
        assert np.array_equal(a, b)


def test_e2e_keras_model_file_reproduces_the_reported_accuracy(e2e):
    # Prepare
    x_test, y_test = load_partition(e2e["data"] / "test.npz")

    # Execute
    model = keras.models.load_model(e2e["out"] / "modelo_global_fedavg.h5")
    predicted = np.argmax(model.predict(x_test, verbose=0), axis=1)

    # Assert
    for a, b in zip(model.get_weights(), e2e["report"].methods["fedavg"].weights):
        assert np.array_equal(a, b)
    reported = e2e["summary"]["methods"]["fedavg"]["accuracy"]
    assert float(np.mean(predicted == y_test)) == pytest.approx(reported, abs=2 / len(y_test))


def test_e2e_fedprox_without_prox_updates_equals_fedavg(e2e):
    report = e2e["report"]
    assert report.methods["fedprox"].sha256 == report.methods["fedavg"].sha256
    assert any("FedProx equals FedAvg" in note for note in report.notes)
    assert any("FedProx equals FedAvg" in note for note in e2e["summary"]["notes"])


def test_e2e_fedmed_is_the_coordinate_median(e2e):
    updates = [load_update(update_path(e2e["weights"], k)) for k in (1, 2, 3)]
    expected = [np.median(np.stack(layer), axis=0) for layer in zip(*(u.weights for u in updates))]
    assert_close_weights(e2e["report"].methods["fedmed"].weights, expected)


def test_e2e_bad_update_added_later_leaves_existing_outputs_untouched(e2e, tmp_path):
    # Prepare: a copy of the members' files plus a NaN update, aggregated into a directory with old results
    weights_dir = shutil.copytree(e2e["weights"], tmp_path / "pesos")
    out_dir = shutil.copytree(e2e["out"], tmp_path / "global")
    before = {p.name: p.read_bytes() for p in out_dir.iterdir()}
    bad = load_update(update_path(weights_dir, 1))
    bad.client_id = 4
    bad.weights[0][...] = np.nan
    save_update(update_path(weights_dir, 4), bad)

    # Execute / Assert
    with pytest.raises(FedMnistError, match=r"pesos_cliente_4\.pkl"):
        aggregate_directory(weights_dir, e2e["data"], out_dir, METHODS)
    assert {p.name: p.read_bytes() for p in out_dir.iterdir()} == before
