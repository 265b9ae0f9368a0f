"""Reading pcsc-lite's own spy log (ebpf_pcsc.spylog): a raw log written by
libpcscspy 1.9.9 and rendered by our pcsc_text must print what `pcsc-spy
LOG` prints for it.

The reference is real: the C client's scenarios run under
LD_PRELOAD=libpcscspy.so.0 against the private stack, the raw log taken from
the $HOME/pcsc-spy FIFO (tests/spy_reference.py), and /usr/bin/pcsc-spy run on
it.  Six logs and pcsc-spy's `-n -d` text of each are kept in
tests/data/spylogs/ (see its README.md); the same comparisons also run on
logs captured during the test run.

Both texts must be identical but for the documented differences
(docs/differences-from-pcsc-spy.md), undone on pcsc-spy's side by
`as_we_print`: SCardControl's name (§1), SCardCancel's argument label (§2)
and, under -d, SCardConnect's phCard and SCardFreeMemory's pvMem unless
NULL (§5).  The
other differences of the live tracer do not apply to a log: the buffers of a
failed call are printed as the log has them, as pcsc-spy does (§3), and the
timings are the log's own (§10), so even the summary is pcsc-spy's: every
line, timings included (see `assert_same_summary`).  Where pcsc-spy's
threads race (how two threads' lines interleave, §12), each thread's lines
are compared.
"""
import difflib
import json
import re
import sys
from pathlib import Path
from typing import Dict, List

import pytest

import spy_reference as ref
from ebpf_pcsc import layout as L
from ebpf_pcsc import record, spylog
from rendering import TextOutput, render_calls

TESTS = Path(__file__).resolve().parent
DATA = TESTS / "data" / "spylogs"
LOG = "raw.log"   # the path FormatError names

# Fixture name -> the C client's scenario (tests/clients/README.md).
FIXTURES = {
    "all": ["all"],
    "attrs": ["attrs"],
    "blocked": ["blocked"],
    "readers16": ["readers16"],
    "threads_2_3": ["threads", "2", "3"],
    "nullrecvpci": ["nullrecvpci"],
}
SINGLE_THREAD = ["all", "attrs", "readers16", "nullrecvpci"]
SEVERAL_THREADS = ["blocked", "threads_2_3"]


def fixture_log(name: str) -> str:
    return (DATA / (name + ".log")).read_text(encoding="utf-8")


def fixture_text(name: str) -> str:
    return (DATA / (name + ".spy")).read_text(encoding="utf-8")


# -- our side ---------------------------------------------------------------------

def ours(raw: str, diffable: bool = True, color: bool = False) -> str:
    """Our text for a raw log: spylog.replay into TextSink, then the summary."""
    output = TextOutput(diffable=diffable, color=color)
    spylog.replay(LOG, raw.splitlines(keepends=True), output)
    return output.printed(summary=True)


# -- pcsc-spy's side: the documented differences undone ---------------------------

_COLOR = r"(?:\x1b\[[0-9;]*m)?"
_NAME = re.compile(r"^((?:    )*)(%s)(SCar\w+)" % _COLOR)
_ARG = re.compile(r"^((?:    )*)(%s) ([io]) " % _COLOR)


def as_we_print(text: str, diffable: bool = True) -> List[str]:
    """pcsc-spy's lines, each documented difference made as we print it.
    A line belongs to the call last started at its indent (the threads)."""
    current: Dict[str, str] = {}
    out = []
    for line in text.splitlines():
        m = _NAME.match(line)
        if m:
            current[m.group(1)] = m.group(3)
            # §1: pcsc-spy 1.9.9 prints "SCarControl".
            line = line.replace("SCarControl", "SCardControl", 1)
        m = _ARG.match(line)
        if m:
            fn = current.get(m.group(1))
            if fn == "SCardCancel":
                # §2: SCardCancel takes an SCARDCONTEXT.
                line = line.replace(" i hCard: ", " i hContext: ", 1)
            elif diffable and fn == "SCardConnect":
                # §5: -d masks phCard (not NULL).
                line = re.sub(r" ([io]) phCard 0x[0-9A-F]+ \(\d+\)", r" \1 phCard 0x????", line)
            elif diffable and fn == "SCardFreeMemory":
                # §5: -d masks pvMem (not NULL).
                line = re.sub(r" i pvMem: 0x[0-9a-f]+ \(\d+\)", " i pvMem: 0x????", line)
        out.append(line)
    return out


