"""Command APDUs and status words, decoded (ISO/IEC 7816-4, with the common
GlobalPlatform, PIV, OpenPGP card and EMV instructions).  Decoding only: the
text and JSON that show it are built elsewhere (annotate.py, pcsc_text.py).

- parse_command(apdu): the header, the case (1 to 4), short or extended
  lengths, where the data field is;
- class_byte(cla): logical channel, secure messaging, command chaining;
- instruction(cla, ins): the instruction's name and where it is defined;
- describe_command(apdu, ...) and describe_status(sw1, sw2, ...): the lines
  --apdu prints under an SCardTransmit;
- application(aid): the well-known application an AID names;
- Applications: which application each card handle selected last (VERIFY's
  P2 names a PIV PIN or an OpenPGP password only in its application).
"""
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

ISO = "ISO 7816-4"
GP = "GlobalPlatform"
EMV = "EMV"
PCSC3 = "PC/SC part 3"


def hexs(data: bytes) -> str:
    return " ".join("%02X" % b for b in data)


# -- the command APDU's structure ---------------------------------------------

@dataclass(frozen=True)
class Command:
    """A command APDU's fields.  `case` is 0 when the lengths do not add
    up (`error` says how); the data field is then taken to be everything
    after the Lc field."""
    length: int
    cla: int
    ins: int
    p1: int
    p2: int
    case: int
    extended: bool
    lc: Optional[int]          # Nc: the data field's length (cases 3 and 4)
    le: Optional[int]          # Ne: 00 means 256, 00 00 means 65,536 (cases 2 and 4)
    data_start: int
    data_end: int
    error: Optional[str] = None

    @property
    def data_length(self) -> int:
        return self.data_end - self.data_start

    def data(self, apdu: bytes) -> bytes:
        return apdu[self.data_start:self.data_end]


def parse_command(apdu: bytes) -> Optional[Command]:
    """The fields of a command APDU; None if it is shorter than its 4-byte
    header (ISO/IEC 7816-3 12.1.3 and 7816-4 5.1: cases 1, 2S, 3S, 4S, 2E,
    3E, 4E; an extended Lc is 00 followed by two bytes)."""
    if len(apdu) < 4:
        return None
    cla, ins, p1, p2 = apdu[:4]
    body = apdu[4:]
    n = len(body)

    def cmd(case, extended=False, lc=None, le=None, start=4, end=4, error=None):
        return Command(len(apdu), cla, ins, p1, p2, case, extended, lc, le, start, end, error)

    if n == 0:
        return cmd(1)
    if n == 1:
        return cmd(2, le=body[0] or 256, start=5, end=5)
    if body[0] != 0:
        lc = body[0]
        if n == 1 + lc:
            return cmd(3, lc=lc, start=5, end=5 + lc)
        if n == 2 + lc:
            return cmd(4, lc=lc, le=body[-1] or 256, start=5, end=5 + lc)
        return cmd(0, start=5, end=len(apdu),
                   error="Lc=%d but %d bytes follow it" % (lc, n - 1))
    if n == 3:
        return cmd(2, extended=True, le=int.from_bytes(body[1:3], "big") or 65536,
                   start=7, end=7)
    if n > 3:
        lc = int.from_bytes(body[1:3], "big")
        if lc and n == 3 + lc:
            return cmd(3, extended=True, lc=lc, start=7, end=7 + lc)
        if lc and n == 5 + lc:
            return cmd(4, extended=True, lc=lc,
                       le=int.from_bytes(body[-2:], "big") or 65536, start=7, end=7 + lc)
        return cmd(0, extended=True, start=7, end=len(apdu),
                   error="extended Lc=%d but %d bytes follow it" % (lc, n - 3))
    return cmd(0, start=5, end=len(apdu), error="Lc=0 is not a valid length")


# -- the class byte -----------------------------------------------------------

_SM_FIRST = ("no secure messaging", "proprietary secure messaging",
             "secure messaging, header not authenticated",
             "secure messaging, header authenticated")


@dataclass(frozen=True)
class ClassByte:
    value: int
    kind: str                        # interindustry, proprietary, RFU, invalid
    channel: Optional[int] = None
    secure_messaging: Optional[str] = None
    chaining: bool = False

    def describe(self) -> str:
        if self.kind == "invalid":
            return "not an ISO class (PC/SC part 3: a command for the reader, not the card)"
        if self.kind == "RFU":
            return "reserved for future use (ISO 7816-4)"
        parts = [self.kind if self.kind != "proprietary" or self.channel is None
                 else "proprietary (GlobalPlatform coding)"]
        if self.channel is not None:
            parts.append("logical channel %d" % self.channel)
        if self.secure_messaging is not None:
            parts.append(self.secure_messaging)
        if self.chaining:
            parts.append("command chaining: more commands of the chain follow")
        return ", ".join(parts)


