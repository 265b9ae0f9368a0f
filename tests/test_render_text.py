"""pcsc-spy's text (ebpf_pcsc.pcsc_text) from recorded events and synthetic
calls.  No BPF, no pcscd.

The expected lines are written out here.  They were derived from pcsc-spy
1.9.9 (/usr/bin/pcsc-spy reading what libpcscspy logs for the same client
scenario, -d: handles and times masked), with the differences this tracer
makes on purpose:

- `-d` also masks the values that change from run to run which pcsc-spy
  prints: SCardConnect's phCard and SCardFreeMemory's pvMem;
- SCardControl is named SCardControl (pcsc-spy 1.9.9 prints "SCarControl")
  and SCardCancel's handle is labelled hContext (pcsc-spy: "hCard");
- a buffer a failed call returns is not read (stale memory): " NULL" where
  libpcscspy dumps whatever the buffer holds.
"""
import re

import pytest

from ebpf_pcsc import layout as L
from ebpf_pcsc import pcsc_text as T
from ebpf_pcsc.calls import Assembler, Call, Captured, Phase, ReaderState
from ebpf_pcsc.functions import BY_NAME, FUNCTIONS
from record_events import read_records, records_path
from rendering import TextOutput, render_calls

BLUE, GREEN, MAGENTA, RED, NORMAL = "\x1b[34m", "\x1b[32m", "\x1b[35m", "\x1b[01;31m", "\x1b[0m"


def render_records(records, summary=False, **options):
    """The text of recorded events, assembled into calls as the session does."""
    output = TextOutput(**options)
    assembler = Assembler(FUNCTIONS, output)
    for raw in records:
        assembler.feed(raw)
    return output.printed(summary)


def render(name, **options):
    return render_records(read_records(records_path(name)), **options)


def make_call(fname, args=None, entry=None, exit=None, rv=0, pid=1000, tid=1000,
              comm="app", call_ts=10 ** 9, duration_ns=1000):
    fn = BY_NAME[fname]
    full = dict.fromkeys(fn.args, 0)
    full.update(args or {})
    return Call(fn, pid, tid, comm, call_ts, full, entry or Phase(), exit or Phase(),
                rv=rv, ret_ts=call_ts + duration_ns)


def blocks(text):
    """The trace split into calls: a block starts at a function name line
    (one thread, no indentation)."""
    out = []
    for line in text.splitlines():
        if not line.startswith(" "):
            out.append([])
        out[-1].append(line)
    return ["\n".join(b) + "\n" for b in out]


def spy_hexdump(prefix, data):
    """pcsc-spy's hexdump(), as log_buffer prints it (an independent
    rewrite for the long buffers)."""
    lines = []
    for off in range(0, len(data), 16):
        chunk = data[off:off + 16]
        hexes = " ".join("%02X" % b for b in chunk) + "   " * (16 - len(chunk))
        text = "".join(chr(b) if 31 < b < 127 else "." for b in chunk)
        lines.append("%s %04X %s %s" % (prefix, off, hexes, text))
    return "\n".join(lines)


def echo_apdu(n, mul):
    return bytes([0x80, 0x10, 0, 0, 0, n >> 8, n & 0xFF]) + bytes((i * mul) & 0xFF for i in range(n))


# -- the `all` scenario: every function, pcsc-spy -d ---------------------------

