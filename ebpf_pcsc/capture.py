"""Capture: compile the BPF program, attach the probes, read the buffers.

bcc is imported here, lazily (importing it costs ~0.3 s): importing this
module does no work.
"""
import ctypes
import mmap
import os
import re
import select
import sys
import time
from typing import Callable, List, Optional, Sequence

from . import codegen, ringbuf, uprobes
from . import layout as L
from .bcc_compile import compile_bpf
from .btf import BTFError
from .errors import SpyError
from .functions import Function
from .ringbuf import RingBuffer
from .targets import Library, function_addresses

# The buffers absorb bursts while the Python reader catches up (it needs
# ~14 µs of CPU per call; a traced loop makes one every ~3 µs).  64 MiB
# in all, split between the CPUs: a 50,000-call burst (~17 MB of records)
# fits in one CPU's buffer on a small machine; each CPU gets between 1 MiB
# and 32 MiB (a power of two, in 4 KiB pages).
PERF_BUFFER_TOTAL = 64 << 20


def default_perf_pages() -> int:
    per_cpu = PERF_BUFFER_TOTAL // max(1, os.cpu_count() or 1) // 4096
    pages = 256
    while pages * 2 <= min(per_cpu, 8192):
        pages *= 2
    return pages

# The kernel wakes the reader once per this many bytes of records written by a
# CPU, not for each record: every wakeup is an interrupt the traced thread
# pays for, raised by the record that reaches the mark -- a self-IPI, which a
# virtual machine turns into an exit (perf showed ~10 us each; ~20 us per call
# with a wakeup per record, ~0.3 us with one per 64 records).  What is left
# below the mark is read when the tracer's poll times out (session.POLL_MS,
# 100 ms).  The mark stays under a quarter of the buffer, so that a burst of
# large records (16 KiB chunks of extended APDUs) cannot fill it unheard.
WAKEUP_BYTES = 256 << 10

# The ring buffer is read in passes.  While the records come slowly (less than
# HEAVY_BYTES since the last pass), at every poll: a call shows within
# session.POLL_MS.  While they come fast, once per BUSY_PERIOD_S; but at once
# when they come so fast that, left until then, they would fill a quarter of
# the buffer (a burst at full speed: the reader keeps at it; the kernel's
# wakeups, once per WAKEUP_BYTES, let it see the pace, measured over
# PACE_WINDOW_S at least).  On a machine with few CPUs, the reader's work
# slows the traced processes less in a few long passes than in many short
# ones: each pass makes their wake-ups land on a busy CPU, which costs them an
# IPI and, now and then, a wait of a whole tick.  Measured on 2 vCPUs: a
# process spinning a third of the time cost an SCardTransmit loop 1.24 x in
# bursts of 20 ms, 1.12 x in bursts of 100 ms; the tracer reading once a
# second instead of every ~75 ms (at each wakeup), 1.07-1.16 x instead of
# 1.17-1.38 x in loops of 3 to 10 s, four experiments (once every 0.5 s:
# 1.16-1.19 x).
HEAVY_BYTES = 256 << 10
BUSY_PERIOD_S = 1.0
# A pace measured over less time is noise (one 16 KiB chunk in 100 µs looks
# like 160 MB/s; in 2 ms, 8 MB/s, far from filling a quarter of the buffer
# in a second), and a longer window would see a burst at full speed late.
PACE_WINDOW_S = 0.002


