"""How the tracer behaves, end to end: byte-exact extended APDUs, a NULL
pioRecvPci, a blocked call shown as soon as it starts, a process killed
inside a call, the signals that end a session, what goes to stdout and
stderr, colours on a terminal, thread prefixes and indentation."""
import os
import pty
import re
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import pytest

from testbed import PYTHON, TESTS_DIR
from tracer import ROOT, START_TIMEOUT, command

# -- reading a trace -------------------------------------------------------------

NAME = re.compile(r"^SCard[A-Za-z]+$")
LABEL = re.compile(r"^\[pid (\d+) tid (\d+) (.*)\]$")
RV = re.compile(r"\[(0x[0-9A-F]{8})\]\)  \[[\d.?]+\]$")
HEADER = re.compile(r"^Thread (\d+)/(\d+)(?: \(pid (\d+) tid (\d+) (.*)\))?$", re.M)
HEXDUMP = re.compile(r"^ [io]  ([0-9A-F]{4}) (.{47}) ")


@dataclass
class TracedCall:
    thread: int               # the thread's number in the trace (indentation / 4)
    name: str
    lines: List[str] = field(default_factory=list)   # " i ...", " o ..."
    result: Optional[str] = None                      # the " => ..." line
    rv: Optional[str] = None  # "0x...", None while the call has not returned

    def buffer(self, label: str) -> bytes:
        """The bytes of a hexdumped buffer (" i bSendBuffer" and the lines after)."""
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
class Trace:
    calls: List[TracedCall]
    labels: Dict[int, tuple]
    headers: List[tuple]          # summary: (n, N, pid, tid, comm), n 1-based

    def calls_of_pid(self, pid):
        threads = {int(h[0]) - 1 for h in self.headers if h[2] and int(h[2]) == pid}
        return [c for c in self.calls if c.thread in threads]


def parse_trace(text: str) -> Trace:
    """The calls of a trace (in the order they started), grouped by thread
    through their indentation (4 spaces per thread), the `[pid tid comm]`
    label lines and the summary's thread headers."""
    body, sep, summary = text.partition("\nThread 1/")
    calls, labels, running = [], {}, {}
    for line in body.splitlines():
        if not line.strip():
            continue
        lead = len(line) - len(line.lstrip(" "))
        thread = lead // 4
        rest = line[4 * thread:]
        tag = re.match(r"^ \(t(\d+)\) ", rest)
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
            running[thread].result = rest
            running[thread].rv = RV.search(rest).group(1)
        elif rest[:3] in (" i ", " o "):
            running[thread].lines.append(rest)
    headers = HEADER.findall("Thread 1/" + summary) if sep else []
    return Trace(calls, labels, headers)


def calls_of_client(stdout: str):
    """What pcsc_client printed: (function, rv) per call."""
    return [tuple(line.split(" rv=")) for line in stdout.splitlines() if " rv=" in line]


def names_and_rvs(calls):
    return [(c.name, c.rv) for c in calls]


def wait_for(predicate, what, timeout=30.0):
    """Poll until predicate() is true (a deadline against hangs, not a timing check)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for " + what)
        time.sleep(0.02)


# -- a tracer whose stdout the test reads while it runs ----------------------------------

class LiveTracer:
    """pcsc-ebpf-spy with stdout on a file descriptor the test owns (a file
    it can read at any time, or a pty), stderr collected line by line."""

    def __init__(self, *args, stdout):
        self.err_lines = []
        self.proc = subprocess.Popen(command(*args), cwd=ROOT, stdin=subprocess.DEVNULL,
                                     stdout=stdout, stderr=subprocess.PIPE, text=True)
        ready = threading.Event()

        def read_stderr():
            for line in self.proc.stderr:
                self.err_lines.append(line)
                if line.startswith("Tracing"):
                    ready.set()

        self._reader = threading.Thread(target=read_stderr, daemon=True)
        self._reader.start()
        deadline = time.monotonic() + START_TIMEOUT
        while not ready.wait(0.05):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                self._reader.join(5)
                raise RuntimeError("tracer did not start:\n" + self.stderr)

    @property
    def stderr(self) -> str:
        return "".join(self.err_lines)

    def stop(self, sig=signal.SIGINT, settle=0.3):
        time.sleep(settle)  # let the last events arrive
        self.proc.send_signal(sig)
        code = self.proc.wait(30)
        self._reader.join(5)
        return code

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def live_tracer():
    started = []

    def start(*args, stdout):
        t = LiveTracer(*args, stdout=stdout)
        started.append(t)
        return t

    yield start
    for t in started:
        t.kill()


@pytest.fixture
def procs():
    """Processes a test starts; any still running at the end is killed."""
    started = []
    yield started
    for p in started:
        if p.poll() is None:
            p.kill()
            p.wait()


# A client whose second thread blocks in SCardGetStatusChange(INFINITE) until
# the test writes a line on stdin (then SCardCancel).  It prints the blocked
# thread's tid before the call.
BLOCKER = r"""
import ctypes, sys, threading
sys.path.insert(0, sys.argv[1])
import pcsc_ctypes_client as pc

