"""Tests for fedmnist.io: atomic writes leave a complete file or nothing, with normal permissions."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import stat
import subprocess
import sys

import pytest

from fedmnist.errors import ConfigError, FedMnistError, WriteError
from fedmnist.io import (
    OutputSet,
    atomic_path,
    atomic_write_bytes,
    atomic_write_text,
    atomic_writer,
    check_writable_dir,
    open_regular,
    quote,
    read_capped,
    read_text_capped,
    recover,
    sha256_file,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def umask():
    """Set the process umask for one test and restore it afterwards."""
    previous = os.umask(0o022)
    os.umask(previous)

    def set_mask(mask: int) -> None:
        os.umask(mask)

    yield set_mask
    os.umask(previous)


def test_atomic_writer_writes_the_file(tmp_path):
    # Prepare
    path = tmp_path / "sub" / "out.bin"

    # Execute
    with atomic_writer(path) as handle:
        handle.write(b"hello")

    # Assert
    assert path.read_bytes() == b"hello"
    assert os.listdir(path.parent) == ["out.bin"]


def test_atomic_writer_error_leaves_no_file_and_no_temp(tmp_path):
    # Prepare
    path = tmp_path / "out.bin"

    # Execute
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_writer(path) as handle:
            handle.write(b"partial data")
            raise RuntimeError("boom")

    # Assert
    assert os.listdir(tmp_path) == []


def test_atomic_writer_error_keeps_the_previous_file(tmp_path):
    # Prepare
    path = tmp_path / "out.bin"
    path.write_bytes(b"old complete contents")

    # Execute
    with pytest.raises(KeyboardInterrupt):
        with atomic_writer(path) as handle:
            handle.write(b"new half")
            raise KeyboardInterrupt

    # Assert
    assert path.read_bytes() == b"old complete contents"
    assert os.listdir(tmp_path) == ["out.bin"]


def test_atomic_writer_replaces_existing_file(tmp_path):
    # Prepare
    path = tmp_path / "out.txt"
    path.write_text("old")

    # Execute
    with atomic_writer(path, "w") as handle:
        handle.write("new text")

    # Assert
    assert path.read_text() == "new text"


@pytest.mark.parametrize(("mask", "expected"), [(0o022, 0o644), (0o027, 0o640), (0o002, 0o664)])
def test_final_file_has_normal_permissions(tmp_path, umask, mask, expected):
    # Prepare
    umask(mask)
    path = tmp_path / "out.bin"

    # Execute
    atomic_write_bytes(path, b"x")

    # Assert
    assert stat.S_IMODE(path.stat().st_mode) == expected


def test_atomic_path_permissions_and_cleanup(tmp_path, umask):
    # Prepare
    umask(0o022)
    good = tmp_path / "figure.png"
    bad = tmp_path / "broken.png"

    # Execute
    with atomic_path(good) as tmp:
        tmp.write_bytes(b"png")
    with pytest.raises(ValueError):
        with atomic_path(bad) as tmp:
            tmp.write_bytes(b"half")
            raise ValueError("library failed")

    # Assert
    assert good.read_bytes() == b"png"
    assert stat.S_IMODE(good.stat().st_mode) == 0o644
    assert os.listdir(tmp_path) == ["figure.png"]


def test_atomic_write_text_is_utf8(tmp_path):
    # Prepare
    path = tmp_path / "particion.json"

    # Execute
    atomic_write_text(path, "distribución ñ")

    # Assert
    assert path.read_bytes() == "distribución ñ".encode("utf-8")


def test_sha256_file_known_value(tmp_path):
    # Prepare
    path = tmp_path / "abc.txt"
    path.write_bytes(b"abc")

    # Execute / Assert
    assert sha256_file(path) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_sha256_file_spanning_several_blocks(tmp_path):
    # Prepare
    data = bytes(range(256)) * (3 * 4096 + 17)  # a little over 3 MiB, read in 1 MiB blocks
    path = tmp_path / "big.bin"
    path.write_bytes(data)

    # Execute / Assert
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()


# --- temporary files left by a killed atomic write --------------------------------------------------


def hidden(directory) -> list[str]:
    """Every name starting with '.' under ``directory`` (temporary files, journals)."""
    return sorted(str(p.relative_to(directory)) for p in directory.rglob(".*"))


def _spawned_pid() -> int:
    """The id of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_atomic_writer_temp_names_carry_the_writer(tmp_path):
    # Prepare
    seen = []

    # Execute
    with atomic_writer(tmp_path / "out.bin") as handle:
        seen = os.listdir(tmp_path)
        handle.write(b"x")

    # Assert: hidden, tagged with this process's id, swept by recover once the writer is gone
    assert len(seen) == 1 and seen[0].startswith(f".out.tmp-{os.getpid()}-") and seen[0].endswith(".tmp")


