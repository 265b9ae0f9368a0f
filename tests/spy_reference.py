"""The reference: run a PC/SC application under pcsc-lite's own spy (pcsc-spy
1.9.9, Debian 12) and get the text pcsc-spy prints.

pcsc-spy has two halves:

- libpcscspy.so.0, loaded into the application (LD_PRELOAD), wraps the 18
  SCard* functions and writes a raw log, one value per line, to the FIFO
  $HOME/pcsc-spy;
- /usr/bin/pcsc-spy (a Python script) reads that log and prints the text.

Here the raw log is captured first (`cat FIFO > FILE`, with HOME pointing at a
private temporary directory so nothing is shared with other runs), then
rendered with `pcsc-spy -n -d FILE` (pcsc-spy reads a regular file as well as
its FIFO).  Capturing first lets a test look at the raw log, render it again,
or render it without a call that pcsc-spy 1.9.9's reader cannot parse
(`without_calls`).

    run = record(stack, [client, "all"])     # the application under libpcscspy
    text = render(run.raw).stdout            # pcsc-spy -n -d on its raw log
    calls, summary = split_summary(text)
    text = spy_text(stack, [client, "all"])  # the same in one step

Applications that dlopen() libpcsclite (Python ctypes, OpenSC) never call
the preloaded wrappers: LD_PRELOAD does not reach them.  pcsc-lite's
install_spy.sh handles them by replacing the system's libpcsclite.so.1 with
the spy library; `record(..., redirect=True)` does the same without touching
the system: a private directory where libpcsclite.so.1 is libpcscspy and
libpcsclite_nospy.so.1 (the name libpcscspy loads first) is the real library,
put first on LD_LIBRARY_PATH.

pcsc-lite's spy is GPL-3: it is run here, never copied.
"""
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

SPY_LIBRARY = "/usr/lib/x86_64-linux-gnu/libpcscspy.so.0"
PCSC_LIBRARY = "/usr/lib/x86_64-linux-gnu/libpcsclite.so.1"
PCSC_SPY = "/usr/bin/pcsc-spy"
FIFO_NAME = "pcsc-spy"          # libpcscspy writes to $HOME/pcsc-spy
NOSPY_NAME = "libpcsclite_nospy.so.1"


@dataclass
class Recorded:
    """One application run under libpcscspy."""
    argv: List[str]
    returncode: int       # the application's (negative: killed by that signal)
    stdout: str
    stderr: str
    raw: str              # libpcscspy's log ("" when the application never called it)


@dataclass
class Rendered:
    """pcsc-spy's run on a raw log: what it printed, and whether its reader
    raised (a traceback on stderr; the exit status stays 0 when the exception
    is raised in one of its per-thread workers)."""
    stdout: str
    stderr: str
    returncode: int

    @property
    def crashed(self) -> bool:
        return "Traceback (most recent call last)" in self.stderr


def record(stack, argv: Sequence[str], redirect: bool = False, env: Optional[dict] = None,
           timeout: float = 60) -> Recorded:
    """Run argv against `stack` with pcsc-lite's spy library loaded; return
    the application's result and libpcscspy's raw log.

    redirect=False: LD_PRELOAD (applications linked with libpcsclite).
    redirect=True: LD_LIBRARY_PATH to a private libpcsclite.so.1 -> libpcscspy
    (applications that dlopen libpcsclite.so.1, see the module docstring)."""
    home = Path(tempfile.mkdtemp(prefix="pcsc-spy-home-"))
    try:
        fifo = home / FIFO_NAME
        log = home / "raw.log"
        os.mkfifo(fifo)
        run_env = dict(stack.env if env is None else env, HOME=str(home))
        if redirect:
            libdir = home / "lib"
            libdir.mkdir()
            os.symlink(SPY_LIBRARY, libdir / "libpcsclite.so.1")
            os.symlink(PCSC_LIBRARY, libdir / NOSPY_NAME)
            run_env["LD_LIBRARY_PATH"] = str(libdir)
        else:
            run_env["LD_PRELOAD"] = SPY_LIBRARY
        with open(log, "wb") as out:
            # pcsc-spy's reader would be `pcsc-spy` itself; cat keeps the raw log.
            reader = subprocess.Popen(["cat", str(fifo)], stdout=out, stdin=subprocess.DEVNULL)
        try:
            app = subprocess.run(list(argv), env=run_env, capture_output=True, text=True,
                                 timeout=timeout, stdin=subprocess.DEVNULL)
        finally:
            _stop_reader(reader, fifo)
        raw = log.read_text(encoding="utf-8", errors="surrogateescape")
        return Recorded(list(argv), app.returncode, app.stdout, app.stderr, raw)
    finally:
        shutil.rmtree(home, ignore_errors=True)


def _stop_reader(reader: subprocess.Popen, fifo: Path, timeout: float = 10) -> None:
    """Wait for `cat` to reach the end of the log (the application, the only
    writer, has exited).

    libpcscspy opens the FIFO at the application's first SCard* call; an
    application that never makes one (or whose calls never reach the spy)
    leaves cat waiting for a writer.  Opening the FIFO for writing, without
    blocking, and closing it gives cat its end of file.  The open fails with
    ENXIO while no reader has the FIFO open: cat has not opened it yet, or has
    already closed it; hence the retries until cat exits."""
    deadline = time.monotonic() + timeout
    while reader.poll() is None and time.monotonic() < deadline:
        try:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass
        try:
            reader.wait(0.05)
        except subprocess.TimeoutExpired:
            pass
    if reader.poll() is None:
        reader.kill()
        reader.wait()
        raise RuntimeError("the reader of %s did not finish" % fifo)


