"""The tracer end to end on the C client's full tour: all 18 functions,
each call exactly once, with the result the application saw -- through
uprobe_multi links (Linux >= 6.6, the default where the kernel has them) and
through one perf event per probe with the calls in flight in a hash map
(older kernels, e.g. Debian 12's 6.1)."""
import os
import re

import pytest

from ebpf_pcsc.uprobes import BPF_MAP_TYPE_RINGBUF
from tracetext import calls_of_client

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


def probe_handles(pid):
    """How the tracer holds its probes: its bpf_link and perf_event fds."""
    kinds = []
    for fd in os.listdir("/proc/%d/fd" % pid):
        try:
            kinds.append(os.readlink("/proc/%d/fd/%s" % (pid, fd)))
        except FileNotFoundError:
            # Closed since the listing: a file the tracer read in passing
            # (the -p watch reads /proc), not a probe.
            pass
    return (sum(k == "anon_inode:bpf_link" for k in kinds),
            sum(k == "anon_inode:[perf_event]" for k in kinds))


# enum bpf_map_type (uapi/linux/bpf.h); BPF_MAP_TYPE_RINGBUF (27) is the tracer's own
BPF_MAP_TYPE_PERF_EVENT_ARRAY = 4
BPF_MAP_TYPE_LRU_HASH = 9
BPF_MAP_TYPE_TASK_STORAGE = 29


def map_types(pid):
    """The types of the BPF maps the tracer holds, one per map (from its
    fds' fdinfo: a map may have several fds, e.g. a mapped ring buffer)."""
    maps = {}
    for fd in os.listdir("/proc/%d/fd" % pid):
        # The running tracer opens and closes other files meanwhile (the -p
        # watch reads /proc): an fd gone by now was not one of its maps.
        try:
            if os.readlink("/proc/%d/fd/%s" % (pid, fd)) != "anon_inode:bpf-map":
                continue
            with open("/proc/%d/fdinfo/%s" % (pid, fd)) as f:
                info = dict(line.split(":", 1) for line in f if ":" in line)
        except FileNotFoundError:
            continue
        maps[int(info["map_id"])] = int(info["map_type"])
    return list(maps.values())


# ("perf", "ring") is what --buffer auto gives on Debian 12's own kernel.
@pytest.mark.parametrize("attach, buffer", [("multi", "perf"), ("perf", "perf"),
                                            ("multi", "ring"), ("perf", "ring")])
def test_every_call_once_with_its_result(stack, client_bin, tracer, attach, buffer):
    # -p: other PC/SC clients on the machine stay out of this trace.
    client = stack.popen_waiting([client_bin, "all"])
    # As on Debian 12's own kernel (6.1): perf-event probes, calls in flight
    # in a hash map (no uprobe_multi before 6.6, task storage unsafe before 6.2).
    env = (dict(os.environ, PCSC_EBPF_SPY_ATTACH="perf", PCSC_EBPF_SPY_INFLIGHT="hash")
           if attach == "perf" else None)
    t = tracer("-n", "-p", client.pid, "--buffer", buffer, env=env)
    # Besides the probes: three raw tracepoints (process exit, fork, exec)
    # are links; the loader's hook is a perf event, and so is each CPU's
    # ring of the two perf buffers (calls, library loads) -- ring buffers
    # are maps.
    links, perf_events = 3, 1 + (2 * os.cpu_count() if buffer == "perf" else 0)
    if attach == "multi":   # one link per phase
        assert probe_handles(t.proc.pid) == (links + 2, perf_events)
    else:                   # 18 functions x 2 phases
        assert probe_handles(t.proc.pid) == (links, perf_events + 36)
    # Where the calls in flight are kept: the thread's storage, or a hash map.
    types = map_types(t.proc.pid)
    if attach == "multi":
        assert BPF_MAP_TYPE_TASK_STORAGE in types and BPF_MAP_TYPE_LRU_HASH not in types
    else:
        assert BPF_MAP_TYPE_LRU_HASH in types and BPF_MAP_TYPE_TASK_STORAGE not in types
    out = client.release()
    res = t.stop()
    assert res.returncode == 0, res.stderr
    traced = calls_of(res.stdout)
    assert traced == calls_of_client(out)
    assert {name for name, _ in traced} == SPEC_18
    assert "\nThread 1/1\nResults sorted by total execution time\n" in res.stdout


def test_default_buffer_is_the_ring_buffer_where_the_kernel_has_one(stack, client_bin, tracer):
    """--buffer auto (the default): this kernel has BPF ring buffers (>= 5.8),
    so the records and the library loads go through ring buffers, and no
    perf buffer is made."""
    client = stack.popen_waiting([client_bin, "all"])
    t = tracer("-n", "-p", client.pid)
    types = map_types(t.proc.pid)
    assert types.count(BPF_MAP_TYPE_RINGBUF) == 2 and BPF_MAP_TYPE_PERF_EVENT_ARRAY not in types
    out = client.release()
    res = t.stop()
    assert res.returncode == 0, res.stderr
    assert calls_of(res.stdout) == calls_of_client(out)
