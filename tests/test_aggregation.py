"""Tests for fedmnist.aggregation, the file flow's adapter to the server step: refusals that name the file
and write nothing, the round's start file, manifest counts, hand-checked rules, the FedProx note,
--next-from, round numbering, NaN-free JSON, and the manual course flow end to end (split, train 3
clients, aggregate)."""

import csv
import json
import math
import os
import pickle
import shutil

import keras
import numpy as np
import pytest

from fedmnist import aggregation
from fedmnist.aggregation import (
    aggregate_directory,
    find_start,
    load_updates,
    manifest_counts,
    run_aggregation,
    to_replies,
    write_outputs,
)
from fedmnist.data import Mnist, load_partition
from fedmnist.errors import ConfigError, DataError, FedMnistError, UpdateFileError, ValidationError
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
from fedmnist.federation_files import MANIFEST_FILE, write_federation
from fedmnist.local import run_local_training
from fedmnist.methods import MethodConfig
from fedmnist.model import initial_weights, model_fingerprint, weight_spec, weights_sha256
from fedmnist.partition import PartitionConfig
from fedmnist.server import RejectedReply
from fedmnist.training import ClientTrainer, TrainConfig

METHODS = ("fedavg", "fedprox", "fedmed")
COUNTS = {1: 50, 2: 120, 3: 30}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
DENSE = next(i for i, (_, shape, _) in enumerate(weight_spec()) if len(shape) == 2)


@pytest.fixture(scope="module")
def start():
    """Round-0 global weights (build_model's default seed), as ``global_aggregation.py --init`` writes them."""
    return make_global(initial_weights(), 0, "init", 42)


@pytest.fixture(scope="module")
def other_start():
    """Round-0 global weights of another federation (build_model(seed=7))."""
    return make_global(initial_weights(7), 0, "init", 7)


@pytest.fixture(scope="module")
def evaluator():
    return ClientTrainer()


@pytest.fixture(scope="module")
def test_set(small_federation):
    return load_partition(small_federation / "test.npz")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, small_federation):
    """A federation directory: the small common test set and a manifest giving clients 1-3 COUNTS."""
    path = tmp_path_factory.mktemp("datos")
    shutil.copy(small_federation / "test.npz", path / "test.npz")
    write_manifest(path, COUNTS)
    return path


def write_manifest(directory, counts):
    manifest = {"format": "fedmnist-partition", "version": 1,
                "clients": [{"client_id": cid, "num_examples": n} for cid, n in counts.items()]}
    (directory / MANIFEST_FILE).write_text(json.dumps(manifest))


def perturbed(weights, seed, scale=0.02):
    rng = np.random.default_rng(seed)
    return [(w + scale * rng.standard_normal(w.shape)).astype(np.float32) for w in weights]


def handmade_updates(start, directory, counts=COUNTS, mu=0.0, seed=0):
    """Small perturbations of the start weights, as if each client had trained from them (no training)."""
    return [
        ClientUpdate(client_id=cid, round=start.round, num_examples=n, weights=perturbed(start.weights, seed + cid),
                     start_sha256=start.sha256, fingerprint=model_fingerprint(), mu=mu, epochs=1,
                     batch_size=32, metrics={"history": {"loss": [1.0, 0.5 + cid / 10]}},
                     path=update_path(directory, cid))
        for cid, n in counts.items()
    ]


def save_all(updates):
    for u in updates:
        save_update(u.path, u)


def course_round(weights_dir, start, **kwargs):
    """The round's pesos_globales_ronda_R.pkl in ``weights_dir`` and three members' updates made from it
    (not yet saved, so that a test can spoil them first)."""
    save_global(global_path(weights_dir, start.round), start)
    return handmade_updates(start, weights_dir, **kwargs)


def weighted_mean_by_hand(weight_lists, counts):
    total = float(sum(counts))
    return [sum(np.float64(ws[i]) * n for ws, n in zip(weight_lists, counts)) / total
            for i in range(len(weight_lists[0]))]


def assert_close_weights(actual, expected, rtol=1e-6):
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        assert a.shape == e.shape
        np.testing.assert_allclose(a, e, rtol=rtol, atol=1e-7)


def strict_json(text):
    """json.loads that fails on NaN/Infinity, which are not JSON."""
    def refuse(name):
        raise AssertionError(f"the JSON holds {name}")

    return json.loads(text, parse_constant=refuse)


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


def spoil_inf(updates):
    updates[1].weights[DENSE][3, 4] = np.inf


def spoil_minus_inf(updates):
    updates[0].weights[-1][2] = -np.inf


def spoil_rounds(updates):
    updates[1].round = 1


def spoil_starts(updates):
    updates[2].start_sha256 = weights_sha256(initial_weights(7))


def spoil_count(updates):
    updates[0].num_examples = 10 * COUNTS[1]


def spoil_duplicate(updates):
    updates[2].client_id = 1
    updates[2].num_examples = updates[0].num_examples  # what the manifest gives client 1


SPOILERS = [
    pytest.param(spoil_fingerprint, ["pesos_cliente_2.pkl", "fingerprint 0123456789abcdef"], id="fingerprint"),
    pytest.param(spoil_shape, ["pesos_cliente_2.pkl", "shape"], id="shape"),
    pytest.param(spoil_nan, ["pesos_cliente_3.pkl", "NaN"], id="nan"),
    pytest.param(spoil_inf, ["pesos_cliente_2.pkl", "infinite"], id="inf"),
    pytest.param(spoil_minus_inf, ["pesos_cliente_1.pkl", "infinite"], id="minus-inf"),
    pytest.param(spoil_rounds, ["pesos_cliente_2.pkl", "round 1", "different rounds"], id="rounds"),
    pytest.param(spoil_starts, ["pesos_cliente_3.pkl", "chance-level", "pesos_globales_ronda_R.pkl"],
                 id="starts"),
    pytest.param(spoil_count, ["pesos_cliente_1.pkl", "500", "particion.json"], id="count"),
]
"""What a member's file can get wrong, and what the refusal must say."""

