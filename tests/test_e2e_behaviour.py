"""How the tracer behaves, end to end: byte-exact extended APDUs, a NULL
pioRecvPci, a blocked call shown as soon as it starts, a process killed
inside a call, the signals that end a session, what goes to stdout and
stderr, colours on a terminal, thread prefixes and indentation.

System-wide traces may also hold the calls of PC/SC applications that are
not ours (another test run on the machine): the checks pick our processes'
calls by pid, and the tests about the exact text trace with -p.
"""
import os
import pty
import re
import signal
import subprocess
import threading
import time

import pytest

from processes import finish, held, start_waiting_client, stopped, wait_for
from testbed import PYTHON, TESTS_DIR
from tracer import ROOT, START_TIMEOUT, command
from tracetext import NAME, calls_of_client, names_and_rvs, parse_trace


# -- a client traced ------------------------------------------------------------

def traced_alone(spawn, tracer, client_bin, scenario, *tracer_args):
    """Run one client scenario traced with -p (nothing else in the trace):
    (tracer Result, client stdout)."""
    p = held(spawn, client_bin, *scenario)
    t = tracer(*tracer_args, "-p", p.pid)
    out = finish(p, "\n")
    res = t.stop()
    assert res.returncode == 0, res.stderr
    return res, out


def traced(spawn, tracer, argv, *tracer_args):
    """Run argv traced system-wide: (its calls, the whole Trace, its stdout, its pid)."""
    t = tracer("-n", *tracer_args)
    p = spawn(argv)
    out = finish(p)
    trace = stopped(t)
    return trace.calls_of(p.pid), trace, out, p.pid


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


# -- data ---------------------------------------------------------------------------

def test_extended_apdu_of_65k_is_byte_exact(spawn, tracer, client_bin):
    calls, _, out, _ = traced(spawn, tracer, [client_bin, "extended65k"])
    assert "echo ok" in out
    assert names_and_rvs(calls) == calls_of_client(out)
    (transmit,) = [c for c in calls if c.name == "SCardTransmit"]
    data = bytes((i * 7) & 0xFF for i in range(65000))
    command_apdu = bytes.fromhex("80 10 00 00 00 FD E8") + data
    assert len(command_apdu) == 65007
    assert " i bSendLength 0x0000FDEF (65007)" in transmit.lines
    assert " o bRecvLength 0x0000FDEA (65002)" in transmit.lines
    sent, received = transmit.buffer(" i bSendBuffer"), transmit.buffer(" o bRecvBuffer")
    assert len(sent) == 65007 and len(received) == 65002
    assert sent == command_apdu
    assert received == data + b"\x90\x00"


def test_extended_apdu_of_4k_in_the_tour_is_byte_exact(spawn, tracer, client_bin):
    calls, _, out, _ = traced(spawn, tracer, [client_bin, "all"])
    assert names_and_rvs(calls) == calls_of_client(out)
    echo = [c for c in calls if c.name == "SCardTransmit"][2]
    data = bytes(i & 0xFF for i in range(4096))
    assert " i bSendLength 0x00001007 (4103)" in echo.lines
    assert echo.buffer(" i bSendBuffer") == bytes.fromhex("80 10 00 00 00 10 00") + data
    assert " o bRecvLength 0x00001002 (4098)" in echo.lines
    assert echo.buffer(" o bRecvBuffer") == data + b"\x90\x00"


def test_null_pioRecvPci(spawn, tracer, client_bin):
    # finish() checks the traced application exits 0 (pcsc-spy 1.9.9 crashes it)
    calls, _, out, _ = traced(spawn, tracer, [client_bin, "nullrecvpci"])
    assert names_and_rvs(calls) == calls_of_client(out)
    (transmit,) = [c for c in calls if c.name == "SCardTransmit"]
    assert transmit.rv == "0x00000000"
    assert " o pioRecvPci.dwProtocol: NULL" in transmit.lines
    assert " o pioRecvPci.cbPciLength: NULL" in transmit.lines
    assert transmit.buffer(" o bRecvBuffer")[-2:] == b"\x90\x00"