EXPECTED_ALL = """\
SCardEstablishContext
 i dwScope: SCARD_SCOPE_SYSTEM (0x00000002)
 o hContext: 0x????
 => Command successful. (SCARD_S_SUCCESS [0x00000000])  [??.??]
SCardIsValidContext
 i hContext: 0x????
 => Command successful. (SCARD_S_SUCCESS [0x00000000])  [??.??]
SCardListReaderGroups
 i hContext: 0x????
 i pcchGroups: 0xFFFFFFFFFFFFFFFF (18446744073709551615)
 o pcchGroups: 0x00000016
 o mszGroups: SCard$DefaultReaders
 o mszGroups: 
 => Command successful. (SCARD_S_SUCCESS [0x00000000])  [??.??]
SCardFreeMemory
 i hContext: 0x????
 i pvMem: 0x????
 => Command successful. (SCARD_S_SUCCESS [0x00000000])  [??.??]
SCardListReaders
 i hContext: 0x????
 i mszGroups: (null)
 o pcchReaders: 0x00000025
 o mszReaders: NULL
 => Command successful. (SCARD_S_SUCCESS [0x00000000])  [??.??]
SCardListReaders
 i hContext: 0x????
 i mszGroups: (null)
 o pcchReaders: 0x00000025
 o mszReaders: Virtual PCD 00 00
 o mszReaders: Virtual PCD 00 01
 o mszReaders: 
 => Command successful. (SCARD_S_SUCCESS [0x00000000])  [??.??]
SCardListReaders
 i hContext: 0x????
 i mszGroups: (null)
 o pcchReaders: 0x00000025
 o mszReaders: Virtual PCD 00 00
 o mszReaders: Virtual PCD 00 01
 o mszReaders: 
 => Command successful. (SCARD_S_SUCCESS [0x00000000])  [??.??]
SCardFreeMemory
 i hContext: 0x????
 i pvMem: 0x????
 => Command successful. (SCARD_S_SUCCESS [0x00000000])  [??.??]
SCardGetStatusChange
 i hContext: 0x????
 i dwTimeout: 0x00000000 (0)
 i cReaders: 1
 i szReader: Virtual PCD 00 00
 i  dwCurrentState:  (0x00000000)
 i  dwEventState:  (0x00000000)
 i  Atr length: 0x00000000 (0)
 i  Atr: 
 o szReader: Virtual PCD 00 00
 o  dwCurrentState:  (0x00000000)
 o  dwEventState: SCARD_STATE_CHANGED, SCARD_STATE_PRESENT (0x00010022)
 o  Atr length: 0x00000005 (5)
 o  Atr: 3B 80 80 01 01
 => Command successful. (SCARD_S_SUCCESS [0x00000000])  [??.??]
SCardConnect
 i hContext: 0x????
 i szReader Virtual PCD 00 00
 i dwShareMode: SCARD_SHARE_SHARED (0x00000002)
 i dwPreferredProtocols: 0x00000003 (T=0, T=1)
 i phCard 0x????
 i pdwActiveProtocol 0x00000000 (0)
 o phCard 0x????
 o dwActiveProtocol: T=1 (0x00000002)
 => Command successful. (SCARD_S_SUCCESS [0x00000000])  [??.??]
SCardStatus
 i hCard: 0x????
 i pcchReaderLen 0x00000100 (256)
 i pcbAtrLen 0x00000021 (33)
 o cchReaderLen 0x00000012 (18)
 o mszReaderName Virtual PCD 00 00
 o dwState 0x00010034 (65588)
 o dwProtocol 0x00000002 (2)
 o bAtrLen 0x00000005 (5)
 o bAtr 3B 80 80 01 01
 => Command successful. (SCARD_S_SUCCESS [0x00000000])  [??.??]
SCardStatus
 i hCard: 0x????
 i pcchReaderLen 0xFFFFFFFFFFFFFFFF (18446744073709551615)
 i pcbAtrLen 0xFFFFFFFFFFFFFFFF (18446744073709551615)
 o cchReaderLen 0x00000012 (18)
 o mszReaderName Virtual PCD 00 00
 o dwState 0x00010034 (65588)
 o dwProtocol 0x00000002 (2)
 o bAtrLen 0x00000005 (5)
 o bAtr 3B 80 80 01 01
 => Command successful. (SCARD_S_SUCCESS [0x00000000])  [??.??]
SCardFreeMemory
 i hContext: 0x????
 i pvMem: 0x????
 => Command successful. (SCARD_S_SUCCESS [0x00000000])  [??.??]
SCardFreeMemory
 i hContext: 0x????
 i pvMem: 0x????
 => Command successful. (SCARD_S_SUCCESS [0x00000000])  [??.??]
SCardBeginTransaction
 i hCard: 0x????
 => Command successful. (SCARD_S_SUCCESS [0x00000000])  [??.??]
SCardTransmit
 i hCard: 0x????
 i pioSendPci.dwProtocol: 0x????
 i pioSendPci.cbPciLength: 0x????
 i bSendLength 0x0000000C (12)
 i bSendBuffer
 i  0000 00 A4 04 00 07 A0 00 00 03 08 00 00             ............
 o pioRecvPci.dwProtocol: 0x????
 o pioRecvPci.cbPciLength: 0x????
 o bRecvLength 0x00000002 (2)
 o bRecvBuffer
 o  0000 90 00                                           ..
 => Command successful. (SCARD_S_SUCCESS [0x00000000])  [??.??]
SCardTransmit
 i hCard: 0x????
 i pioSendPci.dwProtocol: 0x????
 i pioSendPci.cbPciLength: 0x????
 i bSendLength 0x00000005 (5)
 i bSendBuffer
 i  0000 00 84 00 00 08                                  .....
 o pioRecvPci.dwProtocol: 0x????
 o pioRecvPci.cbPciLength: 0x????
 o bRecvLength 0x0000000A (10)
 o bRecvBuffer
 o  0000 00 01 02 03 04 05 06 07 90 00                   ..........
 => Command successful. (SCARD_S_SUCCESS [0x00000000])  [??.??]
SCardTransmit
 i hCard: 0x????
 i pioSendPci.dwProtocol: 0x????
 i pioSendPci.cbPciLength: 0x????
 i bSendLength 0x00001007 (4103)
 i bSendBuffer
 <ECHO SEND>
 o pioRecvPci.dwProtocol: 0x????
 o pioRecvPci.cbPciLength: 0x????
 o bRecvLength 0x00001002 (4098)
 o bRecvBuffer
 <ECHO RECV>
 => Command successful. (SCARD_S_SUCCESS [0x00000000])  [??.??]
SCardEndTransaction
 i hCard: 0x????
 i dwDisposition: SCARD_LEAVE_CARD (0x00000000)
 => Command successful. (SCARD_S_SUCCESS [0x00000000])  [??.??]
SCardGetAttrib
 i hCard: 0x????
 i dwAttrId: SCARD_ATTR_ATR_STRING (0x00090303)
 o bAttrLen 0x00000021 (33)
 o bAttr
 o  NULL
 => Feature not supported. (SCARD_E_UNSUPPORTED_FEATURE [0x8010001F])  [??.??]
SCardGetAttrib
 i hCard: 0x????
 i dwAttrId: SCARD_ATTR_VENDOR_NAME (0x00010100)
 o bAttrLen 0x00000108 (264)
 o bAttr
 o  NULL
 => Feature not supported. (SCARD_E_UNSUPPORTED_FEATURE [0x8010001F])  [??.??]
SCardSetAttrib
 i hCard: 0x????
 i dwAttrId: SCARD_ATTR_DEVICE_FRIENDLY_NAME_A (0x7FFF0003)
 i bAttrLen 0x00000004 (4)
 i bAttr
 i  0000 41 42 43 44                                     ABCD
 => Transaction failed. (SCARD_E_NOT_TRANSACTED [0x80100016])  [??.??]
SCardControl
 i hCard: 0x????
 i dwControlCode: CM_IOCTL_GET_FEATURE_REQUEST (0x42000D48)
 i bSendLength 0x00000000 (0)
 i bSendBuffer
 i  NULL
 o bRecvLength 0x00000000 (0)
 o bRecvBuffer
 => Feature not supported. (SCARD_E_UNSUPPORTED_FEATURE [0x8010001F])  [??.??]
SCardReconnect
 i hCard: 0x????
 i dwShareMode: SCARD_SHARE_SHARED (0x00000002)
 i dwPreferredProtocols: 0x00000003 (T=0, T=1)
 i dwInitialization 0x00000001 (1)
 o dwActiveProtocol: T=1 (0x00000002)
 => Command successful. (SCARD_S_SUCCESS [0x00000000])  [??.??]
SCardDisconnect
 i hCard: 0x????
 i dwDisposition: SCARD_LEAVE_CARD (0x00000000)
 => Command successful. (SCARD_S_SUCCESS [0x00000000])  [??.??]
SCardCancel
 i hContext: 0x????
 => Command successful. (SCARD_S_SUCCESS [0x00000000])  [??.??]
SCardReleaseContext
 i hContext: 0x????
 => Command successful. (SCARD_S_SUCCESS [0x00000000])  [??.??]
"""

# Failed calls that return no byte: pcsc-spy prints the buffer's label and
# no line (libpcscspy logs an empty dump), there is no stale memory to hide.