def class_byte(cla: int) -> ClassByte:
    """ISO/IEC 7816-4 5.4.1 (first and further interindustry classes); the
    proprietary classes GlobalPlatform uses code channels and secure
    messaging the same way (GP Card Specification 11.1.4)."""
    if cla == 0xFF:
        return ClassByte(cla, "invalid")
    if cla < 0x20:
        return ClassByte(cla, "interindustry", cla & 0x03, _SM_FIRST[(cla >> 2) & 3],
                         bool(cla & 0x10))
    if cla < 0x40:
        return ClassByte(cla, "RFU")
    if cla < 0x80:
        sm = "secure messaging, header not authenticated" if cla & 0x20 else "no secure messaging"
        return ClassByte(cla, "interindustry", 4 + (cla & 0x0F), sm, bool(cla & 0x10))
    if cla < 0x90:
        return ClassByte(cla, "proprietary", cla & 0x03,
                         "secure messaging" if cla & 0x0C else "no secure messaging")
    if 0xC0 <= cla < 0xD0 or 0xE0 <= cla < 0xF0:
        return ClassByte(cla, "proprietary", 4 + (cla & 0x0F),
                         "secure messaging" if cla & 0x20 else "no secure messaging")
    return ClassByte(cla, "proprietary")


# -- instructions -------------------------------------------------------------

# ISO/IEC 7816-4 (and -7, -8, -9, -11 for the commands they add), in any
# class; odd INS codes carry BER-TLV data.
_ISO_INS = {
    0x04: "DEACTIVATE FILE", 0x0C: "ERASE RECORD(S)", 0x0E: "ERASE BINARY",
    0x0F: "ERASE BINARY", 0x10: "PERFORM SCQL OPERATION", 0x12: "PERFORM TRANSACTION OPERATION",
    0x14: "PERFORM USER OPERATION", 0x20: "VERIFY", 0x21: "VERIFY",
    0x22: "MANAGE SECURITY ENVIRONMENT", 0x23: "MANAGE SECURITY ENVIRONMENT",
    0x24: "CHANGE REFERENCE DATA", 0x25: "CHANGE REFERENCE DATA",
    0x26: "DISABLE VERIFICATION REQUIREMENT", 0x27: "DISABLE VERIFICATION REQUIREMENT",
    0x28: "ENABLE VERIFICATION REQUIREMENT", 0x29: "ENABLE VERIFICATION REQUIREMENT",
    0x2A: "PERFORM SECURITY OPERATION", 0x2B: "PERFORM SECURITY OPERATION",
    0x2C: "RESET RETRY COUNTER", 0x2D: "RESET RETRY COUNTER",
    0x2E: "PERFORM BIOMETRIC OPERATION", 0x2F: "PERFORM BIOMETRIC OPERATION",
    0x44: "ACTIVATE FILE", 0x46: "GENERATE ASYMMETRIC KEY PAIR",
    0x47: "GENERATE ASYMMETRIC KEY PAIR", 0x70: "MANAGE CHANNEL",
    0x82: "EXTERNAL AUTHENTICATE", 0x84: "GET CHALLENGE", 0x86: "GENERAL AUTHENTICATE",
    0x87: "GENERAL AUTHENTICATE", 0x88: "INTERNAL AUTHENTICATE", 0xA0: "SEARCH BINARY",
    0xA1: "SEARCH BINARY", 0xA2: "SEARCH RECORD", 0xA4: "SELECT", 0xA5: "SELECT DATA",
    0xB0: "READ BINARY", 0xB1: "READ BINARY", 0xB2: "READ RECORD(S)", 0xB3: "READ RECORD(S)",
    0xC0: "GET RESPONSE", 0xC2: "ENVELOPE", 0xC3: "ENVELOPE", 0xCA: "GET DATA",
    0xCB: "GET DATA", 0xCC: "GET NEXT DATA", 0xCD: "GET NEXT DATA", 0xD0: "WRITE BINARY",
    0xD1: "WRITE BINARY", 0xD2: "WRITE RECORD", 0xD6: "UPDATE BINARY", 0xD7: "UPDATE BINARY",
    0xDA: "PUT DATA", 0xDB: "PUT DATA", 0xDC: "UPDATE RECORD", 0xDD: "UPDATE RECORD",
    0xE0: "CREATE FILE", 0xE2: "APPEND RECORD", 0xE4: "DELETE FILE", 0xE6: "TERMINATE DF",
    0xE8: "TERMINATE EF", 0xFE: "TERMINATE CARD USAGE",
}

