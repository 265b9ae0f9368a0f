"""The CI features, end to end: `--expect GOLDEN` (this run's trace, as
`-n -d` renders it, against a golden one: exit 0 when equal, else a unified
diff and exit 1) and `--summary` (a tabulate table per process, thread and
function after pcsc-spy's summary; `--summary-format` picks the format).

Most clients here run with their stdout thrown away (`sh -c '... >
/dev/null'`): COMMAND shares the tracer's stdout, so a client's own lines
would end up in a golden file written from that stdout.
test_golden_of_a_command_writing_to_stdout is the recipe without that
precaution.
"""
import json
import math
import re
import statistics
from pathlib import Path

import pytest

from test_cli_errors import check_one_line_error
from test_command_mode import client_calls, spy
from tracetext import parse_trace
from test_record_replay import quiet, render

SELECT_LINE = " i  0000 00 A4 04 00 07 A0 00 00 03 08 00 00             ............"
SELECT_CHANGED = " i  0000 00 A4 04 00 07 A0 00 00 03 08 00 01             ............"

HEADERS = ["pid", "tid", "comm", "function", "calls", "errors",
           "total µs", "min µs", "median µs", "p95 µs", "max µs"]


@pytest.fixture(scope="module")
def golden(session_stack, client_bin, tmp_path_factory):
    """One traced run of `all`: its `-n -d` text (golden.txt) and its
    recording (all.jsonl)."""
    if not session_stack.card_running:
        session_stack.start_card()
    d = tmp_path_factory.mktemp("golden")
    res = spy(session_stack, "-n", "-d", "-w", d / "all.jsonl", "--",
              "sh", "-c", quiet("all"), client_bin)
    assert res.returncode == 0, res.stderr
    (d / "golden.txt").write_text(res.stdout)
    assert res.stdout.count(SELECT_LINE + "\n") == 1
    return d


def changed_golden(golden, tmp_path) -> Path:
    """golden.txt with one byte of the SELECT APDU changed."""
    path = tmp_path / "changed.txt"
    path.write_text((golden / "golden.txt").read_text().replace(SELECT_LINE, SELECT_CHANGED))
    return path


def check_diff(stdout: str, golden_path):
    """A unified diff from golden_path to this trace whose only change is
    the SELECT line."""
    lines = stdout.splitlines()
    assert lines[0].startswith("--- %s" % golden_path), stdout
    assert lines[1].startswith("+++ "), stdout
    assert lines[2].startswith("@@ "), stdout
    changes = [line for line in lines[2:] if line[:1] in "+-"]
    assert changes == ["-" + SELECT_CHANGED, "+" + SELECT_LINE], stdout


# -- --expect with -- COMMAND -------------------------------------------------------------------

def test_same_trace(stack, client_bin, golden):
    res = spy(stack, "-q", "--expect", golden / "golden.txt", "--",
              "sh", "-c", quiet("all"), client_bin)
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout == ""


def test_same_trace_with_live_text(stack, client_bin, golden):
    """Without -q: the live text, and no diff after it."""
    res = spy(stack, "-n", "-d", "--expect", golden / "golden.txt", "--",
              "sh", "-c", quiet("all"), client_bin)
    assert res.returncode == 0, res.stdout + res.stderr
    text = res.stdout
    assert "\n--- " not in text and "+++ " not in text
    golden_text = (golden / "golden.txt").read_text()
    # the calls as in the golden file, then the summary (whose times differ)
    assert text.partition("\nThread 1/1\n")[0] == golden_text.partition("\nThread 1/1\n")[0]


def test_one_apdu_byte_changed(stack, client_bin, golden, tmp_path):
    changed = changed_golden(golden, tmp_path)
    res = spy(stack, "-q", "--expect", changed, "--", "sh", "-c", quiet("all"), client_bin)
    assert res.returncode == 1, res.stderr
    check_diff(res.stdout, changed)


def test_failing_command_status_wins(stack, client_bin, golden):
    """The application's own failure is not hidden behind 0 or 1."""
    res = spy(stack, "-q", "--expect", golden / "golden.txt", "--",
              "sh", "-c", quiet("all") + "; exit 3", client_bin)
    assert res.returncode == 3, res.stdout + res.stderr


def test_golden_of_a_command_writing_to_stdout(stack, client_bin, tmp_path):
    """The recipe as a user types it: `-n -d -o golden.txt -- CLIENT all`,
    then `-q --expect golden.txt -- CLIENT all`.  The client prints a line
    per call on the stdout it keeps (-o sends the trace elsewhere)."""
    path = tmp_path / "golden.txt"
    first = spy(stack, "-n", "-d", "-o", path, "--", client_bin, "all")
    assert first.returncode == 0, first.stderr
    assert " rv=0x" in first.stdout and " rv=0x" not in path.read_text()
    res = spy(stack, "-q", "--expect", path, "--", client_bin, "all")
    assert res.returncode == 0, res.stdout + res.stderr


def test_missing_golden_fails_before_tracing(stack, tmp_path):
    marker = tmp_path / "command-ran"
    res = spy(stack, "-q", "--expect", tmp_path / "no-such-golden.txt", "--",
              "touch", marker)
    check_one_line_error(res, r"no-such-golden\.txt", r"No such file or directory")
    assert not marker.exists()


# -- --expect with -r FILE ----------------------------------------------------------------------

