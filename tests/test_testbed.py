"""The private PC/SC stack works for real: pcscd + vpcd + tests/vcard.py, seen by real clients.

Needs root (mount namespace, /proc/<pid>/root) and the Debian packages pcscd,
vsmartcard-vpcd, libpcsclite1, pcsc-tools and opensc.
"""
import os

import pytest

import vcard
from pcsc_ctypes_client import SCARD_STATE_EMPTY, SCARD_STATE_PRESENT
from testbed import PcscStack

READER = "Virtual PCD 00 00"


@pytest.fixture(scope="module")
def stack():
    """A shared stack for the tests that leave it as they found it (card inserted)."""
    with PcscStack() as s:
        yield s


@pytest.fixture
def own_stack():
    """A stack of its own, for tests that remove the card or restart pcscd."""
    with PcscStack() as s:
        yield s


def transmit(stack, *apdus):
    """Send hex APDUs through pcsc-lite (ctypes client in a subprocess), return responses."""
    r = stack.client("transmit", stack.reader_name, input="".join(a + "\n" for a in apdus))
    assert r.returncode == 0, r.stderr
    return r.stdout.split()


def test_reader_listed(stack):
    assert stack.reader_name == READER
    r = stack.client("list")
    assert r.returncode == 0, r.stderr
    # vpcd always makes two slots; the card sits in slot 0
    assert r.stdout.splitlines() == [READER, "Virtual PCD 00 01"]


def test_card_present_with_atr(stack):
    r = stack.client("state", stack.reader_name)
    assert r.returncode == 0, r.stderr
    state, atr = r.stdout.split()
    assert int(state, 16) & SCARD_STATE_PRESENT
    assert bytes.fromhex(atr) == vcard.ATR


def test_ctypes_client_demo(stack):
    r = stack.client()  # default command: the demo sequence
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    for func in ("SCardEstablishContext", "SCardListReaders", "SCardConnect",
                 "SCardDisconnect", "SCardReleaseContext"):
        assert f"{func}: 0x00000000" in out
    assert out.count("SCardTransmit: 0x00000000") == 2
    assert "active protocol: T=1" in out
    assert "< 90 00" in out
    assert "< 00 01 02 03 04 05 06 07 90 00" in out


def test_opensc_tool_reads_atr(stack):
    r = stack.run(["opensc-tool", "-a"])
    assert r.returncode == 0, r.stderr
    assert vcard.ATR.hex(":") in r.stdout


def test_pcsc_scan_lists_reader(stack):
    r = stack.run(["timeout", "10", "pcsc_scan", "-r"])
    assert r.returncode == 0, r.stderr
    assert f"0: {READER}" in r.stdout


def test_card_commands(stack):
    pin_ok = "00200080" + "08" + b"123456".hex() + "FFFF"
    pin_bad = "00200080" + "08" + b"654321".hex() + "FFFF"
    assert transmit(stack, "00A4040007A0000003080000", "8010000003AABBCC00", "0084000000",
                    pin_ok, pin_bad, "00CA000005", "00B0000000") == [
        "9000", "AABBCC9000", bytes(range(256)).hex().upper() + "9000",
        "9000", "63C2", "01020304059000", "6D00"]


def test_extended_echo_65000_bytes(stack):
    data = bytes((i * 7 + i // 256) & 0xFF for i in range(65000))
    apdu = bytes.fromhex("80100000 00") + len(data).to_bytes(2, "big") + data + b"\0\0"
    [response] = transmit(stack, apdu.hex())
    assert bytes.fromhex(response) == data + b"\x90\x00"


def test_remove_and_insert_card(own_stack):
    card_pid = own_stack.card_pid
    own_stack.stop_card()
    state = own_stack.reader_state()
    assert state & SCARD_STATE_EMPTY and not state & SCARD_STATE_PRESENT
    assert own_stack.card_pid is None and not os.path.exists(f"/proc/{card_pid}")
    own_stack.start_card()
    assert own_stack.reader_state() & SCARD_STATE_PRESENT
    assert transmit(own_stack, "00CA000005") == ["01020304059000"]


def test_restart_pcscd(own_stack):
    old_pid = own_stack.pcscd_pid
    own_stack.restart_pcscd()
    assert own_stack.pcscd_pid != old_pid
    assert not os.path.exists(f"/proc/{old_pid}")
    with open(f"/proc/{own_stack.pcscd_pid}/comm") as f:
        assert f.read().strip() == "pcscd"
    assert own_stack.reader_name == READER
    assert own_stack.reader_state() & SCARD_STATE_PRESENT  # the card reconnected by itself
    r = own_stack.client()
    assert r.returncode == 0, r.stdout + r.stderr


def test_close_leaves_nothing_behind():
    s = PcscStack()
    pids, tmpdir = [s.pcscd_pid, s.card_pid], s.tmpdir
    s.close()
    s.close()  # idempotent
    assert not any(os.path.exists(f"/proc/{pid}") for pid in pids)
    assert not tmpdir.exists()
