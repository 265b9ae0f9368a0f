"""ATRs decoded (ebpf_pcsc.atr, ISO/IEC 7816-3 8.2) and identified from a
smartcard_list.txt.  The list used is the fixture tests/data/smartcard_list.txt
(pcsc-tools' format, entries written for these tests): the tests do not
depend on pcsc-tools being installed.  Expectations are written by hand."""
from pathlib import Path

import pytest

from ebpf_pcsc import atr as T

FIXTURE_LIST = str(Path(__file__).resolve().parent / "data" / "smartcard_list.txt")


def h(text: str) -> bytes:
    return bytes.fromhex(text)


@pytest.mark.parametrize("atr, lines", [
    # The virtual card's (ISO 14443-4 contactless, PC/SC part 3 form): T=0 and T=1.
    ("3B 80 80 01 01", [
        "TS 3B: direct convention",
        "T0 80: 0 historical bytes; TD1 present",
        "TD1 80: protocol T=0; TD2 present",
        "TD2 01: protocol T=1",
        "historical bytes: none",
        "TCK 01: correct",
        "protocols: T=0, T=1",
    ]),
    # T=1 with TA1 (Fi/Di), TB1, TC1, a T=1 group (IFSC, BWI/CWI) and ASCII historical bytes.
    ("3B F8 13 00 00 81 31 FE 15 59 75 62 69 6B 65 79 34 D4", [
        "TS 3B: direct convention",
        "T0 F8: 8 historical bytes; TA1, TB1, TC1, TD1 present",
        "TA1 13: Fi=372, Di=4, 93 cycles/ETU, f(max)=5 MHz",
        "TB1 00: VPP not connected (deprecated)",
        "TC1 00: extra guard time N=0",
        "TD1 81: protocol T=1; TD2 present",
        "TD2 31: protocol T=1; TA3, TB3 present",
        "TA3 FE: IFSC=254",
        "TB3 15: BWI=1, CWI=5",
        "historical bytes: 59 75 62 69 6B 65 79 34  Yubikey4",
        " category 59: proprietary",
        "TCK D4: correct",
        "protocols: T=1",
    ]),
    # PC/SC part 3 storage card (MIFARE Classic 1K).
    ("3B 8F 80 01 80 4F 0C A0 00 00 03 06 03 00 01 00 00 00 00 6A", [
        "TS 3B: direct convention",
        "T0 8F: 15 historical bytes; TD1 present",
        "TD1 80: protocol T=0; TD2 present",
        "TD2 01: protocol T=1",
        "historical bytes: 80 4F 0C A0 00 00 03 06 03 00 01 00 00 00 00  .O.............",
        " PC/SC part 3 storage card: ISO 14443 A part 3, MIFARE Classic 1K",
        "TCK 6A: correct",
        "protocols: T=0, T=1",
    ]),
    # T=1 and T=15 (clock stop, classes), compact-TLV historical bytes.
    ("3B DC 18 FF 81 91 FE 1F C3 80 73 C8 21 13 66 05 03 63 51 00 02 50", [
        "TS 3B: direct convention",
        "T0 DC: 12 historical bytes; TA1, TC1, TD1 present",
        "TA1 18: Fi=372, Di=12, 31 cycles/ETU, f(max)=5 MHz",
        "TC1 FF: extra guard time N=255: minimum guard time",
        "TD1 81: protocol T=1; TD2 present",
        "TD2 91: protocol T=1; TA3, TD3 present",
        "TA3 FE: IFSC=254",
        "TD3 1F: protocol T=15; TA4 present",
        "TA4 C3: clock stop no preference, class A (5 V), B (3 V)",
        "historical bytes: 80 73 C8 21 13 66 05 03 63 51 00 02  .s.!.f..cQ..",
        " category 80: compact-TLV data objects",
        "  tag 7 (card capabilities): C8 21 13",
        "  tag 6 (pre-issuing data): 05 03 63 51 00 02",
        "TCK 50: correct",
        "protocols: T=1, T=15",
    ]),
    # T=0 only: no TD1, no TCK; category 80 with a status indicator object.
    ("3B 6E 00 00 80 31 80 66 B0 84 0C 01 6E 01 83 00 90 00", [
        "TS 3B: direct convention",
        "T0 6E: 14 historical bytes; TB1, TC1 present",
        "TB1 00: VPP not connected (deprecated)",
        "TC1 00: extra guard time N=0",
        "historical bytes: 80 31 80 66 B0 84 0C 01 6E 01 83 00 90 00  .1.f....n.....",
        " category 80: compact-TLV data objects",
        "  tag 3 (card service data): 80",
        "  tag 6 (pre-issuing data): B0 84 0C 01 6E 01",
        "  tag 8 (status indicator): 00 90 00",
        "protocols: T=0",
    ]),
    # Inverse convention, TA1 96 (Fi=512, Di=32), T=15 global bytes; cut short.
    ("3F 96 96 80 1F 03 00", [
        "TS 3F: inverse convention",
        "T0 96: 6 historical bytes; TA1, TD1 present",
        "TA1 96: Fi=512, Di=32, 16 cycles/ETU, f(max)=5 MHz",
        "TD1 80: protocol T=0; TD2 present",
        "TD2 1F: protocol T=15; TA3 present",
        "TA3 03: clock stop not supported, class A (5 V), B (3 V)",
        "historical bytes: 00  .",
        " category 00: compact-TLV data objects and a status indicator",
        "protocols: T=0, T=15",
        "error: 6 historical bytes announced, 1 present",
    ]),
])
def test_describe(atr, lines):
    assert T.describe(h(atr))[1] == lines


