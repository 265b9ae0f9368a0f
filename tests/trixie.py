"""A real pcsc-lite 2.3.3 stack for tests: Debian trixie in a debootstrap'ed root.

    root = ensure_root()                       # built once per machine, then cached
    with Pcsclite2Stack() as stack:            # pcscd 2.3.3 + vpcd + tests/vcard.py, card present
        path = stack.install(client_bin)       # a host file, copied where the root sees it (/tmp/...)
        r = stack.run([path, "all"])           # a client inside the root (chroot), against this pcscd
        held = stack.popen_waiting([path, "all"])   # pid known (for -p) before the client starts
        ...; out = held.release()

Why a whole root: pcscd 2.3.3 needs glibc 2.38 (Debian 12 has 2.36), and a 2.3.3 client
library does not talk to the 1.9.9 pcscd (nor the reverse). pcsc-lite >= 2.1 also differs in
the client library's shape: libpcsclite.so.1 is a small redirect that dlopen()s
libpcsclite_real.so.1 (or the library named by LIBPCSCLITE_DELEGATE, e.g. pcsc-spy's
libpcscspy.so.0, which itself dlopen()s libpcsclite_real.so.1).

The root (ROOT_DIR, ~200 MB) is built by `debootstrap --variant=minbase trixie` plus
`apt-get install --no-install-recommends` of PACKAGES (pcscd, libpcsclite1, libpcsclite-dev,
vsmartcard-vpcd, python3 for pcsc-spy and tests/pcsc_ctypes_client.py). It is built in a
temporary directory, marked complete (MARKER, holding RECIPE) and renamed into place, all
under a lock file: an interrupted build is redone, two test runs never build it twice, a
change of RECIPE rebuilds it. debootstrap and apt run in a private mount namespace, so the
mounts they make (/proc, /sys) never outlive them, and in a private PID namespace, so no
process of an interrupted build survives it. The stack
never writes into the root: everything it changes is mounted over it in its own namespace.

How a stack is private (nothing on the machine is disturbed, other stacks may run):
pcscd runs chrooted into the root, in its own mount namespace (``unshare -m``) where /proc and
/dev are bind-mounted into the root, /run is a fresh tmpfs (pcscd's socket is
/run/pcscd/pcscd.comm there) and /tmp is the stack's own host directory (``tmpdir``: the
reader.conf, the files given to ``install``, pcsc-spy's FIFO). Clients run in that same
namespace and root (``nsenter --mount`` into pcscd's namespace, then ``chroot``), so they
find the daemon at its default path with the root's libraries. The network namespace is the
host's: the virtual card (tests/vcard.py, run by the host's /usr/bin/python3) reaches vpcd on
127.0.0.1. The namespace, and the mounts in it, end with its last process.
"""
import atexit
import fcntl
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from testbed import (PYTHON, VCARD, CLIENT as CTYPES_CLIENT, START_TIMEOUT, HeldProcess,
                     _die_with_parent, _spawn, _terminate, free_port_pair)

CACHE_DIR = Path(os.environ.get("PCSC_EBPF_SPY_CACHE", "/var/cache/pcsc-ebpf-spy"))
ROOT_DIR = CACHE_DIR / "trixie-root"
LOCK_FILE = CACHE_DIR / "trixie-root.lock"
BUILD_LOG = CACHE_DIR / "trixie-root.build.log"
MIRROR = "http://deb.debian.org/debian"
SUITE = "trixie"
PACKAGES = ("pcscd", "libpcsclite1", "libpcsclite-dev", "vsmartcard-vpcd", "python3")
MARKER = ".pcsc-ebpf-spy-root"
# What the marker holds: change it (or PACKAGES) and the cached root is rebuilt.
RECIPE = "debootstrap --variant=minbase %s %s; apt-get install --no-install-recommends %s; v1" % (
    SUITE, MIRROR, " ".join(PACKAGES))
BUILD_TIMEOUT = 1800