# Proprietary classes (CLA 80 to FE): GlobalPlatform's card management and
# EMV's payment commands; other INS codes keep their ISO names.
_PROPRIETARY_INS = {
    0x50: ("INITIALIZE UPDATE", GP), 0x82: ("EXTERNAL AUTHENTICATE", GP),
    0x78: ("END R-MAC SESSION", GP), 0x7A: ("BEGIN R-MAC SESSION", GP),
    0xCA: ("GET DATA", GP + "/" + EMV), 0xCB: ("GET DATA", GP),
    0xD8: ("PUT KEY", GP), 0xE2: ("STORE DATA", GP), 0xE4: ("DELETE", GP),
    0xE6: ("INSTALL", GP), 0xE8: ("LOAD", GP), 0xF0: ("SET STATUS", GP),
    0xF2: ("GET STATUS", GP),
    0xA8: ("GET PROCESSING OPTIONS", EMV), 0xAE: ("GENERATE APPLICATION CRYPTOGRAM", EMV),
    0x2A: ("COMPUTE CRYPTOGRAPHIC CHECKSUM", EMV), 0x1E: ("APPLICATION BLOCK", EMV),
    0x18: ("APPLICATION UNBLOCK", EMV), 0x16: ("CARD BLOCK", EMV),
    0x24: ("PIN CHANGE/UNBLOCK", EMV),
}

# CLA FF: PC/SC part 3's commands for the reader (contactless and storage cards).
_PCSC3_INS = {
    0xCA: "GET DATA (UID or ATS)", 0x82: "LOAD KEYS", 0x86: "GENERAL AUTHENTICATE",
    0x88: "AUTHENTICATE (obsolete)", 0xB0: "READ BINARY", 0xD6: "UPDATE BINARY",
    0x20: "VERIFY", 0xC2: "MANAGE SESSION / TRANSPARENT EXCHANGE",
}

# The instructions whose data field is a secret (PIN, PUK, password): see redact.py.
SECRET_INS = frozenset((0x20, 0x21, 0x24, 0x25, 0x2C, 0x2D))


def instruction(cla: int, ins: int) -> Tuple[Optional[str], Optional[str]]:
    """(name, where it is defined), or (None, None) for an unknown INS."""
    if cla == 0xFF and ins in _PCSC3_INS:
        return _PCSC3_INS[ins], PCSC3
    if cla >= 0x80 and cla != 0xFF:
        # ISO's names do not hold in a proprietary class.
        return _PROPRIETARY_INS.get(ins, (None, None))
    if ins in _ISO_INS:
        return _ISO_INS[ins], ISO
    return None, None


# -- well-known applications ----------------------------------------------------

@dataclass(frozen=True)
class App:
    aid: bytes
    family: str          # PIV, OpenPGP, EMV, FIDO, GlobalPlatform, ...
    name: str


_APPS = tuple(App(bytes.fromhex(aid), family, name) for aid, family, name in (
    ("A000000308", "PIV", "PIV (NIST SP 800-73)"),
    ("D27600012401", "OpenPGP", "OpenPGP card"),
    ("315041592E5359532E4444463031", "EMV", "EMV payment system environment (1PAY.SYS.DDF01)"),
    ("325041592E5359532E4444463031", "EMV",
     "EMV proximity payment system environment (2PAY.SYS.DDF01)"),
    ("A000000003", "EMV", "Visa (EMV)"),
    ("A0000000031010", "EMV", "Visa credit or debit (EMV)"),
    ("A0000000032010", "EMV", "Visa Electron (EMV)"),
    ("A0000000032020", "EMV", "V PAY (EMV)"),
    ("A0000000038010", "EMV", "Visa Plus (EMV)"),
    ("A000000004", "EMV", "Mastercard (EMV)"),
    ("A0000000041010", "EMV", "Mastercard credit or debit (EMV)"),
    ("A0000000043060", "EMV", "Maestro (EMV)"),
    ("A00000002501", "EMV", "American Express (EMV)"),
    ("A0000001523010", "EMV", "Discover (EMV)"),
    ("A0000000651010", "EMV", "JCB (EMV)"),
    ("A000000333010101", "EMV", "UnionPay debit (EMV)"),
    ("A000000333010102", "EMV", "UnionPay credit (EMV)"),
    ("A0000006472F0001", "FIDO", "FIDO U2F / FIDO2 (CTAP)"),
    ("A000000151000000", "GlobalPlatform", "GlobalPlatform Issuer Security Domain"),
    ("A0000001510000", "GlobalPlatform", "GlobalPlatform Issuer Security Domain"),
    ("A000000003000000", "GlobalPlatform",
     "GlobalPlatform Issuer Security Domain (Open Platform card manager)"),
    ("A0000002471001", "eMRTD", "ICAO electronic passport (eMRTD LDS1)"),
    ("A000000063504B43532D3135", "PKCS15", "PKCS #15"),
    ("A0000005272001", "Yubico", "Yubico OTP"),
    ("A0000005272101", "Yubico", "Yubico OATH"),
    ("A000000527471117", "Yubico", "YubiKey management"),
))
_APPS_LONGEST_FIRST = tuple(sorted(_APPS, key=lambda a: -len(a.aid)))


