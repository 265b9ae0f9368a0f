"""Bad input ends the tracer at once: exit status 2 and one line on stderr
that says what is wrong and what to do (no traceback, nothing on stdout).
--help exits 0."""
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from tracer import ROOT, command, run_tracer

PROG = "pcsc-ebpf-spy"


def free_pid() -> int:
    """A pid no process has."""
    pid = 999999
    while os.path.exists("/proc/%d" % pid):
        pid += 1
    return pid


def check_one_line_error(res, *expected):
    """Exit 2, stdout empty, stderr one line `pcsc-ebpf-spy: error: ...`
    matching each regex of `expected`."""
    assert res.returncode == 2, (res.returncode, res.stderr)
    assert res.stdout == ""
    assert "Traceback" not in res.stderr
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and res.stderr.endswith("\n"), res.stderr
    line = lines[0]
    assert line.startswith(PROG + ": error: "), line
    for pattern in expected:
        assert re.search(pattern, line), (pattern, line)
    return line


# (arguments, regexes: what is wrong, what to do)
BAD_INPUT = {
    "unknown option": (["--bogus"], [r"No such option: --bogus", r"see pcsc-ebpf-spy --help"]),
    "pid not a number": (["-p", "abc"], [r"'-p'", r"'abc' is not a valid integer",
                                         r"see pcsc-ebpf-spy --help"]),
    "pid missing": (["-p"], [r"'-p'", r"requires an argument", r"--help"]),
    "no such process": (["-p", "FREE_PID"], [r"no process with PID FREE_PID", r"ps -e"]),
    "lib does not exist": (["--lib", "/nonexistent"],
                           [r"/nonexistent", r"No such file or directory",
                            r"give the path of a libpcsclite\.so\.1"]),
    "lib is a directory": (["--lib", "/tmp"], [r"/tmp", r"directory",
                                               r"give the path of a libpcsclite\.so\.1"]),
    "lib not ELF": (["--lib", "/etc/passwd"],
                    [r"--lib /etc/passwd is not an ELF file",
                     r"give the path of a libpcsclite\.so\.1"]),
    "lib without SCard functions": (["--lib", "/bin/true"],
                                    [r"/bin/true exports no SCard\* function",
                                     r"give the path of a libpcsclite\.so\.1"]),
    "unknown buffer": (["--buffer", "shm"],
                       [r"'--buffer'", r"'shm' is not one of 'auto', 'perf', 'ring'", r"--help"]),
    "perf pages not a power of two": (["--perf-pages", "3"], [r"--perf-pages", r"power of two",
                                                              r"--help"]),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input(case):
    args, expected = BAD_INPUT[case]
    pid = str(free_pid())
    args = [a.replace("FREE_PID", pid) for a in args]
    expected = [e.replace("FREE_PID", pid) for e in expected]
    check_one_line_error(run_tracer("-n", *args), *expected)


def test_bad_pid_among_good_ones():
    pid = free_pid()
    res = run_tracer("-n", "-p", os.getpid(), "-p", pid)
    check_one_line_error(res, r"no process with PID %d\b" % pid, r"ps -e")


def test_not_root():
    # The user `nobody` may not be able to read this clone (CI clones into a
    # 0700 directory), nor pytest's tmp_path: it runs a world-readable copy
    # of the package, with the system's Python (Debian's bcc, click, tabulate).
    with tempfile.TemporaryDirectory() as d:
        copy = Path(d)
        copy.chmod(0o755)
        for part in ("ebpf_pcsc", "bpf"):
            shutil.copytree(ROOT / part, copy / part,
                            ignore=shutil.ignore_patterns("__pycache__"))
        res = subprocess.run(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
                              "/usr/bin/python3", "-m", "ebpf_pcsc", "-n"], cwd=copy,
                             capture_output=True, text=True, timeout=60,
                             stdin=subprocess.DEVNULL,
                             env=dict(os.environ, PYTHONDONTWRITEBYTECODE="1"))
    check_one_line_error(res, r"not enough privileges to load eBPF programs",
                         r"run as root", r"CAP_BPF and CAP_PERFMON")