def test_recover_sweeps_dead_writers_temps_and_keeps_live_ones(tmp_path):
    # Prepare
    dead, live_other = _spawned_pid(), os.getppid()
    names = {
        f".modelo.tmp-{dead}-0123456789ab.h5": "dead",
        f".tabla.tmp-{dead}-0123456789ab.tmp": "dead",
        f".modelo.tmp-{live_other}-0123456789ab.h5": "live",
        f".modelo.tmp-{os.getpid()}-abcdefabcdef.h5": "ours, finished",  # token not registered any more
        ".figura.0123456789ab.png": "legacy",  # fedmnist 0.1's naming
        ".bashrc": "user",
        "resultados.json": "output",
    }
    for name in names:
        (tmp_path / name).write_text(names[name])

    # Execute
    with atomic_writer(tmp_path / "enCurso.bin") as handle:  # a live writer of this very process
        notes = recover(tmp_path)
        handle.write(b"still here")

    # Assert
    assert sorted(os.listdir(tmp_path)) == sorted([f".modelo.tmp-{live_other}-0123456789ab.h5", ".bashrc",
                                                    "resultados.json", "enCurso.bin"])
    assert len(notes) == 4 and all("temporary file" in n for n in notes)


# --- output sets ----------------------------------------------------------------------------------


OLD = {"a.json": "old a", "b.csv": "old b", "sub/c.pkl": "old c", "modelo.h5": "old model"}
NEW = {"a.json": "new a", "b.csv": "new b", "sub/c.pkl": "new c", "modelo.h5": "new model"}


def write_set(out_dir, contents: dict[str, str]) -> dict:
    with OutputSet(out_dir) as outputs:
        for name, text in contents.items():
            if name.endswith(".h5"):
                with outputs.temp_path(name) as tmp:  # as Keras would write it
                    assert tmp.suffix == ".h5" and tmp.parent == out_dir
                    tmp.write_text(text)
            else:
                outputs.write_text(name, text)
    return contents


def read_set(out_dir) -> dict[str, str]:
    return {str(p.relative_to(out_dir)): p.read_text() for p in out_dir.rglob("*")
            if p.is_file() and not p.name.startswith(".")}


def test_output_set_writes_every_file(tmp_path):
    # Prepare
    out = tmp_path / "resultados"

    # Execute
    write_set(out, OLD)

    # Assert
    assert read_set(out) == OLD
    assert hidden(out) == []


def test_output_set_nothing_visible_before_commit(tmp_path):
    # Prepare
    write_set(tmp_path, OLD)

    # Execute
    with OutputSet(tmp_path) as outputs:
        for name, text in NEW.items():
            outputs.write_text(name, text)
        during = read_set(tmp_path)

    # Assert
    assert during == OLD and read_set(tmp_path) == NEW


def test_output_set_error_keeps_the_old_set_and_no_temps(tmp_path):
    # Prepare
    write_set(tmp_path, OLD)

    # Execute
    with pytest.raises(RuntimeError, match="evaluation failed"):
        with OutputSet(tmp_path) as outputs:
            outputs.write_text("a.json", "new a")
            with outputs.temp_path("modelo.h5") as tmp:
                tmp.write_text("new model")
            raise RuntimeError("evaluation failed")

    # Assert
    assert read_set(tmp_path) == OLD and hidden(tmp_path) == []


