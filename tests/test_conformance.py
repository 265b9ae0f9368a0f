"""Conformance with the reference: the same workloads under pcsc-spy 1.9.9
(libpcscspy preloaded, tests/spy_reference.py) and under pcsc-ebpf-spy, both
`-n -d`, compared line by line.

The two texts must be identical except for the differences that
docs/differences-from-pcsc-spy.md lists.  Each one is undone on pcsc-spy's
side by a named function below (its docstring names the doc's section, "doc
§N"), applied only where the difference can occur, so that anything else
that differs fails.  The
summaries are compared without their numbers (pcsc-spy's -d does not mask
them, see spy_reference.summary_counts).

Then one test per pcsc-spy 1.9.9 defect we do not copy, each showing both
outputs, and the tests of what only we print (several processes, lost
events, timings).

Cost: a tracer takes seconds to start (BPF compilation) and to stop
(detaching each uprobe waits for an RCU grace period, and the kernel
serialises detaches across processes), so every workload of this module runs
once, in the module fixture `runs`: all tracers are started together (each
with -p on a waiting application), the applications are released one after
the other, and pcsc-spy runs while the tracers stop.
"""
import difflib
import os
import re
import signal
import subprocess
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import pytest

import spy_reference as ref
from tracer import Tracer

TESTS = Path(__file__).resolve().parent
CTYPES_CLIENT = str(TESTS / "pcsc_ctypes_client.py")
PYTHON = "/usr/bin/python3"
# pcsc_scan passes a SCARD_READERSTATE whose dwEventState and cbAtr it never
# set (they hold addresses from its own image); without ASLR they are the same
# on every run, so both traces show the same values.
PCSC_SCAN = ["setarch", "-R", "pcsc_scan", "-r"]
SUCCESS = "[0x00000000]"

# -- running the workloads -----------------------------------------------------


