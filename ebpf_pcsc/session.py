"""A session: where the calls come from (a live capture, or a file), where
they go (pcsc-spy text, JSON Lines, a recording, a golden comparison, tables),
and how it ends.  No click here: the CLI parses and hands over."""
import io
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

from . import kheaders, record, targets
from .calls import Assembler, Call
from .capture import Capture
from .errors import SpyError
from .functions import FUNCTIONS
from .pcsc_text import TextSink
from .stats import Stats

EXIT_OK = 0
EXIT_DIFFERENT = 1     # --expect: the trace differs from the golden one


@dataclass
class Options:
    pids: Sequence[int] = ()
    libs: Sequence[str] = ()
    command: Sequence[str] = ()
    color: bool = False
    diffable: bool = False
    show_thread: bool = False
    result_dialect: str = "1.9"
    quiet: bool = False              # no live text
    json: bool = False               # JSON Lines on stdout instead of text
    write: Optional[str] = None      # -w: recording
    output: Optional[str] = None     # -o: the trace to a file
    read: Optional[str] = None       # -r: render a file instead of tracing
    expect: Optional[str] = None     # golden trace (-n -d text)
    summary: bool = False            # tables after pcsc-spy's summary
    summary_format: str = "simple"
    perf_pages: Optional[int] = None
    transport: str = "auto"          # --buffer: "auto", "perf" or "ring"
    apdu: bool = False               # --apdu: APDUs and ATRs decoded under the calls
    redact: bool = False             # --redact: PINs masked before any output sees them
    smartcard_list: Optional[str] = None   # --smartcard-list (None: pcsc-tools' list)


# The longest the tracer sleeps: how late a call that wakes no one (the
# kernel side wakes the tracer once per batch of records) may show while the
# calls come slowly (while they come fast, see capture.BUSY_PERIOD_S), and
# how often -p looks whether its processes have ended, and Ctrl-C is seen --
# between two passes over the buffer: handling a pass of a fast stream takes
# its time (up to a second's calls, or a quarter of the buffer in a burst).
POLL_MS = 100


def warn(message: str) -> None:
    sys.stderr.write("pcsc-ebpf-spy: %s\n" % message)
    sys.stderr.flush()


class _Fanout:
    """The one sink the calls go to.  It hands them on in stages: a batch of
    events to stats, then the same batch to the first output, and so on.
    One stage's code running over many calls keeps the interpreter's caches
    warm: the reader's CPU per recorded SCardTransmit call is ~30% lower so
    than with every stage run for each call in turn.

    Each sink sees the events in their order; a batch ends at flush() (the
    session flushes after each poll) or after STAGE events.  So a sink must
    not read another's state mid-batch: stats may be up to a batch ahead of
    the text (whose thread numbers, fixed at a thread's first call, are the
    one thing it reads from stats).  The warnings of calls whose thread died
    come after their batch's text."""
    STAGE = 64

    # An event's kind: its index in the (enter, leave, abort) handlers of a sink.
    _ENTER, _LEAVE, _ABORT = range(3)

    def __init__(self, stats: Stats, sinks: list, live: bool):
        self.stats = stats
        self.sinks = sinks
        self.live = live
        self.seq = 0
        self._events: List[Tuple[int, Call]] = []   # (kind, call)

    def _queue(self, kind: int, call: Call) -> None:
        self._events.append((kind, call))
        if len(self._events) >= self.STAGE:
            self.flush()

    def _next(self) -> int:
        self.seq += 1
        return self.seq

    def enter(self, call: Call) -> None:
        if self.live:
            call.entry_seq = self._next()
        self._queue(self._ENTER, call)

    def leave(self, call: Call) -> None:
        if self.live:
            call.return_seq = self._next()
        self._queue(self._LEAVE, call)

    def abort(self, call: Call) -> None:
        if self.live:
            call.return_seq = self._next()
        self._queue(self._ABORT, call)

    def flush(self) -> None:
        """Hands the events queued so far on, stage by stage.  A sink that
        fails (the text's reader went away: | head) does not keep the batch
        from the others (a recording stays whole); its error is raised after."""
        events, self._events = self._events, []
        error = None
        for target in [self.stats] + self.sinks:
            handlers = (target.enter, target.leave, target.abort)
            try:
                for kind, call in events:
                    handlers[kind](call)
            except Exception as e:
                error = error or e
        if self.live:
            for kind, call in events:
                if kind == self._ABORT:
                    warn("%s: pid %d tid %d (%s) ended inside the call"
                         % (call.name, call.pid, call.tid, call.comm))
        if error is not None:
            raise error

    def unfinished(self, call: Call) -> None:
        self.flush()
        for s in self.sinks:
            if hasattr(s, "unfinished"):
                s.unfinished(call)