def expected_all_blocks():
    apdu = echo_apdu(4096, 1)
    text = EXPECTED_ALL.replace(" <ECHO SEND>", spy_hexdump(" i ", apdu))
    text = text.replace(" <ECHO RECV>", spy_hexdump(" o ", apdu[7:] + b"\x90\x00"))
    return blocks(text)


def _all_params():
    params = []
    for i, block in enumerate(blocks(EXPECTED_ALL)):
        name = block.split("\n", 1)[0]
        params.append(pytest.param(i, id="%02d-%s" % (i, name)))
    return params


@pytest.fixture(scope="module")
def all_diffable():
    return blocks(render("all", diffable=True))


def test_all_has_every_function():
    names = [b.split("\n", 1)[0] for b in blocks(EXPECTED_ALL)]
    assert set(names) == set(BY_NAME)


def test_all_call_count(all_diffable):
    assert len(all_diffable) == len(expected_all_blocks()) == 27


@pytest.mark.parametrize("index", _all_params())
def test_all_each_call(all_diffable, index):
    assert all_diffable[index] == expected_all_blocks()[index]


def test_all_extended_echo_explicit_lines(all_diffable):
    echo = all_diffable[17].splitlines()
    assert echo[0] == "SCardTransmit"
    assert echo[4:7] == [
        " i bSendLength 0x00001007 (4103)",
        " i bSendBuffer",
        " i  0000 80 10 00 00 00 10 00 00 01 02 03 04 05 06 07 08 ................"]
    assert " i  0020 19 1A 1B 1C 1D 1E 1F 20 21 22 23 24 25 26 27 28 ....... !\"#$%&'(" in echo
    assert " i  1000 F9 FA FB FC FD FE FF                            ......." in echo
    assert " o  0A70 70 71 72 73 74 75 76 77 78 79 7A 7B 7C 7D 7E 7F pqrstuvwxyz{|}~." in echo
    assert echo[-2] == " o  1000 90 00                                           .."
    assert len(echo) == 1 + 5 + 257 + 4 + 257 + 1


# -- other scenarios --------------------------------------------------------------

def test_attrs():
    assert blocks(render("attrs", diffable=True))[3:8] == blocks("""\
SCardGetAttrib
 i hCard: 0x????
 i dwAttrId: UNKNOWN (0x00000303)
 o bAttrLen 0x00000005 (5)
 o bAttr
 o  NULL
 => Command successful. (SCARD_S_SUCCESS [0x00000000])  [??.??]
SCardGetAttrib
 i hCard: 0x????
 i dwAttrId: UNKNOWN (0x00000303)
 o bAttrLen 0x00000005 (5)
 o bAttr
 o  0000 3B 80 80 01 01                                  ;....
 => Command successful. (SCARD_S_SUCCESS [0x00000000])  [??.??]
SCardGetAttrib
 i hCard: 0x????
 i dwAttrId: UNKNOWN (0x00000303)
 o bAttrLen 0x00000005 (5)
 o bAttr
 o  0000 3B 80 80 01 01                                  ;....
 => Command successful. (SCARD_S_SUCCESS [0x00000000])  [??.??]
SCardFreeMemory
 i hContext: 0x????
 i pvMem: 0x????
 => Command successful. (SCARD_S_SUCCESS [0x00000000])  [??.??]
SCardGetAttrib
 i hCard: 0x????
 i dwAttrId: UNKNOWN (0x00000303)
 o bAttrLen 0x00000005 (5)
 o bAttr
 o  NULL
 => Insufficient buffer. (SCARD_E_INSUFFICIENT_BUFFER [0x80100008])  [??.??]
""")


def test_errors():
    got = blocks(render("errors", diffable=True))
    assert len(got) == 13
    assert got[1:3] + got[4:5] + got[7:8] + got[9:10] + got[12:] == blocks("""\
SCardIsValidContext
 i hContext: 0x????
 => Invalid handle. (SCARD_E_INVALID_HANDLE [0x80100003])  [??.??]
SCardConnect
 i hContext: 0x????
 i szReader No Such Reader
 i dwShareMode: SCARD_SHARE_SHARED (0x00000002)
 i dwPreferredProtocols: 0x00000003 (T=0, T=1)
 i phCard 0x????
 i pdwActiveProtocol 0x00000000 (0)
 o phCard 0x????
 o dwActiveProtocol: UNKNOWN (0x00000000)
 => Unknown reader specified. (SCARD_E_UNKNOWN_READER [0x80100009])  [??.??]
SCardListReaders
 i hContext: 0x????
 i mszGroups: (null)
 o pcchReaders: 0x00000025
 o mszReaders: NULL
 => Insufficient buffer. (SCARD_E_INSUFFICIENT_BUFFER [0x80100008])  [??.??]
SCardStatus
 i hCard: 0x????
 i pcchReaderLen 0x00000002 (2)
 i pcbAtrLen 0x00000021 (33)
 o cchReaderLen 0x00000012 (18)
 o mszReaderName NULL
 o dwState 0x00010034 (65588)
 o dwProtocol 0x00000002 (2)
 o bAtrLen 0x00000005 (5)
 o bAtr NULL
 => Insufficient buffer. (SCARD_E_INSUFFICIENT_BUFFER [0x80100008])  [??.??]
SCardDisconnect
 i hCard: 0x????
 i dwDisposition: SCARD_LEAVE_CARD (0x00000000)
 => Invalid handle. (SCARD_E_INVALID_HANDLE [0x80100003])  [??.??]
SCardReleaseContext
 i hContext: 0x????
 => Invalid handle. (SCARD_E_INVALID_HANDLE [0x80100003])  [??.??]
""")
    assert got[8] == """\
SCardTransmit
 i hCard: 0x????
 i pioSendPci.dwProtocol: 0x????
 i pioSendPci.cbPciLength: 0x????
 i bSendLength 0x00000005 (5)
 i bSendBuffer
 i  0000 00 84 00 00 08                                  .....
 o pioRecvPci.dwProtocol: 0x????
 o pioRecvPci.cbPciLength: 0x????
 o bRecvLength 0x0000000A (10)
 o bRecvBuffer
 o  NULL
 => Insufficient buffer. (SCARD_E_INSUFFICIENT_BUFFER [0x80100008])  [??.??]
"""