IN_MEMORY_SPOILERS = [
    *SPOILERS,
    pytest.param(spoil_duplicate, ["pesos_cliente_3.pkl", "pesos_cliente_1.pkl", "appears twice"], id="duplicate"),
]
"""In memory two updates can also share a client id (files cannot: the id must match the file name)."""


@pytest.mark.parametrize(("spoil", "fragments"), IN_MEMORY_SPOILERS)
def test_run_aggregation_refuses_and_names_the_file(spoil, fragments, start, evaluator, test_set, tmp_path):
    # Prepare
    x_test, y_test = test_set
    updates = handmade_updates(start, tmp_path)
    run_aggregation(updates, x_test, y_test, ("fedavg",), evaluator=evaluator, evaluate_locals=False,
                    start=start, counts=COUNTS)  # the unspoiled set is fine
    updates = handmade_updates(start, tmp_path)
    spoil(updates)

    # Execute / Assert
    with pytest.raises(ValidationError) as info:
        run_aggregation(updates, x_test, y_test, ("fedavg",), evaluator=evaluator, evaluate_locals=False,
                        start=start, counts=COUNTS)
    for fragment in fragments:
        assert fragment in str(info.value)


@pytest.mark.parametrize(("spoil", "fragments"), IN_MEMORY_SPOILERS)
def test_run_aggregation_without_files_names_the_client(spoil, fragments, start, evaluator, test_set, tmp_path):
    # Prepare: in-memory updates (as the demo and the experiments make them) have no path
    x_test, y_test = test_set
    updates = handmade_updates(start, tmp_path)
    for update in updates:
        update.path = None
    spoil(updates)

    # Execute / Assert: the message names a client, never "None" where a file name would go
    with pytest.raises(ValidationError) as info:
        run_aggregation(updates, x_test, y_test, ("fedavg",), evaluator=evaluator, evaluate_locals=False,
                        start=start, counts=COUNTS)
    assert "None" not in str(info.value)
    assert "client " in str(info.value)


@pytest.mark.parametrize(("spoil", "fragments"), SPOILERS)
def test_aggregate_directory_refuses_and_writes_nothing(spoil, fragments, start, tmp_path, data_dir):
    # Prepare
    weights_dir, out_dir = tmp_path / "pesos", tmp_path / "global"
    updates = course_round(weights_dir, start)
    spoil(updates)
    save_all(updates)

    # Execute / Assert
    with pytest.raises(ValidationError) as info:
        aggregate_directory(weights_dir, data_dir, out_dir, METHODS)
    for fragment in fragments:
        assert fragment in str(info.value)
    assert not out_dir.exists()


def test_update_whose_id_differs_from_its_file_name_is_refused(start, tmp_path, data_dir):
    # Prepare: client 3's file holds an update that says it is client 1's (a duplicate of client 1)
    weights_dir, out_dir = tmp_path / "pesos", tmp_path / "global"
    updates = course_round(weights_dir, start)
    spoil_duplicate(updates)
    save_all(updates)

    # Execute / Assert
    with pytest.raises(UpdateFileError) as info:
        aggregate_directory(weights_dir, data_dir, out_dir, METHODS)
    assert "pesos_cliente_3.pkl" in str(info.value) and "client 1" in str(info.value)
    assert not out_dir.exists()


@pytest.mark.parametrize("how", ["beside", "flag"])
def test_updates_that_agree_but_not_with_the_rounds_file_are_refused(how, start, other_start, tmp_path, data_dir):
    # Prepare: all three members trained from the same weights, but not from this round's file
    weights_dir, out_dir = tmp_path / "pesos", tmp_path / "global"
    save_all(handmade_updates(other_start, weights_dir))
    round_file = global_path(weights_dir if how == "beside" else tmp_path / "servidor", 0)
    save_global(round_file, start)

    # Execute / Assert
    with pytest.raises(RejectedReply) as info:
        aggregate_directory(weights_dir, data_dir, out_dir, METHODS,
                            global_weights=round_file if how == "flag" else None)
    message = str(info.value)
    assert "pesos_cliente_1.pkl" in message
    assert other_start.sha256[:12] in message and start.sha256[:12] in message
    assert "pesos_globales_ronda_R.pkl" in message
    assert not out_dir.exists()


def test_missing_round_file_asks_for_global_weights(start, tmp_path, data_dir):
    # Prepare: non-bare updates of round 1, but no pesos_globales_ronda_1.pkl beside them and no flag
    weights_dir, out_dir = tmp_path / "pesos", tmp_path / "global"
    later = make_global(perturbed(start.weights, 99), 1, "fedavg", 42)
    save_all(handmade_updates(later, weights_dir))

    # Execute / Assert
    with pytest.raises(ValidationError) as info:
        aggregate_directory(weights_dir, data_dir, out_dir, METHODS)
    assert "--global-weights" in str(info.value)
    assert "pesos_globales_ronda_R.pkl" in str(info.value)
    assert not out_dir.exists()


