"""A stop (Ctrl-C, SIGTERM, the UI's Cancel) ends `lifecycle run` within seconds and leaves nothing behind.

Why this shape:
- Seen before: SIGTERM to the process group (what `timeout`, systemd and Kubernetes send) also reached
  Prefect's temporary API server, a child in the same group; the flow's crash handler then retried the
  dead server for minutes while both Dask workers stayed up, and only SIGKILL ended the run. So the
  run's temporary server is ours (`prefect server start`, the documented command, in a session of its
  own, stopped by us after the run): it outlives the signal long enough for the final state to be
  recorded as crashed or cancelled (`cli.servers.run_server`).
- SIGTERM and SIGINT become `Stopped` in the main thread (Prefect's flow engine turns SIGTERM into its
  own `TerminationSignal` while a flow runs; both end up here). The CLI prints one line naming the
  stage that was stopped and exits 128 + the signal number; the `finally` of `run` closes the local
  Dask cluster. A second signal while stopping ends every child and the process at once.
- Records are written last in every stage (content-derived ids, atomic writes), so a stopped stage
  leaves no half-written version and the next run finds the finished stages `cached`.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType


class Stopped(BaseException):
    """The run was asked to stop (a BaseException, like KeyboardInterrupt: no `except Exception` eats it)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def _kill_children_and_exit(signum: int, frame: FrameType | None) -> None:
    """The second signal: no more waiting for a graceful stop."""
    import psutil

    me = psutil.Process()
    for child in me.children(recursive=True):
        try:
            child.kill()
        except psutil.Error:
            pass
    os._exit(128 + signum)


def _raise_stopped(signum: int, frame: FrameType | None) -> None:
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _kill_children_and_exit)
    raise Stopped(signum)


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """SIGTERM and SIGINT raise `Stopped` in the main thread for the duration of the block."""
    previous = {sig: signal.signal(sig, _raise_stopped) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def signal_of(exc: BaseException) -> int | None:
    """The signal behind a stop: ours, Prefect's `TerminationSignal`, or Ctrl-C's KeyboardInterrupt."""
    if isinstance(exc, Stopped):
        return exc.signum
    if isinstance(exc, KeyboardInterrupt):
        return signal.SIGINT
    signum = getattr(exc, "signal", None)  # prefect.exceptions.TerminationSignal
    return int(signum) if signum is not None else None


@contextmanager
def ends_on_stop(what: Callable[[], str]) -> Iterator[None]:
    """A command's block that a stop ends with one line (`stopped (SIGTERM) <what()>`) and exit code
    128 + the signal; any other exception passes through unchanged."""
    import typer

    from cli.console import err_console

    try:
        with stop_on_signals():
            yield
    except BaseException as exc:
        signum = signal_of(exc)
        if signum is None:
            raise
        err_console.print(f"[bold yellow]stopped[/] ({signal.Signals(signum).name}) {what()}", highlight=False)
        raise typer.Exit(code=128 + signum) from None
