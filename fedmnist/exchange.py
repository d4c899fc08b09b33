"""Weight files exchanged between team members and the server, read without running their code.

``pesos_cliente_N.pkl`` (a client update) and ``pesos_globales_ronda_R.pkl`` (the global weights of a
round) are pickles, as the course names them, but they hold only plain data: a dict of builtins and
numpy arrays. A teammate's pickle could run arbitrary code when unpickled, or cost unbounded time and
memory, so every read goes through ``safe_load_pickle`` (``fedmnist.safe_pickle``), whose unpickler
admits numpy arrays and builtin containers and nothing else, within limits sized from the model.

What a file says is then checked, not trusted: the client id must match the file name, the sample
count must be a plausible positive integer (``check_num_examples``), the weights must be the shared
CNN's, finite (``check_weights``). Both helpers serve replies that arrive by other routes (Flower).
"""

from __future__ import annotations

import hashlib
import logging
import math
import pickle
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from fedmnist.config import check_int
from fedmnist.errors import FedMnistError, UpdateFileError, ValidationError
from fedmnist.io import atomic_write_bytes, quote
from fedmnist.safe_pickle import PickleLimits, load_pickle

log = logging.getLogger(__name__)

UPDATE_FORMAT = "fedmnist-client-update"
GLOBAL_FORMAT = "fedmnist-global-weights"
FORMAT_VERSION = 1
CONTROL_FORMAT = "fedmnist-scaffold-control"
UPDATE_PATTERN = "pesos_cliente_*.pkl"
_CLIENT_ID_RE = re.compile(r"pesos_cliente_([1-9][0-9]{0,8})\.pkl")  # ASCII digits, no leading zero

MODEL_PARAMS = 390_410
"""Parameters of the shared CNN (``fedmnist.model.build_model``); a test keeps this equal to the model."""
MODEL_BYTES = MODEL_PARAMS * 4
"""Bytes of the CNN's weights as float32: about 1.56 MB, what an update or a global file mostly holds."""

UPDATE_LIMITS = PickleLimits(4 * MODEL_BYTES + (1 << 20), 100_000, what="client update")
"""An update: four times the float32 weights (room for float64 weights) plus 1 MiB of metadata."""
GLOBAL_LIMITS = PickleLimits(4 * MODEL_BYTES + (1 << 20), 100_000, what="global-weights file")
"""Global weights: as an update."""
CHECKPOINT_MAX_NODES = 3_000_000
"""Pickle operations a checkpoint may run: a history of thousands of rounds of several methods takes
well under a million, and three million take a couple of seconds to refuse at worst."""


def checkpoint_limits(model_copies: int) -> PickleLimits:
    """Limits for a checkpoint holding at most ``model_copies`` copies of the CNN's weights.

    Count every method's global weights plus whatever state travels with them (server-optimiser
    moments, SCAFFOLD's server control and one control per client): e.g. ``3 * len(methods) +
    num_clients``. Each copy gets 10% slack, and 16 MiB are added for the history and configuration.
    """
    check_int(model_copies, "model_copies", 1, error=ValueError)
    return PickleLimits(model_copies * MODEL_BYTES * 11 // 10 + (16 << 20), CHECKPOINT_MAX_NODES,
                        what="checkpoint")


CHECKPOINT_LIMITS = checkpoint_limits(128)
"""A checkpoint of up to 128 model copies (about 236 MB): six methods with two states each, plus a
hundred SCAFFOLD client controls. Larger federations pass ``checkpoint_limits(n)``."""
DEFAULT_LIMITS = replace(CHECKPOINT_LIMITS, what="pickle file")
"""What ``safe_load_pickle`` allows when the caller does not say what the file is."""

MAX_NUM_EXAMPLES = 10_000_000
"""Largest sample count a client may claim: far above MNIST's 60,000 training images, far below
anything that overflows (a claim of 10**12 would otherwise own a weighted average)."""
MAX_INT_FIELD = 10**9
"""Largest round, client id, epoch count or batch size an update may state."""
_HEX = re.compile(r"[0-9a-f]{1,64}")


