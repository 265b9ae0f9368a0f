"""Command mode, end to end: `pcsc-ebpf-spy [options] -- COMMAND [ARGS...]`.

The probes are attached before COMMAND starts (its first call is seen);
COMMAND and its descendants are traced, nothing else (other PC/SC clients
run at the same time, here and in other test runs on the machine, must not
show); when COMMAND ends, the events still in the buffers are drained and
the summary printed; the tracer exits with COMMAND's status (128+N when a
signal N killed it).

COMMAND inherits the tracer's stdout: the client's own `FUNC rv=...` lines
land in the same file as the trace.  They are told apart here by their form
(no trace line contains " rv="), anywhere in the text: a client line may be
written in the middle of a trace line the tracer flushed in two pieces.
"""
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from test_cli_errors import check_one_line_error
from processes import wait_for
from tracetext import names_and_rvs, parse_trace
from tracer import ROOT, command

# Generous: compiling the BPF program and detaching 36 probes take seconds,
# more on a loaded machine.  A deadline against hangs, not a timing check.
RUN_TIMEOUT = 600

CLIENT_LINE = re.compile(r"(SCard[A-Za-z]+) rv=(0x[0-9A-F]{8})\n")


def spy(stack, *args, timeout=RUN_TIMEOUT, env=None):
    """Run pcsc-ebpf-spy to its end (command mode) with the private stack's
    environment, which COMMAND inherits."""
    return subprocess.run(command(*args), cwd=ROOT, env=env or stack.env, capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def split_client_lines(stdout: str):
    """(the trace, the client's own lines as (function, rv))."""
    return CLIENT_LINE.sub("", stdout), CLIENT_LINE.findall(stdout)


def client_calls(path) -> list:
    """The (function, rv) lines a client printed into a file."""
    return CLIENT_LINE.findall(Path(path).read_text())


def pids_in(trace) -> set:
    return {th.pid for th in trace.threads}


def children(pid: int) -> list:
    """The child processes of pid."""
    kids = []
    for task in os.listdir("/proc/%d/task" % pid):
        try:
            kids += [int(k) for k in Path("/proc/%d/task/%s/children" % (pid, task)).read_text().split()]
        except FileNotFoundError:
            pass
    return kids


# -- the command's calls, from the first one --------------------------------------------

def test_command_is_traced_from_its_first_call(stack, client_bin):
    res = spy(stack, "-n", "--", client_bin, "all")
    assert res.returncode == 0, res.stderr
    text, client = split_client_lines(res.stdout)
    trace = parse_trace(text)
    assert client[0] == ("SCardEstablishContext", "0x00000000")
    assert len(client) == 27
    # every call, the first one included, and nothing else
    assert names_and_rvs(trace.calls) == client
    # one process, one thread: nobody else's calls (no [pid ...] labels)
    assert len(trace.threads) == 1 and trace.labels == {}
    assert "Traceback" not in res.stderr


def test_events_after_the_command_ends_are_drained(stack, client_bin):
    """The client exits right after its last calls: they are still in the
    perf buffer when the tracer sees it end."""
    n = 1500
    env = dict(stack.env, PCSC_CLIENT_QUIET="1")
    res = spy(stack, "-n", "--", client_bin, "loop", n, env=env)
    assert res.returncode == 0, res.stderr
    assert "lost" not in res.stderr, res.stderr
    text, client = split_client_lines(res.stdout)
    trace = parse_trace(text)
    names = [c.name for c in trace.calls]
    assert names == (["SCardEstablishContext", "SCardListReaders", "SCardConnect"]
                     + ["SCardTransmit"] * n + ["SCardDisconnect", "SCardReleaseContext"])
    assert all(c.rv == "0x00000000" for c in trace.calls)
    last = trace.calls[-1]
    assert last.result.startswith(" => Command successful.")
    # and the summary, which counts them all
    assert len(trace.threads) == 1
    summary = text.partition("\nThread 1/1\n")[2]
    assert re.search(r"^\d+\.\d{6} sec \(%d calls\) .* SCardTransmit$" % n, summary, re.M), summary
    assert re.search(r"^\d+\.\d{6} sec \(  1 calls\) .* SCardReleaseContext$", summary, re.M)


# -- descendants, and nobody else ---------------------------------------------------------

# COMMAND: let the foreign client go, run two clients in the background (their
# pids to $5), wait for them, then wait until the foreign client is done: its
# calls are all made while COMMAND runs.
FORKING = r'''
echo go > "$1"
"$2" attrs > "$3" & a=$!
"$2" readers16 > "$4" & b=$!
echo $a $b > "$5"
wait $a || exit 11
wait $b || exit 12
read done < "$6"
'''

# The foreign client, outside COMMAND: waits for COMMAND's go, makes its calls.
FOREIGN = r'''
read go < "$1"
"$2" nullargs > "$3" || exit 1
echo done > "$4"
'''


def test_forking_command_traces_its_children_and_not_a_foreign_process(stack, client_bin,
                                                                        tmp_path):
    go, done = tmp_path / "go", tmp_path / "done"
    os.mkfifo(go)
    os.mkfifo(done)
    a_out, b_out, pids, foreign_out = (tmp_path / n for n in ("a", "b", "pids", "foreign"))
    foreign = subprocess.Popen(["sh", "-c", FOREIGN, "sh", go, client_bin, foreign_out, done],
                               env=stack.env, stdin=subprocess.DEVNULL,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        res = spy(stack, "-n", "--", "sh", "-c", FORKING, "sh",
                  go, client_bin, a_out, b_out, pids, done)
        foreign_log = foreign.communicate(timeout=60)[0]
    finally:
        if foreign.poll() is None:
            foreign.kill()
            foreign.wait()
    assert res.returncode == 0, res.stderr
    assert foreign.returncode == 0, foreign_log
    a, b = map(int, pids.read_text().split())
    trace = parse_trace(res.stdout)
    # both children, whose calls are all there, and nobody else
    assert pids_in(trace) == {a, b}
    assert names_and_rvs(trace.calls_of(a)) == client_calls(a_out)
    assert names_and_rvs(trace.calls_of(b)) == client_calls(b_out)
    assert len(client_calls(a_out)) == 10 and len(client_calls(b_out)) == 4
    # the foreign client did make its calls meanwhile, unseen
    assert len(client_calls(foreign_out)) == 9
    assert {label[0] for label in trace.labels.values()} <= {a, b}


# -- exit status ------------------------------------------------------------------------------

@pytest.mark.parametrize("script, status", [
    ('"$0" attrs > /dev/null', 0),
    ('"$0" attrs > /dev/null; exit 7', 7),
    ('"$0" attrs > /dev/null; kill -TERM $$', 128 + signal.SIGTERM),
], ids=["0", "7", "SIGTERM"])
def test_exit_status_of_the_command(stack, client_bin, script, status):
    res = spy(stack, "-n", "--", "sh", "-c", script, client_bin)
    assert res.returncode == status, res.stderr
    trace = parse_trace(res.stdout)
    # traced all the same, summary included
    assert [c.name for c in trace.calls][:2] == ["SCardEstablishContext", "SCardListReaders"]
    assert trace.calls[-1].name == "SCardReleaseContext" and trace.calls[-1].rv == "0x00000000"
    assert len(trace.threads) == 1


def test_command_killed_with_sigkill(stack, client_bin, tracer, tmp_path):
    """COMMAND itself (the client, exec'd by sh) dies of SIGKILL in the middle
    of its run: 128 + 9, and the calls it made are in the trace."""
    out = tmp_path / "client"
    t = tracer("-n", "--", "sh", "-c", 'exec "$0" sleep 600000 > "$1"', client_bin, out,
               env=stack.env)
    wait_for(lambda: children(t.proc.pid), "the command to start")
    (child,) = children(t.proc.pid)
    wait_for(lambda: out.exists() and client_calls(out), "the client's first call")
    os.kill(child, signal.SIGKILL)
    code = t.proc.wait(RUN_TIMEOUT)
    res = t.stop(settle=0)
    assert code == 128 + signal.SIGKILL, res.stderr
    trace = parse_trace(res.stdout)
    assert names_and_rvs(trace.calls) == [("SCardEstablishContext", "0x00000000")]
    assert trace.calls[0].result is not None
    assert len(trace.threads) == 1


def test_sigterm_to_the_tracer_goes_to_the_command(stack, client_bin, tracer, tmp_path):
    """Ctrl-C/SIGTERM on the tracer: COMMAND decides how it ends, and the
    tracer ends with it (here killed by the signal: 128 + 15)."""
    out = tmp_path / "client"
    t = tracer("-n", "--", "sh", "-c", 'exec "$0" sleep 600000 > "$1"', client_bin, out,
               env=stack.env)
    wait_for(lambda: out.exists() and client_calls(out), "the client's first call")
    res = t.stop(signal.SIGTERM, settle=0)
    assert res.returncode == 128 + signal.SIGTERM, res.stderr
    trace = parse_trace(res.stdout)
    assert names_and_rvs(trace.calls) == [("SCardEstablishContext", "0x00000000")]


# -- a command that cannot run ------------------------------------------------------------

@pytest.mark.parametrize("argv, why", [
    (["/nonexistent/command", "arg"], "not found|No such file or directory"),
    (["no-such-command-pcsc-spy"], "not found|No such file or directory"),
    (["/etc/passwd"], "not executable|Permission denied"),
    (["/tmp"], "not executable|Permission denied|Is a directory"),
], ids=["path", "PATH lookup", "not executable", "directory"])
def test_command_that_cannot_run(stack, argv, why):
    """One line on stderr, exit 2, like any bad input (tests/test_cli_errors.py)."""
    res = spy(stack, "-n", "--", *argv)
    check_one_line_error(res, re.escape(argv[0]), why, r"check the command after --")


# Calls SCardEstablishContext and SCardReleaseContext, then becomes the C
# client (exec: the same process, the same thread).
CALL_THEN_EXEC = r"""
import ctypes, os, sys
lib = ctypes.CDLL("libpcsclite.so.1")
ctx = ctypes.c_ulong()
assert lib.SCardEstablishContext(2, None, None, ctypes.byref(ctx)) == 0
assert lib.SCardReleaseContext(ctx) == 0
os.execv(sys.argv[1], [sys.argv[1], "isvalid", "3"])
"""


@pytest.mark.parametrize("inflight", ["task-storage", "hash"])
def test_a_thread_is_named_anew_after_exec(stack, client_bin, inflight):
    """The kernel side keeps a thread's name from call to call (reading it
    at every call cost as much as a record), and reads it again after the
    thread starts another program -- with the calls in flight in task
    storage, or in the hash map of kernels before 6.2."""
    env = dict(stack.env, PCSC_EBPF_SPY_INFLIGHT="hash") if inflight == "hash" else None
    res = spy(stack, "--json", "--", "/usr/bin/python3", "-c", CALL_THEN_EXEC, client_bin,
              env=env)
    assert res.returncode == 0, res.stderr
    calls = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    calls = [c for c in calls if c.get("type") == "call"]
    named = [(c["function"], c["comm"]) for c in calls]
    assert named[:2] == [("SCardEstablishContext", "python3"),
                         ("SCardReleaseContext", "python3")], named
    after = named[2:]
    assert ("SCardIsValidContext", "pcsc_client") in after, named
    assert {comm for _, comm in after} == {"pcsc_client"}, named
    assert len({c["tid"] for c in calls}) == 1
