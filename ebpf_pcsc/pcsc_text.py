"""pcsc-spy's text: each call as pcsc-spy 1.9.x prints it, and its summary.

pcsc-spy's output format is the specification (pcsc-lite's spy code is GPL;
this is an independent implementation).  Where pcsc-spy 1.9.9 is wrong we
differ on purpose; docs/differences-from-pcsc-spy.md lists each case.

A renderer is a generator over one call: it yields (direction, text) lines
or (direction, [text, ...]) blocks of lines (fewer steps for the reader:
the hot renderers use them), IN ones first; AT_RETURN marks where the call's
outputs are needed (the lines before it are printed when the call starts,
like pcsc-spy does for a blocking SCardGetStatusChange); RESULT marks where
the result line goes when it is not last (SCardControl prints its parsing
after it).  A renderer reads the call's outputs (c.exit, c.rv) after
AT_RETURN only: a call that returned within the batch the text is handed has
them already when its renderer starts, a blocked one has not.
"""
import sys
from typing import Dict, List, Optional

from . import constants as K
from .calls import Call, Captured, ReaderState
from .stats import Stats

IN, OUT, RAW = "i", "o", "raw"
AT_RETURN = object()
RESULT = object()
MASK64 = 0xFFFFFFFFFFFFFFFF

COLOR_RED = "\x1b[01;31m"
COLOR_GREEN = "\x1b[32m"
COLOR_BLUE = "\x1b[34m"
COLOR_MAGENTA = "\x1b[35m"
COLOR_CYAN = "\x1b[36m"
COLOR_NORMAL = "\x1b[0m"


# -- values as libpcscspy writes them and pcsc-spy prints them ---------------

def hexl(value: int) -> str:
    """spy_long(): "0x%08lX"."""
    return "0x%08X" % (value & MASK64)


def ptr_long(value: Optional[int]) -> str:
    """spy_ptr_long(): the pointed-to value, or NULL."""
    return "NULL" if value is None else hexl(value)


def pointer(value: int) -> str:
    """printf's %p."""
    return "(nil)" if value == 0 else "0x%x" % value


def c_string(value: Optional[str]) -> str:
    """printf's %s (glibc prints a NULL string as "(null)")."""
    return "(null)" if value is None else value


def number(header: str, value: Optional[int]) -> str:
    """with_decimal(header, ptr_long(value)), without formatting the value
    twice (the hot path: every call has a few)."""
    if value is None:
        return header + " NULL"
    value &= MASK64
    return "%s 0x%08X (%d)" % (header, value, value)


def with_decimal(header: str, data: str) -> str:
    """pcsc-spy's generic argument line: a hex value gets its decimal."""
    if data.startswith("0x"):
        try:
            return "%s %s (%d)" % (header, data, int(data, 16))
        except ValueError:
            pass
    return "%s %s" % (header, data)


def hex_bytes(data: bytes) -> str:
    return data.hex(" ").upper()


# Printable ASCII as itself, every other byte as "." (the text column).
_PRINTABLE = bytes(b if 31 < b < 127 else ord(".") for b in range(256))


def hexdump(data: bytes, width: int = 16) -> List[str]:
    # bytes.hex() and bytes.translate() once for the whole buffer, then
    # slices: not a format per byte (a 65 KB extended APDU is 4,000 lines).
    hexes = data.hex(" ").upper()
    text = data.translate(_PRINTABLE).decode("ascii")
    if len(data) <= width:   # most APDUs and answers: one line
        return ["0000 %-*s %s" % (3 * width - 1, hexes, text)] if data else []
    full = len(data) - len(data) % width
    lines = ["%04X %s %s" % (offset, hexes[3 * offset:3 * (offset + width) - 1],
                             text[offset:offset + width])
             for offset in range(0, full, width)]
    if full < len(data):
        # The last line's hex column is padded to the full width.
        lines.append("%04X %-*s %s" % (full, 3 * width - 1, hexes[3 * full:], text[full:]))
    return lines


def states(value: int) -> str:
    return ", ".join(name for bit, name in K.READER_STATES if value & bit)


def preferred_protocols(value: int) -> str:
    return ", ".join(name for bit, name in K.PROTOCOLS if value & bit)


def active_protocol(value: int) -> str:
    for bit, name in K.PROTOCOLS:  # pcsc-spy names the lowest bit set
        if value & bit:
            return name
    return "UNKNOWN"


