"""Fixtures: the private PC/SC stack, the compiled C client, the processes
a test starts on the stack, the tracer.

These tests need root (eBPF, mount namespaces): run them with `sudo make
test`.  Nothing is skipped when they cannot run: they fail, saying why.
"""
import os
import subprocess
from pathlib import Path

import pytest

from testbed import PcscStack
from tracer import Tracer

TESTS = Path(__file__).resolve().parent


def pytest_sessionstart(session):
    if os.geteuid() != 0:
        raise pytest.UsageError("the test suite needs root (eBPF, mount namespaces): sudo make test")


@pytest.fixture(scope="session")
def client_bin(tmp_path_factory):
    """tests/clients/pcsc_client.c, compiled for this run."""
    out = tmp_path_factory.mktemp("client") / "pcsc_client"
    subprocess.run(["gcc", "-O0", "-g", "-Wall", "-Wextra", "-I/usr/include/PCSC",
                    str(TESTS / "clients" / "pcsc_client.c"), "-o", str(out),
                    "-lpcsclite", "-lpthread"], check=True)
    return str(out)


@pytest.fixture(scope="session")
def session_stack():
    with PcscStack() as stack:
        yield stack


@pytest.fixture
def stack(session_stack):
    """The shared private stack, with the card inserted."""
    if not session_stack.card_running:
        session_stack.start_card()
    return session_stack


@pytest.fixture
def spawn(stack):
    """spawn(argv, stdin=False): start argv on the private stack, output
    piped (tests/processes.py has what to do with it); any process still
    running when the test ends is killed."""
    started = []

    def start(argv, stdin=False):
        p = subprocess.Popen([str(a) for a in argv], env=stack.env,
                             stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        started.append(p)
        return p

    yield start
    for p in started:
        if p.poll() is None:
            p.kill()
            p.wait()


@pytest.fixture
def tracer():
    """tracer(*args) starts pcsc-ebpf-spy; every one started is stopped."""
    started = []

    def start(*args, env=None):
        t = Tracer(*args, env=env)
        started.append(t)
        return t

    yield start
    for t in started:
        t.kill()
