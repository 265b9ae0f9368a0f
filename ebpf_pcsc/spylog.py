"""Raw logs of pcsc-lite's own spy (libpcscspy.so), read back as Call objects.

libpcscspy, preloaded into an application, writes one line per value to the
FIFO $HOME/pcsc-spy; `cat ~/pcsc-spy > LOG` keeps that log, and
`pcsc-spy LOG` prints it.  `pcsc-ebpf-spy -r LOG` reads it here and prints it
with our renderers.  The format, as pcsc-lite 1.9.9 writes it (its source is
the specification; none of it is copied here):

    THREAD@>|SEC|USEC|SCardXxx              the call starts
    THREAD@VALUE                            one line per value, in a fixed
    ...                                     order per function: its inputs,
                                            then (after the real call) its
                                            outputs
    THREAD@<|SEC|USEC|SCardXxx|TEXT|0xRV    the call returns

THREAD is pthread_self() in %lX; the lines of several threads interleave, so
each thread is parsed on its own.  A value is one of:

- a number, "0x%08lX" (a pointer to one prints "NULL" when it is NULL);
- a string, "%s" (a NULL one prints "(null)");
- a pointer, "%p" ("(nil)");
- a buffer: its length (a number), then its bytes as "3B 80 " (an empty
  line for none), or "NULL";
- a multi-string: its length (or "NULL", then '""'), then "NULL" or its
  strings, one per line, until their lengths + 1 reach the length;
- reader states: per reader, its name, dwCurrentState, dwEventState, then its
  ATR as a buffer (NULL when cbAtr > 33).

What the Call objects hold (the keys our function table, functions.py,
names):

- pid 0, comm "", tid = the THREAD value as logged (pthread_self(), not a
  kernel tid: often 48 bits; kept whole so two threads never merge);
- call_ts and ret_ts in ns, from SEC and USEC: durations and the summary are
  the log's own, to the microsecond;
- args: the numbers the function got; a pointer argument is 1 when the log
  shows it was not NULL (a value was read through it), else 0 (NULL, or the
  log does not say); pvMem is the %p value;
- the values read through pointers go in entry/exit words (None: NULL) and
  data (Captured: the bytes; data None and PCSC_DATA_NULL for NULL), as the
  live probes capture them.  An output buffer is kept as logged, also after
  a failed call (libpcscspy 1.9.9 logs it, pcsc-spy prints it): what the log
  says is all there is.
- rv: the logged result as a signed LONG; TEXT (pcsc_stringify_error) is not
  kept: the renderer prints pcsc-lite 1.9's text for the code.

A call whose return line is missing at the end of the log (the application
died, or was still inside the call when the log was taken) is an unfinished
call: rv, ret_ts and exit None, aborted False, like a call still running
when a live trace ends.  That is only when the log stops where the real
function runs, after its inputs and before its outputs: a log that stops
anywhere else in a call was cut (a partial last line, a value missing) and
is a FormatError, as is any line that is not what the format says comes
next.  The error is raised after everything before it was handed over.  An
empty log has no calls (the application never called libpcscspy).

Three ways in:

- looks_like(first_line): whether a file is such a log;
- read_calls(path, lines): the calls, complete, in the order their return
  lines appear, then the unfinished ones;
- replay(path, lines, sink): sink.enter(call) and sink.leave(call) in the
  log's order, as pcsc-spy prints them: a call enters at its '>' line (once
  its inputs are read) and leaves at its '<' line, so threads are numbered
  in the order of their first line, a blocked call shows its inputs before
  the calls other threads make meanwhile, and the summary's total time runs
  from the first line to the last return line, as pcsc-spy's does.  An
  unfinished call is entered, never left (sink.unfinished(call) is called
  for it when the sink has that method).
"""
import re
from collections import deque
from typing import Callable, Deque, Dict, Iterable, Iterator, List, Optional, Tuple

from . import layout as L
from . import record
from .calls import Call, Captured, Phase, ReaderState
from .functions import BY_NAME