def test_failed_call_returning_no_byte():
    """SCardTransmit on a bogus handle: pcsc-lite sets *pcbRecvLength to 0;
    pcsc-spy shows the (empty) buffer's label only."""
    got = blocks(render("errors", diffable=True))[3]
    assert got.endswith("""\
 o bRecvLength 0x00000000 (0)
 o bRecvBuffer
 => Invalid handle. (SCARD_E_INVALID_HANDLE [0x80100003])  [??.??]
""")


def test_nullargs():
    got = blocks(render("nullargs", diffable=True))
    assert got[1] + "".join(got[4:7]) == """\
SCardListReaders
 i hContext: 0x????
 i mszGroups: (null)
 o pcchReaders: NULL
 o mszReaders: NULL
 => Invalid parameter given. (SCARD_E_INVALID_PARAMETER [0x80100004])  [??.??]
SCardStatus
 i hCard: 0x????
 i pcchReaderLen NULL
 i pcbAtrLen NULL
 o cchReaderLen NULL
 o mszReaderName ""
 o dwState NULL
 o dwProtocol NULL
 o bAtrLen NULL
 o bAtr
 => Command successful. (SCARD_S_SUCCESS [0x00000000])  [??.??]
SCardGetStatusChange
 i hContext: 0x????
 i dwTimeout: 0x00000000 (0)
 i cReaders: 0
 => Command successful. (SCARD_S_SUCCESS [0x00000000])  [??.??]
SCardFreeMemory
 i hContext: 0x????
 i pvMem: (nil)
 => Command successful. (SCARD_S_SUCCESS [0x00000000])  [??.??]
"""
    # FreeMemory(NULL) is printf's "%p" of NULL; -d leaves a NULL visible
    free = blocks(render("nullargs"))[6].splitlines()
    assert free[2] == " i pvMem: (nil)"


def test_nullrecvpci():
    transmit = blocks(render("nullrecvpci"))[3].splitlines()
    assert transmit[7:12] == [
        " o pioRecvPci.dwProtocol: NULL",
        " o pioRecvPci.cbPciLength: NULL",
        " o bRecvLength 0x00000002 (2)",
        " o bRecvBuffer",
        " o  0000 90 00                                           .."]


def test_blocked_second_thread_indented():
    """The blocked SCardGetStatusChange (2nd thread: 4 spaces) prints its
    inputs when it starts, before SCardCancel, its outputs when it returns."""
    lines = render("blocked", diffable=True).splitlines()
    second = [l for l in lines if l.startswith("    ")]
    assert second == """\
    SCardGetStatusChange
     i hContext: 0x????
     i dwTimeout: 0xFFFFFFFF (4294967295)
     i cReaders: 1
     i szReader: Virtual PCD 00 00
     i  dwCurrentState: SCARD_STATE_PRESENT (0x00000020)
     i  dwEventState:  (0x00000000)
     i  Atr length: 0x00000000 (0)
     i  Atr: 
     o szReader: Virtual PCD 00 00
     o  dwCurrentState: SCARD_STATE_PRESENT (0x00000020)
     o  dwEventState: SCARD_STATE_PRESENT (0x00010020)
     o  Atr length: 0x00000005 (5)
     o  Atr: 3B 80 80 01 01
     => Command cancelled. (SCARD_E_CANCELLED [0x80100002])  [??.??]""".split("\n")
    cancel = lines.index("SCardCancel")
    assert lines.index("     i  Atr: ") < cancel < lines.index("     o szReader: Virtual PCD 00 00")
    first = [l for l in lines if not l.startswith("    ")]
    assert [l for l in first if not l.startswith(" ")] == [
        "SCardEstablishContext", "SCardListReaders", "SCardGetStatusChange", "SCardCancel",
        "SCardReleaseContext"]
    assert first[first.index("SCardCancel"):] == [
        "SCardCancel",
        " i hContext: 0x????",
        " => Command successful. (SCARD_S_SUCCESS [0x00000000])  [??.??]",
        "SCardReleaseContext",
        " i hContext: 0x????",
        " => Command successful. (SCARD_S_SUCCESS [0x00000000])  [??.??]"]


# -- threads, -t -------------------------------------------------------------------

def call_in_all(name, n=0):
    """The expected text of the n-th call to name in the `all` scenario."""
    return [b for b in blocks(EXPECTED_ALL) if b.startswith(name + "\n")][n]


# threads_2_3's threads make calls of the `all` scenario, which print the same:
# the main thread lists the readers, each worker sends GET CHALLENGE three times.
MAIN = (call_in_all("SCardEstablishContext") + call_in_all("SCardListReaders", 1)
        + call_in_all("SCardReleaseContext"))
WORKER = (call_in_all("SCardEstablishContext") + call_in_all("SCardConnect")
          + call_in_all("SCardTransmit", 1) * 3
          + call_in_all("SCardDisconnect") + call_in_all("SCardReleaseContext"))


def _per_thread(text, prefixes):
    """Each line to the thread whose prefix starts it (longest first)."""
    threads = {p: [] for p in prefixes}
    for line in text.splitlines():
        p = max((p for p in prefixes if line.startswith(p)), key=len)
        threads[p].append(line[len(p):])
    return {p: "".join(l + "\n" for l in lines) for p, lines in threads.items()}


@pytest.mark.parametrize("show_thread, prefixes", [
    (False, ["", "    ", "        "]),
    (True, [" (t0) ", "     (t1) ", "         (t2) "]),
], ids=["indent", "thread-prefix"])
def test_threads(show_thread, prefixes):
    """4 spaces per thread number; -t adds " (tN) " after them, as pcsc-spy -t."""
    text = render("threads_2_3", diffable=True, show_thread=show_thread)
    assert all(any(l.startswith(p) for p in prefixes) for l in text.splitlines())
    assert _per_thread(text, prefixes) == dict(zip(prefixes, [MAIN, WORKER, WORKER]))
    main = prefixes[0]
    assert text.splitlines()[:2] == [main + "SCardEstablishContext",
                                     main + " i dwScope: SCARD_SCOPE_SYSTEM (0x00000002)"]
    assert ("(t" in text) == show_thread


# -- colours -----------------------------------------------------------------------

