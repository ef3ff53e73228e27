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
- Ctrl-C on a terminal reaches the whole foreground process group, the local Dask workers too; they
  ignore it (`cli.worker_signals`) so that the screen shows the one line and no worker's traceback.
- A stop ends the process within `GRACE_S` even when the signal's exception is lost on the way
  (`_Watchdog`): then every child is killed and the process exits 128 + the signal.
- Records are written last in every stage (content-derived ids, atomic writes), so a stopped stage
  leaves no half-written version and the next run finds the finished stages `cached`.
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any


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


def _end_group_children() -> None:
    """SIGTERM to our children in our own process group (the local Dask workers), as a SIGTERM to the
    group would: their work stops now instead of when the cluster's close gives up waiting on a busy
    worker (~20 s). Children in a session of their own (the run's temporary Prefect server, a serving
    process) are not in the group and are left to the code that started them."""
    import psutil

    group = os.getpgrp()
    for child in psutil.Process().children(recursive=True):
        try:
            if os.getpgid(child.pid) == group:
                child.terminate()
        except (psutil.Error, ProcessLookupError):
            pass


def _quiet_cluster_and_end_workers() -> None:
    """The local cluster now goes down under its work: the scheduler's errors about closed connections
    are expected, and would put a screenful of lines beside the one a stop prints."""
    logging.getLogger("distributed").setLevel(logging.CRITICAL)
    _end_group_children()


def _raise_stopped(signum: int, frame: FrameType | None) -> None:
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _kill_children_and_exit)
    _quiet_cluster_and_end_workers()
    raise Stopped(signum)


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """SIGTERM and SIGINT raise `Stopped` in the main thread for the duration of the block; the worker
    processes of a local Dask cluster started inside it leave Ctrl-C to us (`cli.worker_signals`)."""
    import dask
    import distributed  # noqa: F401 - loads its config defaults, which the `set` below must not replace

    from cli import worker_signals

    preload = [*dask.config.get("distributed.worker.preload", []), worker_signals.MODULE]
    previous = {sig: signal.signal(sig, _raise_stopped) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        with dask.config.set({"distributed.worker.preload": preload}):
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


def _exit_at_once(code: int) -> None:
    """Registered on a stop, so the first exit handler to run: it skips the others (the orderly
    teardown did their work, or a stop makes it moot) and the interpreter's final garbage collection,
    which takes seconds in a process holding torch, MLflow and Dask (seen: 5 s) and during which no
    thread runs, the watchdog's included."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


GRACE_S = 8.0  # from the signal to a forced exit; Prefect and Kubernetes give 30 s, the contract says 10


class _Watchdog:
    """Ends the process `GRACE_S` after a stop signal, whatever the main thread is doing by then.

    The orderly path (an exception in the main thread, `finally` blocks, the cluster's close) is the
    normal one, but an exception raised by a signal handler can be swallowed: seen here, Prefect's
    SIGTERM handler fired inside a garbage-collector callback, Python printed "Exception ignored" and
    the deploy stage went on for minutes. Prefect replaces our SIGTERM handler while a flow runs, so
    the watchdog does not depend on any handler: `signal.set_wakeup_fd` makes the interpreter write
    each caught signal's number to a pipe, whoever's handler runs, and a thread reads it.
    """

    def __init__(self, what: Callable[[], str]) -> None:
        self.what, self.reported = what, False
        self._read, self._write = os.pipe()
        os.set_blocking(self._write, False)
        self._previous = signal.set_wakeup_fd(self._write, warn_on_full_buffer=False)
        self._thread = threading.Thread(target=self._watch, name="stop-watchdog", daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        import time

        while True:
            try:
                data = os.read(self._read, 64)
            except OSError:
                return
            if not data:  # disarmed
                return
            signums = [b for b in data if b in (signal.SIGTERM, signal.SIGINT)]
            if signums:
                break
        _quiet_cluster_and_end_workers()  # also when Prefect's SIGTERM handler, not ours, took the signal
        time.sleep(GRACE_S)
        if not self.reported:
            self.report(signums[0])
            time.sleep(0.3)  # fd 2 may be cli.console.filtered_stderr's pipe: let its thread pass the line on
        _kill_children_and_exit(signums[0], None)

    def report(self, signum: int) -> None:
        """The one line a stop prints (once, whichever path gets there first)."""
        from cli.console import err_console

        if not self.reported:
            self.reported = True
            err_console.print(f"[bold yellow]stopped[/] ({signal.Signals(signum).name}) {self.what()}",
                              highlight=False)

    def disarm(self) -> None:
        """The block ended without a stop: restore the wakeup fd and end the thread."""
        signal.set_wakeup_fd(self._previous)
        os.close(self._write)
        self._thread.join(timeout=1.0)
        os.close(self._read)


@contextmanager
def ends_on_stop(what: Callable[[], str]) -> Iterator[None]:
    """A command's block that a stop ends with one line (`stopped (SIGTERM) <what()>`) and exit code
    128 + the signal, within `GRACE_S` of the signal; any other exception passes through unchanged."""
    import typer

    watchdog = _Watchdog(what)
    previous_hook = sys.unraisablehook

    def quiet_stops(unraisable: Any) -> None:
        """A stop's exception raised inside a garbage-collector or weakref callback is lost, and Python
        prints it with a traceback. Seen here often (Dask's GC diagnostics hook every collection): it
        goes to the log, and the signal is sent again a moment later, outside the callback."""
        signum = signal_of(unraisable.exc_value) if unraisable.exc_value is not None else None
        if signum is None:
            previous_hook(unraisable)
            return
        logging.getLogger("lifecycle.stop").info("stop signal raised in %r: lost; sent again", unraisable.object)
        for sig in (signal.SIGTERM, signal.SIGINT):
            if signal.getsignal(sig) is _kill_children_and_exit:  # not a second signal: the first was lost
                signal.signal(sig, _raise_stopped)
        threading.Timer(0.01, os.kill, (os.getpid(), signum)).start()

    sys.unraisablehook = quiet_stops
    try:
        with stop_on_signals():
            yield
    except BaseException as exc:
        signum = signal_of(exc)
        if signum is None:
            sys.unraisablehook = previous_hook
            watchdog.disarm()
            raise
        # Armed until the process exits: what runs after this (the cluster's close) is bounded too.
        watchdog.report(signum)
        atexit.register(_exit_at_once, 128 + signum)
        raise typer.Exit(code=128 + signum) from None
    sys.unraisablehook = previous_hook
    watchdog.disarm()
