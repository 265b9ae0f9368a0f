"""--redact (ebpf_pcsc.redact): the data field of VERIFY, CHANGE REFERENCE
DATA and RESET RETRY COUNTER, and the APDU template of the PIN-pad
structures, masked with 0x2A before any output sees the call; lengths and
every other byte unchanged.

Unit tests on APDUs and calls, the session's outputs on a recording (no
BPF), then a real run: the private pcscd and virtual card, a ctypes client
sending SELECT PIV, VERIFY (right and wrong PIN) and GET CHALLENGE, traced
with --apdu --redact as text, --json and -w; and a recording made without
--redact, rendered with -r --redact.
"""
import io
import json
import subprocess
from pathlib import Path

import pytest

from ebpf_pcsc import record, session
from ebpf_pcsc import redact as R
from ebpf_pcsc.calls import Call, Captured, Phase
from ebpf_pcsc.functions import BY_NAME
from ebpf_pcsc.golden import calls_part
from testbed import PYTHON, TESTS_DIR
from tracer import ROOT, command

FIXTURE_LIST = str(TESTS_DIR / "data" / "smartcard_list.txt")
STAR = 0x2A


def h(text: str) -> bytes:
    return bytes.fromhex(text)


def masked_as(apdu: bytes, start: int, end: int) -> bytes:
    return apdu[:start] + b"*" * (end - start) + apdu[end:]


# -- APDUs ---------------------------------------------------------------------------------

PIN = b"123456".ljust(8, b"\xff")
VERIFY = h("00 20 00 80 08") + PIN


@pytest.mark.parametrize("apdu, start, end", [
    (VERIFY, 5, 13),                                                  # VERIFY, case 3
    (VERIFY + b"\x00", 5, 13),                                        # case 4: Le stays
    (h("00 21 00 80 0A 5F 2E 07") + b"1234567", 5, 15),               # odd INS (BER-TLV)
    (h("00 24 00 80 10") + PIN + b"654321\xff\xff", 5, 21),           # CHANGE REFERENCE DATA
    (h("00 25 00 80 10") + PIN + PIN, 5, 21),
    (h("00 2C 00 80 10") + b"87654321" + PIN, 5, 21),                 # RESET RETRY COUNTER
    (h("00 2D 00 80 08") + PIN, 5, 13),
    (h("0C 20 00 80 08") + PIN, 5, 13),                               # secure messaging
    (h("84 24 00 00 08") + PIN, 5, 13),                               # EMV PIN CHANGE
    (h("FF 20 00 00 03 31 32 33"), 5, 8),                             # PC/SC part 3 VERIFY
    (h("10 20 00 80 04 31 32 33 34"), 5, 9),                          # chained part
    (h("00 20 00 80 00 00 08") + PIN, 7, 15),                         # extended
    (h("00 20 00 80 00 00 08") + PIN + h("00 00"), 7, 15),            # extended, Le stays
    (h("00 20 00 80 08 31 32 33"), 5, 8),                             # malformed: all after Lc
    (h("00 20 00 80 02 31 32 33 34 35"), 5, 10),
])
def test_secret_instructions(apdu, start, end):
    ranges = R.apdu_secrets(apdu)
    assert ranges == [(start, end - start)]
    masked = R.mask(apdu, ranges)
    assert masked == masked_as(apdu, start, end)
    assert len(masked) == len(apdu)


@pytest.mark.parametrize("apdu", [
    h("00 20 00 80"),                        # VERIFY case 1: asks for the tries left
    h("00 20 00 80 00"),                     # case 2
    h("00 A4 04 00 07 A0 00 00 03 08 00 00"),
    h("00 84 00 00 08"),
    h("00 DA 01 01 04 31 32 33 34"),         # PUT DATA: not a PIN command
    h("80 10 00 00 04 31 32 33 34"),
    h("00 20 00"),                           # shorter than a header
    b"",
])
def test_other_apdus_are_untouched(apdu):
    assert R.apdu_secrets(apdu) == []


def test_mask_byte():
    assert R.MASK == STAR == ord("*")


# -- PIN-pad structures (PC/SC v2 part 10) ----------------------------------------------------

