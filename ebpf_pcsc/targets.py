"""Which libpcsclite to probe: the system's, the one a process maps, or the
one the user names."""
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, List, Optional

from .errors import SpyError

LIBRARY_NAME = "libpcsclite.so.1"
# A libpcsclite image (pcsc-lite >= 2.1 also maps libpcsclite_real.so.1).
LIBPCSCLITE_FILE = re.compile(r"/libpcsclite(_real)?\.so[.\d]*$")
LIB_DIRS = ("/usr/lib/x86_64-linux-gnu", "/lib/x86_64-linux-gnu", "/usr/lib64",
            "/usr/lib", "/lib64", "/lib", "/usr/local/lib")


@dataclass(frozen=True)
class Library:
    path: str                 # as this tracer opens it
    shown: str                # as the traced process sees it
    pid: Optional[int] = None
    loaded: bool = True       # False: the process has not mapped it yet


def check_elf(path: str) -> None:
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise SpyError("cannot read --lib %s (%s)" % (path, e.strerror),
                       "give the path of a libpcsclite.so.1")
    if magic != b"\x7fELF":
        raise SpyError("--lib %s is not an ELF file" % path,
                       "give the path of a libpcsclite.so.1 (or a binary linking it)")


def system_library(root: str = "/") -> str:
    for d in LIB_DIRS:
        candidate = os.path.join(root, d.lstrip("/"), LIBRARY_NAME)
        if os.path.exists(candidate):
            return candidate
    raise SpyError("%s not found" % LIBRARY_NAME,
                   "install libpcsclite1 (sudo apt-get install libpcsclite1) or use --lib PATH")


def for_pids(pids: Iterable[int]) -> List[Library]:
    libs = []
    for pid in pids:
        if pid <= 0 or not os.path.isdir("/proc/%d" % pid):
            raise SpyError("no process with PID %d" % pid, "check the PID (ps -e)")
        root = "/proc/%d/root" % pid
        from .discovery import as_seen_by, executable, maps, reachable
        found = [Library(reachable(pid, path, dev, ino), as_seen_by(pid, path), pid)
                 for dev, ino, path in maps(pid) if LIBPCSCLITE_FILE.search(path)]
        program = executable(pid)
        if program is not None and exported_functions(program[2].path):
            # libpcsclite linked into the program (pcsc-lite >= 2.3.1 ships a .a)
            found.insert(0, program[2])
        if not found:
            path = system_library(root)
            found.append(Library(path, path[len(root):], pid, loaded=False))
        libs.extend(found)
    return libs


def function_addresses(path: str, pattern: bytes = b"^SCard") -> dict:
    """The functions an ELF file defines whose names match pattern (by
    default the SCard* ones): name -> address (ELF virtual)."""
    from bcc import BPF  # lazily: importing bcc takes ~0.3 s
    try:
        found = BPF.get_user_functions_and_addresses(os.fsencode(path), pattern)
    except Exception:
        return {}
    return {name.decode(): addr for name, addr in found}


def exported_functions(path: str) -> set:
    return set(function_addresses(path))


def for_path(path: str) -> Library:
    check_elf(path)
    if not exported_functions(path):
        raise SpyError("--lib %s exports no SCard* function" % path,
                       "give the path of a libpcsclite.so.1 (or a binary linking it)")
    return Library(os.path.realpath(path), path)


SYSTEM_LOADER = "/lib64/ld-linux-x86-64.so.2"


def system_loader() -> str:
    return SYSTEM_LOADER


def system_wide() -> Library:
    path = system_library()
    return Library(os.path.realpath(path), path)
