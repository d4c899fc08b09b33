"""Hostile input: files built to exhaust the loaders are refused quickly, in bounded memory, by name.

Every hostile file is made here. Each load runs in a fresh Python process (``probe``) that measures
the refusal itself: wall time, the peak of memory traced by ``tracemalloc`` (which sees numpy's and
Python's allocations, even ones the kernel would only map lazily) and the growth of the resident set
(``ru_maxrss``). The process has an address-space limit as a safety net for the machine running the
tests; the assertions on the error message show the refusal came from the check, not from that net.
"""

from __future__ import annotations

import codecs
import io
import json
import os
import pickle
import struct
import subprocess
import sys
import zipfile
import zlib

import numpy as np
import pytest

from fedmnist.exchange import CHECKPOINT_LIMITS, MODEL_PARAMS, UPDATE_LIMITS, ClientUpdate, update_path

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIB = 1 << 20

PROBE = r"""
import json, resource, sys, time, tracemalloc
resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))
import fedmnist.data, fedmnist.exchange, fedmnist.federation_files
from fedmnist.errors import FedMnistError
expression, path, warm, traced = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "1"
scope = {"fedmnist": fedmnist, "path": path}
exec(warm, scope)

def run():
    try:
        value = eval(expression, scope)
        return "loaded", repr(value)[:200]
    except FedMnistError as exc:
        return "refused", str(exc)

rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
outcome, message = run()  # timed without tracemalloc, which slows Python down several times
seconds = time.perf_counter() - start
rss_growth = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) * 1024
peak = None
if traced:  # again, to measure the peak of allocations
    tracemalloc.start()
    assert run() == (outcome, message)
    peak = tracemalloc.get_traced_memory()[1]
print(json.dumps({"outcome": outcome, "message": message, "seconds": seconds, "peak": peak,
                  "rss_growth": rss_growth}))
"""

LOAD_UPDATE = "fedmnist.exchange.load_update(path)"
LOAD_CHECKPOINT = "fedmnist.exchange.safe_load_pickle(path, fedmnist.exchange.CHECKPOINT_LIMITS)"
LOAD_PARTITION = "fedmnist.data.load_partition_raw(path)"
LOAD_MNIST = "fedmnist.data.load_raw_mnist(path)"
READ_MANIFEST = "fedmnist.federation_files.read_manifest(path)"