def application(aid: bytes) -> Optional[App]:
    """The well-known application whose AID is the longest prefix of aid
    (a SELECT may carry a longer AID, with a version)."""
    for app in _APPS_LONGEST_FIRST:
        if aid.startswith(app.aid):
            return app
    return None


def _partial_application(aid: bytes) -> Optional[App]:
    """A SELECT by a truncated AID (partial DF name, ISO 7816-4 5.3.1.1)."""
    if len(aid) >= 5:
        for app in _APPS:
            if app.aid.startswith(aid):
                return app
    return None


class Applications:
    """The application each card handle and logical channel selected last
    (a successful SELECT by DF name); keys are (pid, hCard, channel)."""

    def __init__(self):
        self._selected: Dict[tuple, Optional[App]] = {}

    def current(self, key: tuple) -> Optional[App]:
        return self._selected.get(key)

    def update(self, key: tuple, apdu: bytes, sw: Optional[Tuple[int, int]]) -> None:
        cmd = parse_command(apdu)
        if (cmd is None or cmd.ins != 0xA4 or cmd.p1 != 0x04 or cmd.cla >= 0x80
                or sw is None or not (sw == (0x90, 0x00) or sw[0] == 0x61)):
            return
        aid = cmd.data(apdu)
        self._selected[key] = application(aid) or _partial_application(aid)


# -- P1, P2 and data, per instruction -------------------------------------------

_PIV_KEYS = {0x9A: "PIV Authentication key", 0x9B: "PIV Card Application Administration key",
             0x9C: "Digital Signature key", 0x9D: "Key Management key",
             0x9E: "Card Authentication key"}
_PIV_KEYS.update({0x81 + n: "retired Key Management key %d" % n for n in range(1, 21)})
_PIV_ALGORITHMS = {0x00: "3DES", 0x03: "3DES", 0x08: "AES-128", 0x0A: "AES-192",
                   0x0C: "AES-256", 0x06: "RSA 1024", 0x07: "RSA 2048", 0x05: "RSA 3072",
                   0x16: "RSA 4096", 0x11: "ECC P-256", 0x14: "ECC P-384"}
_PIV_REFERENCES = {0x00: "global PIN", 0x80: "PIV Card Application PIN",
                   0x81: "PIN Unblocking Key (PUK)", 0x96: "primary finger OCC",
                   0x97: "secondary finger OCC", 0x98: "pairing code"}
_OPENPGP_REFERENCES = {0x81: "PW1 (signing)", 0x82: "PW1 (decryption, authentication)",
                       0x83: "PW3 (admin)"}
_EMV_REFERENCES = {0x80: "plaintext offline PIN", 0x88: "enciphered offline PIN"}
_REFERENCES = {"PIV": _PIV_REFERENCES, "OpenPGP": _OPENPGP_REFERENCES, "EMV": _EMV_REFERENCES}

_PIV_OBJECTS = {
    "5FC107": "Card Capability Container", "5FC102": "Card Holder Unique Identifier (CHUID)",
    "5FC105": "X.509 certificate for PIV Authentication (9A)",
    "5FC10A": "X.509 certificate for Digital Signature (9C)",
    "5FC10B": "X.509 certificate for Key Management (9D)",
    "5FC101": "X.509 certificate for Card Authentication (9E)",
    "5FC103": "cardholder fingerprints", "5FC106": "Security Object",
    "5FC108": "cardholder facial image", "5FC109": "printed information",
    "5FC10C": "key history object", "7E": "discovery object",
}
_DATA_TAGS = {
    0x004F: "application identifier (OpenPGP)", 0x005E: "login data (OpenPGP)",
    0x0065: "cardholder related data (OpenPGP)", 0x006E: "application related data (OpenPGP)",
    0x007A: "security support template (OpenPGP)", 0x00C4: "PW status bytes (OpenPGP)",
    0x5F50: "URL (OpenPGP)", 0x5F52: "historical bytes (OpenPGP)",
    0x7F21: "cardholder certificate (OpenPGP)", 0x7F74: "general feature management (OpenPGP)",
    0x7F66: "extended length information (OpenPGP)",
    0x0101: "private use 1 (OpenPGP)", 0x0102: "private use 2 (OpenPGP)",
    0x0103: "private use 3 (OpenPGP)", 0x0104: "private use 4 (OpenPGP)",
    0x9F7F: "card production life cycle (CPLC)", 0x0066: "card data (GlobalPlatform)",
    0x00E0: "key information template (GlobalPlatform)",
    0x00CF: "key diversification data (GlobalPlatform)",
    0x0042: "issuer identification number (GlobalPlatform)",
    0x0045: "card image number (GlobalPlatform)",
    0x9F36: "application transaction counter (EMV)",
    0x9F13: "last online ATC register (EMV)", 0x9F17: "PIN try counter (EMV)",
    0x9F4F: "log format (EMV)",
}
_PSO = {0x9E9A: "compute digital signature", 0x8086: "decipher", 0x8680: "encipher",
        0x00A8: "verify digital signature", 0x00A2: "verify cryptographic checksum",
        0x8E80: "compute cryptographic checksum", 0x00BE: "verify certificate"}
