"""A private PC/SC stack for tests, demos and benchmarks: pcscd + vpcd + the virtual card.

    with PcscStack() as stack:                 # card inserted and present on return
        subprocess.run([...], env=stack.env)  # any PC/SC client talks to this stack
        stack.stop_card(); stack.start_card(); stack.restart_pcscd()

How it stays private (nothing on the machine is disturbed, a system pcscd may keep running):
pcscd 1.9.9 always serves /run/pcscd and ignores PCSCLITE_CSOCK_NAME, so it runs in its own
mount namespace (``unshare -m``) on a fresh tmpfs mounted over /run/pcscd, with its own
reader.conf directory (``-c``). Clients reach its socket through
``/proc/<pcscd pid>/root/run/pcscd/pcscd.comm`` (set in ``env``); the client library honours
PCSCLITE_CSOCK_NAME. libpcsclite reads that variable once per process, so clients (and
the state queries below) run as subprocesses.

vpcd quirks: one reader.conf entry gives two readers, "Virtual PCD 00 00" listening on
CHANNELID and "Virtual PCD 00 01" on CHANNELID + 1 (both on 0.0.0.0). The card uses slot 0.
pcscd polls vpcd for card presence every 400 ms, so inserting/removing takes up to ~0.4 s.

Every process started here is in its own process group (killed as a group) and gets
PR_SET_PDEATHSIG=SIGKILL, so nothing survives the Python process even if it is killed
without cleanup. PDEATHSIG fires when the *thread* that started the process exits: create
and use a PcscStack from one long-lived thread (the main thread normally).
"""
import atexit
import ctypes
import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

TESTS_DIR = Path(__file__).resolve().parent
PYTHON = "/usr/bin/python3"  # Debian's python (not the pyenv one on PATH)
VCARD = TESTS_DIR / "vcard.py"
CLIENT = TESTS_DIR / "pcsc_ctypes_client.py"
VPCD_DRIVER = "/usr/lib/pcsc/drivers/serial/libifdvpcd.so"
FRIENDLY_NAME = "Virtual PCD"
START_TIMEOUT = 5.0

_libc = ctypes.CDLL(None, use_errno=True)
_PR_SET_PDEATHSIG = 1


def _die_with_parent():
    # Runs in the child between fork and exec; inherited across exec (not setuid binaries).
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _spawn(argv, log_path, **kwargs):
    """Start argv in a new session/process group, stdout+stderr appended to log_path."""
    with open(log_path, "ab") as log:
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, preexec_fn=_die_with_parent, **kwargs)


def _terminate(proc, grace=3.0):
    """SIGTERM the process group of proc, SIGKILL it after `grace` seconds; reap proc."""
    if proc is None or proc.poll() is not None:
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue
    proc.wait()


def _port_free(port):
    with socket.socket() as s:
        try:
            s.bind(("0.0.0.0", port))  # vpcd binds INADDR_ANY
            return True
        except OSError:
            return False


def free_port_pair():
    """A port P with P and P + 1 free (vpcd listens on both, see the module docstring).

    Chosen below the kernel's ephemeral range, so the card's own outgoing connections
    (which retry while pcscd restarts) can never take it.
    """
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for _ in range(200):
        port = random.randrange(10000, low - 1)
        if _port_free(port) and _port_free(port + 1):
            return port
    raise RuntimeError("no free TCP port pair for vpcd")