def probe(expression: str, path, warm: str = "pass", timeout: float = 60, traced: bool = True,
          first_env: dict[str, str] | None = None) -> dict:
    """Run ``expression`` on ``path`` in a fresh process; its outcome, message, seconds and memory.

    ``traced=False`` skips the second run under ``tracemalloc`` (``peak`` is then None) for loads of
    millions of operations, which tracemalloc slows down several times; ``rss_growth`` still bounds them.
    ``first_env`` opens the process's environment (what ``/proc/self/environ`` starts with).
    """
    env = dict(first_env or {})
    env.update(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", PROBE, expression, str(path), warm, "1" if traced else "0"], check=False,
                          capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def assert_refused(result: dict, path, *fragments: str, seconds: float = 5.0, memory: int = 64 * MIB) -> None:
    """Refused with a message naming the file and saying why, fast and within ``memory`` bytes.

    Refusals take well under a second on an idle machine; the bound leaves room for shared CPUs.
    """
    assert result["outcome"] == "refused", result
    assert str(path) in result["message"], result["message"]
    for fragment in fragments:
        assert fragment in result["message"], result["message"]
    assert "\n" not in result["message"] and len(result["message"]) < 600
    assert result["seconds"] < seconds, result
    assert result["peak"] is None or result["peak"] < memory, result
    assert result["rss_growth"] < memory + 64 * MIB, result


# --- pickles ----------------------------------------------------------------------------------------


class Reduce:
    """Pickles as ``func(*args)`` (then ``__setstate__(state)`` if a state is given)."""

    def __init__(self, func, args, state=None):
        self.func, self.args, self.state = func, args, state

    def __reduce__(self):
        return (self.func, self.args) if self.state is None else (self.func, self.args, self.state)


RECONSTRUCT = np._core.multiarray._reconstruct
FROMBUFFER = np._core.numeric._frombuffer


def shared_lists(depth: int, width: int) -> bytes:
    """Lists of ``width`` references to the list below: tiny, but ``width**depth`` items as a tree."""
    node: list = []
    for _ in range(depth):
        node = [node] * width
    return pickle.dumps(node, protocol=4)


def shared_dicts(depth: int) -> bytes:
    node: dict = {}
    for _ in range(depth):
        node = {"a": node, "b": node, "c": [node, node]}
    return pickle.dumps({"format": "fedmnist-client-update", "metrics": node}, protocol=4)


def tuple_key_hash_bomb(depth: int) -> bytes:
    """{t: 1} with t = (t', t'), t' = (t'', t''), ...: hashing t takes 2**depth steps.

    Written opcode by opcode: building it in Python to pickle it would itself take that long.
    """
    ops = [b"\x80\x04}", b")\x94"]  # PROTO 4, EMPTY_DICT; EMPTY_TUPLE, MEMOIZE (memo 0)
    for level in range(depth):
        get = b"j" + struct.pack("<I", level)  # LONG_BINGET level
        ops.append(b"0" + get + get + b"\x86\x94")  # POP, two GETs, TUPLE2, MEMOIZE
    ops.append(b"K\x01s.")  # BININT1 1, SETITEM, STOP
    return b"".join(ops)


def nested_lists(depth: int) -> bytes:
    """A list inside a list ... ``depth`` levels deep (EMPTY_LIST x depth, APPEND x depth-1)."""
    return b"\x80\x04" + b"]" * depth + b"a" * (depth - 1) + b"."


def cycle() -> bytes:
    node: list = []
    node.append(node)
    return pickle.dumps(node, protocol=4)


def operation_flood(count: int) -> bytes:
    return b"\x80\x04" + b"N0" * count + b"N."  # NONE, POP, ...


def huge_bytearray() -> bytes:
    return b"\x80\x05\x96" + struct.pack("<Q", 1 << 40) + b"."  # BYTEARRAY8 of a terabyte


def encode_amplification() -> bytes:
    text = "a" * MIB  # stored once, encoded a thousand times: a gigabyte from one megabyte
    return pickle.dumps([Reduce(codecs.encode, (text, "latin1")) for _ in range(1000)], protocol=4)


MERSENNE_61 = 2**61 - 1
"""Python hashes an integer modulo this prime: k * MERSENNE_61 hashes to 0 for every k."""


def long1(value: int) -> bytes:
    """The LONG1 opcode pushing ``value``."""
    data = value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(data)]) + data


def colliding_ints(count: int) -> list[int]:
    """``count`` distinct integers with one hash: as set members or dict keys, each insertion compares
    with every earlier one, so the container costs count**2 / 2 comparisons."""
    return [k * MERSENNE_61 for k in range(1, count + 1)]


def colliding_dict(count: int) -> bytes:
    """{k * (2**61 - 1): None, ...} written opcode by opcode (EMPTY_DICT, MARK, key/value pairs, SETITEMS)."""
    return b"\x80\x04}(" + b"".join(long1(k) + b"N" for k in colliding_ints(count)) + b"u."


def colliding_set(count: int, frozen: bool = False) -> bytes:
    """A set (EMPTY_SET, MARK, members, ADDITEMS) or frozenset (MARK, members, FROZENSET) of colliding ints."""
    members = b"".join(long1(k) for k in colliding_ints(count))
    return b"\x80\x04(" + members + b"\x91." if frozen else b"\x80\x04\x8f(" + members + b"\x90."


def colliding_memo(count: int) -> bytes:
    """Protocol 0: None stored under ``count`` colliding memo indices (PUT takes any decimal integer)."""
    return b"N" + b"".join(b"p%d\n" % k for k in colliding_ints(count)) + b"."