def test_round_zero_without_its_file_is_checked_against_the_rebuilt_start(start, other_start, tmp_path, data_dir):
    # Prepare: the notebook's GLOBAL_WEIGHTS = None starts from build_model(42): no file is needed
    weights_dir, out_dir = tmp_path / "pesos", tmp_path / "global"
    save_all(handmade_updates(start, weights_dir))

    # Execute
    report = aggregate_directory(weights_dir, data_dir, out_dir, ("fedavg",))

    # Assert: accepted and said; members who started elsewhere are still refused
    assert report.start.sha256 == start.sha256 and "rebuilt round 0" in report.notes[0]
    other_dir = tmp_path / "otros"
    save_all(handmade_updates(other_start, other_dir))
    with pytest.raises(ValidationError, match=r"pesos_cliente_1\.pkl"):
        aggregate_directory(other_dir, data_dir, tmp_path / "global2", ("fedavg",))


def test_global_weights_flag_from_another_directory(start, evaluator, tmp_path, data_dir):
    # Prepare: the round's file kept by the server elsewhere
    weights_dir, out_dir, server_dir = tmp_path / "pesos", tmp_path / "global", tmp_path / "servidor"
    updates = handmade_updates(start, weights_dir)
    save_all(updates)
    save_global(global_path(server_dir, 0), start)

    # Execute
    report = aggregate_directory(weights_dir, data_dir, out_dir, ("fedavg",), expected_round=0,
                                 global_weights=global_path(server_dir, 0))

    # Assert
    assert report.start.path == global_path(server_dir, 0)
    assert report.start_sha256 == start.sha256
    assert_close_weights(report.methods["fedavg"].weights,
                         weighted_mean_by_hand([u.weights for u in updates], list(COUNTS.values())))


def test_global_weights_of_another_round_are_refused(start, tmp_path, data_dir):
    # Prepare: updates trained from round 0, but the file given is round 1's
    weights_dir, out_dir = tmp_path / "pesos", tmp_path / "global"
    save_all(course_round(weights_dir, start))
    round1 = global_path(tmp_path / "servidor", 1)
    save_global(round1, make_global(perturbed(start.weights, 5), 1, "fedavg", 42))

    # Execute / Assert
    with pytest.raises(ValidationError) as info:
        aggregate_directory(weights_dir, data_dir, out_dir, METHODS, global_weights=round1)
    assert "pesos_cliente_1.pkl" in str(info.value) and "different rounds" in str(info.value)
    assert str(round1) in str(info.value)
    assert not out_dir.exists()


def test_find_start(start, tmp_path):
    # Prepare
    weights_dir = tmp_path / "pesos"
    updates = handmade_updates(start, weights_dir)
    elsewhere = global_path(tmp_path / "servidor", 0)
    save_global(elsewhere, start)

    # Execute / Assert: nothing beside the updates, then the flag, then the file beside them
    assert find_start(weights_dir, updates) is None
    assert find_start(weights_dir, updates, elsewhere).path == elsewhere
    save_global(global_path(weights_dir, 0), start)
    found = find_start(weights_dir, updates)
    assert found.path == global_path(weights_dir, 0) and found.sha256 == start.sha256


def test_malicious_pickle_among_the_updates_is_refused_unrun(start, tmp_path, data_dir):
    # Prepare
    weights_dir, out_dir, marker = tmp_path / "pesos", tmp_path / "global", tmp_path / "pwned"
    save_all(course_round(weights_dir, start))
    update_path(weights_dir, 2).write_bytes(pickle.dumps(RunsCommand(f"touch {marker}")))

    # Execute / Assert
    with pytest.raises(UpdateFileError) as info:
        aggregate_directory(weights_dir, data_dir, out_dir, METHODS)
    assert "pesos_cliente_2.pkl" in str(info.value)
    assert "refusing to load" in str(info.value)
    assert not marker.exists(), "the pickle's code ran"
    assert not out_dir.exists()


def test_truncated_update_is_refused(start, tmp_path, data_dir):
    # Prepare
    weights_dir, out_dir = tmp_path / "pesos", tmp_path / "global"
    save_all(course_round(weights_dir, start))
    path = update_path(weights_dir, 3)
    path.write_bytes(path.read_bytes()[:1000])

    # Execute / Assert
    with pytest.raises(UpdateFileError, match=r"pesos_cliente_3\.pkl"):
        aggregate_directory(weights_dir, data_dir, out_dir, METHODS)
    assert not out_dir.exists()


@pytest.mark.parametrize("make_dir", [True, False], ids=["empty", "missing"])
def test_empty_or_missing_weights_dir(make_dir, tmp_path, data_dir):
    # Prepare
    weights_dir, out_dir = tmp_path / "pesos", tmp_path / "global"
    if make_dir:
        weights_dir.mkdir()
        (weights_dir / "notas.txt").write_text("no updates here")

    # Execute / Assert
    with pytest.raises(ValidationError) as info:
        aggregate_directory(weights_dir, data_dir, out_dir, METHODS)
    assert str(weights_dir) in str(info.value)
    assert ("no pesos_cliente_N.pkl" if make_dir else "not found") in str(info.value)
    assert not out_dir.exists()


def test_requested_round_must_match(start, tmp_path, data_dir):
    # Prepare: updates of round 0 and the round-0 file beside them
    weights_dir, out_dir = tmp_path / "pesos", tmp_path / "global"
    save_all(course_round(weights_dir, start))

    # Execute / Assert
    with pytest.raises(ValidationError, match="round 1 was requested") as info:
        aggregate_directory(weights_dir, data_dir, out_dir, METHODS, expected_round=1)
    assert "pesos_globales_ronda_0.pkl" in str(info.value)
    assert not out_dir.exists()


