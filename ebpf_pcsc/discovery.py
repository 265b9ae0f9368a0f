"""Finding every libpcsclite image processes map: in any root or container,
private copies (LD_LIBRARY_PATH, rpath), and libraries loaded later.

Once at start, every process's maps are read.  After that nothing is
rescanned in a loop: the kernel reports each library load (a uprobe on the
dynamic loader's _dl_debug_state hook) and each program start (to probe a
new loader, e.g. in a container), and only that process's maps are read.
"""
import os
import re
from typing import Callable, Dict, Iterable, List, Optional, Set, Tuple

from . import layout as L
from .targets import LIBPCSCLITE_FILE, Library, exported_functions

_LOADER = re.compile(r"/ld-linux[-\w.]*\.so[.\d]*$")


def maps(pid: int) -> List[Tuple[str, int, str]]:
    """(device, inode, path) of the files process pid maps, each once."""
    seen, out = set(), []
    try:
        with open("/proc/%d/maps" % pid) as f:
            for line in f:
                parts = line.split(None, 5)
                if len(parts) < 6 or not parts[5].startswith("/"):
                    continue
                path = parts[5].rstrip("\n")
                if path.endswith(" (deleted)"):
                    continue
                key = (parts[3], int(parts[4]))
                if key not in seen:
                    seen.add(key)
                    out.append((parts[3], int(parts[4]), path))
    except OSError:  # the process is gone (or a kernel thread)
        return []
    return out


def reachable(pid: int, path: str, dev: str, ino: int) -> str:
    """A path to the mapped file for this tracer: the process's own path when
    it is the same file here (it outlives the process), else through the
    process's root (another mount namespace, a chroot)."""
    try:
        st = os.stat(path)
        major, minor = (int(x, 16) for x in dev.split(":"))
        if st.st_ino == ino and (os.major(st.st_dev), os.minor(st.st_dev)) == (major, minor):
            return path
    except (OSError, ValueError):
        pass
    return "/proc/%d/root%s" % (pid, path)


def as_seen_by(pid: int, path: str) -> str:
    """A mapped path as the process names it: /proc/PID/maps gives a chrooted
    process's files as seen from the tracer's root."""
    try:
        root = os.readlink("/proc/%d/root" % pid)
    except OSError:
        return path
    if root != "/" and path.startswith(root + "/"):
        return path[len(root):]
    return path


def executable(pid: int) -> Optional[Tuple[str, int, Library]]:
    """(device, inode, Library) of the program process pid runs, with the
    device written as /proc/PID/maps writes it.  The file is opened through
    /proc/PID/exe, which reaches it from any mount namespace."""
    exe = "/proc/%d/exe" % pid
    try:
        st = os.stat(exe)
        path = os.readlink(exe)
    except OSError:   # gone, or a kernel thread
        return None
    dev = "%02x:%02x" % (os.major(st.st_dev), os.minor(st.st_dev))
    return dev, st.st_ino, Library(exe, as_seen_by(pid, path), pid)


def pcsclite_version(pid: int, cache: Dict[str, Optional[str]]) -> Optional[str]:
    """The libpcsclite1 package version in the process's root, if dpkg knows it."""
    try:
        st = os.stat("/proc/%d/root" % pid)
    except OSError:
        return None
    key = "%d:%d" % (st.st_dev, st.st_ino)
    if key in cache:
        return cache[key]
    version = None
    try:
        with open("/proc/%d/root/var/lib/dpkg/status" % pid, encoding="utf-8",
                  errors="replace") as f:
            block = []
            for line in f:
                if line.strip():
                    block.append(line)
                    continue
                if "Package: libpcsclite1\n" in block:
                    version = next((l.split(":", 1)[1].strip() for l in block
                                    if l.startswith("Version:")), None)
                    break
                block = []
    except OSError:
        pass
    cache[key] = version
    return version


class Discovery:
    """Attaches the probes to each new libpcsclite image and dynamic loader
    it learns about, and says so (announce gets one line per image)."""

    def __init__(self, capture, announce: Callable[[str], None],
                 pids: Optional[Iterable[int]] = None):
        self.capture = capture
        self.announce = announce
        self.pids: Optional[Set[int]] = set(pids) if pids is not None else None
        self._versions: Dict[str, Optional[str]] = {}
        self._images: Set[Tuple[str, int]] = set()
        self._loaders: Set[Tuple[str, int]] = set()

    def all_processes(self, quiet: bool = True) -> None:
        """Every process's maps: the first scan, before the `Tracing` line
        (which names what it found), and again when library loads were lost."""
        for name in os.listdir("/proc"):
            if name.isdigit() and (self.pids is None or int(name) in self.pids):
                self.process(int(name), quiet=quiet)

    def process(self, pid: int, quiet: bool = False) -> List[Library]:
        """Look at one process's program and maps; probe what is new."""
        new = []
        program = executable(pid)
        if program is not None and program[:2] not in self._images:
            # Each program once: a program that defines SCard* itself
            # (linked with pcsc-lite >= 2.3.1's libpcsclite.a) is probed.
            lib = program[2]
            if exported_functions(lib.path):
                self._images.add(program[:2])
                new.append(lib)
                if self.capture.attach_library(lib) and not quiet:
                    self.announce(self.describe(lib))
            elif os.path.exists(lib.path):
                # A definite no (not a process gone while its ELF was read).
                self._images.add(program[:2])
        for dev, ino, path in maps(pid):
            if _LOADER.search(path) and self.capture.discover:
                if (dev, ino) not in self._loaders:
                    self._loaders.add((dev, ino))
                    self.capture.attach_loader(reachable(pid, path, dev, ino))
            elif LIBPCSCLITE_FILE.search(path) and (dev, ino) not in self._images:
                self._images.add((dev, ino))
                lib = Library(reachable(pid, path, dev, ino), as_seen_by(pid, path), pid)
                new.append(lib)
                if self.capture.attach_library(lib) and not quiet:
                    self.announce(self.describe(lib))
        return new

    def describe(self, lib: Library) -> str:
        version = pcsclite_version(lib.pid, self._versions) if lib.pid else None
        return "attached %s (pid %d%s)" % (
            lib.shown, lib.pid, ", pcsc-lite %s" % version if version else "")

    def event(self, kind: int, pid: int) -> None:
        """A LOADED or EXEC record from the kernel."""
        if kind in (L.PCSC_REC_LOADED, L.PCSC_REC_EXEC):
            self.process(pid)