_SELECT_P1 = {0x00: "select MF, DF or EF by file identifier", 0x01: "select child DF",
              0x02: "select EF under the current DF", 0x03: "select the parent DF",
              0x04: "select by DF name (AID)", 0x08: "select by path from the MF",
              0x09: "select by path from the current DF"}
_SELECT_OCCURRENCE = ("first or only occurrence", "last occurrence", "next occurrence",
                      "previous occurrence")
_SELECT_ANSWER = ("return FCI", "return FCP", "return FMD", "no response data")
_RECORD_P2 = {0: "first record", 1: "last record", 2: "next record", 3: "previous record",
              4: "record number P1", 5: "records from P1 to the last",
              6: "records from the last to P1"}


def _reference(p2: int, app: Optional[App]) -> str:
    qualifier = "specific" if p2 & 0x80 else "global"
    text = "%s reference data %d" % (qualifier, p2 & 0x1F)
    name = _REFERENCES.get(app.family, {}).get(p2) if app is not None else None
    return text + (" = %s (%s)" % (name, app.family) if name else "")


def _tag_name(tag: int) -> str:
    name = _DATA_TAGS.get(tag)
    return "tag %04X" % tag + (" = " + name if name else "")


def _piv_object(data: bytes) -> Optional[str]:
    """The tag list 5C of PIV's GET DATA / PUT DATA."""
    if len(data) >= 2 and data[0] == 0x5C and 1 <= data[1] <= 3 and len(data) >= 2 + data[1]:
        tag = data[2:2 + data[1]].hex().upper()
        name = _PIV_OBJECTS.get(tag)
        return "object %s%s" % (tag, " = " + name if name else "")
    return None