pc.lib.SCardCancel.argtypes = [pc.SCARDCONTEXT]
pc.lib.SCardCancel.restype = pc.LONG
ctx = pc.Context()
reader = ctx.list_readers()[0]
state, _ = ctx.get_status(reader)
rs = pc.SCARD_READERSTATE(szReader=reader.encode(),
                          dwCurrentState=state & 0xFFFF & ~pc.SCARD_STATE_CHANGED)
result, started = {}, threading.Event()

def block():
    result["tid"] = threading.get_native_id()
    started.set()
    result["rv"] = pc.lib.SCardGetStatusChange(ctx.handle, 0xFFFFFFFF, ctypes.byref(rs), 1)

th = threading.Thread(target=block)
th.start()
started.wait()
print("tid", result["tid"], flush=True)
sys.stdin.readline()
cancel = pc.lib.SCardCancel(ctx.handle) & 0xFFFFFFFF
th.join()
print("SCardGetStatusChange rv=0x%08X" % (result["rv"] & 0xFFFFFFFF))
print("SCardCancel rv=0x%08X" % cancel)
ctx.release()
"""

# The blocked call's name and input lines (-d masks the context handle).
BLOCKED_INPUT = [
    " i hContext: 0x????",
    " i dwTimeout: 0xFFFFFFFF (4294967295)",
    " i cReaders: 1",
    " i szReader: Virtual PCD 00 00",
    " i  dwCurrentState: SCARD_STATE_PRESENT (0x00000020)",
    " i  dwEventState:  (0x00000000)",
    " i  Atr length: 0x00000000 (0)",
    " i  Atr: ",
]


def start_blocker(stack, procs):
    p = subprocess.Popen([PYTHON, "-c", BLOCKER, str(TESTS_DIR)], env=stack.env,
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    procs.append(p)
    line = p.stdout.readline()
    assert line.startswith("tid "), p.stderr.read() if not line else line
    return p, int(line.split()[1])


def blocked_call(trace_text):
    """The SCardGetStatusChange(INFINITE) of a trace, once all its input lines are there."""
    for call in parse_trace(trace_text).calls:
        if call.name == "SCardGetStatusChange" and call.lines[:len(BLOCKED_INPUT)] == BLOCKED_INPUT:
            return call
    return None


# -- data ---------------------------------------------------------------------------

def test_extended_apdu_of_65k_is_byte_exact(stack, client_bin, tracer):
    t = tracer("-n")
    run = stack.run([client_bin, "extended65k"])
    assert run.returncode == 0, run.stderr
    assert "echo ok" in run.stdout
    res = t.stop()
    assert res.returncode == 0, res.stderr
    trace = parse_trace(res.stdout)
    assert names_and_rvs(trace.calls) == calls_of_client(run.stdout)
    (transmit,) = [c for c in trace.calls if c.name == "SCardTransmit"]
    data = bytes((i * 7) & 0xFF for i in range(65000))
    command_apdu = bytes.fromhex("80 10 00 00 00 FD E8") + data
    assert len(command_apdu) == 65007
    assert " i bSendLength 0x0000FDEF (65007)" in transmit.lines
    assert transmit.buffer(" i bSendBuffer") == command_apdu
    assert " o bRecvLength 0x0000FDEA (65002)" in transmit.lines
    assert transmit.buffer(" o bRecvBuffer") == data + b"\x90\x00"


def test_extended_apdu_of_4k_in_the_tour_is_byte_exact(stack, client_bin, tracer):
    t = tracer("-n")
    run = stack.run([client_bin, "all"])
    assert run.returncode == 0, run.stderr
    res = t.stop()
    assert res.returncode == 0, res.stderr
    trace = parse_trace(res.stdout)
    assert names_and_rvs(trace.calls) == calls_of_client(run.stdout)
    echo = [c for c in trace.calls if c.name == "SCardTransmit"][2]
    data = bytes(i & 0xFF for i in range(4096))
    assert " i bSendLength 0x00001007 (4103)" in echo.lines
    assert echo.buffer(" i bSendBuffer") == bytes.fromhex("80 10 00 00 00 10 00") + data
    assert " o bRecvLength 0x00001002 (4098)" in echo.lines
    assert echo.buffer(" o bRecvBuffer") == data + b"\x90\x00"


def test_null_pioRecvPci(stack, client_bin, tracer):
    t = tracer("-n")
    run = stack.run([client_bin, "nullrecvpci"])
    assert run.returncode == 0, run.stderr  # the traced application is not disturbed
    res = t.stop()
    assert res.returncode == 0, res.stderr
    trace = parse_trace(res.stdout)
    assert names_and_rvs(trace.calls) == calls_of_client(run.stdout)
    (transmit,) = [c for c in trace.calls if c.name == "SCardTransmit"]
    assert " o pioRecvPci.dwProtocol: NULL" in transmit.lines
    assert " o pioRecvPci.cbPciLength: NULL" in transmit.lines
    assert transmit.buffer(" o bRecvBuffer")[-2:] == b"\x90\x00"


# -- blocking calls -----------------------------------------------------------------------

def test_blocked_call_is_shown_when_it_starts(stack, live_tracer, procs, tmp_path):
    out = tmp_path / "trace"
    with open(out, "w") as f:
        t = live_tracer("-n", "-d", stdout=f)
    blocker, tid = start_blocker(stack, procs)
    # stdout is a file here, not a terminal: the lines must still be written at once
    wait_for(lambda: blocked_call(out.read_text()) is not None,
             "the blocked SCardGetStatusChange's input lines in the trace")
    assert blocked_call(out.read_text()).rv is None  # still blocked
    assert blocker.poll() is None
    bout, berr = blocker.communicate("\n", timeout=30)
    assert blocker.returncode == 0, berr
    assert calls_of_client(bout) == [("SCardGetStatusChange", "0x80100002"),
                                     ("SCardCancel", "0x00000000")]
    assert t.stop() == 0, t.stderr
    trace = parse_trace(out.read_text())
    call = blocked_call(out.read_text())
    assert call.thread == 1
    assert call.rv == "0x80100002" and "SCARD_E_CANCELLED" in call.result
    assert call.lines[len(BLOCKED_INPUT):][:3] == [
        " o szReader: Virtual PCD 00 00",
        " o  dwCurrentState: SCARD_STATE_PRESENT (0x00000020)",
        " o  dwEventState: SCARD_STATE_PRESENT (0x00010020)"]
    cancels = [c for c in trace.calls if c.name == "SCardCancel"]
    assert names_and_rvs(cancels) == [("SCardCancel", "0x00000000")]
    assert cancels[0].thread == 0
    assert trace.calls.index(call) < trace.calls.index(cancels[0])


def test_blocked_scenario_of_the_c_client(stack, client_bin, tracer):
    t = tracer("-n")
    run = stack.run([client_bin, "blocked"])
    assert run.returncode == 0, run.stderr
    res = t.stop()
    assert res.returncode == 0, res.stderr
    trace = parse_trace(res.stdout)
    assert sorted(names_and_rvs(trace.calls)) == sorted(calls_of_client(run.stdout))
    (blocked,) = [c for c in trace.calls if c.thread == 1]
    assert blocked.name == "SCardGetStatusChange"
    assert " i dwTimeout: 0xFFFFFFFF (4294967295)" in blocked.lines
    assert blocked.rv == "0x80100002" and "SCARD_E_CANCELLED" in blocked.result
    main = [c.name for c in trace.calls if c.thread == 0]
    assert main[-2:] == ["SCardCancel", "SCardReleaseContext"]
    # the blocked call started before SCardCancel was called
    assert trace.calls.index(blocked) < [c.name for c in trace.calls].index("SCardCancel")


def test_process_killed_inside_a_call(stack, client_bin, live_tracer, procs, tmp_path):
    out = tmp_path / "trace"
    with open(out, "w") as f:
        t = live_tracer("-n", "-d", stdout=f)
    blocker, tid = start_blocker(stack, procs)
    wait_for(lambda: blocked_call(out.read_text()) is not None,
             "the blocked SCardGetStatusChange in the trace")
    blocker.kill()
    blocker.wait()
    ended = re.compile(r"^pcsc-ebpf-spy: SCardGetStatusChange: pid %d tid %d \(.*\) "
                       r"ended inside the call$" % (blocker.pid, tid), re.M)
    wait_for(lambda: ended.search(t.stderr), "the tracer to report the call ended")
    # the tracer goes on: the next client is traced normally
    run = stack.run([client_bin, "all"])
    assert run.returncode == 0, run.stderr
    assert t.stop() == 0, t.stderr
    assert len(ended.findall(t.stderr)) == 1
    assert "had not returned" not in t.stderr
    trace = parse_trace(out.read_text())
    killed = trace.calls_of_pid(blocker.pid)
    # the blocker's calls: all returned but the one it died in, which has no result
    assert [c.name for c in killed if c.rv is None] == ["SCardGetStatusChange"]
    (dead,) = [c for c in killed if c.rv is None]
    assert dead.lines == BLOCKED_INPUT and dead.thread == 1
    # after a process that died mid-call, the next one is complete
    client_pid = int(trace.headers[-1][2])
    assert client_pid != blocker.pid
    assert names_and_rvs(trace.calls_of_pid(client_pid)) == calls_of_client(run.stdout)


# -- ending a session ----------------------------------------------------------------------

@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_ends_with_the_summary(stack, client_bin, tracer, sig):
    t = tracer("-n")
    run = stack.run([client_bin, "all"])
    assert run.returncode == 0, run.stderr
    res = t.stop(sig)
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr
    trace = parse_trace(res.stdout)
    assert names_and_rvs(trace.calls) == calls_of_client(run.stdout)
    assert "\nThread 1/1\nResults sorted by total execution time\ntotal time: " in res.stdout
    assert re.search(r"^\d+\.\d{6} sec \(  3 calls\) +\d+\.\d\d% SCardTransmit$",
                     res.stdout, re.M)


BACKGROUND = r"""
"$@" > "$DIR/trace" 2> "$DIR/err" &
spy=$!
sleep 1000 & probe=$!       # another background job, to show its signal dispositions
grep '^SigIgn:' /proc/$probe/status > "$DIR/sigign"
kill $probe
for i in $(seq 1200); do
    grep -q '^Tracing' "$DIR/err" && break
    kill -0 $spy 2>/dev/null || break
    sleep 0.05
