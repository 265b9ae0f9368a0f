"""The tracer end to end on the C client's full tour: all 18 functions,
each call exactly once, with the result the application saw."""
import re

SPEC_18 = {
    "SCardEstablishContext", "SCardReleaseContext", "SCardIsValidContext", "SCardConnect",
    "SCardReconnect", "SCardDisconnect", "SCardBeginTransaction", "SCardEndTransaction",
    "SCardStatus", "SCardGetStatusChange", "SCardControl", "SCardTransmit",
    "SCardListReaderGroups", "SCardListReaders", "SCardFreeMemory", "SCardCancel",
    "SCardGetAttrib", "SCardSetAttrib",
}
RESULT = re.compile(r"^ => .*\[(0x[0-9A-F]{8})\]\)  \[(\d+\.\d{6}|\?\?\.\?\?)\]$")


def calls_of(trace: str):
    """(function, rv) per traced call, in order."""
    calls, name = [], None
    for line in trace.splitlines():
        if line.startswith("SCard"):
            name = line
        m = RESULT.match(line)
        if m:
            calls.append((name, m.group(1)))
    return calls


def calls_of_client(stdout: str):
    return [tuple(line.split(" rv=")) for line in stdout.splitlines() if " rv=" in line]


def test_every_call_once_with_its_result(stack, client_bin, tracer):
    # -p: other PC/SC clients on the machine stay out of this trace.
    client = stack.popen_waiting([client_bin, "all"])
    t = tracer("-n", "-p", client.pid)
    out = client.release()
    res = t.stop()
    assert res.returncode == 0, res.stderr
    traced = calls_of(res.stdout)
    assert traced == calls_of_client(out)
    assert {name for name, _ in traced} == SPEC_18
    assert "\nThread 1/1\nResults sorted by total execution time\n" in res.stdout
