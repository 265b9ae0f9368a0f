"""Multi-uprobe links: every SCard* function of a file probed by one bpf()
call, and unprobed by one close().

bcc (0.26, Debian 12) attaches one perf event per probe: 36 perf_event_open
calls to probe a library, and as many closes to unprobe it, each of which
waits for an RCU grace period (measured: ~8 ms to attach a library, seconds
to detach a few).  Since Linux 6.6 a BPF_TRACE_UPROBE_MULTI link puts one
program on many offsets of a file at once, each offset with a cookie that the
program reads with bpf_get_attach_cookie(): the cookie is the function's
index in the table, so one entry and one return program serve every
function, attaching a newly found library takes two syscalls, and closing
a link is the whole detach.

Where the kernel has no such links (Debian 12's own 6.1), capture.py falls
back to one perf event per probe (and the per-function programs codegen.py
generates for it), made by attach_perf() below rather than by bcc's Python
attach_uprobe(): python3-bpfcc 0.26 declares libbcc's bpf_attach_uprobe()
without its last argument, ref_ctr_offset, so the C function reads whatever
the stack holds there.  A uprobe registered with a stray ref_ctr_offset makes
the kernel write into the probed file's mappings, and every later probe on
that offset with another value fails with EINVAL ("ref_ctr_offset mismatch"
in the kernel log) for as long as that uprobe lives -- seen on this project's
machines.
"""
import ctypes
import os
import platform
import struct
import threading
from typing import Dict, Iterable, Sequence

# bpf(2): syscall number per architecture, and the command and attach type
# (include/uapi/linux/bpf.h).
_SYS_BPF = {"x86_64": 321, "aarch64": 280}
BPF_MAP_CREATE = 0
BPF_PROG_LOAD = 5
BPF_LINK_CREATE = 28
BPF_PROG_TYPE_KPROBE = 2
BPF_MAP_TYPE_RINGBUF = 27
BPF_TRACE_UPROBE_MULTI = 48
BPF_F_UPROBE_MULTI_RETURN = 1
# union bpf_attr: large enough for link_create (the kernel takes what it knows).
_ATTR_SIZE = 128

_libc = None


def _syscall():
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    return _libc.syscall


def _bpf(cmd: int, attr) -> int:
    nr = _SYS_BPF.get(platform.machine())
    if nr is None:
        raise OSError(0, "no bpf() syscall number for %s" % platform.machine())
    fd = _syscall()(nr, cmd, attr, _ATTR_SIZE)
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return fd


def link_uprobes(prog_fd: int, path: str, offsets: Sequence[int], cookies: Sequence[int],
                 retprobe: bool = False, pid: int = 0) -> int:
    """A uprobe_multi link of prog_fd on path's file offsets; the link's fd.
    Raises OSError (the kernel's errno) when the kernel refuses."""
    count = len(offsets)
    c_path = ctypes.create_string_buffer(os.fsencode(path))
    c_offsets = (ctypes.c_uint64 * count)(*offsets)
    c_cookies = (ctypes.c_uint64 * count)(*cookies)
    attr = ctypes.create_string_buffer(_ATTR_SIZE)
    # link_create: prog_fd, target_fd, attach_type, flags; then, 8-aligned,
    # uprobe_multi: path, offsets, ref_ctr_offsets, cookies, cnt, flags, pid.
    struct.pack_into("<IIII", attr, 0, prog_fd, 0, BPF_TRACE_UPROBE_MULTI, 0)
    struct.pack_into("<QQQQIII", attr, 16, ctypes.addressof(c_path),
                     ctypes.addressof(c_offsets), 0, ctypes.addressof(c_cookies), count,
                     BPF_F_UPROBE_MULTI_RETURN if retprobe else 0, pid)
    return _bpf(BPF_LINK_CREATE, attr)