done
"$CLIENT" all > "$DIR/client"
sleep 0.3
kill -INT $spy
wait $spy
echo $? > "$DIR/rc"
"""


def test_sigint_ends_a_tracer_started_in_the_background_of_a_script(stack, client_bin, tmp_path):
    env = dict(stack.env, DIR=str(tmp_path), CLIENT=client_bin)
    subprocess.run(["bash", "-c", BACKGROUND, "bash", *command("-n")], cwd=ROOT, env=env,
                   timeout=180, check=True, stdin=subprocess.DEVNULL)
    # the premise: a background job of a script starts with SIGINT ignored
    assert int((tmp_path / "sigign").read_text().split()[1], 16) & (1 << (signal.SIGINT - 1))
    err = (tmp_path / "err").read_text()
    assert (tmp_path / "rc").read_text().strip() == "0", err
    trace_text = (tmp_path / "trace").read_text()
    trace = parse_trace(trace_text)
    assert names_and_rvs(trace.calls) == calls_of_client((tmp_path / "client").read_text())
    assert "\nThread 1/1\nResults sorted by total execution time\n" in trace_text


def test_stdout_carries_only_the_trace(stack, client_bin, tracer):
    t = tracer("-n")
    run = stack.run([client_bin, "all"])
    assert run.returncode == 0, run.stderr
    res = t.stop()
    assert res.returncode == 0, res.stderr
    assert "Tracing 18 PC/SC functions in " in res.stderr
    assert res.stdout.startswith("SCardEstablishContext\n i dwScope: ")
    body, _, summary = res.stdout.partition("\n\nThread 1/1\n")
    assert summary.startswith("Results sorted by total execution time\ntotal time: ")
    for line in body.splitlines():  # calls only: names, arguments, results
        assert NAME.match(line) or line.startswith((" i ", " o ", " => ")), line
    assert "Tracing" not in res.stdout and "pcsc-ebpf-spy" not in res.stdout


# -- presentation --------------------------------------------------------------------------

BLUE, GREEN, MAGENTA, RED, NORMAL = "\x1b[34m", "\x1b[32m", "\x1b[35m", "\x1b[01;31m", "\x1b[0m"


def trace_on_a_terminal(stack, client_bin, live_tracer, *args):
    """Run `all` traced with the tracer's stdout on a pty; what it wrote there."""
    master, slave = pty.openpty()
    chunks = []

    def read():
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the other side is closed
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        t = live_tracer(*args, stdout=slave)
    finally:
        os.close(slave)
    run = stack.run([client_bin, "all"])
    assert run.returncode == 0, run.stderr
    assert t.stop() == 0, t.stderr
    reader.join(30)
    os.close(master)
    return b"".join(chunks).decode().replace("\r\n", "\n"), run