def safe_load_pickle(path: str | Path, limits: PickleLimits = DEFAULT_LIMITS):
    """Unpickle ``path`` admitting only numpy arrays, numbers, strings and builtin containers.

    The file's size, the bytes of data it can make the reader allocate, the operations it runs and
    the size and depth of the result are bounded by ``limits`` (see ``fedmnist.safe_pickle``); pass
    ``UPDATE_LIMITS``, ``GLOBAL_LIMITS`` or ``CHECKPOINT_LIMITS`` for the kind of file read.

    Raises:
        UpdateFileError: the file is missing, too large, truncated, garbled, refers to anything else
            (for example a function that would run code) or exceeds a limit; the message names the file.
    """
    return load_pickle(path, limits)


class WeightsError(UpdateFileError, ValidationError):
    """A readable update whose weights cannot be aggregated: both a bad file and a bad reply."""


def _brief(value) -> str:
    """A value for an error message, never thousands of digits long."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool) and abs(int(value)) >= 10**15:
        return f"an integer of {int(value).bit_length()} bits"
    text = repr(value)
    return text if len(text) <= 40 else text[:40] + "…"


def check_num_examples(
    value, source: str, expected: int | None = None, *, error: type[FedMnistError] = ValidationError
) -> int:
    """``value`` as a sample count: a finite integer in [1, MAX_NUM_EXAMPLES], equal to ``expected`` if given.

    Integer-valued floats (as some transports deliver numbers) are accepted; booleans, NaN, infinities
    and anything else are refused, and a huge integer never reaches ``str`` (no crash at 10**400).

    Raises:
        error: naming ``source`` (a file path, ``node 123``) and the problem.
    """
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer, float, np.floating)):
        raise error(f"{source}: num_examples must be an integer, found {type(value).__name__}")
    if isinstance(value, (float, np.floating)):
        if not math.isfinite(value) or not float(value).is_integer():
            raise error(f"{source}: num_examples must be a finite integer, found {_brief(value)}")
        value = int(value)
    count = int(value)
    if count < 1:
        raise error(f"{source}: num_examples must be positive (found {_brief(count)})")
    if count > MAX_NUM_EXAMPLES:
        raise error(
            f"{source}: num_examples {_brief(count)} exceeds the limit of {MAX_NUM_EXAMPLES:,} "
            "(MNIST has 60,000 training images)"
        )
    if expected is not None and count != expected:
        raise error(
            f"{source}: claims {count} training examples, but the federation manifest (particion.json) "
            f"gives this client {expected}"
        )
    return count


def check_weights(weights, source: str, *, error: type[FedMnistError] = ValidationError) -> list[np.ndarray]:
    """``weights`` as the shared CNN's float32 arrays, all finite.

    The shapes are compared with ``fedmnist.model.weight_spec()`` before anything is converted, so a
    wrong array costs nothing; floating arrays of another precision are converted to fresh float32
    arrays (float32 ones are returned as they are) and then checked finite, so a float64 value too
    large for float32 is refused rather than turned into infinity.

    Raises:
        error: naming ``source`` and the first problem (not a list, wrong count, shape or dtype,
            NaN or infinite values).
    """
    from fedmnist.model import weights_mismatch

    if not isinstance(weights, (list, tuple)) or not weights:
        raise error(f"{source}: 'weights' must be a non-empty list of numpy arrays")
    for i, array in enumerate(weights):
        if not isinstance(array, np.ndarray):
            raise error(f"{source}: weight {i} is a {type(array).__name__}, not a numpy array")
        if not np.issubdtype(array.dtype, np.floating):
            raise error(f"{source}: weight {i} has dtype {array.dtype}, expected floating point")
    problem = weights_mismatch(list(weights))
    if problem:
        raise error(f"{source}: these weights do not fit the shared CNN: {problem}")
    with np.errstate(over="ignore"):  # a value too large for float32 becomes inf, refused just below
        converted = [a if a.dtype == np.float32 else a.astype(np.float32) for a in weights]
    for i, array in enumerate(converted):
        if not np.isfinite(array).all():
            raise error(f"{source}: weight {i} holds NaN or infinite values")
    return converted


def _dump(path: str | Path, payload: dict) -> None:
    atomic_write_bytes(path, pickle.dumps(payload, protocol=4))


def _plain(value):
    """Metrics as builtins only (numpy scalars to float/int), so files stay plain data."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


