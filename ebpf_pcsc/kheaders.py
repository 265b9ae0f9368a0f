"""Kernel headers for bcc, which compiles the BPF program at run time.

bcc looks for /lib/modules/$(uname -r)/build.  Where the running kernel has
no headers package (cloud and CI kernels), the newest installed Debian
linux-headers work for uprobe programs, but Debian splits them into a
-common tree and an -<arch> tree and bcc needs both in one: we build a merged
view of symlinks in a cache directory and point BCC_KERNEL_SOURCE at it.
Nothing is ever written under /lib/modules.
"""
import os
import platform
import re
import shutil
import subprocess
from pathlib import Path
from typing import Optional

from .errors import SpyError

CACHE = Path(os.environ.get("PCSC_EBPF_SPY_CACHE", "/var/cache/pcsc-ebpf-spy"))
# Where Debian installs kernel headers (overridable, e.g. to test the error).
SRC = Path(os.environ.get("PCSC_EBPF_SPY_KERNEL_SRC", "/usr/src"))


def _version_key(path: Path):
    return [int(n) if n.isdigit() else n for n in re.split(r"[.-]", path.name)]


def _newest_debian_headers(src: Path = SRC):
    """(common tree, arch tree) of the newest linux-headers-* in src."""
    arch = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())
    best = None
    for tree in src.glob("linux-headers-*-%s" % arch):
        version = tree.name[len("linux-headers-"):-len(arch) - 1]
        common = src / ("linux-headers-%s-common" % version)
        if common.is_dir() and (tree / "include").is_dir():
            if best is None or _version_key(tree) > _version_key(best[1]):
                best = (common, tree)
    return best


def _merged_view(common: Path, arch_tree: Path) -> Path:
    view = CACHE / ("kernel-headers-" + arch_tree.name[len("linux-headers-"):])
    if (view / ".complete").exists():
        return view
    tmp = view.with_name(view.name + ".tmp%d" % os.getpid())
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    # cp -as: a tree of symlinks, the arch tree's files over the common ones.
    for tree in (common, arch_tree):
        subprocess.run(["cp", "-as", "--remove-destination", str(tree) + "/.", str(tmp)],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    (tmp / ".complete").touch()
    shutil.rmtree(view, ignore_errors=True)
    tmp.rename(view)
    return view


def ensure(warn) -> Optional[str]:
    """Make sure bcc will find kernel headers; returns BCC_KERNEL_SOURCE if
    we had to set it.  `warn` gets the one-line warning."""
    given = os.environ.get("BCC_KERNEL_SOURCE")
    if given:
        if not (Path(given) / "include" / "linux" / "kconfig.h").is_file():
            raise SpyError("BCC_KERNEL_SOURCE=%s holds no kernel headers" % given,
                           "unset it, or point it at a linux-headers tree")
        return given
    release = platform.release()
    if (Path("/lib/modules") / release / "build" / "include").is_dir() \
            and "PCSC_EBPF_SPY_KERNEL_SRC" not in os.environ:
        return None
    found = _newest_debian_headers()
    if found is None:
        raise SpyError("no kernel headers for kernel %s" % release,
                       "install them (sudo apt-get install linux-headers-amd64, or "
                       "linux-headers-$(uname -r)), or set BCC_KERNEL_SOURCE")
    view = _merged_view(*found)
    os.environ["BCC_KERNEL_SOURCE"] = str(view)
    warn("no kernel headers match kernel %s; using %s (fine for uprobes)"
         % (release, found[1].name))
    return str(view)
