"""Per-thread statistics of the traced calls (pcsc-spy's summary, and the
lost-event count that must never be silent)."""
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from .calls import Call


@dataclass
class ThreadStats:
    number: int               # order of the thread's first call
    pid: int
    tid: int
    comm: str
    durations: Dict[str, List[int]] = field(default_factory=dict)   # function -> ns
    errors: Dict[str, int] = field(default_factory=dict)

    @staticmethod
    def seconds(ns: int) -> float:
        """A duration as pcsc-spy accounts it: whole microseconds."""
        us = ns // 1000
        return us // 1000000 + (us % 1000000) / 1e6

    def by_total_time(self) -> List[Tuple[str, List[int]]]:
        """Functions by decreasing total time (ties: first called first)."""
        return sorted(self.durations.items(),
                      key=lambda kv: sum(self.seconds(ns) for ns in kv[1]), reverse=True)


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
        th.durations.setdefault(call.name, []).append(call.duration_ns)
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
