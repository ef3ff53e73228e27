"""Long-running helper processes (servers, workers): each in its own process group, recorded by PID
and start time, stopped by group.

Why a group: `prefect server start` and `mlflow server` fork uvicorn workers, and a worker forks flow
runs; signalling the group reaches them all. Why the start time: a PID recorded in a file may belong to
another process by the time `lifecycle down` reads it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from lifecycle.errors import LifecycleError


class Started(BaseModel):
    """A process `up` started: its PID leads its own process group."""

    name: str
    pid: int
    start_ticks: int = 0
    url: str | None = None
    log: str



def _start_ticks(pid: int) -> int:
    """The process's start time in clock ticks (/proc), so a recycled PID is never mistaken for ours;
    0 when it is gone or a zombie (exited, not yet reaped)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return 0 if fields[0] in ("Z", "X") else int(fields[19])
    except (OSError, IndexError, ValueError):
        return 0


def start_process(name: str, argv: list[str], env: dict[str, str], log: Path, cwd: Path | None = None,
                  url: str | None = None) -> Started:
    """Start a long-running process in a new session (its own process group), output to `log`."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        proc = subprocess.Popen(argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    return Started(name=name, pid=proc.pid, start_ticks=_start_ticks(proc.pid), url=url, log=str(log))


def _tail(path: str, lines: int = 15) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def is_running(started: Started) -> bool:
    ticks = _start_ticks(started.pid)
    return ticks != 0 and (started.start_ticks == 0 or ticks == started.start_ticks)


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


def stop_process(started: Started, grace_s: float = 15.0) -> bool:
    """Stop a recorded process group: SIGINT (a Prefect worker ignores SIGTERM while its server is up),
    then SIGTERM, then SIGKILL. Returns False when it was not running (or the PID is no longer ours)."""
    if not is_running(started):
        return False
    for sig, wait in ((signal.SIGINT, grace_s), (signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(started.pid, sig)
        except ProcessLookupError:
            return True
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                os.waitpid(started.pid, os.WNOHANG)
            except ChildProcessError:
                pass
            if not is_running(started):
                try:
                    os.killpg(started.pid, signal.SIGKILL)  # leftovers of the group (flow runs, uvicorn workers)
                except ProcessLookupError:
                    pass
                return True
            time.sleep(0.2)
    return not is_running(started)
