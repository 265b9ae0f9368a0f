#!/usr/bin/python3
"""A fast, deterministic virtual smart card for vpcd (vsmartcard's virtual reader driver).

Run it as ``/usr/bin/python3 tests/vcard.py --port PORT``: it connects to vpcd on
127.0.0.1:PORT and answers until it gets SIGTERM (clean exit, no traceback). When vpcd
closes the connection (pcscd stopped or restarted) or is not listening yet, the card
retries every few milliseconds, so it follows pcscd restarts by itself.

vpcd protocol: every frame is a 2-byte big-endian length followed by the payload. A 1-byte
payload is a control message (0 power off, 1 power on, 2 reset, 4 "send the ATR"); only
"send the ATR" gets a reply (the ATR as a frame). Longer payloads are command APDUs and get
one response APDU frame each.

Behaviour (tests rely on it):

- ATR ``3B 80 80 01 01`` (constant ``ATR``; no historical bytes, the ATR PC/SC part 3 gives
  contactless ISO 14443-4 cards; pcsc-lite negotiates T=1 with it).
- Short and extended APDUs of cases 1 to 4 are parsed (extended: byte 4 is 00 and the APDU
  has at least 7 bytes). A malformed length gives ``67 00``.
- SELECT        ``00 A4 04 00 Lc AID [Le]``  -> ``90 00`` for any AID.
- ECHO          ``80 10 00 00 Lc DATA [Le]`` -> DATA + ``90 00`` (short or extended; up to
  65,000 bytes of DATA and more, i.e. a 65,002-byte response).
- GET CHALLENGE ``00 84 00 00 Le``           -> ``bytes(i & 0xFF for i in range(Le))`` +
  ``90 00``; Le 0 means 256 (short) or 65,536 (extended).
- VERIFY        ``00 20 00 80 Lc PIN``       -> ``90 00`` if PIN is b"123456" padded with FF
  to 8 bytes, else ``63 C2`` (also for a VERIFY without data).
- GET DATA      ``00 CA 00 00 Le``           -> ``01 02 03 04 05 90 00``.
- any other CLA/INS                          -> ``6D 00``. P1/P2 are not checked.

Importable: ``respond(apdu) -> bytes`` is the card logic, ``parse_apdu`` the APDU parser.
"""
import argparse
import signal
import socket
import struct
import sys
import time

ATR = bytes.fromhex("3B 80 80 01 01")
PIN = b"123456".ljust(8, b"\xff")

SW_OK = b"\x90\x00"
SW_WRONG_LENGTH = b"\x67\x00"
SW_WRONG_PIN = b"\x63\xc2"
SW_INS_NOT_SUPPORTED = b"\x6d\x00"

CTRL_OFF, CTRL_ON, CTRL_RESET, CTRL_ATR = 0, 1, 2, 4

RECONNECT_DELAY = 0.02  # seconds between connection attempts


def parse_apdu(apdu):
    """Split a command APDU into (cla, ins, p1, p2, data, le).

    le is None when absent, else the expected length with 0 already mapped to 256 (short)
    or 65,536 (extended). Raises ValueError on a malformed length.
    """
    if len(apdu) < 4:
        raise ValueError("APDU shorter than 4 bytes")
    cla, ins, p1, p2 = apdu[:4]
    body = apdu[4:]
    if not body:                                    # case 1
        return cla, ins, p1, p2, b"", None
    if len(body) == 1:                              # case 2 short
        return cla, ins, p1, p2, b"", body[0] or 256
    if body[0] == 0 and len(body) >= 3:             # extended
        if len(body) == 3:                          # case 2E
            return cla, ins, p1, p2, b"", int.from_bytes(body[1:3], "big") or 65536
        lc = int.from_bytes(body[1:3], "big")
        rest = body[3 + lc:]
        if lc == 0 or len(body) < 3 + lc or len(rest) not in (0, 2):
            raise ValueError("bad extended Lc/Le")
        le = (int.from_bytes(rest, "big") or 65536) if rest else None
        return cla, ins, p1, p2, body[3:3 + lc], le
    lc = body[0]                                    # cases 3 and 4 short
    rest = body[1 + lc:]
    if lc == 0 or len(body) < 1 + lc or len(rest) > 1:
        raise ValueError("bad short Lc/Le")
    return cla, ins, p1, p2, body[1:1 + lc], (rest[0] or 256) if rest else None


def respond(apdu):
    """Return the response APDU (data + status word) for one command APDU."""
    try:
        cla, ins, _p1, _p2, data, le = parse_apdu(apdu)
    except ValueError:
        return SW_WRONG_LENGTH
    if (cla, ins) == (0x00, 0xA4):                  # SELECT
        return SW_OK
    if (cla, ins) == (0x80, 0x10):                  # ECHO
        return data + SW_OK
    if (cla, ins) == (0x00, 0x84):                  # GET CHALLENGE
        return bytes(i & 0xFF for i in range(le or 0)) + SW_OK
    if (cla, ins) == (0x00, 0x20):                  # VERIFY
        return SW_OK if data == PIN else SW_WRONG_PIN
    if (cla, ins) == (0x00, 0xCA):                  # GET DATA
        return bytes([1, 2, 3, 4, 5]) + SW_OK
    return SW_INS_NOT_SUPPORTED


def _recv_exact(sock, n):
    """Read exactly n bytes; None if the peer closed the connection."""
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            return None
        # The kernel clears QUICKACK again after a while: re-arm it after every read so
        # vpcd's next frame is not held back by a delayed ACK (~40 ms per round trip).
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
        buf += chunk
    return bytes(buf)


def _send_frame(sock, payload):
    sock.sendall(struct.pack(">H", len(payload)) + payload)


def serve(sock):
    """Answer vpcd on one connection until it closes."""
    while True:
        header = _recv_exact(sock, 2)
        if header is None:
            return
        payload = _recv_exact(sock, struct.unpack(">H", header)[0])
        if payload is None:
            return
        if len(payload) == 1:
            if payload[0] == CTRL_ATR:
                _send_frame(sock, ATR)
            # power off / on / reset: the card has no state to reset and vpcd expects no reply
        else:
            _send_frame(sock, respond(payload))


def run(port, host="127.0.0.1"):
    """Connect to vpcd and serve forever, reconnecting whenever the connection goes away."""
    while True:
        try:
            with socket.create_connection((host, port)) as sock:
                # Nagle would hold back our small replies until vpcd ACKs: disable it.
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                serve(sock)
        except OSError:
            pass  # vpcd not listening yet, or the connection was reset: retry
        time.sleep(RECONNECT_DELAY)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True, help="vpcd TCP port (reader.conf CHANNELID)")
    parser.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args(argv)
    # SIGTERM ends the process through SystemExit: sockets close, no traceback.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        run(args.port, args.host)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