def verify_structure(template: bytes) -> bytes:
    """PIN_VERIFY_STRUCTURE: 15 bytes of parameters, ulDataLength, abData."""
    return (bytes([0x00, 0x1E, 0x82, 0x08, 0x00, 0x08, 0x04, 0x02, 0x01, 0x09, 0x04, 0x00,
                   0x00, 0x00, 0x00]) + len(template).to_bytes(4, "little") + template)


def modify_structure(template: bytes) -> bytes:
    """PIN_MODIFY_STRUCTURE: 20 bytes of parameters, ulDataLength, abData."""
    return (bytes([0x00, 0x1E, 0x82, 0x08, 0x00, 0x00, 0x08, 0x08, 0x04, 0x03, 0x02, 0x03,
                   0x09, 0x04, 0x00, 0x01, 0x02, 0x00, 0x00, 0x00])
            + len(template).to_bytes(4, "little") + template)


def test_verify_pin_structure():
    s = verify_structure(h("00 20 00 80 08") + PIN)
    ranges = R.pin_structure_secrets("FEATURE_VERIFY_PIN_DIRECT", s)
    assert ranges == [(24, 8)]
    assert R.mask(s, ranges) == s[:24] + b"*" * 8
    assert R.pin_structure_secrets("FEATURE_VERIFY_PIN_START", s) == [(24, 8)]


def test_modify_pin_structure():
    s = modify_structure(h("00 24 00 80 10") + PIN + PIN)
    ranges = R.pin_structure_secrets("FEATURE_MODIFY_PIN_DIRECT", s)
    assert ranges == [(29, 16)]
    assert R.mask(s, ranges) == s[:29] + b"*" * 16


def test_pin_structures_without_data_or_too_short():
    assert R.pin_structure_secrets("FEATURE_VERIFY_PIN_DIRECT",
                                   verify_structure(h("00 20 00 80"))) == []
    assert R.pin_structure_secrets("FEATURE_VERIFY_PIN_DIRECT", bytes(19)) == []
    assert R.pin_structure_secrets("FEATURE_IFD_PIN_PROPERTIES", verify_structure(VERIFY)) == []


def test_features_from_get_feature_request():
    answer = h("06 04 42 33 00 06  07 04 42 33 00 07  0A 04 42 33 00 0A  12 04 42 33 00 12")
    assert R.features_from_answer(answer) == {0x42330006: "FEATURE_VERIFY_PIN_DIRECT",
                                              0x42330007: "FEATURE_MODIFY_PIN_DIRECT"}
    assert R.DEFAULT_PIN_CODES == {0x42330006: "FEATURE_VERIFY_PIN_DIRECT",
                                   0x42330007: "FEATURE_MODIFY_PIN_DIRECT"}


# -- calls through the Redactor ---------------------------------------------------------------

def make_call(fname, args=None, entry=None, exit=None, rv=0, pid=1000, tid=1000, ts=10 ** 9):
    fn = BY_NAME[fname]
    full = dict.fromkeys(fn.args, 0)
    full.update(args or {})
    return Call(fn, pid, tid, "app", ts, full, entry or Phase(), exit or Phase(), rv=rv,
                ret_ts=ts + 1000)


def transmit(send: bytes, recv: bytes = h("90 00"), ts=10 ** 9, pid=1000):
    return make_call(
        "SCardTransmit", {"hCard": 0x1234, "pbSendBuffer": 1, "cbSendLength": len(send),
                          "pbRecvBuffer": 1, "pioSendPci": 1},
        Phase(words={"pioSendPci.dwProtocol": 2, "pioSendPci.cbPciLength": 16},
              data={"pbSendBuffer": Captured(send, 0, len(send))}),
        Phase(words={"pioRecvPci.dwProtocol": None, "pioRecvPci.cbPciLength": None,
                     "pcbRecvLength": len(recv)},
              data={"pbRecvBuffer": Captured(recv, 0, len(recv))}), ts=ts, pid=pid)


def control(code: int, send: bytes, recv: bytes = b"", pid=1000, ts=10 ** 9):
    return make_call(
        "SCardControl", {"hCard": 0x1234, "dwControlCode": code, "pbSendBuffer": 1,
                         "cbSendLength": len(send), "pbRecvBuffer": 1},
        Phase(data={"pbSendBuffer": Captured(send, 0, len(send))}),
        Phase(words={"lpBytesReturned": len(recv)},
              data={"pbRecvBuffer": Captured(recv, 0, len(recv))}), pid=pid, ts=ts)