def test_colours():
    """pcsc-spy's escapes: blue name, green " i " lines, magenta " o "
    lines, the result red on error only (its time uncoloured)."""
    got = render("errors", diffable=True, color=True).splitlines()
    assert got[:7] == [
        BLUE + "SCardEstablishContext" + NORMAL,
        GREEN + " i dwScope: SCARD_SCOPE_SYSTEM (0x00000002)" + NORMAL,
        MAGENTA + " o hContext: 0x????" + NORMAL,
        " => Command successful. (SCARD_S_SUCCESS [0x00000000])  [??.??]",
        BLUE + "SCardIsValidContext" + NORMAL,
        GREEN + " i hContext: 0x????" + NORMAL,
        RED + " => Invalid handle. (SCARD_E_INVALID_HANDLE [0x80100003]) " + NORMAL + " [??.??]"]
    # hexdump lines are " i " lines
    assert GREEN + " i  0000 00 84 00 00 08                                  ....." + NORMAL in got


def test_colours_with_thread_indent():
    got = render("blocked", diffable=True, color=True, show_thread=True).splitlines()
    assert "     (t1) " + BLUE + "SCardGetStatusChange" + NORMAL in got
    assert "     (t1) " + GREEN + " i cReaders: 1" + NORMAL in got
    assert "     (t1) " + MAGENTA + " o  Atr: 3B 80 80 01 01" + NORMAL in got
    assert "     (t1) " + RED + " => Command cancelled. (SCARD_E_CANCELLED [0x80100002]) " \
        + NORMAL + " [??.??]" in got


def test_no_colour_escape_without_colour():
    assert "\x1b" not in render("errors")


# -- pcsc-lite 2.2's result line ------------------------------------------------------

def test_result_dialect_2_2():
    got = render("errors", diffable=True, result_dialect="2.2").splitlines()
    assert got[3] == " => SCARD_S_SUCCESS [0x00000000]  [??.??]"
    assert got[6] == " => SCARD_E_INVALID_HANDLE [0x80100003]  [??.??]"
    coloured = render("errors", diffable=True, color=True, result_dialect="2.2").splitlines()
    assert coloured[6] == RED + " => SCARD_E_INVALID_HANDLE [0x80100003] " + NORMAL + " [??.??]"


def test_result_of_an_unknown_code():
    c = make_call("SCardIsValidContext", {"hContext": 1}, rv=0x80100022)
    assert render_calls([c], diffable=True).splitlines()[-1] == \
        " => Unknown error: 0x80100022 (UNKNOWN [0x80100022])  [??.??]"
    assert render_calls([c], diffable=True, result_dialect="2.2").splitlines()[-1] == \
        " => UNKNOWN [0x80100022]  [??.??]"


# -- values without -d: the same calls as pcsc-spy -n printed them ----------------------

def test_without_diffable_like_pcsc_spy():
    ctx, card = 0x11BF4148, 0x4109EEEE
    calls = [
        make_call("SCardEstablishContext", {"dwScope": 2, "phContext": 0x7ffc0010},
                  exit=Phase(words={"phContext": ctx}), duration_ns=374_999),
        make_call("SCardFreeMemory", {"hContext": ctx, "pvMem": 0x556156535520},
                  duration_ns=11_000),
        make_call("SCardConnect", {"hContext": ctx, "dwShareMode": 2, "dwPreferredProtocols": 3},
                  entry=Phase(words={"phCard": 0, "pdwActiveProtocol": 0},
                              data={"szReader": Captured(b"Virtual PCD 00 00", 0, 17)}),
                  exit=Phase(words={"phCard": card, "pdwActiveProtocol": 2}),
                  duration_ns=1_000_113_000),
        make_call("SCardTransmit", {"hCard": card, "cbSendLength": 5},
                  entry=Phase(words={"pioSendPci.dwProtocol": 2, "pioSendPci.cbPciLength": 16},
                              data={"pbSendBuffer": Captured(bytes.fromhex("0084000008"), 0, 5)}),
                  exit=Phase(words={"pioRecvPci.dwProtocol": 1, "pioRecvPci.cbPciLength": 16,
                                    "pcbRecvLength": 10},
                             data={"pbRecvBuffer": Captured(bytes(range(8)) + b"\x90\x00", 0, 10)}),
                  duration_ns=259_000),
        make_call("SCardCancel", {"hContext": ctx}, duration_ns=9_000),
    ]
    assert render_calls(calls) == """\
SCardEstablishContext
 i dwScope: SCARD_SCOPE_SYSTEM (0x00000002)
 o hContext: 0x11BF4148
 => Command successful. (SCARD_S_SUCCESS [0x00000000])  [0.000374]
SCardFreeMemory
 i hContext: 0x11BF4148
 i pvMem: 0x556156535520 (93876548490528)
 => Command successful. (SCARD_S_SUCCESS [0x00000000])  [0.000011]
SCardConnect
 i hContext: 0x11BF4148
 i szReader Virtual PCD 00 00
 i dwShareMode: SCARD_SHARE_SHARED (0x00000002)
 i dwPreferredProtocols: 0x00000003 (T=0, T=1)
 i phCard 0x00000000 (0)
 i pdwActiveProtocol 0x00000000 (0)
 o phCard 0x4109EEEE (1091170030)
 o dwActiveProtocol: T=1 (0x00000002)
 => Command successful. (SCARD_S_SUCCESS [0x00000000])  [1.000113]
SCardTransmit
 i hCard: 0x4109EEEE
 i pioSendPci.dwProtocol: 0x00000002
 i pioSendPci.cbPciLength: 0x00000010
 i bSendLength 0x00000005 (5)
 i bSendBuffer
 i  0000 00 84 00 00 08                                  .....
 o pioRecvPci.dwProtocol: 0x00000001
 o pioRecvPci.cbPciLength: 0x00000010
 o bRecvLength 0x0000000A (10)
 o bRecvBuffer
 o  0000 00 01 02 03 04 05 06 07 90 00                   ..........
 => Command successful. (SCARD_S_SUCCESS [0x00000000])  [0.000259]
SCardCancel
 i hContext: 0x11BF4148
 => Command successful. (SCARD_S_SUCCESS [0x00000000])  [0.000009]
"""