# -- blocking calls -----------------------------------------------------------------------

# A client whose second thread blocks in SCardGetStatusChange(INFINITE).  It
# loads libpcsclite, prints "ready" and waits for a line on stdin; then makes
# its calls up to the blocking one and prints the blocked thread's tid; on a
# second line it calls SCardCancel.
BLOCKER = r"""
import ctypes, sys, threading
sys.path.insert(0, sys.argv[1])
import pcsc_ctypes_client as pc

pc.lib.SCardCancel.argtypes = [pc.SCARDCONTEXT]
pc.lib.SCardCancel.restype = pc.LONG
print("ready", flush=True)
sys.stdin.readline()
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

# The blocked call's input lines (-d masks the context handle).
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


def start_blocker(spawn):
    p = spawn([PYTHON, "-c", BLOCKER, TESTS_DIR], stdin=True)
    assert p.stdout.readline() == "ready\n"
    return p


def block(blocker):
    """Let the blocker make its calls; the tid of its blocked thread."""
    blocker.stdin.write("\n")
    blocker.stdin.flush()
    line = blocker.stdout.readline()
    assert line.startswith("tid "), line + blocker.stderr.read()
    return int(line.split()[1])


def blocked_call(trace_text):
    """The SCardGetStatusChange(INFINITE) of a trace, once all its input lines are there."""
    for call in parse_trace(trace_text).calls:
        if call.name == "SCardGetStatusChange" and call.lines[:len(BLOCKED_INPUT)] == BLOCKED_INPUT:
            return call
    return None


def test_blocked_call_is_shown_when_it_starts(spawn, live_tracer, tmp_path):
    blocker = start_blocker(spawn)
    out = tmp_path / "trace"
    with open(out, "w") as f:
        t = live_tracer("-n", "-d", "-p", blocker.pid, stdout=f)
    block(blocker)
    # stdout is a file, not a terminal: still, the lines are written at once
    wait_for(lambda: blocked_call(out.read_text()) is not None,
             "the blocked SCardGetStatusChange and its input lines in the trace file")
    assert blocked_call(out.read_text()).rv is None  # still blocked: no result yet
    assert blocker.poll() is None
    assert calls_of_client(finish(blocker, "\n")) == [("SCardGetStatusChange", "0x80100002"),
                                                      ("SCardCancel", "0x00000000")]
    assert t.stop() == 0, t.stderr
    text = out.read_text()
    trace = parse_trace(text)
    call = blocked_call(text)
    assert call.thread == 1
    assert call.rv == "0x80100002" and "SCARD_E_CANCELLED" in call.result
    assert call.lines[len(BLOCKED_INPUT):][:3] == [
        " o szReader: Virtual PCD 00 00",
        " o  dwCurrentState: SCARD_STATE_PRESENT (0x00000020)",
        " o  dwEventState: SCARD_STATE_PRESENT (0x00010020)"]
    cancels = [c for c in trace.calls if c.name == "SCardCancel"]
    assert [(c.thread, c.rv) for c in cancels] == [(0, "0x00000000")]
    assert trace.calls.index(call) < trace.calls.index(cancels[0])


def test_blocked_scenario_of_the_c_client(spawn, tracer, client_bin):
    calls, trace, out, pid = traced(spawn, tracer, [client_bin, "blocked"])
    assert sorted(names_and_rvs(calls)) == sorted(calls_of_client(out))
    main, second = [th.number for th in trace.threads_of(pid)]
    (blocked,) = [c for c in calls if c.thread == second]
    assert blocked.name == "SCardGetStatusChange"
    assert " i dwTimeout: 0xFFFFFFFF (4294967295)" in blocked.lines
    assert blocked.rv == "0x80100002" and "SCARD_E_CANCELLED" in blocked.result
    main_calls = [c for c in calls if c.thread == main]
    assert names_and_rvs(main_calls[-2:]) == [("SCardCancel", "0x00000000"),
                                              ("SCardReleaseContext", "0x00000000")]
    # the blocked call started before SCardCancel was called
    assert calls.index(blocked) < calls.index(main_calls[-2])


def test_process_killed_inside_a_call(spawn, client_bin, live_tracer, tmp_path):
    blocker = start_blocker(spawn)
    client = start_waiting_client(spawn, client_bin)
    out = tmp_path / "trace"
    with open(out, "w") as f:
        t = live_tracer("-n", "-d", "-p", blocker.pid, "-p", client.pid, stdout=f)
    tid = block(blocker)
    wait_for(lambda: blocked_call(out.read_text()) is not None,
             "the blocked SCardGetStatusChange in the trace")
    blocker.kill()
    blocker.wait()
    ended = re.compile(r"^pcsc-ebpf-spy: SCardGetStatusChange: pid %d tid %d \(.*\) "
                       r"ended inside the call$" % (blocker.pid, tid), re.M)
    wait_for(lambda: ended.search(t.stderr), "the tracer to say the call ended with its thread")
    # the tracer goes on: the next client is traced normally
    client_out = finish(client, "\n")
    assert t.stop() == 0, t.stderr
    assert len(ended.findall(t.stderr)) == 1
    assert "had not returned" not in t.stderr
    trace = parse_trace(out.read_text())
    assert [th.pid for th in trace.threads] == [blocker.pid, blocker.pid, client.pid]
    assert trace.threads[1].tid == tid
    killed = trace.calls_of(blocker.pid)
    assert [c.rv for c in killed][:4] == ["0x00000000"] * 4  # Establish, ListReaders x2, GSC
    (dead,) = [c for c in killed if c.rv is None]
    assert dead.thread == 1 and dead.lines == BLOCKED_INPUT
    assert names_and_rvs(trace.calls_of(client.pid)) == calls_of_client(client_out)


# -- ending a session ----------------------------------------------------------------------

@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_ends_with_the_summary(spawn, tracer, client_bin, sig):
    p = held(spawn, client_bin, "all")
    # A second traced process that outlives the client: tracing goes on
    # until the signal (with -p it would end with the last traced process).
    keeper = spawn(["sleep", "600"])
    t = tracer("-n", "-p", p.pid, "-p", keeper.pid)
    out = finish(p, "\n")
    res = t.stop(sig)
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr
    assert "have ended" not in res.stderr
    assert names_and_rvs(parse_trace(res.stdout).calls) == calls_of_client(out)
    summary = res.stdout.partition("\n\nThread 1/1\n")[2].splitlines()
    assert summary[0] == "Results sorted by total execution time"
    assert re.match(r"^total time: \d+\.\d{6} sec$", summary[1])
    assert len(summary) == 2 + 18  # a line per function: `all` calls each of the 18
    assert re.search(r"^\d+\.\d{6} sec \(  3 calls\) +\d+\.\d\d% SCardTransmit$",
                     res.stdout, re.M)


def running(pid):
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_p_ends_when_the_traced_processes_have_ended(spawn, tracer, client_bin):
    """As strace -p: tracing ends, with the summary and status 0, once the
    -p processes and the processes they started since (followed in the
    kernel) have all ended."""
    p = held(spawn, client_bin, "all")
    # Started after the tracer, the sleep outlives its parent shell.
    parent = spawn(["sh", "-c", "read _; sleep 4 >/dev/null 2>&1 & echo $!"], stdin=True)
    t = tracer("-n", "-p", p.pid, "-p", parent.pid)
    out = finish(p, "\n")
    orphan, _ = parent.communicate("\n", timeout=30)
    assert running(int(orphan))
    time.sleep(1)
    assert t.proc.poll() is None, t.stderr_so_far   # the sleep is still traced
    wait_for(lambda: "have ended" in t.stderr_so_far, "the tracer to see the end")
    # It ends by itself; signals that come while it exits (a script that
    # did not see the end) do not kill it: exit status 0.
    while t.proc.poll() is None:
        t.proc.send_signal(signal.SIGINT)
        time.sleep(0.01)
    code = t.proc.wait(30)
    res = t.stop()
    assert code == 0, res.stderr
    assert not running(int(orphan))   # ended (a zombie until its new parent reaps it)
    assert res.stderr.endswith("pcsc-ebpf-spy: the traced processes have ended\n"), res.stderr
    assert names_and_rvs(parse_trace(res.stdout).calls) == calls_of_client(out)
    assert "\nThread 1/1\n" in res.stdout


BACKGROUND = r"""
"$@" > "$DIR/trace" 2> "$DIR/err" &
spy=$!
sleep 1000 & probe=$!       # another background job, to show its signal dispositions
# ... once it runs sleep: before the exec, the forked shell may not have set
# them all yet (seen: SIGQUIT ignored, SIGINT not yet).
until [ "$(cat /proc/$probe/comm 2>/dev/null)" = sleep ]; do sleep 0.01; done
grep '^SigIgn:' /proc/$probe/status > "$DIR/sigign"
kill $probe
for i in $(seq 1200); do
    grep -q '^Tracing' "$DIR/err" && break
    kill -0 $spy 2>/dev/null || break
    sleep 0.05
