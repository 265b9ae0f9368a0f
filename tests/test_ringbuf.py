"""Reading a BPF ring buffer's records from its memory (ebpf_pcsc/ringbuf.py),
on a data area laid out by hand as the kernel lays it out: records with a
8-byte header (length with the busy and discard bits, page offset), padded
to 8 bytes, the data area mapped twice in a row."""
import struct

from ebpf_pcsc.ringbuf import BUSY_BIT, DISCARD_BIT, HEADER_SIZE, parse

SIZE = 64   # the data area; a power of 2


class Ring:
    """A data area and its producer position, mapped twice like the kernel's."""

    def __init__(self, start: int = 0):
        self.area = bytearray(SIZE)
        self.producer = start

    def put(self, payload: bytes, flags: int = 0) -> None:
        record = struct.pack("<II", len(payload) | flags, 0) + payload
        record += bytes(-len(record) % 8)
        for i, b in enumerate(record):
            self.area[(self.producer + i) % SIZE] = b
        self.producer += len(record)

    def data(self) -> bytes:
        return bytes(self.area) * 2


def test_records_in_order_and_the_consumer_moves_past_their_padding():
    ring = Ring()
    ring.put(b"abc")
    ring.put(b"0123456789")
    records, consumer = parse(ring.data(), SIZE - 1, 0, ring.producer)
    assert records == [b"abc", b"0123456789"]
    assert consumer == ring.producer == (HEADER_SIZE + 8) + (HEADER_SIZE + 16)


def test_a_busy_record_stops_the_pass_and_a_discarded_one_is_skipped():
    ring = Ring()
    ring.put(b"gone", DISCARD_BIT)
    ring.put(b"kept")
    busy_at = ring.producer
    ring.put(b"later", BUSY_BIT)
    ring.put(b"after")
    records, consumer = parse(ring.data(), SIZE - 1, 0, ring.producer)
    assert records == [b"kept"]
    assert consumer == busy_at       # the busy record is read next time


def test_a_record_that_wraps_around_the_end_reads_whole():
    ring = Ring(start=48)
    payload = bytes(range(20))       # 28 bytes from offset 48: past the end
    ring.put(payload)
    records, consumer = parse(ring.data(), SIZE - 1, 48, ring.producer)
    assert records == [payload]
    assert consumer == 48 + HEADER_SIZE + 24


def test_nothing_new():
    assert parse(Ring().data(), SIZE - 1, 40, 40) == ([], 40)


# When the tracer reads the ring buffer (capture.pass_due): a slow stream at
# every poll, a fast one in passes, and at once a stream so fast that it
# would fill a quarter of the buffer before the next pass.
from ebpf_pcsc.capture import (BUSY_PERIOD_S, HEAVY_BYTES, WAKEUP_BYTES,  # noqa: E402
                               pass_due, wakeup_bytes)

BUFFER = 64 << 20
MIB = 1 << 20
TRANSMIT_LOOP = 3.5e6     # bytes of records a second: SCardTransmit in a loop
FULL_SPEED = 190e6        # SCardIsValidContext in a loop


def test_a_slow_stream_is_read_at_every_poll():
    assert pass_due(0, 0.0, 0.0, BUFFER)
    assert pass_due(HEAVY_BYTES - 1, 0.01, 0.0, BUFFER)


def test_a_fast_stream_waits_for_its_pass():
    assert not pass_due(HEAVY_BYTES, 0.1, TRANSMIT_LOOP, BUFFER)
    assert not pass_due(3 * MIB, 0.9 * BUSY_PERIOD_S, TRANSMIT_LOOP, BUFFER)
    assert pass_due(HEAVY_BYTES, BUSY_PERIOD_S, TRANSMIT_LOOP, BUFFER)


def test_a_stream_that_would_fill_a_quarter_is_read_at_once():
    assert pass_due(HEAVY_BYTES, 0.01, FULL_SPEED, BUFFER)
    # Just under and at the pace that fills a quarter in a period.
    pace = (BUFFER // 4 - HEAVY_BYTES) / BUSY_PERIOD_S
    assert not pass_due(HEAVY_BYTES, 0.0, pace - 1, BUFFER)
    assert pass_due(HEAVY_BYTES, 0.0, pace, BUFFER)
    # Or already there, whatever the pace.
    assert pass_due(BUFFER // 4, 0.0, 0.0, BUFFER)


def test_the_kernel_wakes_the_reader_often_enough_to_see_the_pace():
    assert wakeup_bytes(BUFFER) == WAKEUP_BYTES <= HEAVY_BYTES
    # A small buffer (--perf-pages 1 and the like): a quarter of it.
    assert wakeup_bytes(4096) == 1024