def _parameters(cmd: Command, apdu: bytes, app: Optional[App], masked: bool) -> List[str]:
    """What P1, P2 and the data field say, for the instructions known here."""
    ins, p1, p2, data = cmd.ins, cmd.p1, cmd.p2, cmd.data(apdu)
    p = "P1 %02X, P2 %02X" % (p1, p2)
    proprietary = cmd.cla >= 0x80 and cmd.cla != 0xFF
    if ins == 0xA4 and not proprietary:
        lines = ["P1 %02X: %s; P2 %02X: %s, %s" % (
            p1, _SELECT_P1.get(p1, "unknown selection"), p2, _SELECT_OCCURRENCE[p2 & 3],
            _SELECT_ANSWER[(p2 >> 2) & 3])]
        if p1 == 0x04 and data:
            found = application(data)
            partial = None if found else _partial_application(data)
            name = (found.name if found else "partial AID of " + partial.name if partial
                    else "unknown application")
            lines.append("AID %s: %s" % (hexs(data), name))
        elif p1 in (0x00, 0x01, 0x02) and len(data) == 2:
            fid = data.hex().upper()
            lines.append("file %s%s" % (fid, " (MF)" if fid == "3F00" else ""))
        elif p1 in (0x08, 0x09) and data:
            lines.append("path %s" % " ".join(data[i:i + 2].hex().upper()
                                              for i in range(0, len(data), 2)))
        elif p1 == 0x00 and not data:
            lines.append("no data: select the MF")
        return lines
    if ins in (0x20, 0x21, 0x24, 0x25, 0x2C, 0x2D, 0x26, 0x28) and not (proprietary and ins == 0x24):
        lines = []
        if ins in (0x20, 0x21):
            what = ("reset the verification status" if p1 == 0xFF else "")
        elif ins in (0x24, 0x25):
            what = {0x00: "old and new reference data", 0x01: "new reference data only"}.get(p1, "")
        elif ins in (0x2C, 0x2D):
            what = {0x00: "resetting code and new reference data", 0x01: "resetting code only",
                    0x02: "new reference data only", 0x03: "no data"}.get(p1, "")
        else:
            what = ""
        lines.append("%s: %s%s" % (p, _reference(p2, app), "; " + what if what else ""))
        if ins in (0x20, 0x21) and cmd.case in (1, 2) and p1 != 0xFF:
            lines.append("no data: asks whether the reference data is verified (tries left)")
        elif cmd.data_length:
            lines.append("data: %d bytes (reference data)%s" % (
                cmd.data_length, ", masked by --redact" if masked else ""))
        return lines
    if ins in (0xB0, 0xD6, 0xD0, 0x0E) and not proprietary:
        if p1 & 0x80:
            return ["%s: short EF identifier %d, offset %d" % (p, p1 & 0x1F, p2)]
        return ["%s: offset %d" % (p, (p1 << 8) | p2)]
    if ins in (0xB2, 0xDC, 0xD2) and not proprietary:
        sfi = p2 >> 3
        where = "current EF" if sfi == 0 else "short EF identifier %d" % sfi
        return ["P1 %02X: record %d; P2 %02X: %s, %s" % (
            p1, p1, p2, where, _RECORD_P2.get(p2 & 7, "RFU"))]
    if ins in (0xCA, 0xDA):
        return ["%s: %s" % (p, _tag_name((p1 << 8) | p2))]
    if ins in (0xCB, 0xDB) and not proprietary:
        lines = ["%s: %s" % (p, "current DF" if (p1, p2) == (0x3F, 0xFF)
                             else "file %02X%02X" % (p1, p2))]
        obj = _piv_object(data)
        if obj:
            lines.append(obj + (" (PIV)" if app is None or app.family == "PIV" else ""))
        return lines
    if ins in (0x86, 0x87) and not proprietary:
        return ["P1 %02X: algorithm %s; P2 %02X: key %s" % (
            p1, _PIV_ALGORITHMS.get(p1, "%02X" % p1), p2, _PIV_KEYS.get(p2, "%02X" % p2))]
    if ins in (0x46, 0x47) and not proprietary:
        if app is not None and app.family == "OpenPGP" or p1 in (0x80, 0x81):
            what = {0x80: "generate a key pair", 0x81: "read the public key"}.get(p1, "")
            return ["%s%s" % (p, ": " + what if what else "")]
        return ["%s: key %s" % (p, _PIV_KEYS.get(p2, "%02X" % p2))]
    if ins in (0x2A, 0x2B) and not proprietary:
        what = _PSO.get((p1 << 8) | p2)
        return ["%s%s" % (p, ": " + what if what else "")]
    if ins in (0x22, 0x23) and not proprietary:
        function = {1: "SET", 2: "STORE", 3: "RESTORE", 4: "ERASE"}.get(p1 & 0x0F, "")
        crt = {0xA4: "authentication (AT)", 0xAA: "hash (HT)", 0xB4: "cryptographic checksum (CCT)",
               0xB6: "digital signature (DST)", 0xB8: "confidentiality (CT)"}.get(p2, "")
        return ["%s%s" % (p, ": " + ", ".join(x for x in (function, crt) if x)
                          if function or crt else "")]
    if ins == 0x70 and not proprietary:
        what = "open" if p1 == 0x00 else "close" if p1 == 0x80 else "?"
        return ["%s: %s logical channel %s" % (p, what, p2 if p2 else "(assigned by the card)")]
    if proprietary:
        if ins == 0xE6:
            bits = [name for bit, name in ((0x02, "for load"), (0x04, "install"),
                                           (0x08, "make selectable"), (0x10, "extradition"),
                                           (0x20, "registry update"), (0x40, "personalization"))
                    if p1 & bit]
            return ["%s: %s" % (p, ", ".join(bits) or "?")]
        if ins == 0xF2:
            what = {0x80: "Issuer Security Domain", 0x40: "applications and security domains",
                    0x20: "executable load files",
                    0x10: "executable load files and their modules"}.get(p1, "?")
            return ["%s: %s, %s" % (p, what, "next occurrence" if p2 & 1 else "first occurrence")]
        if ins == 0x50:
            return ["%s: key version %d, key identifier %d" % (p, p1, p2)]
        if ins == 0x82 and cmd.cla & 0x04:
            level = {0x00: "no secure messaging", 0x01: "C-MAC", 0x03: "C-DECRYPTION and C-MAC",
                     0x11: "C-MAC and R-MAC", 0x13: "C-DECRYPTION, C-MAC and R-MAC",
                     0x33: "C-DECRYPTION, R-ENCRYPTION, C-MAC and R-MAC"}.get(p1, "?")
            return ["%s: security level %s" % (p, level)]
        if ins == 0xE2:
            return ["%s: %s, block %d" % (p, "last block" if p1 & 0x80 else "more blocks follow", p2)]
        if ins == 0xAE:
            kind = ("AAC", "TC", "ARQC", "RFU")[p1 >> 6]
            return ["%s: %s requested%s" % (p, kind, ", CDA" if p1 & 0x10 else "")]
    return [p]


