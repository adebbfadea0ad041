"""Progress bars that suit where the output goes.

On a terminal: tqdm bars. Anywhere else (a Ray job's log, output redirected to a file, CI) a
redrawn bar becomes one line per refresh, thousands in a run, so :func:`bar` writes plain lines
instead: at most one per tenth of the work and no more often than every 30 s, plus the stage's
last line (``leave=False`` stages, the inner ones, only when they took 30 s or more).

``run.progress`` picks: ``auto`` (bars when stderr is a terminal), ``bars`` or ``lines``. The
driver resolves ``auto`` once (:func:`resolve`) and hands the result to the processes it starts,
whose stderr is never a terminal although their lines reach the user's.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any

from tqdm import tqdm

MODES = ("auto", "bars", "lines")
LINE_EVERY_S = 30.0  # at most one line per this many seconds ...
LINE_FRACTION = 0.1  # ... and per this fraction of the work

_mode = "auto"


def resolve(mode: str = "auto") -> str:
    """``bars`` or ``lines`` for ``mode``; ``auto``: bars when this process's stderr is a terminal."""
    if mode not in MODES:
        raise ValueError(f"progress mode {mode!r}; expected one of {MODES}")
    if mode != "auto":
        return mode
    try:
        return "bars" if sys.stderr.isatty() else "lines"
    except (AttributeError, ValueError):  # a replaced or closed stderr
        return "lines"


def set_mode(mode: str) -> str:
    """Set this process's mode (``run.progress``); returns the resolved one."""
    global _mode
    _mode = resolve(mode)
    return _mode


def mode() -> str:
    return resolve(_mode)


def _fmt_s(s: float) -> str:
    s = int(round(s))
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class LineProgress:
    """The part of tqdm's interface the project uses (iterate, ``update``, ``n``, ``set_postfix``,
    ``close``, context manager), writing whole lines (see the module docstring)."""

    def __init__(
        self, iterable: Iterable | None = None, total: int | None = None, desc: str = "", unit: str = "it", leave: bool = True, file=None
    ):
        self.iterable = iterable
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        self.total, self.desc, self.unit, self.leave = total, desc, unit, leave
        self.file = file
        self.n = 0
        self.t0 = self.last_t = time.monotonic()
        self.last_n = 0
        self.postfix = ""
        self.closed = False

    def _line(self, now: float, done: bool = False) -> str:
        count = f"{self.n}/{self.total}" if self.total else f"{self.n}"
        pct = f" {100 * self.n / self.total:.0f}%" if self.total else ""
        rate = self.n / (now - self.t0) if now > self.t0 else 0.0
        speed = f", {rate:.2f} {self.unit}/s" if rate else ""
        tail = f" {self.postfix}" if self.postfix else ""
        state = "done in" if done else "after"
        return f"{self.desc}:{pct} ({count} {self.unit}) {state} {_fmt_s(now - self.t0)}{speed}{tail}"

    def _write(self, line: str) -> None:
        out = self.file or sys.stderr
        out.write(line + "\n")
        out.flush()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last_t < LINE_EVERY_S:
            return
        if self.total and (self.n - self.last_n) < LINE_FRACTION * self.total:
            return
        if self.total and self.n >= self.total:
            return  # the closing line says it
        self.last_t, self.last_n = now, self.n
        self._write(self._line(now))

    def set_postfix(self, ordered_dict: dict | None = None, refresh: bool = True, **kwargs: Any) -> None:
        items = {**(ordered_dict or {}), **kwargs}
        self.postfix = " ".join(f"{k}={v}" for k, v in items.items())

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        now = time.monotonic()
        if self.leave or now - self.t0 >= LINE_EVERY_S:
            self._write(self._line(now, done=True))

    def __iter__(self) -> Iterator:
        if self.iterable is None:
            raise TypeError("LineProgress over nothing: pass an iterable or use update()")
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def bar(
    iterable: Iterable | None = None,
    *,
    total: int | None = None,
    desc: str = "",
    unit: str = "it",
    disable: bool = False,
    leave: bool = True,
    **tqdm_kw: Any,
):
    """A progress bar over ``iterable`` (or ``total`` steps, advanced with ``update``): tqdm in
    ``bars`` mode, :class:`LineProgress` in ``lines`` mode; ``disable`` shows nothing."""
    if disable:
        return tqdm(iterable, total=total, disable=True)
    if mode() == "bars":
        return tqdm(iterable, total=total, desc=desc, unit=unit, leave=leave, **tqdm_kw)
    return LineProgress(iterable, total=total, desc=desc, unit=unit, leave=leave)


__all__ = ["LineProgress", "MODES", "bar", "mode", "resolve", "set_mode"]
