"""Every libpcsclite image processes map: private copies, copies seen
through another mount namespace, programs with SCard* linked in; each
attached image is named on stderr."""
import ctypes
import json
import mmap
import os
import re
import shutil
import signal
import subprocess

import pytest

from ebpf_pcsc.capture import LOADS_PAGES, Capture
from ebpf_pcsc.layout import Head
from ebpf_pcsc.ringbuf import HEADER_SIZE as RINGBUF_HEADER_SIZE
from processes import wait_for
from test_smoke_e2e import calls_of
from tracetext import calls_of_client

SYSTEM_REAL = "/usr/lib/x86_64-linux-gnu/libpcsclite.so.1.0.0"


@pytest.fixture(scope="module")
def private_copy(tmp_path_factory):
    d = tmp_path_factory.mktemp("copy")
    shutil.copy(SYSTEM_REAL, d / "libpcsclite.so.1")
    return d


def held(stack, argv, env=None):
    """The C client's wait-then-run scenario: it loads libpcsclite at start
    (linked), prints "ready", and calls nothing before a line on stdin."""
    proc = subprocess.Popen(argv, env=env or stack.env, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "ready\n"
    return proc


def wait_attached(t, path, timeout=30.0):
    """Discovery is asynchronous: the process was already running when the
    kernel told us about its library (see the README's note on the race)."""
    import time
    deadline = time.monotonic() + timeout
    while not attached_lines(t.stderr_so_far, path):
        assert time.monotonic() < deadline, t.stderr_so_far
        time.sleep(0.05)


def release(proc):
    out, err = proc.communicate("\n", timeout=60)
    assert proc.returncode == 0, err
    return out


def calls_of_pid(recording, pid):
    """(function, rv) of one process's calls in a -w recording (other
    processes may use PC/SC on this machine while a system-wide test runs)."""
    with open(recording) as f:
        calls = [json.loads(line) for line in f][1:]
    return [(c["function"], "0x%08X" % c["rv"]) for c in calls if c["pid"] == pid]


def attached_lines(stderr, path):
    return [l for l in stderr.splitlines()
            if re.match(r"pcsc-ebpf-spy: attached %s \(pid \d+(, pcsc-lite [^)]+)?\)$"
                        % re.escape(path), l)]


def test_private_copy_through_ld_library_path_loaded_after_start(stack, client_bin, tracer,
                                                                  private_copy, tmp_path):
    t = tracer("-q", "-w", tmp_path / "rec")
    proc = held(stack, [client_bin, "wait-then-run"],
                env=dict(stack.env, LD_LIBRARY_PATH=str(private_copy)))
    copy = str(private_copy / "libpcsclite.so.1")
    with open("/proc/%d/maps" % proc.pid) as f:
        assert copy in f.read()          # the process really uses the copy
    wait_attached(t, copy)
    out = release(proc)
    res = t.stop()
    assert len(attached_lines(res.stderr, copy)) == 1, res.stderr
    assert calls_of_pid(tmp_path / "rec", proc.pid) == calls_of_client(out)


def test_copy_bind_mounted_over_the_system_path_in_a_private_namespace(stack, client_bin,
                                                                      tracer, private_copy):
    """As a container sees it: the system path, another file."""
    copy = str(private_copy / "libpcsclite.so.1")
    proc = held(stack, ["unshare", "-m", "sh", "-c",
                        'mount --bind "$0" %s && exec "$1" wait-then-run' % SYSTEM_REAL,
                        copy, client_bin])
    t = tracer("-n", "-p", proc.pid)
    # -p finds the library the process maps, through its root
    assert "Tracing 18 PC/SC functions in %s (pid %d)..." % (SYSTEM_REAL, proc.pid) \
        in t.stderr_so_far
    out = release(proc)
    res = t.stop()
    assert calls_of(res.stdout) == calls_of_client(out)


def test_bind_mounted_copy_found_system_wide(stack, client_bin, tracer, private_copy, tmp_path):
    copy = str(private_copy / "libpcsclite.so.1")
    t = tracer("-q", "-w", tmp_path / "rec")
    proc = held(stack, ["unshare", "-m", "sh", "-c",
                        'mount --bind "$0" %s && exec "$1" wait-then-run' % SYSTEM_REAL,
                        copy, client_bin])
    wait_attached(t, SYSTEM_REAL)
    out = release(proc)
    res = t.stop()
    # Same path as the system library, another file: attached on its own.
    assert len(attached_lines(res.stderr, SYSTEM_REAL)) == 1, res.stderr
    assert calls_of_pid(tmp_path / "rec", proc.pid) == calls_of_client(out)


@pytest.fixture(scope="module")
def linked_in_client(tmp_path_factory):
    """A program that defines SCard* itself, as one linked with pcsc-lite
    >= 2.3.1's static libpcsclite.a does (its functions forward to the
    shared library here: Debian 12 ships no .a)."""
    out = tmp_path_factory.mktemp("static") / "pcsc_client_linked_in"
    subprocess.run(["gcc", "-O0", "-g", "-I/usr/include/PCSC", "-o", str(out),
                    "tests/clients/pcsc_client.c", "tests/clients/forwarder.c",
                    "-lpcsclite", "-lpthread", "-ldl"], check=True)
    return str(out)


def test_program_with_scard_functions_linked_in(stack, tracer, linked_in_client):
    # --lib EXECUTABLE: only the program's own SCard* functions are probed.
    t = tracer("-n", "--lib", linked_in_client)
    run = stack.run([linked_in_client, "all"])
    assert run.returncode == 0, run.stderr
    res = t.stop()
    assert calls_of(res.stdout) == calls_of_client(run.stdout)

    # -p PID: the program and the library it maps, each call once.
    proc = held(stack, [linked_in_client, "wait-then-run"])
    t = tracer("-n", "-p", proc.pid)
    assert linked_in_client in t.stderr_so_far
    out = release(proc)
    res = t.stop()
    assert calls_of(res.stdout) == calls_of_client(out)


def test_a_function_another_probe_holds_is_said_and_the_others_traced(stack, client_bin,
                                                                     tracer, tmp_path):
    """The kernel refuses a second uprobe on an address whose uprobe has another
    USDT semaphore offset (ref_ctr_offset): as a probe of another tool, here
    registered by the test, would.  The tracer names the function it cannot
    probe and traces the 17 others."""
    from bcc import BPF

    from ebpf_pcsc import kheaders, targets, uprobes
    kheaders.ensure(lambda message: None)
    d = tmp_path / "copy"
    d.mkdir()
    copy = str(d / "libpcsclite.so.1")
    shutil.copy(SYSTEM_REAL, copy)
    offset = uprobes.file_offsets(copy, targets.function_addresses(copy))["SCardTransmit"]
    other = BPF(text=b"int f(void *ctx) { return 0; }")
    fd = uprobes.attach_perf(other.load_func(b"f", BPF.KPROBE).fd, copy, offset,
                             ref_ctr_offset=8)   # in the ELF header: nobody maps this copy
    try:
        t = tracer("-n", "--lib", copy)
        assert re.search(r"^pcsc-ebpf-spy: cannot probe SCardTransmit in %s \(.*\): its calls "
                         r"are not traced$" % re.escape(copy), t.stderr_so_far, re.M)
        assert "Tracing 17 PC/SC functions in %s..." % copy in t.stderr_so_far
        res = t.stop()
        assert res.returncode == 0, res.stderr
    finally:
        os.close(fd)
        other.cleanup()


# Loads and unloads libpcsclite N times (each time the loader reports the
# change, before and after: ~4 records), then, on a line on stdin, calls it.
LOAD_MANY = r"""
import ctypes, sys, _ctypes
print("ready", flush=True)
sys.stdin.readline()
for _ in range(int(sys.argv[1])):
    _ctypes.dlclose(ctypes.CDLL("libpcsclite.so.1")._handle)
print("loaded", flush=True)
sys.stdin.readline()
lib = ctypes.CDLL("libpcsclite.so.1")
ctx = ctypes.c_ulong()
print(lib.SCardEstablishContext(2, None, None, ctypes.byref(ctx)), flush=True)
lib.SCardReleaseContext(ctx)
"""


def test_lost_library_loads_are_said_and_every_process_looked_at_again(stack, tracer):
    """The library-load reports have their own small buffer: a tracer that
    cannot read it (stopped here) loses some, says so, looks at every traced
    process again, and still traces the next calls."""
    # As many load-unload cycles as the buffer holds records (a cycle makes
    # ~4), whatever the CPU count it is sized by.
    ring_bytes = Capture._ring_pages(LOADS_PAGES) * mmap.PAGESIZE
    cycles = ring_bytes // (ctypes.sizeof(Head) + RINGBUF_HEADER_SIZE)
    proc = subprocess.Popen(["/usr/bin/python3", "-c", LOAD_MANY, str(cycles)], env=stack.env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == "ready\n"
        t = tracer("-n", "-p", proc.pid)
        t.proc.send_signal(signal.SIGSTOP)
        try:
            proc.stdin.write("go\n")
            proc.stdin.flush()
            assert proc.stdout.readline() == "loaded\n"
        finally:
            t.proc.send_signal(signal.SIGCONT)
        wait_for(lambda: "library loads were lost" in t.stderr_so_far,
                 "the tracer to say it lost library loads", timeout=60)
        proc.stdin.write("call\n")
        proc.stdin.flush()
        assert proc.stdout.readline() == "0\n"
        proc.stdin.close()
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    res = t.stop()
    assert ("pcsc-ebpf-spy: library loads were lost (the buffer was full): "
            "looking at every process\n") in res.stderr
    assert [name for name, _ in calls_of(res.stdout)] == ["SCardEstablishContext",
                                                          "SCardReleaseContext"]