# --- client updates ---------------------------------------------------------------------------


@dataclass
class ClientUpdate:
    """One client's trained weights plus what the server needs to check and weight them."""

    client_id: int
    round: int
    num_examples: int | None
    weights: list[np.ndarray]
    start_sha256: str | None
    fingerprint: str | None
    mu: float = 0.0
    epochs: int | None = None
    batch_size: int | None = None
    metrics: dict = field(default_factory=dict)
    bare: bool = False
    path: Path | None = None
    control_delta: list[np.ndarray] | None = None
    """SCAFFOLD's ``Δc_i`` (clients that trained with its correction), else None."""

    def to_payload(self) -> dict:
        """The plain dict stored in the pickle."""
        return {
            "format": UPDATE_FORMAT,
            "version": FORMAT_VERSION,
            "client_id": int(self.client_id),
            "round": int(self.round),
            "num_examples": int(self.num_examples) if self.num_examples is not None else None,
            "start_sha256": self.start_sha256,
            "fingerprint": self.fingerprint,
            "mu": float(self.mu),
            "epochs": self.epochs,
            "batch_size": self.batch_size,
            "metrics": _plain(self.metrics),
            "weights": [np.ascontiguousarray(w, dtype=np.float32) for w in self.weights],
            **({} if self.control_delta is None else
               {"control_delta": [np.ascontiguousarray(c, dtype=np.float32) for c in self.control_delta]}),
        }


def update_path(out_dir: str | Path, client_id: int) -> Path:
    """``out_dir/pesos_cliente_N.pkl``."""
    return Path(out_dir) / f"pesos_cliente_{client_id}.pkl"


def save_update(path: str | Path, update: ClientUpdate) -> None:
    """Write a client update atomically."""
    _dump(path, update.to_payload())


def _require(path: Path, payload: dict, key: str, types, allow_none: bool = False):
    if key not in payload:
        raise UpdateFileError(f"{path}: missing field '{key}'")
    value = payload[key]
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, types):
        raise UpdateFileError(f"{path}: field '{key}' has type {type(value).__name__}")
    return value


def _require_int(path: Path, payload: dict, key: str, low: int, allow_none: bool = False) -> int | None:
    value = _require(path, payload, key, int, allow_none)
    if value is not None and not low <= value <= MAX_INT_FIELD:
        raise UpdateFileError(f"{path}: field '{key}' must be in [{low}, {MAX_INT_FIELD:,}] (found {_brief(value)})")
    return value


def _require_hex(path: Path, payload: dict, key: str, length: int | None) -> str | None:
    value = _require(path, payload, key, str, allow_none=True)
    if value is not None and not (_HEX.fullmatch(value) and (length is None or len(value) == length)):
        raise UpdateFileError(f"{path}: field '{key}' is not a hexadecimal hash (found {_brief(value)})")
    return value


def client_id_from_name(path: str | Path) -> int | None:
    """N for a file named ``pesos_cliente_N.pkl``, else None."""
    match = _CLIENT_ID_RE.fullmatch(Path(path).name)
    return int(match.group(1)) if match else None


