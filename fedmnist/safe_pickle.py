"""Reading a teammate's pickle without trusting it: no code runs, and time and memory stay bounded.

A pickle is a small program for a stack machine. ``pickle.load`` will call any importable function it
names, so a weights file from someone else could run code; but even with every dangerous function
refused, a few bytes of pickle can still

* declare an enormous array (``numpy._reconstruct`` or ``ndarray.__setstate__`` with a huge shape, a
  ``BYTEARRAY8`` of a terabyte) and make the reader allocate it before any check,
* reuse one object through the memo so that a walk over the result, or hashing a nested tuple used as
  a dict key, takes exponential time (the "billion laughs" attack),
* nest containers so deeply, or so cyclically, that later code recurses for ever.

``load_pickle`` therefore runs its own unpickler (a subclass of the pure-Python ``pickle._Unpickler``,
whose dispatch table can be checked opcode by opcode) under ``PickleLimits``:

* the file is read only if it is a regular file of at most ``max_bytes``;
* only numpy's array/dtype/scalar constructors and latin-1 ``_codecs.encode`` can be called, each
  wrapped so that a declared size is compared with the remaining byte budget (``max_bytes`` again)
  *before* anything is allocated; object and structured dtypes are refused;
* at most ``max_nodes`` opcodes run (every object the file creates costs at least one), and integers
  are at most ``MAX_INT_BITS`` long;
* hashing stays linear: dict keys must be strings (whose hash Python randomises per process) or integers
  below ``MAX_KEY_INT`` in size (which hash to themselves, so no two collide), memo indices are bounded
  alike, and sets are refused (the project's files hold none): integers chosen to share one hash, as set
  members or dict keys, would otherwise cost quadratic time before any limit is reached;
* every array built by numpy's reconstructor must receive its data (its state) before the end: an array
  left without it would be uninitialised memory, bytes of the reader's own heap;
* the result is walked once per distinct object (a visited-id map), refusing cycles, nesting deeper
  than ``max_depth`` and trees whose size with every shared reference expanded exceeds ``max_nodes``,
  so code that later treats the data as a tree (``json.dumps``, recursion over metrics) is bounded too.

The format and these checks are private to fedmnist; callers use ``fedmnist.exchange.safe_load_pickle``.
"""

from __future__ import annotations

import codecs
import io
import math
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedmnist.config import check_int
from fedmnist.errors import UpdateFileError
from fedmnist.io import quote, read_capped

MAX_INT_BITS = 4096
"""Longest integer a weights file may hold (about 1,233 digits): longer ones only serve to slow hashing."""
MAX_KEY_INT = 1 << 31
"""Integer dict keys (a checkpoint's client ids) and memo indices must be below this in absolute value:
such integers hash to themselves (-1 aside), so no crafted set of them can share a hash."""


@dataclass(frozen=True)
class PickleLimits:
    """What one pickle file may cost to read.

    ``max_bytes`` caps both the file size and the bytes of numpy data the file may make the reader
    allocate; ``max_nodes`` caps the opcodes run and the size of the result as a tree; ``max_depth``
    caps nesting. ``what`` names the kind of file in error messages.
    """

    max_bytes: int
    max_nodes: int
    max_depth: int = 32
    what: str = "weights file"

    def __post_init__(self) -> None:
        for name in ("max_bytes", "max_nodes", "max_depth"):
            check_int(getattr(self, name), f"PickleLimits.{name}", 1, error=ValueError)


class RefusedPickle(pickle.UnpicklingError):
    """The pickle asks for something a weights file may not do (call a function, exceed a limit)."""


# --- the restricted unpickler ---------------------------------------------------------------------

_DTYPE_KINDS = frozenset("biufcSUmM")  # numbers, bytes/str and dates: never objects ('O') or records ('V')
_LATIN1 = frozenset({"latin1", "latin-1", "iso-8859-1", "iso8859-1", "l1"})
_ORDERS = frozenset({"C", "F", "A", "K"})


def _shape(value, label: str) -> tuple[int, ...]:
    if not isinstance(value, tuple) or len(value) > 32:
        raise RefusedPickle(f"{label}: an array shape must be a tuple of at most 32 sizes")
    for size in value:
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise RefusedPickle(f"{label}: array sizes must be non-negative integers")
    return value


