"""One tracing session: targets -> capture -> decoding -> renderers, until a
signal ends it; then the summary.  No click here: the CLI hands over."""
import signal
import sys
import threading
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

from . import kheaders, targets
from .calls import Assembler, Call
from .capture import Capture
from .errors import SpyError
from .functions import FUNCTIONS
from .pcsc_text import TextSink
from .stats import Stats


@dataclass
class Options:
    pids: Sequence[int] = ()
    libs: Sequence[str] = ()
    color: bool = False
    diffable: bool = False
    show_thread: bool = False
    result_dialect: str = "1.9"
    perf_pages: Optional[int] = None


class _Fanout:
    """Sink for the Assembler: stats first (renderers read them), then each
    renderer."""

    def __init__(self, stats: Stats, sinks: list):
        self.stats = stats
        self.sinks = sinks

    def enter(self, call: Call) -> None:
        self.stats.enter(call)
        for s in self.sinks:
            s.enter(call)

    def leave(self, call: Call) -> None:
        self.stats.leave(call)
        for s in self.sinks:
            s.leave(call)

    def abort(self, call: Call) -> None:
        self.stats.abort(call)
        for s in self.sinks:
            s.abort(call)
        warn("%s: pid %d tid %d (%s) ended inside the call"
             % (call.name, call.pid, call.tid, call.comm))


def warn(message: str) -> None:
    sys.stderr.write("pcsc-ebpf-spy: %s\n" % message)
    sys.stderr.flush()


def choose_libraries(opts: Options) -> List[targets.Library]:
    if opts.libs:
        return [targets.for_path(path) for path in opts.libs]
    if opts.pids:
        libs = targets.for_pids(opts.pids)
        for lib in libs:
            if not lib.loaded:
                warn("process %d has not loaded libpcsclite yet: tracing it once it loads %s"
                     % (lib.pid, lib.shown))
        return libs
    return [targets.system_wide()]


# Capability bits (linux/capability.h).
CAP_SYS_ADMIN, CAP_PERFMON, CAP_BPF = 21, 38, 39


def check_privileges() -> None:
    """Loading BPF and opening uprobes needs root, or CAP_BPF + CAP_PERFMON."""
    with open("/proc/self/status") as f:
        caps = next(int(line.split()[1], 16) for line in f if line.startswith("CapEff:"))
    if caps & (1 << CAP_SYS_ADMIN) or (caps & (1 << CAP_BPF) and caps & (1 << CAP_PERFMON)):
        return
    raise SpyError("not enough privileges to load eBPF programs",
                   "run as root (sudo pcsc-ebpf-spy ...) or grant CAP_BPF and CAP_PERFMON")


class _Stop:
    """SIGINT and SIGTERM end the session (after the summary).  The handlers
    are installed explicitly: a shell starts background jobs with SIGINT
    ignored, and the default SIGTERM would kill us before the summary."""

    def __init__(self):
        self.event = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.event.set()

    @property
    def requested(self) -> bool:
        return self.event.is_set()


def run(opts: Options, out=None) -> int:
    out = out if out is not None else sys.stdout
    stop = _Stop()
    check_privileges()
    libraries = choose_libraries(opts)
    kheaders.ensure(warn)
    stats = Stats()
    text = TextSink(stats, out=out, color=opts.color, diffable=opts.diffable,
                    show_thread=opts.show_thread, result_dialect=opts.result_dialect)
    assembler = Assembler(FUNCTIONS, _Fanout(stats, [text]))
    capture = Capture(FUNCTIONS, libraries, pids=list(opts.pids) or None,
                      **({"perf_pages": opts.perf_pages} if opts.perf_pages else {}))

    def on_lost(count: int) -> None:
        stats.lost += count
        warn("%d events lost (the perf buffer was full): calls are missing" % count)

    capture.start(on_lost)
    try:
        where = ", ".join(_describe(libs) for libs in capture.attached)
        warn_line = "Tracing %d PC/SC functions in %s... Hit Ctrl-C to end." % (
            capture.probe_count, where)
        sys.stderr.write(warn_line + "\n")
        sys.stderr.flush()
        while not stop.requested:
            # Flush after each batch, not each line: a blocked call's first
            # lines show at once, and a burst still costs one write.
            if _drain(capture, assembler, 100):
                out.flush()
        # Events submitted before the signal may still be in the buffer.
        _drain(capture, assembler, 0)
        for call in assembler.pending():
            warn("%s of pid %d tid %d had not returned when tracing ended"
                 % (call.name, call.pid, call.tid))
        text.summary()
        out.flush()
    finally:
        capture.close()
    return 0


def _describe(libs: List[targets.Library]) -> str:
    """A probed file, as its processes see it: "/usr/lib/.../x.so (pid 1, 2)"."""
    pids = [str(lib.pid) for lib in libs if lib.pid is not None]
    return libs[0].shown + (" (pid %s)" % ", ".join(pids) if pids else "")


def _drain(capture: Capture, assembler: Assembler, timeout_ms: int) -> int:
    """Poll once; feed what arrived, oldest first.  Returns the count."""
    batch = capture.poll(timeout_ms)
    batch.sort(key=Assembler.timestamp)
    for raw in batch:
        assembler.feed(raw)
    if batch:
        assembler.expire()
    return len(batch)
