"""pcsc-spy's text (ebpf_pcsc.pcsc_text) made from calls in unit tests,
without BPF or a session: the calls go where the session sends them."""
import io

from ebpf_pcsc.pcsc_text import TextSink
from ebpf_pcsc.stats import Stats


class TextOutput:
    """The session's sink for the text output, one call at a time (the
    session hands calls on in batches, session._Fanout): Stats sees each call
    first, then TextSink.  It takes the calls from an Assembler,
    spylog.replay or render_calls, and keeps those spylog.replay reports
    unfinished."""

    def __init__(self, **options):
        self.stats = Stats()
        self._out = io.StringIO()
        self.text = TextSink(self.stats, out=self._out, **options)
        self.unfinished_calls = []

    def enter(self, call):
        self.stats.enter(call)
        self.text.enter(call)

    def leave(self, call):
        self.stats.leave(call)
        self.text.leave(call)

    def abort(self, call):
        self.stats.abort(call)
        self.text.abort(call)

    def unfinished(self, call):
        self.unfinished_calls.append(call)

    def printed(self, summary=False) -> str:
        """The text printed so far; with summary, pcsc-spy's summary is printed first."""
        if summary:
            self.text.summary()
        return self._out.getvalue()


def render_calls(calls, summary=False, **options) -> str:
    """The text of calls handed over one at a time: each entered, then
    aborted (its thread died), left, or, still running (rv None), only
    entered."""
    output = TextOutput(**options)
    for call in calls:
        output.enter(call)
        if call.aborted:
            output.abort(call)
        elif call.rv is not None:
            output.leave(call)
    return output.printed(summary)
