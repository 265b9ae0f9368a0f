"""A real statically linked PC/SC client: pcsc-lite 2.3.3's libpcsclite.a (built from
Debian's source by tests/static_pcsclite.py, cached) linked into tests/clients/pcsc_client.c,
run in the trixie root against pcscd 2.3.3 (tests/trixie.py).

Such a program has the 18 SCard* functions in its own text and maps no libpcsclite: the
tracer must find them in the executable (ebpf_pcsc/targets.py: `-p PID` looks at
/proc/PID/exe, `--lib` takes the executable's path). tests/test_e2e_targets.py covers only
wrappers that forward to the shared library (tests/clients/forwarder.c); here the whole
client library (IPC included) is in the executable.

The module fixture `runs` runs the scenario `all` four times, their tracers started
together, then stopped together (a tracer takes seconds to start and to stop); each run has
its own copy of the executable (probes go on a file), so no tracer can see another run:

- `pid`: the static client already running (`wait-then-run`, waiting on stdin: its
  /proc/PID/exe is the static client), traced with `-n -d -p PID`;
- `lib`: system-wide, `-n -d --lib <the executable's host path>`, then the client started;
- `shared`: the same source linked with the root's libpcsclite.so.1 (the usual way),
  held before its exec, `-n -d -p PID`: the reference text;
- `held`: the static client held before its exec (a shell, already chrooted, when the
  tracer starts), `-n -d -p PID`: the program is probed when the shell execs it.

Each traced run must hold every call of the client once, in order, with the client's own
result, and the same -n -d text as the shared library's run.
"""
import re
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import pytest

import spy_reference as ref
import static_pcsclite
import trixie
from test_pcsclite2 import (FUNCTIONS, assert_same_lines, client_calls,
                            mapped_pcsc_libraries, no_losses, pcsc_maps, text_calls)
from tracer import Tracer

assert FUNCTIONS == static_pcsclite.FUNCTIONS


@pytest.fixture(scope="module")
def library():
    return static_pcsclite.ensure_library()


@pytest.fixture(scope="module")
def static_bin(library, tmp_path_factory):
    """tests/clients/pcsc_client.c linked with libpcsclite.a 2.3.3 (host path)."""
    out = tmp_path_factory.mktemp("static-client") / "pcsc_client_static"
    return static_pcsclite.link_client(out, library=library)


@pytest.fixture(scope="module")
def stack2():
    with trixie.Pcsclite2Stack() as stack:
        yield stack


@dataclass
class Run:
    client: str             # the executable, as the root sees it
    client_stdout: str
    client_pid: int
    ours: str               # the tracer's stdout
    ours_stderr: str
    maps: Tuple[str, ...] = ()    # pid: its pcsc-lite libraries when the tracer started


def tracing_line(stderr: str) -> Optional[str]:
    return next((l for l in stderr.splitlines() if l.startswith("Tracing")), None)


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.communicate()


def start_tracers(args: Dict[str, tuple], cleanup: ExitStack) -> Dict[str, Tracer]:
    """One tracer per entry, started together; each is killed by cleanup (the ones that
    started also when another one did not)."""
    with ThreadPoolExecutor(len(args)) as pool:
        futures = {name: pool.submit(Tracer, *a) for name, a in args.items()}
    tracers, errors = {}, []
    for name, f in futures.items():
        try:
            tracers[name] = f.result()
            cleanup.callback(tracers[name].kill)
        except Exception as e:
            errors.append("%s: %s" % (name, e))
    if errors:
        raise RuntimeError("\n".join(errors))
    return tracers