class Format:
    """Display options, and the per-thread knowledge pcsc-spy accumulates
    (the control codes of the reader's features)."""

    def __init__(self, diffable: bool = False):
        self.diffable = diffable
        self.control_codes: Dict[int, str] = dict(K.CONTROL_CODES)
        self.features: Dict[str, int] = {}

    def masked(self, header: str, value: str) -> str:
        """A value that changes from run to run; `-d` hides it."""
        return header + ("0x????" if self.diffable else value)


# -- one renderer per function ----------------------------------------------

def _handle_text(c: Call, f: Format, name: str) -> str:
    return f.masked(name + ": ", hexl(c.args[name]))


def _handle(c: Call, f: Format, name: str):
    return IN, _handle_text(c, f, name)


LOST = b"\0lost"   # a buffer whose bytes were lost on the way (the buffer was full)


def _shown(cap: Optional[Captured], pointer: int, length: Optional[int]) -> Optional[bytes]:
    """The bytes to show for a buffer; None shows as NULL.  An output buffer
    is not read after a failed call (it holds stale memory, which pcsc-spy
    1.9.9 prints): it shows as NULL, unless nothing was returned in it."""
    if cap is not None:
        if cap.data is None and cap.truncated and not (cap.is_null or cap.fault):
            return LOST
        return cap.data
    if pointer and length == 0:
        return b""
    return None


def _buffer(direction: str, label: str, data: Optional[bytes]) -> tuple:
    """A buffer's block: its label, then its bytes."""
    if data is LOST:
        return direction, [label, " (not captured: events were lost)"]
    if data is None:
        return direction, [label, " NULL"]
    return direction, [label] + [" " + line for line in hexdump(data)]


def _multistring(size_name: str, field_name: str, length: Optional[int],
                 cap: Optional[Captured]):
    """A multi-string as pcsc-spy lists it: its length, then each string up
    to that length (the terminating empty string included)."""
    yield OUT, "%s %s" % (size_name, ptr_long(length))
    if length is None or cap is None or cap.data is None:
        yield OUT, "%s NULL" % field_name
        return
    data, done, pos = cap.data, 0, 0
    while True:
        end = data.find(b"\0", pos)
        if end < 0:
            end = len(data)
        yield OUT, "%s %s" % (field_name, data[pos:end].decode("utf-8", "replace"))
        done += end - pos + 1
        pos = end + 1
        if done >= length or pos >= len(data):
            break


def _readers(direction: str, readers: Optional[List[ReaderState]]):
    for r in readers or ():
        name = c_string(r.reader) if r.name_captured else "(name not captured)"
        atr = hex_bytes(r.atr[:r.cb_atr]) if r.cb_atr <= K.MAX_ATR_SIZE else "NULL"
        yield direction, [
            with_decimal("szReader:", name),
            " dwCurrentState: %s (%s)" % (states(r.current_state), hexl(r.current_state)),
            " dwEventState: %s (%s)" % (states(r.event_state), hexl(r.event_state)),
            number(" Atr length:", r.cb_atr),
            with_decimal(" Atr:", atr)]


def establish_context(c: Call, f: Format):
    scope = c.args["dwScope"]
    yield IN, "dwScope: %s (%s)" % (K.SCOPES.get(scope, "UNKNOWN"), hexl(scope))
    yield AT_RETURN
    yield OUT, f.masked("hContext: ", ptr_long(c.exit.word("phContext")))


def context_only(c: Call, f: Format):
    yield _handle(c, f, "hContext")


def card_only(c: Call, f: Format):
    yield _handle(c, f, "hCard")


def _disposition(c: Call):
    d = c.args["dwDisposition"]
    return IN, "dwDisposition: %s (%s)" % (K.DISPOSITIONS.get(d, "UNKNOWN"), hexl(d))


def card_disposition(c: Call, f: Format):
    yield _handle(c, f, "hCard")
    yield _disposition(c)


def _share_and_protocols(c: Call):
    share, proto = c.args["dwShareMode"], c.args["dwPreferredProtocols"]
    yield IN, "dwShareMode: %s (%s)" % (K.SHARE_MODES.get(share, "UNKNOWN"), hexl(share))
    yield IN, "dwPreferredProtocols: %s (%s)" % (hexl(proto), preferred_protocols(proto))


def _active_protocol(value: Optional[int]):
    if value is None:
        return OUT, "dwActiveProtocol: NULL"
    return OUT, "dwActiveProtocol: %s (%s)" % (active_protocol(value), hexl(value))


