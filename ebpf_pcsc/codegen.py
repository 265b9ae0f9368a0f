"""Generate the per-function BPF probes from the function table.

Each row becomes a case of capture_enter() and of capture_return(), built
from the helpers of bpf/pcsc_spy.bpf.c, whose on_enter() and on_return() do
what every call needs around them.  The programs that run those:

- with uprobe_multi links (PCSC_UPROBE_MULTI, Linux >= 6.6): one program per
  phase, pcsc_enter and pcsc_return, given the function's index by the
  link's cookie (see uprobes.py);
- otherwise: pcsc_enter_<i> (uprobe) and pcsc_return_<i> (uretprobe), one
  pair per function, attached as one perf event each (uprobes.attach_perf),
  in which the index is a constant (the compiler keeps that case only).

A buffer's `field` (struct pcsc_buffer, in a DATA record or a call
record) is the capture's index in Function.captures; a Word's slot is its
index among the Words of its phase.
"""
from pathlib import Path
from typing import Optional, Sequence, Tuple

from .captures import Bytes, Function, ReaderStates, Text, Word
from .layout import PCSC_MAX_ARGS, PCSC_MAX_WORDS

BPF_DIR = Path(__file__).resolve().parent.parent / "bpf"
BPF_MAIN = BPF_DIR / "pcsc_spy.bpf.c"


ENTER_PROGRAM = "pcsc_enter"      # the uprobe_multi programs
RETURN_PROGRAM = "pcsc_return"


def enter_probe(index: int) -> str:
    return "%s_%d" % (ENTER_PROGRAM, index)


def return_probe(index: int) -> str:
    return "%s_%d" % (RETURN_PROGRAM, index)


def _phase_code(fn: Function, phase, first_field: int, rec: str) -> list:
    words = fn.words(phase)
    if len(words) > PCSC_MAX_WORDS:
        raise ValueError("%s: more than PCSC_MAX_WORDS words" % fn.name)
    slot = {w.name: i for i, w in enumerate(words)}
    entry_slot = {w.name: i for i, w in enumerate(fn.words(fn.entry))}

    def arg(name):
        return "%s->args[%d]" % (rec, fn.arg_index(name))

    # Two Words side by side through one pointer (a SCARD_IO_REQUEST) are
    # one read of user memory.
    pair_first, pair_second = set(), set()
    for a, b in zip(phase, phase[1:]):
        if (isinstance(a, Word) and isinstance(b, Word) and a.name not in pair_second
                and b.arg == a.arg and b.offset == a.offset + 8
                and slot[b.name] == slot[a.name] + 1):
            pair_first.add(a.name)
            pair_second.add(b.name)

    lines = []
    for field, cap in enumerate(phase, first_field):
        if isinstance(cap, Word):
            if cap.name in pair_second:
                continue
            reader = "read_word_pair" if cap.name in pair_first else "read_word"
            lines.append("%s(%s, %d, %s, %d);" % (reader, rec, slot[cap.name], arg(cap.arg),
                                                  cap.offset))
        elif isinstance(cap, Text):
            lines.append("emit_str(ctx, &%s->head, %d, 0, %s);" % (rec, field, arg(cap.arg)))
        elif isinstance(cap, Bytes):
            # A Word of this phase (a length read through a pointer) wins
            # over an argument of the same name.
            length = ("word(%s, %d)" % (rec, slot[cap.length]) if cap.length in slot
                      else arg(cap.length))
            ptr = arg(cap.arg)
            if cap.autoalloc:
                ptr = "buffer_ptr(e, %d, %s)" % (entry_slot[cap.autoalloc], ptr)
            code = "emit_bytes(ctx, %s, %d, 0, %s, %s);" % (rec, field, ptr, length)
            if cap.on_success:
                code = "if (%s->rv == 0) %s" % (rec, code)
            lines.append(code)
        elif isinstance(cap, ReaderStates):
            lines.append("emit_readerstates(ctx, %s, %d, %s, %s);"
                         % (rec, field, arg(cap.arg), arg(cap.count)))
        else:  # pragma: no cover - a new capture kind needs code here
            raise TypeError(cap)
    return lines


