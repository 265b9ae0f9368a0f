"""One application call = one trace entry, even when an SCard* function is
entered again on the same thread before the first returns (pcsc-lite >=
2.1's redirect library; here a forwarding library of our own, probed
together with the real one)."""
import os
import subprocess

import pytest

from test_smoke_e2e import calls_of
from tracetext import calls_of_client

SYSTEM_LIB = "/usr/lib/x86_64-linux-gnu/libpcsclite.so.1"


def build_forwarder(tmp_path):
    out = tmp_path / "libforwarder.so"
    subprocess.run(["gcc", "-shared", "-fPIC", "-O1", "-Wall", "-o", str(out),
                    "tests/clients/forwarder.c", "-ldl"], check=True)
    return str(out)


class _Run:
    def __init__(self, stdout):
        self.stdout = stdout


def trace(stack, tracer, argv, env_extra, *tracer_args, tracer_env=None):
    """argv traced alone (-p: other PC/SC users on the machine stay out)."""
    proc = stack.popen_waiting(argv, env=dict(stack.env, **env_extra))
    t = tracer("-n", "-d", "-p", proc.pid, *tracer_args, env=tracer_env)
    out = proc.release()
    res = t.stop()
    assert res.returncode == 0, res.stderr
    return _Run(out), res


# The calls in flight in task storage (Linux >= 6.2), or in a hash map (older).
@pytest.mark.parametrize("inflight", ["task-storage", "hash"])
def test_nested_calls_reported_once_with_the_applications_arguments(stack, client_bin, tracer,
                                                                    tmp_path, inflight):
    forwarder = build_forwarder(tmp_path)
    env = dict(os.environ, PCSC_EBPF_SPY_INFLIGHT="hash") if inflight == "hash" else None
    run, nested = trace(stack, tracer, [client_bin, "all"], {"LD_PRELOAD": forwarder},
                        "--lib", forwarder, "--lib", SYSTEM_LIB, tracer_env=env)
    assert "Tracing 18 PC/SC functions in %s, %s..." % (forwarder, SYSTEM_LIB) in nested.stderr
    assert calls_of(nested.stdout) == calls_of_client(run.stdout)

    # The same workload without the forwarder: the same calls, line for line
    # (the summary's timings differ from run to run).
    _, direct = trace(stack, tracer, [client_bin, "all"], {}, "--lib", SYSTEM_LIB,
                      tracer_env=env)
    assert calls_part(nested.stdout) == calls_part(direct.stdout)


def calls_part(trace: str) -> str:
    return trace.split("\nThread 1/1\n")[0]


def test_forwarder_alone_is_traced(stack, client_bin, tracer, tmp_path):
    """Probing only the outer library also sees every call (the depth
    bookkeeping must not depend on the inner library being probed)."""
    forwarder = build_forwarder(tmp_path)
    run, res = trace(stack, tracer, [client_bin, "all"], {"LD_PRELOAD": forwarder},
                     "--lib", forwarder)
    assert calls_of(res.stdout) == calls_of_client(run.stdout)