def _changing(header: str, value: str, f: Format) -> str:
    """A value pcsc-spy's -d leaves visible although it changes from run to
    run (a card handle, a heap address): masked too, but for NULL, which
    does not change."""
    if f.diffable and value.startswith("0x"):
        return header + " 0x????"
    return with_decimal(header, value)


def connect(c: Call, f: Format):
    yield _handle(c, f, "hContext")
    yield IN, with_decimal("szReader", c_string(c.entry.text("szReader")))
    yield from _share_and_protocols(c)
    yield IN, _changing("phCard", ptr_long(c.entry.word("phCard")), f)
    yield IN, number("pdwActiveProtocol", c.entry.word("pdwActiveProtocol"))
    yield AT_RETURN
    yield OUT, _changing("phCard", ptr_long(c.exit.word("phCard")), f)
    yield _active_protocol(c.exit.word("pdwActiveProtocol"))


def reconnect(c: Call, f: Format):
    yield _handle(c, f, "hCard")
    yield from _share_and_protocols(c)
    yield IN, number("dwInitialization", c.args["dwInitialization"])
    yield AT_RETURN
    yield _active_protocol(c.exit.word("pdwActiveProtocol"))


def status(c: Call, f: Format):
    yield _handle(c, f, "hCard")
    yield IN, number("pcchReaderLen", c.entry.word("pcchReaderLen"))
    yield IN, number("pcbAtrLen", c.entry.word("pcbAtrLen"))
    yield AT_RETURN
    out = c.exit
    length = out.word("pcchReaderLen")
    yield OUT, number("cchReaderLen", length)
    name = out.data.get("mszReaderName")
    if length is None:
        reader = '""'
    elif name is None or name.data is None:
        reader = "NULL"
    else:  # pcsc-spy shows the first string only
        reader = name.data.split(b"\0", 1)[0].decode("utf-8", "replace")
    yield OUT, with_decimal("mszReaderName", reader)
    yield OUT, number("dwState", out.word("pdwState"))
    yield OUT, number("dwProtocol", out.word("pdwProtocol"))
    atr_len = out.word("pcbAtrLen")
    if atr_len is None:
        yield OUT, "bAtrLen NULL"
        yield OUT, "bAtr"
    else:
        yield OUT, number("bAtrLen", atr_len)
        atr = _shown(out.data.get("pbAtr"), c.args["pbAtr"], atr_len)
        yield OUT, with_decimal("bAtr", "NULL" if atr is None else
                                "(not captured: events were lost)" if atr is LOST else hex_bytes(atr))


def get_status_change(c: Call, f: Format):
    yield _handle(c, f, "hContext")
    yield IN, number("dwTimeout:", c.args["dwTimeout"])
    yield IN, "cReaders: %d" % c.args["cReaders"]
    yield from _readers(IN, c.entry.readers.get("rgReaderStates"))
    yield AT_RETURN
    yield from _readers(OUT, c.exit.readers.get("rgReaderStates"))


def _pci(f: Format, fields, phase) -> List[str]:
    """A SCARD_IO_REQUEST's two fields: fields is _SEND_PCI or _RECV_PCI."""
    words = phase.words
    return [f.masked(label, ptr_long(words.get(word))) for label, word in fields]


def _pci_fields(name: str):
    """(label, word name) of a SCARD_IO_REQUEST's fields."""
    return tuple(("%s.%s: " % (name, fld), "%s.%s" % (name, fld))
                 for fld in ("dwProtocol", "cbPciLength"))


_SEND_PCI = _pci_fields("pioSendPci")
_RECV_PCI = _pci_fields("pioRecvPci")


def transmit(c: Call, f: Format):
    # In blocks: the most frequent call, whose lines cost the reader most.
    args, entry = c.args, c.entry
    send = _shown(entry.data.get("pbSendBuffer"), args["pbSendBuffer"], args["cbSendLength"])
    yield IN, [_handle_text(c, f, "hCard"), *_pci(f, _SEND_PCI, entry),
               number("bSendLength", args["cbSendLength"])]
    yield _buffer(IN, "bSendBuffer", send)
    yield AT_RETURN
    out = c.exit     # set when the call returns
    length = out.words.get("pcbRecvLength") or 0
    recv = _shown(out.data.get("pbRecvBuffer"), args["pbRecvBuffer"], length)
    yield OUT, [*_pci(f, _RECV_PCI, out), number("bRecvLength", length)]
    yield _buffer(OUT, "bRecvBuffer", recv)