_ENTER = re.compile(r">\|(\d+)\|(\d+)\|(\w+)\Z")
_RETURN = re.compile(r"<\|(\d+)\|(\d+)\|(\w+)\|(?:(.*)\|)?0x([0-9A-Fa-f]+)\Z")  # >= 2.2: no text
_FIRST = re.compile(r"[0-9A-Fa-f]+@>\|\d+\|\d+\|SCard\w+\r?\n?\Z")
_THREAD = re.compile(r"[0-9A-Fa-f]+\Z")
_NUMBER = re.compile(r"0x[0-9A-Fa-f]+\Z")
_HEX_BYTES = re.compile(r"(?:[0-9A-Fa-f]{2} ?)*\Z")
MAX_ATR_SIZE = 33
# Names pcsc-spy also accepts for a function.
_ALIASES = {"SCardControl132": "SCardControl"}

ENTER, LEAVE, UNFINISHED = "enter", "leave", "unfinished"
_INPUTS_DONE = object()   # a parser yields it once the call's inputs are read


def looks_like(first_line: str) -> bool:
    """Whether first_line starts a libpcscspy log: a thread's first call."""
    return bool(_FIRST.match(first_line))


class _Bad(Exception):
    """The line just read is not what the format says comes there."""


# -- reading values: generators that yield a label (the value they wait for)
# and are sent the line ------------------------------------------------------

def _number(what: str):
    line = yield what
    if not _NUMBER.match(line):
        raise _Bad("%s: expected a number (0x%%08lX), got %s" % (what, _shown(line)))
    return int(line, 16)


def _maybe_number(what: str):
    """spy_ptr_long(): the value pointed to, None for a NULL pointer."""
    line = yield what
    if line == "NULL":
        return None
    if not _NUMBER.match(line):
        raise _Bad("%s: expected a number (0x%%08lX) or NULL, got %s" % (what, _shown(line)))
    return int(line, 16)


def _string(what: str):
    """spy_str(): None for glibc's "(null)"."""
    line = yield what
    if _RETURN.match(line):
        raise _Bad("%s: expected a string, got the return line" % what)
    return None if line == "(null)" else line


def _pointer(what: str):
    """spy_pvoid(): %p."""
    line = yield what
    if line == "(nil)":
        return 0
    if not _NUMBER.match(line):
        raise _Bad("%s: expected a pointer (%%p), got %s" % (what, _shown(line)))
    return int(line, 16)


def _buffer(what: str):
    """spy_buffer(): (length, Captured)."""
    length = yield from _number(what + " length")
    line = yield what
    if line == "NULL":
        return length, Captured(None, L.PCSC_DATA_NULL, length)
    if not _HEX_BYTES.match(line):
        raise _Bad("%s: expected hex bytes or NULL, got %s" % (what, _shown(line)))
    data = bytes.fromhex(line)
    if len(data) != length:
        raise _Bad("%s: %d bytes where its length says %d" % (what, len(data), length))
    return length, Captured(data, 0, length)


def _raw(text: str) -> bytes:
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return text.encode("utf-8", "replace")


def _multistring(what_length: str, what: str):
    """spy_n_str(): (length, Captured), (None, None) when the length pointer
    is NULL."""
    length = yield from _maybe_number(what_length)
    line = yield what
    if length is None:
        if line != '""':
            raise _Bad('%s: expected "" after a NULL length, got %s' % (what, _shown(line)))
        return None, None
    if line == "NULL":
        return length, Captured(None, L.PCSC_DATA_NULL, length)
    parts, done = [], 0
    while True:  # libpcscspy's do-while: one string at least
        if _RETURN.match(line):
            raise _Bad("%s: the return line comes before the strings reach their length %d"
                       % (what, length))
        parts.append(_raw(line))
        done += len(parts[-1]) + 1
        if done >= length:
            break
        line = yield what
    return length, Captured(b"\0".join(parts) + b"\0", 0, length)


