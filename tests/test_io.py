"""Tests for fedmnist.io: atomic writes leave a complete file or nothing, with normal permissions."""

from __future__ import annotations

import hashlib
import os
import stat

import pytest

from fedmnist.io import atomic_path, atomic_write_bytes, atomic_write_text, atomic_writer, sha256_file


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
