"""Atomic writes: the target is the old file or the whole new one, and no temporary is left behind."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lightning_kd.files import atomic_write, fsync_directory, staging_path


def test_atomic_write_replaces_the_file_whole(tmp_path: Path) -> None:
    target = tmp_path / "data.json"
    target.write_text("old")
    with atomic_write(target, "w") as handle:
        handle.write("new ")
        assert target.read_text() == "old"  # readers see the old file until the block ends
        handle.write("text \u00e9")
    assert target.read_text(encoding="utf-8") == "new text \u00e9"
    assert sorted(tmp_path.iterdir()) == [target]


def test_an_error_inside_the_block_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "weights.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="killed"), atomic_write(target) as handle:
        handle.write(b"half of the new")
        assert staging_path(target).exists()
        raise RuntimeError("killed")
    assert target.read_bytes() == b"old"
    assert sorted(tmp_path.iterdir()) == [target]


def test_a_new_file_is_written_and_a_failed_one_is_never_created(tmp_path: Path) -> None:
    with atomic_write(tmp_path / "new.bin") as handle:
        handle.write(b"\x00\x01")
    assert (tmp_path / "new.bin").read_bytes() == b"\x00\x01"
    with pytest.raises(KeyboardInterrupt), atomic_write(tmp_path / "never.bin") as handle:
        raise KeyboardInterrupt
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new.bin"]


def test_the_temporary_is_hidden_beside_the_target_and_per_process(tmp_path: Path) -> None:
    staged = staging_path(tmp_path / "last.ckpt", ".partial")
    assert staged == tmp_path / f".last.ckpt.{os.getpid()}.partial"


def test_only_whole_file_modes(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="mode must be 'w' or 'wb'"), atomic_write(tmp_path / "x", "a"):
        pass
    assert not list(tmp_path.iterdir())


def test_fsync_directory_tolerates_a_missing_folder(tmp_path: Path) -> None:
    fsync_directory(tmp_path)
    fsync_directory(tmp_path / "missing")