def test_output_set_error_in_a_new_directory_leaves_no_directory(tmp_path):
    # Prepare
    out = tmp_path / "nuevo" / "resultados"

    # Execute
    with pytest.raises(ValueError):
        with OutputSet(out) as outputs:
            outputs.write_text("sub/a.json", "x")
            raise ValueError

    # Assert
    assert os.listdir(tmp_path) == []


def test_output_set_discard_removes_stale_outputs_at_commit(tmp_path):
    # Prepare
    write_set(tmp_path, OLD)

    # Execute
    with OutputSet(tmp_path) as outputs:
        outputs.write_text("a.json", "new a")
        outputs.discard("b.csv")
        outputs.discard("never-existed.txt")
        assert (tmp_path / "b.csv").exists()

    # Assert
    assert read_set(tmp_path) == {"a.json": "new a", "sub/c.pkl": "old c", "modelo.h5": "old model"}


def test_output_set_rewriting_a_name_keeps_the_last(tmp_path):
    # Execute
    with OutputSet(tmp_path) as outputs:
        outputs.write_text("a.json", "first")
        outputs.write_text("a.json", "second")

    # Assert
    assert read_set(tmp_path) == {"a.json": "second"} and hidden(tmp_path) == []


def test_output_set_files_have_normal_permissions(tmp_path, umask):
    # Prepare
    umask(0o022)

    # Execute
    write_set(tmp_path, OLD)

    # Assert
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "modelo.h5").stat().st_mode) == 0o644


@pytest.mark.parametrize("name", ["../fuera.txt", "/etc/passwd", "", "a/../../b", ".x.tmp-1-0123456789ab.h5"])
def test_output_set_refuses_names_outside_the_directory(tmp_path, name):
    # Execute / Assert
    with OutputSet(tmp_path) as outputs, pytest.raises(ValueError):
        outputs.write_text(name, "x")


def test_output_set_returns_final_paths(tmp_path):
    # Execute
    outputs = OutputSet(tmp_path).open()
    outputs.write_bytes("x.bin", b"1")
    paths = outputs.commit()

    # Assert
    assert paths == {"x.bin": tmp_path / "x.bin"} and outputs.path("x.bin") == tmp_path / "x.bin"
    with pytest.raises(RuntimeError):
        outputs.write_bytes("y.bin", b"2")


# --- kill -9 at every step of a commit ------------------------------------------------------------


WRITER = r"""
import os, signal, sys
import fedmnist.io as fio
out, stage, index = sys.argv[1], sys.argv[2], int(sys.argv[3])

def hook(step, i):
    if (step, i) == (stage, index):
        os.kill(os.getpid(), signal.SIGKILL)

fio._test_hook = hook
with fio.OutputSet(out) as outputs:
    outputs.write_text("a.json", "new a")
    outputs.write_text("b.csv", "new b")
    outputs.write_text("sub/c.pkl", "new c")
    with outputs.temp_path("modelo.h5") as tmp:
        tmp.write_text("new model")
"""

KILL_POINTS = [("temp", 1), ("temp", 3), ("temp", 4), ("journal", 0), ("rename", 1), ("rename", 3),
               ("renamed", 4)]


def run_writer(out_dir, stage: str, index: int) -> int:
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", WRITER, str(out_dir), stage, str(index)], check=False,
                          capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode in (0, -signal.SIGKILL), proc.stderr
    return proc.returncode


@pytest.mark.parametrize(("stage", "index"), KILL_POINTS, ids=[f"{s}-{i}" for s, i in KILL_POINTS])
@pytest.mark.parametrize("reader", ["recover", "next-set"])
def test_killed_writer_leaves_the_old_set_or_the_new_one(tmp_path, stage, index, reader):
    # Prepare
    write_set(tmp_path, OLD)

    # Execute
    returncode = run_writer(tmp_path, stage, index)
    if reader == "recover":
        recover(tmp_path)
    else:  # the next run's OutputSet recovers on opening, before it writes anything
        OutputSet(tmp_path).open().abort()

    # Assert: committed (journal written) means the whole new set, else the whole old one
    assert returncode == -signal.SIGKILL
    expected = OLD if stage == "temp" else NEW
    assert read_set(tmp_path) == expected
    assert hidden(tmp_path) == []


