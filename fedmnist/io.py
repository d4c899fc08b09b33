"""Files written all or nothing, read within bounds, and output directories checked before any work.

* ``atomic_writer``/``atomic_path``/``atomic_write_bytes``: one file is either complete or absent.
* ``OutputSet``: several files (a run's models, tables, plots) appear together or not at all. Each is
  written under a hidden temporary name in the output directory; ``commit`` then writes a small
  journal naming them (the commit point, one atomic rename), renames the temporary files to their
  final names and removes the journal. A run killed before the commit point leaves the previous set
  untouched; one killed after it is rolled forward by ``recover``, which every new ``OutputSet`` runs
  in its directory first and readers may run too. The directory may be the working directory, so no
  directory is ever swapped.
* ``recover``: finishes committed journals and deletes temporary files whose writer is gone (its
  process id is in the name; this process's own files are told apart by a registry of live ones).
* ``check_writable_dir``: a clear error, before any computation, for an output path that is a file,
  cannot be created or cannot be written.
* ``open_regular``: the one door every reader goes through: a path is opened only if it names a regular
  file (checked before opening, so a FIFO or a link to a device is never opened; checked again on the
  descriptor), and the handle it returns reads at most a size limit. ``read_capped``, ``read_text_capped``
  and ``sha256_file`` are built on it.
* ``quote``: a piece of text (a file name, a name read from a file) for a one-line, bounded error message.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import re
import secrets
import stat
import threading
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath
from typing import IO

from fedmnist.errors import ConfigError, FedMnistError, WriteError

log = logging.getLogger(__name__)

JOURNAL_FORMAT = "fedmnist-output-set"
_JOURNAL_RE = re.compile(r"\.fedmnist-journal-(?P<pid>\d{1,10})-(?P<token>[0-9a-f]{12})\.json")
_TEMP_RE = re.compile(r"\..*\.tmp-(?P<pid>\d{1,10})-(?P<token>[0-9a-f]{12})(\.[^./]*)?")
_LEGACY_TEMP_RE = re.compile(r"\..+\.[0-9a-f]{12}\.(tmp|h5|png)")  # names of fedmnist 0.1's temporary files
_MAX_JOURNAL_BYTES = 1 << 20

_active: set[str] = set()  # tokens of this process's temporary files and journals still being written
_active_lock = threading.Lock()

_test_hook: Callable[[str, int], None] | None = None
"""Tests set this to stop a writing process at a given step: ("temp", k) after the k-th temporary file
is complete, ("journal", 0) just after the commit point, ("rename", k) after the k-th rename,
("renamed", n) before the journal is removed."""


def _step(stage: str, index: int) -> None:
    if _test_hook is not None:
        _test_hook(stage, index)


def _register(token: str) -> None:
    with _active_lock:
        _active.add(token)


def _release(token: str) -> None:
    with _active_lock:
        _active.discard(token)


def _stale(pid: int, token: str) -> bool:
    """Whether the writer of a temporary file or journal is gone."""
    if pid == os.getpid():
        with _active_lock:
            return token not in _active
    if pid <= 0:
        return True
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # no such process (or no such process id at all)
        return True
    except OSError:  # exists but belongs to someone else
        return False
    return False


def _create_temp(path: Path, suffix: str, directory: Path | None = None) -> tuple[int, str, str]:
    """Create a new, empty temporary file for ``path`` with the permissions the umask allows.

    It lives in ``directory`` (default: beside ``path``) as ``.<stem>.tmp-<pid>-<token><suffix>``,
    so ``recover`` can tell whose it is. Unlike ``tempfile.mkstemp`` (always 0600), the kernel applies
    the umask, so teammates can read the outputs as they could any other file the user writes.
    Returns (descriptor, path, token); the token stays registered as live until ``_release``.
    """
    directory = path.parent if directory is None else directory
    for _ in range(100):
        token = secrets.token_hex(6)
        tmp = directory / f".{path.stem}.tmp-{os.getpid()}-{token}{suffix}"
        _register(token)
        try:
            return os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666), str(tmp), token
        except FileExistsError:
            _release(token)
            continue
        except BaseException:
            _release(token)
            raise
    raise FileExistsError(f"could not create a temporary file beside {path}")


def _fsync_dir(directory: Path) -> None:
    """Make renames in ``directory`` durable (best effort: not every platform can open a directory)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fsync_file(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _writing(path: str | Path) -> Iterator[None]:
    """Turn an ``OSError`` while writing ``path`` (a full disk, a read-only destination) into a one-line
    ``WriteError`` naming it; the writers below have already removed their temporary files."""
    try:
        yield
    except FedMnistError:
        raise
    except OSError as exc:
        raise WriteError(f"{path}: cannot write the file ({_reason(exc)}); nothing was written") from exc


# --- single files -------------------------------------------------------------------------------


@contextlib.contextmanager
def _publish(tmp: str, path: Path, token) -> Iterator[None]:
    """Around the writing of ``tmp``: on success rename it over ``path`` (and sync the folder), on any
    error delete it; release the temporary's token either way."""
    try:
        yield
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    finally:
        _release(token)


@contextlib.contextmanager
def atomic_writer(path: str | Path, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary file beside ``path``; on success rename it over ``path``, on error delete it."""
    path = Path(path)
    with _writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp, token = _create_temp(path, ".tmp")
        with _publish(tmp, path, token), os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_writer(path, "wb") as handle:
        handle.write(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path for libraries that insist on writing by name (Keras, matplotlib)."""
    path = Path(path)
    with _writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp, token = _create_temp(path, suffix or path.suffix)
        os.close(fd)
        with _publish(tmp, path, token):
            yield Path(tmp)
            _fsync_file(tmp)


def quote(text: object, limit: int = 80) -> str:
    """``text`` for an error message: one line (control and unprintable characters escaped), at most ``limit`` long."""
    shown = "".join(c if c.isprintable() else ascii(c)[1:-1] for c in str(text)[:limit + 1])
    return shown if len(shown) <= limit else shown[:limit] + "..."


class _CappedReader(io.RawIOBase):
    """A read-only binary stream over a descriptor that never reads past offset ``limit``.

    The file's size was checked against ``limit`` before; reading past it means the file grew meanwhile,
    which raises ``fail()``, so a file that keeps growing cannot make a reader run for ever.
    """

    def __init__(self, fd: int, limit: int, fail: Callable[[], FedMnistError]) -> None:
        self._fd, self._limit, self._fail = fd, limit, fail

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        view = memoryview(buffer).cast("B")
        position = os.lseek(self._fd, 0, os.SEEK_CUR)
        want = min(len(view), self._limit + 1 - position)
        if want <= 0:
            raise self._fail()
        data = os.read(self._fd, want)
        if position + len(data) > self._limit:
            raise self._fail()
        view[:len(data)] = data
        return len(data)

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        return os.lseek(self._fd, offset, whence)

    def tell(self) -> int:
        return os.lseek(self._fd, 0, os.SEEK_CUR)

    def fileno(self) -> int:
        return self._fd

    def close(self) -> None:
        if not self.closed:
            os.close(self._fd)
        super().close()


def open_regular(path: str | Path, max_bytes: int, what: str, *, error: type[FedMnistError]) -> IO[bytes]:
    """A binary handle on the regular file ``path``, refused with ``error`` unless it is one of at most ``max_bytes``.

    The path is checked with ``stat`` before it is opened, so a FIFO, a socket or a (link to a) device is
    refused without opening it (opening a FIFO blocks, a device may be endless); the descriptor is opened
    non-blocking and checked again with ``fstat`` (a file swapped in between), and the handle refuses to read
    beyond ``max_bytes`` even if the file grows. Messages name the file and the problem, never its contents.
    """
    path = Path(path)
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise error(f"{path}: file not found") from None
    except (OSError, ValueError) as exc:
        raise error(f"{path}: cannot read the {what} ({_reason(exc)})") from None
    _require_regular(path, info, max_bytes, what, error)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOCTTY", 0))
    except OSError as exc:
        raise error(f"{path}: cannot read the {what} ({_reason(exc)})") from None
    try:
        _require_regular(path, os.fstat(fd), max_bytes, what, error)
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return io.BufferedReader(_CappedReader(fd, max_bytes, lambda: error(
            f"{path}: the {what} grew past the {max_bytes:,} bytes allowed while being read")))
    except BaseException:
        os.close(fd)
        raise


def _reason(exc: BaseException) -> str:
    return quote(getattr(exc, "strerror", None) or type(exc).__name__)


def _require_regular(path: Path, info: os.stat_result, max_bytes: int, what: str,
                     error: type[FedMnistError]) -> None:
    if stat.S_ISDIR(info.st_mode):
        raise error(f"{path}: the {what} is a directory, not a file")
    if not stat.S_ISREG(info.st_mode):
        kind = "a FIFO" if stat.S_ISFIFO(info.st_mode) else "a device" if (
            stat.S_ISCHR(info.st_mode) or stat.S_ISBLK(info.st_mode)) else "a socket" if stat.S_ISSOCK(
            info.st_mode) else "not a regular file"
        raise error(f"{path}: the {what} is {kind}, not a regular file; refusing to read it")
    if info.st_size > max_bytes:
        raise error(f"{path}: the {what} has {info.st_size:,} bytes, more than the {max_bytes:,} allowed")


HASH_MAX_BYTES = 1 << 30
"""Largest file ``sha256_file`` hashes unless told otherwise (1 GiB: MNIST's npz is 11 MB)."""


def sha256_file(path: str | Path, max_bytes: int = HASH_MAX_BYTES, what: str = "file", *,
                error: type[FedMnistError] = FedMnistError) -> str:
    """Hex sha256 of a regular file's bytes, read through ``open_regular`` (so never a FIFO or a device)."""
    digest = hashlib.sha256()
    with open_regular(path, max_bytes, what, error=error) as handle:
        try:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        except OSError as exc:
            raise error(f"{path}: cannot read the {what} ({_reason(exc)})") from None
    return digest.hexdigest()


def read_capped(path: str | Path, max_bytes: int, what: str, *, error: type[FedMnistError]) -> bytes:
    """The bytes of the regular file ``path``, refused with ``error`` if it holds more than ``max_bytes``.

    The size is checked before reading, and the read stops one byte past the limit in case the file
    grows meanwhile. FIFOs and devices (``/dev/zero``) are refused without opening them (``open_regular``).
    """
    with open_regular(path, max_bytes, what, error=error) as handle:
        try:
            return handle.read()
        except OSError as exc:
            raise error(f"{path}: cannot read the {what} ({_reason(exc)})") from None


def read_text_capped(path: str | Path, max_bytes: int, what: str, *, error: type[FedMnistError]) -> str:
    """The UTF-8 text of the regular file ``path`` (``read_capped``), refused with ``error`` if not UTF-8."""
    data = read_capped(path, max_bytes, what, error=error)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise error(f"{path}: the {what} is not UTF-8 text") from None


# --- output directories ---------------------------------------------------------------------------


def check_writable_dir(path: str | Path, what: str = "output directory") -> Path:
    """Refuse, before any work, an output directory that cannot receive files; create nothing.

    ``path`` must be a writable directory, or not exist yet with its nearest existing ancestor a
    writable directory (it is created when the first output is written).

    Raises:
        ConfigError: the path (or an ancestor) is a file, or the directory cannot be written or created.
    """
    path = Path(path)
    if path.is_symlink() and not path.exists():
        raise ConfigError(f"{path}: the {what} is a broken symbolic link")
    if path.exists():
        if not path.is_dir():
            raise ConfigError(f"{path}: the {what} is a file, not a directory")
        if not os.access(path, os.W_OK | os.X_OK):
            raise ConfigError(f"{path}: the {what} is not writable")
        try:  # access() cannot see every reason (read-only mounts, ACLs): try it
            fd, tmp, token = _create_temp(path / "probe", ".tmp")
            os.close(fd)
            os.unlink(tmp)
            _release(token)
        except OSError as exc:
            raise ConfigError(f"{path}: the {what} is not writable ({exc.strerror or exc})") from None
        return path
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ConfigError(f"{path}: cannot create the {what}: {ancestor} is a file, not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ConfigError(f"{path}: cannot create the {what}: {ancestor} is not writable")
    return path


def _check_name(name: str) -> str:
    """A final output name relative to its set's directory: no absolute paths, '..' or temp-like names."""
    pure = PurePosixPath(name)
    if not name or pure.is_absolute() or any(p in ("", ".", "..") for p in pure.parts) or "\\" in name:
        raise ValueError(f"output names must be relative paths inside the directory, not {name!r}")
    if _TEMP_RE.fullmatch(pure.name) or _JOURNAL_RE.fullmatch(pure.name):
        raise ValueError(f"{name!r} looks like a temporary file of an output set")
    return pure.as_posix()


class OutputSet:
    """Files that appear in ``out_dir`` together or not at all.

    Use as a context manager: on a normal exit the set is committed, on an exception (or a kill) the
    previous outputs stay as they were and no temporary file remains (or ``recover`` removes it)::

        check_writable_dir(out, "--out")            # before any computation
        ...                                         # compute
        with OutputSet(out) as outputs:
            outputs.write_text("resultados.json", text)
            with outputs.temp_path("modelo_fedavg.h5") as tmp:
                model.save(tmp)
            outputs.discard("modelo_krum.h5")       # an old output this run replaces by nothing

    Names are relative paths (``clientes/pesos_cliente_1.pkl`` is fine); their temporary files all live
    in ``out_dir`` itself, so every rename stays within one file system.
    """

    def __init__(self, out_dir: str | Path, what: str = "output directory") -> None:
        self.out_dir = Path(out_dir)
        self.what = what
        self._token = secrets.token_hex(6)
        self._temps: dict[str, tuple[str, str]] = {}  # final name -> (temp file name, its token)
        self._discard: set[str] = set()
        self._made_dirs: list[Path] = []
        self._state = "new"

    # lifecycle -----------------------------------------------------------------------------------

    def __enter__(self) -> OutputSet:
        return self.open()

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()

    def open(self) -> OutputSet:
        """Check the directory, recover what a killed run left in it, and start the set."""
        if self._state != "new":
            raise RuntimeError("an OutputSet opens once")
        check_writable_dir(self.out_dir, self.what)
        recover(self.out_dir)
        _register(self._token)
        self._state = "open"
        return self

    def _require_open(self) -> None:
        if self._state != "open":
            raise RuntimeError(f"this OutputSet is {self._state}, not open")

    def _make_out_dir(self) -> None:
        missing = []
        probe = self.out_dir
        while not probe.exists() and probe != probe.parent:
            missing.append(probe)
            probe = probe.parent
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._made_dirs = missing  # innermost first: removed in this order on abort if left empty

    # adding files ----------------------------------------------------------------------------------

    def path(self, name: str) -> Path:
        """Where ``name`` will be once the set is committed."""
        return self.out_dir / _check_name(name)

    def _new_temp(self, name: str) -> tuple[int, str]:
        self._require_open()
        name = _check_name(name)
        if not self.out_dir.exists():
            self._make_out_dir()
        self._drop(name)
        final = PurePosixPath(name)
        fd, tmp, token = _create_temp(Path(final.name), final.suffix, directory=self.out_dir)
        self._temps[name] = (Path(tmp).name, token)
        return fd, tmp

    def _drop(self, name: str) -> None:
        previous = self._temps.pop(name, None)
        if previous is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.out_dir / previous[0])
            _release(previous[1])

    def _written(self) -> None:
        _step("temp", len(self._temps))

    def write_bytes(self, name: str, data: bytes) -> Path:
        """Stage ``data`` as output ``name``; returns its final path."""
        with self.open_file(name, "wb") as handle:
            handle.write(data)
        return self.path(name)

    def write_text(self, name: str, text: str) -> Path:
        """Stage UTF-8 ``text`` as output ``name``; returns its final path."""
        return self.write_bytes(name, text.encode("utf-8"))

    @contextlib.contextmanager
    def open_file(self, name: str, mode: str = "wb") -> Iterator[IO]:
        """A handle on output ``name``'s temporary file (dropped from the set if the block fails)."""
        with _writing(self.path(name)):
            fd, _ = self._new_temp(name)
            try:
                with os.fdopen(fd, mode) as handle:
                    yield handle
                    handle.flush()
                    os.fsync(handle.fileno())
            except BaseException:
                self._drop(_check_name(name))
                raise
        self._written()

    @contextlib.contextmanager
    def temp_path(self, name: str) -> Iterator[Path]:
        """A temporary path, with ``name``'s suffix, for libraries that write by name (Keras, matplotlib)."""
        with _writing(self.path(name)):
            fd, tmp = self._new_temp(name)
            os.close(fd)
            try:
                yield Path(tmp)
            except BaseException:
                self._drop(_check_name(name))
                raise
        self._written()

    def discard(self, name: str) -> None:
        """Delete output ``name`` when the set commits (a stale output of an earlier run); no-op if absent."""
        self._require_open()
        self._discard.add(_check_name(name))

    # finishing -------------------------------------------------------------------------------------

    def commit(self) -> dict[str, Path]:
        """Make every staged file appear under its final name; returns name -> final path.

        Raises:
            FedMnistError: the renames could not be completed; the journal stays, and the next
                ``OutputSet`` or ``recover`` in the directory finishes them.
        """
        self._require_open()
        if not self._temps and not self._discard:
            self._finish("committed")
            return {}
        try:
            with _writing(self.out_dir / "fedmnist-journal"):
                journal_path, journal = self._write_journal()
        except BaseException:
            self.abort()
            raise
        _step("journal", 0)
        try:
            _apply(self.out_dir, journal)
            journal_path.unlink()
            _fsync_dir(self.out_dir)
        except OSError as exc:
            self._finish("failed")
            raise FedMnistError(
                f"{self.out_dir}: could not finish writing the outputs ({exc}); they will be completed "
                "the next time fedmnist writes to this directory"
            ) from exc
        paths = {name: self.out_dir / name for name in self._temps}
        self._finish("committed")
        return paths

    def _write_journal(self) -> tuple[Path, dict]:
        """Write the journal naming every staged file: once it exists, the set is committed."""
        for temp, _ in self._temps.values():
            _fsync_file(self.out_dir / temp)  # Keras and matplotlib wrote without fsync
        journal = {
            "format": JOURNAL_FORMAT,
            "version": 1,
            "rename": [[temp, name] for name, (temp, _) in self._temps.items()],
            "discard": sorted(self._discard - set(self._temps)),
        }
        if not self.out_dir.exists():
            self._make_out_dir()
        journal_path = self.out_dir / f".fedmnist-journal-{os.getpid()}-{self._token}.json"
        fd, tmp, token = _create_temp(Path("fedmnist-journal"), ".json", directory=self.out_dir)
        with _publish(tmp, journal_path, token):  # the rename is the commit point
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                json.dump(journal, handle)
                handle.flush()
                os.fsync(handle.fileno())
        return journal_path, journal

    def abort(self) -> None:
        """Delete every staged file; the directory keeps its previous outputs (and vanishes if we made it)."""
        if self._state != "open":
            return
        for name in list(self._temps):
            self._drop(name)
        for directory in self._made_dirs:
            with contextlib.suppress(OSError):
                directory.rmdir()
        self._finish("aborted")

    def _finish(self, state: str) -> None:
        for _, token in self._temps.values():
            _release(token)
        _release(self._token)
        self._state = state


def _apply(out_dir: Path, journal: dict) -> None:
    """Rename a committed journal's temporary files to their final names and delete its discards.

    Idempotent, so a kill at any point is finished by running it again: a temporary file already
    renamed is simply absent.
    """
    touched = {out_dir}
    for i, (temp, name) in enumerate(journal["rename"], start=1):
        source, target = out_dir / temp, out_dir / name
        if source.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(source, target)
            touched.add(target.parent)
        _step("rename", i)
    for name in journal["discard"]:
        with contextlib.suppress(FileNotFoundError):
            (out_dir / name).unlink()
    for directory in touched:
        _fsync_dir(directory)
    _step("renamed", len(journal["rename"]))


def _read_journal(path: Path) -> dict:
    data = read_capped(path, _MAX_JOURNAL_BYTES, "output journal", error=FedMnistError)
    try:
        journal = json.loads(data.decode("utf-8"))
        ok = (isinstance(journal, dict) and journal.get("format") == JOURNAL_FORMAT
              and isinstance(journal.get("rename"), list) and isinstance(journal.get("discard"), list))
        if ok:
            for entry in journal["rename"]:
                temp, name = entry
                if not (isinstance(temp, str) and _TEMP_RE.fullmatch(temp) and "/" not in temp):
                    raise ValueError(f"bad temporary name {temp!r}")
                _check_name(name)
            for name in journal["discard"]:
                _check_name(name)
    except (ValueError, TypeError, RecursionError) as exc:
        raise FedMnistError(
            f"{path}: damaged output journal ({exc}); the outputs beside it may mix two runs: delete it, "
            "check the directory and rerun"
        ) from None
    if not ok:
        raise FedMnistError(f"{path}: not a fedmnist output journal; delete it, check the directory and rerun")
    return journal


def recover(out_dir: str | Path) -> list[str]:
    """Finish or undo what killed writers left in ``out_dir``; returns what was done, one line each.

    A committed journal whose writer is gone is rolled forward (its files get their final names);
    then every temporary file whose writer is gone is deleted (an uncommitted set, an interrupted
    ``atomic_writer``). Live writers' files, in this process or another, are left alone.

    Raises:
        FedMnistError: a journal is damaged (it cannot be rolled forward safely).
    """
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    notes = []
    names = sorted(os.listdir(out_dir))
    for name in names:
        match = _JOURNAL_RE.fullmatch(name)
        if match and _stale(int(match["pid"]), match["token"]):
            journal = _read_journal(out_dir / name)
            _apply(out_dir, journal)
            (out_dir / name).unlink()
            notes.append(f"{out_dir}: completed the outputs of an interrupted run ({len(journal['rename'])} files)")
    for name in names:
        match = _TEMP_RE.fullmatch(name)
        stale = (match and _stale(int(match["pid"]), match["token"])) or _LEGACY_TEMP_RE.fullmatch(name)
        if stale and (out_dir / name).is_file():
            with contextlib.suppress(FileNotFoundError):
                (out_dir / name).unlink()
                notes.append(f"{out_dir / name}: removed a temporary file left by an interrupted run")
    if notes:
        _fsync_dir(out_dir)
        for note in notes:
            log.warning(note)
    return notes