def _reader_states(count: int, what: str):
    states = []
    for i in range(count):
        label = "%s[%d]" % (what, i)
        name = yield from _string(label + ".szReader")
        current = yield from _number(label + ".dwCurrentState")
        event = yield from _number(label + ".dwEventState")
        cb_atr, atr = yield from _buffer(label + ".rgbAtr")
        if (atr.data is None) != (cb_atr > MAX_ATR_SIZE):
            raise _Bad("%s.rgbAtr: %s with a length of %d" % (
                label, "NULL" if atr.data is None else "bytes", cb_atr))
        states.append(ReaderState(name, current, event, cb_atr, atr.data or b""))
    return states


def _text(value: Optional[str]) -> Captured:
    if value is None:
        return Captured(None, L.PCSC_DATA_NULL, 0)
    data = _raw(value)
    return Captured(data, 0, len(data))


def _not_null(value) -> int:
    if isinstance(value, Captured):
        return int(value.data is not None)
    return int(value is not None)


# -- one parser per function: what libpcscspy 1.9.9 logs, in its order -------
# Each gets the call (args and entry filled in) and the exit phase to fill,
# reads the inputs, yields _INPUTS_DONE, then reads the outputs.

def _context(c: Call, out: Phase):
    c.args["hContext"] = yield from _number("hContext")
    yield _INPUTS_DONE


def _card(c: Call, out: Phase):
    c.args["hCard"] = yield from _number("hCard")
    yield _INPUTS_DONE


def _card_disposition(c: Call, out: Phase):
    c.args["hCard"] = yield from _number("hCard")
    c.args["dwDisposition"] = yield from _number("dwDisposition")
    yield _INPUTS_DONE


def _establish_context(c: Call, out: Phase):
    c.args["dwScope"] = yield from _number("dwScope")
    yield _INPUTS_DONE
    out.words["phContext"] = yield from _maybe_number("phContext")
    c.args["phContext"] = _not_null(out.words["phContext"])


def _connect(c: Call, out: Phase):
    c.args["hContext"] = yield from _number("hContext")
    reader = c.entry.data["szReader"] = _text((yield from _string("szReader")))
    c.args["szReader"] = _not_null(reader)
    c.args["dwShareMode"] = yield from _number("dwShareMode")
    c.args["dwPreferredProtocols"] = yield from _number("dwPreferredProtocols")
    for name in ("phCard", "pdwActiveProtocol"):
        c.entry.words[name] = yield from _maybe_number(name)
        c.args[name] = _not_null(c.entry.words[name])
    yield _INPUTS_DONE
    for name in ("phCard", "pdwActiveProtocol"):
        out.words[name] = yield from _maybe_number(name)


def _reconnect(c: Call, out: Phase):
    c.args["hCard"] = yield from _number("hCard")
    for name in ("dwShareMode", "dwPreferredProtocols", "dwInitialization"):
        c.args[name] = yield from _number(name)
    yield _INPUTS_DONE
    out.words["pdwActiveProtocol"] = yield from _maybe_number("pdwActiveProtocol")
    c.args["pdwActiveProtocol"] = _not_null(out.words["pdwActiveProtocol"])


def _status(c: Call, out: Phase):
    c.args["hCard"] = yield from _number("hCard")
    for name in ("pcchReaderLen", "pcbAtrLen"):
        c.entry.words[name] = yield from _maybe_number(name)
        c.args[name] = _not_null(c.entry.words[name])
    yield _INPUTS_DONE
    length, name = yield from _multistring("pcchReaderLen", "mszReaderName")
    out.words["pcchReaderLen"] = length
    if name is not None:
        out.data["mszReaderName"] = name
        c.args["mszReaderName"] = _not_null(name)
    for word in ("pdwState", "pdwProtocol"):
        out.words[word] = yield from _maybe_number(word)
        c.args[word] = _not_null(out.words[word])
    if c.entry.words["pcbAtrLen"] is None:
        line = yield "pbAtr"
        if line != "NULL":
            raise _Bad("pbAtr: expected NULL (pcbAtrLen is NULL), got %s" % _shown(line))
        out.words["pcbAtrLen"] = None
    else:
        out.words["pcbAtrLen"], atr = yield from _buffer("pbAtr")
        out.data["pbAtr"] = atr
        c.args["pbAtr"] = _not_null(atr)


