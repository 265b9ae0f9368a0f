"""Recordings, end to end: `-w FILE` (lossless JSON Lines, mode 0600, one
flushed line per call), `--json` (the same on stdout), `-r FILE` (rendered
exactly as the live text was), and files that are not recordings, are
truncated or corrupt.  The schema is docs/recording-format.md.

The clients' own stdout goes to /dev/null (through `sh -c`): COMMAND shares
the tracer's stdout, and the live text is compared byte for byte here.
"""
import difflib
import json
import os
import platform
import re
import signal
import stat
import subprocess
import time
from pathlib import Path

import pytest

import ebpf_pcsc
from test_cli_errors import check_one_line_error
from test_command_mode import client_calls, spy
from processes import wait_for
from tracetext import names_and_rvs, parse_trace
from tracer import ROOT, command, run_tracer

HEADER_KEYS = {"type", "format", "tool", "version", "kernel", "libraries", "start_time",
               "start_ns"}
CALL_KEYS = {"type", "pid", "tid", "comm", "function", "args", "entry", "exit", "rv", "result",
             "entry_ns", "return_ns", "entry_seq", "return_seq", "aborted"}
PHASE_KEYS = {"words", "data", "readers"}
DATA_KEYS = {"hex", "total", "null", "fault", "truncated"}
READER_KEYS = {"reader", "current_state", "event_state", "cb_atr", "atr", "name_captured"}

SELECT = bytes.fromhex("00A4040007A0000003080000")
ECHO_4K = bytes(i & 0xFF for i in range(4096))           # `all`: extended ECHO of 4,096 bytes
ECHO_65K = bytes((i * 7) & 0xFF for i in range(65000))   # `extended65k`


def quiet(scenario: str) -> str:
    """A shell script running the client ($0) with its stdout thrown away."""
    return '"$0" %s > /dev/null' % scenario


def render(*args):
    """pcsc-ebpf-spy -r ... (no tracing, no privileges needed, no stack)."""
    return run_tracer(*args, timeout=120)


def lines_of(path):
    return Path(path).read_text().splitlines(keepends=True)


def check_header(header: dict):
    assert set(header) == HEADER_KEYS, header
    assert header["type"] == "header"
    assert header["format"] == "pcsc-ebpf-spy/1"
    assert header["tool"] == "pcsc-ebpf-spy"
    assert header["version"] == ebpf_pcsc.__version__
    assert header["kernel"] == platform.release()
    (lib,) = header["libraries"]
    assert re.search(r"/libpcsclite\.so\.1[.0-9]*$", lib) and os.path.exists(lib), lib
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", header["start_time"])
    assert isinstance(header["start_ns"], int)


def check_phase(phase):
    assert set(phase) == PHASE_KEYS, phase
    for value in phase["words"].values():
        assert value is None or isinstance(value, int)
    for d in phase["data"].values():
        assert set(d) == DATA_KEYS, d
        assert d["hex"] is None or re.fullmatch(r"(?:[0-9A-F]{2})*", d["hex"]), d
        assert isinstance(d["total"], int)
        assert all(isinstance(d[k], bool) for k in ("null", "fault", "truncated"))
    for states in phase["readers"].values():
        for r in states:
            assert set(r) == READER_KEYS, r
            assert len(bytes.fromhex(r["atr"])) == 33


def check_call(call: dict, header: dict, after_start=True):
    """A complete call.  after_start: it began after the header's start_ns
    (true in command mode, where COMMAND starts after the header is written;
    with -p, a call may start between attaching and writing the header)."""
    assert set(call) == CALL_KEYS, call
    assert call["type"] == "call"
    assert call["function"].startswith("SCard")
    assert isinstance(call["pid"], int) and isinstance(call["tid"], int)
    assert isinstance(call["args"], dict) and all(isinstance(v, int) for v in call["args"].values())
    check_phase(call["entry"])
    assert call["aborted"] is False
    check_phase(call["exit"])
    assert isinstance(call["rv"], int) and call["result"].startswith("SCARD_")
    # CLOCK_MONOTONIC, as the header's start_ns
    assert 0 < call["entry_ns"] <= call["return_ns"] <= time.monotonic_ns()
    if after_start:
        assert header["start_ns"] <= call["entry_ns"]


