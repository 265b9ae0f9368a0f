"""The drift test: bpf/pcsc_event.h (what the kernel sends) against
ebpf_pcsc/layout.py (how user space reads it).

gcc compiles a program that includes the header and prints, for every struct
field, its offset and size, and the value of every #define and enum
constant.  The names come from parsing the header, so a field or a constant
added on one side only fails here.  Also checked: the struct formats of
calls.py, and the pcsc-lite facts the header hard-codes (SCARD_READERSTATE
size, SCARD_AUTOALLOCATE, MAX_BUFFER_SIZE_EXTENDED, the SCARD_IO_REQUEST
offsets the function table reads).
"""
import ctypes
import re
import subprocess
from pathlib import Path

import pytest

from ebpf_pcsc import layout as L

HEADER = L.HEADER
PRELUDE = """
typedef unsigned char __u8;
typedef unsigned short __u16;
typedef unsigned int __u32;
typedef unsigned long long __u64;
typedef signed char __s8;
typedef short __s16;
typedef int __s32;
typedef long long __s64;
#include <stddef.h>
#include <stdio.h>
"""


def _strip_comments(text: str) -> str:
    text = re.sub(r"/\*.*?\*/", " ", text, flags=re.S)
    return re.sub(r"//[^\n]*", " ", text)


def header_defines(text: str):
    """#define NAME VALUE (an include guard, without value, is not one)."""
    return [m.group(1) for m in re.finditer(r"^[ \t]*#[ \t]*define[ \t]+(\w+)[ \t]+\S",
                                            _strip_comments(text), re.M)]


def header_enums(text: str):
    names = []
    for body in re.findall(r"\benum\s+\w*\s*\{(.*?)\}", _strip_comments(text), re.S):
        for item in body.split(","):
            item = item.strip()
            if item:
                names.append(re.match(r"(\w+)", item).group(1))
    return names


def header_structs(text: str):
    """{struct name: [field names, in order]}."""
    structs = {}
    for name, body in re.findall(r"\bstruct\s+(\w+)\s*\{(.*?)\}\s*;", _strip_comments(text), re.S):
        fields = []
        for decl in body.split(";"):
            decl = decl.strip()
            if decl:
                m = re.match(r"(?:struct\s+)?\w+\s+(\w+)\s*(\[[^\]]*\])?$", decl)
                assert m, "cannot parse %r in struct %s" % (decl, name)
                fields.append(m.group(1))
        structs[name] = fields
    return structs


@pytest.fixture(scope="module")
def header_text():
    return HEADER.read_text()


def _compile_and_run(tmp: Path, source: str, extra=()) -> str:
    src = tmp / "probe.c"
    exe = tmp / "probe"
    src.write_text(source)
    subprocess.run(["gcc", "-Wall", "-Werror", "-o", str(exe), str(src), *extra],
                   check=True, capture_output=True, text=True)
    return subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout


@pytest.fixture(scope="module")
def c_side(header_text, tmp_path_factory):
    """What gcc says: ({struct: (size, align, [(field, offset, size)])},
    {constant: value})."""
    structs = header_structs(header_text)
    constants = header_defines(header_text) + header_enums(header_text)
    lines = [PRELUDE, '#include "%s"' % HEADER, "int main(void)\n{"]
    for s, fields in structs.items():
        lines.append('\tprintf("struct %s %%zu %%zu\\n", sizeof(struct %s), _Alignof(struct %s));'
                     % (s, s, s))
        for f in fields:
            lines.append('\tprintf("field %s %s %%zu %%zu\\n", offsetof(struct %s, %s), '
                         'sizeof(((struct %s *)0)->%s));' % (s, f, s, f, s, f))
    for c in constants:
        lines.append('\tprintf("const %s %%llu\\n", (unsigned long long)(%s));' % (c, c))
    lines.append("\treturn 0;\n}\n")
    out = _compile_and_run(tmp_path_factory.mktemp("layout"), "\n".join(lines))
    got_structs, got_consts = {}, {}
    for line in out.splitlines():
        kind, *rest = line.split()
        if kind == "struct":
            got_structs[rest[0]] = (int(rest[1]), int(rest[2]), [])
        elif kind == "field":
            got_structs[rest[0]][2].append((rest[1], int(rest[2]), int(rest[3])))
        else:
            got_consts[rest[0]] = int(rest[1])
    return got_structs, got_consts


