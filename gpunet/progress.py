"""A dependency-free progress bar: redrawn in place on a terminal, one line per epoch otherwise
(so logs and CI output stay readable)."""
from __future__ import annotations

import sys
import time
from typing import IO, Any, Callable


class ProgressBar:
    """``bar.update(steps, stats)`` after each batch, ``bar.close(**stats)`` at the end.

    ``stats`` is a function returning the figures to show (``{"loss": ..., "acc": ...}``),
    called only when the bar is redrawn: on a terminal at most every :attr:`INTERVAL` seconds
    and at the last step, never in a log. Producing the figures may read them back from a GPU,
    which waits for it, so the bar asks for them a few times a second, not once a step."""

    INTERVAL = 0.25

    def __init__(self, total: int, desc: str = "", file: IO[str] | None = None,
                 enabled: bool = True, width: int = 24) -> None:
        self.total, self.desc, self.width, self.enabled = total, desc, width, enabled
        self.file = file if file is not None else sys.stderr
        self.live = enabled and self.file.isatty()
        self.count, self.start, self._drawn = 0, time.perf_counter(), 0.0
        self.redraws = 0

    def _line(self, stats: dict[str, Any]) -> str:
        filled = int(self.width * self.count / max(self.total, 1))
        bar = "#" * filled + "." * (self.width - filled)
        fields = " ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                          for k, v in stats.items() if v is not None)
        elapsed = time.perf_counter() - self.start
        return f"{self.desc} [{bar}] {self.count}/{self.total} {fields} {elapsed:.1f}s"

    def update(self, steps: int = 1, stats: Callable[[], dict[str, Any]] | None = None) -> None:
        self.count += steps
        now = time.perf_counter()
        if self.live and (now - self._drawn > self.INTERVAL or self.count >= self.total):
            self.file.write("\r" + self._line(stats() if stats is not None else {}) + "\033[K")
            self.file.flush()
            self._drawn = now
            self.redraws += 1

    def close(self, **stats: Any) -> None:
        if self.enabled:
            self.file.write(("\r" if self.live else "") + self._line(stats) + "\n")
            self.file.flush()