def probes_source(functions: Sequence[Function]) -> str:
    """capture_enter() and capture_return(): what each function captures,
    one switch case per function (the common part of every call, in
    bpf/pcsc_spy.bpf.c, is compiled once, not once per function)."""
    out = []
    cases = {"enter": [], "return": []}
    for i, fn in enumerate(functions):
        if len(fn.args) > PCSC_MAX_ARGS:
            raise ValueError("%s: more than PCSC_MAX_ARGS arguments" % fn.name)
        for phase, lines in (("enter", _phase_code(fn, fn.entry, 0, "c")),
                             ("return", _phase_code(fn, fn.exit, len(fn.entry), "r"))):
            if lines:
                cases[phase].append("\tcase %d: /* %s */" % (i, fn.name))
                cases[phase].extend("\t\t" + line for line in lines)
                cases[phase].append("\t\tbreak;")
    out.append("static __always_inline void capture_enter(struct pt_regs *ctx, "
               "struct pcsc_call *c, u32 func)\n{\n\tswitch (func) {")
    out.extend(cases["enter"])
    out.append("\t}\n}\n")
    out.append("static __always_inline void capture_return(struct pt_regs *ctx, "
               "struct pcsc_call *r, struct pcsc_call *e, u32 func)\n{\n\tswitch (func) {")
    out.extend(cases["return"])
    out.append("\t}\n}\n")
    out.append("#ifdef PCSC_UPROBE_MULTI")
    for program, phase in ((ENTER_PROGRAM, "on_enter"), (RETURN_PROGRAM, "on_return")):
        out.append("int %s(struct pt_regs *ctx) { return %s(ctx, bpf_get_attach_cookie(ctx)); }"
                   % (program, phase))
    out.append("#else")
    for i in range(len(functions)):
        out.append("int %s(struct pt_regs *ctx) { return on_enter(ctx, %d); }" % (enter_probe(i), i))
        out.append("int %s(struct pt_regs *ctx) { return on_return(ctx, %d); }" % (return_probe(i), i))
    out.append("#endif")
    return "\n".join(out)


def table_defines(functions: Sequence[Function]) -> str:
    """What the common machinery knows of the table, as macros."""
    return ("/* The functions whose 7th argument is on the stack (a bit per index). */\n"
            "#define PCSC_SEVEN_ARGS 0x%xULL\n"
            % sum(1 << i for i, fn in enumerate(functions) if len(fn.args) > 6))


def program_source(functions: Sequence[Function]) -> str:
    """The whole BPF program: the common machinery, then the probes."""
    return (table_defines(functions) + BPF_MAIN.read_text() + "\n"
            + probes_source(functions))


LOADER_PROBE = "pcsc_loaded"


def cflags(filter_pids: bool, discover: bool = False, multi: bool = False,
           ring_pages: Optional[Tuple[int, int]] = None, wakeup_bytes: int = 0,
           inflight_hash: bool = False) -> list:
    """The program's build options.  ring_pages: the BPF ring buffers' sizes
    (calls, library loads; pages, powers of 2) when the records go through
    ring buffers, else perf buffers; wakeup_bytes: bytes of records per
    wakeup of user space (ring buffer; a perf buffer is told when it is
    opened)."""
    flags = ["-I%s" % BPF_DIR, "-DPCSC_WAKEUP_BYTES=%d" % wakeup_bytes]
    if multi:
        flags.append("-DPCSC_UPROBE_MULTI")
    if ring_pages:
        flags += ["-DPCSC_RINGBUF", "-DPCSC_RINGBUF_PAGES=%d" % ring_pages[0],
                  "-DPCSC_LOADS_PAGES=%d" % ring_pages[1]]
    if discover:
        flags.append("-DPCSC_DISCOVER")
    if inflight_hash:
        flags.append("-DPCSC_INFLIGHT_HASH")
    if filter_pids:
        from .btf import member_offsets
        flags.append("-DPCSC_FILTER_PIDS")
        task = member_offsets("task_struct", ["tgid", "signal"])
        flags.append("-DPCSC_TASK_TGID_OFFSET=%d" % task["tgid"])
        flags.append("-DPCSC_TASK_SIGNAL_OFFSET=%d" % task["signal"])
        flags.append("-DPCSC_SIGNAL_LIVE_OFFSET=%d"
                     % member_offsets("signal_struct", ["live"])["live"])
    return flags
