#!/usr/bin/env python3
"""`make demo`: pcsc-ebpf-spy on a private, virtual PC/SC stack.

    sudo make demo                          # a Python (ctypes) client, a short trace
    sudo .venv/bin/python tests/demo.py --all   # the C client: all 18 functions

Starts a private pcscd with a virtual reader and card (tests/testbed.py: no
hardware, a system pcscd keeps running undisturbed), starts a client that
waits, attaches `pcsc-ebpf-spy -p <its pid>` to it (the client is already
running: pcsc-spy cannot do that), lets the client run, stops the tracer with
SIGINT and leaves its trace on stdout (in colour on a terminal).  Progress
goes to stderr.  Everything started here is stopped on exit, Ctrl-C or error.

Exit status: 0 done, 1 something failed, 2 not root, 130 interrupted.
"""
import argparse
import ctypes
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
sys.path.insert(0, str(TESTS))

from testbed import PYTHON, PcscStack  # noqa: E402

START_TIMEOUT = 60.0   # the tracer compiles its BPF program first (1-7 s seen here)
RUN_TIMEOUT = 30.0

# The default client: Python through ctypes, so libpcsclite.so.1 is dlopen()ed
# (pcsc-spy's LD_PRELOAD does not see such applications).  It loads the
# library, says "ready", and makes its calls only once stdin gives a line.
PY_CLIENT = r"""
import sys
sys.path.insert(0, sys.argv[1])
import pcsc_ctypes_client as pc          # dlopen("libpcsclite.so.1")
print("ready", flush=True)
sys.stdin.readline()
with pc.Context() as ctx:
    reader = ctx.list_readers()[0]
    ctx.get_status(reader)
    with ctx.connect(reader) as card:
        for apdu in (pc.SELECT, pc.GET_CHALLENGE):
            print("%s -> %s" % (apdu.hex(" ").upper(), card.transmit(apdu).hex(" ").upper()))
"""

_libc = ctypes.CDLL(None, use_errno=True)


def say(message):
    sys.stderr.write("demo: %s\n" % message)
    sys.stderr.flush()


def _die_with_parent():
    _libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: nothing outlives the demo


def _spawn(argv, **kwargs):
    """A child in its own process group (a Ctrl-C reaches the demo only, which
    then stops the children in order), killed if the demo dies."""
    return subprocess.Popen(argv, start_new_session=True, preexec_fn=_die_with_parent, **kwargs)


def _stop(proc, sig=signal.SIGTERM, grace=5.0):
    if proc is None or proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, sig)
        proc.wait(grace)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _interrupt(signum, frame):
    # The first Ctrl-C (or SIGTERM) interrupts; later ones must not cut the
    # clean-up short.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise KeyboardInterrupt


class Demo:
    def __init__(self, use_c_client: bool):
        self.use_c_client = use_c_client
        self.tmpdir = Path(tempfile.mkdtemp(prefix="pcsc-demo-"))
        self.stack = self.client = self.tracer = None
        self._tracing = threading.Event()

    # -- steps --
    def client_argv(self):
        if not self.use_c_client:
            return [PYTHON, "-c", PY_CLIENT, str(TESTS)], "a Python client (ctypes: dlopen()s libpcsclite)"
        exe = self.tmpdir / "pcsc_client"
        say("compiling tests/clients/pcsc_client.c")
        subprocess.run(["gcc", "-O0", "-g", "-Wall", "-Wextra", "-I/usr/include/PCSC",
                        str(TESTS / "clients" / "pcsc_client.c"), "-o", str(exe),
                        "-lpcsclite", "-lpthread"], check=True)
        return [str(exe), "wait-then-run"], "the C client (scenario 'all': the 18 functions)"

    def run(self):
        argv, what = self.client_argv()
        say("starting a private pcscd with a virtual reader and card (nothing else is touched)")
        self.stack = PcscStack()
        say("pcscd pid %d, virtual card pid %d on port %d, reader \"%s\", files in %s"
            % (self.stack.pcscd_pid, self.stack.card_pid, self.stack.port,
               self.stack.reader_name, self.stack.tmpdir))

        self.client = _spawn(argv, env=self.stack.env, stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if self.client.stdout.readline().strip() != "ready":
            raise RuntimeError("the client did not start: %s" % self.client.stderr.read().strip())
        say("started %s, pid %d: it waits" % (what, self.client.pid))

        color = sys.stdout.isatty()
        tracer_argv = [sys.executable, "-m", "ebpf_pcsc", "-p", str(self.client.pid)]
        if not color:
            tracer_argv.append("-n")
        say("attaching to the running client: pcsc-ebpf-spy -p %d%s"
            % (self.client.pid, "" if color else " -n"))
        sys.stdout.flush()
        # The tracer writes the trace straight to our stdout (a terminal: live,
        # in colour); its stderr comes through us.
        self.tracer = _spawn(tracer_argv, cwd=ROOT, stdin=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
        say("tracer pid %d" % self.tracer.pid)
        threading.Thread(target=self._relay_stderr, daemon=True).start()
        deadline = time.monotonic() + START_TIMEOUT
        while not self._tracing.wait(0.05):
            if self.tracer.poll() is not None:
                raise RuntimeError("the tracer exited with status %d before tracing"
                                   % self.tracer.returncode)
            if time.monotonic() > deadline:
                raise RuntimeError("the tracer did not start in %d s" % START_TIMEOUT)

        say("the client runs now")
        out, err = self.client.communicate("go\n", timeout=RUN_TIMEOUT)
        if self.client.returncode != 0:
            raise RuntimeError("the client failed (status %d): %s"
                               % (self.client.returncode, err.strip()))
        if not self.use_c_client:
            for line in out.splitlines():
                say("client: %s" % line)

        time.sleep(0.2)  # let the last events reach the tracer
        say("stopping the tracer (SIGINT): it prints the summary, then detaches its probes "
            "(the kernel may take seconds)")
        status = self._stop_tracer()
        if status != 0:
            raise RuntimeError("the tracer exited with status %d" % status)

    def _relay_stderr(self):
        for line in self.tracer.stderr:
            sys.stderr.write(line)
            sys.stderr.flush()
            if line.startswith("Tracing"):
                self._tracing.set()

    def _stop_tracer(self):
        if self.tracer is None or self.tracer.poll() is not None:
            return self.tracer.returncode if self.tracer else 0
        os.killpg(self.tracer.pid, signal.SIGINT)
        try:
            return self.tracer.wait(RUN_TIMEOUT)
        except subprocess.TimeoutExpired:
            _stop(self.tracer, signal.SIGKILL)
            return self.tracer.returncode

    def cleanup(self):
        self._stop_tracer()        # a trace so far is still printed
        _stop(self.client, signal.SIGKILL)
        if self.stack is not None:
            self.stack.close()
        shutil.rmtree(self.tmpdir, ignore_errors=True)
        say("cleaned up: pcscd, virtual card, client and tracer are stopped")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--all", action="store_true",
                        help="trace the C client calling all 18 functions (long: includes "
                             "a 4 KB extended APDU)")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        say("needs root (eBPF, a private mount namespace for pcscd): sudo make demo")
        return 2
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    demo = Demo(args.all)
    status = 0
    try:
        demo.run()
    except KeyboardInterrupt:
        say("interrupted")
        status = 130
    except Exception as e:
        say("failed: %s" % e)
        status = 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        demo.cleanup()
    return status


if __name__ == "__main__":
    sys.exit(main())
