"""A real static pcsc-lite client library, libpcsclite.a 2.3.3, for tests.

    built = ensure_library()                  # built once per machine, then cached
    exe = link_client(tmp / "pcsc_client_static")   # tests/clients/pcsc_client.c + libpcsclite.a
    with trixie.Pcsclite2Stack() as stack:    # pcscd 2.3.3: the protocol of this library
        path = stack.install(exe)

pcsc-lite >= 2.3.1 builds a static client library, libpcsclite.a: the client code of
libpcsclite_real.so.1 (winscard_clnt.c, winscard_msg.c, ...) plus error.c and g_defines.c.
meson.build builds it unconditionally (`static_library('pcsclite', ...)`; there is no option
for it in 2.3.3: NEWS only says "read the ChangeLog"). A program linked with it has the 18
SCard* functions in its own text, talks to pcscd itself, and maps no libpcsclite at all.
Debian (12, trixie) does not ship the .a, so it is built here from the source of the
pcsc-lite that the trixie root runs (tests/trixie.py): its client speaks pcscd 2.3.3's
protocol (a 1.9.9 client does not).

Source: pcsc-lite_2.3.3.orig.tar.xz from Debian's pool, checked against ORIG_SHA256, the
checksum that pcsc-lite_2.3.3-1.dsc gives (and trixie's Sources index, which the signed
InRelease covers). The upstream tarball does not change with the Debian revision, so a
2.3.3-2 in trixie would not break the download. Debian's patch series for 2.3.3-1 is empty.

Built on the host, not in the trixie root: meson 1.0 (>= 0.58 needed), flex (meson.build
finds it even though only pcscd's sources need it), pod2man (run by meson setup), ninja and
gcc 12 are Debian 12 packages (`make setup`), and only the target libpcsclite.a is built
(8 C files). Measured here (2 cores): 2.2-3.6 s cold, download and meson setup included;
0.1 ms when cached; 0.25 s to link the client. The objects are compiled against Debian 12's
glibc 2.36 headers, so the executables linked with them run both on the host and in the
trixie root (glibc 2.41 is backward compatible); the wire protocol is pcsc-lite's (its
source), not glibc's. Building in the root would need gcc, libc6-dev, meson, ninja-build,
flex and pkgconf installed there, and so a rebuild of every cached root (~50 s here) and a
bigger root, for the same library. meson options: -Dlibudev/-Dlibsystemd/-Dpolkit=false (the
client library uses none of them; they only need -dev packages for pcscd), ipcdir
/run/pcscd (the default, where the root's pcscd has its socket), buildtype debugoptimized
(-O2 -g, as a distribution builds it).

The result is cached in LIB_DIR (lib/libpcsclite.a and include/PCSC/*.h, 2.3.3's headers),
built in a temporary directory, marked complete (MARKER, holding RECIPE) and renamed into
place, all under a lock file, as tests/trixie.py does with the root: an interrupted build
is redone, two runs never build it twice, a change of RECIPE rebuilds it. The verified
tarball is kept beside it (ORIG_CACHE), so a rebuild needs no network.
"""
import hashlib
import os
import shutil
import subprocess
import tarfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from testbed import TESTS_DIR, _die_with_parent
from trixie import (CACHE_DIR, MIRROR, _remove_tree, build_dir, build_once, put_in_place,
                    remove_leftovers)

VERSION = "2.3.3"
ORIG = "pcsc-lite_%s.orig.tar.xz" % VERSION
ORIG_URL = MIRROR + "/pool/main/p/pcsc-lite/" + ORIG
# From pcsc-lite_2.3.3-1.dsc (Checksums-Sha256), the same in trixie's Sources index.
ORIG_SHA256 = "cdff7d7153a0b37aa74e26dfec89ec7dc5c5286aa21b91b903e38739d227e8e7"
ORIG_SIZE = 210592
MESON_OPTIONS = ("-Dlibudev=false", "-Dlibsystemd=false", "-Dpolkit=false",
                 "-Dipcdir=/run/pcscd", "--buildtype=debugoptimized")
