#!/usr/bin/env python3
"""pcsc-ebpf-spy's benchmark (`make bench`, as root): figures, not a test.

Measures side by side, in one run, and prints one table (tabulate) plus a
JSON file (bench-results.json by default):

1. SCardIsValidContext in a loop (no IPC: the pure cost of a call), per
   call, for: no tracing; the floor, an empty BPF program attached as uprobe
   and uretprobe to the 18 SCard* functions; pcsc-ebpf-spy attached to the
   client (-p PID, text to a file), as it starts by default (--buffer auto:
   the BPF ring buffer on kernels that have one) and with the perf buffer
   (--buffer perf); pcsc-lite's pcsc-spy (libpcscspy through LD_PRELOAD,
   with its reader `pcsc-spy -n` running, its text to a file too).  The
   variants take turns, round after round; the figure is the median over
   the rounds.
2. SCardTransmit in a loop against the virtual card, per call, for: no
   tracing, the floor, pcsc-ebpf-spy and pcsc-spy, taking turns as in 1;
   each one's median and its ratio to the untraced median.
3. A burst of 50,000 SCardIsValidContext calls at full speed under the
   tracer: how many calls it shows and how many events it lost.
4. The time from starting the tracer to its `Tracing` line (median over
   every tracer start of the run), its peak RSS (VmHWM, which counts what it
   maps: LLVM, and the kernel's ring buffer, mapped twice), its own memory
   (RssAnon) and its CPU time per 1,000 calls (utime + stime during the
   burst).

The targets of issue 5 stand next to the figures, with PASS or MISS.

The client is tests/clients/pcsc_client.c (scenarios `isvalid N` and
`loop N`, compiled here), against the private PC/SC stack of testbed.py.

The probed library is a private copy of the system's libpcsclite.so.1 (the
same bytes, another inode), which the clients load through LD_LIBRARY_PATH:
uprobes belong to a file, so the probes that any other tracer on this
machine puts on the system's library do not slow these clients down, and
the probes put here slow down no one else.  --system-lib probes the
system's file instead.

The Python programs measured (pcsc-ebpf-spy, pcsc-spy's reader) run without
PYTHONUNBUFFERED and PYTHONDONTWRITEBYTECODE, as a user would run them: an
unbuffered stdout costs one write() per line.

Everything started here is stopped at the end, also on Ctrl-C or SIGTERM:
tracers, probes, pcscd, the card, pcsc-spy's reader and its FIFO.

    sudo .venv/bin/python tests/bench.py [--quick] [--json PATH]
"""
import argparse
import ctypes
import json
import os
import platform
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
for _p in (str(TESTS), str(ROOT)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from testbed import PcscStack  # noqa: E402

SYSTEM_LIB = "/usr/lib/x86_64-linux-gnu/libpcsclite.so.1"
SPY_LIBRARY = "/usr/lib/x86_64-linux-gnu/libpcscspy.so.0"
PCSC_SPY = "/usr/bin/pcsc-spy"
CLIENT_SRC = TESTS / "clients" / "pcsc_client.c"
START_TIMEOUT = 120.0     # the machine may be very busy
RUN_TIMEOUT = 600.0

# A SCardTransmit run of 60,000 calls (~5 s) spans several of the tracer's
# passes (one a second while the calls come fast, capture.BUSY_PERIOD_S):
# the steady state of a tracer left running.  What the last pass reads, the
# tracer handles after the client has ended, outside the figure: ~half a
# second of calls in 5, on average.
FULL = dict(isvalid_calls=200_000, isvalid_rounds=7, loop_calls=60_000, loop_rounds=8,
            burst_calls=50_000)
QUICK = dict(isvalid_calls=2_000, isvalid_rounds=1, loop_calls=50, loop_rounds=2,
             burst_calls=2_000)

# Targets (issue 5).
FLOOR_FACTOR = 1.5        # tracer per call <= 1.5 x the floor's
SPY_FACTOR = 0.5          # tracer per call <= 0.5 x pcsc-spy's
TRANSMIT_RATIO = 1.10     # SCardTransmit traced / untraced (aim 1.03)
TRANSMIT_AIM = 1.03
START_LIMIT = 1.5         # seconds to the Tracing line (aim 1.0)
START_AIM = 1.0

_libc = ctypes.CDLL(None, use_errno=True)
CLK_TCK = os.sysconf("SC_CLK_TCK")


# Environment variables removed for the Python programs measured (see above).
_NOT_INHERITED = ("PYTHONUNBUFFERED", "PYTHONDONTWRITEBYTECODE")


def user_env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in _NOT_INHERITED}
    env.update(extra)
    return env


def log(message):
    sys.stderr.write("bench: %s\n" % message)
    sys.stderr.flush()


def _die_with_parent():
    _libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def median(values):
    return statistics.median(values) if values else None


def quartiles(values):
    """The first quartile, the median and the third quartile (None with
    fewer than two values)."""
    if len(values) < 2:
        return None
    return statistics.quantiles(values, n=4, method="inclusive")


class _Cleanup:
    """What must be undone, newest first, whatever happens."""

    def __init__(self):
        self._undo = []

    def push(self, fn):
        self._undo.append(fn)
        return fn

    def discard(self, fn):
        if fn in self._undo:
            self._undo.remove(fn)

    def run(self):
        while self._undo:
            fn = self._undo.pop()
            try:
                fn()
            except Exception as e:  # keep cleaning up
                log("cleanup: %s" % e)


