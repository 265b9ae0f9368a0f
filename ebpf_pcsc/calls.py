"""Decoding: the kernel's records -> Call objects.

The records of one call arrive as an entry phase and a return phase, each a
run of DATA records closed by its ENTER or RETURN record (bpf/pcsc_event.h),
which may carry a short buffer itself.  The two phases may come from
different CPUs, so a RETURN can arrive before its ENTER: it waits until the
ENTER is seen.
"""
import struct
import sys
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from . import layout as L
from .captures import Bytes, Function, ReaderStates, Text, Word

# The records as struct formats (layout.py derives them from its mirror of
# the header): one unpack per record.
_HEAD = L.HEAD_FORMAT
_CALL = L.CALL_BODY_FORMAT     # rv, valid, depth, args..., words..., buf
_DATA = L.DATA_BODY_FORMAT     # buf: total, offset, len, field, index, flags
_ARGS = slice(3, 3 + L.PCSC_MAX_ARGS)
_WORDS = slice(3 + L.PCSC_MAX_ARGS, 3 + L.PCSC_MAX_ARGS + L.PCSC_MAX_WORDS)
_WORD0 = _WORDS.start
_BUF = _WORDS.stop            # where buf starts in a call record's values

# A few objects per call: with __slots__ where dataclasses can make them
# (Python >= 3.10; the project runs on 3.9 too).
_SLOTS = {"slots": True} if sys.version_info >= (3, 10) else {}


@dataclass(**_SLOTS)
class Captured:
    """A buffer or string read from the traced process."""
    data: Optional[bytes]     # None: NULL pointer or unreadable
    flags: int = 0
    total: int = 0            # its full length (NULL: the length argument)

    @property
    def is_null(self) -> bool:
        return bool(self.flags & L.PCSC_DATA_NULL)

    @property
    def fault(self) -> bool:
        return bool(self.flags & L.PCSC_DATA_FAULT)

    @property
    def truncated(self) -> bool:
        return bool(self.flags & L.PCSC_DATA_TRUNCATED) or (
            self.data is not None and len(self.data) < self.total)


@dataclass(**_SLOTS)
class ReaderState:
    reader: Optional[str]     # None: NULL szReader
    current_state: int
    event_state: int
    cb_atr: int
    atr: bytes                # the 33 bytes of rgbAtr
    name_captured: bool = True   # False past PCSC_MAX_READERS


@dataclass(**_SLOTS)
class Phase:
    words: Dict[str, Optional[int]] = field(default_factory=dict)
    data: Dict[str, Captured] = field(default_factory=dict)
    readers: Dict[str, Optional[List[ReaderState]]] = field(default_factory=dict)

    def word(self, name: str) -> Optional[int]:
        return self.words.get(name)

    def text(self, name: str) -> Optional[str]:
        cap = self.data.get(name)
        if cap is None or cap.data is None:
            return None
        return cap.data.decode("utf-8", "replace")


@dataclass(**_SLOTS)
class Call:
    fn: Function
    pid: int
    tid: int
    comm: str
    call_ts: int
    args: Dict[str, int]
    entry: Phase
    exit: Optional[Phase] = None
    rv: Optional[int] = None
    ret_ts: Optional[int] = None
    aborted: bool = False
    # The order in which the outputs met the call's start and end: a replay
    # follows it (the perf buffers of two CPUs can deliver a few ms apart).
    entry_seq: Optional[int] = None
    return_seq: Optional[int] = None

    @property
    def name(self) -> str:
        return self.fn.name

    @property
    def duration_ns(self) -> int:
        return (self.ret_ts or self.call_ts) - self.call_ts