def test_recorded_values_without_diffable():
    """Without -d, the recorded handles are printed: the context
    EstablishContext returned is the one every later call passes."""
    text = render("all")
    handle = re.search(r"^ o hContext: (0x[0-9A-F]{8})$", text, re.M).group(1)
    assert text.count(" i hContext: %s\n" % handle) == 13
    card = re.search(r"^ o phCard (0x[0-9A-F]{8}) \(\d+\)$", text, re.M).group(1)
    assert text.count(" i hCard: %s\n" % card) == 13
    assert "0x????" not in text and "[??.??]" not in text
    assert len(re.findall(r"^ => .*\)  \[\d+\.\d{6}\]$", text, re.M)) == 27
    assert text.count(" i pioSendPci.dwProtocol: 0x00000002\n") == 3
    assert text.count(" o pioRecvPci.cbPciLength: 0x00000010\n") == 3
    assert len(re.findall(r"^ i pvMem: 0x[0-9a-f]+ \(\d+\)$", text, re.M)) == 4


# -- several processes ------------------------------------------------------------------

def test_several_processes():
    """A second process's threads are announced, and indented as further
    threads; the first process's output is unchanged."""
    first = read_records(records_path("nullrecvpci"))
    second = read_records(records_path("attrs"))
    pid1 = L.Head.from_buffer_copy(first[0][:48]).pid
    pid2 = L.Head.from_buffer_copy(second[0][:48]).pid
    assert pid1 != pid2
    alone = render_records(first, diffable=False)
    text = render_records(first + second, diffable=False, summary=True)
    assert text.startswith(alone.split("\nThread 1/1")[0])
    rest = text[len(alone.split("\nThread 1/1")[0]):].splitlines()
    assert rest[:3] == ["    [pid %d tid %d pcsc_client]" % (pid2, pid2),
                         "    SCardEstablishContext",
                         "     i dwScope: SCARD_SCOPE_SYSTEM (0x00000002)"]
    assert "Thread 1/2 (pid %d tid %d pcsc_client)" % (pid1, pid1) in rest
    assert "Thread 2/2 (pid %d tid %d pcsc_client)" % (pid2, pid2) in rest
    with_t = render_records(first + second, diffable=True, show_thread=True).splitlines()
    # -d masks the ids, which change from run to run (golden traces).
    assert "     (t1) [pid ? tid ? pcsc_client]" in with_t
    assert not any("pid %d" % pid2 in line for line in with_t)


def _staged(records, stage, live, monkeypatch):
    """The text (and stats) of records handed on as the session does, in
    batches of stage events (session._Fanout)."""
    import io
    from ebpf_pcsc.session import _Fanout
    from ebpf_pcsc.stats import Stats
    stats, out = Stats(), io.StringIO()
    text = T.TextSink(stats, out=out)
    fanout = _Fanout(stats, [text], live=live)
    monkeypatch.setattr(fanout, "STAGE", stage)
    assembler = Assembler(FUNCTIONS, fanout)
    for raw in records:
        assembler.feed(raw)
    fanout.flush()
    text.summary()
    return out.getvalue(), stats


@pytest.mark.parametrize("stage", [1, 5, 64, 100_000])
def test_staged_outputs_print_what_streamed_ones_print(stage, monkeypatch):
    """The session hands calls on in batches, stats first, then the text
    (session._Fanout): the text must not depend on where a batch ends.  In
    one batch, stats knows of the second process before the text shows the
    first one's calls: the first process must still get no label."""
    records = read_records(records_path("nullrecvpci")) + read_records(records_path("attrs"))
    want = render_records(records, diffable=False, summary=True)
    assert _staged(records, stage, False, monkeypatch)[0] == want
    assert want.count("[pid ") == 1


def _aborted(records, nth):
    """records with the nth RETURN turned into an ABORT (its thread died in
    the call)."""
    returns = [i for i, r in enumerate(records) if L.Head.from_buffer_copy(r[:48]).kind
               == L.PCSC_REC_RETURN]
    raw = bytearray(records[returns[nth]])
    head = L.Head.from_buffer(raw)
    head.kind = L.PCSC_REC_ABORT
    del head
    return records[:returns[nth]] + [bytes(raw)] + records[returns[nth] + 1:]


@pytest.mark.parametrize("stage", [1, 64])
def test_staged_outputs_with_a_call_whose_thread_died(stage, monkeypatch, capsys):
    """Live, a call whose thread died shows its entry and no result, as
    streamed, and is warned about once, after its batch."""
    records = _aborted(read_records(records_path("all")), 5)
    want = render_records(records, diffable=False, summary=True)
    text, stats = _staged(records, stage, True, monkeypatch)
    assert text == want
    assert stats.aborted == 1
    assert capsys.readouterr().err.count("ended inside the call") == 1


def test_a_failing_output_does_not_keep_the_batch_from_the_others():
    """The text's reader went away (| head): the recording after it still
    gets every call of the batch, and the error comes out after."""
    from ebpf_pcsc.session import _Fanout
    from ebpf_pcsc.stats import Stats

    class Gone:
        def enter(self, call):
            raise BrokenPipeError

        leave = abort = enter

    class Kept:
        def __init__(self):
            self.events = []

        def enter(self, call):
            self.events.append(("enter", call.name))

        def leave(self, call):
            self.events.append(("leave", call.name))

        def abort(self, call):
            self.events.append(("abort", call.name))

    kept = Kept()
    fanout = _Fanout(Stats(), [Gone(), kept], live=False)
    assembler = Assembler(FUNCTIONS, fanout)
    records = read_records(records_path("errors"))
    with pytest.raises(BrokenPipeError):
        for raw in records:
            assembler.feed(raw)
        fanout.flush()
    assert len(kept.events) == min(fanout.STAGE, 2 * sum(
        1 for r in records if L.Head.from_buffer_copy(r[:48]).kind == L.PCSC_REC_RETURN))


def test_one_process_has_no_process_labels():
    text = render("threads_2_3", diffable=True, summary=True)
    assert "[pid" not in text and "(pid" not in text
    assert "\nThread 1/3\nResults sorted by total execution time\n" in text


# -- hexdump ------------------------------------------------------------------------------

def test_hexdump_edge_cases():
    assert T.hexdump(b"") == []
    assert T.hexdump(bytes(range(17))) == [
        "0000 00 01 02 03 04 05 06 07 08 09 0A 0B 0C 0D 0E 0F ................",
        "0010 10                                              ."]
    assert T.hexdump(b"\x1f\x20\x7e\x7f\x80\xffAz") == [
        "0000 1F 20 7E 7F 80 FF 41 7A                         . ~...Az"]
    assert T.hexdump(bytes(range(32, 48))) == [
        "0000 20 21 22 23 24 25 26 27 28 29 2A 2B 2C 2D 2E 2F  !\"#$%&'()*+,-./"]


