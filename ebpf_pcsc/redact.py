"""--redact: the secrets of a trace (PINs, PUKs, passwords) masked before any
output sees the call.  docs/apdu-and-redaction.md says exactly which bytes.

- SCardTransmit's command APDU, when its INS is VERIFY (20/21), CHANGE
  REFERENCE DATA (24/25) or RESET RETRY COUNTER (2C/2D): its data field
  (the bytes after Lc, up to Le).  If the lengths do not add up, every byte
  after the Lc field.
- SCardControl's send buffer for FEATURE_VERIFY_PIN_START/_DIRECT and
  FEATURE_MODIFY_PIN_START/_DIRECT (PC/SC v2 part 10 PIN_VERIFY_STRUCTURE and
  PIN_MODIFY_STRUCTURE): the data field of the APDU template at their end.

Each masked byte becomes MASK (0x2A, '*'); lengths and all other bytes stay.
The masked ranges are kept with the buffer (Masked.masked), so a recording
says which bytes were masked.

Redactor wraps the session's sink: it masks a call in place when the call
starts (its inputs are complete then), before the statistics, the text, the
JSON writers or a recording see it.
"""
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from . import constants as K
from .apdu import SECRET_INS, parse_command
from .calls import Call, Captured

MASK = 0x2A   # '*': hexdumps show 2A 2A ..., their ASCII column ****

Range = Tuple[int, int]   # (offset, length)


@dataclass
class Masked(Captured):
    """A captured buffer some of whose bytes were masked."""
    masked: Tuple[Range, ...] = ()


def mask(data: bytes, ranges) -> bytes:
    out = bytearray(data)
    for offset, length in ranges:
        end = min(offset + length, len(out))
        out[offset:end] = bytes([MASK]) * max(0, end - offset)
    return bytes(out)


def _data_field(apdu: bytes, base: int = 0) -> List[Range]:
    """The data field of a command APDU (after Lc, before Le); if the
    lengths do not add up, everything after the Lc field."""
    cmd = parse_command(apdu)
    if cmd is None or not cmd.data_length:
        return []
    return [(base + cmd.data_start, cmd.data_length)]


def apdu_secrets(apdu: bytes) -> List[Range]:
    """The ranges of a command APDU that hold a secret: the data field of
    VERIFY, CHANGE REFERENCE DATA and RESET RETRY COUNTER (any class, even
    and odd INS)."""
    if len(apdu) < 4 or apdu[1] not in SECRET_INS:
        return []
    return _data_field(apdu)


# PC/SC v2 part 10: where the APDU template starts in each structure.
_VERIFY_APDU_OFFSET = 19     # PIN_VERIFY_STRUCTURE.abData
_MODIFY_APDU_OFFSET = 24     # PIN_MODIFY_STRUCTURE.abData
PIN_FEATURES = {
    "FEATURE_VERIFY_PIN_START": _VERIFY_APDU_OFFSET,
    "FEATURE_VERIFY_PIN_DIRECT": _VERIFY_APDU_OFFSET,
    "FEATURE_MODIFY_PIN_START": _MODIFY_APDU_OFFSET,
    "FEATURE_MODIFY_PIN_DIRECT": _MODIFY_APDU_OFFSET,
}
_FEATURE_TAGS = {tag: name for tag, name in K.FEATURES.items() if name in PIN_FEATURES}
# libccid's control codes (SCARD_CTL_CODE(0x330000 + feature)): used when the
# application asked for the features before the tracer started.
DEFAULT_PIN_CODES = {K.scard_ctl_code(K.CCID_CLASS2_IOCTL_MAGIC + tag): name
                     for tag, name in _FEATURE_TAGS.items()
                     if name.endswith("_DIRECT")}


def pin_structure_secrets(feature: str, buf: bytes) -> List[Range]:
    """The ranges of a PIN_VERIFY/PIN_MODIFY structure that are masked: the
    APDU template's data field (ulDataLength gives the template's length)."""
    offset = PIN_FEATURES.get(feature)
    if offset is None or len(buf) <= offset:
        return []
    length = int.from_bytes(buf[offset - 4:offset], "little")
    template = buf[offset:offset + length] if 0 < length <= len(buf) - offset else buf[offset:]
    return _data_field(template, offset)


def features_from_answer(recv: bytes) -> Dict[int, str]:
    """CM_IOCTL_GET_FEATURE_REQUEST's answer: control code -> PIN feature."""
    codes = {}
    while len(recv) >= 2:
        tag, length = recv[0], recv[1]
        value = recv[2:2 + length]
        if tag in _FEATURE_TAGS and len(value) == 4:
            codes[int.from_bytes(value, "big")] = _FEATURE_TAGS[tag]
        recv = recv[2 + length:]
    return codes


def _masked(cap: Optional[Captured], ranges: List[Range]) -> Optional[Captured]:
    if cap is None or cap.data is None or not ranges:
        return None
    if set(ranges) <= set(getattr(cap, "masked", ())):
        return None   # already masked
    return Masked(mask(cap.data, ranges), cap.flags, cap.total,
                  tuple(sorted(set(ranges) | set(getattr(cap, "masked", ())))))


class Redactor:
    """A sink that masks each call's secrets, then hands it to `sink`."""

    def __init__(self, sink):
        self.sink = sink
        self._codes: Dict[int, Dict[int, str]] = {}   # pid -> control code -> feature

    def redact(self, call: Call) -> None:
        """Mask the call's secrets in place (its entry phase)."""
        send = call.entry.data.get("pbSendBuffer")
        if send is None or send.data is None:
            return
        if call.name == "SCardTransmit":
            ranges = apdu_secrets(send.data)
        elif call.name == "SCardControl":
            code = call.args.get("dwControlCode")
            feature = self._codes.get(call.pid, {}).get(code) or DEFAULT_PIN_CODES.get(code)
            ranges = pin_structure_secrets(feature, send.data) if feature else []
        else:
            return
        masked = _masked(send, ranges)
        if masked is not None:
            call.entry.data["pbSendBuffer"] = masked

    def learn(self, call: Call) -> None:
        """The control codes a reader gives its PIN features."""
        if (call.name == "SCardControl" and call.rv == K.SCARD_S_SUCCESS
                and call.args.get("dwControlCode") == K.CM_IOCTL_GET_FEATURE_REQUEST
                and call.exit is not None):
            recv = call.exit.data.get("pbRecvBuffer")
            if recv is not None and recv.data:
                self._codes.setdefault(call.pid, {}).update(features_from_answer(recv.data))

    # -- the sink interface (calls.Assembler, replay.feed) --
    def enter(self, call: Call) -> None:
        self.redact(call)
        self.sink.enter(call)

    def leave(self, call: Call) -> None:
        self.redact(call)   # idempotent; a call may be left without being entered
        self.learn(call)
        self.sink.leave(call)

    def abort(self, call: Call) -> None:
        self.redact(call)
        self.sink.abort(call)

    def unfinished(self, call: Call) -> None:
        self.redact(call)
        if hasattr(self.sink, "unfinished"):
            self.sink.unfinished(call)

    def flush(self) -> None:
        if hasattr(self.sink, "flush"):
            self.sink.flush()
