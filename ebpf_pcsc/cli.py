"""The command line: parse, hand over to session.run, map errors to exit
statuses (the only place that does)."""
import sys

import click

from . import __version__
from .errors import EXIT_USAGE, SpyError

PROG = "pcsc-ebpf-spy"


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-p", "--pid", "pids", type=int, multiple=True, metavar="PID",
              help="Trace only this process (repeatable). Default: every process.")
@click.option("--lib", "libs", metavar="PATH", multiple=True,
              help="Probe this library (repeatable) instead of the system's libpcsclite.so.1.")
@click.option("-n", "--nocolor", is_flag=True, help="No colours (default when stdout is not a terminal).")
@click.option("-d", "--diffable", is_flag=True, help="Mask handles and times, for diffs.")
@click.option("-t", "--thread", "show_thread", is_flag=True, help="Prefix lines with the thread number.")
@click.version_option(__version__, "-V", "--version", prog_name=PROG)
def command(pids, libs, nocolor, diffable, show_thread):
    """Trace PC/SC (libpcsclite) calls with eBPF and print them as pcsc-spy does."""
    from .session import Options, run
    opts = Options(pids=pids, libs=libs, color=not nocolor and sys.stdout.isatty(),
                   diffable=diffable, show_thread=show_thread)
    return run(opts)


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