def test_colours_on_a_terminal(stack, client_bin, live_tracer):
    text, run = trace_on_a_terminal(stack, client_bin, live_tracer)
    lines = text.splitlines()
    assert lines[0] == BLUE + "SCardEstablishContext" + NORMAL
    assert lines[1] == GREEN + " i dwScope: SCARD_SCOPE_SYSTEM (0x00000002)" + NORMAL
    assert lines[2].startswith(MAGENTA + " o hContext: 0x") and lines[2].endswith(NORMAL)
    assert lines[3].startswith(" => Command successful.")  # success: not coloured
    failed = [l for l in lines if l.startswith(RED + " => ")]
    # GetAttrib x2, SetAttrib, Control fail on vpcd (tests/clients/README.md)
    assert len(failed) == 4, failed
    assert all(re.match(re.escape(RED) + r" => .*\[0x8010001[6F]\]\) " + re.escape(NORMAL)
                        + r" \[\d+\.\d{6}\]$", l) for l in failed), failed
    # and the calls are the same
    plain = re.sub(r"\x1b\[[0-9;]*m", "", text)
    assert names_and_rvs(parse_trace(plain).calls) == calls_of_client(run.stdout)


def test_no_colours_with_n_on_a_terminal(stack, client_bin, live_tracer):
    text, run = trace_on_a_terminal(stack, client_bin, live_tracer, "-n")
    assert "\x1b" not in text
    assert names_and_rvs(parse_trace(text).calls) == calls_of_client(run.stdout)


