"""Long-running helper processes (servers, workers): each in its own process group, recorded by PID
and start time, stopped as a whole process tree.

Why a group and a tree: `prefect server start` and `mlflow server` fork uvicorn workers, and a worker
forks flow runs; signalling the group reaches them all, and the tree (psutil's `children(recursive=True)`,
taken before the first signal) also reaches descendants that moved to a group of their own. Why the
start time: a PID recorded in a file may belong to another process by the time `lifecycle down` reads
it; psutil's `create_time()` tells them apart.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
from pydantic import BaseModel

from lifecycle.errors import LifecycleError

# Two readings of one process's create_time agree to the clock tick; a recycled PID differs by far more.
_SAME_START_S = 0.05


class Started(BaseModel):
    """A process `up` started: its PID leads its own process group."""

    name: str
    pid: int
    create_time: float = 0.0
    url: str | None = None
    log: str


def _process(pid: int, create_time: float = 0.0) -> psutil.Process | None:
    """The live process `pid` if it is the one started at `create_time` (0: any); None when gone or a zombie."""
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
        if create_time and abs(proc.create_time() - create_time) > _SAME_START_S:
            return None
        return proc
    except psutil.Error:
        return None


def start_process(name: str, argv: list[str], env: dict[str, str], log: Path, cwd: Path | None = None,
                  url: str | None = None) -> Started:
    """Start a long-running process in a new session (its own process group), output to `log`."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        proc = subprocess.Popen(argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    found = _process(proc.pid)
    return Started(name=name, pid=proc.pid, create_time=found.create_time() if found else 0.0, url=url, log=str(log))


def _tail(path: str, lines: int = 15) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def is_running(started: Started) -> bool:
    """True while the recorded process itself (same PID and start time) is alive and not a zombie."""
    return _process(started.pid, started.create_time) is not None


def wait_until_ok(get: Callable[[], Any], failed: Callable[[], str | None], timeout_s: float,
                  timeout_message: str, interval_s: float = 0.3) -> None:
    """Call `get` (an HTTP GET) until it answers 200; connection errors only mean "not yet".

    Raises:
        LifecycleError: `failed()` returned a reason (the server died: waiting longer cannot help), or
            `timeout_s` passed (`timeout_message`).
    """
    import httpx

    deadline = time.monotonic() + timeout_s
    while True:
        reason = failed()
        if reason is not None:
            raise LifecycleError(reason)
        try:
            if get().status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise LifecycleError(timeout_message)
        time.sleep(interval_s)


def wait_http(started: Started, url: str, timeout_s: float = 90.0) -> None:
    """Wait until `url` answers 200; fail in one line (plus the log's tail) if the process died or it never did."""
    import httpx

    def exited() -> str | None:
        if is_running(started):
            return None
        return f"{started.name} exited during start-up (log {started.log}):\n{_tail(started.log)}"

    wait_until_ok(lambda: httpx.get(url, timeout=2), exited, timeout_s,
                  f"{started.name} did not answer {url} within {timeout_s:.0f}s (log {started.log})")


def _signal(procs: list[psutil.Process], sig: int) -> None:
    for proc in procs:
        try:
            proc.send_signal(sig)
        except psutil.Error:
            pass


def stop_process(started: Started, grace_s: float = 15.0) -> bool:
    """Stop a recorded process and its whole tree: SIGINT (a Prefect worker ignores SIGTERM while its server
    is up), then SIGTERM, then SIGKILL, each to the group and to every descendant still alive.

    Returns:
        False when it was not running (or the PID is no longer ours), else whether it is gone now.
    """
    leader = _process(started.pid, started.create_time)
    if leader is None:
        return False
    try:
        tree = [leader, *leader.children(recursive=True)]
    except psutil.Error:
        tree = [leader]
    for sig, wait in ((signal.SIGINT, grace_s), (signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(started.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
        _signal(tree, sig)
        _gone, alive = psutil.wait_procs(tree, timeout=wait)  # reaps our own child, so no zombie is left
        if leader not in alive:
            _signal(alive, signal.SIGKILL)  # leftovers of the tree (flow runs, uvicorn workers)
            try:
                os.killpg(started.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            return True
        tree = alive
    return not is_running(started)
