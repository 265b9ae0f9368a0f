"""A real pcsc-lite 2.3.3 stack (Debian trixie root, tests/trixie.py): the tracer against
pcsc-lite >= 2.1's library layout, and against that version's own pcsc-spy.

pcsc-lite 2.3.3's libpcsclite.so.1 is a small redirect: its SCard* functions jump through
pointers it fills by dlopen()ing libpcsclite_real.so.1, or the library that
LIBPCSCLITE_DELEGATE names. pcsc-spy's libpcscspy.so.0 is such a delegate: it logs, then
calls libpcsclite_real.so.1. So one application call runs through two (real) or three
(spy) libraries that all export the 18 SCard* functions, and the trace must still hold it
once, with the application's arguments.

The C client (tests/clients/pcsc_client.c, built on the host, run chrooted in the root
against the root's libraries and its pcscd) runs `all` three times, in the module fixture
`runs` (a tracer takes seconds to start and to stop: the three tracers are started
together, then stopped together):

- `plain`: held before its exec (already chrooted, so -p finds the root's library through
  /proc/PID/root before the first call), traced with `-n -d -p PID`;
- `spy`: the same with LIBPCSCLITE_DELEGATE=libpcscspy.so.0 (2.3.3's pcsc-spy; its raw log
  read from the FIFO, rendered by the root's pcsc-spy -n -d) and, at the same time, traced
  with `-n -d --spy-format 2.2 -p PID` (2.2+'s result lines, which 2.3.3's pcsc-spy prints);
- `running`: `wait-then-run`, already running (it maps the root's libpcsclite.so.1) when
  its tracer `-n -d -p PID` starts.

The full-text comparison undoes, on pcsc-spy's side, the differences that
docs/differences-from-pcsc-spy.md lists (the named functions of test_conformance.py) and
one that is new in pcsc-lite 2.x (`null_of_empty_failed_buffer`, below). Any other
difference fails. `-r` on 2.3.3's raw log is compared with 2.3.3's pcsc-spy too.

The root is built once per machine (tests/trixie.py: ~40 s, ~200 MB, kept in
/var/cache/pcsc-ebpf-spy/trixie-root); after that the module takes ~30 s, mostly the tracers'
start and stop.
"""
import difflib
import os
import re
import subprocess
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

import pytest

import spy_reference as ref
import trixie
from test_conformance import (label_cancel_hcontext, mask_connect_phcard,
                              mask_free_memory_pvmem, parse_calls, spell_scardcontrol)
from tracer import Tracer, run_tracer

FUNCTIONS = {
    "SCardEstablishContext", "SCardReleaseContext", "SCardIsValidContext", "SCardConnect",
    "SCardReconnect", "SCardDisconnect", "SCardBeginTransaction", "SCardEndTransaction",
    "SCardStatus", "SCardGetStatusChange", "SCardControl", "SCardTransmit",
    "SCardListReaderGroups", "SCardListReaders", "SCardFreeMemory", "SCardCancel",
    "SCardGetAttrib", "SCardSetAttrib"}


# -- the stack and the runs -----------------------------------------------------------

@pytest.fixture(scope="module")
def stack2():
    with trixie.Pcsclite2Stack() as stack:
        yield stack


@pytest.fixture(scope="module")
def client2(stack2, client_bin):
    """The C client, as the root sees it."""
    return stack2.install(client_bin, "pcsc_client")


@dataclass
class Run:
    client_stdout: str
    client_pid: int
    ours: str = ""       # the tracer's stdout
    ours_stderr: str = ""
    raw: str = ""        # libpcscspy's log (spy run)
    spy: str = ""        # 2.3.3's pcsc-spy -n -d on it
    spy_stderr: str = ""
    maps: Tuple[str, ...] = ()   # running: its pcsc-lite libraries when the tracer started
    error: Optional[str] = None  # running: the tracer did not start


@dataclass
class Runs:
    plain: Run
    spy: Run
    running: Run


def pcsc_maps(pid: int) -> Tuple[str, ...]:
    """The file names of the pcsc-lite libraries process pid maps."""
    with open("/proc/%d/maps" % pid) as f:
        paths = {line.split(None, 5)[5].strip() for line in f if len(line.split()) == 6}
    return tuple(sorted(os.path.basename(p) for p in paths if "/libpcsc" in p))