def control(c: Call, f: Format):
    yield _handle(c, f, "hCard")
    code = c.args["dwControlCode"]
    yield IN, "dwControlCode: %s (%s)" % (f.control_codes.get(code, "UNKNOWN"), hexl(code))
    yield IN, number("bSendLength", c.args["cbSendLength"])
    send = _shown(c.entry.data.get("pbSendBuffer"), c.args["pbSendBuffer"],
                  c.args["cbSendLength"])
    yield _buffer(IN, "bSendBuffer", send)
    yield AT_RETURN
    length = c.exit.word("lpBytesReturned") or 0
    yield OUT, number("bRecvLength", length)
    recv = _shown(c.exit.data.get("pbRecvBuffer"), c.args["pbRecvBuffer"], length)
    yield _buffer(OUT, "bRecvBuffer", recv)
    yield RESULT
    if c.rv == K.SCARD_S_SUCCESS and send is not LOST and recv is not LOST:
        yield from _parse_control(f, code, send or b"", recv or b"")


def _parse_control(f: Format, code: int, send: bytes, recv: bytes):
    """pcsc-spy's decoding of the PC/SC v2 part 10 answers it knows."""
    if code == K.CM_IOCTL_GET_FEATURE_REQUEST:
        yield RAW, "  parsing CM_IOCTL_GET_FEATURE_REQUEST results:"
        while len(recv) >= 2:
            tag, length, value = recv[0], recv[1], recv[2:2 + recv[1]]
            ioctl = int.from_bytes(value[:4].rjust(4, b"\0"), "big")
            name = K.FEATURES.get(tag, "UNKNOWN")
            f.control_codes[ioctl] = name
            if name != "UNKNOWN":
                f.features[name] = ioctl
            yield RAW, "  Tag %s is 0x%X" % (name, ioctl)
            recv = recv[2 + length:]
    elif code == f.features.get("FEATURE_GET_TLV_PROPERTIES"):
        yield RAW, "  parsing FEATURE_GET_TLV_PROPERTIES results:"
        while len(recv) >= 2:
            tag, length, value = recv[0], recv[1], recv[2:2 + recv[1]]
            yield RAW, "  Tag: %s" % K.TLV_PROPERTIES.get(tag, "UNKNOWN")
            yield RAW, "   Length:  %d" % length
            yield RAW, "   Value: %s" % list(value)
            recv = recv[2 + length:]
    elif code == f.features.get("FEATURE_IFD_PIN_PROPERTIES") and len(recv) >= 4:
        yield RAW, "  parsing FEATURE_IFD_PIN_PROPERTIES results:"
        yield RAW, "  wLcdLayout: %d %d" % (recv[0], recv[1])
        yield RAW, "  bEntryValidationCondition: %d" % recv[2]
        yield RAW, "  bTimeOut2: %d" % recv[3]
    elif code == f.features.get("FEATURE_VERIFY_PIN_DIRECT") and len(send) >= 19:
        s = send
        yield RAW, "  parsing FEATURE_VERIFY_PIN_DIRECT:"
        yield RAW, "  bTimerOut: %d" % s[0]
        yield RAW, "  bTimerOut2: %d" % s[1]
        yield RAW, "  bmFormatString: %d" % s[2]
        yield RAW, "  bmPINBlockString: %d" % s[3]
        yield RAW, "  bmPINLengthFormat: %d" % s[4]
        yield RAW, "  wPINMaxExtraDigit: 0x%02X%02X" % (s[6], s[5])
        yield RAW, "   Min: %d" % s[6]
        yield RAW, "   Max: %d" % s[5]
        yield RAW, "  bEntryValidationCondition: %d" % s[7]
        yield RAW, "  bNumberMessage: %d" % s[8]
        yield RAW, "  wLangId: 0x%02X%02X" % (s[10], s[9])
        yield RAW, "  bMsgIndex: %d" % s[11]
        yield RAW, "  bTeoPrologue: %d %d %d" % (s[12], s[13], s[14])
        yield RAW, "  ulDataLength: %d" % int.from_bytes(s[15:19], "little")
        yield RAW, "  APDU:"
        yield RAW, ["   " + line for line in hexdump(s[19:])]


def list_reader_groups(c: Call, f: Format):
    yield _handle(c, f, "hContext")
    yield IN, number("pcchGroups:", c.entry.word("pcchGroups"))
    yield AT_RETURN
    yield from _multistring("pcchGroups:", "mszGroups:", c.exit.word("pcchGroups"),
                            c.exit.data.get("mszGroups"))


