"""The one error type gradtrace raises for misuse and bad input."""


class GradtraceError(Exception):
    """Misuse of gradtrace or input it cannot read.

    The message always says what was wrong and what to do about it.
    """
