#!/usr/bin/env python3
"""Record the raw perf-buffer records of the C client's scenarios, as test
fixtures for the decoding and rendering tests (which then need no BPF, no
pcscd, no card).

    sudo .venv/bin/python tests/record_events.py            # every scenario
    sudo .venv/bin/python tests/record_events.py all errors # some of them

For each scenario it starts a private PC/SC stack (tests/testbed.py), loads
the tracer's BPF program (ebpf_pcsc.capture.Capture, the system libpcsclite,
filtered on the client's pid), runs tests/clients/pcsc_client.c and writes:

  tests/data/<name>.records     the records, in the order the tracer's session
                                feeds them to the Assembler (each poll's batch
                                sorted by timestamp, as session._drain does);
  tests/data/<name>.client.txt  the client's stdout: one "FUNC rv=0x..." line
                                per call (plus its marker lines).

<name> is the scenario and its arguments joined by "_" (threads_2_3).

The .records format: a sequence of records, each a 4-byte little-endian
length followed by that many bytes, exactly as the buffer delivered them
(a struct pcsc_call or pcsc_data of bpf/pcsc_event.h, up to its last byte
of data, possibly followed by perf's alignment padding: the files are
recorded through the perf buffer).  Nothing else: no header.  Handles,
pointers, pids, tids and timestamps differ from run to run; everything the
client passes or receives is the same on every run (tests/clients/README.md).

Regenerate them when bpf/pcsc_event.h or the function table changes.
"""
import os
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import List

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
DATA = TESTS / "data"
CLIENT_SRC = TESTS / "clients" / "pcsc_client.c"

SCENARIOS = (
    ("all",),
    ("errors",),
    ("attrs",),
    ("nullargs",),
    ("nullrecvpci",),
    ("blocked",),
    ("extended65k",),
    ("threads", "2", "3"),
)

_LEN = struct.Struct("<I")
# extended65k, the biggest, is ~130 KB (its two buffers, 65 KB each, once).
MAX_FIXTURE = 512 * 1024


# -- the file format (used by the tests) ---------------------------------------

def name_of(scenario) -> str:
    return "_".join(scenario)


def write_records(path: Path, records: List[bytes]) -> None:
    with open(path, "wb") as f:
        for raw in records:
            f.write(_LEN.pack(len(raw)))
            f.write(raw)


def read_records(path: Path) -> List[bytes]:
    data = Path(path).read_bytes()
    records, pos = [], 0
    while pos < len(data):
        if pos + _LEN.size > len(data):
            raise ValueError("%s: truncated length at offset %d" % (path, pos))
        (n,) = _LEN.unpack_from(data, pos)
        pos += _LEN.size
        if pos + n > len(data):
            raise ValueError("%s: truncated record at offset %d" % (path, pos))
        records.append(data[pos:pos + n])
        pos += n
    return records


def records_path(name: str) -> Path:
    return DATA / (name + ".records")


def client_path(name: str) -> Path:
    return DATA / (name + ".client.txt")


def client_calls(name: str) -> List[tuple]:
    """(function, rv) per line of the client's output, in order."""
    calls = []
    for line in client_path(name).read_text().splitlines():
        if " rv=" in line:
            func, rv = line.split(" rv=")
            calls.append((func, int(rv, 16)))
    return calls


# -- recording -------------------------------------------------------------------

def _compile_client(out_dir: Path) -> str:
    binary = out_dir / "pcsc_client"
    subprocess.run(["gcc", "-O0", "-g", "-Wall", "-Wextra", "-I/usr/include/PCSC",
                    str(CLIENT_SRC), "-o", str(binary), "-lpcsclite", "-lpthread"],
                   check=True)
    return str(binary)


def _drain(capture, sink: List[bytes], timeout_ms: int) -> int:
    """session._drain, collecting instead of decoding."""
    from ebpf_pcsc.calls import Assembler
    batch = capture.poll(timeout_ms)
    batch.sort(key=Assembler.timestamp)
    sink.extend(batch)
    return len(batch)