def _plain_dtype(value, label: str) -> np.dtype:
    if not isinstance(value, np.dtype):
        raise RefusedPickle(f"{label}: expected a numpy dtype, found {type(value).__name__}")
    if value.hasobject:
        raise RefusedPickle(f"{label}: arrays of Python objects are not allowed")
    if value.kind not in _DTYPE_KINDS or value.fields is not None or value.subdtype:
        raise RefusedPickle(f"{label}: dtype {value} is not allowed (only plain numbers and text)")
    return value


class _Unpickler(pickle._Unpickler):
    """Pure-Python unpickler whose every opcode is either checked or refused; see the module docstring."""

    def __init__(self, data: bytes, limits: PickleLimits) -> None:
        super().__init__(io.BytesIO(data))
        self._limits = limits
        self._budget = limits.max_bytes
        self._pending_dtypes: dict[int, np.dtype] = {}  # made by dtype(), awaiting their one BUILD
        self._pending_arrays: dict[int, np.ndarray] = {}  # made by _reconstruct, awaiting their BUILD
        self._globals = {
            ("numpy._core.multiarray", "_reconstruct"): self._reconstruct,
            ("numpy.core.multiarray", "_reconstruct"): self._reconstruct,
            ("numpy._core.multiarray", "scalar"): self._scalar,
            ("numpy.core.multiarray", "scalar"): self._scalar,
            ("numpy._core.numeric", "_frombuffer"): self._frombuffer,
            ("numpy.core.numeric", "_frombuffer"): self._frombuffer,
            ("_codecs", "encode"): self._encode,
            ("numpy", "ndarray"): np.ndarray,  # only as _reconstruct's subtype: calling it is refused
            ("numpy", "dtype"): self._dtype,
        }
        self._callables = {id(f): f for f in self._globals.values() if f is not np.ndarray}

    # budget -------------------------------------------------------------------------------------

    def _charge(self, nbytes: int, label: str) -> None:
        if nbytes > self._budget:
            raise RefusedPickle(
                f"{label} declares {nbytes:,} bytes, more than the {self._limits.max_bytes:,} bytes of data "
                f"a {self._limits.what} may hold"
            )
        self._budget -= nbytes

    # allowed callables --------------------------------------------------------------------------

    def _dtype(self, obj, align=False, copy=True) -> np.dtype:
        if not isinstance(obj, (str, bytes)) or len(obj) > 64:
            raise RefusedPickle("numpy.dtype: only short type codes such as 'f4' are allowed")
        dtype = np.dtype(obj.decode("latin-1") if isinstance(obj, bytes) else obj, align=bool(align),
                         copy=True)  # never the shared builtin instance: BUILD may change it
        _plain_dtype(dtype, "numpy.dtype")
        self._pending_dtypes[id(dtype)] = dtype
        return dtype

    def _final_dtype(self, value, label: str) -> np.dtype:
        if isinstance(value, (str, bytes)):
            value = np.dtype(value.decode("latin-1") if isinstance(value, bytes) else value)
        if id(value) in self._pending_dtypes:
            raise RefusedPickle(f"{label}: a dtype is used before its state was set")
        return _plain_dtype(value, label)

    def _reconstruct(self, subtype, shape, dtype) -> np.ndarray:
        if subtype is not np.ndarray:
            raise RefusedPickle("numpy _reconstruct: only plain numpy arrays are allowed")
        shape = _shape(shape, "numpy _reconstruct")
        dtype = self._final_dtype(dtype, "numpy _reconstruct")
        self._charge(math.prod(shape) * dtype.itemsize, "an array")
        array = np._core.multiarray._reconstruct(np.ndarray, shape, dtype)
        self._pending_arrays[id(array)] = array
        return array

    def _scalar(self, dtype, obj=None):
        dtype = self._final_dtype(dtype, "numpy scalar")
        if not isinstance(obj, bytes) or len(obj) != dtype.itemsize:
            raise RefusedPickle("numpy scalar: its data must be bytes of the dtype's size")
        self._charge(dtype.itemsize, "a numpy scalar")
        return np._core.multiarray.scalar(dtype, obj)

    def _frombuffer(self, buf, dtype, shape, order, axis_order=None) -> np.ndarray:
        if not isinstance(buf, (bytes, bytearray)):
            raise RefusedPickle("numpy _frombuffer: the buffer must be bytes")
        dtype = self._final_dtype(dtype, "numpy _frombuffer")
        shape = _shape(shape, "numpy _frombuffer")
        if order not in _ORDERS:
            raise RefusedPickle("numpy _frombuffer: unknown memory order")
        if axis_order is not None and sorted(_shape(axis_order, "numpy _frombuffer")) != list(range(len(shape))):
            raise RefusedPickle("numpy _frombuffer: axis order is not a permutation of the axes")
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes != len(buf):  # a view on the buffer, which was charged (or read) already
            raise RefusedPickle(f"an array declares {nbytes:,} bytes but holds {len(buf):,}")
        return np._core.numeric._frombuffer(buf, dtype, shape, order, axis_order)

    def _encode(self, obj, encoding="utf-8", errors="strict") -> bytes:
        if not isinstance(obj, str) or not isinstance(encoding, str) or encoding.lower() not in _LATIN1:
            raise RefusedPickle("_codecs.encode: only latin-1 text (numpy's protocol 2 arrays) is allowed")
        self._charge(len(obj), "encoded bytes")
        return codecs.encode(obj, "latin-1", "strict")

    # globals, calls and object construction ------------------------------------------------------

    def find_class(self, module: str, name: str):
        try:
            return self._globals[(module, name)]
        except KeyError:
            raise RefusedPickle(
                f"refusing to load '{quote(module, 60)}.{quote(name, 60)}': only numpy arrays and builtin "
                "containers are allowed in a weights file"
            ) from None

    def persistent_load(self, pid):
        raise RefusedPickle("persistent ids are not allowed in a weights file")

    def load_reduce(self) -> None:
        stack = self.stack
        args = stack.pop()
        func = stack[-1]
        if self._callables.get(id(func)) is not func:
            name = getattr(func, "__name__", type(func).__name__)
            raise RefusedPickle(f"refusing to call '{name}' while loading a weights file")
        if not isinstance(args, tuple):
            raise RefusedPickle("call arguments must be a tuple")
        stack[-1] = func(*args)

    def load_build(self) -> None:
        stack = self.stack
        state = stack.pop()
        inst = stack[-1]
        if self._pending_arrays.pop(id(inst), None) is inst:
            self._build_array(inst, state)
        elif self._pending_dtypes.pop(id(inst), None) is inst:
            self._build_dtype(inst, state)
        else:
            raise RefusedPickle(f"refusing to set the state of a {type(inst).__name__}")

    def _build_array(self, array: np.ndarray, state) -> None:
        if not isinstance(state, tuple) or len(state) not in (4, 5):
            raise RefusedPickle("numpy array state must be a tuple (version, shape, dtype, fortran, data)")
        shape, dtype, fortran, data = state[-4:]
        shape = _shape(shape, "numpy array")
        dtype = self._final_dtype(dtype, "numpy array")
        if not (isinstance(fortran, int) and fortran in (0, 1)) or not isinstance(data, (bytes, bytearray)):
            raise RefusedPickle("numpy array state: the data must be bytes (arrays of objects are not allowed)")
        nbytes = math.prod(shape) * dtype.itemsize
        self._charge(nbytes, "an array")
        if nbytes != len(data):
            raise RefusedPickle(f"an array of shape {shape} declares {nbytes:,} bytes but holds {len(data):,}")
        array.__setstate__(state)

    def _build_dtype(self, dtype: np.dtype, state) -> None:
        if not (isinstance(state, tuple) and len(state) == 8 and state[2:5] == (None, None, None)
                and all(isinstance(v, int) and not isinstance(v, bool) and -1 <= v <= 1 << 20
                        for v in (state[0], *state[5:]))):
            raise RefusedPickle("numpy dtype state: only plain numeric and text dtypes are allowed")
        dtype.__setstate__(state)
        _plain_dtype(dtype, "numpy dtype")

    def _refuse(self) -> None:
        raise RefusedPickle("the pickle builds objects of other classes, which a weights file may not")

    load_newobj = load_newobj_ex = load_obj = load_inst = _refuse

    def _refuse_ext(self) -> None:
        raise RefusedPickle("extension-registry references are not allowed in a weights file")

    load_ext1 = load_ext2 = load_ext4 = _refuse_ext

    # bounded sizes ---------------------------------------------------------------------------------

    def load_bytearray8(self) -> None:
        (size,) = struct.unpack("<Q", self.read(8))
        self._charge(size, "a bytearray")
        data = self.read(size)
        if len(data) != size:
            raise EOFError("pickle ended inside a bytearray")
        self.append(bytearray(data))

    def _check_int(self) -> None:
        value = self.stack[-1]
        if isinstance(value, int) and value.bit_length() > MAX_INT_BITS:
            raise RefusedPickle(f"an integer of {value.bit_length():,} bits (at most {MAX_INT_BITS} allowed)")

    def load_int(self) -> None:
        super().load_int()
        self._check_int()

    def load_long(self) -> None:
        super().load_long()
        self._check_int()

    def load_long1(self) -> None:
        super().load_long1()
        self._check_int()

    def load_long4(self) -> None:
        super().load_long4()
        self._check_int()

    # the memo: indices bounded, so a crafted set of colliding integers cannot slow its dict ---------

    @staticmethod
    def _memo_index(line: bytes) -> int:
        if len(line) > 12:
            raise RefusedPickle(f"memo index outside 0..{MAX_KEY_INT - 1} (more than 11 digits)")
        index = int(line)
        if not 0 <= index < MAX_KEY_INT:
            raise RefusedPickle(f"memo index outside 0..{MAX_KEY_INT - 1}")
        return index

    def load_put(self) -> None:
        self.memo[self._memo_index(self.readline()[:-1])] = self.stack[-1]

    def load_get(self) -> None:
        index = self._memo_index(self.readline()[:-1])
        try:
            self.append(self.memo[index])
        except KeyError:
            raise pickle.UnpicklingError(f"memo value not found at index {index}") from None

    # containers: lists grow by APPEND, dicts by SETITEM; keys are strings or small integers; no sets ---

    @staticmethod
    def _keys(items) -> None:
        for key in items:
            if type(key) is str:
                continue
            if type(key) is int and -MAX_KEY_INT < key < MAX_KEY_INT:
                continue
            if isinstance(key, int) and not isinstance(key, bool):
                raise RefusedPickle(f"dict keys that are integers must be smaller than {MAX_KEY_INT:,} in size")
            raise RefusedPickle(f"dict keys must be strings or small integers, found {type(key).__name__}")

    def _top(self, kind: type):
        obj = self.stack[-1]
        if type(obj) is not kind:
            raise RefusedPickle(f"refusing to add items to a {type(obj).__name__}")
        return obj

    def load_append(self) -> None:
        value = self.stack.pop()
        self._top(list).append(value)

    def load_appends(self) -> None:
        items = self.pop_mark()
        self._top(list).extend(items)

    def load_setitem(self) -> None:
        value = self.stack.pop()
        key = self.stack.pop()
        self._keys((key,))
        self._top(dict)[key] = value

    def load_setitems(self) -> None:
        items = self.pop_mark()
        if len(items) % 2:
            raise pickle.UnpicklingError("odd number of items for a dict")
        self._keys(items[::2])
        target = self._top(dict)
        for i in range(0, len(items), 2):
            target[items[i]] = items[i + 1]

    def load_dict(self) -> None:
        items = self.pop_mark()
        if len(items) % 2:
            raise pickle.UnpicklingError("odd number of items for a dict")
        self._keys(items[::2])
        self.append({items[i]: items[i + 1] for i in range(0, len(items), 2)})

    def _refuse_set(self) -> None:
        raise RefusedPickle("sets are not allowed in a weights file (the project's files hold none)")

    load_empty_set = load_additems = load_frozenset = _refuse_set

    # the main loop: as pickle._Unpickler.load, counting opcodes ---------------------------------------

    def load(self):
        self._unframer = pickle._Unframer(self._file_read, self._file_readline)
        self.read = self._unframer.read
        self.readinto = self._unframer.readinto
        self.readline = self._unframer.readline
        self.metastack = []
        self.stack = []
        self.append = self.stack.append
        self.proto = 0
        read, dispatch, limit = self.read, self._dispatch, self._limits.max_nodes
        ops = 0
        try:
            while True:
                key = read(1)
                if not key:
                    raise EOFError("pickle data ended without a STOP opcode")
                ops += 1
                if ops > limit:
                    raise RefusedPickle(f"more than {limit:,} pickle operations")
                handler = dispatch.get(key[0])
                if handler is None:
                    raise pickle.UnpicklingError(f"invalid load key {key!r}")
                handler(self)
        except pickle._Stop as stop:
            if self._pending_arrays:
                raise RefusedPickle(
                    f"{len(self._pending_arrays)} array(s) built without their data (they would hold "
                    "uninitialised memory)"
                ) from None
            return stop.value


