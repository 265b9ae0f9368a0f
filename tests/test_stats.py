"""The statistics (ebpf_pcsc.stats) and pcsc-spy's summary printed from them
(pcsc_text.TextSink.summary).  pcsc-spy prints, per thread in the order the
threads first called:

    <blank line>
    Thread N/T
    Results sorted by total execution time
    total time: %f sec                        (first call to last return)
    %f sec (%3d calls) %5.2f%% %s             (per function, by total time)
"""
import io

import pytest

from ebpf_pcsc.calls import Assembler, Call, Phase
from ebpf_pcsc.functions import BY_NAME, FUNCTIONS
from ebpf_pcsc.pcsc_text import TextSink
from ebpf_pcsc.stats import Stats, ThreadStats
from record_events import read_records, records_path

T0 = 5_000_000_000  # ns


def call(fname, tid, start_us, dur_ns, pid=100, rv=0, comm="app"):
    fn = BY_NAME[fname]
    start = T0 + start_us * 1000
    return Call(fn, pid, tid, comm, start, dict.fromkeys(fn.args, 0), Phase(), Phase(),
                rv=rv, ret_ts=start + dur_ns)


def feed(calls, lost=0):
    stats = Stats()
    for c in calls:
        stats.enter(c)
        if c.aborted:
            stats.abort(c)
        else:
            stats.leave(c)
    stats.lost = lost
    return stats


def summary(stats):
    out = io.StringIO()
    TextSink(stats, out=out).summary()
    return out.getvalue()


def test_summary_format_and_order():
    """Sorted by total time (ties: the function that returned first
    first), pcsc-spy's number formats."""
    calls = [call("SCardEstablishContext", 1, 0, 100_000_000),
             call("SCardTransmit", 1, 100_000, 100_000_000),
             call("SCardTransmit", 1, 200_000, 200_000_000),
             call("SCardTransmit", 1, 400_000, 300_000_000),
             call("SCardConnect", 1, 700_000, 50_000_000),
             call("SCardIsValidContext", 1, 750_000, 50_000_000),
             call("SCardReleaseContext", 1, 800_000, 200_000_000)]
    assert summary(feed(calls)) == """
Thread 1/1
Results sorted by total execution time
total time: 1.000000 sec
0.600000 sec (  3 calls) 60.00% SCardTransmit
0.200000 sec (  1 calls) 20.00% SCardReleaseContext
0.100000 sec (  1 calls) 10.00% SCardEstablishContext
0.050000 sec (  1 calls)  5.00% SCardConnect
0.050000 sec (  1 calls)  5.00% SCardIsValidContext
"""


def test_durations_in_whole_microseconds():
    """pcsc-spy's times come from gettimeofday(): microseconds; a call's
    nanoseconds are cut, not rounded, before they are summed."""
    calls = [call("SCardTransmit", 1, 0, 1_999),          # 0.000001
             call("SCardTransmit", 1, 10, 1_999),         # 0.000001
             call("SCardStatus", 1, 20, 2_500_000_999)]   # 2.500000
    stats = feed(calls)
    assert ThreadStats.seconds(1_999) == 0.000001
    assert ThreadStats.seconds(2_500_000_999) == 2.5
    assert stats.total_seconds == 2.500020
    assert summary(stats).splitlines()[3:] == [
        "total time: 2.500020 sec",
        "2.500000 sec (  1 calls) 100.00% SCardStatus",
        "0.000002 sec (  2 calls)  0.00% SCardTransmit"]


def test_tied_totals_as_pcsc_spy_sums_them():
    """pcsc-spy totals a function's durations with sum(): plain on Python < 3.12
    (pcsc-spy 1.9.9, Debian 12), compensated since (2.x, Debian 13). Here 60+29+33+29
    µs and 55+96 µs tie only when compensated; a tie keeps the order of the first
    returns (pcsc-spy 2.3.3 under Python 3.13 is checked in test_pcsclite2)."""
    calls = [call("SCardFreeMemory", 1, t, us * 1000)
             for t, us in ((0, 60), (100, 29), (200, 33), (300, 29))]
    calls += [call("SCardGetAttrib", 1, t, us * 1000) for t, us in ((400, 55), (500, 96))]
    stats = feed(calls)
    free, attr = (stats.threads[(100, 1)].durations[n]
                  for n in ("SCardFreeMemory", "SCardGetAttrib"))
    plain = 0.0
    for us in (60, 29, 33, 29):
        plain += us / 1e6
    assert free.total_seconds() == plain < 151e-6
    assert free.total_seconds(compensated=True) == attr.total_seconds(True) == 151e-6

    def order(dialect):
        out = io.StringIO()
        TextSink(stats, out=out, result_dialect=dialect).summary()
        return [l.split()[-1] for l in out.getvalue().splitlines() if "calls)" in l]
    assert order("1.9") == ["SCardGetAttrib", "SCardFreeMemory"]
    assert order("2.2") == ["SCardFreeMemory", "SCardGetAttrib"]


