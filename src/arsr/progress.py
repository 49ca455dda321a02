"""Progress of a loop, readable on a terminal and in a log file alike.

On a terminal :func:`progress` is a tqdm bar. Otherwise (SLURM logs, ``dvc repro`` output, a pipe)
tqdm would either stay silent (``disable=None``) or fill the log with carriage-return redraws, so a
:class:`LineProgress` prints one plain line instead, at most every ``ARSR_PROGRESS_EVERY`` seconds
(default 15) and once at the end::

    tokenize: 1200/5000 img (24%), 0:45 elapsed, ETA 2:22

Both go to stderr (flushed: a log shows the line when it is printed) and both have the part of
tqdm's interface the stages use: iteration, ``update(n)``, ``n``, ``total``, ``close()``.
Training has its own (``Progress`` of the training layer: one line per log step).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TextIO

EVERY_ENV = "ARSR_PROGRESS_EVERY"
DEFAULT_EVERY_S = 15.0


def _clock(seconds: float) -> str:
    s = int(round(seconds))
    h, m = divmod(s // 60, 60)
    return f"{h}:{m:02d}:{s % 60:02d}" if h else f"{m}:{s % 60:02d}"


def _interval() -> float:
    text = os.environ.get(EVERY_ENV, "")
    try:
        return max(0.0, float(text)) if text else DEFAULT_EVERY_S
    except ValueError:
        print(f"progress: ignoring {EVERY_ENV}={text!r} (not a number of seconds)", file=sys.stderr)
        return DEFAULT_EVERY_S


class LineProgress:
    """Plain progress lines for a non-terminal stream: at most one per ``every`` seconds, plus one
    when the loop ends (or :meth:`close` is called), so even a short loop leaves a trace in the log."""

    def __init__(
        self,
        iterable: Iterable[Any] | None = None,
        *,
        total: int | None = None,
        desc: str | None = None,
        unit: str = "it",
        every: float | None = None,
        file: TextIO | None = None,
    ):
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        self.iterable, self.total, self.desc, self.unit = iterable, total, desc or "progress", unit
        self.every = _interval() if every is None else every
        self.file = file
        self.n = 0
        self.start = self.last = time.monotonic()
        self.printed_n: int | None = None
        self.closed = False

    def line(self) -> str:
        elapsed = time.monotonic() - self.start
        if not self.total:
            return f"{self.desc}: {self.n} {self.unit}, {_clock(elapsed)} elapsed"
        text = f"{self.desc}: {self.n}/{self.total} {self.unit} ({100 * self.n / self.total:.0f}%), "
        text += f"{_clock(elapsed)} elapsed"
        if 0 < self.n < self.total:
            text += f", ETA {_clock(elapsed / self.n * (self.total - self.n))}"
        return text

    def _print(self) -> None:
        # Looked up at print time, not at creation: pytest and callers may swap sys.stderr.
        print(self.line(), file=self.file or sys.stderr, flush=True)
        self.last, self.printed_n = time.monotonic(), self.n

    def update(self, n: int = 1) -> None:
        self.n += n
        if time.monotonic() - self.last >= self.every:
            self._print()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.printed_n != self.n:  # (None: nothing printed yet)
                self._print()

    def __iter__(self) -> Iterator[Any]:
        if self.iterable is None:
            raise TypeError("LineProgress: nothing to iterate (created without an iterable)")
        for item in self.iterable:
            yield item
            self.update(1)
        self.close()

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def progress(
    iterable: Iterable[Any] | None = None,
    *,
    total: int | None = None,
    desc: str | None = None,
    unit: str = "it",
    disable: bool = False,
) -> Any:
    """A tqdm bar on stderr when it is a terminal, else a :class:`LineProgress`; ``disable``: neither
    (a loop that reports nothing, e.g. a caller that wants no bar, but the same code path)."""
    if disable:
        from tqdm import tqdm

        return tqdm(iterable, total=total, desc=desc, unit=unit, disable=True)
    if sys.stderr is not None and sys.stderr.isatty():
        from tqdm import tqdm

        return tqdm(iterable, total=total, desc=desc, unit=unit, dynamic_ncols=True)
    return LineProgress(iterable, total=total, desc=desc, unit=unit)
