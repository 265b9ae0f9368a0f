"""--summary: latency tables per process, thread and function (tabulate)."""
from .stats import Stats

HEADERS = ("pid", "tid", "comm", "function", "calls", "errors",
           "total µs", "min µs", "median µs", "p95 µs", "max µs")


def rows(stats: Stats):
    for th in stats.threads.values():
        for name, d in th.by_total_time():
            us = [ns / 1000.0 for ns in (d.total_ns, d.min_ns, d.median_ns(),
                                          d.quantile_ns(0.95), d.max_ns)]
            yield (th.pid, th.tid, th.comm, name, d.count, th.errors.get(name, 0),
                   *(round(value, 1) for value in us))


def summary_tables(stats: Stats, fmt: str = "simple") -> str:
    from tabulate import tabulate
    table = list(rows(stats))
    if not table:
        return ""
    return "\n" + tabulate(table, headers=HEADERS, tablefmt=fmt, floatfmt=".1f") + "\n"