def load_update(path: str | Path, limits: PickleLimits = UPDATE_LIMITS) -> ClientUpdate:
    """Read and check a client update.

    The client id inside the file must match the file name (``pesos_cliente_N.pkl``); the sample
    count, when stated, must pass ``check_num_examples``; the weights must be the shared CNN's,
    finite (``check_weights``). Also accepts a bare pickled ``model.get_weights()`` list (the original
    notebook style), with a warning: its sample count, round and starting point are unknown, and the
    client id is taken from the file name.

    Raises:
        UpdateFileError: unreadable, unsafe or oversized file, wrong format or field, client id that
            differs from the file name, implausible sample count.
        WeightsError: (both an UpdateFileError and a ValidationError) weights that are not a list of
            floating arrays, do not fit the CNN or are not finite.
    """
    path = Path(path)
    payload = safe_load_pickle(path, limits)
    named_id = client_id_from_name(path)
    if isinstance(payload, (list, tuple)):
        weights = check_weights(payload, str(path), error=WeightsError)
        log.warning(
            "%s: bare list of weights (no metadata): sample count, round and starting point unknown",
            path,
        )
        return ClientUpdate(
            client_id=named_id if named_id is not None else 0,
            round=-1,
            num_examples=None,
            weights=weights,
            start_sha256=None,
            fingerprint=None,
            bare=True,
            path=path,
        )
    if not isinstance(payload, dict):
        raise UpdateFileError(f"{path}: expected a fedmnist update dict, found {type(payload).__name__}")
    if payload.get("format") != UPDATE_FORMAT:
        hint = " (this is a global-weights file)" if payload.get("format") == GLOBAL_FORMAT else ""
        raise UpdateFileError(
            f"{path}: not a fedmnist client update (format {_brief(payload.get('format'))}){hint}"
        )
    if payload.get("version") != FORMAT_VERSION:
        raise UpdateFileError(f"{path}: unsupported update version {_brief(payload.get('version'))}")
    client_id = _require_int(path, payload, "client_id", 1)
    if named_id is not None and client_id != named_id:
        raise UpdateFileError(
            f"{path}: holds the update of client {client_id}, but its file name says client {named_id}; "
            f"rename it pesos_cliente_{client_id}.pkl if that is whose it is"
        )
    num_examples = _require(path, payload, "num_examples", (int, float), allow_none=True)
    if num_examples is not None:
        num_examples = check_num_examples(num_examples, str(path), error=UpdateFileError)
    mu = _require(path, payload, "mu", (int, float))
    if isinstance(mu, int) and abs(mu) > MAX_INT_FIELD:  # math.isfinite would overflow on a huge int
        raise UpdateFileError(f"{path}: mu must be a finite number >= 0 (found {_brief(mu)})")
    if not (math.isfinite(mu) and mu >= 0):
        raise UpdateFileError(f"{path}: mu must be a finite number >= 0 (found {_brief(mu)})")
    metrics = payload.get("metrics") or {}
    if not isinstance(metrics, dict):
        raise UpdateFileError(f"{path}: field 'metrics' must be a dict")
    control_delta = payload.get("control_delta")
    if control_delta is not None:
        control_delta = check_weights(control_delta, f"{path}, field 'control_delta' (SCAFFOLD)", error=WeightsError)
    return ClientUpdate(
        client_id=client_id,
        round=_require_int(path, payload, "round", 0),
        num_examples=num_examples,
        weights=check_weights(payload.get("weights"), str(path), error=WeightsError),
        start_sha256=_require_hex(path, payload, "start_sha256", 64),
        fingerprint=_require_hex(path, payload, "fingerprint", None),
        mu=float(mu),
        epochs=_require_int(path, payload, "epochs", 0, allow_none=True),
        batch_size=_require_int(path, payload, "batch_size", 1, allow_none=True),
        metrics=metrics,
        path=path,
        control_delta=control_delta,
    )


def find_updates(weights_dir: str | Path) -> list[Path]:
    """Every ``pesos_cliente_N.pkl`` in a directory, sorted by client number.

    A file that matches ``pesos_cliente_*.pkl`` but whose N is not a client id (``pesos_cliente_1234567890.pkl``,
    ``pesos_cliente_1 (copia).pkl``, a newline in the name) is left out with a warning naming it, so a
    member's misnamed update is never dropped silently.
    """
    weights_dir = Path(weights_dir)
    paths = []
    for path in weights_dir.glob(UPDATE_PATTERN):
        if client_id_from_name(path) is None:
            log.warning("%s: ignored: its name does not parse as a client update (pesos_cliente_N.pkl with N "
                        "a client id of at most 9 digits); rename it if it is one", quote(path, 300))
        else:
            paths.append(path)
    return sorted(paths, key=client_id_from_name)