def _dispatch_table() -> dict:
    table = dict(pickle._Unpickler.dispatch)
    for opcode, base in pickle._Unpickler.dispatch.items():
        override = getattr(_Unpickler, base.__name__, None)
        if override is not None:
            table[opcode] = override
    return table


_Unpickler._dispatch = _dispatch_table()


# --- the walk over the result -------------------------------------------------------------------

_CONTAINERS = (dict, list, tuple, set, frozenset)
_LEAVES = (str, bytes, bytearray, int, float, complex, bool, type(None), np.ndarray, np.generic, np.dtype)


def _check_plain(obj, limits: PickleLimits) -> None:
    """Refuse anything but builtin containers of plain leaves, cycles, deep nesting and huge trees.

    Each distinct container is visited once (a visited-id map holds its size as a tree, shared
    references expanded), so a "billion laughs" structure costs time linear in its distinct objects.

    Raises:
        RefusedPickle: saying what is wrong.
    """
    sizes: dict[int, int] = {}
    on_path: set[int] = set()
    keep = []  # every visited container stays referenced, so no id is reused during the walk
    stack: list[tuple[object, int, bool]] = [(obj, 0, False)]
    limit = limits.max_nodes
    while stack:
        node, depth, leaving = stack.pop()
        if not isinstance(node, _CONTAINERS):
            if isinstance(node, np.ndarray) and node.dtype.hasobject:
                raise RefusedPickle("arrays of Python objects are not allowed")
            if not isinstance(node, _LEAVES):
                raise RefusedPickle(f"objects of type {type(node).__name__} are not allowed")
            continue
        key = id(node)
        children = [*node.keys(), *node.values()] if isinstance(node, dict) else node
        if leaving:
            on_path.discard(key)
            total = 1 + sum(sizes[id(c)] if isinstance(c, _CONTAINERS) else 1 for c in children)
            if total > limit:
                raise RefusedPickle(
                    f"its data expands to more than {limit:,} items (shared references repeated)"
                )
            sizes[key] = total
            continue
        if key in sizes:
            continue
        if key in on_path:
            raise RefusedPickle("data refers to itself (a cycle)")
        if depth >= limits.max_depth:
            raise RefusedPickle(f"data nested more than {limits.max_depth} levels deep")
        if len(keep) >= limit:
            raise RefusedPickle(f"more than {limit:,} distinct containers")
        on_path.add(key)
        keep.append(node)
        stack.append((node, depth, True))
        stack.extend((c, depth + 1, False) for c in children
                     if not (isinstance(c, _CONTAINERS) and id(c) in sizes))


def load_pickle(path: str | Path, limits: PickleLimits):
    """Unpickle ``path`` under ``limits`` (see the module docstring); the checks of ``safe_load_pickle``."""
    path = Path(path)
    data = read_capped(path, limits.max_bytes, limits.what, error=UpdateFileError)
    if not data:
        raise UpdateFileError(f"{path}: the file is empty")
    try:
        obj = _Unpickler(data, limits).load()
        _check_plain(obj, limits)
    except RefusedPickle as exc:
        raise UpdateFileError(f"{path}: unsafe or invalid pickle: {exc}") from None
    except Exception as exc:  # anything else a hostile or damaged stream raises inside the unpickler
        # only the exception's type: its message may quote the file's bytes (int(b'USER=...') on a link
        # to /proc/self/environ), and a file's contents never reach an error message
        raise UpdateFileError(f"{path}: truncated or corrupted pickle ({type(exc).__name__})") from None
    return obj