def spy_text(stack, argv: Sequence[str], redirect: bool = False) -> str:
    """The text pcsc-spy -n -d prints for argv run against `stack`."""
    return render(record(stack, argv, redirect=redirect).raw).stdout


def render(raw: str, *options: str, timeout: float = 120) -> Rendered:
    """`pcsc-spy OPTIONS FILE` on a raw log (options default to -n -d)."""
    options = options or ("-n", "-d")
    with tempfile.TemporaryDirectory(prefix="pcsc-spy-log-") as d:
        path = Path(d) / "raw.log"
        path.write_text(raw, encoding="utf-8", errors="surrogateescape")
        p = subprocess.run([PCSC_SPY, *options, str(path)], capture_output=True, text=True,
                           timeout=timeout, stdin=subprocess.DEVNULL)
    return Rendered(p.stdout, p.stderr, p.returncode)


def torn(text: str) -> bool:
    """Whether pcsc-spy tore a line.  It prints each traced thread's calls
    from a Python thread of its own, and print() writes a line, then its
    newline: with several threads, a line can come out with another
    thread's line glued to it, then the two newlines (an empty line among
    the call lines, which never hold one).  The log is not at fault: the
    same log rendered again usually comes out whole."""
    calls, _ = split_summary(text)
    return "" in calls


def render_whole(raw: str, *options: str, attempts: int = 10) -> Rendered:
    """render(), again while pcsc-spy tears a line (see torn())."""
    for _ in range(attempts):
        rendered = render(raw, *options)
        if not torn(rendered.stdout):
            break
    return rendered


# -- the raw log --------------------------------------------------------------

_ENTER = re.compile(r"^>\|\d+\|\d+\|(\w+)$")
_RETURN = re.compile(r"^<\|\d+\|\d+\|(\w+)\|")


def raw_calls(raw: str) -> List[Tuple[str, str]]:
    """(thread, function) of each call in a raw log, in the order they start."""
    calls = []
    for line in raw.splitlines():
        thread, _, tail = line.partition("@")
        m = _ENTER.match(tail)
        if m:
            calls.append((thread, m.group(1)))
    return calls


def without_calls(raw: str, drop: Callable[[str, int], bool]) -> str:
    """The raw log without the calls for which drop(function, n) is true (n
    counts that function's calls from 0, over all threads): each call's lines
    go, from its '>' line to its '<' line, on its own thread.

    For the calls pcsc-spy 1.9.9's reader cannot parse: without them, it
    renders the rest of the log."""
    seen: Counter = Counter()
    dropping: Dict[str, str] = {}        # thread -> function being dropped
    kept = []
    for line in raw.splitlines(keepends=True):
        thread, _, tail = line.rstrip("\n").partition("@")
        m = _ENTER.match(tail)
        if m:
            fn = m.group(1)
            n = seen[fn]
            seen[fn] += 1
            if drop(fn, n):
                dropping[thread] = fn
                continue
        if thread in dropping:
            if _RETURN.match(tail):
                del dropping[thread]
            continue
        kept.append(line)
    return "".join(kept)


# -- pcsc-spy's text ----------------------------------------------------------

_THREAD_HEADER = re.compile(r"^Thread \d+/\d+")


def split_summary(text: str) -> Tuple[List[str], List[str]]:
    """(call lines, summary lines): the summary starts at the empty line
    before the first `Thread n/N` header (the call lines never hold an empty
    line: every line of a call has at least its `SCard...`, ` i `, ` o ` or
    ` => ` prefix)."""
    lines = text.splitlines()
    for i in range(len(lines) - 1):
        if lines[i] == "" and _THREAD_HEADER.match(lines[i + 1]):
            return lines[:i], lines[i:]
    return lines, []


@dataclass
class ThreadSummary:
    """One `Thread n/N` block of the summary, its numbers set aside: the
    header, and how many calls of each function (timings, shares and the order
    they decide are not compared)."""
    header: str
    calls: Counter


_TOTAL = re.compile(r"^total time: \d+\.\d{6} sec$")
_FUNCTION = re.compile(r"^\d+\.\d{6} sec \( *(\d+) calls\) +\d+\.\d{2}% (\w+)$")


def summary_counts(summary: List[str]) -> List[ThreadSummary]:
    """Parse pcsc-spy's summary: one ThreadSummary per thread, in order.

    pcsc-spy's -d does not mask the summary: its `total time: %f sec` line and
    each `%f sec (%3d calls) %5.2f%% NAME` line carry timings, and the lines are
    sorted by total time.  Those numbers and that order differ from run to run;
    the function names and call counts do not.  Any other line fails."""
    threads: List[ThreadSummary] = []
    it = iter(summary)
    for line in it:
        if line == "":
            continue
        if _THREAD_HEADER.match(line):
            threads.append(ThreadSummary(line, Counter()))
            continue
        if not threads:
            raise ValueError("summary line before any Thread header: %r" % line)
        if line == "Results sorted by total execution time" or _TOTAL.match(line):
            continue
        m = _FUNCTION.match(line)
        if not m:
            raise ValueError("unexpected summary line: %r" % line)
        threads[-1].calls[m.group(2)] += int(m.group(1))
    return threads


def summary_seconds(summary: List[str]) -> List[Dict[str, float]]:
    """Per thread, the total seconds of each function (for the tests that
    look at timings)."""
    out: List[Dict[str, float]] = []
    for line in summary:
        if _THREAD_HEADER.match(line):
            out.append({})
            continue
        m = re.match(r"^(\d+\.\d{6}) sec \( *\d+ calls\) +\d+\.\d{2}% (\w+)$", line)
        if m and out:
            out[-1][m.group(2)] = float(m.group(1))
    return out