HEADERS = ("winscard.h", "wintypes.h", "reader.h", "debuglog.h", "ifdhandler.h")
# The host's build tools (Debian 12 packages; `make setup` installs them).
TOOLS = {"meson": "meson", "ninja": "ninja-build", "flex": "flex", "gcc": "gcc",
         "pod2man": "perl"}

LIB_DIR = CACHE_DIR / "pcsc-lite-static"
LOCK_FILE = CACHE_DIR / "pcsc-lite-static.lock"
BUILD_LOG = CACHE_DIR / "pcsc-lite-static.build.log"
ORIG_CACHE = CACHE_DIR / ORIG
MARKER = ".pcsc-ebpf-spy-static"
# What the marker holds: change it (or the options) and the cached library is rebuilt.
RECIPE = "pcsc-lite %s (%s sha256 %s); host meson setup %s; ninja libpcsclite.a; v1" % (
    VERSION, ORIG, ORIG_SHA256, " ".join(MESON_OPTIONS))
BUILD_TIMEOUT = 600
ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C", "HOME": "/root"}

CLIENT_SOURCE = TESTS_DIR / "clients" / "pcsc_client.c"
# The 18 functions libpcsclite exports (pcsc-lite's libpcsclite.so.1 ABI).
FUNCTIONS = frozenset((
    "SCardEstablishContext", "SCardReleaseContext", "SCardIsValidContext", "SCardConnect",
    "SCardReconnect", "SCardDisconnect", "SCardBeginTransaction", "SCardEndTransaction",
    "SCardStatus", "SCardGetStatusChange", "SCardControl", "SCardTransmit",
    "SCardListReaderGroups", "SCardListReaders", "SCardFreeMemory", "SCardCancel",
    "SCardGetAttrib", "SCardSetAttrib"))


@dataclass(frozen=True)
class StaticLibrary:
    root: Path

    @property
    def archive(self) -> Path:
        return self.root / "lib" / "libpcsclite.a"

    @property
    def include(self) -> Path:
        """The directory of the PC/SC headers (winscard.h, pcsclite.h...)."""
        return self.root / "include" / "PCSC"


def is_complete(root=LIB_DIR):
    try:
        return (Path(root) / MARKER).read_text() == RECIPE
    except OSError:
        return False


def ensure_library(log=None) -> StaticLibrary:
    """The cached libpcsclite.a 2.3.3, else built now (~5 s; `log` gets progress)."""
    build_once(is_complete, LOCK_FILE, lambda: _build(log or (lambda msg: None)))
    return StaticLibrary(LIB_DIR)


def link_client(out, source=CLIENT_SOURCE, library=None) -> str:
    """source (tests/clients/pcsc_client.c) compiled with 2.3.3's headers and linked with
    libpcsclite.a (not -lpcsclite): the SCard* functions end up in the executable."""
    library = library or ensure_library()
    subprocess.run(["gcc", "-O0", "-g", "-Wall", "-Wextra", "-I", str(library.include),
                    str(source), "-o", str(out), str(library.archive), "-lpthread"],
                   check=True, env=ENV)
    return str(out)


def defined_functions(path) -> dict:
    """{symbol: nm type letter} of the SCard* functions an ELF file or archive defines
    (T: global text, in .symtab or .dynsym alike)."""
    out = subprocess.run(["nm", "--defined-only", str(path)], capture_output=True, text=True,
                         check=True).stdout
    found = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[2].startswith("SCard"):
            found[parts[2]] = parts[1]
    return found


def needed_libraries(path) -> list:
    """The DT_NEEDED entries of an ELF file."""
    out = subprocess.run(["readelf", "-d", str(path)], capture_output=True, text=True,
                         check=True).stdout
    return [line.split("[", 1)[1].rstrip("]") for line in out.splitlines() if "(NEEDED)" in line]


# -- the build ------------------------------------------------------------------------------

def _sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 16), b""):
            h.update(block)
    return h.hexdigest()