# --- global weights ---------------------------------------------------------------------------


@dataclass
class GlobalWeights:
    """The global model of a round: the starting point every client of the next round shares.

    ``state`` is the server state of ``method`` after the round that produced these weights (a server
    optimiser's moments, DP-FedAvg's clip norm and releases), so the manual multi-round flow carries it
    from one aggregation to the next; None for stateless methods. Its stored hash is checked on loading
    and its contents by the method that resumes from it.
    """

    round: int
    weights: list[np.ndarray]
    sha256: str
    fingerprint: str
    seed: int | None = None
    method: str = "init"
    path: Path | None = None
    state: dict | None = None


def global_path(out_dir: str | Path, round_: int) -> Path:
    """``out_dir/pesos_globales_ronda_R.pkl``."""
    return Path(out_dir) / f"pesos_globales_ronda_{round_}.pkl"


def save_global(path: str | Path, gw: GlobalWeights) -> None:
    """Write global weights atomically."""
    _dump(path, {
        "format": GLOBAL_FORMAT,
        "version": FORMAT_VERSION,
        "round": int(gw.round),
        "method": gw.method,
        "seed": gw.seed,
        "sha256": gw.sha256,
        "fingerprint": gw.fingerprint,
        "weights": [np.ascontiguousarray(w, dtype=np.float32) for w in gw.weights],
        **({"server_state": gw.state, "server_state_sha256": state_sha256(gw.state)} if gw.state else {}),
    })


def state_sha256(state: object) -> str:
    """SHA-256 of a server state (nested dicts, lists, numpy arrays, numbers, strings) in a canonical
    order, stored beside it so a corrupted round file is refused like corrupted weights."""
    digest = hashlib.sha256()

    def feed(value: object) -> None:
        if isinstance(value, dict):
            digest.update(b"d%d;" % len(value))
            for key in sorted(value, key=repr):
                feed(key)
                feed(value[key])
        elif isinstance(value, (list, tuple)):
            digest.update(b"l%d;" % len(value))
            for item in value:
                feed(item)
        elif isinstance(value, (np.ndarray, np.generic)):
            array = np.ascontiguousarray(value)
            digest.update(f"a{array.dtype.str}{array.shape};".encode())
            digest.update(array.tobytes())
        else:
            digest.update(f"s{type(value).__name__}:{value!r};".encode())

    feed(state)
    return digest.hexdigest()


def load_global(path: str | Path, limits: PickleLimits = GLOBAL_LIMITS) -> GlobalWeights:
    """Read global weights safely: they must fit the CNN, be finite, and match their stored hash.

    Raises:
        UpdateFileError: naming the file and the problem; nobody should train from such weights.
    """
    from fedmnist.model import model_fingerprint, weights_sha256

    path = Path(path)
    payload = safe_load_pickle(path, limits)
    if isinstance(payload, (list, tuple)):
        weights = check_weights(payload, str(path), error=UpdateFileError)
        log.warning("%s: bare list of weights; treating it as round 0 global weights", path)
        payload = {"format": GLOBAL_FORMAT, "version": FORMAT_VERSION, "round": 0, "method": "bare",
                   "seed": None, "sha256": weights_sha256(weights), "fingerprint": model_fingerprint(),
                   "weights": weights}
    if not isinstance(payload, dict) or payload.get("format") != GLOBAL_FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        hint = " (this is a client update, not global weights)" if found == UPDATE_FORMAT else ""
        raise UpdateFileError(f"{path}: not a fedmnist global-weights file (found {_brief(found)}){hint}")
    weights = check_weights(payload.get("weights"), str(path), error=UpdateFileError)
    actual = weights_sha256(weights)
    stored = _require(path, payload, "sha256", str)
    if actual != stored:
        raise UpdateFileError(
            f"{path}: weights hash {actual[:12]} differs from the stored {stored[:12]}: corrupted file"
        )
    fingerprint = _require(path, payload, "fingerprint", str)
    if fingerprint != model_fingerprint():
        raise UpdateFileError(
            f"{path}: model fingerprint {fingerprint[:64]} differs from this version's {model_fingerprint()}"
        )
    state = payload.get("server_state")
    if state is not None and not isinstance(state, dict):
        raise UpdateFileError(f"{path}: 'server_state' must be a dict, found {type(state).__name__}")
    if state is not None and state_sha256(state) != _require(path, payload, "server_state_sha256", str):
        raise UpdateFileError(f"{path}: server state hash differs from the stored one: corrupted file")
    return GlobalWeights(
        round=_require_int(path, payload, "round", 0),
        weights=weights,
        sha256=actual,
        fingerprint=fingerprint,
        seed=_require(path, payload, "seed", int, allow_none=True),
        method=str(payload.get("method", ""))[:64],
        path=path,
        state=state,
    )