class _Outputs:
    """Builds the sinks the options ask for, and finishes them."""

    def __init__(self, opts: Options, out, files: "_Files", header: dict, live: bool):
        self.opts = opts
        self.out = out
        self.stats = Stats()
        self.text = None
        self.golden = None
        self.files = files
        sinks = []
        if opts.json:
            writer = record.JsonWriter(out, annotator=self._annotator())
            writer.write(header)
            sinks.append(writer)
        elif not opts.quiet:
            self.text = TextSink(self.stats, out=out, color=opts.color, diffable=opts.diffable,
                                 show_thread=opts.show_thread,
                                 result_dialect=opts.result_dialect,
                                 annotator=self._annotator())
            sinks.append(self.text)
        if files.recording is not None:
            writer = record.JsonWriter(files.recording, annotator=self._annotator())
            writer.write(header)
            sinks.append(writer)
        if files.expected is not None:
            self.expected = files.expected
            # The comparison is on the -n -d text, whatever is shown live.
            self.golden = io.StringIO()
            sinks.append(TextSink(self.stats, out=self.golden, diffable=True,
                                  result_dialect=opts.result_dialect))
        self.sink = _Fanout(self.stats, sinks, live)
        if opts.redact:
            # Once, before any output (text, JSON, recording) sees a call.
            from .redact import Redactor
            self.sink = Redactor(self.sink)

    def _annotator(self):
        """--apdu: one decoder per output (each follows the applications
        selected on each card handle)."""
        if not self.opts.apdu:
            return None
        from .annotate import Annotator
        return Annotator(self.opts.smartcard_list)

    def finish(self) -> int:
        """Summaries, the golden comparison; the exit status it implies."""
        self.sink.flush()
        status = EXIT_OK
        if self.text is not None:
            self.text.summary()
        if self.opts.summary and not self.opts.json:
            # Asked for explicitly: also after -q (no live text).
            from .tables import summary_tables
            self.out.write(summary_tables(self.stats, self.opts.summary_format))
        if self.golden is not None:
            from .golden import compare
            same, diff = compare(self.opts.expect, self.expected, self.golden.getvalue())
            if not same:
                self.out.write(diff)
                status = EXIT_DIFFERENT
        self.out.flush()
        self.files.close()
        return status


class _Files:
    """The files the options name, opened (or read) before anything else
    happens: a bad path is reported before minutes of tracing, not after."""

    def __init__(self, opts: Options):
        self.expected = None
        self.recording = None
        if opts.expect:
            from .golden import load
            self.expected = load(opts.expect)
        if opts.write:
            self.recording = record.open_private(opts.write)

    def close(self) -> None:
        if self.recording is not None:
            self.recording.close()


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


def choose_libraries(opts: Options) -> List[targets.Library]:
    if opts.libs:
        return [targets.for_path(path) for path in opts.libs]
    if opts.pids:
        libs = targets.for_pids(opts.pids)
        for lib in libs:
            if not lib.loaded:
                warn("process %d has not loaded libpcsclite yet: tracing it once it loads %s"
                     % (lib.pid, lib.shown))
        if opts.command:
            libs.append(targets.system_wide())
        return libs
    return [targets.system_wide()]


