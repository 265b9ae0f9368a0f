"""Never silent, never harmful: many threads at once, lost events, a
restarted pcscd, a killed tracer."""
import json
import signal
import subprocess
import time

import pytest


def recorded(path):
    with open(path) as f:
        return [json.loads(line) for line in f][1:]


def test_eight_threads_of_400_transmits(stack, client_bin, tracer, tmp_path):
    env = dict(stack.env, PCSC_CLIENT_QUIET="1")
    proc = stack.popen_waiting([client_bin, "threads", "8", "400"], env=env)
    t = tracer("-n", "-p", proc.pid, "-w", tmp_path / "rec")
    proc.release(timeout=300)
    res = t.stop(timeout=120)
    assert res.returncode == 0, res.stderr
    assert "lost" not in res.stderr
    calls = recorded(tmp_path / "rec")
    transmits = [c for c in calls if c["function"] == "SCardTransmit"]
    assert len(transmits) == 8 * 400
    assert all(c["rv"] == 0 for c in transmits)
    # The main thread and 8 workers, each in pcsc-spy's summary.
    assert len({c["tid"] for c in calls}) == 9
    assert "\nThread 9/9\n" in res.stdout


@pytest.mark.parametrize("buffer", ["perf", "ring"])
def test_lost_events_are_counted_and_reported(stack, client_bin, tracer, buffer):
    """A buffer of one page per CPU cannot hold a burst: the loss is said on
    stderr and in the summary, and the application is unharmed."""
    env = dict(stack.env, PCSC_CLIENT_QUIET="1")
    proc = stack.popen_waiting([client_bin, "isvalid", "20000"], env=env)
    t = tracer("-n", "-p", proc.pid, "--perf-pages", "1", "--buffer", buffer)
    proc.release(timeout=120)
    res = t.stop()
    assert res.returncode == 0
    lost = [l for l in res.stderr.splitlines() if "events lost" in l]
    assert lost, res.stderr
    summary = res.stdout.rsplit("\nLost events: ", 1)
    assert len(summary) == 2
    assert int(summary[1].split()[0]) == sum(int(l.split()[1]) for l in lost)


def test_pcscd_restarted_while_tracing(stack, client_bin, tracer, tmp_path):
    t = tracer("-q", "-w", tmp_path / "rec")
    first = stack.run([client_bin, "attrs"])
    stack.restart_pcscd()
    second = subprocess.Popen([client_bin, "attrs"], env=stack.env, stdout=subprocess.PIPE,
                              text=True)
    out, _ = second.communicate(timeout=60)
    assert first.returncode == 0 and second.returncode == 0
    res = t.stop()
    assert res.returncode == 0, res.stderr
    calls = recorded(tmp_path / "rec")
    mine = [(c["function"], "0x%08X" % c["rv"]) for c in calls if c["pid"] == second.pid]
    assert mine == [tuple(l.split(" rv=")) for l in out.splitlines() if " rv=" in l]


def test_tracer_killed_with_sigkill(stack, client_bin, tracer):
    """The traced application keeps working; the probes die with the tracer
    (they are perf events owned by its file descriptors)."""
    proc = stack.popen_waiting([client_bin, "loop", "2000"],
                               env=dict(stack.env, PCSC_CLIENT_QUIET="1"))
    t = tracer("-n", "-p", proc.pid)
    pid = t.proc.pid
    proc.proc.stdin.write("go\n")
    proc.proc.stdin.flush()
    time.sleep(0.2)
    t.proc.send_signal(signal.SIGKILL)
    t.proc.wait(60)
    out, err = proc.proc.communicate(timeout=120)
    assert proc.proc.returncode == 0, err
    # Nothing of the tracer is left holding BPF objects or perf events.
    assert subprocess.run(["kill", "-0", str(pid)], capture_output=True).returncode != 0
    again = stack.run([client_bin, "attrs"])
    assert again.returncode == 0, again.stderr