def test_missing_common_test_set(start, tmp_path):
    # Prepare
    weights_dir, data_dir, out_dir = tmp_path / "pesos", tmp_path / "datos", tmp_path / "global"
    data_dir.mkdir()
    save_all(course_round(weights_dir, start))

    # Execute / Assert
    with pytest.raises(DataError, match=r"test\.npz"):
        aggregate_directory(weights_dir, data_dir, out_dir, METHODS)
    assert not out_dir.exists()


def test_output_dir_that_is_a_file_fails_before_anything_is_loaded(start, tmp_path, data_dir, monkeypatch):
    # Prepare: a valid round, and an output path taken by a file
    weights_dir, out_file = tmp_path / "pesos", tmp_path / "global"
    save_all(course_round(weights_dir, start))
    out_file.write_text("not a directory")

    def too_late(*args, **kwargs):
        raise AssertionError("the output directory must be checked before any update is loaded")

    monkeypatch.setattr(aggregation, "load_updates", too_late)
    monkeypatch.setattr(aggregation, "run_aggregation", too_late)

    # Execute / Assert
    with pytest.raises(ConfigError) as info:
        aggregate_directory(weights_dir, data_dir, out_file, METHODS)
    assert str(out_file) in str(info.value) and "is a file" in str(info.value)
    assert out_file.read_text() == "not a directory"


def test_prox_updates_from_another_start_are_refused(start, other_start, tmp_path, data_dir):
    # Prepare
    weights_dir, prox_dir, out_dir = tmp_path / "pesos", tmp_path / "pesos_fedprox", tmp_path / "global"
    save_all(course_round(weights_dir, start))
    save_all(handmade_updates(other_start, prox_dir, mu=0.01))

    # Execute / Assert
    with pytest.raises(RejectedReply) as info:
        aggregate_directory(weights_dir, data_dir, out_dir, METHODS, prox_dir=prox_dir)
    assert str(update_path(prox_dir, 1)) in str(info.value)
    assert "chance-level" in str(info.value)
    assert not out_dir.exists()


def test_prox_update_with_nan_is_refused(start, tmp_path, data_dir):
    # Prepare
    weights_dir, prox_dir, out_dir = tmp_path / "pesos", tmp_path / "pesos_fedprox", tmp_path / "global"
    save_all(course_round(weights_dir, start))
    prox = handmade_updates(start, prox_dir, mu=0.01)
    spoil_nan(prox)
    save_all(prox)

    # Execute / Assert
    with pytest.raises(ValidationError) as info:
        aggregate_directory(weights_dir, data_dir, out_dir, METHODS, prox_dir=prox_dir)
    assert str(update_path(prox_dir, 3)) in str(info.value) and "NaN" in str(info.value)
    assert not out_dir.exists()


def test_prox_dir_feeds_fedprox(start, tmp_path, data_dir):
    # Prepare
    weights_dir, prox_dir, out_dir = tmp_path / "pesos", tmp_path / "pesos_fedprox", tmp_path / "global"
    plain = course_round(weights_dir, start)
    save_all(plain)
    prox = handmade_updates(start, prox_dir, mu=0.05, seed=30)
    save_all(prox)

    # Execute
    report = aggregate_directory(weights_dir, data_dir, out_dir, ("fedavg", "fedprox"), prox_dir=prox_dir)

    # Assert
    counts = list(COUNTS.values())
    assert_close_weights(report.methods["fedprox"].weights, weighted_mean_by_hand([u.weights for u in prox], counts))
    assert_close_weights(report.methods["fedavg"].weights, weighted_mean_by_hand([u.weights for u in plain], counts))
    assert report.methods["fedprox"].mu_values == {1: 0.05, 2: 0.05, 3: 0.05}
    assert any(note.startswith("FedProx: clients trained with mu") for note in report.notes)


@pytest.mark.parametrize(
    ("methods", "next_from", "fragment"),
    [
        (("fedavg", "fedmed"), "fedprox", "--next-from fedprox is not among the methods"),
        (("fedavg", "nosuchrule"), None, "unknown method 'nosuchrule'"),
        ((), None, "at least one aggregation method"),
        (("fedavg", "fedavg"), None, "listed twice"),
    ],
)
def test_bad_methods_or_next_from(methods, next_from, fragment, start, tmp_path, data_dir):
    # Prepare
    weights_dir, out_dir = tmp_path / "pesos", tmp_path / "global"
    save_all(course_round(weights_dir, start))

    # Execute / Assert
    with pytest.raises(ValidationError) as info:
        aggregate_directory(weights_dir, data_dir, out_dir, methods, next_from=next_from)
    assert fragment in str(info.value)
    assert not out_dir.exists()


def test_krum_needs_more_clients_than_2f_plus_2(start, tmp_path, data_dir):
    # Prepare: three clients; Krum with f = 1 needs more than four
    weights_dir, out_dir = tmp_path / "pesos", tmp_path / "global"
    save_all(course_round(weights_dir, start))

    # Execute / Assert
    with pytest.raises(ValidationError):
        aggregate_directory(weights_dir, data_dir, out_dir, ("krum",), MethodConfig(("krum",), krum_f=1))
    assert not out_dir.exists()


# --- sample counts and the federation manifest ------------------------------------------------------


def test_count_above_the_real_manifest_is_refused(start, tmp_path, small_federation):
    # Prepare: split_data.py's manifest; client 2 claims ten times its partition
    weights_dir, out_dir = tmp_path / "pesos", tmp_path / "global"
    counts = manifest_counts(small_federation)
    updates = course_round(weights_dir, start, counts=counts)
    updates[1].num_examples = 10 * counts[2]
    save_all(updates)

    # Execute / Assert
    with pytest.raises(RejectedReply) as info:
        aggregate_directory(weights_dir, small_federation, out_dir, METHODS)
    assert "pesos_cliente_2.pkl" in str(info.value) and "particion.json" in str(info.value)
    assert str(10 * counts[2]) in str(info.value) and str(counts[2]) in str(info.value)
    assert not out_dir.exists()


