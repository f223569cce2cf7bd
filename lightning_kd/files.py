"""Files written whole or not at all: a reader, or a run killed half-way, never sees a truncated one.

The text is written beside the target under a hidden name, flushed and fsynced, and renamed over the target;
the rename is atomic on a POSIX file system, so the target is always the previous complete file or the new
complete one. The temporary is beside the target, not in the system temp folder: across file systems a
rename is a copy, which a kill can cut short.

A write the machine refuses (a full disk, a quota, a read-only or vanished folder) is raised as
:class:`WriteFault`, which names the cause, the path, and the newest complete artifact, instead of the error of
whichever library was writing (PyTorch's is ``unexpected pos ... inline_container.cc``).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import inspect
import os
import re
import shutil
from collections.abc import Callable, Iterator
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
    path: str | os.PathLike,
    mode: str = "wb",
    encoding: str | None = None,
    suffix: str = TEMPORARY,
    what: str = "file",
    newest: Callable[[], Path | None] | None = None,
) -> Iterator[IO[Any]]:
    """Open a temporary beside ``path`` for writing; when the block ends it replaces ``path``, durably.

    An error (or ``KeyboardInterrupt``) inside the block removes the temporary and leaves ``path`` as it was.
    A write the machine refuses is raised as :class:`WriteFault` naming the ``what`` and the newest complete
    one (``newest``, see :func:`write_fault`). ``mode`` is ``"wb"`` or ``"w"``; text defaults to UTF-8.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write writes a whole file: mode must be 'w' or 'wb', got {mode!r}")
    target = Path(path)
    staging = staging_path(target, suffix)
    if mode == "w" and encoding is None:
        encoding = "utf-8"
    with faults_named(target, what, newest):
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


# errno -> (what happened, what to do); the errors a machine gives a writer that did nothing wrong
CAUSES = {
    errno.ENOSPC: ("the disk is full (ENOSPC)", "free space there or write to another disk"),
    errno.EDQUOT: ("the disk quota is used up (EDQUOT)", "free space in your quota or write elsewhere"),
    errno.EFBIG: (
        "the file is larger than this process may write (EFBIG, see `ulimit -f`)",
        "raise the limit or write smaller files",
    ),
    errno.EROFS: ("the file system is read-only (EROFS)", "write to a writable folder"),
    errno.ENOENT: (
        "the folder vanished while it was written (ENOENT: deleted or unmounted)",
        "check the mount and that nothing deletes the folder, then run again",
    ),
    errno.EACCES: ("permission denied (EACCES)", "fix the folder's permissions or write elsewhere"),
    errno.EIO: ("the device reported an I/O error (EIO)", "check the disk or mount"),
}


class WriteFault(OSError):
    """A write the machine refused: the message names the cause, the path and the newest complete artifact."""

    def __str__(self) -> str:
        return str(self.strerror)  # whole sentences, which name the errno and the path themselves


def os_error_in(error: BaseException) -> OSError | None:
    """The first ``OSError`` with an errno in ``error``'s chain: libraries that write files (PyTorch's zip
    writer, safetensors) restate the file system's error in their own words, keeping it as the context."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno is not None:
            return current
        # Rust writers (safetensors) keep only the text: "I/O error: File too large (os error 27)"
        code = re.search(r"\(os error (\d+)\)", str(current))
        if code:
            return OSError(int(code[1]), os.strerror(int(code[1])))
        # an error raised "from None" restated its context on purpose: that context is not this error's cause
        current = current.__cause__ or (None if current.__suppress_context__ else current.__context__)
    return None


def write_fault(
    error: BaseException,
    path: str | os.PathLike,
    what: str = "file",
    newest: Callable[[], Path | None] | None = None,
    note: str = "",
) -> WriteFault | None:
    """``error``, raised while writing the ``what`` at ``path``, restated as a :class:`WriteFault` when the
    machine refused the write (a cause in :data:`CAUSES`); ``None`` for any other error.

    ``newest`` finds the newest complete artifact of this kind (default: ``path`` itself if it exists, which an
    atomic write leaves as it was)."""
    if isinstance(error, WriteFault) or not isinstance(error, Exception):
        return None
    found = os_error_in(error)
    if found is None:
        return None
    code = errno.EACCES if found.errno == errno.EPERM else found.errno
    if code not in CAUSES:
        return None
    cause, fix = CAUSES[code]
    target = Path(path)
    if code == errno.ENOENT:
        # a folder that vanished, or a missing input (no fault of the machine's: left as it was raised)
        written = Path(found.filename) if found.filename else target
        if written.parent.is_dir():
            return None
    kept = newest() if newest is not None else (target if target.is_file() else None)
    if kept is None:
        safe = f"No complete {what} was written there before this one."
    elif Path(kept) == target:
        safe = f"{target} is unchanged: it still holds the previous complete {what}."
    else:
        safe = f"The newest complete {what} is {kept}."
    fault = WriteFault(
        code,
        f"could not write the {what} {target}: {cause}. {safe} To go on, {fix}.{' ' + note if note else ''}",
        str(target),
    )
    return fault


@contextlib.contextmanager
def faults_named(
    path: str | os.PathLike,
    what: str = "file",
    newest: Callable[[], Path | None] | None = None,
    note: str = "",
) -> Iterator[None]:
    """Restate a write the machine refuses inside the block as a :class:`WriteFault` (see :func:`write_fault`);
    other errors pass unchanged."""
    try:
        yield
    except Exception as error:
        fault = write_fault(error, path, what, newest, note)
        if fault is None:
            raise
        raise fault from error


@contextlib.contextmanager
def atomic_folder(
    path: str | os.PathLike, what: str = "folder", replaces: tuple[str, ...] = ()
) -> Iterator[Path]:
    """A hidden folder beside ``path`` to write into; when the block ends, each of its files is renamed into
    ``path`` (created if missing), and files of ``path`` matching the ``replaces`` globs that the new content
    lacks are removed (an old export's weight shards, which a loader would otherwise mix with the new ones).

    Everything that needs space is written in the block, so a full disk fails there, leaving ``path`` as it
    was (and the error a :class:`WriteFault`); the renames after it need none. Files in ``path`` that the new
    content does not replace are kept.
    """
    target = Path(path)
    staging = staging_path(target)
    with faults_named(target, what, lambda: target if target.is_dir() and any(target.iterdir()) else None):
        try:
            staging.mkdir(parents=True)
            yield staging
            target.mkdir(parents=True, exist_ok=True)
            written = {p.relative_to(staging) for p in staging.rglob("*") if p.is_file()}
            for pattern in replaces:
                for old in target.glob(pattern):
                    if old.is_file() and old.relative_to(target) not in written:
                        old.unlink()
            for name in sorted(written):
                (target / name).parent.mkdir(parents=True, exist_ok=True)
                os.replace(staging / name, target / name)
            fsync_directory(target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def names_write_faults(
    what: str, path_argument: str, note: str = ""
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorate a function that writes the ``what`` at its argument ``path_argument``: a write the machine
    refuses is raised as a :class:`WriteFault` naming it (see :func:`faults_named`)."""

    def decorate(function: Callable[..., Any]) -> Callable[..., Any]:
        signature = inspect.signature(function)

        @functools.wraps(function)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            path = signature.bind(*args, **kwargs).arguments.get(path_argument, "")
            with faults_named(Path(path).expanduser(), what, lambda: None, note):
                return function(*args, **kwargs)

        return wrapper

    return decorate
