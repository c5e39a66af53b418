"""Progress for long jobs, visible wherever the output goes.

On a terminal this is a tqdm bar. Anywhere else (a SLURM log, a pipe into ``tee``, a file) tqdm
shows nothing at all, so there a plain line is printed every ``interval_s`` seconds instead:

    pack_labels: 1200/5000 (24%) 150 rec/s, eta 25 s

and one summary line when the work ends. The interval defaults to 30 s; the environment variable
``RELABEL_PROGRESS_INTERVAL_S`` overrides it (0 prints a line for every update).

    for item in progress(items, desc="check_dataset", unit="img"): ...
    with progress(total, desc="pack_labels", unit="rec") as bar: ... bar.update(n)
"""
from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TextIO

from tqdm import tqdm

INTERVAL_ENV = "RELABEL_PROGRESS_INTERVAL_S"
DEFAULT_INTERVAL_S = 30.0


def interval_from_env(default: float = DEFAULT_INTERVAL_S) -> float:
    raw = os.environ.get(INTERVAL_ENV)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{INTERVAL_ENV}={raw!r}: expected a number of seconds") from None
    if not value >= 0:  # also refuses NaN
        raise ValueError(f"{INTERVAL_ENV}={raw!r}: expected a number of seconds >= 0")
    return value


def _duration(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds // 60:.0f} min {seconds % 60:02.0f} s"
    return f"{seconds // 3600:.0f} h {seconds % 3600 // 60:02.0f} min"


def _rate(count: float, seconds: float) -> float:
    return count / seconds if seconds > 0 else 0.0


class PlainProgress:
    """tqdm's small interface (iterate, ``update``, ``close``, context manager) printing a line
    every ``interval_s`` seconds and a summary at the end."""

    def __init__(self, iterable: Iterable | None, *, total: int | None, desc: str, unit: str,
                 interval_s: float, file: TextIO, clock=time.monotonic):
        self.iterable, self.total, self.desc, self.unit = iterable, total, desc, unit
        self.interval_s, self.file, self.clock = interval_s, file, clock
        self.n = 0
        self.started = self.last_print = clock()
        self.closed = False
        self.postfix = ""

    def line(self, now: float) -> str:
        elapsed = now - self.started
        rate = _rate(self.n, elapsed)
        text = f"{self.desc}: {self.n}"
        if self.total:
            text += f"/{self.total} ({100 * self.n / self.total:.0f}%)"
        else:
            text += f" {self.unit}"
        text += f" {rate:,.0f} {self.unit}/s" if rate >= 10 else f" {rate:.2g} {self.unit}/s"
        if self.total and rate > 0:
            text += f", eta {_duration((self.total - self.n) / rate)}"
        return f"{text}, {self.postfix}" if self.postfix else text

    def set_postfix(self, ordered_dict=None, refresh: bool = True, **values) -> None:
        """As tqdm's: ``name=value`` pairs appended to the next progress line."""
        values = {**(ordered_dict or {}), **values}
        self.postfix = ", ".join(f"{name}={value}" for name, value in values.items())

    def update(self, n: int = 1) -> None:
        self.n += n
        now = self.clock()
        if now - self.last_print >= self.interval_s:
            self.last_print = now
            print(self.line(now), file=self.file, flush=True)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        elapsed = self.clock() - self.started
        of_total = f" of {self.total}" if self.total and self.n != self.total else ""
        print(f"{self.desc}: {self.n}{of_total} {self.unit} in {_duration(elapsed)} "
              f"({_rate(self.n, elapsed):,.1f} {self.unit}/s)", file=self.file, flush=True)

    def __iter__(self) -> Iterator:
        try:
            for item in self.iterable:
                yield item
                self.update()
        finally:
            self.close()

    def __enter__(self) -> "PlainProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Silent(PlainProgress):
    """Counts, prints nothing."""

    def update(self, n: int = 1) -> None:
        self.n += n

    def close(self) -> None:
        self.closed = True


def progress(iterable_or_total: Iterable | int | None = None, *, desc: str, unit: str = "it",
             total: int | None = None, interval_s: float | None = None, file: TextIO | None = None,
             disable: bool = False, **tqdm_options):
    """A progress display over an iterable, or for ``update(n)`` calls up to a total (an int).

    ``disable=True`` shows nothing (e.g. on all but one distributed rank). ``tqdm_options`` (such
    as ``leave=False``) go to the tqdm bar on a terminal and are ignored elsewhere."""
    file = sys.stderr if file is None else file
    if isinstance(iterable_or_total, int) and not isinstance(iterable_or_total, bool):
        iterable, total = None, iterable_or_total
    else:
        iterable = iterable_or_total
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
    if disable:
        return _Silent(iterable, total=total, desc=desc, unit=unit, interval_s=0.0, file=file)
    isatty = getattr(file, "isatty", None)
    if isatty is not None and isatty():
        return tqdm(iterable, total=total, desc=desc, unit=unit, file=file, **{"dynamic_ncols": True, **tqdm_options})
    interval_s = interval_from_env() if interval_s is None else interval_s
    return PlainProgress(iterable, total=total, desc=desc, unit=unit, interval_s=interval_s, file=file)