def wakeup_bytes(buffer_bytes: int) -> int:
    """The ring buffer's mark, for a ring of buffer_bytes."""
    return max(1, min(WAKEUP_BYTES, buffer_bytes // 4))


def pass_due(pending: int, since_last_pass_s: float, rate: float, buffer_bytes: int) -> bool:
    """Whether to read the ring buffer (of buffer_bytes) now, with pending
    bytes of records in it, since_last_pass_s after the last pass, the
    records coming at rate bytes a second."""
    return (pending < HEAVY_BYTES or since_last_pass_s >= BUSY_PERIOD_S
            # at this pace, a quarter of the buffer before the next pass
            or pending + rate * BUSY_PERIOD_S >= buffer_bytes // 4)


def perf_wakeup_events(buffer_bytes: int) -> int:
    """A perf buffer counts records, not bytes: as many of the common ones
    (ENTER, RETURN, without a buffer) as WAKEUP_BYTES holds, but no more of
    the largest (a full DATA chunk) than a quarter of the buffer holds."""
    return max(1, min(WAKEUP_BYTES // L.CALL_DATA_OFFSET,
                      buffer_bytes // 4 // (L.DATA_OFFSET + L.PCSC_CHUNK)))

# Library loads travel apart from the calls, and wake the reader at once
# (the default: one wakeup per record): a process that just loaded a new
# libpcsclite is about to call it, and its probes are attached on this news.
LOADS_PAGES = 16

# Set to "perf" to attach with one perf event per probe even where the
# kernel has uprobe_multi links (how the tests cover kernels < 6.6).
ATTACH_ENV = "PCSC_EBPF_SPY_ATTACH"
# Set to "hash" to keep the calls in flight in a hash map even where task
# storage is safe (Linux >= 6.2; how the tests cover older kernels).
INFLIGHT_ENV = "PCSC_EBPF_SPY_INFLIGHT"


def kernel_release() -> tuple:
    """(major, minor) of the running kernel."""
    m = re.match(r"(\d+)\.(\d+)", os.uname().release)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


class _CapturedOutput:
    """File descriptors 1 and 2 redirected to a temporary file for a while."""

    def __enter__(self):
        import tempfile
        sys.stdout.flush()
        sys.stderr.flush()
        self.file = tempfile.TemporaryFile()
        self.saved = [os.dup(1), os.dup(2)]
        os.dup2(self.file.fileno(), 1)
        os.dup2(self.file.fileno(), 2)
        return self

    def __exit__(self, *exc):
        os.dup2(self.saved[0], 1)
        os.dup2(self.saved[1], 2)
        for fd in self.saved:
            os.close(fd)
        self.file.seek(0)
        self.text = self.file.read().decode("utf-8", "replace")
        self.file.close()

    def gist(self) -> str:
        lines = [l.strip() for l in self.text.splitlines() if l.strip()]
        errors = [l for l in lines if "error" in l.lower()]
        return (errors or lines or ["no message"])[0][:200]


def choose_transport(transport: str) -> str:
    """"auto" is the BPF ring buffer where the kernel has one, else the perf
    buffer.  Both work the same way; a record costs the traced thread ~0.6 us
    through the perf buffer and ~0.15 us through the ring buffer (make bench),
    which is why libbpf-tools make the same choice."""
    if transport != "auto":
        return transport
    return "ring" if ringbuf.ORDERED_LOADS and uprobes.ring_buffer_supported() else "perf"


class Capture:
    """transport: "perf" (the perf buffer, per CPU), "ring" (one BPF ring
    buffer, Linux >= 5.8: cheaper per record for the traced thread) or "auto"
    (see choose_transport).
    perf_pages: the perf buffer's pages per CPU; the ring buffer gets as
    many in all as the perf buffers would."""

    def __init__(self, functions: Sequence[Function], libraries: Sequence[Library],
                 pids: Optional[Sequence[int]] = None, perf_pages: Optional[int] = None,
                 discover: bool = False, transport: str = "auto"):
        self.functions = functions
        self.libraries = libraries
        self.pids = list(pids) if pids is not None else None
        self.perf_pages = perf_pages or default_perf_pages()
        self.transport = choose_transport(transport)
        self.ring = self.transport == "ring"
        if self.ring and not ringbuf.ORDERED_LOADS:
            raise SpyError("--buffer ring is read on x86-64 only",
                           "use --buffer perf (or auto)")
        self.lost = 0
        self.attached: List[List[Library]] = []   # per probed file: who maps it
        self.probe_count = 0
        self.discover = discover
        self._files = {}        # (dev, ino) -> the Library list attached to that file
        self._loaders = set()   # (dev, ino) of dynamic loaders probed
        self._bpf = None
        self._batch: List[bytes] = []
        self._rings = {}        # ring buffers: name -> RingBuffer
        self._epoll = None
        self._ring_bytes = 0        # the calls' ring buffer's size
        self._last_pass = 0.0       # when it was last read (monotonic)
        self._look = (0, 0.0)       # what it held when last looked at, and when
        self._loads: List[bytes] = []
        self.multi = False      # uprobe_multi links (else one perf event per probe)
        self._phase_programs = {}   # uprobe_multi: is-return -> the phase's program fd
        self._counted = [0] * L.PCSC_COUNTS   # the kernel's counts already reported
        self._fds: List[int] = []   # the links and perf events that hold the probes
        self._warn: Callable[[str], None] = lambda message: None

    def start(self, on_lost: Callable[[int], None],
              warn: Optional[Callable[[str], None]] = None) -> None:
        """Compile, load and attach; after this every call is seen."""
        if warn is not None:
            self._warn = warn
        try:
            from bcc import BPF
        except ImportError:
            raise SpyError("the bcc Python module is missing",
                           "install python3-bpfcc (sudo make setup) and use /usr/bin/python3")
        self.multi = os.environ.get(ATTACH_ENV) != "perf" and uprobes.supported()
        source = codegen.program_source(self.functions)
        ring_pages = (self._ring_pages(self.perf_pages), self._ring_pages(LOADS_PAGES))
        self._ring_bytes = ring_pages[0] * mmap.PAGESIZE
        try:
            cflags = codegen.cflags(self.pids is not None, self.discover, self.multi,
                                    ring_pages=ring_pages if self.ring else None,
                                    wakeup_bytes=wakeup_bytes(self._ring_bytes),
                                    inflight_hash=os.environ.get(INFLIGHT_ENV) == "hash"
                                    or kernel_release() < (6, 2))
        except (BTFError, OSError) as e:
            # -p and command mode read task_struct at the running kernel's
            # offsets, which only its BTF gives.
            why = getattr(e, "strerror", None) or e
            raise SpyError("cannot read the kernel's BTF (%s)" % why,
                           "-p and COMMAND need a kernel with /sys/kernel/btf/vmlinux; "
                           "trace system-wide instead")
        # bcc and clang print on our stdout and stderr (stdout carries the
        # trace): keep what they say aside, and only its gist on error.
        with _CapturedOutput() as said:
            try:
                bpf = compile_bpf(lambda: BPF(text=source.encode(), cflags=cflags))
            except Exception:  # bcc raises a bare Exception
                bpf = None
        if bpf is None:
            raise SpyError("cannot compile or load the BPF program (%s)" % said.gist(),
                           "check the kernel headers (BCC_KERNEL_SOURCE) and the bcc install")
        self._bpf = bpf
        if self.multi:
            with _CapturedOutput() as said:
                try:
                    self._phase_programs = {
                        ret: bpf.load_func(name.encode(), BPF.KPROBE,
                                           attach_type=uprobes.BPF_TRACE_UPROBE_MULTI).fd
                        for name, ret in ((codegen.ENTER_PROGRAM, False),
                                          (codegen.RETURN_PROGRAM, True))}
                except Exception:  # bcc: the verifier refused it
                    self._phase_programs = None
            if self._phase_programs is None:
                raise SpyError("the kernel refuses the BPF program (%s)" % said.gist(),
                               "run with %s=perf, and report it" % ATTACH_ENV)
        if self.pids is not None:
            table = bpf[b"traced_pids"]
            for pid in self.pids:
                table[table.Key(pid)] = table.Leaf(1)
        # The buffers first: what the probes send as soon as they are attached
        # has somewhere to go.
        self._on_lost = on_lost
        if self.ring:
            try:
                self._open_rings(bpf)
            except OSError as e:
                raise SpyError("cannot map the BPF ring buffer (%s)" % (e.strerror or e),
                               "use --buffer perf")
        else:
            # Lost records are counted on the kernel side (both ways), and
            # reported by poll().
            bpf[b"events"].open_perf_buffer(self._on_sample, page_cnt=self.perf_pages,
                                           lost_cb=lambda count: None,
                                           wakeup_events=perf_wakeup_events(
                                               self.perf_pages * mmap.PAGESIZE))
            if self.discover:
                bpf[b"loads"].open_perf_buffer(self._on_load, page_cnt=LOADS_PAGES,
                                              lost_cb=lambda count: None)
        for lib in self.libraries:
            self.attach_library(lib, strict=True)

    def _open_rings(self, bpf) -> None:
        # Read by us from the mapped memory (ringbuf.py), not through bcc.
        self._rings = {"events": RingBuffer(bpf[b"events"].map_fd)}
        if self.discover:
            self._rings["loads"] = RingBuffer(bpf[b"loads"].map_fd)
        # Edge-triggered: a ring buffer polls readable whenever it holds a
        # record, so a level-triggered reader would come back for each few
        # records of a slow stream (a batch's overhead each time, while the
        # traced threads want the CPUs).  Woken by the kernel only (once per
        # wakeup_bytes() of records), or by the poll's timeout.
        self._epoll = select.epoll()
        for ring in self._rings.values():
            self._epoll.register(ring.fd, select.EPOLLIN | select.EPOLLET)

    @staticmethod
    def _ring_pages(per_cpu: int) -> int:
        """A ring buffer, shared by the CPUs, as large as their perf buffers."""
        pages = per_cpu * (os.cpu_count() or 1)
        return 1 << (pages - 1).bit_length()   # a power of 2

    def _lost(self, count: int) -> None:
        self.lost += count
        self._on_lost(count)

    def traced_pids(self) -> List[int]:
        """The processes traced (-p and what they started since), as the
        kernel side knows them."""
        return [key.value for key in self._bpf[b"traced_pids"].keys()]

    def untrace_pid(self, pid: int) -> None:
        table = self._bpf[b"traced_pids"]
        try:
            del table[table.Key(pid)]
        except KeyError:
            pass

    @staticmethod
    def file_id(path: str):
        st = os.stat(path)
        return (st.st_dev, st.st_ino)

    def attach_library(self, lib: Library, strict: bool = False) -> bool:
        """Probe lib's file unless it already is (probes go on a file, an
        inode, whoever maps it).  True when this attached a new file."""
        try:
            key = self.file_id(lib.path)
        except OSError as e:
            if strict:
                raise SpyError("cannot open %s (%s)" % (lib.path, e.strerror), "check the path")
            return False
        if key in self._files:
            self._files[key].append(lib)
            return False
        try:
            self._attach(self._bpf, lib)
        except SpyError:
            if strict:
                raise
            return False
        except Exception:  # bcc: e.g. the process (whose root we read through) exited
            if strict:
                raise SpyError("cannot probe %s" % lib.shown, "check the path")
            return False
        self._files[key] = [lib]
        self.attached.append(self._files[key])
        return True

    def attach_loader(self, path: str) -> bool:
        """Probe a dynamic loader's library-load hook (discovery)."""
        try:
            key = self.file_id(path)
        except OSError:
            return False
        if key in self._loaders:
            return False
        self._loaders.add(key)
        try:
            offset = uprobes.file_offsets(path, function_addresses(path, b"^_dl_debug_state$"))
            prog = self._bpf.load_func(codegen.LOADER_PROBE.encode(), self._bpf.KPROBE).fd
            self._fds.append(uprobes.attach_perf(prog, path, offset["_dl_debug_state"]))
        except Exception:  # bcc, the kernel, a loader without the hook (not glibc)
            return False   # not a discovery source
        return True

    def _attach(self, bpf, lib: Library) -> None:
        addresses = function_addresses(lib.path)
        offsets = uprobes.file_offsets(lib.path, addresses) if addresses else {}
        present = [(i, offsets[fn.name]) for i, fn in enumerate(self.functions)
                   if fn.name in offsets]
        if not present:
            raise SpyError("%s exports no SCard* function" % lib.shown,
                           "give the path of a libpcsclite.so.1 (or a binary linking it)")
        # uprobe_multi: all the functions in one link per phase.  Should the
        # kernel refuse it (one address already holds a probe it cannot
        # share), each function is tried alone: one lost function is said,
        # the others are traced.
        groups = [present] if self.multi else [[one] for one in present]
        failed = []
        for group in groups:
            try:
                self._fds.extend(self._probe(bpf, lib.path, group))
            except OSError:
                if len(group) == 1:
                    failed.append(group[0])
                    continue
                for one in group:
                    try:
                        self._fds.extend(self._probe(bpf, lib.path, [one]))
                    except OSError:
                        failed.append(one)
        if len(failed) == len(present):
            raise SpyError("cannot probe %s" % lib.shown, "check the path")
        for i, _ in failed:
            self._warn("cannot probe %s in %s (the kernel refuses: another probe on the "
                       "same address?): its calls are not traced" % (self.functions[i].name,
                                                                     lib.shown))
        self.probe_count = max(self.probe_count, len(present) - len(failed))

    def _probe(self, bpf, path: str, where) -> List[int]:
        """Probes (return, then entry) on (function index, file offset) pairs;
        their fds.  On failure, nothing of these pairs stays probed.

        Return probes first: a call entered before its entry probe exists
        has no in-flight record and its return is ignored, whereas an entry
        without a return probe would leave a record behind on its thread."""
        fds = []
        try:
            for ret in (True, False):
                if self.multi:
                    fds.append(uprobes.link_uprobes(self._phase_programs[ret], path,
                                                    [off for _, off in where],
                                                    [i for i, _ in where], retprobe=ret))
                else:
                    for i, off in where:
                        name = codegen.return_probe(i) if ret else codegen.enter_probe(i)
                        prog = bpf.load_func(name.encode(), bpf.KPROBE).fd
                        fds.append(uprobes.attach_perf(prog, path, off, retprobe=ret))
        except BaseException:
            uprobes.close_all(fds)
            raise
        return fds

    def _on_sample(self, cpu, data, size) -> None:
        # Copy out now: the perf ring slot is reused after the callback.
        self._batch.append(ctypes.string_at(data, size))

    def _on_load(self, cpu, data, size) -> None:
        self._loads.append(ctypes.string_at(data, size))

    def poll(self, timeout_ms: int, everything: bool = False) -> List[bytes]:
        """The call records that arrived, in arrival order (see take_loads()
        for the library loads).  From the ring buffer, those of a pass when
        one is due (BUSY_PERIOD_S); with everything, all that arrived."""
        if self.ring:
            events = self._rings["events"]
            # A pass due on a fast stream is made at once (the kernel would
            # wake us only at its next mark); a slow one is read after the
            # wait.  Decided once per poll.
            due = everything or self._pass_due(events, fast_only=True)
            # Not waiting still takes the readiness the kernel may have
            # signalled (edge-triggered), or the next wait would return at once.
            self._epoll.poll(0 if due else timeout_ms / 1000)
            due = due or self._pass_due(events)
            # Loads first: a process's library load precedes its calls.
            if "loads" in self._rings:
                self._loads.extend(self._rings["loads"].read())
            if due:
                self._batch.extend(events.read())
                self._last_pass = time.monotonic()
                self._look = (events.pending(), self._last_pass)
        else:
            self._bpf.perf_buffer_poll(timeout=timeout_ms)
            self._bpf.perf_buffer_consume()
        lost = self._news(L.PCSC_COUNT_LOST)
        if lost:
            self._lost(lost)
        batch, self._batch = self._batch, []
        return batch

    def _pass_due(self, events: RingBuffer, fast_only: bool = False) -> bool:
        """pass_due(), the pace measured since an earlier look, at least
        PACE_WINDOW_S ago (not since the last pass: the last look before a
        burst may be a poll's timeout ago, and the pace would come out too
        slow).  fast_only: answer False for a slow stream (the caller reads
        it after the poll's wait)."""
        now, pending = time.monotonic(), events.pending()
        seen, at = self._look
        rate = 0.0
        if now - at >= PACE_WINDOW_S:
            rate = max(0, pending - seen) / (now - at)
            self._look = (pending, now)
        if fast_only and pending < HEAVY_BYTES:
            return False
        return pass_due(pending, now - self._last_pass, rate, self._ring_bytes)

    def _news(self, which: int) -> int:
        """How much a kernel-side count grew since the last look."""
        total = sum(self._bpf[b"counts"][which])
        news, self._counted[which] = total - self._counted[which], total
        return news

    def loads_lost(self) -> int:
        """Library-load records lost since the last call (discovery then
        has to look at every process again)."""
        return self._news(L.PCSC_COUNT_LOADS_LOST) if self.discover else 0

    def take_loads(self) -> List[bytes]:
        """The LOADED and EXEC records that arrived since the last call."""
        loads, self._loads = self._loads, []
        return loads

    def close(self) -> None:
        if self._bpf is None:
            return
        # Closing a link or a perf event is the whole detach.
        uprobes.close_all(self._fds)
        self._fds = []
        for ring in self._rings.values():
            ring.close()
        self._rings = {}
        if self._epoll is not None:
            self._epoll.close()
            self._epoll = None
        self._bpf.cleanup()
        self._bpf = None