def _get_status_change(c: Call, out: Phase):
    for name in ("hContext", "dwTimeout", "cReaders"):
        c.args[name] = yield from _number(name)
    count = c.args["cReaders"]
    c.args["rgReaderStates"] = int(count > 0)
    c.entry.readers["rgReaderStates"] = yield from _reader_states(count, "rgReaderStates")
    yield _INPUTS_DONE
    out.readers["rgReaderStates"] = yield from _reader_states(count, "rgReaderStates")


def _control(c: Call, out: Phase):
    c.args["hCard"] = yield from _number("hCard")
    c.args["dwControlCode"] = yield from _number("dwControlCode")
    c.args["cbSendLength"], send = yield from _buffer("pbSendBuffer")
    c.entry.data["pbSendBuffer"] = send
    c.args["pbSendBuffer"] = _not_null(send)
    yield _INPUTS_DONE
    out.words["lpBytesReturned"], recv = yield from _buffer("pbRecvBuffer")
    out.data["pbRecvBuffer"] = recv
    c.args["pbRecvBuffer"] = _not_null(recv)


def _transmit(c: Call, out: Phase):
    c.args["hCard"] = yield from _number("hCard")
    for name in ("pioSendPci.dwProtocol", "pioSendPci.cbPciLength"):
        c.entry.words[name] = yield from _number(name)
    c.args["pioSendPci"] = 1
    c.args["cbSendLength"], send = yield from _buffer("pbSendBuffer")
    c.entry.data["pbSendBuffer"] = send
    c.args["pbSendBuffer"] = _not_null(send)
    yield _INPUTS_DONE
    for name in ("pioRecvPci.dwProtocol", "pioRecvPci.cbPciLength"):
        out.words[name] = yield from _number(name)
    c.args["pioRecvPci"] = 1
    out.words["pcbRecvLength"], recv = yield from _buffer("pbRecvBuffer")
    out.data["pbRecvBuffer"] = recv
    c.args["pbRecvBuffer"] = _not_null(recv)


def _list_reader_groups(c: Call, out: Phase):
    c.args["hContext"] = yield from _number("hContext")
    c.entry.words["pcchGroups"] = yield from _maybe_number("pcchGroups")
    c.args["pcchGroups"] = _not_null(c.entry.words["pcchGroups"])
    yield _INPUTS_DONE
    out.words["pcchGroups"], groups = yield from _multistring("pcchGroups", "mszGroups")
    if groups is not None:
        out.data["mszGroups"] = groups
        c.args["mszGroups"] = _not_null(groups)


def _list_readers(c: Call, out: Phase):
    c.args["hContext"] = yield from _number("hContext")
    groups = c.entry.data["mszGroups"] = _text((yield from _string("mszGroups")))
    c.args["mszGroups"] = _not_null(groups)
    yield _INPUTS_DONE
    out.words["pcchReaders"], readers = yield from _multistring("pcchReaders", "mszReaders")
    c.args["pcchReaders"] = _not_null(out.words["pcchReaders"])
    if readers is not None:
        out.data["mszReaders"] = readers
        c.args["mszReaders"] = _not_null(readers)


def _free_memory(c: Call, out: Phase):
    c.args["hContext"] = yield from _number("hContext")
    c.args["pvMem"] = yield from _pointer("pvMem")
    yield _INPUTS_DONE


def _get_attrib(c: Call, out: Phase):
    c.args["hCard"] = yield from _number("hCard")
    c.args["dwAttrId"] = yield from _number("dwAttrId")
    yield _INPUTS_DONE
    out.words["pcbAttrLen"], attr = yield from _buffer("pbAttr")
    out.data["pbAttr"] = attr
    c.args["pbAttr"] = _not_null(attr)