def array_without_data() -> bytes:
    """An array made by numpy's reconstructor whose state (its data) never comes: uninitialised memory."""
    return pickle.dumps([Reduce(RECONSTRUCT, (np.ndarray, (MODEL_PARAMS // 4,), b"f4"))], protocol=4)


HOSTILE_PICKLES = {
    "hash-collision-dict-keys": (lambda: colliding_dict(49_000), ["integers must be smaller than"]),
    "hash-collision-set": (lambda: colliding_set(90_000), ["sets are not allowed"]),
    "hash-collision-frozenset": (lambda: colliding_set(90_000, frozen=True), ["sets are not allowed"]),
    "hash-collision-memo": (lambda: colliding_memo(90_000), ["memo index outside"]),
    "float-dict-key": (lambda: pickle.dumps({0.5: 1}, protocol=4), ["dict keys must be strings or small integers"]),
    "array-without-data": (array_without_data, ["built without their data", "uninitialised memory"]),
    "shared-lists": (lambda: shared_lists(24, 10), ["expands to more than 100,000 items"]),
    "shared-dicts": (lambda: shared_dicts(14), ["expands to more than 100,000 items"]),
    "tuple-key-hash": (lambda: tuple_key_hash_bomb(200), ["dict keys must be strings or small integers"]),
    "deep-nesting": (lambda: nested_lists(1000), ["nested more than 32 levels"]),
    "very-deep-nesting": (lambda: nested_lists(300_000), ["more than 100,000 pickle operations"]),
    "cycle": (cycle, ["refers to itself"]),
    "operation-flood": (lambda: operation_flood(2_000_000), ["more than 100,000 pickle operations"]),
    "reconstruct-huge-shape": (
        lambda: pickle.dumps(Reduce(RECONSTRUCT, (np.ndarray, (10**6, 10**6), b"f8")), protocol=4),
        ["declares 8,000,000,000,000 bytes"]),
    "setstate-huge-shape": (
        lambda: pickle.dumps(Reduce(RECONSTRUCT, (np.ndarray, (0,), b"b"),
                                    (1, (50_000, 50_000), np.dtype("f8"), False, b"")), protocol=4),
        ["declares 20,000,000,000 bytes"]),
    "setstate-lying-shape": (
        lambda: pickle.dumps(Reduce(RECONSTRUCT, (np.ndarray, (0,), b"b"),
                                    (1, (1000,), np.dtype("f8"), False, b"\x00" * 8)), protocol=4),
        ["declares 8,000 bytes but holds 8"]),
    "frombuffer-huge-shape": (
        lambda: pickle.dumps(Reduce(FROMBUFFER, (b"", np.dtype("f8"), (10**6, 10**6), "C")), protocol=5),
        ["declares 8,000,000,000,000 bytes"]),
    "ndarray-called": (
        lambda: pickle.dumps(Reduce(np.ndarray, ((10**5, 10**5), "f8")), protocol=4),
        ["refusing to call 'ndarray'"]),
    "huge-bytearray": (huge_bytearray, ["declares 1,099,511,627,776 bytes"]),
    "encode-amplification": (encode_amplification, ["declares 1,048,576 bytes, more than"]),
    "encode-hex-chain": (
        lambda: pickle.dumps(Reduce(codecs.encode, (Reduce(codecs.encode, (b"ab", "hex")), "hex")), protocol=4),
        ["only latin-1"]),
    "huge-integer": (lambda: pickle.dumps([1 << 8_000_000], protocol=4), ["an integer of 8,000,001 bits"]),
    "structured-dtype": (lambda: pickle.dumps(np.zeros(3, dtype=[("a", "i4"), ("b", "f8")]), protocol=4),
                         ["is not allowed (only plain numbers and text)"]),
    "dtype-without-state": (
        lambda: pickle.dumps(Reduce(RECONSTRUCT, (np.ndarray, (0,), Reduce(np.dtype, ("f8", False, True)))),
                             protocol=4),
        ["a dtype is used before its state was set"]),
    "object-array": (lambda: pickle.dumps(np.array([1.0, "x"], dtype=object), protocol=4),
                     ["arrays of Python objects are not allowed"]),
}


@pytest.mark.parametrize("name", list(HOSTILE_PICKLES))
def test_hostile_pickle_is_refused_fast_in_bounded_memory(tmp_path, name):
    # Prepare
    build, fragments = HOSTILE_PICKLES[name]
    path = tmp_path / "pesos_cliente_1.pkl"
    path.write_bytes(build())
    assert path.stat().st_size < UPDATE_LIMITS.max_bytes  # the size cap alone does not stop it

    # Execute
    result = probe(LOAD_UPDATE, path)

    # Assert
    assert_refused(result, path, "unsafe or invalid pickle", *fragments)


def test_every_opcode_has_a_handler_and_the_checked_ones_are_wired():
    # Prepare
    from pickletools import opcodes

    from fedmnist.safe_pickle import _Unpickler

    table = _Unpickler._dispatch

    # Assert: no opcode falls through to pickle's own (unchecked) handler where one is overridden
    assert {op.code.encode("latin-1")[0] for op in opcodes} <= set(table)
    for opcode in (pickle.BUILD, pickle.REDUCE, pickle.NEWOBJ, pickle.INST, pickle.SETITEM, pickle.SETITEMS,
                   pickle.APPEND, pickle.BYTEARRAY8, pickle.LONG4, pickle.FROZENSET, pickle.EXT1):
        handler = table[opcode[0]]
        assert handler is getattr(_Unpickler, handler.__name__) and handler.__qualname__.startswith("_Unpickler")


def test_hash_collision_control_the_integers_share_one_hash():
    # Control: the crafted keys really are distinct integers with a single hash value
    keys = colliding_ints(1000)
    assert len(set(keys)) == 1000 and {hash(k) for k in keys} == {0}
    assert len(colliding_memo(90_000)) > 2 * MIB  # the size of the update the issue reports


def test_legitimate_integer_keys_and_arrays_with_data_load(tmp_path):
    # Prepare: a checkpoint's client ids are small integer keys; arrays carry their data
    path = tmp_path / "checkpoint.pkl"
    path.write_bytes(pickle.dumps({"client_state": {"scaffold": {1: [np.ones(3, np.float32)], 2**31 - 1: []}}},
                                  protocol=4))

    # Execute
    result = probe(LOAD_CHECKPOINT, path)

    # Assert
    assert result["outcome"] == "loaded", result


def test_link_to_proc_environ_never_puts_the_environment_in_the_message(tmp_path):
    # Prepare: /proc/self/environ reports size 0 and starts with "LEAK..." (L: the LONG opcode, whose
    # int() error would quote the line it read)
    secret = "s3cr3t-value-that-must-not-be-printed"
    path = tmp_path / "pesos_cliente_1.pkl"
    path.symlink_to("/proc/self/environ")

    # Execute
    result = probe(LOAD_UPDATE, path, first_env={"LEAK_MARKER": secret})

    # Assert
    assert_refused(result, path, "corrupted pickle")
    assert secret not in result["message"] and "LEAK" not in result["message"]


def test_link_to_proc_environ_as_mnist_never_puts_the_environment_in_the_message(tmp_path):
    # Prepare
    secret = "s3cr3t-value-that-must-not-be-printed"
    path = tmp_path / "mnist.npz"
    path.symlink_to("/proc/self/environ")

    # Execute
    result = probe(LOAD_MNIST, path, first_env={"LEAK_MARKER": secret})

    # Assert
    assert_refused(result, path, "MNIST file")
    assert secret not in result["message"] and "LEAK" not in result["message"]


def test_shared_lists_control_the_old_walk_would_not_finish():
    # Control: the expanded tree of the "shared-lists" file really is astronomically large
    depth, width = 24, 10
    assert width**depth > 10**20 and len(shared_lists(depth, width)) < 1000


def test_tuple_key_control_hashing_the_key_is_exponential():
    # Control: hashing the nested-tuple key hashes its leaf 2**depth times (tuples cache no hash)
    class Leaf:
        calls = 0

        def __hash__(self):
            Leaf.calls += 1
            return 0

    key: object = Leaf()
    for _ in range(16):
        key = (key, key)

    hash(key)

    assert Leaf.calls == 2**16


def test_checkpoint_limits_refuse_an_operation_flood_within_seconds(tmp_path):
    # Prepare: twice the operations a checkpoint may run, in a file far below its size cap
    path = tmp_path / "checkpoint.pkl"
    path.write_bytes(operation_flood(CHECKPOINT_LIMITS.max_nodes))
    assert path.stat().st_size < CHECKPOINT_LIMITS.max_bytes

    # Execute
    result = probe(LOAD_CHECKPOINT, path, timeout=120, traced=False)

    # Assert: the pure-Python unpickler's worst case stays within seconds
    assert_refused(result, path, "more than 3,000,000 pickle operations", memory=256 * MIB)


def test_a_large_legitimate_checkpoint_loads(tmp_path):
    # Prepare: six methods' weights with two extra states each, and 2,000 rounds of history
    weights = [np.zeros(MODEL_PARAMS // 10, np.float32) for _ in range(10)]
    rows = [{"round": r, "method": m, "test_accuracy": 0.9, "loss": 0.1, "sampled_clients": list(range(10))}
            for r in range(2000) for m in ("fedavg", "fedprox", "fedmed", "trimmed", "krum", "multikrum")]
    state = {"weights": {m: [w.copy() for w in weights] for m in "abcdef"},
             "extra": {m: [[w.copy() for w in weights] for _ in range(2)] for m in "abcdef"},
             "metrics": rows}
    path = tmp_path / "checkpoint.pkl"
    path.write_bytes(pickle.dumps(state, protocol=4))

    # Execute
    result = probe(LOAD_CHECKPOINT, path, timeout=120, traced=False)

    # Assert
    assert result["outcome"] == "loaded", result
    assert result["seconds"] < 5, result


@pytest.mark.parametrize("kind", ["oversized", "dev-zero", "fifo", "directory"])
def test_files_that_are_too_big_or_not_files(tmp_path, kind):
    # Prepare
    path = tmp_path / "pesos_cliente_1.pkl"
    if kind == "oversized":
        with open(path, "wb") as handle:  # sparse: costs no disk, but its size is over the cap
            handle.truncate(UPDATE_LIMITS.max_bytes + 1)
        fragment = "more than the"
    elif kind == "dev-zero":
        path.symlink_to("/dev/zero")
        fragment = "not a regular file"
    elif kind == "fifo":
        os.mkfifo(path)  # opening it for reading would block for ever without a writer
        fragment = "not a regular file"
    else:
        path.mkdir()
        fragment = "is a directory"

    # Execute
    result = probe(LOAD_UPDATE, path, timeout=30)

    # Assert
    assert_refused(result, path, fragment)


# --- special files wherever the project reads: refused (or ignored) unread, never waited on ----------


def special_file(path, kind: str) -> None:
    """Put a FIFO (opening it for reading blocks without a writer) or a link to an endless device at ``path``."""
    if kind == "fifo":
        os.mkfifo(path)
    else:
        path.symlink_to("/dev/zero")


SPECIAL_FILE_READERS = {
    # the member's partition, hashed against particion.json before the npz reader sees it (fedmnist train)
    "partition-hash": ("cliente_1.npz", "fedmnist.federation_files.check_file_hash(path, 'ab' * 32, 'partition file')",
                       "import fedmnist.partition"),
    "test-set-hash": ("test.npz", "fedmnist.federation_files.checked_test_file(path)", "import fedmnist.federation_files"),
    "global-weights": ("pesos_globales_ronda_0.pkl", "fedmnist.exchange.load_global(path)", "import fedmnist.model"),
    "control-file": ("control_cliente_1.pkl", "fedmnist.exchange.load_control(path, 1)", "pass"),
    "checkpoint": ("checkpoint.pkl", LOAD_CHECKPOINT, "pass"),
    "result-table": ("curso.csv", "fedmnist.experiments.read_csv(path)", "import fedmnist.experiments"),
}


@pytest.mark.parametrize("kind", ["fifo", "dev-zero"])
@pytest.mark.parametrize("reader", list(SPECIAL_FILE_READERS))
def test_special_file_is_refused_unread_by_every_reader(tmp_path, reader, kind):
    # Prepare
    name, expression, warm = SPECIAL_FILE_READERS[reader]
    path = tmp_path / name
    special_file(path, kind)
    if reader == "test-set-hash":  # a manifest that records the test set's hash
        (tmp_path / "particion.json").write_text(json.dumps(
            {"clients": [], "test": {"file": "test.npz", "sha256": "ab" * 32}}))

    # Execute
    result = probe(expression, path, warm=warm, timeout=60)

    # Assert
    assert_refused(result, path, "not a regular file")


@pytest.mark.parametrize("kind", ["fifo", "dev-zero"])
def test_stale_special_summary_in_the_output_folder_is_ignored_on_resume(tmp_path, kind):
    # Prepare: resumen.json of the previous run is a FIFO or a device (stat reports 0 bytes for both)
    path = tmp_path / "resumen.json"
    special_file(path, kind)

    # Execute
    result = probe("fedmnist.simulation._previous_summary(pathlib.Path(path))", path,
                   warm="import pathlib, fedmnist.simulation", timeout=60)

    # Assert: ignored, as a missing summary is (the run writes its own), quickly and unread
    assert result["outcome"] == "loaded" and result["message"] == "None", result
    assert result["seconds"] < 5 and result["rss_growth"] < 64 * MIB, result


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["fifo", "dev-zero"])
def test_stale_special_results_in_the_aggregation_folder_are_ignored(tmp_path, kind):
    # Prepare: resultados_agregacion.json, read to find the previous run's per-method files
    path = tmp_path / "resultados_agregacion.json"
    special_file(path, kind)

    # Execute
    result = probe("fedmnist.aggregation._previous_outputs(pathlib.Path(path).parent)", path,
                   warm="import pathlib, fedmnist.aggregation", timeout=120)

    # Assert
    assert result["outcome"] == "loaded" and result["message"] == "set()", result
    assert result["seconds"] < 5, result


# --- what an update says -----------------------------------------------------------------------------


def update_payload(**overrides) -> dict:
    """A client update with stand-in weights: these tests are refused before the weights are read."""
    update = ClientUpdate(client_id=3, round=0, num_examples=100, weights=[np.zeros(2, np.float32)],
                          start_sha256="ab" * 32, fingerprint="0123456789abcdef")
    return update.to_payload() | overrides


@pytest.mark.parametrize(
    ("overrides", "fragments"),
    [
        ({"num_examples": 10**12}, ["num_examples", "exceeds the limit of 10,000,000"]),
        ({"num_examples": 10**400}, ["num_examples", "an integer of 1329 bits"]),
        ({"num_examples": float("inf")}, ["num_examples must be a finite integer"]),
        ({"num_examples": -5}, ["num_examples must be positive"]),
        ({"client_id": 4}, ["holds the update of client 4", "says client 3"]),
    ],
    ids=["count-1e12", "count-1e400", "count-inf", "count-negative", "client-id"],
)
def test_lying_update_is_refused(tmp_path, overrides, fragments):
    # Prepare
    path = update_path(tmp_path, 3)
    path.write_bytes(pickle.dumps(update_payload(**overrides), protocol=4))

    # Execute
    result = probe(LOAD_UPDATE, path)

    # Assert
    assert_refused(result, path, *fragments)


@pytest.mark.slow
def test_global_weights_with_nan_are_refused(tmp_path):
    # Prepare
    from fedmnist.exchange import GLOBAL_FORMAT
    from fedmnist.model import initial_weights, model_fingerprint, weights_sha256

    weights = initial_weights()
    weights[0][0, 0, 0, 0] = np.nan
    path = tmp_path / "pesos_globales_ronda_0.pkl"
    path.write_bytes(pickle.dumps({"format": GLOBAL_FORMAT, "version": 1, "round": 0, "method": "init",
                                   "seed": 42, "sha256": weights_sha256(weights),
                                   "fingerprint": model_fingerprint(), "weights": weights}, protocol=4))

    # Execute: the model is built before measuring (its spec is what the weights are checked against)
    result = probe("fedmnist.exchange.load_global(path)", path,
                   warm="import fedmnist.model; fedmnist.model.weight_spec()", timeout=300)

    # Assert
    assert_refused(result, path, "NaN or infinite")


# --- npz archives ------------------------------------------------------------------------------------


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, array, allow_pickle=True)
    return buffer.getvalue()


def npy_header(shape: tuple, descr: str = "|u1") -> bytes:
    """An .npy header declaring ``shape`` with no data behind it."""
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": descr, "fortran_order": False, "shape": shape})
    return buffer.getvalue()


def write_zip(path, members: dict[str, bytes], compression=zipfile.ZIP_DEFLATED) -> None:
    with zipfile.ZipFile(path, "w", compression=compression) as archive:
        for name, data in members.items():
            archive.writestr(name, data)


def partition_members(n: int = 10) -> dict[str, bytes]:
    return {"x.npy": npy_bytes(np.zeros((n, 28, 28), np.uint8)), "y.npy": npy_bytes(np.arange(n) % 10)}


def add_zero_bomb(path, name: str, size: int) -> None:
    """Append member ``name`` of ``size`` zero bytes, deflated (about 1,000 times smaller)."""
    chunk = bytes(MIB)
    with zipfile.ZipFile(path, "a", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
        with archive.open(name, "w", force_zip64=True) as member:
            for _ in range(size // MIB):
                member.write(chunk)


def test_unused_compressed_bomb_is_never_inflated(tmp_path):
    # Prepare: a valid partition plus a member that inflates a thousandfold, to 256 MB
    path = tmp_path / "cliente_1.npz"
    write_zip(path, partition_members())
    add_zero_bomb(path, "basura.npy", 256 * MIB)
    assert path.stat().st_size < MIB

    # Execute
    result = probe(LOAD_PARTITION, path)

    # Assert: loaded, in a few megabytes
    assert result["outcome"] == "loaded", result
    assert result["peak"] < 16 * MIB and result["seconds"] < 5, result


def test_used_member_that_inflates_past_its_header_is_refused(tmp_path):
    # Prepare: 'x' says ten images, its compressed stream holds 128 MB
    path = tmp_path / "cliente_1.npz"
    members = partition_members()
    write_zip(path, {"y.npy": members["y.npy"]})
    with zipfile.ZipFile(path, "a", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
        with archive.open("x.npy", "w", force_zip64=True) as member:
            member.write(npy_header((10, 28, 28)))
            for _ in range(128):
                member.write(bytes(MIB))

    # Execute
    result = probe(LOAD_PARTITION, path)

    # Assert
    assert_refused(result, path, "'x' declares (10, 28, 28) uint8", "the archive lists 134,")


@pytest.mark.parametrize(
    ("loader", "members", "fragments"),
    [
        (LOAD_PARTITION, {"x.npy": npy_header((10**12, 28, 28)), "y.npy": npy_header((10**12,))},
         ["'x' declares 1,000,000,000,000 images; at most 100,000"]),
        (LOAD_PARTITION, {"x.npy": npy_header((10, 28, 28)), "y.npy": npy_header((1 << 40,), "<i8")},
         ["'y' has shape (1099511627776,), expected (10,)"]),
        (LOAD_PARTITION, {"x.npy": npy_header((5, 10**9, 10**9)), "y.npy": npy_header((5,))},
         ["'x' has shape (5, 1000000000, 1000000000), expected (n, 28, 28)"]),
        (LOAD_PARTITION, {"x.npy": npy_header((10, 28, 28)), "y.npy": npy_header((10,), "|O")},
         ["'y' holds Python objects"]),
        (LOAD_MNIST, {"x_train.npy": npy_header((10**9, 28, 28)), "y_train.npy": npy_header((10**9,)),
                      "x_test.npy": npy_header((10, 28, 28)), "y_test.npy": npy_header((10,))},
         ["'x_train' declares 1,000,000,000 images"]),
    ],
    ids=["images-terabyte", "labels-terabyte", "absurd-image-shape", "object-labels", "mnist-billion"],
)
def test_npz_headers_declaring_huge_or_wrong_arrays_are_refused(tmp_path, loader, members, fragments):
    # Prepare
    path = tmp_path / "datos.npz"
    write_zip(path, members)

    # Execute
    result = probe(loader, path)

    # Assert
    assert_refused(result, path, *fragments)


def test_npz_with_a_huge_central_directory_is_refused(tmp_path):
    # Prepare: 40,000 tiny members (a legitimate npz lists two or four)
    path = tmp_path / "cliente_1.npz"
    members = partition_members() | {f"m{i}": b"" for i in range(40_000)}
    write_zip(path, members, compression=zipfile.ZIP_STORED)

    # Execute
    result = probe(LOAD_PARTITION, path)

    # Assert
    assert_refused(result, path, "bytes of members, more than an npz of a few arrays needs")


def test_npz_with_another_compression_method_is_refused(tmp_path):
    # Prepare
    path = tmp_path / "cliente_1.npz"
    write_zip(path, partition_members(), compression=zipfile.ZIP_BZIP2)

    # Execute
    result = probe(LOAD_PARTITION, path)

    # Assert
    assert_refused(result, path, "uses compression method 12")


def test_oversized_npz_is_refused_before_reading(tmp_path):
    # Prepare
    path = tmp_path / "mnist.npz"
    with open(path, "wb") as handle:
        handle.truncate(1 << 40)  # sparse terabyte

    # Execute
    result = probe(LOAD_MNIST, path)

    # Assert
    assert_refused(result, path, "bytes, more than the", "allowed")


def test_damaged_member_crc_is_refused(tmp_path):
    # Prepare: a stored (uncompressed) archive with one image byte changed after writing
    path = tmp_path / "cliente_1.npz"
    members = partition_members()
    write_zip(path, members, compression=zipfile.ZIP_STORED)
    data = bytearray(path.read_bytes())
    data[data.find(members["x.npy"]) + len(members["x.npy"]) - 1] ^= 0xFF
    path.write_bytes(bytes(data))

    # Execute
    result = probe(LOAD_PARTITION, path)

    # Assert
    assert_refused(result, path, "cannot read partition file", "CRC")


# --- the federation manifest ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        ('{"clients": [{"client_id": 1, "num_examples": 1' + "0" * 400 + "}]}",
         ["client 1: num_examples", "an integer of"]),
        ('{"clients": [{"client_id": 1, "num_examples": 1e999}]}', ["num_examples must be a finite integer"]),
        ('{"clients": [{"client_id": 1, "num_examples": 10}, {"client_id": 1, "num_examples": 10}]}',
         ["client 1 appears twice"]),
        ('{"clients": [{"client_id": "1"}]}', ["clients[0].client_id must be an integer in [1, 1000000]"]),
        ('{"clients": [{"client_id": 1, "sha256": 5}]}', ["malformed sha256"]),
        ("[" * 200_000 + "]" * 200_000, ["not a valid JSON manifest"]),
        ('{"clients": [' + "1" * 10_000 + "]}", ["not a valid JSON manifest"]),
        ("[]", ["must be a JSON object"]),
        ("\xff\xfe", ["not a valid JSON manifest"]),
    ],
    ids=["count-1e400", "count-inf", "duplicate", "id-type", "sha256", "deep", "long-int", "list", "bytes"],
)
def test_hostile_manifest_is_refused(tmp_path, text, fragments):
    # Prepare
    path = tmp_path / "particion.json"
    path.write_bytes(text.encode("latin-1"))

    # Execute
    result = probe(READ_MANIFEST, tmp_path)

    # Assert
    assert_refused(result, path, *fragments)


def test_oversized_manifest_is_refused(tmp_path):
    # Prepare
    path = tmp_path / "particion.json"
    with open(path, "wb") as handle:
        handle.truncate(1 << 30)

    # Execute
    result = probe(READ_MANIFEST, tmp_path)

    # Assert
    assert_refused(result, path, "more than the 16,777,216 allowed")


def test_zlib_is_what_makes_the_bomb_small():
    # Control for the compressed-bomb tests: deflate shrinks zeros about a thousandfold
    assert len(zlib.compress(bytes(64 * MIB), 9)) < 128 * 1024


def test_manifest_counts_of_a_real_federation(small_federation):
    # Prepare
    from fedmnist.federation_files import manifest_counts, read_manifest

    # Execute
    counts = manifest_counts(read_manifest(small_federation))

    # Assert
    assert counts == {1: 200, 2: 200, 3: 200}
    assert manifest_counts(None) is None
    assert manifest_counts({"clients": [{"client_id": 1}]}) is None  # no counts stated