def test_a_count_below_the_manifest_is_refused_too(start, evaluator, test_set, tmp_path):
    # Prepare: members report their partition's size (validation hold-out included), so any other
    # claim, smaller or larger, contradicts particion.json
    updates = handmade_updates(start, tmp_path, counts={cid: n - n // 10 for cid, n in COUNTS.items()})
    x_test, y_test = test_set

    # Execute / Assert
    with pytest.raises(RejectedReply, match=r"particion\.json"):
        run_aggregation(updates, x_test, y_test, ("fedavg",), evaluator=evaluator, evaluate_locals=False,
                        start=start, counts=COUNTS)


def test_client_missing_from_the_manifest_is_refused(start, tmp_path, data_dir):
    # Prepare: a fourth member that the federation does not have
    weights_dir, out_dir = tmp_path / "pesos", tmp_path / "global"
    save_all(course_round(weights_dir, start, counts={**COUNTS, 4: 40}))

    # Execute / Assert
    with pytest.raises(RejectedReply) as info:
        aggregate_directory(weights_dir, data_dir, out_dir, METHODS)
    assert "pesos_cliente_4.pkl" in str(info.value) and "not in the federation manifest" in str(info.value)
    assert not out_dir.exists()


def test_manifest_counts(small_federation, data_dir, tmp_path):
    # Prepare: a manifest that lists clients without their counts (read_manifest allows it)
    no_counts = tmp_path / "sin_recuentos"
    no_counts.mkdir()
    (no_counts / MANIFEST_FILE).write_text(json.dumps({"clients": [{"client_id": 1}, {"client_id": 2}]}))

    # Execute / Assert
    assert manifest_counts(data_dir) == COUNTS
    assert manifest_counts(small_federation) == {1: 200, 2: 200, 3: 200}
    assert manifest_counts(tmp_path) is None  # no particion.json
    assert manifest_counts(None) is None
    assert manifest_counts(no_counts) is None


# --- bare lists of weights (the original notebook style) -------------------------------------------


@pytest.fixture
def bare_federation(tmp_path, start, data_dir):
    """A weights dir of bare pickled get_weights() lists; the data dir's manifest has 50/120/30."""
    weights_dir = tmp_path / "pesos"
    weights_dir.mkdir()
    weights = {cid: perturbed(start.weights, 10 + cid) for cid in COUNTS}
    for cid, ws in weights.items():
        update_path(weights_dir, cid).write_bytes(pickle.dumps(ws))
    return weights_dir, data_dir, weights


def test_bare_updates_get_their_counts_from_the_manifest(bare_federation, start, evaluator, test_set):
    # Prepare
    weights_dir, data_dir, weights = bare_federation
    x_test, y_test = test_set
    updates = load_updates(weights_dir)

    # Execute
    replies, notes = to_replies(updates, start, manifest_counts(data_dir))
    report = run_aggregation(updates, x_test, y_test, ("fedavg",), evaluator=evaluator, evaluate_locals=False,
                             counts=manifest_counts(data_dir))

    # Assert
    assert [(u.client_id, u.num_examples, u.bare) for u in updates] == [(1, None, True), (2, None, True),
                                                                       (3, None, True)]
    assert [(r.client_id, r.num_examples, r.start_sha256) for r in replies] == [(1, 50, None), (2, 120, None),
                                                                               (3, 30, None)]
    assert len(notes) == 3 and all("particion.json" in note for note in notes)
    assert_close_weights(report.methods["fedavg"].weights,
                         weighted_mean_by_hand([weights[c] for c in COUNTS], list(COUNTS.values())))
    assert sum("cannot be verified" in note for note in report.notes) == 3
    assert any("build_model(42)" in note for note in report.notes)
    assert report.round == 1 and report.start.sha256 == start.sha256


def test_bare_updates_without_a_manifest_weigh_one_each(bare_federation, start, evaluator, test_set):
    # Prepare
    weights_dir, _, weights = bare_federation
    x_test, y_test = test_set
    updates = load_updates(weights_dir)

    # Execute
    replies, notes = to_replies(updates, start, None)
    report = run_aggregation(updates, x_test, y_test, ("fedavg",), evaluator=evaluator, evaluate_locals=False)

    # Assert
    assert [r.num_examples for r in replies] == [1, 1, 1]
    assert all("weighted as 1" in note for note in notes) and len(notes) == 3
    assert_close_weights(report.methods["fedavg"].weights, weighted_mean_by_hand([weights[c] for c in COUNTS],
                                                                               [1, 1, 1]))


def test_bare_update_missing_from_the_manifest_is_refused(bare_federation, start, tmp_path):
    # Prepare
    weights_dir, data_dir, _ = bare_federation
    update_path(weights_dir, 4).write_bytes(pickle.dumps(perturbed(start.weights, 99)))
    out_dir = tmp_path / "global"

    # Execute / Assert
    with pytest.raises(RejectedReply) as info:
        aggregate_directory(weights_dir, data_dir, out_dir, ("fedavg",))
    assert "pesos_cliente_4.pkl" in str(info.value) and "not in the federation manifest" in str(info.value)
    assert not out_dir.exists()


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
    summary = strict_json((out_dir / "resultados_agregacion.json").read_text())
    assert [local["train_examples"] for local in summary["locals"]] == list(COUNTS.values())  # as weighted
    assert [local["num_examples"] for local in summary["locals"]] == [200, 200, 200]  # test images
    assert report.methods["fedavg"].train_examples == sum(COUNTS.values())
    assert any("particion.json" in note for note in summary["notes"])
    assert any("cannot be verified" in note for note in report.notes)


def test_bare_and_full_updates_together(start, tmp_path, data_dir):
    # Prepare: clients 1 and 2 wrote full updates from the round's file, client 3 a bare list
    weights_dir, out_dir = tmp_path / "pesos", tmp_path / "global"
    updates = course_round(weights_dir, start)
    save_all(updates[:2])
    update_path(weights_dir, 3).write_bytes(pickle.dumps(updates[2].weights))

    # Execute
    report = aggregate_directory(weights_dir, data_dir, out_dir, ("fedavg",))

    # Assert: the start is the round's file; the bare one is weighted by the manifest, with a warning
    assert report.start.path == global_path(weights_dir, 0)
    assert_close_weights(report.methods["fedavg"].weights,
                         weighted_mean_by_hand([u.weights for u in updates], list(COUNTS.values())))
    assert any("pesos_cliente_3.pkl" in note and "cannot be verified" in note for note in report.notes)


# --- the rules on hand-made updates -----------------------------------------------------------------


@pytest.fixture(scope="module")
def handmade_report(start, evaluator, test_set, tmp_path_factory):
    updates = handmade_updates(start, tmp_path_factory.mktemp("pesos"))
    snapshot = [[w.copy() for w in u.weights] for u in updates]
    x_test, y_test = test_set
    methods = ("fedavg", "fedprox", "fedmed", "trimmed")
    report = run_aggregation(updates, x_test, y_test, methods, MethodConfig(methods, trim_beta=0.34),
                             evaluator=evaluator, start=start)
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


def test_round_numbering_and_records(handmade_report, start):
    # Prepare
    report, updates, _ = handmade_report

    # Assert: updates trained from round 0's weights are training round 1, as in the simulation
    assert report.round == 1 and report.start.round == 0
    assert [(r.round, r.method) for r in report.records] == [(1, m) for m in report.methods]
    for record in report.records:
        assert record.replied_clients == [1, 2, 3] and record.failed == []
        assert record.start_sha256 == start.sha256[:16]
        assert record.test_accuracy == report.methods[record.method].evaluation.accuracy
        assert record.train_loss == pytest.approx(np.mean([u.metrics["history"]["loss"][-1] for u in updates]))


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
                             evaluator=evaluator, evaluate_locals=False, start=start)

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
                             evaluator=evaluator, evaluate_locals=False, start=start)
    files = write_outputs(report, tmp_path / "global")

    # Assert: the file of training round 1, carrying the start's seed
    following = load_global(files["next_round"])
    assert files["next_round"].name == "pesos_globales_ronda_1.pkl"
    assert report.next_from == "fedmed"
    assert following.round == 1 and following.method == "fedmed"
    assert following.seed == start.seed == 42
    assert following.sha256 == report.methods["fedmed"].sha256 != report.methods["fedavg"].sha256
    summary = strict_json(files["json"].read_text())
    assert summary["next_from"] == "fedmed"
    assert (summary["round"], summary["start_round"], summary["next_round"]) == (1, 0, 1)


