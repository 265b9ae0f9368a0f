"""What --apdu adds to a call: its command and response APDUs (apdu.py) and
the ATRs it shows (atr.py), decoded, as notes.  A note is a headline, detail
lines and JSON fields: pcsc_text prints the lines after the call's result
line, record.py writes the fields as the call's "decoded" member.

Annotated calls: SCardTransmit (command, response); SCardStatus (pbAtr),
SCardGetStatusChange (the ATR of each reader state, in and out, each
distinct one once), SCardGetAttrib of SCARD_ATTR_ATR_STRING or of the
driver tag TAG_IFD_ATR (pbAttr).
"""
from dataclasses import dataclass, field
from typing import List, Optional

from . import apdu as A
from . import atr as T
from . import constants as K
from .calls import Call


@dataclass
class Note:
    kind: str                 # "command", "response" or "atr"
    head: str
    details: List[str] = field(default_factory=list)
    fields: dict = field(default_factory=dict)


class Annotator:
    """One per output: it remembers the application each card handle
    selected (VERIFY's P2 is named after it).  `smartcard_list`: the
    pcsc-tools list to identify ATRs with (None: the system's)."""

    def __init__(self, smartcard_list: Optional[str] = None):
        self.smartcard_list = smartcard_list
        self.apps = A.Applications()

    def notes(self, call: Call) -> List[Note]:
        """The notes of a returned call (call it once per call: a SELECT
        changes what the next commands are decoded against)."""
        if call.name == "SCardTransmit":
            return self._transmit(call)
        atrs = []   # (where, reader, bytes)
        out = call.exit
        if call.name == "SCardStatus" and out is not None and call.rv == K.SCARD_S_SUCCESS:
            cap, name = out.data.get("pbAtr"), out.data.get("mszReaderName")
            reader = (None if name is None or name.data is None
                      else name.data.split(b"\0", 1)[0].decode("utf-8", "replace"))
            if cap is not None and cap.data:
                atrs.append(("pbAtr", reader, cap.data))
        elif call.name == "SCardGetStatusChange":
            seen = set()
            for where, phase in (("in", call.entry), ("out", out)):
                for r in (phase.readers.get("rgReaderStates") or ()) if phase else ():
                    if 0 < r.cb_atr <= K.MAX_ATR_SIZE and (r.reader, r.atr[:r.cb_atr]) not in seen:
                        seen.add((r.reader, r.atr[:r.cb_atr]))
                        atrs.append(("rgReaderStates " + where, r.reader, r.atr[:r.cb_atr]))
        elif (call.name == "SCardGetAttrib" and out is not None and call.rv == K.SCARD_S_SUCCESS
              and call.args.get("dwAttrId") in (K.SCARD_ATTR_ATR_STRING, K.TAG_IFD_ATR)):
            cap = out.data.get("pbAttr")
            if cap is not None and cap.data:
                atrs.append(("pbAttr", None, cap.data))
        return [self._atr(where, reader, data) for where, reader, data in atrs]

    def to_json(self, call: Call) -> Optional[dict]:
        """The notes as the call's "decoded" JSON member; None if none."""
        notes = self.notes(call)
        if not notes:
            return None
        decoded: dict = {}
        for n in notes:
            fields = dict(n.fields, text=[n.head] + n.details)
            if n.kind == "atr":
                decoded.setdefault("atrs", []).append(fields)
            else:
                decoded[n.kind] = fields
        return decoded

    def _transmit(self, call: Call) -> List[Note]:
        send = call.entry.data.get("pbSendBuffer")
        if send is None or send.data is None:
            return []
        cls = A.class_byte(send.data[0]) if send.data else None
        key = (call.pid, call.args.get("hCard"), cls.channel or 0 if cls else 0)
        head, details, fields = A.describe_command(send.data, self.apps.current(key),
                                                   bool(getattr(send, "masked", ())))
        if send.truncated:
            details.append("only the first %d of %d bytes were captured" % (len(send.data), send.total))
        notes = [Note("command", head, details, fields)]
        recv = call.exit.data.get("pbRecvBuffer") if call.exit is not None else None
        if call.rv == K.SCARD_S_SUCCESS and recv is not None and recv.data is not None:
            if recv.truncated:
                notes.append(Note("response", "R-APDU: %d bytes, not all captured: status word unknown"
                                  % recv.total, [], {"data_length": recv.total - 2}))
            else:
                ins = send.data[1] if len(send.data) > 1 else None
                head, fields = A.describe_response(recv.data, ins)
                notes.append(Note("response", head, [], fields))
                if len(recv.data) >= 2:
                    self.apps.update(key, send.data, (recv.data[-2], recv.data[-1]))
        return notes

    def _atr(self, where: str, reader: Optional[str], data: bytes) -> Note:
        parsed, details = T.describe(data)
        cards, path = T.identify(data, self.smartcard_list)
        if cards is None:
            details.append("card: not identified (cannot read %s: install pcsc-tools, "
                           "or give --smartcard-list)" % path)
        elif not cards:
            details.append("card: not in %s" % path)
        else:
            details.extend("card: " + c for c in cards)
        head = "ATR: %s" % A.hexs(data) + (" (%s)" % reader if reader else "")
        return Note("atr", head, details, {
            "source": where, "reader": reader, "atr": data.hex().upper(),
            "convention": {0x3B: "direct", 0x3F: "inverse"}.get(parsed.ts),
            "protocols": parsed.protocols, "historical": parsed.historical.hex().upper(),
            "tck": parsed.tck, "tck_ok": parsed.tck_ok, "errors": parsed.errors,
            "cards": cards,
        })
