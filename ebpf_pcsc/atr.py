"""ATRs (Answer To Reset, ISO/IEC 7816-3 8.2), decoded, and identified by
name from pcsc-tools' smartcard_list.txt.  Decoding only: the text and JSON
that show it are built elsewhere (annotate.py, pcsc_text.py).

- parse(atr): TS, T0, each group of interface bytes (TA, TB, TC, TD), the
  protocols, the historical bytes, the TCK check;
- describe(atr): the lines --apdu prints under a call that returned an ATR;
- identify(atr, path): the card descriptions smartcard_list.txt gives.  The
  list is read at the first look-up, once per path, never at import.

smartcard_list.txt's format: an ATR line (upper-case hex bytes separated by
spaces, possibly a regular expression: `..` is any byte, `[12]`, `.*`), then
the card's descriptions, one per line, each starting with a tab; comments
start with `#`.  An ATR matches an entry when the whole hex string matches
it, case-insensitively (what pcsc-tools' ATR_analysis does).
"""
import functools
import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

DEFAULT_SMARTCARD_LIST = "/usr/share/pcsc/smartcard_list.txt"

_FI = (372, 372, 558, 744, 1116, 1488, 1860, None, None, 512, 768, 1024, 1536, 2048, None, None)
_FMAX = (4, 5, 6, 8, 12, 16, 20, None, None, 5, 7.5, 10, 15, 20, None, None)
_DI = (None, 1, 2, 4, 8, 16, 32, 64, 12, 20, None, None, None, None, None, None)


def hexs(data: bytes) -> str:
    return " ".join("%02X" % b for b in data)


@dataclass
class Group:
    """Interface bytes group i: TAi, TBi, TCi, TDi (None when absent), and
    the protocol they relate to (that of TD(i-1); None for group 1)."""
    index: int
    protocol: Optional[int]
    ta: Optional[int] = None
    tb: Optional[int] = None
    tc: Optional[int] = None
    td: Optional[int] = None


@dataclass
class Atr:
    raw: bytes
    ts: Optional[int] = None
    t0: Optional[int] = None
    groups: List[Group] = field(default_factory=list)
    historical: bytes = b""
    tck: Optional[int] = None
    tck_ok: Optional[bool] = None      # None: no TCK expected (T=0 only)
    protocols: List[int] = field(default_factory=list)
    errors: List[str] = field(default_factory=list)


def parse(atr: bytes) -> Atr:
    a = Atr(bytes(atr))
    if not atr:
        a.errors.append("empty ATR")
        return a
    a.ts = atr[0]
    if a.ts not in (0x3B, 0x3F):
        a.errors.append("TS %02X is neither 3B (direct) nor 3F (inverse convention)" % a.ts)
    if len(atr) < 2:
        a.errors.append("T0 missing")
        return a
    a.t0 = atr[1]
    y, k, pos, index, protocol = a.t0 >> 4, a.t0 & 0x0F, 2, 1, None
    while True:
        g = Group(index, protocol)
        for bit, name in ((1, "ta"), (2, "tb"), (4, "tc"), (8, "td")):
            if y & bit:
                if pos >= len(atr):
                    a.errors.append("T%s%d missing: the ATR is truncated" % (name[1].upper(), index))
                    a.groups.append(g)
                    return a
                setattr(g, name, atr[pos])
                pos += 1
        a.groups.append(g)
        if g.td is None:
            break
        protocol = g.td & 0x0F
        if protocol not in a.protocols:
            a.protocols.append(protocol)
        y, index = g.td >> 4, index + 1
    if not a.protocols:
        a.protocols.append(0)   # no TD1: T=0 only
    a.historical = atr[pos:pos + k]
    if len(a.historical) < k:
        a.errors.append("%d historical bytes announced, %d present" % (k, len(a.historical)))
        return a
    pos += k
    if any(p != 0 for p in a.protocols):
        if pos >= len(atr):
            a.errors.append("TCK missing")
            return a
        a.tck = atr[pos]
        pos += 1
        check = 0
        for b in atr[1:pos]:
            check ^= b
        a.tck_ok = check == 0
    if pos < len(atr):
        a.errors.append("%d extra bytes after the ATR" % (len(atr) - pos))
    return a


def _ta1(v: int) -> str:
    fi, fmax, di = _FI[v >> 4], _FMAX[v >> 4], _DI[v & 0x0F]
    if fi is None or di is None:
        return "Fi=%s, Di=%s (RFU values)" % (fi or "RFU", di or "RFU")
    return "Fi=%d, Di=%d, %g cycles/ETU, f(max)=%g MHz" % (fi, di, fi / di, fmax)


