"""bcc compiles our program without reading the machine's /proc/kallsyms
(ebpf_pcsc/bcc_compile.py): in a thread of its own, whose private mount
namespace shows a /proc/kallsyms of the few symbols bcc looks up -- and
nothing of that reaches the rest of the process or the machine."""
import threading

import pytest

from ebpf_pcsc import bcc_compile, kheaders

PROGRAM = b"""
#include <uapi/linux/ptrace.h>
int probe(struct pt_regs *ctx)
{
	u64 x = 0;
	bpf_probe_read_kernel(&x, sizeof(x), (void *)PT_REGS_SP(ctx));
	bpf_probe_read_user(&x, sizeof(x), (void *)PT_REGS_SP(ctx));
	return 0;
}
"""
DEBUG_PREPROCESSOR = 0x4   # bcc prints the source it compiles, rewritten


def kallsyms_lines() -> int:
    with open("/proc/kallsyms") as f:
        return sum(1 for _ in f)


def test_bcc_sees_the_short_list_and_no_one_else_does():
    seen = {}

    def build():
        seen["thread"] = threading.current_thread() is not threading.main_thread()
        with open("/proc/kallsyms") as f:
            seen["kallsyms"] = f.read().split()
        return "built"

    full = kallsyms_lines()
    assert full > 1000
    assert bcc_compile.compile_bpf(build) == "built"
    assert seen["thread"]
    assert seen["kallsyms"][2::3] == list(bcc_compile.LOOKED_UP)
    # This thread, and the machine, still see every symbol; nothing is
    # left mounted.
    assert kallsyms_lines() >= full - 100
    with open("/proc/self/mountinfo") as f:
        assert "kallsyms" not in f.read()
    with open("/proc/1/mountinfo") as f:
        assert "kallsyms" not in f.read()


def test_an_error_reaches_the_caller():
    def build():
        raise ValueError("refused")

    with pytest.raises(ValueError, match="refused"):
        bcc_compile.compile_bpf(build)


def test_bcc_keeps_the_helpers_it_finds(capfd):
    """Were a looked-up symbol missing (or listed at address 0), bcc would
    rewrite bpf_probe_read_kernel/_user to the old bpf_probe_read."""
    from bcc import BPF
    kheaders.ensure(lambda message: None)
    bpf = bcc_compile.compile_bpf(lambda: BPF(text=PROGRAM, debug=DEBUG_PREPROCESSOR))
    try:
        bpf.load_func(b"probe", BPF.KPROBE)
    finally:
        bpf.cleanup()
    rewritten = capfd.readouterr().err
    assert "bpf_probe_read_kernel(&x" in rewritten
    assert "#define bpf_probe_read_kernel bpf_probe_read" not in rewritten
    assert "#define bpf_probe_read_user bpf_probe_read" not in rewritten
