"""Reading the tracer's text output (pcsc-spy's format) in end-to-end tests:
the calls, the thread that made each, what each printed, and the summary's
thread sections; and what the C client printed, to compare with."""
import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional

NAME = re.compile(r"^SCard[A-Za-z]+$")
LABEL = re.compile(r"^\[pid (\d+) tid (\d+) (.*)\]$")
RV = re.compile(r"\[(0x[0-9A-F]{8})\]\)  \[[\d.?]+\]$")
HEADER = re.compile(r"^Thread (\d+)/(\d+)(?: \(pid (\d+) tid (\d+) (.*)\))?$", re.M)
HEXDUMP = re.compile(r"^ [io]  ([0-9A-F]{4}) (.{47}) ")
THREAD_TAG = re.compile(r"^ \(t(\d+)\) ")   # -t


@dataclass
class TracedCall:
    thread: int               # the thread's number in the trace (indentation / 4)
    name: str
    lines: List[str] = field(default_factory=list)   # " i ...", " o ..."
    result: Optional[str] = None                      # the " => ..." line
    rv: Optional[str] = None  # "0x...", None while the call has not returned

    def buffer(self, label: str) -> bytes:
        """The bytes of a hexdumped buffer (label: " i bSendBuffer", ...)."""
        start = self.lines.index(label) + 1
        data = bytearray()
        for line in self.lines[start:]:
            m = HEXDUMP.match(line)
            if not m:
                break
            assert int(m.group(1), 16) == len(data) % 0x10000, line
            data += bytes.fromhex(m.group(2))
        return bytes(data)


@dataclass
class Thread:
    number: int               # 0-based, as in the indentation
    pid: Optional[int]        # None: one process only, the headers do not name it
    tid: Optional[int]
    comm: Optional[str]


@dataclass
class Trace:
    calls: List[TracedCall]
    labels: Dict[int, tuple]      # thread number -> (pid, tid, comm) of its label line
    threads: List[Thread]         # the summary's thread sections, in order

    def threads_of(self, pid) -> List[Thread]:
        """The threads of process pid (all of them when only one process was traced)."""
        return [th for th in self.threads if th.pid in (pid, None)]

    def calls_of(self, pid) -> List[TracedCall]:
        numbers = {th.number for th in self.threads_of(pid)}
        return [c for c in self.calls if c.thread in numbers]


def parse_trace(text: str) -> Trace:
    """The calls of a trace (in the order they started), grouped by thread
    through their indentation (4 spaces per thread), the `[pid tid comm]`
    label lines and the summary's thread sections (absent while the tracer
    runs).

    A trace out of order fails the test that reads it: an argument or result
    line before its thread's first call, thread sections not numbered 1, 2,
    ..., a call in a thread the summary does not list."""
    body, sep, summary = text.partition("\nThread 1/")
    calls, labels, running = [], {}, {}
    for line in body.splitlines():
        if not line.strip():
            continue
        lead = len(line) - len(line.lstrip(" "))
        thread = lead // 4
        rest = line[4 * thread:]
        tag = THREAD_TAG.match(rest)
        if tag:
            assert int(tag.group(1)) == thread, line
            rest = rest[tag.end():]
        if NAME.match(rest):
            call = running[thread] = TracedCall(thread, rest)
            calls.append(call)
        elif LABEL.match(rest):
            pid, tid, comm = LABEL.match(rest).groups()
            labels[thread] = (int(pid), int(tid), comm)
        elif rest.startswith(" => "):
            assert thread in running, "a result before any call of its thread: " + line
            running[thread].result = rest
            running[thread].rv = RV.search(rest).group(1)
        elif rest[:3] in (" i ", " o "):
            assert thread in running, "an argument before any call of its thread: " + line
            running[thread].lines.append(rest)
        # anything else: pcsc-spy's raw lines (SCardControl parsing), unindented
    threads = []
    for n, _total, pid, tid, comm in (HEADER.findall("Thread 1/" + summary) if sep else []):
        assert int(n) == len(threads) + 1
        threads.append(Thread(int(n) - 1, int(pid) if pid else None,
                              int(tid) if tid else None, comm or None))
    if sep:
        assert {c.thread for c in calls} <= {th.number for th in threads}
    return Trace(calls, labels, threads)


def calls_of_client(stdout: str):
    """What pcsc_client printed: (function, rv) per call."""
    return [tuple(line.split(" rv=")) for line in stdout.splitlines() if " rv=" in line]


def names_and_rvs(calls):
    return [(c.name, c.rv) for c in calls]
