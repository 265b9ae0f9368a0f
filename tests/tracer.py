"""Run the real pcsc-ebpf-spy command in tests: start it, wait for its
`Tracing` line (the probes are attached), stop it with a signal, collect
what it printed."""
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT = 60.0


@dataclass
class Result:
    stdout: str
    stderr: str
    returncode: int


def command(*args):
    """The tracer's command line (the package run by this interpreter, whose
    virtualenv sees Debian's bcc)."""
    return [sys.executable, "-m", "ebpf_pcsc", *map(str, args)]


class Tracer:
    def __init__(self, *args, env=None):
        self._out = tempfile.TemporaryFile(mode="w+", encoding="utf-8")
        self._err_lines = []
        self.proc = subprocess.Popen(command(*args), cwd=ROOT, env=env,
                                     stdin=subprocess.DEVNULL, stdout=self._out,
                                     stderr=subprocess.PIPE, text=True)
        self._ready = threading.Event()
        self._reader = threading.Thread(target=self._read_stderr, daemon=True)
        self._reader.start()
        deadline = time.monotonic() + START_TIMEOUT
        while not self._ready.wait(0.05):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self._reader.join(2)
                self.proc.kill()
                raise RuntimeError("tracer did not start:\n" + "".join(self._err_lines))

    def _read_stderr(self):
        for line in self.proc.stderr:
            self._err_lines.append(line)
            if line.startswith("Tracing"):
                self._ready.set()

    @property
    def stderr_so_far(self) -> str:
        return "".join(self._err_lines)

    def stop(self, sig=signal.SIGINT, settle=0.3, timeout=30.0) -> Result:
        """Let the last events arrive, signal, wait for the summary."""
        time.sleep(settle)
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self._reader.join(5)
        self._out.seek(0)
        out = self._out.read()
        self._out.close()
        return Result(out, "".join(self._err_lines), code)

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def run_tracer(*args, timeout=60):
    """A tracer run expected to end by itself (bad input)."""
    return subprocess.run(command(*args), cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)