done
"$CLIENT" all > "$DIR/client" & client=$!
wait $client
echo $client > "$DIR/client.pid"
sleep 0.3
kill -INT $spy
wait $spy
echo $? > "$DIR/rc"
"""


def test_sigint_ends_a_tracer_started_in_the_background_of_a_script(stack, client_bin, tmp_path):
    env = dict(stack.env, DIR=str(tmp_path), CLIENT=client_bin)
    subprocess.run(["bash", "-c", BACKGROUND, "bash", *command("-n")], cwd=ROOT, env=env,
                   timeout=180, check=True, stdin=subprocess.DEVNULL)
    # the premise: a script's background job starts with SIGINT ignored
    assert int((tmp_path / "sigign").read_text().split()[1], 16) & (1 << (signal.SIGINT - 1))
    err = (tmp_path / "err").read_text()
    assert (tmp_path / "rc").read_text() == "0\n", err
    assert "Traceback" not in err
    text = (tmp_path / "trace").read_text()
    trace = parse_trace(text)
    client_pid = int((tmp_path / "client.pid").read_text())
    assert names_and_rvs(trace.calls_of(client_pid)) == \
        calls_of_client((tmp_path / "client").read_text())
    assert re.search(r"^Thread 1/\d+.*\nResults sorted by total execution time\n", text, re.M)


def test_stdout_carries_only_the_trace(spawn, tracer, client_bin):
    res, out = traced_alone(spawn, tracer, client_bin, ["all"], "-n")
    assert re.search(r"^Tracing 18 PC/SC functions in .*\.\.\. Hit Ctrl-C to end\.$",
                     res.stderr, re.M)
    assert res.stdout.startswith("SCardEstablishContext\n i dwScope: ")
    body, sep, summary = res.stdout.partition("\n\nThread 1/1\n")
    assert sep and summary.startswith("Results sorted by total execution time\ntotal time: ")
    for line in body.splitlines():  # calls only: names, arguments, results
        assert NAME.match(line) or line.startswith((" i ", " o ", " => ")), line
    assert names_and_rvs(parse_trace(res.stdout).calls) == calls_of_client(out)
    assert "Tracing" not in res.stdout and "pcsc-ebpf-spy" not in res.stdout


# -- presentation --------------------------------------------------------------------------

BLUE, GREEN, MAGENTA, RED, NORMAL = "\x1b[34m", "\x1b[32m", "\x1b[35m", "\x1b[01;31m", "\x1b[0m"


def trace_on_a_terminal(spawn, live_tracer, client_bin, *args):
    """Trace `all` (-p) with the tracer's stdout on a pty; what it wrote there."""
    client = held(spawn, client_bin, "all")
    master, slave = pty.openpty()
    chunks = []

    def read():
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the tracer is gone
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        t = live_tracer(*args, "-p", client.pid, stdout=slave)
    finally:
        os.close(slave)
    out = finish(client, "\n")
    assert t.stop() == 0, t.stderr
    reader.join(30)
    os.close(master)
    return b"".join(chunks).decode().replace("\r\n", "\n"), out


