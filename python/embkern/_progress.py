"""One progress display for every long job in embkern (corpus encoding, bench rows, KG training).

``progress(total, desc=..., unit=...)`` gives a bar with ``update(n)``,
``set(text)`` and ``close()`` (also a context manager); ``iterate(iterable, ...)``
wraps an iterable. tqdm draws it when installed (the ``bench`` extra); without
tqdm a line goes to stderr at most every 2 s (counts, rate and the last
``set`` text), and a summary at ``close``; ``enabled=False`` shows nothing. Progress output never goes to stdout,
which carries results (tables, JSON).
"""

from __future__ import annotations

import sys
import time
from typing import Iterable, Iterator, Optional, TypeVar

T = TypeVar("T")

PLAIN_INTERVAL_S = 2.0


class Progress:
    """Counts units of work towards ``total`` (None: unknown) and shows it (see the module docstring)."""

    def __init__(self, total: Optional[int] = None, *, desc: str = "", unit: str = "item", enabled: bool = True,
                 leave: bool = True):
        self.total, self.desc, self.unit, self.enabled = total, desc, unit, enabled
        self.n = 0
        self._t0 = time.monotonic()
        self._last = 0.0
        self._text = ""
        self._bar = None
        if enabled:
            try:
                from tqdm.auto import tqdm
            except ImportError:  # tqdm is optional: plain lines on stderr instead
                tqdm = None
            if tqdm is not None:
                self._bar = tqdm(total=total, desc=desc or None, unit=unit, file=sys.stderr, dynamic_ncols=True,
                                 leave=leave)

    def _line(self, text: str) -> None:
        print(f"{self.desc}: {text}" if self.desc else text, file=sys.stderr, flush=True)

    def _counts(self, of_total: bool = True) -> str:
        of = f"/{self.total}" if self.total and of_total else ""
        rate = self.n / max(time.monotonic() - self._t0, 1e-9)
        return f"{self.n}{of} {self.unit}s, {rate:.3g} {self.unit}s/s"

    def _maybe_line(self) -> None:
        now = time.monotonic()
        if now - self._last >= PLAIN_INTERVAL_S:
            self._last = now
            self._line(self._counts() + (f"  ({self._text})" if self._text else ""))

    def update(self, n: int = 1) -> None:
        self.n += n
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(n)
        else:
            self._maybe_line()

    def set(self, text: str) -> None:
        """What is running now (a bench row, an epoch's loss)."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.set_postfix_str(text[:60], refresh=True)
        else:
            self._text = text
            self._maybe_line()

    def close(self) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self.n:
            self._line(self._counts(of_total=False))  # the summary: how many, how fast
        self.enabled = False  # a second close says nothing

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def progress(total: Optional[int] = None, *, desc: str = "", unit: str = "item", enabled: bool = True,
             leave: bool = True) -> Progress:
    return Progress(total, desc=desc, unit=unit, enabled=enabled, leave=leave)


def iterate(iterable: Iterable[T], *, desc: str = "", unit: str = "item", enabled: bool = True,
            total: Optional[int] = None, leave: bool = True) -> Iterator[T]:
    """Yield from ``iterable``, one ``update`` per item; the bar closes when the loop ends or breaks."""
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    with Progress(total, desc=desc, unit=unit, enabled=enabled, leave=leave) as bar:
        for item in iterable:
            yield item
            bar.update(1)
