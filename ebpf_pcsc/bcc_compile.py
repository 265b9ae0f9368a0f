"""bcc's compile of our program, without its trip through /proc/kallsyms.

At every compile, bcc 0.26 asks whether the running kernel has the
bpf_probe_read_kernel/_user helpers (Linux >= 5.5; before, it rewrites them
to bpf_probe_read): it reads and hashes the whole of /proc/kallsyms for that,
~120,000 symbols, a quarter of a second of every start of the tracer.

Every kernel this tracer runs on has those helpers.  The compile runs in a
thread of its own, in a mount namespace of its own (made private first, so
nothing done there reaches the machine's mounts), where /proc/kallsyms is a
bind mount of a file listing only the symbols bcc looks up.  The namespace
goes away with the thread.  Where that cannot be arranged (no mount
permission, a locked-down kernel), the compile runs as bcc does it.
"""
import ctypes
import os
import tempfile
import threading
from typing import Callable, TypeVar

CLONE_NEWNS = 0x00020000
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18

# What bcc looks up in /proc/kallsyms while it compiles (a listed symbol with
# address 0 counts as missing: the addresses are made up, and not 0).
LOOKED_UP = ("bpf_probe_read_kernel", "bpf_probe_read_kernel_str",
             "bpf_probe_read_user", "bpf_probe_read_user_str")

T = TypeVar("T")


def compile_bpf(build: Callable[[], T]) -> T:
    """build() (bcc's BPF(...)), run where /proc/kallsyms lists LOOKED_UP only."""
    result = {}

    def run():
        try:
            _small_kallsyms()
        except OSError:
            pass   # compile as bcc does, reading the real /proc/kallsyms
        try:
            result["value"] = build()
        except BaseException as e:  # handed to the caller's thread
            result["error"] = e

    thread = threading.Thread(target=run, name="bcc-compile")
    thread.start()
    thread.join()
    if "error" in result:
        raise result["error"]
    return result["value"]


def _small_kallsyms() -> None:
    """This thread, in a private mount namespace, sees a short /proc/kallsyms."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p,
                           ctypes.c_ulong, ctypes.c_void_p]

    def check(ret: int) -> None:
        if ret != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))

    check(libc.unshare(CLONE_NEWNS))
    check(libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None))
    # A file on a mount of this namespace, removed at once (the bind mount
    # keeps it).  Neither a memfd (its mount is the kernel's) nor an
    # O_TMPFILE file (it has no name left to mount) can be bind-mounted.
    fd, path = tempfile.mkstemp(prefix="pcsc-ebpf-spy-kallsyms-")
    try:
        lines = "".join("ffffffff%08x T %s\n" % (0x81000000 + i, name)
                        for i, name in enumerate(LOOKED_UP))
        os.write(fd, lines.encode())
        check(libc.mount(os.fsencode(path), b"/proc/kallsyms", None, MS_BIND, None))
    finally:
        os.close(fd)
        os.unlink(path)