def test_many_calls_widen_the_count():
    calls = [call("SCardIsValidContext", 1, i, 1000) for i in range(1234)]
    assert summary(feed(calls)).splitlines()[-1] == \
        "0.001234 sec (1234 calls) 100.00% SCardIsValidContext"


def test_zero_total_time():
    """pcsc-spy would divide by zero; the summary still prints."""
    assert summary(feed([call("SCardCancel", 1, 0, 0)])).splitlines()[3:] == [
        "total time: 0.000000 sec",
        "0.000000 sec (  1 calls)  0.00% SCardCancel"]


def test_no_call_no_summary():
    assert summary(Stats()) == ""
    assert summary(feed([], lost=2)) == "\nLost events: 2 (calls are missing above)\n"


def test_threads_in_order_of_first_call():
    calls = [call("SCardEstablishContext", 30, 0, 1000),
             call("SCardEstablishContext", 10, 1, 1000),
             call("SCardConnect", 20, 2, 3000),
             call("SCardReleaseContext", 10, 3, 1000),
             call("SCardReleaseContext", 30, 4, 1000)]
    stats = feed(calls)
    assert [(th.tid, th.number) for th in stats.threads.values()] == [(30, 0), (10, 1), (20, 2)]
    text = summary(stats)
    assert [l for l in text.splitlines() if l.startswith("Thread")] == \
        ["Thread 1/3", "Thread 2/3", "Thread 3/3"]
    per_thread = text.split("\nThread ")[1:]
    assert "SCardConnect" in per_thread[2] and "SCardConnect" not in per_thread[0] + per_thread[1]
    # every thread's share is of the same total time (as pcsc-spy)
    assert text.count("total time: 0.000005 sec\n") == 3


def test_lost_events_line_only_when_lost():
    calls = [call("SCardIsValidContext", 1, 0, 1000)]
    assert "Lost" not in summary(feed(calls, lost=0))
    text = summary(feed(calls, lost=7))
    assert text.endswith("% SCardIsValidContext\n\nLost events: 7 (calls are missing above)\n")


def test_several_processes_headers():
    calls = [call("SCardEstablishContext", 100, 0, 1000, pid=100, comm="first"),
             call("SCardEstablishContext", 101, 1, 1000, pid=100, comm="first"),
             call("SCardEstablishContext", 200, 2, 1000, pid=200, comm="second")]
    stats = feed(calls)
    assert stats.several_processes and stats.pids == [100, 200]
    assert [l for l in summary(stats).splitlines() if l.startswith("Thread")] == [
        "Thread 1/3 (pid 100 tid 100 first)",
        "Thread 2/3 (pid 100 tid 101 first)",
        "Thread 3/3 (pid 200 tid 200 second)"]
    one = feed(calls[:2])
    assert not one.several_processes
    assert [l for l in summary(one).splitlines() if l.startswith("Thread")] == \
        ["Thread 1/2", "Thread 2/2"]


def test_errors_and_aborts_counted():
    aborted = call("SCardGetStatusChange", 2, 5, 0)
    aborted.aborted, aborted.rv = True, None
    stats = feed([call("SCardConnect", 1, 0, 1000, rv=0x80100009),
                  call("SCardConnect", 1, 1, 1000),
                  call("SCardTransmit", 1, 2, 1000, rv=0x80100003),
                  aborted])
    th = stats.threads[(100, 1)]
    assert th.errors == {"SCardConnect": 1, "SCardTransmit": 1}
    assert stats.aborted == 1
    # an aborted call has no duration: not in the summary
    assert "SCardGetStatusChange" not in summary(stats)
    assert stats.threads[(100, 2)].durations == {}


