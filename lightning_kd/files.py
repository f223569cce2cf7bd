"""Files written whole or not at all: a reader, or a run killed half-way, never sees a truncated one.

The text is written beside the target under a hidden name, flushed and fsynced, and renamed over the target;
the rename is atomic on a POSIX file system, so the target is always the previous complete file or the new
complete one. The temporary is beside the target, not in the system temp folder: across file systems a
rename is a copy, which a kill can cut short.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

TEMPORARY = ".tmp"


def staging_path(path: str | os.PathLike, suffix: str = TEMPORARY) -> Path:
    """Where ``path`` is written before it is renamed into place: hidden, per process, ending in ``suffix``."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}{suffix}")


def fsync_directory(folder: str | os.PathLike) -> None:
    """Make a rename in ``folder`` durable: it lives in the directory entry, which a power loss can forget."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass  # some file systems (and Windows) refuse to fsync a directory
    finally:
        os.close(descriptor)


@contextlib.contextmanager
def atomic_write(
    path: str | os.PathLike, mode: str = "wb", encoding: str | None = None, suffix: str = TEMPORARY
) -> Iterator[IO[Any]]:
    """Open a temporary beside ``path`` for writing; when the block ends it replaces ``path``, durably.

    An error (or ``KeyboardInterrupt``) inside the block removes the temporary and leaves ``path`` as it was.
    ``mode`` is ``"wb"`` or ``"w"``; text defaults to UTF-8.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write writes a whole file: mode must be 'w' or 'wb', got {mode!r}")
    target = Path(path)
    staging = staging_path(target, suffix)
    if mode == "w" and encoding is None:
        encoding = "utf-8"
    try:
        with open(staging, mode, encoding=encoding) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(staging, target)
    except BaseException:
        staging.unlink(missing_ok=True)
        raise
    fsync_directory(target.parent)