class Seen:
    """A sink remembering the bytes each call had when it got there."""

    def __init__(self):
        self.sent = []

    def enter(self, call):
        self.sent.append(call.entry.data["pbSendBuffer"].data)

    def leave(self, call):
        pass

    def abort(self, call):
        pass


def test_redactor_masks_before_the_sink_sees_the_call():
    seen = Seen()
    r = R.Redactor(seen)
    select = h("00 A4 04 00 07 A0 00 00 03 08 00 00")
    calls = [transmit(select), transmit(VERIFY), transmit(h("00 84 00 00 08"))]
    for c in calls:
        r.enter(c)
        r.leave(c)
    assert seen.sent == [select, h("00 20 00 80 08") + b"*" * 8, h("00 84 00 00 08")]
    cap = calls[1].entry.data["pbSendBuffer"]
    assert isinstance(cap, R.Masked) and cap.masked == ((5, 8),) and cap.total == 13
    assert type(calls[0].entry.data["pbSendBuffer"]) is Captured
    assert calls[1].exit.data["pbRecvBuffer"].data == h("90 00")   # responses untouched


def test_redactor_pin_pad_with_libccid_codes():
    seen = Seen()
    r = R.Redactor(seen)
    s = verify_structure(VERIFY)
    r.enter(control(0x42330006, s))
    r.enter(control(0x42330099, s))                 # not a PIN feature: untouched
    assert seen.sent == [s[:24] + b"*" * 8, s]


def test_redactor_learns_codes_from_get_feature_request():
    seen = Seen()
    r = R.Redactor(seen)
    s = modify_structure(h("00 24 00 80 10") + PIN + PIN)
    features = control(0x42000D48, b"", h("07 04 42 00 0D 77"), pid=7)
    r.enter(features)
    r.leave(features)
    r.enter(control(0x42000D77, s, pid=7))
    r.enter(control(0x42000D77, s, pid=8))          # another process: not told
    assert seen.sent[1:] == [s[:29] + b"*" * 16, s]


def test_redaction_is_idempotent():
    c = transmit(VERIFY)
    r = R.Redactor(Seen())
    r.redact(c)
    first = c.entry.data["pbSendBuffer"]
    r.redact(c)
    assert c.entry.data["pbSendBuffer"] is first


# -- the session's outputs, from a recording (no BPF) ------------------------------------------

WRONG_PIN = b"135790".ljust(8, b"\xff")
SECRETS = [b"123456", b"135790"]


def secret_forms(secret: bytes):
    """The ways a secret shows: hex with and without spaces (either case),
    the hexdump's ASCII column, and its first three bytes alone."""
    forms = {secret.decode()}
    for part in (secret, secret[:3]):
        forms |= {part.hex(" ").upper(), part.hex().upper(), part.hex(" "), part.hex()}
    return forms


def assert_no_secret(text: str, where: str):
    for secret in SECRETS:
        for form in secret_forms(secret):
            assert form not in text, "%r in %s" % (form, where)


