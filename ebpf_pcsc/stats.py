"""Per-thread statistics of the traced calls (pcsc-spy's summary, and the
lost-event count that must never be silent), in memory that does not grow
with the number of calls (a tracer may run for days); it grows with the
number of threads that made calls."""
import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from .calls import Call


def seconds(ns: int) -> float:
    """A duration as pcsc-spy accounts it: whole microseconds."""
    us = ns // 1000
    return us // 1000000 + (us % 1000000) / 1e6


class Durations:
    """One function's call durations on one thread.

    The count, pcsc-spy's total (whole microseconds, added in call order as
    pcsc-spy adds them: its percentages to the last digit, and its order of
    functions whose totals tie), the exact minimum
    and maximum; for the quantiles, the durations themselves up to EXACT
    calls, then a histogram of buckets RESOLUTION apart (1%): the median and
    p95 of a longer series are within 1% of the exact ones, and the memory
    is bounded (at most ~2,900 buckets from 1 ns to 1,000 s)."""
    EXACT = 1024
    RESOLUTION = 1.01

    def __init__(self):
        self.count = 0
        self.seconds = 0.0          # pcsc-spy's sum() on Python < 3.12
        self._compensation = 0.0    # what sum() on Python >= 3.12 adds back
        self.total_ns = 0
        self.min_ns: Optional[int] = None
        self.max_ns: Optional[int] = None
        self._exact: Optional[List[int]] = []
        self._buckets: Dict[int, int] = {}

    def add(self, ns: int) -> None:
        self.count += 1
        # pcsc-spy totals with sum(), which Python 3.12 made compensated
        # (Neumaier, as CPython does it): 60+29+33+29 µs then comes out
        # 0.000151, tied with 55+96, where the plain sum is one ulp short --
        # and the tie keeps the order of the functions' first returns.
        x = seconds(ns)
        t = self.seconds + x
        if abs(self.seconds) >= abs(x):
            self._compensation += (self.seconds - t) + x
        else:
            self._compensation += (x - t) + self.seconds
        self.seconds = t
        self.total_ns += ns
        self.min_ns = ns if self.min_ns is None else min(self.min_ns, ns)
        self.max_ns = ns if self.max_ns is None else max(self.max_ns, ns)
        if self._exact is not None:
            self._exact.append(ns)
            if len(self._exact) <= self.EXACT:
                return
            for value in self._exact[:-1]:
                self._bucket(value)
            self._exact = None
        self._bucket(ns)

    def _bucket(self, ns: int) -> None:
        b = int(math.log(max(ns, 1), self.RESOLUTION))
        self._buckets[b] = self._buckets.get(b, 0) + 1

    def __len__(self) -> int:
        return self.count

    def total_seconds(self, compensated: bool = False) -> float:
        """pcsc-spy's total: its sum() under Python < 3.12, or (compensated)
        under Python >= 3.12."""
        if compensated and self._compensation:
            return self.seconds + self._compensation
        return self.seconds

    def median_ns(self) -> float:
        """The median (of the two middle values for an even count)."""
        if self._exact is not None:
            ordered = sorted(self._exact)
            if not ordered:
                return 0.0
            mid = len(ordered) // 2
            return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2
        return self.quantile_ns(0.5)

    def quantile_ns(self, fraction: float) -> float:
        """Nearest-rank quantile."""
        if not self.count:
            return 0.0
        rank = max(1, math.ceil(fraction * self.count))
        if self._exact is not None:
            return sorted(self._exact)[rank - 1]
        seen = 0
        for b in sorted(self._buckets):
            seen += self._buckets[b]
            if seen >= rank:
                # The bucket's middle, within the exact extremes.
                middle = self.RESOLUTION ** (b + 0.5)
                return min(max(middle, self.min_ns), self.max_ns)
        return float(self.max_ns)


@dataclass
class ThreadStats:
    number: int               # order of the thread's first call
    pid: int
    tid: int
    comm: str
    durations: Dict[str, Durations] = field(default_factory=dict)   # by function
    errors: Dict[str, int] = field(default_factory=dict)

    seconds = staticmethod(seconds)

    def by_total_time(self, compensated: bool = False) -> List[Tuple[str, Durations]]:
        """Functions by decreasing total time, Durations.total_seconds(compensated)
        (ties: first returned first, as pcsc-spy's stable sort keeps them)."""
        return sorted(self.durations.items(),
                      key=lambda kv: kv[1].total_seconds(compensated), reverse=True)


class Stats:
    def __init__(self):
        self.threads: Dict[Tuple[int, int], ThreadStats] = {}
        self.pids: List[int] = []
        self.first_ts: Optional[int] = None
        self.last_ts: Optional[int] = None
        self.lost = 0
        self.aborted = 0

    def thread(self, call: Call) -> ThreadStats:
        key = (call.pid, call.tid)
        th = self.threads.get(key)
        if th is None:
            th = self.threads[key] = ThreadStats(len(self.threads), call.pid, call.tid, call.comm)
            if call.pid not in self.pids:
                self.pids.append(call.pid)
        return th

    def enter(self, call: Call) -> None:
        self.thread(call)
        if self.first_ts is None:
            self.first_ts = call.call_ts

    def leave(self, call: Call) -> None:
        th = self.thread(call)
        durations = th.durations.get(call.name)
        if durations is None:
            durations = th.durations[call.name] = Durations()
        durations.add(call.duration_ns)
        if call.rv:
            th.errors[call.name] = th.errors.get(call.name, 0) + 1
        self.last_ts = call.ret_ts

    def abort(self, call: Call) -> None:
        self.aborted += 1

    @property
    def total_seconds(self) -> float:
        """From the first call's start to the last call's return."""
        if self.first_ts is None or self.last_ts is None:
            return 0.0
        # pcsc-spy subtracts two seconds.microseconds floats: do the same, to
        # the last digit of its percentages.
        return ThreadStats.seconds(self.last_ts) - ThreadStats.seconds(self.first_ts)

    @property
    def several_processes(self) -> bool:
        return len(self.pids) > 1