def _set_attrib(c: Call, out: Phase):
    c.args["hCard"] = yield from _number("hCard")
    c.args["dwAttrId"] = yield from _number("dwAttrId")
    c.args["cbAttrLen"], attr = yield from _buffer("pbAttr")
    c.entry.data["pbAttr"] = attr
    c.args["pbAttr"] = _not_null(attr)
    yield _INPUTS_DONE


_PARSERS: Dict[str, Callable] = {
    "SCardEstablishContext": _establish_context,
    "SCardReleaseContext": _context,
    "SCardIsValidContext": _context,
    "SCardConnect": _connect,
    "SCardReconnect": _reconnect,
    "SCardDisconnect": _card_disposition,
    "SCardBeginTransaction": _card,
    "SCardEndTransaction": _card_disposition,
    "SCardStatus": _status,
    "SCardGetStatusChange": _get_status_change,
    "SCardControl": _control,
    "SCardTransmit": _transmit,
    "SCardListReaderGroups": _list_reader_groups,
    "SCardListReaders": _list_readers,
    "SCardFreeMemory": _free_memory,
    "SCardCancel": _context,
    "SCardGetAttrib": _get_attrib,
    "SCardSetAttrib": _set_attrib,
}
assert set(_PARSERS) == set(BY_NAME), "a function of the table has no log parser"


def _signed(value: int) -> int:
    """A LONG logged as 0x%08lX, back to its (64-bit) signed value."""
    value &= 0xFFFFFFFFFFFFFFFF
    return value - (1 << 64) if value >> 63 else value


def _ns(sec: str, usec: str) -> int:
    return int(sec) * 1000000000 + int(usec) * 1000


def _shown(line: str, limit: int = 60) -> str:
    return repr(line if len(line) <= limit else line[:limit] + "...")


def _whole_call(parser: Callable, c: Call, out: Phase, logged_name: str):
    """The parser, then the return line: yields labels (and _INPUTS_DONE),
    returns (rv, ret_ts)."""
    yield from parser(c, out)
    line = yield "return line"
    m = _RETURN.match(line)
    if not m:
        raise _Bad("expected %s's return line (<|sec|usec|%s|text|0xRV), got %s"
                   % (c.name, logged_name, _shown(line)))
    if m.group(3) != logged_name:
        raise _Bad("%s returns, %s was called" % (m.group(3), logged_name))
    return _signed(int(m.group(5), 16)), _ns(m.group(1), m.group(2))


# -- the log ------------------------------------------------------------------

class _Open:
    """A thread's call whose return line has not been read yet."""
    __slots__ = ("call", "out", "steps", "want", "line", "entered", "outputs", "enter")

    def __init__(self, call: Call, out: Phase, steps, line: int, enter: list):
        self.call = call
        self.out = out
        self.steps = steps
        self.want = next(steps)    # the label of the value awaited
        self.line = line           # the '>' line
        self.entered = False       # its inputs are read
        self.outputs = 0           # lines read since
        self.enter = enter         # its enter event (in the queue)