def json_strings(obj):
    """Every string of a JSON value (numbers are timestamps, pids, addresses)."""
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield k
            yield from json_strings(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from json_strings(v)


def assert_no_secret_in_json(lines: str, where: str):
    for line in lines.splitlines():
        assert_no_secret("\n".join(json_strings(json.loads(line))), where)


SELECT_PIV = h("00 A4 04 00 07 A0 00 00 03 08 00 00")
VERIFY_WRONG = h("00 20 00 80 08") + WRONG_PIN
GET_CHALLENGE = h("00 84 00 00 08")


def write_recording(path: Path):
    calls = [transmit(SELECT_PIV, ts=1000), transmit(VERIFY, ts=2000),
             transmit(VERIFY_WRONG, h("63 C2"), ts=3000),
             transmit(GET_CHALLENGE, bytes(range(8)) + h("90 00"), ts=4000),
             control(0x42330006, verify_structure(VERIFY), ts=5000)]
    with open(path, "w") as f:
        f.write(json.dumps(record.header(["libpcsclite.so.1"])) + "\n")
        for c in calls:
            f.write(json.dumps(record.call_to_json(c)) + "\n")


def run_session(**options) -> str:
    out = io.StringIO()
    assert session.run(session.Options(**options), out=out) == 0
    return out.getvalue()


def test_render_with_redact(tmp_path):
    rec = tmp_path / "plain.jsonl"
    write_recording(rec)
    assert "313233343536FFFF" in rec.read_text()          # the recording holds the PIN
    text = run_session(read=str(rec), diffable=True, redact=True, apdu=True,
                       smartcard_list=FIXTURE_LIST)
    assert_no_secret(calls_part(text), "-r --redact")
    assert " i  0000 00 20 00 80 08 2A 2A 2A 2A 2A 2A 2A 2A          . ...********" in text
    assert " i  0000 00 A4 04 00 07 A0 00 00 03 08 00 00             ............" in text
    assert " #   data: 8 bytes (reference data), masked by --redact" in text
    assert " # R-APDU: SW 63 C2: verification failed, 2 tries left" in text
    # SCardControl: the PIN_VERIFY_STRUCTURE's template, header kept.
    assert " i  0000 00 1E 82 08 00 08 04 02 01 09 04 00 00 00 00 0D ................" in text
    assert " i  0010 00 00 00 00 20 00 80 08 2A 2A 2A 2A 2A 2A 2A 2A .... ...********" in text


def test_render_without_redact_shows_the_pin(tmp_path):
    rec = tmp_path / "plain.jsonl"
    write_recording(rec)
    text = run_session(read=str(rec), diffable=True)
    assert "31 32 33 34 35 36 FF FF          . ...123456.." in text
    assert " # " not in text


def test_json_and_recording_with_redact(tmp_path):
    rec, again = tmp_path / "plain.jsonl", tmp_path / "redacted.jsonl"
    write_recording(rec)
    out = run_session(read=str(rec), json=True, redact=True, apdu=True,
                      smartcard_list=FIXTURE_LIST)
    assert_no_secret_in_json(out, "--json --redact")
    calls = [json.loads(line) for line in out.splitlines()[1:]]
    verify = calls[1]["entry"]["data"]["pbSendBuffer"]
    assert verify == {"hex": "0020008008" + "2A" * 8, "total": 13, "null": False, "fault": False,
                      "truncated": False, "redacted": [[5, 8]]}
    assert calls[1]["decoded"]["command"]["masked"] is True
    assert calls[2]["decoded"]["response"]["meaning"] == "verification failed, 2 tries left"
    assert calls[0]["entry"]["data"]["pbSendBuffer"]["hex"] == SELECT_PIV.hex().upper()
    assert "redacted" not in calls[0]["entry"]["data"]["pbSendBuffer"]
    assert calls[4]["entry"]["data"]["pbSendBuffer"]["redacted"] == [[24, 8]]
    # A redacted recording read back keeps its marks (and --apdu says masked).
    again.write_text(out)
    text = run_session(read=str(again), diffable=True, apdu=True)
    assert " #   data: 8 bytes (reference data), masked by --redact" in text
    assert_no_secret(calls_part(text), "-r of a redacted recording")


# -- a real run: pcscd, the virtual card, the tracer ------------------------------------------

CLIENT = r"""
import sys
sys.path.insert(0, sys.argv[2])
from pcsc_ctypes_client import Context
apdus = [bytes.fromhex(a) for a in sys.argv[3:]]
with Context() as ctx:
    reader = ctx.list_readers()[0]
    ctx.get_status(reader)
    with ctx.connect(reader) as card:
        answers = [card.transmit(a).hex().upper() for a in apdus]
with open(sys.argv[1], "w") as f:
    f.write("\n".join(answers) + "\n")
"""
APDUS = [SELECT_PIV, VERIFY, VERIFY_WRONG, GET_CHALLENGE]
ANSWERS = ["9000", "9000", "63C2", "00010203040506079000"]


def spy_client(stack, tmp_path, name, *args):
    """pcsc-ebpf-spy ARGS -- the client (command mode); the client's answers
    are checked (the card did answer what the test expects)."""
    answers = tmp_path / (name + ".answers")
    res = subprocess.run(command(*args, "--", PYTHON, "-c", CLIENT, answers, TESTS_DIR,
                                 *[a.hex() for a in APDUS]),
                         cwd=ROOT, env=stack.env, capture_output=True, text=True, timeout=180,
                         stdin=subprocess.DEVNULL)
    assert res.returncode == 0, res.stderr
    assert answers.read_text().split() == ANSWERS
    return res.stdout


def render(*args) -> str:
    res = subprocess.run(command(*args), cwd=ROOT, capture_output=True, text=True, timeout=120,
                         stdin=subprocess.DEVNULL)
    assert res.returncode == 0, res.stderr
    return res.stdout


def check_text(text: str, where: str):
    calls = calls_part(text)
    assert_no_secret(calls, where)
    for line in [
        " i  0000 00 A4 04 00 07 A0 00 00 03 08 00 00             ............",
        " i  0000 00 20 00 80 08 2A 2A 2A 2A 2A 2A 2A 2A          . ...********",
        " i  0000 00 84 00 00 08                                  .....",
        " o  0000 00 01 02 03 04 05 06 07 90 00                   ..........",
        " # C-APDU: SELECT (ISO 7816-4), case 3 short: Lc=7",
        " #   AID A0 00 00 03 08 00 00: PIV (NIST SP 800-73)",
        " # C-APDU: VERIFY (ISO 7816-4), case 3 short: Lc=8",
        " #   P1 00, P2 80: specific reference data 0 = PIV Card Application PIN (PIV)",
        " #   data: 8 bytes (reference data), masked by --redact",
        " # R-APDU: SW 63 C2: verification failed, 2 tries left",
        " # C-APDU: GET CHALLENGE (ISO 7816-4), case 2 short: Le=8",
        " # R-APDU: 8 data bytes, SW 90 00: success",
        " # ATR: 3B 80 80 01 01 (Virtual PCD 00 00)",
        " #   card: Virtual card of tests/vcard.py (fixture)",
    ]:
        assert line + "\n" in calls, "%r not in %s" % (line, where)
    assert calls.count(" # R-APDU: SW 90 00: success\n") == 2      # SELECT, right PIN
    assert calls.count("2A 2A 2A 2A 2A 2A 2A 2A") == 2             # both VERIFYs


def check_json(lines: str, where: str):
    assert_no_secret_in_json(lines, where)
    calls = [json.loads(line) for line in lines.splitlines()[1:]]
    sent = [c["entry"]["data"]["pbSendBuffer"] for c in calls if c["function"] == "SCardTransmit"]
    assert [s["hex"] for s in sent] == [SELECT_PIV.hex().upper(), "0020008008" + "2A" * 8,
                                        "0020008008" + "2A" * 8, GET_CHALLENGE.hex().upper()]
    assert [s.get("redacted") for s in sent] == [None, [[5, 8]], [[5, 8]], None]
    return calls


def test_real_run_text_json_and_recording(stack, tmp_path):
    rec = tmp_path / "redacted.jsonl"
    text = spy_client(stack, tmp_path, "text", "-n", "-d", "--apdu", "--redact",
                      "--smartcard-list", FIXTURE_LIST, "-w", rec)
    check_text(text, "live text")
    check_json(rec.read_text(), "-w recording")

    out = spy_client(stack, tmp_path, "json", "--json", "--apdu", "--redact",
                     "--smartcard-list", FIXTURE_LIST)
    calls = check_json(out, "--json")
    transmits = [c for c in calls if c["function"] == "SCardTransmit"]
    assert [t["decoded"]["response"]["sw"] for t in transmits] == ["9000", "9000", "63C2", "9000"]
    assert transmits[2]["decoded"]["response"]["meaning"] == "verification failed, 2 tries left"
    assert transmits[1]["decoded"]["command"]["name"] == "VERIFY"
    atrs = [a for c in calls for a in c.get("decoded", {}).get("atrs", [])]
    assert atrs and atrs[0]["cards"][0] == "Virtual card of tests/vcard.py (fixture)"


def test_real_recording_without_redact_rendered_with_redact(stack, tmp_path):
    rec = tmp_path / "plain.jsonl"
    assert spy_client(stack, tmp_path, "plain", "-q", "-w", rec) == ""
    assert PIN.hex().upper() in rec.read_text()         # recorded as it was
    assert WRONG_PIN.hex().upper() in rec.read_text()
    check_text(render("-r", rec, "-n", "-d", "--redact", "--apdu",
                      "--smartcard-list", FIXTURE_LIST), "-r --redact")
    check_json(render("-r", rec, "--json", "--redact"), "-r --json --redact")
    # And without --redact, -r shows the PIN: the masking is --redact's doing.
    assert "31 32 33 34 35 36 FF FF" in render("-r", rec, "-n", "-d")
