"""Progress of long steps (prediction, synthesis, cache building, header scans, fetching): one helper.

On a terminal a tqdm bar; elsewhere (a log file, a pipe, a job scheduler) a plain line every ``every``
seconds and one when the step ends, e.g. ``predict: 120/1000 images (12 %), 8.1 images/s, ETA 1 m 48 s``,
so a log never holds minutes of silence nor thousands of carriage-return frames. Always on stderr.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TextIO, TypeVar

#: How a step shows its progress: a bar (a terminal), plain periodic lines (a log), or not at all.
PROGRESS_STYLES = ("bar", "lines", "off")
#: Seconds between two plain progress lines.
LINE_EVERY_S = 30.0

T = TypeVar("T")


def progress_style(progress: bool | str, stream: TextIO | None = None) -> str:
    """The style a ``progress`` argument means: ``True`` (or ``"auto"``) is a bar when ``stream`` (default
    stderr) is a terminal and plain lines otherwise; ``False`` is ``"off"``; a style name is itself."""
    if progress is True or progress == "auto":
        stream = stream or sys.stderr
        isatty = getattr(stream, "isatty", None)
        return "bar" if callable(isatty) and isatty() else "lines"
    if progress is False or progress is None:
        return "off"
    if progress not in PROGRESS_STYLES:
        raise ValueError(f"progress must be a bool, 'auto' or one of {PROGRESS_STYLES}, got {progress!r}")
    return str(progress)


def format_duration(seconds: float) -> str:
    """``42 s``, ``1 m 48 s``, ``2 h 05 m``: short, for progress lines and ETAs."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} m {seconds % 60} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} m"


class Progress:
    """Counts the items of one step done and shows it in ``style`` (see :func:`progress_style`).

    Use as a context manager (or call :meth:`close`); :meth:`update` after each item or batch. In the
    ``lines`` style the first line comes after ``every`` seconds, then one every ``every`` seconds, and a
    last one (``done``) at :meth:`close` when ``final_line``; nothing is printed for a step with no items.
    """

    def __init__(self, total: int, what: str, unit: str = "images", *, progress: bool | str = True,
                 every: float = LINE_EVERY_S, final_line: bool = True, stream: TextIO | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.total, self.what, self.unit = int(total), what, unit
        self.style = progress_style(progress, stream)
        self.every, self.final_line = every, final_line
        self.stream = stream
        self.clock = clock
        self.done = 0
        self.started = self.last_line = clock()
        self._bar: Any = None
        if self.style == "bar" and self.total > 0:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=self.total, desc=what, unit=unit.rstrip("s") or unit,
                             file=stream or sys.stderr, dynamic_ncols=True)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close(completed=exc[0] is None)

    def update(self, n: int = 1) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
        elif self.style == "lines" and self.done < self.total and self.clock() - self.last_line >= self.every:
            self._line()  # not at the end: the last line (or the caller's own) says that

    def close(self, completed: bool = True) -> None:
        """End the bar; in the ``lines`` style, say where the step ended (when ``final_line``)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self.style == "lines" and self.final_line and completed and self.total > 0:
            self._line(final=True)
        self.style = "off"  # closed: a second close says nothing

    def line(self, final: bool = False) -> str:
        """The plain progress line as it stands now."""
        elapsed = self.clock() - self.started
        percent = f" ({100 * self.done / self.total:.0f} %)" if self.total else ""
        text = f"{self.what}: {self.done}/{self.total} {self.unit}{percent}"
        if final:
            return text + f" in {format_duration(elapsed)}"
        rate = self.done / elapsed if elapsed > 0 else 0.0
        if rate > 0:
            text += f", {rate:.3g} {self.unit}/s, ETA {format_duration((self.total - self.done) / rate)}"
        return text

    def _line(self, final: bool = False) -> None:
        self.last_line = self.clock()
        print(self.line(final), file=self.stream or sys.stderr, flush=True)


def track(items: Iterable[T], total: int, what: str, unit: str = "images", *, progress: bool | str = True,
          sizes: Callable[[T], int] | None = None, **options: Any) -> Iterator[T]:
    """``items``, with a :class:`Progress` advanced by one per item (or by ``sizes(item)``, e.g. a
    batch's length); ``options`` go to :class:`Progress`. The last line is printed when the loop ends."""
    with Progress(total, what, unit, progress=progress, **options) as bar:
        for item in items:
            yield item
            bar.update(sizes(item) if sizes is not None else 1)
