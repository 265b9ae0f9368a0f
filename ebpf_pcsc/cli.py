"""The command line: parse, hand over to session.run, map errors to exit
statuses (the only place that does)."""
import sys

import click

from . import __version__
from .errors import EXIT_USAGE, SpyError

PROG = "pcsc-ebpf-spy"


def _summary_format(ctx, param, value):
    from tabulate import tabulate_formats
    if value not in tabulate_formats:
        raise click.BadParameter("%r is not a tabulate format (one of: %s)"
                                 % (value, ", ".join(sorted(tabulate_formats))))
    return value


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-p", "--pid", "pids", type=int, multiple=True, metavar="PID",
              help="Trace only this process (repeatable). Default: every process.")
@click.option("--lib", "libs", metavar="PATH", multiple=True,
              help="Probe this library (repeatable) instead of the system's libpcsclite.so.1.")
@click.option("-n", "--nocolor", is_flag=True, help="No colours (default when stdout is not a terminal).")
@click.option("-d", "--diffable", is_flag=True, help="Mask handles, ids and times, for diffs.")
@click.option("-t", "--thread", "show_thread", is_flag=True, help="Prefix lines with the thread number.")
@click.option("--spy-format", type=click.Choice(["1.9", "2.2"]), default="1.9", show_default=True,
              help="Result lines as pcsc-spy 1.9-2.1 (text and code) or >= 2.2 (code only) prints them.")
@click.option("-w", "--write", metavar="FILE", help="Record every call, losslessly, to FILE (JSON Lines, mode 0600).")
@click.option("-r", "--read", metavar="FILE",
              help="Render FILE (a -w recording or a libpcscspy log) instead of tracing.")
@click.option("-o", "--output", metavar="FILE",
              help="Write the trace to FILE instead of stdout (COMMAND keeps stdout).")
@click.option("-q", "--quiet", is_flag=True, help="No live trace (with -w, --expect).")
@click.option("--json", "as_json", is_flag=True, help="JSON Lines on stdout instead of text.")
@click.option("--expect", metavar="GOLDEN",
              help="Compare the trace (as -n -d shows it) with GOLDEN: exit 1 and a diff if it differs.")
@click.option("--summary", is_flag=True, help="Latency tables per process, thread and function.")
@click.option("--summary-format", default="simple", show_default=True, metavar="FORMAT",
              callback=_summary_format, help="Any tabulate format for --summary (e.g. github).")
@click.option("--apdu", is_flag=True,
              help="Decode APDUs (command, status word) and ATRs under the calls (lines ' # ').")
@click.option("--redact", is_flag=True,
              help="Mask PINs (VERIFY, CHANGE REFERENCE DATA, RESET RETRY COUNTER, PIN-pad "
                   "structures) in every output; lengths stay.")
@click.option("--smartcard-list", metavar="PATH", type=click.Path(exists=True, dir_okay=False),
              help="pcsc-tools' smartcard_list.txt naming the ATRs with --apdu "
                   "[default: /usr/share/pcsc/smartcard_list.txt].")
@click.option("--perf-pages", type=int, metavar="N",
              help="Perf buffer size per CPU in 4 KiB pages, a power of two; the ring "
                   "buffer gets as many in all (default: 64 MiB shared by the CPUs, at "
                   "most 8192 pages each).")
@click.option("--buffer", "transport", type=click.Choice(["auto", "perf", "ring"]),
              default="auto", show_default=True,
              help="How records reach the tracer: a BPF ring buffer (Linux >= 5.8; costs "
                   "the traced threads less per call) or the perf buffer; auto: the ring "
                   "buffer where the kernel has one.")
@click.version_option(__version__, "-V", "--version", prog_name=PROG)
@click.argument("command", nargs=-1, type=click.UNPROCESSED, metavar="[-- COMMAND [ARGS]...]")
def command(pids, libs, nocolor, diffable, show_thread, spy_format, write, output, read, quiet, as_json, expect,
            summary, summary_format, apdu, redact, smartcard_list, perf_pages, transport, command):
    """Trace PC/SC (libpcsclite) calls with eBPF and print them as pcsc-spy does.

    With -- COMMAND, run COMMAND traced (with its children, nothing else) and
    exit with its exit status."""
    from .session import Options, run
    if read and (pids or libs or command or write):
        raise click.UsageError("-r renders a file: it takes no -p, --lib, -w or COMMAND")
    if perf_pages is not None and (perf_pages < 1 or perf_pages & (perf_pages - 1)):
        raise click.BadParameter("must be a power of two (1, 2, 4, ... 1024)",
                                 param_hint="--perf-pages")
    opts = Options(perf_pages=perf_pages, transport=transport, output=output, pids=pids,
                   libs=libs, command=command,
                   color=not nocolor and not as_json and output is None and sys.stdout.isatty(),
                   diffable=diffable, show_thread=show_thread, result_dialect=spy_format,
                   quiet=quiet, json=as_json,
                   write=write, read=read, expect=expect, summary=summary,
                   summary_format=summary_format, apdu=apdu, redact=redact,
                   smartcard_list=smartcard_list)
    try:
        return run(opts)
    except BrokenPipeError:
        # The reader of our stdout went away (| head): nothing left to say.
        # (click would turn it into status 1, which --expect means "differs".)
        _quiet_stdout()
        return 0


def _quiet_stdout() -> None:
    import os
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())


def main(argv=None) -> None:
    try:
        status = command.main(args=argv, prog_name=PROG, standalone_mode=False)
    except click.exceptions.Exit as e:  # --help, --version
        status = e.exit_code
    except click.UsageError as e:
        _fail("%s (see %s --help)" % (e.format_message(), PROG))
    except click.Abort:
        status = 0
    except SpyError as e:
        _fail(str(e))
    except BrokenPipeError:
        # The reader of our stdout went away (| head): nothing left to say.
        sys.stderr.close()
        status = 0
    sys.exit(status or 0)


def _fail(message: str) -> None:
    sys.stderr.write("%s: error: %s\n" % (PROG, message))
    sys.exit(EXIT_USAGE)
