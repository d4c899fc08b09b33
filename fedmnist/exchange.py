"""Weight files exchanged between team members and the server, read without running their code.

``pesos_cliente_N.pkl`` (a client update) and ``pesos_globales_ronda_R.pkl`` (the global weights of a
round) are pickles, as the course names them, but they hold only plain data: a dict of builtins and
numpy arrays. A teammate's pickle could run arbitrary code when unpickled, so every read goes through
``safe_load_pickle``, whose unpickler admits numpy arrays and builtin containers and nothing else.
"""

from __future__ import annotations

import codecs
import io
import logging
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fedmnist.errors import UpdateFileError
from fedmnist.io import atomic_write_bytes

log = logging.getLogger(__name__)

UPDATE_FORMAT = "fedmnist-client-update"
GLOBAL_FORMAT = "fedmnist-global-weights"
FORMAT_VERSION = 1
UPDATE_PATTERN = "pesos_cliente_*.pkl"
_CLIENT_ID_RE = re.compile(r"pesos_cliente_(\d+)\.pkl$")

_ALLOWED_GLOBALS = {
    ("numpy._core.multiarray", "_reconstruct"): np._core.multiarray._reconstruct,
    ("numpy.core.multiarray", "_reconstruct"): np._core.multiarray._reconstruct,
    ("numpy._core.multiarray", "scalar"): np._core.multiarray.scalar,
    ("numpy.core.multiarray", "scalar"): np._core.multiarray.scalar,
    ("numpy._core.numeric", "_frombuffer"): np._core.numeric._frombuffer,
    ("numpy.core.numeric", "_frombuffer"): np._core.numeric._frombuffer,
    ("_codecs", "encode"): codecs.encode,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the numpy globals needed to rebuild arrays."""

    def find_class(self, module: str, name: str):
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refusing to load '{module}.{name}': only numpy arrays and builtin containers are "
                "allowed in a weights file"
            ) from None

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("persistent ids are not allowed in a weights file")


def safe_load_pickle(path: str | Path):
    """Unpickle ``path`` admitting only numpy arrays, numbers, strings and builtin containers.

    Raises:
        UpdateFileError: the file is missing, truncated, garbled, or refers to anything else (for
            example a function that would run code); the message names the file.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise UpdateFileError(f"{path}: file not found") from None
    except OSError as exc:
        raise UpdateFileError(f"{path}: cannot read ({exc})") from exc
    if not data:
        raise UpdateFileError(f"{path}: the file is empty")
    try:
        obj = _RestrictedUnpickler(io.BytesIO(data)).load()
    except pickle.UnpicklingError as exc:
        raise UpdateFileError(f"{path}: unsafe or invalid pickle: {exc}") from None
    except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError, MemoryError,
            OverflowError, UnicodeDecodeError) as exc:
        raise UpdateFileError(
            f"{path}: truncated or corrupted pickle ({type(exc).__name__}: {exc})"
        ) from None
    _reject_object_arrays(path, obj)
    return obj


def _reject_object_arrays(path: Path, obj, depth: int = 0) -> None:
    if depth > 20:
        raise UpdateFileError(f"{path}: data nested too deeply")
    if isinstance(obj, np.ndarray) and obj.dtype.hasobject:
        raise UpdateFileError(f"{path}: arrays of Python objects are not allowed")
    if isinstance(obj, dict):
        for value in obj.values():
            _reject_object_arrays(path, value, depth + 1)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            _reject_object_arrays(path, value, depth + 1)


def _dump(path: str | Path, payload: dict) -> None:
    atomic_write_bytes(path, pickle.dumps(payload, protocol=4))


def _weights_list(path: Path, value) -> list[np.ndarray]:
    if not isinstance(value, (list, tuple)) or not value:
        raise UpdateFileError(f"{path}: 'weights' must be a non-empty list of numpy arrays")
    for i, array in enumerate(value):
        if not isinstance(array, np.ndarray):
            raise UpdateFileError(f"{path}: weight {i} is a {type(array).__name__}, not a numpy array")
        if not np.issubdtype(array.dtype, np.floating):
            raise UpdateFileError(f"{path}: weight {i} has dtype {array.dtype}, expected floating point")
    return [np.asarray(a, dtype=np.float32) for a in value]


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


