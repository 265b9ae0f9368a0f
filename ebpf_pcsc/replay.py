"""Replay: calls read from a file, fed to the outputs in the order a live
trace showed them (each call starts at its entry time and ends at its return
time; the outputs cannot tell the difference)."""
from typing import List, Optional, Tuple

from . import record
from .calls import Call
from .errors import SpyError


def load(path: str) -> Tuple[List[Call], Optional[SpyError], List[str]]:
    """The calls of a recording or of a libpcscspy log, the error that ended
    the reading early (None if none), and the traced libraries."""
    try:
        f = open(path, encoding="utf-8", errors="surrogateescape")
    except OSError as e:
        raise SpyError("cannot read %s (%s)" % (path, e.strerror), "check the path")
    calls: List[Call] = []
    libraries: List[str] = []
    with f:
        first = f.readline()
        try:
            if record.is_header(first):
                libraries = record.parse_header(path, first).get("libraries", [])
                calls.extend(record.read_calls(path, f, first_line=2))
            elif _spylog().looks_like(first):
                spylog = _spylog()
                calls.extend(spylog.read_calls(path, _chain(first, f)))
            else:
                raise record.FormatError(path, 1, "neither a pcsc-ebpf-spy recording nor a "
                                         "libpcscspy log")
        except record.FormatError as e:
            return calls, e, libraries
    return calls, None, libraries


def _spylog():
    from . import spylog
    return spylog


def _chain(first: str, rest):
    yield first
    yield from rest


def feed(calls: List[Call], sink) -> None:
    events = []
    for n, call in enumerate(calls):
        events.append((call.call_ts, 0, n, "enter", call))
        if call.ret_ts is not None and call.rv is not None and not call.aborted:
            events.append((call.ret_ts, 1, n, "leave", call))
        elif call.aborted:
            events.append((call.ret_ts or call.call_ts, 1, n, "abort", call))
    events.sort(key=lambda e: e[:3])
    for _, _, _, kind, call in events:
        getattr(sink, kind)(call)