def test_colours_on_a_terminal(spawn, live_tracer, client_bin):
    text, out = trace_on_a_terminal(spawn, live_tracer, client_bin)
    lines = text.splitlines()
    assert lines[0] == BLUE + "SCardEstablishContext" + NORMAL
    assert lines[1] == GREEN + " i dwScope: SCARD_SCOPE_SYSTEM (0x00000002)" + NORMAL
    assert lines[2].startswith(MAGENTA + " o hContext: 0x") and lines[2].endswith(NORMAL)
    assert re.match(r"^ => Command successful\. .* \[\d+\.\d{6}\]$", lines[3])  # not coloured
    failed = [l for l in lines if l.startswith(RED)]
    # GetAttrib x2, SetAttrib and Control fail on vpcd (tests/clients/README.md)
    assert len(failed) == 4, failed
    for line in failed:
        assert re.match(re.escape(RED) + r" => .*\[0x8010001[6F]\]\) " + re.escape(NORMAL)
                        + r" \[\d+\.\d{6}\]$", line), line
    plain = re.sub(r"\x1b\[[0-9;]*m", "", text)
    assert names_and_rvs(parse_trace(plain).calls) == calls_of_client(out)


def test_no_colours_with_n_on_a_terminal(spawn, live_tracer, client_bin):
    text, out = trace_on_a_terminal(spawn, live_tracer, client_bin, "-n")
    assert "\x1b" not in text
    assert names_and_rvs(parse_trace(text).calls) == calls_of_client(out)