class _Log:
    def __init__(self, path: str):
        self.path = path
        self.open: Dict[int, _Open] = {}
        # Events in the log's order: [kind, call, ready].  An enter is ready
        # once the call's inputs are read; the queue waits for it.
        self.queue: Deque[list] = deque()

    def error(self, line: int, what: str):
        return record.FormatError(self.path, line, what)

    def ready(self, skip_blocked: bool = False) -> Iterator[Tuple[str, Call]]:
        while self.queue:
            kind, call, ready = self.queue[0]
            if not ready and not skip_blocked:
                return
            self.queue.popleft()
            if ready:
                yield kind, call

    def feed(self, number: int, line: str) -> None:
        thread, at, payload = line.partition("@")
        if not at or not _THREAD.match(thread):
            raise _Bad("not a libpcscspy log line (THREAD@VALUE): %s" % _shown(line))
        tid = int(thread, 16)
        current = self.open.get(tid)
        if current is None:
            self.start(tid, number, payload)
            return
        if current.entered:
            current.outputs += 1
        try:
            step = current.steps.send(payload)
            while step is _INPUTS_DONE:
                current.entered = True
                current.enter[2] = True
                step = next(current.steps)
            current.want = step
        except StopIteration as done:
            del self.open[tid]
            c = current.call
            c.rv, c.ret_ts = done.value
            c.exit = current.out
            self.queue.append([LEAVE, c, True])
        except _Bad as e:
            raise _Bad("%s (call at line %d): %s" % (current.call.name, current.line, e))

    def start(self, tid: int, number: int, payload: str) -> None:
        m = _ENTER.match(payload)
        if not m:
            raise _Bad("expected a call (>|sec|usec|SCardXxx), got %s" % _shown(payload))
        logged = m.group(3)
        fn = BY_NAME.get(_ALIASES.get(logged, logged))
        if fn is None:
            raise _Bad("unknown function %s" % _shown(logged))
        c = Call(fn, 0, tid, "", _ns(m.group(1), m.group(2)), dict.fromkeys(fn.args, 0), Phase())
        out = Phase()
        enter = [ENTER, c, False]
        self.queue.append(enter)
        self.open[tid] = _Open(c, out, _whole_call(_PARSERS[fn.name], c, out, logged),
                               number, enter)

    def end(self, cut: Optional[int]) -> Tuple[List[Call], List[Tuple[int, str]]]:
        """At the end of the log: the unfinished calls, and where the log
        was cut (the open calls that stop elsewhere than between their inputs
        and outputs).  cut: the thread of a partial last line."""
        unfinished, errors = [], []
        for tid, o in sorted(self.open.items(), key=lambda kv: kv[1].line):
            if o.entered and o.outputs == 0 and tid != cut:
                unfinished.append(o.call)
            elif tid != cut:
                errors.append((o.line, "%s is cut short: the log ends before its %s"
                               % (o.call.name, o.want)))
        return unfinished, errors


def events(path: str, lines: Iterable[str], first_line: int = 1) -> Iterator[Tuple[str, Call]]:
    """(kind, call) in the log's order: ENTER when a call starts (its args
    and entry filled in), LEAVE when it returns (exit, rv, ret_ts set), and
    at the end UNFINISHED for each call entered that never returned.
    FormatError after the events before the fault."""
    log = _Log(path)
    partial: Optional[int] = None     # the number of a last line cut short
    cut: Optional[int] = None         # its thread
    for number, line in enumerate(lines, first_line):
        if not line.endswith("\n"):
            partial = number
            thread, at, _ = line.partition("@")
            cut = int(thread, 16) if at and _THREAD.match(thread) else None
            break
        line = line[:-2] if line.endswith("\r\n") else line[:-1]
        try:
            log.feed(number, line)
        except _Bad as e:
            # What came before is all there is.
            yield from log.ready(skip_blocked=True)
            raise log.error(number, str(e))
        yield from log.ready()
    unfinished, errors = log.end(cut)
    if partial is not None:
        # The cause, whatever else it left open.
        errors = [(partial, "unfinished line (the log is truncated)")]
        if cut is None:   # whose line it was is not known
            unfinished = []
    yield from log.ready(skip_blocked=True)
    for call in unfinished:
        yield UNFINISHED, call
    if errors:
        raise log.error(*min(errors))


def read_calls(path: str, lines: Iterable[str], first_line: int = 1) -> Iterator[Call]:
    """The calls of a libpcscspy log (lines: the whole file, from its first
    line, with their line ends), complete, in the order their return lines
    appear; then those that never returned (rv None).  FormatError (path,
    line number) after the calls before the fault."""
    for kind, call in events(path, lines, first_line):
        if kind != ENTER:
            yield call


def replay(path: str, lines: Iterable[str], sink, first_line: int = 1) -> None:
    """Hand the calls of a libpcscspy log to sink (enter/leave, like the
    live Assembler) in the log's order; see the module docstring."""
    unfinished = getattr(sink, "unfinished", None)
    for kind, call in events(path, lines, first_line):
        if kind == ENTER:
            sink.enter(call)
        elif kind == LEAVE:
            sink.leave(call)
        elif unfinished is not None:
            unfinished(call)
