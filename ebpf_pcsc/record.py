"""Recordings: calls as JSON Lines, lossless (`-w FILE`, `--json`), and back
(`-r FILE`).  The schema is documented in docs/recording-format.md.

Line 1 is a header object ("type": "header"); then one object per call
("type": "call"), written when the call returns (or dies with its thread,
or is still running when tracing ends).  Replaying a file gives the same
Call objects the live trace had, so every renderer shows it as it was shown
live.
"""
import json
import os
import platform
import time
from typing import IO, Iterator, List, Optional

from . import __version__
from . import constants as K
from .calls import Call, Captured, Phase, ReaderState
from .errors import SpyError
from .functions import BY_NAME
from . import layout as L

FORMAT = "pcsc-ebpf-spy/1"


def header(libraries: List[str]) -> dict:
    return {
        "type": "header",
        "format": FORMAT,
        "tool": "pcsc-ebpf-spy",
        "version": __version__,
        "kernel": platform.release(),
        "libraries": libraries,
        "start_time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "start_ns": time.monotonic_ns(),
    }


def _captured(cap: Captured) -> dict:
    d = {"hex": None if cap.data is None else cap.data.hex().upper(),
         "total": cap.total, "null": cap.is_null, "fault": cap.fault,
         "truncated": cap.truncated}
    masked = getattr(cap, "masked", ())   # --redact (redact.Masked)
    if masked:
        d["redacted"] = [[offset, length] for offset, length in masked]
    return d


def _reader(r: ReaderState) -> dict:
    return {"reader": r.reader, "current_state": r.current_state,
            "event_state": r.event_state, "cb_atr": r.cb_atr, "atr": r.atr.hex().upper(),
            "name_captured": r.name_captured}


def _phase(p: Optional[Phase]) -> Optional[dict]:
    if p is None:
        return None
    return {"words": dict(p.words),
            "data": {k: _captured(v) for k, v in p.data.items()},
            "readers": {k: None if v is None else [_reader(r) for r in v]
                        for k, v in p.readers.items()}}


def call_to_json(call: Call) -> dict:
    return {
        "type": "call",
        "pid": call.pid, "tid": call.tid, "comm": call.comm,
        "function": call.name,
        "args": dict(call.args),
        "entry": _phase(call.entry),
        "exit": _phase(call.exit),
        "rv": call.rv,
        "result": None if call.rv is None else K.rv_name(call.rv),
        "entry_ns": call.call_ts,
        "return_ns": call.ret_ts,
        "entry_seq": call.entry_seq,
        "return_seq": call.return_seq,
        "aborted": call.aborted,
    }


def _captured_from(d: dict) -> Captured:
    flags = ((L.PCSC_DATA_NULL if d.get("null") else 0)
             | (L.PCSC_DATA_FAULT if d.get("fault") else 0)
             | (L.PCSC_DATA_TRUNCATED if d.get("truncated") else 0))
    data = None if d["hex"] is None else bytes.fromhex(d["hex"])
    if d.get("redacted"):
        from .redact import Masked
        return Masked(data, flags, d["total"], tuple((o, n) for o, n in d["redacted"]))
    return Captured(data, flags, d["total"])


def _phase_from(d: Optional[dict]) -> Optional[Phase]:
    if d is None:
        return None
    readers = {}
    for k, v in d.get("readers", {}).items():
        readers[k] = None if v is None else [
            ReaderState(r["reader"], r["current_state"], r["event_state"], r["cb_atr"],
                        bytes.fromhex(r["atr"]), r.get("name_captured", True)) for r in v]
    return Phase(words=dict(d.get("words", {})),
                 data={k: _captured_from(v) for k, v in d.get("data", {}).items()},
                 readers=readers)


def call_from_json(d: dict) -> Call:
    fn = BY_NAME[d["function"]]
    return Call(fn, d["pid"], d["tid"], d["comm"], d["entry_ns"],
                {name: d["args"][name] for name in fn.args},
                _phase_from(d["entry"]), _phase_from(d["exit"]), d["rv"],
                d["return_ns"], d.get("aborted", False),
                d.get("entry_seq"), d.get("return_seq"))


class JsonWriter:
    """A sink writing one line per finished call, flushed at once: a killed
    tracer loses at most the calls in flight."""

    def __init__(self, stream: IO[str], annotator=None):
        self.stream = stream
        self.annotator = annotator   # --apdu: an annotate.Annotator

    def _call(self, call: Call) -> None:
        obj = call_to_json(call)
        if self.annotator is not None:
            decoded = self.annotator.to_json(call)
            if decoded:
                obj["decoded"] = decoded   # informative: -r does not read it
        self.write(obj)

    def write(self, obj: dict) -> None:
        self.stream.write(json.dumps(obj, separators=(",", ":")) + "\n")
        self.stream.flush()

    def enter(self, call: Call) -> None:
        pass

    def leave(self, call: Call) -> None:
        self._call(call)

    def abort(self, call: Call) -> None:
        self._call(call)

    def unfinished(self, call: Call) -> None:
        """A call still running when tracing ends."""
        self._call(call)


def open_private(path: str) -> IO[str]:
    """Create (or truncate) path readable by its owner only: a recording can
    hold PINs and keys."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        os.fchmod(fd, 0o600)  # an existing file keeps its mode otherwise
    except OSError as e:
        raise SpyError("cannot write %s (%s)" % (path, e.strerror), "check the path")
    return os.fdopen(fd, "w", encoding="utf-8")


def is_header(line: str) -> bool:
    return line.startswith("{") and '"type":"header"' in line.replace(" ", "")


def parse_header(path: str, line: str) -> dict:
    try:
        obj = json.loads(line)
    except ValueError:
        raise FormatError(path, 1, "unreadable header")
    if obj.get("format") != FORMAT:
        raise FormatError(path, 1, "unknown format %r (this is %s)" % (obj.get("format"), FORMAT))
    return obj


class FormatError(SpyError):
    """A recording that is not one, truncated or corrupt."""

    def __init__(self, path: str, line: int, what: str,
                 fix: str = "the file is truncated or corrupt; the calls before it were shown"):
        super().__init__("%s, line %d: %s" % (path, line, what), fix)


def read_calls(path: str, lines: Iterator[str], first_line: int = 1) -> Iterator[Call]:
    """The calls of a JSON Lines recording, whose header was already read."""
    for number, line in enumerate(lines, first_line):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            if obj.get("type") != "call":
                raise ValueError("not a call object")
            call = call_from_json(obj)
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            what = "unfinished line" if not line.endswith("\n") else "not a recorded call (%s)" % e
            raise FormatError(path, number, what)
        yield call
