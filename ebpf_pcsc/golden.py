"""--expect GOLDEN: this trace, as `-n -d` renders it, against a golden one.

Only the calls are compared: from the first "Thread 1/" line on, the text is
pcsc-spy's summary, whose timings change from run to run (so a golden file
can simply be the output of `pcsc-ebpf-spy -n -d ...`)."""
import difflib
from typing import Tuple

from .errors import SpyError


def calls_part(text: str) -> str:
    head, sep, _ = text.partition("\n\nThread 1/")
    return head + "\n" if sep else text


def load(golden_path: str) -> str:
    """Read at start: a missing golden file is an error before tracing."""
    try:
        with open(golden_path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise SpyError("cannot read --expect %s (%s)" % (golden_path, getattr(e, "strerror", e)),
                       "give a trace written by pcsc-ebpf-spy -n -d")


def compare(golden_path: str, golden: str, trace: str) -> Tuple[bool, str]:
    want, got = calls_part(golden), calls_part(trace)
    if want == got:
        return True, ""
    diff = difflib.unified_diff(want.splitlines(keepends=True), got.splitlines(keepends=True),
                                fromfile=golden_path, tofile="this trace")
    return False, "".join(diff)