def _td(g: Group) -> str:
    nxt = g.td >> 4
    present = ["T%s%d" % (n, g.index + 1) for bit, n in ((1, "A"), (2, "B"), (4, "C"), (8, "D"))
               if nxt & bit]
    return "protocol T=%d%s" % (g.td & 0x0F, "; " + ", ".join(present) + " present" if present else "")


def _interface_lines(g: Group) -> List[str]:
    i, lines = g.index, []
    t = g.protocol
    if g.ta is not None:
        if i == 1:
            what = _ta1(g.ta)
        elif i == 2:
            what = "specific mode, T=%d, %s, %s" % (
                g.ta & 0x0F, "cannot change mode" if g.ta & 0x80 else "can change mode",
                "implicit parameters" if g.ta & 0x10 else "parameters from the interface bytes")
        elif t == 1:
            what = "IFSC=%d" % g.ta
        elif t == 15:
            clock = ("not supported", "state L", "state H", "no preference")[g.ta >> 6]
            classes = [c for bit, c in ((1, "A (5 V)"), (2, "B (3 V)"), (4, "C (1.8 V)"))
                       if g.ta & bit]
            what = "clock stop %s, class %s" % (clock, ", ".join(classes) or "none")
        else:
            what = "specific to T=%d" % t
        lines.append("TA%d %02X: %s" % (i, g.ta, what))
    if g.tb is not None:
        if i in (1, 2):
            what = ("VPP not connected (deprecated)" if g.tb == 0 and i == 1
                    else "programming voltage (deprecated)")
        elif t == 1:
            what = "BWI=%d, CWI=%d" % (g.tb >> 4, g.tb & 0x0F)
        elif t == 15:
            what = "SPU %s" % ("not used" if g.tb == 0 else "%02X" % g.tb)
        else:
            what = "specific to T=%d" % t
        lines.append("TB%d %02X: %s" % (i, g.tb, what))
    if g.tc is not None:
        if i == 1:
            what = ("extra guard time N=255: minimum guard time" if g.tc == 255
                    else "extra guard time N=%d" % g.tc)
        elif i == 2:
            what = "work waiting integer WI=%d (T=0)" % g.tc
        elif t == 1:
            what = "error detection: %s" % ("CRC" if g.tc & 1 else "LRC")
        else:
            what = "specific to T=%d" % t
        lines.append("TC%d %02X: %s" % (i, g.tc, what))
    if g.td is not None:
        lines.append("TD%d %02X: %s" % (i, g.td, _td(g)))
    return lines


_COMPACT_TAGS = {0x1: "country code", 0x2: "issuer identification number",
                 0x3: "card service data", 0x4: "initial access data",
                 0x5: "card issuer's data", 0x6: "pre-issuing data", 0x7: "card capabilities",
                 0x8: "status indicator", 0xF: "application identifier"}

# PC/SC part 3: storage and contactless cards behind a PC/SC reader.
_PCSC3_RID = bytes.fromhex("A000000306")
_PCSC3_STANDARDS = {0x01: "ISO 14443 A part 1", 0x02: "ISO 14443 A part 2",
                    0x03: "ISO 14443 A part 3", 0x05: "ISO 14443 B part 1",
                    0x06: "ISO 14443 B part 2", 0x07: "ISO 14443 B part 3",
                    0x09: "ISO 15693 part 1", 0x0A: "ISO 15693 part 2",
                    0x0B: "ISO 15693 part 3", 0x0C: "ISO 15693 part 4",
                    0x11: "FeliCa"}
_PCSC3_CARDS = {0x0001: "MIFARE Classic 1K", 0x0002: "MIFARE Classic 4K",
                0x0003: "MIFARE Ultralight", 0x0026: "MIFARE Mini",
                0x003A: "MIFARE Ultralight C", 0x0036: "MIFARE Plus SL1 2K",
                0x0037: "MIFARE Plus SL1 4K", 0xF004: "Topaz/Jewel",
                0xF011: "FeliCa 212K", 0xF012: "FeliCa 424K"}


def _printable(data: bytes) -> str:
    return "".join(chr(b) if 31 < b < 127 else "." for b in data)


