"""Errors meant for people: one line that names the file, column or field and the problem."""


class LifecycleError(Exception):
    """A problem with the user's input or environment, reported as one line and a non-zero exit.

    Raised instead of letting a library's traceback reach the user; the CLI prints `str(err)` alone.
    """


class QuarantinedError(LifecycleError):
    """A stage was asked to use a dataset version whose validation did not pass."""