def thread_streams(lines: List[str]) -> Dict[int, List[str]]:
    """The call lines of each thread (by indent: 4 spaces per thread)."""
    streams: Dict[int, List[str]] = {}
    for line in lines:
        plain = re.sub(r"\x1b\[[0-9;]*m", "", line)
        streams.setdefault((len(plain) - len(plain.lstrip(" "))) // 4, []).append(line)
    return streams


# -- comparing ---------------------------------------------------------------------

_PERCENT = re.compile(r"^(\d+\.\d{6} sec \( *\d+ calls\) +)(\d+\.\d{2})(% \w+)$")


def assert_same_text(ours_lines: List[str], spy_lines: List[str], what: str) -> None:
    if ours_lines != spy_lines:
        diff = "\n".join(list(difflib.unified_diff(spy_lines, ours_lines, "pcsc-spy",
                                                   "ours", lineterm="", n=2))[:80])
        pytest.fail("%s: our text differs from pcsc-spy's\n%s" % (what, diff), pytrace=False)


def assert_same_summary(ours_summary: List[str], spy_summary: List[str], what: str,
                        exact_percent: bool = False) -> None:
    """Every summary line the same, timings included (they are the log's).

    Except the percentages, by 0.01 at most: Stats.total_seconds divides by
    the exact microseconds, pcsc-spy by (sec + usec / 1e6) - (sec + usec /
    1e6) of the epoch times, a float 1e-7 off, which moves the second
    decimal of a percentage now and then (see
    test_summary_percentages_exactly_pcsc_spys)."""
    assert len(ours_summary) == len(spy_summary), (what, ours_summary, spy_summary)
    for a, b in zip(ours_summary, spy_summary):
        if a == b:
            continue
        ma, mb = _PERCENT.match(a), _PERCENT.match(b)
        close = (not exact_percent and ma and mb and ma.group(1) == mb.group(1)
                 and ma.group(3) == mb.group(3)
                 and abs(float(ma.group(2)) - float(mb.group(2))) < 0.0101)
        assert close, "%s: summary line %r, pcsc-spy %r" % (what, a, b)


def compare(raw: str, spy_text: str, name: str, threads: bool = False) -> None:
    """Our -n -d text for raw against pcsc-spy's."""
    o_calls, o_summary = ref.split_summary(ours(raw))
    s_calls, s_summary = ref.split_summary("\n".join(as_we_print(spy_text)) + "\n")
    assert o_calls, "%s: no call" % name
    if threads:
        o, s = thread_streams(o_calls), thread_streams(s_calls)
        assert sorted(o) == sorted(s), name
        for n in sorted(o):
            assert_same_text(o[n], s[n], "%s, thread %d" % (name, n + 1))
    else:
        assert_same_text(o_calls, s_calls, name)
    assert_same_summary(o_summary, s_summary, name)


# -- the stored logs -------------------------------------------------------------

@pytest.mark.parametrize("name", SINGLE_THREAD)
def test_stored_log_same_text_as_pcsc_spy(name):
    compare(fixture_log(name), fixture_text(name), name)


@pytest.mark.parametrize("name", SEVERAL_THREADS)
def test_stored_log_several_threads_same_text_per_thread(name):
    compare(fixture_log(name), fixture_text(name), name, threads=True)


def test_stored_blocked_call_in_log_order():
    """pcsc-spy prints a call's inputs when they come: the blocked
    SCardGetStatusChange's inputs, then SCardCancel from the other thread,
    then the blocked call's outputs; so do we (the log's order)."""
    calls, _ = ref.split_summary(ours(fixture_log("blocked")))
    starts = [i for i, line in enumerate(calls) if line.strip().startswith("SCard")]
    names = [calls[i] for i in starts]
    assert names[-3:] == ["    SCardGetStatusChange", "SCardCancel", "SCardReleaseContext"]
    cancel = calls.index("SCardCancel")
    blocked = calls.index("    SCardGetStatusChange")
    result = calls.index("     => Command cancelled. (SCARD_E_CANCELLED [0x80100002])  [??.??]")
    assert blocked < cancel < result
    assert calls[cancel + 1] == " i hContext: 0x????"
    # The blocked call's outputs come after SCardCancel's input line.
    assert calls.index("     o szReader: Virtual PCD 00 00") > cancel + 1


def test_summary_percentages_exactly_pcsc_spys():
    """readers16's summary: a percentage differs in its second decimal unless
    the total time is pcsc-spy's computation, (sec + usec / 1e6) - (sec +
    usec / 1e6)."""
    _, o_summary = ref.split_summary(ours(fixture_log("readers16")))
    _, s_summary = ref.split_summary(fixture_text("readers16"))
    assert o_summary == s_summary
    assert_same_summary(o_summary, s_summary, "readers16", exact_percent=True)


def test_stored_log_without_diffable_is_pcsc_spys_text_and_timings():
    """Without -d every handle, pointer and time is printed: pcsc-spy -n's
    text, the call times to the microsecond (both take them from the log)."""
    raw = fixture_log("all")
    spy = ref.render(raw, "-n")
    assert not spy.crashed, spy.stderr
    o_calls, o_summary = ref.split_summary(ours(raw, diffable=False))
    s_calls, s_summary = ref.split_summary("\n".join(as_we_print(spy.stdout, False)) + "\n")
    assert_same_text(o_calls, s_calls, "all -n")
    assert any(re.search(r"\)  \[0\.\d{6}\]$", line) for line in o_calls)
    assert_same_summary(o_summary, s_summary, "all -n")


def test_stored_log_in_color_is_pcsc_spys():
    raw = fixture_log("attrs")
    spy = ref.render(raw, "-d")
    o_calls, _ = ref.split_summary(ours(raw, color=True))
    s_calls, _ = ref.split_summary("\n".join(as_we_print(spy.stdout)) + "\n")
    assert "\x1b[34mSCardConnect\x1b[0m" in o_calls
    assert_same_text(o_calls, s_calls, "attrs in color")


@pytest.mark.parametrize("name", SINGLE_THREAD)
def test_read_calls_gives_the_same_calls(name):
    """read_calls: the calls replay hands over, in the order of their return
    lines; call by call they print the same text for one thread."""
    raw = fixture_log(name)
    calls = spylog.read_calls(LOG, raw.splitlines(keepends=True))
    assert render_calls(calls, summary=True, diffable=True) == ours(raw)


def log_values(raw: str, thread: int, first: str) -> List[str]:
    """The payloads of a thread's lines from its line `first` (a call's '>'
    line, without its timestamps: ">|SCardXxx") to the next return line."""
    out, on = [], False
    for line in raw.splitlines():
        t, _, payload = line.partition("@")
        if int(t, 16) != thread:
            continue
        if not on and payload.startswith(">|") and payload.endswith("|" + first[2:]):
            on = True
        if on:
            out.append(payload)
            if payload.startswith("<|"):
                return out
    raise AssertionError("no %s on thread %X" % (first, thread))


def test_read_calls_order_and_values():
    raw = fixture_log("blocked")
    calls = list(spylog.read_calls(LOG, raw.splitlines(keepends=True)))
    # In the order of their return lines (SCardCancel and the call it
    # cancels return in either order).
    returns = [(int(line.split("@")[0], 16), line.split("|")[3])
               for line in raw.splitlines() if "@<|" in line]
    assert [(c.tid, c.name) for c in calls] == returns
    threads = []
    for line in raw.splitlines():
        tid = int(line.split("@")[0], 16)
        if tid not in threads:
            threads.append(tid)
    main, other = threads
    assert sorted(returns) == sorted(
        [(main, "SCardEstablishContext"), (main, "SCardListReaders"),
         (main, "SCardGetStatusChange"), (other, "SCardGetStatusChange"),
         (main, "SCardCancel"), (main, "SCardReleaseContext")])
    assert {(c.pid, c.comm) for c in calls} == {(0, "")}
    [blocked] = [c for c in calls if c.tid == other]
    lines = log_values(raw, other, ">|SCardGetStatusChange")
    _, sec, usec, _ = lines[0].split("|")
    _, rsec, rusec, _, text, rv = lines[-1].split("|")
    assert blocked.call_ts == int(sec) * 10 ** 9 + int(usec) * 1000
    assert blocked.ret_ts == int(rsec) * 10 ** 9 + int(rusec) * 1000
    assert (text, rv) == ("Command cancelled.", "0x80100002") and blocked.rv == 0x80100002
    assert blocked.args["hContext"] == int(lines[1], 16)
    assert blocked.args["dwTimeout"] == 0xFFFFFFFF and blocked.args["cReaders"] == 1
    [entry] = blocked.entry.readers["rgReaderStates"]
    [exit_] = blocked.exit.readers["rgReaderStates"]
    assert (entry.reader, entry.current_state, entry.event_state, entry.cb_atr) == \
        ("Virtual PCD 00 00", 0x20, 0, 0)
    assert (exit_.event_state, exit_.cb_atr, exit_.atr) == \
        (0x00010020, 5, bytes.fromhex("3B 80 80 01 01"))


def test_pointer_arguments_and_captures():
    """NULL and non-NULL pointers, as the renderer reads them."""
    raw = fixture_log("attrs")
    calls = list(spylog.read_calls(LOG, raw.splitlines(keepends=True)))
    thread = calls[0].tid
    size_query, into_buffer, autoalloc, free, too_small = [
        c for c in calls if c.name in ("SCardGetAttrib", "SCardFreeMemory")]
    assert size_query.args["pbAttr"] == 0
    assert size_query.exit.words["pcbAttrLen"] == 5
    assert size_query.exit.data["pbAttr"].is_null
    assert size_query.exit.data["pbAttr"].flags == L.PCSC_DATA_NULL
    assert into_buffer.args["pbAttr"] == 1
    assert into_buffer.exit.data["pbAttr"].data == bytes.fromhex("3B 80 80 01 01")
    assert autoalloc.exit.data["pbAttr"].data == bytes.fromhex("3B 80 80 01 01")
    pv_mem = log_values(raw, thread, ">|SCardFreeMemory")[2]
    assert re.match(r"^0x[0-9a-f]+$", pv_mem) and free.args["pvMem"] == int(pv_mem, 16)
    # A failed call's buffer is kept as logged (pcsc-spy prints it too).
    assert too_small.rv == 0x80100008
    assert too_small.exit.data["pbAttr"].data == bytes.fromhex("3B 80 00 00 00")
    connect = next(c for c in calls if c.name == "SCardConnect")
    card = log_values(raw, thread, ">|SCardConnect")[7]
    assert connect.entry.data["szReader"].data == b"Virtual PCD 00 00"
    assert connect.entry.words == {"phCard": 0, "pdwActiveProtocol": 0}
    assert connect.exit.words == {"phCard": int(card, 16), "pdwActiveProtocol": 2}
    assert connect.args["phCard"] == connect.args["pdwActiveProtocol"] == 1
    listed = next(c for c in calls if c.name == "SCardListReaders")
    assert listed.entry.data["mszGroups"].is_null and listed.args["mszGroups"] == 0
    assert listed.exit.data["mszReaders"].data == b"Virtual PCD 00 00\0Virtual PCD 00 01\0\0"


def test_calls_are_json_recordable():
    """-r LOG -w FILE / --json: the calls survive record.py's round trip."""
    raw = fixture_log("all")
    for call in spylog.read_calls(LOG, raw.splitlines(keepends=True)):
        obj = json.loads(json.dumps(record.call_to_json(call)))
        again = record.call_from_json(obj)
        assert (again.name, again.args, again.entry, again.exit, again.rv, again.call_ts,
                again.ret_ts) == (call.name, call.args, call.entry, call.exit, call.rv,
                                  call.call_ts, call.ret_ts)


# -- detection ---------------------------------------------------------------------

def test_looks_like():
    for name in FIXTURES:
        assert spylog.looks_like(fixture_log(name).splitlines(keepends=True)[0]), name
    assert spylog.looks_like("7F12@>|1700000000|123456|SCardConnect\n")
    assert spylog.looks_like("7F12@>|1700000000|123456|SCardConnect")
    for line in ['{"type":"header","format":"pcsc-ebpf-spy/1"}\n',
                 "7F12@0x00000002\n",
                 "7F12@<|1700000000|123999|SCardConnect|Command successful.|0x00000000\n",
                 "SCardEstablishContext\n", "", "\n", "garbage\n", "\x7fELF\x02\x01"]:
        assert not spylog.looks_like(line), line


# -- logs that end inside a call, truncated or corrupt logs -----------------------

def lines_of(name: str) -> List[str]:
    return fixture_log(name).splitlines(keepends=True)


def read_until_error(lines: List[str]):
    """(calls read, FormatError or None)."""
    calls = []
    try:
        for call in spylog.read_calls(LOG, lines):
            calls.append(call)
    except record.FormatError as e:
        return calls, e
    return calls, None


def error_line(e: record.FormatError) -> int:
    m = re.match(r"^%s, line (\d+): " % re.escape(LOG), e.problem)
    assert m, e.problem
    return int(m.group(1))


def test_unfinished_call_application_killed():
    """nullrecvpci: libpcscspy 1.9.9 kills the application inside
    SCardTransmit: the log stops after its inputs.  The call is unfinished
    (no error): pcsc-spy prints its inputs and no result, and so do we."""
    lines = lines_of("nullrecvpci")
    calls, error = read_until_error(lines)
    assert error is None
    last = calls[-1]
    assert (last.name, last.rv, last.exit, last.ret_ts, last.aborted) == \
        ("SCardTransmit", None, None, None, False)
    assert all(c.rv is not None for c in calls[:-1])
    output = TextOutput(diffable=True)
    spylog.replay(LOG, lines, output)
    assert [c.name for c in output.unfinished_calls] == ["SCardTransmit"]
    text, _ = ref.split_summary(output.printed())
    assert text[-7:] == [
        "SCardTransmit", " i hCard: 0x????", " i pioSendPci.dwProtocol: 0x????",
        " i pioSendPci.cbPciLength: 0x????", " i bSendLength 0x0000000C (12)", " i bSendBuffer",
        " i  0000 00 A4 04 00 07 A0 00 00 03 08 00 00             ............"]


def test_truncated_inside_the_inputs():
    """Cut inside a call's inputs: the calls before are read, then
    FormatError names the call's line."""
    lines = lines_of("attrs")
    connect = next(i for i, line in enumerate(lines) if line.endswith("|SCardConnect\n"))
    calls, error = read_until_error(lines[:connect + 3])   # '>', hContext, szReader
    assert [c.name for c in calls] == ["SCardEstablishContext", "SCardListReaders"]
    assert error is not None and error_line(error) == connect + 1
    assert "SCardConnect is cut short: the log ends before its dwShareMode" in error.problem


def test_truncated_inside_the_outputs():
    lines = lines_of("attrs")
    connect = next(i for i, line in enumerate(lines) if line.endswith("|SCardConnect\n"))
    calls, error = read_until_error(lines[:connect + 8])   # inputs + phCard out
    assert [c.name for c in calls] == ["SCardEstablishContext", "SCardListReaders"]
    assert error_line(error) == connect + 1
    assert "before its pdwActiveProtocol" in error.problem


def test_truncated_mid_line():
    """A last line without its newline was cut: its number."""
    lines = lines_of("attrs")
    for cut in (5, 12, 13, 30):
        calls, error = read_until_error(lines[:cut - 1] + [lines[cut - 1][:9]])
        assert error is not None and error_line(error) == cut, cut
        assert "unfinished line" in error.problem
        assert all(c.rv is not None for c in calls)
    # A cut return line: 0x8010000 would read as a wrong result.
    last = lines[-1]
    calls, error = read_until_error(lines[:-1] + [last[:-2]])
    assert error_line(error) == len(lines) and "unfinished line" in error.problem
    assert len(calls) == len(list(spylog.read_calls(LOG, lines))) - 1


@pytest.mark.parametrize("name", ["all", "blocked", "threads_2_3"])
def test_every_cut(name):
    """The log cut after each of its lines: every call whose return line is
    kept is read, as from the whole log, in the same order; the calls cut
    between their inputs and outputs are unfinished; any other cut is a
    FormatError naming the line of a call the cut is inside."""
    lines = lines_of(name)
    whole = list(spylog.read_calls(LOG, lines))
    # Each call's '>' and '<' line numbers, from the log itself; a thread's
    # calls are in order.
    started, returned, open_, per_thread = [], {}, {}, {}
    for n, line in enumerate(lines, 1):
        thread, _, tail = line.rstrip("\n").partition("@")
        if tail.startswith(">|"):
            open_[thread] = n
            started.append(n)
            per_thread.setdefault(int(thread, 16), []).append(n)
        elif tail.startswith("<|"):
            returned[open_.pop(thread)] = n
    assert len(started) == len(whole)
    start_of = {}
    for tid, starts in per_thread.items():
        mine = sorted((c for c in whole if c.tid == tid), key=lambda c: c.call_ts)
        start_of.update((id(c), s) for c, s in zip(mine, starts))
    for k in range(len(lines) + 1):
        calls, error = read_until_error(lines[:k])
        complete = [c for c in calls if c.rv is not None]
        expected = [c for c in whole if returned[start_of[id(c)]] <= k]
        assert [(c.name, c.tid, c.call_ts, c.rv, c.exit) for c in complete] == \
            [(c.name, c.tid, c.call_ts, c.rv, c.exit) for c in expected], k
        inside = {s for s in started if s <= k < returned[s]}
        if error is not None:
            assert error_line(error) in inside, (k, error.problem)
        unfinished = [c for c in calls if c.rv is None]
        assert {start_of[id(w)] for w in whole for u in unfinished
                if (w.tid, w.call_ts) == (u.tid, u.call_ts)} <= inside
        if error is None:
            assert len(unfinished) == len(inside), k


def test_garbage_is_a_format_error_on_line_1():
    for garbage in (["hello world\n"], ['{"type":"header"}\n'], ["\n"],
                    ["7F12@0x00000002\n"], ["\x00\x01\x02"], ["7F12@>|1|2|SCardFoo\n"],
                    ["not-hex@>|1|2|SCardConnect\n"]):
        calls, error = read_until_error(garbage)
        assert calls == [] and error is not None and error_line(error) == 1, garbage


def test_empty_log_has_no_calls():
    assert read_until_error([]) == ([], None)


def test_corrupt_line_after_calls():
    """A value that is not what the format says: FormatError at that line,
    after the calls before it."""
    lines = lines_of("attrs")
    n = next(i for i, line in enumerate(lines) if line.endswith("@3B 80 80 01 01 \n"))
    for bad in ("3B 80 80 01 \n",          # 4 bytes, the length says 5
                "3B 80 80 01 0G \n",       # not hex
                "<|1795798684|3321|SCardGetAttrib|Command successful.|0x00000000\n"):
        broken = lines[:n] + [lines[n].split("@")[0] + "@" + bad] + lines[n + 1:]
        calls, error = read_until_error(broken)
        assert [c.name for c in calls] == ["SCardEstablishContext", "SCardListReaders",
                                           "SCardConnect", "SCardGetAttrib"], bad
        assert error_line(error) == n + 1, (bad, error.problem)
        assert "SCardGetAttrib" in error.problem and "pbAttr" in error.problem
    # The replay renders the calls before, then raises.
    output = TextOutput(diffable=True)
    broken = lines[:n] + [lines[n].replace("3B 80 80 01 01 ", "3B 80")] + lines[n + 1:]
    with pytest.raises(record.FormatError) as e:
        spylog.replay(LOG, broken, output)
    assert error_line(e.value) == n + 1
    assert output.printed().count(" => ") == 4


def test_wrong_return_line():
    lines = lines_of("attrs")
    n = next(i for i, line in enumerate(lines) if "<|" in line and "SCardConnect" in line)
    broken = lines[:n] + [lines[n].replace("|SCardConnect|", "|SCardStatus|")] + lines[n + 1:]
    calls, error = read_until_error(broken)
    assert error_line(error) == n + 1 and "SCardStatus returns, SCardConnect was called" \
        in error.problem


def test_odd_but_valid_values():
    """A reader name with '@' (pcsc-spy 1.9.9 raises on it), a NULL reader
    name, CRLF line ends, a negative LONG result."""
    lines = lines_of("attrs")
    text = "".join(lines).replace("@Virtual PCD 00 00\n", "@Virtual@PCD 00 00\n", 1)
    calls = list(spylog.read_calls(LOG, text.splitlines(keepends=True)))
    assert calls[1].exit.data["mszReaders"].data.startswith(b"Virtual@PCD 00 00\0")
    text = "".join(lines).replace("@(null)\n", "@Group\n")
    calls = list(spylog.read_calls(LOG, text.replace("\n", "\r\n").splitlines(keepends=True)))
    assert calls[1].entry.data["mszGroups"].data == b"Group"
    text = "".join(lines).replace("|0x80100008\n", "|0xFFFFFFFFFFFFFFFF\n")
    calls = list(spylog.read_calls(LOG, text.splitlines(keepends=True)))
    assert calls[-3].rv == -1


# -- live: captured during the test run --------------------------------------------

LIVE = {
    "all": ["all"], "attrs": ["attrs"], "readers16": ["readers16"], "blocked": ["blocked"],
    "threads_2_3": ["threads", "2", "3"], "extended65k": ["extended65k"],
    "nullrecvpci": ["nullrecvpci"], "errors": ["errors"], "nullargs": ["nullargs"],
}


@pytest.fixture(scope="module")
def live(session_stack, client_bin):
    """Each scenario run under libpcscspy, its raw log."""
    if not session_stack.card_running:
        session_stack.start_card()
    logs = {}
    for name, scenario in LIVE.items():
        run = ref.record(session_stack, [client_bin] + scenario)
        expected_rc = -11 if name == "nullrecvpci" else 0   # doc §4
        assert run.returncode == expected_rc, (name, run.stderr)
        assert run.raw, name
        logs[name] = run.raw
    return logs


@pytest.mark.parametrize("name", ["all", "attrs", "readers16", "extended65k", "nullrecvpci"])
def test_live_same_text_as_pcsc_spy(live, name):
    spy = ref.render(live[name])
    assert not spy.crashed, spy.stderr
    compare(live[name], spy.stdout, name)


def test_torn_pcsc_spy_text_is_recognised():
    """pcsc-spy's threads can glue one line to another (see ref.torn): the
    live multi-thread comparisons render such a log again."""
    whole = ("SCardCancel\n i hContext: 0x????\n     o szReader: Virtual PCD 00 00\n"
             " => Command successful. (SCARD_S_SUCCESS [0x00000000])  [??.??]\n"
             "\nThread 1/2\n")
    torn = ("SCardCancel\n i hContext: 0x????     o szReader: Virtual PCD 00 00\n\n"
            " => Command successful. (SCARD_S_SUCCESS [0x00000000])  [??.??]\n"
            "\nThread 1/2\n")
    assert not ref.torn(whole)
    assert ref.torn(torn)


@pytest.mark.parametrize("name", ["blocked", "threads_2_3"])
def test_live_several_threads_same_text_per_thread(live, name):
    spy = ref.render_whole(live[name])
    assert not spy.crashed, spy.stderr
    compare(live[name], spy.stdout, name, threads=True)
    threads = {c.tid for c in spylog.read_calls(LOG, live[name].splitlines(keepends=True))}
    assert len(threads) == (2 if name == "blocked" else 3)


def test_live_extended_apdu_values(live):
    """extended65k: 65,007 bytes out, 65,002 back, byte for byte."""
    calls = list(spylog.read_calls(LOG, live["extended65k"].splitlines(keepends=True)))
    [t] = [c for c in calls if c.name == "SCardTransmit"]
    data = bytes((i * 7) & 0xFF for i in range(65000))
    assert t.entry.data["pbSendBuffer"].data == bytes([0x80, 0x10, 0, 0, 0, 0xFD, 0xE8]) + data
    assert t.exit.data["pbRecvBuffer"].data == data + b"\x90\x00"


@pytest.mark.parametrize("name,function,expected", [
    # doc §7: pcsc-spy 1.9.9 raises at this SCardStatus ("Vi", then 15 empty
    # strings: the name as logged, up to the 18 bytes it says).
    ("errors", "SCardStatus", [
        "SCardStatus", " i hCard: 0x????", " i pcchReaderLen 0x00000002 (2)",
        " i pcbAtrLen 0x00000021 (33)", " o cchReaderLen 0x00000012 (18)",
        " o mszReaderName Vi", " o dwState 0x00010034 (65588)", " o dwProtocol 0x00000002 (2)",
        " o bAtrLen 0x00000005 (5)", " o bAtr 3B 80 80 01 01",
        " => Insufficient buffer. (SCARD_E_INSUFFICIENT_BUFFER [0x80100008])  [??.??]"]),
    # doc §6: pcsc-spy 1.9.9 raises at a NULL pcchReaders.
    ("nullargs", "SCardListReaders", [
        "SCardListReaders", " i hContext: 0x????", " i mszGroups: (null)",
        " o pcchReaders: NULL", " o mszReaders: NULL",
        " => Invalid parameter given. (SCARD_E_INVALID_PARAMETER [0x80100004])  [??.??]"]),
])
def test_live_logs_pcsc_spy_cannot_read(live, name, function, expected):
    """pcsc-spy 1.9.9's reader raises on one call of these logs: we print that
    call, and the rest is pcsc-spy's text once the call is removed from the
    log (spy_reference.without_calls)."""
    raw = live[name]
    assert ref.render(raw).crashed
    calls, _ = ref.split_summary(ours(raw))
    start = calls.index(function)
    assert calls[start:start + len(expected)] == expected
    rest = ref.without_calls(raw, lambda fn, n: fn == function and n == 0)
    spy = ref.render(rest)
    assert not spy.crashed, spy.stderr
    compare(rest, spy.stdout, name)


# -- the stored logs, made again -----------------------------------------------------

def regenerate(client: str) -> None:
    """Capture the stored logs again (python3 tests/test_spylog.py CLIENT,
    as root; CLIENT: tests/clients/pcsc_client.c compiled)."""
    from testbed import PcscStack
    with PcscStack() as stack:
        for name, scenario in FIXTURES.items():
            run = ref.record(stack, [client] + scenario)
            (DATA / (name + ".log")).write_text(run.raw, encoding="utf-8")
            (DATA / (name + ".spy")).write_text(ref.render(run.raw).stdout, encoding="utf-8")
            print(name, run.returncode, len(run.raw))


if __name__ == "__main__":
    sys.path.insert(0, str(TESTS.parent))
    regenerate(sys.argv[1])