def read_recording(path):
    """(header, calls) of a complete recording, each line parsed."""
    lines = lines_of(path)
    assert lines and all(line.endswith("\n") for line in lines)
    header, *calls = [json.loads(line) for line in lines]
    return header, calls


def the_call(calls, function, nth=0):
    return [c for c in calls if c["function"] == function][nth]


def data(phase, name) -> bytes:
    d = phase["data"][name]
    assert not (d["null"] or d["fault"] or d["truncated"]), d
    assert d["total"] == len(bytes.fromhex(d["hex"]))
    return bytes.fromhex(d["hex"])


# -- -w: what a recording holds ------------------------------------------------------------

def test_recording_with_live_text(stack, client_bin, tmp_path):
    rec = tmp_path / "trace.jsonl"
    res = spy(stack, "-n", "-w", rec, "--", "sh", "-c", quiet("all"), client_bin)
    assert res.returncode == 0, res.stderr
    assert stat.S_IMODE(rec.stat().st_mode) == 0o600
    header, calls = read_recording(rec)
    check_header(header)
    for call in calls:
        check_call(call, header)
    # the live text shows the same calls
    trace = parse_trace(res.stdout)
    assert [(c["function"], "0x%08X" % c["rv"]) for c in calls] == names_and_rvs(trace.calls)
    assert len(calls) == 27
    assert {(c["pid"], c["tid"], c["comm"]) for c in calls} == {
        (calls[0]["pid"], calls[0]["pid"], "pcsc_client")}

    # byte-exact buffers: SELECT, GET CHALLENGE, the 4 KB extended ECHO
    select, challenge, echo = [c for c in calls if c["function"] == "SCardTransmit"]
    assert data(select["entry"], "pbSendBuffer") == SELECT
    assert select["entry"]["words"] == {"pioSendPci.dwProtocol": 2, "pioSendPci.cbPciLength": 16}
    assert select["args"]["cbSendLength"] == len(SELECT)
    assert data(select["exit"], "pbRecvBuffer") == bytes.fromhex("9000")
    assert select["exit"]["words"]["pcbRecvLength"] == 2
    assert data(challenge["exit"], "pbRecvBuffer") == bytes(range(8)) + b"\x90\x00"
    assert data(echo["entry"], "pbSendBuffer") == bytes.fromhex("80100000001000") + ECHO_4K
    assert data(echo["exit"], "pbRecvBuffer") == ECHO_4K + b"\x90\x00"

    # reader states, in and out
    gsc = the_call(calls, "SCardGetStatusChange")
    (before,) = gsc["entry"]["readers"]["rgReaderStates"]
    (after,) = gsc["exit"]["readers"]["rgReaderStates"]
    assert before["reader"] == after["reader"] == "Virtual PCD 00 00"
    assert (before["current_state"], before["event_state"], before["cb_atr"]) == (0, 0, 0)
    assert after["event_state"] & 0x20 and after["cb_atr"] == 5      # SCARD_STATE_PRESENT
    assert bytes.fromhex(after["atr"])[:5] == bytes.fromhex("3B80800101")

    # strings, and the failed calls' results
    readers = the_call(calls, "SCardListReaders", 1)
    assert data(readers["exit"], "mszReaders") == b"Virtual PCD 00 00\0Virtual PCD 00 01\0\0"
    set_attrib = the_call(calls, "SCardSetAttrib")
    assert data(set_attrib["entry"], "pbAttr") == b"ABCD"
    assert (set_attrib["rv"], set_attrib["result"]) == (0x80100016, "SCARD_E_NOT_TRANSACTED")


