"""What every benchmark script shares: options, repeated timing, the table, the RESULTS.md entry.

A benchmark compares a stage with its baseline measured in the same process or command, so the
ratio means something on a shared, noisy machine where absolute times do not. Measurements are
repeated, interleaved with their baselines, and the median is reported.
"""

import argparse
import atexit
import datetime
import os
import platform
import shlex
import shutil
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # `python benchmarks/x.py` uses the pipeline of this checkout
    sys.path.insert(0, str(REPO))
RESULTS = REPO / "benchmarks" / "RESULTS.md"
SHARED_DATA = REPO.parent / "shared" / "data"  # present on the project's machines, not for users


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--repeats", type=int, default=3, help="measurements of each variant; the median is reported")
    p.add_argument("--tiny", action="store_true", help="a tiny size that only checks the script runs (tests)")
    p.add_argument("--work", type=Path, help="directory for generated data, kept between runs (default: a temporary one)")
    p.add_argument("--results", type=Path, default=RESULTS, help=f"file the table is appended to (default {RESULTS})")
    p.add_argument("--no-record", action="store_true", help="print the table only")
    return p


def parse(p: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """The command line; a --tiny run measures once."""
    args = p.parse_args(argv)
    if args.tiny:
        args.repeats = 1
    return args


def work_dir(args) -> Path:
    """--work, or a temporary directory removed at exit (the generated data take ~0.5 GB)."""
    if args.work:
        args.work.mkdir(parents=True, exist_ok=True)
        return args.work
    path = Path(tempfile.mkdtemp(prefix="arpipe-bench-"))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def single_core() -> None:
    """One thread for torch, BLAS and tokenizers: the numbers are per core."""
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def median_times(variants: dict, repeats: int) -> dict[str, float]:
    """Seconds of each variant (name -> no-argument function), median of `repeats` rounds; the
    variants are interleaved in every round so a burst of load on the machine hits all of them."""
    times = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            times[name].append(timed(fn)[0])
    return {name: statistics.median(t) for name, t in times.items()}


class Row:
    """One line of a result table: a measurement, optionally against a baseline and a target."""

    def __init__(self, what: str, value: str, baseline: str = "", ratio: float | None = None,
                 target: float | None = None, at_most: bool = False):
        """`ratio` is met when ≥ target, or ≤ target with at_most (e.g. a time over a baseline time)."""
        self.what, self.value, self.baseline, self.ratio, self.target, self.at_most = what, value, baseline, ratio, target, at_most

    @property
    def met(self) -> bool | None:
        if self.ratio is None or self.target is None:
            return None
        return self.ratio <= self.target if self.at_most else self.ratio >= self.target

    @property
    def verdict(self) -> str:
        return {None: "", True: "met", False: "SHORT"}[self.met]

    def cells(self) -> list[str]:
        ratio = "" if self.ratio is None else f"{self.ratio:.2f}×"
        target = "" if self.target is None else f"{'≤' if self.at_most else '≥'} {self.target:g}×"
        return [self.what, self.value, self.baseline, ratio, target, self.verdict]


HEADER = ["measurement", "value", "baseline (same run)", "ratio", "target", ""]


def markdown(rows: list[Row]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in r.cells()) + " |" for r in rows]
    return "\n".join(lines)


def machine() -> str:
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = ""
    if "torch" in sys.modules and sys.modules["torch"].cuda.is_available():
        gpu = f", {sys.modules['torch'].cuda.get_device_name()}"
    return f"{socket.gethostname()}: {os.cpu_count()} × {cpu}{gpu}; load average {load}"


def report(title: str, rows: list[Row], args, notes: list[str] = (), how: str | None = None,
           device: str = "") -> None:
    """Print the table and, unless --no-record or --tiny, append it to RESULTS.md with the date,
    the machine and the command. `how` says how values were aggregated (default: the median of
    --repeats runs), `device` names an accelerator the machine line should mention."""
    table = markdown(rows)
    print(f"\n{title}\n\n{table}\n" + "".join(f"\n- {n}" for n in notes))
    if args.no_record or args.tiny:
        return
    command = " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0], REPO), *sys.argv[1:]])
    date = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    how = how or f"median of {args.repeats} interleaved runs"
    entry = (f"\n## {title}\n\n{date} · {machine()}{f'; {device}' if device else ''}\n\n`python {command}` "
             f"({how})\n\n{table}\n" + "".join(f"\n- {n}" for n in notes) + ("\n" if notes else ""))
    if not args.results.exists():
        args.results.write_text("# Benchmark results\n\nAppended by the scripts in benchmarks/ (see README.md there); "
                                "newest last.\n")
    with open(args.results, "a") as f:
        f.write(entry)
    print(f"appended to {args.results}")


def rate(n: float, seconds: float, unit: str) -> str:
    """'12.3 M<unit>/s' with a sensible prefix."""
    r = n / seconds
    for scale, prefix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if r >= scale:
            return f"{r / scale:.3g} {prefix}{unit}/s"
    return f"{r:.3g} {unit}/s"
