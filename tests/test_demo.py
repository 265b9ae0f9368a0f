"""`make demo` for real: it traces its client, prints pcsc-spy's text and the
summary, and leaves no process behind, also when interrupted."""
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "tests" / "demo.py"
TIMEOUT = 240

SELECT = " i  0000 00 A4 04 00 07 A0 00 00 03 08 00 00             ............"
GET_CHALLENGE_RESPONSE = " o  0000 00 01 02 03 04 05 06 07 90 00                   .........."
PY_CLIENT_CALLS = ["SCardEstablishContext", "SCardListReaders", "SCardListReaders",
                   "SCardGetStatusChange", "SCardConnect", "SCardTransmit", "SCardTransmit",
                   "SCardDisconnect", "SCardReleaseContext"]
SUMMARY = "\nThread 1/1\nResults sorted by total execution time\ntotal time: "
SUMMARY_LINE = re.compile(r"^\d+\.\d{6} sec \( *\d+ calls\) +\d+\.\d\d% (SCard\w+)$", re.M)


def functions(trace):
    return re.findall(r"^(SCard\w+)$", trace, re.M)


def started(stderr):
    """What the demo says it started: {pid: what its command line holds},
    and the stack's temporary directory."""
    stack = re.search(r"pcscd pid (\d+), virtual card pid (\d+) on port (\d+), "
                      r".* files in (\S+)", stderr)
    assert stack, stderr
    pcscd, card, port, tmpdir = stack.groups()
    procs = {int(pcscd): tmpdir, int(card): "--port\0%s" % port}
    client = re.search(r", pid (\d+): it waits", stderr)
    if client:
        procs[int(client.group(1))] = "pcsc_"   # pcsc_ctypes_client or pcsc_client
    tracer = re.search(r"^demo: tracer pid (\d+)$", stderr, re.M)
    if tracer:
        procs[int(tracer.group(1))] = "ebpf_pcsc"
    return procs, tmpdir


def assert_nothing_left(stderr):
    procs, tmpdir = started(stderr)
    for pid, marker in procs.items():
        try:
            cmdline = Path("/proc/%d/cmdline" % pid).read_text(errors="replace")
        except (FileNotFoundError, ProcessLookupError):
            continue
        assert marker not in cmdline, "left behind: pid %d %r" % (pid, cmdline)
    assert not Path(tmpdir).exists(), tmpdir


def test_make_demo():
    run = subprocess.run(["make", "-C", str(ROOT), "demo"], capture_output=True, text=True,
                         timeout=TIMEOUT, stdin=subprocess.DEVNULL)
    assert run.returncode == 0, run.stderr
    trace = run.stdout
    assert functions(trace) == PY_CLIENT_CALLS, trace
    assert SELECT in trace.splitlines()
    assert GET_CHALLENGE_RESPONSE in trace.splitlines()
    # dlopen()ed library, NULL pioRecvPci: what pcsc-spy 1.9.9 cannot trace
    assert " o pioRecvPci.dwProtocol: NULL" in trace
    assert SUMMARY in trace
    assert set(SUMMARY_LINE.findall(trace)) == set(PY_CLIENT_CALLS)
    assert "\x1b[" not in trace          # not a terminal: no colours
    assert "demo:" not in trace          # progress goes to stderr
    assert re.search(r"^Tracing 18 PC/SC functions in .* \(pid \d+\)\.\.\. Hit Ctrl-C to end\.$",
                     run.stderr, re.M), run.stderr
    assert_nothing_left(run.stderr)


def test_demo_all_functions():
    run = subprocess.run([sys.executable, str(DEMO), "--all"], capture_output=True, text=True,
                         timeout=TIMEOUT, stdin=subprocess.DEVNULL)
    assert run.returncode == 0, run.stderr
    assert len(set(functions(run.stdout))) == 18, run.stdout
    assert SELECT in run.stdout.splitlines()
    assert len(set(SUMMARY_LINE.findall(run.stdout))) == 18
    assert_nothing_left(run.stderr)


def test_ctrl_c_cleans_up():
    """Ctrl-C (twice) once the tracer runs: status 130, nothing left."""
    demo = subprocess.Popen([sys.executable, str(DEMO)], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        seen = []
        for line in demo.stderr:
            seen.append(line)
            if line.startswith("Tracing"):
                break
        assert seen and seen[-1].startswith("Tracing"), "".join(seen)
        # A terminal's Ctrl-C reaches the foreground process group: the demo's.
        os.killpg(demo.pid, signal.SIGINT)
        os.killpg(demo.pid, signal.SIGINT)
        out, err = demo.communicate(timeout=TIMEOUT)
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()
    stderr = "".join(seen) + err
    assert demo.returncode == 130, stderr
    assert "demo: interrupted" in stderr
    assert "demo: cleaned up" in stderr
    assert_nothing_left(stderr)