class _Stop:
    """SIGINT and SIGTERM end the session (after the summary).  The handlers
    are installed explicitly: a shell starts background jobs with SIGINT
    ignored, and the default SIGTERM would kill us before the summary."""

    def __init__(self):
        self.event = threading.Event()
        self.signals = []
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.signals.append(signum)
        self.event.set()

    @property
    def requested(self) -> bool:
        return self.event.is_set()


def run(opts: Options, out=None) -> int:
    if opts.output:
        try:
            out = open(opts.output, "w", encoding="utf-8")
        except OSError as e:
            raise SpyError("cannot write %s (%s)" % (opts.output, e.strerror), "check the path")
    out = out if out is not None else sys.stdout
    try:
        if opts.read:
            return replay(opts, out)
        return trace(opts, out)
    finally:
        if opts.output:
            out.close()


def trace(opts: Options, out) -> int:
    stop = _Stop()
    if opts.command:
        _check_command(opts.command[0])
    files = _Files(opts)
    check_privileges()
    libraries = choose_libraries(opts)
    kheaders.ensure(warn)
    filtered = bool(opts.pids or opts.command)
    # Unless the libraries are given, every libpcsclite image the traced
    # processes map is found and probed, now and as they load one.
    discover = not opts.libs
    capture = Capture(FUNCTIONS, libraries, pids=list(opts.pids) if filtered else None,
                      discover=discover, transport=opts.transport,
                      **({"perf_pages": opts.perf_pages} if opts.perf_pages else {}))
    def on_lost(count: int) -> None:
        warn("%d events lost (the buffer was full): calls are missing" % count)

    if opts.command:
        # Our own pid is traced while COMMAND is forked: the kernel then adds
        # the child (and its descendants) before it runs a single instruction.
        capture.pids = list(capture.pids or []) + [os.getpid()]
    capture.start(on_lost, warn)
    finder = None
    if discover:
        from .discovery import Discovery
        finder = Discovery(capture, warn, pids=opts.pids if opts.pids else
                           ([] if opts.command else None))
        capture.attach_loader(targets.system_loader())
        finder.all_processes()
    try:
        outputs = _Outputs(opts, out, files,
                           record.header([libs[0].shown for libs in capture.attached]), live=True)
        assembler = Assembler(FUNCTIONS, outputs.sink)
        where = ", ".join(_describe(libs) for libs in capture.attached)
        sys.stderr.write("Tracing %d PC/SC functions in %s... Hit Ctrl-C to end.\n"
                         % (capture.probe_count, where))
        sys.stderr.flush()
        child = _spawn(opts.command, capture) if opts.command else None
        forwarded = False
        # -p: when every traced process has ended, so does tracing (as with
        # strace -p); looked at twice a second.
        watch = _Watch(capture, opts.pids) if opts.pids and child is None else None
        while True:
            if child is not None and child.poll() is not None:
                break
            if watch is not None and watch.all_ended():
                warn("the traced processes have ended")
                break
            if stop.requested:
                if child is None or forwarded:
                    break
                # COMMAND decides when it ends: pass the signal on, once.
                _forward(child, stop.signals[-1])
                forwarded = True
                stop.event.clear()
            # Flush after each batch, not each line: a blocked call's first
            # lines show at once, and a burst still costs one write.
            if _drain(capture, assembler, outputs.sink, finder, POLL_MS):
                out.flush()
        # Events submitted before the end may still be in the buffers.
        while _drain(capture, assembler, outputs.sink, finder, 0, everything=True):
            pass
        outputs.stats.lost = capture.lost
        for call in assembler.pending():
            warn("%s of pid %d tid %d had not returned when tracing ended"
                 % (call.name, call.pid, call.tid))
            outputs.sink.unfinished(call)
        status = outputs.finish()
    finally:
        capture.close()
        # Over: a late Ctrl-C or SIGTERM (say, from a script that did not see
        # the end) must not kill the interpreter while it exits, which gives
        # the signals their default action back.
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)
    if child is not None:
        code = child.wait()
        code = 128 - code if code < 0 else code   # killed by signal N: 128 + N
        return code or status
    return status