def _source_tarball(log):
    """ORIG_CACHE, downloaded unless it is already there and verified."""
    if ORIG_CACHE.exists() and _sha256(ORIG_CACHE) == ORIG_SHA256:
        return ORIG_CACHE
    part = ORIG_CACHE.with_name(ORIG_CACHE.name + ".part-%d" % os.getpid())
    log("downloading %s" % ORIG_URL)
    try:
        for attempt in range(3):
            try:
                with urllib.request.urlopen(ORIG_URL, timeout=60) as r, open(part, "wb") as f:
                    shutil.copyfileobj(r, f)
                break
            except OSError:
                if attempt == 2:
                    raise
                time.sleep(2)
        size, digest = part.stat().st_size, _sha256(part)
        if (size, digest) != (ORIG_SIZE, ORIG_SHA256):
            raise RuntimeError("%s: %d bytes, sha256 %s; expected %d bytes, sha256 %s"
                               % (ORIG_URL, size, digest, ORIG_SIZE, ORIG_SHA256))
        os.replace(part, ORIG_CACHE)
    finally:
        if part.exists():
            part.unlink()
    return ORIG_CACHE


def _missing_tools():
    return [package for tool, package in TOOLS.items() if shutil.which(tool, path=ENV["PATH"]) is None]


def _install_tools():
    """Normally installed by `make setup`; a CI image without them still builds."""
    missing = _missing_tools()
    if missing:
        env = dict(ENV, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "update", "-q"], check=True, env=env,
                       stdout=subprocess.DEVNULL)
        subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing],
                       check=True, env=env, stdout=subprocess.DEVNULL)


def _run(argv, out, cwd=None):
    out.write("$ %s\n" % " ".join(map(str, argv)))
    out.flush()
    subprocess.run(list(map(str, argv)), cwd=cwd, env=ENV, stdin=subprocess.DEVNULL,
                   stdout=out, stderr=subprocess.STDOUT, check=True, timeout=BUILD_TIMEOUT,
                   preexec_fn=_die_with_parent)


def _build(log):
    remove_leftovers(LIB_DIR)
    tmp = build_dir(LIB_DIR)
    log("building libpcsclite.a %s in %s (log: %s)" % (VERSION, tmp, BUILD_LOG))
    started = time.monotonic()
    try:
        with open(BUILD_LOG, "w") as out:
            _install_tools()
            tarball = _source_tarball(log)
            work = tmp / "work"
            work.mkdir(parents=True)
            safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            with tarfile.open(tarball) as tar:
                tar.extractall(work, **safe)
            src = work / ("pcsc-lite-" + VERSION)
            build = work / "build"
            _run(["meson", "setup", build, src, *MESON_OPTIONS], out)
            _run(["ninja", "-C", build, "libpcsclite.a"], out)
            (tmp / "lib").mkdir()
            shutil.copy2(build / "libpcsclite.a", tmp / "lib" / "libpcsclite.a")
            include = tmp / "include" / "PCSC"
            include.mkdir(parents=True)
            for name in HEADERS:
                shutil.copy2(src / "src" / "PCSC" / name, include / name)
            shutil.copy2(build / "pcsclite.h", include / "pcsclite.h")   # generated
            _remove_tree(work)
        built = StaticLibrary(tmp)
        missing = FUNCTIONS - {f for f, t in defined_functions(built.archive).items() if t == "T"}
        if missing:
            raise RuntimeError("libpcsclite.a lacks %s" % ", ".join(sorted(missing)))
    except BaseException as e:
        _remove_tree(tmp)
        if isinstance(e, Exception):
            try:
                tail = BUILD_LOG.read_text(errors="replace")[-3000:]
            except OSError:
                tail = ""
            raise RuntimeError("building libpcsclite.a failed (%s):\n%s" % (e, tail)) from e
        raise
    put_in_place(tmp, LIB_DIR, MARKER, RECIPE)
    log("built libpcsclite.a in %.1f s" % (time.monotonic() - started))
