"""Text progress display for the command line (stdlib only): ``format_bytes`` and ``TextProgressBar``."""
from __future__ import annotations

import sys
import time
from typing import IO, Optional


def format_bytes(n: Optional[float]) -> str:
    """``1234567`` -> ``'1.2 MB'`` (decimal units); None -> ``'?'``."""
    if n is None:
        return "?"
    value = float(n)
    sign = "-" if value < 0 else ""
    value = abs(value)
    if value < 1000:
        return f"{sign}{int(value)} B"
    for unit in ("kB", "MB", "GB", "TB"):
        value /= 1000.0
        if value < 999.95 or unit == "TB":
            return f"{sign}{value:.1f} {unit}"
    return f"{sign}{value:.1f} TB"  # pragma: no cover


class TextProgressBar:
    """A ``progress(done, total)`` callback drawing one updating line, e.g. on stderr.

    On a terminal the line is redrawn in place (at most every ``min_interval`` seconds, and always at
    the end); on other streams (log files) a plain line is written at most every ``log_interval`` seconds.
    Call :meth:`close` (or use it as a context manager) to end the line.
    """

    def __init__(self, label: str = "", stream: Optional[IO[str]] = None, width: int = 30,
                 min_interval: float = 0.1, log_interval: float = 5.0, unit: str = "bytes"):
        self.label, self._stream, self.width = label, stream, max(5, int(width))
        self.unit = unit
        self.min_interval, self.log_interval = min_interval, log_interval
        self._start: Optional[float] = None
        self._last_draw = float("-inf")
        self._last_line = ""
        self._drawn = False
        self._closed = False

    @property
    def stream(self) -> IO[str]:
        return self._stream if self._stream is not None else sys.stderr

    def _interactive(self) -> bool:
        try:
            return bool(self.stream.isatty())
        except (AttributeError, ValueError):
            return False

    def render(self, done: int, total: Optional[int], elapsed: float) -> str:
        """The text of the line for ``done`` of ``total`` bytes after ``elapsed`` seconds."""
        rate = done / elapsed if elapsed > 0 else 0.0
        if self.unit != "bytes":
            return self._render_count(done, total, rate)
        speed = f"{format_bytes(rate)}/s" if rate else ""
        head = f"{self.label}: " if self.label else ""
        if total:
            frac = min(max(done / total, 0.0), 1.0)
            filled = int(round(frac * self.width))
            bar = "#" * filled + "-" * (self.width - filled)
            eta = ""
            if rate and done < total:
                secs = int((total - done) / rate)
                eta = f" ETA {secs // 60}:{secs % 60:02d}"
            return f"{head}[{bar}] {frac * 100:5.1f}% {format_bytes(done)} / {format_bytes(total)} {speed}{eta}".rstrip()
        return f"{head}{format_bytes(done)} {speed}".rstrip()

    def _render_count(self, done: int, total: Optional[int], rate: float) -> str:
        head = f"{self.label}: " if self.label else ""
        speed = f" {1 / rate:.1f} s/{self.unit.rstrip('s')}" if rate else ""
        if not total:
            return f"{head}{done} {self.unit}{speed}"
        frac = min(max(done / total, 0.0), 1.0)
        filled = int(round(frac * self.width))
        return f"{head}[{'#' * filled}{'-' * (self.width - filled)}] {done}/{total} {self.unit}{speed}"

    def __call__(self, done: int, total: Optional[int] = None) -> None:
        now = time.monotonic()
        if self._start is None:
            self._start = now
        finished = total is not None and done >= total
        interval = self.min_interval if self._interactive() else self.log_interval
        if not finished and now - self._last_draw < interval:
            return
        line = self.render(done, total, now - self._start)
        if line == self._last_line:
            return
        self._last_draw = now
        if self._interactive():
            pad = " " * max(0, len(self._last_line) - len(line))
            self.stream.write("\r" + line + pad)
        else:
            self.stream.write(line + "\n")
        self._last_line = line
        self._drawn = True
        self._closed = False
        self.stream.flush()

    def close(self) -> None:
        """End the line (once); nothing is written if nothing was drawn."""
        if self._drawn and not self._closed and self._interactive():
            self.stream.write("\n")
            self.stream.flush()
        self._closed = True

    def __enter__(self) -> "TextProgressBar":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
