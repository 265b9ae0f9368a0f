"""The processes of an end-to-end test: PC/SC clients on the private stack
(started by the `spawn` fixture, conftest.py) and the tracer that watches
them."""
import time

from tracetext import Trace, parse_trace

# `sh -c EXEC_LATER sh CMD...` waits for a line on stdin, then execs CMD: a pid
# to give -p before CMD (any client scenario) makes a call.
EXEC_LATER = 'read line; exec "$@"'


def held(spawn, *argv):
    """argv behind EXEC_LATER: a pid to trace before argv runs; a line on its
    stdin (finish(p, "\\n")) runs it."""
    return spawn(["sh", "-c", EXEC_LATER, "sh", *argv], stdin=True)


def start_waiting_client(spawn, client_bin):
    """pcsc_client wait-then-run: its libpcsclite is mapped, it has made no
    call; a line on its stdin lets it go."""
    p = spawn([client_bin, "wait-then-run"], stdin=True)
    assert p.stdout.readline() == "ready\n"
    return p


def finish(p, input=None):
    """Wait for p (after giving it input); its stdout; it must succeed."""
    out, err = p.communicate(input, timeout=60)
    assert p.returncode == 0, err
    return out


def stopped(t) -> Trace:
    """Stop the tracer t, which must end well: its trace."""
    res = t.stop()
    assert res.returncode == 0, res.stderr
    return parse_trace(res.stdout)


def wait_for(predicate, what, timeout=30.0):
    """Poll until predicate() is true (a deadline against hangs, not a timing check)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for " + what)
        time.sleep(0.02)
