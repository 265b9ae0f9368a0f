"""The Python mirror of bpf/pcsc_event.h, the only one.

tests/test_layout.py compiles the header and fails when a size, an offset or
a limit here differs from it.
"""
import ctypes
import struct
from pathlib import Path

HEADER = Path(__file__).resolve().parent.parent / "bpf" / "pcsc_event.h"

# Limits (#define in the header).
PCSC_COMM_LEN = 16
PCSC_MAX_ARGS = 7
PCSC_MAX_WORDS = 6
PCSC_MAX_BUFFER = 65548
PCSC_CHUNK = 16384
PCSC_MAX_CHUNKS = 5
PCSC_INLINE = 512
PCSC_NO_FIELD = 0xFFFF
PCSC_MAX_STRING = 512
PCSC_MAX_READERS = 32
PCSC_READERSTATE_SIZE = 80
PCSC_AUTOALLOCATE = 0xFFFFFFFFFFFFFFFF

# enum pcsc_record_kind
PCSC_REC_ENTER = 1
PCSC_REC_RETURN = 2
PCSC_REC_DATA = 3
PCSC_REC_ABORT = 4
PCSC_REC_LOADED = 5
PCSC_REC_EXEC = 6

# enum pcsc_count
PCSC_COUNT_SINCE_WAKEUP = 0
PCSC_COUNT_LOST = 1
PCSC_COUNT_LOADS_LOST = 2
PCSC_COUNTS = 3

# enum pcsc_data_flags
PCSC_DATA_NULL = 1
PCSC_DATA_FAULT = 2
PCSC_DATA_TRUNCATED = 4


class Head(ctypes.Structure):
    _fields_ = [
        ("ts", ctypes.c_uint64),
        ("call_ts", ctypes.c_uint64),
        ("pid", ctypes.c_uint32),
        ("tid", ctypes.c_uint32),
        ("kind", ctypes.c_uint16),
        ("func", ctypes.c_uint16),
        ("comm", ctypes.c_char * PCSC_COMM_LEN),
    ]


class Buffer(ctypes.Structure):
    _fields_ = [
        ("total", ctypes.c_uint32),
        ("offset", ctypes.c_uint32),
        ("len", ctypes.c_uint16),
        ("field", ctypes.c_uint16),
        ("index", ctypes.c_uint16),
        ("flags", ctypes.c_uint16),
    ]


class CallRecord(ctypes.Structure):
    _fields_ = [
        ("head", Head),
        ("rv", ctypes.c_int64),
        ("valid", ctypes.c_uint32),
        ("depth", ctypes.c_uint32),
        ("args", ctypes.c_uint64 * PCSC_MAX_ARGS),
        ("words", ctypes.c_uint64 * PCSC_MAX_WORDS),
        ("buf", Buffer),
        ("data", ctypes.c_uint8 * PCSC_INLINE),
    ]


class DataRecord(ctypes.Structure):
    _fields_ = [
        ("head", Head),
        ("buf", Buffer),
        ("data", ctypes.c_uint8 * PCSC_CHUNK),
    ]


DATA_OFFSET = DataRecord.data.offset        # a DATA record's bytes
CALL_DATA_OFFSET = CallRecord.data.offset   # an ENTER or RETURN record's inline bytes


# The same structs as struct formats, derived from the ctypes mirror above
# (not written a second time): the decoder unpacks a record in one call,
# with no ctypes object per record.
_CHARS = {ctypes.c_uint64: "Q", ctypes.c_int64: "q", ctypes.c_uint32: "I",
          ctypes.c_uint16: "H", ctypes.c_uint8: "B", ctypes.c_char: "s"}


def _format(struct_type, first: str = None, stop: str = None) -> struct.Struct:
    """The fields of struct_type from `first` (default: the first) up to
    `stop` (excluded; default: the end, with the trailing padding), each a
    value (arrays: one per element, char arrays: one bytes; a struct: its
    fields); padding as such."""
    names = [f[0] for f in struct_type._fields_]
    fields = struct_type._fields_[names.index(first) if first else 0:
                                  names.index(stop) if stop else None]
    start = pos = getattr(struct_type, fields[0][0]).offset
    fmt = "<"
    for name, ftype in fields:
        offset = getattr(struct_type, name).offset
        fmt += "%dx" % (offset - pos) if offset > pos else ""
        pos = offset + ctypes.sizeof(ftype)
        if issubclass(ftype, ctypes.Structure):   # its fields, in line
            fmt += _format(ftype).format.lstrip("<")
            continue
        length = getattr(ftype, "_length_", None)
        element = ftype._type_ if length else ftype
        char = _CHARS[element]
        fmt += "%d%s" % (length, char) if length else char
    end = getattr(struct_type, stop).offset if stop else ctypes.sizeof(struct_type)
    fmt += "%dx" % (end - pos) if end > pos else ""
    result = struct.Struct(fmt)
    assert result.size == end - start, (struct_type, fmt)
    return result


HEAD_FORMAT = _format(Head)                          # struct pcsc_head
# struct pcsc_call after its head, up to its inline bytes: rv, valid, depth,
# args..., words..., then buf's total, offset, len, field, index, flags
CALL_BODY_FORMAT = _format(CallRecord, first="rv", stop="data")
DATA_BODY_FORMAT = _format(DataRecord, first="buf", stop="data")   # pcsc_data's buf

# For the drift test: every struct and limit this module mirrors.
STRUCTS = {"pcsc_head": Head, "pcsc_buffer": Buffer, "pcsc_call": CallRecord,
           "pcsc_data": DataRecord}
LIMITS = {name: value for name, value in globals().items()
          if name.startswith("PCSC_") and isinstance(value, int)}