# Paths inside the root.
LIB_DIR = "/usr/lib/x86_64-linux-gnu"
REDIRECT_LIBRARY = LIB_DIR + "/libpcsclite.so.1"
REAL_LIBRARY = LIB_DIR + "/libpcsclite_real.so.1"
SPY_LIBRARY = LIB_DIR + "/libpcscspy.so.0"
PCSC_SPY = "/usr/bin/pcsc-spy"
PCSCD = "/usr/sbin/pcscd"
VPCD_DRIVER = "/usr/lib/pcsc/drivers/serial/libifdvpcd.so"
ROOT_PYTHON = "/usr/bin/python3"
FRIENDLY_NAME = "Virtual PCD"
# Every process started in the root gets this environment (plus what the caller adds),
# not the host's (whose PATH points at a pyenv, LD_* could point at host libraries...).
ROOT_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME": "/tmp", "LC_ALL": "C.UTF-8"}
_EXPECTED_FILES = (REDIRECT_LIBRARY, REAL_LIBRARY, SPY_LIBRARY, PCSC_SPY, PCSCD, VPCD_DRIVER,
                   ROOT_PYTHON, "/usr/include/PCSC/winscard.h", "/bin/sh")


# -- the root ------------------------------------------------------------------------------

def root_is_complete(root=ROOT_DIR):
    try:
        return (Path(root) / MARKER).read_text() == RECIPE
    except OSError:
        return False


def ensure_root(log=None):
    """The path of a complete trixie root with pcsc-lite 2.3.3: the cached one, else built
    now (a few minutes at most; ~1 min here). `log`: a callable given progress messages."""
    if root_is_complete():
        return ROOT_DIR
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    with open(LOCK_FILE, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)        # another run may be building it: wait
        if root_is_complete():
            return ROOT_DIR
        _build_root(log or (lambda msg: None))
    return ROOT_DIR


def _debootstrap():
    for d in ("/usr/sbin", "/sbin"):
        if os.access(os.path.join(d, "debootstrap"), os.X_OK):
            return os.path.join(d, "debootstrap")
    found = shutil.which("debootstrap")
    if found:
        return found
    # Normally installed by `make setup`; a CI image without it still builds the root.
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-q"], check=True, env=env, stdout=subprocess.DEVNULL)
    subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", "debootstrap"],
                   check=True, env=env, stdout=subprocess.DEVNULL)
    return "/usr/sbin/debootstrap"


def _remove_tree(path):
    """rm -rf that never crosses into a mounted filesystem (none should be left: builds
    mount only in their own, dead, namespaces)."""
    if os.path.lexists(path):
        subprocess.run(["rm", "-rf", "--one-file-system", str(path)], check=True)


_BUILD_SCRIPT = r"""
set -eu
R=$1 DEBOOTSTRAP=$2 SUITE=$3 MIRROR=$4
shift 4
"$DEBOOTSTRAP" --variant=minbase "$SUITE" "$R" "$MIRROR"
# No service is started by a package's scripts (there is no init in the root anyway).
printf '#!/bin/sh\nexit 101\n' > "$R/usr/sbin/policy-rc.d"
chmod 755 "$R/usr/sbin/policy-rc.d"
mount -t proc proc "$R/proc"
chroot "$R" apt-get update -q
chroot "$R" apt-get install -y -q --no-install-recommends "$@"
chroot "$R" apt-get clean
rm -rf "$R"/var/lib/apt/lists/*
"""


def _build_root(log):
    debootstrap = _debootstrap()
    # Leftovers of interrupted builds (we hold the lock: none of them is running).
    for stale in CACHE_DIR.glob(ROOT_DIR.name + ".tmp-*"):
        _remove_tree(stale)
    for stale in CACHE_DIR.glob(ROOT_DIR.name + ".old-*"):
        _remove_tree(stale)
    tmp = CACHE_DIR / ("%s.tmp-%d" % (ROOT_DIR.name, os.getpid()))
    log("building the pcsc-lite 2.3.3 root in %s (log: %s)" % (tmp, BUILD_LOG))
    started = time.monotonic()
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C", "HOME": "/root",
           "DEBIAN_FRONTEND": "noninteractive"}
    with open(BUILD_LOG, "w") as out:
        proc = None
        try:
            # Private mount and PID namespaces: the mounts (/proc here, debootstrap's own
            # /proc and /sys) die with them, and so does every process of the build when
            # unshare dies (--kill-child: its child is the namespace's init), also when
            # this process is killed (PDEATHSIG on unshare).
            proc = subprocess.Popen(["unshare", "--mount", "--pid", "--fork", "--kill-child",
                                     "sh", "-c", _BUILD_SCRIPT, "sh", str(tmp), debootstrap,
                                     SUITE, MIRROR, *PACKAGES],
                                    stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                    preexec_fn=_die_with_parent)
            if proc.wait(timeout=BUILD_TIMEOUT) != 0:
                raise RuntimeError("exit status %d" % proc.returncode)
            missing = [p for p in _EXPECTED_FILES if not os.path.lexists(str(tmp) + p)]
            if missing:
                raise RuntimeError("the built root lacks %s" % ", ".join(missing))
        except BaseException as e:
            if proc is not None and proc.poll() is None:
                _terminate(proc, grace=10)
            _remove_tree(tmp)
            try:
                tail = BUILD_LOG.read_text(errors="replace")[-3000:]
            except OSError:
                tail = ""
            if isinstance(e, Exception):
                raise RuntimeError("building the trixie root failed (%s):\n%s" % (e, tail)) from e
            raise
    (tmp / MARKER).write_text(RECIPE)
    if os.path.lexists(ROOT_DIR):        # an incomplete or outdated root
        old = CACHE_DIR / ("%s.old-%d" % (ROOT_DIR.name, os.getpid()))
        os.rename(ROOT_DIR, old)
        _remove_tree(old)
    os.rename(tmp, ROOT_DIR)
    log("built the root in %.0f s" % (time.monotonic() - started))