@pytest.fixture(scope="module")
def runs(stack2, static_bin, client_bin) -> Dict[str, Run]:
    static = {name: stack2.install(static_bin, "pcsc_client_static_" + name)
              for name in ("pid", "lib", "held")}
    shared = stack2.install(client_bin, "pcsc_client")
    with ExitStack() as cleanup:
        running = subprocess.Popen(stack2.command([static["pid"], "wait-then-run"]),
                                   env=stack2.env(), stdin=subprocess.PIPE,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        cleanup.callback(_kill, running)
        assert running.stdout.readline() == "ready\n", running.stderr.read()
        running_maps = pcsc_maps(running.pid)
        held = {"shared": stack2.popen_waiting([shared, "all"])}
        # A shell now, the static client after its exec (wait-then-run: it waits there).
        execs = stack2.popen_waiting([static["held"], "wait-then-run"])
        for h in (*held.values(), execs):
            cleanup.callback(h.kill)
        tracers = start_tracers({"pid": ("-n", "-d", "-p", running.pid),
                                 "lib": ("-n", "-d", "--lib", stack2.host_path(static["lib"])),
                                 "shared": ("-n", "-d", "-p", held["shared"].pid),
                                 "held": ("-n", "-d", "-p", execs.pid)}, cleanup)
        # Started after its tracer: a system-wide probe on the file sees it from exec on.
        held["lib"] = stack2.popen_waiting([static["lib"], "all"])
        cleanup.callback(held["lib"].kill)
        out = {name: h.release() for name, h in held.items()}
        # The exec is reported by the kernel; the tracer then probes the new program.
        # Probing takes it ~15 ms (README: "Known limit"), so the client waits for the
        # `attached` line before its first call.
        execs.proc.stdin.write("go\n")
        execs.proc.stdin.flush()
        assert execs.proc.stdout.readline() == "ready\n"
        attached = "pcsc-ebpf-spy: attached %s (pid %d" % (static["held"], execs.pid)
        deadline = time.monotonic() + 30
        while attached not in tracers["held"].stderr_so_far:
            assert time.monotonic() < deadline, tracers["held"].stderr_so_far
            time.sleep(0.02)
        out["held"], err = execs.proc.communicate("\n", timeout=60)
        assert execs.proc.returncode == 0, err
        pid_of_held = execs.pid
        running_out, running_err = running.communicate("go\n", timeout=60)
        assert running.returncode == 0, running_err
        out["pid"] = running_out.replace("ready\n", "", 1)
        pids = dict({name: h.pid for name, h in held.items()}, pid=running.pid, held=pid_of_held)
        with ThreadPoolExecutor(len(tracers)) as pool:
            results = dict(zip(tracers, pool.map(lambda n: tracers[n].stop(), tracers)))
    clients = dict(static, shared=shared)
    return {name: Run(clients[name], out[name], pids[name], results[name].stdout,
                      results[name].stderr, running_maps if name == "pid" else ())
            for name in results}


# -- the library and the executable ----------------------------------------------------

def test_library_is_pcsc_lite_2_3_3_client_code(library):
    """The cached libpcsclite.a is complete, from pcsc-lite 2.3.3, and holds the client
    itself (winscard_clnt.c: the 18 functions, defined), not the 2.x redirect
    (libredirect.c, which dlopen()s libpcsclite_real.so.1)."""
    assert static_pcsclite.is_complete(library.root)
    header = (library.include / "pcsclite.h").read_text()
    assert re.search(r'^#define PCSCLITE_VERSION_NUMBER\s+"2\.3\.3"', header, re.M), header
    members = subprocess.run(["ar", "t", str(library.archive)], capture_output=True, text=True,
                             check=True).stdout.split()
    assert any(m.endswith("winscard_clnt.c.o") for m in members), members
    assert not any("redirect" in m for m in members), members
    defined = static_pcsclite.defined_functions(library.archive)
    assert {f for f, t in defined.items() if t == "T"} >= FUNCTIONS


def test_client_has_the_functions_in_its_own_text(static_bin, client_bin):
    """nm: the 18 functions are defined (T) in the static executable; it needs no
    libpcsclite (readelf -d). The same source linked with -lpcsclite defines none."""
    defined = static_pcsclite.defined_functions(static_bin)
    assert {f for f, t in defined.items() if t == "T"} >= FUNCTIONS, defined
    needed = static_pcsclite.needed_libraries(static_bin)
    assert needed and not any("pcsclite" in n for n in needed), needed
    assert not static_pcsclite.defined_functions(client_bin)
    assert "libpcsclite.so.1" in static_pcsclite.needed_libraries(client_bin)


def test_static_client_talks_to_pcscd_2_3_3_without_libpcsclite(stack2, static_bin):
    """Run in the root: its first call (SCardEstablishContext, which checks the protocol
    version with pcscd) succeeds, and it maps no libpcsclite*.so afterwards (the shared
    build maps libpcsclite.so.1 and libpcsclite_real.so.1 there)."""
    static = stack2.install(static_bin, "pcsc_client_static_maps")
    assert mapped_pcsc_libraries(stack2, static) == ()


# -- the tracer on the static executable ----------------------------------------------

def assert_every_call_once(run: Run) -> None:
    expected = client_calls(run.client_stdout)
    assert len(expected) == 27 and {f for f, _ in expected} == FUNCTIONS, run.client_stdout
    assert text_calls(run.ours) == expected, run.ours_stderr
    _, summary = ref.split_summary(run.ours)
    threads = ref.summary_counts(summary)
    assert [t.header for t in threads] == ["Thread 1/1"], summary
    assert threads[0].calls == {f: sum(1 for g, _ in expected if g == f) for f in FUNCTIONS}
    no_losses(run)


def test_pid_of_running_static_client(runs):
    """-p PID of the static client, running (exec'd, no call made yet, no libpcsclite
    mapped): the tracer probes /proc/PID/exe; every call once, with its result."""
    run = runs["pid"]
    assert run.maps == ()
    line = tracing_line(run.ours_stderr)
    assert line is not None and re.fullmatch(
        r"Tracing 18 PC/SC functions in \S*/pcsc_client_static_pid \(pid %d\)\.\.\. "
        r"Hit Ctrl-C to end\." % run.client_pid, line), run.ours_stderr
    assert_every_call_once(run)


def test_lib_static_executable_system_wide(runs, stack2):
    """--lib with the executable's host path, no -p: the process that runs it, started
    after the tracer, is traced from its first call; every call once."""
    run = runs["lib"]
    assert tracing_line(run.ours_stderr) == (
        "Tracing 18 PC/SC functions in %s... Hit Ctrl-C to end."
        % stack2.host_path(run.client)), run.ours_stderr
    assert_every_call_once(run)


def test_same_text_as_the_shared_library(runs):
    """The same scenario through the root's libpcsclite.so.1 -> libpcsclite_real.so.1:
    the client makes the same calls with the same results, and -n -d gives the same
    text, line by line, for both static runs; the same counts in the summaries."""
    shared = runs["shared"]
    assert_every_call_once(shared)
    shared_lines, shared_summary = ref.split_summary(shared.ours)
    for name in ("pid", "lib"):
        run = runs[name]
        assert client_calls(run.client_stdout) == client_calls(shared.client_stdout)
        lines, summary = ref.split_summary(run.ours)
        assert_same_lines(lines, shared_lines, "static (%s) vs shared library" % name)
        assert [t.calls for t in ref.summary_counts(summary)] == \
            [t.calls for t in ref.summary_counts(shared_summary)]


def test_pid_of_static_client_held_before_exec(runs):
    """-p PID of a process that becomes the static client after the tracer started (the
    held shell execs it): the tracer probes the new program when the kernel reports the
    exec (stderr says `attached`); every call once, as for the shared library."""
    run = runs["held"]
    assert_every_call_once(run)