def describe_command(apdu: bytes, app: Optional[App] = None,
                     masked: bool = False) -> Tuple[str, List[str], dict]:
    """(headline, detail lines, JSON fields) for a command APDU.  `app`: the
    application the card handle selected before; `masked`: its data field was
    masked by --redact."""
    cmd = parse_command(apdu)
    if cmd is None:
        return ("C-APDU: %d bytes, shorter than a command header" % len(apdu), [],
                {"error": "shorter than 4 bytes", "length": len(apdu)})
    name, source = instruction(cmd.cla, cmd.ins)
    cls = class_byte(cmd.cla)
    if cmd.ins & 0xF0 in (0x60, 0x90):
        what = "INS %02X: invalid (6X and 9X are status bytes)" % cmd.ins
    elif name:
        what = "%s (%s)" % (name, source)
    elif cls.kind == "proprietary":
        what = "INS %02X: proprietary instruction" % cmd.ins
    else:
        what = "INS %02X: unknown instruction" % cmd.ins
    if cmd.case:
        shape = "case %d%s" % (cmd.case, " extended" if cmd.extended else " short"
                               if cmd.case > 1 else "")
        lengths = [x for x in ("Lc=%d" % cmd.lc if cmd.lc is not None else "",
                               "Le=%d" % cmd.le if cmd.le is not None else "") if x]
        if lengths:
            shape += ": " + ", ".join(lengths)
    else:
        shape = "malformed: " + cmd.error
    head = "C-APDU: %s, %s" % (what, shape)
    details = ["CLA %02X: %s" % (cmd.cla, cls.describe())]
    details += _parameters(cmd, apdu, app, masked)
    fields = {
        "cla": cmd.cla, "ins": cmd.ins, "p1": cmd.p1, "p2": cmd.p2,
        "name": name, "source": source, "class": cls.kind, "channel": cls.channel,
        "secure_messaging": cls.secure_messaging, "chaining": cls.chaining,
        "case": cmd.case or None, "extended": cmd.extended, "lc": cmd.lc, "le": cmd.le,
        "data_length": cmd.data_length, "error": cmd.error,
    }
    if cmd.ins == 0xA4 and cmd.p1 == 0x04 and cmd.cla < 0x80:
        found = application(cmd.data(apdu))
        fields["application"] = found.name if found else None
    elif app is not None:
        fields["application"] = app.name
    if masked:
        fields["masked"] = True
    return head, details, fields


# -- status words ---------------------------------------------------------------

_SW = {
    0x9000: ("success", "success"),
    0x6200: ("warning", "no information given (state unchanged)"),
    0x6281: ("warning", "part of the returned data may be corrupted"),
    0x6282: ("warning", "end of file or record reached before reading Ne bytes"),
    0x6283: ("warning", "selected file deactivated"),
    0x6284: ("warning", "file control information not formatted according to ISO 7816-4"),
    0x6285: ("warning", "selected file in termination state"),
    0x6286: ("warning", "no input data available from a sensor on the card"),
    0x6287: ("warning", "at least one of the referenced records is deactivated"),
    0x6300: ("warning", "no information given (state changed; often: verification failed)"),
    0x6381: ("warning", "file filled up by the last write"),
    0x6400: ("error", "execution error (state unchanged)"),
    0x6401: ("error", "immediate response required by the card"),
    0x6500: ("error", "execution error (state changed)"),
    0x6581: ("error", "memory failure"),
    0x6600: ("error", "security-related issue"),
    0x6700: ("error", "wrong length"),
    0x6800: ("error", "function in CLA not supported"),
    0x6881: ("error", "logical channel not supported"),
    0x6882: ("error", "secure messaging not supported"),
    0x6883: ("error", "last command of the chain expected"),
    0x6884: ("error", "command chaining not supported"),
    0x6900: ("error", "command not allowed"),
    0x6981: ("error", "command incompatible with file structure"),
    0x6982: ("error", "security status not satisfied"),
    0x6983: ("error", "authentication method blocked"),
    0x6984: ("error", "reference data not usable"),
    0x6985: ("error", "conditions of use not satisfied"),
    0x6986: ("error", "command not allowed (no current EF)"),
    0x6987: ("error", "expected secure messaging data objects missing"),
    0x6988: ("error", "incorrect secure messaging data objects"),
    0x6A00: ("error", "wrong parameters P1-P2"),
    0x6A80: ("error", "incorrect parameters in the command data field"),
    0x6A81: ("error", "function not supported"),
    0x6A82: ("error", "file or application not found"),
    0x6A83: ("error", "record not found"),
    0x6A84: ("error", "not enough memory space in the file"),
    0x6A85: ("error", "Nc inconsistent with TLV structure"),
    0x6A86: ("error", "incorrect parameters P1-P2"),
    0x6A87: ("error", "Nc inconsistent with parameters P1-P2"),
    0x6A88: ("error", "referenced data or reference data not found"),
    0x6A89: ("error", "file already exists"),
    0x6A8A: ("error", "DF name already exists"),
    0x6B00: ("error", "wrong parameters P1-P2 (offset outside the EF)"),
    0x6D00: ("error", "instruction code not supported or invalid"),
    0x6E00: ("error", "class not supported"),
    0x6F00: ("error", "no precise diagnosis"),
}