def test_killed_first_run_leaves_nothing_after_recovery(tmp_path):
    # Execute
    run_writer(tmp_path, "temp", 3)
    recover(tmp_path)

    # Assert
    assert os.listdir(tmp_path) == []


def test_without_recovery_a_kill_mid_renames_mixes_two_runs(tmp_path):
    # Control: what recover() repairs (a journal and a mix of old and new files) really happens
    write_set(tmp_path, OLD)

    # Execute
    run_writer(tmp_path, "rename", 2)

    # Assert
    current = read_set(tmp_path)
    assert current != OLD and current != NEW
    assert any(name.startswith(".fedmnist-journal-") for name in os.listdir(tmp_path))


def test_damaged_journal_is_reported_not_applied(tmp_path):
    # Prepare: a journal (of a dead writer) that would rename a file outside the directory
    write_set(tmp_path, OLD)
    pid = _spawned_pid()
    journal = {"format": "fedmnist-output-set", "version": 1,
               "rename": [[f".a.tmp-{pid}-0123456789ab.json", "../escapado.json"]], "discard": []}
    (tmp_path / f".a.tmp-{pid}-0123456789ab.json").write_text("x")
    path = tmp_path / f".fedmnist-journal-{pid}-0123456789ab.json"
    path.write_text(json.dumps(journal))

    # Execute
    with pytest.raises(FedMnistError) as excinfo:
        recover(tmp_path)

    # Assert
    assert str(path) in str(excinfo.value) and "damaged output journal" in str(excinfo.value)
    assert not (tmp_path.parent / "escapado.json").exists() and read_set(tmp_path) == OLD


# --- output directories checked before any work ------------------------------------------------------


def test_check_writable_dir_accepts_existing_and_creatable(tmp_path):
    # Execute / Assert
    assert check_writable_dir(tmp_path) == tmp_path
    assert check_writable_dir(tmp_path / "a" / "b") == tmp_path / "a" / "b"
    assert os.listdir(tmp_path) == []  # checked, nothing created


def test_check_writable_dir_refuses_a_file(tmp_path):
    # Prepare
    path = tmp_path / "resultados"
    path.write_text("not a directory")

    # Execute / Assert
    with pytest.raises(ConfigError, match=r"resultados: the --out directory is a file, not a directory"):
        check_writable_dir(path, "--out directory")
    with pytest.raises(ConfigError, match=r"cannot create the output directory: .*resultados is a file"):
        check_writable_dir(path / "sub", "output directory")


def test_check_writable_dir_refuses_a_broken_link(tmp_path):
    # Prepare
    path = tmp_path / "enlace"
    path.symlink_to(tmp_path / "no-existe")

    # Execute / Assert
    with pytest.raises(ConfigError, match="broken symbolic link"):
        check_writable_dir(path)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only-mode directories")
def test_check_writable_dir_refuses_a_read_only_directory(tmp_path):
    # Prepare
    locked = tmp_path / "bloqueado"
    locked.mkdir()
    locked.chmod(0o555)

    # Execute / Assert
    try:
        with pytest.raises(ConfigError, match="is not writable"):
            check_writable_dir(locked)
        with pytest.raises(ConfigError, match=r"cannot create the output directory: .*bloqueado is not writable"):
            check_writable_dir(locked / "nuevo")
    finally:
        locked.chmod(0o755)


def test_check_writable_dir_reports_a_failed_write_probe(tmp_path, monkeypatch):
    # Prepare: access() says yes but creating a file fails (a read-only mount, an ACL)
    def refuse(*args, **kwargs):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(os, "open", refuse)

    # Execute / Assert
    with pytest.raises(ConfigError, match=r"is not writable \(Read-only file system\)"):
        check_writable_dir(tmp_path)