def list_readers(c: Call, f: Format):
    yield _handle(c, f, "hContext")
    yield IN, with_decimal("mszGroups:", c_string(c.entry.text("mszGroups")))
    yield AT_RETURN
    yield from _multistring("pcchReaders:", "mszReaders:", c.exit.word("pcchReaders"),
                            c.exit.data.get("mszReaders"))


def free_memory(c: Call, f: Format):
    yield _handle(c, f, "hContext")
    yield IN, _changing("pvMem:", pointer(c.args["pvMem"]), f)


def _attribute(c: Call):
    attr = c.args["dwAttrId"]
    return IN, "dwAttrId: %s (%s)" % (K.ATTRIBUTES.get(attr, "UNKNOWN"), hexl(attr))


def get_attrib(c: Call, f: Format):
    yield _handle(c, f, "hCard")
    yield _attribute(c)
    yield AT_RETURN
    length = c.exit.word("pcbAttrLen") or 0
    yield OUT, number("bAttrLen", length)
    yield _buffer(OUT, "bAttr", _shown(c.exit.data.get("pbAttr"), c.args["pbAttr"], length))


def set_attrib(c: Call, f: Format):
    yield _handle(c, f, "hCard")
    yield _attribute(c)
    yield IN, number("bAttrLen", c.args["cbAttrLen"])
    yield _buffer(IN, "bAttr", _shown(c.entry.data.get("pbAttr"), c.args["pbAttr"],
                                      c.args["cbAttrLen"]))


# -- the whole trace ----------------------------------------------------------

def elapsed(ns: int) -> str:
    """A call's duration as pcsc-spy prints it: seconds.microseconds."""
    us = ns // 1000
    return "%d.%06d" % divmod(us, 1000000)