def test_recording_alone_replaces_an_existing_file(stack, client_bin, tmp_path):
    """-q: nothing on stdout; an existing file (mode 0644) is truncated and
    made 0600."""
    rec = tmp_path / "trace.jsonl"
    rec.write_text("old contents\n" * 1000)
    rec.chmod(0o644)
    res = spy(stack, "-q", "-w", rec, "--", "sh", "-c", quiet("extended65k"), client_bin)
    assert res.returncode == 0, res.stderr
    assert res.stdout == ""
    assert stat.S_IMODE(rec.stat().st_mode) == 0o600
    header, calls = read_recording(rec)
    check_header(header)
    for call in calls:
        check_call(call, header)
    assert [c["function"] for c in calls] == [
        "SCardEstablishContext", "SCardListReaders", "SCardConnect",
        "SCardBeginTransaction", "SCardTransmit", "SCardEndTransaction", "SCardDisconnect",
        "SCardReleaseContext"]
    echo = the_call(calls, "SCardTransmit")
    assert data(echo["entry"], "pbSendBuffer") == bytes.fromhex("8010000000FDE8") + ECHO_65K
    assert data(echo["exit"], "pbRecvBuffer") == ECHO_65K + b"\x90\x00"
    assert echo["exit"]["words"]["pcbRecvLength"] == 65002


def test_recording_to_an_unwritable_path(stack):
    res = spy(stack, "-q", "-w", "/nonexistent/dir/trace.jsonl", "--", "true")
    check_one_line_error(res, r"/nonexistent/dir/trace\.jsonl", r"No such file or directory")