class _Chunks:
    """The chunks of one captured buffer, reassembled."""
    __slots__ = ("buf", "flags", "total", "received", "ts")

    def __init__(self, total: int, ts: int):
        self.buf = bytearray()
        self.flags = 0
        self.total = total
        self.received = 0     # a lost chunk must not pass for zeros
        self.ts = ts

    def add(self, offset: int, data: bytes, flags: int) -> None:
        self.flags |= flags
        self.received += len(data)
        end = offset + len(data)
        if len(self.buf) < end:
            self.buf.extend(bytes(end - len(self.buf)))
        self.buf[offset:end] = data

    def captured(self) -> Captured:
        if self.flags & (L.PCSC_DATA_NULL | L.PCSC_DATA_FAULT):
            return Captured(None, self.flags, self.total)
        if self.received < min(self.total, L.PCSC_MAX_BUFFER):
            # A chunk was lost on the way: what we have is not the buffer.
            return Captured(None, self.flags | L.PCSC_DATA_TRUNCATED, self.total)
        return Captured(bytes(self.buf), self.flags, self.total)


def _inline(raw: bytes, rec: tuple) -> Optional[Tuple[int, int, Captured]]:
    """The buffer an ENTER or RETURN record carries: (field, index, the
    bytes), or None.  Always whole: it is short."""
    total, _, length, fld, index, flags = rec[_BUF:_BUF + 6]
    if fld == L.PCSC_NO_FIELD:
        return None
    if flags & (L.PCSC_DATA_NULL | L.PCSC_DATA_FAULT):
        return fld, index, Captured(None, flags, total)
    return fld, index, Captured(raw[L.CALL_DATA_OFFSET:L.CALL_DATA_OFFSET + length], flags, total)


