"""The sweep's progress line: done / total, counts by status, and an ETA weighted by cost."""

from __future__ import annotations

import shutil
import sys
import time
from collections import Counter
from typing import TextIO


class Progress:
    """A one-line progress bar with an ETA on a terminal; on a pipe, a plain line every
    ``every_s`` seconds. The ETA weighs each record by its expected cost (``weight``: large
    shapes take longer to materialize, upload and check), so it does not run late on sweeps that
    end with the largest contexts."""

    def __init__(self, total: int, stream: TextIO | None = None, enabled: bool | None = None,
                 every_s: float = 10.0, width: int = 24, total_weight: float | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.total, self.done, self.width, self.every_s = total, 0, width, every_s
        self.total_weight = float(total if total_weight is None else total_weight)
        self.done_weight = 0.0
        self.counts: Counter[str] = Counter()
        self.start = self._last = time.monotonic()
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.enabled = self.total > 0 if enabled is None else enabled

    def _eta(self) -> str:
        elapsed = time.monotonic() - self.start
        if not self.done_weight:
            return f"{_clock(elapsed)} elapsed"
        left = elapsed / self.done_weight * max(0.0, self.total_weight - self.done_weight)
        return f"{_clock(elapsed)} elapsed, ETA {_clock(left)}"

    def _line(self, label: str) -> str:
        frac = self.done / self.total if self.total else 1.0
        filled = int(frac * self.width)
        bar = "#" * filled + "." * (self.width - filled)
        counts = " ".join(f"{k} {v}" for k, v in sorted(self.counts.items()))
        return (f"[{bar}] {self.done}/{self.total} {100 * frac:3.0f}% {counts} | {self._eta()}"
                + (f" | {label}" if label else ""))

    def update(self, label: str = "", status: str | None = None, weight: float = 1.0) -> None:
        """Show ``label`` as in flight; with ``status``, count one finished record first."""
        if status is not None:
            self.done += 1
            self.done_weight += weight
            self.counts[status] += 1
        if not self.enabled:
            return
        now = time.monotonic()
        if self.tty:
            cols = shutil.get_terminal_size((120, 24)).columns - 1
            self.stream.write("\r\033[K" + self._line(label)[:cols])
            self.stream.flush()
        elif status and (now - self._last >= self.every_s or self.done == self.total):
            self._last = now
            self.stream.write(self._line(label) + "\n")
            self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.tty:
            self.stream.write("\r\033[K" + self._line("") + "\n")
            self.stream.flush()


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 \
        else f"{seconds // 60}:{seconds % 60:02d}"


__all__ = ["Progress"]
