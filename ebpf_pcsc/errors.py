"""Errors the user can fix.  The CLI is the one place that turns them (and
click's usage errors) into one line on stderr and an exit status."""

EXIT_USAGE = 2


class SpyError(Exception):
    """What is wrong and what to do about it, in one line."""

    def __init__(self, problem: str, fix: str = ""):
        super().__init__(problem)
        self.problem = problem
        self.fix = fix

    def __str__(self) -> str:
        return "%s: %s" % (self.problem, self.fix) if self.fix else self.problem
