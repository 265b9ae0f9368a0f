"""Replay: calls read from a file, handed to the outputs in the order a live
trace showed them, as (kind, call) events: "enter" when a call starts,
"leave" when it returns, "abort" when its thread died inside it,
"unfinished" for a call still running when the recording ended."""
from typing import List, Optional, Tuple

from . import record
from .calls import Call
from .errors import SpyError

Event = Tuple[str, Call]


def load(path: str) -> Tuple[List[Event], Optional[SpyError], dict]:
    """The events of a recording or of a libpcscspy log, the error that ended
    the reading early (None if none), and the recording's header (for a log,
    a header describing it)."""
    try:
        f = open(path, encoding="utf-8", errors="surrogateescape")
    except OSError as e:
        raise SpyError("cannot read %s (%s)" % (path, e.strerror), "check the path")
    events: List[Event] = []
    header = record.header([])
    error = None
    with f:
        first = f.readline()
        try:
            if record.is_header(first):
                header = record.parse_header(path, first)
                calls: List[Call] = []
                try:
                    calls.extend(record.read_calls(path, f, first_line=2))
                finally:
                    events = in_time_order(calls)
            elif _spylog().looks_like(first):
                spylog = _spylog()
                header["source"] = "libpcscspy log %s" % path
                kinds = {spylog.ENTER: "enter", spylog.LEAVE: "leave",
                         spylog.UNFINISHED: "unfinished"}
                for kind, call in spylog.events(path, _chain(first, f)):
                    events.append((kinds[kind], call))
            else:
                raise record.FormatError(
                    path, 1, "neither a pcsc-ebpf-spy recording nor a libpcscspy log",
                    fix="give a file written by pcsc-ebpf-spy -w, or a log captured from "
                        "libpcscspy's ~/pcsc-spy FIFO")
        except record.FormatError as e:
            error = e
    return events, error, header


def in_time_order(calls: List[Call]) -> List[Event]:
    """A recording's calls as the live trace met them: each starts at its
    entry time and ends at its return time."""
    # A recording made live says in which order the outputs met each call's
    # start and end (seq): the same order shows the same text.  Otherwise,
    # the kernel timestamps.
    by_seq = all(c.entry_seq is not None and (c.return_seq is not None or c.rv is None)
                 for c in calls)
    end = float("inf")
    timed = []
    for n, call in enumerate(calls):
        start = call.entry_seq if by_seq else call.call_ts
        timed.append((start, 1, n, "enter", call))
        if call.aborted:
            stop = call.return_seq if by_seq else call.ret_ts or call.call_ts
            timed.append((stop, 0, n, "abort", call))
        elif call.rv is None:
            timed.append((end, 2, n, "unfinished", call))
        else:
            # At equal times a return comes first: a thread's next call
            # starts after its previous one returned.
            timed.append((call.return_seq if by_seq else call.ret_ts, 0, n, "leave", call))
    timed.sort(key=lambda e: e[:3])
    return [(kind, call) for _, _, _, kind, call in timed]


def feed(events: List[Event], sink) -> None:
    for kind, call in events:
        handler = getattr(sink, kind, None)
        if handler is not None:
            handler(call)


def _spylog():
    from . import spylog  # only for libpcscspy logs
    return spylog


def _chain(first, rest):
    yield first
    yield from rest