def _parse_readerstates(raw: Captured, names: Dict[int, Captured], count: int):
    if raw.data is None:
        return None
    states = []
    size = L.PCSC_READERSTATE_SIZE
    for i in range(min(count, len(raw.data) // size)):
        _, _, cur, evt, cb = struct.unpack_from("<QQQQQ", raw.data, i * size)
        atr = raw.data[i * size + 40:i * size + 40 + 33]
        name = names.get(i + 1)
        reader = None if name is None or name.data is None else name.data.decode("utf-8", "replace")
        states.append(ReaderState(reader, cur, evt, cb, atr, i < L.PCSC_MAX_READERS))
    return states


class _PhasePlan:
    """How to read one phase of one function out of its records, worked out
    once from the table (not per call): its words (name, slot), its buffers
    and strings (name, field), its SCARD_READERSTATE arrays (name, field,
    index of the count argument)."""
    __slots__ = ("words", "buffers", "readers")

    def __init__(self, fn: Function, captures, first_field: int):
        self.words = [(w.name, slot) for slot, w in enumerate(fn.words(captures))]
        self.buffers = [(cap.name, fld) for fld, cap in enumerate(captures, first_field)
                        if isinstance(cap, (Text, Bytes))]
        self.readers = [(cap.name, fld, fn.arg_index(cap.count))
                        for fld, cap in enumerate(captures, first_field)
                        if isinstance(cap, ReaderStates)]


class Assembler:
    """Feeds on raw records; calls sink.enter(call), sink.leave(call) and
    sink.abort(call) as calls start, return, or die with their thread."""

    def __init__(self, functions: Sequence[Function], sink):
        self.functions = functions
        self.sink = sink
        self._plans = [(_PhasePlan(fn, fn.entry, 0), _PhasePlan(fn, fn.exit, len(fn.entry)))
                       for fn in functions]
        self._chunks: Dict[Tuple[int, int], Dict[Tuple[int, int], _Chunks]] = {}
        self._open: Dict[Tuple[int, int], Call] = {}
        self._early: Dict[Tuple[int, int], bytes] = {}
        self._comms: Dict[bytes, str] = {}   # a thread's name as sent -> as shown
        self.latest_ts = 0

    # A RETURN waits for its ENTER only as long as another CPU's buffer can
    # lag behind; after that its ENTER was lost (lost events are counted and
    # reported elsewhere), and the leftovers are dropped.
    HORIZON_NS = 10 * 1000000000

    def expire(self) -> None:
        """Forget returns and chunks whose call start was never seen."""
        limit = self.latest_ts - self.HORIZON_NS
        for key in [k for k, raw in self._early.items() if self.timestamp(raw) < limit]:
            del self._early[key]
        for key in [k for k, chunks in self._chunks.items()
                    if k not in self._open and all(c.ts < limit for c in chunks.values())]:
            del self._chunks[key]

    @staticmethod
    def timestamp(raw: bytes) -> int:
        return _HEAD.unpack_from(raw)[0]

    @staticmethod
    def kind_and_pid(raw: bytes) -> Tuple[int, int]:
        head = _HEAD.unpack_from(raw)
        return head[4], head[2]

    def feed(self, raw: bytes) -> None:
        ts, call_ts, pid, tid, kind, func, comm = _HEAD.unpack_from(raw)
        key = (tid, call_ts)
        if ts > self.latest_ts:
            self.latest_ts = ts
        if kind == L.PCSC_REC_DATA:
            total, offset, length, fld, index, flags = _DATA.unpack_from(raw, _HEAD.size)
            chunks = self._chunks.setdefault(key, {})
            c = chunks.get((fld, index))
            if c is None:
                c = chunks[(fld, index)] = _Chunks(total, ts)
            c.add(offset, raw[L.DATA_OFFSET:L.DATA_OFFSET + length], flags)
        elif kind == L.PCSC_REC_ENTER:
            rec = _CALL.unpack_from(raw, _HEAD.size)
            fn = self.functions[func]
            args = rec[_ARGS]
            name = self._comms.get(comm)
            if name is None:
                name = self._comms[comm] = comm.split(b"\0", 1)[0].decode("utf-8", "replace")
            call = Call(fn, pid, tid, name, call_ts, dict(zip(fn.args, args)),
                        self._phase(key, self._plans[func][0], rec, args, raw))
            self._open[key] = call
            self.sink.enter(call)
            early = self._early.pop(key, None)
            if early is not None:
                self.feed(early)
        elif kind == L.PCSC_REC_RETURN:
            call = self._open.pop(key, None)
            if call is None:
                self._early[key] = raw
                return
            rec = _CALL.unpack_from(raw, _HEAD.size)
            call.exit = self._phase(key, self._plans[func][1], rec, rec[_ARGS], raw)
            call.rv = rec[0]
            call.ret_ts = ts
            self._chunks.pop(key, None)
            self.sink.leave(call)
        elif kind == L.PCSC_REC_ABORT:
            call = self._open.pop(key, None)
            self._chunks.pop(key, None)
            if call is not None:
                call.aborted = True
                call.ret_ts = ts
                self.sink.abort(call)

    def _phase(self, key, plan: _PhasePlan, rec: tuple, args: Sequence[int],
               raw: bytes) -> Phase:
        """The phase that the record rec (unpacked from raw) closes."""
        phase = Phase()
        valid = rec[1]
        for name, slot in plan.words:
            phase.words[name] = rec[_WORD0 + slot] if valid >> slot & 1 else None
        if plan.buffers or plan.readers:
            self._buffers(phase, plan, _inline(raw, rec), self._chunks.get(key, {}), args)
        return phase

    @staticmethod
    def _buffers(phase: Phase, plan: _PhasePlan, inline, chunks, args: Sequence[int]) -> None:
        """A phase's buffers: the one its record carries (inline), the
        others from their DATA records (chunks, taken out)."""
        def take(fld: int, index: int) -> Optional[Captured]:
            if inline is not None and inline[:2] == (fld, index):
                return inline[2]
            c = chunks.pop((fld, index), None)
            return None if c is None else c.captured()

        for name, fld in plan.buffers:
            c = take(fld, 0)
            if c is not None:
                phase.data[name] = c
        for name, fld, count in plan.readers:
            structs = take(fld, 0)
            names = {i: take(fld, i) for (f, i) in list(chunks) if f == fld}
            phase.readers[name] = (None if structs is None else
                                   _parse_readerstates(structs, names, args[count]))

    def pending(self) -> List[Call]:
        """Calls that started and have not returned (yet)."""
        return list(self._open.values())