@dataclass
class App:
    """An application started in a shell that waits for a line on stdin
    before exec'ing it: a tracer can be pointed at its pid (-p) before it
    makes its first call; exec keeps the pid."""
    argv: List[str]
    proc: subprocess.Popen
    returncode: Optional[int] = None
    stdout: str = ""
    stderr: str = ""

    @classmethod
    def waiting(cls, stack, argv: Sequence[str]) -> "App":
        proc = subprocess.Popen(["sh", "-c", 'read _ && exec "$@"', "sh", *argv],
                                env=stack.env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        return cls(list(argv), proc)

    def release(self, stdin: str = "", timeout: float = 60) -> None:
        self.stdout, self.stderr = self.proc.communicate("go\n" + stdin, timeout=timeout)
        self.returncode = self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@dataclass
class Ours:
    """Applications traced by one pcsc-ebpf-spy (-p each of them)."""
    options: Sequence[str]
    apps: List[App]
    stdin: str = ""           # for the (first) application, after its "go"
    frozen: bool = False      # SIGSTOP the tracer while the applications run
    tracer: Optional[Tracer] = None
    stdout: str = ""
    stderr: str = ""
    returncode: Optional[int] = None

    @property
    def app(self) -> App:
        return self.apps[0]

    def start(self) -> None:
        pids = [arg for app in self.apps for arg in ("-p", app.proc.pid)]
        self.tracer = Tracer(*self.options, *pids)

    def run(self) -> None:
        if self.frozen:
            self.tracer.proc.send_signal(signal.SIGSTOP)
        for n, app in enumerate(self.apps):
            app.release(self.stdin if n == 0 else "")
        if self.frozen:
            self.tracer.proc.send_signal(signal.SIGCONT)
        # Every event is in the buffer when the application has exited;
        # the tracer drains it after the signal, then prints the summary.
        time.sleep(0.2)
        self.tracer.proc.send_signal(signal.SIGINT)

    def collect(self) -> None:
        res = self.tracer.stop(settle=0, timeout=300)
        self.stdout, self.stderr, self.returncode = res.stdout, res.stderr, res.returncode

    def kill(self) -> None:
        for app in self.apps:
            app.kill()
        if self.tracer is not None:
            if self.frozen and self.tracer.proc.poll() is None:
                self.tracer.proc.send_signal(signal.SIGCONT)
            self.tracer.kill()


@dataclass
class Reference:
    """One application run under pcsc-spy 1.9.9, and pcsc-spy's text."""
    recorded: ref.Recorded
    rendered: ref.Rendered


@dataclass
class Runs:
    ours: Dict[str, Ours] = field(default_factory=dict)
    spy: Dict[str, Reference] = field(default_factory=dict)

    def __repr__(self):   # shown by pytest on failure: keep it short
        return "Runs(ours=%s, spy=%s)" % (sorted(self.ours), sorted(self.spy))


def extended_echo(n: int) -> bytes:
    """tests/vcard.py's ECHO of n bytes, as an extended APDU."""
    return bytes([0x80, 0x10, 0, 0, 0]) + n.to_bytes(2, "big") + bytes(i & 0xFF for i in range(n))


def client_workloads(client_bin: str) -> Dict[str, List[str]]:
    names = ["all", "attrs", "extended65k", "blocked", "errors", "nullargs", "nullrecvpci"]
    workloads = {name: [client_bin, name] for name in names}
    workloads["pcsc_scan"] = PCSC_SCAN
    workloads["ctypes"] = [PYTHON, CTYPES_CLIENT, "demo"]
    return workloads


@pytest.fixture(scope="module")
def runs(session_stack, client_bin):
    stack = session_stack
    if not stack.card_running:
        stack.start_card()
    workloads = client_workloads(client_bin)
    result = Runs()
    for name, argv in workloads.items():
        result.ours[name] = Ours(("-n", "-d"), [App.waiting(stack, argv)])
    # Without -d, and a second process: the NULL pioRecvPci of §4 shows as
    # NULL, and the several-processes text of §8.
    result.ours["two_processes"] = Ours(("-n",), [
        App.waiting(stack, [client_bin, "nullrecvpci"]),
        App.waiting(stack, [client_bin, "blocked"])])
    # §9: the tracer stopped (SIGSTOP) while the ctypes client sends 80
    # extended APDUs (about 10 MB of events, more than a 1 MiB ring buffer
    # holds): the application does not wait, events are lost, and counted.
    # The ring buffer gets --perf-pages (a power of 2) times the CPU count,
    # rounded up to a power of 2: 1 MiB in all.
    pages = 1 << max(0, 8 - ((os.cpu_count() or 1) - 1).bit_length())
    small = ("--buffer", "ring", "--perf-pages", str(pages))
    result.ours["lost"] = Ours(("-n", "-d") + small, [App.waiting(
        stack, [PYTHON, CTYPES_CLIENT, "transmit", stack.reader_name])],
        stdin=(extended_echo(65000).hex() + "\n") * 80, frozen=True)
    try:
        with ThreadPoolExecutor(max_workers=3) as pool:
            for f in [pool.submit(o.start) for o in result.ours.values()]:
                f.result()
        for o in result.ours.values():
            o.run()
        # pcsc-spy's side, while the tracers detach their probes.
        for name, argv in workloads.items():
            if name == "ctypes":
                continue
            recorded = ref.record(stack, argv)
            result.spy[name] = Reference(recorded, ref.render_whole(recorded.raw))
        # (§5) the same workload again: what -d leaves unmasked changes.
        recorded = ref.record(stack, workloads["attrs"])
        result.spy["attrs_again"] = Reference(recorded, ref.render_whole(recorded.raw))
        # (§11) a dlopen() client: LD_PRELOAD does not reach it; a private
        # libpcsclite.so.1 -> libpcscspy (install_spy.sh's way) does.
        recorded = ref.record(stack, workloads["ctypes"])
        result.spy["ctypes_preload"] = Reference(recorded, ref.Rendered("", "", 0))
        recorded = ref.record(stack, workloads["ctypes"], redirect=True)
        result.spy["ctypes"] = Reference(recorded, ref.render_whole(recorded.raw))
        for o in result.ours.values():
            o.collect()
        yield result
    finally:
        for o in result.ours.values():
            o.kill()


def ours_of(runs: Runs, name: str, lossless: bool = True) -> Ours:
    o = runs.ours[name]
    assert o.returncode == 0, "tracer failed:\n" + o.stderr
    if lossless:
        assert "events lost" not in o.stderr, o.stderr
    return o


def spy_of(runs: Runs, name: str) -> Reference:
    return runs.spy[name]


# -- reading the texts ------------------------------------------------------------

# A line of a call: the thread's indent (4 spaces per thread number), then the
# function's name, or an argument (` i `, ` o `) or the result (` => `).
_LINE = re.compile(r"^(?P<indent>(?:    )*)(?P<body>SCar\w*| [io] .*| => .*)$")


@dataclass
class Call:
    name: str
    indent: str
    lines: List[int] = field(default_factory=list)   # indexes in the text
    result: Optional[str] = None

    @property
    def failed(self) -> bool:
        return self.result is not None and SUCCESS not in self.result


def parse_calls(lines: List[str]) -> List[Call]:
    """The calls of pcsc-spy's text, each with the indexes of its lines
    (threads interleave: a line belongs to the last call started at its
    indent)."""
    calls: List[Call] = []
    current: Dict[str, Call] = {}
    for i, line in enumerate(lines):
        m = _LINE.match(line)
        if not m:
            continue   # SCardControl's parsing lines
        indent, body = m.group("indent"), m.group("body")
        if not body.startswith(" "):
            current[indent] = Call(body, indent)
            calls.append(current[indent])
        call = current.get(indent)
        if call is None:
            continue
        call.lines.append(i)
        if body.startswith(" => "):
            call.result = body
    return calls


def call_blocks(text: str) -> List[List[str]]:
    """The lines of each call, in the order the calls start."""
    lines, _ = ref.split_summary(text)
    return [[lines[i] for i in c.lines] for c in parse_calls(lines)]


def thread_streams(lines: List[str]) -> Dict[str, List[str]]:
    """The call lines of each thread (by indent), in the order printed."""
    threads: Dict[str, List[str]] = {}
    owner = {}
    for c in parse_calls(lines):
        for i in c.lines:
            owner[i] = c.indent
    for i, line in enumerate(lines):
        if i in owner:
            threads.setdefault(owner[i], []).append(line)
    return threads


# -- the documented differences, undone on pcsc-spy's side --------------------------
# Each takes pcsc-spy's call lines and returns them as we print them.

def spell_scardcontrol(lines: List[str]) -> List[str]:
    """doc §1: pcsc-spy 1.9.9 names SCardControl "SCarControl"."""
    return [re.sub(r"^((?:    )*)SCarControl$", r"\1SCardControl", line) for line in lines]


def label_cancel_hcontext(lines: List[str]) -> List[str]:
    """doc §2: pcsc-spy 1.9.9 labels SCardCancel's argument (an SCARDCONTEXT)
    hCard."""
    out = list(lines)
    for c in parse_calls(lines):
        if c.name == "SCardCancel":
            i = c.lines[1]
            out[i] = out[i].replace(" i hCard: ", " i hContext: ", 1)
    return out


_STALE_BUFFERS = {"SCardGetAttrib": " o bAttr", "SCardTransmit": " o bRecvBuffer",
                  "SCardControl": " o bRecvBuffer", "SCarControl": " o bRecvBuffer"}
_DUMP = re.compile(r"^ o  [0-9A-F]{4} ")


def null_stale_buffers(lines: List[str]) -> List[str]:
    """doc §3: after a failed call, pcsc-spy 1.9.9 dumps the output buffer
    (the application's memory: stale, or what the library left there); we
    print the buffer as NULL (its length line stays what the library
    reported).  Only for the output buffers of the failed calls, and only
    where pcsc-spy dumped bytes: an empty one (nothing returned) and a NULL
    pointer read the same on both sides."""
    out: List[str] = list(lines)
    drop = set()
    for c in parse_calls(lines):
        label = _STALE_BUFFERS.get(c.name)
        if not c.failed or label is None:
            continue
        body = [(i, lines[i][len(c.indent):]) for i in c.lines]
        k = next(k for k, (_, b) in enumerate(body) if b == label)
        dump = []
        for i, b in body[k + 1:]:
            if not _DUMP.match(b):
                break
            dump.append(i)
        if dump:
            out[dump[0]] = c.indent + " o  NULL"
            drop.update(dump[1:])
    return [line for i, line in enumerate(out) if i not in drop]


def mask_connect_phcard(lines: List[str]) -> List[str]:
    """doc §5: -d masks SCardConnect's phCard (in and out); pcsc-spy's -d
    leaves it."""
    out = list(lines)
    for c in parse_calls(lines):
        if c.name == "SCardConnect":
            for i in c.lines:
                out[i] = re.sub(r"^((?:    )*) ([io]) phCard (0x[0-9A-F]+ \(\d+\))$",
                                r"\1 \2 phCard 0x????", out[i])
    return out


def mask_free_memory_pvmem(lines: List[str]) -> List[str]:
    """doc §5: -d masks SCardFreeMemory's pvMem (not a NULL one); pcsc-spy's
    -d leaves it."""
    out = list(lines)
    for c in parse_calls(lines):
        if c.name == "SCardFreeMemory":
            for i in c.lines:
                out[i] = re.sub(r"^((?:    )*) i pvMem: (0x[0-9a-f]+ \(\d+\))$",
                                r"\1 i pvMem: 0x????", out[i])
    return out


DOCUMENTED = (spell_scardcontrol, label_cancel_hcontext, null_stale_buffers,
              mask_connect_phcard, mask_free_memory_pvmem)


def as_we_print(spy_lines: List[str]) -> List[str]:
    for undo in DOCUMENTED:
        spy_lines = undo(spy_lines)
    return spy_lines


# -- comparing ------------------------------------------------------------------------

def assert_same(ours: List[str], expected: List[str], what: str) -> None:
    if ours != expected:
        diff = list(difflib.unified_diff(expected, ours, "pcsc-spy (normalised)",
                                         "pcsc-ebpf-spy", lineterm="", n=2))
        shown = "\n".join(diff[:80]) + ("\n..." if len(diff) > 80 else "")
        pytest.fail("%s: pcsc-ebpf-spy differs from pcsc-spy 1.9.9\n%s" % (what, shown),
                    pytrace=False)


def assert_same_summary(ours: List[str], spy: List[str], what: str,
                        ours_extra: Optional[List[Counter]] = None) -> None:
    """Same threads, same functions, same call counts (ours_extra: calls we
    show that pcsc-spy could not)."""
    o = ref.summary_counts(ours)
    s = ref.summary_counts(spy)
    assert [t.header for t in o] == [t.header for t in s], what
    for n, (a, b) in enumerate(zip(o, s)):
        extra = ours_extra[n] if ours_extra else Counter()
        assert a.calls - extra == b.calls and not extra - a.calls, \
            "%s, %s: ours %s, pcsc-spy %s" % (what, a.header, dict(a.calls), dict(b.calls))


def compare_whole(runs: Runs, name: str) -> None:
    ours = ours_of(runs, name)
    spy = spy_of(runs, name)
    assert ours.app.returncode == 0, ours.app.stderr
    assert spy.recorded.returncode == 0, spy.recorded.stderr
    assert not spy.rendered.crashed, spy.rendered.stderr
    o_calls, o_summary = ref.split_summary(ours.stdout)
    s_calls, s_summary = ref.split_summary(spy.rendered.stdout)
    assert o_calls, "no call traced"
    assert_same(o_calls, as_we_print(s_calls), name)
    assert_same_summary(o_summary, s_summary, name)


# -- line by line ---------------------------------------------------------------------

@pytest.mark.parametrize("name", ["all", "attrs", "extended65k", "pcsc_scan"])
def test_same_text_as_pcsc_spy(runs, name):
    compare_whole(runs, name)


def test_same_text_two_threads(runs):
    """`blocked`: a second thread blocks in SCardGetStatusChange until the
    first cancels it.  pcsc-spy prints each thread from its own Python thread,
    so how their lines interleave is a race in pcsc-spy (doc §12): each
    thread's lines are compared, in order, and our interleaving is checked
    against the calls' real order."""
    ours = ours_of(runs, "blocked")
    spy = spy_of(runs, "blocked")
    assert ours.app.returncode == 0 and spy.recorded.returncode == 0
    o_calls, o_summary = ref.split_summary(ours.stdout)
    s_calls, s_summary = ref.split_summary(spy.rendered.stdout)
    o_threads, s_threads = thread_streams(o_calls), thread_streams(as_we_print(s_calls))
    assert sorted(o_threads) == ["", "    "]
    assert sorted(s_threads) == ["", "    "]
    for indent in o_threads:
        assert_same(o_threads[indent], s_threads[indent], "blocked, thread %r" % indent)
    assert_same_summary(o_summary, s_summary, "blocked")
    # ours, in time order: the blocked call starts, Cancel starts, the blocked
    # call returns (cancelled), then Cancel returns or has returned.
    blocked_start = o_calls.index("    SCardGetStatusChange")
    cancel_start = o_calls.index("SCardCancel")
    cancelled = o_calls.index(
        "     => Command cancelled. (SCARD_E_CANCELLED [0x80100002])  [??.??]")
    assert blocked_start < cancel_start < cancelled


def test_errors_scenario(runs):
    """`errors`: pcsc-spy 1.9.9's reader raises at the SCardStatus that fails
    with SCARD_E_INSUFFICIENT_BUFFER (libpcscspy writes the reader name as a
    multi-string up to the length the library reports, pcsc-spy reads one
    line; doc §7), and prints nothing of the calls after it.  Without that
    call in its raw log it renders the rest, which must match ours; that call
    is checked against libpcscspy's raw values."""
    ours = ours_of(runs, "errors")
    spy = spy_of(runs, "errors")
    assert ours.app.returncode == 0 and spy.recorded.returncode == 0
    assert spy.rendered.crashed, "pcsc-spy 1.9.9 is expected to fail on `errors`"

    is_status = lambda fn, n: fn == "SCardStatus" and n == 0  # noqa: E731
    pruned = ref.render(ref.without_calls(spy.recorded.raw, is_status))
    assert not pruned.crashed, pruned.stderr
    _, o_summary = ref.split_summary(ours.stdout)
    blocks = call_blocks(ours.stdout)
    status = next(b for b in blocks if b[0] == "SCardStatus")
    without = [line for b in blocks if b is not status for line in b]
    s_calls, s_summary = ref.split_summary(pruned.stdout)
    assert_same(without, as_we_print(s_calls), "errors without its SCardStatus")
    assert_same_summary(o_summary, s_summary, "errors", [Counter(SCardStatus=1)])

    # The SCardStatus call against libpcscspy's raw log of it: the '>' line;
    # in: hCard, pcchReaderLen, pcbAtrLen; out: cchReaderLen, the name (as a
    # multi-string: "Vi" then empty strings up to 18 bytes), dwState,
    # dwProtocol, bAtrLen, bAtr; the '<' line with the result.
    raw = raw_call(spy.recorded.raw, "SCardStatus")
    reader_len, state, protocol, atr_len = raw[4], raw[-5], raw[-4], raw[-3]
    assert (raw[2], raw[3], reader_len) == ("0x00000002", "0x00000021", "0x00000012")
    assert raw[5] == "Vi" and raw[-2] == "3B 80 80 01 01 "
    assert raw[-1].endswith("|0x80100008")
    assert status == [
        "SCardStatus",
        " i hCard: 0x????",
        " i pcchReaderLen 0x00000002 (2)",
        " i pcbAtrLen 0x00000021 (33)",
        " o cchReaderLen %s (%d)" % (reader_len, int(reader_len, 16)),
        " o mszReaderName NULL",                 # doc §3: not "Vi" and stale bytes
        " o dwState %s (%d)" % (state, int(state, 16)),
        " o dwProtocol %s (%d)" % (protocol, int(protocol, 16)),
        " o bAtrLen %s (%d)" % (atr_len, int(atr_len, 16)),
        " o bAtr NULL",                          # doc §3
        " => Insufficient buffer. (SCARD_E_INSUFFICIENT_BUFFER [0x80100008])  [??.??]",
    ]


def test_nullargs_scenario(runs):
    """`nullargs`: pcsc-spy 1.9.9's reader raises at the SCardListReaders
    whose pcchReaders is NULL (doc §6).  Without that call pcsc-spy renders
    the rest (NULL outputs of SCardStatus, an empty SCardGetStatusChange,
    SCardFreeMemory(NULL)), which must match ours; the call itself is checked
    directly."""
    ours = ours_of(runs, "nullargs")
    spy = spy_of(runs, "nullargs")
    assert ours.app.returncode == 0 and spy.recorded.returncode == 0
    assert spy.rendered.crashed, "pcsc-spy 1.9.9 is expected to fail on `nullargs`"

    first_list = lambda fn, n: fn == "SCardListReaders" and n == 0  # noqa: E731
    pruned = ref.render(ref.without_calls(spy.recorded.raw, first_list))
    assert not pruned.crashed, pruned.stderr
    _, o_summary = ref.split_summary(ours.stdout)
    blocks = call_blocks(ours.stdout)
    null_list = blocks[1]
    s_calls, s_summary = ref.split_summary(pruned.stdout)
    assert_same([line for b in blocks[:1] + blocks[2:] for line in b], as_we_print(s_calls),
                "nullargs without its first SCardListReaders")
    assert_same_summary(o_summary, s_summary, "nullargs", [Counter(SCardListReaders=1)])

    raw = raw_call(spy.recorded.raw, "SCardListReaders")
    assert raw[2:5] == ["(null)", "NULL", '""']   # libpcscspy: no length, no string
    assert null_list == [
        "SCardListReaders",
        " i hContext: 0x????",
        " i mszGroups: (null)",
        " o pcchReaders: NULL",
        " o mszReaders: NULL",
        " => Invalid parameter given. (SCARD_E_INVALID_PARAMETER [0x80100004])  [??.??]",
    ]


def raw_call(raw: str, function: str) -> List[str]:
    """The lines libpcscspy logged for the first call of `function`, from its
    '>' line to its '<' line, without the thread prefix (one thread)."""
    lines = [line.partition("@")[2] for line in raw.splitlines()]
    start = next(i for i, line in enumerate(lines) if line.endswith("|" + function)
                 and line.startswith(">"))
    end = next(i for i in range(start, len(lines)) if lines[i].startswith("<|"))
    return lines[start:end + 1]


def test_nullrecvpci_matches_pcsc_spy_up_to_its_crash_then_all(runs):
    """`nullrecvpci` under ours only (pcsc-spy 1.9.9 kills the application,
    doc §4): what pcsc-spy printed before the crash must match ours, and the
    SCardTransmit itself must read as `all`'s same SELECT (with -d the
    receive PCI is masked on both sides, so NULL and non-NULL look alike)."""
    ours = ours_of(runs, "nullrecvpci")
    assert ours.app.returncode == 0, ours.app.stderr
    o_calls, _ = ref.split_summary(ours.stdout)
    crashed = spy_of(runs, "nullrecvpci")
    s_calls, _ = ref.split_summary(crashed.rendered.stdout)
    assert s_calls[-1] == " i  0000 00 A4 04 00 07 A0 00 00 03 08 00 00             ............"
    assert_same(o_calls[:len(s_calls)], as_we_print(s_calls), "nullrecvpci up to the crash")

    blocks = call_blocks(ours.stdout)
    all_blocks = [as_we_print(b) for b in call_blocks(spy_of(runs, "all").rendered.stdout)]
    select = next(b for b in all_blocks if b[0] == "SCardTransmit")
    assert [b[0] for b in blocks] == ["SCardEstablishContext", "SCardListReaders", "SCardConnect",
                                      "SCardTransmit", "SCardDisconnect", "SCardReleaseContext"]
    assert_same(blocks[3], select, "nullrecvpci's SCardTransmit vs all's first one")
    for ours_block in blocks[4:]:
        assert ours_block in all_blocks, ours_block


def test_dlopen_client(runs):
    """The ctypes client dlopen()s libpcsclite.so.1 (doc §11).  LD_PRELOAD
    does not reach it: libpcscspy logs nothing.  With libpcsclite.so.1
    redirected to libpcscspy (install_spy.sh's way, in a private directory)
    pcsc-spy sees it, up to its first SCardTransmit, which passes a NULL
    pioRecvPci: pcsc-spy 1.9.9 kills it there (doc §4).  We trace it as it
    is; what pcsc-spy printed must match ours."""
    preload = spy_of(runs, "ctypes_preload").recorded
    assert preload.returncode == 0, preload.stderr
    assert preload.raw == "", "LD_PRELOAD reached a dlopen() client?"

    spy = spy_of(runs, "ctypes")
    assert spy.recorded.returncode == -signal.SIGSEGV
    ours = ours_of(runs, "ctypes")
    assert ours.app.returncode == 0, ours.app.stderr
    o_calls, o_summary = ref.split_summary(ours.stdout)
    s_calls, s_summary = ref.split_summary(spy.rendered.stdout)
    assert s_calls[-2:] == [
        " i bSendBuffer",
        " i  0000 00 A4 04 00 07 A0 00 00 03 08 00 00             ............"]
    assert_same(o_calls[:len(s_calls)], as_we_print(s_calls), "ctypes client up to the crash")
    assert [b[0] for b in call_blocks(ours.stdout)] == [
        "SCardEstablishContext", "SCardListReaders", "SCardListReaders", "SCardConnect",
        "SCardTransmit", "SCardTransmit", "SCardDisconnect", "SCardReleaseContext"]
    # pcsc-spy's summary has the calls that returned before the crash
    spy_counts = ref.summary_counts(s_summary)[0].calls
    ours_counts = ref.summary_counts(o_summary)[0].calls
    assert spy_counts == Counter(SCardEstablishContext=1, SCardListReaders=2, SCardConnect=1)
    assert not spy_counts - ours_counts


# -- pcsc-spy 1.9.9 defects we do not copy ------------------------------------------------

def block_of(text: str, name: str, n: int = 0) -> List[str]:
    return [b for b in call_blocks(text) if b[0] == name][n]


def test_defect_scarcontrol_name(runs):
    """doc §1: pcsc-spy 1.9.9 prints "SCarControl"."""
    spy = block_of(spy_of(runs, "all").rendered.stdout, "SCarControl")
    ours = block_of(ours_of(runs, "all").stdout, "SCardControl")
    assert spy[0] == "SCarControl" and ours[0] == "SCardControl"
    # (its summary, from the raw log's function names, says SCardControl)
    spy_calls, _ = ref.split_summary(spy_of(runs, "all").rendered.stdout)
    assert "SCardControl" not in spy_calls
    assert "SCarControl" not in ours_of(runs, "all").stdout
    assert spy[1:3] == ours[1:3] == [" i hCard: 0x????",
                                     " i dwControlCode: CM_IOCTL_GET_FEATURE_REQUEST (0x42000D48)"]


def test_defect_cancel_argument_label(runs):
    """doc §2: SCardCancel takes an SCARDCONTEXT; pcsc-spy 1.9.9 labels it
    hCard."""
    for name in ("all", "blocked"):
        spy = block_of(spy_of(runs, name).rendered.stdout, "SCardCancel")
        ours = block_of(ours_of(runs, name).stdout, "SCardCancel")
        assert spy[:2] == ["SCardCancel", " i hCard: 0x????"]
        assert ours[:2] == ["SCardCancel", " i hContext: 0x????"]


def test_defect_stale_output_buffers(runs):
    """doc §3: after a failed call pcsc-spy 1.9.9 dumps the output buffer
    anyway; we print the length the library reported and the buffer as NULL."""
    spy_all = spy_of(runs, "all").rendered.stdout
    ours_all = ours_of(runs, "all").stdout
    # GetAttrib(SCARD_ATTR_ATR_STRING, 33-byte buffer): unsupported by vpcd.
    spy = block_of(spy_all, "SCardGetAttrib", 0)
    ours = block_of(ours_all, "SCardGetAttrib", 0)
    assert spy[2] == ours[2] == " i dwAttrId: SCARD_ATTR_ATR_STRING (0x00090303)"
    assert spy[3:5] == ours[3:5] == [" o bAttrLen 0x00000021 (33)", " o bAttr"]
    assert spy[5:8] == [" o  0000 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 ................",
                        " o  0010 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 ................",
                        " o  0020 00                                              ."]
    assert ours[5] == " o  NULL"
    assert spy[-1] == ours[-1] == \
        " => Feature not supported. (SCARD_E_UNSUPPORTED_FEATURE [0x8010001F])  [??.??]"
    # GetAttrib(SCARD_ATTR_VENDOR_NAME, AUTOALLOCATE): pcsc-spy dumps 264 bytes.
    spy = block_of(spy_all, "SCardGetAttrib", 1)
    ours = block_of(ours_all, "SCardGetAttrib", 1)
    assert spy[3] == ours[3] == " o bAttrLen 0x00000108 (264)"
    assert len(spy) == 5 + 17 + 1 and ours[5:] == [" o  NULL", spy[-1]]
    # Control: nothing returned, both print the label alone.
    spy = block_of(spy_all, "SCarControl")
    ours = block_of(ours_all, "SCardControl")
    assert spy[-3:] == ours[-3:] == [
        " o bRecvLength 0x00000000 (0)", " o bRecvBuffer",
        " => Feature not supported. (SCARD_E_UNSUPPORTED_FEATURE [0x8010001F])  [??.??]"]
    # attrs: GetAttrib(TAG_IFD_ATR) into 2 bytes fails with INSUFFICIENT_BUFFER;
    # pcsc-spy dumps the 5 bytes it was told of, from a 2-byte buffer.
    spy = block_of(spy_of(runs, "attrs").rendered.stdout, "SCardGetAttrib", 3)
    ours = block_of(ours_of(runs, "attrs").stdout, "SCardGetAttrib", 3)
    assert spy[3:] == [
        " o bAttrLen 0x00000005 (5)", " o bAttr",
        " o  0000 3B 80 00 00 00                                  ;....",
        " => Insufficient buffer. (SCARD_E_INSUFFICIENT_BUFFER [0x80100008])  [??.??]"]
    assert ours[3:] == [" o bAttrLen 0x00000005 (5)", " o bAttr", " o  NULL", spy[-1]]


def test_defect_null_pio_recv_pci(runs):
    """doc §4: SCardTransmit with a NULL pioRecvPci.  Under pcsc-spy 1.9.9
    the application dies (SIGSEGV, in libpcscspy) in the middle of the call;
    under our tracer it runs to its end and the trace shows the NULL."""
    spy = spy_of(runs, "nullrecvpci")
    assert spy.recorded.returncode == -signal.SIGSEGV
    assert "SCardTransmit rv=" not in spy.recorded.stdout     # it died inside the call
    spy_transmit = block_of(spy.rendered.stdout, "SCardTransmit")
    assert not any(line.startswith(" o ") or line.startswith(" => ") for line in spy_transmit)

    two = ours_of(runs, "two_processes")
    app = two.apps[0]
    assert app.argv[-1] == "nullrecvpci" and app.returncode == 0, app.stderr
    assert "SCardTransmit rv=0x00000000" in app.stdout
    transmit = block_of(two.stdout, "SCardTransmit")     # first process: no indent
    assert transmit[7:12] == [
        " o pioRecvPci.dwProtocol: NULL",
        " o pioRecvPci.cbPciLength: NULL",
        " o bRecvLength 0x00000002 (2)",
        " o bRecvBuffer",
        " o  0000 90 00                                           ..",
    ]
    assert re.match(r"^ => Command successful\. \(SCARD_S_SUCCESS \[0x00000000\]\)  "
                    r"\[\d+\.\d{6}\]$", transmit[12])


def test_defect_diffable_leaves_handles_and_pointers(runs):
    """doc §5: pcsc-spy's -d masks hContext, hCard, the PCIs and the times,
    but prints SCardConnect's phCard and SCardFreeMemory's pvMem, which change
    from run to run (the same workload twice: different values); ours masks
    them too, so two -d traces of one workload are identical."""
    first = spy_of(runs, "attrs").rendered.stdout
    again = spy_of(runs, "attrs_again").rendered.stdout
    phcard = re.compile(r"^ o phCard (0x[0-9A-F]{8}) \(\d+\)$", re.M)
    pvmem = re.compile(r"^ i pvMem: (0x[0-9a-f]+) \(\d+\)$", re.M)
    assert len(phcard.findall(first)) == len(phcard.findall(again)) == 1
    assert phcard.findall(first) != phcard.findall(again)
    assert len(pvmem.findall(first)) == 1 and pvmem.findall(first) != pvmem.findall(again)
    assert " i phCard 0x00000000 (0)" in first.splitlines()

    ours = ours_of(runs, "attrs").stdout
    connect = block_of(ours, "SCardConnect")
    assert connect[5] == " i phCard 0x????" and connect[7] == " o phCard 0x????"
    assert block_of(ours, "SCardFreeMemory")[2] == " i pvMem: 0x????"
    # everything else of the calls is pcsc-spy's (test_same_text_as_pcsc_spy)
    spy_connect = block_of(first, "SCardConnect")
    assert [spy_connect[i] for i in (0, 1, 2, 3, 4, 6, 8, 9)] == \
        [connect[i] for i in (0, 1, 2, 3, 4, 6, 8, 9)]


# -- what only we print -------------------------------------------------------------------

def test_several_processes(runs):
    """doc §8: one trace of two processes (the second one with two threads).
    Once a second process has shown up, a `[pid P tid T comm]` line, at the
    thread's indent, precedes the first call of each new thread; the threads
    seen before (here the first process's) keep their plain text, and every
    summary header gets ` (pid P tid T comm)`."""
    two = ours_of(runs, "two_processes")
    first, second = (app.proc.pid for app in two.apps)
    lines, summary = ref.split_summary(two.stdout)
    tags = [(i, line) for i, line in enumerate(lines) if "[pid " in line]
    assert len(tags) == 2
    (i1, tag1), (i2, tag2) = tags
    assert tag1 == "    [pid %d tid %d pcsc_client]" % (second, second)
    assert lines[i1 + 1] == "    SCardEstablishContext"
    m = re.match(r"^        \[pid %d tid (\d+) pcsc_client\]$" % second, tag2)
    assert m and int(m.group(1)) != second
    assert lines[i2 + 1] == "        SCardGetStatusChange"
    assert lines[0] == "SCardEstablishContext"
    assert not any("[pid " in line for line in lines[:i1])
    headers = [line for line in summary if line.startswith("Thread ")]
    assert headers == ["Thread 1/3 (pid %d tid %d pcsc_client)" % (first, first),
                       "Thread 2/3 (pid %d tid %d pcsc_client)" % (second, second),
                       "Thread 3/3 (pid %d tid %s pcsc_client)" % (second, m.group(1))]
    # A single process gets pcsc-spy's plain text: no such line anywhere else.
    for name, o in runs.ours.items():
        if name != "two_processes":
            assert "[pid " not in o.stdout and "(pid " not in o.stdout, name


def test_lost_events(runs):
    """doc §9: when the buffer is full, events are dropped, never
    waited for: the application ran at full speed while the tracer was
    stopped; stderr says so as it happens, and the summary ends with
    `Lost events: N (calls are missing above)`.  Without loss, no such line."""
    lost = ours_of(runs, "lost", lossless=False)
    app = lost.app
    assert app.returncode == 0, app.stderr
    assert len(app.stdout.splitlines()) == 80          # every APDU answered
    assert re.search(r"^pcsc-ebpf-spy: \d+ events lost \(the buffer was full\): "
                     r"calls are missing$", lost.stderr, re.M), lost.stderr
    _, summary = ref.split_summary(lost.stdout)
    assert summary[-2] == ""
    m = re.match(r"^Lost events: (\d+) \(calls are missing above\)$", summary[-1])
    assert m and int(m.group(1)) > 0, summary[-3:]
    reported = sum(int(n) for n in
                   re.findall(r"^pcsc-ebpf-spy: (\d+) events lost", lost.stderr, re.M))
    assert reported == int(m.group(1))
    # calls whose start or return was lost are not in the summary
    assert 0 < ref.summary_counts(summary[:-2])[0].calls["SCardTransmit"] <= 80
    for name, o in runs.ours.items():
        if name != "lost":
            assert "Lost events" not in o.stdout, name


def test_pcsc_spy_blocks_the_application(session_stack, client_bin, tmp_path):
    """doc §9, pcsc-spy's side: libpcscspy writes its log to the FIFO with
    blocking writes, so when the reader falls behind the application waits
    (nothing is lost).  Here the FIFO is open but not read: `extended65k`
    (about 390 KB of log, 20 ms of work) stops in its first big write, and
    finishes once the log is read."""
    if not session_stack.card_running:
        session_stack.start_card()
    fifo = tmp_path / ref.FIFO_NAME
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        env = dict(session_stack.env, HOME=str(tmp_path), LD_PRELOAD=ref.SPY_LIBRARY)
        app = subprocess.Popen([client_bin, "extended65k"], env=env, stdin=subprocess.DEVNULL,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            with pytest.raises(subprocess.TimeoutExpired):
                app.wait(2)
            wchan = Path("/proc/%d/wchan" % app.pid).read_text()
            assert "pipe_write" in wchan, wchan
            os.set_blocking(reader, True)
            read = 0
            while True:
                chunk = os.read(reader, 1 << 16)
                if not chunk:
                    break
                read += len(chunk)
            out, err = app.communicate(timeout=30)
        finally:
            if app.poll() is None:
                app.kill()
                app.wait()
        assert app.returncode == 0, err
        assert b"echo ok" in out
        assert read > 65000 * 3 * 2
    finally:
        os.close(reader)


def test_timings_from_kernel_clock(runs):
    """doc §10: our times come from the probes' kernel timestamps
    (CLOCK_MONOTONIC), pcsc-spy's from gettimeofday() in libpcscspy; both
    measure the same calls.  The summary keeps its times under -d: the
    blocked SCardGetStatusChange (cancelled after 300 ms) takes about 0.3 s
    in both, and the per-call times without -d add up to the summary's."""
    for side in (ours_of(runs, "blocked").stdout, spy_of(runs, "blocked").rendered.stdout):
        _, summary = ref.split_summary(side)
        seconds = ref.summary_seconds(summary)
        assert 0.29 <= seconds[1]["SCardGetStatusChange"] < 2.0, summary
    two = ours_of(runs, "two_processes")
    lines, summary = ref.split_summary(two.stdout)
    per_call: Dict[str, float] = {}
    for c in parse_calls(lines):
        if c.indent == "":
            m = re.search(r"\[(\d+\.\d{6})\]$", lines[c.lines[-1]])
            per_call[c.name] = per_call.get(c.name, 0.0) + float(m.group(1))
    totals = ref.summary_seconds(summary)[0]
    assert totals.keys() == per_call.keys()
    for name, total in totals.items():
        assert abs(total - per_call[name]) < 2e-6, (name, total, per_call[name])