def supported() -> bool:
    """Whether this kernel makes uprobe_multi links (Linux >= 6.6), known
    before the program is compiled for one way or the other: a two-instruction
    program is linked to this very source file, which no process maps
    (registering a uprobe reads nothing there; nothing anywhere is probed),
    then closed in the background: closing a link waits for the kernel
    (~40 ms) and nothing here needs to."""
    insns = ctypes.create_string_buffer(
        bytes.fromhex("b700000000000000" "9500000000000000"))   # r0 = 0; exit
    license = ctypes.create_string_buffer(b"GPL")
    attr = ctypes.create_string_buffer(_ATTR_SIZE)
    # prog_type, insn_cnt, insns, license ... expected_attach_type (offset 68).
    struct.pack_into("<IIQQ", attr, 0, BPF_PROG_TYPE_KPROBE, 2, ctypes.addressof(insns),
                     ctypes.addressof(license))
    struct.pack_into("<I", attr, 68, BPF_TRACE_UPROBE_MULTI)
    try:
        prog = _bpf(BPF_PROG_LOAD, attr)
    except OSError:
        return False
    fds = [prog]
    try:
        fds.insert(0, link_uprobes(prog, __file__, [0], [0]))
        return True
    except OSError:
        return False
    finally:
        threading.Thread(target=close_all, args=(fds,), daemon=True).start()


def ring_buffer_supported() -> bool:
    """Whether this kernel has BPF ring buffers (Linux >= 5.8, and kernels
    that backported them): a one-page ring is made, then closed."""
    attr = ctypes.create_string_buffer(_ATTR_SIZE)
    # map_type, key_size, value_size, max_entries (the ring's size in bytes)
    struct.pack_into("<IIII", attr, 0, BPF_MAP_TYPE_RINGBUF, 0, 0, os.sysconf("SC_PAGE_SIZE"))
    try:
        os.close(_bpf(BPF_MAP_CREATE, attr))
    except OSError:
        return False
    return True


_attach_uprobe = None


def attach_perf(prog_fd: int, path: str, offset: int, retprobe: bool = False,
                pid: int = -1, ref_ctr_offset: int = 0) -> int:
    """One uprobe (or uretprobe) on a file offset, as a perf event of the
    uprobe PMU (nothing in tracefs to remove later); its fd.  ref_ctr_offset
    is for USDT semaphores: the tracer never sets it (a test does)."""
    global _attach_uprobe
    if _attach_uprobe is None:
        from bcc.libbcc import lib
        # int bpf_attach_uprobe(int progfd, enum bpf_probe_attach_type type,
        #     const char *ev_name, const char *binary_path, uint64_t offset,
        #     pid_t pid, uint32_t ref_ctr_offset)  -- libbcc 0.26's libbpf.h;
        # a prototype of our own, bcc's declaration is left as it is.
        proto = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_char_p,
                                 ctypes.c_char_p, ctypes.c_ulonglong, ctypes.c_int,
                                 ctypes.c_uint32, use_errno=True)
        _attach_uprobe = proto(ctypes.cast(lib.bpf_attach_uprobe, ctypes.c_void_p).value)
    fd = _attach_uprobe(prog_fd, 1 if retprobe else 0, b"pcsc_ebpf_spy", os.fsencode(path),
                        offset, pid, ref_ctr_offset)
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path)
    return fd


def file_offsets(path: str, addresses: Dict[str, int]) -> Dict[str, int]:
    """Symbol addresses (ELF virtual addresses) as offsets in the file, which
    is what uprobes take: through the PT_LOAD segment holding each one."""
    with open(path, "rb") as f:
        head = f.read(64)
        if head[:4] != b"\x7fELF" or head[4] != 2:   # ELFCLASS64
            raise OSError(0, "not a 64-bit ELF file", path)
        order = "<" if head[5] == 1 else ">"
        phoff, = struct.unpack_from(order + "Q", head, 0x20)
        phentsize, phnum = struct.unpack_from(order + "HH", head, 0x36)
        f.seek(phoff)
        table = f.read(phentsize * phnum)
    loads = []
    for i in range(phnum):
        p_type, _flags, p_offset, p_vaddr, _paddr, p_filesz = struct.unpack_from(
            order + "IIQQQQ", table, i * phentsize)
        if p_type == 1:   # PT_LOAD
            loads.append((p_vaddr, p_filesz, p_offset))
    out = {}
    for name, addr in addresses.items():
        for vaddr, size, offset in loads:
            if vaddr <= addr < vaddr + size:
                out[name] = addr - vaddr + offset
                break
    return out


def close_all(fds: Iterable[int]) -> None:
    """Close links (or perf events) concurrently: each close waits for the
    kernel to know no CPU still runs the probe, and these waits overlap."""
    from concurrent.futures import ThreadPoolExecutor
    fds = list(fds)
    if len(fds) < 2:
        for fd in fds:
            _close(fd)
        return
    with ThreadPoolExecutor(min(len(fds), 64)) as pool:
        list(pool.map(_close, fds))


def _close(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass
