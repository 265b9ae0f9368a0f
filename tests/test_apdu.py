"""Command APDUs and status words decoded (ebpf_pcsc.apdu), and what --apdu
adds to calls (ebpf_pcsc.annotate, the text and JSON outputs).  No BPF, no
pcscd: the expectations are written out by hand from ISO/IEC 7816-4, the
GlobalPlatform Card Specification, NIST SP 800-73 (PIV), the OpenPGP card
specification and EMV Book 3."""
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from ebpf_pcsc import apdu as A
from ebpf_pcsc import pcsc_text as T
from ebpf_pcsc.annotate import Annotator
from ebpf_pcsc.calls import Call, Captured, Phase, ReaderState
from ebpf_pcsc.functions import BY_NAME
from ebpf_pcsc.record import JsonWriter
from ebpf_pcsc.stats import Stats

TESTS = Path(__file__).resolve().parent
FIXTURE_LIST = str(TESTS / "data" / "smartcard_list.txt")


def h(text: str) -> bytes:
    return bytes.fromhex(text)


# -- parse_command: cases 1 to 4, short and extended ---------------------------------

@pytest.mark.parametrize("apdu, case, extended, lc, le, data", [
    ("00 A4 00 00", 1, False, None, None, ""),
    ("00 84 00 00 08", 2, False, None, 8, ""),
    ("00 C0 00 00 00", 2, False, None, 256, ""),
    ("00 A4 04 00 07 A0 00 00 03 08 00 00", 3, False, 7, None, "A0 00 00 03 08 00 00"),
    ("00 A4 04 00 06 D2 76 00 01 24 01 00", 4, False, 6, 256, "D2 76 00 01 24 01"),
    ("00 B0 00 00 00 01 00", 2, True, None, 256, ""),
    ("00 B0 00 00 00 00 00", 2, True, None, 65536, ""),
    ("80 10 00 00 00 00 03 AA BB CC", 3, True, 3, None, "AA BB CC"),
    ("80 10 00 00 00 00 02 AA BB 01 00", 4, True, 2, 256, "AA BB"),
    ("80 10 00 00 00 00 02 AA BB 00 00", 4, True, 2, 65536, "AA BB"),
])
def test_cases(apdu, case, extended, lc, le, data):
    raw = h(apdu)
    cmd = A.parse_command(raw)
    assert (cmd.case, cmd.extended, cmd.lc, cmd.le) == (case, extended, lc, le)
    assert cmd.data(raw) == h(data)
    assert cmd.error is None


@pytest.mark.parametrize("apdu, start, error", [
    ("00 20 00 80 08 31 32 33", 5, "Lc=8 but 3 bytes follow it"),
    ("00 20 00 80 02 31 32 33 34", 5, "Lc=2 but 4 bytes follow it"),
    ("00 20 00 80 00 00 08 31 32", 7, "extended Lc=8 but 2 bytes follow it"),
    ("00 20 00 80 00 31", 5, "Lc=0 is not a valid length"),
])
def test_malformed_lengths(apdu, start, error):
    raw = h(apdu)
    cmd = A.parse_command(raw)
    assert cmd.case == 0 and cmd.error == error
    assert (cmd.data_start, cmd.data_end) == (start, len(raw))   # all after Lc


def test_shorter_than_a_header():
    assert A.parse_command(h("00 A4 04")) is None
    head, details, fields = A.describe_command(h("00 A4 04"))
    assert head == "C-APDU: 3 bytes, shorter than a command header"


# -- the class byte ----------------------------------------------------------------------

@pytest.mark.parametrize("cla, text", [
    (0x00, "interindustry, logical channel 0, no secure messaging"),
    (0x03, "interindustry, logical channel 3, no secure messaging"),
    (0x04, "interindustry, logical channel 0, proprietary secure messaging"),
    (0x08, "interindustry, logical channel 0, secure messaging, header not authenticated"),
    (0x0C, "interindustry, logical channel 0, secure messaging, header authenticated"),
    (0x10, "interindustry, logical channel 0, no secure messaging, "
           "command chaining: more commands of the chain follow"),
    (0x40, "interindustry, logical channel 4, no secure messaging"),
    (0x4F, "interindustry, logical channel 19, no secure messaging"),
    (0x60, "interindustry, logical channel 4, secure messaging, header not authenticated"),
    (0x51, "interindustry, logical channel 5, no secure messaging, "
           "command chaining: more commands of the chain follow"),
    (0x20, "reserved for future use (ISO 7816-4)"),
    (0x80, "proprietary (GlobalPlatform coding), logical channel 0, no secure messaging"),
    (0x84, "proprietary (GlobalPlatform coding), logical channel 0, secure messaging"),
    (0xE1, "proprietary (GlobalPlatform coding), logical channel 5, secure messaging"),
    (0x90, "proprietary"),
    (0xFF, "not an ISO class (PC/SC part 3: a command for the reader, not the card)"),
])
def test_class_byte(cla, text):
    assert A.class_byte(cla).describe() == text


def test_chaining_flag():
    assert A.class_byte(0x10).chaining and A.class_byte(0x7F).chaining
    assert not A.class_byte(0x00).chaining and not A.class_byte(0x90).chaining


# -- instructions --------------------------------------------------------------------------

@pytest.mark.parametrize("cla, ins, name, source", [
    (0x00, 0xA4, "SELECT", "ISO 7816-4"),
    (0x00, 0x20, "VERIFY", "ISO 7816-4"),
    (0x00, 0x87, "GENERAL AUTHENTICATE", "ISO 7816-4"),
    (0x00, 0x47, "GENERATE ASYMMETRIC KEY PAIR", "ISO 7816-4"),
    (0x00, 0xCB, "GET DATA", "ISO 7816-4"),
    (0x00, 0x2A, "PERFORM SECURITY OPERATION", "ISO 7816-4"),
    (0x00, 0xE6, "TERMINATE DF", "ISO 7816-4"),
    (0x80, 0xE6, "INSTALL", "GlobalPlatform"),
    (0x84, 0x82, "EXTERNAL AUTHENTICATE", "GlobalPlatform"),
    (0x80, 0x50, "INITIALIZE UPDATE", "GlobalPlatform"),
    (0x80, 0xF2, "GET STATUS", "GlobalPlatform"),
    (0x80, 0xA8, "GET PROCESSING OPTIONS", "EMV"),
    (0x80, 0xAE, "GENERATE APPLICATION CRYPTOGRAM", "EMV"),
    (0x84, 0x24, "PIN CHANGE/UNBLOCK", "EMV"),
    (0xFF, 0xCA, "GET DATA (UID or ATS)", "PC/SC part 3"),
    (0x80, 0x10, None, None),     # a proprietary INS: ISO's 10 does not apply
    (0x00, 0x01, None, None),
])
def test_instruction_names(cla, ins, name, source):
    assert A.instruction(cla, ins) == (name, source)


# -- describe_command: hand-written explanations --------------------------------------------

PIV = A.application(h("A0 00 00 03 08"))
OPENPGP = A.application(h("D2 76 00 01 24 01"))


@pytest.mark.parametrize("apdu, app, head, details", [
    ("00 A4 04 00 07 A0 00 00 03 08 00 00", None,
     "C-APDU: SELECT (ISO 7816-4), case 3 short: Lc=7",
     ["CLA 00: interindustry, logical channel 0, no secure messaging",
      "P1 04: select by DF name (AID); P2 00: first or only occurrence, return FCI",
      "AID A0 00 00 03 08 00 00: PIV (NIST SP 800-73)"]),
    ("00 A4 04 00 06 D2 76 00 01 24 01 00", None,
     "C-APDU: SELECT (ISO 7816-4), case 4 short: Lc=6, Le=256",
     ["CLA 00: interindustry, logical channel 0, no secure messaging",
      "P1 04: select by DF name (AID); P2 00: first or only occurrence, return FCI",
      "AID D2 76 00 01 24 01: OpenPGP card"]),
    ("00 A4 04 0C 02 3F 00", None,
     "C-APDU: SELECT (ISO 7816-4), case 3 short: Lc=2",
     ["CLA 00: interindustry, logical channel 0, no secure messaging",
      "P1 04: select by DF name (AID); P2 0C: first or only occurrence, no response data",
      "AID 3F 00: unknown application"]),
    ("00 A4 00 0C 02 3F 00", None,
     "C-APDU: SELECT (ISO 7816-4), case 3 short: Lc=2",
     ["CLA 00: interindustry, logical channel 0, no secure messaging",
      "P1 00: select MF, DF or EF by file identifier; P2 0C: first or only occurrence, "
      "no response data",
      "file 3F00 (MF)"]),
    ("00 20 00 80 08 31 32 33 34 35 36 FF FF", PIV,
     "C-APDU: VERIFY (ISO 7816-4), case 3 short: Lc=8",
     ["CLA 00: interindustry, logical channel 0, no secure messaging",
      "P1 00, P2 80: specific reference data 0 = PIV Card Application PIN (PIV)",
      "data: 8 bytes (reference data)"]),
    ("00 20 00 80 08 31 32 33 34 35 36 FF FF", None,
     "C-APDU: VERIFY (ISO 7816-4), case 3 short: Lc=8",
     ["CLA 00: interindustry, logical channel 0, no secure messaging",
      "P1 00, P2 80: specific reference data 0",
      "data: 8 bytes (reference data)"]),
    ("00 20 00 81", OPENPGP,
     "C-APDU: VERIFY (ISO 7816-4), case 1",
     ["CLA 00: interindustry, logical channel 0, no secure messaging",
      "P1 00, P2 81: specific reference data 1 = PW1 (signing) (OpenPGP)",
      "no data: asks whether the reference data is verified (tries left)"]),
    ("00 20 FF 80", PIV,
     "C-APDU: VERIFY (ISO 7816-4), case 1",
     ["CLA 00: interindustry, logical channel 0, no secure messaging",
      "P1 FF, P2 80: specific reference data 0 = PIV Card Application PIN (PIV); "
      "reset the verification status"]),
    ("00 24 00 80 10 31 32 33 34 35 36 FF FF 36 35 34 33 32 31 FF FF", PIV,
     "C-APDU: CHANGE REFERENCE DATA (ISO 7816-4), case 3 short: Lc=16",
     ["CLA 00: interindustry, logical channel 0, no secure messaging",
      "P1 00, P2 80: specific reference data 0 = PIV Card Application PIN (PIV); "
      "old and new reference data",
      "data: 16 bytes (reference data)"]),
    ("00 2C 02 81 06 31 32 33 34 35 36", OPENPGP,
     "C-APDU: RESET RETRY COUNTER (ISO 7816-4), case 3 short: Lc=6",
     ["CLA 00: interindustry, logical channel 0, no secure messaging",
      "P1 02, P2 81: specific reference data 1 = PW1 (signing) (OpenPGP); "
      "new reference data only",
      "data: 6 bytes (reference data)"]),
    ("00 84 00 00 08", None,
     "C-APDU: GET CHALLENGE (ISO 7816-4), case 2 short: Le=8",
     ["CLA 00: interindustry, logical channel 0, no secure messaging", "P1 00, P2 00"]),
    ("00 CB 3F FF 05 5C 03 5F C1 02 00", PIV,
     "C-APDU: GET DATA (ISO 7816-4), case 4 short: Lc=5, Le=256",
     ["CLA 00: interindustry, logical channel 0, no secure messaging",
      "P1 3F, P2 FF: current DF",
      "object 5FC102 = Card Holder Unique Identifier (CHUID) (PIV)"]),
    ("00 CA 00 6E 00", OPENPGP,
     "C-APDU: GET DATA (ISO 7816-4), case 2 short: Le=256",
     ["CLA 00: interindustry, logical channel 0, no secure messaging",
      "P1 00, P2 6E: tag 006E = application related data (OpenPGP)"]),
    ("00 87 07 9A 04 7C 02 81 00 00", PIV,
     "C-APDU: GENERAL AUTHENTICATE (ISO 7816-4), case 4 short: Lc=4, Le=256",
     ["CLA 00: interindustry, logical channel 0, no secure messaging",
      "P1 07: algorithm RSA 2048; P2 9A: key PIV Authentication key"]),
    ("00 2A 9E 9A 03 01 02 03 00", OPENPGP,
     "C-APDU: PERFORM SECURITY OPERATION (ISO 7816-4), case 4 short: Lc=3, Le=256",
     ["CLA 00: interindustry, logical channel 0, no secure messaging",
      "P1 9E, P2 9A: compute digital signature"]),
    ("00 B2 01 14 00", None,
     "C-APDU: READ RECORD(S) (ISO 7816-4), case 2 short: Le=256",
     ["CLA 00: interindustry, logical channel 0, no secure messaging",
      "P1 01: record 1; P2 14: short EF identifier 2, record number P1"]),
    ("00 B0 81 10 20", None,
     "C-APDU: READ BINARY (ISO 7816-4), case 2 short: Le=32",
     ["CLA 00: interindustry, logical channel 0, no secure messaging",
      "P1 81, P2 10: short EF identifier 1, offset 16"]),
    ("00 70 00 00 01", None,
     "C-APDU: MANAGE CHANNEL (ISO 7816-4), case 2 short: Le=1",
     ["CLA 00: interindustry, logical channel 0, no secure messaging",
      "P1 00, P2 00: open logical channel (assigned by the card)"]),
    ("80 E6 0C 00 04 01 02 03 04 00", None,
     "C-APDU: INSTALL (GlobalPlatform), case 4 short: Lc=4, Le=256",
     ["CLA 80: proprietary (GlobalPlatform coding), logical channel 0, no secure messaging",
      "P1 0C, P2 00: install, make selectable"]),
    ("80 F2 40 00 02 4F 00 00", None,
     "C-APDU: GET STATUS (GlobalPlatform), case 4 short: Lc=2, Le=256",
     ["CLA 80: proprietary (GlobalPlatform coding), logical channel 0, no secure messaging",
      "P1 40, P2 00: applications and security domains, first occurrence"]),
    ("80 50 00 00 08 01 02 03 04 05 06 07 08 00", None,
     "C-APDU: INITIALIZE UPDATE (GlobalPlatform), case 4 short: Lc=8, Le=256",
     ["CLA 80: proprietary (GlobalPlatform coding), logical channel 0, no secure messaging",
      "P1 00, P2 00: key version 0, key identifier 0"]),
    ("84 82 01 00 10 " + "00 " * 16, None,
     "C-APDU: EXTERNAL AUTHENTICATE (GlobalPlatform), case 3 short: Lc=16",
     ["CLA 84: proprietary (GlobalPlatform coding), logical channel 0, secure messaging",
      "P1 01, P2 00: security level C-MAC"]),
    ("80 A8 00 00 02 83 00 00", None,
     "C-APDU: GET PROCESSING OPTIONS (EMV), case 4 short: Lc=2, Le=256",
     ["CLA 80: proprietary (GlobalPlatform coding), logical channel 0, no secure messaging",
      "P1 00, P2 00"]),
    ("80 AE 90 00 02 01 02 00", None,
     "C-APDU: GENERATE APPLICATION CRYPTOGRAM (EMV), case 4 short: Lc=2, Le=256",
     ["CLA 80: proprietary (GlobalPlatform coding), logical channel 0, no secure messaging",
      "P1 90, P2 00: ARQC requested, CDA"]),
    ("10 DB 3F FF 02 5C 00", None,
     "C-APDU: PUT DATA (ISO 7816-4), case 3 short: Lc=2",
     ["CLA 10: interindustry, logical channel 0, no secure messaging, "
      "command chaining: more commands of the chain follow",
      "P1 3F, P2 FF: current DF"]),
    ("80 10 00 00 00 00 03 AA BB CC 00 00", None,
     "C-APDU: INS 10: proprietary instruction, case 4 extended: Lc=3, Le=65536",
     ["CLA 80: proprietary (GlobalPlatform coding), logical channel 0, no secure messaging",
      "P1 00, P2 00"]),
    ("00 6A 00 00", None,
     "C-APDU: INS 6A: invalid (6X and 9X are status bytes), case 1",
     ["CLA 00: interindustry, logical channel 0, no secure messaging", "P1 00, P2 00"]),
    ("00 20 00 80 08 31 32 33", None,
     "C-APDU: VERIFY (ISO 7816-4), malformed: Lc=8 but 3 bytes follow it",
     ["CLA 00: interindustry, logical channel 0, no secure messaging",
      "P1 00, P2 80: specific reference data 0",
      "data: 3 bytes (reference data)"]),
])
def test_describe_command(apdu, app, head, details):
    got_head, got_details, fields = A.describe_command(h(apdu), app)
    assert got_head == head
    assert got_details == details
    json.dumps(fields)   # JSON-able


def test_masked_data_is_said_so():
    _, details, fields = A.describe_command(h("00 20 00 80 08" + " 2A" * 8), PIV, masked=True)
    assert details[-1] == "data: 8 bytes (reference data), masked by --redact"
    assert fields["masked"] is True


def test_command_fields():
    _, _, f = A.describe_command(h("00 A4 04 00 07 A0 00 00 03 08 00 00"))
    assert f == {"cla": 0, "ins": 0xA4, "p1": 4, "p2": 0, "name": "SELECT", "source": "ISO 7816-4",
                 "class": "interindustry", "channel": 0, "secure_messaging": "no secure messaging",
                 "chaining": False, "case": 3, "extended": False, "lc": 7, "le": None,
                 "data_length": 7, "error": None, "application": "PIV (NIST SP 800-73)"}


# -- well-known applications -----------------------------------------------------------------

@pytest.mark.parametrize("aid, name", [
    ("A0 00 00 03 08 00 00 10 00 01 00", "PIV (NIST SP 800-73)"),
    ("D2 76 00 01 24 01 03 04 00 05 00 00 12 34 00 00", "OpenPGP card"),
    ("31 50 41 59 2E 53 59 53 2E 44 44 46 30 31",
     "EMV payment system environment (1PAY.SYS.DDF01)"),
    ("32 50 41 59 2E 53 59 53 2E 44 44 46 30 31",
     "EMV proximity payment system environment (2PAY.SYS.DDF01)"),
    ("A0 00 00 00 03 10 10", "Visa credit or debit (EMV)"),
    ("A0 00 00 00 04 10 10", "Mastercard credit or debit (EMV)"),
    ("A0 00 00 00 04 99 99", "Mastercard (EMV)"),
    ("A0 00 00 06 47 2F 00 01", "FIDO U2F / FIDO2 (CTAP)"),
    ("A0 00 00 01 51 00 00 00", "GlobalPlatform Issuer Security Domain"),
    ("A0 00 00 00 03 00 00 00",
     "GlobalPlatform Issuer Security Domain (Open Platform card manager)"),
])
def test_applications(aid, name):
    assert A.application(h(aid)).name == name


def test_unknown_and_partial_aids():
    assert A.application(h("A0 00 00 99 99")) is None
    _, details, _ = A.describe_command(h("00 A4 04 00 06 A0 00 00 06 47 2F"))
    assert details[-1] == "AID A0 00 00 06 47 2F: partial AID of FIDO U2F / FIDO2 (CTAP)"


def test_the_selected_application_follows_each_handle_and_channel():
    apps = A.Applications()
    select_piv = h("00 A4 04 00 05 A0 00 00 03 08")
    apps.update((1, 10, 0), select_piv, (0x90, 0x00))
    assert apps.current((1, 10, 0)).family == "PIV"
    assert apps.current((1, 11, 0)) is None                 # another handle
    assert apps.current((1, 10, 1)) is None                 # another channel
    apps.update((1, 10, 0), h("00 A4 04 00 06 D2 76 00 01 24 01"), (0x6A, 0x82))
    assert apps.current((1, 10, 0)).family == "PIV"         # failed SELECT: unchanged
    apps.update((1, 10, 0), h("00 A4 00 0C 02 3F 00"), (0x90, 0x00))
    assert apps.current((1, 10, 0)).family == "PIV"         # a file, not an application
    apps.update((1, 10, 0), h("00 A4 04 00 06 D2 76 00 01 24 01"), (0x61, 0x20))
    assert apps.current((1, 10, 0)).family == "OpenPGP"     # 61XX is success
    apps.update((1, 10, 0), h("00 A4 04 00 05 A0 00 00 99 99"), (0x90, 0x00))
    assert apps.current((1, 10, 0)) is None                 # an unknown application


# -- status words ---------------------------------------------------------------------------

@pytest.mark.parametrize("sw, ins, category, meaning", [
    ("9000", None, "success", "success"),
    ("6110", None, "success", "success, 16 more bytes available (GET RESPONSE with Le=10)"),
    ("6100", None, "success", "success, 256 or more more bytes available (GET RESPONSE with Le=00)"),
    ("6C08", None, "error", "wrong Le: 8 bytes available (resend with Le=08)"),
    ("63C2", 0x20, "warning", "verification failed, 2 tries left"),
    ("63C1", 0x24, "warning", "verification failed, 1 try left"),
    ("63C0", 0x2C, "warning", "verification failed, 0 tries left"),
    ("63C3", None, "warning", "verification failed, 3 tries left"),
    ("63C3", 0xB0, "warning", "counter is 3"),
    ("6300", 0x20, "warning", "no information given (state changed; often: verification failed)"),
    ("6982", None, "error", "security status not satisfied"),
    ("6983", None, "error", "authentication method blocked"),
    ("6985", None, "error", "conditions of use not satisfied"),
    ("6A82", None, "error", "file or application not found"),
    ("6A86", None, "error", "incorrect parameters P1-P2"),
    ("6A88", None, "error", "referenced data or reference data not found"),
    ("6700", None, "error", "wrong length"),
    ("6D00", None, "error", "instruction code not supported or invalid"),
    ("6E00", None, "error", "class not supported"),
    ("6F00", None, "error", "no precise diagnosis"),
    ("6281", None, "warning", "part of the returned data may be corrupted"),
    ("6884", None, "error", "command chaining not supported"),
    ("6A90", None, "error", "wrong parameters P1-P2 (qualifier 90 not in ISO 7816-4)"),
    ("9100", None, "proprietary", "proprietary status (not defined by ISO 7816-4)"),
    ("1234", None, "invalid", "not an ISO 7816-4 status word"),
])
def test_status_words(sw, ins, category, meaning):
    st = A.describe_status(int(sw[:2], 16), int(sw[2:], 16), ins)
    assert (st.category, st.meaning) == (category, meaning)
    assert st.text == "SW %s %s: %s" % (sw[:2], sw[2:], meaning)


def test_describe_response():
    assert A.describe_response(h("01 02 03 90 00"))[0] == "R-APDU: 3 data bytes, SW 90 00: success"
    head, fields = A.describe_response(h("63 C2"), 0x20)
    assert head == "R-APDU: SW 63 C2: verification failed, 2 tries left"
    assert fields == {"sw": "63C2", "category": "warning",
                      "meaning": "verification failed, 2 tries left", "data_length": 0}
    assert A.describe_response(h("90"))[0] == "R-APDU: 1 bytes, shorter than a status word"


# -- --apdu in the text and the JSON ----------------------------------------------------------

def make_call(fname, args=None, entry=None, exit=None, rv=0, pid=1000, tid=1000, ts=10 ** 9):
    fn = BY_NAME[fname]
    full = dict.fromkeys(fn.args, 0)
    full.update(args or {})
    return Call(fn, pid, tid, "app", ts, full, entry or Phase(), exit or Phase(), rv=rv,
                ret_ts=ts + 1000)


def transmit(send: bytes, recv: bytes, hcard=0x1234, rv=0, ts=10 ** 9):
    return make_call(
        "SCardTransmit", {"hCard": hcard, "pbSendBuffer": 1, "cbSendLength": len(send),
                          "pbRecvBuffer": 1, "pioSendPci": 1},
        Phase(words={"pioSendPci.dwProtocol": 2, "pioSendPci.cbPciLength": 16},
              data={"pbSendBuffer": Captured(send, 0, len(send))}),
        Phase(words={"pioRecvPci.dwProtocol": None, "pioRecvPci.cbPciLength": None,
                     "pcbRecvLength": len(recv)},
              data={"pbRecvBuffer": Captured(recv, 0, len(recv))}), rv=rv, ts=ts)


def render(calls, annotator=True, **options):
    stats, out = Stats(), io.StringIO()
    text = T.TextSink(stats, out=out, annotator=Annotator(FIXTURE_LIST) if annotator else None,
                      **options)
    for c in calls:
        stats.enter(c)
        text.enter(c)
        stats.leave(c)
        text.leave(c)
    return out.getvalue()


SELECT_PIV = h("00 A4 04 00 07 A0 00 00 03 08 00 00")
VERIFY = h("00 20 00 80 08 31 32 33 34 35 36 FF FF")


def test_text_lines_after_the_result_line():
    text = render([transmit(SELECT_PIV, h("90 00"), ts=1), transmit(VERIFY, h("63 C2"), ts=2)],
                  diffable=True)
    assert text.split("SCardTransmit\n")[2] == """\
 i hCard: 0x????
 i pioSendPci.dwProtocol: 0x????
 i pioSendPci.cbPciLength: 0x????
 i bSendLength 0x0000000D (13)
 i bSendBuffer
 i  0000 00 20 00 80 08 31 32 33 34 35 36 FF FF          . ...123456..
 o pioRecvPci.dwProtocol: 0x????
 o pioRecvPci.cbPciLength: 0x????
 o bRecvLength 0x00000002 (2)
 o bRecvBuffer
 o  0000 63 C2                                           c.
 => Command successful. (SCARD_S_SUCCESS [0x00000000])  [??.??]
 # C-APDU: VERIFY (ISO 7816-4), case 3 short: Lc=8
 #   CLA 00: interindustry, logical channel 0, no secure messaging
 #   P1 00, P2 80: specific reference data 0 = PIV Card Application PIN (PIV)
 #   data: 8 bytes (reference data)
 # R-APDU: SW 63 C2: verification failed, 2 tries left
"""


def test_without_apdu_the_text_is_unchanged():
    calls = [transmit(SELECT_PIV, h("90 00")), transmit(VERIFY, h("63 C2"))]
    plain = render(calls, annotator=False)
    assert " # " not in plain
    assert [l for l in render(calls).splitlines() if not l.startswith(" # ")] == plain.splitlines()


def test_thread_indent_and_colour():
    second_thread = transmit(VERIFY, h("90 00"))
    first = make_call("SCardEstablishContext", {"dwScope": 2}, tid=999)
    text = render([first, second_thread], color=True, show_thread=True)
    assert "     (t1) \x1b[36m # R-APDU: SW 90 00: success\x1b[0m\n" in text


def test_failed_transmit_decodes_the_command_only():
    c = transmit(SELECT_PIV, h(""), rv=0x80100003)
    c.exit.data.clear()
    notes = Annotator().notes(c)
    assert [n.kind for n in notes] == ["command"]


def test_atr_of_get_status_change_status_and_get_attrib():
    atr = h("3B 80 80 01 01")
    rs = lambda cb: ReaderState("Virtual PCD 00 00", 0, 0x22, cb, atr.ljust(33, b"\0"))
    gsc = make_call("SCardGetStatusChange", {"cReaders": 1, "rgReaderStates": 1},
                    Phase(readers={"rgReaderStates": [rs(0)]}),
                    Phase(readers={"rgReaderStates": [rs(5)]}))
    status = make_call("SCardStatus", {"pbAtr": 1},
                       exit=Phase(words={"pcbAtrLen": 5, "pcchReaderLen": 18},
                                  data={"pbAtr": Captured(atr, 0, 5),
                                        "mszReaderName": Captured(b"Virtual PCD 00 00\0", 0, 18)}))
    attrib = make_call("SCardGetAttrib", {"dwAttrId": 0x00090303, "pbAttr": 1},
                       exit=Phase(words={"pcbAttrLen": 5}, data={"pbAttr": Captured(atr, 0, 5)}))
    text = render([gsc, status, attrib])
    expected = """\
 # ATR: 3B 80 80 01 01 (Virtual PCD 00 00)
 #   TS 3B: direct convention
 #   T0 80: 0 historical bytes; TD1 present
 #   TD1 80: protocol T=0; TD2 present
 #   TD2 01: protocol T=1
 #   historical bytes: none
 #   TCK 01: correct
 #   protocols: T=0, T=1
 #   card: Virtual card of tests/vcard.py (fixture)
 #   card: ISO 14443-4 card without historical bytes (fixture)
"""
    assert text.count(expected) == 2                     # SCardGetStatusChange, SCardStatus
    assert expected.replace(" (Virtual PCD 00 00)", "") in text   # SCardGetAttrib
    assert text.count(" # ATR: ") == 3


def test_json_decoded_member():
    out = io.StringIO()
    writer = JsonWriter(out, annotator=Annotator(FIXTURE_LIST))
    for c in (transmit(SELECT_PIV, h("90 00")), transmit(VERIFY, h("63 C2"))):
        writer.leave(c)
    select, verify = [json.loads(line) for line in out.getvalue().splitlines()]
    assert select["decoded"]["command"]["application"] == "PIV (NIST SP 800-73)"
    d = verify["decoded"]
    assert d["command"]["name"] == "VERIFY" and d["command"]["case"] == 3 and d["command"]["lc"] == 8
    assert d["command"]["text"][0] == "C-APDU: VERIFY (ISO 7816-4), case 3 short: Lc=8"
    assert d["response"] == {"sw": "63C2", "category": "warning",
                             "meaning": "verification failed, 2 tries left", "data_length": 0,
                             "text": ["R-APDU: SW 63 C2: verification failed, 2 tries left"]}
    out = io.StringIO()
    JsonWriter(out).leave(transmit(VERIFY, h("63 C2")))
    assert "decoded" not in json.loads(out.getvalue())   # only with --apdu


def test_no_click_and_no_work_at_import():
    code = ("import sys; import ebpf_pcsc.apdu, ebpf_pcsc.atr as a, ebpf_pcsc.redact, "
            "ebpf_pcsc.annotate; print('click' in sys.modules, a.load_list.cache_info().currsize)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=TESTS.parent, check=True)
    assert res.stdout.split() == ["False", "0"]
