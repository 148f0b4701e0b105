"""Progress of a backfill: done/total, rate, ETA; a bar on a terminal, log lines otherwise.

The arithmetic and the text are pure (`Progress` takes the clock readings it is given, `bar_line`
and `log_line` only format); `ProgressPrinter` is the output edge.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import TextIO

# The rate is measured over the last few seconds, so a pause (backpressure, an outage) shows.
RATE_WINDOW_SECONDS = 10.0
BAR_WIDTH = 30
LOG_INTERVAL_SECONDS = 5.0  # plain log lines at most this often (the last one always)
BAR_INTERVAL_SECONDS = 0.2  # a terminal's bar is redrawn at most this often


def format_duration(seconds: float) -> str:
    """`seconds` for a human: 45s, 3m05s, 2h07m."""
    whole = max(0, round(seconds))
    if whole < 60:
        return f"{whole}s"
    minutes, secs = divmod(whole, 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def eta_seconds(done: int, total: int, rate: float) -> float | None:
    """Seconds left at `rate`, or None when it cannot be told (no rate yet, or past the total)."""
    if rate <= 0 or done >= total:
        return None if done < total else 0.0
    return (total - done) / rate


@dataclass
class Progress:
    """Counts of one backfill and its recent rate (events per second over RATE_WINDOW_SECONDS)."""

    total: int
    done: int = 0
    started: float = 0.0
    _samples: list[tuple[float, int]] = field(default_factory=list)

    def start(self, now: float) -> None:
        self.started = now
        self._samples = [(now, self.done)]

    def advance(self, count: int, now: float) -> None:
        self.done += count
        self._samples.append((now, self.done))
        while len(self._samples) > 2 and now - self._samples[1][0] >= RATE_WINDOW_SECONDS:
            self._samples.pop(0)

    def rate(self, now: float) -> float:
        if not self._samples:
            return 0.0
        first_time, first_done = self._samples[0]
        elapsed = now - first_time
        return (self.done - first_done) / elapsed if elapsed > 0 else 0.0

    def eta(self, now: float) -> float | None:
        return eta_seconds(self.done, max(self.total, self.done), self.rate(now))


def bar_line(done: int, total: int, rate: float, eta: float | None, width: int = BAR_WIDTH) -> str:
    """`[#########---------]  2,500/5,000  50%  830 ev/s  ETA 3s` (total grows if more are found)."""
    total = max(total, done)
    fraction = done / total if total else 1.0
    filled = int(fraction * width)
    bar = "#" * filled + "-" * (width - filled)
    eta_text = "ETA --" if eta is None else f"ETA {format_duration(eta)}"
    return f"[{bar}] {done:,}/{total:,} {fraction:4.0%}  {rate:,.0f} ev/s  {eta_text}"


def log_line(backfill_id: str, done: int, total: int, rate: float, eta: float | None) -> str:
    """`backfill 1f2e...: 2500/5000 events (50%), 830 events/s, ETA 3s`, for logs and pipes."""
    total = max(total, done)
    percent = f"{done / total:.0%}" if total else "100%"
    eta_text = "ETA unknown" if eta is None else f"ETA {format_duration(eta)}"
    return f"backfill {backfill_id}: {done}/{total} events ({percent}), {rate:.0f} events/s, {eta_text}"


class ProgressPrinter:
    """Shows `Progress` on `stream`: a redrawn bar on a terminal, a log line now and then otherwise."""

    def __init__(self, backfill_id: str, stream: TextIO = sys.stderr, tty: bool | None = None) -> None:
        self.backfill_id = backfill_id
        self.stream = stream
        self.tty = stream.isatty() if tty is None else tty
        self._last = float("-inf")
        self._drawn = False

    def show(self, progress: Progress, now: float, *, final: bool = False) -> None:
        interval = BAR_INTERVAL_SECONDS if self.tty else LOG_INTERVAL_SECONDS
        if not final and now - self._last < interval:
            return
        self._last = now
        rate, eta = progress.rate(now), progress.eta(now)
        if self.tty:
            self.stream.write("\r" + bar_line(progress.done, progress.total, rate, eta) + "\x1b[K")
            self._drawn = True
            if final:
                self.stream.write("\n")
                self._drawn = False
        else:
            self.stream.write(log_line(self.backfill_id, progress.done, progress.total, rate, eta) + "\n")
        self.stream.flush()

    def message(self, text: str) -> None:
        """A line of its own (not overwritten by the bar)."""
        if self._drawn:
            self.stream.write("\n")
            self._drawn = False
        self.stream.write(text + "\n")
        self.stream.flush()
