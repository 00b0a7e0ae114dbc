"""Atomic writes: an output file is either complete or absent, never half-written.

Every file genlab writes goes through `atomic_file`: a temporary file with a name of its own in
the destination's folder (so two writers of one path never share a temporary file), flushed and
fsynced, renamed over the destination, and the folder fsynced so the rename itself survives a
crash. A reader sees the old file or the new one, whole. The file gets the permissions a plain
`open(path, "w")` would give it (0o666 less the umask), not the temporary file's private 0o600:
outputs are not secret, and a team sharing a project folder reads each other's models.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[IO[bytes]]:
    """A binary file to write `path`'s new contents to; in place when the block ends without an
    exception, and nothing written (the temporary file removed) when it raises."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_folder(path.parent)


@contextlib.contextmanager
def atomic_folder(path: str | Path) -> Iterator[Path]:
    """A new folder to fill with `path`'s new contents, swapped in whole when the block ends
    without an exception (by two renames: a complete folder is always at one of the two names)
    and removed when it raises."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    old = tmp.with_name(tmp.name + "-old")
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; outputs are not secret
        yield tmp
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        fsync_folder(path.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


@functools.cache
def _umask() -> int:
    """This process's umask, which can only be read by setting it: set to the private 0o077 for
    the instant between the two calls (a file another thread creates then is private, never
    more open than asked), once per process (genlab never changes its umask)."""
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def fsync_file(path: str | Path) -> None:
    """Make a file written by someone else's code (torch.save to a path) durable."""
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def fsync_folder(folder: str | Path) -> None:
    """Make a rename or a new entry in `folder` durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on a folder: the rename is still atomic
        pass
    finally:
        os.close(fd)


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_file(path) as f:
        f.write(text.encode())


def write_json_atomic(path: str | Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def save_torch_atomic(obj: Any, path: str | Path) -> None:
    """torch.save into a temporary file next to `path`, renamed into place when complete."""
    import torch

    with atomic_file(path) as f:
        torch.save(obj, f)


def copy_file_atomic(source: str | Path, path: str | Path) -> None:
    with open(source, "rb") as src, atomic_file(path) as f:
        shutil.copyfileobj(src, f)


@contextlib.contextmanager
def exclusive_lock(path: str | Path) -> Iterator[None]:
    """Hold an exclusive lock on `path` (created if missing) for the block: processes taking the
    same lock run the block one at a time. A lock is per open file, so a process must not take
    one it already holds (it would wait for itself)."""
    import fcntl

    with open(path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