def test_expect_on_a_recording(golden, tmp_path):
    rec = golden / "all.jsonl"
    # the live golden text, and the recording's own rendering, both match
    res = render("-r", rec, "-q", "--expect", golden / "golden.txt")
    assert (res.returncode, res.stdout) == (0, ""), res.stdout + res.stderr
    rendered = render("-r", rec, "-n", "-d")
    assert rendered.returncode == 0, rendered.stderr
    (tmp_path / "rendered.txt").write_text(rendered.stdout)
    res = render("-r", rec, "-q", "--expect", tmp_path / "rendered.txt")
    assert (res.returncode, res.stdout) == (0, ""), res.stdout + res.stderr
    # one byte off
    changed = changed_golden(golden, tmp_path)
    res = render("-r", rec, "-q", "--expect", changed)
    assert res.returncode == 1, res.stderr
    check_diff(res.stdout, changed)


def test_expect_on_a_recording_with_a_missing_golden(golden, tmp_path):
    res = render("-r", golden / "all.jsonl", "--expect", tmp_path / "nothing.txt")
    check_one_line_error(res, r"nothing\.txt", r"No such file or directory")


# -- --summary -------------------------------------------------------------------------------------

# Two clients one after the other (their pids in $3): `all`, then `errors`
# (many failing calls).
TWO_CLIENTS = r'''
"$0" all > "$1" & echo $! > "$3"; wait $! || exit 11
"$0" errors > "$2" & echo $! >> "$3"; wait $! || exit 12
'''


def table_rows(lines):
    """{(pid, tid, function): (comm, calls, errors, [total, min, median, p95, max])}."""
    rows = {}
    for cells in lines:
        pid, tid, comm, function, calls, errors, *us = cells
        key = (int(pid), int(tid), function)
        assert key not in rows
        rows[key] = (comm, int(calls), int(errors), us)
    return rows


def simple_table(text: str):
    """The rows of the `simple` table at the end of text, after pcsc-spy's
    summary."""
    lines = text.splitlines()
    (start,) = [n for n, line in enumerate(lines) if re.split(r"\s{2,}", line.strip()) == HEADERS]
    last_thread = max(n for n, line in enumerate(lines) if line.startswith("Thread "))
    assert start > last_thread
    assert lines[start - 1] == ""
    assert re.fullmatch(r"[- ]+", lines[start + 1])
    return table_rows(line.split() for line in lines[start + 2:])


def github_table(text: str):
    lines = text.splitlines()
    (start,) = [n for n, line in enumerate(lines) if line.startswith("|") and
                [c.strip() for c in line.strip("|").split("|")] == HEADERS]
    assert re.fullmatch(r"\|(:?-+:?\|)+", lines[start + 1]), lines[start + 1]
    body = lines[start + 2:]
    assert all(line.startswith("|") and line.endswith("|") for line in body)
    return table_rows([c.strip() for c in line.strip("|").split("|")] for line in body)


def expected_rows(recording: Path):
    """The table computed from the recording's timestamps and results."""
    groups = {}
    for line in recording.read_text().splitlines()[1:]:
        call = json.loads(line)
        key = (call["pid"], call["tid"], call["function"])
        groups.setdefault(key, []).append(call)
    rows = {}
    for key, calls in groups.items():
        ns = [c["return_ns"] - c["entry_ns"] for c in calls]
        us = sorted(n / 1000.0 for n in ns)
        p95 = us[max(1, math.ceil(0.95 * len(us))) - 1]
        # Total and median from the integer nanoseconds, as the tracer computes
        # them: float sums can land on the other side of a rounding boundary
        # (165.65 µs).
        total, median = sum(ns) / 1000.0, statistics.median(ns) / 1000.0
        rows[key] = (calls[0]["comm"], len(calls), sum(1 for c in calls if c["rv"]),
                     ["%.1f" % v for v in (total, us[0], median, p95, us[-1])])
    return rows


def test_summary_tables(stack, client_bin, tmp_path):
    rec, a, b, pids = (tmp_path / n for n in ("trace.jsonl", "a", "b", "pids"))
    res = spy(stack, "-n", "--summary", "-w", rec, "--", "sh", "-c", TWO_CLIENTS, client_bin,
              a, b, pids)
    assert res.returncode == 0, res.stderr
    first, second = map(int, pids.read_text().split())
    rows = simple_table(res.stdout)
    # one row per process, thread and function, with the calls and errors
    # the clients saw
    for pid, out in ((first, a), (second, b)):
        seen = {}
        for name, rv in client_calls(out):
            calls, errors = seen.get(name, (0, 0))
            seen[name] = (calls + 1, errors + (rv != "0x00000000"))
        assert {k[2]: (calls, errors) for k, (_, calls, errors, _) in rows.items()
                if k[0] == pid} == seen
        assert all(k[1] == pid for k in rows if k[0] == pid)   # one thread each
    assert {k[0] for k in rows} == {first, second}
    assert rows[(second, second, "SCardTransmit")][1:3] == (2, 2)
    assert rows[(second, second, "SCardReleaseContext")][1:3] == (2, 1)
    assert rows[(first, first, "SCardGetAttrib")][1:3] == (2, 2)
    for comm, calls, errors, us in rows.values():
        assert comm == "pcsc_client"
        total, low, median, p95, high = map(float, us)
        assert low <= median <= p95 <= high <= total
    # the latencies: from the calls' own timestamps
    assert rows == expected_rows(rec)
    # the pcsc-spy summary is still there, before the table
    assert len(parse_trace(res.stdout).threads) == 2

    # --summary-format github, of the same calls (from the recording)
    res = render("-n", "--summary", "--summary-format", "github", "-r", rec)
    assert res.returncode == 0, res.stderr
    assert github_table(res.stdout) == rows


def test_bad_summary_format():
    res = render("-n", "--summary", "--summary-format", "no-such-format", "-r", "/dev/null")
    check_one_line_error(res, r"--summary-format", r"no-such-format", r"github")