def package_version(package, root=ROOT_DIR):
    """The version of a Debian package installed in the root (from its dpkg status file)."""
    status = (Path(root) / "var/lib/dpkg/status").read_text()
    for para in status.split("\n\n"):
        fields = dict(line.split(": ", 1) for line in para.splitlines()
                      if ": " in line and not line.startswith(" "))
        if fields.get("Package") == package and "installed" in fields.get("Status", ""):
            return fields["Version"]
    return None


# -- the stack -----------------------------------------------------------------------------

_PCSCD_SCRIPT = r"""
set -eu
R=$1 T=$2
shift 2
mount --bind /proc "$R/proc"
mount --rbind /dev "$R/dev"
mount -t tmpfs -o mode=755 tmpfs "$R/run"
mount --bind "$T" "$R/tmp"
exec chroot "$R" "$@"
"""


class Pcsclite2Stack:
    """pcscd 2.3.3 (chrooted into the trixie root, own mount namespace) with one vpcd
    reader and the virtual card of tests/vcard.py.

    card=False starts with the reader empty; pcscd_debug=True adds pcscd's -d.
    Attributes: root (the root's host path), port (vpcd's TCP port; vpcd also makes a
    second reader on port + 1), reader_name ("Virtual PCD 00 00"), tmpdir (host path of
    the root's /tmp in this stack), pcscd_log and card_log (host paths).
    Properties: pcscd_pid, card_running, card_pid.
    """

    def __init__(self, card=True, pcscd_debug=False, root=None, log=None):
        self.root = Path(root) if root is not None else ensure_root(log)
        self.port = free_port_pair()
        self.tmpdir = Path(tempfile.mkdtemp(prefix="pcsc2-stack-"))
        os.chmod(self.tmpdir, 0o1777)        # it is the root's /tmp
        self.pcscd_log = self.tmpdir / "pcscd.log"
        self.card_log = self.tmpdir / "card.log"
        conf_dir = self.tmpdir / "reader.conf.d"  # pcscd -c takes a directory
        conf_dir.mkdir()
        (conf_dir / "reader.conf").write_text(
            f'FRIENDLYNAME "{FRIENDLY_NAME}"\n'
            f"DEVICENAME /dev/null:{self.port}\n"
            f"LIBPATH {VPCD_DRIVER}\n"
            f"CHANNELID {self.port}\n")
        self.ctypes_client = self.install(CTYPES_CLIENT)
        self._pcscd_argv = [PCSCD, "-f", "--disable-polkit", "-c", "/tmp/reader.conf.d"] + (
            ["-d"] if pcscd_debug else [])
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

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- running things in the root --------------------------------------------------------
    @property
    def pcscd_pid(self):
        return self._pcscd.pid

    def install(self, host_path, name=None):
        """Copy a host file (mode kept) into this stack's /tmp; its path inside the root."""
        name = name or Path(host_path).name
        shutil.copy2(host_path, self.tmpdir / name)
        return "/tmp/" + name

    def host_path(self, path):
        """The host path of a file under the root's /tmp (this stack's tmpdir)."""
        rel = os.path.relpath(path, "/tmp")
        if rel.startswith(".."):
            raise ValueError("%s is not under /tmp" % path)
        return self.tmpdir / rel

    def env(self, **extra):
        """The environment of a process in the root: ROOT_ENV plus `extra`."""
        return dict(ROOT_ENV, **{k: str(v) for k, v in extra.items()})

    def command(self, argv):
        """argv run inside the root, in pcscd's mount namespace; every exec keeps the pid
        (nsenter enters a mount namespace without forking, chroot execs)."""
        return ["nsenter", "--target", str(self.pcscd_pid), "--mount", "--",
                "chroot", str(self.root), *map(str, argv)]

    def run(self, argv, env=None, **kwargs):
        """subprocess.run of argv inside the root; env: extra variables (see env()).
        By default output is captured as text and the timeout is 30 s."""
        options = dict(capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
        options.update(kwargs)
        return subprocess.run(self.command(argv), env=self.env(**(env or {})),
                              preexec_fn=_die_with_parent, **options)

    def popen_waiting(self, argv, env=None):
        """argv inside the root, held before its exec: the held process is already the
        root's /bin/sh, chrooted and in the stack's namespace (so -p PID finds the root
        through /proc/PID/root), and has made no call; release() lets it exec argv (same
        pid). env: extra variables (see env())."""
        return ChrootHeldProcess(self, argv, env)

    def client(self, *args, **kwargs):
        """tests/pcsc_ctypes_client.py with args, run by the root's python3 (so it dlopen()s
        the root's libpcsclite.so.1)."""
        return self.run([ROOT_PYTHON, self.ctypes_client, *map(str, args)], **kwargs)

    # -- the card --------------------------------------------------------------------------
    def reader_state(self):
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
        return self._card.pid if self.card_running else None

    def start_card(self, wait=True):
        if not self.card_running:
            self._card = _spawn([PYTHON, str(VCARD), "--port", str(self.port)], self.card_log)
        if wait:
            self.wait_card_present()

    def stop_card(self, wait=True):
        _terminate(self._card)
        self._card = None
        if wait:
            self.wait_card_absent()

    def close(self):
        """Stop the card and pcscd (the namespace and its mounts go with pcscd, once the
        clients started by this stack have ended), delete tmpdir. Idempotent."""
        atexit.unregister(self.close)
        _terminate(self._card)
        _terminate(self._pcscd)
        shutil.rmtree(self.tmpdir, ignore_errors=True)

    # -- internals -------------------------------------------------------------------------
    def _start_pcscd(self, timeout=START_TIMEOUT):
        # unshare (no --fork), sh's exec and chroot's exec keep one pid: Popen's is pcscd's.
        self._pcscd = _spawn(["unshare", "-m", "sh", "-c", _PCSCD_SCRIPT, "sh", str(self.root),
                              str(self.tmpdir), *self._pcscd_argv], self.pcscd_log,
                             env=self.env())
        socket = "/proc/%d/root/run/pcscd/pcscd.comm" % self._pcscd.pid
        deadline = time.monotonic() + timeout
        while True:
            if self._pcscd.poll() is not None:
                raise RuntimeError(f"pcscd exited with {self._pcscd.returncode}: {self._log_tail()}")
            if os.path.exists(socket):
                readers = self.client("list").stdout.split("\n")
                if readers[0].startswith(FRIENDLY_NAME):
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"pcscd not ready after {timeout} s: {self._log_tail()}")
            time.sleep(0.02)
        self.reader_name = readers[0]

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


class ChrootHeldProcess(HeldProcess):
    """HeldProcess (release(), pid, returncode, stderr) whose waiting shell is the root's
    /bin/sh, already chrooted: it says `held` on stdout once it is, and the constructor
    returns only then."""

    def __init__(self, stack, argv, env=None):
        script = 'echo held && read _ && exec "$@"'
        self.proc = subprocess.Popen(stack.command(["/bin/sh", "-c", script, "sh", *argv]),
                                     env=stack.env(**(env or {})), stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     preexec_fn=_die_with_parent)
        self.pid = self.proc.pid
        self.returncode = None
        self.stderr = ""
        # Nothing else is written before release(): the pipe holds this line only.
        line = self.proc.stdout.readline()
        if line != "held\n":
            self.proc.kill()
            _, err = self.proc.communicate()
            raise RuntimeError("the held process did not start in the root: %r %s"
                               % (line, err))

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()


def mounts_under(path):
    """Mount points at or under path in this process's mount namespace (the host's)."""
    path = os.path.realpath(path)
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = line.split()[4].encode().decode("unicode_escape")
            if point == path or point.startswith(path + "/"):
                found.append(point)
    return found
