"""One logger for the package; ranks other than 0 only log warnings, so output is read once."""

import logging
import os
import sys
import time

LOG = logging.getLogger("arpipe")


def setup_logging(rank: int | None = None) -> None:
    """(Re)configure for this process; call again once the rank is known."""
    rank = int(os.environ.get("RANK", "0")) if rank is None else rank
    if not LOG.handlers:
        LOG.addHandler(logging.StreamHandler(sys.stderr))
        LOG.propagate = False
    tag = f"[arpipe rank {rank}]" if os.environ.get("WORLD_SIZE", "1") != "1" else "[arpipe]"
    LOG.handlers[0].setFormatter(logging.Formatter(f"%(asctime)s {tag} %(message)s", "%H:%M:%S"))
    LOG.setLevel(logging.INFO if rank == 0 else logging.WARNING)


def on_terminal() -> bool:
    return sys.stderr.isatty()


def duration(seconds: float) -> str:
    """1h02m, 3m05s, 42s: for ETAs in log lines."""
    seconds = int(max(0, seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


class Progress:
    """Progress of a long loop where a person reads it: a tqdm bar on a terminal; elsewhere (a
    Slurm .out file, a pipe, CI) one log line at most every `line_every` seconds and at the end,
    since a bar's carriage returns make such files unreadable; none with `line_every=None`, for a
    caller that writes lines of its own. Inactive on ranks other than 0."""

    def __init__(self, total: int | None, desc: str, *, unit: str = "it", initial: int = 0, active: bool = True,
                 line_every: float | None = 30.0):
        from tqdm import tqdm

        self.total, self.desc, self.unit, self.n = total, desc, unit, initial
        self.line_every, self.start, self.last_line, self.first = line_every, time.monotonic(), time.monotonic(), initial
        self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True) \
            if active and on_terminal() else None
        self.lines = active and self.bar is None and line_every is not None

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.lines and time.monotonic() - self.last_line >= self.line_every:
            self._line()

    def _line(self) -> None:
        now = time.monotonic()
        self.last_line = now
        rate = (self.n - self.first) / max(now - self.start, 1e-9)
        done = f"{self.n}/{self.total}" if self.total else str(self.n)
        eta = f", ETA {duration((self.total - self.n) / rate)}" if self.total and rate > 0 else ""
        LOG.info("%s: %s %s (%.1f %s/s%s)", self.desc, done, self.unit, rate, self.unit, eta)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.lines and self.n > self.first:
            self._line()