def test_groups_specific_mode_and_work_waiting_time():
    a = T.parse(h("3B 50 11 01"))                       # Y1=5: TA1 and TC1; no TD1, no TCK
    assert [(g.index, g.ta, g.tb, g.tc, g.td) for g in a.groups] == [(1, 0x11, None, 0x01, None)]
    assert a.protocols == [0] and a.tck is None and a.errors == []
    lines = T.describe(h("3B 90 11 D0 91 0A 00"))[1]    # TD1 D0: TA2, TC2, TD2 follow
    assert lines[3:] == [
        "TD1 D0: protocol T=0; TA2, TC2, TD2 present",
        "TA2 91: specific mode, T=1, cannot change mode, implicit parameters",
        "TC2 0A: work waiting integer WI=10 (T=0)",
        "TD2 00: protocol T=0",
        "historical bytes: none",
        "protocols: T=0",
    ]


def test_checksum_and_errors():
    assert T.parse(h("3B 80 80 01 01")).tck_ok is True
    assert T.describe(h("3B 80 80 01 00"))[1][5] == "TCK 00: wrong checksum"
    assert T.parse(h("3B 80 80 01")).errors == ["TCK missing"]
    assert T.parse(h("3B 80 80 01 01 FF")).errors == ["1 extra bytes after the ATR"]
    assert T.parse(h("3B 8F 80 01 80 4F")).errors == ["15 historical bytes announced, 2 present"]
    assert T.parse(h("3B F0 11")).errors == ["TB1 missing: the ATR is truncated"]
    assert T.parse(h("3B")).errors == ["T0 missing"]
    assert T.parse(h("")).errors == ["empty ATR"]
    assert T.parse(h("12 00")).errors == ["TS 12 is neither 3B (direct) nor 3F (inverse convention)"]


# -- identification from smartcard_list.txt -------------------------------------------------

def test_exact_entry():
    cards, path = T.identify(h("3B 80 80 01 01"), FIXTURE_LIST)
    assert path == FIXTURE_LIST
    assert cards == ["Virtual card of tests/vcard.py (fixture)",
                     "ISO 14443-4 card without historical bytes (fixture)"]


def test_wildcards_and_every_matching_entry_in_file_order():
    cards, _ = T.identify(h("3B F8 13 00 00 81 31 FE 15 59 75 62 69 6B 65 79 34 D4"), FIXTURE_LIST)
    assert cards == ["Any T=1 card with 8 historical bytes (fixture, .. wildcards)",
                     "The exact T=1 card (fixture, listed after the wildcard entry)"]
    cards, _ = T.identify(h("3B F8 13 00 00 81 31 FE 15 01 02 03 04 05 06 07 08 AA"), FIXTURE_LIST)
    assert cards == ["Any T=1 card with 8 historical bytes (fixture, .. wildcards)"]


def test_a_wildcard_is_one_whole_byte():
    # ".." is two hex digits: one byte missing or one too many does not match.
    assert T.identify(h("3B F8 13 00 00 81 31 FE 15 01 02 03 04 05 06 07 08"), FIXTURE_LIST)[0] == []
    assert T.identify(h("3B F8 13 00 00 81 31 FE 15 01 02 03 04 05 06 07 08 AA BB"),
                      FIXTURE_LIST)[0] == []


def test_character_class_and_tail():
    cls = "T=0 card with compact-TLV historical bytes (fixture, character class)"
    assert T.identify(h("3B 6E 00 00 80 31 80 66 B0 84 07 01 6E 01 83 00 90 00"),
                      FIXTURE_LIST)[0] == [cls]
    assert T.identify(h("3B 6E 00 00 80 31 80 66 B0 84 0C 01 6E 01 83 00 90 00"),
                      FIXTURE_LIST)[0] == []
    tail = ["T=1 and T=15 card (fixture, .* tail)"]
    assert T.identify(h("3B DC 18 FF 81 91 FE 1F C3 80 73 C8 21 13 66 05 03 63 51 00 02 50"),
                      FIXTURE_LIST)[0] == tail


def test_not_listed_and_no_list(tmp_path):
    assert T.identify(h("3B 00"), FIXTURE_LIST) == ([], FIXTURE_LIST)
    missing = str(tmp_path / "none.txt")
    assert T.identify(h("3B 80 80 01 01"), missing) == (None, missing)


def test_default_list_path():
    # Only the path is checked: the tests do not depend on pcsc-tools.
    assert T.identify(h("3B 80 80 01 01"))[1] == "/usr/share/pcsc/smartcard_list.txt"


def test_the_list_is_read_once(tmp_path):
    path = tmp_path / "list.txt"
    path.write_text("3B 01 02\n\tOne (fixture)\n")
    assert T.identify(h("3B 01 02"), str(path))[0] == ["One (fixture)"]
    path.write_text("3B 01 02\n\tTwo (fixture)\n")
    assert T.identify(h("3B 01 02"), str(path))[0] == ["One (fixture)"]   # cached