def record(stack, client: str, scenario, timeout: float = 60.0) -> tuple:
    """Run one scenario under a Capture; returns (records, client stdout)."""
    from ebpf_pcsc import kheaders, layout, targets
    from ebpf_pcsc.capture import Capture
    from ebpf_pcsc.functions import FUNCTIONS

    kheaders.ensure(print)  # quiet once BCC_KERNEL_SOURCE is set
    head = struct.Struct("<QQII")
    # The client waits on its stdin before exec'ing (same pid), so the
    # capture can be filtered on that pid before the first call.
    with tempfile.TemporaryFile() as out:
        proc = subprocess.Popen(["sh", "-c", 'read _ ; exec "$0" "$@"', client, *scenario],
                                env=stack.env, stdin=subprocess.PIPE, stdout=out,
                                stderr=subprocess.PIPE)
        # Through the perf buffer, whose padding the decoder must ignore
        # (the ring buffer delivers records to the byte).
        capture = Capture(FUNCTIONS, [targets.system_wide()], pids=[proc.pid], transport="perf")
        lost = []
        records: List[bytes] = []
        try:
            capture.start(lost.append)
            proc.stdin.write(b"go\n")
            proc.stdin.close()
            deadline = time.monotonic() + timeout
            while proc.poll() is None:
                _drain(capture, records, 100)
                if time.monotonic() > deadline:
                    proc.kill()
                    raise RuntimeError("%s: the client did not end" % name_of(scenario))
            # The last records may still be in the buffer.
            idle = 0
            while idle < 3:
                idle = idle + 1 if _drain(capture, records, 100) == 0 else 0
        finally:
            capture.close()
        err = proc.stderr.read().decode(errors="replace")
        out.seek(0)
        stdout = out.read().decode()
    if proc.returncode != 0:
        raise RuntimeError("%s: the client failed (%d): %s"
                           % (name_of(scenario), proc.returncode, err))
    if lost:
        raise RuntimeError("%s: %d records lost" % (name_of(scenario), sum(lost)))
    ours = [r for r in records if head.unpack_from(r)[2] == proc.pid]
    if len(ours) != len(records):
        raise RuntimeError("%s: records of another process" % name_of(scenario))
    kinds = [struct.unpack_from("<H", r, 24)[0] for r in ours]
    calls = sum(1 for line in stdout.splitlines() if " rv=" in line)
    if kinds.count(layout.PCSC_REC_RETURN) != calls:
        raise RuntimeError("%s: %d calls returned in the trace, %d in the client's output"
                           % (name_of(scenario), kinds.count(layout.PCSC_REC_RETURN), calls))
    return ours, stdout


def main(argv: List[str]) -> int:
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(TESTS))
    from ebpf_pcsc import kheaders
    from testbed import PcscStack

    wanted = [s for s in SCENARIOS if not argv or name_of(s) in argv]
    unknown = set(argv) - {name_of(s) for s in SCENARIOS}
    if unknown:
        print("unknown scenario(s): %s; known: %s"
              % (", ".join(sorted(unknown)), ", ".join(name_of(s) for s in SCENARIOS)))
        return 2
    if os.geteuid() != 0:
        print("recording needs root (eBPF, mount namespaces)")
        return 2
    kheaders.ensure(print)
    DATA.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp, PcscStack() as stack:
        client = _compile_client(Path(tmp))
        for scenario in wanted:
            name = name_of(scenario)
            records, stdout = record(stack, client, scenario)
            size = sum(4 + len(r) for r in records)
            if size > MAX_FIXTURE:
                raise RuntimeError("%s: %d bytes of records: too big for a fixture" % (name, size))
            write_records(records_path(name), records)
            client_path(name).write_text(stdout)
            print("%-14s %5d records %8d bytes  %3d calls"
                  % (name, len(records), records_path(name).stat().st_size,
                     stdout.count(" rv=")))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
