#!/usr/bin/python3
"""A small PC/SC client on libpcsclite.so.1 through ctypes (so the library is dlopen()ed).

Commands (all use the daemon named by PCSCLITE_CSOCK_NAME, e.g. ``PcscStack.env``):

    pcsc_ctypes_client.py [demo] [--reader NAME]
        establish a context, list the readers, connect (shared, T0|T1) to NAME (default:
        the first reader), transmit SELECT 00 A4 04 00 07 A0 00 00 03 08 00 00 and
        GET CHALLENGE 00 84 00 00 08, disconnect, release; prints each result code.
    pcsc_ctypes_client.py list
        prints the readers, one per line.
    pcsc_ctypes_client.py state READER
        prints the reader's event state (hex) and its ATR (hex).
    pcsc_ctypes_client.py wait READER {present,empty} TIMEOUT
        waits (SCardGetStatusChange, no polling) until the reader has that state.
    pcsc_ctypes_client.py transmit READER
        connects, then for each line of stdin (a command APDU in hex) prints the response
        APDU in hex (stdin, not argv: a 65,007-byte APDU is too long for one argument).

Exit status 0 on success, 1 on a PC/SC error (the message names the function and code),
2 when ``wait`` times out.
Importable: ``Context`` and ``Card`` wrap the calls and raise ``PcscError``.

libpcsclite reads PCSCLITE_CSOCK_NAME once per process, so a process talks to one daemon
for its whole life: that is why the test bed runs this file as a subprocess.
"""
import argparse
import ctypes
import sys
import time

# On Linux x86-64 DWORD/LONG/SCARDCONTEXT/SCARDHANDLE are unsigned long / long (8 bytes).
DWORD = ctypes.c_ulong
LONG = ctypes.c_long
SCARDCONTEXT = ctypes.c_long
SCARDHANDLE = ctypes.c_long

SCARD_S_SUCCESS = 0x00000000
SCARD_E_TIMEOUT = 0x8010000A
SCARD_SCOPE_SYSTEM = 2
SCARD_SHARE_SHARED = 2
SCARD_PROTOCOL_T0 = 1
SCARD_PROTOCOL_T1 = 2
SCARD_LEAVE_CARD = 0
SCARD_STATE_UNAWARE = 0x0000
SCARD_STATE_CHANGED = 0x0002
SCARD_STATE_EMPTY = 0x0010
SCARD_STATE_PRESENT = 0x0020
MAX_ATR_SIZE = 33
MAX_BUFFER_SIZE_EXTENDED = 65548

SELECT = bytes.fromhex("00 A4 04 00 07 A0 00 00 03 08 00 00")
GET_CHALLENGE = bytes.fromhex("00 84 00 00 08")


class SCARD_IO_REQUEST(ctypes.Structure):
    _fields_ = [("dwProtocol", DWORD), ("cbPciLength", DWORD)]


class SCARD_READERSTATE(ctypes.Structure):
    _fields_ = [("szReader", ctypes.c_char_p), ("pvUserData", ctypes.c_void_p),
                ("dwCurrentState", DWORD), ("dwEventState", DWORD), ("cbAtr", DWORD),
                ("rgbAtr", ctypes.c_ubyte * MAX_ATR_SIZE)]


def _load():
    lib = ctypes.CDLL("libpcsclite.so.1")
    P = ctypes.POINTER
    signatures = {
        "SCardEstablishContext": [DWORD, ctypes.c_void_p, ctypes.c_void_p, P(SCARDCONTEXT)],
        "SCardReleaseContext": [SCARDCONTEXT],
        "SCardListReaders": [SCARDCONTEXT, ctypes.c_char_p, ctypes.c_char_p, P(DWORD)],
        "SCardGetStatusChange": [SCARDCONTEXT, DWORD, P(SCARD_READERSTATE), DWORD],
        "SCardConnect": [SCARDCONTEXT, ctypes.c_char_p, DWORD, DWORD, P(SCARDHANDLE), P(DWORD)],
        "SCardDisconnect": [SCARDHANDLE, DWORD],
        "SCardTransmit": [SCARDHANDLE, P(SCARD_IO_REQUEST), ctypes.c_char_p, DWORD,
                          P(SCARD_IO_REQUEST), ctypes.c_char_p, P(DWORD)],
    }
    for name, argtypes in signatures.items():
        func = getattr(lib, name)
        func.argtypes = argtypes
        func.restype = LONG
    lib.pcsc_stringify_error.argtypes = [LONG]
    lib.pcsc_stringify_error.restype = ctypes.c_char_p
    return lib


lib = _load()


def describe(rv):
    """'0x00000000 (Command successful.)' for a PC/SC result code."""
    rv &= 0xFFFFFFFF
    text = lib.pcsc_stringify_error(ctypes.c_long(rv)).decode()
    return f"0x{rv:08X} ({text})"


class PcscError(Exception):
    def __init__(self, func, rv):
        self.func, self.rv = func, rv & 0xFFFFFFFF
        super().__init__(f"{func}: {describe(rv)}")


def _call(name, *args, verbose=False):
    rv = getattr(lib, name)(*args) & 0xFFFFFFFF
    if verbose:
        print(f"{name}: {describe(rv)}")
    if rv != SCARD_S_SUCCESS:
        raise PcscError(name, rv)


