"""Errors meant for people: one line that names the file, column or field and the problem."""


class LifecycleError(Exception):
    """A problem with the user's input or environment, reported as one line and a non-zero exit.

    Raised instead of letting a library's traceback reach the user; the CLI prints `str(err)` alone.
    """


class QuarantinedError(LifecycleError):
    """A stage was asked to use a dataset version whose validation did not pass."""


class StoreUnavailableError(LifecycleError):
    """The object store (or a source on one) could not be reached: refused, reset or timed out.

    Transient, unlike the other LifecycleErrors: task retry policies retry it, and once the retries
    are spent it still reaches the user as one line (endpoint and reason) rather than a traceback.
    """

    transient = True