def test_a_later_round_reads_and_writes_the_next_files(start, tmp_path, data_dir):
    # Prepare: round 1's global weights (seed 42 carried over) and updates trained from them
    weights_dir, out_dir = tmp_path / "pesos", tmp_path / "global"
    round1 = make_global(perturbed(start.weights, 77), 1, "fedavg", 42)
    updates = course_round(weights_dir, round1)
    save_all(updates)

    # Execute
    report = aggregate_directory(weights_dir, data_dir, out_dir, ("fedavg",), expected_round=1)

    # Assert
    following = load_global(global_path(out_dir, 2))
    assert report.round == 2 and report.start.round == 1 and report.start_sha256 == round1.sha256
    assert following.round == 2 and following.seed == 42
    assert_close_weights(following.weights, weighted_mean_by_hand([u.weights for u in updates],
                                                                  list(COUNTS.values())))
    summary = strict_json((out_dir / "resultados_agregacion.json").read_text())
    assert (summary["round"], summary["start_round"], summary["next_round"]) == (2, 1, 2)
    assert not global_path(out_dir, 1).exists()


def test_results_json_never_holds_nan(start, evaluator, test_set, tmp_path):
    # Prepare: finite but enormous weights, whose test loss overflows to NaN
    updates = handmade_updates(start, tmp_path / "pesos")
    for update in updates:
        update.weights = [(w * np.float32(1e10)).astype(np.float32) for w in update.weights]
    x_test, y_test = test_set

    # Execute
    report = run_aggregation(updates, x_test, y_test, ("fedavg", "fedmed"), evaluator=evaluator, start=start)
    files = write_outputs(report, tmp_path / "global")

    # Assert: the losses are not finite, and the JSON says null where Python says nan
    assert not math.isfinite(report.methods["fedavg"].evaluation.loss)
    assert not any(math.isfinite(e.loss) for _, e in report.locals_)
    summary = strict_json(files["json"].read_text())
    assert summary["methods"]["fedavg"]["loss"] is None
    assert all(local["loss"] is None for local in summary["locals"])
    assert summary["methods"]["fedavg"]["accuracy"] == report.methods["fedavg"].evaluation.accuracy


@pytest.mark.parametrize("history", [{"loss": []}, {"loss": "abc"}, {"loss": [None]}, {"loss": 3}, ["x"]],
                         ids=["empty", "string", "none", "number", "list"])
