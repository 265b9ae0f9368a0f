"""tests/bench.py really runs (tiny counts): it prints its whole table and
writes its JSON.  No timing is checked: the benchmark gives figures, and
`make bench` is where they are read."""
import json
import math
import re
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent

ROWS = [
    "SCardIsValidContext, µs/call",
    "  untraced",
    "  floor: empty uprobe+uretprobe",
    "  pcsc-spy (LD_PRELOAD, reader running)",
    "  pcsc-ebpf-spy",
    "    x floor",
    "    x pcsc-spy",
    "  pcsc-ebpf-spy --buffer perf",
    "SCardTransmit, µs/call",
    "    / untraced",
    "  busy process, no PC/SC",
    "SCardTransmit, each call: p50 µs / p99.9 µs / time in calls > 1 ms",
    "Burst of",
    "  calls shown",
    "  calls lost",
    "  events lost",
    "  start to Tracing, s",
    "  peak RSS, MiB",
    "  its own memory, MiB",
    "  CPU time per 1,000 calls, ms",
]

TARGETS = ["isvalid: pcsc-ebpf-spy / floor", "isvalid: pcsc-ebpf-spy / pcsc-spy",
           "SCardTransmit: traced / untraced", "burst: calls lost", "start to Tracing (s)"]


def _number(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def test_bench_quick(tmp_path):
    out = tmp_path / "bench.json"
    p = subprocess.run([sys.executable, str(TESTS / "bench.py"), "--quick", "--json", str(out)],
                       capture_output=True, text=True, timeout=900, stdin=subprocess.DEVNULL)
    assert p.returncode == 0, p.stderr[-3000:]
    lines = p.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("measurement"))
    assert lines[header].split() == ["measurement", "figure", "CPU", "target", "result"]
    body = lines[header + 2:]
    for label in ROWS:
        assert any(line.startswith(label) for line in body), (label, p.stdout)
    # one PASS/MISS per target
    verdicts = [line.split()[-1] for line in body if line.rstrip().endswith(("PASS", "MISS"))]
    assert len(verdicts) == len(TARGETS), p.stdout

    res = json.loads(out.read_text())
    for key in ("kernel", "cpu", "cores", "date"):
        assert res["machine"][key], key
    for variant in ("untraced", "floor", "pcsc-ebpf-spy", "pcsc-ebpf-spy --buffer perf",
                    "pcsc-spy"):
        assert _number(res["isvalid"][variant]["us_per_call"]), variant
        assert res["isvalid"][variant]["us_per_call"] > 0, variant
    tr = res["transmit"]["variants"]
    variants = ("untraced", "floor", "pcsc-spy", "pcsc-ebpf-spy", "busy process")
    for variant in variants:
        assert _number(tr[variant]["us_per_call"]) and tr[variant]["us_per_call"] > 0, variant
        lat = tr[variant]["latency"]
        assert 0 < lat["p50_us"] <= lat["p99_us"] <= lat["p999_us"], (variant, lat)
        assert 0 <= lat["stalled_share"] <= 1, (variant, lat)
        assert len(tr[variant]["runs_latency"]) == res["counts"]["loop_rounds"], variant
    for key in ("tracer_cpu_share", "busy_cpu_share"):
        assert _number(res["transmit"][key]) and res["transmit"][key] >= 0, key

    def section(start, end):
        """The rows between two headings: (label, first figure)."""
        first = next(i for i, line in enumerate(body) if line.startswith(start))
        last = next(i for i, line in enumerate(body) if line.startswith(end))
        return [re.match(r"( *\S.*?)(?: {2,}|$)(\S*)", line).groups()
                for line in body[first + 1:last]]

    # The SCardTransmit rows, in order, each ratio as the JSON has it.
    rows = section("SCardTransmit, µs/call", "SCardTransmit, each call")
    busy = "  busy process, no PC/SC (CPU share %.0f%%; the tracer's: %.0f%%)" % (
        100 * res["transmit"]["busy_cpu_share"], 100 * res["transmit"]["tracer_cpu_share"])
    assert [label for label, _ in rows] == [
        "  untraced", "  floor: empty uprobe+uretprobe", "    / untraced",
        "  pcsc-spy (LD_PRELOAD, reader running)", "    / untraced",
        "  pcsc-ebpf-spy", "    / untraced", "    each round's own ratio: median (quartiles)",
        busy, "    / untraced"], p.stdout
    assert [figure for label, figure in rows if label == "    / untraced"] == [
        "%.3f" % tr[v]["ratio"] for v in ("floor", "pcsc-spy", "pcsc-ebpf-spy", "busy process")]
    # How each variant's calls' times spread, as the JSON has it.
    rows = [(label, line) for (label, _), line in zip(
        section("SCardTransmit, each call", "Burst of"),
        body[next(i for i, line in enumerate(body)
                  if line.startswith("SCardTransmit, each call")) + 1:])]
    assert [label for label, _ in rows] == ["  untraced", "  floor", "  pcsc-spy",
                                            "  pcsc-ebpf-spy", "  busy process"], p.stdout
    for (label, line), variant in zip(rows, variants):
        lat = tr[variant]["latency"]
        assert "%.1f / %.0f / %.1f%%" % (lat["p50_us"], lat["p999_us"],
                                         100 * lat["stalled_share"]) in line, (variant, line)
    ratios = tr["pcsc-ebpf-spy"]["round_ratios"]
    assert len(ratios) == res["counts"]["loop_rounds"] == 2
    low, mid, high = tr["pcsc-ebpf-spy"]["round_ratio_quartiles"]
    assert min(ratios) <= low <= mid <= high <= max(ratios)
    assert math.isclose(mid, sum(ratios) / 2)
    assert any(line.endswith("%.3f (%.3f-%.3f)" % (mid, low, high)) for line in body)
    assert res["transmit"]["tracer_shown"] == [res["counts"]["loop_calls"]] * res["counts"]["loop_rounds"]
    burst = res["burst"]
    assert burst["calls"] == res["counts"]["burst_calls"]
    assert 0 <= burst["shown"] <= burst["calls"]
    assert isinstance(burst["lost_events"], int)
    assert _number(res["startup"]["median_s"])
    assert _number(res["tracer"]["peak_rss_kib"]) and res["tracer"]["peak_rss_kib"] > 0
    assert _number(res["tracer"]["cpu_ms_per_1000_calls"])
    assert [t["name"] for t in res["targets"]] == TARGETS
    for t in res["targets"]:
        assert _number(t["value"]) and isinstance(t["ok"], bool), t
    # every tracer run ended by itself on SIGINT, with its summary
    assert all(run["exit_status"] == 0 for run in res["tracer"]["runs"])
