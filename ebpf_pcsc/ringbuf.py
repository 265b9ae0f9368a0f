"""A BPF ring buffer read straight from its memory.

bcc reads a ring buffer through libbpf, which calls into Python once per
record (a ctypes callback: several µs each, the larger part of the reader's
cost per record) and publishes the consumer position after every record (a
cache line that the producing CPUs then have to fetch back).  Mapped here,
the records of one pass are sliced out of the data pages, and the consumer
position is written once per pass.

The layout (kernel/bpf/ringbuf.c, uapi/linux/bpf.h): page 0 holds the
consumer position, the one page user space writes; page 1 the producer
position; then the data pages, mapped twice in a row, so that a record which
wraps around the end is contiguous.  Each record: a u32 length carrying
BPF_RINGBUF_BUSY_BIT (reserved, not yet committed) and
BPF_RINGBUF_DISCARD_BIT, a u32 page offset, the data, padded to 8 bytes.

The kernel publishes a record by clearing its busy bit after writing it, and
the producer position with a release store; a reader needs acquire loads
to see them in that order.  Python has none: this relies on x86-64, whose
loads are not reordered with other loads (ORDERED_LOADS); elsewhere the
tracer keeps to the perf buffer.
"""
import mmap
import platform
import struct
from typing import List, Tuple

BUSY_BIT = 1 << 31
DISCARD_BIT = 1 << 30
HEADER_SIZE = 8

_POSITION = struct.Struct("<Q")
_LENGTH = struct.Struct("<I")

ORDERED_LOADS = platform.machine() == "x86_64"


def parse(data, mask: int, consumer: int, producer: int) -> Tuple[List[bytes], int]:
    """The committed records between the consumer and producer positions of
    a ring whose data area (mask + 1 bytes) data maps twice in a row; and
    the new consumer position."""
    records = []
    while consumer < producer:
        at = consumer & mask
        length, = _LENGTH.unpack_from(data, at)
        if length & BUSY_BIT:       # reserved, not committed: later records wait too
            break
        size = length & ~(BUSY_BIT | DISCARD_BIT)
        if not length & DISCARD_BIT:
            start = at + HEADER_SIZE
            records.append(bytes(data[start:start + size]))
        consumer += (size + HEADER_SIZE + 7) & ~7
    return records, consumer


def map_size(map_fd: int) -> int:
    """A map's max_entries: for a ring buffer, its data size in bytes."""
    with open("/proc/self/fdinfo/%d" % map_fd) as f:
        for line in f:
            if line.startswith("max_entries:"):
                return int(line.split()[1])
    raise OSError("no max_entries in the fdinfo of map fd %d" % map_fd)


class RingBuffer:
    """The ring buffer map map_fd."""

    def __init__(self, map_fd: int):
        page = mmap.PAGESIZE
        data_size = map_size(map_fd)
        self.fd = map_fd
        self._mask = data_size - 1
        self._consumer = mmap.mmap(map_fd, page, mmap.MAP_SHARED,
                                   mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
        self._producer = mmap.mmap(map_fd, page + 2 * data_size, mmap.MAP_SHARED,
                                   mmap.PROT_READ, offset=page)
        self._data = memoryview(self._producer)[page:]

    def read(self) -> List[bytes]:
        """The records committed since the last read, in order (copies: the
        space is handed back to the kernel before this returns)."""
        consumer, = _POSITION.unpack_from(self._consumer)
        producer, = _POSITION.unpack_from(self._producer)
        records, consumer = parse(self._data, self._mask, consumer, producer)
        _POSITION.pack_into(self._consumer, 0, consumer)
        return records

    def pending(self) -> int:
        """Bytes of records not read yet (some may not be committed yet)."""
        consumer, = _POSITION.unpack_from(self._consumer)
        producer, = _POSITION.unpack_from(self._producer)
        return producer - consumer

    def close(self) -> None:
        self._data.release()
        self._producer.close()
        self._consumer.close()