def test_output_set_opening_on_a_file_is_a_clear_error(tmp_path):
    # Prepare
    path = tmp_path / "out"
    path.write_text("x")

    # Execute / Assert
    with pytest.raises(ConfigError, match="is a file"):
        OutputSet(path).open()


# --- bounded reads ------------------------------------------------------------------------------------


def test_read_capped_reads_up_to_the_limit(tmp_path):
    # Prepare
    path = tmp_path / "f.bin"
    path.write_bytes(b"12345")

    # Execute / Assert
    assert read_capped(path, 5, "file", error=FedMnistError) == b"12345"
    with pytest.raises(FedMnistError, match=r"f\.bin: the file has 5 bytes, more than the 4 allowed"):
        read_capped(path, 4, "file", error=FedMnistError)


@pytest.mark.parametrize("kind", ["fifo", "dev-zero", "dev-null", "directory"])
def test_open_regular_refuses_special_files_without_opening_them(tmp_path, monkeypatch, kind):
    # Prepare: a FIFO (opening it would block), links to devices, a directory
    path = tmp_path / "entrada"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "directory":
        path.mkdir()
    else:
        path.symlink_to("/dev/zero" if kind == "dev-zero" else "/dev/null")
    opened = []
    real_open = os.open
    monkeypatch.setattr(os, "open", lambda p, *a, **k: opened.append(p) or real_open(p, *a, **k))

    # Execute
    with pytest.raises(FedMnistError) as excinfo:
        open_regular(path, 1 << 20, "input", error=FedMnistError)

    # Assert: refused by name and kind, and never opened
    message = str(excinfo.value)
    assert message.startswith(f"{path}: the input is ")
    assert ("directory" if kind == "directory" else "not a regular file") in message
    assert opened == []


def test_open_regular_stops_a_file_that_grows_past_its_limit(tmp_path):
    # Prepare: 10 bytes when checked, 30 when read
    path = tmp_path / "creciente.bin"
    path.write_bytes(b"x" * 10)

    # Execute / Assert
    with open_regular(path, 16, "input", error=FedMnistError) as handle:
        with open(path, "ab") as writer:
            writer.write(b"y" * 20)
        with pytest.raises(FedMnistError, match="grew past the 16 bytes allowed"):
            handle.read()


def test_sha256_file_of_a_special_file_is_refused(tmp_path):
    # Prepare
    path = tmp_path / "cliente_1.npz"
    os.mkfifo(path)

    # Execute / Assert: hashing a FIFO would block for ever; it is refused at once
    with pytest.raises(ConfigError, match="is a FIFO, not a regular file"):
        sha256_file(path, 1 << 20, "partition file", error=ConfigError)


def test_read_text_capped_refuses_text_that_is_not_utf8(tmp_path):
    # Prepare
    path = tmp_path / "resumen.json"
    path.write_bytes(b"\xff\xfe{}")

    # Execute / Assert
    with pytest.raises(FedMnistError, match=r"resumen\.json: the summary is not UTF-8 text"):
        read_text_capped(path, 100, "summary", error=FedMnistError)


@pytest.mark.parametrize(("text", "expected"), [
    ("plain", "plain"),
    ("línea\nsegunda\x1b[31m", "línea\\nsegunda\\x1b[31m"),
    ("x" * 100, "x" * 80 + "..."),
])
def test_quote_gives_one_bounded_escaped_line(text, expected):
    # Execute / Assert
    assert quote(text) == expected


def test_write_error_on_a_full_disk_names_the_file_and_leaves_nothing(tmp_path, monkeypatch):
    import errno

    # Prepare: the disk fills up while the output set is written
    out = tmp_path / "salida"
    real_fsync = os.fsync
    calls = []

    def fsync(fd):
        calls.append(fd)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)

    # Execute
    with pytest.raises(WriteError) as excinfo, OutputSet(out) as outputs:
        outputs.write_text("a.txt", "a")
        outputs.write_text("b.txt", "b")

    # Assert
    assert str(excinfo.value) == f"{out / 'b.txt'}: cannot write the file (No space left on device); nothing was written"
    assert not out.exists() or list(out.iterdir()) == []