class _Watch:
    """Whether every process -p named, and every process they started since,
    has ended."""
    PERIOD_S = 0.5

    def __init__(self, capture: Capture, pids: Sequence[int]):
        self.capture = capture
        self.pids = set(pids)
        self.next = 0.0

    def all_ended(self) -> bool:
        now = time.monotonic()
        if now < self.next:
            return False
        self.next = now + self.PERIOD_S
        # The kernel forgets a process when it ends: ask /proc about every
        # pid ever traced.
        self.pids.update(self.capture.traced_pids())
        self.pids = {pid for pid in self.pids if _running(pid)}
        return not self.pids


def _running(pid: int) -> bool:
    """The process exists and one of its threads has not ended: its main
    thread may end first (pthread_exit), and shows as a zombie until the
    last one ends."""
    try:
        tids = os.listdir("/proc/%d/task" % pid)
    except OSError:
        return False
    for tid in tids:
        try:
            with open("/proc/%d/task/%s/stat" % (pid, tid)) as f:
                stat = f.read()
        except OSError:
            continue
        if stat[stat.rindex(")") + 2:][:1] != "Z":
            return True
    return False


def _check_command(name: str) -> None:
    """Before attaching anything: COMMAND must be something we can run."""
    import shutil
    found = shutil.which(name) if "/" not in name else (
        name if os.path.isfile(name) and os.access(name, os.X_OK) else None)
    if found is None:
        what = "not found" if not os.path.exists(name) or "/" not in name else "not executable"
        raise SpyError("cannot run %s (%s)" % (name, what), "check the command after --")


def _spawn(command: Sequence[str], capture: Capture):
    try:
        child = subprocess.Popen(list(command))
    except OSError as e:
        raise SpyError("cannot run %s (%s)" % (command[0], e.strerror),
                       "check the command after --")
    finally:
        capture.untrace_pid(os.getpid())
    return child


def _forward(child, signum: int) -> None:
    try:
        child.send_signal(signum)
    except ProcessLookupError:
        pass


def _describe(libs: List[targets.Library]) -> str:
    """A probed file, as its processes see it: "/usr/lib/.../x.so (pid 1, 2)";
    the system library (probed for every process) without pids."""
    pids = list(dict.fromkeys(str(lib.pid) for lib in libs if lib.pid is not None))
    if libs[0].pid is None or not pids:
        return libs[0].shown
    return libs[0].shown + " (pid %s)" % ", ".join(pids)


def _drain(capture: Capture, assembler: Assembler, sink, finder, timeout_ms: int,
           everything: bool = False) -> int:
    """Poll once; feed what arrived (everything: all of it, not just a pass
    that is due), oldest first, and hand it all on to the outputs (sink, the
    assembler's).  Returns the count."""
    batch = capture.poll(timeout_ms, everything)
    if finder is not None:
        if capture.loads_lost():
            # Some library loads went unreported: look at every process.
            warn("library loads were lost (the buffer was full): looking at every process")
            finder.all_processes(quiet=False)
        # Library loads first: their processes wait for no one.  A program
        # start or dlopen() notifies several times: look once.
        loading = {}
        for raw in capture.take_loads():
            kind, pid = Assembler.kind_and_pid(raw)
            loading[pid] = kind
        for pid, kind in loading.items():
            finder.event(kind, pid)
    batch.sort(key=Assembler.timestamp)
    for raw in batch:
        assembler.feed(raw)
    if batch:
        assembler.expire()
    sink.flush()
    return len(batch)


def replay(opts: Options, out) -> int:
    """Render a recording (or a libpcscspy log) as it was shown live."""
    from . import replay as rp
    files = _Files(opts)
    events, error, header = rp.load(opts.read)
    outputs = _Outputs(opts, out, files, header, live=False)
    rp.feed(events, outputs.sink)
    status = outputs.finish()
    if error is not None:
        raise error
    return status