def test_no_colours_when_stdout_is_not_a_terminal(spawn, tracer, client_bin):
    res, out = traced_alone(spawn, tracer, client_bin, ["all"])  # no -n
    assert "\x1b" not in res.stdout
    assert names_and_rvs(parse_trace(res.stdout).calls) == calls_of_client(out)


WORKER = ["SCardEstablishContext", "SCardConnect"] + ["SCardTransmit"] * 3 + \
    ["SCardDisconnect", "SCardReleaseContext"]


def check_threads(res, out, prefix):
    """`threads 2 3`: three threads (main + 2), every line indented by 4
    spaces per thread number, then prefix(n)."""
    trace = parse_trace(res.stdout)
    assert [th.number for th in trace.threads] == [0, 1, 2]
    assert re.search(r"\n\nThread 1/3\n(.*\n)+\nThread 2/3\n(.*\n)+\nThread 3/3\n", res.stdout)
    assert sorted(names_and_rvs(trace.calls)) == sorted(calls_of_client(out))
    per_thread = {n: [c.name for c in trace.calls if c.thread == n] for n in range(3)}
    assert per_thread == {0: ["SCardEstablishContext", "SCardListReaders", "SCardReleaseContext"],
                          1: WORKER, 2: WORKER}
    body = res.stdout.partition("\n\nThread 1/3\n")[0]
    seen = set()
    for line in body.splitlines():
        n = (len(line) - len(line.lstrip(" "))) // 4
        head = " " * (4 * n) + prefix(n)
        assert line.startswith(head), line
        rest = line[len(head):]
        assert NAME.match(rest) or rest.startswith((" i ", " o ", " => ")), line
        seen.add(n)
    assert seen == {0, 1, 2}


def test_threads_indented_by_4_spaces_each(spawn, tracer, client_bin):
    res, out = traced_alone(spawn, tracer, client_bin, ["threads", 2, 3], "-n")
    check_threads(res, out, lambda n: "")


def test_t_prefixes_the_thread_number(spawn, tracer, client_bin):
    res, out = traced_alone(spawn, tracer, client_bin, ["threads", 2, 3], "-n", "-t")
    assert res.stdout.startswith(" (t0) SCardEstablishContext\n (t0)  i dwScope: ")
    check_threads(res, out, lambda n: " (t%d) " % n)
