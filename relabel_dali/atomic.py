"""Atomic file writes: a temporary file in the target's folder, fsync, rename, fsync the folder.

Readers see the old file or the new one, never half of one; a process killed mid-write leaves at
most a hidden ``.<name>.*.tmp`` file behind. The file gets the mode a plain ``open`` would give it
(0666 less the umask, so 0644 under umask 022): ``mkstemp`` alone creates 0600, which on a shared
cluster hides a dataset or checkpoint from everyone else.

A full disk or a used-up quota (ENOSPC, EDQUOT) surfaces as one :class:`DiskFullError` that names
the file, the bytes the write needed and the bytes free (``os.statvfs``), with the temporary file
removed; every tool exits with ``DISK_FULL_EXIT`` on it, and rerunning once space is freed resumes.
"""
from __future__ import annotations

import errno
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

# sysexits.h EX_TEMPFAIL: nothing is wrong with the input or the settings; the same command
# succeeds (and resumes) once space is freed.
DISK_FULL_EXIT = 75
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def describe_bytes(count: int) -> str:
    """``45,213,544 bytes (43.1 MiB)``: exact for scripts, readable for people."""
    count = int(count)
    size, unit = float(count), "bytes"
    for name in ("KiB", "MiB", "GiB", "TiB"):
        if size < 1024:
            break
        size, unit = size / 1024, name
    return f"{count:,} bytes" + (f" ({size:.1f} {unit})" if unit != "bytes" else "")


class DiskFullError(OSError):
    """A write that found the file system full (ENOSPC) or the quota used up (EDQUOT): ``path``,
    ``needed`` (bytes the write needed; ``qualifier`` says "about" or "at least" where that is not
    exact) and ``free`` (bytes free to this user on that file system, from ``os.statvfs``; a quota
    may allow less)."""

    def __init__(self, path: str | os.PathLike, needed: int, free: int, code: int = errno.ENOSPC,
                 qualifier: str = ""):
        super().__init__(code, os.strerror(code), str(path))
        self.path, self.needed, self.free, self.qualifier = Path(path), int(needed), int(free), qualifier

    def __str__(self) -> str:
        quota = " on the file system (the quota allows less)" if self.errno == errno.EDQUOT else ""
        needed = f"{self.qualifier} " if self.qualifier else ""
        return (f"{self.path}: {self.strerror.lower()}: needs {needed}{describe_bytes(self.needed)}, "
                f"{describe_bytes(self.free)} free{quota}")

    def __reduce__(self):
        return type(self), (self.path, self.needed, self.free, self.errno, self.qualifier)


def is_disk_full(error: BaseException) -> bool:
    return isinstance(error, OSError) and error.errno in DISK_FULL_ERRNOS


def _existing(path: str | os.PathLike) -> Path:
    """``path`` or its nearest existing parent: where a file about to be written will live."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def free_bytes(path: str | os.PathLike) -> int:
    """Bytes an unprivileged user may still write on the file system that holds (or will hold)
    ``path``."""
    stats = os.statvfs(_existing(path))
    return stats.f_bavail * stats.f_frsize


def check_free_space(path: str | os.PathLike, needed: int, qualifier: str = "") -> int:
    """Returns the bytes free where ``path`` goes; raises :class:`DiskFullError` when fewer than
    ``needed``."""
    free = free_bytes(path)
    if free < needed:
        raise DiskFullError(path, needed, free, qualifier=qualifier)
    return free


def disk_full_error(error: OSError, path: str | os.PathLike, needed: int | None = None,
                    qualifier: str = "") -> DiskFullError:
    """``error`` (ENOSPC/EDQUOT) as a :class:`DiskFullError` for ``path``; without ``needed``, at
    least one block of the file system."""
    if needed is None:
        needed, qualifier = os.statvfs(_existing(path)).f_bsize, "at least"
    return DiskFullError(path, needed, free_bytes(path), error.errno, qualifier)


@contextmanager
def raise_disk_full(path: str | os.PathLike, needed: int | None = None, qualifier: str = ""):
    """Inside the block, ENOSPC/EDQUOT become a :class:`DiskFullError` naming ``path``."""
    try:
        yield
    except OSError as error:
        if is_disk_full(error) and not isinstance(error, DiskFullError):
            raise disk_full_error(error, path, needed, qualifier) from error
        raise


def _umask_at_import() -> int:
    # os.umask can only be read by setting it: set and restore once, here, before any threads run.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_IMPORT_UMASK = _umask_at_import()


def current_umask() -> int:
    """The process umask, read without changing it where Linux reports it (``/proc/self/status``);
    elsewhere the umask at import."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return _IMPORT_UMASK


def fsync_dir(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb", size_hint: int | None = None,
                size_qualifier: str = "about"):
    """``with atomic_open(path) as handle: ...`` writes ``path`` all at once when the block ends
    without an exception, and leaves ``path`` untouched otherwise. A full disk raises
    :class:`DiskFullError` with the temporary file removed; it names ``size_hint`` (the file's
    expected size, ``size_qualifier`` says how sure) as the bytes needed, or else the bytes that
    were written before the disk filled."""
    path = Path(path)
    with raise_disk_full(path, size_hint, size_qualifier):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as handle:
            os.fchmod(handle.fileno(), 0o666 & ~current_umask())
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        written = os.stat(tmp).st_size if os.path.exists(tmp) else 0
        Path(tmp).unlink(missing_ok=True)
        if is_disk_full(error) and not isinstance(error, DiskFullError):
            if size_hint is not None and size_hint > written:
                raise disk_full_error(error, path, size_hint, size_qualifier) from error
            raise disk_full_error(error, path, written + 1, "at least") from error
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_open(path, size_hint=len(data), size_qualifier="") as handle:
        handle.write(data)