def test_odd_training_history_in_an_update_is_not_trusted(history, start, tmp_path, data_dir):
    # Prepare: the metrics of an update are a member's free-form notes, read from its file
    weights_dir, out_dir = tmp_path / "pesos", tmp_path / "global"
    updates = course_round(weights_dir, start)
    updates[1].metrics = {"history": history}
    save_all(updates)

    # Execute: the weights are valid, so the round goes on; or it is refused naming the file
    try:
        report = aggregate_directory(weights_dir, data_dir, out_dir, ("fedavg",))
    except FedMnistError as exc:
        assert "pesos_cliente_2.pkl" in str(exc)
        assert not out_dir.exists()
        return

    # Assert
    assert report.records[0].replied_clients == [1, 2, 3]
    assert report.records[0].train_loss is None or math.isfinite(report.records[0].train_loss)


# --- end to end: split -> train 3 clients -> aggregate --------------------------------------------------


E2E_TRAIN_PER_CLASS = 180  # 1,800 images: 600 per client
E2E_TEST_PER_CLASS = 50  # 500 test images
# 3 x 17 steps (540 images each) with the trainer's SGD 0.05, momentum 0.9: FedAvg ~0.8
E2E_CONFIG = TrainConfig(epochs=3, batch_size=32, optimizer="sgd", learning_rate=0.05, momentum=0.9)


def first_per_class(labels, per_class):
    return np.sort(np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in range(10)]))


@pytest.fixture(scope="module")
def e2e(tmp_path_factory, raw_mnist):
    """The course's manual flow on 1,800 real images: split, round-0 file, 3 members, aggregation.

    The members keep the default 10% validation hold-out, so each trains on fewer images than
    particion.json lists for it, as in the notebook.
    """
    root = tmp_path_factory.mktemp("e2e")
    data_dir, weights_dir, out_dir = root / "datos", root / "pesos", root / "global"
    train = first_per_class(raw_mnist.y_train, E2E_TRAIN_PER_CLASS)
    test = first_per_class(raw_mnist.y_test, E2E_TEST_PER_CLASS)
    mnist = Mnist(raw_mnist.x_train[train], raw_mnist.y_train[train], raw_mnist.x_test[test], raw_mnist.y_test[test])
    write_federation(mnist, PartitionConfig("iid", 3, seed=42), data_dir)
    start = make_global(initial_weights(), 0, "init", 42)
    save_global(global_path(weights_dir, 0), start)
    trainer = ClientTrainer(E2E_CONFIG.optimizer, E2E_CONFIG.learning_rate, E2E_CONFIG.momentum)
    locals_ = [run_local_training(k, data_dir, weights_dir, E2E_CONFIG, global_path(weights_dir, 0), 0, trainer)
               for k in (1, 2, 3)]
    report = aggregate_directory(weights_dir, data_dir, out_dir, METHODS, expected_round=0)
    text = (out_dir / "resultados_agregacion.json").read_text()
    return {"data": data_dir, "weights": weights_dir, "out": out_dir, "start": start, "locals": locals_,
            "report": report, "summary": json.loads(text), "json_text": text}


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
    strict_json(e2e["json_text"])


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
    assert [u.num_examples for u in updates] == [600, 600, 600]  # n_k: the partition, hold-out included
    assert_close_weights(e2e["report"].methods["fedavg"].weights, expected)