class Card:
    """A connected card (SCardConnect handle)."""

    def __init__(self, handle, protocol, verbose=False):
        self.handle, self.protocol, self.verbose = handle, protocol, verbose

    def transmit(self, apdu, recv_size=MAX_BUFFER_SIZE_EXTENDED):
        """Send one command APDU, return the response APDU (data + status word)."""
        send_pci = SCARD_IO_REQUEST(self.protocol, ctypes.sizeof(SCARD_IO_REQUEST))
        recv = ctypes.create_string_buffer(recv_size)
        recv_len = DWORD(recv_size)
        _call("SCardTransmit", self.handle, ctypes.byref(send_pci), apdu, len(apdu),
              None, recv, ctypes.byref(recv_len), verbose=self.verbose)
        return recv.raw[:recv_len.value]

    def disconnect(self, disposition=SCARD_LEAVE_CARD):
        _call("SCardDisconnect", self.handle, disposition, verbose=self.verbose)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.disconnect()


class Context:
    """An SCardEstablishContext context; a context manager that releases it."""

    def __init__(self, verbose=False):
        self.verbose = verbose
        self.handle = SCARDCONTEXT()
        _call("SCardEstablishContext", SCARD_SCOPE_SYSTEM, None, None,
              ctypes.byref(self.handle), verbose=verbose)

    def release(self):
        _call("SCardReleaseContext", self.handle, verbose=self.verbose)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()

    def list_readers(self):
        size = DWORD(0)
        _call("SCardListReaders", self.handle, None, None, ctypes.byref(size))
        buf = ctypes.create_string_buffer(size.value)
        _call("SCardListReaders", self.handle, None, buf, ctypes.byref(size), verbose=self.verbose)
        # multi-string: names separated by NUL, ended by an empty name
        return [name.decode() for name in buf.raw[:size.value].split(b"\0") if name]

    def get_status(self, reader, current_state=SCARD_STATE_UNAWARE, timeout_ms=0):
        """One SCardGetStatusChange on one reader: (event_state, atr), or None on timeout."""
        rs = SCARD_READERSTATE(szReader=reader.encode(), dwCurrentState=current_state)
        try:
            _call("SCardGetStatusChange", self.handle, timeout_ms, ctypes.byref(rs), 1)
        except PcscError as e:
            if e.rv == SCARD_E_TIMEOUT:
                return None
            raise
        return rs.dwEventState, bytes(rs.rgbAtr[:rs.cbAtr])

    def wait_state(self, reader, flag, timeout):
        """Block until the reader's state has `flag`; returns the state, None on timeout."""
        deadline = time.monotonic() + timeout
        known = SCARD_STATE_UNAWARE  # UNAWARE: the first call answers at once
        while True:
            remaining_ms = max(0, int((deadline - time.monotonic()) * 1000))
            status = self.get_status(reader, known, remaining_ms)
            if status is None:
                return None
            state = status[0]
            if state & flag:
                return state
            if remaining_ms == 0:
                return None
            known = state & ~SCARD_STATE_CHANGED

    def connect(self, reader, share=SCARD_SHARE_SHARED,
                protocols=SCARD_PROTOCOL_T0 | SCARD_PROTOCOL_T1):
        handle, protocol = SCARDHANDLE(), DWORD()
        _call("SCardConnect", self.handle, reader.encode(), share, protocols,
              ctypes.byref(handle), ctypes.byref(protocol), verbose=self.verbose)
        if self.verbose:
            print(f"  active protocol: T={protocol.value - 1}")
        return Card(handle, protocol.value, verbose=self.verbose)


def demo(reader=None):
    with Context(verbose=True) as ctx:
        readers = ctx.list_readers()
        print("  readers:", readers)
        with ctx.connect(reader or readers[0]) as card:
            for apdu in (SELECT, GET_CHALLENGE):
                print(f"  > {apdu.hex(' ').upper()}")
                print(f"  < {card.transmit(apdu).hex(' ').upper()}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command")
    p = sub.add_parser("demo")
    p.add_argument("--reader")
    sub.add_parser("list")
    p = sub.add_parser("state")
    p.add_argument("reader")
    p = sub.add_parser("wait")
    p.add_argument("reader")
    p.add_argument("state", choices=["present", "empty"])
    p.add_argument("timeout", type=float)
    p = sub.add_parser("transmit")
    p.add_argument("reader")
    args = parser.parse_args(argv)

    try:
        if args.command in (None, "demo"):
            demo(getattr(args, "reader", None))
        elif args.command == "list":
            with Context() as ctx:
                print("\n".join(ctx.list_readers()))
        elif args.command == "state":
            with Context() as ctx:
                state, atr = ctx.get_status(args.reader)
                print(f"0x{state:X} {atr.hex().upper()}")
        elif args.command == "transmit":
            with Context() as ctx, ctx.connect(args.reader) as card:
                for line in sys.stdin:
                    if line.strip():
                        print(card.transmit(bytes.fromhex(line)).hex().upper(), flush=True)
        else:
            flag = SCARD_STATE_PRESENT if args.state == "present" else SCARD_STATE_EMPTY
            with Context() as ctx:
                state = ctx.wait_state(args.reader, flag, args.timeout)
            if state is None:
                print(f"timeout waiting for {args.state}", file=sys.stderr)
                return 2
            print(f"0x{state:X}")
    except PcscError as e:
        print(e, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