class StackBase:
    """What a private stack does the same whatever its pcscd (PcscStack here, pcsc-lite
    2.3.3's in trixie.Pcsclite2Stack): the reader.conf of the vpcd reader, starting and
    waiting for pcscd, the virtual card, the reader's state, stopping everything.

    A subclass sets port, tmpdir, pcscd_log and card_log, calls _start(card), and has
    client(*args) (tests/pcsc_ctypes_client.py against its pcscd) and _start_pcscd().
    """

    def _write_reader_conf(self, conf_dir, driver=VPCD_DRIVER):
        """conf_dir/reader.conf: one vpcd reader on self.port (pcscd -c takes the dir)."""
        conf_dir.mkdir()
        (conf_dir / "reader.conf").write_text(
            f'FRIENDLYNAME "{FRIENDLY_NAME}"\n'
            f"DEVICENAME /dev/null:{self.port}\n"
            f"LIBPATH {driver}\n"
            f"CHANNELID {self.port}\n")

    def _start(self, card):
        """Start pcscd, then the card unless card=False; everything stopped on failure,
        and at exit if close() was not called."""
        self._pcscd = self._card = None
        self.reader_name = None
        atexit.register(self.close)
        try:
            self._start_pcscd()
            if card:
                self.start_card()
        except BaseException:
            self.close()
            raise

    def _wait_readers(self, socket_path, timeout, interval):
        """Once pcscd (self._pcscd, just started) has socket_path and lists our reader:
        the reader names, in slot order."""
        deadline = time.monotonic() + timeout
        while True:
            if self._pcscd.poll() is not None:
                raise RuntimeError(f"pcscd exited with {self._pcscd.returncode}: {self._log_tail()}")
            if os.path.exists(socket_path):
                readers = self.client("list").stdout.split("\n")
                if readers[0].startswith(FRIENDLY_NAME):
                    return readers
            if time.monotonic() > deadline:
                raise RuntimeError(f"pcscd not ready after {timeout} s: {self._log_tail()}")
            time.sleep(interval)

    @property
    def pcscd_pid(self):
        return self._pcscd.pid

    # -- context manager ---------------------------------------------------------------
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- the card ----------------------------------------------------------------------
    def reader_state(self):
        """The reader's current SCARD_STATE_* flags (SCardGetStatusChange dwEventState)."""
        r = self.client("state", self.reader_name)
        if r.returncode != 0:
            raise RuntimeError(f"state query failed: {r.stderr.strip()}")
        return int(r.stdout.split()[0], 16)

    def wait_card_present(self, timeout=START_TIMEOUT):
        self._wait_state("present", timeout)

    def wait_card_absent(self, timeout=START_TIMEOUT):
        self._wait_state("empty", timeout)

    @property
    def card_running(self):
        return self._card is not None and self._card.poll() is None

    @property
    def card_pid(self):
        """pid of the running virtual card process, None when the card is removed."""
        return self._card.pid if self.card_running else None

    def start_card(self, wait=True):
        """Insert the card (start tests/vcard.py); by default wait until pcscd sees it."""
        if not self.card_running:
            self._card = _spawn([PYTHON, str(VCARD), "--port", str(self.port)], self.card_log)
        if wait:
            self.wait_card_present()

    def stop_card(self, wait=True):
        """Remove the card (stop tests/vcard.py); by default wait until pcscd sees it gone."""
        _terminate(self._card)
        self._card = None
        if wait:
            self.wait_card_absent()

    def close(self):
        """Stop the card and pcscd, delete the temp dir. Idempotent."""
        atexit.unregister(self.close)
        _terminate(self._card)
        _terminate(self._pcscd)
        shutil.rmtree(self.tmpdir, ignore_errors=True)

    # -- internals ---------------------------------------------------------------------
    def _wait_state(self, state, timeout):
        r = self.client("wait", self.reader_name, state, timeout, timeout=timeout + 10)
        if r.returncode != 0:
            raise TimeoutError(f"reader {self.reader_name!r} not {state} after {timeout} s: "
                               f"{r.stderr.strip()}")

    def _log_tail(self, n=2000):
        try:
            return self.pcscd_log.read_text(errors="replace")[-n:]
        except OSError:
            return ""