@dataclass(frozen=True)
class Status:
    sw1: int
    sw2: int
    category: str        # success, warning, error, proprietary, invalid
    meaning: str

    @property
    def text(self) -> str:
        return "SW %02X %02X: %s" % (self.sw1, self.sw2, self.meaning)


def _tries(x: int) -> str:
    return "%d %s left" % (x, "try" if x == 1 else "tries")


def describe_status(sw1: int, sw2: int, ins: Optional[int] = None) -> Status:
    """A status word's ISO/IEC 7816-4 meaning (5.1.3).  `ins`: the command
    it answers (63CX is a retry counter for VERIFY and its kin)."""
    sw = (sw1 << 8) | sw2
    if sw in _SW:
        category, meaning = _SW[sw]
        return Status(sw1, sw2, category, meaning)
    if sw1 == 0x61:
        more = "256 or more" if sw2 == 0 else str(sw2)
        return Status(sw1, sw2, "success",
                      "success, %s more bytes available (GET RESPONSE with Le=%02X)" % (more, sw2))
    if sw1 == 0x6C:
        return Status(sw1, sw2, "error",
                      "wrong Le: %d bytes available (resend with Le=%02X)" % (sw2 or 256, sw2))
    if sw1 == 0x63 and sw2 & 0xF0 == 0xC0:
        x = sw2 & 0x0F
        if ins is None or ins in SECRET_INS or ins in (0x26, 0x28, 0x82, 0x88):
            return Status(sw1, sw2, "warning", "verification failed, " + _tries(x))
        return Status(sw1, sw2, "warning", "counter is %d" % x)
    if sw1 == 0x62 and 0x02 <= sw2 <= 0x80:
        return Status(sw1, sw2, "warning", "triggering by the card (%d bytes to query)" % sw2)
    if sw1 == 0x64 and 0x02 <= sw2 <= 0x80:
        return Status(sw1, sw2, "error", "triggering by the card (%d bytes to query)" % sw2)
    names = {0x62: ("warning", "warning, state unchanged"), 0x63: ("warning", "warning, state changed"),
             0x64: ("error", "execution error, state unchanged"),
             0x65: ("error", "execution error, state changed"),
             0x66: ("error", "security-related issue"), 0x67: ("error", "wrong length"),
             0x68: ("error", "function in CLA not supported"),
             0x69: ("error", "command not allowed"), 0x6A: ("error", "wrong parameters P1-P2")}
    if sw1 in names:
        category, meaning = names[sw1]
        return Status(sw1, sw2, category, meaning + " (qualifier %02X not in ISO 7816-4)" % sw2)
    if sw1 & 0xF0 == 0x90:
        return Status(sw1, sw2, "proprietary", "proprietary status (not defined by ISO 7816-4)")
    return Status(sw1, sw2, "invalid", "not an ISO 7816-4 status word")


def describe_response(resp: bytes, ins: Optional[int] = None) -> Tuple[str, dict]:
    """(headline, JSON fields) for a response APDU: data length and status."""
    if len(resp) < 2:
        return ("R-APDU: %d bytes, shorter than a status word" % len(resp),
                {"error": "shorter than 2 bytes", "length": len(resp)})
    st = describe_status(resp[-2], resp[-1], ins)
    data = len(resp) - 2
    head = "R-APDU: " + ("%d data bytes, " % data if data else "") + st.text
    return head, {"sw": "%02X%02X" % (st.sw1, st.sw2), "category": st.category,
                  "meaning": st.meaning, "data_length": data}
