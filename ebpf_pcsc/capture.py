"""Capture: compile the BPF program, attach the probes, read the perf buffer.

bcc is imported here, lazily (importing it costs ~0.3 s): importing this
module does no work.
"""
import ctypes
import os
import sys
from typing import Callable, List, Optional, Sequence

from . import codegen
from .errors import SpyError
from .functions import Function
from .targets import Library, exported_functions

# The perf buffers absorb bursts while the Python reader catches up (it
# needs ~17 µs of CPU per call; a traced loop makes one every ~4 µs).  64 MiB
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

# Wake the reader once per this many records per CPU, not for each: every
# wakeup is an interrupt the traced thread pays for (measured: ~20 us per call
# with one wakeup per record, ~3 us with 64).  What is left below the mark is
# read when the poll times out (poll(): perf_buffer_consume).
WAKEUP_EVENTS = 64


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


class Capture:
    def __init__(self, functions: Sequence[Function], libraries: Sequence[Library],
                 pids: Optional[Sequence[int]] = None, perf_pages: Optional[int] = None,
                 discover: bool = False):
        self.functions = functions
        self.libraries = libraries
        self.pids = list(pids) if pids is not None else None
        self.perf_pages = perf_pages or default_perf_pages()
        self.lost = 0
        self.attached: List[List[Library]] = []   # per probed file: who maps it
        self.probe_count = 0
        self.discover = discover
        self._files = {}        # (dev, ino) -> the Library list attached to that file
        self._loaders = set()   # (dev, ino) of dynamic loaders probed
        self._bpf = None
        self._batch: List[bytes] = []

    def start(self, on_lost: Callable[[int], None]) -> None:
        """Compile, load and attach; after this every call is seen."""
        try:
            from bcc import BPF
        except ImportError:
            raise SpyError("the bcc Python module is missing",
                           "install python3-bpfcc (sudo make setup) and use /usr/bin/python3")
        source = codegen.program_source(self.functions)
        cflags = codegen.cflags(self.pids is not None, self.discover)
        # bcc and clang print on our stdout and stderr (stdout carries the
        # trace): keep what they say aside, and only its gist on error.
        with _CapturedOutput() as said:
            try:
                bpf = BPF(text=source, cflags=cflags)
            except Exception:  # bcc raises a bare Exception
                bpf = None
        if bpf is None:
            raise SpyError("cannot compile or load the BPF program (%s)" % said.gist(),
                           "check the kernel headers (BCC_KERNEL_SOURCE) and the bcc install")
        self._bpf = bpf
        if self.pids is not None:
            table = bpf["traced_pids"]
            for pid in self.pids:
                table[table.Key(pid)] = table.Leaf(1)
        for lib in self.libraries:
            if not self.attach_library(lib, strict=True):
                continue

        def lost(count):
            self.lost += count
            on_lost(count)

        bpf["events"].open_perf_buffer(self._on_sample, page_cnt=self.perf_pages, lost_cb=lost,
                                       wakeup_events=WAKEUP_EVENTS)

    def untrace_pid(self, pid: int) -> None:
        table = self._bpf["traced_pids"]
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
            self._bpf.attach_uprobe(name=path, sym="_dl_debug_state", fn_name=codegen.LOADER_PROBE)
        except Exception:
            return False  # a loader without the hook (not glibc): not a discovery source
        return True

    def _attach(self, bpf, lib: Library) -> None:
        exported = exported_functions(lib.path)
        present = [(i, fn) for i, fn in enumerate(self.functions) if fn.name in exported]
        if not present:
            raise SpyError("%s exports no SCard* function" % lib.shown,
                           "give the path of a libpcsclite.so.1 (or a binary linking it)")
        # Return probes first: a call entered before its entry probe exists
        # has no in-flight record and its return is ignored, whereas an entry
        # without a return probe would leave a record behind on its thread.
        for i, fn in present:
            bpf.attach_uretprobe(name=lib.path, sym=fn.name, fn_name=codegen.return_probe(i))
        for i, fn in present:
            bpf.attach_uprobe(name=lib.path, sym=fn.name, fn_name=codegen.enter_probe(i))
        self.probe_count = max(self.probe_count, len(present))

    def _on_sample(self, cpu, data, size) -> None:
        # Copy out now: the perf ring slot is reused after the callback.
        self._batch.append(ctypes.string_at(data, size))

    def poll(self, timeout_ms: int) -> List[bytes]:
        """The records that arrived, oldest first.  Records of one phase
        share a timestamp and keep their order (the sort is stable)."""
        self._bpf.perf_buffer_poll(timeout=timeout_ms)
        self._bpf.perf_buffer_consume()
        batch, self._batch = self._batch, []
        return batch

    def close(self) -> None:
        if self._bpf is None:
            return
        from concurrent.futures import ThreadPoolExecutor

        from bcc import lib
        # bcc attached the uprobes through the perf "uprobe" PMU; its
        # detach_uprobe_event() would also remove a tracefs event that was
        # never created (and fails where tracefs is not mounted).  Closing
        # the perf event is the whole detach.  Each close waits for an RCU
        # grace period in the kernel (~0.1 s): closing them concurrently
        # lets those waits overlap.
        fds = list(self._bpf.uprobe_fds.values())
        if fds:
            with ThreadPoolExecutor(min(len(fds), 64)) as pool:
                list(pool.map(lib.bpf_close_perf_event_fd, fds))
        self._bpf.uprobe_fds.clear()
        self._bpf.cleanup()
        self._bpf = None