def test_total_time_first_start_to_last_return():
    stats = feed([call("SCardEstablishContext", 1, 1_000, 1_000_000),
                  call("SCardReleaseContext", 1, 501_000, 1_000_000)])
    assert stats.first_ts == T0 + 1_000_000
    assert stats.last_ts == T0 + 502_000_000
    # pcsc-spy's float arithmetic: the difference of two seconds.microseconds
    assert stats.total_seconds == pytest.approx(0.501, abs=1e-9)
    assert "%f" % stats.total_seconds == "0.501000"


def test_recorded_threads_summary():
    """The threads scenario: the main thread first (it made the first
    call), each worker with its 7 calls; the numbers add up."""
    stats = Stats()
    assembler = Assembler(FUNCTIONS, stats)
    for raw in read_records(records_path("threads_2_3")):
        assembler.feed(raw)
    main, w1, w2 = stats.threads.values()
    assert main.tid == main.pid and main.number == 0
    assert {n: len(d) for n, d in main.durations.items()} == {
        "SCardEstablishContext": 1, "SCardListReaders": 1, "SCardReleaseContext": 1}
    for w in (w1, w2):
        assert w.pid == main.pid != w.tid
        assert {n: len(d) for n, d in w.durations.items()} == {
            "SCardEstablishContext": 1, "SCardConnect": 1, "SCardTransmit": 3,
            "SCardDisconnect": 1, "SCardReleaseContext": 1}
    lines = summary(stats).splitlines()
    assert [l for l in lines if l.startswith("Thread")] == ["Thread 1/3", "Thread 2/3", "Thread 3/3"]
    total = stats.total_seconds
    assert lines[3] == "total time: %f sec" % total
    # a worker's calls happen within the main thread's session
    for w in (w1, w2):
        assert sum(d.seconds for d in w.durations.values()) < total
    # each thread's lines sorted by decreasing time
    for block in summary(stats).split("\nThread ")[1:]:
        secs = [float(l.split()[0]) for l in block.splitlines()[3:]]
        assert secs == sorted(secs, reverse=True) and len(secs) in (3, 5)


# -- bounded memory ------------------------------------------------------------------------

def _nearest_rank(values, fraction):
    import math
    ordered = sorted(values)
    return ordered[max(1, math.ceil(fraction * len(ordered))) - 1]


def test_durations_are_exact_up_to_the_exact_limit():
    import random
    import statistics
    from ebpf_pcsc.stats import Durations
    rng = random.Random(5)
    values = [rng.randrange(1_000, 5_000_000) for _ in range(Durations.EXACT)]
    d = Durations()
    for v in values:
        d.add(v)
    assert (d.count, d.total_ns, d.min_ns, d.max_ns) == (len(values), sum(values),
                                                         min(values), max(values))
    assert d.median_ns() == statistics.median(values)
    assert d.quantile_ns(0.95) == _nearest_rank(values, 0.95)
    assert d.seconds == sum(ThreadStats.seconds(v) for v in values)  # same order, same float


def test_a_long_series_keeps_bounded_memory_and_quantiles_within_1_percent():
    import random
    from ebpf_pcsc.stats import Durations
    rng = random.Random(7)
    # Three populations, as IPC calls, cached answers and card timeouts give.
    values = ([int(rng.lognormvariate(10, 0.3)) for _ in range(150_000)]
              + [int(rng.lognormvariate(13, 0.5)) for _ in range(40_000)]
              + [int(rng.uniform(1e9, 3e9)) for _ in range(10_000)])
    rng.shuffle(values)
    d = Durations()
    for v in values:
        d.add(v)
    assert d._exact is None and len(d._buckets) < 2_000   # not 200,000 values
    assert (d.count, d.total_ns, d.min_ns, d.max_ns) == (len(values), sum(values),
                                                         min(values), max(values))
    for fraction in (0.5, 0.95):
        exact = _nearest_rank(values, fraction)
        assert abs(d.quantile_ns(fraction) - exact) <= 0.01 * exact
    assert abs(d.median_ns() - _nearest_rank(values, 0.5)) <= 0.01 * _nearest_rank(values, 0.5)