def test_header_parses(header_text):
    """The parser sees what the header holds (guards the generic parsing)."""
    structs = header_structs(header_text)
    assert set(structs) == {"pcsc_head", "pcsc_buffer", "pcsc_call", "pcsc_data"}
    assert structs["pcsc_head"][:2] == ["ts", "call_ts"]
    assert structs["pcsc_data"][-1] == "data"
    assert "PCSC_CHUNK" in header_defines(header_text)
    assert "PCSC_EVENT_H" not in header_defines(header_text)
    assert "PCSC_REC_ABORT" in header_enums(header_text)
    assert "PCSC_DATA_TRUNCATED" in header_enums(header_text)


def test_the_same_structs(c_side):
    structs, _ = c_side
    assert set(L.STRUCTS) == set(structs)


@pytest.mark.parametrize("name", sorted(L.STRUCTS))
def test_struct_layout(c_side, name):
    structs, _ = c_side
    size, align, fields = structs[name]
    py = L.STRUCTS[name]
    assert [f[0] for f in py._fields_] == [f for f, _, _ in fields], \
        "fields of struct %s differ" % name
    for field, offset, fsize in fields:
        desc = getattr(py, field)
        assert (desc.offset, desc.size) == (offset, fsize), \
            "struct %s field %s: layout.py (offset, size) %r, header %r" % (
                name, field, (desc.offset, desc.size), (offset, fsize))
    assert ctypes.sizeof(py) == size, "sizeof(struct %s)" % name
    assert ctypes.alignment(py) == align, "alignment of struct %s" % name


def test_every_constant_mirrored(c_side):
    """Every #define and enum constant of the header is in layout.py with
    the same value, and layout.py has no constant the header lacks."""
    _, consts = c_side
    missing = sorted(set(consts) - set(L.LIMITS))
    extra = sorted(set(L.LIMITS) - set(consts))
    assert not missing, "in bpf/pcsc_event.h, not in ebpf_pcsc/layout.py: %s" % missing
    assert not extra, "in ebpf_pcsc/layout.py, not in bpf/pcsc_event.h: %s" % extra
    wrong = {n: (L.LIMITS[n], v) for n, v in consts.items() if L.LIMITS[n] != v}
    assert not wrong, "(layout.py, header) values differ: %s" % wrong


def test_struct_formats_match_the_header(c_side):
    """The decoder unpacks records with struct formats that layout.py derives
    from its ctypes mirror: they must fit the C layout, field by field."""
    structs, _ = c_side
    head_size = structs["pcsc_head"][0]
    data_offset = dict((f, o) for f, o, _ in structs["pcsc_data"][2])["data"]
    assert L.HEAD_FORMAT.size == head_size
    assert L.HEAD_FORMAT.size + L.DATA_BODY_FORMAT.size == data_offset == L.DATA_OFFSET
    call_data = dict((f, o) for f, o, _ in structs["pcsc_call"][2])["data"]
    assert L.HEAD_FORMAT.size + L.CALL_BODY_FORMAT.size == call_data == L.CALL_DATA_OFFSET
    head_fields = structs["pcsc_head"][2]
    assert [f for f, _, _ in head_fields] == ["ts", "call_ts", "pid", "tid", "kind", "func", "comm"]
    # The order of the unpacked values is the order of the fields.
    raw = bytes(L.Head(ts=1, call_ts=2, pid=3, tid=4, kind=5, func=6, comm=b"abc"))
    assert L.HEAD_FORMAT.unpack(raw) == (1, 2, 3, 4, 5, 6, b"abc" + bytes(13))
    buf = L.Buffer(total=7, offset=8, len=9, field=10, index=11, flags=12)
    d = L.DataRecord(buf=buf)
    assert L.DATA_BODY_FORMAT.unpack_from(bytes(d), head_size) == (7, 8, 9, 10, 11, 12)
    args = list(range(100, 100 + L.PCSC_MAX_ARGS))
    words = list(range(200, 200 + L.PCSC_MAX_WORDS))
    c = L.CallRecord(rv=-5, valid=3, depth=2, buf=buf)
    c.args[:] = args
    c.words[:] = words
    assert L.CALL_BODY_FORMAT.unpack_from(bytes(c), head_size) == (-5, 3, 2, *args, *words,
                                                                   7, 8, 9, 10, 11, 12)