@pytest.mark.parametrize("length", list(range(0, 50)) + [4103, 65007])
def test_hexdump_as_pcsc_spy_byte_by_byte(length):
    """hexdump() works on whole buffers and has a path for one line: the
    same lines as pcsc-spy's byte-by-byte dump, whatever the length."""
    data = bytes((i * 37 + 11) & 0xFF for i in range(length))
    # spy_hexdump(prefix, ...) puts a space after the prefix
    expected = [line[1:] for line in spy_hexdump("", data).split("\n")] if data else []
    assert T.hexdump(data) == expected


@pytest.mark.parametrize("value", [0, 5, 0x7FFFFFFF, 0x80100002, 0xFFFFFFFF, 1 << 32,
                                   0xFFFFFFFFFFFFFFFF, -1, None])
def test_number_is_the_value_then_its_decimal(value):
    """number(h, v): what with_decimal(h, ptr_long(v)) prints, formatted once."""
    assert T.number("bRecvLength", value) == T.with_decimal("bRecvLength", T.ptr_long(value))


def _transmit(send, recv):
    return make_call("SCardTransmit", {"hCard": 1, "cbSendLength": len(send)},
                     entry=Phase(words={"pioSendPci.dwProtocol": 2, "pioSendPci.cbPciLength": 16},
                                 data={"pbSendBuffer": Captured(send, 0, len(send))}),
                     exit=Phase(words={"pioRecvPci.dwProtocol": 2, "pioRecvPci.cbPciLength": 16,
                                       "pcbRecvLength": len(recv)},
                                data={"pbRecvBuffer": Captured(recv, 0, len(recv))}))


def test_hexdump_in_a_call():
    got = render_calls([_transmit(b"", bytes(range(17)))], diffable=True).splitlines()
    assert got[4:] == [
        " i bSendLength 0x00000000 (0)",
        " i bSendBuffer",
        " o pioRecvPci.dwProtocol: 0x????",
        " o pioRecvPci.cbPciLength: 0x????",
        " o bRecvLength 0x00000011 (17)",
        " o bRecvBuffer",
        " o  0000 00 01 02 03 04 05 06 07 08 09 0A 0B 0C 0D 0E 0F ................",
        " o  0010 10                                              .",
        " => Command successful. (SCARD_S_SUCCESS [0x00000000])  [??.??]"]


def test_null_buffer():
    c = make_call("SCardSetAttrib", {"hCard": 1, "dwAttrId": 0x00090303, "cbAttrLen": 4},
                  entry=Phase(data={"pbAttr": Captured(None, L.PCSC_DATA_NULL, 4)}))
    assert render_calls([c], diffable=True).splitlines()[3:6] == [
        " i bAttrLen 0x00000004 (4)", " i bAttr", " i  NULL"]


# -- SCardControl and the PC/SC v2 part 10 features -------------------------------------------

FEATURES = bytes.fromhex("06 04 42 33 00 06"    # FEATURE_VERIFY_PIN_DIRECT
                         "0A 04 42 33 00 0A"    # FEATURE_IFD_PIN_PROPERTIES
                         "12 04 42 33 00 12"    # FEATURE_GET_TLV_PROPERTIES
                         "20 04 42 33 00 20")   # not a feature pcsc-spy knows


def _control(code, send=None, recv=b"", rv=0):
    send_cap = Captured(None, L.PCSC_DATA_NULL, 0) if send is None else Captured(send, 0, len(send))
    exit_data = {"pbRecvBuffer": Captured(recv, 0, len(recv))} if rv == 0 else {}
    return make_call("SCardControl",
                     {"hCard": 7, "dwControlCode": code, "cbSendLength": len(send or b""),
                      "cbRecvLength": 256},
                     entry=Phase(data={"pbSendBuffer": send_cap}),
                     exit=Phase(words={"lpBytesReturned": len(recv)}, data=exit_data), rv=rv)


def test_control_get_feature_request():
    got = render_calls([_control(0x42000D48, recv=FEATURES)], diffable=True)
    assert got == """\
SCardControl
 i hCard: 0x????
 i dwControlCode: CM_IOCTL_GET_FEATURE_REQUEST (0x42000D48)
 i bSendLength 0x00000000 (0)
 i bSendBuffer
 i  NULL
 o bRecvLength 0x00000018 (24)
 o bRecvBuffer
 o  0000 06 04 42 33 00 06 0A 04 42 33 00 0A 12 04 42 33 ..B3....B3....B3
 o  0010 00 12 20 04 42 33 00 20                         .. .B3. 
 => Command successful. (SCARD_S_SUCCESS [0x00000000])  [??.??]
  parsing CM_IOCTL_GET_FEATURE_REQUEST results:
  Tag FEATURE_VERIFY_PIN_DIRECT is 0x42330006
  Tag FEATURE_IFD_PIN_PROPERTIES is 0x4233000A
  Tag FEATURE_GET_TLV_PROPERTIES is 0x42330012
  Tag UNKNOWN is 0x42330020
"""