def _historical_lines(h: bytes) -> List[str]:
    if not h:
        return ["historical bytes: none"]
    lines = ["historical bytes: %s  %s" % (hexs(h), _printable(h))]
    if h[:1] == b"\x80" and len(h) >= 13 and h[1] == 0x4F and h[3:8] == _PCSC3_RID:
        standard, name = h[8], int.from_bytes(h[9:11], "big")
        lines.append(" PC/SC part 3 storage card: %s, %s" % (
            _PCSC3_STANDARDS.get(standard, "standard %02X" % standard),
            _PCSC3_CARDS.get(name, "card name %04X" % name)))
        return lines
    category = h[0]
    if category in (0x00, 0x80):
        objects = h[1:-3] if category == 0x00 else h[1:]
        lines.append(" category %02X: compact-TLV data objects%s" % (
            category, " and a status indicator" if category == 0x00 else ""))
        pos = 0
        while pos < len(objects):
            tag, length = objects[pos] >> 4, objects[pos] & 0x0F
            value = objects[pos + 1:pos + 1 + length]
            lines.append("  tag %X (%s): %s" % (tag, _COMPACT_TAGS.get(tag, "unknown"), hexs(value)))
            pos += 1 + length
        if category == 0x00 and len(h) >= 4:
            lines.append("  status indicator: %s" % hexs(h[-3:]))
    elif category == 0x10:
        lines.append(" category 10: DIR data reference %s" % (hexs(h[1:2]) or "missing"))
    elif 0x81 <= category <= 0x8F:
        lines.append(" category %02X: reserved for future use" % category)
    else:
        lines.append(" category %02X: proprietary" % category)
    return lines


def describe(atr: bytes) -> Tuple[Atr, List[str]]:
    """The parsed ATR and its explanation, one line per byte group."""
    a = parse(atr)
    lines = []
    if a.ts is not None:
        lines.append("TS %02X: %s" % (a.ts, {0x3B: "direct convention",
                                               0x3F: "inverse convention"}.get(a.ts, "invalid")))
    if a.t0 is not None:
        nxt = ["T%s1" % n for bit, n in ((1, "A"), (2, "B"), (4, "C"), (8, "D")) if a.t0 >> 4 & bit]
        lines.append("T0 %02X: %d historical bytes%s" % (
            a.t0, a.t0 & 0x0F, "; " + ", ".join(nxt) + " present" if nxt else ""))
    for g in a.groups:
        lines.extend(_interface_lines(g))
    if a.t0 is not None:
        lines.extend(_historical_lines(a.historical))
    if a.tck is not None:
        lines.append("TCK %02X: %s" % (a.tck, "correct" if a.tck_ok else "wrong checksum"))
    if a.protocols and not a.errors[:1] == ["T0 missing"]:
        lines.append("protocols: " + ", ".join("T=%d" % p for p in a.protocols))
    for e in a.errors:
        lines.append("error: " + e)
    return a, lines


# -- smartcard_list.txt ------------------------------------------------------------

_PLAIN = re.compile(r"[0-9A-Fa-f ]*")


@dataclass
class _Entry:
    pattern: str
    descriptions: List[str]
    plain: Optional[str] = None   # the ATR itself, when the pattern has no wildcard
    regex: object = None          # compiled at first use; False: not a valid expression


class SmartcardList:
    """pcsc-tools' smartcard_list.txt, parsed."""

    def __init__(self, path: str, text: str):
        self.path = path
        self.entries: List[_Entry] = []
        current = None
        for line in text.splitlines():
            if line.startswith("#"):
                continue
            if line.startswith("\t"):
                if current is not None:
                    current.descriptions.append(line.strip())
                continue
            line = line.strip()
            if not line:
                current = None
                continue
            plain = " ".join(line.split()).upper() if _PLAIN.fullmatch(line) else None
            current = _Entry(line, [], plain)
            self.entries.append(current)
        self._cache: Dict[bytes, List[str]] = {}

    def identify(self, atr: bytes) -> List[str]:
        """The descriptions of every entry the ATR matches, in file order."""
        atr = bytes(atr)
        if atr in self._cache:
            return list(self._cache[atr])
        text = hexs(atr)
        found = []
        for e in self.entries:
            if e.plain is not None:
                hit = e.plain == text
            else:
                if e.regex is None:
                    try:
                        e.regex = re.compile(e.pattern, re.IGNORECASE)
                    except re.error:
                        e.regex = False
                hit = bool(e.regex) and e.regex.fullmatch(text) is not None
            if hit:
                found.extend(e.descriptions)
        self._cache[atr] = found
        return list(found)


@functools.lru_cache(maxsize=8)
def load_list(path: str) -> Optional[SmartcardList]:
    """The list at path, read once; None if it cannot be read."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return SmartcardList(path, f.read())
    except OSError:
        return None


def identify(atr: bytes, path: Optional[str] = None) -> Tuple[Optional[List[str]], str]:
    """(descriptions, path): None when the list cannot be read, [] when the
    ATR is not in it."""
    path = path or DEFAULT_SMARTCARD_LIST
    cards = load_list(path)
    return (None if cards is None else cards.identify(atr)), path