NO_HEADERS = [r"no kernel headers for kernel %s" % re.escape(os.uname().release),
              r"install them \(sudo apt-get install linux-headers-"]


def env_without_bcc_source():
    env = dict(os.environ)
    env.pop("BCC_KERNEL_SOURCE", None)
    return env


def test_no_kernel_headers(tmp_path):
    """PCSC_EBPF_SPY_KERNEL_SRC: where the tracer looks for Debian's
    linux-headers-* instead of /usr/src (an empty directory here)."""
    env = dict(env_without_bcc_source(), PCSC_EBPF_SPY_KERNEL_SRC=str(tmp_path))
    res = subprocess.run(command("-n"), cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=60, stdin=subprocess.DEVNULL)
    check_one_line_error(res, *NO_HEADERS)


def test_no_kernel_headers_on_the_machine():
    """The same without the test hook: /usr/src and /lib/modules hidden by
    empty tmpfs mounts, in a private mount namespace."""
    script = ('mount -t tmpfs tmpfs /usr/src && mount -t tmpfs tmpfs /lib/modules'
              ' && exec "$@"')
    res = subprocess.run(["unshare", "-m", "sh", "-c", script, "sh", *command("-n")],
                         cwd=ROOT, env=env_without_bcc_source(), capture_output=True,
                         text=True, timeout=60, stdin=subprocess.DEVNULL)
    check_one_line_error(res, *NO_HEADERS)


def test_pid_without_kernel_btf():
    """-p reads task_struct at the running kernel's offsets, from its BTF:
    without /sys/kernel/btf/vmlinux (here /dev/null over it, in a private
    mount namespace), one line that says so, not a traceback."""
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        script = 'mount --bind /dev/null /sys/kernel/btf/vmlinux && exec "$@"'
        # --lib: no note that the sleeper has not loaded libpcsclite
        res = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script,
                              "sh", *command("-n", "-p", str(sleeper.pid), "--lib",
                                             "/usr/lib/x86_64-linux-gnu/libpcsclite.so.1")],
                             cwd=ROOT, capture_output=True, text=True, timeout=60,
                             stdin=subprocess.DEVNULL)
    finally:
        sleeper.kill()
        sleeper.wait()
    # Before it, the tracer may say which kernel headers it uses: the error
    # is the one line of its own, the last.
    notes = [line for line in res.stderr.splitlines() if "kernel headers" not in line]
    res = subprocess.CompletedProcess(res.args, res.returncode, res.stdout,
                                      "".join(line + "\n" for line in notes))
    check_one_line_error(res, r"cannot read the kernel's BTF", r"/sys/kernel/btf/vmlinux")


def test_bcc_kernel_source_without_headers(tmp_path):
    """BCC_KERNEL_SOURCE (trusted by the tracer) naming a directory without
    kernel headers: one line that names it, not clang's and bcc's messages,
    and not a privilege problem."""
    env = dict(os.environ, BCC_KERNEL_SOURCE=str(tmp_path))
    res = subprocess.run(command("-n"), cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=120, stdin=subprocess.DEVNULL)
    line = check_one_line_error(res, r"BCC_KERNEL_SOURCE", re.escape(str(tmp_path)))
    assert "run as root" not in line


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help(flag):
    res = run_tracer(flag)
    assert res.returncode == 0, res.stderr
    assert res.stderr == ""
    assert res.stdout.startswith("Usage: %s [OPTIONS] [-- COMMAND [ARGS]...]\n" % PROG)
    for option in ("-p, --pid PID", "--lib PATH", "-n, --nocolor", "-d, --diffable",
                   "-t, --thread", "-h, --help"):
        assert option in res.stdout


def test_version():
    res = run_tracer("--version")
    assert res.returncode == 0, res.stderr
    assert re.match(r"^%s, version \S+\n$" % PROG, res.stdout)