class TextSink:
    """Prints calls as they start and return, then pcsc-spy's summary.

    Threads are numbered in order of first call and indented by 4 spaces per
    number, as pcsc-spy does.  When the calls of a second process show up,
    each thread's first call is preceded by a line naming its process, and
    the summary's thread headers carry pid, tid and command (a single
    traced process gives pcsc-spy's output byte for byte)."""

    def __init__(self, stats: Stats, out=None, color: bool = False, diffable: bool = False,
                 show_thread: bool = False, result_dialect: str = "1.9", annotator=None):
        self.stats = stats
        self.out = out if out is not None else sys.stdout
        self.color = color
        self.diffable = diffable
        self.show_thread = show_thread
        self.result_dialect = result_dialect
        self.annotator = annotator   # --apdu: an annotate.Annotator
        self._threads: Dict[tuple, "_Thread"] = {}
        # The processes whose calls were shown so far (stats may be ahead:
        # it sees a batch of calls before this sink does).
        self._pids: set = set()
        self._running: Dict[int, tuple] = {}   # id(call) -> (generator, thread)
        self._results: Dict[int, str] = {}     # result code -> its text

    # -- Assembler sink (after Stats has seen the call) --
    def enter(self, call: Call) -> None:
        th = self._thread(call)
        gen = call.fn.render(call, th.format)
        self._running[id(call)] = (gen, th)
        self._run(gen, th, call, until_return=True, lines=[th.names[call.name]])

    def leave(self, call: Call) -> None:
        gen, th = self._running.pop(id(call))
        self._run(gen, th, call, until_return=False)

    def abort(self, call: Call) -> None:
        self._running.pop(id(call), None)

    # -- lines --
    def _run(self, gen, th, call, until_return: bool, lines=None) -> None:
        """Print the call's lines up to AT_RETURN (entry) or from there
        (return), in one write: the reader's time per line counts, it
        competes for the CPUs with what it traces."""
        lines = [] if lines is None else lines
        add = lines.append
        prefix, suffix = th.prefix, th.suffix
        returned = call
        for item in gen:
            if item.__class__ is tuple:   # (direction, text or [text, ...]): most items
                direction, text = item
                if text.__class__ is str:
                    add(text if direction is RAW else prefix[direction] + text + suffix)
                elif direction is RAW:
                    lines.extend(text)
                elif text:
                    add(prefix[direction] + th.between[direction].join(text) + suffix)
            elif item is AT_RETURN:
                if until_return:
                    break
            elif item is RESULT:
                add(self._result(th, call))
                call = None  # printed
            else:  # pragma: no cover - a renderer's mistake
                raise TypeError("a renderer yielded %r" % (item,))
        else:
            if not until_return and call is not None:
                add(self._result(th, call))
            if not until_return and self.annotator is not None:
                lines.extend(self._notes(th, returned))
        if lines:
            self.out.write("\n".join(lines) + "\n")

    def _notes(self, th, call: Call) -> List[str]:
        """--apdu: the call's APDUs and ATRs decoded, after its result line
        (and after pcsc-spy's own parsing lines), each line " # "."""
        return [th.indent + self._paint(COLOR_CYAN, " # " + line)
                for note in self.annotator.notes(call)
                for line in [note.head] + ["  " + d for d in note.details]]

    def _result(self, th, call: Call) -> str:
        time = " [??.??]" if self.diffable else " [%s]" % elapsed(call.duration_ns)
        return th.indent + self._result_text(call.rv) + time

    def _result_text(self, rv: int) -> str:
        """The result's text, worked out once per result code."""
        data = self._results.get(rv)
        if data is None:
            if self.result_dialect == "2.2":
                data = " => %s [%s] " % (K.rv_name(rv), K.rv_hex(rv))
            else:
                data = " => %s (%s [%s]) " % (K.rv_text(rv), K.rv_name(rv), K.rv_hex(rv))
            if rv != K.SCARD_S_SUCCESS:
                data = self._paint(COLOR_RED, data)
            self._results[rv] = data
        return data

    def _paint(self, color: str, text: str) -> str:
        return color + text + COLOR_NORMAL if self.color else text

    def _print(self, line: str) -> None:
        self.out.write(line + "\n")

    def _thread(self, call: Call) -> "_Thread":
        key = (call.pid, call.tid)
        th = self._threads.get(key)
        if th is None:
            number = self.stats.thread(call).number
            indent = " " * (number * 4)
            if self.show_thread:
                indent += " (t%d) " % number
            th = self._threads[key] = _Thread(indent, Format(self.diffable), self.color)
            self._pids.add(call.pid)
            if len(self._pids) > 1:
                self._print("%s[%s]" % (indent, self._who(call.pid, call.tid, call.comm)))
        return th

    def _who(self, pid: int, tid: int, comm: str) -> str:
        """A thread of a process; `-d` masks the ids, which change from run to run."""
        if self.diffable:
            return "pid ? tid ? %s" % comm
        return "pid %d tid %d %s" % (pid, tid, comm)

    # -- summary --
    def summary(self) -> None:
        stats = self.stats
        total = stats.total_seconds
        for n, th in enumerate(stats.threads.values(), 1):
            self._print("")
            header = "Thread %d/%d" % (n, len(stats.threads))
            if stats.several_processes:
                # Ids even with -d: the summary's timings are not diffable anyway.
                header += " (pid %d tid %d %s)" % (th.pid, th.tid, th.comm)
            self._print(header)
            self._print("Results sorted by total execution time")
            self._print("total time: %f sec" % total)
            # pcsc-spy 2.x comes with Python >= 3.12 (Debian 13), whose sum()
            # is compensated; 1.9.9 with Debian 12's 3.11, whose is not.
            compensated = self.result_dialect == "2.2"
            for name, durations in th.by_total_time(compensated):
                spent = durations.total_seconds(compensated)
                share = spent / total * 100.0 if total else 0.0
                self._print("%f sec (%3d calls) %5.2f%% %s" % (spent, durations.count, share, name))
        if stats.lost:
            self._print("")
            self._print("Lost events: %d (calls are missing above)" % stats.lost)


class _Thread:
    """What the text needs per thread: its indent, pcsc-spy's feature map,
    and what goes around the text of an IN or OUT line (worked out once)."""

    def __init__(self, indent: str, fmt: Format, color: bool = False):
        self.indent = indent
        self.format = fmt
        colors = {IN: COLOR_GREEN, OUT: COLOR_MAGENTA} if color else {IN: "", OUT: ""}
        self.prefix = {d: "%s%s %s " % (indent, colors[d], d) for d in (IN, OUT)}
        self.suffix = COLOR_NORMAL if color else ""
        # What joins the lines of a block.
        self.between = {d: self.suffix + "\n" + p for d, p in self.prefix.items()}
        # A call's first line: its name, indented (and painted).
        self.names = _Names(indent + COLOR_BLUE if color else indent, self.suffix)


class _Names(dict):
    """Function name -> its line, made at the first call."""

    def __init__(self, before: str, after: str):
        super().__init__()
        self.before = before
        self.after = after

    def __missing__(self, name: str) -> str:
        line = self[name] = self.before + name + self.after
        return line
