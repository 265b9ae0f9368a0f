"""What gets traced, end to end: every process system-wide (whether it links
libpcsclite or dlopen()s it, started before or after the tracer), several
processes at once with each call attributed, -p (running processes only,
filtered in the kernel; also one that has not loaded the library yet), and
--lib.

System-wide traces may also hold the calls of PC/SC applications that are
not ours (another test run on the machine): the checks pick our processes'
calls by pid.
"""
import os
import re
import subprocess

from processes import finish, held, start_waiting_client, stopped, wait_for
from testbed import PYTHON, TESTS_DIR
from tracetext import calls_of_client, names_and_rvs, parse_trace

SYSTEM_LIB = "/usr/lib/x86_64-linux-gnu/libpcsclite.so.1"
REAL_LIB = os.path.realpath(SYSTEM_LIB)
CTYPES_CLIENT = str(TESTS_DIR / "pcsc_ctypes_client.py")
DEMO_CALLS = [(name, "0x00000000") for name in (
    "SCardEstablishContext", "SCardListReaders", "SCardListReaders", "SCardConnect",
    "SCardTransmit", "SCardTransmit", "SCardDisconnect", "SCardReleaseContext")]

# -- processes ------------------------------------------------------------------

def release(*procs):
    """Let wait-then-run clients go (all at once); wait for them; their output."""
    for p in procs:
        p.stdin.write("\n")
        p.stdin.flush()
    return [finish(p) for p in procs]


# -- system-wide ------------------------------------------------------------------

def test_pcsc_scan_is_traced(spawn, tracer):
    t = tracer("-n")
    scan = spawn(["pcsc_scan", "-r"])  # lists the readers and exits
    assert "Virtual PCD 00 00" in finish(scan)
    trace = stopped(t)
    calls = trace.calls_of(scan.pid)
    names = [c.name for c in calls]
    assert names[0] == "SCardEstablishContext" and names[-1] == "SCardReleaseContext", names
    assert "SCardListReaders" in names
    assert " o mszReaders: Virtual PCD 00 00" in [l for c in calls for l in c.lines]
    assert all(c.rv is not None for c in calls)
    assert [th.comm for th in trace.threads_of(scan.pid)] in (["pcsc_scan"], [None])


def test_opensc_tool_which_dlopens_the_library_is_traced(spawn, tracer):
    ldd = subprocess.run(["ldd", "/usr/bin/opensc-tool"], capture_output=True, text=True)
    assert "libpcsclite" not in ldd.stdout  # the premise: opensc dlopen()s it
    t = tracer("-n")
    tool = spawn(["opensc-tool", "-a"])
    assert "3b:80:80:01:01" in finish(tool)
    trace = stopped(t)
    calls = trace.calls_of(tool.pid)
    assert {"SCardEstablishContext", "SCardListReaders", "SCardConnect",
            "SCardReleaseContext"} <= {c.name for c in calls}
    connects = [c for c in calls if c.name == "SCardConnect" and c.rv == "0x00000000"]
    assert connects and " i szReader Virtual PCD 00 00" in connects[0].lines
    assert all(c.rv is not None for c in calls)


def test_python_ctypes_client_is_traced(spawn, tracer):
    t = tracer("-n")
    demo = spawn([PYTHON, CTYPES_CLIENT, "demo"])
    finish(demo)
    trace = stopped(t)
    calls = trace.calls_of(demo.pid)
    assert names_and_rvs(calls) == DEMO_CALLS
    transmits = [c for c in calls if c.name == "SCardTransmit"]
    assert " i  0000 00 A4 04 00 07 A0 00 00 03 08 00 00             ............" \
        in transmits[0].lines
    assert " o  0000 00 01 02 03 04 05 06 07 90 00                   .........." \
        in transmits[1].lines


def test_process_started_after_the_tracer_is_traced(spawn, client_bin, tracer):
    t = tracer("-n")
    client = spawn([client_bin, "all"])
    out = finish(client)
    assert names_and_rvs(stopped(t).calls_of(client.pid)) == calls_of_client(out)


def test_process_running_before_the_tracer_is_traced(spawn, client_bin, tracer):
    client = start_waiting_client(spawn, client_bin)
    t = tracer("-n")
    (out,) = release(client)
    assert names_and_rvs(stopped(t).calls_of(client.pid)) == calls_of_client(out)


# -- several processes at once ------------------------------------------------------