@pytest.fixture(scope="module")
def runs(stack2, client2):
    """The three runs of `all`, their tracers started together, then stopped together:

    - plain: held before exec, `-n -d -p PID`;
    - spy: held before exec, LIBPCSCLITE_DELEGATE=libpcscspy.so.0 with its FIFO read,
      `-n -d --spy-format 2.2 -p PID`; its raw log rendered by 2.3.3's pcsc-spy -n -d;
    - running: `wait-then-run`, already running (it maps the root's libpcsclite.so.1 and
      waits on stdin) when its tracer `-n -d -p PID` starts; a tracer that fails to start
      here is recorded (Run.error), for its test to report."""
    fifo_dir = stack2.tmpdir / "spy-home"          # the root's /tmp/spy-home
    fifo_dir.mkdir()
    fifo = fifo_dir / ref.FIFO_NAME
    os.mkfifo(fifo)
    raw_path = stack2.tmpdir / "raw.log"
    spy_env = {"LIBPCSCLITE_DELEGATE": trixie.SPY_LIBRARY, "HOME": "/tmp/spy-home"}
    held, tracers, reader, running = [], {}, None, None
    try:
        held = [stack2.popen_waiting([client2, "all"]),
                stack2.popen_waiting([client2, "all"], env=spy_env)]
        running = subprocess.Popen(stack2.command([client2, "wait-then-run"]),
                                   env=stack2.env(), stdin=subprocess.PIPE,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert running.stdout.readline() == "ready\n"
        running_maps = pcsc_maps(running.pid)
        args = {"plain": ("-n", "-d", "-p", held[0].pid),
                "spy": ("-n", "-d", "--spy-format", "2.2", "-p", held[1].pid),
                "running": ("-n", "-d", "-p", running.pid)}
        errors = {}
        with ThreadPoolExecutor(len(args)) as pool:
            futures = {name: pool.submit(Tracer, *a) for name, a in args.items()}
            for name, f in futures.items():
                try:
                    tracers[name] = f.result()
                except Exception as e:
                    errors[name] = str(e)
        for name in ("plain", "spy"):
            if name in errors:
                raise RuntimeError("%s: %s" % (name, errors[name]))
        with open(raw_path, "wb") as out:
            # 2.3.3's pcsc-spy would read the FIFO; cat keeps the raw log
            reader = subprocess.Popen(["cat", str(fifo)], stdout=out, stdin=subprocess.DEVNULL)
        outs = [h.release() for h in held]
        running_out, running_err = running.communicate("go\n", timeout=60)
        assert running.returncode == 0, running_err
        names = list(tracers)
        with ThreadPoolExecutor(len(names)) as pool:
            results = dict(zip(names, pool.map(lambda n: tracers[n].stop(), names)))
        ref._stop_reader(reader, fifo)
        raw = raw_path.read_text(encoding="utf-8", errors="surrogateescape")
        rendered = stack2.run([trixie.ROOT_PYTHON, trixie.PCSC_SPY, "-n", "-d", "/tmp/raw.log"],
                              timeout=120)
        plain = Run(outs[0], held[0].pid, results["plain"].stdout, results["plain"].stderr)
        spy = Run(outs[1], held[1].pid, results["spy"].stdout, results["spy"].stderr, raw,
                  rendered.stdout, rendered.stderr)
        r = results.get("running")
        run = Run(running_out.replace("ready\n", "", 1), running.pid,
                  r.stdout if r else "", r.stderr if r else "", maps=running_maps,
                  error=errors.get("running"))
        return Runs(plain, spy, run)
    finally:
        for h in held:
            h.kill()
        if running is not None and running.poll() is None:
            running.kill()
            running.communicate()
        for t in tracers.values():
            t.kill()
        if reader is not None and reader.poll() is None:
            reader.kill()
            reader.wait()


# -- reading the texts ----------------------------------------------------------------

_CLIENT_LINE = re.compile(r"^(SCard\w+) rv=(0x[0-9A-F]{8})$")
_RESULT_RV = re.compile(r"^ => .*\[(0x[0-9A-F]{8})\]\)?  \[")
_RAW_RETURN = re.compile(r"^<\|\d+\|\d+\|(\w+)\|(0x[0-9A-F]{8})$")


def client_calls(stdout: str) -> List[Tuple[str, str]]:
    """(function, rv) of each call, from the client's own `FUNC rv=` lines."""
    return [m.groups() for m in map(_CLIENT_LINE.match, stdout.splitlines()) if m]


def text_calls(text: str) -> List[Tuple[str, str]]:
    """(function, rv) of each call of a pcsc-spy text (one thread), either result-line
    dialect; pcsc-spy's "SCarControl" read as SCardControl."""
    lines, _ = ref.split_summary(text)
    calls = []
    for c in parse_calls(lines):
        name = "SCardControl" if c.name == "SCarControl" else c.name
        m = _RESULT_RV.match(c.result or "")
        calls.append((name, m.group(1) if m else None))
    return calls


def raw_log_calls(raw: str) -> List[Tuple[str, str]]:
    """(function, rv) of each call of a libpcscspy raw log (one thread), from its
    return lines."""
    calls = []
    for line in raw.splitlines():
        m = _RAW_RETURN.match(line.partition("@")[2])
        if m:
            calls.append(m.groups())
    return calls


def to_2_2_results(lines: List[str]) -> List[str]:
    """pcsc-spy 1.9's result lines (` => TEXT (CODE [0xRV])  [TIME]`) as pcsc-spy >= 2.2
    prints them (` => CODE [0xRV]  [TIME]`)."""
    return [re.sub(r"^((?:    )*) => .* \((\w+ \[0x[0-9A-F]{8}\])\)  \[", r"\1 => \2  [", line)
            for line in lines]


# -- pcsc-lite 2.x's own difference, undone on pcsc-spy's side ----------------------

_EMPTY_LENGTH = re.compile(r"^ o (bRecvLength|bAttrLen) 0x00000000 \(0\)$")
_BUFFERS = {"SCardGetAttrib": " o bAttr", "SCardTransmit": " o bRecvBuffer",
            "SCardControl": " o bRecvBuffer", "SCarControl": " o bRecvBuffer"}


def null_of_empty_failed_buffer(lines: List[str]) -> List[str]:
    """pcsc-lite 2.x (2.2.3+): libpcscspy logs no output buffer after a failed call, but
    NULL, so pcsc-spy prints ` o  NULL` under the buffer's label, also when the call
    returned nothing (a length of 0). pcsc-spy 1.9.9 then prints the label alone, and so
    do we (doc §3, "When nothing was returned"). Only for a failed call's output buffer,
    only after a length of 0."""
    out = list(lines)
    drop = set()
    for c in parse_calls(lines):
        label = _BUFFERS.get(c.name)
        if label is None or c.result is None or "[0x00000000]" in c.result:
            continue
        body = [(i, lines[i][len(c.indent):]) for i in c.lines]
        for k in range(1, len(body) - 1):
            if (body[k][1] == label and _EMPTY_LENGTH.match(body[k - 1][1])
                    and body[k + 1][1] == " o  NULL"):
                drop.add(body[k + 1][0])
    return [line for i, line in enumerate(out) if i not in drop]


NORMALISE_2_3_3 = (spell_scardcontrol, label_cancel_hcontext, mask_connect_phcard,
                   mask_free_memory_pvmem, null_of_empty_failed_buffer)


def as_we_print(spy_lines: List[str]) -> List[str]:
    for undo in NORMALISE_2_3_3:
        spy_lines = undo(spy_lines)
    return spy_lines


def assert_same_lines(ours: List[str], expected: List[str], what: str) -> None:
    if ours != expected:
        diff = list(difflib.unified_diff(expected, ours, "expected", "pcsc-ebpf-spy",
                                         lineterm="", n=2))
        shown = "\n".join(diff[:80]) + ("\n..." if len(diff) > 80 else "")
        pytest.fail("%s:\n%s" % (what, shown), pytrace=False)


def no_losses(run: Run) -> None:
    assert "Lost events" not in run.ours, run.ours[-500:]
    assert "lost" not in run.ours_stderr, run.ours_stderr


# -- the root ---------------------------------------------------------------------------

def exported_scard(path: Path) -> set:
    out = subprocess.run(["nm", "-D", "--defined-only", str(path)], capture_output=True,
                         text=True, check=True).stdout
    return {line.split()[-1] for line in out.splitlines() if line.split()[-1].startswith("SCard")}


def test_root_is_pcsc_lite_2_3_3(stack2):
    root = stack2.root
    assert trixie.root_is_complete(root)
    for package in ("pcscd", "libpcsclite1", "libpcsclite-dev"):
        assert trixie.package_version(package, root).startswith("2.3.3"), package
    redirect = root / trixie.REDIRECT_LIBRARY.lstrip("/")
    real = root / trixie.REAL_LIBRARY.lstrip("/")
    spy = root / trixie.SPY_LIBRARY.lstrip("/")
    for lib in (redirect, real, spy):
        assert exported_scard(lib) == FUNCTIONS, lib
    # The redirect does not link the real library: it dlopen()s it (or the delegate).
    needed = subprocess.run(["readelf", "-d", str(redirect)], capture_output=True, text=True,
                            check=True).stdout
    assert "libpcsclite_real" not in needed
    strings = redirect.read_bytes()
    assert b"libpcsclite_real.so.1\0" in strings and b"LIBPCSCLITE_DELEGATE\0" in strings
    assert redirect.stat().st_size < real.stat().st_size / 2


def mapped_pcsc_libraries(stack2, client2, env=None) -> Tuple[str, ...]:
    """The pcsc-lite libraries a client in the root maps after its first call (`sleep`
    scenario: one call, then a pause)."""
    proc = subprocess.Popen(stack2.command([client2, "sleep", "3000"]),
                            env=stack2.env(**(env or {})), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = proc.stdout.readline()
        assert first == "SCardEstablishContext rv=0x00000000\n", (first, proc.stderr.read())
        return pcsc_maps(proc.pid)
    finally:
        proc.kill()
        proc.communicate()


def test_redirect_loads_the_real_library_or_the_delegate(stack2, client2):
    assert mapped_pcsc_libraries(stack2, client2) == ("libpcsclite.so.1",
                                                      "libpcsclite_real.so.1")
    assert mapped_pcsc_libraries(stack2, client2, {"LIBPCSCLITE_DELEGATE": trixie.SPY_LIBRARY}) \
        == ("libpcsclite.so.1", "libpcsclite_real.so.1", "libpcscspy.so.0")


# -- our tracer on 2.3.3 --------------------------------------------------------------

def test_trace_in_root_every_call_once(runs):
    """`all` in the root, traced with -p: every call of the client once (the redirect and
    libpcsclite_real.so.1 both run for each), in order, with its result; all 18
    functions."""
    run = runs.plain
    expected = client_calls(run.client_stdout)
    assert len(expected) == 27 and {f for f, _ in expected} == FUNCTIONS, run.client_stdout
    assert text_calls(run.ours) == expected, run.ours_stderr
    _, summary = ref.split_summary(run.ours)
    threads = ref.summary_counts(summary)
    assert [t.header for t in threads] == ["Thread 1/1"]
    assert threads[0].calls == Counter(f for f, _ in expected)
    no_losses(run)


def test_delegate_chain_one_entry_per_call(runs):
    """With LIBPCSCLITE_DELEGATE=libpcscspy.so.0 the chain is libpcsclite.so.1 ->
    libpcscspy.so.0 -> libpcsclite_real.so.1: still one entry per call, with the
    application's arguments: the same -n -d text as without the delegate (the dialect of
    the result lines aside)."""
    run = runs.spy
    assert ref.raw_calls(run.raw), "libpcscspy logged nothing: was it in the chain?"
    expected = client_calls(run.client_stdout)
    assert text_calls(run.ours) == expected, run.ours_stderr
    ours, summary = ref.split_summary(run.ours)
    plain, plain_summary = ref.split_summary(runs.plain.ours)
    assert_same_lines(ours, to_2_2_results(plain), "with the delegate vs without")
    assert [t.calls for t in ref.summary_counts(summary)] == \
        [t.calls for t in ref.summary_counts(plain_summary)]
    no_losses(run)


def test_attach_to_running_client_in_root(runs):
    """-p on a client of the root that is already running: it maps the root's
    libpcsclite.so.1 (its /proc/PID/maps names it by its path on the host,
    /var/cache/.../trixie-root/usr/lib/..., not as the process sees it), and loads
    libpcsclite_real.so.1 at its first call, after the tracer started. Every call once."""
    run = runs.running
    assert run.maps == ("libpcsclite.so.1",)
    assert run.error is None, run.error
    expected = client_calls(run.client_stdout)
    assert len(expected) == 27 and {f for f, _ in expected} == FUNCTIONS
    assert text_calls(run.ours) == expected, run.ours_stderr
    ours, _ = ref.split_summary(run.ours)
    plain, _ = ref.split_summary(runs.plain.ours)
    assert_same_lines(ours, plain, "attached while running vs held before exec")
    no_losses(run)


# -- against 2.3.3's pcsc-spy ----------------------------------------------------------

def test_same_calls_as_pcsc_spy_2_3_3(runs):
    """The application's calls, libpcscspy's log, 2.3.3's pcsc-spy and our trace (of the
    same process, at the same time): the same calls, each once, with the same results."""
    run = runs.spy
    assert "Traceback" not in run.spy_stderr, run.spy_stderr
    expected = client_calls(run.client_stdout)
    assert {f for f, _ in expected} == FUNCTIONS
    assert raw_log_calls(run.raw) == expected
    assert text_calls(run.spy) == expected
    assert text_calls(run.ours) == expected


def test_same_text_as_pcsc_spy_2_3_3(runs):
    """`-n -d --spy-format 2.2` against 2.3.3's pcsc-spy -n -d, line by line, after the
    normalisations of NORMALISE_2_3_3; the summaries without their numbers."""
    run = runs.spy
    spy_calls, spy_summary = ref.split_summary(run.spy)
    ours, summary = ref.split_summary(run.ours)
    # 2.2+'s result line, in both
    assert spy_calls[3] == " => SCARD_S_SUCCESS [0x00000000]  [??.??]", spy_calls[:4]
    assert_same_lines(ours, as_we_print(spy_calls),
                      "pcsc-ebpf-spy differs from pcsc-spy 2.3.3 (normalised)")
    o = ref.summary_counts(summary)
    s = ref.summary_counts(spy_summary)
    assert [(t.header, t.calls) for t in o] == [(t.header, t.calls) for t in s]


def test_pcsc_spy_2_3_3_differences_still_there(runs):
    """What the normalisations undo is there in 2.3.3's text (so each is still needed):
    the "SCarControl" name, SCardCancel's hCard label, -d's unmasked phCard and pvMem,
    and ` o  NULL` under the empty buffer of the failed SCardControl."""
    spy_calls, _ = ref.split_summary(runs.spy.spy)
    assert "SCarControl" in spy_calls and "SCardControl" not in spy_calls
    cancel = spy_calls.index("SCardCancel")
    assert spy_calls[cancel + 1] == " i hCard: 0x????"
    assert any(re.match(r"^ o phCard 0x[0-9A-F]{8} \(\d+\)$", l) for l in spy_calls)
    assert any(re.match(r"^ i pvMem: 0x[0-9a-f]+ \(\d+\)$", l) for l in spy_calls)
    control = spy_calls.index("SCarControl")
    assert spy_calls[control + 6:control + 9] == [
        " o bRecvLength 0x00000000 (0)", " o bRecvBuffer", " o  NULL"]
    for undo in NORMALISE_2_3_3:
        assert undo(spy_calls) != spy_calls, undo.__name__


def test_read_pcsc_spy_2_3_3_raw_log(runs, tmp_path):
    """-r on libpcscspy 2.3.3's raw log: pcsc-lite >= 2.2 logs a call's return as
    `<|sec|usec|FUNCTION|0xRV` (1.9.9: `<|sec|usec|FUNCTION|TEXT|0xRV`). With
    --spy-format 2.2 the text is 2.3.3's pcsc-spy's on the same log, but for the
    documented differences (§1, §2, §5; a log's buffers are printed as logged, so the
    NULL of a failed call's buffer stays), and so is the summary, timings included
    (they are the log's)."""
    raw = tmp_path / "raw.log"
    raw.write_text(runs.spy.raw, encoding="utf-8", errors="surrogateescape")
    r = run_tracer("-r", raw, "-n", "-d", "--spy-format", "2.2")
    assert r.returncode == 0, r.stderr
    ours, summary = ref.split_summary(r.stdout)
    spy_calls, spy_summary = ref.split_summary(runs.spy.spy)
    expected = spy_calls
    for undo in (spell_scardcontrol, label_cancel_hcontext, mask_connect_phcard,
                 mask_free_memory_pvmem):
        expected = undo(expected)
    assert_same_lines(ours, expected, "-r on the 2.3.3 raw log vs 2.3.3's pcsc-spy")
    assert_same_lines(summary, spy_summary, "-r on the 2.3.3 raw log: the summary")


TIE_LOG = Path(__file__).parent / "data" / "spylogs" / "tie_2_3_3.log"


def test_summary_ties_as_pcsc_spy_2_3_3_sums_them(stack2, tmp_path):
    """A 2.3.3 raw log (a run of the `all` scenario) in which SCardFreeMemory
    (60+29+33+29 µs) and SCardGetAttrib (55+96 µs) both total 151 µs. pcsc-spy
    adds them with sum(), which Python 3.12 made compensated: under the root's
    Python 3.13 they tie and keep the order of their first returns, where a plain
    sum comes out one ulp short for SCardFreeMemory. With --spy-format 2.2 our
    summary is 2.3.3's pcsc-spy's, as it runs in its own distribution."""
    (stack2.tmpdir / "tie.log").write_bytes(TIE_LOG.read_bytes())
    spy = stack2.run([trixie.ROOT_PYTHON, trixie.PCSC_SPY, "-n", "-d", "/tmp/tie.log"],
                     timeout=120)
    assert spy.returncode == 0, spy.stderr
    _, spy_summary = ref.split_summary(spy.stdout)
    order = [l.split()[-1] for l in spy_summary if l.endswith(("SCardFreeMemory",
                                                                "SCardGetAttrib"))]
    assert order == ["SCardFreeMemory", "SCardGetAttrib"], spy_summary
    r = run_tracer("-r", TIE_LOG, "-n", "-d", "--spy-format", "2.2")
    assert r.returncode == 0, r.stderr
    assert_same_lines(ref.split_summary(r.stdout)[1], spy_summary,
                      "-r --spy-format 2.2 on a log with a tie: the summary")
    # The premise: the plain sum (pcsc-spy 1.9.9 under Debian 12's Python 3.11)
    # orders these two the other way.
    plain = run_tracer("-r", TIE_LOG, "-n", "-d")
    assert plain.returncode == 0, plain.stderr
    assert [l.split()[-1] for l in ref.split_summary(plain.stdout)[1]
            if l.endswith(("SCardFreeMemory", "SCardGetAttrib"))] == \
        ["SCardGetAttrib", "SCardFreeMemory"]


# -- the stack itself -------------------------------------------------------------------

def test_stack_leaves_nothing_behind(client_bin):
    """A stack's pcscd, card and mounts are gone after close(), also when a client was
    still held."""
    with trixie.Pcsclite2Stack() as stack:
        pids = [stack.pcscd_pid, stack.card_pid]
        client = stack.install(client_bin, "pcsc_client")
        r = stack.run([client, "nullrecvpci"])
        assert r.returncode == 0, r.stderr
        held = stack.popen_waiting([client, "all"])
        ns = os.readlink("/proc/%d/ns/mnt" % stack.pcscd_pid)
        assert ns != os.readlink("/proc/self/ns/mnt")
        assert os.readlink("/proc/%d/ns/mnt" % held.pid) == ns
        tmpdir = stack.tmpdir
        held.kill()
    deadline = time.monotonic() + 5
    while any(os.path.exists("/proc/%d" % p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [p for p in pids if os.path.exists("/proc/%d" % p)]
    assert not trixie.mounts_under(stack.root)
    assert not tmpdir.exists()