def test_limits_are_consistent():
    """The relations the header's comments state."""
    assert L.PCSC_CHUNK * L.PCSC_MAX_CHUNKS >= L.PCSC_MAX_BUFFER
    assert L.PCSC_CHUNK * (L.PCSC_MAX_CHUNKS - 1) < L.PCSC_MAX_BUFFER
    # one perf sample under 64 KiB, the per-CPU scratch value under 32 KiB
    assert ctypes.sizeof(L.DataRecord) < 32 * 1024
    assert ctypes.sizeof(L.CallRecord) < 32 * 1024
    # emit_str masks its length with PCSC_MAX_STRING - 1: a power of two
    assert L.PCSC_MAX_STRING & (L.PCSC_MAX_STRING - 1) == 0
    # 2 * PCSC_CHUNK - 1 is the verifier's bound in emit_bytes, PCSC_INLINE - 1
    # in inline_bytes and emit_call
    assert L.PCSC_CHUNK & (L.PCSC_CHUNK - 1) == 0
    assert L.PCSC_INLINE & (L.PCSC_INLINE - 1) == 0
    # struct pcsc_buffer's len is a __u16
    assert max(L.PCSC_CHUNK, L.PCSC_INLINE, L.PCSC_MAX_STRING) < 1 << 16
    # The longest short APDU (5 + 255 + 1 bytes) and response (256 + 2)
    # travel in their call's records
    assert L.PCSC_INLINE > 261
    # buf.field of a call record without a buffer is none of a row's fields
    from ebpf_pcsc.functions import FUNCTIONS
    assert all(len(fn.captures) < L.PCSC_NO_FIELD for fn in FUNCTIONS)
    assert L.PCSC_MAX_READERS * L.PCSC_READERSTATE_SIZE <= L.PCSC_MAX_BUFFER
    # Words are flagged in a __u32 bit mask
    assert L.PCSC_MAX_WORDS <= 32


def test_pcsc_lite_facts(tmp_path):
    """The pcsc-lite ABI the header and the function table hard-code, from
    the installed winscard.h (LP64: DWORD is 8 bytes)."""
    source = r"""
#include <stddef.h>
#include <stdio.h>
#include <winscard.h>
#include <reader.h>
int main(void)
{
	printf("%zu %zu %zu %zu %zu %zu %zu\n", sizeof(SCARD_READERSTATE),
	       offsetof(SCARD_READERSTATE, szReader), offsetof(SCARD_READERSTATE, dwCurrentState),
	       offsetof(SCARD_READERSTATE, dwEventState), offsetof(SCARD_READERSTATE, cbAtr),
	       offsetof(SCARD_READERSTATE, rgbAtr), sizeof(DWORD));
	printf("%zu %zu\n", offsetof(SCARD_IO_REQUEST, dwProtocol),
	       offsetof(SCARD_IO_REQUEST, cbPciLength));
	printf("%llu %d %d\n", (unsigned long long)SCARD_AUTOALLOCATE,
	       MAX_BUFFER_SIZE_EXTENDED, MAX_ATR_SIZE);
	return 0;
}
"""
    out = _compile_and_run(tmp_path, source, ["-I/usr/include/PCSC"]).split("\n")
    size, sz_reader, cur, evt, cb, atr, dword = map(int, out[0].split())
    assert size == L.PCSC_READERSTATE_SIZE
    # calls._parse_readerstates reads these offsets
    assert (sz_reader, cur, evt, cb, atr, dword) == (0, 16, 24, 32, 40, 8)
    # functions.py: Word("pioSendPci.cbPciLength", "pioSendPci", 8)
    assert tuple(map(int, out[1].split())) == (0, 8)
    autoalloc, max_ext, max_atr = map(int, out[2].split())
    assert max_ext == L.PCSC_MAX_BUFFER
    assert autoalloc == L.__dict__.get("PCSC_AUTOALLOCATE", autoalloc)
    from ebpf_pcsc import constants
    assert autoalloc == constants.SCARD_AUTOALLOCATE
    assert max_atr == constants.MAX_ATR_SIZE