def test_no_colours_when_stdout_is_not_a_terminal(stack, client_bin, tracer):
    t = tracer()
    run = stack.run([client_bin, "all"])
    assert run.returncode == 0, run.stderr
    res = t.stop()
    assert res.returncode == 0, res.stderr
    assert "\x1b" not in res.stdout


WORKER = ["SCardEstablishContext", "SCardConnect"] + ["SCardTransmit"] * 3 + \
    ["SCardDisconnect", "SCardReleaseContext"]


def threads_trace(stack, client_bin, tracer, *args):
    t = tracer("-n", *args)
    run = stack.run([client_bin, "threads", "2", "3"])
    assert run.returncode == 0, run.stderr
    res = t.stop()
    assert res.returncode == 0, res.stderr
    return res.stdout, run


def check_threads(text, run, prefix):
    """Three threads (main + 2 workers), each line indented by 4 spaces per
    thread number, then prefix(n)."""
    trace = parse_trace(text)
    assert [h[:2] for h in trace.headers] == [("1", "3"), ("2", "3"), ("3", "3")]
    assert sorted(names_and_rvs(trace.calls)) == sorted(calls_of_client(run.stdout))
    per_thread = {n: [c.name for c in trace.calls if c.thread == n] for n in range(3)}
    assert per_thread == {0: ["SCardEstablishContext", "SCardListReaders", "SCardReleaseContext"],
                          1: WORKER, 2: WORKER}
    body = text.partition("\n\nThread 1/3\n")[0]
    counts = {0: 0, 1: 0, 2: 0}
    for line in body.splitlines():
        n = (len(line) - len(line.lstrip(" "))) // 4
        head = " " * (4 * n) + prefix(n)
        assert line.startswith(head), line
        rest = line[len(head):]
        assert NAME.match(rest) or rest.startswith((" i ", " o ", " => ")), line
        counts[n] += 1
    assert all(counts.values())


def test_threads_indented_by_4_spaces_each(stack, client_bin, tracer):
    text, run = threads_trace(stack, client_bin, tracer)
    check_threads(text, run, lambda n: "")


def test_t_prefixes_the_thread_number(stack, client_bin, tracer):
    text, run = threads_trace(stack, client_bin, tracer, "-t")
    assert text.startswith(" (t0) SCardEstablishContext\n (t0)  i dwScope: ")
    check_threads(text, run, lambda n: " (t%d) " % n)