def test_e2e_json_and_csv_agree(e2e):
    # Prepare
    summary = e2e["summary"]
    with open(e2e["out"] / "resultados_agregacion.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))

    # Assert
    assert (summary["round"], summary["start_round"], summary["next_round"]) == (1, 0, 1)
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
        assert int(row["train_examples"]) == local["train_examples"] == out.update.num_examples
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
    assert following.seed == 42
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


def test_e2e_member_from_a_stale_start_leaves_existing_outputs_untouched(e2e, tmp_path):
    # Prepare: member 2 trained again, but from another federation's round-0 weights
    weights_dir = shutil.copytree(e2e["weights"], tmp_path / "pesos")
    out_dir = shutil.copytree(e2e["out"], tmp_path / "global")
    before = {p.name: p.read_bytes() for p in out_dir.iterdir()}
    stale = load_update(update_path(weights_dir, 2))
    stale.start_sha256 = weights_sha256(initial_weights(7))
    save_update(update_path(weights_dir, 2), stale)

    # Execute / Assert
    with pytest.raises(RejectedReply, match=r"pesos_cliente_2\.pkl"):
        aggregate_directory(weights_dir, e2e["data"], out_dir, METHODS)
    assert {p.name: p.read_bytes() for p in out_dir.iterdir()} == before


# --- crash consistency: kill -9 of the aggregation while it writes ------------------------------

_KILLED_RUN = """
import os, signal, sys
import fedmnist.io as io
stage, index = sys.argv[1], int(sys.argv[2])
io._test_hook = lambda s, i: os.kill(os.getpid(), signal.SIGKILL) if (s, i) == (stage, index) else None
from fedmnist.cli import main_aggregation
sys.exit(main_aggregation(sys.argv[3:]))
"""


def _consistent_set(out_dir) -> dict:
    """The aggregation's outputs as one set: every file the JSON lists, no other, the hashes agreeing."""
    summary = json.loads((out_dir / "resultados_agregacion.json").read_text())
    listed = set(summary["files"].values())
    present = {p.name for p in out_dir.iterdir()}
    assert listed <= present, listed - present
    assert not [n for n in present if n.startswith(".")], present  # no temporary files or journals left
    assert {n for n in present if n.startswith(("modelo_global_", "matriz_confusion_"))} == {
        n for n in listed if n.startswith(("modelo_global_", "matriz_confusion_"))}
    following = load_global(out_dir / summary["files"]["next_round"])
    assert following.sha256 == summary["methods"][summary["next_from"]]["sha256"]
    return summary


@pytest.mark.slow
@pytest.mark.parametrize(("stage", "index"), [("temp", 1), ("temp", 5), ("journal", 0), ("rename", 3)])
def test_a_killed_aggregation_leaves_the_old_set_or_the_new_one(stage, index, e2e, tmp_path):
    import subprocess
    import sys

    from fedmnist.io import recover

    out_dir = tmp_path / "global"
    common = ["--weights-dir", str(e2e["weights"]), "--data-dir", str(e2e["data"]), "--out", str(out_dir)]
    first = ["--methods", "fedavg", "fedmed", "--next-from", "fedavg"]
    second = ["--methods", "fedavg", "trimmed", "--next-from", "trimmed"]
    script = [sys.executable, "-c", _KILLED_RUN]
    assert subprocess.run([*script, "none", "0", *common, *first], check=False, capture_output=True).returncode == 0
    old = _consistent_set(out_dir)

    killed = subprocess.run([*script, stage, str(index), *common, *second], check=False, capture_output=True)

    assert killed.returncode == -9, killed.stderr.decode()[-2000:]
    recover(out_dir)
    now = _consistent_set(out_dir)
    assert now["next_from"] in ("fedavg", "trimmed")
    assert now == old if now["next_from"] == "fedavg" else set(now["methods"]) == {"fedavg", "trimmed"}
    if stage == "rename":  # past the commit point: recovery completes the new set
        assert now["next_from"] == "trimmed" and not (out_dir / "modelo_global_fedmed.h5").exists()


@pytest.mark.parametrize("spoil", ["negative-v", "wrong-shape", "wrong-method", "not-a-dict"])
def test_a_bad_server_state_in_the_round_file_is_refused_like_a_bad_update(spoil, start, tmp_path, data_dir):
    from fedmnist.server_opt import init_state

    weights_dir, out_dir = tmp_path / "pesos", tmp_path / "global"
    state = init_state("fedadam", start.weights)
    state["t"] = 3
    if spoil == "negative-v":
        state["v"][0] = state["v"][0] - 1.0
    elif spoil == "wrong-shape":
        state["m"][0] = state["m"][0][:1]
    elif spoil == "wrong-method":
        state["method"] = "fedyogi"
    bad = make_global(start.weights, 0, "fedadam", 42, state=state)
    if spoil == "not-a-dict":
        bad = make_global(start.weights, 0, "fedadam", 42, state={"m": "x"})
    save_all(course_round(weights_dir, bad))

    with pytest.raises(ValidationError, match=r"pesos_globales_ronda_0\.pkl"):
        aggregate_directory(weights_dir, data_dir, out_dir, ("fedadam",))
    assert not out_dir.exists()


def test_file_flow_dp_noise_is_unpredictable_unless_seeded_and_counts_every_member(start, evaluator, test_set,
                                                                                tmp_path):
    from fedmnist.privacy import DPConfig, PrivacyAccountant

    updates = handmade_updates(start, tmp_path)
    x_test, y_test = test_set
    dp = DPConfig(1.0, 0.5)
    manifest = {**COUNTS, **dict.fromkeys(range(4, 101), 10)}  # 100 members, 3 sent updates

    def run(seeded):
        return run_aggregation(updates, x_test, y_test, ("fedavg",), evaluator=evaluator, evaluate_locals=False,
                               start=start, privacy=dp, seeded_noise=seeded, counts=manifest).methods["fedavg"]

    first, second = run(False), run(False)
    assert not all(np.array_equal(a, b) for a, b in zip(first.weights, second.weights))
    assert all(np.array_equal(a, b) for a, b in zip(run(True).weights, run(True).weights))
    # the members who sent updates were not sampled at random: q = 1, whatever the manifest lists
    assert first.epsilon == PrivacyAccountant(1.0, 3, 3, 1e-5).epsilon(1)


@pytest.mark.parametrize("spoil", ["nan", "short", "extra-key"])
def test_a_bad_scaffold_control_in_the_round_file_is_refused_by_the_server_and_the_members(
        spoil, start, tmp_path, data_dir, small_federation, capsys):
    from fedmnist.cli import main

    weights_dir, out_dir = tmp_path / "pesos", tmp_path / "global"
    control = [np.zeros_like(w) for w in start.weights]
    state = {"control": control}
    if spoil == "nan":
        control[1] = np.full_like(control[1], np.nan)
    elif spoil == "short":
        state["control"] = control[:-1]
    else:
        state["extra"] = 1
    bad = make_global(start.weights, 0, "scaffold", 42, state=state)
    updates = course_round(weights_dir, bad)
    for u in updates:
        u.control_delta = [np.zeros_like(w) for w in start.weights]
    save_all(updates)

    with pytest.raises(ValidationError, match=r"pesos_globales_ronda_0\.pkl"):
        aggregate_directory(weights_dir, data_dir, out_dir, ("scaffold",))
    assert not out_dir.exists()
    member = tmp_path / "miembro"
    code = main(["train", "--client", "1", "--data-dir", str(small_federation), "--global-weights",
                 str(global_path(weights_dir, 0)), "--optimizer", "sgd", "--momentum", "0", "--out", str(member)])
    assert code != 0 and "pesos_globales_ronda_0.pkl" in capsys.readouterr().err
    assert not member.exists() or not any(member.iterdir())