CLEANUP = _Cleanup()


def _child_cpu():
    """CPU seconds of the children reaped so far."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def _proc_cpu(pid):
    """utime + stime of a live process, in seconds."""
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def _thread_cpu_ns(pid):
    """CPU time of a single-threaded process, in ns (schedstat: exact, where
    utime + stime count whole clock ticks)."""
    with open("/proc/%d/schedstat" % pid) as f:
        return int(f.read().split()[0])


def _vm_kib(pid, field="VmHWM"):
    """A field of /proc/PID/status, in KiB (VmHWM: peak RSS)."""
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return None


# -- the client -----------------------------------------------------------------------

_ISVALID = re.compile(r"isvalid: (\d+) calls in ([\d.]+) s")
_LOOP = re.compile(r"loop: (\d+) transmits in ([\d.]+) s")


def _per_call_us(pattern, stderr):
    m = pattern.search(stderr)
    if not m:
        raise RuntimeError("no timing line from the client: %r" % stderr[-500:])
    calls, seconds = int(m.group(1)), float(m.group(2))
    return seconds * 1e6 / calls if calls else None


# A call this long waited for a CPU (a round trip takes ~0.1 ms here): the
# time spent in such calls is what other work on the machine took from the
# loop, apart from what it added to every call.
STALL_US = 1000.0


def latency_spread(path):
    """How one loop's calls' times spread (the client wrote them, in ns):
    median, 99th and 99.9th percentiles in µs, and the share of the loop's
    time spent in calls longer than STALL_US."""
    with open(path) as f:
        us = sorted(int(line) / 1000 for line in f)
    os.unlink(path)
    if not us:
        return None

    def pct(q):
        return us[min(len(us) - 1, int(q * len(us)))]

    return dict(p50_us=pct(0.5), p99_us=pct(0.99), p999_us=pct(0.999),
                stalled_share=sum(x for x in us if x > STALL_US) / (sum(us) or 1))


class Client:
    """pcsc_client runs against the stack, loading libpcsclite from libdir."""

    def __init__(self, binary, stack, libdir, workdir):
        self.binary = binary
        self.stack = stack
        self.libdir = libdir
        self.latencies = os.path.join(workdir, "latencies.txt")

    def env(self, **extra):
        env = dict(self.stack.env, PCSC_CLIENT_QUIET="1")
        if self.libdir:
            env["LD_LIBRARY_PATH"] = self.libdir
        env.update(extra)
        return env

    def run(self, scenario, n, env=None):
        """Run to the end: (µs per call from its timing line, its CPU µs per
        call, the spread of its calls' times (loop only, else None))."""
        cpu0 = _child_cpu()
        p = subprocess.run([self.binary, scenario, str(n)],
                           env=self._with_latencies(scenario, env or self.env()),
                           stdin=subprocess.DEVNULL, capture_output=True, text=True,
                           timeout=RUN_TIMEOUT, preexec_fn=_die_with_parent)
        cpu = _child_cpu() - cpu0
        if p.returncode != 0:
            raise RuntimeError("pcsc_client %s %d failed (%d): %s"
                               % (scenario, n, p.returncode, p.stderr.strip()[-500:]))
        pattern = _ISVALID if scenario == "isvalid" else _LOOP
        return _per_call_us(pattern, p.stderr), cpu * 1e6 / n, self._spread(scenario)

    def held(self, scenario, n):
        return Held([self.binary, scenario, str(n)], self._with_latencies(scenario, self.env()),
                    lambda: self._spread(scenario))

    def _with_latencies(self, scenario, env):
        return dict(env, PCSC_CLIENT_LATENCIES=self.latencies) if scenario == "loop" else env

    def _spread(self, scenario):
        return latency_spread(self.latencies) if scenario == "loop" else None


class Held:
    """The client held before exec (a shell waiting for a line, then exec:
    the pid stays), so the tracer attaches to it before its first call."""

    def __init__(self, argv, env, spread):
        self.proc = subprocess.Popen(["sh", "-c", 'read _ && exec "$@"', "sh", *argv],
                                     env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True,
                                     preexec_fn=_die_with_parent)
        self.pid = self.proc.pid
        self.spread = spread
        self._undo = CLEANUP.push(self.kill)

    def release(self, pattern, n):
        """As Client.run's result."""
        cpu0 = _child_cpu()
        _, err = self.proc.communicate("go\n", timeout=RUN_TIMEOUT)
        cpu = _child_cpu() - cpu0
        CLEANUP.discard(self._undo)
        if self.proc.returncode != 0:
            raise RuntimeError("client failed (%d): %s" % (self.proc.returncode, err[-500:]))
        return _per_call_us(pattern, err), cpu * 1e6 / n, self.spread()

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate()


# -- pcsc-ebpf-spy ------------------------------------------------------------------------

class _LineCounter:
    """Counts, in a growing trace file, the result lines of one function
    (` => ` after the function's name line) and all result lines."""

    def __init__(self, path, fn):
        self.path = path
        self.fn = fn
        self._offset = 0
        self._rest = ""
        self._current = None
        self._in_summary = False
        self.results = 0
        self.of_fn = 0

    def update(self):
        with open(self.path, encoding="utf-8", errors="replace") as f:
            f.seek(self._offset)
            chunk = f.read()
            self._offset = f.tell()
        lines = (self._rest + chunk).split("\n")
        self._rest = lines.pop()
        for line in lines:
            if self._in_summary:
                continue
            if line.startswith("SCard"):
                self._current = line.strip()
            elif line.startswith(" => "):
                self.results += 1
                if self._current == self.fn:
                    self.of_fn += 1
            elif line.startswith("Thread "):   # pcsc-spy's summary
                self._in_summary = True
        return self.results


_LOST_SUMMARY = re.compile(r"^Lost events: (\d+)", re.M)
_LOST_WARNING = re.compile(r"(\d+) events lost")


class TracerRun:
    """pcsc-ebpf-spy -p PID --lib LIB -n [extra], its trace in a file."""

    def __init__(self, pid, lib, workdir, tag, extra=()):
        self.out_path = Path(workdir) / ("trace-%s.txt" % tag)
        self.err_lines = []
        self.at_start = {}
        self.memory = (None, None)   # (VmHWM, RssAnon) last seen
        self._ready = threading.Event()
        argv = [sys.executable, "-m", "ebpf_pcsc", "-p", str(pid), "--lib", lib, "-n", *extra]
        with open(self.out_path, "w") as out:
            t0 = time.monotonic()
            self.proc = subprocess.Popen(argv, cwd=ROOT, env=user_env(), stdin=subprocess.DEVNULL,
                                         stdout=out,
                                         stderr=subprocess.PIPE, text=True,
                                         start_new_session=True, preexec_fn=_die_with_parent)
        self._undo = CLEANUP.push(self.kill)
        self._reader = threading.Thread(target=self._read_stderr, daemon=True)
        self._reader.start()
        deadline = t0 + START_TIMEOUT
        while not self._ready.wait(0.01):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError("the tracer did not start:\n" + "".join(self.err_lines))
        self.start_s = self._ready_at - t0

    def _read_stderr(self):
        for line in self.proc.stderr:
            if not self._ready.is_set() and line.startswith("Tracing"):
                self._ready_at = time.monotonic()
                try:   # what starting cost: CPU time, memory
                    self.at_start = dict(cpu_s=_proc_cpu(self.proc.pid),
                                         rss_kib=_vm_kib(self.proc.pid, "VmRSS"),
                                         peak_rss_kib=_vm_kib(self.proc.pid))
                except OSError:
                    self.at_start = {}
                self._ready.set()
            self.err_lines.append(line)

    def cpu_s(self):
        return _proc_cpu(self.proc.pid)

    def drain(self, fn, expected, settle=1.5, timeout=RUN_TIMEOUT):
        """Wait until `expected` result lines are in the trace, or nothing
        moves (no new line, no CPU used) for `settle` seconds."""
        counter = _LineCounter(self.out_path, fn)
        last = (-1, -1.0)
        still_since = time.monotonic()
        deadline = still_since + timeout
        while time.monotonic() < deadline:
            self._look_at_memory()
            now = (counter.update(), self.cpu_s())
            if now[0] >= expected:
                return
            if now != last:
                last, still_since = now, time.monotonic()
            elif time.monotonic() - still_since > settle:
                return
            time.sleep(0.1)

    def _look_at_memory(self):
        """Keep its memory figures while it runs: with -p it ends by itself
        once the client has ended, maybe before stop() looks (the status of
        a process that has exited has none)."""
        try:
            # Its own memory: VmHWM also counts the pages it maps, the shared
            # libraries (LLVM) and the kernel's ring buffer (mapped twice).
            now = (_vm_kib(self.proc.pid), _vm_kib(self.proc.pid, "RssAnon"))
        except OSError:
            return
        if None not in now:
            self.memory = now

    def stop(self, fn):
        """SIGINT, wait for the summary; the figures of this run."""
        self._look_at_memory()
        hwm, anon = self.memory
        self.proc.send_signal(signal.SIGINT)
        try:
            code = self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self._reader.join(10)
        CLEANUP.discard(self._undo)
        counter = _LineCounter(self.out_path, fn)
        counter.update()
        text = self.out_path.read_text(encoding="utf-8", errors="replace")
        m = _LOST_SUMMARY.search(text)
        lost_summary = int(m.group(1)) if m else 0
        lost_warned = sum(int(x) for x in _LOST_WARNING.findall("".join(self.err_lines)))
        self.out_path.unlink()
        return dict(shown=counter.of_fn, results=counter.results, lost_events=lost_summary,
                    lost_events_stderr=lost_warned, peak_rss_kib=hwm, rss_anon_kib=anon,
                    exit_status=code,
                    start_s=self.start_s, start_cpu_s=self.at_start.get("cpu_s"),
                    rss_at_start_kib=self.at_start.get("rss_kib"),
                    peak_rss_at_start_kib=self.at_start.get("peak_rss_kib"))

    def kill(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# -- the floor: an empty program on every function ----------------------------------------

class Floor:
    """An empty program on the 18 functions' entries and returns, attached the
    way the tracer attaches (uprobe_multi links where the kernel has them,
    else one perf event per probe): what any uprobe tracer pays at least."""
    SOURCE = b"int f(void *ctx) { return 0; }"

    def __init__(self, lib, names):
        from bcc import BPF
        from ebpf_pcsc import targets, uprobes
        self.lib = lib
        from ebpf_pcsc.capture import ATTACH_ENV
        self.multi = os.environ.get(ATTACH_ENV) != "perf" and uprobes.supported()
        self.offsets = list(uprobes.file_offsets(lib, targets.function_addresses(lib)).values())
        assert len(self.offsets) == len(names), "the library lacks SCard* functions"
        self.bpf = BPF(text=self.SOURCE)
        self.prog = self.bpf.load_func(
            b"f", BPF.KPROBE, attach_type=uprobes.BPF_TRACE_UPROBE_MULTI if self.multi else -1).fd
        self.fds = []
        CLEANUP.push(self.close)

    def attach(self):
        from ebpf_pcsc import uprobes
        for ret in (True, False):
            if self.multi:
                self.fds.append(uprobes.link_uprobes(self.prog, self.lib, self.offsets,
                                                     [0] * len(self.offsets), retprobe=ret))
            else:
                self.fds.extend(uprobes.attach_perf(self.prog, self.lib, off, retprobe=ret)
                                for off in self.offsets)

    def detach(self):
        from ebpf_pcsc import uprobes
        uprobes.close_all(self.fds)
        self.fds = []

    def close(self):
        if self.bpf is not None:
            self.detach()
            self.bpf.cleanup()
            self.bpf = None


# -- pcsc-spy -----------------------------------------------------------------------------

class PcscSpy:
    """pcsc-spy -n reading $HOME/pcsc-spy, for one client run.  Its text goes
    to a file, as pcsc-ebpf-spy's does (writing it costs the machine too)."""

    def __init__(self, workdir):
        self.home = Path(tempfile.mkdtemp(prefix="home-", dir=workdir))
        self.fifo = self.home / "pcsc-spy"
        with open(self.home / "trace.txt", "w") as out:
            self.reader = subprocess.Popen([PCSC_SPY, "-n"], env=user_env(HOME=str(self.home)),
                                           stdin=subprocess.DEVNULL, stdout=out,
                                           stderr=subprocess.PIPE, text=True,
                                           start_new_session=True, preexec_fn=_die_with_parent)
        self._undo = CLEANUP.push(self.close)
        deadline = time.monotonic() + START_TIMEOUT
        while not self.fifo.exists():   # pcsc-spy makes the FIFO, then opens it
            if self.reader.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("pcsc-spy did not start: %s" % self.reader.stderr.read())
            time.sleep(0.01)

    def client_env(self, client):
        return client.env(LD_PRELOAD=SPY_LIBRARY, HOME=str(self.home))

    def finish(self, timeout=RUN_TIMEOUT):
        """Wait for the reader to read everything (end of file) and exit."""
        try:
            self.reader.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
        self.close()

    def close(self):
        # A reader still waiting for a writer gets its end of file this way.
        deadline = time.monotonic() + 10
        while self.reader.poll() is None and time.monotonic() < deadline:
            try:
                os.close(os.open(self.fifo, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:
                pass
            try:
                self.reader.wait(0.1)
            except subprocess.TimeoutExpired:
                pass
        if self.reader.poll() is None:
            self.reader.kill()
        self.reader.communicate()
        shutil.rmtree(self.home, ignore_errors=True)
        CLEANUP.discard(self._undo)


# -- a busy process, no PC/SC ------------------------------------------------------------

# Its CPU share before any traced run has measured the tracer's.
BUSY_DEFAULT_SHARE = 0.25

_BUSY_SOURCE = r"""
import sys, time
share, period = float(sys.argv[1]), float(sys.argv[2])
print("ready", flush=True)
while True:
    until = time.perf_counter() + share * period
    while time.perf_counter() < until:
        pass
    time.sleep(max(0.0, 1 - share) * period)
"""


class BusyProcess:
    """A process that has nothing to do with PC/SC and uses a CPU share in
    bursts: what any such neighbour costs the loop on this machine, to set
    beside what the tracer costs it.  With the tracer's share while the
    client ran (CPU-time ticks: meaningless in --quick's short loops)."""

    def __init__(self, share):
        # It works in bursts, one per period as the tracer's passes (the
        # length of the bursts changes what they cost the loop).
        from ebpf_pcsc.capture import BUSY_PERIOD_S
        self.proc = subprocess.Popen([sys.executable, "-c", _BUSY_SOURCE, "%.4f" % share,
                                      str(BUSY_PERIOD_S)],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True,
                                     preexec_fn=_die_with_parent)
        self._undo = CLEANUP.push(self.stop)
        if self.proc.stdout.readline().strip() != "ready":
            raise RuntimeError("the busy process did not start")
        self.t0, self.cpu0 = time.monotonic_ns(), _thread_cpu_ns(self.proc.pid)

    def stop(self):
        """Its CPU share since it was ready."""
        share = None
        if self.proc.poll() is None:
            share = (_thread_cpu_ns(self.proc.pid) - self.cpu0) / (time.monotonic_ns() - self.t0)
            self.proc.kill()
        self.proc.wait()
        self.proc.stdout.close()
        CLEANUP.discard(self._undo)
        return share


# -- the benchmark ------------------------------------------------------------------------

class Bench:
    def __init__(self, counts, lib, libdir, client, workdir):
        self.c = counts
        self.lib = lib
        self.client = client
        self.workdir = workdir
        from ebpf_pcsc.functions import FUNCTIONS
        self.floor = Floor(lib, [fn.name for fn in FUNCTIONS])
        self.tracer_runs = []     # every tracer run: shown, lost, start, rss, cpu
        self.tracer_share = None  # the tracer's CPU share in the last SCardTransmit loop
        self.busy_shares = []     # the busy process's, run after run

    # one run of each kind
    def _untraced(self, scenario, n):
        return self.client.run(scenario, n)

    def _floor(self, scenario, n):
        self.floor.attach()
        try:
            return self.client.run(scenario, n)
        finally:
            self.floor.detach()

    def _busy(self, scenario, n):
        """Untraced, beside a busy process taking the CPU share the tracer
        took in its last run of the loop."""
        share = BUSY_DEFAULT_SHARE if self.tracer_share is None else self.tracer_share
        busy = BusyProcess(min(share, 1.0))
        try:
            return self.client.run(scenario, n)
        finally:
            self.busy_shares.append(busy.stop())

    def _pcsc_spy(self, scenario, n):
        spy = PcscSpy(self.workdir)
        try:
            return self.client.run(scenario, n, env=spy.client_env(self.client))
        finally:
            spy.finish()

    def _traced(self, scenario, n, kind, extra=()):
        fn, pattern, others = {"isvalid": ("SCardIsValidContext", _ISVALID, 2),
                               "loop": ("SCardTransmit", _LOOP, 5)}[scenario]
        held = self.client.held(scenario, n)
        tracer = TracerRun(held.pid, self.lib, self.workdir,
                           "%s-%d" % (kind, len(self.tracer_runs)), extra)
        try:
            cpu0 = tracer.cpu_s()
            result = held.release(pattern, n)
            cpu_in_loop = tracer.cpu_s() - cpu0
            tracer.drain(fn, n + others)
            cpu = tracer.cpu_s() - cpu0
        except BaseException:
            tracer.kill()
            raise
        run = tracer.stop(fn)
        # Its CPU share while the client ran (what it used after, on the
        # last pass's calls, the client did not meet).
        share = cpu_in_loop / (result[0] * n / 1e6) if n and result[0] else None
        run.update(kind=kind, calls=n, tracer_cpu_s=cpu, cpu_share=share,
                   tracer_cpu_ms_per_1000_calls=cpu * 1e3 / n * 1000 if n else None)
        if scenario == "loop":
            self.tracer_share = share
        self.tracer_runs.append(run)
        return result, run

    @staticmethod
    def _take_turns(variants, scenario, n, rounds, digits, label):
        """Runs each (name, run) of variants once per round, in a different
        order each round (no variant always goes first); per variant, the
        median over the rounds and every run."""
        wall = {name: [] for name, _ in variants}
        cpu = {name: [] for name, _ in variants}
        spreads = {name: [] for name, _ in variants}
        for r in range(rounds):
            order = variants[r % len(variants):] + variants[:r % len(variants)]
            for name, run in order:
                us, cpu_us, spread = run(scenario, n)
                wall[name].append(us)
                cpu[name].append(cpu_us)
                if spread is not None:
                    spreads[name].append(spread)
                log("%s round %d/%d: %-13s %8.*f us/call (client CPU %.*f us/call)%s"
                    % (label, r + 1, rounds, name, digits, us, digits, cpu_us,
                       "" if spread is None else
                       "; p50 %.1f, p99.9 %.0f us, %.1f%% of the time in calls > %.0f ms"
                       % (spread["p50_us"], spread["p999_us"], 100 * spread["stalled_share"],
                          STALL_US / 1000)))
        figures = {name: dict(us_per_call=median(wall[name]), runs_us_per_call=wall[name],
                              client_cpu_us_per_call=median(cpu[name]),
                              runs_client_cpu_us_per_call=cpu[name])
                   for name, _ in variants}
        for name, runs in spreads.items():
            if runs:
                figures[name]["latency"] = {k: median([x[k] for x in runs]) for k in runs[0]}
                figures[name]["runs_latency"] = runs
        return figures

    def isvalid(self):
        n, rounds = self.c["isvalid_calls"], self.c["isvalid_rounds"]
        variants = [("untraced", self._untraced), ("floor", self._floor),
                    ("pcsc-ebpf-spy", lambda s, n: self._traced(s, n, "isvalid")[0]),
                    ("pcsc-ebpf-spy --buffer perf",
                     lambda s, n: self._traced(s, n, "isvalid-perf", ("--buffer", "perf"))[0]),
                    ("pcsc-spy", self._pcsc_spy)]
        figures = self._take_turns(variants, "isvalid", n, rounds, 3, "isvalid")
        runs = [t for t in self.tracer_runs if t["kind"].startswith("isvalid")]
        return figures, dict(calls=n, rounds=rounds,
                             tracer_shown=[t["shown"] for t in runs],
                             tracer_lost_events=[t["lost_events"] for t in runs])

    def transmit(self):
        """The SCardTransmit loop, run as isvalid() runs its loop.  The floor
        and pcsc-spy run on the same workload: they say how much of the
        tracer's cost is the probes' own (the traps, which no program can make
        cheaper) and what the reference tool costs on it."""
        n, rounds = self.c["loop_calls"], self.c["loop_rounds"]
        variants = [("untraced", self._untraced), ("floor", self._floor),
                    ("pcsc-ebpf-spy", lambda s, n: self._traced(s, n, "transmit")[0]),
                    ("pcsc-spy", self._pcsc_spy), ("busy process", self._busy)]
        figures = self._take_turns(variants, "loop", n, rounds, 1, "transmit")
        untraced = figures["untraced"]
        for fig in figures.values():
            fig["ratio"] = fig["us_per_call"] / untraced["us_per_call"]
            # Each round's own ratio (its runs are minutes closer in time than
            # the medians'): their spread says how far the machine's drift
            # carries the figure.
            fig["round_ratios"] = [v / u for v, u in zip(fig["runs_us_per_call"],
                                                         untraced["runs_us_per_call"])]
            fig["round_ratio_quartiles"] = quartiles(fig["round_ratios"])
        runs = [t for t in self.tracer_runs if t["kind"] == "transmit"]
        return dict(calls=n, rounds=rounds, variants=figures,
                    tracer_shown=[t["shown"] for t in runs],
                    tracer_lost_events=[t["lost_events"] for t in runs],
                    tracer_cpu_share=median([t["cpu_share"] for t in runs
                                             if t["cpu_share"] is not None]),
                    busy_cpu_share=median([x for x in self.busy_shares if x is not None]),
                    stall_us=STALL_US)

    def burst(self):
        n = self.c["burst_calls"]
        (us, _, _), run = self._traced("isvalid", n, "burst")
        log("burst: %d calls, %d shown, %d events lost, %.1f ms CPU per 1000 calls"
            % (n, run["shown"], run["lost_events"], run["tracer_cpu_ms_per_1000_calls"]))
        return dict(calls=n, shown=run["shown"], lost_events=run["lost_events"],
                    lost_events_stderr=run["lost_events_stderr"], us_per_call=us,
                    tracer_cpu_s=run["tracer_cpu_s"],
                    tracer_cpu_ms_per_1000_calls=run["tracer_cpu_ms_per_1000_calls"],
                    tracer_peak_rss_kib=run["peak_rss_kib"])


# -- the report -----------------------------------------------------------------------------

def machine():
    cpu = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break

    def pkg(name):
        p = subprocess.run(["dpkg-query", "-W", "-f=${Version}", name], capture_output=True,
                           text=True)
        return p.stdout.strip() or None

    return dict(kernel=platform.release(), cpu=cpu, cores=os.cpu_count(),
                date=time.strftime("%Y-%m-%d %H:%M:%S %Z"), loadavg_start=os.getloadavg(),
                libpcsclite=pkg("libpcsclite1"), bcc=pkg("python3-bpfcc"),
                python=platform.python_version(), default_buffer=_default_buffer())


def _default_buffer():
    from ebpf_pcsc.capture import choose_transport
    return choose_transport("auto")


def verdict(ok):
    return "PASS" if ok else "MISS"


def targets(res):
    iv = res["isvalid"]
    tracer, floor, spy = (iv[k]["us_per_call"] for k in ("pcsc-ebpf-spy", "floor", "pcsc-spy"))
    tr = res["transmit"]["variants"]
    burst = res["burst"]
    start = res["startup"]["median_s"]
    return [
        dict(name="isvalid: pcsc-ebpf-spy / floor", value=tracer / floor,
             target="<= %.1f" % FLOOR_FACTOR, ok=tracer / floor <= FLOOR_FACTOR),
        dict(name="isvalid: pcsc-ebpf-spy / pcsc-spy", value=tracer / spy,
             target="<= %.1f" % SPY_FACTOR, ok=tracer / spy <= SPY_FACTOR),
        dict(name="SCardTransmit: traced / untraced", value=tr["pcsc-ebpf-spy"]["ratio"],
             target="<= %.2f (aim %.2f)" % (TRANSMIT_RATIO, TRANSMIT_AIM),
             ok=tr["pcsc-ebpf-spy"]["ratio"] <= TRANSMIT_RATIO),
        dict(name="burst: calls lost", value=burst["calls"] - burst["shown"],
             target="0", ok=burst["shown"] == burst["calls"] and burst["lost_events"] == 0),
        dict(name="start to Tracing (s)", value=start,
             target="<= %.1f (aim %.1f)" % (START_LIMIT, START_AIM), ok=start <= START_LIMIT),
    ]


def table(res):
    import tabulate as tabulate_module
    from tabulate import tabulate
    tabulate_module.PRESERVE_WHITESPACE = True   # the indented rows
    iv = res["isvalid"]
    ivr = res["isvalid_runs"]
    tr = res["transmit"]
    trv = tr["variants"]
    burst = res["burst"]
    st = res["startup"]
    tracer = res["tracer"]
    tg = {t["name"]: t for t in res["targets"]}

    def f(x, spec):
        return format(x, spec) if x is not None else "-"

    def row(label, figure="", cpu="", target=None):
        if target is None:
            return [label, figure, cpu, "", ""]
        t = tg[target]
        return [label, figure, cpu, t["target"], verdict(t["ok"])]

    def variant(label, key):
        return row(label, f(iv[key]["us_per_call"], ".3f"), f(iv[key]["client_cpu_us_per_call"], ".3f"))

    def spread(q):
        return "-" if q is None else "%.3f (%.3f-%.3f)" % (q[1], q[0], q[2])

    def transmit(label, key):
        return row(label, f(trv[key]["us_per_call"], ".1f"),
                   f(trv[key]["client_cpu_us_per_call"], ".1f"))

    def latency(label, key):
        lat = trv[key].get("latency")
        if lat is None:
            return row(label, "-")
        return row(label, "%.1f / %.0f / %.1f%%" % (lat["p50_us"], lat["p999_us"],
                                                   100 * lat["stalled_share"]))

    def share(x):
        return "-" if x is None else "%.0f%%" % (100 * x)

    rows = [
        row("SCardIsValidContext, µs/call (median of %d x %d calls)" % (ivr["rounds"], ivr["calls"])),
        variant("  untraced", "untraced"),
        variant("  floor: empty uprobe+uretprobe", "floor"),
        variant("  pcsc-spy (LD_PRELOAD, reader running)", "pcsc-spy"),
        variant("  pcsc-ebpf-spy (default: --buffer %s)" % res["machine"]["default_buffer"],
                "pcsc-ebpf-spy"),
        row("    x floor", f(tg["isvalid: pcsc-ebpf-spy / floor"]["value"], ".2f"),
            target="isvalid: pcsc-ebpf-spy / floor"),
        row("    x pcsc-spy", f(tg["isvalid: pcsc-ebpf-spy / pcsc-spy"]["value"], ".2f"),
            target="isvalid: pcsc-ebpf-spy / pcsc-spy"),
        # Not the default where the kernel has a ring buffer: a figure, no target.
        variant("  pcsc-ebpf-spy --buffer perf", "pcsc-ebpf-spy --buffer perf"),
        row("    x floor", f(iv["pcsc-ebpf-spy --buffer perf"]["us_per_call"]
                            / iv["floor"]["us_per_call"], ".2f")),
        row("    runs that lost events (most lost)",
            "%d of %d (%d)" % (sum(1 for x in ivr["tracer_lost_events"] if x),
                               len(ivr["tracer_lost_events"]), max(ivr["tracer_lost_events"]))),
        row("SCardTransmit, µs/call (median of %d rounds x %d calls)" % (tr["rounds"], tr["calls"])),
        transmit("  untraced", "untraced"),
        transmit("  floor: empty uprobe+uretprobe", "floor"),
        row("    / untraced", f(trv["floor"]["ratio"], ".3f")),
        transmit("  pcsc-spy (LD_PRELOAD, reader running)", "pcsc-spy"),
        row("    / untraced", f(trv["pcsc-spy"]["ratio"], ".3f")),
        transmit("  pcsc-ebpf-spy", "pcsc-ebpf-spy"),
        row("    / untraced", f(trv["pcsc-ebpf-spy"]["ratio"], ".3f"),
            target="SCardTransmit: traced / untraced"),
        row("    each round's own ratio: median (quartiles)",
            spread(trv["pcsc-ebpf-spy"]["round_ratio_quartiles"])),
        transmit("  busy process, no PC/SC (CPU share %s; the tracer's: %s)"
                 % (share(tr["busy_cpu_share"]), share(tr["tracer_cpu_share"])), "busy process"),
        row("    / untraced", f(trv["busy process"]["ratio"], ".3f")),
        row("SCardTransmit, each call: p50 µs / p99.9 µs / time in calls > %.0f ms (medians)"
            % (tr["stall_us"] / 1000)),
        latency("  untraced", "untraced"),
        latency("  floor", "floor"),
        latency("  pcsc-spy", "pcsc-spy"),
        latency("  pcsc-ebpf-spy", "pcsc-ebpf-spy"),
        latency("  busy process", "busy process"),
        row("Burst of %d SCardIsValidContext (full speed, traced)" % burst["calls"]),
        row("  calls shown", "%d" % burst["shown"]),
        row("  calls lost", "%d" % (burst["calls"] - burst["shown"]), target="burst: calls lost"),
        row("  events lost (the tracer's count)", "%d" % burst["lost_events"]),
        row("pcsc-ebpf-spy itself"),
        row("  start to Tracing, s (median of %d starts; CPU: its own)" % len(st["runs_s"]),
            f(st["median_s"], ".2f"),
            f(st["median_cpu_s"], ".2f"), target="start to Tracing (s)"),
        row("  peak RSS, MiB (VmHWM; at the Tracing line)",
            "%s (%s)" % (f(_mib(tracer["peak_rss_kib"]), ".1f"),
                         f(_mib(tracer["peak_rss_at_start_kib"]), ".1f"))),
        row("  its own memory, MiB (RssAnon, at the end of the burst)",
            f(_mib(tracer["rss_anon_kib"]), ".1f")),
        row("  CPU time per 1,000 calls, ms (burst)", f(tracer["cpu_ms_per_1000_calls"], ".1f")),
    ]
    return tabulate(rows, headers=["measurement", "figure", "CPU", "target", "result"],
                    tablefmt="simple", disable_numparse=True)


def _mib(kib):
    return kib / 1024 if kib is not None else None


# -- main -----------------------------------------------------------------------------------

def compile_client(workdir):
    out = Path(workdir) / "pcsc_client"
    subprocess.run(["gcc", "-O2", "-g", "-Wall", "-Wextra", "-I/usr/include/PCSC", str(CLIENT_SRC),
                    "-o", str(out), "-lpcsclite", "-lpthread"], check=True)
    return str(out)


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small counts (for the smoke test)")
    ap.add_argument("--json", default=str(ROOT / "bench-results.json"), metavar="PATH",
                    help="where to write the figures (default: bench-results.json)")
    ap.add_argument("--system-lib", action="store_true",
                    help="probe %s itself, not a private copy" % SYSTEM_LIB)
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        ap.error("needs root (eBPF, mount namespaces): sudo %s" % " ".join(sys.argv))
    counts = QUICK if args.quick else FULL
    # Explicit handlers: a shell starts background jobs with SIGINT ignored.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _raise_interrupt)
    try:
        return _bench(args, counts)
    except KeyboardInterrupt:
        log("interrupted: stopping everything")
        return 130
    finally:
        # Cleaning up is not to be interrupted (every step has a timeout).
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)
        CLEANUP.run()


def hold_cpus_awake():
    """Ask the kernel to keep the CPUs out of idle states for the whole run
    (PM QoS: a 0 µs latency limit in /dev/cpu_dma_latency, as long as the file
    stays open), for every variant alike.  On a virtual machine a halted vCPU
    takes ~100 µs to wake: a SCardTransmit round trip (client, pcscd, vpcd,
    the card) wakes several, so without this the loop measures wake-ups, and
    a traced run, whose tracer keeps a CPU a little busier, came out faster
    than an untraced one.  Returns the limit in µs (None: not available)."""
    import struct
    try:
        fd = os.open("/dev/cpu_dma_latency", os.O_WRONLY)
    except OSError:
        return None
    os.write(fd, struct.pack("i", 0))
    CLEANUP.push(lambda: os.close(fd))
    return 0


def _bench(args, counts):
    from ebpf_pcsc import kheaders
    kheaders.ensure(lambda m: log(m))
    workdir = tempfile.mkdtemp(prefix="pcsc-bench-")
    CLEANUP.push(lambda: shutil.rmtree(workdir, ignore_errors=True))
    info = machine()
    info["cpu_latency_limit_us"] = hold_cpus_awake()
    log("%s, %s, %d cores, load average %.1f" % (info["kernel"], info["cpu"], info["cores"],
                                                  info["loadavg_start"][0]))
    client_bin = compile_client(workdir)
    if args.system_lib:
        lib, libdir = SYSTEM_LIB, None
    else:
        libdir = os.path.join(workdir, "lib")
        os.mkdir(libdir)
        lib = os.path.join(libdir, "libpcsclite.so.1")
        shutil.copy2(SYSTEM_LIB, lib)
    stack = PcscStack()
    CLEANUP.push(stack.close)
    client = Client(client_bin, stack, libdir, workdir)
    bench = Bench(counts, lib, libdir, client, workdir)

    t0 = time.monotonic()
    res = dict(machine=info, counts=counts, library=lib,
               library_note=None if args.system_lib else "private copy of %s" % SYSTEM_LIB)
    res["isvalid"], res["isvalid_runs"] = bench.isvalid()
    res["transmit"] = bench.transmit()
    res["burst"] = bench.burst()
    runs = bench.tracer_runs
    starts = [t["start_s"] for t in runs]
    start_cpu = [t["start_cpu_s"] for t in runs if t["start_cpu_s"] is not None]
    res["startup"] = dict(median_s=median(starts), runs_s=starts,
                          median_cpu_s=median(start_cpu), runs_cpu_s=start_cpu)
    burst_run = runs[-1]
    res["tracer"] = dict(
        peak_rss_kib=burst_run["peak_rss_kib"],
        rss_anon_kib=burst_run["rss_anon_kib"],
        peak_rss_at_start_kib=burst_run["peak_rss_at_start_kib"],
        rss_at_start_kib=burst_run["rss_at_start_kib"],
        cpu_ms_per_1000_calls=burst_run["tracer_cpu_ms_per_1000_calls"],
        cpu_ms_per_1000_calls_isvalid_runs=median(
            [t["tracer_cpu_ms_per_1000_calls"] for t in runs if t["kind"] == "isvalid"]),
        runs=runs)
    res["targets"] = targets(res)
    info["loadavg_end"] = os.getloadavg()
    res["duration_s"] = time.monotonic() - t0

    print("pcsc-ebpf-spy benchmark: %s, %s, %d cores, %s (load average %.1f at start)"
          % (info["kernel"], info["cpu"], info["cores"], info["date"], info["loadavg_start"][0]))
    print("library probed: %s%s" % (lib, "" if args.system_lib else " (a private copy of %s)"
                                    % SYSTEM_LIB))
    print("CPUs kept out of idle states (PM QoS latency limit 0 µs): %s"
          % ("yes" if info["cpu_latency_limit_us"] == 0 else "no (/dev/cpu_dma_latency missing)"))
    print()
    print(table(res))
    with open(args.json, "w") as f:
        json.dump(res, f, indent=2)
        f.write("\n")
    print()
    print("figures written to %s" % args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
