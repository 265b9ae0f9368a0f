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
import fcntl
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from testbed import (CLIENT as CTYPES_CLIENT, START_TIMEOUT, HeldProcess,
                     StackBase, _die_with_parent, _spawn, _terminate, free_port_pair)

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
    build_once(root_is_complete, LOCK_FILE, lambda: _build_root(log or (lambda msg: None)))
    return ROOT_DIR


def build_once(complete, lock_file, build):
    """Unless complete(): build(), under lock_file (in CACHE_DIR): another run may be
    building the same thing, then this one waits and finds it complete."""
    if complete():
        return
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    with open(lock_file, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not complete():
            build()


def remove_leftovers(target):
    """The temporary and old copies of target (a directory in CACHE_DIR) that interrupted
    builds left (call it holding the lock: none of them is being built)."""
    for pattern in (".tmp-*", ".old-*"):
        for stale in target.parent.glob(target.name + pattern):
            _remove_tree(stale)


def build_dir(target):
    """The temporary directory where target is built (put_in_place renames it)."""
    return target.parent / ("%s.tmp-%d" % (target.name, os.getpid()))


def put_in_place(tmp, target, marker, recipe):
    """Mark the build in tmp complete (its marker file holds recipe) and rename it to
    target, replacing an incomplete or outdated one."""
    (tmp / marker).write_text(recipe)
    if os.path.lexists(target):
        old = target.parent / ("%s.old-%d" % (target.name, os.getpid()))
        os.rename(target, old)
        _remove_tree(old)
    os.rename(tmp, target)


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
    remove_leftovers(ROOT_DIR)
    tmp = build_dir(ROOT_DIR)
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
    put_in_place(tmp, ROOT_DIR, MARKER, RECIPE)
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


class Pcsclite2Stack(StackBase):
    """pcscd 2.3.3 (chrooted into the trixie root, own mount namespace) with one vpcd
    reader and the virtual card of tests/vcard.py.

    card=False starts with the reader empty; pcscd_debug=True adds pcscd's -d.
    Attributes: root (the root's host path), port (vpcd's TCP port; vpcd also makes a
    second reader on port + 1), reader_name ("Virtual PCD 00 00"), tmpdir (host path of
    the root's /tmp in this stack), pcscd_log and card_log (host paths).
    Properties: pcscd_pid, card_running, card_pid.
    The card, the reader's state and close() are StackBase's (tests/testbed.py); here the
    namespace and its mounts go with pcscd, once the clients started by the stack ended.
    """

    def __init__(self, card=True, pcscd_debug=False, root=None, log=None):
        self.root = Path(root) if root is not None else ensure_root(log)
        self.port = free_port_pair()
        self.tmpdir = Path(tempfile.mkdtemp(prefix="pcsc2-stack-"))
        os.chmod(self.tmpdir, 0o1777)        # it is the root's /tmp
        self.pcscd_log = self.tmpdir / "pcscd.log"
        self.card_log = self.tmpdir / "card.log"
        self._write_reader_conf(self.tmpdir / "reader.conf.d", VPCD_DRIVER)
        self.ctypes_client = self.install(CTYPES_CLIENT)
        self._pcscd_argv = [PCSCD, "-f", "--disable-polkit", "-c", "/tmp/reader.conf.d"] + (
            ["-d"] if pcscd_debug else [])
        self._start(card)

    # -- running things in the root --------------------------------------------------------
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

    # -- internals -------------------------------------------------------------------------
    def _start_pcscd(self, timeout=START_TIMEOUT):
        # unshare (no --fork), sh's exec and chroot's exec keep one pid: Popen's is pcscd's.
        self._pcscd = _spawn(["unshare", "-m", "sh", "-c", _PCSCD_SCRIPT, "sh", str(self.root),
                              str(self.tmpdir), *self._pcscd_argv], self.pcscd_log,
                             env=self.env())
        socket = "/proc/%d/root/run/pcscd/pcscd.comm" % self._pcscd.pid
        self.reader_name = self._wait_readers(socket, timeout, 0.02)[0]


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