def make_global(weights: list[np.ndarray], round_: int, method: str, seed: int | None = None,
                state: dict | None = None) -> GlobalWeights:
    """Wrap weights as a round's global weights, computing their hash and fingerprint."""
    from fedmnist.model import model_fingerprint, weights_sha256

    weights = [np.asarray(w, dtype=np.float32) for w in weights]
    return GlobalWeights(round_, weights, weights_sha256(weights), model_fingerprint(), seed, method,
                         state=state or None)


# --- SCAFFOLD: a member's own control variate ---------------------------------------------------


@dataclass
class ClientControl:
    """A member's SCAFFOLD control variate ``c_i``, kept in ``control_cliente_N.pkl`` between rounds.

    ``round`` is the training round that produced ``control``; ``previous`` is the ``c_i`` that round
    started from, so retraining the same round (a failed or repeated run) starts from it again instead
    of applying the round's correction twice.
    """

    client_id: int
    round: int
    control: list[np.ndarray]
    previous: list[np.ndarray]


def control_path(out_dir: str | Path, client_id: int) -> Path:
    """``out_dir/control_cliente_N.pkl``."""
    return Path(out_dir) / f"control_cliente_{client_id}.pkl"


def control_bytes(control: ClientControl) -> bytes:
    """The control file's contents: plain data read back by the restricted unpickler."""
    return pickle.dumps({
        "format": CONTROL_FORMAT,
        "version": FORMAT_VERSION,
        "client_id": int(control.client_id),
        "round": int(control.round),
        "control": [np.ascontiguousarray(c, dtype=np.float32) for c in control.control],
        "previous": [np.ascontiguousarray(c, dtype=np.float32) for c in control.previous],
    }, protocol=4)


def load_control(path: str | Path, client_id: int, limits: PickleLimits = GLOBAL_LIMITS) -> ClientControl:
    """Read and check a member's control file: its format, its client, finite arrays of the CNN's shapes.

    Raises:
        UpdateFileError: naming the file and the problem (including another client's file).
    """
    path = Path(path)
    payload = safe_load_pickle(path, limits)
    if not isinstance(payload, dict) or payload.get("format") != CONTROL_FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise UpdateFileError(f"{path}: not a fedmnist SCAFFOLD control file (found {_brief(found)})")
    if payload.get("version") != FORMAT_VERSION:
        raise UpdateFileError(f"{path}: unsupported control-file version {_brief(payload.get('version'))}")
    stored_id = _require_int(path, payload, "client_id", 1)
    if stored_id != client_id:
        raise UpdateFileError(f"{path}: holds the control variate of client {stored_id}, not of client {client_id}")
    return ClientControl(
        client_id=stored_id,
        round=_require_int(path, payload, "round", 1),
        control=check_weights(payload.get("control"), f"{path}, field 'control'", error=UpdateFileError),
        previous=check_weights(payload.get("previous"), f"{path}, field 'previous'", error=UpdateFileError),
    )