def test_killed_tracer_leaves_a_valid_prefix(stack, client_bin, tracer, tmp_path):
    """Each call is one line, flushed: after SIGKILL every complete line
    parses (the last one may be cut, nothing else)."""
    client = subprocess.Popen([client_bin, "loop", "100000000"],
                              env=dict(stack.env, PCSC_CLIENT_QUIET="1"),
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        rec = tmp_path / "trace.jsonl"
        t = tracer("-q", "-w", rec, "-p", client.pid)
        wait_for(lambda: rec.read_text().count("\n") > 200, "200 recorded calls")
        t.proc.send_signal(signal.SIGKILL)
        t.proc.wait(60)
    finally:
        client.kill()
        client.wait()
    text = rec.read_text()
    complete, _, rest = text.rpartition("\n")
    header, *calls = [json.loads(line) for line in complete.split("\n")]
    check_header(header)
    assert len(calls) >= 200
    for call in calls:
        check_call(call, header, after_start=False)
        assert call["pid"] == client.pid
    # attached to the running loop: its transmits (and, on a slow start, the
    # calls before the loop)
    assert {c["function"] for c in calls} <= {"SCardEstablishContext", "SCardListReaders",
                                              "SCardConnect", "SCardTransmit"}
    transmits = [c for c in calls if c["function"] == "SCardTransmit"]
    assert len(transmits) >= 190
    assert all(data(c["exit"], "pbRecvBuffer") == bytes(range(8)) + b"\x90\x00"
               for c in transmits)
    assert "\n" not in rest


# -- --json ------------------------------------------------------------------------------------

def test_json_on_stdout_is_the_recording(stack, client_bin, tmp_path):
    rec = tmp_path / "trace.jsonl"
    res = spy(stack, "--json", "-w", rec, "--", "sh", "-c", quiet("all"), client_bin)
    assert res.returncode == 0, res.stderr
    out, written = res.stdout.splitlines(keepends=True), lines_of(rec)
    assert len(out) == 28
    assert out[1:] == written[1:]   # the calls, byte for byte
    check_header(json.loads(out[0]))
    assert out[0] == written[0]     # one run, one header


# -- -r: rendered as it was shown live ----------------------------------------------------------

# Three processes: one alone, then two at the same time (labels, indentation).
THREE_CLIENTS = '"$0" all > /dev/null; "$0" attrs > /dev/null & "$0" readers16 > /dev/null; wait'


# 8 threads transmitting at the same time (PCSC_CLIENT_QUIET: no per-call lines):
# calls of different threads end and start within microseconds of each other,
# their records on different CPUs' buffers.
THREADS = '"$0" threads 8 300 > /dev/null 2>&1'


@pytest.mark.parametrize("options, script, threads", [
    (["-n"], THREE_CLIENTS, 3),
    (["-n", "-d"], THREE_CLIENTS, 3),
    (["-n", "-t"], THREE_CLIENTS, 3),
    (["-n", "-d", "-t"], THREADS, 9),
    (["-n"], THREADS, 9),
], ids=["-n", "-n -d", "-n -t", "-n -d -t threads", "-n threads"])
def test_replay_renders_as_live(stack, client_bin, tmp_path, options, script, threads):
    rec = tmp_path / "trace.jsonl"
    live = spy(stack, *options, "-w", rec, "--", "sh", "-c", script, client_bin,
               env=dict(stack.env, PCSC_CLIENT_QUIET="1"))
    assert live.returncode == 0, live.stderr
    assert len(parse_trace(live.stdout).threads) == threads
    replay = render(*options, "-r", rec)
    assert replay.returncode == 0, replay.stderr
    assert replay.stderr == ""
    # the calls, the labels, the summary (same timestamps: same times)
    assert_same_text(live.stdout, replay.stdout)


def assert_same_text(live: str, replay: str):
    if replay != live:
        diff = "".join(difflib.unified_diff(live.splitlines(True), replay.splitlines(True),
                                            "live", "-r", n=2))
        pytest.fail("-r does not show what was shown live:\n" + diff[:6000])


def test_replay_of_aborted_and_unfinished_calls(spawn, tmp_path):
    """A process killed inside a call (aborted) and a call still blocked when
    tracing ends (unfinished): both recorded with rv null, both rendered by
    -r as they were live."""
    from test_e2e_behaviour import LiveTracer, block, blocked_call, start_blocker

    rec, out = tmp_path / "trace.jsonl", tmp_path / "live.txt"
    t = None
    try:
        killed, blocked = start_blocker(spawn), start_blocker(spawn)
        with open(out, "w") as f:
            t = LiveTracer("-n", "-d", "-w", rec, "-p", killed.pid, "-p", blocked.pid, stdout=f)
        block(killed)
        wait_for(lambda: blocked_call(out.read_text()) is not None, "the first blocked call")
        killed.kill()
        killed.wait()
        wait_for(lambda: "ended inside the call" in t.stderr, "the aborted call")
        block(blocked)
        wait_for(lambda: len([c for c in parse_trace(out.read_text()).calls
                              if c.name == "SCardGetStatusChange" and c.rv is None]) == 2,
                 "the second blocked call")
        assert t.stop() == 0, t.stderr
        assert "had not returned when tracing ended" in t.stderr
    finally:
        if t is not None:
            t.kill()
    header, *calls = [json.loads(line) for line in lines_of(rec)]
    (aborted,) = [c for c in calls if c["aborted"]]
    assert aborted["pid"] == killed.pid and aborted["function"] == "SCardGetStatusChange"
    assert aborted["rv"] is None and aborted["result"] is None and aborted["exit"] is None
    assert aborted["entry_ns"] <= aborted["return_ns"]
    unfinished = [c for c in calls if c["rv"] is None and not c["aborted"]]
    assert [(c["pid"], c["function"]) for c in unfinished] == [(blocked.pid,
                                                                "SCardGetStatusChange")]
    assert unfinished[0]["return_ns"] is None and unfinished[0]["exit"] is None
    (states,) = unfinished[0]["entry"]["readers"].values()
    assert states[0]["reader"] == "Virtual PCD 00 00"
    replay = render("-n", "-d", "-r", rec)
    assert replay.returncode == 0, replay.stderr
    assert_same_text(out.read_text(), replay.stdout)


# -- files that are not (complete) recordings ---------------------------------------------------

@pytest.fixture(scope="module")
def recording(session_stack, client_bin, tmp_path_factory):
    """A recording of `all`: its lines."""
    if not session_stack.card_running:
        session_stack.start_card()
    rec = tmp_path_factory.mktemp("recording") / "all.jsonl"
    res = spy(session_stack, "-q", "-w", rec, "--", "sh", "-c", quiet("all"), client_bin)
    assert res.returncode == 0, res.stderr
    return lines_of(rec)


def cut(line):
    return line[:len(line) // 2]


def bogus_function(line):
    call = json.loads(line)
    call["function"] = "SCardBogus"
    return json.dumps(call) + "\n"


def without_rv(line):
    call = json.loads(line)
    del call["rv"]
    return json.dumps(call) + "\n"


def bad_hex(line):
    return re.sub(r'"hex":"[0-9A-F]+"', '"hex":"XYZ"', line, count=1)


# name: (line number, how that line is spoiled); the lines after it are kept,
# except after a cut line (the file ends there).
SPOILED = {
    "cut in the middle of a line": (6, cut),
    "bogus function name": (5, bogus_function),
    "not JSON": (4, lambda line: "this is not JSON\n"),
    "a field missing": (7, without_rv),
    "bad hex": (None, bad_hex),   # the first line holding a buffer
    "a second header": (3, lambda line: None),
}


@pytest.mark.parametrize("case", list(SPOILED))
def test_corrupt_recording(recording, tmp_path, case):
    number, spoil = SPOILED[case]
    if number is None:
        number = next(n for n, line in enumerate(recording, 1) if re.search(r'"hex":"[0-9A-F]+"', line))
    lines = list(recording)
    lines[number - 1] = spoil(lines[number - 1]) or lines[0]
    if spoil is cut:
        lines = lines[:number]
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(lines))
    good = tmp_path / "good.jsonl"
    good.write_text("".join(recording[:number - 1]))
    res = render("-n", "-r", bad)
    assert res.returncode == 2, res.stderr
    # the calls before it, as a recording that stops there shows them
    before = render("-n", "-r", good)
    assert before.returncode == 0, before.stderr
    assert len(parse_trace(before.stdout).calls) == number - 2
    assert res.stdout == before.stdout
    # then one line naming the file and the line
    assert "Traceback" not in res.stderr
    (line,) = res.stderr.splitlines()
    assert line.startswith("pcsc-ebpf-spy: error: %s, line %d: " % (bad, number)), line


@pytest.mark.parametrize("path", ["/etc/passwd", "/bin/true", "EMPTY"])
def test_a_file_that_is_no_recording(tmp_path, path):
    if path == "EMPTY":
        path = tmp_path / "empty"
        path.write_text("")
    res = render("-n", "-r", path)
    check_one_line_error(res, r"%s, line 1: " % re.escape(str(path)))


def test_a_missing_file():
    res = render("-n", "-r", "/nonexistent/trace.jsonl")
    check_one_line_error(res, r"/nonexistent/trace\.jsonl", r"No such file or directory")


@pytest.mark.parametrize("options", [["-p", "1"], ["-w", "/tmp/never-written.jsonl"],
                                     ["--lib", "/usr/lib/x86_64-linux-gnu/libpcsclite.so.1"],
                                     ["--", "true"]], ids=lambda o: o[0])
def test_read_takes_no_tracing_options(recording, tmp_path, options):
    rec = tmp_path / "trace.jsonl"
    rec.write_text("".join(recording))
    res = render("-n", "-r", rec, *options)
    check_one_line_error(res, r"-r", r"--help")
    assert not os.path.exists("/tmp/never-written.jsonl")


def test_json_of_a_recording_is_the_recording(recording, tmp_path):
    """--json -r FILE: the recording as it was written (its header too: the
    start time, kernel and libraries of the traced run)."""
    rec = tmp_path / "trace.jsonl"
    rec.write_text("".join(recording))
    res = render("--json", "-r", rec)
    assert res.returncode == 0, res.stderr
    out = res.stdout.splitlines(keepends=True)
    assert out[1:] == recording[1:]
    assert json.loads(out[0]) == json.loads(recording[0])


def test_reader_of_stdout_going_away(recording, tmp_path):
    """`pcsc-ebpf-spy -r FILE | head`: the reader leaves early, the tracer
    ends quietly with status 0 (ebpf_pcsc/cli.py: nothing left to say), not
    1, which --expect uses for "the trace differs"."""
    rec = tmp_path / "long.jsonl"
    rec.write_text(recording[0] + "".join(recording[1:]) * 30)   # megabytes of text
    p = subprocess.Popen(command("-n", "-r", rec), cwd=ROOT, stdin=subprocess.DEVNULL,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert p.stdout.readline() == b"SCardEstablishContext\n"
    p.stdout.close()
    err = p.stderr.read()
    assert p.wait(60) == 0, err
    assert b"Traceback" not in err
