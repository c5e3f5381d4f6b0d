"""Timing helpers shared by the benchmarks: warm-up, blocking, interleaved medians, one table format.

Benchmarks print **ratios measured side by side in one run** (ours vs the alternative, same inputs, same
machine, the contenders taking turns so that load changes hit both alike), never absolute pass/fail times.
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:          # run as `python bench/x.py` from anywhere
    sys.path.insert(0, str(ROOT))


def block(x: Any) -> Any:
    """Wait for every jax array in the pytree x (torch and numpy values pass through)."""
    import jax

    return jax.block_until_ready(x)


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """(seconds, result) of one call, blocking on jax results before the clock stops."""
    t0 = time.perf_counter()
    out = block(fn())
    return time.perf_counter() - t0, out


def median_times(fns: Sequence[Callable[[], Any]], *, repeats: int, warmup: int = 1) -> list[float]:
    """Median wall time of each function over `repeats` rounds, after `warmup` untimed rounds (compilation).
    The functions take turns within a round, so a change in machine load hits them alike."""
    for _ in range(warmup):
        for fn in fns:
            block(fn())
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(max(1, repeats)):
        for fn, ts in zip(fns, times):
            ts.append(timed(fn)[0])
    return [statistics.median(ts) for ts in times]


def ratio(a: float | None, b: float | None) -> str:
    """a / b as text ('-' when undefined)."""
    if a is None or b is None or b == 0:
        return "-"
    return f"{a / b:.2f}x"


def fmt(x: float | None, digits: int = 1) -> str:
    if x is None:
        return "-"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    return f"{x:.{digits}f}"


class Table:
    """Rows of (figure, ours, other, ratio, note), printed with aligned columns."""

    def __init__(self, title: str, columns: Sequence[str] = ("figure", "ours", "other", "ratio", "note")):
        self.title, self.columns = title, list(columns)
        self.rows: list[list[str]] = []

    def add(self, *cells: Any) -> None:
        row = ["-" if c is None else str(c) for c in cells]
        if len(row) != len(self.columns):
            raise ValueError(f"row has {len(row)} cells, the table has {len(self.columns)} columns")
        self.rows.append(row)

    def render(self) -> str:
        widths = [max(len(r[i]) for r in [self.columns] + self.rows) for i in range(len(self.columns))]
        line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
        out = [self.title, line(self.columns), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
        return "\n".join(out + [line(r) for r in self.rows])

    def print(self) -> None:
        print(self.render(), flush=True)


def machine_line() -> str:
    """One line naming the software and the machine (put it above every table)."""
    import jax

    parts = [f"jax {jax.__version__} on {jax.devices()[0].platform} x{jax.device_count()}",
             f"{os.cpu_count()} CPUs", platform.machine()]
    try:
        import torch

        parts.append(f"torch {torch.__version__} ({torch.get_num_threads()} threads)")
    except ImportError:
        pass
    if hasattr(os, "getloadavg"):
        parts.append("load avg {:.1f}".format(os.getloadavg()[0]))
    return ", ".join(parts)


__all__ = ["ROOT", "block", "timed", "median_times", "ratio", "fmt", "Table", "machine_line"]
