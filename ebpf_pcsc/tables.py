"""--summary: latency tables per process, thread and function (tabulate)."""
import math
import statistics
from typing import List

from .stats import Stats

HEADERS = ("pid", "tid", "comm", "function", "calls", "errors",
           "total µs", "min µs", "median µs", "p95 µs", "max µs")


def percentile(sorted_values: List[int], fraction: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    if not sorted_values:
        return 0.0
    rank = max(1, math.ceil(fraction * len(sorted_values)))
    return sorted_values[rank - 1]


def rows(stats: Stats):
    for th in stats.threads.values():
        for name, durations in th.by_total_time():
            us = sorted(ns / 1000.0 for ns in durations)
            yield (th.pid, th.tid, th.comm, name, len(us), th.errors.get(name, 0),
                   round(sum(us), 1), round(us[0], 1), round(statistics.median(us), 1),
                   round(percentile(us, 0.95), 1), round(us[-1], 1))


def summary_tables(stats: Stats, fmt: str = "simple") -> str:
    from tabulate import tabulate
    table = list(rows(stats))
    if not table:
        return ""
    return "\n" + tabulate(table, headers=HEADERS, tablefmt=fmt, floatfmt=".1f") + "\n"