def test_two_processes_at_once_every_call_attributed(spawn, client_bin, tracer):
    t = tracer("-n")
    # A: EstablishContext, then sleeps; B (three threads) makes its calls meanwhile
    a = spawn([client_bin, "sleep", 1000])
    first = a.stdout.readline()  # flushed before the sleep: A's first call is done
    assert first.startswith("SCardEstablishContext rv=")
    b = spawn([client_bin, "threads", 2, 3])
    b_out = finish(b)
    a_out = first + finish(a)
    res = t.stop()
    assert res.returncode == 0, res.stderr
    trace = parse_trace(res.stdout)

    # the summary: a section per thread, naming its process, thread and command
    a_threads, b_threads = trace.threads_of(a.pid), trace.threads_of(b.pid)
    assert [(th.tid, th.comm) for th in a_threads] == [(a.pid, "pcsc_client")]
    assert [th.comm for th in b_threads] == ["pcsc_client"] * 3
    assert b_threads[0].tid == b.pid and len({th.tid for th in b_threads}) == 3
    assert a_threads[0].number < b_threads[0].number  # numbered in order of first call

    # every call is in a thread of its process; the calls (so the counts) of
    # each process are what it printed
    a_calls, b_calls = trace.calls_of(a.pid), trace.calls_of(b.pid)
    assert names_and_rvs(a_calls) == calls_of_client(a_out)
    assert len(b_calls) == len(calls_of_client(b_out)) == 3 + 2 * 7
    assert sorted(names_and_rvs(b_calls)) == sorted(calls_of_client(b_out))

    # once two processes are traced, each thread's first call comes after a
    # line naming it (A's too, unless A was the very first thread traced)
    lines = res.stdout.splitlines()
    for th in a_threads + b_threads:
        label = "%s[pid %d tid %d pcsc_client]" % (" " * 4 * th.number, th.pid, th.tid)
        if th is a_threads[0] and th.number == 0:
            assert label not in lines
            continue
        assert trace.labels[th.number] == (th.pid, th.tid, "pcsc_client")
        assert lines[lines.index(label) + 1] == " " * 4 * th.number + "SCardEstablishContext"


# -- -p PID -----------------------------------------------------------------------------
# Two `all` clients must not run at the same time: its SCardReconnect resets the
# card under the other one.  The clients that run alongside make no card call.

def test_pid_traces_that_process_only(spawn, client_bin, tracer):
    a = start_waiting_client(spawn, client_bin)
    b = start_waiting_client(spawn, client_bin)
    t = tracer("-n", "-p", a.pid)
    # the library as the process maps it (the real file, not the symlink)
    assert "Tracing 18 PC/SC functions in %s (pid %d)" % (REAL_LIB, a.pid) in t.stderr_so_far
    c = spawn([client_bin, "isvalid", 200])  # started after the tracer
    (out_a,) = release(a)  # while C runs
    (out_b,) = release(b)  # B was running before the tracer; it calls after A
    out_c = finish(c)
    trace = stopped(t)
    assert names_and_rvs(trace.calls) == calls_of_client(out_a)
    assert len(calls_of_client(out_b)) == len(calls_of_client(out_a))
    assert len(calls_of_client(out_c)) == 202
    assert [(th.number, th.pid) for th in trace.threads] == [(0, None)]  # A's thread only
    assert not trace.labels


def test_repeated_pid_traces_those_processes_only(spawn, client_bin, tracer):
    a = start_waiting_client(spawn, client_bin)
    b = start_waiting_client(spawn, client_bin)
    c = start_waiting_client(spawn, client_bin)
    t = tracer("-n", "-p", a.pid, "-p", b.pid)
    tracing = t.stderr_so_far.splitlines()[-1]
    assert tracing.startswith("Tracing 18 PC/SC functions in %s (pid " % REAL_LIB)
    assert re.search(r"\(pid .*\b%d\b" % a.pid, tracing) and \
        re.search(r"\(pid .*\b%d\b" % b.pid, tracing), tracing
    d = spawn([client_bin, "sleep", 1000])  # running while B calls
    (out_a,) = release(a)
    (out_b,) = release(b)
    (out_c,) = release(c)
    out_d = finish(d)
    trace = stopped(t)
    assert [(th.pid, th.tid) for th in trace.threads] == [(a.pid, a.pid), (b.pid, b.pid)]
    assert names_and_rvs(trace.calls_of(a.pid)) == calls_of_client(out_a)
    assert names_and_rvs(trace.calls_of(b.pid)) == calls_of_client(out_b)
    assert len(trace.calls) == len(calls_of_client(out_a)) + len(calls_of_client(out_b))
    assert calls_of_client(out_c) and calls_of_client(out_d)  # they did call, untraced
    assert trace.labels == {1: (b.pid, b.pid, "pcsc_client")}