class PcscStack(StackBase):
    """A private pcscd with one vpcd reader and the virtual card of tests/vcard.py.

    card=False starts with the reader empty; pcscd_debug=True adds pcscd's -d (debug log).
    Attributes: port (vpcd TCP port), reader_name ("Virtual PCD 00 00"), tmpdir (Path),
    pcscd_log and card_log (Paths in tmpdir, the processes' stdout+stderr).
    Properties pcscd_pid, socket_path and env change with restart_pcscd().
    """

    def __init__(self, card=True, pcscd_debug=False):
        self.port = free_port_pair()
        self.tmpdir = Path(tempfile.mkdtemp(prefix="pcsc-stack-"))
        self.pcscd_log = self.tmpdir / "pcscd.log"
        self.card_log = self.tmpdir / "card.log"
        self._conf_dir = self.tmpdir / "reader.conf.d"  # pcscd -c takes a directory
        self._write_reader_conf(self._conf_dir)
        self._pcscd_args = ["-f", "-c", str(self._conf_dir)] + (["-d"] if pcscd_debug else [])
        self._start(card)

    # -- public API --------------------------------------------------------------------
    @property
    def socket_path(self):
        return f"/proc/{self.pcscd_pid}/root/run/pcscd/pcscd.comm"

    @property
    def env(self):
        """os.environ plus PCSCLITE_CSOCK_NAME pointing at this stack's pcscd (a new copy)."""
        return dict(os.environ, PCSCLITE_CSOCK_NAME=self.socket_path)

    def run(self, argv, **kwargs):
        """subprocess.run(argv) with this stack's env; by default output is captured as
        text and the timeout is 30 s (kwargs override these)."""
        options = dict(env=self.env, capture_output=True, text=True, timeout=30)
        options.update(kwargs)
        return subprocess.run(argv, **options)

    def popen_waiting(self, argv, env=None):
        """Start argv held before exec: its pid is known (and can be traced
        with -p) before it makes any call; release() lets it run."""
        return HeldProcess(argv, env if env is not None else self.env)

    def client(self, *args, **kwargs):
        """Run tests/pcsc_ctypes_client.py with args (see its docstring) against this stack."""
        return self.run([PYTHON, str(CLIENT), *map(str, args)], **kwargs)

    def restart_pcscd(self):
        """Stop and start pcscd (same port and reader; new pid, so a new env)."""
        _terminate(self._pcscd)
        self._start_pcscd()
        if self.card_running:
            self.wait_card_present()  # the card reconnects by itself

    # -- internals ---------------------------------------------------------------------
    def _start_pcscd(self, timeout=START_TIMEOUT):
        # Mount point for the private tmpfs; an empty directory on the host is harmless
        # (a system pcscd would create it anyway) and it is hidden from it by the mount.
        os.makedirs("/run/pcscd", exist_ok=True)
        # unshare (without --fork) and sh's `exec` keep one pid: Popen's pid is pcscd's.
        # unshare -m makes the namespace's mounts private, so the tmpfs never reaches the host.
        self._pcscd = _spawn(["unshare", "-m", "sh", "-c",
                              'mount -t tmpfs tmpfs /run/pcscd && exec pcscd "$@"', "sh",
                              *self._pcscd_args], self.pcscd_log)
        readers = self._wait_readers(self.socket_path, timeout, 0.01)
        # readers are listed in slot order: the first one is slot 0, the card's port
        if self.reader_name is None:
            self.reader_name = readers[0]
        elif readers[0] != self.reader_name:
            raise RuntimeError(f"reader renamed after restart: {readers[0]!r}")


class HeldProcess:
    """A process that waits, as a shell, for a line on stdin, then execs
    argv (exec keeps the pid)."""

    def __init__(self, argv, env):
        self.proc = subprocess.Popen(["sh", "-c", 'read _ && exec "$@"', "sh", *map(str, argv)],
                                     env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True,
                                     preexec_fn=_die_with_parent)
        self.pid = self.proc.pid
        self.returncode = None
        self.stderr = ""

    def release(self, stdin="", timeout=60):
        """Let it run to its end; its stdout."""
        out, self.stderr = self.proc.communicate("go\n" + stdin, timeout=timeout)
        self.returncode = self.proc.returncode
        assert self.returncode == 0, self.stderr
        return out