def test_control_features_then_used():
    """The codes learnt from the feature request name the later calls of
    the thread, and their answers are parsed as pcsc-spy does."""
    verify = bytes([30, 15, 0x89, 0x47, 0x04, 0x08, 0x04, 0x02, 0x01, 0x09, 0x04, 0x00,
                    0, 0, 0, 13, 0, 0, 0]) + bytes.fromhex("00 20 00 01 08 20 FF FF FF FF FF FF FF")
    calls = [_control(0x42000D48, recv=FEATURES),
             _control(0x42330012, recv=bytes.fromhex("01 02 00 00 03 01 00 08 02 12 34")),
             _control(0x4233000A, recv=bytes.fromhex("00 00 02 00")),
             _control(0x42330006, send=verify, recv=b"\x90\x00"),
             _control(0x42330020),
             _control(0x42330012, recv=b"\x01\x01\x00", rv=0x8010001F)]
    got = render_calls(calls, diffable=True).split("SCardControl\n")[2:]
    assert got[0] == """\
 i hCard: 0x????
 i dwControlCode: FEATURE_GET_TLV_PROPERTIES (0x42330012)
 i bSendLength 0x00000000 (0)
 i bSendBuffer
 i  NULL
 o bRecvLength 0x0000000B (11)
 o bRecvBuffer
 o  0000 01 02 00 00 03 01 00 08 02 12 34                ..........4
 => Command successful. (SCARD_S_SUCCESS [0x00000000])  [??.??]
  parsing FEATURE_GET_TLV_PROPERTIES results:
  Tag: PCSCv2_PART10_PROPERTY_wLcdLayout
   Length:  2
   Value: [0, 0]
  Tag: PCSCv2_PART10_PROPERTY_bTimeOut2
   Length:  1
   Value: [0]
  Tag: PCSCv2_PART10_PROPERTY_sFirmwareID
   Length:  2
   Value: [18, 52]
"""
    assert got[1].splitlines()[1] == " i dwControlCode: FEATURE_IFD_PIN_PROPERTIES (0x4233000A)"
    assert got[1].splitlines()[-4:] == [
        "  parsing FEATURE_IFD_PIN_PROPERTIES results:",
        "  wLcdLayout: 0 0",
        "  bEntryValidationCondition: 2",
        "  bTimeOut2: 0"]
    assert got[2].splitlines()[1] == " i dwControlCode: FEATURE_VERIFY_PIN_DIRECT (0x42330006)"
    assert got[2].split(" => Command successful. (SCARD_S_SUCCESS [0x00000000])  [??.??]\n")[1] \
        == """\
  parsing FEATURE_VERIFY_PIN_DIRECT:
  bTimerOut: 30
  bTimerOut2: 15
  bmFormatString: 137
  bmPINBlockString: 71
  bmPINLengthFormat: 4
  wPINMaxExtraDigit: 0x0408
   Min: 4
   Max: 8
  bEntryValidationCondition: 2
  bNumberMessage: 1
  wLangId: 0x0409
  bMsgIndex: 0
  bTeoPrologue: 0 0 0
  ulDataLength: 13
  APDU:
   0000 00 20 00 01 08 20 FF FF FF FF FF FF FF          . ... .......
"""
    # the unknown tag's code is named UNKNOWN; nothing parsed
    assert got[3].splitlines()[1] == " i dwControlCode: UNKNOWN (0x42330020)"
    assert got[3].splitlines()[-1] == " => Command successful. (SCARD_S_SUCCESS [0x00000000])  [??.??]"
    # an error: no parsing
    assert got[4].splitlines()[-1] == \
        " => Feature not supported. (SCARD_E_UNSUPPORTED_FEATURE [0x8010001F])  [??.??]"


def test_control_features_are_per_thread():
    """pcsc-spy learns the codes per thread (one PCSCspy object each)."""
    learn = _control(0x42000D48, recv=FEATURES)
    other = _control(0x42330012, recv=b"\x01\x01\x00")
    other.tid = 1001
    got = render_calls([learn, other], diffable=True).splitlines()
    assert "     i dwControlCode: UNKNOWN (0x42330012)" in got
    assert not any("parsing FEATURE_GET_TLV_PROPERTIES" in l for l in got)


def test_aborted_call_prints_no_result():
    c = make_call("SCardGetStatusChange", {"hContext": 1, "dwTimeout": 0xFFFFFFFF},
                  entry=Phase(readers={"rgReaderStates": []}))
    c.aborted, c.rv, c.exit = True, None, None
    after = make_call("SCardIsValidContext", {"hContext": 1}, tid=1001)
    got = render_calls([c, after], diffable=True).splitlines()
    assert got == ["SCardGetStatusChange", " i hContext: 0x????",
                   " i dwTimeout: 0xFFFFFFFF (4294967295)", " i cReaders: 0",
                   "    SCardIsValidContext", "     i hContext: 0x????",
                   "     => Command successful. (SCARD_S_SUCCESS [0x00000000])  [??.??]"]


def test_readerstate_lines():
    """pcsc-spy's SCARD_READERSTATE lines: NULL szReader, every state
    bit in its order, an ATR length above MAX_ATR_SIZE."""
    rs_in = [ReaderState(None, 0x7FF, 0, 40, bytes(33)),
             ReaderState("R", 0, 0x00020120, 2, b"\x3b\x00" + bytes(31))]
    c = make_call("SCardGetStatusChange", {"hContext": 1, "dwTimeout": 1000, "cReaders": 2},
                  entry=Phase(readers={"rgReaderStates": rs_in}),
                  exit=Phase(readers={"rgReaderStates": rs_in}))
    got = render_calls([c], diffable=True).splitlines()
    assert got[1:14] == [
        " i hContext: 0x????",
        " i dwTimeout: 0x000003E8 (1000)",
        " i cReaders: 2",
        " i szReader: (null)",
        " i  dwCurrentState: SCARD_STATE_IGNORE, SCARD_STATE_CHANGED, SCARD_STATE_UNKNOWN, "
        "SCARD_STATE_UNAVAILABLE, SCARD_STATE_EMPTY, SCARD_STATE_PRESENT, SCARD_STATE_ATRMATCH, "
        "SCARD_STATE_EXCLUSIVE, SCARD_STATE_INUSE, SCARD_STATE_MUTE, SCARD_STATE_UNPOWERED "
        "(0x000007FF)",
        " i  dwEventState:  (0x00000000)",
        " i  Atr length: 0x00000028 (40)",
        " i  Atr: NULL",
        " i szReader: R",
        " i  dwCurrentState:  (0x00000000)",
        " i  dwEventState: SCARD_STATE_PRESENT, SCARD_STATE_INUSE (0x00020120)",
        " i  Atr length: 0x00000002 (2)",
        " i  Atr: 3B 00"]


def test_multistring_stops_at_its_length():
    """pcsc-spy lists the strings up to the returned length, whatever the
    buffer holds after it; a length of 0 still shows one string."""
    def list_readers(length, data):
        return make_call("SCardListReaders", {"hContext": 1, "mszReaders": 0x10},
                         entry=Phase(words={"pcchReaders": 100},
                                     data={"mszGroups": Captured(None, L.PCSC_DATA_NULL, 0)}),
                         exit=Phase(words={"pcchReaders": length},
                                    data={"mszReaders": Captured(data, 0, len(data))}))
    got = render_calls([list_readers(18, b"Virtual PCD 00 00\0stale\0\0"),
                        list_readers(0, b"A\0B\0\0")], diffable=True).splitlines()
    assert [l for l in got if l.startswith(" o ")] == [
        " o pcchReaders: 0x00000012",
        " o mszReaders: Virtual PCD 00 00",
        " o pcchReaders: 0x00000000",
        " o mszReaders: A"]