def load_update(path: str | Path) -> ClientUpdate:
    """Read a client update safely.

    Also accepts a bare pickled ``model.get_weights()`` list (the original notebook style), with a
    warning: its sample count, round and starting point are unknown, and the client id is taken from
    the file name.
    """
    path = Path(path)
    payload = safe_load_pickle(path)
    if isinstance(payload, (list, tuple)):
        match = _CLIENT_ID_RE.search(path.name)
        log.warning(
            "%s: bare list of weights (no metadata): sample count, round and starting point unknown",
            path,
        )
        return ClientUpdate(
            client_id=int(match.group(1)) if match else 0,
            round=-1,
            num_examples=None,
            weights=_weights_list(path, payload),
            start_sha256=None,
            fingerprint=None,
            bare=True,
            path=path,
        )
    if not isinstance(payload, dict):
        raise UpdateFileError(f"{path}: expected a fedmnist update dict, found {type(payload).__name__}")
    if payload.get("format") != UPDATE_FORMAT:
        hint = " (this is a global-weights file)" if payload.get("format") == GLOBAL_FORMAT else ""
        raise UpdateFileError(f"{path}: not a fedmnist client update (format {payload.get('format')!r}){hint}")
    if payload.get("version") != FORMAT_VERSION:
        raise UpdateFileError(f"{path}: unsupported update version {payload.get('version')!r}")
    num_examples = _require(path, payload, "num_examples", int, allow_none=True)
    if num_examples is not None and num_examples < 1:
        raise UpdateFileError(f"{path}: num_examples must be positive (got {num_examples})")
    mu = _require(path, payload, "mu", (int, float))
    if not (mu >= 0 and np.isfinite(mu)):
        raise UpdateFileError(f"{path}: mu must be a finite number >= 0 (got {mu})")
    metrics = payload.get("metrics") or {}
    if not isinstance(metrics, dict):
        raise UpdateFileError(f"{path}: field 'metrics' must be a dict")
    return ClientUpdate(
        client_id=_require(path, payload, "client_id", int),
        round=_require(path, payload, "round", int),
        num_examples=num_examples,
        weights=_weights_list(path, payload.get("weights")),
        start_sha256=_require(path, payload, "start_sha256", str, allow_none=True),
        fingerprint=_require(path, payload, "fingerprint", str, allow_none=True),
        mu=float(mu),
        epochs=_require(path, payload, "epochs", int, allow_none=True),
        batch_size=_require(path, payload, "batch_size", int, allow_none=True),
        metrics=metrics,
        path=path,
    )


def find_updates(weights_dir: str | Path) -> list[Path]:
    """Every ``pesos_cliente_*.pkl`` in a directory, sorted by client number."""
    weights_dir = Path(weights_dir)
    paths = [p for p in weights_dir.glob(UPDATE_PATTERN) if _CLIENT_ID_RE.search(p.name)]
    return sorted(paths, key=lambda p: int(_CLIENT_ID_RE.search(p.name).group(1)))


# --- global weights ---------------------------------------------------------------------------


@dataclass
class GlobalWeights:
    """The global model of a round: the starting point every client of the next round shares."""

    round: int
    weights: list[np.ndarray]
    sha256: str
    fingerprint: str
    seed: int | None = None
    method: str = "init"
    path: Path | None = None


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
    })


def load_global(path: str | Path) -> GlobalWeights:
    """Read global weights safely and check that their stored hash matches their contents."""
    from fedmnist.model import model_fingerprint, weights_mismatch, weights_sha256

    path = Path(path)
    payload = safe_load_pickle(path)
    if isinstance(payload, (list, tuple)):
        weights = _weights_list(path, payload)
        log.warning("%s: bare list of weights; treating it as round 0 global weights", path)
        payload = {"format": GLOBAL_FORMAT, "version": FORMAT_VERSION, "round": 0, "method": "bare",
                   "seed": None, "sha256": weights_sha256(weights), "fingerprint": model_fingerprint(),
                   "weights": weights}
    if not isinstance(payload, dict) or payload.get("format") != GLOBAL_FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        hint = " (this is a client update, not global weights)" if found == UPDATE_FORMAT else ""
        raise UpdateFileError(f"{path}: not a fedmnist global-weights file (found {found!r}){hint}")
    weights = _weights_list(path, payload.get("weights"))
    problem = weights_mismatch(weights)
    if problem:
        raise UpdateFileError(f"{path}: these weights do not fit the shared CNN: {problem}")
    actual = weights_sha256(weights)
    stored = _require(path, payload, "sha256", str)
    if actual != stored:
        raise UpdateFileError(f"{path}: weights hash {actual[:12]} differs from the stored {stored[:12]}: corrupted file")
    fingerprint = _require(path, payload, "fingerprint", str)
    if fingerprint != model_fingerprint():
        raise UpdateFileError(
            f"{path}: model fingerprint {fingerprint} differs from this version's {model_fingerprint()}"
        )
    return GlobalWeights(
        round=_require(path, payload, "round", int),
        weights=weights,
        sha256=actual,
        fingerprint=fingerprint,
        seed=_require(path, payload, "seed", int, allow_none=True),
        method=str(payload.get("method", "")),
        path=path,
    )


def make_global(weights: list[np.ndarray], round_: int, method: str, seed: int | None = None) -> GlobalWeights:
    """Wrap weights as a round's global weights, computing their hash and fingerprint."""
    from fedmnist.model import model_fingerprint, weights_sha256

    weights = [np.asarray(w, dtype=np.float32) for w in weights]
    return GlobalWeights(round_, weights, weights_sha256(weights), model_fingerprint(), seed, method)
