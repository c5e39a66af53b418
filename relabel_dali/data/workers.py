"""Worker lifecycle: the processes that serve samples die with the trainer that started them.

DALI's parallel external source runs the sample source in forked or spawned worker processes; a
trainer killed with SIGKILL cannot stop them itself, so each worker asks Linux to kill it when its
parent dies (``PR_SET_PDEATHSIG``).
"""
from __future__ import annotations

import os

_FORK_HOOK = []


def workers_die_with_parent() -> None:
    """Every process forked from now on by this one (DALI's forked workers) dies with it; spawned
    workers ask for the same when they unpickle their source (``__setstate__``)."""
    if not _FORK_HOOK and hasattr(os, "register_at_fork"):
        os.register_at_fork(after_in_child=die_with_parent)
        _FORK_HOOK.append(True)


def alive(pid: int) -> bool:
    """Whether ``pid`` runs: it exists and is not a zombie (killed, not yet reaped)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return stat.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return True


def die_with_parent(owner: int | None = None) -> None:
    """Asks Linux to kill this worker process when its parent dies, so workers never outlive a
    killed trainer (SIGKILL included), even workers that have not served a sample yet. ``owner``:
    the process that built the source; a spawned worker that finds it gone (it died while the
    worker was starting) exits at once. A no-op off Linux."""
    import signal

    parent = os.getppid()
    if owner is not None and parent != owner:
        if not alive(owner):  # orphaned before it could ask (the owner may linger as a zombie)
            os._exit(1)
        return  # not the owner's child: nothing to tie to
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(1)