def test_pid_stays_traced_when_its_main_thread_ends_first(spawn, client_bin, tracer):
    """-p: a process is traced until its last thread ends, not its main one.
    Here the main thread ends (pthread_exit), then another thread makes its
    calls: they are traced, and the tracer ends by itself once that thread
    has ended the process.  (The kernel side used to forget the pid when the
    main thread ended, and the tracer took the zombie main thread for the
    process's end.)"""
    p = held(spawn, client_bin, "main-exits-first")
    t = tracer("-n", "-p", p.pid, "--lib", SYSTEM_LIB)
    # One line runs the client; the other thread reads the second once the
    # main thread has ended.
    out = finish(p, "\n\n")
    assert calls_of_client(out) == [("SCardEstablishContext", "0x00000000"),
                                    ("SCardIsValidContext", "0x00000000"),
                                    ("SCardReleaseContext", "0x00000000")]
    wait_for(lambda: "have ended" in t.stderr_so_far, "the tracer to see the process end")
    res = t.stop()
    assert res.returncode == 0, res.stderr
    trace = parse_trace(res.stdout)
    assert names_and_rvs(trace.calls) == calls_of_client(out)
    (thread,) = trace.threads
    assert thread.tid != p.pid   # not the main thread's calls


def _thread_state(pid: int, tid: int) -> str:
    with open("/proc/%d/task/%d/stat" % (pid, tid)) as f:
        stat = f.read()
    return stat[stat.rindex(")") + 2]


def test_the_kernel_forgets_a_process_with_its_last_thread(spawn, client_bin):
    """The kernel side's list of traced processes keeps a process whose main
    thread has ended while another thread runs, and drops it when that one
    ends the process (its pid may then be given to another process)."""
    from ebpf_pcsc import kheaders, targets
    from ebpf_pcsc.capture import Capture
    from ebpf_pcsc.functions import FUNCTIONS
    kheaders.ensure(lambda message: None)
    p = held(spawn, client_bin, "main-exits-first")
    capture = Capture(FUNCTIONS, [targets.for_path(SYSTEM_LIB)], pids=[p.pid])
    capture.start(lambda count: None)
    try:
        assert capture.traced_pids() == [p.pid]
        p.stdin.write("\n")
        p.stdin.flush()
        # The main thread ends at once; the other one waits for a line.
        wait_for(lambda: _thread_state(p.pid, p.pid) == "Z", "the main thread to end")
        assert capture.traced_pids() == [p.pid]
        out = finish(p, "\n")
        assert len(calls_of_client(out)) == 3
        assert capture.traced_pids() == []
    finally:
        capture.close()


DLOPEN_LATER = """
import sys
print("ready", flush=True)
sys.stdin.readline()
sys.path.insert(0, sys.argv[1])
import pcsc_ctypes_client  # dlopen()s libpcsclite.so.1 now
sys.exit(pcsc_ctypes_client.main(["demo"]))
"""


def test_pid_of_a_process_that_loads_the_library_later(spawn, tracer):
    p = spawn([PYTHON, "-c", DLOPEN_LATER, TESTS_DIR], stdin=True)
    assert p.stdout.readline() == "ready\n"
    with open("/proc/%d/maps" % p.pid) as f:
        assert "libpcsclite" not in f.read()  # the premise
    t = tracer("-n", "-p", p.pid)
    err = t.stderr_so_far.splitlines()
    assert "pcsc-ebpf-spy: process %d has not loaded libpcsclite yet: tracing it once it loads" \
        % p.pid in "\n".join(err)
    assert err[-1].startswith("Tracing ") and "(pid %d)" % p.pid in err[-1]
    finish(p, "\n")
    assert names_and_rvs(stopped(t).calls) == DEMO_CALLS


def test_pid_of_a_shell_that_execs_a_client_later(spawn, client_bin, tracer):
    p = held(spawn, client_bin, "all")
    t = tracer("-n", "-p", p.pid)
    assert "process %d has not loaded libpcsclite yet" % p.pid in t.stderr_so_far
    out = finish(p, "\n")  # same pid, now pcsc_client
    assert names_and_rvs(stopped(t).calls) == calls_of_client(out)


# -- --lib PATH ---------------------------------------------------------------------------

def test_lib_with_the_system_librarys_real_path(spawn, client_bin, tracer):
    assert REAL_LIB != SYSTEM_LIB  # libpcsclite.so.1 -> libpcsclite.so.1.0.0
    t = tracer("-n", "--lib", REAL_LIB)
    tracing = [l for l in t.stderr_so_far.splitlines() if l.startswith("Tracing")]
    assert tracing == ["Tracing 18 PC/SC functions in %s... Hit Ctrl-C to end." % REAL_LIB]
    client = spawn([client_bin, "all"])
    out = finish(client)
    assert names_and_rvs(stopped(t).calls_of(client.pid)) == calls_of_client(out)
